"""Every figure of the book stays legible at page width (issue 25).

The book's content column is about 760 px wide (1280 px viewport); a wider figure is scaled down to it, so a
text of ``s`` points in a figure ``w`` inches wide reads at ``s * 760 / (w * 72)`` px. Each figure function of
:mod:`writesae.plots` (and the explorer widget's figure) is built here from a small synthetic table of the
columns its notebook passes, drawn, and checked: at most 8 in wide (its tight bounding box too, as the inline
backend crops to it), at least 150 dpi, every visible text at least 9 px at page width.
"""
import base64
import importlib
import inspect
import io
import pkgutil
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import writesae.plots  # noqa: E402
from writesae.plots import interventions as I, measurements as M, overview as O, recall as R, sweep as S  # noqa: E402
from writesae.plots import training as T, zoo as Z  # noqa: E402

PAGE_PX, MAX_WIDTH_IN, MIN_PX, MIN_DPI = 760, 8.0, 9.0, 150
NOT_FIGURES = {"grid", "figure"}  # helpers of writesae.plots that return no Figure
RNG = np.random.default_rng(0)
FAMS = ["GDN", "Mamba-2", "DeltaNet", "GLA", "RWKV-7"]


def _atom_figure():
    return I.atom_figure(RNG.normal(size=32), RNG.normal(size=32), RNG.uniform(-1, 1, 40), title="L6H0 atom 17")


def _erasure_figure():
    rows = [dict(split=s, dose=d, where=w, dlogp=RNG.normal(-0.1 if w == "firing" else 0, 0.05))
            for s in ("fit", "eval") for d in (0.5, 1.0, 2.0) for w in ("firing", "non-firing") for _ in range(12)]
    return I.erasure_figure(pd.DataFrame(rows))


def _sign_figure():
    p = RNG.normal(size=60)
    m = p + RNG.normal(0, 0.3, 60)
    return I.sign_figure(pd.DataFrame({"predicted": p, "measured": m, "correct": np.sign(p) == np.sign(m)}))


def _install_figure():
    rows = [dict(stratum=s, m=m, included_native=int(RNG.random() < 0.2), included_edited=int(RNG.random() < 0.5),
                 lift=RNG.normal(0.3, 0.1)) for s in ("frequent", "mid", "rare") for m in (1.5, 3.0, 6.0)
            for _ in range(8)]
    return I.install_figure(pd.DataFrame(rows))


def _steering_figure():
    rows = [dict(counted=c, condition=cond, alpha=a, mean_rate=r, ci_low=r - 1, ci_high=r + 1)
            for c in ("sentence boundaries", "newlines") for cond, a, r in
            (("baseline", 1.0, 5.0), ("boundary", 5.0, 7.0), ("random", 5.0, 5.5), ("boundary", 10.0, 9.0),
             ("random", 10.0, 6.0))]
    return I.steering_figure(pd.DataFrame(rows))


def _partition_histogram():
    cos = np.r_[RNG.normal(0.1, 0.1, 90), RNG.normal(0.8, 0.05, 30)]
    table = pd.DataFrame({"cos": cos, "class": ["bundle"] * 90 + ["register"] * 30})
    summary = dict(components={"bundle": dict(weight=0.75, mean=0.1, std=0.1),
                               "register": dict(weight=0.25, mean=0.8, std=0.05)},
                   bic={"1": -120.4, "2": -180.2, "3": -175.9}, dbic=-59.8)
    return M.partition_histogram(table, summary)


def _substitution_kl():
    n = 50
    kd = 10 ** RNG.uniform(-6, -2, n)
    df = pd.DataFrame({"read": "mean", "direction": "patched||base", "kl_delete": kd,
                       "kl_atom": kd * 10 ** RNG.normal(-0.3, 0.5, n), "kl_random": kd * 10 ** RNG.normal(0.2, 0.3, n),
                       "cos_native": RNG.uniform(-1, 1, n), "scaling": "coef", "write": "native"})
    df["win"] = df["kl_atom"] < df["kl_delete"]
    return M.substitution_kl(df)


def _win_rate_strip(n_heads=16):
    w = RNG.uniform(0.3, 0.9, n_heads)
    s = pd.DataFrame({"layer": 9, "head": range(n_heads), "win_rate": w, "wilson_lo": w - 0.05, "wilson_hi": w + 0.05})
    return M.win_rate_strip(s, chosen=(9, 4))


def _closed_form_scatter():
    n = 3 * 4 * 10
    p = RNG.normal(size=n)
    df = pd.DataFrame({"split": "eval", "lag": np.repeat([0, 2, 8], 40),
                       "eps": np.tile(np.repeat([0.1, 0.3, 1.0, 3.0], 10), 3),
                       "pred_direct": p, "measured": p + RNG.normal(0, 0.2, n)})
    return M.closed_form_scatter(df)


