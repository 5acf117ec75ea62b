"""One loss function per CLaRa stage, pure over (base, adapters, batch).

Batches (numpy or jax arrays, static shapes):
  pretrain / instruct: doc_ids, doc_mask [B, k, Le]; prompt_ids, prompt_mask, labels [B, L]
  end_to_end: query_ids, query_mask [B, Lq]; doc_ids, doc_mask [B, N, Le] or (cached)
              doc_states [B, N, n, D] or (candidate cache) doc_index [B, N] int rows of
              doc_table [U, n, D]; prompt_ids, prompt_mask, labels [B, L]
  retrieval_pretrain: query_ids, query_mask; doc_ids, doc_mask or doc_states; pos_mask [B, N]
Labels are aligned with prompt_ids (-100 = no loss) and shifted inside the loss, as in
Hugging Face. Each function returns (loss, metrics dict of scalars / small arrays).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clara_jax.clara import compress as compress_lib
from clara_jax.clara import retrieval
from clara_jax.clara.config import ClaraConfig, canonical_stage
from clara_jax.clara.splice import memory_slot_positions, splice
from clara_jax.clara.topk import straight_through_topk
from clara_jax.model.mistral import Mistral, embed_tokens

IGNORE = -100


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (float32): logits [B, L, V] at t predict labels[t + 1]."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def _split(rng: jax.Array | None, n: int) -> list:
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def generator_loss(model: Mistral, base: dict, decoder_adapter: dict, cfg: ClaraConfig,
                   prompt_ids: jax.Array, prompt_mask: jax.Array, labels: jax.Array,
                   doc_states: jax.Array, *, deterministic: bool, rng: jax.Array | None
                   ) -> jax.Array:
    """Cross-entropy of the generator answering from doc_states [B, k, n, D] spliced into
    the prompt's memory slots."""
    b, k, n, d = doc_states.shape
    embeds = embed_tokens(base, prompt_ids, jnp.dtype(model.config.dtype))
    positions = memory_slot_positions(prompt_ids, cfg.first_mem_token_id, k, n, cfg.sep)
    embeds = splice(embeds, positions, doc_states.reshape(b, k * n, d))
    out = model.apply({"params": base, "lora": decoder_adapter}, inputs_embeds=embeds,
                      attention_mask=prompt_mask, deterministic=deterministic,
                      rngs=None if deterministic else {"dropout": rng})
    return causal_lm_loss(out.logits, labels)


