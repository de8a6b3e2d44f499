"""The verdict table (writesae.verdicts): the rule, the registry, reading executed notebooks, the intro's table."""
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from writesae import verdicts as V
from writesae.experiments import ce_recovered as CE, closed_form as CF, substitution as Sub

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("args, kw, want", [
    # the interval contains the paper's value (whatever the null)
    ((0.92, 0.90, 0.94), dict(paper=0.924, null=0.5), V.REPRODUCES),
    # ... unless it holds no effect too: too few samples to tell
    ((0.52, 0.40, 0.95), dict(paper=0.924, null=0.5), V.NOT_TESTABLE),
    # the paper's direction holds significantly, the value does not
    ((0.70, 0.65, 0.75), dict(paper=0.924, null=0.5), V.REPRODUCES),
    # significantly the other way: 03's 44.0% [39, 49] against 92.4%
    ((0.44, 0.39, 0.49), dict(paper=0.924, null=0.5), V.DOES_NOT),
    # null: the interval holds no effect and not the paper's value
    ((0.52, 0.45, 0.59), dict(paper=0.924, null=0.5), V.DOES_NOT),
    # a claim of sign only (Mamba-2's R^2 < 0): below zero reproduces, straddling it is null
    ((-0.4, -0.7, -0.1), dict(direction=-1), V.REPRODUCES),
    ((-0.1, -0.5, 0.3), dict(direction=-1), V.DOES_NOT),
    # a claim of no difference (FlatSAE vs WriteSAE on GDN): an interval around 0 reproduces, a gap does not
    ((0.01, -0.03, 0.05), dict(paper=-0.0011, direction=0), V.REPRODUCES),
    ((0.08, 0.04, 0.12), dict(paper=-0.0011, direction=0), V.DOES_NOT),
])
def test_rule_on_intervals(args, kw, want):
    assert V.verdict(*args, **kw)[0] == want


def test_rule_on_p_values_and_margins():
    # a p-value decides where there is no interval: significance on the paper's side, the other side, or null
    assert V.verdict(-0.05, p=1e-4, paper=-0.116)[0] == V.REPRODUCES
    assert V.verdict(+0.05, p=1e-4, paper=-0.116) == (V.DOES_NOT, "significantly the other way")
    assert V.verdict(-0.05, p=0.3, paper=-0.116) == (V.DOES_NOT, "null: p = 0.3")
    assert V.verdict(-0.05, p=0.049, paper=-0.116, alpha=0.01)[0] == V.DOES_NOT
    # a ΔBIC is evidence itself: beyond 10 it counts
    assert V.verdict(-12.0, paper=-296.0, margin=10)[0] == V.REPRODUCES
    assert V.verdict(-9.0, paper=-296.0, margin=10)[0] == V.DOES_NOT
    assert V.verdict(15.0, paper=-296.0, margin=10)[1] == "significantly the other way"


def test_rule_without_a_number_or_an_interval_is_not_testable():
    assert V.verdict(np.nan, 0.1, 0.2, paper=0.5) == (V.NOT_TESTABLE, "this build has no such number")
    assert V.verdict(None, paper=0.5)[0] == V.NOT_TESTABLE
    assert V.verdict(0.3, paper=0.5) == (V.NOT_TESTABLE, "no interval or test for this number")
    assert V.verdict(0.3, np.nan, 0.4, paper=0.5)[0] == V.NOT_TESTABLE  # half an interval is none


# ------------------------------------------------------------------------------------------- the registry
def test_every_claim_of_the_paper_has_a_row_in_a_chapter_that_exists():
    from writesae import book

    assert sorted({c.claim for c in V.CLAIMS}) == list(range(1, 14))
    assert len({c.id for c in V.CLAIMS}) == len(V.CLAIMS)
    chapters = {p.stem for p in book.toc_documents(REPO) if p.suffix == ".ipynb"}
    assert {c.chapter for c in V.CLAIMS} == set(V.CHAPTERS) <= chapters
    t = V.table({})
    assert len(t) == len(V.CLAIMS) and t["claim"].tolist() == sorted(t["claim"])  # claim order
    assert set(t["verdict"]) == {V.NOT_TESTABLE}
    assert "not executed" in t.set_index("id").loc["3", "why"]
    assert "Qwen3.5-4B" in t.set_index("id").loc["11e", "why"]  # a fixed reason stays


def test_each_chapter_with_claims_opens_with_its_rows_and_glues_them():
    for ch in V.CHAPTERS:
        cells = json.loads((REPO / "notebooks" / f"{ch}.ipynb").read_text())["cells"]
        first = "".join(cells[0]["source"])
        assert first.startswith("# ") and "```{glue} verdict_rows" in first, ch
        calls = [c for c in cells if c["cell_type"] == "code" and f'verdicts.glue_chapter("{ch}"' in "".join(c["source"])]
        assert len(calls) == 1 and cells[-1] is calls[0], ch  # the last cell: every number exists by then


