"""What reproduces: every numbered claim of the paper (PAPER.md §3, claims 1-13) against this book's numbers.

One registry (:data:`CLAIMS`) says, per statement: the claim's number, the chapter that measures it, the
paper's number and the glue keys of ours (value, 95% interval or p-value). One rule (:func:`verdict`, stated
in :data:`RULE`) turns each into *reproduces*, *does not reproduce* or *not testable here*. Both the chapters
and the intro use them:

* a chapter's last cell calls :func:`glue_chapter` with the numbers it computed: it glues its rows as a table
  (``verdict_rows``, pasted at the top of the chapter), one sentence per row (``verdict_<id>``) and the values
  the rows read (``verdict_values``);
* the intro's ``{verdict-table}`` directive (this module is a Sphinx extension: :func:`setup`) reads
  ``verdict_values`` from every executed chapter of the build (:func:`read_glue`) and renders the whole table
  with :func:`table`. Both go through :func:`rows`, so the intro and the chapters cannot disagree.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["Claim", "CLAIMS", "CHAPTERS", "RULE", "ALPHA", "REPRODUCES", "DOES_NOT", "NOT_TESTABLE", "verdict",
           "rows", "table", "summary", "sentence", "keys", "glue_chapter", "read_glue", "executed_values",
           "rate_difference", "median_difference", "mean_ci", "median_ci", "paired_difference", "difference_text",
           "markdown", "setup"]

R2_FLOOR = -1.0       # an R^2 below this is written "below -1" (writesae.experiments.closed_form.r2_shown)
REPRODUCES, DOES_NOT, NOT_TESTABLE = "reproduces", "does not reproduce", "not testable here"
ALPHA = 0.05          # significance level of every test; intervals are 95%
RULE = ("A statement **reproduces** when our 95% interval contains the paper's value, or when the paper's "
        "direction (its sign against no effect) holds significantly: the interval lies on the paper's side of no "
        "effect, or, for a number without an interval, p < 0.05 on that side (a ΔBIC counts as significant beyond "
        "10). It **does not reproduce** when the effect is significantly the other way, or null (the interval "
        "contains no effect and not the paper's value). It is **not testable here** when this build has no such "
        "number, no interval or test for it, or an interval that holds both the paper's value and no effect (too "
        "few samples to tell); the row says why. A statement of *no* difference reproduces when our interval "
        "contains no difference.")


@dataclass(frozen=True)
class Claim:
    """One statement of a claim of PAPER.md §3 and where this book measures it.

    value: a glue key, or ``(a, b)`` for the difference ``a - b`` of two; lo / hi: glue keys of its 95% interval;
    p: glue key of a p-value (for a number without an interval); margin: for a quantity that is itself
    evidence (ΔBIC), the distance from ``null`` that counts as significant. direction: the paper's sign against
    ``null`` (default: the sign of ``paper - null``; 0: the paper reports no difference). fmt: ``"%"`` a rate,
    ``"pts"`` a difference of rates, ``"r2"`` an R^2 (three decimals, "below -1" under -1), else a format spec. extra: context after our number, ``{key:fmt}`` fields
    (left out where a key is missing). untestable: why this statement cannot be tested here, whatever the values.
    missing: why a build can lack the number although the chapter ran (said instead of "no such number").
    """

    id: str
    claim: int
    chapter: str
    what: str
    paper_text: str
    value: str | tuple = ""
    paper: float | None = None
    lo: str | None = None
    hi: str | None = None
    p: str | None = None
    null: float = 0.0
    margin: float | None = None
    direction: int | None = None
    fmt: str = ".3f"
    unit: str = ""
    extra: str = ""
    untestable: str | None = None
    missing: str | None = None

    @property
    def keys(self) -> list:
        """Every glue key this statement reads."""
        out = list(self.value) if isinstance(self.value, tuple) else [self.value] if self.value else []
        out += [k for k in (self.lo, self.hi, self.p) if k]
        return out + [m.group(1) for m in _FIELD.finditer(self.extra)]


CHAPTERS = {"02_feature_classes": "Feature classes", "03_substitution": "Single-write substitution",
            "04_closed_form": "The closed form", "05_interventions": "Cache interventions",
            "07_ground_truth_ablations": "Ground truth and ablations",
            "08_across_architectures": "Across architectures", "09_writes_that_matter": "Writes that matter"}

CLAIMS = (
    Claim("1", 1, "02_feature_classes", "two classes of atoms, registers and bundles (ΔBIC of 2 vs 1 components)",
          "ΔBIC −296; 222 registers (mean cos 0.26), 94 bundles", "dbic", paper=-296.0, margin=10.0, fmt=".1f",
          extra="{n_register:.0f} registers (mean cos {cos_register:.3f}), {n_bundle:.0f} bundles"),
    Claim("2", 2, "02_feature_classes", "random rank-1 writes at the register firings cost more than deleting them "
          "(bits/token, random minus delete)", "+0.226 vs +0.005 bits/token: +0.221 (42x)", "nll_d_gap",
          paper=0.221, lo="nll_d_gap_lo", hi="nll_d_gap_hi", fmt="+.4f",
          extra="delete {nll_d_delete:+.4f}, random {nll_d_random:+.4f}: {nll_ratio:.1f}x"),
    Claim("3", 3, "03_substitution", "the atom beats deletion (win rate at the headline head; the paper's pool: "
          "register firings)", "92.4% of 4,851 [91.6, 93.1]", "sub_win_rate", paper=0.924, lo="sub_boot_feature_lo",
          hi="sub_boot_feature_hi", null=0.5, fmt="%",
          extra="n = {sub_n:.0f}; pool: {pool_name} firings; interval: bootstrap over atoms, as firings of one atom "
                "are not independent (Wilson, firings as independent: [{sub_wilson_lo:.1%}, {sub_wilson_hi:.1%}])"),
    Claim("4", 4, "03_substitution", "per-atom win rate over alive atoms (population)", "89.8% over 87 atoms "
          "[88.1, 91.3]", "pop_mean_win_rate", paper=0.898, lo="pop_ci_lo", hi="pop_ci_hi", null=0.5, fmt="%",
          extra="{pop_n_atoms:.0f} atoms"),
    Claim("5", 5, "03_substitution", "win rate, mean over every head of one layer", "89.3% ± 2.6% over 15 heads",
          "heads_mean", paper=0.893, lo="heads_lo", hi="heads_hi", null=0.5, fmt="%", extra="{heads_n:.0f} heads"),
    Claim("12e", 12, "03_substitution", "FlatSAE + top-1 SVD substitutes as well as the WriteSAE atom on GDN "
          "(win rate, WriteSAE minus FlatSAE)", "91.25% vs 91.36%: −0.1 pts", "flat_matched_gap", paper=-0.0011,
          lo="flat_matched_gap_lo", hi="flat_matched_gap_hi", direction=0, fmt="pts",
          extra="{flat_write_win:.1%} vs {flat_svd_win:.1%}, n = {flat_n:.0f}"),
    Claim("6", 6, "04_closed_form", "the paper's closed form predicts the logit shift (median R², one fitted "
          "scalar per atom)", "median R² 0.983 [IQR 0.977, 0.990]", "r2_pred_paper_fit", paper=0.983,
          lo="r2_pred_paper_fit_lo", hi="r2_pred_paper_fit_hi", fmt="r2",
          extra="held-out prompts; no fitted parameter (pred_direct): {r2_pred_direct:.3f}"),
    Claim("7", 7, "04_closed_form", "selectivity against matched random / orthogonal rank-1 edits", "mean 0.995",
          "selectivity", paper=0.995, lo="selectivity_lo", hi="selectivity_hi"),
    Claim("8", 8, "05_interventions", "erasing an atom at its firings lowers its most-affected token's log-prob",
          "median −0.116 nats (p = 1e-6)", "er_firing_median", paper=-0.116, p="er_firing_p", fmt="+.4f",
          unit=" nats"),
    Claim("8b", 8, "05_interventions", "erasing the same matrix at matched non-firing positions changes nothing "
          "significantly", "no significant change", "er_non_firing_median", p="er_non_firing_p", direction=0,
          fmt="+.4f", unit=" nats", extra="firing vs non-firing, paired: p = {er_p_vs_nonfiring:.2g}"),
    Claim("9", 9, "05_interventions", "sign of the logit change of a single-position install", "84.6% of 2,000",
          "sign_accuracy", paper=0.846, lo="sign_ci_low", hi="sign_ci_high", null=0.5, fmt="%",
          extra="n = {sign_n:.0f}; magnitude r = {sign_pearson_r:.2f}"),
    Claim("10", 10, "05_interventions", "installing a mid-rank target (m = 3) makes greedy decoding emit it "
          "(inclusion, edited minus native)", "33.3% → 100% (n = 300): +66.7 pts",
          ("inst_mid_3.0_edited", "inst_mid_3.0_native"), paper=0.667, p="inst_mid_3.0_p", fmt="pts",
          extra="{inst_mid_3.0_native:.1%} → {inst_mid_3.0_edited:.1%}, n = {inst_mid_3.0_n:.0f}"),
    Claim("13", 13, "05_interventions", "amplifying sentence-boundary features (×5) changes newlines per 400 tokens",
          "16.8 → 11.2 (p = 0.001): −5.6", ("steer_nl400_boundary_5", "steer_nl400_base"), paper=-5.6,
          p="steer_p_5", fmt="+.1f", extra="{steer_nl400_base:.1f} → {steer_nl400_boundary_5:.1f}; random features "
          "{steer_nl400_random_5:.1f}"),
    Claim("12a", 12, "07_ground_truth_ablations", "a flat encoder leaves more atoms dead (dead fraction, flat minus "
          "bilinear)", "80% vs 32%: +48 pts", "abl_dead_gap", paper=0.48, lo="abl_dead_gap_lo", hi="abl_dead_gap_hi",
          fmt="pts", extra="bilinear {abl_bilinear_dead:.0%}, flat {abl_flat_dead:.0%}"),
    Claim("12b", 12, "07_ground_truth_ablations", "BatchTopK keeps the two-class partition (ΔBIC)",
          "reproduces the partition (Table 5)", "t5_batchtopk_dbic", direction=-1, margin=10.0, fmt=".1f",
          extra="register mean cos {t5_batchtopk_cos_register:.3f}"),
    Claim("12c", 12, "07_ground_truth_ablations", "JumpReLU keeps the two-class partition (ΔBIC)",
          "reproduces the partition (Table 5)", "t5_jumprelu_dbic", direction=-1, margin=10.0, fmt=".1f",
          extra="register mean cos {t5_jumprelu_cos_register:.3f}"),
    Claim("12d", 12, "07_ground_truth_ablations", "rank-2 atoms cost more perplexity than rank-1 (every head of a "
          "layer replaced; rank 2 minus rank 1)", "+0.82% vs +0.76%: +0.06 pts",
          ("t14_r2_layer_ppl", "t14_r1_layer_ppl"), paper=0.0006, fmt="pts",
          extra="rank 1 {t14_r1_layer_ppl:+.2%}, rank 2 {t14_r2_layer_ppl:+.2%}",
          untestable="one perplexity per SAE and no interval, here or in the paper"),
    Claim("6b", 6, "08_across_architectures", "the paper's closed form fails on Mamba-2 (median R² < 0, matched zoo)",
          "negative R²", "r2_pred_paper_fit_mamba2", lo="r2_pred_paper_fit_mamba2_lo",
          hi="r2_pred_paper_fit_mamba2_hi", direction=-1, fmt="r2", extra="GDN {r2_pred_paper_fit_gdn:.3f}"),
    Claim("11a", 11, "08_across_architectures", "register median cosine GDN > RWKV-7 (difference, matched zoo)",
          "0.262 vs 0.180: +0.082", "reg_cos_diff_gdn_rwkv7", paper=0.082, lo="reg_cos_diff_gdn_rwkv7_lo",
          hi="reg_cos_diff_gdn_rwkv7_hi", fmt="+.3f", extra="GDN {reg_cos_gdn:.3f}, RWKV-7 {reg_cos_rwkv7:.3f}",
          missing="a family of the pair has no register class at its analysed heads (ΔBIC not below −10) or is not in this run"),
    Claim("11b", 11, "08_across_architectures", "register median cosine RWKV-7 > Mamba-2 (difference, matched zoo)",
          "0.180 vs 0.0575: +0.123", "reg_cos_diff_rwkv7_mamba2", paper=0.1225, lo="reg_cos_diff_rwkv7_mamba2_lo",
          hi="reg_cos_diff_rwkv7_mamba2_hi", fmt="+.3f", extra="RWKV-7 {reg_cos_rwkv7:.3f}, Mamba-2 {reg_cos_mamba2:.3f}",
          missing="a family of the pair has no register class at its analysed heads (ΔBIC not below −10) or is not in this run"),
    Claim("11c", 11, "08_across_architectures", "the atom beats deletion on Mamba-2 (win rate, matched zoo)",
          "88.1% of 2,500", "sub_win_rate_mamba2", paper=0.881, lo="sub_wilson_lo_mamba2", hi="sub_wilson_hi_mamba2",
          null=0.5, fmt="%", extra="n = {sub_n_mamba2:.0f}; GDN {sub_win_rate_gdn:.1%}"),
    Claim("11d", 11, "08_across_architectures", "DeltaNet has a register class at k = 128 (ΔBIC; none at k = 32)",
          "register cos 0.997 at k = 128", "k_dbic_128", direction=-1, margin=10.0, fmt=".1f",
          extra="register cos {k_reg_cos_128:.3f}; at k = 32 ΔBIC {k_dbic_32:.1f}"),
    Claim("11e", 11, "08_across_architectures", "register cosine falls with Qwen3.5 scale", "0.262 / 0.152 / 0.085 "
          "(0.8B / 4B / 27B)", untestable="needs Qwen3.5-4B and -27B; the zoo has one size per family"),
    Claim("12f", 12, "08_across_architectures", "the matched decoder substitutes better than FlatSAE + top-1 SVD on "
          "Mamba-2 (win rate, matched minus flat)", "82.85% vs 76.30%: +6.6 pts", "flat_gap_mamba2", paper=0.0655,
          lo="flat_gap_mamba2_lo", hi="flat_gap_mamba2_hi", fmt="pts",
          extra="{flat_matched_mamba2:.1%} vs {flat_svd_mamba2:.1%}"),
    Claim("3w", 3, "09_writes_that_matter", "the atom beats deletion where writes matter (GDN trained on recall; "
          "the pairs' writes at the token that stores them, KL read at the answer)", "92.4% of 4,851 [91.6, 93.1]",
          "win_answer_gdn_recall",
          paper=0.924, lo="win_answer_gdn_recall_lo", hi="win_answer_gdn_recall_hi", null=0.5, fmt="%",
          extra="the {token_gdn} writes; deleting one costs {answer_kl_gdn_recall:.3g} nats at the answer (median); "
                "on prose {win_prose_gdn_recall:.1%}"),
    Claim("11w", 11, "09_writes_that_matter", "the atom beats deletion on Mamba-2 where writes matter (trained on "
          "recall; the pairs' writes at the token that stores them, KL at the answer)", "88.1% of 2,500",
          "win_answer_mamba2_recall", paper=0.881,
          lo="win_answer_mamba2_recall_lo", hi="win_answer_mamba2_recall_hi", null=0.5, fmt="%",
          extra="the {token_mamba2} writes; deleting one costs {answer_kl_mamba2_recall:.3g} nats at the answer "
                "(median)"),
)

_FIELD = re.compile(r"\{([A-Za-z0-9_.]+)(?::([^}]*))?\}")


# --------------------------------------------------------------------------------------------- the rule
def _finite(x) -> bool:
    return x is not None and not isinstance(x, (str, bool)) and math.isfinite(float(x))


def verdict(value, lo=None, hi=None, p=None, *, paper=None, null=0.0, direction=None, margin=None,
            alpha=ALPHA) -> tuple[str, str]:
    """(verdict, why) by :data:`RULE` for our ``value`` with its interval [``lo``, ``hi``] (or ``p``, or a
    ``margin`` for an evidence scale such as ΔBIC) against the paper's value ``paper`` and ``null`` (no effect).
    ``direction``: the paper's sign against ``null`` (default the sign of ``paper - null``; 0: no difference)."""
    if not _finite(value):
        return NOT_TESTABLE, "this build has no such number"
    d = int(np.sign(paper - null)) if direction is None and _finite(paper) else int(direction or 0)
    side = lambda x: int(np.sign(x - null))  # noqa: E731
    if _finite(lo) and _finite(hi):
        if _finite(paper) and lo <= paper <= hi:
            if d != 0 and lo <= null <= hi:
                return NOT_TESTABLE, "our interval holds both the paper's value and no effect: too few samples to tell"
            return REPRODUCES, "our interval contains the paper's value"
        if lo <= null <= hi:
            if d == 0:
                return REPRODUCES, "no significant difference, as in the paper"
            return DOES_NOT, "null: our interval contains no effect"
        got = side(lo)  # the whole interval is on this side of no effect
    elif margin is not None:
        if abs(value - null) <= margin:
            return (REPRODUCES, "no significant difference, as in the paper") if d == 0 else (
                DOES_NOT, f"null: within ±{margin:g} of no effect")
        got = side(value)
    elif _finite(p):
        if p >= alpha:
            return (REPRODUCES, "no significant difference, as in the paper") if d == 0 else (
                DOES_NOT, f"null: p = {p:.2g}")
        got = side(value)
    else:
        return NOT_TESTABLE, "no interval or test for this number"
    if d == 0:
        return DOES_NOT, "a significant difference where the paper reports none"
    if got == d:
        why = "the paper's direction holds significantly"
        return REPRODUCES, why + (" (its value lies outside our interval)" if _finite(paper) and _finite(lo) else "")
    return DOES_NOT, "significantly the other way"


