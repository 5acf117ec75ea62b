"""Logit parity of a Hugging Face decoder directory against clara-jax's reading of it.

    python -m clara_jax.convert verify-hf --model_dir HF_DIR [--checkpoint CKPT]

transformers loads HF_DIR (`AutoModelForCausalLM`, float32, eager attention); clara-jax loads
the same directory (or, with --checkpoint, a converted checkpoint of it); both run the same
random token sequences and the largest absolute logit difference is reported. Needs the
`torch` extra (transformers, torch).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from clara_jax.clara.formats.hf_mistral import (load_checkpoint, load_hf_mistral,
                                                require_transformers)
from clara_jax.model.mistral import Mistral

TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Parity:
    """max_abs_diff: max |logit difference| over sequences [num_sequences, length]."""

    architecture: str
    max_abs_diff: float
    num_sequences: int
    length: int


def verify_hf(model_dir: str, checkpoint: str | None = None, num_sequences: int = 3,
              length: int = 16, seed: int = 0) -> Parity:
    """Runs transformers' model of `model_dir` and ours (of `model_dir`, or of `checkpoint`,
    our converted copy of it) in float32 on `num_sequences` random sequences of `length`
    token ids each (positions 0..length-1, no padding); returns the largest |difference| of
    their logits [num_sequences, length, V]."""
    transformers = require_transformers(f"verify-hf of {model_dir}")
    import torch

    if checkpoint:
        cfg, params = load_checkpoint(checkpoint)
    else:
        cfg, params = load_hf_mistral(model_dir)
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    params = _to_float32(params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    if hf.config.vocab_size != cfg.vocab_size:
        raise ValueError(f"{checkpoint or model_dir}: vocabulary {cfg.vocab_size}, "
                         f"{model_dir}/config.json has {hf.config.vocab_size}")
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (num_sequences, length))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    ours = np.asarray(Mistral(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32)).logits)
    return Parity(cfg.architecture, float(np.abs(ours - ref).max()), num_sequences, length)


def _to_float32(tree):
    if isinstance(tree, dict):
        return {k: _to_float32(v) for k, v in tree.items()}
    return jnp.asarray(np.asarray(tree, np.float32))
