"""Mistral model configuration: one frozen dataclass, validated on construction.

The dataclass is hashable so that Linen modules can carry it as an attribute and `jax.jit`
can treat it as static. Presets (`tiny`, `mid`, `mistral_7b`) live here so that every entry
point (training, conversion, tests) resolves a preset name the same way; `configs/models.py`
exposes them as ml-collections for the command line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Architecture and execution settings of a Mistral-style decoder.

    Sizes are counts; `sliding_window` is in tokens (0 disables it). `dtype` is the compute
    dtype of activations and matmuls, `param_dtype` the storage dtype of the weights.
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
        return self.num_layers * per_layer + 2 * self.vocab_size * d + d

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