# ------------------------------------------------------------------------------------------- the table
def _value(c: Claim, values: dict):
    get = lambda k: values.get(k, np.nan)  # noqa: E731
    if isinstance(c.value, tuple):
        a, b = (_num(get(k)) for k in c.value)
        return a - b
    return _num(get(c.value)) if c.value else np.nan


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return np.nan


def _fmt(x, fmt) -> str:
    if not _finite(x):
        return "–"
    if fmt == "r2" and x < R2_FLOOR:
        return f"below {R2_FLOOR:g}".replace("-", "−")
    text = (f"{100 * x:.1f}%" if fmt == "%" else f"{100 * x:+.1f} pts" if fmt == "pts"
            else format(x, ".3f" if fmt == "r2" else fmt))
    return text.replace("-", "−")


def _extra(template: str, values: dict) -> str:
    """``template`` with its ``{key:fmt}`` fields filled (a number by its format, a word as it is); a clause
    (between semicolons) with a missing value is left out."""
    def present(x):
        return isinstance(x, str) and x != "" or _finite(_num(x))

    def fill(m):
        x = values[m.group(1)]
        return x if isinstance(x, str) else format(_num(x), m.group(2) or "").replace("-", "−")

    out = []
    for part in template.split("; "):
        if all(present(values.get(m.group(1))) for m in _FIELD.finditer(part)):
            out.append(_FIELD.sub(fill, part))
    return "; ".join(out)