def test_rows_read_the_chapters_numbers():
    # claim 3 reads the interval that clusters firings by atom, not Wilson's (which treats them as independent)
    values = dict(sub_win_rate=0.440, sub_wilson_lo=0.39, sub_wilson_hi=0.49, sub_boot_feature_lo=0.36,
                  sub_boot_feature_hi=0.52, sub_n=400, pop_mean_win_rate=0.9, pop_ci_lo=0.88, pop_ci_hi=0.92,
                  pop_n_atoms=30, pool_name="top-1")
    t = V.rows("03_substitution", values).set_index("id")
    assert t.loc["3", "verdict"] == V.DOES_NOT and t.loc["3", "why"] == "null: our interval contains no effect"
    assert t.loc["3", "ours"].startswith("44.0% [36.0%, 52.0%]; n = 400; pool: top-1 firings; interval: ")
    assert t.loc["3", "ours"].endswith("(Wilson, firings as independent: [39.0%, 49.0%])")
    t = V.rows("03_substitution", dict(values, sub_boot_feature_hi=0.47)).set_index("id")
    assert t.loc["3", "why"] == "significantly the other way"
    # claim 8's second statement: no significant change at non-firing positions (05)
    t8 = V.rows("05_interventions", dict(er_firing_median=-0.1, er_firing_p=1e-6, er_non_firing_median=-0.1,
                                         er_non_firing_p=1e-7, er_p_vs_nonfiring=0.5)).set_index("id")
    assert t8.loc["8", "verdict"] == V.REPRODUCES and t8.loc["8b", "verdict"] == V.DOES_NOT
    assert V.rows("05_interventions", dict(er_non_firing_median=-0.001, er_non_firing_p=0.4)).set_index(
        "id").loc["8b", "verdict"] == V.REPRODUCES
    assert t.loc["4", "verdict"] == V.REPRODUCES and t.loc["4", "why"] == "our interval contains the paper's value"
    # an R^2 far below zero is written as such (04: the median's interval over few atoms)
    t4 = V.rows("04_closed_form", dict(r2_pred_paper_fit=-0.146, r2_pred_paper_fit_lo=-418.7,
                                        r2_pred_paper_fit_hi=-0.063)).set_index("id")
    assert t4.loc["6", "ours"].startswith("−0.146 [below −1, −0.063]") and t4.loc["6", "verdict"] == V.DOES_NOT
    assert t.loc["5", "verdict"] == V.NOT_TESTABLE  # heads_mean not given
    # a difference of two keys, with a p-value (05: install at m = 3)
    t5 = V.rows("05_interventions", {"inst_mid_3.0_edited": 0.5, "inst_mid_3.0_native": 0.25, "inst_mid_3.0_p": 0.01,
                                     "inst_mid_3.0_n": 12}).set_index("id")
    assert t5.loc["10", "verdict"] == V.REPRODUCES and t5.loc["10", "ours"].startswith("+25.0 pts (p = 0.01); 25.0% → 50.0%")
    # the 12d row has numbers but no interval: not testable, saying why
    t7 = V.rows("07_ground_truth_ablations", dict(t14_r1_layer_ppl=0.01, t14_r2_layer_ppl=0.02)).set_index("id")
    assert t7.loc["12d", "verdict"] == V.NOT_TESTABLE and "no interval" in t7.loc["12d", "why"]
    assert "rank 1 +1.00%, rank 2 +2.00%" in t7.loc["12d", "ours"]


def test_a_chapter_without_claims_is_an_error():
    with pytest.raises(ValueError, match="no claims are registered for '06_explorer'"):
        V.glue_chapter("06_explorer", {})


