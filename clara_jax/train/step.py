"""The train state and the training step `(state, batch) -> (state, metrics)` of every stage.

The state holds the frozen base, the adapters this stage trains (`trainable`, the only tree
the optimizer sees), the adapters it only reads (`frozen`), the optimizer state, the step and
a PRNG key for LoRA dropout. A step whose loss or gradient is not finite leaves the state
unchanged and reports `finite = 0`; the loop decides whether to stop or go on.

`optimize_mem_tokens` (as in the official code, which turns it on in its training script):
the embedding rows of the memory tokens (`<MEM0..n-1>`, or the one shared `<MEM>`) train
beside the adapters. They live in `trainable["mem_embeddings"]` [num_mem_rows, hidden] and are
written into a copy of the frozen embedding table inside the loss (rows `first_mem_token_id`
onwards, a static range), so the rest of the table gets neither gradient nor optimizer state.
`<AE>`, `<ENC>`, `<SEP>` and `lm_head` stay frozen, as officially.

The base-LM trainer (stage `base_lm`) trains every base weight: `trainable = {"base": params}`,
no adapters, `make_base_lm_step`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from clara_jax.clara import losses
from clara_jax.clara.config import TRAINABLE_ADAPTERS, ClaraConfig, canonical_stage
from clara_jax.model.mistral import Mistral
from clara_jax.train.metrics import retrieval_recall


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    base: dict
    trainable: dict
    frozen: dict
    opt_state: Any
    rng: jax.Array


def split_adapters(adapters: dict[str, dict], stage: str,
                   names: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """(trainable, frozen) adapters for a stage (`names`: those it trains; default the
    official `TRAINABLE_ADAPTERS[stage]`); KeyError naming a missing adapter."""
    names = TRAINABLE_ADAPTERS[canonical_stage(stage)] if names is None else names
    missing = [n for n in names if n not in adapters]
    if missing:
        raise KeyError(f"stage {stage!r} trains adapters {names}; missing {missing}")
    trainable = {n: adapters[n] for n in names}
    frozen = {n: a for n, a in adapters.items() if n not in names}
    return trainable, frozen


MEM_EMBEDDINGS = "mem_embeddings"


def num_mem_rows(cfg: ClaraConfig) -> int:
    """Distinct memory-token ids: n_mem, or 1 when every slot shares `<MEM>`."""
    return cfg.n_mem if cfg.different_mem_tokens else 1


def mem_embeddings_of(base: dict, cfg: ClaraConfig) -> jax.Array:
    """The memory tokens' rows [num_mem_rows, hidden] of the base embedding table."""
    start = cfg.first_mem_token_id
    return base["embed_tokens"]["embedding"][start:start + num_mem_rows(cfg)]


def with_mem_embeddings(base: dict, adapters: dict, cfg: ClaraConfig) -> tuple[dict, dict]:
    """(base, adapters) with `adapters["mem_embeddings"]`, if present, written into rows
    first_mem_token_id.. of the embedding table (a static slice: jit- and grad-friendly) and
    removed from the adapters. Without them both come back unchanged."""
    if MEM_EMBEDDINGS not in adapters:
        return base, adapters
    adapters = dict(adapters)
    rows = adapters.pop(MEM_EMBEDDINGS)
    table = base["embed_tokens"]["embedding"]
    if rows.shape != (num_mem_rows(cfg), table.shape[1]):
        raise ValueError(f"{MEM_EMBEDDINGS} has shape {tuple(rows.shape)}, expected "
                         f"({num_mem_rows(cfg)}, {table.shape[1]})")
    table = jax.lax.dynamic_update_slice_in_dim(table, rows.astype(table.dtype),
                                                cfg.first_mem_token_id, axis=0)
    return {**base, "embed_tokens": {**base["embed_tokens"], "embedding": table}}, adapters


def create_train_state(base: dict, adapters: dict[str, dict], stage: str,
                       tx: optax.GradientTransformation, rng: jax.Array,
                       trainable_names: tuple[str, ...] | None = None) -> TrainState:
    """A fresh state: optimizer state only for the stage's trainable adapters
    (`split_adapters`)."""
    trainable, frozen = split_adapters(adapters, stage, trainable_names)
    return TrainState(step=jnp.zeros((), jnp.int32), base=base, trainable=trainable,
                      frozen=frozen, opt_state=tx.init(trainable), rng=rng)