def _ours(c: Claim, values: dict, v, lo, hi, p) -> str:
    if not _finite(v):
        return "–"
    unit = "" if c.fmt in ("%", "pts") else c.unit
    text = ("ΔBIC " if c.margin is not None else "") + _fmt(v, c.fmt) + unit
    if _finite(lo) and _finite(hi):
        text += f" [{_fmt(lo, c.fmt)}, {_fmt(hi, c.fmt)}]"
    elif _finite(p):
        text += f" (p = {p:.2g})"
    more = _extra(c.extra, values)
    return f"{text}; {more}" if more else text


def row(c: Claim, values: dict) -> dict:
    """One statement against ``values`` (glue key -> number): claim, chapter, what, paper, ours, verdict, why."""
    v = _value(c, values)
    lo, hi, p = (_num(values.get(k, np.nan)) if k else np.nan for k in (c.lo, c.hi, c.p))
    if c.untestable:
        out, why = NOT_TESTABLE, c.untestable
    else:
        out, why = verdict(v, lo, hi, p, paper=c.paper, null=c.null, direction=c.direction, margin=c.margin)
        if c.missing and not _finite(v):
            why = c.missing
    return dict(id=c.id, claim=c.claim, chapter=c.chapter, what=c.what, paper=c.paper_text,
                ours=_ours(c, values, v, lo, hi, p), verdict=out, why=why)


