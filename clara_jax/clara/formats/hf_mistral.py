"""Hugging Face decoders (Mistral, Llama, Qwen2, Phi-3) <-> our parameter tree, and our
base-model checkpoint format. The module keeps its first name; docs/backbones.md maps each.

HF stores torch Linear weights [out, in]; we store kernels [in..., out...] with a stacked
layer axis (see `clara_jax.model.mistral`). Import reads tensor by tensor from memory-mapped
safetensors into preallocated stacked arrays (peak: about one copy of the weights). Our
checkpoint directory: `params/` (Orbax), `model_config.json`, the tokenizer files
(`parts.copy_tokenizer`: tokenizer.model, or tokenizer.json and its companions).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from clara_jax.clara.chat import MISTRAL_CHAT_TEMPLATE
from clara_jax.clara.formats import safetensors_io
from clara_jax.clara.formats.parts import copy_tokenizer, tokenizer_path_in
from clara_jax.fileio import atomic_directory
from clara_jax.model.config import MistralConfig

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
# Hugging Face class name and model_type of each supported architecture.
HF_ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}
_BY_CLASS = {v: k for k, v in HF_ARCHITECTURES.items()}


def detect_architecture(hf: dict, source: str = CONFIG) -> str:
    """Our architecture name from config.json's `architectures` (first entry) or, without
    it, `model_type`; ValueError in one line naming an unsupported one and `source`."""
    classes = hf.get("architectures") or []
    if classes:
        if classes[0] not in _BY_CLASS:
            raise ValueError(f"{source}: unsupported architecture {classes[0]!r} (supported: "
                             f"{', '.join(HF_ARCHITECTURES.values())})")
        return _BY_CLASS[classes[0]]
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r} (supported: "
                         f"{', '.join(HF_ARCHITECTURES)})")
    return model_type


def _first_id(value: Any, default: int) -> int:
    """A token id from config.json (Llama 3 lists several eos ids: the first is kept)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def _rope_fields(hf: dict, arch: str, source: str) -> dict:
    """MistralConfig RoPE-scaling fields from config.json's `rope_scaling` (ValueError naming
    a type this architecture or this decoder does not support)."""
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    supported = {"mistral": (), "qwen2": (), "llama": ("llama3",), "phi3": ("longrope",)}[arch]
    if kind == "default":
        return {}
    if kind not in supported:
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported for "
                         f"{HF_ARCHITECTURES[arch]} (supported: {list(supported) or 'none'})")
    if kind == "llama3":
        return dict(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                    rope_low_freq_factor=float(scaling["low_freq_factor"]),
                    rope_high_freq_factor=float(scaling["high_freq_factor"]),
                    rope_original_max_position_embeddings=int(
                        scaling["original_max_position_embeddings"]))
    if scaling.get("attention_factor") is not None:
        raise ValueError(f"{source}: rope_scaling.attention_factor is not supported (the "
                         f"multiplier is derived from the position-embedding lengths)")
    original = hf.get("original_max_position_embeddings") or scaling.get(
        "original_max_position_embeddings")
    if not original:
        raise ValueError(f"{source}: longrope needs original_max_position_embeddings")
    return dict(rope_scaling="longrope", rope_original_max_position_embeddings=int(original),
                rope_short_factor=tuple(float(x) for x in scaling["short_factor"]),
                rope_long_factor=tuple(float(x) for x in scaling["long_factor"]))


