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
    raise ParameterError(f"parameter {name}: expected a cell as [layer, head], 'L4H3' or '4,3', got {value!r}")


def _coerce(name, value, default):
    """``value`` in the type of ``default`` (strings from ``papermill -p`` parsed), or ParameterError."""
    if name in CELL_NAMES:
        return _cell(name, value)
    if name in CELLS_NAMES:
        if isinstance(value, str):
            parts = re.findall(r"[Ll]\d+[Hh]\d+", value)
            value = parts if parts else _literal(name, value, "a list of cells like [[1, 2], [4, 3]] or 'L1H2,L4H3'")
        if not isinstance(value, (list, tuple)) or not value:
            raise ParameterError(f"parameter {name}: expected a non-empty list of cells, got {value!r}")
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
    parameters cells) against the notebook's ``parameters`` cell; raises :class:`ParameterError`."""
    want = defaults(notebook)
    ignore = {"In", "Out", "get_ipython", "exit", "quit", "open"}
    given = [k for k, v in namespace.items() if not k.startswith("_") and k not in ignore
             and not isinstance(v, types.ModuleType) and not callable(v)]
    # a shared parameter file (params/*.yaml) holds every section's names: a name another section defines is
    # not this notebook's business; a name no section defines is a typo
    shared = {"notebooks"} | {k for p in NOTEBOOKS.glob("[0-9]*.ipynb") if p.stem != notebook for k in defaults(p.stem)}
    unknown = [k for k in given if k not in want and k not in shared]
    if unknown:
        raise ParameterError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                             f"{notebook}; valid names: {', '.join(want)}")
    for name, default in want.items():
        namespace[name] = _coerce(name, namespace.get(name, default), default)
    for name in ("n_windows", "eval_windows", "window", "n_feat", "k", "epochs"):
        if name in want and isinstance(namespace[name], int) and namespace[name] < 1:
            raise ParameterError(f"parameter {name}: must be at least 1, got {namespace[name]}")
    if {"k", "n_feat"} <= set(want) and namespace["k"] > namespace["n_feat"]:
        raise ParameterError(f"parameter k = {namespace['k']} exceeds n_feat = {namespace['n_feat']}: an SAE keeps "
                             "k of its n_feat atoms; lower k or raise n_feat")


def glue_all(values: dict) -> None:
    """Glue every ``name: value`` for the page's prose (``{glue:text}`name```), showing nothing."""
    from myst_nb import glue

    for name, value in values.items():
        glue(name, value, display=False)
