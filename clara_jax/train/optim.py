"""Optimizer: AdamW over the trainable trees only, with clipping, a schedule, accumulation.

The official recipe: AdamW betas (0.9, 0.95), gradient clipping at max_grad_norm 1.0, and
Hugging Face's `cosine_with_min_lr` schedule (cosine decay to min_lr_ratio x lr after a
linear warmup over warmup_ratio of the steps) except in stage 2 (end to end), whose script
sets `--lr_scheduler constant` (the peak rate at every step, no warmup). Frozen base weights
are never passed to the optimizer, so they carry no optimizer state.
"""

from __future__ import annotations

import optax


# config.lr_schedule values.
SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_ratio: float = 0.03,
                           min_lr_ratio: float = 0.1, kind: str = "cosine") -> optax.Schedule:
    """The learning rate at each optimizer step. "cosine": linear warmup from 0 to
    learning_rate over warmup_ratio of total_steps, then cosine to min_lr_ratio *
    learning_rate; "constant": learning_rate at every step (warmup_ratio and min_lr_ratio
    unused, as in Hugging Face's `constant` schedule)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return optax.constant_schedule(learning_rate)
    warmup = max(int(round(warmup_ratio * total_steps)), 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=min_lr_ratio * learning_rate)


def make_optimizer(learning_rate: float, total_steps: int, *, warmup_ratio: float = 0.03,
                   min_lr_ratio: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                   accumulation_steps: int = 1, lr_schedule: str = "cosine"
                   ) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the schedule above (`lr_schedule` its kind);
    `accumulation_steps` > 1 wraps it in optax.MultiSteps (an update every N micro-batches,
    gradients averaged)."""
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_ratio, min_lr_ratio,
                                      lr_schedule)
    tx = optax.chain(
        optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
    )
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
    return tx