def rows(chapter: str, values: dict | None) -> pd.DataFrame:
    """The statements of ``chapter`` (a notebook stem) against its ``values``; ``None``: the chapter did not run in
    this build (every row not testable, saying so)."""
    out = []
    for c in CLAIMS:
        if c.chapter != chapter:
            continue
        if values is None:
            out.append(dict(row(c, {}), verdict=NOT_TESTABLE,
                            why=c.untestable or "the chapter was not executed in this build"))
        else:
            out.append(row(c, values))
    return pd.DataFrame(out, columns=["id", "claim", "chapter", "what", "paper", "ours", "verdict", "why"])


def table(values_by_chapter: dict) -> pd.DataFrame:
    """Every statement of :data:`CLAIMS`, in claim order, from ``{chapter: values or None}`` (a chapter missing from
    the dict counts as not executed)."""
    parts = [rows(ch, values_by_chapter.get(ch)) for ch in CHAPTERS]
    t = pd.concat(parts, ignore_index=True)
    order = {c.id: i for i, c in enumerate(sorted(CLAIMS, key=lambda c: (c.claim, c.id)))}
    return t.sort_values("id", key=lambda s: s.map(order)).reset_index(drop=True)


def summary(t: pd.DataFrame) -> str:
    """One sentence: how many statements (and of how many claims) reproduce, do not, or cannot be tested."""
    n = t["verdict"].value_counts()
    return (f"{len(t)} statements of the paper's {t['claim'].nunique()} numbered claims: "
            f"{n.get(REPRODUCES, 0)} reproduce, {n.get(DOES_NOT, 0)} do not, "
            f"{n.get(NOT_TESTABLE, 0)} are not testable here.")


