"""Mistral-style decoder in Flax Linen, used purely functionally through `init` / `apply`.

One module for Mistral, Llama, Qwen2 and Phi-3 (switches in `MistralConfig`). Parameter tree
(Hugging Face names; the layer axis L leads every block parameter):

    embed_tokens/embedding                       [V, D]        (vocab, embed)
    layers/input_layernorm/scale                 [L, D]        (layers, embed)
    layers/self_attn/{q,k,v}_proj/kernel         [L, D, H|K, hd]  (layers, embed, heads|kv_heads, head_dim)
    layers/self_attn/o_proj/kernel               [L, H, hd, D] (layers, heads, head_dim, embed)
    layers/post_attention_layernorm/scale        [L, D]
    layers/mlp/{gate,up}_proj/kernel             [L, D, F]     (layers, embed, mlp)
    layers/mlp/down_proj/kernel                  [L, F, D]     (layers, mlp, embed)
    norm/scale                                   [D]
    lm_head/kernel                               [D, V]        (embed, vocab)

With `qkv_bias`, also layers/self_attn/{q,k,v}_proj/bias [L, H|K, hd]; with
`tie_word_embeddings`, no lm_head (logits = hidden @ embedding^T).

LoRA adapters, when given, are a `lora` collection with the same paths (see `lora.py`).
The layer stack always runs through `nn.scan`; `scan_layers=False` unrolls that loop in XLA
with the same parameter layout, so checkpoints do not depend on the execution mode.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clara_jax import parallel
from clara_jax.model import attention as attn_lib
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import Linear, LoraConfig

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderOutput(NamedTuple):
    """logits [B, T, V] (None when not computed), hidden_states [B, T, D] after the final
    norm, kv_cache (None without one)."""

    logits: jax.Array | None
    hidden_states: jax.Array
    kv_cache: dict | None


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 as Hugging Face does."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_frequencies(config: MistralConfig) -> tuple[jax.Array, float]:
    """(inverse frequencies [rotary_dim / 2] in radians per position, float32; cos / sin
    multiplier) of the config's RoPE, scaling applied ("llama3": frequencies whose wavelength
    exceeds the original context / low_freq_factor divided by the factor, a linear ramp
    between that band and original / high_freq_factor; "longrope": divided by the short
    factors, with the attention multiplier)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    multiplier = 1.0
    original = config.rope_original_max_position_embeddings
    if config.rope_scaling == "llama3":
        factor, low, high = (config.rope_factor, config.rope_low_freq_factor,
                             config.rope_high_freq_factor)
        wavelength = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelength > original / low, inv_freq / factor, inv_freq)
        ramp = (original / wavelength - low) / (high - low)
        smoothed = (1 - ramp) * scaled / factor + ramp * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    elif config.rope_scaling == "longrope":
        inv_freq = inv_freq / jnp.asarray(config.rope_short_factor, jnp.float32)
        ratio = config.max_position_embeddings / original
        if ratio > 1.0:
            multiplier = math.sqrt(1 + math.log(ratio) / math.log(original))
    return inv_freq, multiplier


def rotary_embedding(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                     multiplier: float = 1.0) -> jax.Array:
    """Applies RoPE (rotate-half convention) to the leading 2 * len(inv_freq) dims of each head
    of x [B, T, N, hd] at positions [B, T]; the remaining dims pass through (partial rotary)."""
    rot = 2 * inv_freq.shape[0]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if multiplier != 1.0:
        cos, sin = cos * multiplier, sin * multiplier
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos + rotated * sin
    return out if rot == x.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


class Attention(nn.Module):
    config: MistralConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache, cache_index):
        c = self.config
        dense = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype), lora=self.lora,
                     deterministic=self.deterministic)
        qkv = dict(dense, use_bias=c.qkv_bias)
        q = Linear((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), name="q_proj",
                   **qkv)(x)
        k = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                   name="k_proj", **qkv)(x)
        v = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                   name="v_proj", **qkv)(x)
        inv_freq, multiplier = rope_frequencies(c)
        q = constrain(rotary_embedding(q, positions, inv_freq, multiplier),
                      ("batch", "length", "heads", "head_dim"))
        k = constrain(rotary_embedding(k, positions, inv_freq, multiplier),
                      ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        new_cache = None
        if layer_cache is not None:
            k = attn_lib.update_cache(layer_cache["k"], k, cache_index)
            v = attn_lib.update_cache(layer_cache["v"], v, cache_index)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = attn_lib.attend(q, k, v, mask, c.attention_impl)
        out = Linear((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="o_proj",
                     **dense)(out)
        return out, new_cache


class MLP(nn.Module):
    config: MistralConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype), lora=self.lora,
                     deterministic=self.deterministic)
        gate = Linear((c.intermediate_size,), ("embed", "mlp"), name="gate_proj", **dense)(x)
        up = Linear((c.intermediate_size,), ("embed", "mlp"), name="up_proj", **dense)(x)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Linear((c.hidden_size,), ("mlp", "embed"), name="down_proj", **dense)(h)


