"""LoRA: linear layers that read an optional adapter collection, and adapter-tree helpers.

The frozen base weights live in the Linen `params` collection; an adapter is a separate tree
in the `lora` collection with the same module paths, holding `lora_a` [*in, r] and `lora_b`
[r, *out] next to each adapted `kernel` [*in, *out]. Applying the same base under another
adapter is `model.apply({"params": base, "lora": adapters[name]}, ...)`; applying it with no
`lora` collection runs the base model alone.

y = x @ W + (dropout(x) @ A @ B) * alpha / r, as in PEFT's `lora.Linear`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Linear layers of a decoder block, in Hugging Face / PEFT naming (Phi-3's fused qkv_proj and
# gate_up_proj are split into these on import). lm_head is never adapted.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter hyper-parameters: rank r, scale alpha / r, dropout on the adapter input."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"LoraConfig.targets has unknown layers {unknown}; "
                             f"known: {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _peft_lora_a_init(fan_in: int):
    """PEFT's lora_A init: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keep_mask(shape: tuple[int, ...], rate: float, rng: jax.Array) -> jax.Array:
    """Bool keep-mask [*shape], True with probability 1 - round(rate * 2^32) / 2^32.

    Each row (all axes but the last) draws a 64-bit key (k0, k1) from `rng` with
    `jax.random.bits` (threefry, so rows, layers and steps are independent as with any jax
    draw); element j of a row is kept iff mix(mix(j ^ k0) + k1) >= rate * 2^32, with `mix`
    MurmurHash3's finaliser. The integer hash vectorises and fuses into the mask's consumer,
    so on XLA:CPU it costs a fraction of a per-element `jax.random.bits` draw (measured in
    README, "Training step"). Rows of 2^32 elements or more are rejected.
    """
    if shape[-1] >= 2**32:
        raise ValueError(f"dropout rows must be shorter than 2^32 elements, got {shape}")
    keys = jax.random.bits(rng, (*shape[:-1], 2), jnp.uint32)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    h = _mix32(_mix32(col ^ keys[..., :1]) + keys[..., 1:])
    return h >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout: zeroes an element of x [..., D] with probability `rate` (to 2^-33)
    and scales the others by 1 / (1 - rate); the mask is `dropout_keep_mask`."""
    if rate == 0.0:
        return x
    keep = dropout_keep_mask(x.shape, rate, rng)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Linear(nn.Module):
    """Dense layer contracting the trailing `in_dims` input axes, with an optional LoRA path.

    kernel: [*in, *features] with logical axes `kernel_axes`. Input [..., *in] -> [..., *features].
    `use_bias` adds bias [*features] (the output axes of `kernel_axes`; Qwen2's q/k/v); LoRA
    never adapts it.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    in_dims: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    deterministic: bool = True
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims:]
        lead = x.shape[:x.ndim - self.in_dims]
        fan_in = math.prod(in_shape)
        fan_out = math.prod(self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), self.kernel_axes),
            (*in_shape, *self.features), self.param_dtype)
        # 2-D matmuls: XLA:CPU runs the backward of [N, in] x [in, out] about 1.4x faster
        # than with the leading batch axes kept.
        x2 = x.reshape(-1, fan_in).astype(self.dtype)
        y = x2 @ kernel.reshape(fan_in, fan_out).astype(self.dtype)

        name = self.name or ""
        use_lora = (self.lora is not None and name in self.lora.targets and
                    (self.has_variable("lora", "lora_a") or self.is_mutable_collection("lora")))
        if use_lora:
            in_axes = self.kernel_axes[:self.in_dims]
            out_axes = self.kernel_axes[self.in_dims:]
            # Initialisers run only when the adapter is created (lazily: no rng needed to apply).
            a = self.variable("lora", "lora_a", nn.with_logical_partitioning(
                lambda: _peft_lora_a_init(fan_in)(self.make_rng("params"),
                                                  (*in_shape, self.lora.rank), self.param_dtype),
                (*in_axes, None))).value
            b = self.variable("lora", "lora_b", nn.with_logical_partitioning(
                lambda: jnp.zeros((self.lora.rank, *self.features), self.param_dtype),
                (None, *out_axes))).value
            rank = a.shape[-1]
            h = x2
            if not self.deterministic and self.lora.dropout > 0:  # no rng needed otherwise
                h = dropout(x2, self.lora.dropout, self.make_rng("dropout"))
            h = h @ a.reshape(fan_in, rank).astype(self.dtype)
            y = y + (h @ b.reshape(rank, fan_out).astype(self.dtype)) * (self.lora.alpha / rank)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.kernel_axes[self.in_dims:]),
                self.features, self.param_dtype)
            y = y + bias.reshape(fan_out).astype(self.dtype)
        return y.reshape(*lead, *self.features)


def lora_param_count(adapter: Any) -> int:
    """Number of scalars in an adapter tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapter))


def merge_lora(params: dict, adapter: dict, lora: LoraConfig) -> dict:
    """Returns base params with W + A @ B * alpha / r folded into every adapted kernel.

    Shapes: kernel [*lead, *in, *out], lora_a [*lead, *in, r], lora_b [*lead, r, *out], where
    `lead` is the stacked layer axis of scanned blocks (or nothing).
    """

    def merge(p: Any, a: Any) -> Any:
        if not isinstance(p, dict):
            return p
        a = a if isinstance(a, dict) else {}
        if "kernel" in p and "lora_a" in a:
            w, la, lb = p["kernel"], a["lora_a"], a["lora_b"]
            n_lead = (la.ndim - 1) + (lb.ndim - 1) - w.ndim
            lead, rank = w.shape[:n_lead], la.shape[-1]
            delta = jnp.matmul(la.reshape(*lead, -1, rank).astype(jnp.float32),
                               lb.reshape(*lead, rank, -1).astype(jnp.float32))
            merged = w.astype(jnp.float32) + delta.reshape(w.shape) * lora.scale
            return {**p, "kernel": merged.astype(w.dtype)}
        return {k: merge(v, a.get(k)) for k, v in p.items()}

    return merge(params, adapter)


def split_adapter_paths(tree: Any, prefix: Sequence[str] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) of every `lora_a` leaf in an adapter tree, for diagnostics."""
    paths = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "lora_a":
                paths.append(tuple(prefix))
            else:
                paths.extend(split_adapter_paths(v, (*prefix, k)))
    return paths
