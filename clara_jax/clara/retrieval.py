"""The query reasoner and retrieval in the compressed space.

A question is encoded like a document (memory tokens appended) through the `query_reasoner`
adapter; its n memory states, flattened to n * D, are compared to flattened candidate
documents by cosine similarity.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.clara import prompts
from clara_jax.clara.compress import encode_memory_states, map_in_padded_batches
from clara_jax.clara.tokenizer import ClaraTokenizer
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


_encode_queries_jit = jax.jit(encode_queries, static_argnames=("model", "n_mem"))


def encode_question_texts(model: Mistral, base: dict, adapter: dict | None,
                          tok: ClaraTokenizer, questions: Sequence[str], doc_max_length: int,
                          n_mem: int, batch_size: int) -> np.ndarray:
    """Query representations [len(questions), n_mem * D] (questions encoded like documents,
    in fixed-size batches)."""
    ids, mask, _ = prompts.encode_documents(tok, questions, doc_max_length, n_mem)
    fn = lambda i, m: _encode_queries_jit(model, base, adapter, jnp.asarray(i), jnp.asarray(m),
                                          n_mem)
    return map_in_padded_batches(fn, ids, mask, batch_size)


def top_k(queries: jax.Array, candidates: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best of candidates [B, N, ...] (flattened per candidate) by cosine with
    queries [B, F]: (indices [B, k], scores [B, k]), descending."""
    b, n = candidates.shape[:2]
    scores = cosine_scores(queries, candidates.reshape(b, n, -1))
    top_scores, top_idx = jax.lax.top_k(scores, k)
    return top_idx, top_scores