# ------------------------------------------------------------------------------------ executed notebooks
def _executed(path, code):
    """Execute ``code`` in a fresh kernel into the notebook at ``path`` (as papermill leaves a chapter)."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code)]
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_the_intro_table_is_the_chapters_glued_rows(tmp_path):
    src = tmp_path / "src"
    _executed(src / "notebooks" / "03_substitution.ipynb", (
        "import numpy as np\nfrom writesae import verdicts\n"
        "nums = dict(sub_win_rate=np.float64(0.44), sub_boot_feature_lo=0.39, sub_boot_feature_hi=0.49, sub_n=400, other=1, "
        "pool_name='top-1')\n"
        "verdicts.glue_chapter('03_substitution', nums)"))
    glued = V.read_glue(src / "notebooks" / "03_substitution.ipynb")
    assert "verdict_rows" in glued and glued["verdict_3"].startswith("Paper: 92.4% of 4,851")
    values = V.executed_values(src)
    assert values["03_substitution"] == dict(sub_win_rate=0.44, sub_boot_feature_lo=0.39, sub_boot_feature_hi=0.49,
                                             sub_n=400, pool_name="top-1")  # the pool's name as a word
    assert values["02_feature_classes"] is None  # not executed in this build
    t = V.table(values).set_index("id")
    assert t.loc["3", "verdict"] == V.DOES_NOT and t.loc["1", "verdict"] == V.NOT_TESTABLE
    assert t.loc["3"].to_dict() == V.rows("03_substitution", values["03_substitution"]).set_index("id").loc["3"].to_dict()
    md = V.markdown(t.reset_index())
    assert "| 3 | the atom beats deletion" in md and "</notebooks/03_substitution>" in md
    assert "**does not reproduce**: significantly the other way" in md


def test_glued_text_parses_back():
    assert V._parse("np.float64(0.25)") == 0.25 and V._parse("np.int64(3)") == 3
    assert math.isnan(V._parse("nan")) and V._parse("'a b'") == "a b" and V._parse("-inf") == -math.inf


# ---------------------------------------------------------------------------------- intervals the rows read
def test_rate_difference_is_newcombes_interval():
    # Newcombe (1998), Table II example (a): 56/70 vs 48/80 -> 0.2000 [0.0524, 0.3339]
    d, lo, hi = V.rate_difference(56, 70, 48, 80)
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)
    assert all(math.isnan(x) for x in V.rate_difference(1, 0, 1, 2))


def test_difference_text_says_whether_it_is_an_effect():
    assert V.difference_text(0.035, -0.03, 0.10).endswith("inside the noise (the interval contains no difference)")
    assert V.difference_text(0.2, 0.05, 0.33).startswith("+20.0 pts [+5.0 pts, +33.0 pts]: a significant")
    assert V.difference_text(-0.2, -0.3, -0.1).startswith("−20.0 pts [−30.0 pts, −10.0 pts]")


def test_median_difference_and_mean_ci():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.1, 200), rng.normal(0.0, 0.1, 200)
    d, lo, hi = V.median_difference(a, b)
    assert lo < d < hi and lo > 0.9 and hi < 1.1
    assert math.isnan(V.median_difference(a, [0.1])[1]) and math.isnan(V.median_difference([], b)[0])
    m, lo, hi = V.mean_ci([0.5, 0.6, 0.7, 0.8])
    assert m == pytest.approx(0.65) and 0.5 <= lo < m < hi <= 0.8
    assert math.isnan(V.mean_ci([0.5])[1])


def test_decoder_gap_pairs_the_same_firings():
    base = dict(read="mean", direction="patched||base", layer=1, head=0)
    rows = [dict(base, decoder="WriteSAE", seq=s, pos=p, win=w) for s, p, w in ((0, 1, 1), (0, 2, 1), (1, 3, 0))]
    rows += [dict(base, decoder="FlatSAE + top-1 SVD", seq=s, pos=p, win=w) for s, p, w in ((0, 1, 0), (0, 2, 1), (1, 3, 0))]
    rows += [dict(base, decoder="FlatSAE + top-1 SVD", read="next", seq=9, pos=9, win=1)]  # another read-out: ignored
    g = Sub.decoder_gap(pd.DataFrame(rows))
    assert g["n"] == 3 and g["gap"] == pytest.approx(1 / 3) and g["lo"] <= g["gap"] <= g["hi"]
    assert math.isnan(Sub.decoder_gap(pd.DataFrame(rows[:3]))["gap"])


def test_passage_summary_gives_the_paired_gap():
    df = pd.DataFrame(dict(n_edited=[3, 4, 5, 6], d_delete=[0.01, 0.02, 0.0, 0.01], d_random=[0.2, 0.3, 0.25, 0.2]))
    ps = Sub.passage_summary(df)
    assert ps["d_gap"] == pytest.approx(ps["d_random"] - ps["d_delete"]) and 0 < ps["d_gap_lo"] < ps["d_gap"] < ps["d_gap_hi"]


def test_compare_pools_does_not_call_a_difference_inside_its_interval_an_effect():
    c = Sub.compare_pools(dict(wins=176, n=400), dict(wins=162, n=400))  # 44.0% vs 40.5%
    assert c["diff"] == pytest.approx(0.035) and c["lo"] < 0 < c["hi"] and "inside the noise" in c["text"]


# --------------------------------------------------------------------------------- numbers that mean nothing
def test_ce_recovered_is_not_measurable_where_zeroing_costs_nothing():
    df = pd.DataFrame(dict(ce_recovered=[1.3, 0.9, 0.5, 0.95], ce_recovered_mean=[1.1, 0.8, 0.4, 0.9],
                           zero_cost=[0.05, -0.002, 0.0004, 0.2], ppl_change=[0.01, 0.002, 0.0, 0.0076]))
    out = CE.shown(df)
    assert out["ce_recovered"].tolist()[:3] == ["not measurable here"] * 3 and out["ce_recovered"].iloc[3] == 0.95
    assert out["ce_recovered_mean"].iloc[1] == "not measurable here"
    assert "above 1" in out["ce_note"][0] and "lowers the loss" in out["ce_note"][1] and "noise" in out["ce_note"][2]
    assert not any("<" in w for w in out["ce_note"])  # plain text in an HTML table
    assert out["ce_note"][3] == ""
    assert "ppl_change" not in out and out["ppl_change_pct"].tolist() == pytest.approx([1.0, 0.2, 0.0, 0.76])
    assert "ce_note" not in CE.shown(df.iloc[3:])  # nothing to explain, no column
    cap = CE.caption(out.assign(name=["A", "B", "C", "D"]), "name")  # the reasons once, under the table
    assert cap.startswith("CE recovered not measurable here. A: 1.300, above 1") and "; B: " in cap and "; C: " in cap
    assert "D:" not in cap and CE.caption(CE.shown(df.iloc[3:]).assign(name=["D"]), "name") is None
    assert CE.describe(0.95, 0.2, 0.0076) == "0.950 (perplexity +0.76%)"
    assert CE.describe(1.3, 0.05, 0.01).startswith("not measurable here: 1.300, above 1: ")
    assert CE.describe(1.3, 0.05, 0.01).endswith("(perplexity +1.00%)")
    assert CE.describe(0.5, -0.002) == ("not measurable here: zeroing this state lowers the loss by 0.002 nats/token: "
                                        "nothing to recover")


def test_r2_below_minus_one_is_shown_as_such():
    df = pd.DataFrame(dict(family=["GDN", "Mamba-2", "GLA"], r2_pred_paper=[-315210.0, -39859.0, -0.0004],
                           r2_pred_direct=[0.5, 0.2, 0.9]))
    out = CF.r2_shown(df)
    assert out["r2_pred_paper"].tolist()[:2] == ["below -1", "below -1"] and out["r2_pred_paper"].iloc[2] == -0.0004
    assert out["r2_pred_direct"].tolist() == [0.5, 0.2, 0.9]
    s = CF.r2_summary(pd.DataFrame(dict(r2_x=[0.1, 0.2, 0.3, 0.4, 0.5])))
    assert s.loc[0, "median"] == 0.3 and 0.1 <= s.loc[0, "median_lo"] <= 0.3 <= s.loc[0, "median_hi"] <= 0.5


# -------------------------------------------------------------------------------------------- on the page
def test_intro_directive_and_chapter_top_render_the_same_rows(tmp_path):
    """A two-page Sphinx project as the book's staging tree: the intro's {verdict-table} and the chapter's pasted
    ``verdict_rows`` show the chapter's executed numbers; a changed chapter makes the intro outdated."""
    from sphinx.application import Sphinx

    src = tmp_path / "src"
    nb_path = src / "notebooks" / "03_substitution.ipynb"
    _executed(nb_path, "from writesae import verdicts\nverdicts.glue_chapter('03_substitution', "
                       "dict(sub_win_rate=0.44, sub_boot_feature_lo=0.39, sub_boot_feature_hi=0.49, sub_n=400))")
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("# Substitution\n\n```{glue} verdict_rows\n```"))
    nbformat.write(nb, nb_path)
    (src / "conf.py").write_text("extensions = ['myst_nb', 'writesae.verdicts']\nroot_doc = 'intro'\n"
                                 "nb_execution_mode = 'off'\nexclude_patterns = ['_build']\n")
    (src / "intro.md").write_text("# Intro\n\n```{verdict-table}\n```\n\n```{toctree}\nnotebooks/03_substitution\n```\n")
    out = tmp_path / "html"
    app = Sphinx(str(src), str(src), str(out), str(tmp_path / "doctrees"), "html", status=None, warning=None,
                 freshenv=True)
    app.build()
    intro = (out / "intro.html").read_text()
    assert "does not reproduce" in intro and "44.0% [39.0%, 49.0%]" in intro
    assert "notebooks/03_substitution.html" in intro  # each row links its chapter
    assert "this build has no such number" not in intro.split("does not reproduce")[0][-2000:]
    assert f"{len(V.CLAIMS)} statements" in intro and "the chapter was not executed in this build" in intro
    chapter = (out / "notebooks" / "03_substitution.html").read_text()
    assert "44.0% [39.0%, 49.0%]" in chapter and "significantly the other way" in chapter
    # the intro depends on the executed chapter: Sphinx re-reads it when the chapter changes
    assert str(nb_path) in {str(src / d) for d in app.env.dependencies["intro"]} | set(map(str, app.env.dependencies["intro"]))
