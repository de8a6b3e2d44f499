"""Interactive views (ipywidgets): the atom explorer and the live install.

They hold no algorithm: data come from :mod:`writesae.experiments`, figures from :mod:`writesae.plots`.
Each draws its first view when it is built, into HTML widgets (figures as inline PNG), so a notebook
executed with its widget state saved shows a meaningful page in the static book. Both return a
``VBox`` whose ``controls`` dict names its inputs (for scripting and tests).

Each box starts with a snapshot notice (:data:`SNAPSHOT`) that is hidden (inline ``display:none``) except
in the built book, whose script (``book/_static/widgets-static.js``) shows it: there the widgets keep the
state they were executed with and nothing recomputes. ``writesae explore`` serves them live.
A callback's exception is shown inside the widget (ipywidgets would only log it to the kernel).
"""
from __future__ import annotations

import base64
import html
import io
import traceback

import ipywidgets as W
import matplotlib.pyplot as plt
import pandas as pd

from .cache import cached_table
from .experiments import firings as _firings
from .experiments import interventions as iv
from .experiments import partition as _partition
from .experiments import substitution as _sub
from .notebook import number
from .plots import interventions as plots

__all__ = ["atom_explorer", "live_install"]

DEFAULT_PROMPT = "The river rose after the storm, and the people of the town"

SNAPSHOT = ('<div class="writesae-snapshot" style="display:none;border:1px solid #d9a400;background:#fff8e1;'
            'padding:4px 8px;margin:4px 0">Snapshot: these controls show the state the book was built with; '
            'moving them recomputes nothing. To use them live, run <code>writesae explore</code> in the '
            'repository (README, "Live widgets").</div>')


def _error(message, detail=None) -> str:
    """HTML for an error shown inside a widget's view (``detail``: a traceback, folded)."""
    out = f'<div class="writesae-error" style="color:#a00;font-weight:bold">{html.escape(message)}</div>'
    if detail:
        out += f"<details><summary>traceback</summary><pre>{html.escape(detail)}</pre></details>"
    return out


def _name_controls(box, prefix):
    """CSS classes ``writesae-<prefix>-<control>`` on the controls, for browser tests and user styles."""
    for name, w in box.controls.items():
        w.add_class(f"writesae-{prefix}-{name}")
    return box


def _shows_errors(view, fn):
    """``fn`` as a widget callback whose exceptions appear in ``view`` instead of the kernel log."""
    def call(*args):
        try:
            fn(*args)
        except (ValueError, IndexError) as err:  # bad input: its message says what to type
            view.value = _error(str(err))
        except Exception as err:  # anything else: shown with its traceback, not swallowed
            view.value = _error(f"{type(err).__name__}: {err}", traceback.format_exc())
    return call


