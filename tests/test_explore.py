"""`writesae explore` in a real browser: Voilà serves the explorer on the tiny random model (params/tiny.yaml,
a fresh cache, so the page also builds its artifacts) and Playwright drives Debian's Chromium
(`executable_path`; Playwright's own browser download is never used). Every request that leaves 127.0.0.1
is refused, so the app must work offline. The response times are printed (pytest -s shows them).

Skipped only without a Chromium binary (`.ci/run` installs Debian's) or without voila / playwright
(requirements.txt has both)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from writesae.book import _find_chromium
from writesae.cache import cache_root
from writesae.explore import stage

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = _find_chromium()


def test_cache_root_is_found_from_a_subfolder(tmp_path, monkeypatch):
    """The one rule: $WRITESAE_CACHE, else <the folder holding _toc.yml, at or above the cwd>/artifacts."""
    monkeypatch.delenv("WRITESAE_CACHE", raising=False)
    (tmp_path / "_toc.yml").write_text("root: index\n")
    (tmp_path / "notebooks" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "notebooks" / "deep")
    assert cache_root() == tmp_path.resolve() / "artifacts"
    monkeypatch.setenv("WRITESAE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_stage_injects_the_params_and_the_cell():
    nb, params = stage(REPO / "params" / "tiny.yaml", cell="L0H1")
    assert params["model"] == "tiny" and params["cell"] == [0, 1] and [0, 1] in params["cells"]
    cells = json.loads(nb.read_text())["cells"]
    injected = ["".join(c["source"]) for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and 'model = "tiny"' in injected[0] and "cell = [0, 1]" in injected[0]
    with pytest.raises(FileNotFoundError, match="tiny.yaml"):
        stage("params/no_such.yaml")


def test_threads_reach_the_explorers_kernel(monkeypatch):
    """`writesae explore --threads 3` stages the notebook with threads = 3 (its kernel sets torch's threads)."""
    from writesae import cli, explore

    seen = {}
    monkeypatch.setattr(explore.subprocess, "call", lambda cmd, **kw: seen.setdefault("cmd", cmd) and 0)
    monkeypatch.setattr(explore.importlib.util, "find_spec", lambda name: object())
    assert cli.main(["explore", "--params", str(REPO / "params" / "tiny.yaml"), "--no-browser", "--threads", "3"]) == 0
    staged = json.loads(Path(seen["cmd"][3]).read_text())["cells"]
    injected = ["".join(c["source"]) for c in staged if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "threads = 3" in injected[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("voila", reason="pip install -e .[live] (or -r requirements.txt)")
    if CHROMIUM is None:
        pytest.skip("no Chromium binary: apt-get install -y chromium (.ci/run does), or set WRITESAE_CHROMIUM")
    tmp = tmp_path_factory.mktemp("explore")
    port = _free_port()
    env = dict(os.environ, WRITESAE_CACHE=str(tmp / "artifacts"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(tmp / "voila.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "writesae.cli", "explore", "--params", "params/tiny.yaml",
                             "--port", str(port), "--no-browser"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                proc.kill()
                pytest.fail(f"writesae explore did not serve: {(tmp / 'voila.log').read_text()[-2000:]}")
            time.sleep(0.5)
    print(f"\nexplore: server up in {time.perf_counter() - t0:.1f} s")
    yield f"http://127.0.0.1:{port}/"
    os.killpg(proc.pid, signal.SIGTERM)  # voila stops its kernels on SIGTERM
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_explorer_live_in_chromium(app):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements.txt)")
    times, remote, errors = {}, [], []

    def until_changed(page, selector, before, must, what, timeout=60):
        """Seconds until the text of ``selector`` differs from ``before`` and contains ``must``."""
        t0 = time.perf_counter()
        page.wait_for_function(
            "([sel, before, must]) => { const e = document.querySelector(sel);"
            " return e && e.innerText !== before && e.innerText.includes(must); }",
            arg=[selector, before, must], timeout=timeout * 1000)
        times[what] = time.perf_counter() - t0
        return page.inner_text(selector)

    def local_only(route):
        url = route.request.url
        if re.match(r"(https?|wss?)://127\.0\.0\.1[:/]", url) or url.startswith("data:"):
            return route.continue_()
        remote.append(url)
        return route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.route("**/*", local_only)
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(app)
            ex, inst = ".writesae-explorer-view", ".writesae-install-view"
            # the page executes the notebook (and builds the tiny artifacts) before the widgets show
            page.wait_for_function(f"() => document.querySelector('{inst}')?.innerText.includes('continuation')",
                                   timeout=150_000)
            times["page load (build + execute)"] = time.perf_counter() - t0
            first = page.inner_text(ex)
            assert "top firings" in first and "substitution KL" in first
            assert page.is_hidden(".writesae-snapshot")  # the snapshot notice is for the static book only

            # pick another atom: its contexts (and KLs) replace the first atom's, and it carries to the install
            atom_sel = ".writesae-explorer-atom select"
            pick = page.eval_on_selector(atom_sel, "s => s.options[3].text")
            atom_id = int(re.match(r"#(\d+)", pick).group(1))
            page.select_option(atom_sel, index=3)
            shown = until_changed(page, ex, first, "top firings", "pick an atom")
            assert shown.split("\n")[1].split("\t")[0] == str(atom_id) and "substitution KL" in shown  # its table row
            page.wait_for_function("() => document.querySelector('.writesae-install-picked')?.innerText"
                                   f".includes('atom {atom_id} ')")
            assert page.input_value(".writesae-install-atom input") == str(atom_id)

            # run the install: the table now reports that atom, and a new prompt changes the continuations
            table = page.inner_text(inst)
            page.click(".writesae-install-run button, button.writesae-install-run")
            table2 = until_changed(page, inst, table, f"atom {atom_id} x m", "install the picked atom")
            page.fill(".writesae-install-prompt textarea", "3 14 15 92 65 35 89 79 32 38")
            page.click(".writesae-install-run button, button.writesae-install-run")
            table3 = until_changed(page, inst, table2, "continuation", "install on a new prompt")
            native = lambda t: t.split("native")[1].split("\n")[0]  # noqa: E731
            assert native(table3) != native(table2)

            # bad input: a message inside the widget, no exception lost in the kernel log
            page.fill(".writesae-install-target input", "7 8")
            page.click(".writesae-install-run button, button.writesae-install-run")
            until_changed(page, inst, table3, "is 2 tokens", "bad target message")
            page.fill(".writesae-install-target input", "7")
            page.fill(".writesae-install-atom input", "99999")
            page.press(".writesae-install-atom input", "Enter")
            shown = page.inner_text(inst)  # read before the click: the reply may come before a read after it
            page.click(".writesae-install-run button, button.writesae-install-run")
            until_changed(page, inst, shown, "out of range", "atom out of range message")
            page.screenshot(path=str(Path(os.environ.get("WRITESAE_SHOTS", REPO / "_build")) / "explore.png"),
                            full_page=True)
        finally:
            browser.close()
    print("explore response times: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    assert not errors, errors
    assert not remote, f"the app asked for remote files: {remote}"
    assert all(v < 30 for k, v in times.items() if not k.startswith("page load")), times
