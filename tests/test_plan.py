"""``writesae plan`` (issue 24, preflight): on this CPU, with every GPU parameter file and the models absent,
it says so in one line each and exits 2, loading no weights; with a local config-only checkpoint it prints the
corpus windows, the disk (the formula checked against a dataset written here), the memory and, given rates,
the GPU-hours from bench_scale's formulas (writesae.scale)."""
import json
import re
from pathlib import Path

import pytest
import yaml

from writesae import scale
from writesae.cli import main

ROOT = Path(__file__).resolve().parent.parent
GPU = sorted((ROOT / "params").glob("*_gpu.yaml"))


@pytest.fixture
def no_weights(monkeypatch):
    import transformers

    def refuse(*a, **kw):
        raise AssertionError("writesae plan loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("path", GPU, ids=lambda p: p.stem)
def test_each_gpu_file_here_names_what_is_missing(path, capsys, no_weights):
    assert main(["plan", "--params", str(path)]) == 2
    out = capsys.readouterr().out
    missing = out.split("missing:\n", 1)[1].splitlines()
    model = yaml.safe_load(path.read_text())["model"]
    assert any(f"model {model}: " in m and f"huggingface-cli download {model}" in m for m in missing), out
    assert any("device cuda: no CUDA device here" in m for m in missing)
    assert "libraries: torch " in out and "kernel lane:" in out


def test_state_bytes_is_what_extraction_writes(tmp_path):
    from writesae.extract import extract
    from writesae.hosts import load_host

    import torch

    h = load_host("tiny", device="cpu")
    ids = torch.randint(0, h.vocab_size, (32, 24), generator=torch.Generator().manual_seed(0))
    extract(h, ids, [(0, 1), (1, 2), (2, 3)], tmp_path, positions_per_seq=8, batch_size=16, progress=False)
    written = sum(f.stat().st_size for f in tmp_path.glob("shard_*.safetensors"))
    want = scale.state_bytes(32, 8, 3, h.d_k, h.d_v)
    assert want <= written <= want + 2 * 4096  # + each shard's JSON header
    # the paper's Qwen3.5 setting: 18 cells (L1/L17 H4 and L9's 16 heads) of 128 x 128, 5,000 x 32 positions
    assert scale.state_bytes(5000, 32, 18, 128, 128) == 188_770_560_000


def test_a_local_checkpoint_gets_the_whole_plan(tmp_path, capsys, no_weights):
    from transformers import AutoTokenizer

    from writesae.hosts import EMBEDDED_DIR, tiny_config

    ckpt = tmp_path / "ckpt"  # a config and a tokenizer, no weights
    tiny_config("gdn", vocab_size=8192).save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(str(EMBEDDED_DIR)).save_pretrained(ckpt)
    text = (EMBEDDED_DIR / "heldout.txt").read_text().split("\n\n")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    params = yaml.safe_load((ROOT / "params" / "qwen35_0p8b_gpu.yaml").read_text())
    params.update(model=str(ckpt), device="cpu", corpus=str(corpus), window=64, n_windows=40, eval_windows=5,
                  cells=[[0, 1], [1, 1]], cell=[1, 1], heads_layer=1)
    params["notebooks"] = {"08_across_architectures": {"models": {"gdn": str(ckpt)}, "zoo_cells": {"gdn": [[1, 1]]}}}
    pf = tmp_path / "p.yaml"
    pf.write_text(yaml.safe_dump(params))
    rates = tmp_path / "rates.json"
    scale.Rates("test device", extract_tokens_per_s=1000.0, sae_samples_per_s=500.0, edited_tokens_per_s=2000.0).save(rates)
    code = main(["plan", "--params", str(pf), "--rates", str(rates)])
    out = capsys.readouterr().out
    assert f"model {ckpt}: found" in out, out
    found = re.search(r"tokenised for .*ckpt: (\d+) train \+ (\d+) held-out windows of 64 tokens found", out)
    assert found and int(found[1]) >= 40 and int(found[2]) >= 5, out  # counted until both splits have enough
    n_cells = 5  # cells L0H1, L1H1 and every head of layer 1 (4 value heads)
    gb = scale.state_bytes(40, 32, n_cells, 16, 8) / 1e9
    assert f"{n_cells} cells x 1,280 states of 16 x 8 (bf16, with their writes) = {gb:,.1f} GB" in out
    samples = scale.sae_samples(40, 32, 20)
    h01 = scale.hours(scale.Rates.load(rates), sae_samples=samples, sae_size=2048 * 16 * 8)["total"]
    assert f"01_write_and_atom: 1 SAE x {samples:,} samples, 0.0 M edited tokens, disk 0.0 GB; {h01:.1f} GPU-hours" in out
    assert "peak GPU memory (estimate)" in out
    assert re.search(r"09_writes_that_matter: \d+ SAEs? x [\d,]+ samples, [\d.]+ M edited tokens", out), out
    # what is still missing here: only the recall chapter's embedded models (if not trained) and nothing else
    missing = out.split("missing:\n", 1)[1].splitlines() if "missing:" in out else []
    assert all("-recall" in m for m in missing), missing
    assert code == (2 if missing else 0)


def test_the_recall_chapter_counts_its_every_head_sweep_unless_the_head_is_given():
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from writesae.experiments import recall as rx
    from writesae.hosts import EMBEDDED_DIR
    from writesae.plan import CELL_PASSAGES, RECALL_RUNS, RECALL_TOKENS, section_work

    p = dict(models={"gdn": "x"}, baselines={}, window=256, n_windows=128, n_passages=128, influence_passages=4,
             max_sites=64, max_firings=200)
    swept = section_work("09_writes_that_matter", p, 16, 288)  # Qwen3.5-0.8B: 18 layers of 16 heads
    fixed = section_work("09_writes_that_matter", dict(p, recall_cells={"gdn": [9, 4]}), 16, 288)
    assert swept["saes"] == fixed["saes"] == 1 and swept["extract_tokens"] == fixed["extract_tokens"] == 128 * 256
    assert swept["edited_tokens"] - fixed["edited_tokens"] == CELL_PASSAGES * 288 * RECALL_RUNS * RECALL_TOKENS
    assert fixed["edited_tokens"] < 0.1 * swept["edited_tokens"]  # choosing the head is most of the chapter's work
    pair = section_work("09_writes_that_matter", dict(p, baselines={"gdn": "y"}, recall_cells={"gdn": [9, 4]}), 16, 288)
    assert pair["saes"] == 2 and pair["extract_tokens"] == 2 * 128 * 256 and pair["edited_tokens"] == 2 * fixed["edited_tokens"]
    # the passage length the formula uses is the held-out passages' (embedded tokenizer)
    ps = rx.passages(SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(EMBEDDED_DIR))), 128)
    assert abs(sum(len(x.ids) for x in ps) / len(ps) - RECALL_TOKENS) < 2
