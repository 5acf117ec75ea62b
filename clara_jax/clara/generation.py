"""Greedy answers from prompts, with or without compressed documents in memory slots.

Pure functions over (model, params, adapter, tokenizer): the `Clara` facade picks the weights
(merged adapter or not) and calls these. Prompts are left padded to a multiple of
`length_bucket` tokens, so repeated calls reuse compiled programs. With `share_prefix`, the
tokens every prompt of a batch starts with (the instruction text, up to the first memory
slot) are prefilled once, not once per row (`decode.split_shared_prefix`); the tokens are the
same either way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.clara import prompts
from clara_jax.clara.splice import splice
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.model import decode
from clara_jax.model.mistral import Mistral, embed_tokens


@dataclasses.dataclass
class GenerationOutput:
    """texts: decoded answers; token_ids: generated ids per row (EOS cut);
    topk_indices: [B, k] retrieved candidates (generate_from_questions only)."""

    texts: list[str]
    token_ids: list[list[int]]
    topk_indices: np.ndarray | None = None


def round_up(x: int, multiple: int) -> int:
    """x rounded up to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, -(-x // multiple) * multiple)


def check_texts(texts: Sequence[str], what: str) -> None:
    """ValueError naming `what`[i] unless texts is a non-empty list of non-blank strings."""
    if len(texts) == 0:
        raise ValueError(f"no {what} given")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{what}[{i}] is empty or not a string")


def equal_count(groups: Sequence[Sequence[str]], b: int) -> int:
    """The common length of every group (documents per question); ValueError otherwise."""
    if len(groups) != b:
        raise ValueError(f"{len(groups)} document lists for {b} questions")
    counts = {len(g) for g in groups}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every question needs the same, non-zero number of documents; got "
                         f"{sorted(counts)}")
    return counts.pop()


def memory_prompts(tok: ClaraTokenizer, questions: Sequence[str], k: int, stage: str,
                   length_bucket: int, instruction: int | None = 0, sep: bool = True
                   ) -> prompts.DecoderBatch:
    """Generation prompts with k memory slots per row (`prompts.generation_prompts`; slot
    stride n + 1 with `sep`, n without), left padded to the longest row rounded up to a
    multiple of length_bucket."""
    probe = prompts.generation_prompts(tok, questions, k=k, max_len=100_000, stage=stage,
                                       instruction=instruction, sep=sep)
    longest = int(probe.attention_mask.sum(1).max())
    return prompts.generation_prompts(tok, questions, k=k,
                                      max_len=round_up(longest, length_bucket), stage=stage,
                                      instruction=instruction, sep=sep)


def text_prompts(tok: ClaraTokenizer, rows: Sequence[str], length_bucket: int
                 ) -> prompts.DecoderBatch:
    """Plain-text prompts (no memory slots), left padded to a multiple of length_bucket."""
    longest = max(len(tok.encode(r)) for r in rows)
    return prompts.build_decoder_batch(tok, [(r, None) for r in rows], 0,
                                       round_up(longest, length_bucket))


def split_prefix(tok: ClaraTokenizer, batch: prompts.DecoderBatch, length_bucket: int,
                 share_prefix: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, jax.Array | None]:
    """(ids, mask, mem_positions, prefix ids [1, P] or None): with share_prefix, the batch
    without the instruction text its rows share (with memory slots, everything before the
    first one; without, the answer prompt's system message); otherwise the batch as it is and
    None. Document text that rows happen to share is not split off, so the saving is the one
    any batch of questions gets."""
    ids, mask, mem = batch.input_ids, batch.attention_mask, batch.mem_positions
    if not share_prefix:
        return ids, mask, mem, None
    if mem.shape[1]:
        limit = int((mem[:, 0] - (ids.shape[1] - mask.sum(1))).min())
    else:
        limit = len(tok.encode(prompts.system_prefix(prompts.SYSTEM_ANSWER, tok)))
    prefix, ids_s, mask_s = decode.split_shared_prefix(ids, mask, limit, length_bucket)
    if prefix.shape[1] == 0:
        return ids, mask, mem, None
    return ids_s, mask_s, mem - (ids.shape[1] - ids_s.shape[1]), jnp.asarray(prefix)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def _generate_spliced(model, params, adapter, ids, mask, positions, states, max_new_tokens,
                      eos_id, pad_id, prefix_ids=None):
    embeds = embed_tokens(params, ids, jnp.dtype(model.config.dtype))
    embeds = splice(embeds, positions, states)
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    return decode.generate(model, variables, inputs_embeds=embeds, attention_mask=mask,
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                           prefix_ids=prefix_ids)


def _decoded(tok: ClaraTokenizer, out: jax.Array) -> tuple[list[str], list[list[int]]]:
    ids = decode.trim(out, eos_id=tok.eos_id)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in ids], ids


def generate_from_memory(model: Mistral, params: dict, adapter: dict | None,
                         tok: ClaraTokenizer, batch: prompts.DecoderBatch, states: np.ndarray,
                         max_new_tokens: int, *, length_bucket: int, share_prefix: bool = True
                         ) -> GenerationOutput:
    """Greedy answers to `batch` (k memory slots per row) with states [B, k, n, D] spliced
    into its slots, under `adapter` (None: params alone)."""
    b, k, n, d = states.shape
    ids, mask, mem, prefix = split_prefix(tok, batch, length_bucket, share_prefix)
    out = _generate_spliced(model, params, adapter, jnp.asarray(ids), jnp.asarray(mask),
                            jnp.asarray(mem), jnp.asarray(states.reshape(b, k * n, d)),
                            max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, prefix_ids=prefix)
    return GenerationOutput(*_decoded(tok, out))


def generate_from_text(model: Mistral, params: dict, adapter: dict | None, tok: ClaraTokenizer,
                       rows: Sequence[str], max_new_tokens: int, *, length_bucket: int,
                       share_prefix: bool = True) -> GenerationOutput:
    """Greedy answers to plain-text prompts `rows` under `adapter` (None: params alone)."""
    batch = text_prompts(tok, rows, length_bucket)
    ids, mask, _, prefix = split_prefix(tok, batch, length_bucket, share_prefix)
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    out = decode.generate(model, variables, input_ids=jnp.asarray(ids),
                          attention_mask=jnp.asarray(mask), max_new_tokens=max_new_tokens,
                          eos_id=tok.eos_id, pad_id=tok.pad_id, prefix_ids=prefix)
    return GenerationOutput(*_decoded(tok, out))
