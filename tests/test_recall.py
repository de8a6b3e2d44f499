"""The recall task (writesae.recall), its training batches, and the recall chapter's measurements
(writesae.experiments.recall) against independent recomputations."""
import numpy as np
import pandas as pd
import pytest
import torch

from writesae import embedded_train, pipeline, recall
from writesae.experiments import firings as _firings
from writesae.experiments import recall as rx
from writesae.experiments import substitution as sub
from writesae.hosts import EMBEDDED_DIR, Edit, load_host


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED_DIR)


@pytest.fixture(scope="module")
def voc(tok):
    return recall.vocab(tok)


@pytest.fixture(scope="module")
def host():
    return pipeline.host("embedded:gdn", "cpu")


def test_vocab_words_are_single_distinct_tokens(tok, voc):
    assert len(voc.keys) == 32 and len(voc.values) == 32
    assert not set(voc.keys) & set(voc.values) and len(set(voc.keys)) == 32
    for t in list(voc.keys[:3]) + list(voc.values[:3]):
        assert tok.encode(tok.decode([int(t)]), add_special_tokens=False) == [int(t)]


def test_vocab_refuses_a_tokenizer_without_the_words():
    class Bytes:  # every word splits into several tokens
        def encode(self, s, add_special_tokens=False):
            return list(s.encode())

    with pytest.raises(ValueError, match=r"only 0 keys and 0 values are single tokens"):
        recall.vocab(Bytes())


def test_passage_ground_truth(voc, tok):
    rng = np.random.default_rng(3)
    gap = np.arange(100, 117)
    p = recall.passage(voc, rng, 5, gap)
    assert np.array_equal(p.ids[p.write_at], p.values) and np.array_equal(p.ids[p.write_at - 1], p.keys)
    assert np.array_equal(p.ids[p.ask_at], p.keys) and np.array_equal(p.ids[p.ask_at + 1], p.values)
    assert len(set(p.keys)) == 5 and len(set(p.values)) == 5
    assert (p.ask_at - p.write_at > len(gap)).all()
    assert not np.array_equal(np.argsort(p.ask_at), np.arange(5))  # asked in another order (seed 3)
    text = tok.decode(p.ids[:p.write_at[1] + 2].tolist())
    assert text.startswith(" Remember:") and text.count(",") == 2
    with pytest.raises(ValueError, match="n_pairs must be between 1 and 32"):
        recall.passage(voc, rng, 0, gap)


def test_window_masks_exactly_the_answers(voc):
    prose = np.random.default_rng(0).integers(100, 8000, 20_000)
    toks, mask = recall.window(voc, prose, np.random.default_rng(1), 513, 8, 64)
    assert toks.shape == (513,) and mask.shape == (513,) and mask.sum() > 8
    at = np.flatnonzero(mask)
    assert np.isin(toks[at], voc.keys).all() and np.isin(toks[at + 1], voc.values).all()
    # every masked key's value is the one stated for it earlier in the window
    for i in at:
        stated = np.flatnonzero(toks[:i - 1] == toks[i])
        assert toks[stated[-1] + 1] == toks[i + 1]


def test_training_batches_are_fixed_by_step_and_grow(voc):
    data = np.random.default_rng(0).integers(100, 8000, 50_000).astype(np.uint16)
    x, m = embedded_train.recall_batch(voc, data, 7, 2400, bs=2, seq=128)
    y, n = embedded_train.recall_batch(voc, data, 7, 2400, bs=2, seq=128)
    assert x.shape == (2, 129) and m.shape == (2, 128) and torch.equal(x, y) and torch.equal(m, n)
    assert np.isin(x[:, 1:][m].numpy(), voc.values).all()
    assert embedded_train.recall_level(0, 2400) == (2, 16)
    assert embedded_train.recall_level(1200, 2400) == (8, 256) == embedded_train.recall_level(10 ** 6, 2400)
    assert embedded_train.recall_level(600, 2400) == (5, 136)


def test_heldout_passages_are_fixed_and_spread(voc):
    prose = np.random.default_rng(0).integers(100, 8000, 20_000)
    a, b = recall.heldout(voc, prose, 6), recall.heldout(voc, prose, 6)
    assert all(np.array_equal(p.ids, q.ids) for p, q in zip(a, b))
    d = np.array([min(p.ask_at - p.write_at) for p in a])
    assert (np.diff(d) > 0).all()  # gaps 0 .. 256 spread evenly


