"""Apple's CLaRa release format <-> our trees.

A release directory holds:
  config.json                    the CLaRa config (compr_rate, doc_max_length, lora_r, sep, ...)
  adapters.pth                   torch-pickled {adapter name: PEFT state dict}, keys like
                                 `model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
                                 `...lora_B.weight` [out, r] (Phi-3: `qkv_proj`, `gate_up_proj`)
  decoder_first_last_layers.pth  `model.embed_tokens.weight` and `lm_head.weight` (absent for a
                                 base with tied embeddings), resized to len(tokenizer): the
                                 tokenizer's length plus the added special tokens
over a Hugging Face base directory (Mistral, Llama, Qwen2 or Phi-3; sentencepiece
tokenizer.model or byte-level BPE tokenizer.json). Reading and writing `.pth` needs torch (the
`[torch]` extra, imported only when a `.pth` is read or written).

`load` / `save` work on whole models (`ClaraParts`); `load_apple` / `save_apple` on trees.

What the official `CLaRa.from_pretrained(release)` (modeling_clara.py:1223) needs, and `save`
writes: config.json with every `CLaRaConfig` field; `decoder_model_name` naming the ORIGINAL
base (base vocabulary, loaded in bfloat16, resized to len(tokenizer) after the added tokens)
with a fast tokenizer and its chat template; the full resized tables in
decoder_first_last_layers.pth; adapters loaded by `training_stage` (stage1: encoder and
decoder; stage2: all three; stage1_2 starts a fresh decoder adapter instead of the saved one;
`pure_inference=True` loads all).

The official constructor resizes the decoder's tables to `len(tokenizer)`
(`resize_token_embeddings`, modeling_clara.py:328): larger for Mistral and Llama 3 (rows
appended), smaller where config.json's vocab_size exceeds the tokenizer (Qwen2.5: 151,936
rows for 151,665 tokens, so 151,676 rows after CLaRa's 11; the rows past the tokenizer are
dropped). The release holds the resized tables, so loading takes them whole; `save` writes a
base with the tokenizer's rows only, which the official loader resizes the same way.

Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, and PEFT adapts each fused
Linear with one A [r, in] and one B [out_q + out_k + out_v, r]. Import copies A to each of
our split kernels and cuts B by rows (exact: B_q A x is the q rows of B A x). Export fuses
back only when the split kernels' A matrices are equal (always so for an imported release);
an adapter trained here has independent A's and is refused in one line naming the module.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from clara_jax.clara.config import APPLE_STAGES, ClaraConfig, canonical_stage
from clara_jax.clara.formats.hf_mistral import (load_hf_mistral, require_transformers,
                                                save_hf_mistral, save_hf_tokenizer)
from clara_jax.clara.formats.parts import (ClaraParts, copy_tokenizer, host_copy, to_device,
                                           tokenizer_path_in)
from clara_jax.clara.tokenizer import ClaraTokenizer, HFClaraTokenizer
from clara_jax.fileio import atomic_directory
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import LORA_TARGETS, LoraConfig

APPLE_ADAPTERS = {"encoder_adapter": "encoder", "decoder_adapter": "decoder",
                  "query_reasoner_adapter": "query_reasoner"}
# Apple's training_stage values (CLaRaConfig, modeling_clara.py:404-436, 1288-1316).
APPLE_TRAINING_STAGES = ("stage1", "stage1_2", "stage2", "stage2_pretrain_retrieval",
                         "stage2_reasoning")
BASE_DIR = "base_model"   # where `save` writes the base when it is not an existing one
# Every CLaRaConfig.__init__ field (modeling_clara.py:127-205) with the value an export
# writes unless the model or an imported release says otherwise. No separate compressor
# (compr_model_name None: the decoder with its encoder adapter compresses); LoRA on every
# linear layer, alpha = 2r. pure_inference is no __init__ field but Apple's releases carry
# it, and `from_pretrained(..., pure_inference=True)` (evaluation/evaluate.py) only takes
# effect on a config that has it.
OFFICIAL_CONFIG = {
    "model_type": "CLaRa", "decoder_model_name": None, "doc_max_length": 128,
    "quantization": "no", "sep": False, "compr_model_name": None, "compr_rate": 64,
    "compr_n_layers": None, "compr_every_n_layer": None, "compr_base_model_name": None,
    "compr_rms_norm": False, "compr_mlp_hidden_dim": 8096, "compr_use_mlp": False,
    "compr_linear_type": "concat", "lora": True, "lora_compressor": False,
    "training_form": "both", "training_stage": "stage1", "generation_top_k": 1, "lora_r": 16,
    "lora_r_compressor": 16, "load_adapters": True, "kbtc_training": False,
    "optimize_mem_tokens": False, "different_mem_tokens": False, "attn_implementation": None,
    "_attn_implementation_autoset": True, "ae_mode": "token", "max_new_tokens": 128,
    "stage2_retrieval_top_n": 1, "load_pretrained_checkpoint": False, "device_map": None,
    "pure_inference": False,
    "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig", "AutoModel": "modeling_clara.CLaRa"},
}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
           "qkv_proj": "self_attn", "gate_up_proj": "mlp"}
# Phi-3's fused Linear layers -> our kernels, in the order of the fused output rows.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|"
                  r"gate_up_proj)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


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


def peft_modules(cfg: MistralConfig) -> tuple[str, ...]:
    """The Hugging Face Linear layers PEFT's "all-linear" adapts in one decoder layer of
    cfg's architecture (Phi-3's fused ones; the seven of Mistral, Llama and Qwen2)."""
    if cfg.architecture == "phi3":
        return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    return LORA_TARGETS


def _members(module: str) -> tuple[str, ...]:
    """Our kernels that a Hugging Face Linear layer holds (itself unless fused)."""
    return FUSED.get(module, (module,))


def adapter_from_peft(state: dict[str, Any], cfg: MistralConfig, where: str = "adapter"
                      ) -> dict:
    """PEFT state dict -> our adapter tree ({"layers": {...: {"lora_a", "lora_b"}}}, stacked).

    Phi-3's fused qkv_proj / gate_up_proj: A copied to each of our kernels, B cut by rows.
    `where` names the source (file and adapter) in errors.
    """
    modules = peft_modules(cfg)
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    rank = None
    for key, value in state.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            continue  # full-table copies some stage-1 files carry; decoder_first_last_layers wins
        m = _KEY.match(key)
        if m is None or m.group(3) not in modules:
            raise ValueError(f"{where}: unexpected key {key!r} (not a LoRA A/B weight of a "
                             f"{cfg.architecture} linear layer: {', '.join(modules)})")
        layer, _, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if layer >= cfg.num_layers:
            raise ValueError(f"{where}: key {key!r} names layer {layer}, the model has "
                             f"{cfg.num_layers}")
        arr = np.asarray(value.float().numpy() if hasattr(value, "numpy") else value,
                         dtype=np.float32)
        members = _members(module)
        in_shape = _shapes(cfg, members[0])[0]
        out_shapes = [_shapes(cfg, n)[1] for n in members]
        out_rows = [int(np.prod(o)) for o in out_shapes]
        r = arr.shape[0] if ab == "A" else arr.shape[1]
        rank = r if rank is None else rank
        expected = (rank, int(np.prod(in_shape))) if ab == "A" else (sum(out_rows), rank)
        if arr.shape != expected:
            raise ValueError(f"{where}: {key!r} has shape {tuple(arr.shape)}, expected "
                             f"{expected} (rank {rank})")
        if ab == "A":
            parts = [arr.T.reshape(*in_shape, rank)] * len(members)
        else:
            bounds = np.cumsum([0, *out_rows])
            parts = [arr[lo:hi].T.reshape(rank, *o)
                     for lo, hi, o in zip(bounds[:-1], bounds[1:], out_shapes)]
        for name, part in zip(members, parts):
            found.setdefault((name, ab), {})[layer] = part
    if not found:
        raise ValueError(f"{where}: no LoRA weights found")
    tree: dict = {}
    for module in LORA_TARGETS:
        for ab in "AB":
            layers = found.get((module, ab), {})
            missing = sorted(set(range(cfg.num_layers)) - set(layers))
            if missing:
                fused = next((f for f, ms in FUSED.items() if module in ms), None)
                name = fused if fused in modules else module
                raise ValueError(f"{where}: missing lora_{ab} of {name} for layers {missing}")
            stacked = np.stack([layers[i] for i in range(cfg.num_layers)])
            tree.setdefault(_PARENT[module], {}).setdefault(module, {})[
                "lora_a" if ab == "A" else "lora_b"] = stacked
    return {"layers": tree}


def adapter_to_peft(adapter: dict, cfg: MistralConfig, b_scale: float = 1.0
                    ) -> dict[str, np.ndarray]:
    """Our adapter tree -> PEFT state dict (float32 numpy), the inverse of adapter_from_peft.

    Every LoRA target gets a key (PEFT's "all-linear"): a layer the adapter does not adapt
    is written as zeros (no change). `b_scale` multiplies the B matrices (an alpha other than
    the official 2r is folded into B). Phi-3: q/k/v (gate/up) are written as one fused
    qkv_proj (gate_up_proj) A and B, which needs their A matrices equal: ValueError naming
    the module and layer otherwise."""
    out = {}
    layers = adapter["layers"]
    present = [layers[_PARENT[m]][m] for m in LORA_TARGETS if m in layers.get(_PARENT[m], {})]
    if not present:
        raise ValueError("adapter has no LoRA layers")
    rank = np.shape(present[0]["lora_a"])[-1]
    for module in peft_modules(cfg):
        a_parts, b_parts = [], []
        for name in _members(module):
            node = layers.get(_PARENT[name], {}).get(name)
            in_shape, out_shape = _shapes(cfg, name)
            if node is None:
                a_parts.append(None)
                b_parts.append(np.zeros((cfg.num_layers, rank, *out_shape), np.float32))
                continue
            a_parts.append(np.asarray(node["lora_a"], np.float32))
            b = np.asarray(node["lora_b"], np.float32)
            b_parts.append((b * np.float32(b_scale)).astype(np.float32) if b_scale != 1.0
                           else b)
        given = [a for a in a_parts if a is not None]
        in_shape = _shapes(cfg, _members(module)[0])[0]
        a = given[0] if given else np.zeros((cfg.num_layers, *in_shape, rank), np.float32)
        for name, other in zip(_members(module), a_parts):
            if other is None or other is a:
                continue
            differ = [i for i in range(cfg.num_layers) if not np.array_equal(other[i], a[i])]
            if differ:
                raise ValueError(
                    f"layers.{differ[0]}.{_PARENT[module]}.{module}: the LoRA A of {name} "
                    f"differs from {_members(module)[0]}'s; Phi-3's fused {module} has one A "
                    f"for {'/'.join(_members(module))} (export our format or a bundle instead)")
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}.{_PARENT[module]}.{module}"
            out[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, rank).T.copy()
            out[f"{prefix}.lora_B.weight"] = np.concatenate(
                [b[i].reshape(rank, -1).T for b in b_parts], axis=0).copy()
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


def default_training_stage(adapters: dict, apple_config: dict | None = None) -> str:
    """The `training_stage` an export writes by default: an imported release's own;
    otherwise the one under which the official `from_pretrained` loads every adapter the
    model has ("stage2" with a query reasoner, else "stage1"), so that Apple's code computes
    what ours does. (Apple's "stage1_2" would start a fresh decoder adapter instead of the
    trained one, as its own Instruct release does when loaded.)"""
    stage = (apple_config or {}).get("training_stage")
    if stage:
        return stage
    return "stage2" if "query_reasoner" in adapters else "stage1"


def clara_config_to_apple(cfg: ClaraConfig, base: dict | None = None, *,
                          decoder_model_name: str | None = None,
                          training_stage: str | None = None) -> dict:
    """Apple's full config.json for our ClaraConfig: every `CLaRaConfig` field
    (`OFFICIAL_CONFIG`), then the fields of `base` (an imported release's config, kept),
    then ours; `decoder_model_name` and `training_stage` replace base's where given."""
    out = {**OFFICIAL_CONFIG, **(base or {})}
    out.update({"doc_max_length": cfg.doc_max_length, "compr_rate": cfg.compress_rate,
                "generation_top_k": cfg.generation_top_k, "sep": cfg.sep,
                "different_mem_tokens": cfg.different_mem_tokens, "lora_r": cfg.lora.rank,
                "lora_r_compressor": cfg.lora.rank, "lora": True})
    if decoder_model_name is not None:
        out["decoder_model_name"] = decoder_model_name
    if out.get("compr_base_model_name") is None:
        out["compr_base_model_name"] = out["decoder_model_name"]
    if training_stage is not None:
        if training_stage not in APPLE_TRAINING_STAGES:
            raise ValueError(f"training_stage {training_stage!r} is not one of Apple's "
                             f"{APPLE_TRAINING_STAGES}")
        out["training_stage"] = training_stage
    return out


def load_apple(clara_dir: str, base_params: dict, base_cfg: MistralConfig,
               base_vocab_size: int | None = None
               ) -> tuple[MistralConfig, ClaraConfig, dict, dict[str, dict], dict]:
    """Reads an Apple release over already-loaded base weights.

    `base_vocab_size` is the tokenizer's length before CLaRa's tokens (default: the base's
    embedding rows; a base may have more rows than its tokenizer, as Qwen2.5 does). Returns
    (model config with the release's vocabulary, ClaraConfig, base params with the release's
    embeddings and lm_head, adapters {encoder, decoder, query_reasoner}, Apple's config dict).
    A release without a query reasoner starts it from the encoder adapter.
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
    base_vocab = base_cfg.vocab_size if base_vocab_size is None else base_vocab_size
    if base_cfg.vocab_size < base_vocab:
        raise ValueError(f"base model: {base_cfg.vocab_size} embedding rows, fewer than its "
                         f"tokenizer's {base_vocab} tokens")

    layers_path = paths["decoder_first_last_layers.pth"]
    layers = torch.load(layers_path, map_location="cpu", weights_only=True)
    tables = {}
    for key, ours in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "lm_head")):
        match = [k for k in layers if k.endswith(key)]
        if match:
            tables[ours] = layers[match[0]].float().numpy()
        elif ours == "embed" or not base_cfg.tie_word_embeddings:
            # A tied base has one table, saved once (named_parameters skips the tied copy).
            raise ValueError(f"{layers_path}: missing {key}")
    tables.setdefault("lm_head", tables["embed"])
    vocab = tables["embed"].shape[0]
    if tables["embed"].shape != (vocab, base_cfg.hidden_size) or \
            tables["lm_head"].shape != (vocab, base_cfg.hidden_size):
        raise ValueError(f"{layers_path}: embed_tokens "
                         f"{tuple(tables['embed'].shape)} / lm_head "
                         f"{tuple(tables['lm_head'].shape)} do not match hidden size "
                         f"{base_cfg.hidden_size} and each other")
    cfg = clara_config_from_apple(apple, first_mem_token_id=base_vocab)
    if vocab < base_vocab + cfg.num_added_tokens:
        raise ValueError(
            f"{layers_path}: vocabulary {vocab} is smaller than the tokenizer's {base_vocab} "
            f"tokens + {cfg.num_added_tokens} added tokens")
    model_cfg = base_cfg.replace(vocab_size=vocab)
    params = dict(base_params)
    params["embed_tokens"] = {"embedding": tables["embed"].astype(
        np.asarray(base_params["embed_tokens"]["embedding"]).dtype)}
    if not base_cfg.tie_word_embeddings:  # tied: lm_head.weight is the embedding table
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


def _write_release(out_dir: str, params: dict, adapters: dict[str, dict],
                   model_cfg: MistralConfig, cfg: ClaraConfig, apple_config: dict) -> None:
    """adapters.pth, decoder_first_last_layers.pth and config.json (`apple_config`, already
    complete) into the existing directory `out_dir`."""
    torch = _require_torch(os.path.join(out_dir, "adapters.pth"))
    b_scale = cfg.lora.alpha / (2.0 * cfg.lora.rank)   # the official alpha is 2r
    state = {f"{apple}": {k: torch.from_numpy(v) for k, v in
                          adapter_to_peft(adapters[ours], model_cfg, b_scale).items()}
             for apple, ours in APPLE_ADAPTERS.items() if ours in adapters}
    torch.save(state, os.path.join(out_dir, "adapters.pth"))
    embed = np.array(params["embed_tokens"]["embedding"], np.float32)  # writable, for torch
    head = (np.asarray(params["lm_head"]["kernel"], np.float32).T.copy()
            if "lm_head" in params else embed.copy())   # tied embeddings: the same table
    torch.save({"model.embed_tokens.weight": torch.from_numpy(embed),
                "lm_head.weight": torch.from_numpy(head)},
               os.path.join(out_dir, "decoder_first_last_layers.pth"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(apple_config, f, indent=2, sort_keys=True)


def save_apple(out_dir: str, params: dict, adapters: dict[str, dict], model_cfg: MistralConfig,
               cfg: ClaraConfig, apple_config: dict | None = None) -> None:
    """Writes an Apple release directory (atomically: temp dir, then rename); config.json is
    `clara_config_to_apple(cfg, apple_config)`."""
    with atomic_directory(out_dir, prefix=".apple-") as tmp:
        _write_release(tmp, params, adapters, model_cfg, cfg,
                       clara_config_to_apple(cfg, apple_config))


def check_hf_base(base_dir: str, model_cfg: MistralConfig, tokenizer: ClaraTokenizer,
                  tokenizer_path: str | None = None) -> None:
    """ValueError naming the field unless the Hugging Face directory `base_dir` is a base of
    this model's shape with at least the tokenizer's rows (`vocab_size` >= its base
    vocabulary: the official loader resizes to len(tokenizer)) and, where both exist, the
    same tokenizer file (tokenizer.model or tokenizer.json) as `tokenizer_path`."""
    path = os.path.join(base_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"base_dir {base_dir}: no config.json (expected a Hugging Face "
                                f"model directory)")
    with open(path) as f:
        hf = json.load(f)
    if not isinstance(hf.get("vocab_size"), int) or hf["vocab_size"] < tokenizer.base_vocab_size:
        raise ValueError(f"{path}: vocab_size is {hf.get('vocab_size')}, this model needs at "
                         f"least {tokenizer.base_vocab_size} (its tokenizer's length)")
    want = {"hidden_size": model_cfg.hidden_size, "num_hidden_layers": model_cfg.num_layers,
            "num_attention_heads": model_cfg.num_heads,
            "intermediate_size": model_cfg.intermediate_size}
    for key, value in want.items():
        if hf.get(key) != value:
            raise ValueError(f"{path}: {key} is {hf.get(key)}, this model needs {value}")
    if tokenizer_path:
        theirs = os.path.join(base_dir, os.path.basename(tokenizer_path))
        if os.path.exists(theirs):
            with open(theirs, "rb") as a, open(tokenizer_path, "rb") as b:
                if a.read() != b.read():
                    raise ValueError(f"{theirs} differs from this model's {tokenizer_path}")


def base_dir_name(tokenizer: ClaraTokenizer) -> str:
    """The folder `save` writes the base into: `base_model`, or `base_model_qwen` for a
    tokenizer that needs the official Qwen bos/eos rule (it looks for "qwen" in the
    decoder's name)."""
    name = getattr(tokenizer, "model_name", "") or ""
    return BASE_DIR + ("_qwen" if "qwen" in name.lower() else "")


def save(out_dir: str, parts: ClaraParts, base_dir: str | None = None,
         training_stage: str | None = None) -> None:
    """Writes `parts` as an Apple release that the official `CLaRa.from_pretrained(out_dir)`
    loads, atomically.

    decoder_model_name: `base_dir` (an existing Hugging Face base of this model, checked by
    `check_hf_base`) when given; else an imported release's own; else the base is written
    as a Hugging Face directory `{out_dir}/base_model` (`base_dir_name`; the first
    tokenizer-length rows of embed_tokens / lm_head and the tokenizer: tokenizer.model with
    its fast tokenizer and chat template, or the tokenizer.json files; needs transformers)
    and named by its absolute path: a release moved elsewhere needs that path edited in
    config.json, or `from_pretrained(dir, decoder_model_name=...)`.
    training_stage: Apple's stage name (`default_training_stage` when None)."""
    host = host_copy(parts)
    tok = host.tokenizer
    if host.model_config.vocab_size != tok.vocab_size:
        raise ValueError(f"model vocabulary {host.model_config.vocab_size} != the tokenizer's "
                         f"{tok.vocab_size} (base {tok.base_vocab_size} + added): the official "
                         f"loader resizes the tables to len(tokenizer)")
    out_abs = os.path.abspath(out_dir)
    write_base = False
    if base_dir is not None:
        base_abs = os.path.abspath(base_dir)
        if base_abs == out_abs or base_abs.startswith(out_abs + os.sep):
            raise ValueError(f"base_dir {base_dir} is inside out_dir {out_dir}, which the "
                             f"export replaces")
        check_hf_base(base_abs, host.model_config, tok, host.tokenizer_path)
        name = base_abs
    elif host.apple_config.get("decoder_model_name"):
        name = host.apple_config["decoder_model_name"]
    else:
        if host.tokenizer_path is None:
            raise ValueError("this model has no tokenizer file path to write its base with")
        require_transformers(f"writing the base of {out_dir} as a Hugging Face directory "
                             f"(or pass base_dir)")
        name, write_base = os.path.join(out_abs, base_dir_name(tok)), True
    config = clara_config_to_apple(
        host.config, host.apple_config, decoder_model_name=name,
        training_stage=training_stage or default_training_stage(host.adapters,
                                                                host.apple_config))
    with atomic_directory(out_dir, prefix=".apple-") as tmp:
        _write_release(tmp, host.params, host.adapters, host.model_config, host.config, config)
        if write_base:
            _write_hf_base(os.path.join(tmp, base_dir_name(tok)), host, tok.base_vocab_size)


def _write_hf_base(out_dir: str, parts: ClaraParts, base_vocab: int) -> None:
    """The base of `parts` as a Hugging Face directory of its architecture with the
    tokenizer's rows (the added tokens' rows dropped) and its tokenizer: a sentencepiece
    model with its fast tokenizer and chat template, or the tokenizer.json files."""
    params = dict(parts.params)
    params["embed_tokens"] = {"embedding": np.asarray(
        parts.params["embed_tokens"]["embedding"])[:base_vocab]}
    if "lm_head" in parts.params:
        head = np.asarray(parts.params["lm_head"]["kernel"])
        params["lm_head"] = {"kernel": head[:, :base_vocab]}
    save_hf_mistral(parts.model_config.replace(vocab_size=base_vocab), params, out_dir)
    if isinstance(parts.tokenizer, HFClaraTokenizer):
        copy_tokenizer(parts.tokenizer_path, out_dir, parts.tokenizer)
    else:
        save_hf_tokenizer(parts.tokenizer_path, out_dir, parts.tokenizer.chat_template)


def load(clara_dir: str, base_model_dir: str, dtype: str | None = None) -> ClaraParts:
    """A whole model from an Apple release over a Hugging Face base directory (safetensors +
    tokenizer.model or a byte-level BPE tokenizer.json, with tokenizer_config.json and
    chat_template.jinja when present); `dtype` casts the base weights.

    The official Qwen bos/eos rule looks for "qwen" in the decoder's name: here in
    base_model_dir or, failing that, the release's decoder_model_name (without a bos token
    the official code cannot run, so the two never give different tokenizers)."""
    config_path = os.path.join(clara_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{clara_dir}: missing config.json (an Apple CLaRa release has "
                                f"config.json, adapters.pth, decoder_first_last_layers.pth)")
    with open(config_path) as f:
        release = json.load(f)
    cfg = clara_config_from_apple(release, first_mem_token_id=0)
    names = (base_model_dir, str(release.get("decoder_model_name") or ""))
    tok = ClaraTokenizer.from_dir(
        base_model_dir, cfg.doc_max_length, cfg.compress_rate, cfg.different_mem_tokens,
        model_name=next((n for n in names if "qwen" in n.lower()), base_model_dir))
    tok_path = tokenizer_path_in(base_model_dir)
    base_cfg, base_params = load_hf_mistral(base_model_dir, dtype=dtype)
    model_cfg, cfg, params, adapters, apple_cfg = load_apple(
        clara_dir, base_params, base_cfg, base_vocab_size=tok.base_vocab_size)
    if model_cfg.vocab_size != tok.vocab_size:
        raise ValueError(f"{clara_dir}/decoder_first_last_layers.pth: {model_cfg.vocab_size} "
                         f"rows, but the official loader resizes to len(tokenizer) = "
                         f"{tok.vocab_size} ({tok_path})")
    return ClaraParts(model_cfg, cfg, to_device(params), to_device(adapters), tok,
                      tokenizer_path=tok_path, apple_config=apple_cfg)
