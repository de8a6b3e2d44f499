"""Every section notebook runs end to end under nbval with the tiny parameters (params/tiny.yaml),
and the real book builds from them."""
import os
import subprocess
import sys
from pathlib import Path

import papermill
import pytest

from writesae import book

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [p for p in book.toc_documents(REPO) if p.suffix == ".ipynb"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The TOC's notebooks with the tiny parameters injected (papermill --prepare-only)."""
    out = tmp_path_factory.mktemp("nb")
    params = book.load_params(REPO / "params" / "tiny.yaml")
    for nb in NOTEBOOKS:
        papermill.execute_notebook(str(REPO / nb), str(out / nb.name), prepare_only=True, progress_bar=False,
                                   parameters=book._notebook_params(REPO / nb, params))
    return out


def test_every_section_is_in_the_toc():
    assert [p.stem for p in NOTEBOOKS] == sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_run_under_nbval(prepared, tmp_path):
    env = dict(os.environ, WRITESAE_CACHE=str(tmp_path / "artifacts"))
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
                          str(prepared)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
