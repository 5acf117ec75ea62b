"""Stage-3 train step time with and without the candidate cache (config.end_to_end.cache_candidates).

    python benchmarks/stage3_cache.py [--configs tiny,mid --reps 3 --json out.json]

Both sides are the trainer's own step (`step.make_train_step`, AdamW, LoRA dropout on) on
random token batches of the stage-3 shapes: B questions x N candidates, k retrieved.
Without the cache the step compresses all B * N candidates with the frozen encoder (as the
official code does); with it the step gathers their states from a device-resident table
[B * N, n, hidden] (the worst case: no candidate shared between questions). The one-off cost
of filling the cache (eval-mode compression of the same B * N documents, batches of B) is
shown beside it. float32, one process, all cores; medians after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name -> (preset, doc_max_length, compress_rate, questions B, candidates N, k, max_len)
CONFIGS = {
    "tiny": ("tiny", 64, 4, 8, 20, 5, 256),
    "mid": ("mid", 256, 32, 8, 20, 5, 256),
}


def stage3_batch(rng, vocab_base, b, n_cand, k, n_mem, doc_max_length, max_len):
    """Random ids in the stage-3 layout; memory tokens are ids vocab_base .. + n_mem - 1."""
    le = doc_max_length + 3 + n_mem
    mem = np.arange(vocab_base, vocab_base + n_mem)
    sep = vocab_base + n_mem + 2
    doc_ids = rng.randint(3, vocab_base, (b, n_cand, le))
    doc_ids[..., -n_mem:] = mem
    query_ids = rng.randint(3, vocab_base, (b, le))
    query_ids[:, -n_mem:] = mem
    prompt = rng.randint(3, vocab_base, (b, max_len))
    slots = np.tile(np.r_[mem, sep], k)
    prompt[:, 40:40 + len(slots)] = slots
    labels = np.where(np.arange(max_len) >= max_len - 16, prompt, -100)
    return {"query_ids": query_ids, "query_mask": np.ones_like(query_ids),
            "doc_ids": doc_ids, "doc_mask": np.ones_like(doc_ids), "prompt_ids": prompt,
            "prompt_mask": np.ones_like(prompt), "labels": labels}


def bench(name: str, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from clara_jax.clara.compress import compress
    from clara_jax.clara.config import ClaraConfig
    from clara_jax.model.config import preset
    from clara_jax.model.lora import LoraConfig
    from clara_jax.model.mistral import Mistral, init_params
    from clara_jax.train import step as step_lib
    from clara_jax.train.optim import make_optimizer
    from clara_jax.train.setup import fresh_adapters

    pname, doc_max, rate, b, n_cand, k, max_len = CONFIGS[name]
    n_mem = doc_max // rate
    mcfg = preset(pname)
    vocab_base = mcfg.vocab_size - n_mem - 3
    cfg = ClaraConfig(doc_max_length=doc_max, compress_rate=rate, generation_top_k=k,
                      first_mem_token_id=vocab_base,
                      lora=LoraConfig(rank=16, alpha=32, dropout=0.1))
    model = Mistral(mcfg, cfg.lora)
    base = init_params(mcfg, jax.random.key(0))
    adapters = fresh_adapters(mcfg, cfg.lora, jax.random.key(1))
    tx = make_optimizer(1e-4, 100)
    batch = {key: jnp.asarray(v) for key, v in stage3_batch(
        np.random.RandomState(0), vocab_base, b, n_cand, k, n_mem, doc_max, max_len).items()}
    step = jax.jit(step_lib.make_train_step(model, cfg, "end_to_end", tx, dropout=True))

    # The cache: compress the B * N candidates once (eval mode), batches of B documents.
    enc = jax.jit(lambda ids, mask: compress(model, base, adapters["encoder"], ids, mask,
                                             n_mem)[0])
    ids = batch["doc_ids"].reshape(b * n_cand, -1)
    mask = batch["doc_mask"].reshape(b * n_cand, -1)
    enc(ids[:b], mask[:b]).block_until_ready()
    t0 = time.perf_counter()
    table = jnp.concatenate([enc(ids[i:i + b], mask[i:i + b])
                             for i in range(0, b * n_cand, b)]).block_until_ready()
    fill = time.perf_counter() - t0
    cached = {key: v for key, v in batch.items() if key not in ("doc_ids", "doc_mask")}
    cached["doc_index"] = jnp.arange(b * n_cand, dtype=jnp.int32).reshape(b, n_cand)
    cached["doc_table"] = table

    rows = []
    for label, feed in (("compress every step (official)", batch), ("cached candidates", cached)):
        state = step_lib.create_train_state(base, dict(adapters), "end_to_end", tx,
                                            jax.random.key(2))
        t0 = time.perf_counter()
        state, m = step(state, feed)
        jax.block_until_ready(m["loss"])
        compile_s = time.perf_counter() - t0

        def run():
            nonlocal state
            state, m = step(state, feed)
            jax.block_until_ready(m["loss"])

        secs = common.time_fn(run, warmup=0, reps=reps)
        rows.append({"config": name, "mode": label, "s/step": common.median(secs),
                     "first step incl. compile (s)": compile_s})
        print(f"{name} {label}: {common.median(secs):.3f} s/step ({secs})", flush=True)
    rows[1]["speed-up"] = f"{rows[0]['s/step'] / rows[1]['s/step']:.1f}x"
    rows[1]["cache fill (s, once)"] = fill
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.configs.split(","):
        rows.extend(bench(name, args.reps))
    common.print_table(rows, ["config", "mode", "s/step", "speed-up",
                              "first step incl. compile (s)", "cache fill (s, once)"])
    common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
