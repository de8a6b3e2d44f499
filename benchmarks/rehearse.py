"""Real-scale rehearsal on a CPU: every notebook with each GPU parameter file, on random-weight checkpoints of the
real configurations, with only the model path, the device, the corpus and the counts overridden.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/rehearse.py                       # everything (resumes)
    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/rehearse.py --only qwen35_0p8b_gpu --notebooks 01 02
    python benchmarks/rehearse.py --table                                            # print the table only

1. Checkpoints: ``torch.manual_seed(0)``, the Auto class's ``from_config`` on the configuration of each real
   checkpoint (:data:`CONFIGS`: where a field could not be established, the library's default), saved in bf16
   with ``save_pretrained`` to ``<root>/<name>/`` (skipped when present). Qwen3.5-0.8B is saved as the released
   checkpoint is laid out, the image-text model (``AutoModelForImageTextToText``) with its vision tower, so the
   host's load reads the language model out of it as it would the real one. The real tokenizers cannot be
   downloaded here: every checkpoint gets the project's embedded tokenizer (writesae/embedded/tokenizer.json,
   8,192 ids: valid ids of every real vocabulary). Random weights and a substituted tokenizer: the numbers the
   notebooks print mean nothing; only whether every cell runs, and how long it takes, is measured.
2. Corpus: ``<root>/corpus.txt``, a copy of writesae/embedded/heldout.txt (190 KB).
3. For each GPU parameter file and each notebook of _toc.yml, papermill runs the notebook (its own process, a
   timeout per notebook) with the parameters ``writesae book`` would pass (``writesae.book._notebook_params``: the
   file's values, its ``notebooks:`` overrides) and then only these overridden: ``model`` (and the values of
   ``models``) -> the local checkpoint, ``device`` -> cpu, ``corpus`` -> the local file, and the counts of
   :data:`COUNTS` (those the notebook declares); and for chapter 09 ``recall_cells`` -> the file's ``cell``: its
   default measures the recall influence of every head to choose one (an edited run of every (head, pair, token)
   per passage: on GLA-1.3B 96 runs of ~200 tokens through 12 layers on average per layer, some 10^14 FLOPs per
   passage, hours on one CPU core), which the rehearsal runs at that one head through the same code
   (``recall.influence`` on a subset of heads). ``--set KEY=VALUE`` sets a notebook parameter beyond these
   (where the notebook declares it; recorded with the result and shown in the table), e.g. ``--set pool=top1``
   for chapter 03 on a random checkpoint whose register atoms are never top-1. The artifact cache is
   ``<root>/artifacts`` (``WRITESAE_CACHE``), not the book's; the executed notebooks go to ``<root>/out/<file>/``.
   Each (file, notebook) is recorded (ran / failed with the error's first line, wall seconds) in ``--results`` as
   it ends; a rerun skips recorded pairs (``--retry`` reruns the failed ones). The markdown table is printed at
   the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "writesae" / "embedded"
GPU_FILES = ("qwen35_0p8b_gpu", "mamba2_370m_gpu", "deltanet_1p3b_gpu", "gla_1p3b_gpu", "rwkv7_1p5b_gpu")
CHECKPOINT = {"qwen35_0p8b_gpu": "qwen35_0p8b", "mamba2_370m_gpu": "mamba2_370m", "deltanet_1p3b_gpu": "deltanet_1p3b",
              "gla_1p3b_gpu": "gla_1p3b", "rwkv7_1p5b_gpu": "rwkv7_1p5b"}

# The counts set for every notebook that declares them (params/tiny.yaml's count keys, at sizes that still reach every
# code path); max_firings_by_cell keeps the file's cells, each at max_firings. eval_windows: 8 (with 2, no atom of a
# random 2,048-atom SAE fired the 16 times chapter 05's erasure needs: a rehearsal finding).
COUNTS = dict(window=64, n_windows=16, positions_per_seq=8, eval_windows=8, epochs=1, min_firings=2, max_firings=4,
              max_per_atom=2, pop_atoms=3, n_atoms=2, sites_per_atom=2, horizon=6, n_div_sites=4, prompt_len=16,
              n_prompts=2, tokens_per_window=2, n_new=4, steer_new=4, n_steer_prompts=2, n_steer_features=2,
              gt_n=256, gt_d=6, gt_atoms=8, cf_atoms=2, cf_sites=3, n_passages=4, influence_passages=1, max_sites=6)


def _qwen35_0p8b():
    # Qwen/Qwen3.5-0.8B's config.json (Qwen3_5ForConditionalGeneration) as quoted in public code (text model:
    # vocab 248,320, hidden 1024, 24 layers 3 Gated DeltaNet : 1 attention, 16 k / 16 v heads of 128 x 128, MLP 3584,
    # 8 attention heads / 2 kv of 256, rope theta 1e7 on a quarter of each head, tied embeddings; vision tower
    # depth 12, hidden 768). Token ids of the image/video markers: the library's defaults.
    from transformers import Qwen3_5Config

    text = dict(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_conv_kernel_dim=4, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
                max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=248044,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                     mrope_section=[11, 11, 10], mrope_interleaved=True))
    vision = dict(depth=12, hidden_size=768, num_heads=12, intermediate_size=3072, out_hidden_size=1024,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)


def _mamba2_370m():
    # state-spaces/mamba2-370m (d_model 1024, 48 layers, d_state 128, headdim 64, expand 2, 1 group, chunks of 256,
    # vocab 50,277 padded to 50,288, tied embeddings) in transformers' Mamba2Config, as AntonV/mamba2-370m-hf
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=50288, hidden_size=1024, num_hidden_layers=48, num_heads=32, head_dim=64,
                        state_size=128, expand=2, n_groups=1, chunk_size=256, conv_kernel=4, use_bias=False,
                        use_conv_bias=True, residual_in_fp32=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _fla(model_type, **kw):
    from writesae.models import classes

    return classes(model_type)[0](**kw)


CONFIGS = {
    "qwen35_0p8b": _qwen35_0p8b,
    "mamba2_370m": _mamba2_370m,
    # fla-hub/delta_net-1.3B-100B: hidden 2048, 24 layers, 16 heads of 128 x 128, short conv 4, beta, no gate, MLP
    # ratio 4, Llama tokenizer (32,000); the rest fla's defaults
    "deltanet_1p3b": lambda: _fla("delta_net", vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=16,
                                  expand_k=1.0, expand_v=1.0, use_gate=False, use_short_conv=True, conv_size=4,
                                  use_beta=True, hidden_ratio=4, norm_eps=1e-6, tie_word_embeddings=False),
    # fla-hub/gla-1.3B-100B: hidden 2048, 24 layers, 4 heads (keys 256, values 512: expand_k 0.5, expand_v 1), output
    # gate, no short conv, MLP ratio 4, vocab 32,000; the rest fla's defaults
    "gla_1p3b": lambda: _fla("gla", vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=4,
                             expand_k=0.5, expand_v=1.0, use_short_conv=False, use_output_gate=True, hidden_ratio=4,
                             norm_eps=1e-6, tie_word_embeddings=False),
    # fla-hub/rwkv7-1.5B-world: hidden 2048, 24 layers, heads of 64 (32), LoRA ranks decay 96 / a 96 / v 64 /
    # gate 256 (RWKV-7's formulas at C = 2048), MLP 8192, world vocab 65,536; the rest fla's defaults
    "rwkv7_1p5b": lambda: _fla("rwkv7", vocab_size=65536, hidden_size=2048, num_hidden_layers=24, head_dim=64,
                               decay_low_rank_dim=96, a_low_rank_dim=96, v_low_rank_dim=64, gate_low_rank_dim=256,
                               intermediate_size=8192, norm_eps=1e-5, tie_word_embeddings=False),
}


def build_checkpoint(name, out: Path) -> Path:
    """The random checkpoint ``name`` in ``out`` (bf16, the embedded tokenizer); kept if present."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from writesae.hosts import _register

    if (out / "config.json").exists():
        return out
    cfg = CONFIGS[name]()
    _register(cfg.model_type)
    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if cfg.model_type == "qwen3_5" else AutoModelForCausalLM
    t0 = time.perf_counter()
    model = auto.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / f, tmp / f)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.0f}M parameters, saved to {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def notebook_params(nb: Path, gpu: dict, model_dir: str, corpus: str, extra: dict | None = None) -> dict:
    """What ``writesae book`` would pass ``nb`` for the GPU file ``gpu``, with the rehearsal's overrides and the
    parameters of ``extra`` the notebook declares."""
    import papermill

    from writesae.book import _notebook_params

    declared = papermill.inspect_notebook(str(nb))
    p = _notebook_params(nb, gpu)
    over = dict(model=model_dir, device="cpu", corpus=corpus, **COUNTS)
    p.update({k: v for k, v in over.items() if k in declared})
    if "models" in p:
        p["models"] = {fam: model_dir for fam in p["models"]}
    if "recall_cells" in declared:
        p["recall_cells"] = {fam: gpu["cell"] for fam in p["models"]}
    if p.get("max_firings_by_cell"):
        p["max_firings_by_cell"] = {c: COUNTS["max_firings"] for c in p["max_firings_by_cell"]}
    p.update({k: v for k, v in (extra or {}).items() if k in declared})
    return p


def run_one(nb: str, params_json: str, out: str, root: Path) -> None:
    """The child: execute one notebook (the parent times it and kills it at the timeout)."""
    import papermill

    papermill.execute_notebook(nb, out, parameters=json.loads(params_json), kernel_name="python3",
                               progress_bar=False, resources={"metadata": {"path": str(ROOT)}})


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, at any depth."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, out) for d in (*descendants(c), c)]


def first_error_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errs = [x for x in lines if "Error" in x or "Exception" in x]
    return (errs[-1] if errs else (lines[-1] if lines else "failed"))[:300]


def table(results: dict, files, notebooks) -> str:
    head = "| notebook | " + " | ".join(files) + " |"
    rows = [head, "|---" * (len(files) + 1) + "|"]
    for nb in notebooks:
        cells = []
        for f in files:
            r = results.get(f, {}).get(nb)
            sets = "".join(f" ({k} = {v})" for k, v in (r or {}).get("set", {}).items())
            cells.append("-" if r is None else f"{r['status']} {r['seconds']:.0f} s{sets}")
        rows.append(f"| {nb} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=list(GPU_FILES), help="GPU parameter files (stems)")
    p.add_argument("--notebooks", nargs="*", default=None, help="notebook stems or their prefixes (default: all)")
    p.add_argument("--root", default=str(Path.home() / ".cache" / "writesae" / "rehearsal"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "rehearsal.json"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per notebook")
    p.add_argument("--retry", action="store_true", help="rerun the (file, notebook) pairs recorded as failed")
    p.add_argument("--table", action="store_true", help="print the table of --results and stop")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="notebook parameters beyond the overrides (YAML values; recorded), e.g. pool=top1")
    p.add_argument("--one", nargs=3, metavar=("NB", "PARAMS_JSON", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    root = Path(a.root).expanduser()
    bad = [x for x in a.set if "=" not in x]
    if bad:
        p.error(f"--set takes KEY=VALUE, got {' '.join(bad)}")
    extra = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.set)}
    if a.one:
        return run_one(*a.one, root)

    from writesae.book import load_params, toc_documents

    notebooks = [d for d in toc_documents(ROOT) if d.suffix == ".ipynb"]
    if a.notebooks:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(x) for x in a.notebooks)]
    res_path = Path(a.results)
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    if a.table:
        print(table(results, [f for f in GPU_FILES if f in results], [nb.stem for nb in notebooks]))
        return
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    if not corpus.exists():
        shutil.copy(EMBEDDED / "heldout.txt", corpus)
    env = {**os.environ, "WRITESAE_CACHE": str(root / "artifacts"), "OMP_NUM_THREADS": "1"}
    for f in a.only:
        gpu = load_params(ROOT / "params" / f"{f}.yaml")
        model_dir = str(build_checkpoint(CHECKPOINT[f], root / CHECKPOINT[f]))
        for nb in notebooks:
            done = results.get(f, {}).get(nb.stem)
            if done and (done["status"] == "ran" or not a.retry):
                continue
            params = notebook_params(ROOT / nb, gpu, model_dir, str(corpus), extra)
            sets = {k: v for k, v in extra.items() if k in params}
            out = root / "out" / f / nb.name
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"{f} {nb.stem}: running", flush=True)
            t0 = time.perf_counter()
            child = subprocess.Popen([sys.executable, __file__, "--one", str(ROOT / nb), json.dumps(params), str(out),
                                      "--root", str(root)], env=env, cwd=ROOT, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                log, _ = child.communicate(timeout=a.timeout)
                status = "ran" if child.returncode == 0 else "failed"
                error = None if status == "ran" else first_error_line(log)
            except subprocess.TimeoutExpired:
                for pid in [*descendants(child.pid), child.pid]:  # the kernel runs in a session of its own
                    os.kill(pid, signal.SIGKILL)
                child.communicate()
                status, error = "timeout", f"over {a.timeout} s"
            sec = time.perf_counter() - t0
            results = json.loads(res_path.read_text()) if res_path.exists() else {}  # another run may have written
            results.setdefault(f, {})[nb.stem] = {"status": status, "seconds": round(sec, 1), "error": error,
                                                  **({"set": sets} if sets else {})}
            res_path.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{f} {nb.stem}: {status} in {sec:.0f} s" + (f": {error}" if error else ""), flush=True)
    print(table(results, [f for f in GPU_FILES if f in results], [nb.stem for nb in notebooks]))


if __name__ == "__main__":
    main()
