"""Apple's CLaRa release format <-> our trees.

A release directory holds:
  config.json                    the CLaRa config (compr_rate, doc_max_length, lora_r, sep, ...)
  adapters.pth                   torch-pickled {adapter name: PEFT state dict}, keys like
                                 `model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
                                 `...lora_B.weight` [out, r]
  decoder_first_last_layers.pth  `model.embed_tokens.weight` and `lm_head.weight`, resized to the
                                 base vocabulary plus the added special tokens
over a Hugging Face Mistral base directory. Reading and writing `.pth` needs torch (the
`[torch]` extra, imported only when a `.pth` is read or written).

`load` / `save` work on whole models (`ClaraParts`); `load_apple` / `save_apple` on trees.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from clara_jax.clara.config import APPLE_STAGES, ClaraConfig, canonical_stage
from clara_jax.clara.formats.hf_mistral import load_hf_mistral
from clara_jax.clara.formats.parts import TOKENIZER_FILE, ClaraParts, host_copy, to_device
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.fileio import atomic_directory
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import LORA_TARGETS, LoraConfig

APPLE_ADAPTERS = {"encoder_adapter": "encoder", "decoder_adapter": "decoder",
                  "query_reasoner_adapter": "query_reasoner"}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
                  r"lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _require_torch(path: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"reading {path} needs PyTorch: pip install 'clara-jax[torch]' "
                          "(with torch==2.13.0 for the CPU build)") from e
    return torch


def _shapes(cfg: MistralConfig, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input shape, output shape) of one adapted kernel in our layout."""
    d, h, k, hd, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size)
    return {"q_proj": ((d,), (h, hd)), "k_proj": ((d,), (k, hd)), "v_proj": ((d,), (k, hd)),
            "o_proj": ((h, hd), (d,)), "gate_proj": ((d,), (f,)), "up_proj": ((d,), (f,)),
            "down_proj": ((f,), (d,))}[module]


def adapter_from_peft(state: dict[str, Any], cfg: MistralConfig, where: str = "adapter"
                      ) -> dict:
    """PEFT state dict -> our adapter tree ({"layers": {...: {"lora_a", "lora_b"}}}, stacked).

    `where` names the source (file and adapter) in errors.
    """
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    rank = None
    for key, value in state.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            continue  # full-table copies some stage-1 files carry; decoder_first_last_layers wins
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{where}: unexpected key {key!r} (not a LoRA A/B weight of a "
                             f"Mistral linear layer)")
        layer, _, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if layer >= cfg.num_layers:
            raise ValueError(f"{where}: key {key!r} names layer {layer}, the model has "
                             f"{cfg.num_layers}")
        arr = np.asarray(value.float().numpy() if hasattr(value, "numpy") else value,
                         dtype=np.float32)
        in_shape, out_shape = _shapes(cfg, module)
        r = arr.shape[0] if ab == "A" else arr.shape[1]
        rank = r if rank is None else rank
        expected = (rank, int(np.prod(in_shape))) if ab == "A" else (int(np.prod(out_shape)), rank)
        if arr.shape != expected:
            raise ValueError(f"{where}: {key!r} has shape {tuple(arr.shape)}, expected "
                             f"{expected} (rank {rank})")
        ours = (arr.T.reshape(*in_shape, rank) if ab == "A" else arr.T.reshape(rank, *out_shape))
        found.setdefault((module, ab), {})[layer] = ours
    if not found:
        raise ValueError(f"{where}: no LoRA weights found")
    tree: dict = {}
    for module in LORA_TARGETS:
        for ab in "AB":
            layers = found.get((module, ab), {})
            missing = sorted(set(range(cfg.num_layers)) - set(layers))
            if missing:
                raise ValueError(f"{where}: missing lora_{ab} of {module} for layers {missing}")
            stacked = np.stack([layers[i] for i in range(cfg.num_layers)])
            tree.setdefault(_PARENT[module], {}).setdefault(module, {})[
                "lora_a" if ab == "A" else "lora_b"] = stacked
    return {"layers": tree}