def test_answers_read_the_models_prediction_at_the_question(host):
    ps = rx.passages(host, 3, n_pairs=2, max_gap=20)
    df = rx.answers(host, ps, batch=2)
    assert len(df) == 6
    r = df.iloc[4]
    lp = host.logits(torch.from_numpy(ps[r.seq].ids)[None]).log_softmax(-1)[0, r.ask_at]
    assert r.p_value == pytest.approx(float(lp[r.value].exp()), rel=1e-4)
    assert r.correct == (int(lp.argmax()) == r.value)
    t = rx.by_distance(df.assign(correct=[True, False] * 3), edges=(0, 1000))
    assert t.loc[0, "n"] == 6 and t.loc[0, "accuracy"] == 0.5 and t.loc[0, "lo"] < 0.5 < t.loc[0, "hi"]


def test_influence_is_the_kl_of_an_independent_deletion(host):
    ps = rx.passages(host, 1, n_pairs=2, max_gap=10)
    inf = rx.influence(host, ps, cells=[(5, 2), (0, 1)], offsets=(-1, 0))
    assert len(inf) == 2 * 2 * 2 and set(inf["token"]) == {"key", "value"}
    ids = torch.from_numpy(ps[0].ids)[None]
    base = host.logits(ids)
    for r in inf.itertuples():
        pos = ps[0].write_at[r.pair] + r.offset
        edited = host.trace(ids, cells=[(r.layer, r.head)], edits=[Edit(0, r.layer, r.head, int(pos), "delete")]).logits
        lp, lb = edited[0, ps[0].ask_at[r.pair]].double().log_softmax(-1), base[0, ps[0].ask_at[r.pair]].double().log_softmax(-1)
        want = float((lp.exp() * (lp - lb)).sum())
        assert abs(r.kl - want) <= 1e-6 + 1e-3 * want
        assert r.hit == (int(lp.argmax()) == ps[0].values[r.pair])
    assert (inf["kl"] > 0).any()
    s = rx.influence_summary(inf)
    assert len(s) == 4 and (s["n"] == 2).all() and list(s["median_kl"]) == sorted(s["median_kl"], reverse=True)


@pytest.fixture(scope="module")
def sae(host, tmp_path_factory):
    return pipeline.sae(host, (5, 2), n_feat=32, k=4, epochs=1, root=tmp_path_factory.mktemp("cache"),
                        data=dict(n_windows=8, window=64, positions_per_seq=16), progress=False)


def test_substitution_reads_the_answer_and_keeps_score(host, sae):
    ps = rx.passages(host, 2, n_pairs=2, max_gap=12)
    sites = rx.sites(host, sae, (5, 2), ps)
    assert len(sites) + sites.attrs["unfired"] == 4
    assert (sites["pos"] == sites["write_at"]).all() and (sites["answer"] == sites["ask_at"]).all()
    df = sub.substitute(host, sae, rx.padded(ps), sites, reads=("answer", "next"), conditions=("atom", "delete"))
    ans = df[df["read"] == "answer"].reset_index(drop=True)
    assert {"hit_atom", "hit_delete"} <= set(df.columns)
    ids = rx.padded(ps)
    base = host.logits(ids)
    for r in ans.itertuples():  # deletion's KL at the answer, recomputed with an independent edited forward
        edited = host.trace(ids[r.seq:r.seq + 1], cells=[(5, 2)], edits=[Edit(0, 5, 2, r.pos, "delete")]).logits
        lp, lb = edited[0, r.answer].double().log_softmax(-1), base[r.seq, r.answer].double().log_softmax(-1)
        want = float((lp.exp() * (lp - lb)).sum())
        assert abs(r.kl_delete - want) <= 1e-6 + 1e-3 * want
        assert r.hit_delete == (int(lp.argmax()) == r.target)
    with pytest.raises(ValueError, match="'answer' needs an answer column"):
        sub.substitute(host, sae, ids, sites.drop(columns="answer"), reads=("answer",))


