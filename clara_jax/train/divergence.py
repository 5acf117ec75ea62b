"""When a training run has diverged: the checks the loop makes at its log rows and before
every checkpoint, each ending the run with `errors.DivergenceError` (one line naming the step
and the check; no model is exported; summary.json records `"diverged"`).

  * non-finite loss or gradient with `on_nonfinite = "stop"` (the loop checks every step);
  * with `on_nonfinite = "skip"`: more than `max_skipped_fraction` of the steps of this
    process skipped, checked at log rows once `MIN_STEPS_FOR_SKIP_FRACTION` steps are done
    and at the last step;
  * a dead gradient: grad norm exactly 0 at `divergence.zero_grad_rows` consecutive log rows;
  * a loss stuck at chance: the next-token loss within `divergence.chance_tolerance` nats of
    ln(vocabulary) at `divergence.chance_rows` consecutive log rows, all after the warm-up
    (`warmup_ratio` of the steps, and at least `chance_rows` log rows into the run). A model
    whose output is uniform has exactly that loss on every batch, whatever the batch; a
    model that is still learning moves by more than the tolerance (1e-3 nats by default)
    between rows, so a healthy run, even one starting near chance, does not trip it;
  * parameters not finite or larger than `divergence.max_abs_param` (max |w| of the trained
    tree) at a log row or before a checkpoint: such a state is never saved, so "the last
    good checkpoint" always holds finite, bounded weights.

These are host-side checks of values the loop already fetches at its log rows (plus one
reduction over the trained parameters), so they add no device synchronisation per step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from clara_jax.errors import DivergenceError

MIN_STEPS_FOR_SKIP_FRACTION = 20


@jax.jit
def max_abs(tree) -> jax.Array:
    """max |x| over every leaf of `tree` (NaN if any leaf holds a NaN), as float32."""
    leaves = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)
              if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(0.0)


class Guard:
    """The divergence checks of one run (this process's part of it, from `first_step`)."""

    def __init__(self, c: ml_collections.ConfigDict, vocab_size: int, first_step: int):
        d = c.divergence   # fields and defaults: configs/common.py
        self.zero_grad_rows = int(d.zero_grad_rows)
        self.chance_rows = int(d.chance_rows)
        self.chance_tolerance = float(d.chance_tolerance)
        self.max_abs_param = float(d.max_abs_param)
        self.max_skipped_fraction = float(c.max_skipped_fraction)
        self.chance_loss = math.log(vocab_size)
        self.base_lm = c.stage == "base_lm"
        self.warmup_steps = int(c.warmup_ratio * c.total_steps)
        self.first_step = self.step = first_step
        self.skipped = 0
        self.last: dict = {}   # the loop's last log row
        self.rows = 0
        self.zero_run = 0
        self.chance_run = 0

    def row(self, step: int, metrics: dict) -> None:
        """The checks of a log row after `step` steps; `metrics` holds host scalars
        (grad_norm, loss, and ce_loss in the CLaRa stages)."""
        self.step, self.rows = step, self.rows + 1
        grad_norm = float(metrics.get("grad_norm", math.nan))
        self.zero_run = self.zero_run + 1 if grad_norm == 0.0 else 0
        if self.zero_grad_rows and self.zero_run >= self.zero_grad_rows:
            raise DivergenceError(
                f"diverged at step {step}: grad norm exactly 0 at {self.zero_run} log rows in a "
                f"row (divergence.zero_grad_rows={self.zero_grad_rows}); nothing trains any more")
        # The next-token loss: ce_loss of the CLaRa stages, loss of the base LM (retrieval
        # pretraining has none, so its rows never count).
        loss = float(metrics.get("ce_loss", metrics.get("loss", math.nan) if self.base_lm
                                 else math.nan))
        at_chance = (abs(loss - self.chance_loss) < self.chance_tolerance
                     and step > self.warmup_steps and self.rows > self.chance_rows)
        self.chance_run = self.chance_run + 1 if at_chance else 0
        if self.chance_rows and self.chance_run >= self.chance_rows:
            raise DivergenceError(
                f"diverged at step {step}: loss {loss:.6f} within "
                f"{self.chance_tolerance} of ln(vocabulary) = {self.chance_loss:.6f} (a uniform "
                f"output) at {self.chance_run} log rows in a row (divergence.chance_rows)")

    def skips(self, step: int, skipped: int, final: bool) -> None:
        """With on_nonfinite=skip: `skipped` of the steps since `first_step` were skipped."""
        self.step, self.skipped = step, skipped
        done = step - self.first_step
        if done <= 0 or not (final or done >= MIN_STEPS_FOR_SKIP_FRACTION):
            return
        if skipped / done > self.max_skipped_fraction:
            raise DivergenceError(
                f"diverged at step {step}: {skipped} of {done} steps skipped for a non-finite "
                f"loss or gradient, more than max_skipped_fraction={self.max_skipped_fraction}")

    def params(self, step: int, trained) -> None:
        """Raises unless every trained parameter is finite and below max_abs_param."""
        value = float(max_abs(trained))
        if not value < self.max_abs_param:   # also NaN
            raise DivergenceError(
                f"diverged at step {step}: max |parameter| = {value:.3g} (bound "
                f"divergence.max_abs_param={self.max_abs_param:g}); this state is not "
                f"checkpointed")
