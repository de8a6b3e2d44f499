"""The GPU parameter files hold the paper's settings (issue 24, item 7; PAPER.md), every value a notebook
accepts: checked name by name, without running anything."""
from pathlib import Path

import pytest

from writesae import book, sweep
from writesae.notebook import check_parameters, defaults

ROOT = Path(__file__).resolve().parent.parent
GPU = sorted((ROOT / "params").glob("*_gpu.yaml"))
PAPER_FILES = [ROOT / "params" / f"{n}_gpu.yaml" for n in ("qwen35_0p8b", "mamba2_370m", "deltanet_1p3b", "gla_1p3b",
                                                            "rwkv7_1p5b")]  # the paper's five checkpoints
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _load(name):
    return book.load_params(ROOT / "params" / name)


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_every_paper_file_runs_the_papers_data_in_bf16(path):
    p = book.load_params(path)
    assert p["device"] == "cuda" and p["dtype"] == "bfloat16"             # bf16 models, fp32 SAEs
    assert p["corpus"] == "Skylion007/openwebtext"                          # OpenWebText
    assert (p["window"], p["n_windows"], p["seed"]) == (1024, 5000, 42)    # 5,000 passages x 1,024 tokens, seed 42
    assert (p["n_feat"], p["k"], p["min_firings"]) == (2048, 32, 5)
    assert p["heads_layer"] == p["cell"][0] or path.stem.startswith("qwen")
    assert p.get("trust_remote_code", False) == path.stem.startswith("rwkv7")  # only RWKV-7-world runs tokenizer code
    z = p["notebooks"]["08_across_architectures"]
    assert (z["batch_size"], z["lr"], z["cf_atoms"], z["cf_sites"]) == (128 if "mamba2" in path.stem else 256, 3e-4, 50, 8)


@pytest.mark.parametrize("path", GPU, ids=lambda p: p.stem)
def test_every_name_is_a_parameter_every_value_passes_the_notebooks_checks(path):
    p = book.load_params(path)
    declared = {k for nb in NOTEBOOKS for k in defaults(nb.stem)}
    assert set(p) - declared - set(book.BUILD_KEYS) == set(), "a name no section defines is a silent typo"
    for nb in NOTEBOOKS:
        ns = dict(defaults(nb.stem), **book._notebook_params(nb, p))
        check_parameters(ns, nb.stem)
    assert set(sweep.settings(path)) == set(sweep.DEFAULTS)


def test_qwen_is_the_papers_protocol():
    p = _load("qwen35_0p8b_gpu.yaml")
    assert p["cells"] == [[1, 4], [9, 4], [17, 4]] and p["cell"] == [9, 4] and p["heads_layer"] == 9
    caps = [p["max_firings_by_cell"].get(f"L{l}H{h}", p["max_firings"]) for l, h in p["cells"]]
    assert caps == [1500, 1851, 1500] and sum(caps) == 4851                   # Table 2: n = 4,851
    assert p["epochs"] == 20 and p["max_per_atom"] == 30                      # population test: <= 30 per atom
    assert p["n_atoms"] * len(p["eps"]) == 200 and p["eps"] == [0.1, 0.3, 1.0, 3.0]   # 50 atoms x 4 eps
    assert p["n_prompts"] * p["tokens_per_window"] == 2000                    # sign prediction n = 2,000
    assert 3 * p["n_prompts"] == 300 and p["ms"] == [1.5, 3.0, 6.0] and p["n_new"] == 20   # install n = 300, m, 20 tokens
    assert p["alphas"] == [5.0, 10.0]                                         # steering x5, x10
    assert p["notebooks"]["08_across_architectures"]["max_firings"] == 1851


def test_mamba2_trains_as_the_paper_says():
    p = _load("mamba2_370m_gpu.yaml")
    z = p["notebooks"]["08_across_architectures"]
    assert p["epochs"] == 50 and (z["batch_size"], z["warmup"]) == (128, 100)   # Mamba-2: 50 epochs, 128, 100
    assert z["zoo_cells"] == {"mamba2": [[24, 0]]} and z["max_firings"] == 2500  # L24 H0, 2,500 firings
    assert _load("deltanet_1p3b_gpu.yaml")["notebooks"]["08_across_architectures"]["deltanet_ks"][1::2] == [32, 128]
    assert _load("rwkv7_1p5b_gpu.yaml")["cell"] == [12, 0]


def test_a_cells_own_firing_cap():
    from writesae import pipeline
    from writesae.experiments.section import Section

    sec = Section(pipeline.host("tiny", "cpu"), (1, 1), [(0, 1), (1, 1)], window=16, n_windows=2, max_firings=5,
                  max_firings_by_cell={"L1H1": 7})
    assert (sec.cap((0, 1)), sec.cap((1, 1)), sec.cap()) == (5, 7, 7)
