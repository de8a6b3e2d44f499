"""The check every section notebook runs first: its papermill parameters, by name, type and range.

Papermill only warns about a parameter the notebook does not define and passes every ``-p`` value as
the type it guesses, so a typo runs on the defaults and ``-p cell "[4, 3]"`` arrives as a string.
:func:`check_parameters` compares what the parameters cells left in the notebook's namespace with the
notebook's own ``parameters`` cell (names and defaults) and fails with one line naming the parameter and
the valid values. Names that another section defines pass (a shared ``params/*.yaml`` holds them all). Cells may be given as ``[4, 3]``, ``"[4, 3]"``, ``"4,3"`` or ``"L4H3"``.
"""
from __future__ import annotations

import ast
import json
import re
import types
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_NAMES = ("cell",)          # one (layer, head)
CELLS_NAMES = ("cells",)        # a list of (layer, head)


class ParameterError(ValueError):
    """A notebook parameter with a wrong name, type or value."""


def defaults(notebook) -> dict:
    """The names and default values of a notebook's ``parameters`` cell."""
    path = NOTEBOOKS / f"{notebook}.ipynb"
    nb = json.loads(path.read_text())
    for c in nb["cells"]:
        if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", []):
            out = {}
            for node in ast.parse("".join(c["source"])).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    out[node.targets[0].id] = ast.literal_eval(node.value)
            return out
    raise ParameterError(f"{path} has no cell tagged 'parameters'")


def _cell(name, value):
    """(layer, head) from [4, 3], (4, 3), "[4, 3]", "4,3" or "L4H3"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*[Ll](\d+)[Hh](\d+)\s*", value)
        if m:
            return [int(m[1]), int(m[2])]
        try:
            value = ast.literal_eval(value if "[" in value or "(" in value else f"[{value}]")
        except (ValueError, SyntaxError):
            value = None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(x, int) for x in value):
        return [int(value[0]), int(value[1])]
    raise ParameterError(f"parameter {name}: expected a head as [layer, head], 'L4H3' or '4,3', got {value!r}")


def _coerce(name, value, default):
    """``value`` in the type of ``default`` (strings from ``papermill -p`` parsed), or ParameterError."""
    if name in CELL_NAMES:
        return _cell(name, value)
    if name in CELLS_NAMES:
        if isinstance(value, str):
            parts = re.findall(r"[Ll]\d+[Hh]\d+", value)
            value = parts if parts else _literal(name, value, "a list of heads like [[1, 2], [4, 3]] or 'L1H2,L4H3'")
        if not isinstance(value, (list, tuple)) or not value:
            raise ParameterError(f"parameter {name}: expected a non-empty list of heads, got {value!r}")
        return [_cell(name, c) for c in value]
    if default is None:
        return value
    kind = type(default)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif kind in (int, float):
        if isinstance(value, str):
            value = _literal(name, value, f"{'an integer' if kind is int else 'a number'} (default {default!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ParameterError(f"parameter {name}: expected {'an integer' if kind is int else 'a number'} "
                                 f"(default {default!r}), got {value!r}")
        return kind(value)
    elif kind in (list, tuple, dict):
        if isinstance(value, str):
            value = _literal(name, value, f"a {kind.__name__} like {default!r}")
        if isinstance(value, (list, tuple)) and kind in (list, tuple) or isinstance(value, dict) and kind is dict:
            return value
    elif isinstance(value, kind):
        return value
    raise ParameterError(f"parameter {name}: expected {kind.__name__} like the default {default!r}, got {value!r}")


def _literal(name, text, what):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ParameterError(f"parameter {name}: expected {what}, got {text!r}") from None


def check_parameters(namespace, notebook):
    """Validate and normalise the parameters in ``namespace`` (a notebook's ``globals()``, right after its
    parameters cells) against the notebook's ``parameters`` cell; raises :class:`ParameterError`, which in a
    kernel (papermill, Jupyter) shows as its one line, without the traceback above it."""
    try:
        _check_parameters(namespace, notebook)
    except ParameterError:
        _one_line_errors()
        raise


def _one_line_errors():
    """In an IPython kernel, show the next error as ``Name: message`` only (IPython's minimal exception mode)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if (ip := get_ipython()) is not None:
        ip.InteractiveTB.set_mode("Minimal")


def _check_parameters(namespace, notebook):
    from .book import BUILD_KEYS
    from .experiments.firings import POOLS

    want = defaults(notebook)
    ignore = {"In", "Out", "get_ipython", "exit", "quit", "open"}
    given = [k for k, v in namespace.items() if not k.startswith("_") and k not in ignore
             and not isinstance(v, types.ModuleType) and not callable(v)]
    # a shared parameter file (params/*.yaml) holds every section's names: a name another section defines is
    # not this notebook's business; a name no section defines is a typo
    shared = set(BUILD_KEYS) | {k for p in NOTEBOOKS.glob("[0-9]*.ipynb") if p.stem != notebook for k in defaults(p.stem)}
    unknown = [k for k in given if k not in want and k not in shared]
    if unknown:
        raise ParameterError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                             f"{notebook}; valid names: {', '.join(want)}")
    for name, default in want.items():
        namespace[name] = _coerce(name, namespace.get(name, default), default)
    for name in ("n_windows", "eval_windows", "window", "n_feat", "k", "epochs"):
        if name in want and isinstance(namespace[name], int) and namespace[name] < 1:
            raise ParameterError(f"parameter {name}: must be at least 1, got {namespace[name]}")
    if "pool" in want and namespace["pool"] not in POOLS:
        raise ParameterError(f"parameter pool: expected one of {', '.join(map(repr, POOLS))}, got {namespace['pool']!r}")
    if {"k", "n_feat"} <= set(want) and namespace["k"] > namespace["n_feat"]:
        raise ParameterError(f"parameter k = {namespace['k']} exceeds n_feat = {namespace['n_feat']}: an SAE keeps "
                             "k of its n_feat atoms; lower k or raise n_feat")