def sentence(r) -> str:
    """A row as a sentence for a chapter's prose."""
    return f"Paper: {r['paper']}; here: {r['ours']}. Verdict (claim {r['id']}): {r['verdict']} — {r['why']}."


def keys(chapter: str) -> list:
    """The glue keys the statements of ``chapter`` read."""
    return sorted({k for c in CLAIMS if c.chapter == chapter for k in c.keys})


def _shown(t: pd.DataFrame) -> pd.DataFrame:
    return t.rename(columns={"id": "claim", "claim": "_n", "what": "statement", "ours": "this book"})[
        ["claim", "statement", "paper", "this book", "verdict", "why"]]


def glue_chapter(chapter: str, values: dict) -> pd.DataFrame:
    """At the end of a chapter: its rows against the numbers it computed, glued for the page as ``verdict_rows``
    (the table, pasted at the top), ``verdict_<id>`` (a sentence per row) and ``verdict_values`` (the numbers
    the rows read, JSON, for the intro's table). Returns the rows."""
    from myst_nb import glue

    from .notebook import table as show

    if chapter not in CHAPTERS:
        raise ValueError(f"no claims are registered for {chapter!r}; chapters with claims: {', '.join(CHAPTERS)}")
    t = rows(chapter, values)
    glue("verdict_rows", show(_shown(t)), display=False)
    for _, r in t.iterrows():
        glue(f"verdict_{r['id']}", sentence(r), display=False)
    used = {k: values[k] if isinstance(values[k], str) else _num(values[k]) for k in keys(chapter) if k in values}
    glue("verdict_values", json.dumps(used), display=False)
    return t


