"""Decoder throughput: our Flax Mistral vs Hugging Face PyTorch, same config, same machine.

    python benchmarks/decoder.py [--preset mid --vocab 2048 --batch 8 --seq 512 --reps 5]

Forward-only and forward+backward (mean cross-entropy, gradient w.r.t. every weight), float32,
after warm-up, median of --reps; model FLOP/s as a share of the measured matmul peak of the
same framework. Both sides run in this one process.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def bench_jax(cfg, batch, seq, warmup, reps):
    import jax
    import jax.numpy as jnp
    from clara_jax.clara.losses import causal_lm_loss
    from clara_jax.model.mistral import Mistral, init_params

    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)))
    model = Mistral(cfg)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    loss = lambda p, x: causal_lm_loss(model.apply({"params": p}, x).logits, x)
    bwd = jax.jit(jax.value_and_grad(loss))
    t_f = common.time_fn(lambda: fwd(params, ids).block_until_ready(), warmup, reps)
    t_b = common.time_fn(lambda: jax.block_until_ready(bwd(params, ids)), warmup, reps)
    return common.median(t_f), common.median(t_b)


def bench_torch(cfg, batch, seq, warmup, reps):
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count() or 1)
    hc = transformers.MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, attn_implementation="sdpa")
    model = transformers.MistralForCausalLM(hc).float()
    ids = torch.tensor(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)))

    def fwd():
        with torch.no_grad():
            model(ids)

    def bwd():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    model.eval()
    t_f = common.time_fn(fwd, warmup, reps)
    t_b = common.time_fn(bwd, warmup, reps)
    return common.median(t_f), common.median(t_b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no_torch", action="store_true")
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args()

    from clara_jax.model.config import preset
    cfg = preset(a.preset, vocab_size=a.vocab)
    tokens = a.batch * a.seq
    fwd_flops = tokens * cfg.flops_per_token(a.seq)
    peaks = {"jax": common.jax_matmul_peak()}
    results = {"jax": bench_jax(cfg, a.batch, a.seq, a.warmup, a.reps)}
    if not a.no_torch:
        peaks["torch"] = common.torch_matmul_peak()
        results["torch"] = bench_torch(cfg, a.batch, a.seq, a.warmup, a.reps)
    rows = []
    for impl, (t_f, t_b) in results.items():
        for mode, secs, flops in (("forward", t_f, fwd_flops), ("forward+backward", t_b,
                                                               3 * fwd_flops)):
            row = {"implementation": impl, "mode": mode, "tokens/s": tokens / secs,
                   "s/step": secs, "GFLOP/s": flops / secs / 1e9,
                   "% of own matmul peak": 100 * flops / secs / peaks[impl]}
            if "torch" in results:
                ref = results["torch"][0 if mode == "forward" else 1]
                row["speed-up vs torch"] = ref / secs
            rows.append(row)
    print(f"config: {a.preset} (vocab {a.vocab}), {cfg.num_params / 1e6:.1f}M parameters, "
          f"batch {a.batch} x {a.seq} tokens, float32")
    print("matmul peak (2048^3 fp32): " + ", ".join(
        f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    common.print_table(rows, ["implementation", "mode", "tokens/s", "s/step", "GFLOP/s",
                              "% of own matmul peak", "speed-up vs torch"])
    common.write_json(a.json_out, {"config": vars(a), "peaks": peaks, "rows": rows})


if __name__ == "__main__":
    main()
