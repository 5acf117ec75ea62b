"""The CLaRa fields of the checkpoint a run starts from (`config.init_from`) against the run's.

A CLaRa checkpoint (a training work directory, a saved Clara, an Apple release) was trained
with a compression (doc_max_length, compress_rate), memory tokens (different_mem_tokens:
which sets the added tokens and so the vocabulary), a memory-slot stride (sep) and a LoRA
rank. A run under other values would read its special tokens from other embedding rows, or
its documents under another compression, without any error; so a difference is refused
before anything is built, naming each field with both values (`check`), unless
`config.adopt_checkpoint_config` is on: then the run takes the checkpoint's values and says
which (`adopt`). A base model (no CLaRa fields) is never compared.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.formats import ours
from clara_jax.clara.formats.apple import clara_config_from_apple
from clara_jax.errors import UserError
from clara_jax.model.config import MistralConfig

# Config fields a CLaRa checkpoint fixes, in the order a message names them.
FIELDS = ("compress_rate", "doc_max_length", "different_mem_tokens", "sep", "lora_rank")


def checkpoint_fields(path: str) -> dict[str, Any] | None:
    """{field: value} of FIELDS, plus "added_tokens", "base_vocab" (the id of <MEM0>) and
    "vocab_size" (None where the format does not say: an Apple release's config.json), of
    the CLaRa checkpoint in `path`; None when `path` holds no CLaRa model (a base, or
    nothing readable: loading it reports that)."""
    if ours.is_saved(path):
        model = ours.model_dir(path)
        with open(os.path.join(model, "clara_config.json")) as f:
            d = json.load(f)
        cfg = ClaraConfig(doc_max_length=d["doc_max_length"], compress_rate=d["compress_rate"],
                          sep=d["sep"], different_mem_tokens=d["different_mem_tokens"])
        rank, base = d["lora"]["rank"], d["first_mem_token_id"]
        vocab = MistralConfig.from_json(os.path.join(model, "model_config.json")).vocab_size
    elif os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "adapters.pth")):
        with open(os.path.join(path, "config.json")) as f:
            cfg = clara_config_from_apple(json.load(f), first_mem_token_id=0)
        rank, base, vocab = cfg.lora.rank, None, None
    else:
        return None
    return {"compress_rate": cfg.compress_rate, "doc_max_length": cfg.doc_max_length,
            "different_mem_tokens": cfg.different_mem_tokens, "sep": cfg.sep,
            "lora_rank": rank, "added_tokens": cfg.num_added_tokens, "base_vocab": base,
            "vocab_size": vocab}


def differences(c: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, config's value)} of FIELDS that differ between
    config.init_from's CLaRa checkpoint and `c`; {} without one (or for base_lm)."""
    if not c.init_from or c.stage == "base_lm" or not os.path.exists(c.init_from):
        return {}
    ckpt = checkpoint_fields(c.init_from)
    if ckpt is None:
        return {}
    return {f: (ckpt[f], c[f]) for f in FIELDS if ckpt[f] != c[f]}


def _added_tokens(c: ml_collections.ConfigDict) -> int:
    """CLaRa's added tokens under `c` (`ClaraConfig.num_added_tokens`)."""
    n = c.doc_max_length // c.compress_rate
    return (n if c.different_mem_tokens else 1) + 3


def check(c: ml_collections.ConfigDict) -> None:
    """UserError in one line naming every field of config.init_from's CLaRa checkpoint that
    differs from the run's, with both values, and the vocabulary when the added tokens
    differ; nothing with config.adopt_checkpoint_config (`adopt` takes them)."""
    diff = differences(c)
    if not diff or c.get("adopt_checkpoint_config", False):
        return
    parts = [f"{f} {ckpt} in the checkpoint, {run_v} in the config"
             for f, (ckpt, run_v) in diff.items()]
    ckpt = checkpoint_fields(c.init_from)
    if ckpt["added_tokens"] != _added_tokens(c):
        if ckpt["base_vocab"] is None:
            parts.append(f"added tokens {ckpt['added_tokens']} in the checkpoint, "
                         f"{_added_tokens(c)} in the config")
        else:
            # the run grows the vocabulary to hold its added tokens, never shrinks it
            run_vocab = max(ckpt["vocab_size"], ckpt["base_vocab"] + _added_tokens(c))
            parts.append(f"added tokens {ckpt['added_tokens']} in the checkpoint (vocabulary "
                         f"{ckpt['vocab_size']}), {_added_tokens(c)} in the config (vocabulary "
                         f"{run_vocab})")
    sets = ", ".join(f"config.{f}={ckpt_v}" for f, (ckpt_v, _) in diff.items())
    raise UserError(f"init_from {c.init_from}: {'; '.join(parts)} (set {sets}, or "
                    f"config.adopt_checkpoint_config=True to take the checkpoint's)")


def adopt(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c`, or with config.adopt_checkpoint_config a copy holding config.init_from's values of
    the fields that differ (each printed in one line)."""
    if not c.get("adopt_checkpoint_config", False):
        return c
    diff = differences(c)
    if not diff:
        return c
    out = c.copy_and_resolve_references()
    for field, (ckpt, run_v) in diff.items():
        out[field] = ckpt
        print(f"adopt_checkpoint_config: {field} {ckpt} from {c.init_from} (the config had "
              f"{run_v})")
    return out
