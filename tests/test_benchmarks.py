"""The benchmarks run at tiny sizes and their equality checks hold (the timings are for the README, not asserted)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_sae_prints_each_method_against_the_gemm_beside_it():
    out = run("bench_sae.py", "--sizes", "8", "--n-feat", "64", "-k", "4", "--batch", "16", "--steps", "2")
    assert "sparse == dense methods" in out  # it raises when the methods' reconstructions or gradients differ
    fractions = [float(f) for f in re.findall(r"= +([0-9.]+)% of the matmul throughput alongside", out)]
    assert len(fractions) == 4 and all(0 <= f < 200 for f in fractions)  # one line per method


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU code needs a C compiler")
def test_bench_sae_compiled_step_equals_the_eager_one():
    out = run("bench_sae.py", "--sizes", "8", "--n-feat", "64", "-k", "4", "--batch", "16", "--steps", "2", "--compile")
    diff = float(re.search(r"gradients equal to eager's within ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4 and "bilinear/compiled" in out  # bench_sae raises above 1e-4; the line says how close


def test_bench_scale_small_config_checks_the_substitution_against_the_release_method():
    out = run("bench_scale.py", "--small", "--passages", "2", "--steps", "2", "--firings", "2")
    kl = float(re.search(r"max \|KL diff\| ([0-9.e+-]+)", out).group(1))
    assert kl < 1e-6 and "projected hours" in out


@pytest.mark.parametrize("script", ["bench_substitution.py", "bench_host.py"])
def test_edited_forward_benchmarks_agree_with_the_naive_method(script):
    out = run(script, "--seqs", "1", "--firings", "2", "--window", "64")
    diffs = [float(x) for x in re.findall(r"max \|(?:KL|logit)[^|]*\| *=? *([0-9.e+-]+)", out)]
    assert diffs and max(diffs) < 1e-4, out


def test_bench_train_streamed_and_in_memory_weights_equal():
    out = run("bench_train.py", "--d", "8", "--n", "256", "--n-feat", "64", "--k", "4", "--epochs", "1", "--batch", "32")
    assert "weights equal: True" in out and "steps/s" in out


def test_bench_hybrids_checks_every_new_type_against_the_library():
    out = run("bench_hybrids.py", "--size", "tiny", "--window", "32", "--repeats", "1")
    rows = re.findall(r"^(\w+) +\d+ x \d+ .* ([0-9.]+)x +([0-9.e+-]+)$", out, flags=re.M)
    assert {r[0] for r in rows} >= {"olmo_hybrid", "kimi_linear", "minimax", "mamba", "falcon_mamba", "jamba", "xlstm"}
    assert all(float(r[2]) < 1e-4 for r in rows)  # the host's logits equal the library's
