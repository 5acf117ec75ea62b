"""The query reasoner and retrieval in the compressed space.

A question is encoded like a document (memory tokens appended) through the `query_reasoner`
adapter; its n memory states, flattened to n * D, are compared to flattened candidate
documents by cosine similarity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clara_jax.clara.compress import encode_memory_states
from clara_jax.model.mistral import Mistral


def encode_queries(model: Mistral, base: dict, adapter: dict, ids: jax.Array, mask: jax.Array,
                   n_mem: int, *, deterministic: bool = True, rng: jax.Array | None = None
                   ) -> jax.Array:
    """Query representations [B, n_mem * D] from query encoder inputs ids, mask [B, L]."""
    hidden = encode_memory_states(model, base, adapter, ids, mask, n_mem,
                                  deterministic=deterministic, rng=rng)
    return hidden[:, -n_mem:].reshape(hidden.shape[0], -1)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def cosine_scores(queries: jax.Array, docs: jax.Array) -> jax.Array:
    """Cosine similarity [B, N] (float32) of queries [B, F] with candidates docs [B, N, F]."""
    q = l2_normalize(queries.astype(jnp.float32))
    d = l2_normalize(docs.astype(jnp.float32))
    return jnp.einsum("bf,bnf->bn", q, d)
