"""One optimizer step of stage 1 (SCP, k = 1) and stage 3 (N candidates, top-k): ours vs the
official PyTorch CLaRa, same weights, same batch, one process.

    python benchmarks/train_step.py --clara_src /path/to/ml-clara [--reps 3] [--quick]

Without --clara_src only our side runs (and the table says so). The official model is built
by its own constructor from a random local Mistral base (benchmarks/common.py; nothing is
downloaded) and stepped as its trainer does: `loss, aux = model(batch=...)`, stage 1 adding
0.1 x MSE, backward, AdamW over the LoRA parameters, LoRA dropout on. Ours is the trainer's
own `clara_jax.train.step.make_train_step` (AdamW, dropout on); stage 3 also with the
candidate cache (`end_to_end.cache_candidates`: candidate states gathered from a table
instead of compressed in the step; see benchmarks/stage3_cache.py for the cache alone).

Model FLOPs count the forward matmuls each step needs (encoder passes without logits,
decoder with) x 2 for passes that backpropagate (the base is frozen: activation gradients
only, LoRA FLOPs not counted) and x 1 for passes without gradient (stage-3 candidates).
The share is of the CPU's fp32 matmul peak: the larger of jax's and torch's measured
2048^3 matmul rate (medians, measured in this run). float32; warm-up first; both sides
interleaved (ours, official, ours, ...) so that load changes hit both alike; medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from stage3_cache import stage3_batch  # noqa: E402

from clara_jax.clara.config import APPLE_STAGES  # noqa: E402

# Our stage -> the official trainer's batch["stage"] (its names stop at this boundary).
APPLE_STAGE_NAMES = {ours: apple for apple, ours in APPLE_STAGES.items()}

# Mid-size Mistral-shaped config of the issue, and a tiny one for the smoke test.
CONFIGS = {
    "mid": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536, base_vocab=4000,
                doc_max_length=256, compress_rate=32, batch=8, candidates=20, k=5,
                prompt_len=256, answer_len=64),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, base_vocab=400,
                  doc_max_length=32, compress_rate=8, batch=2, candidates=4, k=2,
                  prompt_len=64, answer_len=16),
}


def stage_batches(c: dict, vocab_base: int) -> dict[str, dict]:
    """Random-id batches (numpy) of stage 1 (k = 1, no query) and stage 3."""
    n_mem = c["doc_max_length"] // c["compress_rate"]
    out = {}
    for stage, n_cand, k in (("pretrain", 1, 1), ("end_to_end", c["candidates"], c["k"])):
        b = stage3_batch(np.random.RandomState(1), vocab_base, c["batch"], n_cand, k, n_mem,
                         c["doc_max_length"], c["prompt_len"])
        b["labels"] = np.where(np.arange(c["prompt_len"]) >= c["prompt_len"] - c["answer_len"],
                               b["prompt_ids"], -100)
        if stage == "pretrain":
            del b["query_ids"], b["query_mask"]
        out[stage] = b
    return out


def official_batch(b: dict, stage: str):
    """The official trainer's batch dict (torch tensors, documents flattened)."""
    import torch
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)
    bsz, n, le = b["doc_ids"].shape
    out = {"stage": APPLE_STAGE_NAMES[stage],
           "enc_input_ids": t(b["doc_ids"].reshape(bsz * n, le)),
           "enc_attention_mask": t(b["doc_mask"].reshape(bsz * n, le)),
           "dec_input_ids": t(b["prompt_ids"]), "dec_attention_mask": t(b["prompt_mask"]),
           "labels": t(b["labels"])}
    if stage == "end_to_end":
        out["query_input_ids"] = t(b["query_ids"])
        out["query_attention_mask"] = t(b["query_mask"])
    return out


def model_flops(mcfg, c: dict, stage: str, cached: bool) -> float:
    """Forward matmul FLOPs x (2 if backpropagated else 1) of one step (see the docstring)."""
    b, le = c["batch"], c["doc_max_length"] + 3 + c["doc_max_length"] // c["compress_rate"]
    lp = c["prompt_len"]
    enc = lambda rows: rows * le * mcfg.flops_per_token(le, compute_logits=False)
    dec = 2 * b * lp * mcfg.flops_per_token(lp)
    if stage == "pretrain":
        return 2 * enc(b) + dec
    return 2 * enc(b) + (0 if cached else enc(b * c["candidates"])) + dec


def tokens_per_step(c: dict, stage: str) -> int:
    """Input tokens one step reads: documents (and queries) through the encoder + prompts."""
    le = c["doc_max_length"] + 3 + c["doc_max_length"] // c["compress_rate"]
    docs = c["batch"] * (1 if stage == "pretrain" else c["candidates"] + 1) * le
    return docs + c["batch"] * c["prompt_len"]


