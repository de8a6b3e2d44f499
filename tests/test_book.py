"""Build a one-notebook book with the project's real _config.yml and book/ pages."""
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import yaml

from writesae import book

REPO = Path(__file__).resolve().parents[1]

TOC = """format: jb-book
root: book/intro
chapters:
  - file: notebooks/demo
  - file: book/method
  - file: book/limitations
  - file: book/references
"""


def demo_notebook():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("wins = 1\nn = 2")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Demo\n\nWin rate: {glue:text}`win_rate:.1%` of {glue:text}`n_firings`."),
        params,
        nbformat.v4.new_code_cell("from myst_nb import glue\nglue('win_rate', wins / n, display=False)\n"
                                  "glue('n_firings', n, display=False)"),
        nbformat.v4.new_code_cell("import ipywidgets as w\nw.IntSlider(value=7, min=0, max=10, description='k')"),
    ]
    return nb


class Remote(HTMLParser):
    """Collect script/stylesheet sources that point off the machine."""

    def __init__(self):
        super().__init__()
        self.remote = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        url = a.get("src") if tag in ("script", "img", "iframe") else (
            a.get("href") if tag == "link" and a.get("rel") != "canonical" else None)
        if url and re.match(r"^(https?:)?//", url):
            self.remote.append(url)


def remote_sources(html: str):
    p = Remote()
    p.feed(html)
    inline = re.findall(r"<script[^>]*>([^<]*https?://[^<]*)</script>", html)
    return p.remote + [s for s in inline if "application/vnd.jupyter.widget" not in s]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    shutil.copytree(REPO / "book", root / "book")
    (root / "_toc.yml").write_text(TOC)
    (root / "notebooks").mkdir()
    nbformat.write(demo_notebook(), root / "notebooks" / "demo.ipynb")
    (root / "params").mkdir()
    (root / "params" / "t.yaml").write_text("wins: 4482\nn: 4851\nunused: 3\n")
    with pytest.MonkeyPatch.context() as mp:
        # the key also hashes writesae's sources, which others edit while this runs
        mp.setattr(book, "_code_hash", lambda: "fixed")
        first = book.build(params_file="params/t.yaml", root=root, progress=False)
        second = book.build(params_file="params/t.yaml", root=root, progress=False)
        yield root, first, second


def test_builds_and_skips_unchanged(built):
    root, first, second = built
    assert first.executed == ["demo"] and first.skipped == []
    assert second.executed == [] and second.skipped == ["demo"]
    assert first.index.exists()
    assert (root / "_build" / "html" / "notebooks" / "demo.html").exists()
    # sources untouched: the executed copy lives in the staging tree
    assert not json.loads((root / "notebooks" / "demo.ipynb").read_text())["cells"][2]["outputs"]


def test_parameters_injected_and_glued(built):
    root, _, _ = built
    staged = nbformat.read(root / "_build" / "src" / "notebooks" / "demo.ipynb", as_version=4)
    assert staged.metadata["writesae"]["params"] == {"wins": 4482, "n": 4851}  # `unused` filtered out
    html = (root / "_build" / "html" / "notebooks" / "demo.html").read_text()
    assert "92.4%" in html  # 4482 / 4851, formatted by {glue:text}`win_rate:.1%`
    assert "4851" in html


def test_widget_state_saved_and_embedded(built):
    root, _, _ = built
    staged = nbformat.read(root / "_build" / "src" / "notebooks" / "demo.ipynb", as_version=4)
    state = staged.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    sliders = [s for s in state.values() if s["model_name"] == "IntSliderModel"]
    assert len(sliders) == 1 and sliders[0]["state"]["value"] == 7
    html = (root / "_build" / "html" / "notebooks" / "demo.html").read_text()
    assert 'type="application/vnd.jupyter.widget-state+json"' in html
    assert "application/vnd.jupyter.widget-view+json" in html
    assert "IntSliderModel" in html
    assert "_static/vendor/requirejs/require.js" in html
    assert "_static/vendor/html-manager/embed-amd.js" in html
    assert (root / "_build" / "html" / "_static" / "vendor" / "html-manager" / "embed-amd.js").exists()


def test_no_remote_scripts(built):
    root, _, _ = built
    pages = sorted((root / "_build" / "html").rglob("*.html"))
    assert len(pages) >= 3
    for page in pages:
        assert remote_sources(page.read_text()) == [], page
    # the checker does catch a CDN script
    assert remote_sources('<script src="https://cdn.jsdelivr.net/x.js"></script>') == ["https://cdn.jsdelivr.net/x.js"]
    math = (root / "_build" / "html" / "book" / "method.html").read_text()
    assert "_static/vendor/mathjax/tex-svg-full.js" in math