def compressed_generation_loss(model: Mistral, base: dict, adapters: dict, batch: dict,
                               cfg: ClaraConfig, *, deterministic: bool = True,
                               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Stages 1 and 2 (SCP pretraining, instruction tuning): compress the k documents with
    the encoder adapter, answer with the decoder adapter; loss = CE + mse_weight * MSE."""
    r_enc, r_dec = _split(rng, 2)
    b, k, le = batch["doc_ids"].shape
    states, mse = compress_lib.compress(
        model, base, adapters["encoder"], batch["doc_ids"].reshape(b * k, le),
        batch["doc_mask"].reshape(b * k, le), cfg.n_mem, deterministic=deterministic, rng=r_enc)
    ce = generator_loss(model, base, adapters["decoder"], cfg, batch["prompt_ids"],
                        batch["prompt_mask"], batch["labels"],
                        states.reshape(b, k, cfg.n_mem, -1),
                        deterministic=deterministic, rng=r_dec)
    loss = ce + cfg.mse_weight * mse
    return loss, {"loss": loss, "ce_loss": ce, "mse_loss": mse}


def candidate_states(model: Mistral, base: dict, adapters: dict, batch: dict, cfg: ClaraConfig,
                     *, deterministic: bool, rng: jax.Array | None) -> tuple[jax.Array, Any]:
    """Candidate memory states [B, N, n, D] under stop_gradient (the encoder is frozen in
    stage 3): gathered from the candidate cache (`doc_table` [U, n, D] at `doc_index`
    [B, N]), from the batch's `doc_states`, or compressed from `doc_ids`. The cached paths
    skip the encoder and report mse_loss 0."""
    if "doc_index" in batch:
        return jax.lax.stop_gradient(jnp.take(batch["doc_table"], batch["doc_index"], axis=0)
                                     ), jnp.float32(0.0)
    if "doc_states" in batch:
        return jax.lax.stop_gradient(batch["doc_states"]), jnp.float32(0.0)
    b, nc, le = batch["doc_ids"].shape
    states, mse = compress_lib.compress(
        model, base, adapters["encoder"], batch["doc_ids"].reshape(b * nc, le),
        batch["doc_mask"].reshape(b * nc, le), cfg.n_mem, deterministic=deterministic, rng=rng)
    return jax.lax.stop_gradient(states.reshape(b, nc, cfg.n_mem, -1)), jax.lax.stop_gradient(mse)


def retrieval_scores(model: Mistral, base: dict, adapters: dict, batch: dict, cfg: ClaraConfig,
                     docs: jax.Array, *, deterministic: bool, rng: jax.Array | None
                     ) -> jax.Array:
    """Cosine scores [B, N] of the query reasoner's states against candidates docs [B, N, n, D]."""
    q = retrieval.encode_queries(model, base, adapters["query_reasoner"], batch["query_ids"],
                                 batch["query_mask"], cfg.n_mem, deterministic=deterministic,
                                 rng=rng)
    return retrieval.cosine_scores(q, docs.reshape(*docs.shape[:2], -1))


def end_to_end_loss(model: Mistral, base: dict, adapters: dict, batch: dict, cfg: ClaraConfig,
                    *, deterministic: bool = True, rng: jax.Array | None = None
                    ) -> tuple[jax.Array, dict]:
    """Stage 3: query reasoner -> cosine -> straight-through top-k -> generator.

    Only the next-token loss trains (query reasoner and decoder adapters); no relevance labels.
    """
    r_enc, r_q, r_dec = _split(rng, 3)
    docs, mse = candidate_states(model, base, adapters, batch, cfg, deterministic=deterministic,
                                 rng=r_enc)
    scores = retrieval_scores(model, base, adapters, batch, cfg, docs,
                              deterministic=deterministic, rng=r_q)
    weights, topk = straight_through_topk(scores, cfg.generation_top_k, cfg.temperature)
    selected = jnp.einsum("bkn,bnmd->bkmd", weights.astype(docs.dtype), docs)
    ce = generator_loss(model, base, adapters["decoder"], cfg, batch["prompt_ids"],
                        batch["prompt_mask"], batch["labels"], selected,
                        deterministic=deterministic, rng=r_dec)
    return ce, {"loss": ce, "ce_loss": ce, "mse_loss": mse, "topk_indices": topk}


def retrieval_pretrain_loss(model: Mistral, base: dict, adapters: dict, batch: dict,
                            cfg: ClaraConfig, *, deterministic: bool = True,
                            rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Multi-positive InfoNCE over `pos_mask` [B, N] at `retrieval_temperature`; rows without
    positives are left out of the mean (as in the official code)."""
    r_enc, r_q = _split(rng, 2)
    docs, mse = candidate_states(model, base, adapters, batch, cfg, deterministic=deterministic,
                                 rng=r_enc)
    logits = retrieval_scores(model, base, adapters, batch, cfg, docs,
                              deterministic=deterministic, rng=r_q) / cfg.retrieval_temperature
    pos = batch["pos_mask"].astype(bool)
    num = jax.nn.logsumexp(jnp.where(pos, logits, -jnp.inf), axis=-1)
    den = jax.nn.logsumexp(logits, axis=-1)
    valid = jnp.any(pos, axis=-1)
    per_row = jnp.where(valid, den - num, 0.0)
    loss = jnp.sum(per_row) / jnp.maximum(jnp.sum(valid), 1)
    k = min(cfg.generation_top_k, logits.shape[-1])
    return loss, {"loss": loss, "mse_loss": mse, "topk_indices": jax.lax.top_k(logits, k)[1]}


def stage_loss(stage: str):
    """The loss function of a stage (ours or Apple's name)."""
    return {"pretrain": compressed_generation_loss, "instruct": compressed_generation_loss,
            "end_to_end": end_to_end_loss,
            "retrieval_pretrain": retrieval_pretrain_loss}[canonical_stage(stage)]