def adapter_to_peft(adapter: dict, cfg: MistralConfig) -> dict[str, np.ndarray]:
    """Our adapter tree -> PEFT state dict (float32 numpy), the inverse of adapter_from_peft."""
    out = {}
    layers = adapter["layers"]
    for module in LORA_TARGETS:
        node = layers[_PARENT[module]][module]
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        rank = a.shape[-1]
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}.{_PARENT[module]}.{module}"
            out[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, rank).T.copy()
            out[f"{prefix}.lora_B.weight"] = b[i].reshape(rank, -1).T.copy()
    return out


def clara_config_from_apple(apple: dict, first_mem_token_id: int) -> ClaraConfig:
    """Our ClaraConfig from Apple's config.json dict."""
    rank = int(apple.get("lora_r", 16))
    return ClaraConfig(
        doc_max_length=int(apple.get("doc_max_length", 128)),
        compress_rate=int(apple.get("compr_rate", 64)),
        generation_top_k=int(apple.get("generation_top_k", 1)),
        sep=bool(apple.get("sep", False)),
        different_mem_tokens=bool(apple.get("different_mem_tokens", False)),
        first_mem_token_id=first_mem_token_id,
        lora=LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.1),
    )


def clara_config_to_apple(cfg: ClaraConfig, base: dict | None = None) -> dict:
    """Apple's config.json fields for our ClaraConfig (other fields of `base` are kept)."""
    out = dict(base or {})
    out.update({"doc_max_length": cfg.doc_max_length, "compr_rate": cfg.compress_rate,
                "generation_top_k": cfg.generation_top_k, "sep": cfg.sep,
                "different_mem_tokens": cfg.different_mem_tokens, "lora_r": cfg.lora.rank,
                "lora": True, "model_type": out.get("model_type", "CLaRa")})
    return out


def load_apple(clara_dir: str, base_params: dict, base_cfg: MistralConfig
               ) -> tuple[MistralConfig, ClaraConfig, dict, dict[str, dict], dict]:
    """Reads an Apple release over already-loaded base weights.

    Returns (model config with the resized vocabulary, ClaraConfig, base params with the
    release's embeddings and lm_head, adapters {encoder, decoder, query_reasoner}, Apple's
    config dict). A release without a query reasoner starts it from the encoder adapter.
    """
    paths = {name: os.path.join(clara_dir, name) for name in
             ("config.json", "adapters.pth", "decoder_first_last_layers.pth")}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{clara_dir}: missing {name} (an Apple CLaRa release has "
                                    f"config.json, adapters.pth, decoder_first_last_layers.pth)")
    with open(paths["config.json"]) as f:
        apple = json.load(f)
    torch = _require_torch(paths["adapters.pth"])

    layers = torch.load(paths["decoder_first_last_layers.pth"], map_location="cpu",
                        weights_only=True)
    tables = {}
    for key, ours in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "lm_head")):
        match = [k for k in layers if k.endswith(key)]
        if not match:
            raise ValueError(f"{paths['decoder_first_last_layers.pth']}: missing {key}")
        tables[ours] = layers[match[0]].float().numpy()
    vocab = tables["embed"].shape[0]
    if tables["embed"].shape != (vocab, base_cfg.hidden_size) or \
            tables["lm_head"].shape != (vocab, base_cfg.hidden_size):
        raise ValueError(f"{paths['decoder_first_last_layers.pth']}: embed_tokens "
                         f"{tuple(tables['embed'].shape)} / lm_head "
                         f"{tuple(tables['lm_head'].shape)} do not match hidden size "
                         f"{base_cfg.hidden_size} and each other")
    cfg = clara_config_from_apple(apple, first_mem_token_id=base_cfg.vocab_size)
    if vocab < base_cfg.vocab_size + cfg.num_added_tokens:
        raise ValueError(
            f"{paths['decoder_first_last_layers.pth']}: vocabulary {vocab} is smaller than the "
            f"base vocabulary {base_cfg.vocab_size} + {cfg.num_added_tokens} added tokens")
    model_cfg = base_cfg.replace(vocab_size=vocab)
    params = dict(base_params)
    params["embed_tokens"] = {"embedding": tables["embed"].astype(
        np.asarray(base_params["embed_tokens"]["embedding"]).dtype)}
    params["lm_head"] = {"kernel": tables["lm_head"].T.astype(
        np.asarray(base_params["lm_head"]["kernel"]).dtype)}

    raw = torch.load(paths["adapters.pth"], map_location="cpu", weights_only=True)
    adapters = {}
    for name, state in raw.items():
        if name not in APPLE_ADAPTERS:
            raise ValueError(f"{paths['adapters.pth']}: unknown adapter {name!r}; "
                             f"known: {sorted(APPLE_ADAPTERS)}")
        adapter = adapter_from_peft(state, model_cfg, where=f"{paths['adapters.pth']}[{name}]")
        rank = adapter["layers"]["self_attn"]["q_proj"]["lora_a"].shape[-1]
        if rank != cfg.lora.rank:
            raise ValueError(f"{paths['adapters.pth']}[{name}]: LoRA rank {rank} but config.json "
                             f"lora_r is {cfg.lora.rank}")
        adapters[APPLE_ADAPTERS[name]] = adapter
    if "encoder" not in adapters:
        raise ValueError(f"{paths['adapters.pth']}: no encoder_adapter")
    if "query_reasoner" not in adapters:
        adapters["query_reasoner"] = adapters["encoder"]
    if "decoder" not in adapters:
        raise ValueError(f"{paths['adapters.pth']}: no decoder_adapter")
    stage = apple.get("training_stage")
    if stage in APPLE_STAGES:
        canonical_stage(stage)
    return model_cfg, cfg, params, adapters, apple