def _png(fig) -> str:
    """The figure as an inline PNG at its own dpi (:data:`writesae.plots.DPI`), shown at most as wide as the
    view (a page-wide figure is scaled to the page's column, as a notebook's inline figures are)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi="figure", bbox_inches="tight")
    plt.close(fig)
    return (f'<img style="max-width:100%;height:auto" '
            f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>')


def _table(df) -> str:
    """A small table for a view: headers in words (``n_firings`` -> "n firings"), numbers as the book's tables
    round them (:func:`writesae.notebook.number`)."""
    return df.rename(columns=lambda c: str(c).replace("_", " ")).to_html(index=False, float_format=number)


def _tok(host, t) -> str:
    """One token in quotes as it reads (newlines shown as ↵, never as an escape), or its id."""
    return f"'{_text(host, [t])}'" if host.tokenizer is not None else str(int(t))


def _text(host, ids) -> str:
    """Tokens as they read, newlines shown as ↵ (a page shows no raw escapes), or their ids."""
    if host.tokenizer is not None:
        return html.escape(host.tokenizer.decode([int(t) for t in ids]).replace("\n", "↵"))
    return " ".join(str(int(t)) for t in ids)


def _piece(host, t) -> str:
    """One token as it reads in running text (newlines shown as ↵), or its id."""
    if host.tokenizer is None:
        return f" {int(t)}"
    return html.escape(host.tokenizer.decode([int(t)]).replace("\n", "↵"))


def _context(host, row, width) -> str:
    """The text around a firing, the firing token highlighted."""
    pos = int(row.pos)
    toks = [_piece(host, t) for t in row.window[max(0, pos - width):pos + 3]]
    i = min(pos, width)
    toks[i] = f'<b style="background:#fd8">{toks[i]}</b>'
    return "".join(toks)


def _cell_name(cell):
    return f"L{cell[0]}H{cell[1]}"


def _atom_kls(host, sae, ids, mine, n):
    """Substitution KLs (atom / delete / random, :func:`writesae.experiments.substitution.substitute`) at the
    ``n`` strongest firings ``mine`` of one atom: medians per read, with the number of firings and wins."""
    sites = mine.nlargest(n, "coef").reset_index(drop=True)
    df = _sub.substitute(host, sae, ids, sites, direction="patched||base")
    cols = ["kl_atom", "kl_delete", "kl_random"]
    return (df.groupby("read", sort=False)
              .agg(**{c: (c, "median") for c in cols}, win_rate=("win", "mean"), n=("win", "size"))
              .reset_index())


def atom_explorer(host, saes, ids, *, firings=None, classes=None, kls=None, n_contexts=5, width=8, n_kl=3,
                  kl_key=None, cell=None):
    """Browse the atoms of one or more SAEs.

    saes: {(layer, head): WriteSAE}; ids: (N, T) windows the firings are taken on; cell: the one shown first
    (default: the first of ``saes``). Optional, per cell:
    ``firings`` (tables of :func:`writesae.experiments.firings.collect`, computed when missing),
    ``classes`` (:func:`writesae.experiments.partition.partition` tables: a ``class`` per feature) and
    ``kls`` (any table with a ``feature`` column and ``kl_*`` columns, e.g. substitution KLs per firing).
    Choose a cell, filter by class and cosine, sort by fire rate / cosine / firings, pick an atom: its
    factors and the atom as heatmaps, the cosines to the native writes over its firings, its row of the
    atom table, its median substitution KLs, and its top-firing contexts (firing token highlighted).
    A cell without ``kls`` gets them on demand: the substitution test at the atom's ``n_kl`` strongest
    firings (``n_kl=0``: none), kept per process and, with ``kl_key`` (a dict naming the SAEs and windows,
    e.g. the notebook's parameters), in the artifact cache (kind ``explorer_kls``)."""
    firings, classes, kls = dict(firings or {}), classes or {}, kls or {}
    computed = {}

    def atom_kls(cell, f, mine):
        if (cell, f) not in computed:
            run = lambda: _atom_kls(host, saes[cell], ids, mine, n_kl)  # noqa: E731
            computed[cell, f] = run() if kl_key is None else cached_table(
                "explorer_kls", dict(kl_key, cell=list(cell), feature=int(f), n_kl=n_kl), run)
        return computed[cell, f]

    tables = {}
    for cell, sae in saes.items():
        if cell not in firings:
            firings[cell] = _firings.collect(host, sae, cell, ids)
        t = _partition.atom_table(firings[cell])
        if cell in classes:
            t = t.merge(classes[cell][["feature", "class"]], on="feature", how="left")
        tables[cell] = t.assign(**{"class": t["class"].fillna("—")} if "class" in t else {"class": "—"})

    first = tuple(cell) if cell is not None and tuple(cell) in saes else next(iter(saes))
    cell_w = W.Dropdown(options=[(_cell_name(c), c) for c in saes], value=first, description="head")
    # it opens on the first cell's strongest register (highest median cosine to the write), where it has one
    registers = (tables[first]["class"] == "register").any()
    cls_w = W.Dropdown(options=["all", "register", "bundle"], value="register" if registers else "all",
                       description="class")
    cos_w = W.FloatRangeSlider(value=(-1, 1), min=-1, max=1, step=0.1, description="median cos",
                               readout_format=".1f")  # "-1.0 – 1.0" fits the readout's box; ".2f" was clipped
    sort_w = W.Dropdown(options=["fire_rate", "cos", "n_firings", "feature"], value="cos" if registers else "fire_rate",
                        description="sort by")
    atom_w = W.Dropdown(description="atom", layout=W.Layout(width="420px"))
    view = W.HTML()

    def options(*_):
        t = tables[cell_w.value]
        t = t[(t["cos"] >= cos_w.value[0]) & (t["cos"] <= cos_w.value[1])]
        if cls_w.value != "all":
            t = t[t["class"] == cls_w.value]
        t = t.sort_values(sort_w.value, ascending=sort_w.value == "feature")
        atom_w.options = [(f"#{f}  rate {rate:.3f}  cos {c:+.2f}  {k}", int(f))
                          for f, rate, c, k in zip(t["feature"], t["fire_rate"], t["cos"], t["class"])]
        if atom_w.options:
            atom_w.value = atom_w.options[0][1]
        else:
            view.value = "<i>no atom matches the filters</i>"

    def show(*_):
        if atom_w.value is None:
            return
        view.value = "<i>computing…</i>"
        cell, f = cell_w.value, int(atom_w.value)
        sae, fr = saes[cell], firings[cell]
        mine = fr[fr["feature"] == f]
        fig = plots.atom_figure(sae.v[f].detach(), sae.w[f].detach(), mine["cos"], title=f"{_cell_name(cell)} atom {f}")
        row = tables[cell][tables[cell]["feature"] == f]
        parts = [_png(fig), _table(row)]
        if cell in kls:
            k = kls[cell][kls[cell]["feature"] == f]
            cols = [c for c in k.columns if c.startswith("kl")]
            if len(k) and cols:
                parts.append("<b>substitution KL (median over firings)</b>"
                             + _table(k[cols].median().to_frame().T.assign(n=len(k))))
        elif n_kl > 0 and len(mine):
            parts.append(f"<b>substitution KL at its {min(n_kl, len(mine))} strongest firings</b> (median; "
                         "KL(patched || base) of the next-token distributions when the native write is replaced "
                         "by the atom, deleted, or replaced by a random rank-1 matrix of the atom's norm)"
                         + _table(atom_kls(cell, f, mine)))
        top = mine.nlargest(n_contexts, "coef").assign(window=lambda d: [ids[s] for s in d["seq"]])
        parts.append("<b>top firings</b><ol>" + "".join(
            f"<li>coef {r.coef:.3f} · seq {r.seq} pos {r.pos}: {_context(host, r, width)}</li>" for r in top.itertuples())
            + "</ol>")
        view.value = "".join(parts)

    options, show = _shows_errors(view, options), _shows_errors(view, show)
    for w in (cell_w, cls_w, cos_w, sort_w):
        w.observe(options, names="value")
    atom_w.observe(show, names="value")
    options()  # picks the first atom: its change of value draws it (once)
    box = W.VBox([W.HTML(SNAPSHOT), W.HBox([cell_w, cls_w, sort_w]), W.HBox([cos_w, atom_w]), view])
    box.controls = dict(cell=cell_w, cls=cls_w, cos=cos_w, sort=sort_w, atom=atom_w, view=view)
    return _name_controls(box, "explorer")


def _parse_ids(host, text, what="prompt"):
    """Token ids of ``text``: tokenized, or for a host without tokenizer integers separated by spaces/commas."""
    if host.tokenizer is not None:
        return host.tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: {host.name} has no tokenizer; type token ids, integers "
                         f"0..{host.vocab_size - 1} separated by spaces") from None
    bad = [t for t in ids if not 0 <= t < host.vocab_size]
    if bad:
        raise ValueError(f"{what}: token ids {bad} are out of range 0..{host.vocab_size - 1}")
    return ids


