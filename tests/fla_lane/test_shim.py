"""The interpreter shim itself (``shim.py``): each of its patches on a small kernel of its own, with answers
computed by torch on the same numbers."""
import os

import pytest

if os.environ.get("WRITESAE_FLA_LANE") != "1":
    pytest.skip("the fla lane: run tests/fla_lane/run (its own virtualenv with Triton)", allow_module_level=True)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

gather = tl.gather  # a builtin under a module name, as fla/ops/utils/op.py binds it


@triton.jit
def _dot(a_ptr, b_ptr, c_ptr, c16_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    c = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)
    tl.store(c16_ptr + rm[:, None] * N + rn[None, :], c.to(tl.bfloat16))


def test_bf16_dot_is_the_float32_product_of_the_bf16_values():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(s, generator=g).bfloat16() for s in ((16, 32), (32, 16)))
    c, c16 = torch.empty(16, 16), torch.empty(16, 16, dtype=torch.bfloat16)
    _dot[(1,)](a, b, c, c16, 16, 32, 16)
    ref = a.float() @ b.float()
    assert (c - ref).abs().max() <= 1e-6 * ref.abs().max()  # float32 accumulation, another summation order
    assert torch.equal(c16, c.bfloat16())  # the float32 -> bf16 cast rounds to nearest even, as torch's


@triton.jit
def _arith(x_ptr, y_ptr, o_ptr, s_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    x, y = tl.load(x_ptr + r), tl.load(y_ptr + r)
    tl.store(o_ptr + r, x * y - 0.5)  # bf16 * bf16 and bf16 - a scalar: bf16 results
    tl.store(s_ptr, tl.sum(x, 0))  # a bf16 sum


def test_bf16_arithmetic_rounds_each_result_like_torch():
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(64, generator=g).bfloat16() for _ in range(2))
    out, total = torch.empty(64, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16)
    _arith[(1,)](x, y, out, total, 64)
    assert torch.equal(out, x * y - 0.5)  # torch's bf16 ops: in float32, each result rounded to nearest even
    ref = x.float().sum()
    assert (total.float() - ref).abs() <= 2 ** -8 * ref.abs()  # one bf16 rounding of a float32 sum


@triton.jit
def _loop(x_ptr, o_ptr, n, N: tl.constexpr):
    acc = tl.zeros([N], dtype=tl.float32)
    for i in range(0, n):  # i is a tensor in compiled code: .to() works on it
        acc += tl.load(x_ptr + i.to(tl.int64) * N + tl.arange(0, N))
    for j in tl.static_range(2):  # a constant
        acc += j
    tl.store(o_ptr + tl.arange(0, N), acc)


def test_range_loop_variables_are_tensors():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    out = torch.empty(8)
    _loop[(1,)](x, out, 5, 8)
    assert (out - (x.sum(0) + 1)).abs().max() < 1e-6


@triton.jit
def _gather(x_ptr, i_ptr, o_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(o_ptr + r, gather(tl.load(x_ptr + r), tl.load(i_ptr + r), 0))


def test_a_builtin_under_a_module_name():
    x, idx = torch.randn(16, generator=torch.Generator().manual_seed(3)), torch.randperm(16).int()
    out = torch.empty(16)
    _gather[(1,)](x, idx, out, 16)
    assert torch.equal(out, x[idx.long()])


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
@triton.jit
def _tuned(o_ptr, n, BLOCK: tl.constexpr):
    tl.store(o_ptr + tl.arange(0, 1), tl.full([1], BLOCK, tl.int32))


def test_autotuning_takes_the_first_config():
    out = torch.zeros(1, dtype=torch.int32)
    _tuned[(1,)](out, 7)
    assert out.item() == 16
