"""Unedited runs of the hosts of the hybrid and Mamba-1 / mLSTM model types (issue 26) beside the library's own
CPU forward on the same input: seconds, the ratio host / library per type, the logits checked equal.

    python benchmarks/bench_hybrids.py [--types olmo_hybrid,kimi_linear,...] [--size tiny|small] [--window 1024]

``--size small``: each type with random weights in 4 layers of its own layout at d_model 512 (its recurrent
heads at the published models' head sizes where they fit: Gated DeltaNet / KDA 64-128 x 128, lightning 64 x 64,
Mamba-1 d_state 16 over d_inner 1024, mLSTM 64 x 128), a 1,024-token vocabulary; ``--size tiny``: the test
configs. The host's run is ``host.trace(ids, cells=[])`` (its own layers: chunked or scanned forms for the
unedited stretches, nothing recorded); the library's is ``host.logits`` (the model's forward).
"""
import argparse
import statistics

import torch

from bench_sae import _worst, timed
from writesae.hosts import load_host

TYPES = ("olmo_hybrid", "kimi_linear", "minimax", "mamba", "falcon_mamba", "jamba", "xlstm")


def config_small(model_type, vocab=1024, hidden=512):
    import transformers

    lin, full = "linear_attention", "full_attention"
    types = [lin, full, lin, lin]
    none = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return {
        "olmo_hybrid": lambda: transformers.OlmoHybridConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=64,
            linear_value_head_dim=128, layer_types=types, pad_token_id=None, eos_token_id=None),
        "kimi_linear": lambda: transformers.KimiLinearConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=hidden,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=128, qk_rope_head_dim=32,
            qk_nope_head_dim=64, v_head_dim=64, num_local_experts=8, num_experts_per_tok=2, linear_num_heads=4,
            linear_head_dim=128, layer_types=types, **none),
        "minimax": lambda: transformers.MiniMaxConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, block_size=256, num_local_experts=8, num_experts_per_tok=2,
            layer_types=types, bos_token_id=None, eos_token_id=None),
        "mamba": lambda: transformers.MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=16,
                                                  num_hidden_layers=4, expand=2, **none),
        "falcon_mamba": lambda: transformers.FalconMambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=16,
                                                               num_hidden_layers=4, expand=2, **none),
        "jamba": lambda: transformers.JambaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
            attn_layer_period=4, attn_layer_offset=1, mamba_d_state=16, mamba_expand=2, **none),
        "xlstm": lambda: transformers.xLSTMConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=4, num_heads=4,
                                                  chunk_size=64, **none),
    }[model_type]()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--seqs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    print(f"unedited runs: {a.seqs} x {a.window} tokens, {a.size} configs, {a.threads} thread(s), median of {a.repeats}")
    print(f"{'model_type':14} {'cell (d_k x d_v)':>17} {'library s':>9} {'host s':>8} {'host/library':>12} "
          f"{'max rel. logit diff':>19}")
    for mt in a.types.split(","):
        torch.manual_seed(0)
        host = load_host(f"tiny:{mt}" if a.size == "tiny" else config_small(mt), device="cpu")
        ids = torch.randint(0, host.vocab_size, (a.seqs, a.window), generator=torch.Generator().manual_seed(1))
        lib, ours = [], []
        with torch.no_grad():
            for _ in range(a.repeats):
                lib.append(timed(lambda: host.logits(ids), cpu))
                ours.append(timed(lambda: host.trace(ids, cells=[]).logits, cpu))
        t_lib, t_host = (statistics.median(t for _, t in runs) for runs in (lib, ours))
        worst = _worst(([ours[-1][0]], [lib[-1][0]]), f"{mt}: the host's logits and the library's")
        print(f"{mt:14} {f'{host.d_k} x {host.d_v}':>17} {t_lib:9.3f} {t_host:8.3f} {t_host / t_lib:11.2f}x "
              f"{worst:19.1e}")


if __name__ == "__main__":
    main()