def _divergence_curves():
    rows = [dict(cond=c, lag=L, **{f"{col}_{q}": 10.0 ** -(L / 4 + i) * (1 + 0.3 * (q == "q75") - 0.3 * (q == "q25"))
                                   for i, col in enumerate(("kl", "state_rel", "state_rel_later"))
                                   for q in ("median", "q25", "q75")})
            for c in ("atom", "delete", "random") for L in range(33)]
    return M.divergence_curves(pd.DataFrame(rows))


def _trace(dk=32, dv=32, t=64):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(write=torch.randn(1, t, dk, dv, generator=g), state=torch.randn(1, t, dk, dv, generator=g),
                           a=torch.rand(1, t, generator=g), b=torch.rand(1, t, generator=g))


def _cache_overview():
    return O.cache_overview(_trace(), title="embedded L6 H0")


def _write_vs_atom():
    g = torch.Generator().manual_seed(1)
    W = torch.outer(torch.randn(32, generator=g), torch.randn(32, generator=g))
    atom = W / W.norm() + 0.1 * torch.randn(32, 32, generator=g)
    return O.write_vs_atom(W, atom, 0.25 * float(W.norm()), title="position 17: atom 5, cos(atom, W_t) = 0.93")


def _accuracy_by_distance():
    rows = [dict(family=f, model=m, kind=k, distance=d, accuracy=a, lo=max(a - 0.1, 0), hi=min(a + 0.1, 1))
            for f in ("gdn", "mamba2") for m, k in ((f"embedded:{f}-recall", "recall"), (f"embedded:{f}", "zoo"))
            for d, a in zip(["1-8", "9-16", "17-32", "33-64", "65-128"], RNG.uniform(0, 1, 5))]
    return R.accuracy_by_distance(pd.DataFrame(rows))


def _answer_kl():
    rows = [dict(model=m, kind=k, token=t, kl=10 ** RNG.uniform(-6, 0))
            for m, k in (("embedded:gdn-recall", "recall"), ("embedded:gdn", "zoo"),
                         ("embedded:mamba2-recall", "recall"), ("embedded:mamba2", "zoo"))
            for t in ("key", "value", "separator") for _ in range(6)]
    return R.answer_kl(pd.DataFrame(rows))


def _heatmaps(n_layers=1, n_heads=16):
    rows = [dict(layer=l, head=h, win_rate=RNG.uniform(0, 1), cos_register=RNG.uniform(0, 1) if h % 5 else np.nan)
            for l in range(n_layers) for h in range(n_heads)]
    return S.heatmaps(pd.DataFrame(rows))


def _training_curves():
    rows = [dict(step=s, split=sp, fvu=1 / (1 + s / 50), l0=8.0, dead=0.1 * np.exp(-s / 100), mse=0.1,
                 **({"loss": 1 / (1 + s / 40)} if sp == "train" else {}))
            for s in range(10, 1010, 10) for sp in ("train", "val") if sp == "train" or s % 100 == 0]
    return T.training_curves(rows, title="WriteSAE at L6H0: training curves")


def _memory_strip():
    rows = [dict(family=f, cell=f"L{l}H{h}", write_share=10 ** RNG.uniform(-3, 0), chosen=(l, h) == (1, 2))
            for f in FAMS for l in range(8) for h in range(4)]
    return Z.memory_strip(pd.DataFrame(rows))


def _register_cosine():
    rows = [dict(family=f, atom=a, cell="L1H2", register_cos=np.nan if (f == "GLA" and a == "rank-1 write") else
                 RNG.uniform(-0.2, 1)) for f in FAMS for a in ("rank-1 write", "rank-2 update")]
    return Z.register_cosine(pd.DataFrame(rows), {f: 0.9 for f in FAMS})


def _win_rates():
    decs = ["WriteSAE, coef", "WriteSAE, norm", "FlatSAE + top-1 SVD, norm"]
    rows = [dict(family=f, decoder=d, win_rate=w, wilson_lo=w - 0.1, wilson_hi=w + 0.1, n=50)
            for f in FAMS for d in decs for w in [RNG.uniform(0.2, 0.9)]]
    return Z.win_rates(pd.DataFrame(rows), {(f, "WriteSAE, coef"): 0.92 for f in FAMS})


