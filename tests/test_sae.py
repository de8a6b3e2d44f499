import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from writesae.data import ShardWriter, TensorStates
from writesae.experiments.ground_truth import planted, recovery
from writesae.sae import SAEConfig, WriteSAE, convert_reference_checkpoint
from writesae import train as T
from writesae.train import TIMING_KEYS, evaluate_sae, lr_at, read_log, train_on_tensors, train_sae

DK, DV, N = 6, 5, 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small matmuls: one thread is fastest, and the machine is shared (oversubscription is slow).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sae_of(variant="bilinear", activation="topk", seed=0, **kw):
    cfg = SAEConfig(variant, DK, DV, n_feat=N, k=4, activation=activation, rank=kw.pop("rank", 2 if variant == "rank" else 1), **kw)
    return WriteSAE(cfg, seed=seed)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant,formula",
    [
        ("flat", lambda n, dk, dv, r: 2 * n * dk * dv + n + dk * dv),
        ("bilinear", lambda n, dk, dv, r: 2 * n * (dk + dv) + n + dk * dv),
        ("tied", lambda n, dk, dv, r: n * (dk + dv) + n + dk * dv),
        ("matrix", lambda n, dk, dv, r: n * dk * dv + n * (dk + dv) + n + dk * dv),
        ("bilinear_flat", lambda n, dk, dv, r: n * (dk + dv) + n * dk * dv + n + dk * dv),
        ("rank", lambda n, dk, dv, r: 2 * r * n * (dk + dv) + n + dk * dv),
    ],
)
def test_parameter_counts(variant, formula):
    sae = sae_of(variant)
    count = sum(p.numel() for p in sae.parameters())
    assert count == formula(N, DK, DV, sae.cfg.rank)
    jump = sae_of(variant, activation="jumprelu")
    assert sum(p.numel() for p in jump.parameters()) == count + N  # one threshold per atom


def test_rank1_decoder_cost_per_atom():
    flat, bil = sae_of("flat"), sae_of("bilinear_flat")
    # same bilinear encoder, decoders differ: dense d_k d_v per atom vs rank-1 d_k + d_v
    assert sum(p.numel() for p in sae_of("bilinear").parameters()) - sum(p.numel() for p in bil.parameters()) == N * (DK + DV) - N * DK * DV
    assert flat.W_dec.shape == (N, DK * DV)


def test_bilinear_encoder_is_matched_filter():
    sae = sae_of("bilinear")
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.mean.normal_()
        sae.enc_v.mul_(torch.rand(N, 1, 1) + 0.5)
    S = torch.randn(7, DK, DV)
    X = S - sae.mean
    want = torch.einsum("nk,bkv,nv->bn", sae.enc_v[:, 0], X, sae.enc_w[:, 0]) + sae.b_enc
    torch.testing.assert_close(sae.pre_acts(S), want)  # B=7 > d_v: materialised-atom path
    torch.testing.assert_close(sae.pre_acts(S[:2]), want[:2])  # B=2 < d_v: X @ W^T path
    rank = sae_of("rank")
    want = torch.einsum("nrk,bkv,nrv->bn", rank.enc_v, S, rank.enc_w) + rank.b_enc
    torch.testing.assert_close(rank.pre_acts(S), want)
    torch.testing.assert_close(rank.pre_acts(S[:1]), want[:1])


@pytest.mark.parametrize("variant", ["bilinear", "flat", "rank", "tied"])
def test_sparse_decode_equals_dense(variant):
    sae = sae_of(variant)
    S = torch.randn(9, DK, DV)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    out = sae(S, dead_mask=dead)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sae.zero_grad()
    sae.cfg.sparse_decode = False
    dense = sae(S, dead_mask=dead)
    dense.loss.backward()
    torch.testing.assert_close(dense.recon, out.recon)
    torch.testing.assert_close(dense.auxk_loss, out.auxk_loss)
    for k, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], atol=1e-6, rtol=1e-5)


RULES = {"topk": {}, "batchtopk": {}, "jumprelu": dict(jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.5)}