def models(quick: bool, work_dir: str, clara_src: str | None):
    """(config name, config, official model or None, our Clara) of the benchmark's random
    Mistral-shaped base ("quick": tiny; else "mid"), built once under work_dir."""
    name = "quick" if quick else "mid"
    c = CONFIGS[name]
    base_dir = common.make_base_dir(
        os.path.join(work_dir, f"base_{name}"), hidden=c["hidden"], layers=c["layers"],
        heads=c["heads"], kv_heads=c["kv_heads"], intermediate=c["intermediate"],
        base_vocab=c["base_vocab"])
    official, ours = common.make_official_and_ours(
        clara_src, work_dir, doc_max_length=c["doc_max_length"],
        compress_rate=c["compress_rate"], base_dir=base_dir)
    return name, c, official, ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clara_src", default=None, help="checkout of github.com/apple/ml-clara")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--stages", default="pretrain,end_to_end")
    ap.add_argument("--work_dir", default="/tmp/clara_bench")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from clara_jax.clara.compress import compress
    from clara_jax.train import step as step_lib
    from clara_jax.train.optim import make_optimizer

    name, c, official, ours = models(a.quick, a.work_dir, a.clara_src)
    mcfg = ours.model_config
    peaks = {"jax": [common.jax_matmul_peak(reps=3)]}
    if official is not None:
        import torch
        peaks["torch"] = [common.torch_matmul_peak(reps=3)]
        opt = torch.optim.AdamW([p for n, p in official.named_parameters() if "lora_" in n],
                                lr=1e-4, betas=(0.9, 0.95))
    batches = stage_batches(c, ours.config.first_mem_token_id)
    tx = make_optimizer(1e-4, 100)
    rows = []
    for stage in a.stages.split(","):
        k = 1 if stage == "pretrain" else c["k"]
        our_stage = stage
        cfg = ours.config.replace(generation_top_k=k)
        fn = jax.jit(step_lib.make_train_step(ours.model, cfg, our_stage, tx, dropout=True))
        feeds = {"ours": {key: jnp.asarray(v) for key, v in batches[stage].items()}}
        if stage == "end_to_end":
            b, n = c["batch"], c["candidates"]
            enc = jax.jit(lambda ids, mask: compress(ours.model, ours.params,
                                                     ours.adapters["encoder"], ids, mask,
                                                     cfg.n_mem)[0])
            ids = feeds["ours"]["doc_ids"].reshape(b * n, -1)
            mask = feeds["ours"]["doc_mask"].reshape(b * n, -1)
            enc(ids[:b], mask[:b]).block_until_ready()
            t0 = time.perf_counter()
            table = jnp.concatenate([enc(ids[i:i + b], mask[i:i + b])
                                     for i in range(0, b * n, b)]).block_until_ready()
            fill = time.perf_counter() - t0
            cached = {key: v for key, v in feeds["ours"].items()
                      if key not in ("doc_ids", "doc_mask")}
            cached["doc_index"] = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
            cached["doc_table"] = table
            feeds["ours, cached candidates"] = cached
        fns, states = {}, {}
        for label, feed in feeds.items():
            states[label] = step_lib.create_train_state(ours.params, dict(ours.adapters),
                                                        our_stage, tx, jax.random.key(2))

            def run(label=label, feed=feed):
                states[label], m = fn(states[label], feed)
                loss = float(m["loss"])
                assert np.isfinite(loss), (label, loss)
            fns[label] = run
        if official is not None:
            official.generation_top_k = k
            obatch = official_batch(batches[stage], stage)

            def run_official(obatch=obatch, stage=stage):
                official.train()
                opt.zero_grad(set_to_none=True)
                loss, aux = official(batch=obatch)
                if stage == "pretrain":
                    loss = loss + 0.1 * aux["mse_loss"]
                loss.backward()
                opt.step()
                assert np.isfinite(float(loss)), ("official", float(loss))
            fns["official (PyTorch)"] = run_official
        print(f"{stage}: warm-up (compiles) then {a.reps} interleaved reps", flush=True)
        secs = common.interleaved(fns, a.reps, warmup=1)
        off_s = common.median(secs["official (PyTorch)"]) if official is not None else None
        for label, ss in secs.items():
            s = common.median(ss)
            is_cached = "cached" in label
            flops = model_flops(mcfg, c, stage, is_cached)
            row = {"stage": {"pretrain": "1 (SCP, k=1)",
                             "end_to_end": f"3 ({c['candidates']} cand., k={c['k']})"}[stage],
                   "implementation": label, "s/step": s, "examples/s": c["batch"] / s,
                   "tokens/s": round(tokens_per_step(c, stage) / s),
                   "model GFLOP/s": flops / s / 1e9, "_flops": flops, "_secs": ss}
            if label.startswith("ours") and off_s is not None:
                row["speed-up vs official"] = f"{off_s / s:.2f}x"
            if is_cached:
                row["cache fill (s, once)"] = fill
            rows.append(row)
    peaks["jax"].append(common.jax_matmul_peak(reps=3))
    if official is not None:
        peaks["torch"].append(common.torch_matmul_peak(reps=3))
    peak = max(common.median(v) for v in peaks.values())
    for r in rows:
        r["% of matmul peak"] = f"{100 * r['_flops'] / r['s/step'] / peak:.0f}%"
    print(f"\nconfig {name}: hidden {c['hidden']}, {c['layers']} layers, {c['heads']}/"
          f"{c['kv_heads']} heads, vocab {mcfg.vocab_size}, doc_max_length "
          f"{c['doc_max_length']}, compress_rate {c['compress_rate']}, batch {c['batch']}, "
          f"prompt {c['prompt_len']} tokens; float32; median of {a.reps}; {common.load_line()}")
    print("matmul peak (2048^3 fp32, before/after): " + ", ".join(
        f"{k} {' / '.join(f'{v / 1e9:.0f}' for v in vs)} GFLOP/s" for k, vs in peaks.items()))
    if official is None:
        print("official side not run (no --clara_src): our side only")
    common.print_table(rows, ["stage", "implementation", "s/step", "speed-up vs official",
                              "examples/s", "tokens/s", "model GFLOP/s", "% of matmul peak",
                              "cache fill (s, once)"])
    common.write_json(a.json, {"config": c, "peaks": peaks, "load": common.load_line(),
                               "rows": rows})


if __name__ == "__main__":
    main()