class Block(nn.Module):
    """One pre-norm decoder layer; scanned, so it maps (x, layer_cache) -> (x, new_layer_cache)."""

    config: MistralConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, cache_index):
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        sub = dict(config=c, lora=self.lora, deterministic=self.deterministic)
        h, new_cache = Attention(name="self_attn", **sub)(
            RMSNorm(name="input_layernorm", **norm)(x), positions, mask, layer_cache, cache_index)
        x = x + h
        x = x + MLP(name="mlp", **sub)(RMSNorm(name="post_attention_layernorm", **norm)(x))
        return constrain(x, ("batch", "length", "embed")), new_cache


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids]: rows [..., D] of table [V, D] for ids [...]. The table is gathered whole
    onto every device first: with its `embed` axis sharded over fsdp, the partitioner would
    otherwise gather every device's ids (the global batch) and keep the whole batch's
    activations on each device from there on."""
    return jnp.take(nn.with_logical_constraint(table, (None, None)), ids, axis=0)


class TokenEmbed(nn.Module):
    """The token embedding table embedding [V, D] (vocab, embed), its lookup and (tied
    embeddings) its use as the output projection."""

    vocab_size: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return lookup(self.embedding.astype(self.dtype), ids)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] @ embedding^T -> logits [..., V]."""
        return jnp.einsum("...d,vd->...v", hidden, self.embedding.astype(self.dtype))


class Mistral(nn.Module):
    """The decoder (Mistral and its variants, by config). `lora` enables the adapter path
    (active when a `lora` collection is given)."""

    config: MistralConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 kv_cache: dict | None = None,
                 deterministic: bool = True,
                 compute_logits: bool = True) -> DecoderOutput:
        """Runs the decoder.

        input_ids [B, T] int or inputs_embeds [B, T, D]; attention_mask [B, T] (1 = token,
        0 = padding, left padding allowed); positions [B, T] (default: 0..T-1 without a cache,
        as Hugging Face's forward; cache index + 0..T-1 with one). kv_cache: from
        `decode.init_cache`; the tokens are written at its `index` and it is returned advanced.
        """
        c = self.config
        dtype, param_dtype = _dtype(c.dtype), _dtype(c.param_dtype)
        embed = TokenEmbed(c.vocab_size, c.hidden_size, dtype, param_dtype, name="embed_tokens")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(dtype)
        x = constrain(x, ("batch", "length", "embed"))
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), dtype=bool)
        attention_mask = attention_mask.astype(bool)

        if kv_cache is None:
            cache_index, layer_caches = None, None
            key_valid = attention_mask
            query_slots = jnp.arange(length)
        else:
            cache_index = kv_cache["index"]
            layer_caches = {"k": kv_cache["k"], "v": kv_cache["v"]}
            key_valid = jax.lax.dynamic_update_slice_in_dim(
                kv_cache["valid"], attention_mask, cache_index, axis=1)
            query_slots = cache_index + jnp.arange(length)
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (batch, length))
        mask = attn_lib.attention_mask(key_valid, query_slots, c.sliding_window)

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=_REMAT[c.remat_policy], prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            unroll=1 if c.scan_layers else c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(config=c, lora=self.lora, deterministic=deterministic, name="layers")
        x, new_layer_caches = stack(x, layer_caches, positions, mask, cache_index)

        hidden = RMSNorm(c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, name="norm")(x)
        hidden = constrain(hidden, ("batch", "length", "embed"))
        logits = None
        if c.tie_word_embeddings:
            if compute_logits:
                logits = constrain(embed.attend(hidden), ("batch", "length", "vocab"))
        elif compute_logits or self.is_initializing():
            logits = Linear((c.vocab_size,), ("embed", "vocab"), dtype=dtype,
                            param_dtype=param_dtype, name="lm_head")(hidden)
            logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None
        if kv_cache is not None:
            new_cache = {**new_layer_caches, "valid": key_valid, "index": cache_index + length}
        return DecoderOutput(logits, hidden, new_cache)


def embed_tokens(params: dict, ids: jax.Array, dtype: Any = None) -> jax.Array:
    """Token embeddings [..., D] for ids [...] from a base parameter tree (no module needed)."""
    out = lookup(params["embed_tokens"]["embedding"], ids)
    return out if dtype is None else out.astype(dtype)


def init_params(config: MistralConfig, rng: jax.Array) -> dict:
    """Random base parameters (plain arrays, no partitioning boxes)."""
    model = Mistral(config)
    variables = jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def _abstract_boxed(config: MistralConfig, lora: LoraConfig | None) -> dict:
    model = Mistral(config, lora)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def logical_axes(config: MistralConfig, lora: LoraConfig | None = None) -> dict:
    """Logical axis names of every parameter (and adapter) leaf: {"params": ..., "lora": ...}."""
    return nn.get_partition_spec(_abstract_boxed(config, lora))


def parameter_shardings(config: MistralConfig, lora: LoraConfig | None, mesh
                        ) -> tuple[dict, list[str]]:
    """NamedShardings of every parameter (and one adapter tree) on `mesh`, by the
    logical-axis rules and fitted to the shapes (`parallel.fit_shardings`): ({"params": ...,
    "lora": ...}, a note per array replicated over an axis that does not divide it)."""
    boxed = _abstract_boxed(config, lora)
    return parallel.fit_shardings(parallel.logical_sharding(nn.get_partition_spec(boxed), mesh),
                                  nn.meta.unbox(boxed))


def project_logits(params: dict, hidden: jax.Array) -> jax.Array:
    """The output projection applied to hidden states [..., D] -> logits [..., V] (float32):
    lm_head, or the embedding table transposed in a tree without one (tied embeddings)."""
    if "lm_head" in params:
        kernel = params["lm_head"]["kernel"]
        return jnp.einsum("...d,dv->...v", hidden, kernel.astype(hidden.dtype)
                          ).astype(jnp.float32)
    table = params["embed_tokens"]["embedding"]
    return jnp.einsum("...d,vd->...v", hidden, table.astype(hidden.dtype)).astype(jnp.float32)
