"""Every checkpoint format in one place, below the `Clara` facade in the import graph.

  ours.py         a saved CLaRa model (Orbax state + JSON configs + tokenizer files), or a
                  training work directory's `model/`
  apple.py        Apple's release (config.json, adapters.pth, decoder_first_last_layers.pth)
                  over a Hugging Face base (Mistral, Llama, Qwen2, Phi-3)
  bundle.py       adapter bundles: the trained part alone (adapters + added-token rows) over a
                  base model
  hf_mistral.py   a Hugging Face base <-> our parameter tree; our base checkpoint
  parts.py        `ClaraParts`, and the tokenizer files every format stores
  safetensors_io  the safetensors reader / writer the others use

The CLaRa formats read into and write from `parts.ClaraParts` (arrays and configs), never a
`Clara`: `clara_jax.clara.model` imports them at module top (so `Clara.load` and
`Clara.from_apple` need no import inside a function), and nothing here imports it back.
`clara_jax.convert` (the command line, and wrappers taking a `Clara`) sits above both.
"""

from __future__ import annotations

import os

from clara_jax.clara.formats import apple, bundle, ours
from clara_jax.clara.formats.parts import ClaraParts

OURS, APPLE, BUNDLE = "ours", "apple", "bundle"


def detect(path: str) -> str:
    """Which CLaRa format the directory `path` holds: OURS (also a training work directory),
    APPLE or BUNDLE. FileNotFoundError naming what each format needs otherwise."""
    if ours.is_saved(path):
        return OURS
    if os.path.exists(os.path.join(path, bundle.CONFIG_FILE)):
        return BUNDLE
    if os.path.exists(os.path.join(path, "adapters.pth")):
        return APPLE
    if os.path.exists(os.path.join(path, "state")) or os.path.exists(
            os.path.join(path, "model_config.json")):
        return OURS   # an incomplete save: ours.load names the missing file
    raise FileNotFoundError(
        f"{path}: not a CLaRa checkpoint (a saved Clara has clara_config.json, a training work "
        f"directory model/clara_config.json, an Apple release adapters.pth, an adapter bundle "
        f"{bundle.CONFIG_FILE})")


def load(path: str, base_model_dir: str | None = None, dtype: str | None = None
         ) -> ClaraParts:
    """Reads the CLaRa checkpoint in `path`, whichever format (`detect`). An Apple release or
    an adapter bundle lies over a base model: `base_model_dir` (a Hugging Face directory, or
    our base checkpoint for a bundle). `dtype` casts an Apple release's base weights."""
    kind = detect(path)
    if kind == OURS:
        return ours.load(path)
    if base_model_dir is None:
        raise ValueError(f"{path}: {'an Apple release' if kind == APPLE else 'an adapter bundle'}"
                         f" lies over a base model; pass base_model_dir")
    if kind == APPLE:
        return apple.load(path, base_model_dir, dtype)
    return bundle.load(path, base_model_dir)
