"""``writesae plan --params FILE``: what the run a parameter file describes needs, known before the GPU-hours
are spent. Nothing is loaded beyond configs and tokenizers (the models are built on the ``meta`` device, with
no weights): the models found in the local cache (or the command that fetches them), the library versions and
the kernel lane, the corpus and how many windows it yields, the disk for the state datasets and SAEs, the peak
GPU memory, and the GPU-hours per section from measured rates (:mod:`writesae.scale`), each beside the paper's
figure. Every missing piece is one line under ``missing:``; then the command exits with status 2.

The work of a section (:func:`section_work`) is what it computes when it runs alone; sections share their
artifacts through the cache, so a whole book costs less than the sum of its sections.
"""
from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import torch

from . import corpus as _corpus
from . import scale
from .book import _notebook_params, load_params
from .notebook import NOTEBOOKS, defaults

__all__ = ["plan", "section_work"]

ALIVE = 316            # alive atoms of the paper's SAE (n_feat 2048, k 32): the population test's upper bound
CONDITIONS = 3         # atom, delete, random: edited runs per substituted firing
LIBRARIES = ("torch", "transformers", "datasets", "flash-linear-attention", "triton")
GB = 1e9
SCALINGS = 2           # coef and norm: each substituted firing is run at both
RECALL_TOKENS = 182    # chapter 09: a held-out recall passage (8 pairs, a gap of 0-256 tokens), mean length in the
                       # embedded tokenizer; an edited run at a pair's write recomputes about all of it
RECALL_RUNS = 8 * 3    # edited runs per passage and head: the 8 pairs' key, value and separator writes deleted
CELL_PASSAGES = 2      # passages of the every-head influence sweep that picks a family's head (recall.cell_influence)


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cell_set(p):
    return {tuple(c) for c in p.get("cells", [])} | ({tuple(p["cell"])} if "cell" in p else set())


def section_work(stem, p, n_heads, n_cells=None) -> dict:
    """{saes, edited_tokens, extract_tokens} a section computes alone under its parameters ``p`` (defaults merged):
    SAEs trained, tokens its edited and plain runs recompute (a firing at a uniform position re-runs half a window
    per condition) and tokens of its own state extraction (01-07 share one dataset: see :func:`plan`). ``n_heads``:
    heads per layer; ``n_cells``: heads of the whole model (chapter 09 measures every one's recall influence where
    ``recall_cells`` does not fix the family's head; each family's model taken at this size)."""
    T, half = p.get("window", 128), p.get("window", 128) / 2
    cells = _cell_set(p)
    cap = lambda c: (p.get("max_firings_by_cell") or {}).get(f"L{c[0]}H{c[1]}", p.get("max_firings") or 0)  # noqa: E731
    if stem == "01_write_and_atom":
        return dict(saes=1, edited_tokens=0, extract_tokens=0)
    if stem in ("02_feature_classes", "06_explorer"):
        return dict(saes=len(cells), edited_tokens=0, extract_tokens=0)
    if stem == "03_substitution":
        c = tuple(p["cell"])
        firings = (4 + 1) * cap(c) + sum(cap(x) for x in cells - {c}) + min(p.get("pop_atoms", 30), ALIVE) * p.get(
            "max_per_atom", 30) + n_heads * (p.get("max_firings") or 0)
        return dict(saes=len(cells) + 1 + n_heads, edited_tokens=CONDITIONS * half * firings, extract_tokens=0)
    if stem == "04_closed_form":
        runs = p.get("n_atoms", 8) * p.get("sites_per_atom", 8) * (1 + len(p.get("eps", [])))
        return dict(saes=1, edited_tokens=half * runs + CONDITIONS * p.get("n_div_sites", 40) * p.get("horizon", 24),
                    extract_tokens=0)
    if stem == "05_interventions":
        n, L = p.get("n_prompts", 24), p.get("prompt_len", 32)
        sign = n * p.get("tokens_per_window", 5) * L
        install = 4 * 3 * n * len(p.get("ms", [])) * (L + p.get("n_new", 20))
        steer = p.get("n_steer_prompts", 16) * (1 + 2 * len(p.get("alphas", []))) * (L + p.get("steer_new", 64))
        return dict(saes=1, edited_tokens=sign + install + steer + CONDITIONS * half * len(cells), extract_tokens=0)
    if stem == "07_ground_truth_ablations":
        saes = (len(p.get("variants", [])) + len(p.get("layer_variants", [])) * (len(cells) - 1)
                + len(p.get("activations", [])) - 1 + 2 * (n_heads - 1))
        return dict(saes=saes, edited_tokens=0, extract_tokens=0)
    if stem == "08_across_architectures":
        fams = p.get("models", {})
        per = sum(1 + 1 + (1 if f == "rwkv7" else 0) + (len(p.get("deltanet_ks", [])) if f == "deltanet" else 0)
                  for f in fams)
        firings = len(fams) * 2 * p.get("max_firings", 24)
        runs = len(fams) * p.get("cf_atoms", 3) * p.get("cf_sites", 4) * len(p.get("eps", []))
        return dict(saes=per, edited_tokens=CONDITIONS * half * firings + half * runs,
                    extract_tokens=len(fams) * p.get("n_windows", 32) * T)
    if stem == "09_writes_that_matter":
        fams, base = p.get("models", {}), p.get("baselines") or {}
        n = len(fams) + len(set(base) & set(fams))  # the recall models and the models they were trained from
        swept = sum(f not in (p.get("recall_cells") or {}) for f in fams)
        runs = (swept * CELL_PASSAGES * (n_cells or n_heads) * RECALL_RUNS + n * p.get("influence_passages", 4) * RECALL_RUNS
                + n * CONDITIONS * SCALINGS * p.get("max_sites", 64))  # head choice, deletions, recall substitutions
        prose = n * CONDITIONS * SCALINGS * p.get("max_firings", 24) * half  # the zoo's test on held-out prose
        return dict(saes=n, edited_tokens=RECALL_TOKENS * (runs + n * p.get("n_passages", 128)) + prose,
                    extract_tokens=n * p.get("n_windows", 32) * T)
    return dict(saes=1 if "cell" in p else 0, edited_tokens=0, extract_tokens=0)


