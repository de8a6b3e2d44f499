"""FlatSAE <-> SAELens's on-disk format (sae_weights.safetensors + cfg.json)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from writesae.sae import SAEConfig, WriteSAE
from writesae.saelens import export_saelens, import_saelens


def trained_like(variant, d_k=4, d_v=3, n=24, k=3, seed=0, **kw):
    """An SAE with non-trivial mean, scale and biases (what training leaves), on (d_k, d_v) states."""
    g = torch.Generator().manual_seed(seed)
    sae = WriteSAE(SAEConfig(variant, d_k, d_v, n_feat=n, k=k, **kw), seed=seed)
    with torch.no_grad():
        sae.set_mean(torch.randn(d_k, d_v, generator=g))
        sae.set_scale(2.5)
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_k, d_v, generator=g))
    sae.info.update(cell="L3H1", model="tiny")
    return sae.eval()


def saelens_topk(path, x):
    """SAELens's TopK SAE forward (encode + decode), written from its documented formula, on the files."""
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae_weights.safetensors"))
    pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    vals, idx = pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return acts, acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("variant", ["flat", "bilinear"])
def test_export_matches_saelens_formula_and_round_trips(tmp_path, variant):
    sae = trained_like(variant)
    S = 3 * torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(1)) + sae.mean
    export_saelens(sae, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    t = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (12, 24, 3)
    assert {k: tuple(v.shape) for k, v in t.items()} == {"W_enc": (12, 24), "b_enc": (24,), "W_dec": (24, 12),
                                                         "b_dec": (12,)}
    assert cfg["metadata"]["hook_name"] == "L3H1.state" and cfg["metadata"]["writesae"]["d_k"] == 4
    # SAELens, given vec(S), picks the same atoms with the same coefficients and returns vec(S_hat)
    ours = sae(S)
    acts, recon = saelens_topk(tmp_path / "sl", S.reshape(16, -1))
    dense = torch.zeros(16, 24).scatter(1, ours.top_indices, ours.top_acts)
    torch.testing.assert_close(acts, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recon, ours.recon.reshape(16, -1), rtol=1e-4, atol=1e-5)
    # and back: a flat WriteSAE computing the same function
    back = import_saelens(tmp_path / "sl")
    assert back.cfg.variant == "flat" and (back.cfg.d_k, back.cfg.d_v, back.cfg.n_feat) == (4, 3, 24)
    assert back.info["cell"] == "L3H1" and back.info["imported_from"]["format"] == "saelens"
    again = back.eval()(S)
    assert torch.equal(torch.sort(again.top_indices).values, torch.sort(ours.top_indices).values)
    torch.testing.assert_close(again.recon, ours.recon, rtol=1e-4, atol=1e-5)
    if variant == "flat":  # same weights
        torch.testing.assert_close(back.W_enc, sae.W_enc)
        torch.testing.assert_close(back.W_dec, sae.W_dec)


def test_import_folds_saelens_options(tmp_path):
    """An SAE written the way SAELens writes one (b_dec subtracted from the input, decoder-norm rescaling)."""
    g = torch.Generator().manual_seed(2)
    W_enc, W_dec = torch.randn(6, 10, generator=g), torch.randn(10, 6, generator=g)
    b_enc, b_dec = torch.randn(10, generator=g), torch.randn(6, generator=g)
    d = tmp_path / "native"
    d.mkdir()
    from safetensors.torch import save_file

    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 6, "d_sae": 10, "k": 2,
                                            "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True,
                                            "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0"}}))
    with pytest.raises(ValueError, match=r"d_in = 6 is not d_k x d_v.*d_k=\.\.\., d_v"):
        import_saelens(d)
    sae = import_saelens(d, d_k=2).eval()
    assert (sae.cfg.d_k, sae.cfg.d_v) == (2, 3)
    x = torch.randn(8, 6, generator=g)
    norm = W_dec.norm(dim=-1)
    pre = ((x - b_dec) @ W_enc + b_enc) * norm  # SAELens TopKSAE with rescale_acts_by_decoder_norm
    vals, idx = pre.topk(2, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) / norm
    torch.testing.assert_close(sae(x.reshape(8, 2, 3)).recon.reshape(8, 6), acts @ W_dec + b_dec, rtol=1e-4, atol=1e-5)


def test_load_names_the_format(tmp_path):
    export_saelens(trained_like("flat"), tmp_path / "sl")
    with pytest.raises(FileNotFoundError, match=r"SAELens SAE directory.*import_saelens\(path\)"):
        WriteSAE.load(tmp_path / "sl")
    trained_like("flat").save(tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match="WriteSAE directory: load it with WriteSAE.load"):
        import_saelens(tmp_path / "ws")
    with pytest.raises(ValueError, match="only TopK SAEs export"):
        export_saelens(trained_like("flat", activation="batchtopk"), tmp_path / "b")


def test_sae_lens_loads_the_export(tmp_path):
    """With SAELens installed, its own loader reads the export and reconstructs as we do."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like("flat")
    export_saelens(sae, tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    S = torch.randn(5, 4, 3) + sae.mean
    torch.testing.assert_close(theirs(S.reshape(5, -1)), sae(S).recon.reshape(5, -1), rtol=1e-4, atol=1e-5)


def test_saelens_saved_sae_imports(tmp_path):
    """With SAELens installed, an SAE it saves itself imports and reconstructs as SAELens does."""
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    for i, (apply, rescale) in enumerate(((True, False), (True, True), (False, False))):
        theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=12, d_sae=24, k=3, apply_b_dec_to_input=apply,
                                                         rescale_acts_by_decoder_norm=rescale))
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn_like(p))
        theirs.save_model(tmp_path / str(i))
        ours = import_saelens(tmp_path / str(i), d_k=4, d_v=3).eval()
        x = torch.randn(16, 12)
        torch.testing.assert_close(ours(x.reshape(16, 4, 3)).recon.reshape(16, 12), theirs(x), rtol=1e-4, atol=1e-4)