def train_mem_embeddings(state: TrainState, cfg: ClaraConfig,
                         tx: optax.GradientTransformation) -> TrainState:
    """`optimize_mem_tokens`: a fresh state that also trains the memory tokens' embedding
    rows (`trainable["mem_embeddings"]`, copied from the base; optimizer state re-made)."""
    trainable = {**state.trainable, MEM_EMBEDDINGS: mem_embeddings_of(state.base, cfg)}
    return state.replace(trainable=trainable, opt_state=tx.init(trainable))


def apply_if_finite(state: TrainState, grads: dict, loss: jax.Array,
                    tx: optax.GradientTransformation) -> tuple[dict, Any, jax.Array, jax.Array]:
    """The non-finite guard of every step: (trainable, opt_state, grad_norm, finite) after the
    optimizer update of `grads` (a tree like `state.trainable`), or the state's own trainable
    and optimizer trees where `loss` or the gradient norm is not finite (`finite` False)."""
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(trainable, state.trainable), keep(opt_state, state.opt_state), grad_norm, finite


def with_recall(metrics: dict, batch: dict) -> dict:
    """metrics plus `retrieval_recall(topk_indices, pos_mask)` when both are there."""
    if "topk_indices" in metrics and "pos_mask" in batch:
        metrics.update(retrieval_recall(metrics["topk_indices"], batch["pos_mask"]))
    return metrics


def make_train_step(model: Mistral, cfg: ClaraConfig, stage: str,
                    tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array] | None = None,
                    dropout: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns `train_step(state, batch) -> (state, metrics)` for a stage (jit it once).

    metrics: loss, ce_loss, mse_loss, grad_norm, learning_rate, finite (1.0 / 0.0), and
    topk_indices [B, k] in stage 3 and retrieval pretraining, with the official recall@j and
    n_with_pos (`with_recall`) when the batch carries pos_mask [B, N].
    """
    loss_fn = losses.stage_loss(stage)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)

        def objective(trainable):
            base, adapters = with_mem_embeddings(state.base, {**state.frozen, **trainable}, cfg)
            return loss_fn(model, base, adapters, batch, cfg, deterministic=not dropout,
                           rng=step_rng)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        trainable, opt_state, grad_norm, finite = apply_if_finite(state, grads, loss, tx)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                                  rng=rng)
        metrics = with_recall(dict(aux), batch)
        metrics.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    return train_step


def make_eval_step(model: Mistral, cfg: ClaraConfig, stage: str
                   ) -> Callable[[TrainState, dict], dict]:
    """`eval_step(state, batch) -> metrics` without dropout or updates."""
    loss_fn = losses.stage_loss(stage)

    def eval_step(state: TrainState, batch: dict) -> dict:
        base, adapters = with_mem_embeddings(state.base, {**state.frozen, **state.trainable},
                                             cfg)
        _, metrics = loss_fn(model, base, adapters, batch, cfg, deterministic=True)
        return with_recall(dict(metrics), batch)

    return eval_step


def make_base_lm_step(model: Mistral, tx: optax.GradientTransformation,
                      schedule: Callable[[jax.Array], jax.Array]
                      ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Next-token training of every base weight (`state.trainable["base"]`) on packed text:
    batch {"ids", "labels": [B, L]} (labels: the ids, padding ignored). metrics: loss,
    grad_norm, finite, learning_rate. No dropout, so the PRNG key is left as it is."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def objective(trainable):
            logits = model.apply({"params": trainable["base"]}, batch["ids"]).logits
            return losses.causal_lm_loss(logits, batch["labels"])

        loss, grads = jax.value_and_grad(objective)(state.trainable)
        trainable, opt_state, grad_norm, finite = apply_if_finite(state, grads, loss, tx)
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), {
            "loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
            "learning_rate": schedule(state.step)}

    return train_step


def make_base_lm_eval_step(model: Mistral) -> Callable[[TrainState, dict], dict]:
    """`eval_step(state, batch) -> {"loss"}`: the base LM's next-token loss on packed text."""

    def eval_step(state: TrainState, batch: dict) -> dict:
        logits = model.apply({"params": state.trainable["base"]}, batch["ids"]).logits
        return {"loss": losses.causal_lm_loss(logits, batch["labels"])}

    return eval_step
