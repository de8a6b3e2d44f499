"""The book's pages as a reader sees them: rounded tables without index, figures that say what they show,
and the helpers that keep each notebook to a few calls (writesae.notebook, writesae.experiments.section)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from writesae.experiments import firings as F
from writesae.notebook import number, table
from writesae.plots import interventions as iplots
from writesae.plots import measurements as mplots


def _cells(styler):
    import re

    html = styler.to_html()
    head = re.findall(r'class="col_heading[^"]*" >([^<]*)</th>', html)
    body = re.findall(r'<td [^>]*>([^<]*)</td>', html)
    return head, body


@pytest.mark.parametrize("x,text", [(0.4275, "0.427"), (1.74e-08, "1.74e-8"), (109.09, "109.1"), (400.0, "400"),
                                    (1234.5, "1,234"), (1601, "1601"), (122880.0, "122,880"), (float("nan"), "–"), (11.3688, "11.37"), ("L6H0", "L6H0")])
def test_number_keeps_meaningful_digits(x, text):
    assert number(x) == text


def test_table_rounds_per_column_hides_the_index_and_wraps_headers():
    df = pd.DataFrame({"win_rate": [0.4275, 0.71], "n": [400.0, 12.0], "dose": [0.5, 2.0],
                       "wilcoxon_p": [0.0123456, 3e-9], "kl_atom": [1.7e-8, 4.4e-5]}, index=[7, 9])
    head, body = _cells(table(df))
    assert head == ["win rate", "n", "dose", "wilcoxon p", "kl atom"]   # no index column, spaces let headers wrap
    assert body == ["0.427", "400", "0.5", "0.012", "1.70e-8", "0.710", "12", "2", "3e-09", "4.40e-5"]


def test_table_of_a_dict_formats_p_values_by_name():
    head, body = _cells(table({"n": 64, "ratio": 1.4003, "wilcoxon_p": 1.1e-5}))
    assert head == ["quantity", "value"] and body == ["n", "64", "ratio", "1.400", "wilcoxon_p", "1.1e-05"]


def test_top1_at_takes_the_other_decoders_top_atom_at_the_same_positions():
    sites = pd.DataFrame({"seq": [0, 1, 2], "pos": [8, 9, 10], "feature": [5, 6, 7], "coef": [1.0, 1.0, 1.0],
                          "cos": [0.3, 0.4, 0.5], "layer": 6, "head": 0})
    other = pd.DataFrame({"seq": [0, 0, 1], "pos": [8, 8, 9], "feature": [40, 41, 42], "rank": [0, 1, 0],
                          "coef": [2.0, 1.0, 3.0], "cos": [0.1, 0.2, 0.9], "cos_update": [0.0, 0.0, 0.0]})
    out = F.top1_at(other, sites)
    assert out[["seq", "pos", "feature", "coef"]].values.tolist() == [[0, 8, 40, 2.0], [1, 9, 42, 3.0]]
    assert (out["layer"] == 6).all()   # the site's own columns are kept


def test_all_heads_strip_labels_every_head():
    s = pd.DataFrame({"layer": [6] * 4, "head": [0, 1, 2, 3], "win_rate": [0.43, 0.48, 0.75, 0.79],
                      "wilson_lo": [0.38, 0.43, 0.71, 0.74], "wilson_hi": [0.48, 0.53, 0.79, 0.82]})
    fig = mplots.win_rate_strip(s, chosen=(6, 0))
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    assert labels == ["H0", "H1", "H2", "H3"]
    red = [t for t in fig.axes[0].texts if t.get_color() == "tab:red"]
    assert [t.get_text() for t in red] == ["H0"]


def test_divergence_figure_leaves_out_an_empty_panel():
    lag = np.arange(4)
    rows = []
    for cond in ("atom", "delete", "random"):
        for L in lag:
            r = dict(cond=cond, lag=L, n=5)
            for col, v in (("kl", 1e-3 / (L + 1)), ("state_rel", 0.1 / (L + 1)), ("state_rel_later", np.nan)):
                r.update({f"{col}_q25": v, f"{col}_median": v, f"{col}_q75": v})
            rows.append(r)
    fig = mplots.divergence_curves(pd.DataFrame(rows))
    assert [ax.get_ylabel() for ax in fig.axes] == ["KL(next token)", "relative state change, edited head"]


def test_install_figure_shows_inclusion_on_the_full_share_axis():
    df = pd.DataFrame({"stratum": ["mid", "rare"] * 2, "m": [1.5, 1.5, 3.0, 3.0], "included_native": [0, 1, 0, 1],
                       "included_edited": [0, 1, 0, 1], "lift": [0.5, 0.4, 0.6, 0.7]})
    fig = iplots.install_figure(df)
    assert fig.axes[0].get_ylim() == (0.0, 1.0) and fig.axes[1].get_ylim() == (0.0, 1.0)


def test_closed_form_scatter_gives_each_eps_its_own_colour():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"split": "eval", "lag": 0, "eps": np.repeat([0.1, 0.3, 1.0, 3.0], 5),
                       "pred_direct": rng.normal(size=20), "measured": rng.normal(size=20)})
    fig = mplots.closed_form_scatter(df)
    colours = {tuple(np.round(c, 3)) for c in fig.axes[0].collections[0].get_facecolors()}
    assert len(colours) == 4


@pytest.mark.parametrize("html,found", [
    ('<div class="output stderr highlight-myst-ansi notranslate"><pre>x</pre></div>', ["stderr output"]),
    ("<pre>/x/y.py:3: UserWarning: careful\n  warnings.warn(</pre>", ["warning"]),
    ("<pre>train L6H0: 100%|##########| 50/50 [00:03&lt;00:00, 14.2it/s]</pre>", ["progress bar"]),
    ("<pre>&lt;Figure size 640x480 with 1 Axes&gt;</pre>", ["raw repr"]),
    ("<pre>&lt;writesae.sae.WriteSAE object at 0x7f3a2c&gt;</pre>", ["raw repr"]),
    ("<pre>False</pre>", ["raw repr"]),
    ('<pre><span></span>&lt;__main__.Thing at 0x7fe120a15e10&gt;\n</pre>', ["raw repr"]),
    ("<pre><span></span>None\n</pre>", ["raw repr"]),
    ("<p>The atom beats deletion on 92.4% of 4,851 firings (Warning signs: none).</p><pre>0.924</pre>", []),
])
def test_plumbing_names_what_a_page_should_not_show(html, found):
    from writesae.book import plumbing

    assert plumbing(html) == found
