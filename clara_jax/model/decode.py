"""Autoregressive decoding with a KV cache: prefill, a single-token step, greedy or sampling.

The whole generation (prefill plus a `lax.while_loop` over `decode_step`) is one jitted
program per (batch, prompt length, max_new_tokens) shape, and stops early once every row has
produced EOS. Prompts are left padded; positions follow Hugging Face's `generate`
(cumulative count of real tokens), so greedy outputs match `MistralForCausalLM.generate`.

Rows that start with the same tokens (CLaRa's prompts share their instruction text) can pass
that prefix once: `split_shared_prefix` cuts it off the batch, `generate(prefix_ids=...)` runs
it for one row and copies its keys and values to every row of the cache. Masked padding
contributes nothing and positions are unchanged, so the result is the same as prefilling every
row in full (up to float summation order).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.model.config import MistralConfig
from clara_jax.model.mistral import Mistral, project_logits


class GenerateOutput(NamedTuple):
    """tokens [B, max_new_tokens] (pad_id after EOS), lengths [B] (tokens up to and including
    EOS, or max_new_tokens)."""

    tokens: jax.Array
    lengths: jax.Array


def init_cache(config: MistralConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """Empty KV cache: k, v [L, B, S, K, hd], valid [B, S] bool, index () int32."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, T] of a left-padded prompt: 0 at the first real token (pads get 1, as in HF)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, 1)


def split_shared_prefix(ids: np.ndarray, mask: np.ndarray, limit: int | None = None,
                        bucket: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits left-padded prompts [B, T] into the prefix every row starts with and the rest.

    Returns (prefix [1, P], suffix ids [B, S], suffix mask [B, S]): P is the longest common
    prefix of the rows' real tokens, at most `limit` tokens and leaving every row at least
    one; the suffix is the last S columns of the batch (S = the longest remainder rounded up
    to `bucket`, at most T) with the prefix tokens masked out. A column j of the batch is
    column j - (T - S) of the suffix. P may be 0 (prefix of shape [1, 0]).
    """
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    t = ids.shape[1]
    lengths = mask.sum(1)
    starts = t - lengths  # first real column of each row (left padding)
    shortest = int(lengths.min())
    # Every row's first `shortest` real tokens, aligned.
    rows = np.take_along_axis(ids, starts[:, None] + np.arange(shortest), axis=1)
    same = np.all(rows == rows[:1], axis=0)
    p = shortest if same.all() else int(np.argmin(same))
    p = max(0, min(p, shortest - 1, t if limit is None else limit))
    rest = int((lengths - p).max())
    s = min(t, max(bucket, -(-rest // bucket) * bucket))
    cols = np.arange(t - s, t)
    suffix_mask = mask[:, t - s:] & (cols[None, :] >= (starts + p)[:, None])
    return (rows[:1, :p].astype(np.int32), ids[:, t - s:].astype(np.int32),
            suffix_mask.astype(np.int32))


def select_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float
                 ) -> jax.Array:
    """Next token [B] from logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Smallest set whose mass reaches top_p: keep tokens whose preceding mass is < top_p.
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode_step(model: Mistral, variables: dict, token: jax.Array, position: jax.Array,
                cache: dict) -> tuple[jax.Array, dict]:
    """One token per row: token [B], position [B] -> (logits [B, V], advanced cache)."""
    out = model.apply(variables, token[:, None], positions=position[:, None], kv_cache=cache,
                      compute_logits=False)
    return project_logits(variables["params"], out.hidden_states[:, -1]), out.kv_cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id",
                                             "temperature", "top_p"))
def generate(model: Mistral, variables: dict, *, input_ids: jax.Array | None = None,
             inputs_embeds: jax.Array | None = None, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 32, eos_id: int = 2, pad_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None,
             prefix_ids: jax.Array | None = None) -> GenerateOutput:
    """Generates up to max_new_tokens after a left-padded prompt.

    input_ids [B, T] or inputs_embeds [B, T, D]; attention_mask [B, T] (1 = token).
    prefix_ids [1, P]: tokens that come before every row's prompt (`split_shared_prefix`),
    prefilled once. variables: {"params": base[, "lora": adapter]}. Greedy unless
    temperature > 0.
    """
    x = input_ids if input_ids is not None else inputs_embeds
    batch, length = x.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((batch, length), jnp.int32)
    if rng is None:
        rng = jax.random.key(0)
    offset = 0 if prefix_ids is None else prefix_ids.shape[1]
    size = offset + length + max_new_tokens
    if offset:
        pre = model.apply(variables, prefix_ids, kv_cache=init_cache(model.config, 1, size),
                          compute_logits=False).kv_cache
        cache = {"k": jnp.repeat(pre["k"], batch, axis=1),
                 "v": jnp.repeat(pre["v"], batch, axis=1),
                 "valid": jnp.repeat(pre["valid"], batch, axis=0), "index": pre["index"]}
    else:
        cache = init_cache(model.config, batch, size)
    out = model.apply(variables, input_ids, inputs_embeds=inputs_embeds,
                      attention_mask=attention_mask,
                      positions=offset + prompt_positions(attention_mask),
                      kv_cache=cache, compute_logits=False)
    logits = project_logits(variables["params"], out.hidden_states[:, -1])
    next_pos = offset + jnp.sum(attention_mask.astype(jnp.int32), axis=1)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, logits, cache, done, pos, rng = state
        rng, sub = jax.random.split(rng)
        token = jnp.where(done, pad_id, select_token(logits, sub, temperature, top_p))
        tokens = tokens.at[:, step].set(token)
        done = done | (token == eos_id)
        logits, cache = decode_step(model, variables, token, pos, cache)
        return step + 1, tokens, logits, cache, done, pos + 1, rng

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), tokens, logits, out.kv_cache,
             jnp.zeros((batch,), bool), next_pos, rng)
    _, tokens, _, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    is_eos = tokens == eos_id
    first_eos = jnp.argmax(is_eos, axis=1)
    lengths = jnp.where(jnp.any(is_eos, axis=1), first_eos + 1, max_new_tokens)
    return GenerateOutput(tokens, lengths.astype(jnp.int32))


def trim(output: GenerateOutput, eos_id: int, keep_eos: bool = False) -> list[list[int]]:
    """Generated ids per row as Python lists, cut at EOS (EOS itself dropped unless keep_eos)."""
    tokens, lengths = jax.device_get((output.tokens, output.lengths))
    rows = []
    for row, n in zip(tokens, lengths):
        ids = [int(t) for t in row[:int(n)]]
        if ids and ids[-1] == eos_id and not keep_eos:
            ids = ids[:-1]
        rows.append(ids)
    return rows