def test_alignment_cosines_and_purity(host, sae, monkeypatch):
    ps = rx.passages(host, 4, n_pairs=4, max_gap=8)
    sites = rx.sites(host, sae, (5, 2), ps)
    monkeypatch.setattr(_firings, "TRACE_BYTES", 1)  # one passage traced at a time (large states): the same k and v
    traced, real = [], host.trace
    monkeypatch.setattr(host, "trace", lambda x, **kw: traced.append(len(x)) or real(x, **kw))
    per, atoms = rx.alignment(host, sae, (5, 2), sites, ps)
    assert traced == [1, 1, 1, 1] and len(per) == len(sites) and sites["seq"].nunique() > 1
    for c in ("cos_k", "cos_v", "cos_k_word", "cos_v_word", "cos_k_other", "cos_v_other"):
        assert ((per[c] >= 0) & (per[c] <= 1 + 1e-6)).all()
    tr = host.trace(rx.padded(ps), cells=[(5, 2)], logits=False)[(5, 2)]
    u_, w_ = (x.detach().float() for x in _firings._rank1_factors(sae))
    for i in (0, len(per) - 1):  # the factors against the k and v the model wrote at that site
        r, s, p = per.iloc[i], int(sites.loc[i, "seq"]), int(sites.loc[i, "pos"])
        k, v, u, w = tr.k[s, p], tr.v[s, p], u_[int(r.feature)], w_[int(r.feature)]
        assert r.cos_v == pytest.approx(float(abs(w @ v) / (w.norm() * v.norm())), abs=1e-5)
        assert r.cos_k == pytest.approx(float(abs(u @ k) / (u.norm() * k.norm())), abs=1e-5)
    assert ((atoms["key_purity"] >= 0) & (atoms["key_purity"] <= 1)).all()


def test_recall_models_load_by_name_or_say_how_to_train_them(tmp_path, monkeypatch):
    import writesae.hosts as hosts

    monkeypatch.setattr(hosts, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"embedded_train --family gdn --task recall"):
        load_host("embedded:gdn-recall")


def test_without_a_recall_model_the_chapter_runs_on_its_baseline(tmp_path, capsys):
    from writesae.experiments import zoo

    runs = rx.setup({"gdn": str(tmp_path / "no_such_model")}, {"gdn": "embedded:gdn"}, n_passages=2,
                    influence_passages=1, window=32, n_windows=4, positions_per_seq=4, eval_windows=1, root=tmp_path)
    host = pipeline.host("embedded:gdn", "cpu")
    assert [(m.kind, m.cell) for m in runs] == [("zoo", zoo.choose_cells(zoo.memory(host), 1)[0])]
    assert "GDN (recall, " in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="none of the chapter's models is here"):
        rx.setup({"gdn": str(tmp_path / "no_such_model")}, {}, n_passages=2)