@pytest.mark.parametrize("activation", list(RULES))
@pytest.mark.parametrize("variant", ["bilinear", "flat", "rank", "tied", "matrix"])
@pytest.mark.parametrize("n_dead", [N // 3, 2 * N // 3])
def test_sparse_encoder_gradient_equals_dense(variant, activation, n_dead):
    """Every sparsity rule's gradient through the selected entries equals autograd through all n_feat, AuxK's too:
    its dead atoms as shared columns (n_dead <= k_aux) or its per-row top k_aux (n_dead > k_aux)."""
    sae = sae_of(variant, activation=activation, k_aux=N // 2, **RULES[activation])
    with torch.no_grad():
        sae.b_enc.normal_()
    S = torch.randn(9, DK, DV)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    runs = []
    for sparse in (True, False):
        sae.cfg.sparse_encoder_grad = sparse
        sae.zero_grad()
        if activation == "batchtopk":
            sae.threshold.fill_(-1.0)  # the same threshold estimate in both runs
        out = sae(S, dead_mask=dead)
        out.loss.backward()
        runs.append((out, {k: p.grad.clone() for k, p in sae.named_parameters()}))
    (a, ga), (b, gb) = runs
    assert torch.equal(a.top_indices, b.top_indices) and float(a.auxk_loss) > 0
    torch.testing.assert_close(a.loss, b.loss)
    for k in gb:
        assert float(gb[k].abs().max()) > 0, k  # every parameter gets a gradient, so the check means something
        torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-5)


def test_loss_gradient_reaches_the_input_and_recon_false_leaves_out_the_metrics():
    """The squared error's own backward (one pass) gives the loss's true gradient, to the states too (gradcheck in
    float64 with autograd through the encoder; AuxK off: its target, the residual, is detached on purpose)."""
    sae = WriteSAE(SAEConfig("bilinear", DK, DV, n_feat=N, k=4, sparse_encoder_grad=False), dtype=torch.float64, seed=0)
    S = torch.randn(5, DK, DV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda S: sae(S).loss, (S,))
    out = sae(S.detach(), recon=False)
    full = sae(S.detach())
    assert out.recon is None and out.fvu is None and out.l0 is None
    assert torch.equal(out.loss, full.loss) and torch.equal(out.top_indices, full.top_indices) and full.fvu > 0


def test_forward_fields_and_atoms():
    sae = sae_of("bilinear")
    S = torch.randn(8, DK, DV)
    out = sae(S)
    assert out.recon.shape == (8, DK, DV) and out.top_acts.shape == (8, 4) and out.top_indices.shape == (8, 4)
    assert (out.top_acts >= 0).all() and out.l0.item() <= 4
    manual = sae.mean + sae.b_dec + torch.einsum("bj,bjkv->bkv", out.top_acts, sae.atoms(out.top_indices.flatten()).reshape(8, 4, DK, DV))
    torch.testing.assert_close(out.recon, manual)
    torch.testing.assert_close(sae.decode(out.top_acts, out.top_indices), out.recon)
    x = S - sae.mean
    torch.testing.assert_close(out.fvu, (S - out.recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    torch.testing.assert_close(out.mse, (S - out.recon).pow(2).mean())
    torch.testing.assert_close(sae.atom(3), torch.outer(sae.v[3], sae.w[3]))
    assert sae.v.shape == (N, DK) and sae.w.shape == (N, DV)
    r2 = sae_of("rank")
    assert r2.v.shape == (N, DK, 2)
    torch.testing.assert_close(r2.atom(1), r2.v[1] @ r2.w[1].T)
    with pytest.raises(ValueError, match="dense decoder"):
        sae_of("flat").v
    with pytest.raises(ValueError, match=r"\(B, 6, 5\)"):
        sae(torch.randn(DK, DV))


def test_normalize_and_resample():
    sae = sae_of("bilinear")
    with torch.no_grad():
        sae.dec_v.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.dec_v.norm(dim=-1), torch.ones(N, 1))
    before = {k: p.detach().clone() for k, p in sae.named_parameters()}
    S = torch.randn(32, DK, DV)
    dead = torch.tensor([2, 5, 11])
    sae.resample(dead, S, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(N, dtype=torch.bool)
    keep[dead] = False
    for k, p in sae.named_parameters():
        if p.shape[0] == N:
            assert torch.equal(p[keep], before[k][keep]), k
    assert not torch.allclose(sae.dec_v[dead], before["dec_v"][dead])
    torch.testing.assert_close(sae.dec_w[dead].norm(dim=-1), torch.ones(3, 1))
    # the new encoder atoms are 0.2 x the mean norm of the others
    norms = sae.encoder_norms()
    torch.testing.assert_close(norms[dead], 0.2 * norms[keep].mean().expand(3))


def test_auxk_trains_dead_atoms_only_when_dead():
    sae = sae_of("bilinear")
    S = torch.randn(16, DK, DV)
    assert sae(S).auxk_loss.item() == 0.0
    out = sae(S)
    dead = torch.ones(N, dtype=torch.bool)
    dead[out.top_indices.unique()] = False
    out = sae(S, dead_mask=dead)
    assert out.auxk_loss.item() > 0
    sae.zero_grad()
    (out.auxk_loss).backward()
    g = sae.dec_v.grad.flatten(1).norm(dim=1)
    assert (g[~dead] == 0).all() and (g[dead] > 0).sum() >= min(sae.cfg.k_aux, int(dead.sum())) - 1


@pytest.mark.parametrize("variant", ["bilinear", "flat", "rank"])
def test_auxk_by_columns_equals_gathered_rows(variant):
    """With at most k_aux dead atoms AuxK decodes them as columns shared by every row (one dense product); its loss
    equals the per-row gathered decode of the same atoms (the path taken when more than k_aux are dead)."""
    sae = sae_of(variant)
    S = torch.randn(16, DK, DV)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[1, 7, 8, 30]] = True
    out = sae(S, dead_mask=dead)
    with torch.no_grad():
        x = (S - sae.mean) / sae.scale
        pre = sae._pre(x)
        idx = dead.nonzero().flatten().expand(len(S), -1)
        rec = sae._combine(out.top_acts / sae.scale, out.top_indices) + sae.b_dec
        e_hat = sae._combine(F.relu(pre.gather(1, idx)), idx)
    assert float(out.auxk_loss) > 0
    torch.testing.assert_close(out.auxk_loss, (e_hat - (x - rec)).pow(2).mean())


def test_jumprelu_l0_is_count_above_threshold_and_thresholds_learn():
    sae = sae_of("bilinear", activation="jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.5)
    S = torch.randn(64, DK, DV)
    pre = sae.pre_acts(S)
    out = sae(S)
    assert out.l0.item() == pytest.approx((pre > 0.5).sum(-1).float().mean().item())
    acts = torch.zeros(64, N).scatter(1, out.top_indices, out.top_acts)
    torch.testing.assert_close(acts, pre * (pre > 0.5))
    out.loss.backward()
    assert sae.log_threshold.grad.abs().sum() > 0


def test_saved_cfg_and_load_errors(tmp_path):
    sae = sae_of("rank", activation="batchtopk")
    with torch.no_grad():
        sae.mean.normal_()
        sae.threshold.fill_(0.25)
    sae.save(tmp_path / "L2H1", cell="L2H1", model="tiny-gdn", train={"lr": 1e-3}, metrics={"fvu": 0.5})
    cfg = json.loads((tmp_path / "L2H1" / "cfg.json").read_text())
    assert cfg["variant"] == "rank" and cfg["d_k"] == DK and cfg["cell"] == "L2H1" and cfg["model"] == "tiny-gdn"
    assert cfg["train"] == {"lr": 1e-3} and cfg["metrics"] == {"fvu": 0.5} and cfg["writesae_version"]
    back = WriteSAE.load(tmp_path / "L2H1", expect_cell=(2, 1), expect_dims=(DK, DV))
    for (k, a), (k2, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    S = torch.randn(5, DK, DV)
    sae.eval(), back.eval()
    assert torch.equal(sae(S).recon, back(S).recon)
    assert back.info["cell"] == "L2H1"
    with pytest.raises(ValueError, match=r"\(d_k, d_v\) = \(6, 5\).*\(8, 8\)"):
        WriteSAE.load(tmp_path / "L2H1", expect_dims=(8, 8))
    with pytest.raises(ValueError, match="trained on L2H1, used on L9H4"):
        WriteSAE.load(tmp_path / "L2H1", expect_cell="L9H4")
    assert list(WriteSAE.load_many(tmp_path)) == ["L2H1"]
    with pytest.raises(FileNotFoundError, match="convert_reference_checkpoint"):
        WriteSAE.load(tmp_path)


class RefDecoder(torch.nn.Module):  # mimics the reference release: ckpt["sae"].decoder.v / .w
    def __init__(self, n, dk, dv):
        super().__init__()
        self.v = torch.nn.Parameter(torch.randn(n, dk))
        self.w = torch.nn.Parameter(torch.randn(n, dv))


class RefSAE(torch.nn.Module):
    def __init__(self, n, dk, dv):
        super().__init__()
        self.decoder = RefDecoder(n, dk, dv)
        self.encoder = RefDecoder(n, dk, dv)
        self.b_enc = torch.nn.Parameter(torch.randn(n))
        self.bias = torch.nn.Parameter(torch.randn(dk, dv))
        self.k = 3


def test_convert_reference_checkpoint(tmp_path):
    ref = RefSAE(N, DK, DV)
    mean = torch.randn(DK, DV)
    torch.save({"sae": ref, "state_mean": mean, "epoch": 7}, tmp_path / "best.pt")
    with pytest.raises(ValueError, match="arbitrary code execution"):
        convert_reference_checkpoint(tmp_path / "best.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    sae = convert_reference_checkpoint(tmp_path / "best.pt", tmp_path / "out", allow_pickle=True, cell=(9, 4))
    back = WriteSAE.load(tmp_path / "out", expect_cell="L9H4")
    assert back.cfg.variant == "bilinear" and back.cfg.k == 3 and back.cfg.n_feat == N
    torch.testing.assert_close(back.atom(7), torch.outer(ref.decoder.v[7], ref.decoder.w[7]).detach())
    torch.testing.assert_close(back.mean, mean)
    torch.testing.assert_close(back.b_enc, ref.b_enc.detach())
    assert not back.info["mean_missing"] and sae.cfg == back.cfg
    # a plain state dict with reference key names, tied encoder, no mean
    sd = {"V_dec": torch.randn(N, 1, DK), "W_dec": torch.randn(N, 1, DV), "b_enc": torch.zeros(N), "bias": torch.zeros(DK, DV)}
    torch.save({"sae": sd}, tmp_path / "b2.pt")
    tied = convert_reference_checkpoint(tmp_path / "b2.pt", tmp_path / "o2", allow_pickle=True)
    assert tied.cfg.variant == "tied" and tied.info["mean_missing"]
    torch.testing.assert_close(tied.w, sd["W_dec"][:, 0])


# -- training ----------------------------------------------------------------------------------
def test_lr_schedule():
    assert lr_at(0, 1000, 3e-4, 3e-5, 50) == pytest.approx(3e-4 / 50)
    assert lr_at(49, 1000, 3e-4, 3e-5, 50) == pytest.approx(3e-4)
    assert lr_at(525, 1000, 3e-4, 3e-5, 50) == pytest.approx((3e-4 + 3e-5) / 2)
    assert lr_at(1000, 1000, 3e-4, 3e-5, 50) == pytest.approx(3e-5)


FAST = dict(batch_size=256, lr=3e-3, warmup=20, progress=False)


def test_planted_dictionary_recovered():
    S, atoms = planted()
    torch.manual_seed(0)
    untrained = WriteSAE(SAEConfig("bilinear", 16, 16, n_feat=128, k=4), seed=0)
    assert recovery(untrained, atoms).median() < 0.5  # the metric is not trivially high
    cfg = SAEConfig("bilinear", 16, 16, n_feat=128, k=4, k_aux=32)
    res = train_on_tensors(S, cfg, epochs=40, **FAST)
    rec = recovery(res.sae, atoms)
    assert rec.median() > 0.9, rec  # measured 0.9999
    assert (rec > 0.9).float().mean() > 0.9  # measured 0.98
    assert res.metrics["fvu"] < 0.1  # measured 0.03
    flat = train_on_tensors(S, SAEConfig("flat", 16, 16, n_feat=128, k=4, k_aux=32), epochs=40, **FAST)
    assert flat.metrics["fvu"] < 0.03  # measured 0.0073
    assert 3.9 < flat.metrics["l0"] <= 4.0  # TopK then ReLU: a non-positive k-th value is not a firing


def test_batchtopk_l0():
    S, _ = planted(n=2048)
    cfg = SAEConfig("bilinear", 16, 16, n_feat=128, k=4, activation="batchtopk", k_aux=32)
    res = train_on_tensors(S, cfg, epochs=40, **FAST)
    sae = res.sae
    sae.train()
    assert sae(S[:256]).l0.item() == pytest.approx(4.0)  # exactly k per state on average in training
    l0 = evaluate_sae(sae, _Tensors(S))["l0"]
    assert 3.6 < l0 < 4.4, l0  # the inference threshold reproduces L0 ~ k (measured 4.01)
    assert res.metrics["l0"] == pytest.approx(l0, rel=0.1)


def test_jumprelu_l0():
    S, _ = planted(n=2048)  # 3 or 4 planted atoms per state: true L0 = 3.5
    l0 = {}
    for coeff in (0.0, 0.1):
        cfg = SAEConfig("bilinear", 16, 16, n_feat=128, k=4, activation="jumprelu", k_aux=32, l0_coeff=coeff,
                        jumprelu_init_threshold=2.5, jumprelu_bandwidth=0.84)  # fmt: skip
        # thresholds in units of the input scale c (RMS of the centred states, 0.119 here): 0.3 and 0.1 raw
        l0[coeff] = train_on_tensors(S, cfg, epochs=40, **FAST).metrics["l0"]
    assert 3.2 < l0[0.1] < 3.8, l0  # the L0 penalty finds the planted sparsity (measured 3.50)
    assert l0[0.0] > l0[0.1] + 0.3, l0  # without it the code is denser (measured 4.10)


class _Tensors:
    def __init__(self, x):
        self.x = x

    def iter_batches(self, batch_size, shuffle=False):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i : i + batch_size]


def test_resume_equals_straight_run(tmp_path, monkeypatch):
    resampled = []
    real = WriteSAE.resample
    monkeypatch.setattr(WriteSAE, "resample", lambda self, dead, *a, **k: resampled.append(len(dead)) or real(self, dead, *a, **k))
    S, _ = planted(n=600, d=6)
    cfg = SAEConfig("bilinear", 6, 6, n_feat=64, k=2, k_aux=8, activation="batchtopk")
    kw = dict(epochs=3, batch_size=32, lr=3e-3, warmup=5, resample_every=7, dead_after=3, renorm_every=4,
              val_every=5, ckpt_every=10, log_every=5, progress=False)  # fmt: skip
    straight = train_on_tensors(S, cfg, tmp_path / "a", **kw)
    assert straight.finished and straight.step == 3 * (480 // 32)
    assert len(resampled) >= 3  # the run exercises resampling (before and after the interruption)
    part = train_on_tensors(S, cfg, tmp_path / "b", max_steps=17, **kw)
    assert not part.finished and part.step == 17
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["step"] == 17
    resumed = train_on_tensors(S, cfg, tmp_path / "b", **kw)
    assert resumed.finished and resumed.step == straight.step and resumed.best_step == straight.best_step
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, t in straight.sae.state_dict().items():
        assert torch.equal(t, resumed.sae.state_dict()[k]), k
    untimed = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}  # noqa: E731
    assert untimed(straight.metrics) == untimed(resumed.metrics)
    assert straight.metrics["steps_per_s"] > 0 and straight.metrics["samples_per_s"] > 0
    # training curves: the interrupted-and-resumed log has exactly the straight run's rows
    assert resumed.log == straight.log == read_log(tmp_path / "b")
    assert [r["step"] for r in straight.log if r["split"] == "train"] == list(range(5, 46, 5))
    assert [r["step"] for r in straight.log if r["split"] == "val"] == list(range(5, 46, 5))
    assert all(0 <= r["dead"] <= 1 and r["fvu"] > 0 and r["l0"] > 0 for r in straight.log)
    train_fvu = [r["fvu"] for r in straight.log if r["split"] == "train"]
    assert train_fvu[-1] < 0.7 * train_fvu[0]  # it learns (measured 0.53 -> 0.32)
    assert straight.metrics["mse"] == min(r["mse"] for r in straight.log if r["split"] == "val")  # the best one
    from writesae.plots.training import training_curves

    fig = training_curves(tmp_path / "b")
    assert len(training_curves(resumed.sae).axes[0].lines[0].get_xdata()) == 9  # from the SAE loaded from b/best
    assert [len(ax.lines) for ax in fig.axes] == [1, 2, 2, 2]  # val has no loss
    assert list(fig.axes[1].lines[1].get_xdata()) == list(range(5, 46, 5))
    with pytest.raises(ValueError, match="lr"):
        train_on_tensors(S, cfg, tmp_path / "b", **{**kw, "lr": 1e-3})


def test_train_sae_on_disk(tmp_path, monkeypatch):
    S, _ = planted(n=640, d=6)
    w = ShardWriter(tmp_path / "states", {"params": {"model": "planted"}}, ["L0H1"], 6, 6)
    for i in range(4):
        sl = slice(160 * i, 160 * (i + 1))
        w.write(i, {"L0H1.state": S[sl], "L0H1.write": S[sl], "L0H1.a": torch.ones(160), "L0H1.b": torch.ones(160),
                    "token_ids": torch.zeros(160, dtype=torch.long), "seq_ids": torch.arange(160) // 16 + 10 * i,
                    "positions": torch.arange(160) % 16})  # fmt: skip
    w.finish()
    cfg = SAEConfig("bilinear", 6, 6, n_feat=48, k=3, k_aux=8)
    res = train_sae(tmp_path / "states", (0, 1), cfg, tmp_path / "sae", epochs=4, batch_size=64, lr=3e-3, warmup=5, progress=False)
    assert res.finished and res.metrics["n_states"] == 128  # 20% of 40 sequences of 16
    assert res.metrics["fvu"] < 0.9 and res.metrics["alive"] + res.metrics["dead"] == 48
    assert res.fire_rates.shape == (48,) and res.fire_rates.sum() == pytest.approx(res.metrics["l0"])
    saved = load_file(str(tmp_path / "sae" / "best" / "fire_rates.safetensors"))["fire_rates"]
    np.testing.assert_allclose(saved.numpy(), res.fire_rates, rtol=1e-6)
    back = WriteSAE.load(tmp_path / "sae" / "best", expect_cell="L0H1", expect_dims=(6, 6))
    assert back.info["model"] == "planted" and back.info["metrics"]["fvu"] == pytest.approx(res.metrics["fvu"])
    assert math.isclose(json.loads((tmp_path / "sae" / "metrics.json").read_text())["mse"], res.metrics["mse"])
    # M is the mean of the training split
    from writesae.data import StateDataset

    tr = StateDataset(tmp_path / "states", "L0H1", "train", seed=0)
    torch.testing.assert_close(back.mean, tr.compute_mean())
    # the states were read into memory (they fit): streamed from the shards instead, the same run bit for bit
    assert isinstance(tr.in_memory(), TensorStates) and torch.equal(tr.in_memory().data, tr.states(np.arange(len(tr))))
    monkeypatch.setattr(T, "IN_MEMORY_BYTES", 0)
    streamed = train_sae(tmp_path / "states", (0, 1), cfg, tmp_path / "sae2", epochs=4, batch_size=64, lr=3e-3, warmup=5,
                         progress=False)
    for k, t in res.sae.state_dict().items():
        assert torch.equal(t, streamed.sae.state_dict()[k]), k
    assert streamed.log == res.log


def test_fit_drops_adam_and_gradients_before_it_loads_the_best(tmp_path, monkeypatch):
    # The best SAE is loaded beside the trained one; Adam's moments and the gradients (3x the SAE) must be gone by
    # then: a FlatSAE of GLA-1.3B's 256 x 512 heads held 8.6 GB in its steps and peaked at 14.5 GB there.
    real_adam, real_load, opts, held = torch.optim.Adam, WriteSAE.load, [], []
    monkeypatch.setattr(torch.optim, "Adam", lambda *a, **k: opts.append(real_adam(*a, **k)) or opts[-1])

    def load(path, **kw):
        params = opts[0].param_groups[0]["params"]
        held.append((sum(len(s) for s in opts[0].state.values()), sum(p.grad is not None for p in params)))
        return real_load(path, **kw)

    monkeypatch.setattr(WriteSAE, "load", load)
    S, _ = planted(n=200, d=6)
    res = train_on_tensors(S, SAEConfig("flat", 6, 6, n_feat=32, k=2, k_aux=8), tmp_path, epochs=2, batch_size=32,
                           lr=3e-3, warmup=2, progress=False)
    assert held == [(0, 0)]  # loaded once, with no optimizer state and no gradient left
    best = load_file(str(tmp_path / "best" / "sae.safetensors"))
    for k, t in res.sae.state_dict().items():
        assert torch.equal(t, best[k]), k


def test_training_does_not_depend_on_the_state_scale():
    """The SAE works on (S - M) / c with c the RMS of the centred training states: states 1000x larger
    give the same FVU and 1000x larger coefficients, the same atoms."""
    S, _ = planted(n=512)
    cfg = SAEConfig("bilinear", 16, 16, n_feat=64, k=4, k_aux=16)
    a = train_on_tensors(S, cfg, epochs=5, **FAST)
    b = train_on_tensors(S * 1000, cfg, epochs=5, **FAST)
    assert b.sae.scale.item() == pytest.approx(1000 * a.sae.scale.item(), rel=1e-5)
    assert b.metrics["fvu"] == pytest.approx(a.metrics["fvu"], rel=1e-3)
    ea, eb = a.sae.eval().encode(S[:8]), b.sae.eval().encode(S[:8] * 1000)
    assert torch.equal(ea.top_indices, eb.top_indices)
    torch.testing.assert_close(eb.top_acts, 1000 * ea.top_acts, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.sae.decode(eb.top_acts, eb.top_indices), b.sae.eval()(S[:8] * 1000).recon)


def test_sampled_statistics_and_validation(monkeypatch):
    """Above STATS_SAMPLE / VAL_SAMPLE states the trainer reads seeded samples for M, c and the periodic
    validation, and still reports the final metrics over the whole validation split."""
    import writesae.train as T

    S, _ = planted(n=500, d=6)
    cfg = SAEConfig("bilinear", 6, 6, n_feat=32, k=2, k_aux=8)
    full = train_on_tensors(S, cfg, epochs=2, batch_size=50, lr=3e-3, warmup=2, progress=False)
    seen = []
    real = T.evaluate_sae
    monkeypatch.setattr(T, "evaluate_sae", lambda sae, ds, **kw: seen.append(len(ds)) or real(sae, ds, **kw))
    monkeypatch.setattr(T, "STATS_SAMPLE", 120)
    monkeypatch.setattr(T, "VAL_SAMPLE", 40)
    part = train_on_tensors(S, cfg, epochs=2, batch_size=50, lr=3e-3, warmup=2, progress=False)
    assert seen == [40, 40, 100]  # two sampled validations, then one pass over the 100 validation states
    assert part.metrics["n_states"] == full.metrics["n_states"] == 100
    train = TensorStates(S).split("train", 0)
    assert not torch.allclose(part.sae.mean, full.sae.mean)  # M from 120 of the 400 training states
    torch.testing.assert_close(full.sae.mean, train.compute_mean())
    assert (part.sae.mean - full.sae.mean).abs().max() < 0.5 * S.std()
