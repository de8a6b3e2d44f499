"""Shared test set-up.

- Every test leaves the working directory as it found it (the suite reads ``params/*.yaml`` relative to the
  repository root; a test that moved it would fail later, unrelated tests).
- One torch thread (tiny models run far slower with two threads on a loaded 2-core machine).
- fla's naive torch references (``fla/ops/*/naive.py``): the DeltaNet / GLA / RWKV-7 tests read them by file
  path, never importing fla (whose package needs Triton). ``FLA_SRC`` points at an ``fla`` package folder;
  without it, the fla-core wheel (pure Python) is fetched once from the package registry into
  ``.cache/fla`` and unpacked there. Offline, those tests skip.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

FLA_VERSION = "0.6.0"
_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "fla"


def _fla_source():
    if os.environ.get("FLA_SRC") or (_CACHE / "fla").is_dir():
        return os.environ.get("FLA_SRC") or str(_CACHE / "fla")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"fla-core=={FLA_VERSION}",
                        "-d", str(_CACHE)], check=True, timeout=120, capture_output=True)
        wheel = next(_CACHE.glob("fla_core-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(_CACHE, [n for n in z.namelist() if n.startswith("fla/")])
        return str(_CACHE / "fla")
    except (subprocess.SubprocessError, OSError, StopIteration):
        return None


_src = _fla_source()
if _src:
    os.environ["FLA_SRC"] = _src


@pytest.fixture(autouse=True)
def _same_working_directory():
    before = os.getcwd()
    yield
    assert os.getcwd() == before, f"the test left the process in {os.getcwd()} (was {before})"
