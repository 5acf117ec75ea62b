"""`ClaraParts`: what every CLaRa checkpoint format reads into and writes from, and the
tokenizer files every format stores.

A plain record of arrays and configs, no behaviour: the formats (`ours`, `apple`, `bundle`)
sit below the `Clara` facade in the import graph, so they exchange this, not a `Clara`.

Tokenizer files: a sentencepiece base (Mistral) is one `tokenizer.model`; a Hugging Face
byte-level BPE base (Llama 3, Qwen2.5, Phi-4) is `tokenizer.json` with the
tokenizer_config.json and chat_template.jinja beside it (when present), plus
`tokenizer_name.json`, the model name the official Qwen bos/eos rule looked at
(`HFClaraTokenizer`), so that a copy elsewhere loads into the same tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.tokenizer import (HF_TOKENIZER_COMPANIONS, HF_TOKENIZER_FILE,
                                       ClaraTokenizer, HFClaraTokenizer,
                                       byte_level_tokenizer_json)
from clara_jax.model.config import MistralConfig

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_NAME_FILE = "tokenizer_name.json"


@dataclasses.dataclass
class ClaraParts:
    """model_config: the base with the resized vocabulary; params: base tree (embedding and
    lm_head include the added tokens' rows); adapters: {name: LoRA tree}; tokenizer_path: the
    file the tokenizer was read from (tokenizer.model, or tokenizer.json: copied on save with
    `copy_tokenizer`); apple_config: Apple's config.json fields we do not model (kept for
    export)."""

    model_config: MistralConfig
    config: ClaraConfig
    params: dict
    adapters: dict[str, dict]
    tokenizer: ClaraTokenizer
    tokenizer_path: str | None = None
    apple_config: dict = dataclasses.field(default_factory=dict)


def to_device(tree):
    """Every leaf as a jax array (on the default device)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def host_copy(parts: ClaraParts) -> ClaraParts:
    """`parts` with params and adapters fetched to host memory (numpy)."""
    return dataclasses.replace(parts, params=jax.device_get(parts.params),
                               adapters=jax.device_get(parts.adapters))


def tokenizer_source_files(tokenizer_path: str) -> list[str]:
    """The files a tokenizer read from `tokenizer_path` depends on: the file itself and, for a
    tokenizer.json, the companions beside it that exist."""
    if os.path.basename(tokenizer_path) != HF_TOKENIZER_FILE:
        return [tokenizer_path]
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    return [tokenizer_path] + [os.path.join(folder, n) for n in HF_TOKENIZER_COMPANIONS
                               if os.path.exists(os.path.join(folder, n))]


def copy_tokenizer(tokenizer_path: str, out_dir: str,
                   tokenizer: ClaraTokenizer | None = None) -> str:
    """Copies the tokenizer files (module docstring) into the existing `out_dir`; returns the
    copied tokenizer file's path. For a tokenizer.json, tokenizer_name.json records
    `tokenizer.model_name` (given a tokenizer), else the source folder's own record, else the
    source folder's path (the name `HFClaraTokenizer.from_json_file` defaults to)."""
    if os.path.basename(tokenizer_path) != HF_TOKENIZER_FILE:  # a sentencepiece model
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER_FILE))
        return os.path.join(out_dir, TOKENIZER_FILE)
    for path in tokenizer_source_files(tokenizer_path):
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    if isinstance(tokenizer, HFClaraTokenizer):
        name = tokenizer.model_name
    else:
        name = _recorded_name(folder) or folder
    with open(os.path.join(out_dir, TOKENIZER_NAME_FILE), "w") as f:
        json.dump({"model_name": name}, f, indent=2)
    return os.path.join(out_dir, HF_TOKENIZER_FILE)


def _recorded_name(folder: str) -> str | None:
    path = os.path.join(folder, TOKENIZER_NAME_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["model_name"]


def tokenizer_path_in(folder: str) -> str | None:
    """The tokenizer file of `folder`: a byte-level BPE tokenizer.json, else tokenizer.model,
    else None."""
    json_path = byte_level_tokenizer_json(folder)
    if json_path is not None:
        return json_path
    model_path = os.path.join(folder, TOKENIZER_FILE)
    return model_path if os.path.exists(model_path) else None


def load_tokenizer(folder: str, n_mem: int, different_mem_tokens: bool = True
                   ) -> tuple[ClaraTokenizer, str]:
    """(tokenizer, its file) of a folder written by `copy_tokenizer` (or a Hugging Face base
    directory); FileNotFoundError naming the folder when it has neither tokenizer file."""
    path = tokenizer_path_in(folder)
    if path is None:
        raise FileNotFoundError(f"{folder}: no tokenizer.model or byte-level BPE "
                                f"tokenizer.json")
    if os.path.basename(path) == TOKENIZER_FILE:
        return ClaraTokenizer.from_file(path, n_mem, different_mem_tokens), path
    return HFClaraTokenizer.from_json_file(path, n_mem, different_mem_tokens,
                                           model_name=_recorded_name(folder)), path
