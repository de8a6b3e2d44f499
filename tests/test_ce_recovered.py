"""CE loss recovered: the SAE's reconstruction spliced into the cache at a split position."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from writesae.experiments.ce_recovered import ce_losses, record
from writesae.hosts import load_host, tiny_config
from writesae.sae import SAEConfig, WriteSAE

T, SPLIT = 20, 8


@pytest.fixture(scope="module", params=["gdn", "mamba2"])
def host(request):
    torch.manual_seed(0)
    return load_host(tiny_config("qwen3_5", 2, 4) if request.param == "gdn" else "tiny:mamba2")


@pytest.fixture(scope="module")
def ids(host):
    return torch.randint(0, host.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))


def test_clean_loss_is_the_models_and_identity_recovers_everything(host, ids):
    cell = host.cells[len(host.cells) // 2]
    res = ce_losses(host, {(cell.layer, cell.head): lambda S: S}, ids, SPLIT, conditions=("sae", "zero"),
                    batch=2, progress=False)
    # the unedited loss is the library forward's cross-entropy on tokens SPLIT+1.. (read at SPLIT..T-2)
    logits = host.logits(ids)[:, SPLIT:T - 1]
    ref = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, SPLIT + 1:].reshape(-1)))
    assert res["loss_clean"] == pytest.approx(ref, rel=1e-5)
    assert res["n_tokens"] == 3 * (T - 1 - SPLIT) and res["split"] == SPLIT
    assert res["loss_sae"] == pytest.approx(res["loss_clean"], abs=1e-5)  # S_hat = S: nothing changes
    assert res["loss_zero"] != pytest.approx(res["loss_clean"], abs=1e-4)  # zeroing the state does something
    assert res["ce_recovered"] == pytest.approx(1.0, abs=1e-2) and abs(res["ppl_change"]) < 1e-4
    one = ce_losses(host, {(cell.layer, cell.head): lambda S: S}, ids, SPLIT, conditions=("sae", "zero"),
                    batch=2, progress=False, logits_bytes=1)  # a passage per call, as at a large vocabulary
    assert all(one[k] == pytest.approx(res[k], rel=1e-6) for k in ("loss_clean", "loss_sae", "loss_zero"))
    zero = ce_losses(host, {(cell.layer, cell.head): torch.zeros_like}, ids, SPLIT, conditions=("sae", "zero"),
                     progress=False)
    assert zero["loss_sae"] == pytest.approx(zero["loss_zero"], abs=1e-6) and zero["ce_recovered"] == pytest.approx(0, abs=1e-6)


def test_all_heads_of_a_layer_and_a_real_sae(host, ids, tmp_path):
    layer = host.recurrent_layers[0]
    heads = {(layer, h): (lambda S: S) for h in range(host.n_heads)}
    res = ce_losses(host, heads, ids, SPLIT, conditions=("sae", "zero"), progress=False)
    assert res["cells"] == [f"L{layer}H{h}" for h in range(host.n_heads)]
    assert res["loss_sae"] == pytest.approx(res["loss_clean"], abs=1e-5)
    one = ce_losses(host, {(layer, 0): lambda S: S}, ids, SPLIT, conditions=("sae", "zero"), progress=False)
    assert res["loss_zero"] != pytest.approx(one["loss_zero"], abs=1e-5)  # every head zeroed, not just one
    # a WriteSAE: its mean state is the mean-ablation value; the stored metric is reused
    c = host.cell(layer, 0)
    sae = WriteSAE(SAEConfig("bilinear", c.d_k, c.d_v, n_feat=16, k=2), seed=0)
    tr = host.trace(ids, cells=[(layer, 0)], positions=[SPLIT - 1])[(layer, 0)].state[:, 0]
    sae.set_mean(tr.mean(0))
    sae.save(tmp_path / "sae", cell=(layer, 0), model=host.name, metrics={"fvu": 0.5})
    sae = WriteSAE.load(tmp_path / "sae")
    got = record(host, sae, ids, SPLIT, progress=False)
    mean = ce_losses(host, {(layer, 0): lambda S: sae.mean.expand_as(S)}, ids, SPLIT, conditions=("sae",),
                     progress=False)
    assert got["loss_mean"] == pytest.approx(mean["loss_sae"], rel=1e-6)
    for key in ("ce_recovered", "ce_recovered_mean"):
        L_ab = got["loss_zero" if key == "ce_recovered" else "loss_mean"]
        assert got[key] == pytest.approx((L_ab - got["loss_sae"]) / (L_ab - got["loss_clean"]))
    assert math.isfinite(got["ce_recovered"]) and got["ppl_change"] == pytest.approx(math.expm1(got["loss_sae"] - got["loss_clean"]))
    stored = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metrics"]
    assert stored["fvu"] == 0.5 and stored["ce_recovered"]["loss_sae"] == got["loss_sae"]
    again = WriteSAE.load(tmp_path / "sae")
    assert record(host, again, ids, SPLIT, progress=False) == got  # from cfg.json, same passages and split
    assert record(host, again, ids, SPLIT + 1, progress=False)["split"] == SPLIT + 1  # new split: computed


def test_bad_input(host, ids):
    cell = host.cells[0]
    with pytest.raises(ValueError, match=r"split=19 must leave .* use 1\.\.18"):
        ce_losses(host, {(cell.layer, cell.head): lambda S: S}, ids, 19)
    with pytest.raises(ValueError, match="does not exist|has no matrix state"):
        ce_losses(host, {(99, 0): lambda S: S}, ids, SPLIT)
    with pytest.raises(ValueError, match="mean ablation needs"):
        ce_losses(host, {(cell.layer, cell.head): lambda S: S}, ids, SPLIT, progress=False)