def _one_token(host, text):
    """The single token id of a target, or ValueError saying what it splits into and what to type."""
    ids = _parse_ids(host, text, "target")
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise ValueError("target is empty: type one token (e.g. ' water', with its leading space)")
    pieces = ", ".join(repr(host.tokenizer.decode([t])) if host.tokenizer is not None else str(t) for t in ids)
    hint = ""
    if host.tokenizer is not None and not text.startswith(" ") and len(_parse_ids(host, " " + text)) == 1:
        hint = f"; {' ' + text!r}, with a leading space, is one token"
    raise ValueError(f"target {text!r} is {len(ids)} tokens ({pieces}); the install writes one token's "
                     f"direction, so type a single token{hint}")


def live_install(host, saes=None, *, prompt=None, cell=None, target=None, n_new=20, explorer=None):
    """Type a prompt (text, or token ids for a host without tokenizer), choose a cell, what to write
    (a target token's direction, :func:`writesae.experiments.interventions.target_direction`, or an SAE
    atom), how many of the last prompt positions and the magnitude m (x ||k_t v_t^T||); Run shows the
    greedy continuation before and after and the target's first-step log-prob and rank
    (:func:`writesae.experiments.interventions.live_install`). The target must be one token (a longer one
    is refused with what it splits into); an atom id out of range is refused with the SAE's range.
    ``explorer``: an :func:`atom_explorer` box; the atom (and cell) picked there becomes this one's atom."""
    saes = saes or {}
    cells = [(c.layer, c.head) for c in host.cells]
    if prompt is None:
        prompt = DEFAULT_PROMPT if host.tokenizer is not None else "5 17 42 8 23 61 9 33 12 70 4 56"
    if target is None:
        target = " water" if host.tokenizer is not None else "7"
    prompt_w = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="600px"))
    cell_w = W.Dropdown(options=[(_cell_name(c), c) for c in cells], value=tuple(cell or cells[-1]), description="head")
    mode_w = W.ToggleButtons(options=["target direction", "atom"], value="target direction")
    target_w = W.Text(value=target, description="target")
    atom_w = W.IntText(value=0, description="atom")
    last_w = W.IntSlider(value=3, min=1, max=8, description="last n pos.")
    m_w = W.FloatSlider(value=3.0, min=0.0, max=12.0, step=0.5, description="m")
    run_w = W.Button(description="Run", button_style="primary")
    picked = W.HTML()
    view = W.HTML()

    def run(*_):
        view.value = "<i>running…</i>"
        ids = _parse_ids(host, prompt_w.value)
        tgt = _one_token(host, target_w.value)
        cell = cell_w.value
        if len(ids) < 2:
            view.value = _error("the prompt needs two tokens or more")
            return
        if mode_w.value == "atom":
            if cell not in saes:
                view.value = _error(f"no SAE for {_cell_name(cell)}: have {[_cell_name(c) for c in saes]}")
                return
            n = saes[cell].cfg.n_feat
            if not 0 <= atom_w.value < n:
                view.value = _error(f"atom {atom_w.value} is out of range: the {_cell_name(cell)} SAE has atoms "
                                    f"0..{n - 1}")
                return
            matrix = saes[cell].atom(atom_w.value).detach()
        else:
            matrix = iv.target_direction(host, cell, ids, tgt)
        T = len(ids)
        positions = list(range(max(0, T - last_w.value), T))
        res = iv.live_install(host, cell, ids, m_w.value * matrix, positions=positions, n_new=n_new, target=tgt)
        table = pd.DataFrame({"": ["native", "edited"],
                              "continuation": [_text(host, res["native"]), _text(host, res["edited"])],
                              "target log p (1st step)": [res["native_logp"], res["edited_logp"]],
                              "target rank": [res["native_rank"], res["edited_rank"]],
                              "target generated": ["yes" if tgt in res[k] else "no" for k in ("native", "edited")]})
        what = f"atom {atom_w.value}" if mode_w.value == "atom" else f"direction of {_tok(host, tgt)}"
        view.value = (f"<p>{what} x m = {m_w.value:g} x ||k_t v_t^T|| at positions {positions} of "
                      f"{_cell_name(cell)}; target {_tok(host, tgt)}</p>" + table.to_html(index=False, escape=False,
                                                                                            float_format="%.3f"))

    def follow(*_):  # the explorer's pick becomes the atom to install
        ec = explorer.controls
        if ec["atom"].value is None:
            return
        cell_w.value, atom_w.value, mode_w.value = ec["cell"].value, int(ec["atom"].value), "atom"
        picked.value = (f"<i>atom {atom_w.value} of {_cell_name(cell_w.value)} from the explorer; press Run to "
                        "install it</i>")

    run = _shows_errors(view, run)
    run_w.on_click(run)
    if explorer is not None:
        if explorer.controls["atom"].value is not None and explorer.controls["cell"].value == cell_w.value:
            atom_w.value = int(explorer.controls["atom"].value)  # the atom the explorer shows first
        follow = _shows_errors(picked, follow)
        explorer.controls["atom"].observe(follow, names="value")
        explorer.controls["cell"].observe(follow, names="value")
    run()
    box = W.VBox([W.HTML(SNAPSHOT), prompt_w, W.HBox([cell_w, mode_w]), W.HBox([target_w, atom_w]), picked,
                  W.HBox([last_w, m_w, run_w]), view])
    box.controls = dict(prompt=prompt_w, cell=cell_w, mode=mode_w, target=target_w, atom=atom_w, last=last_w, m=m_w,
                        run=run_w, picked=picked, view=view)
    return _name_controls(box, "install")
