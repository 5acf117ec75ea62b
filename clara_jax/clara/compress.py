"""Memory-token compression: a document's final hidden states at its memory tokens.

The encoder input is `<ENC><s>{text}</s>`, left padded to doc_max_length + 3, followed by the
n memory tokens (see `prompts.encode_documents`), so the memory tokens are always the last n
positions. It runs through the frozen base under the `encoder` adapter with Hugging Face's
default positions (0..L-1, padding included), as the official code does; only the final
(normed) hidden states are computed, never the vocabulary projection.

`compress_texts` (`compress_texts_and_mse` with the per-document MSE term) runs this on
strings in fixed-size batches (one compiled program).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.clara import prompts
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.model.mistral import Mistral


def encode_memory_states(model: Mistral, base: dict, adapter: dict | None, ids: jax.Array,
                         mask: jax.Array, n_mem: int, *, deterministic: bool = True,
                         rng: jax.Array | None = None) -> jax.Array:
    """Final hidden states of the whole encoder input [N, L, D] (L = text slots + n_mem)."""
    variables = {"params": base} if adapter is None else {"params": base, "lora": adapter}
    rngs = None if deterministic else {"dropout": rng}
    out = model.apply(variables, ids, attention_mask=mask, deterministic=deterministic,
                      compute_logits=False, rngs=rngs)
    return out.hidden_states


def memory_alignment_mse_rows(hidden: jax.Array, mask: jax.Array, n_mem: int) -> jax.Array:
    """Per document [N]: MSE (over features) between the mean hidden state over memory
    positions and over the other attended positions.

    hidden [N, L, D]; mask [N, L] (1 = attended); memory tokens are the last n_mem positions.
    """
    hidden = hidden.astype(jnp.float32)
    attended = mask.astype(jnp.float32)
    is_mem = (jnp.arange(hidden.shape[1]) >= hidden.shape[1] - n_mem).astype(jnp.float32)
    mem_w = attended * is_mem
    text_w = attended * (1.0 - is_mem)
    mem_mean = jnp.einsum("nl,nld->nd", mem_w, hidden) / jnp.sum(mem_w, 1, keepdims=True)
    text_mean = jnp.einsum("nl,nld->nd", text_w, hidden) / jnp.maximum(
        jnp.sum(text_w, 1, keepdims=True), 1.0)
    return jnp.mean((text_mean - mem_mean) ** 2, axis=-1)


def memory_alignment_mse(hidden: jax.Array, mask: jax.Array, n_mem: int) -> jax.Array:
    """`memory_alignment_mse_rows` averaged over documents: the official `mse_loss` (mean over
    documents and features)."""
    return jnp.mean(memory_alignment_mse_rows(hidden, mask, n_mem))


def compress(model: Mistral, base: dict, adapter: dict | None, ids: jax.Array, mask: jax.Array,
             n_mem: int, *, deterministic: bool = True, rng: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Compresses documents: ids, mask [N, L] -> (memory states [N, n_mem, D], mse scalar)."""
    hidden = encode_memory_states(model, base, adapter, ids, mask, n_mem,
                                  deterministic=deterministic, rng=rng)
    return hidden[:, -n_mem:], memory_alignment_mse(hidden, mask, n_mem)


@functools.partial(jax.jit, static_argnames=("model", "n_mem"))
def compress_jit(model: Mistral, base: dict, adapter: dict | None, ids: jax.Array,
                 mask: jax.Array, n_mem: int) -> tuple[jax.Array, jax.Array]:
    """Jitted `compress`: (memory states [B, n, D], MSE term) in eval mode."""
    return compress(model, base, adapter, ids, mask, n_mem)


@functools.partial(jax.jit, static_argnames=("model", "n_mem"))
def compress_rows_jit(model: Mistral, base: dict, adapter: dict | None, ids: jax.Array,
                      mask: jax.Array, n_mem: int) -> tuple[jax.Array, jax.Array]:
    """Jitted, eval mode: (memory states [B, n, D], per-document MSE term [B])."""
    hidden = encode_memory_states(model, base, adapter, ids, mask, n_mem)
    return hidden[:, -n_mem:], memory_alignment_mse_rows(hidden, mask, n_mem)


def map_in_padded_batches(fn: Callable[[np.ndarray, np.ndarray], Any],
                          ids: np.ndarray, mask: np.ndarray, batch_size: int) -> Any:
    """fn(ids, mask) over rows [R, L] in batches of exactly batch_size rows (the last one
    padded by repeating its final row, so one compiled program serves every batch); the
    outputs' first R rows, concatenated (numpy; fn may return a tuple of arrays, each
    [batch_size, ...])."""
    outs = []
    for start in range(0, len(ids), batch_size):
        cid, cmask = ids[start:start + batch_size], mask[start:start + batch_size]
        n = len(cid)
        if n < batch_size:
            cid = np.concatenate([cid, np.repeat(cid[-1:], batch_size - n, 0)])
            cmask = np.concatenate([cmask, np.repeat(cmask[-1:], batch_size - n, 0)])
        outs.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[:n], fn(cid, cmask)))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)


def compress_texts_and_mse(model: Mistral, base: dict, adapter: dict | None,
                           tok: ClaraTokenizer, texts: Sequence[str], doc_max_length: int,
                           n_mem: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(memory states [len(texts), n_mem, D], per-document MSE term [len(texts)]), float32,
    of texts encoded as documents (cut at doc_max_length tokens, as the official code does)."""
    ids, mask, _ = prompts.encode_documents(tok, texts, doc_max_length, n_mem)
    fn = lambda i, m: compress_rows_jit(model, base, adapter, jnp.asarray(i), jnp.asarray(m),
                                        n_mem)
    states, mse = map_in_padded_batches(fn, ids, mask, batch_size)
    return states.astype(np.float32), mse.astype(np.float32)


def compress_texts(model: Mistral, base: dict, adapter: dict | None, tok: ClaraTokenizer,
                   texts: Sequence[str], doc_max_length: int, n_mem: int, batch_size: int
                   ) -> np.ndarray:
    """Memory states [len(texts), n_mem, D] (float32): `compress_texts_and_mse` without the
    MSE (one compiled program for both)."""
    return compress_texts_and_mse(model, base, adapter, tok, texts, doc_max_length, n_mem,
                                  batch_size)[0]
