"""Shared helpers of the benchmark scripts: matmul peak, timing, tables."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Sequence


def time_fn(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> list[float]:
    """Seconds per call after `warmup` calls; fn must block until its result is ready."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def jax_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s of jax on this machine (median of reps)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    secs = time_fn(lambda: f(a).block_until_ready(), 2, reps)
    return 2 * n ** 3 / median(secs)


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s of torch on this machine (median of reps)."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(n, n)
    secs = time_fn(lambda: a @ a, 2, reps)
    return 2 * n ** 3 / median(secs)


def print_table(rows: list[dict], headers: Sequence[str]) -> str:
    """Prints (and returns) a markdown table of rows (dicts keyed by header)."""
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in headers) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str | None, obj) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
