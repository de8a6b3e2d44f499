"""Every artifact follows the run's device (issue 24, item 3): the pipeline trains and loads its SAEs on the
host's device, and the sweep's device (Ray's GPU request) reaches the host those run on. Checked on this CPU
with spies on the calls that place tensors."""
from writesae import pipeline, sweep as S
from writesae.sae import WriteSAE

TINY = dict(n_feat=16, k=2, epochs=1, batch_size=16, data=dict(window=16, n_windows=4, positions_per_seq=4))


def test_sae_trains_and_loads_on_the_hosts_device(tmp_path, monkeypatch):
    h = pipeline.host("tiny", "cpu")
    seen = {}
    real_train, real_load = pipeline.train_sae, WriteSAE.load.__func__

    def train(*a, **kw):
        seen["train"] = kw.get("device", "<not passed>")
        return real_train(*a, **kw)

    def load(cls, *a, **kw):
        seen["load"] = kw.get("device", "<not passed>")
        return real_load(cls, *a, **kw)

    monkeypatch.setattr(pipeline, "train_sae", train)
    monkeypatch.setattr(WriteSAE, "load", classmethod(load))
    sae = pipeline.sae(h, (1, 1), root=tmp_path, progress=False, **TINY)
    assert seen == {"train": h.device, "load": h.device}
    assert sae.device == h.device


def test_the_sweeps_device_reaches_the_host_its_cells_run_on(tmp_path, monkeypatch):
    """A Ray task that asked for a GPU gets device "cuda" (sweep: ``device = "cuda" if gpus``): run_cell and the
    states task load their host there, with the parameter file's dtype; training then follows that host."""
    asked = []
    real = pipeline.host

    def spy(model="embedded", device=None, dtype="float32", trust_remote_code=False):
        asked.append((model, device, dtype, trust_remote_code))
        return real(model, "cpu", dtype, trust_remote_code)

    monkeypatch.setattr(pipeline, "host", spy)
    s = S.settings("params/tiny.yaml", n_windows=4, window=16, positions_per_seq=4, eval_windows=2, epochs=1,
                   n_feat=16, k=2, max_firings=2, n_atoms=1, sites_per_atom=2)
    h = real(s["model"], "cpu")
    data = S.data_for(h, s, [(1, 1)])
    S._states(s, data, str(tmp_path), "cuda")
    S.run_cell(s, data, (1, 1), tmp_path, device="cuda")
    assert asked and all(a == ("tiny", "cuda", "float32", False) for a in asked), asked
