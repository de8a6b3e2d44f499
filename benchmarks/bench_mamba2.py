"""Unedited runs of the Mamba-2 host on every model type it serves: its chunked form (transformers' SSD scan
for unedited stretches), its stepwise form (every step in Python, ``host.chunked = False``) and the library's
own forward (``host.logits``), on the same input, side by side; the logits are checked equal (``_worst``: relative
difference at most 1e-4). The host's runs are ``host.trace(ids, cells=[])``: its own layers, nothing recorded.

    python benchmarks/bench_mamba2.py [--types mamba2,bamba] [--size tiny|370m] [--window 1024] [--seqs 1]

``--size tiny``: the test configs (``load_host("tiny:<type>")``). ``--size 370m``: each type with
Mamba-2-370M's mixer (d_model 1024; 32 heads of 64 x 128 states, one group; chunks of 256) in 4 layers of
its own layout (an attention layer where the type has them), a 1,024-token vocabulary, random weights.
"""
import argparse
import statistics

import torch

from bench_sae import _worst, timed
from writesae.hosts import load_host

TYPES = ("mamba2", "nemotron_h", "granitemoehybrid", "bamba", "falcon_h1", "zamba2")


def config_370m(model_type, vocab=1024, layers=4):
    """The 370M mixer in the type's layout (layer 1 attention; Falcon-H1: beside every mixer)."""
    import transformers

    lin, full = "linear_attention", "full_attention"
    att = dict(vocab_size=vocab, hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2)
    mix = dict(mamba_n_heads=32, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_chunk_size=256)
    return {
        "mamba2": lambda: transformers.Mamba2Config(vocab_size=vocab, hidden_size=1024, num_hidden_layers=layers,
                                                    num_heads=32, head_dim=64, state_size=128, expand=2, n_groups=1,
                                                    chunk_size=256),
        "nemotron_h": lambda: transformers.NemotronHConfig(
            **att, layers_block_type=[lin, full, lin, "mlp"], head_dim=128, mamba_num_heads=32, mamba_head_dim=64,
            ssm_state_size=128, n_groups=1, chunk_size=256),
        "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
            **att, **mix, mamba_expand=2, num_hidden_layers=layers, layer_types=[lin, full, lin, lin],
            shared_intermediate_size=2048, num_local_experts=0),
        "bamba": lambda: transformers.BambaConfig(**att, **mix, mamba_expand=2, num_hidden_layers=layers,
                                                  attn_layer_indices=[1]),
        "falcon_h1": lambda: transformers.FalconH1Config(**att, **mix, mamba_d_ssm=2048, num_hidden_layers=layers),
        "zamba2": lambda: transformers.Zamba2Config(
            **{**att, "num_key_value_heads": 8}, n_mamba_heads=32, mamba_expand=2, mamba_d_state=128, mamba_ngroups=1,
            chunk_size=256, num_hidden_layers=layers, layers_block_type=[lin, "hybrid", lin, lin]),
    }[model_type]()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--size", choices=("tiny", "370m"), default="tiny")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--seqs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"unedited runs: {a.seqs} x {a.window} tokens, {a.size} configs, {a.threads} thread(s), "
          f"median of {a.repeats}")
    print(f"{'model_type':17} {'library s':>9} {'chunked s':>9} {'stepwise s':>10} {'chunked/library':>15} "
          f"{'stepwise/chunked':>16} {'max rel. diff':>16}")
    cpu = torch.device("cpu")
    for mt in a.types.split(","):
        torch.manual_seed(0)
        host = load_host(f"tiny:{mt}" if a.size == "tiny" else config_370m(mt), device="cpu")
        ids = torch.randint(0, host.vocab_size, (a.seqs, a.window), generator=torch.Generator().manual_seed(1))
        runs = {"library": [], "chunked": [], "stepwise": []}
        with torch.no_grad():
            for r in range(a.repeats):
                runs["library"].append(timed(lambda: host.logits(ids), cpu))
                for form in ("chunked", "stepwise") if r == 0 else ("chunked",):  # stepwise: once (slow)
                    host.chunked = form == "chunked"
                    runs[form].append(timed(lambda: host.trace(ids, cells=[]).logits, cpu))
        t = {form: statistics.median(s for _, s in rs) for form, rs in runs.items()}
        ref = runs["library"][-1][0]
        worst = max(_worst(([runs[form][-1][0]], [ref]), f"{mt}: the host's {form} logits and the library's")
                    for form in ("chunked", "stepwise"))
        print(f"{mt:17} {t['library']:9.3f} {t['chunked']:9.3f} {t['stepwise']:10.3f} "
              f"{t['chunked'] / t['library']:14.2f}x {t['stepwise'] / t['chunked']:15.2f}x {worst:16.1e}")


if __name__ == "__main__":
    main()
