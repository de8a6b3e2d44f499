"""Widgets build on the tiny host (token ids, no tokenizer), their callbacks run, and a headless kernel
stores a state whose HTML shows the first view."""
import json

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from writesae import widgets
from writesae.hosts import load_host
from writesae.sae import SAEConfig, WriteSAE

torch.set_num_threads(1)  # tiny models: extra threads only spin against the shared cores
CELL = (2, 3)


@pytest.fixture(scope="module")
def setup():
    host = load_host("tiny")
    ids = torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(0))
    sae = WriteSAE(SAEConfig("bilinear", host.d_k, host.d_v, n_feat=32, k=4), seed=0)
    sae.set_mean(host.trace(ids, cells=[CELL])[CELL].state.flatten(0, 1).mean(0))
    return host, ids, sae


def test_atom_explorer_shows_and_follows_the_chosen_atom(setup):
    host, ids, sae = setup
    box = widgets.atom_explorer(host, {CELL: sae}, ids, n_contexts=3)
    c = box.controls
    first = c["view"].value
    assert c["atom"].value == c["atom"].options[0][1]
    assert "<img" in first and first.count("<li>") == 3 and 'background:#fd8' in first
    other = c["atom"].options[5][1]
    c["atom"].value = other
    assert c["view"].value != first and f"atom {other}" not in first
    c["sort"].value = "feature"
    assert [v for _, v in c["atom"].options] == sorted(v for _, v in c["atom"].options)
    c["cls"].value = "register"  # no classes given: nothing matches, and it says so
    assert c["atom"].options == () and "no atom" in c["view"].value


def test_atom_explorer_draws_its_first_atom_once(setup, monkeypatch):
    from writesae.plots import interventions as plots

    host, ids, sae = setup
    drawn = []
    real = plots.atom_figure
    monkeypatch.setattr(plots, "atom_figure", lambda *a, **k: drawn.append(k.get("title")) or real(*a, **k))
    box = widgets.atom_explorer(host, {CELL: sae}, ids, n_contexts=2, n_kl=0)
    assert len(drawn) == 1 and drawn[0].endswith(f"atom {box.controls['atom'].value}")


def test_atom_explorer_opens_on_the_strongest_register(setup):
    import pandas as pd

    from writesae.experiments import firings as F, partition as P

    host, ids, sae = setup
    fired = F.collect(host, sae, CELL, ids)
    atoms = P.atom_table(fired)
    regs = atoms.nsmallest(3, "cos")["feature"].tolist()  # any three atoms called registers
    classes = pd.DataFrame({"feature": atoms["feature"], "class": ["register" if f in regs else "bundle"
                                                                   for f in atoms["feature"]]})
    box = widgets.atom_explorer(host, {CELL: sae}, ids, firings={CELL: fired}, classes={CELL: classes}, n_kl=0)
    best = atoms[atoms["feature"].isin(regs)].nlargest(1, "cos")["feature"].item()
    assert box.controls["cls"].value == "register" and box.controls["atom"].value == best


def test_tokens_read_as_text_without_escapes():
    class Tok:
        def decode(self, ids):
            return {1: "\n\n", 2: " water"}[ids[0]] if len(ids) == 1 else "a\nb<c"

    class Host:
        tokenizer = Tok()

    assert widgets._tok(Host(), 1) == "'↵↵'" and widgets._tok(Host(), 2) == "' water'"
    assert widgets._text(Host(), [3, 4]) == "a↵b&lt;c"


def test_live_install_runs_and_magnitude_zero_changes_nothing(setup):
    host, _, sae = setup
    box = widgets.live_install(host, {CELL: sae}, prompt="5 17 42 8 23 61 9 33", target="7", n_new=6)
    c = box.controls
    assert "<table" in c["view"].value and "native" in c["view"].value
    c["m"].value = 0.0
    c["run"].click()
    rows = c["view"].value.split("<tr>")[1:]  # the body rows: native, edited
    native, edited = (r.split("<td>")[2].split("</td>")[0] for r in rows)
    assert native == edited and len(native.split()) == 6
    c["mode"].value = "atom"
    c["m"].value = 8.0
    c["run"].click()
    assert "atom 0" in c["view"].value


