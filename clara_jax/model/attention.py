"""The single attention entry point, its masks, and the KV-cache update.

Every attention call in the project goes through `attend`, so the kernel (XLA, cuDNN flash
attention on GPU, a Pallas kernel on TPU) is chosen in one place by `MistralConfig.attention_impl`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(key_valid: jax.Array, query_slots: jax.Array, sliding_window: int = 0
                   ) -> jax.Array:
    """Boolean mask [B, T, S]: causal over slots, key padding, optional sliding window.

    key_valid: [B, S] bool, False for padding (and for cache slots not yet written).
    query_slots: [B, T] or [T] int, the slot index of each query in the key sequence.
    A query at slot t sees key slot s iff key_valid[s], s <= t and (no window or t - s < window),
    which is Hugging Face Mistral's rule.
    """
    s = jnp.arange(key_valid.shape[-1])
    t = query_slots[..., :, None]
    mask = (s <= t) & key_valid[..., None, :]
    if sliding_window:
        mask &= (t - s) < sliding_window
    if mask.ndim == 2:
        mask = mask[None]
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "xla"
           ) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    q: [B, T, H, hd]; k, v: [B, S, K, hd] with H % K == 0; mask: [B, T, S] bool.
    Returns [B, T, H, hd] in q's dtype. Rows with no visible key return a finite average
    (their outputs are padding and never read).
    """
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention_impl must be 'xla' or 'cudnn', got {impl!r}")
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)


def update_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes new [B, T, K, hd] into cache [B, S, K, hd] at slots index..index+T-1."""
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)