def glue_all(values: dict) -> None:
    """Glue every ``name: value`` for the page's prose (``{glue:text}`name```), showing nothing."""
    from myst_nb import glue

    for name, value in values.items():
        glue(name, value, display=False)


def setup(namespace):
    """The section of a chapter notebook (a :class:`writesae.experiments.section.Section`) from its parameters
    (its ``globals()`` after :func:`check_parameters`): seeds torch, sets its CPU threads, keeps freed memory for
    reuse (:mod:`writesae.runtime`), loads the host and prints one line saying what the page runs on."""
    import torch

    from . import pipeline
    from .experiments.section import Section
    from .runtime import keep_freed_memory

    p = namespace
    keep_freed_memory()
    torch.manual_seed(p["seed"])
    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    host = pipeline.host(p["model"], p["device"], p.get("dtype", "float32"), p.get("trust_remote_code", False))
    sec = Section(host, p["cell"], p["cells"], heads_layer=p.get("heads_layer"), window=p["window"],
                  n_windows=p["n_windows"], positions_per_seq=p["positions_per_seq"],
                  eval_windows=p.get("eval_windows", 64), n_feat=p["n_feat"], k=p["k"], epochs=p["epochs"],
                  seed=p["seed"], min_firings=p.get("min_firings", 5), max_firings=p.get("max_firings"),
                  max_firings_by_cell=p.get("max_firings_by_cell"), pool=p.get("pool", "registers"),
                  corpus=p.get("corpus", "embedded"))
    print(sec.describe())
    return sec


_P_COLUMNS = re.compile(r"(^p$|^p_|_p$|pvalue)")