def test_recall_gdn_is_pure_gated_deltanet_from_the_zoo_weights():
    """The recall GDN has no attention layer and 2 heads of 64 x 64 per layer (the zoo's 4 of 32 x 32: the same
    widths); it starts from the zoo GDN's weights where they fit: the two layers that were attention start fresh,
    and in the others only the per-head gates and norm (named)."""
    model = embedded_train.build_model("gdn", "recall")
    assert set(model.config.layer_types) == {"linear_attention"}
    own = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = embedded_train.load_ckpt_weights(model, embedded_train.OUT / "gdn", partial=True)
    assert fresh == [f"model.layers.{i}.linear_attn" for i in range(8)]
    kept = {k.split(".", 4)[-1] for k, v in model.state_dict().items() if k.startswith("model.layers.2.linear_attn")
            and torch.equal(v, own[k])}
    assert kept == {"in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias", "norm.weight"}
    assert model.model.layers[2].linear_attn.A_log.shape == (2,)
    zoo = embedded_train.build_model("gdn")
    embedded_train.load_ckpt_weights(zoo, embedded_train.OUT / "gdn")
    a, b = model.state_dict(), zoo.state_dict()
    assert torch.equal(a["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(a["model.layers.2.linear_attn.in_proj_qkv.weight"], b["model.layers.2.linear_attn.in_proj_qkv.weight"])
    x = torch.randint(0, 8000, (1, 12))
    assert model(input_ids=x).logits.shape == (1, 12, embedded_train.VOCAB)  # no cache asked of a model without attention
    with pytest.raises(ValueError, match="does not fit"):
        embedded_train.load_ckpt_weights(embedded_train.build_model("gdn", "recall"), embedded_train.OUT / "gdn")


def test_the_tested_head_is_one_both_models_have(monkeypatch):
    """The recall GDN's strongest head may sit in a former attention layer, which its zoo member lacks: the pair
    is tested at the strongest (head, pair token) they share; a given head wins, at its strongest token; without a
    recall model, the zoo's choice at the value token."""
    from types import SimpleNamespace

    from writesae.hosts import Cell
    from writesae.experiments import zoo as _zoo

    pure = SimpleNamespace(cells=[Cell(l, h, 4, 4) for l in range(4) for h in range(2)])
    hybrid = SimpleNamespace(cells=[Cell(l, h, 4, 4) for l in (0, 1, 2) for h in range(2)])
    table = pd.DataFrame(dict(cell=["L3H0", "L1H1", "L1H1", "L2H0", "L2H0", "L0H0"],
                              token=["value", "separator", "value", "key", "value", "value"],
                              recall_influence=[0.9, 0.5, 0.3, 0.01, 0.02, 0.1]))
    asked = []
    monkeypatch.setattr(rx, "cell_influence", lambda host, seed, cells: asked.append(cells) or table)
    assert rx._tested_site([("recall", pure), ("zoo", hybrid)], None, 0) == ((1, 1), "separator")
    assert rx._tested_site([("recall", pure)], None, 0) == ((3, 0), "value")
    assert rx._tested_site([("recall", pure), ("zoo", hybrid)], "L2H0", 0) == ((2, 0), "value")
    assert asked == [None, None, [(2, 0)]]  # a given head: only its influence is measured
    with pytest.raises(ValueError, match="L3H0 is not a head of every model of the pair"):
        rx._tested_site([("recall", pure), ("zoo", hybrid)], "L3H0", 0)
    monkeypatch.setattr(_zoo, "memory", lambda host: "mem")
    monkeypatch.setattr(_zoo, "choose_cells", lambda mem, n: [(0, 1)])
    assert rx._tested_site([("zoo", hybrid)], None, 0) == ((0, 1), "value")


def test_cell_influence_reads_every_token_from_the_card_or_measures_it(host, monkeypatch, tmp_path):
    """cell_influence: the recall export's three tokens per cell from metrics.json; without them (an older card)
    measured at key, value and separator, the same numbers as influence_summary."""
    import json

    from writesae.experiments import zoo as _zoo

    mem = [dict(cell=c.key, recall_influence=0.2 + i, recall_influence_key=0.1, recall_influence_separator=0.3)
           for i, c in enumerate(host.cells)]
    (tmp_path / "metrics.json").write_text(json.dumps(dict(memory=mem)))
    monkeypatch.setattr(_zoo, "metrics_path", lambda name: tmp_path / "metrics.json")
    got = rx.cell_influence(host)
    assert len(got) == 3 * len(host.cells) and set(got["token"]) == {"key", "value", "separator"}
    assert float(got[(got["cell"] == host.cells[1].key) & (got["token"] == "value")]["recall_influence"].iloc[0]) == 1.2
    (tmp_path / "metrics.json").write_text(json.dumps(dict(memory=[dict(cell=m["cell"], recall_influence=0.2)
                                                                   for m in mem])))
    monkeypatch.setattr(rx.cache, "cached_table", lambda name, key, fn: fn())
    measured = rx.cell_influence(host, n_passages=1)
    want = rx.influence_summary(rx.influence(host, rx.passages(host, 1), offsets=(-1, 0, 1)))
    assert sorted(measured["token"].unique()) == ["key", "separator", "value"] and len(measured) == len(want)
    merged = measured.merge(want, on=["cell", "token"])
    assert np.allclose(merged["recall_influence"], merged["median_kl"])
    one = rx.cell_influence(host, cells=["L1H0"], n_passages=1)  # one head measured alone: the same numbers
    assert set(one["cell"]) == {"L1H0"} and len(one) == 3
    both = one.merge(measured, on=["cell", "token"])
    np.testing.assert_allclose(both["recall_influence_x"], both["recall_influence_y"], rtol=1e-4, atol=1e-8)
    (tmp_path / "metrics.json").write_text(json.dumps(dict(memory=mem)))  # from the card: only that head's rows
    c1 = host.cells[1]
    assert rx.cell_influence(host, cells=[(c1.layer, c1.head)])["recall_influence"].tolist() == [0.1, 1.2, 0.3]


def test_long_memory_init_spans_long_decays():
    """The recall GDN's dt_bias re-initialised: softplus(dt_bias) log-uniform in [1e-3, 1e-1] (decays at a
    zero gate input from exp(-A 0.1) to exp(-A 0.001)), seeded; the zoo's dt_bias (about 1) forgets at once."""
    model = embedded_train.build_model("gdn", "recall")
    embedded_train.load_ckpt_weights(model, embedded_train.OUT / "gdn", partial=True)
    zoo_dt = torch.nn.functional.softplus(model.model.layers[0].linear_attn.dt_bias.detach())
    assert (zoo_dt > 1.0).all()
    embedded_train.long_memory_init(model)
    dts = torch.cat([torch.nn.functional.softplus(l.linear_attn.dt_bias.detach()) for l in model.model.layers])
    assert ((dts >= 1e-3 * 0.999) & (dts <= 1e-1 * 1.001)).all() and dts.max() / dts.min() > 10
    again = embedded_train.build_model("gdn", "recall")
    embedded_train.long_memory_init(again)
    assert torch.equal(again.model.layers[5].linear_attn.dt_bias, model.model.layers[5].linear_attn.dt_bias)
