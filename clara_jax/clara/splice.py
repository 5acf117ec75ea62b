"""Writing compressed documents into the memory slots of decoder prompts.

A prompt holds k documents as k runs of n memory-token placeholders, each run followed by
`<SEP>` (the official prompt text always has it, modeling_clara.py:978), starting at the
first `<MEM0>`. Document j's states replace the n positions from first + j * slot, slot =
n + 1 with `sep` and n without (M:929): without, document j > 0 starts on the `<SEP>` of
document j - 1 and the last k - 1 placeholders keep their token embeddings, as officially.
Shapes are static; no loop over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def memory_slot_positions(ids: jax.Array, first_mem_id: int, k: int, n_mem: int, sep: bool
                          ) -> jax.Array:
    """Prompt positions [B, k * n_mem] of the memory slots, document-major.

    ids [B, L]; the slots start at the first `first_mem_id` (`<MEM0>`) of each row.
    """
    start = jnp.argmax(ids == first_mem_id, axis=1)  # [B]
    slot = n_mem + (1 if sep else 0)
    offsets = (jnp.arange(k)[:, None] * slot + jnp.arange(n_mem)[None, :]).reshape(-1)
    return start[:, None] + offsets[None, :]


def splice(embeds: jax.Array, positions: jax.Array, states: jax.Array) -> jax.Array:
    """Returns embeds [B, L, D] with rows `positions` [B, P] replaced by states [B, P, D]."""
    batch = jnp.arange(embeds.shape[0])[:, None]
    return embeds.at[batch, positions].set(states.astype(embeds.dtype))