def config_from_hf(hf: dict, source: str = CONFIG, **overrides: Any) -> MistralConfig:
    """MistralConfig from a HF config.json dict of a supported architecture (Mistral, Llama,
    Qwen2, Phi-3); ValueError in one line naming `source` and the field it cannot map."""
    arch = detect_architecture(hf, source)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (silu only)")
    if arch == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if hf.get(field):
                raise ValueError(f"{source}: {field}=true is not supported for LlamaForCausalLM")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported for "
                         f"Qwen2ForCausalLM")
    heads = int(hf["num_attention_heads"])
    fields = dict(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        intermediate_size=int(hf["intermediate_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        sliding_window=0 if arch in ("qwen2", "llama") else int(hf.get("sliding_window") or 0),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=_first_id(hf.get("bos_token_id"), 1),
        eos_token_id=_first_id(hf.get("eos_token_id"), 2),
        qkv_bias=arch == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        partial_rotary_factor=float(hf.get("partial_rotary_factor") or 1.0)
        if arch == "phi3" else 1.0,
        **_rope_fields(hf, arch, source))
    fields.update(overrides)
    return MistralConfig(**fields)


def config_to_hf(cfg: MistralConfig, torch_dtype: str = "float32") -> dict:
    """A HF config.json dict for cfg, of its architecture's class."""
    out = {"architectures": [HF_ARCHITECTURES[cfg.architecture]],
           "model_type": cfg.architecture,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta,
           "rms_norm_eps": cfg.rms_norm_eps, "sliding_window": cfg.sliding_window or None,
           "max_position_embeddings": cfg.max_position_embeddings,
           "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "hidden_act": "silu", "tie_word_embeddings": cfg.tie_word_embeddings,
           "torch_dtype": torch_dtype, "attention_dropout": 0.0, "initializer_range": 0.02,
           "use_cache": True}
    if cfg.architecture == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.architecture == "qwen2":
        out.update(use_sliding_window=False, max_window_layers=cfg.num_layers)
    if cfg.architecture == "phi3":
        # pad_token_id: Phi3Config's default (32000) is outside smaller vocabularies.
        out.update(partial_rotary_factor=cfg.partial_rotary_factor, resid_pdrop=0.0,
                   embd_pdrop=0.0, pad_token_id=None)
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}
    elif cfg.rope_scaling == "longrope":
        out["original_max_position_embeddings"] = cfg.rope_original_max_position_embeddings
        out["rope_scaling"] = {"type": "longrope", "short_factor": list(cfg.rope_short_factor),
                               "long_factor": list(cfg.rope_long_factor
                                                   or cfg.rope_short_factor)}
    return out


# One entry per HF tensor: our paths (one, or several for a fused Phi-3 tensor), HF name
# ({i} = layer), HF shape, HF -> tuple of ours, tuple of ours -> HF.
Entry = tuple[tuple[tuple[str, ...], ...], str, tuple[int, ...], Callable, Callable]


def _single(path: tuple[str, ...], name: str, shape: tuple[int, ...], to_ours: Callable,
            to_hf: Callable) -> Entry:
    return (path,), name, shape, lambda w: (to_ours(w),), lambda parts: to_hf(parts[0])


def _fused(paths: tuple[tuple[str, ...], ...], name: str, rows: tuple[int, ...], d: int,
           to_ours: tuple[Callable, ...], to_hf: tuple[Callable, ...]) -> Entry:
    """A HF weight [sum(rows), d] stacking several of our kernels along its output rows."""
    bounds = np.cumsum((0, *rows))

    def split(w):
        return tuple(f(w[a:b]) for f, a, b in zip(to_ours, bounds[:-1], bounds[1:]))

    def fuse(parts):
        return np.concatenate([f(x) for f, x in zip(to_hf, parts)], axis=0)

    return paths, name, (int(bounds[-1]), d), split, fuse


def layout(cfg: MistralConfig) -> tuple[list[Entry], list[Entry]]:
    """(global entries, per-layer entries) of the HF <-> ours mapping for cfg's architecture."""
    d, h, k, hd, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size)
    same = lambda w: w
    t = lambda w: w.T
    glob = [
        _single(("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d), same, same),
        _single(("norm", "scale"), "model.norm.weight", (d,), same, same),
    ]
    if not cfg.tie_word_embeddings:
        glob.append(_single(("lm_head", "kernel"), "lm_head.weight", (v, d), t, t))
    proj_in = lambda n_out: lambda w: w.T.reshape(d, n_out, hd)
    proj_out = lambda x: x.reshape(d, -1).T
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    ours_attn, ours_mlp = ("layers", "self_attn"), ("layers", "mlp")
    layer = [
        _single(("layers", "input_layernorm", "scale"), "model.layers.{i}.input_layernorm.weight",
                (d,), same, same),
        _single(("layers", "post_attention_layernorm", "scale"),
                "model.layers.{i}.post_attention_layernorm.weight", (d,), same, same),
        _single((*ours_attn, "o_proj", "kernel"), attn + "o_proj.weight", (d, h * hd),
                lambda w: w.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T),
        _single((*ours_mlp, "down_proj", "kernel"), mlp + "down_proj.weight", (d, f), t, t),
    ]
    if cfg.architecture == "phi3":
        layer += [
            _fused(tuple((*ours_attn, n, "kernel") for n in ("q_proj", "k_proj", "v_proj")),
                   attn + "qkv_proj.weight", (h * hd, k * hd, k * hd), d,
                   (proj_in(h), proj_in(k), proj_in(k)), (proj_out,) * 3),
            _fused(tuple((*ours_mlp, n, "kernel") for n in ("gate_proj", "up_proj")),
                   mlp + "gate_up_proj.weight", (f, f), d, (t, t), (t, t)),
        ]
    else:
        for n, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
            layer.append(_single((*ours_attn, n, "kernel"), attn + f"{n}.weight",
                                 (heads * hd, d), proj_in(heads), proj_out))
        for n in ("gate_proj", "up_proj"):
            layer.append(_single((*ours_mlp, n, "kernel"), mlp + f"{n}.weight", (f, d), t, t))
    if cfg.qkv_bias:
        for n, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
            layer.append(_single((*ours_attn, n, "bias"), attn + f"{n}.bias", (heads * hd,),
                                 lambda w, heads=heads: w.reshape(heads, hd),
                                 lambda x: x.reshape(-1)))
    return glob, layer


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _cast(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    return arr if dtype is None else arr.astype(safetensors_io.DTYPES.get(
        {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype, dtype), dtype))


def load_hf_mistral(model_dir: str, dtype: str | None = None) -> tuple[MistralConfig, dict]:
    """Reads a HF directory of a supported architecture (config.json + safetensors, single
    file or sharded); the name predates Llama, Qwen2 and Phi-3 (see `config_from_hf`).

    Returns (config, params as numpy); Phi-3's fused qkv_proj / gate_up_proj are split into
    our q/k/v and gate/up kernels. Missing, unexpected or mis-shaped tensors raise ValueError
    naming the tensor and both shapes.
    """
    cfg_path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{model_dir}: missing {CONFIG}")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    files = safetensors_io.open_dir(model_dir)
    glob, layer = layout(cfg)
    expected = {name: shape for _, name, shape, _, _ in glob}
    for _, name, shape, _, _ in layer:
        for i in range(cfg.num_layers):
            expected[name.format(i=i)] = shape
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding, which
    # transformers ignores when it ties the weights): not read.
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(set(files) - set(expected) - ignored)
    if unexpected:
        raise ValueError(f"{model_dir}: unexpected tensors {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} (not in a "
                         f"{HF_ARCHITECTURES[cfg.architecture]} of this config.json)")
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ValueError(f"{model_dir}: missing tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for name, shape in expected.items():
        actual = files[name].shape(name)
        if actual != shape:
            raise ValueError(f"{model_dir}: tensor {name} has shape {actual}, config.json "
                             f"implies {shape}")
    params: dict = {}
    for paths, name, _, to_ours, _ in glob:
        for path, part in zip(paths, to_ours(files[name].get(name))):
            _set(params, path, np.array(_cast(part, dtype)))
    for paths, name, _, to_ours, _ in layer:
        stacked = None
        for i in range(cfg.num_layers):
            key = name.format(i=i)
            parts = [_cast(p, dtype) for p in to_ours(files[key].get(key))]
            if stacked is None:
                stacked = [np.empty((cfg.num_layers, *p.shape), p.dtype) for p in parts]
            for out, p in zip(stacked, parts):
                out[i] = p
        for path, arr in zip(paths, stacked):
            _set(params, path, arr)
    return cfg, params


def hf_tensors(cfg: MistralConfig, params: dict, dtype: str | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor of our params, layer by layer (Phi-3: q/k/v and
    gate/up fused back into qkv_proj and gate_up_proj)."""
    glob, layer = layout(cfg)
    for paths, name, _, _, to_hf in glob:
        parts = tuple(np.asarray(_get(params, p)) for p in paths)
        yield name, np.ascontiguousarray(_cast(to_hf(parts), dtype))
    for i in range(cfg.num_layers):
        for paths, name, _, _, to_hf in layer:
            parts = tuple(np.asarray(_get(params, p)[i]) for p in paths)
            yield name.format(i=i), np.ascontiguousarray(_cast(to_hf(parts), dtype))


def save_hf_mistral(cfg: MistralConfig, params: dict, out_dir: str, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, tokenizer_path: str | None = None) -> None:
    """Exports our params as a HF directory of cfg's architecture (loadable by
    `from_pretrained`)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config_to_hf(cfg, dtype or cfg.param_dtype), f, indent=2)
    safetensors_io.save_sharded(hf_tensors(cfg, params, dtype), out_dir, max_shard_bytes)
    if tokenizer_path:
        copy_tokenizer(tokenizer_path, out_dir)


def require_transformers(what: str):
    """The transformers module; ImportError naming `what` needed it when it is missing."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{what} needs transformers: pip install 'clara-jax[torch]'") from e
    return transformers


def save_hf_tokenizer(tokenizer_path: str, out_dir: str,
                      chat_template: str = MISTRAL_CHAT_TEMPLATE) -> None:
    """Writes the Hugging Face fast tokenizer of the sentencepiece model `tokenizer_path`
    into `out_dir` (tokenizer.json, tokenizer_config.json with `chat_template`,
    special_tokens_map.json, tokenizer.model) as Mistral-7B-Instruct-v0.2 ships it: the
    legacy Llama normaliser (the one `ClaraTokenizer` reproduces), <s> added, </s> not.
    Needs transformers (the `torch` extra): ImportError in one line otherwise."""
    transformers = require_transformers(f"writing the Hugging Face tokenizer in {out_dir}")
    tok = transformers.LlamaTokenizerFast(vocab_file=tokenizer_path, legacy=True, from_slow=True,
                             add_bos_token=True, add_eos_token=False, add_prefix_space=True,
                             clean_up_tokenization_spaces=False)
    tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
    if not os.path.exists(os.path.join(out_dir, TOKENIZER)):
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER))


def save_checkpoint(out_dir: str, cfg: MistralConfig, params: dict,
                    tokenizer_path: str | None = None, overwrite: bool = True) -> None:
    """Writes our checkpoint (Orbax params, model_config.json, the tokenizer files of
    `tokenizer_path`: tokenizer.model, or tokenizer.json and its companions) atomically: into
    a temporary sibling directory, renamed into place when complete."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    with atomic_directory(out_dir, prefix=".ckpt-") as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
        cfg.to_json(os.path.join(tmp, "model_config.json"))
        if tokenizer_path:
            copy_tokenizer(tokenizer_path, tmp)


def convert_hf_to_checkpoint(model_dir: str, out_dir: str, dtype: str | None = None,
                             overwrite: bool = False) -> MistralConfig:
    """HF directory -> our checkpoint directory (with its tokenizer: a byte-level BPE
    tokenizer.json and companions, else tokenizer.model, if any); returns the model config."""
    cfg, params = load_hf_mistral(model_dir, dtype)
    save_checkpoint(out_dir, cfg, params, tokenizer_path_in(model_dir), overwrite)
    return cfg


def load_checkpoint(ckpt_dir: str) -> tuple[MistralConfig, dict]:
    """Reads our checkpoint directory -> (config, params as numpy)."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    for name in ("model_config.json", "params"):
        if not os.path.exists(os.path.join(ckpt_dir, name)):
            raise FileNotFoundError(f"{ckpt_dir}: missing {name} (not a clara-jax checkpoint)")
    cfg = MistralConfig.from_json(os.path.join(ckpt_dir, "model_config.json"))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(ckpt_dir, "params"))
    return cfg, jax.tree_util.tree_map(np.asarray, params)