def _k_sweep():
    ks = [16, 32, 64, 128]
    df = pd.DataFrame({"k": ks, "register_cos": [np.nan, 0.5, 0.8, 0.99], "n_register": [0, 3, 8, 12],
                       "n_alive": [200, 210, 220, 230]})
    return Z.k_sweep(df, {16: np.nan, 32: np.nan, 128: 0.997})


BUILDERS = {
    "interventions.atom_figure": _atom_figure, "interventions.erasure_figure": _erasure_figure,
    "interventions.sign_figure": _sign_figure, "interventions.install_figure": _install_figure,
    "interventions.steering_figure": _steering_figure, "measurements.partition_histogram": _partition_histogram,
    "measurements.substitution_kl": _substitution_kl, "measurements.win_rate_strip": _win_rate_strip,
    "measurements.closed_form_scatter": _closed_form_scatter, "measurements.divergence_curves": _divergence_curves,
    "overview.cache_overview": _cache_overview, "overview.write_vs_atom": _write_vs_atom,
    "recall.accuracy_by_distance": _accuracy_by_distance, "recall.answer_kl": _answer_kl,
    "sweep.heatmaps": _heatmaps, "training.training_curves": _training_curves, "zoo.memory_strip": _memory_strip,
    "zoo.register_cosine": _register_cosine, "zoo.win_rates": _win_rates, "zoo.k_sweep": _k_sweep,
}
# wider tables than the defaults above: more heads or layers must not widen a figure past the page
EXTRA = {"sweep.heatmaps, 4 layers x 4 heads": lambda: _heatmaps(4, 4),
         "sweep.heatmaps, 2 layers x 32 heads": lambda: _heatmaps(2, 32),
         "measurements.win_rate_strip, 4 heads": lambda: _win_rate_strip(4)}


def _figure_functions():
    """Every public function defined in a module of writesae.plots, as 'module.name'."""
    out = set()
    for info in pkgutil.iter_modules(writesae.plots.__path__):
        mod = importlib.import_module(f"writesae.plots.{info.name}")
        out |= {f"{info.name}.{n}" for n, f in vars(mod).items() if inspect.isfunction(f)
                and f.__module__ == mod.__name__ and not n.startswith("_") and n not in NOT_FIGURES}
    return out


def test_every_figure_function_is_checked():
    assert _figure_functions() == set(BUILDERS)


def legibility(fig):
    """(width in inches as displayed, dpi, [(px at page width, text)] of every visible non-empty text)."""
    fig.canvas.draw()
    tight = fig.get_tightbbox(fig.canvas.get_renderer()).width
    width = max(fig.get_figwidth(), tight)
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()
             and (t.axes is None or t.axes.axison or t in t.axes.texts)]
    return width, fig.dpi, [(t.get_fontsize() * PAGE_PX / (width * 72), t.get_text()) for t in texts]


@pytest.mark.parametrize("name", [*BUILDERS, *EXTRA])
def test_figure_is_legible_at_page_width(name):
    fig = {**BUILDERS, **EXTRA}[name]()
    try:
        width, dpi, texts = legibility(fig)
        assert isinstance(fig, matplotlib.figure.Figure)
        assert fig.get_figwidth() <= MAX_WIDTH_IN and width <= MAX_WIDTH_IN + 0.1, f"{name}: {width:.2f} in wide"
        assert dpi >= MIN_DPI, f"{name}: {dpi} dpi"
        small = sorted((round(px, 1), text) for px, text in texts if px < MIN_PX)
        assert not small, f"{name}: texts under {MIN_PX} px at page width: {small[:5]}"
    finally:
        plt.close(fig)


def test_the_inline_png_carries_the_figure_dpi():
    """The notebook's inline backend renders with IPython's print_figure at the figure's dpi (no retina,
    bbox tight): its PNG is 150 px per inch of the (cropped) figure."""
    from IPython.core.pylabtools import print_figure
    from PIL import Image

    fig = _training_curves()
    try:
        png = Image.open(io.BytesIO(print_figure(fig, "png")))
        tight = fig.get_tightbbox(fig.canvas.get_renderer())
        assert abs(png.width - round((tight.width + 0.2) * fig.dpi)) <= 2  # bbox_inches="tight" pads 0.1 in each side
        assert png.width >= PAGE_PX  # so the page scales it down, never up
    finally:
        plt.close(fig)


def test_widget_png_is_rendered_at_the_figure_dpi_and_fits_the_view():
    from PIL import Image

    from writesae import widgets

    fig = _atom_figure()
    width = fig.get_figwidth()
    html = widgets._png(fig)
    assert 'max-width:100%' in html
    png = Image.open(io.BytesIO(base64.b64decode(html.split("base64,")[1].split('"')[0])))
    assert png.width >= 0.8 * width * 150
