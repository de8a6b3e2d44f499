"""Triton 3.7.1's interpreter (``TRITON_INTERPRET=1``), patched so that fla's real kernels run on a CPU.

Four gaps of the interpreter, each closed here (``install()``, before fla is imported):

1. Autotuning asks the active driver for a benchmarker; on a CPU there is none ("0 active drivers").
   A benchmarker that reports equal times for every config makes the first config win (no kernel is run
   to time it).
2. The loop variable of a ``range`` / ``tl.range`` loop is a tensor in compiled code but a Python int in the
   interpreter, so fla's ``i_t.to(tl.int64)`` fails: the interpreter's AST rewrite also rebinds it as a
   tensor at the top of the loop body (``tl.static_range`` variables stay constants, as compiled).
3. Builtins fla binds to module names (``gather = tl.gather`` in ``fla/ops/utils/op.py``) are not patched by
   the interpreter, which patches only ``tl`` itself: they are patched the same way.
4. The interpreter keeps bfloat16 as raw 16-bit integers and computes on those bits: ``tl.dot`` on bf16
   operands returns values off by 1e9 or more, arithmetic on bf16 is wrong, a float32 -> bf16 cast
   truncates, and ``get_bf16`` (a bf16 constant) is missing. Here every operation on bf16 decodes its
   operands to float32, computes in float32 and rounds the result back to bf16 to nearest even (as the
   hardware's casts do; a reduction is one operation, rounded once); ``tl.dot`` of bf16 operands
   accumulates in float32, as on a GPU.

These are Triton's private internals: the lane pins Triton, and ``test_shim.py`` tests each patch.
"""
from __future__ import annotations

import ast

import numpy as np
import torch

TRITON = "3.7.1"


def bf16_to_f32(bits):
    """bf16 raw bits (uint16 array) -> float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """float32 values -> bf16 raw bits (uint16), rounded to nearest even (torch's cast)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def install():
    import triton
    import triton.language as tl
    from triton.runtime import autotuner
    from triton.runtime import interpreter as it

    if triton.__version__ != TRITON:
        raise RuntimeError(f"the interpreter shim is written for Triton {TRITON}, found {triton.__version__}")
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("the shim patches Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
    if getattr(it, "_writesae_shim", False):
        return
    it._writesae_shim = True

    # 1. equal timings: the first config wins
    autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None, **kw: [0.0, 0.0, 0.0])

    # 2. range loop variables are tensors
    class Rewrite(it.ASTTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            f = node.iter.func if isinstance(node.iter, ast.Call) else None
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name == "range" and isinstance(node.target, ast.Name):
                to_tensor = ast.Call(func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                                        attr="to_tensor", ctx=ast.Load()),
                                     args=[ast.Name(id=node.target.id, ctx=ast.Load()), ast.Constant(value=False)],
                                     keywords=[])
                node.body.insert(0, ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                                               value=to_tensor))
            return node

    it.FunctionRewriter.ast_transformer = Rewrite()

    # 3. builtins under module names of the kernel's globals
    patch_lang = it._patch_lang

    def _patch_lang(fn):
        scope = patch_lang(fn)
        for name, member in list(fn.__globals__.items()):
            if tl.core.is_builtin(member):
                scope.set_attr(_Globals(fn.__globals__), name, _interpreted(member, it.interpreter_semantic))
        return scope

    it._patch_lang = _patch_lang

    # 4. bf16 computed in float32, rounded to nearest even
    B = it.InterpreterBuilder
    bf16 = tl.bfloat16

    def is_bf16(h):
        return isinstance(h, it.TensorHandle) and h.dtype.scalar == bf16

    def dec(h):
        return it.TensorHandle(bf16_to_f32(h.data), tl.float32) if is_bf16(h) else h

    def enc(out, like):
        """float32 result -> bf16 handle when ``like`` is bf16, else unchanged."""
        if is_bf16(like) and out.data.dtype.kind == "f":
            return it.TensorHandle(f32_to_bf16(out.data), bf16)
        return out

    def in_f32(op, result_like):
        def wrapped(self, *args, **kwargs):
            out = op(self, *(dec(a) for a in args), **kwargs)
            return enc(out, args[result_like]) if any(is_bf16(a) for a in args) else out
        return wrapped

    B.binary_op = in_f32(B.binary_op, 0)
    B.ternary_op = in_f32(B.ternary_op, 2)
    B.unary_op = in_f32(B.unary_op, 0)
    B.create_fma = in_f32(B.create_fma, 2)
    B.create_rsqrt = in_f32(B.create_rsqrt, 0)
    B.create_erf = in_f32(B.create_erf, 0)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = np.matmul(dec(a).data, dec(b).data, dtype=np.float32) + dec(d).data
        return enc(it.TensorHandle(out.astype(np.float32), tl.float32), d)

    B.create_dot = create_dot

    cast_impl = B.cast_impl

    def cast(self, src, dst_type):
        if src.dtype.scalar == bf16:
            src = dec(src)
        if dst_type.scalar == bf16:
            return it.TensorHandle(f32_to_bf16(src.data.astype(np.float32)), bf16)
        return cast_impl(self, src, dst_type)

    B.cast_impl = cast
    for name in ("create_si_to_fp", "create_ui_to_fp", "create_fp_to_si", "create_fp_to_ui", "create_fp_ext",
                 "create_fp_trunc"):
        setattr(B, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    B.create_fp_to_fp = lambda self, src, dst_type, rounding_mode: self.cast_impl(src, dst_type)
    B.get_bf16 = lambda self, value: it.TensorHandle(f32_to_bf16(np.array([value], np.float32)), bf16)

    # reductions and scans over bf16: in float32, the result rounded back
    apply = it.ReduceScanOpInterface.apply

    def apply_f32(self, input):
        if not isinstance(input, tuple):
            return apply_f32(self, (input,))[0]
        if not any(t.dtype.scalar == bf16 for t in input):
            return apply(self, input)
        f32 = tuple(tl.core.tensor(dec(t.handle), t.type.with_element_ty(tl.float32)) if t.dtype.scalar == bf16
                    else t for t in input)
        out = apply(self, f32)
        return tuple(tl.core.tensor(enc(o.handle, t.handle), o.type.with_element_ty(bf16))
                     if t.dtype.scalar == bf16 and o.dtype == tl.float32 else o for o, t in zip(out, input))

    it.ReduceScanOpInterface.apply = apply_f32


class _Globals:
    """A module's globals dict seen as an object, for the interpreter's patch scope (set/restore by name)."""

    def __init__(self, d):
        object.__setattr__(self, "d", d)

    def __getattr__(self, name):
        return self.d[name]

    def __setattr__(self, name, value):
        self.d[name] = value


def _interpreted(member, semantic):
    def call(*args, **kwargs):
        kwargs.pop("_semantic", None)
        return member(*args, **kwargs, _semantic=semantic)
    return call
