"""Straight-through top-k: hard top-k forward, softmax relaxation backward (`jax.custom_vjp`).

The relaxation is the official one (apple/ml-clara, openrlhf/models/modeling_clara.py,
`differentiable_topk`): with s = scores / temperature, slot j is
    p_j = softmax(s + log(1 - taken_j + 1e-8)),  taken_j = min(sum_{i<j} hard_i, 1),
where hard_i is the one-hot of the i-th highest score and `taken` carries no gradient. The
forward value is the hard selection (W = hard + p - stop_gradient(p)); the gradient is that
of p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def hard_topk(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """One-hots [B, k, N] (slots in descending score order, ties as lax.top_k) and indices
    [B, k] int32."""
    n = scores.shape[-1]
    if k > n:
        raise ValueError(f"k={k} is larger than the number of candidates N={n}")
    _, idx = jax.lax.top_k(scores, k)
    return jax.nn.one_hot(idx, n, dtype=scores.dtype), idx.astype(jnp.int32)


def soft_topk_relaxation(scores: jax.Array, k: int, temperature: float) -> jax.Array:
    """The relaxation p [B, k, N] (see the module docstring); differentiable in scores."""
    hard, _ = hard_topk(jax.lax.stop_gradient(scores), k)
    s = scores / max(temperature, 1e-6)
    taken = jnp.minimum(jnp.cumsum(hard, axis=1) - hard, 1.0)  # selections before slot j
    return jax.nn.softmax(s[:, None, :] + jnp.log(1.0 - taken + 1e-8), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _straight_through(scores: jax.Array, k: int, temperature: float) -> jax.Array:
    return hard_topk(scores, k)[0]


def _fwd(scores, k, temperature):
    return hard_topk(scores, k)[0], scores


def _bwd(k, temperature, scores, g):
    _, vjp = jax.vjp(lambda s: soft_topk_relaxation(s, k, temperature), scores)
    return vjp(g)


_straight_through.defvjp(_fwd, _bwd)


def straight_through_topk(scores: jax.Array, k: int, temperature: float
                          ) -> tuple[jax.Array, jax.Array]:
    """scores [B, N] -> (weights [B, k, N], indices [B, k] int32).

    weights are the hard one-hot top-k in the forward pass; their gradient is the gradient
    of `soft_topk_relaxation(scores, k, temperature)`. k and temperature are static.
    """
    _, idx = hard_topk(jax.lax.stop_gradient(scores), k)
    return _straight_through(scores, int(k), float(temperature)), idx
