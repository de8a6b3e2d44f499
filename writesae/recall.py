"""Associative recall woven into prose: the task the recall-trained models learn, with its ground truth.

A recall passage states key-value pairs in words, then, after a stretch of ordinary prose, asks for
them back in another order (multi-query associative recall, in words)::

     Remember: river red, horse four, candle cold. <prose> Recall: horse four, candle cold, river red.

Keys and values are single tokens of the shipped tokenizer (``KEYS``, ``VALUES``). The model answers a
query at the query key's position: its next-token prediction there should be the value. Every passage
carries its ground truth (``Passage``): where each pair was written, where it is asked, which key and
value tokens they are. Passages are drawn from a seeded generator, so a (seed, index) pair always gives
the same passage.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# candidate words, in order; the task keeps those that are one token (with their leading space)
_KEY_WORDS = ("river stone horse window garden candle forest ship letter table doctor captain island village "
              "mountain kitchen bottle engine lamp coat church market ocean bird king soldier farmer teacher judge "
              "cat dog fish").split()
_VALUE_WORDS = ("red blue green black white gold brown grey yellow purple one two three four five six seven eight "
                "nine ten twelve twenty hundred north south east west old new big small tall").split()
OPEN, ASK = " Remember:", " Recall:"
MAX_PAIRS = 8
MAX_GAP = 256


class Vocab(NamedTuple):
    """Token ids of the task's words in one tokenizer."""

    keys: np.ndarray     # (n_keys,) one token each
    values: np.ndarray   # (n_values,)
    comma: int
    period: int
    open: np.ndarray     # the " Remember:" tokens
    ask: np.ndarray      # the " Recall:" tokens


def vocab(tokenizer) -> Vocab:
    """The task's token ids in ``tokenizer``; an error if a marker or too few words are single tokens."""
    def ids(s):
        return list(tokenizer.encode(s, add_special_tokens=False))

    keys = [ids(" " + w)[0] for w in _KEY_WORDS if len(ids(" " + w)) == 1]
    values = [ids(" " + w)[0] for w in _VALUE_WORDS if len(ids(" " + w)) == 1]
    if len(keys) < 2 * MAX_PAIRS or len(values) < 2 * MAX_PAIRS:
        raise ValueError(f"only {len(keys)} keys and {len(values)} values are single tokens in this tokenizer; the "
                         f"recall task needs {2 * MAX_PAIRS} of each")
    comma, period = ids(","), ids(".")
    if len(comma) != 1 or len(period) != 1:
        raise ValueError("',' and '.' must be single tokens for the recall task")
    return Vocab(np.array(keys), np.array(values), comma[0], period[0], np.array(ids(OPEN)), np.array(ids(ASK)))


class Passage(NamedTuple):
    """One recall passage and its ground truth (positions are offsets into ``ids``)."""

    ids: np.ndarray       # (T,) the passage's tokens
    keys: np.ndarray      # (n,) key token of each pair, in the order stated
    values: np.ndarray    # (n,) value token of each pair
    write_at: np.ndarray  # (n,) position of each pair's value token in the statement (where the pair is written)
    ask_at: np.ndarray    # (n,) position of each pair's key in the questions (where the value must be predicted)


def passage(voc: Vocab, rng: np.random.Generator, n_pairs: int, gap: np.ndarray) -> Passage:
    """A passage of ``n_pairs`` pairs with the prose tokens ``gap`` between statement and questions."""
    n = int(n_pairs)
    if not 1 <= n <= min(len(voc.keys), len(voc.values)):
        raise ValueError(f"n_pairs must be between 1 and {min(len(voc.keys), len(voc.values))}, got {n}")
    k = rng.choice(voc.keys, n, replace=False)
    v = rng.choice(voc.values, n, replace=False)
    order = rng.permutation(n)
    out, write_at, ask_at = list(voc.open), [], np.zeros(n, dtype=np.int64)
    for i in range(n):
        out += [int(k[i]), int(v[i])]
        write_at.append(len(out) - 1)
        out.append(voc.comma if i < n - 1 else voc.period)
    out += [int(t) for t in gap] + list(voc.ask)
    for j, i in enumerate(order):
        ask_at[i] = len(out)
        out += [int(k[i]), int(v[i]), voc.comma if j < n - 1 else voc.period]
    return Passage(np.array(out, dtype=np.int64), k, v, np.array(write_at), ask_at)


def window(voc: Vocab, prose: np.ndarray, rng: np.random.Generator, length: int, max_pairs: int,
           max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """A training window of ``length`` tokens: prose with recall passages woven in (pairs uniform in
    [1, max_pairs], gaps uniform in [0, max_gap] prose tokens). Returns the tokens and a boolean mask of the
    answer positions (a query key whose next token is its value, both inside the window)."""
    toks, mask, pos = [], [], int(rng.integers(0, len(prose) - 2 * length))
    while len(toks) < length:
        lead = int(rng.integers(0, 48))
        toks += prose[pos:pos + lead].tolist()
        mask += [False] * lead
        g = int(rng.integers(0, max_gap + 1))
        p = passage(voc, rng, int(rng.integers(1, max_pairs + 1)), prose[pos + lead:pos + lead + g])
        pos += lead + g
        m = np.zeros(len(p.ids), dtype=bool)
        m[p.ask_at] = True
        toks += p.ids.tolist()
        mask += m.tolist()
    toks, mask = np.array(toks[:length]), np.array(mask[:length])
    mask[-1] = False  # its value lies outside the window
    return toks, mask


def woven_text(tokenizer, prose: np.ndarray, n_windows: int, length: int = 512, seed: int = 2) -> str:
    """``n_windows`` windows of ``prose`` (token ids) with recall passages woven in at full difficulty, decoded
    to text (one paragraph each): the corpus the recall chapter's state datasets come from."""
    voc, rng = vocab(tokenizer), np.random.default_rng(seed)
    return "\n\n".join(tokenizer.decode(window(voc, prose, rng, length, MAX_PAIRS, MAX_GAP)[0].tolist()).strip()
                       for _ in range(n_windows)) + "\n"


def accuracy(logits, p: Passage) -> np.ndarray:
    """Per pair: whether the model's top next-token prediction at the question is the value."""
    return (logits[p.ask_at].argmax(-1).cpu().numpy() == p.values)


def heldout(voc: Vocab, prose: np.ndarray, n: int, n_pairs: int = MAX_PAIRS, max_gap: int = MAX_GAP,
            seed: int = 1) -> list[Passage]:
    """``n`` fixed held-out passages (gaps cut from ``prose``, which should be held-out text), gaps spread
    evenly over [0, max_gap] so that accuracy can be read by distance."""
    rng = np.random.default_rng(seed)
    gaps = np.linspace(0, max_gap, n).round().astype(int)
    starts = rng.integers(0, len(prose) - max_gap - 1, n)
    return [passage(voc, rng, n_pairs, prose[s:s + g]) for s, g in zip(starts, gaps)]


def by_distance(passages: list[Passage], correct: list[np.ndarray], edges=(0, 32, 64, 128, 192, 256, 384)):
    """Recall accuracy by the distance (tokens) from a pair's statement to its question: rows of
    (lo, hi, n, accuracy)."""
    d = np.concatenate([p.ask_at - p.write_at for p in passages])
    c = np.concatenate(correct)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (d >= lo) & (d < hi)
        if sel.any():
            rows.append((lo, hi, int(sel.sum()), round(float(c[sel].mean()), 4)))
    return rows