def number(x) -> str:
    """A number at the digits that mean something here: integers whole, 0.01-10 with three decimals, larger
    values with fewer, tiny ones in scientific notation; NaN as an en dash."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
        return str(x)
    if isinstance(x, int) or (float(x).is_integer() and abs(float(x)) < 1e15):
        return f"{int(x):,}" if abs(int(x)) >= 10000 else str(int(x))  # ids and counts below 10,000 as written
    x = float(x)
    if x != x:
        return "–"
    a = abs(x)
    return (f"{x:,.0f}" if a >= 1000 else f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 10
            else f"{x:.3f}" if a >= 0.01 else _sci(x))


def _sci(x) -> str:
    """Scientific notation without padded exponents: 1.74e-8."""
    m, e = f"{x:.2e}".split("e")
    return f"{m}e{int(e)}"


def _p_value(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "–" if x != x else f"{x:.2g}"


def _column_format(col):
    """One format for a whole column of numbers (so its digits line up): whole numbers as integers, others
    with three significant digits at the column's typical size; other columns by :func:`number`."""
    import numpy as np
    import pandas as pd

    if not pd.api.types.is_float_dtype(col):
        return number
    v = np.abs(col.to_numpy(float))
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v) or np.all(v == np.round(v)):
        return lambda x: number(x)
    if np.all(v == np.round(v, 2)) and v.min() >= 0.01:  # set values such as doses 0.5, 1, 2: as given
        return lambda x: "–" if x != x else f"{x:g}"
    m = float(np.median(v))
    if m < 0.01 and v.max() >= 0.1:  # mostly tiny, some large (e.g. forget gates): fixed decimals
        return lambda x: "–" if x != x else f"{x:.4f}"
    if m < 0.01:
        return lambda x: "–" if x != x else _sci(x)
    decimals = 0 if m >= 1000 else 1 if m >= 100 else 2 if m >= 10 else 3
    return lambda x: "–" if x != x else f"{x:,.{decimals}f}"


def table(df, columns=None, *, rename=None, caption=None):
    """A table for the page: ``columns`` of ``df`` (all by default; a dict is read as {name: value}), no
    index, numbers rounded by :func:`number` (p-values to two significant digits). Returns a pandas Styler."""
    import pandas as pd

    if isinstance(df, dict):
        df = pd.DataFrame({"quantity": list(df), "value": list(df.values())})
    elif isinstance(df, pd.Series):
        df = df.rename("value").rename_axis("quantity").reset_index()
    df = df if columns is None else df[list(columns)]
    df = df.reset_index(drop=True)
    if rename:
        df = df.rename(columns=rename)
    fmt = {c: (_p_value if _P_COLUMNS.search(str(c)) else _column_format(df[c])) for c in df.columns}
    if "quantity" in df.columns and "value" in df.columns:  # a dict: p-values by their row's name
        fmt["value"] = number
        ps = [i for i, q in enumerate(df["quantity"]) if _P_COLUMNS.search(str(q))]
        df["value"] = [(_p_value(v) if i in ps else v) for i, v in enumerate(df["value"])]
    st = df.style.hide(axis="index").format(fmt, na_rep="–").set_table_attributes('class="writesae"')
    text = [c for c in df.columns if df[c].dtype == object or pd.api.types.is_string_dtype(df[c])]
    if text and "value" not in text:  # words wrap, numbers do not (book/_static/writesae.css)
        st = st.set_properties(subset=text, **{"white-space": "normal", "text-align": "left"})
    # headers with spaces, so a narrow page wraps them instead of cutting the table at its right edge
    st = st.relabel_index([str(c).replace("_", " ") for c in df.columns], axis="columns")
    if caption:
        st = st.set_caption(caption)
    return st


def report(values: dict) -> None:
    """Glue every number of the page for its prose and print them rounded, one per line (the executed notebook
    states its key numbers without the book around it)."""
    glue_all(values)
    width = max(map(len, values), default=0)
    print("\n".join(f"{k:<{width}}  {number(v)}" for k, v in values.items()))