# ------------------------------------------------------------------------------------ executed notebooks
_GLUE_PREFIX = "application/papermill.record/"


def _parse(text: str):
    """A glued value from its text/plain form (repr): numbers (also numpy's ``np.float64(...)``), nan, strings."""
    text = text.strip()
    m = re.fullmatch(r"np\.\w+\((.*)\)", text)
    if m:
        text = m.group(1)
    if text in ("nan", "inf", "-inf"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_glue(path) -> dict:
    """``{key: value}`` of every value glued in an executed notebook (myst_nb ``glue``), parsed from text/plain."""
    nb = json.loads(Path(path).read_text())
    out = {}
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            name = (o.get("metadata") or {}).get("scrapbook", {}).get("name")
            data = {k.removeprefix(_GLUE_PREFIX): v for k, v in (o.get("data") or {}).items()}
            if name and "text/plain" in data:
                text = data["text/plain"]
                out[name] = _parse("".join(text) if isinstance(text, list) else text)
    return out


def executed_values(src) -> dict:
    """``{chapter: values or None}`` from the executed chapters under ``src`` (a build's staging tree, where
    ``writesae.book`` writes them: ``<src>/notebooks/<chapter>.ipynb``); None where a chapter has no
    ``verdict_values`` (not executed in this build)."""
    out = {}
    for ch in CHAPTERS:
        path = Path(src) / "notebooks" / f"{ch}.ipynb"
        glued = read_glue(path) if path.exists() else {}
        out[ch] = json.loads(glued["verdict_values"]) if "verdict_values" in glued else None
    return out


def markdown(t: pd.DataFrame) -> str:
    """The table as MyST markdown, each claim linked to its chapter."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| claim | statement | paper | this book | verdict |", "|---|---|---|---|---|"]
    for _, r in t.iterrows():
        lines.append(f"| {esc(r['id'])} | {esc(r['what'])} ({{doc}}`{CHAPTERS[r['chapter']].lower()} "
                     f"</notebooks/{r['chapter']}>`) | {esc(r['paper'])} | {esc(r['ours'])} | "
                     f"**{r['verdict']}**: {esc(r['why'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- Sphinx directive
def setup(app):
    """Sphinx extension: the ``{verdict-table}`` directive renders :func:`table` from the executed chapters of the
    build (the Sphinx source tree is the build's staging tree) and re-renders whenever one of them changes."""
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class VerdictTable(SphinxDirective):
        has_content = False

        def run(self):
            src = Path(self.env.srcdir)
            for ch in CHAPTERS:
                if (src / "notebooks" / f"{ch}.ipynb").exists():
                    self.env.note_dependency(str(src / "notebooks" / f"{ch}.ipynb"))
            t = table(executed_values(src))
            text = f"{RULE}\n\n{summary(t)}\n\n{markdown(t)}\n"
            node = nodes.container(classes=["verdict-table"])
            self.state.nested_parse(StringList(text.splitlines(), source="verdicts"), self.content_offset, node)
            return [node]

    app.add_directive("verdict-table", VerdictTable)
    return dict(parallel_read_safe=True, parallel_write_safe=True)


# ------------------------------------------------------------------------------ intervals the rows read
def rate_difference(w1, n1, w2, n2, alpha=ALPHA) -> tuple[float, float, float]:
    """(p1 - p2, lo, hi): the difference of two independent rates ``w1/n1 - w2/n2`` with Newcombe's hybrid
    score interval (from the two Wilson intervals); NaN where a rate has no trials."""
    from .stats import wilson_ci

    if not n1 or not n2:
        return np.nan, np.nan, np.nan
    p1, p2 = w1 / n1, w2 / n2
    (l1, u1), (l2, u2) = wilson_ci(w1, n1, alpha), wilson_ci(w2, n2, alpha)
    d = p1 - p2
    return float(d), float(d - math.hypot(p1 - l1, u2 - p2)), float(d + math.hypot(u1 - p1, p2 - l2))


def mean_ci(values, alpha=ALPHA, seed=0, stat=np.mean, n_boot=2000) -> tuple[float, float, float]:
    """(stat, lo, hi) of the finite ``values`` (default the mean) with a percentile bootstrap interval; NaN
    interval with fewer than two values."""
    from .stats import bootstrap_ci

    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(stat(x)) if len(x) else np.nan), np.nan, np.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0]), float(x[0])
    lo, hi = bootstrap_ci(x, stat, n_boot=n_boot, seed=seed, alpha=alpha)
    return float(stat(x)), lo, hi


