"""``writesae explore``: the explorer notebook (``notebooks/06_explorer.ipynb``) served live by Voilà.

The notebook gets its parameters as in the book: from a ``params/*.yaml`` file (default
``params/embedded_cpu.yaml``), the names its ``parameters`` cell defines, injected by papermill
(``prepare_only``: nothing runs) into a copy in ``_build/explore/`` (git ignores ``_build/``). Voilà
runs that copy in a fresh kernel for every browser tab, shows its outputs (no code), and keeps the
widgets connected to the kernel, so every control recomputes. The kernel finds the artifact cache by
the rule of :func:`writesae.cache.cache_root` (``$WRITESAE_CACHE``, else ``<repository root>/artifacts``).
On a cache the book filled, a page load only imports and loads the model and the SAEs (42 s on a busy
2-core machine, most of it imports and the model); on an empty cache it also extracts states and trains
the SAEs, and the page shows their progress bars as it goes (Voilà's progressive rendering).

Voilà is an optional dependency: ``pip install -e .[live]`` (``requirements.txt`` has it too).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .cache import cache_root

__all__ = ["stage", "voila_command", "serve", "REPO", "NOTEBOOK"]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = Path("notebooks/06_explorer.ipynb")


def stage(params_file=None, cell=None, root=REPO, threads=None) -> tuple[Path, dict]:
    """Write the explorer notebook with its parameters injected to ``<root>/_build/explore/``; return
    (its path, the parameters). ``cell`` ("L6H0" or (6, 0)) is the cell both widgets start on; it joins
    ``cells`` (the explorer's list) if missing there. ``threads``: the kernel's torch CPU threads (the
    notebook's ``threads`` parameter; default the params file's, else the notebook's)."""
    import papermill

    from .book import _notebook_params, load_params
    from .data import cell_tuple

    root = Path(root)
    src = root / NOTEBOOK
    if not src.is_file():
        raise FileNotFoundError(f"{src} is missing: `writesae explore` runs from a checkout of the repository "
                                "(pip install -e .)")
    if params_file is None:
        params_file = root / "params" / "embedded_cpu.yaml"
    params_file = Path(params_file)
    if not params_file.is_file() and (root / params_file).is_file():
        params_file = root / params_file
    if not params_file.is_file():
        raise FileNotFoundError(f"--params {params_file}: no such file; pass one of "
                                f"{sorted(p.name for p in (root / 'params').glob('*.yaml'))} (in params/)")
    params = _notebook_params(src, load_params(params_file))
    if cell is not None:
        cell = list(cell_tuple(cell))
        params["cell"] = cell
        cells = [list(c) for c in params.get("cells", [])]
        params["cells"] = cells + [cell] if cell not in cells else cells
    if threads is not None:
        params["threads"] = int(threads)
    out = root / "_build" / "explore" / src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(src), str(out), parameters=params, prepare_only=True, progress_bar=False)
    return out, params


TEMPLATES = Path(__file__).resolve().parent  # holds voila/templates/writesae: "lab" less its CDN stylesheets


def voila_command(notebook, port=8866, browser=True) -> list[str]:
    """The Voilà command line: 127.0.0.1 only, outputs shown as each cell finishes (progress included), the
    ``writesae`` template (found through ``$JUPYTER_PATH``, see :func:`serve`)."""
    return [sys.executable, "-m", "voila", str(notebook), f"--port={int(port)}", "--Voila.ip=127.0.0.1",
            "--template=writesae",
            "--VoilaConfiguration.progressive_rendering=True", "--VoilaConfiguration.show_tracebacks=True",
            *([] if browser else ["--no-browser"])]


def serve(params_file=None, cell=None, port=8866, browser=True, root=REPO, threads=None) -> int:
    """Stage the explorer and serve it with Voilà on http://127.0.0.1:<port> until interrupted; return
    Voilà's exit status."""
    if importlib.util.find_spec("voila") is None:
        raise RuntimeError("Voilà is not installed: pip install -e .[live]  (or pip install -r requirements.txt)")
    nb, params = stage(params_file, cell, root, threads)
    cache = cache_root(start=nb.parent).resolve()
    built = cache.is_dir() and any((cache / "sae").glob("*/done"))
    print(f"explorer: {nb} with {params} (other parameters: the notebook's defaults); artifact cache {cache} "
          + ("(trained SAEs found; what these parameters lack is built on the first page load, with progress "
             "bars in the page)" if built else
             "(no trained SAE there yet: the first page load extracts states and trains the SAEs, with progress "
             "bars in the page; minutes)"))
    print(f"open http://127.0.0.1:{int(port)}/ (Ctrl-C stops the server)", flush=True)
    env = dict(os.environ, JUPYTER_PATH=os.pathsep.join(filter(None, [str(TEMPLATES), os.environ.get("JUPYTER_PATH")])))
    return subprocess.call(voila_command(nb, port, browser), cwd=root, env=env)
