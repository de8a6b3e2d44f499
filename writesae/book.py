"""Build the WriteSAE book: execute the notebooks, then render them with jupyter-book.

Layout (everything under ``<root>/_build/``, which git ignores)::

    _build/src/         staging copy of the book that jupyter-book renders:
                        _config.yml, _toc.yml, book/ (copied), and every notebook
                        listed in _toc.yml *executed* (same relative path)
    _build/html/        the rendered book (open index.html)
    _build/failed/      the executed copy of a notebook that raised, with its traceback

The sources stay clean: notebooks are committed without outputs, executed
copies never touch ``notebooks/``, and the TOC names the source paths
(``notebooks/<name>``) because the staging tree mirrors them.

Execution: papermill, kernel ``python3``, working directory ``<root>`` (so
``./artifacts`` and ``params/`` resolve as in a terminal at the repository
root), widget state stored in the notebook (nbclient ``store_widget_state``),
so the static HTML shows ipywidgets. Parameters come from a YAML file in
``params/``::

    seed: 0                # passed to every notebook whose `parameters` cell defines `seed`
    host: embedded
    notebooks:             # optional per-notebook overrides, keyed by file stem
      03_substitution:
        n_firings: 500
    build_order: [03_substitution, 01_write_and_atom]   # optional: started first, in this order (``jobs``)

A notebook gets only the names its ``parameters`` cell defines (the same file
works with ``papermill -f``, which injects everything).

Incremental: a staged notebook records a key (SHA-256 of the notebook file,
its parameters and the ``writesae`` package's ``*.py`` sources) in its
metadata (``metadata.writesae.build_key``); it is re-executed only when the
key changes, or with ``force=True``. Sphinx's own incremental build then
re-renders only the changed pages.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["build", "profile", "print_profile", "screenshot", "toc_documents", "load_params", "BuildReport"]

NB_META = "writesae"
BUILD_KEYS = ("notebooks", "build_order")  # a params file's keys for the build, not parameters of a notebook
SUFFIXES = (".ipynb", ".md", ".rst")


@dataclass
class BuildReport:
    html: Path                      # _build/html
    executed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)   # step -> seconds
    plumbing: dict = field(default_factory=dict)  # page -> what it shows that a reader should not see (:func:`plumbing`)

    @property
    def index(self) -> Path:
        return self.html / "index.html"


# What a built page must not show a reader: output on stderr (warnings, logging), progress bars, raw Python reprs
_PLUMBING = {
    "stderr output": re.compile(r'class="[^"]*\boutput stderr\b'),
    "warning": re.compile(r"\b\w*Warning: |warnings\.warn\("),
    "progress bar": re.compile(r"\d+/\d+ \[\d+:\d+|\d+(?:\.\d+)?(?:it|s)/(?:s|it)\]|\d+%\|"),
    "raw repr": re.compile(r"&lt;[\w.]+ (?:(?:object )?at 0x[0-9a-f]+|size \d+x\d+ with \d+ Axes)&gt;"
                           r"|<pre>(?:<span></span>)?\s*(?:True|False|None)\s*</pre>"),
}


def plumbing(html: str) -> list[str]:
    """What an HTML page shows that is plumbing, not a result: the names of :data:`_PLUMBING`'s patterns it matches."""
    return [name for name, pat in _PLUMBING.items() if pat.search(html)]


def toc_documents(root=".") -> list[Path]:
    """The files the TOC lists, in TOC order, as paths relative to ``root``.

    Raises ``FileNotFoundError`` for an entry whose file does not exist.
    """
    from sphinx_external_toc.parsing import parse_toc_yaml

    root = Path(root)
    files = []
    for docname in parse_toc_yaml(root / "_toc.yml"):
        found = [root / (docname + s) for s in SUFFIXES if (root / (docname + s)).is_file()]
        if not found and (root / docname).is_file():
            found = [root / docname]
        if not found:
            raise FileNotFoundError(f"_toc.yml lists {docname!r} but no such .ipynb/.md file exists")
        files.append(found[0].relative_to(root))
    return files