class _Report:
    def __init__(self, out):
        self.out, self.missing = out, []

    def line(self, text):
        self.out(text)

    def miss(self, text):
        self.missing.append(" ".join(str(text).split()))


def _meta_host(source, dtype, trust, report):
    """(host on the meta device, tokenizer or None) for ``source``, or (None, None) with the missing line."""
    from transformers import AutoConfig, AutoTokenizer

    from .hosts import _register, _resolve, load_host, tiny_config, tokenizer_source

    if source == "tiny" or str(source).startswith("tiny:"):
        cfg, tok = tiny_config(*str(source).split(":")[1:2]), None
    else:
        try:
            path = _resolve(source)
        except (FileNotFoundError, ValueError) as err:
            report.miss(f"model {source}: {err}")
            return None, None
        import json

        _register(json.loads(Path(path, "config.json").read_text()).get("model_type", ""))
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
        try:
            tok_dir, code = tokenizer_source(path, source, trust)
            tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=code)
        except (ValueError, OSError) as err:
            report.miss(f"tokenizer of {source}: {err}")
            tok = None
        report.line(f"model {source}: found ({path})")
    with torch.device("meta"):
        return load_host(cfg, device="meta", dtype=getattr(torch, dtype)), tok


def _dims(h):
    n = sum(p.numel() for p in h.model.parameters())
    cfg = h.model.config
    hidden = cfg.hidden_size
    return dict(params=n, weight_bytes=n * next(h.model.parameters()).element_size(), hidden=hidden,
                intermediate=getattr(cfg, "intermediate_size", None) or 4 * hidden, vocab=h.vocab_size)


def _sae_params(n_feat, d_k, d_v):
    from .sae import SAEConfig, WriteSAE

    return sum(t.numel() for t in WriteSAE(SAEConfig("bilinear", d_k, d_v, n_feat=n_feat, k=1), device="meta").parameters())


