"""Decoder configuration: one frozen dataclass for every supported backbone, validated on
construction.

`MistralConfig` (the name predates the other backbones) describes a pre-norm RMSNorm / RoPE /
GQA / SwiGLU decoder; switches select what differs between Mistral, Llama, Qwen2 and Phi-3:
`qkv_bias` (Qwen2), `tie_word_embeddings` (no lm_head: logits use the embedding table),
`partial_rotary_factor` (Phi-3: RoPE on the leading fraction of each head), `rope_scaling`
("llama3", or "longrope" with its short factors), `sliding_window`. `architecture` names the
Hugging Face family the weights map to (it decides only the checkpoint layout: Phi-3 stores
fused qkv_proj / gate_up_proj, split into q/k/v and gate/up on import). docs/backbones.md.

The dataclass is hashable so that Linen modules can carry it as an attribute and `jax.jit`
can treat it as static. Presets live here so that every entry point (training, conversion,
tests) resolves a preset name the same way; `configs/models.py` exposes them as
ml-collections for the command line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("mistral", "llama", "qwen2", "phi3")
ROPE_SCALINGS = ("none", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Architecture and execution settings of a Mistral-style decoder (and its variants).

    Sizes are counts; `sliding_window` is in tokens (0 disables it). `dtype` is the compute
    dtype of activations and matmuls, `param_dtype` the storage dtype of the weights.
    RoPE: `partial_rotary_factor` of each head's `head_dim` is rotated (the rest passes
    through); `rope_scaling` "llama3" rescales the inverse frequencies by `rope_factor`,
    `rope_low_freq_factor`, `rope_high_freq_factor` and `rope_original_max_position_embeddings`;
    "longrope" divides them by `rope_short_factor` (one per frequency) and multiplies cos / sin
    by sqrt(1 + ln(max_position_embeddings / original) / ln(original)). `rope_long_factor` is
    kept for export only: Hugging Face switches to it beyond the original length, which this
    decoder does not (sequences must stay within `rope_original_max_position_embeddings`).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 14336
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int = 0
    max_position_embeddings: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "xla"
    architecture: str = "mistral"
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    partial_rotary_factor: float = 1.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 0
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "intermediate_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MistralConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"MistralConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window < 0:
            raise ValueError(f"MistralConfig.sliding_window must be >= 0, got {self.sliding_window}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"MistralConfig.remat_policy must be one of {REMAT_POLICIES}, "
                             f"got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"MistralConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"MistralConfig.{name} must be one of {DTYPES}, "
                                 f"got {getattr(self, name)!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"MistralConfig.architecture must be one of {ARCHITECTURES}, "
                             f"got {self.architecture!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"MistralConfig.rope_scaling must be one of {ROPE_SCALINGS}, "
                             f"got {self.rope_scaling!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"MistralConfig.partial_rotary_factor must be in (0, 1], "
                             f"got {self.partial_rotary_factor}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"MistralConfig: head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor} = {self.rotary_dim} rotary dims, "
                             f"must be even and positive")
        for name in ("rope_short_factor", "rope_long_factor"):
            if not isinstance(getattr(self, name), tuple):  # lists from JSON: keep hashable
                object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.rope_scaling != "none" and self.rope_original_max_position_embeddings <= 0:
            raise ValueError(f"MistralConfig.rope_original_max_position_embeddings must be "
                             f"positive with rope_scaling={self.rope_scaling!r}")
        if self.rope_scaling == "llama3" and not (
                self.rope_factor > 0 and self.rope_high_freq_factor > self.rope_low_freq_factor):
            raise ValueError("MistralConfig: llama3 rope scaling needs rope_factor > 0 and "
                             "rope_high_freq_factor > rope_low_freq_factor")
        if self.rope_scaling == "longrope" and len(self.rope_short_factor) != self.rotary_dim // 2:
            raise ValueError(f"MistralConfig.rope_short_factor has {len(self.rope_short_factor)} "
                             f"values, longrope needs rotary_dim / 2 = {self.rotary_dim // 2}")

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (Hugging Face: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **changes: Any) -> "MistralConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MistralConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MistralConfig fields: {unknown}")
        return cls(**dict(d))

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> "MistralConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings and lm_head included)."""
        d, h, k, hd, f = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                          self.intermediate_size)
        per_layer = d * h * hd * 2 + d * k * hd * 2 + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += (h + 2 * k) * hd
        tables = 1 if self.tie_word_embeddings else 2
        return self.num_layers * per_layer + tables * self.vocab_size * d + d

    def flops_per_token(self, seq_len: int, compute_logits: bool = True) -> float:
        """Forward matmul FLOPs per token (2 x MACs), attention scores included, causal-halved."""
        d, h, k, hd, f = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                          self.intermediate_size)
        dense = d * h * hd * 2 + d * k * hd * 2 + 3 * d * f
        attn = 2 * h * hd * seq_len / 2  # QK^T and PV, half of the positions under the causal mask
        per_token = 2 * self.num_layers * (dense + attn)
        if compute_logits:
            per_token += 2 * d * self.vocab_size
        return float(per_token)


PRESETS: dict[str, MistralConfig] = {
    # Mistral-7B-Instruct-v0.2, the base model of Apple's CLaRa-7B releases.
    "mistral_7b": MistralConfig(dtype="bfloat16", param_dtype="bfloat16", remat_policy="full"),
    # Meta Llama-3.2-1B (its config.json): llama3 RoPE scaling, tied embeddings.
    "llama3_2_1b": MistralConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=128001, tie_word_embeddings=True, rope_scaling="llama3", rope_factor=32.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192, dtype="bfloat16", param_dtype="bfloat16",
        remat_policy="full"),
    # Qwen2.5-1.5B (its config.json): q/k/v biases, tied embeddings, no sliding window.
    "qwen2_5_1_5b": MistralConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, intermediate_size=8960, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position_embeddings=131072, bos_token_id=151643,
        eos_token_id=151643, tie_word_embeddings=True, qkv_bias=True, dtype="bfloat16",
        param_dtype="bfloat16", remat_policy="full"),
    # Phi-4-mini-instruct's shape (its config.json): partial rotary 0.75 (96 of 128 dims),
    # tied embeddings. The published checkpoint uses longrope scaling (original length 4096);
    # this preset (for from-scratch runs and AOT sizing) leaves RoPE unscaled, since its 48
    # short factors are not repeated here: importing the checkpoint reads them from its
    # config.json (short factors only, so sequences up to 4096 tokens match Hugging Face).
    "phi4_mini": MistralConfig(
        architecture="phi3", vocab_size=200064, hidden_size=3072, num_layers=32, num_heads=24,
        num_kv_heads=8, head_dim=128, intermediate_size=8192, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=199999,
        eos_token_id=199999, tie_word_embeddings=True, partial_rotary_factor=0.75,
        sliding_window=262144, dtype="bfloat16", param_dtype="bfloat16", remat_policy="full"),
    # Mid-size Mistral-shaped model used by the CPU benchmarks.
    "mid": MistralConfig(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8,
                         num_kv_heads=2, head_dim=64, intermediate_size=1536,
                         max_position_embeddings=4096),
    # Tiny model for CPU tests and the demo.
    "tiny": MistralConfig(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=32, intermediate_size=384,
                          max_position_embeddings=2048),
}


def preset(name: str, **overrides: Any) -> MistralConfig:
    """Returns the named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