def save_apple(out_dir: str, params: dict, adapters: dict[str, dict], model_cfg: MistralConfig,
               cfg: ClaraConfig, apple_config: dict | None = None) -> None:
    """Writes an Apple release directory (atomically: temp dir, then rename)."""
    torch = _require_torch(os.path.join(out_dir, "adapters.pth"))
    with atomic_directory(out_dir, prefix=".apple-") as tmp:
        state = {f"{apple}": {k: torch.from_numpy(v) for k, v in
                              adapter_to_peft(adapters[ours], model_cfg).items()}
                 for apple, ours in APPLE_ADAPTERS.items() if ours in adapters}
        torch.save(state, os.path.join(tmp, "adapters.pth"))
        embed = np.array(params["embed_tokens"]["embedding"], np.float32)  # writable, for torch
        head = np.asarray(params["lm_head"]["kernel"], np.float32).T.copy()
        torch.save({"model.embed_tokens.weight": torch.from_numpy(embed),
                    "lm_head.weight": torch.from_numpy(head)},
                   os.path.join(tmp, "decoder_first_last_layers.pth"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(clara_config_to_apple(cfg, apple_config), f, indent=2, sort_keys=True)


def load(clara_dir: str, base_model_dir: str, dtype: str | None = None) -> ClaraParts:
    """A whole model from an Apple release over a Hugging Face Mistral base directory
    (safetensors + tokenizer.model); `dtype` casts the base weights."""
    base_cfg, base_params = load_hf_mistral(base_model_dir, dtype=dtype)
    model_cfg, cfg, params, adapters, apple_cfg = load_apple(clara_dir, base_params, base_cfg)
    tok_path = os.path.join(base_model_dir, TOKENIZER_FILE)
    tok = ClaraTokenizer.from_dir(base_model_dir, cfg.doc_max_length, cfg.compress_rate,
                                  cfg.different_mem_tokens)
    if tok.base_vocab_size != base_cfg.vocab_size:
        raise ValueError(f"{tok_path}: {tok.base_vocab_size} pieces but the base model's "
                         f"vocabulary is {base_cfg.vocab_size}")
    return ClaraParts(model_cfg, cfg, to_device(params), to_device(adapters), tok,
                      tokenizer_path=tok_path, apple_config=apple_cfg)


def save(out_dir: str, parts: ClaraParts) -> None:
    """Writes `parts` as an Apple release (readable by the official `CLaRa.from_pretrained`)."""
    host = host_copy(parts)
    save_apple(out_dir, host.params, host.adapters, host.model_config, host.config,
               host.apple_config)