def plan(params_file, rates=None, out=print, root=None) -> list[str]:
    """Print the plan of ``params_file`` (``rates``: a file from ``bench_scale.py --rates-out``); return the
    missing pieces, one line each (also printed, last)."""
    from .cache import cache_root
    from .experiments.section import Section
    from .hosts.fla import fla_installed

    params = load_params(params_file)
    r = _Report(out)
    nbs = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    per = {nb.stem: dict(defaults(nb.stem), **_notebook_params(nb, params)) for nb in nbs}
    top = per.get("01_write_and_atom") or next(iter(per.values()))
    device, dtype = str(top.get("device") or "cpu"), top.get("dtype", "float32")

    r.line(f"plan for {params_file}")
    r.line("libraries: " + ", ".join(f"{d} {_version(d)}" for d in LIBRARIES))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            r.miss(f"device {device}: no CUDA device here; run the plan on the GPU machine")
        if not fla_installed():
            r.miss("flash-linear-attention is not installed: pip install -e .[gpu] (the fla kernel lane)")
        r.line(f"kernel lane: {'fla (Triton kernels)' if fla_installed() else 'torch forms (fla missing)'} on {device}")
    else:
        r.line(f"kernel lane: torch forms on {device}")

    # the models (01-07's, 08's, 09's and the models 09's were trained from), on the meta device
    hosts = {}
    for stem, p in per.items():
        for src in ([p["model"]] if "model" in p else []) + [*(p.get("models") or {}).values(),
                                                             *(p.get("baselines") or {}).values()]:
            if src not in hosts:
                hosts[src] = _meta_host(src, p.get("dtype", dtype), p.get("trust_remote_code", False), r)

    # the corpus: windows it yields for each model's tokenizer
    counted = {}
    for stem, p in per.items():
        srcs = [p["model"]] if "model" in p else list((p.get("models") or {}).values())
        for src in srcs:
            h, tok = hosts[src]
            key = (src, p.get("corpus", "embedded"), p["window"], p["seed"])
            if h is None and key[1] not in counted:  # no tokenizer to count with: only whether the corpus is there
                counted[key[1]] = True
                try:
                    r.line(f"corpus {key[1]}: {_corpus.describe(key[1])}; its windows are counted once {src} is here")
                except (FileNotFoundError, ValueError) as err:
                    r.miss(f"corpus {key[1]}: {err}")
            if h is None or key in counted:
                continue
            need = {"train": p["n_windows"], "heldout": p.get("eval_windows", 64)}
            if tok is None:
                counted[key] = need
                continue
            try:
                counted[key] = n = _corpus.count(tok, key[1], key[2], key[3], need)
            except (FileNotFoundError, ValueError, ImportError) as err:
                r.miss(err if str(err).startswith("corpus") else f"corpus {key[1]}: {err}")
                counted[key] = None
                continue
            r.line(f"corpus {key[1]} ({_corpus.describe(key[1])}), tokenised for {src}: "
                   f"{n['train']:,} train + {n['heldout']:,} held-out windows of {key[2]:,} tokens found "
                   f"(at least: reading stops once both splits have enough) [paper: 5,000 OpenWebText passages x 1,024 tokens]")
            for split, want in need.items():
                if n[split] < want:
                    r.miss(f"corpus {key[1]} holds {n[split]:,} {split} windows of {key[2]:,} tokens for {src}, "
                           f"{stem} asks for {want:,}: lower the count or give a larger corpus")

    # disk, memory, hours
    rates = scale.Rates.load(rates) if rates else None
    total_disk, total_hours = 0, {}
    main = hosts.get(top.get("model"), (None, None))[0]
    if main is not None:
        sec = Section(main, top["cell"], top["cells"], heads_layer=top.get("heads_layer"), window=top["window"],
                      n_windows=top["n_windows"], positions_per_seq=top["positions_per_seq"],
                      corpus=top.get("corpus", "embedded"))
        n_cells = len(sec.data["cells"])
        b = scale.state_bytes(top["n_windows"], top["positions_per_seq"], n_cells, main.d_k, main.d_v)
        total_disk += b
        r.line(f"state dataset of sections 01-07: {n_cells} cells x {top['n_windows'] * top['positions_per_seq']:,} "
               f"states of {main.d_k} x {main.d_v} (bf16, with their writes) = {b / GB:,.1f} GB "
               f"[paper: every position, ~{scale.PAPER['states_per_head']:.0e} states per head]")
        d = _dims(main)
        mem = scale.peak_memory(weight_bytes=d["weight_bytes"], hidden=d["hidden"], intermediate=d["intermediate"],
                                vocab=d["vocab"], window=top["window"], n_feat=top["n_feat"], d_k=main.d_k, d_v=main.d_v)
        r.line(f"peak GPU memory (estimate) on {top['model']}: {mem['peak'] / 2 ** 30:.1f} GiB (weights "
               f"{d['weight_bytes'] / 2 ** 30:.1f} GiB of {d['params'] / 1e9:.2f} B parameters in {dtype}; extraction "
               f"{mem['extraction'] / 2 ** 30:.1f}, substitution {mem['substitution'] / 2 ** 30:.1f}, SAE training "
               f"{mem['sae'] / 2 ** 30:.1f}) [paper: not stated; bench_scale's target < 40 GiB]")
        if torch.cuda.is_available() and device.startswith("cuda"):
            have = torch.cuda.get_device_properties(0).total_memory
            if mem["peak"] > have:
                r.miss(f"GPU memory: about {mem['peak'] / 2 ** 30:.0f} GiB needed, this GPU has {have / 2 ** 30:.0f} GiB")
    if main is not None:
        r.line(f"work per section, each run alone [paper: ~{scale.PAPER['h100_hours_per_sae']:.0f} H100-hours per "
               "canonical SAE configuration]:")
    for stem, p in per.items():
        srcs = [p["model"]] if "model" in p else list((p.get("models") or {}).values())
        h = hosts.get(srcs[0], (None, None))[0] if srcs else None
        if h is None:
            continue
        w = section_work(stem, p, h.n_heads, len(h.cells))
        n_sae = _sae_params(p["n_feat"], h.d_k, h.d_v)
        disk = w["saes"] * scale.sae_bytes(n_sae)
        if stem == "09_writes_that_matter":  # one head's states of the recall text per model
            for src in {*p["models"].values(), *(p.get("baselines") or {}).values()}:
                if (hh := hosts.get(src, (None, None))[0]) is not None:
                    disk += scale.state_bytes(p["n_windows"], p["positions_per_seq"], 1, hh.d_k, hh.d_v)
        if stem == "08_across_architectures":
            for src in srcs:
                hh = hosts[src][0]
                if hh is not None:
                    n_cells = len((p.get("zoo_cells") or {}).get(next(f for f, s in p["models"].items() if s == src),
                                                                  [None] * p.get("n_cells", 1)))
                    disk += scale.state_bytes(p["n_windows"], p["positions_per_seq"], n_cells, hh.d_k, hh.d_v)
        total_disk += disk
        samples = w["saes"] * scale.sae_samples(p["n_windows"], p["positions_per_seq"], p["epochs"])
        work = (f"{w['saes']} SAE{'s' * (w['saes'] != 1)} x {samples // max(w['saes'], 1):,} samples, "
                f"{w['edited_tokens'] / 1e6:,.1f} M edited tokens, disk {disk / GB:,.1f} GB")
        if rates:
            hrs = scale.hours(rates, extract_tokens=w["extract_tokens"], sae_samples=samples,
                              sae_size=p["n_feat"] * h.d_k * h.d_v, edited_tokens=w["edited_tokens"])
            for k, v in hrs.items():
                total_hours[k] = total_hours.get(k, 0) + v
            work += f"; {hrs['total']:.1f} GPU-hours on {rates.device}"
        r.line(f"  {stem}: {work}")
    if main is not None:
        ext = top["n_windows"] * top["window"]
        if rates:
            x = scale.hours(rates, extract_tokens=ext)["total"]
            total_hours["total"] = total_hours.get("total", 0) + x
            r.line(f"  state extraction (01-07, once): {ext / 1e6:,.1f} M tokens, {x:.1f} GPU-hours")
            r.line(f"GPU-hours, the sections one by one (a book shares their artifacts: less): "
                   f"{total_hours['total']:,.0f} on {rates.device} [paper: ~{scale.PAPER['h100_hours_total']:.0f} "
                   "H100-hours in all]")
        else:
            r.miss("GPU-hours: no measured rates; on the GPU run `python benchmarks/bench_scale.py --rates-out "
                   f"rates.json` (minutes), then `writesae plan --params {params_file} --rates rates.json`")
        free = shutil.disk_usage(_existing(cache_root(root))).free
        r.line(f"disk: {total_disk / GB:,.1f} GB for the state datasets and SAEs; {free / GB:,.0f} GB free at "
               f"{cache_root(root)} ($WRITESAE_CACHE)")
        if total_disk > free:
            r.miss(f"disk: {total_disk / GB:,.0f} GB needed, {free / GB:,.0f} GB free at {cache_root(root)}: point "
                   "WRITESAE_CACHE at a larger disk")
    if main is None:
        r.line("disk, GPU memory and GPU-hours: need the model's config (see missing)")
    if r.missing:
        out("missing:")
        for m in r.missing:
            out(f"  {m}")
    return r.missing


def _existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path
