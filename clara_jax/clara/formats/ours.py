"""Our CLaRa format: a directory that `save` writes and `load` reads back exactly.

  state/               Orbax: {"params": base tree, "adapters": {name: LoRA tree}}
  model_config.json    `MistralConfig` (vocabulary resized for the added tokens)
  clara_config.json    `ClaraConfig` (`config_to_dict`)
  apple_config.json    Apple's config.json fields kept for export (may be {})
  tokenizer.model      the base sentencepiece model, or for a Hugging Face tokenizer
                       tokenizer.json (+ tokenizer_config.json, chat_template.jinja,
                       tokenizer_name.json: `parts.copy_tokenizer`)

A training work directory holds one under `model/`; `load` accepts either.
"""

from __future__ import annotations

import dataclasses
import json
import os

import orbax.checkpoint as ocp

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.formats.parts import (ClaraParts, copy_tokenizer, load_tokenizer,
                                           tokenizer_path_in)
from clara_jax.fileio import atomic_directory
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import LoraConfig

REQUIRED = ("state", "model_config.json", "clara_config.json")


def config_to_dict(cfg: ClaraConfig) -> dict:
    """ClaraConfig -> JSON-ready dict (LoRA config nested under "lora")."""
    d = dataclasses.asdict(cfg)
    d["lora"] = dataclasses.asdict(cfg.lora)
    d["lora"]["targets"] = list(cfg.lora.targets)
    return d


def config_from_dict(d: dict) -> ClaraConfig:
    """The inverse of `config_to_dict`."""
    d = dict(d)
    lora = dict(d.pop("lora"))
    lora["targets"] = tuple(lora["targets"])
    return ClaraConfig(**d, lora=LoraConfig(**lora))


def model_dir(path: str) -> str:
    """The saved model inside `path`: `path` itself, or a training work directory's `model/`."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "model")) and not os.path.exists(
            os.path.join(path, "clara_config.json")):
        return os.path.join(path, "model")
    return path


def is_saved(path: str) -> bool:
    """Whether `path` (or its `model/`) looks like a directory written by `save`."""
    return os.path.exists(os.path.join(model_dir(path), "clara_config.json"))


def save(out_dir: str, parts: ClaraParts) -> None:
    """Writes `parts` (see the module docstring). Written to a temporary sibling and renamed,
    so a crash never leaves it half-written."""
    if parts.tokenizer_path is None:
        raise ValueError("this Clara has no tokenizer file path to save")
    with atomic_directory(out_dir, prefix=".clara-") as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "state"),
                       {"params": parts.params, "adapters": parts.adapters})
        parts.model_config.to_json(os.path.join(tmp, "model_config.json"))
        with open(os.path.join(tmp, "clara_config.json"), "w") as f:
            json.dump(config_to_dict(parts.config), f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "apple_config.json"), "w") as f:
            json.dump(parts.apple_config, f, indent=2, sort_keys=True)
        copy_tokenizer(parts.tokenizer_path, tmp, parts.tokenizer)


def load(path: str) -> ClaraParts:
    """Reads a directory written by `save`, or a training work directory (its `model/`).
    Arrays come back as jax arrays."""
    path = model_dir(path)
    for name in REQUIRED:
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: missing {name} (not a saved Clara directory)")
    if tokenizer_path_in(path) is None:
        raise FileNotFoundError(f"{path}: missing tokenizer.model or tokenizer.json (not a "
                                f"saved Clara directory)")
    model_cfg = MistralConfig.from_json(os.path.join(path, "model_config.json"))
    with open(os.path.join(path, "clara_config.json")) as f:
        cfg = config_from_dict(json.load(f))
    apple_cfg = {}
    if os.path.exists(os.path.join(path, "apple_config.json")):
        with open(os.path.join(path, "apple_config.json")) as f:
            apple_cfg = json.load(f)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(path, "state"))
    tok, tok_path = load_tokenizer(path, cfg.n_mem, cfg.different_mem_tokens)
    return ClaraParts(model_cfg, cfg, state["params"], state["adapters"], tok,
                      tokenizer_path=tok_path, apple_config=apple_cfg)