def test_changed_parameters_reexecute(built, monkeypatch):
    root, _, _ = built
    monkeypatch.setattr(book, "_code_hash", lambda: "fixed")
    (root / "params" / "t2.yaml").write_text("wins: 3\nn: 4\n")
    r = book.build(params_file=root / "params" / "t2.yaml", root=root, progress=False)
    assert r.executed == ["demo"]
    assert "75.0%" in (root / "_build" / "html" / "notebooks" / "demo.html").read_text()


def test_failing_notebook_reports_and_keeps_copy(tmp_path):
    root = tmp_path
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "_toc.yml").write_text("format: jb-book\nroot: notebooks/bad\n")
    (root / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nb, root / "notebooks" / "bad.ipynb")
    with pytest.raises(RuntimeError, match="bad.ipynb failed"):
        book.build(root=root, progress=False)
    assert "boom" in (root / "_build" / "failed" / "bad.ipynb").read_text()
    assert not (root / "_build" / "src" / "notebooks" / "bad.ipynb").exists()


def test_jobs_run_notebooks_side_by_side(tmp_path, monkeypatch):
    """jobs=2: two notebooks execute at once (their run intervals overlap); a failing one is reported after
    the running one finishes, and the next build runs the longest first (its recorded seconds)."""
    monkeypatch.setattr(book, "_code_hash", lambda: "fixed")
    shutil.copy(REPO / "_config.yml", tmp_path / "_config.yml")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: notebooks/a\nchapters:\n  - file: notebooks/b\n")
    (tmp_path / "notebooks").mkdir()
    for name, secs in (("a", 1.0), ("b", 3.0)):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_code_cell(f"import time\nt0 = time.time()\ntime.sleep({secs})\nprint(t0, time.time())"),
                    nbformat.v4.new_code_cell("import os\nprint(os.getcwd())")]
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
    here, real_chdir = os.getcwd(), os.chdir
    # the kernels start in the book's root without this process changing directory: a chdir per thread would
    # race (each restores the directory it found, which may be the other's), leaving the caller elsewhere.
    # (papermill's file handler "changes" to the directory it is already in: harmless, allowed.)
    def chdir(path):
        assert os.path.samefile(path, here), f"build changed the process directory to {path}"
    monkeypatch.setattr(os, "chdir", chdir)
    report = book.build(root=tmp_path, progress=False, jobs=2)
    monkeypatch.setattr(os, "chdir", real_chdir)
    assert report.executed == ["a", "b"] and os.getcwd() == here
    spans = {}
    for name in "ab":
        staged = json.loads((tmp_path / "_build" / "src" / "notebooks" / f"{name}.ipynb").read_text())
        spans[name] = [float(x) for x in "".join(staged["cells"][0]["outputs"][0]["text"]).split()]
        assert "".join(staged["cells"][1]["outputs"][0]["text"]).strip() == str(tmp_path)
        assert staged["metadata"]["writesae"]["seconds"] >= {"a": 1.0, "b": 3.0}[name]
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]  # they overlapped
    prof = {nb: (total, cells) for nb, total, cells in book.profile(tmp_path)}
    assert list(prof) == ["notebooks/a.ipynb", "notebooks/b.ipynb"] and prof["notebooks/b.ipynb"][0] >= 3.0
    assert prof["notebooks/b.ipynb"][1][0][0] >= 3.0 and prof["notebooks/b.ipynb"][1][0][1] == "import time"
    # the next build starts the one that took longest last time (the recorded seconds, set here: the kernels'
    # start-up varies by seconds, so the sleeps alone do not fix which of the two was longer)
    monkeypatch.setattr(book, "_execute", lambda nb, *a: started.append(nb.stem) or 0.1)
    for first in "ab":
        for name in "ab":
            path = tmp_path / "_build" / "src" / "notebooks" / f"{name}.ipynb"
            staged = json.loads(path.read_text())
            staged["metadata"]["writesae"]["seconds"] = 9.0 if name == first else 1.0
            path.write_text(json.dumps(staged))
        started = []
        book.build(root=tmp_path, progress=False, jobs=1, force=True)
        assert started == [first, "ab".replace(first, "")]
    # a params file's build_order goes first, whatever the last build's times (here "a" took longest)
    (tmp_path / "order.yaml").write_text("build_order: [b]\n")
    started = []
    book.build(tmp_path / "order.yaml", root=tmp_path, progress=False, jobs=1, force=True)
    assert started == ["b", "a"]
    (tmp_path / "order.yaml").write_text("build_order: [b, nope]\n")
    with pytest.raises(ValueError, match="build_order .* names \\['nope'\\]"):
        book.build(tmp_path / "order.yaml", root=tmp_path, progress=False, jobs=1, force=True)

    bad = nbformat.v4.new_notebook()
    bad.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    bad.cells = [nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(bad, tmp_path / "notebooks" / "a.ipynb")
    monkeypatch.undo()
    monkeypatch.setattr(book, "_code_hash", lambda: "fixed")
    with pytest.raises(RuntimeError, match="a.ipynb failed"):
        book.build(root=tmp_path, progress=False, jobs=2, force=True)
    assert "boom" in (tmp_path / "_build" / "failed" / "a.ipynb").read_text()


def test_only_must_name_toc_notebooks(built):
    root, _, _ = built
    with pytest.raises(ValueError, match="nope"):
        book.build(root=root, only=["nope"], progress=False)


def test_missing_toc_file_is_an_error(tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: notebooks/nope\n")
    with pytest.raises(FileNotFoundError, match="notebooks/nope"):
        book.toc_documents(tmp_path)


def test_repo_toc_lists_only_existing_files():
    files = book.toc_documents(REPO)
    assert Path("book/intro.md") in files
    assert all((REPO / f).is_file() for f in files)


def test_key_depends_on_notebook_params_and_code(tmp_path):
    nb = tmp_path / "a.ipynb"
    nb.write_text("{}")
    k = book._build_key(nb, {"n": 1}, "code")
    assert k == book._build_key(nb, {"n": 1}, "code")
    assert k != book._build_key(nb, {"n": 2}, "code")
    assert k != book._build_key(nb, {"n": 1}, "code2")
    nb.write_text("{ }")
    assert k != book._build_key(nb, {"n": 1}, "code")


def test_repo_params_files_are_mappings():
    for p in sorted((REPO / "params").glob("*.yaml")):
        assert isinstance(yaml.safe_load(p.read_text()) or {}, dict), p


def test_repo_params_files_work_with_papermill_f():
    """``papermill -f params/X.yaml`` injects every name: each must be one some section defines (the notebooks'
    check stops on a name none defines), and each per-notebook block must name that notebook's own."""
    from writesae.notebook import check_parameters

    for p in sorted((REPO / "params").glob("*.yaml")):
        params = book.load_params(p)
        for nb in (REPO / "notebooks").glob("[0-9]*.ipynb"):
            space = {**params, **(params.get("notebooks") or {}).get(nb.stem, {})}
            check_parameters(space, nb.stem)


@pytest.mark.skipif(book._find_chromium() is None, reason="needs chromium (apt-get install -y chromium)")
def test_widget_and_math_render_offline_in_chromium(built, tmp_path):
    import subprocess
    root, _, _ = built

    def dom(page):
        cmd = book.chromium_command(book._find_chromium(), str(tmp_path / "profile")) + [
            "--dump-dom", (root / "_build" / "html" / page).as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout

    html = dom("notebooks/demo.html")
    assert "widget-hslider" in html  # the embed manager drew the IntSlider
    assert "Loading widget" not in html
    assert "<mjx-container" in dom("book/method.html")  # MathJax typeset the equations
    shots = book.screenshot([root / "_build" / "html" / "notebooks" / "demo.html"], tmp_path, height=800)
    assert len(shots) == 1 and shots[0].stat().st_size > 10_000


def test_screenshot_without_chromium(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(book, "_find_chromium", lambda: None)
    assert book.screenshot([tmp_path / "x.html"], tmp_path) == []
    assert "no Chromium" in capsys.readouterr().out


def test_pages_show_no_plumbing(tmp_path):
    """A built page carries no stderr (warnings, progress bars: left out by _config.yml's nb_output_stderr) and
    book.build names what else would reach a reader (here a raw repr); a clean page is not reported."""
    shutil.copy(REPO / "_config.yml", tmp_path / "_config.yml")
    shutil.copytree(REPO / "book", tmp_path / "book")
    (tmp_path / "_toc.yml").write_text(TOC.replace("notebooks/demo", "notebooks/noisy") + "  - file: notebooks/demo\n")
    (tmp_path / "notebooks").mkdir()
    nbformat.write(demo_notebook(), tmp_path / "notebooks" / "demo.ipynb")
    nb = demo_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Noisy"), nbformat.v4.new_code_cell(
        "import sys, warnings, tqdm\nwarnings.warn('careful')\nfor _ in tqdm.tqdm(range(3), desc='train L6H0'): pass\n"
        "print('note on stderr', file=sys.stderr)\nclass Thing: pass\nThing()")]
    nb.cells[1].metadata["tags"] = ["remove-input"]  # the page shows the outputs alone
    nbformat.write(nb, tmp_path / "notebooks" / "noisy.ipynb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(book, "_code_hash", lambda: "fixed")
        report = book.build(root=tmp_path, progress=False)
    noisy = (report.html / "notebooks" / "noisy.html").read_text()
    assert "careful" not in noisy and "note on stderr" not in noisy and "train L6H0" not in noisy
    assert report.plumbing == {"noisy": ["raw repr"]}