def load_params(params_file) -> dict:
    """Read a params YAML file (an empty file is ``{}``)."""
    data = yaml.safe_load(Path(params_file).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{params_file}: expected a mapping of parameter names to values")
    return data


def _notebook_params(nb_path: Path, all_params: dict) -> dict:
    """The parameters from ``all_params`` that this notebook declares, with its overrides."""
    import papermill

    declared = papermill.inspect_notebook(str(nb_path))
    merged = {k: v for k, v in all_params.items() if k not in BUILD_KEYS}
    overrides = (all_params.get("notebooks") or {}).get(nb_path.stem) or {}
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(f"params for {nb_path.stem} name {unknown}, which its parameters cell does not define")
    merged.update(overrides)
    return {k: v for k, v in merged.items() if k in declared}


def _code_hash() -> str:
    """The package's code and the shipped models' configs and metrics (a retrained or newly added zoo member
    re-executes the sections, as a code change does)."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")) + sorted((pkg / "embedded").rglob("*.json")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _build_key(nb_path: Path, params: dict, code: str) -> str:
    h = hashlib.sha256(nb_path.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(code.encode())
    return h.hexdigest()


def _staged_meta(path: Path) -> dict:
    """The build record (``metadata.writesae``: build_key, params, seconds) of a staged notebook, ``{}`` if none."""
    try:
        return json.loads(path.read_text()).get("metadata", {}).get(NB_META, {})
    except (json.JSONDecodeError, OSError):
        return {}


def _copy_if_changed(src: Path, dst: Path) -> None:
    """Copy keeping the mtime, so Sphinx sees an unchanged page as unchanged."""
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _mirror(src: Path, dst: Path) -> None:
    """Make the folder ``dst`` a copy of ``src`` (stale files removed)."""
    for p in src.rglob("*"):
        if p.is_file():
            _copy_if_changed(p, dst / p.relative_to(src))
    if dst.exists():
        for p in sorted(dst.rglob("*"), reverse=True):
            if not (src / p.relative_to(dst)).exists():
                p.unlink() if p.is_file() else shutil.rmtree(p)


def _execute(nb: Path, out: Path, params: dict, key: str, root: Path, failed_dir: Path, params_file) -> float:
    """Execute ``nb`` into ``out``; return the seconds it took (also recorded in its metadata)."""
    import nbformat
    import papermill

    t0 = time.perf_counter()
    work = root / "_build" / "executing" / nb.name
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = papermill.execute_notebook(
            str(root / nb), str(work), parameters=params, kernel_name="python3",
            progress_bar=False, store_widget_state=True,
            # the kernel starts in ``root`` (nbclient's resources path). Not papermill's ``cwd=``: that chdirs this
            # whole process, and two notebooks running side by side would restore each other's directory.
            resources={"metadata": {"path": str(root)}})
    except Exception as exc:
        failed = failed_dir / nb.name
        failed.parent.mkdir(parents=True, exist_ok=True)
        if work.exists():
            os.replace(work, failed)
        raise RuntimeError(f"{nb} failed: {exc}\nexecuted copy with the traceback: {failed}") from exc
    for c in result.cells:  # papermill's injected parameters: folded away in the HTML like the parameters cell
        tags = c.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    seconds = time.perf_counter() - t0
    result.metadata[NB_META] = {"build_key": key, "params": params,
                                "params_file": str(params_file) if params_file else None,
                                "seconds": round(seconds, 1)}
    nbformat.write(result, str(work))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, out)
    return seconds


def build(params_file=None, only=None, tiny=False, root=".", progress=True, force=False, jobs=1) -> BuildReport:
    """Execute the TOC's notebooks (incrementally) and render the book to ``<root>/_build/html``.

    params_file: YAML of notebook parameters; default ``params/tiny.yaml`` when
        ``tiny`` else ``params/embedded_cpu.yaml`` (under ``root``; no file -> no parameters).
    only: notebook names (stems or paths) to consider for execution; other
        notebooks keep their last executed copy (or, if they have none, are
        rendered unexecuted, with a note).
    force: re-execute even when inputs and parameters are unchanged.
    jobs: notebooks executed at once, each in its own kernel: first those the params file's ``build_order`` lists,
        in its order, then the others longest first by the last build's times. They share artifacts through the
        cache, whose per-artifact lock makes one compute what another waits for.
    progress: show a progress bar over notebooks.
    Returns a :class:`BuildReport`; prints each step's time and where the HTML is.
    """
    from tqdm.auto import tqdm

    root = Path(root).resolve()
    out_root = root / "_build"
    src = out_root / "src"
    report = BuildReport(html=out_root / "html")
    t_all = time.perf_counter()

    if params_file is None:
        params_file = root / "params" / ("tiny.yaml" if tiny else "embedded_cpu.yaml")
        all_params = load_params(params_file) if params_file.exists() else {}
        if not params_file.exists():
            print(f"note: {params_file} not found; notebooks run with their own defaults")
            params_file = None
    else:
        params_file = Path(params_file)
        if not params_file.is_absolute() and not params_file.exists():
            params_file = root / params_file
        all_params = load_params(params_file)

    docs = toc_documents(root)
    notebooks = [d for d in docs if d.suffix == ".ipynb"]
    wanted = None if only is None else {Path(str(o)).stem for o in ([only] if isinstance(only, str) else only)}
    if wanted is not None and wanted - {nb.stem for nb in notebooks}:
        raise ValueError(f"only= names notebooks not in _toc.yml: {sorted(wanted - {nb.stem for nb in notebooks})}")

    # the non-notebook part of the book
    for name in ("_config.yml", "_toc.yml"):
        _copy_if_changed(root / name, src / name)
    if (root / "book").is_dir():
        _mirror(root / "book", src / "book")
    for d in docs:
        if d.suffix != ".ipynb":
            _copy_if_changed(root / d, src / d)

    code = _code_hash()
    todo = []
    for nb in notebooks:
        staged = src / nb
        if wanted is not None and nb.stem not in wanted:
            if not staged.exists():
                print(f"{nb}: not executed (only=...); rendered without outputs")
                _copy_if_changed(root / nb, staged)
            continue
        params = _notebook_params(root / nb, all_params)
        key = _build_key(root / nb, params, code)
        last = _staged_meta(staged)
        if not force and last.get("build_key") == key:
            report.skipped.append(nb.stem)
            print(f"{nb}: unchanged, skipped")
            continue
        todo.append((nb, params, key, last.get("seconds") or 0))
    # the params file's build_order first, in its order; the others longest first by the last build's times (a fresh
    # clone keeps the TOC order), so the last to finish is short
    order = [str(x) for x in all_params.get("build_order") or []]
    if unknown := sorted(set(order) - {nb.stem for nb in notebooks}):
        raise ValueError(f"build_order in {params_file} names {unknown}, which _toc.yml does not list; use the "
                         "notebooks' file stems")
    todo.sort(key=lambda t: (order.index(t[0].stem) if t[0].stem in order else len(order), -t[3]))

    def run(item):
        nb, params, key, _ = item
        return _execute(nb, src / nb, params, key, root, out_root / "failed", params_file)

    bar = tqdm(total=len(todo), desc="notebooks", unit="nb", disable=not progress)
    errors = []
    with ThreadPoolExecutor(max(1, int(jobs))) as pool:  # each notebook runs in its own kernel process
        futures = {pool.submit(run, item): item[0] for item in todo}
        for fut in as_completed(futures):
            nb = futures[fut]
            bar.update()
            try:
                report.timings[str(nb)] = fut.result()
            except Exception as exc:  # let the running ones finish, start no other
                errors.append(exc)
                for other in futures:
                    other.cancel()
                continue
            report.executed.append(nb.stem)
            tqdm.write(f"{nb}: executed in {report.timings[str(nb)]:.1f} s")
    bar.close()
    if errors:
        raise errors[0]
    report.executed.sort(key=[nb.stem for nb in notebooks].index)
    # drop staged notebooks that left the TOC
    for p in (src.rglob("*.ipynb") if src.exists() else []):
        if p.relative_to(src) not in notebooks:
            p.unlink()

    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(src), "--path-output", str(root), "--quiet"]
    proc = subprocess.run(cmd, cwd=root)
    report.timings["jupyter-book build"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}): {' '.join(cmd)}")
    report.timings["total"] = time.perf_counter() - t_all
    for nb in notebooks:
        page = report.html / nb.with_suffix(".html")
        if page.exists() and (found := plumbing(page.read_text(encoding="utf-8"))):
            report.plumbing[nb.stem] = found
            print(f"note: {nb.stem}'s page shows {', '.join(found)}")

    for step, sec in report.timings.items():
        print(f"{step:<40s} {sec:8.1f} s")
    print(f"HTML: {report.index}")
    return report


def profile(root=".", top: int = 3) -> list[tuple[str, float, list[tuple[float, str]]]]:
    """Where the last build's seconds went: per executed notebook (TOC order), its time and its ``top``
    slowest cells as (seconds, the cell's first line that is not a comment), from papermill's per-cell
    durations in ``_build/src``. A cell's seconds include waiting for an artifact another notebook was
    computing (``--jobs``)."""
    root = Path(root).resolve()
    out = []
    for nb in (d for d in toc_documents(root) if d.suffix == ".ipynb"):
        path = root / "_build" / "src" / nb
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        cells = []
        for c in doc["cells"]:
            sec = (c.get("metadata", {}).get("papermill") or {}).get("duration")
            if c["cell_type"] == "code" and sec:
                src = "".join(c["source"]).splitlines()
                line = next((x.strip() for x in src if x.strip() and not x.lstrip().startswith("#")), "")
                cells.append((float(sec), line[:90]))
        total = doc["metadata"].get(NB_META, {}).get("seconds") or sum(x for x, _ in cells)
        out.append((str(nb), float(total), sorted(cells, reverse=True)[:top]))
    return out


def print_profile(root=".", top: int = 3) -> None:
    """Print :func:`profile` and the compute seconds of the artifacts in the cache, by kind."""
    from .cache import cache_root, seconds_by_kind

    for nb, total, cells in profile(root, top):
        print(f"{nb:<44s} {total:7.1f} s")
        for sec, line in cells:
            print(f"    {sec:7.1f} s  {line}")
    kinds = seconds_by_kind(cache_root(start=root))
    if kinds:
        print(f"\nartifacts computed, by kind ({cache_root(start=root)}; waits excluded):")
        for kind, (n, sec) in kinds.items():
            print(f"    {sec:7.1f} s  {n:3d} x {kind}")


def _find_chromium():
    for name in (os.environ.get("WRITESAE_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def chromium_command(chromium: str, profile: str, budget_ms: int = 5000) -> list[str]:
    """Headless Chromium with every host name but localhost unresolvable.

    So a page that renders here renders offline: nothing can come from a CDN.
    """
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
            f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]


def screenshot(pages, out_dir, width: int = 1280, height: int = 2000, budget_ms: int = 5000) -> list[Path]:
    """Render HTML pages with headless Chromium to PNGs in ``out_dir``; return the PNG paths.

    ``pages``: paths to built ``.html`` files (or URLs). Chromium runs with a
    throw-away profile and no name resolution except localhost (see
    :func:`chromium_command`); scripts get ``budget_ms`` of virtual time
    (enough for widgets and MathJax to render).
    Without a Chromium binary (``apt-get install -y chromium``, or
    ``$WRITESAE_CHROMIUM``) it prints why and returns ``[]``.
    """
    chromium = _find_chromium()
    if chromium is None:
        print("screenshot: no Chromium found (apt-get install -y chromium, or set WRITESAE_CHROMIUM); skipped")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    for page in ([pages] if isinstance(pages, (str, Path)) else pages):
        page = str(page)
        url = page if "://" in page else Path(page).resolve().as_uri()
        name = Path(page).with_suffix("").name if "://" not in page else "page"
        if Path(page).parent.name and "://" not in page:
            name = f"{Path(page).parent.name}-{name}"
        png = out_dir / f"{name}.png"
        with tempfile.TemporaryDirectory() as profile:
            cmd = chromium_command(chromium, profile, budget_ms) + [
                "--hide-scrollbars", f"--screenshot={png}", f"--window-size={width},{height}", url]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0 or not png.exists():
            print(f"screenshot: chromium failed on {page} (exit {proc.returncode}): {proc.stderr[-500:]}")
            continue
        shots.append(png)
    return shots