def median_ci(values, alpha=ALPHA, seed=0) -> tuple[float, float, float]:
    """(median, lo, hi) with a percentile bootstrap interval (:func:`mean_ci` of the median)."""
    return mean_ci(values, alpha, seed, stat=np.median)


def difference_text(d, lo, hi, fmt="pts") -> str:
    """A difference with its interval and whether it is an effect: "+3.5 pts [−3.1, +10.0 pts]: inside the
    noise (the interval contains no difference)" or "...: significant"."""
    if not (_finite(d) and _finite(lo) and _finite(hi)):
        return f"{_fmt(d, fmt)} (no interval)"
    inside = lo <= 0 <= hi
    return (f"{_fmt(d, fmt)} [{_fmt(lo, fmt)}, {_fmt(hi, fmt)}]: "
            + ("inside the noise (the interval contains no difference)" if inside else "a significant difference"))


def paired_difference(a, b, alpha=ALPHA, seed=0, n_boot=2000) -> tuple[float, float, float]:
    """(mean(a - b), lo, hi) over pairs (e.g. two decoders' wins at the same firings), bootstrap interval."""
    return mean_ci(np.asarray(a, float) - np.asarray(b, float), alpha, seed, n_boot=n_boot)


def median_difference(a, b, n_boot=2000, alpha=ALPHA, seed=0) -> tuple[float, float, float]:
    """(median(a) - median(b), lo, hi) of two independent samples, percentile bootstrap (each resampled on its
    own); NaN interval where a sample has fewer than two values."""
    a, b = (np.asarray(x, float)[np.isfinite(np.asarray(x, float))] for x in (a, b))
    if not len(a) or not len(b):
        return np.nan, np.nan, np.nan
    d = float(np.median(a) - np.median(b))
    if len(a) < 2 or len(b) < 2:
        return d, np.nan, np.nan
    rng = np.random.default_rng(seed)
    boot = (np.median(rng.choice(a, (n_boot, len(a))), 1) - np.median(rng.choice(b, (n_boot, len(b))), 1))
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return d, float(lo), float(hi)