def test_widgets_in_a_headless_kernel_keep_their_state():
    code = (
        "import torch\ntorch.set_num_threads(1)\n"
        "from writesae import widgets\nfrom writesae.hosts import load_host\nfrom writesae.sae import SAEConfig, WriteSAE\n"
        "host = load_host('tiny')\nids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))\n"
        "sae = WriteSAE(SAEConfig('bilinear', 16, 8, n_feat=16, k=2), seed=0)\n"
        "box = widgets.atom_explorer(host, {(2, 3): sae}, ids)\nbox"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code),
                                         nbformat.v4.new_code_cell("widgets.live_install(host, {(2, 3): sae}, n_new=4)")])
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=True).execute()
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    html = [s["state"].get("value", "") for s in state.values() if s["model_name"] == "HTMLModel"]
    assert any("<img" in h for h in html) and any("<table" in h and "native" in h for h in html)
    views = [o for c in nb.cells for o in c.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 2
    assert json.dumps(state)  # serialisable as saved


def test_bad_input_shows_a_message_inside_the_widget(setup, monkeypatch):
    host, _, sae = setup
    box = widgets.live_install(host, {CELL: sae}, prompt="5 17 42 8 23 61 9 33", target="7", n_new=4)
    c = box.controls
    c["target"].value = "7 8"  # two tokens: refused, not cut to the first
    c["run"].click()
    assert "writesae-error" in c["view"].value and "is 2 tokens (7, 8)" in c["view"].value
    c["target"].value = "water"  # no tokenizer: token ids only
    c["run"].click()
    assert "has no tokenizer" in c["view"].value
    c["target"].value, c["mode"].value, c["atom"].value = "7", "atom", 32  # the SAE has atoms 0..31
    c["run"].click()
    assert "atom 32 is out of range" in c["view"].value and "0..31" in c["view"].value
    c["atom"].value = 31
    c["run"].click()
    assert "atom 31 x m" in c["view"].value and "writesae-error" not in c["view"].value

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(widgets.iv, "live_install", broken)
    c["run"].click()  # an unexpected error: shown with its traceback, not lost in the kernel log
    assert "RuntimeError: boom" in c["view"].value and "traceback" in c["view"].value


def test_explorer_shows_kls_and_hands_its_atom_to_the_install(setup, tmp_path, monkeypatch):
    host, ids, sae = setup
    monkeypatch.setenv("WRITESAE_CACHE", str(tmp_path))
    ex = widgets.atom_explorer(host, {CELL: sae}, ids, n_contexts=2, n_kl=2, kl_key={"test": 1})
    view = ex.controls["view"].value
    assert "substitution KL at its 2 strongest firings" in view and "kl delete" in view
    rows = view.split("kl random")[1].split("top firings")[0].split("<tr>")[1:]  # next, final, mean
    assert [r.split("<td>")[1].split("</td>")[0] for r in rows] == ["next", "final", "mean"]
    assert len(list((tmp_path / "explorer_kls").glob("*/table.csv"))) == 1  # cached on disk
    inst = widgets.live_install(host, {CELL: sae}, prompt="5 17 42 8", target="7", n_new=2, explorer=ex)
    assert inst.controls["mode"].value == "target direction"  # the mode switches on a pick only
    assert inst.controls["atom"].value == ex.controls["atom"].value == ex.controls["atom"].options[0][1]
    pick = ex.controls["atom"].options[2][1]
    ex.controls["atom"].value = pick
    assert (inst.controls["atom"].value, inst.controls["mode"].value, inst.controls["cell"].value) == (pick, "atom", CELL)
    assert f"atom {pick} of L2H3" in inst.controls["picked"].value
    assert "writesae-snapshot" in ex.children[0].value and "display:none" in ex.children[0].value


def test_a_multi_token_target_is_refused_with_its_pieces():
    """With a tokenizer: "water" is two tokens, " water" one; the message names both (escaped once)."""
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] if text == " water" else [2, 3]}

        def decode(self, ids):
            return {1: " water", 2: "w", 3: "ater"}[ids[0]]

    host = type("H", (), {"tokenizer": Tok(), "name": "fake", "vocab_size": 4})()
    with pytest.raises(ValueError) as err:
        widgets._one_token(host, "water")
    assert str(err.value) == ("target 'water' is 2 tokens ('w', 'ater'); the install writes one token's direction, so "
                              "type a single token; ' water', with a leading space, is one token")
    assert widgets._one_token(host, " water") == 1
    assert "&amp;#x27;" not in widgets._error(str(err.value))
