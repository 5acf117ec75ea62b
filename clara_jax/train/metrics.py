"""The loop's metrics: throughput and truncation counters between log rows, retrieval recall
(computed in the step, `retrieval_recall`), MFU, and where rows go (`{workdir}/metrics.jsonl`,
TensorBoard, a tqdm bar)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from clara_jax.train.inputs import TOKEN_MASKS


class Meter:
    """Counts steps, tokens and model FLOPs since the last row, and documents / prompts cut
    to their static length so far in the current epoch."""

    def __init__(self, batch_size: int, n_train: int, peak_flops: float):
        self.batch_size, self.n_train, self.peak_flops = batch_size, n_train, peak_flops
        self.epoch, self.truncated_docs, self.truncated_prompts = -1, 0, 0
        self.reset()

    def reset(self) -> None:
        self.t_last, self.steps, self.tokens, self.flops = time.time(), 0, 0, 0.0

    def add(self, step: int, batch: dict, extras: dict, step_flops: float) -> None:
        """Counts one step (0-based `step`) over `batch` (what the step reads) and `extras`
        (`inputs.split_batch`'s truncation counts)."""
        epoch = step * self.batch_size // max(self.n_train, 1)
        if epoch != self.epoch:
            self.epoch, self.truncated_docs, self.truncated_prompts = epoch, 0, 0
        self.truncated_docs += int(np.sum(extras["truncated_docs"]))
        self.truncated_prompts += int(np.sum(extras["truncated_prompt"]))
        self.tokens += (batch["ids"].size if "ids" in batch
                        else int(sum(np.sum(batch[k]) for k in TOKEN_MASKS if k in batch)))
        self.flops += step_flops
        self.steps += 1

    def row(self, done: int, metrics: dict) -> dict:
        """The log row after `done` steps: the step's scalar metrics (host values; recall@k
        only when the batch had a row with positives, `drop_empty_recall`), rates since the
        last row, the epoch's truncation counts. Restarts the rates."""
        elapsed = time.time() - self.t_last
        row = {"step": done, **{k: float(v) for k, v in drop_empty_recall(metrics).items()
                                if np.ndim(v) == 0 and k != "finite"},
               "steps_per_s": self.steps / elapsed,
               "tokens_per_s": self.tokens / elapsed,
               "model_flops_per_s": self.flops / elapsed,
               **mfu(self.flops / elapsed, self.peak_flops),
               "epoch": self.epoch,
               "truncated_docs_epoch": self.truncated_docs,
               "truncated_prompts_epoch": self.truncated_prompts}
        self.reset()
        return row


def mfu(model_flops_per_s: float, peak_flops_per_device: float) -> dict:
    """{"mfu": achieved model FLOP/s / (peak FLOP/s per device x devices)}; {} when the
    peak is unknown (0)."""
    if not peak_flops_per_device:
        return {}
    return {"mfu": model_flops_per_s / (peak_flops_per_device * jax.device_count())}


RECALL_KS = (1, 3, 5)


def recall_widths(k: int, ks: tuple[int, ...] = RECALL_KS) -> list[int]:
    """The recall@j a top-k list reports: the official j in ks up to k, and k itself."""
    return sorted({j for j in ks if j <= k} | {k})


def retrieval_recall(topk: jax.Array, pos_mask: jax.Array) -> dict[str, jax.Array]:
    """The official recall@j (`RetrievalMetrics.calculate_recall_and_precision` of the
    official trainer): per row |topk[:j] ∩ positives| / |positives|, averaged over the rows
    that have a positive; in-graph, static shapes (j in `recall_widths(k)`).

    topk: [B, k] distinct candidate indices, best first; pos_mask: [B, N] (non-zero =
    positive). Returns {"recall@j": mean, "n_with_pos": rows with a positive}; the means are
    0 when no row has one (the loop then leaves them out, as officially)."""
    pos = (pos_mask > 0).astype(jnp.float32)
    hits = jnp.cumsum(jnp.take_along_axis(pos, topk.astype(jnp.int32), axis=1), axis=1)
    n_pos = jnp.sum(pos, axis=1)
    valid = (n_pos > 0).astype(jnp.float32)
    rows = jnp.sum(valid)
    out = {"n_with_pos": rows}
    for j in recall_widths(topk.shape[1]):
        per_row = hits[:, j - 1] / jnp.maximum(n_pos, 1.0)
        out[f"recall@{j}"] = jnp.sum(per_row * valid) / jnp.maximum(rows, 1.0)
    return out


def drop_empty_recall(metrics: dict) -> dict:
    """`metrics` without recall@j and n_with_pos when no row had a positive."""
    if "n_with_pos" not in metrics or float(metrics["n_with_pos"]) > 0:
        return metrics
    return {k: v for k, v in metrics.items()
            if not (k.startswith("recall@") or k == "n_with_pos")}


class MetricsLog:
    """Rows to `{workdir}/metrics.jsonl` (train rows, appended as they come, so a crash keeps
    them), TensorBoard scalars `train/*`, `eval/*` (when tensorboardX is installed) and a tqdm
    bar (stderr, when it is a terminal) showing step, loss and throughput.

    Opened at `first_step` > 0 (a resumed run), it first drops the rows of later steps (run
    after the checkpoint it resumes from, and about to be run again; the file is replaced
    atomically) and TensorBoard hides its events from step first_step + 1 on (`purge_step`),
    so each step is logged once."""

    def __init__(self, workdir: str, first_step: int, total_steps: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total = total_steps
        if first_step > 0:
            drop_rows_after(self.path, first_step)
        self.writer = _summary_writer(workdir, first_step + 1 if first_step > 0 else None)
        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                        mininterval=1.0, disable=None)

    def train(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._scalars(row, "train")
        self.bar.update(row["step"] - self.bar.n)
        self.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "mse_loss", "grad_norm",
                                                           "tokens_per_s", "recall@1")
                              if k in row})
        if row["step"] >= self.total:
            self.bar.close()

    def eval(self, row: dict) -> None:
        self._scalars(row, "eval")
        print(f"  eval @ {row['step']}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in row.items() if k != "step"))

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def _scalars(self, row: dict, prefix: str) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, row["step"])
        self.writer.flush()


def drop_rows_after(path: str, step: int) -> None:
    """Rewrites the JSONL log at `path` (if any) without its rows of steps > `step` (and
    without a last line cut short by a crash); atomic (a temporary file renamed over it)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:   # a line cut short by a crash
                continue
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _summary_writer(workdir: str, purge_step: int | None = None) -> Any:
    try:
        from tensorboardX import SummaryWriter   # optional
    except ImportError:  # pragma: no cover
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)
