"""The trained part of a CLaRa model on its own: adapters + the added tokens' rows.

    python -m clara_jax.convert export-adapters --checkpoint WORKDIR_OR_MODEL --out_dir BUNDLE
    python -m clara_jax.convert import-adapters --adapters_dir BUNDLE \
        --base_model_dir BASE --out_dir MODEL

Training changes only the LoRA adapters and the embedding / lm_head rows of the special tokens
appended to the base vocabulary (`<MEM..>`, `<AE>`, `<ENC>`, `<SEP>`: ids >= the tokenizer's
base vocabulary; with `optimize_mem_tokens` the memory rows are trained, the others are the
rows the vocabulary was resized with). A bundle holds exactly those, a few MB instead of the
7B base:

  trainable.safetensors   `adapters/{name}/{path}/lora_a|lora_b` (our stacked layout: lora_a
                          [L, *in, r], lora_b [L, r, *out]), `added_tokens/embed_tokens`
                          [num_added, hidden], `added_tokens/lm_head` [hidden, num_added]
  trainable_config.json   format version, base_vocab_size, model and CLaRa configs, the
                          adapter names, and every tensor's shape and dtype

Loading puts them back over the base (our converted checkpoint or a Hugging Face directory,
with its tokenizer.model or tokenizer.json files; the base's first base_vocab_size rows, as
the official resize to len(tokenizer) keeps them) and gives parts equal to the exported ones
(`clara_jax.convert.adapters` wraps this for a `Clara` or a saved directory).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np

from clara_jax.clara.formats import hf_mistral
from clara_jax.clara.formats.ours import config_from_dict, config_to_dict
from clara_jax.clara.formats.parts import (ClaraParts, host_copy, load_tokenizer,
                                           to_device, tokenizer_path_in)
from clara_jax.clara.formats.safetensors_io import SafetensorsFile, save_file
from clara_jax.fileio import atomic_directory
from clara_jax.model.config import MistralConfig
from clara_jax.model.mistral import Mistral

TENSORS_FILE = "trainable.safetensors"
CONFIG_FILE = "trainable_config.json"
FORMAT = "clara-jax-trainable/1"
_ADDED = "added_tokens"


def _flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        out.update(_flatten(value, name) if isinstance(value, dict) else
                   {name: np.asarray(value)})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save(out_dir: str, parts: ClaraParts) -> dict:
    """Writes the bundle of `parts` (see the module docstring). Atomic (temporary sibling,
    then rename). Returns the written trainable_config.json dict."""
    host = host_copy(parts)
    base_vocab = host.tokenizer.base_vocab_size
    params = host.params
    tensors = {}
    for name, adapter in sorted(host.adapters.items()):
        tensors.update(_flatten(adapter, f"adapters/{name}"))
    tensors[f"{_ADDED}/embed_tokens"] = np.asarray(params["embed_tokens"]["embedding"])[base_vocab:]
    if "lm_head" in params:  # absent with tied embeddings
        tensors[f"{_ADDED}/lm_head"] = np.asarray(params["lm_head"]["kernel"])[:, base_vocab:]
    config = {
        "format": FORMAT,
        "base_vocab_size": base_vocab,
        "model_config": host.model_config.to_dict(),
        "clara_config": config_to_dict(host.config),
        "apple_config": host.apple_config,
        "adapters": sorted(host.adapters),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                    for k, v in tensors.items()},
    }
    with atomic_directory(out_dir, prefix=".trainable-") as tmp:
        save_file(tensors, os.path.join(tmp, TENSORS_FILE), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return config


def load_base(base_dir: str) -> tuple[MistralConfig, dict, str]:
    """(MistralConfig, params, tokenizer path) of a base model directory: our converted
    checkpoint (model_config.json + params/) or a Hugging Face directory (config.json +
    safetensors); either with its tokenizer (`parts.tokenizer_path_in`: a byte-level BPE
    tokenizer.json, else tokenizer.model)."""
    tok = tokenizer_path_in(base_dir)
    if tok is None:
        raise FileNotFoundError(f"{base_dir}: missing tokenizer.model or tokenizer.json (the "
                                f"base model's tokenizer)")
    if os.path.exists(os.path.join(base_dir, "model_config.json")):
        cfg, params = hf_mistral.load_checkpoint(base_dir)
        return cfg, params, tok
    if os.path.exists(os.path.join(base_dir, "config.json")):
        cfg, params = hf_mistral.load_hf_mistral(base_dir)
        return cfg, params, tok
    raise FileNotFoundError(f"{base_dir}: neither a clara-jax checkpoint (model_config.json) "
                            f"nor a Hugging Face model (config.json)")


def load(bundle_dir: str, base_dir: str) -> ClaraParts:
    """The bundle's adapters and added-token rows over the base model in `base_dir` (see
    `load_base`). Errors name the mismatching field or tensor and shapes."""
    cfg_path = os.path.join(bundle_dir, CONFIG_FILE)
    for path in (cfg_path, os.path.join(bundle_dir, TENSORS_FILE)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{bundle_dir}: missing {os.path.basename(path)} (not an "
                                    f"adapter bundle)")
    with open(cfg_path) as f:
        bundle = json.load(f)
    if bundle.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {bundle.get('format')!r}, expected {FORMAT!r}")
    model_cfg = MistralConfig.from_dict(bundle["model_config"])
    cfg = config_from_dict(bundle["clara_config"])
    base_vocab = int(bundle["base_vocab_size"])

    base_cfg, params, _ = load_base(base_dir)
    expected = model_cfg.replace(param_dtype=base_cfg.param_dtype, dtype=base_cfg.dtype)
    if base_cfg.vocab_size < base_vocab:
        raise ValueError(f"{base_dir}: base model vocab_size = {base_cfg.vocab_size}, but the "
                         f"bundle {bundle_dir} was trained over a tokenizer of {base_vocab}")
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size"):
        if getattr(base_cfg, field) != getattr(expected, field):
            raise ValueError(f"{base_dir}: base model {field} = {getattr(base_cfg, field)}, "
                             f"but the bundle {bundle_dir} was trained over {field} = "
                             f"{getattr(expected, field)}")
    tok, tok_path = load_tokenizer(base_dir, cfg.n_mem, cfg.different_mem_tokens)
    if tok.base_vocab_size != base_vocab:
        raise ValueError(f"{tok_path}: {tok.base_vocab_size} pieces, but the bundle's base "
                         f"vocabulary is {base_vocab}")

    st = SafetensorsFile(os.path.join(bundle_dir, TENSORS_FILE))
    for name, info in bundle["tensors"].items():
        if name not in st.header or list(st.shape(name)) != info["shape"]:
            raise ValueError(f"{bundle_dir}/{TENSORS_FILE}: tensor {name} has shape "
                             f"{st.shape(name) if name in st.header else 'missing'}, "
                             f"{CONFIG_FILE} says {info['shape']}")
    flat = {n: np.array(st.get(n)) for n in st.names()}
    emb = flat.pop(f"{_ADDED}/embed_tokens")
    # The base's first base_vocab rows (a base may have more embedding rows than its
    # tokenizer, e.g. Qwen2.5: the official resize to len(tokenizer) drops the rest).
    table = np.asarray(params["embed_tokens"]["embedding"])[:base_vocab]
    params = dict(params)
    params["embed_tokens"] = {"embedding": np.concatenate([table, emb.astype(table.dtype)])}
    if not model_cfg.tie_word_embeddings:
        head = flat.pop(f"{_ADDED}/lm_head")
        kernel = np.asarray(params["lm_head"]["kernel"])[:, :base_vocab]
        params["lm_head"] = {"kernel": np.concatenate([kernel, head.astype(kernel.dtype)],
                                                      axis=1)}
    if params["embed_tokens"]["embedding"].shape[0] != model_cfg.vocab_size:
        raise ValueError(f"{bundle_dir}: {base_vocab} base + {emb.shape[0]} added rows != the "
                         f"bundle's vocabulary {model_cfg.vocab_size}")

    adapters = _unflatten({n[len("adapters/"):]: v for n, v in flat.items()})
    shapes = jax.eval_shape(lambda: Mistral(model_cfg, cfg.lora).init(
        jax.random.key(0), np.zeros((1, 1), np.int32)))["lora"]
    want = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes))}
    for name, adapter in adapters.items():
        got = {k.split("/", 1)[1]: v.shape for k, v in _flatten(adapter, name).items()}
        if got.keys() != want.keys():
            raise ValueError(f"{bundle_dir}: adapter {name} has tensors "
                             f"{sorted(set(got) ^ set(want))} that the model does not (or "
                             f"lacks them)")
        for k, shape in got.items():
            if tuple(shape) != want[k]:
                raise ValueError(f"{bundle_dir}: adapters/{name}/{k} has shape {tuple(shape)}, "
                                 f"the model needs {want[k]}")
    return ClaraParts(model_cfg, cfg, to_device(params), to_device(adapters), tok,
                      tokenizer_path=tok_path, apple_config=bundle.get("apple_config") or {})
