"""Hugging Face Mistral <-> our parameter tree, and our base-model checkpoint format.

HF stores torch Linear weights [out, in]; we store kernels [in..., out...] with a stacked
layer axis (see `clara_jax.model.mistral`). Import reads tensor by tensor from memory-mapped
safetensors into preallocated stacked arrays (peak: about one copy of the weights). Our
checkpoint directory: `params/` (Orbax), `model_config.json`, `tokenizer.model`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from clara_jax.clara.formats import safetensors_io
from clara_jax.fileio import atomic_directory
from clara_jax.model.config import MistralConfig

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
# Mistral-7B-Instruct-v0.2's chat template (its tokenizer_config.json on the Hugging Face
# hub), which `clara.prompts.mistral_chat` renders; written beside an exported base so that
# `apply_chat_template` (Apple's prompts use it) gives our prompts.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")


def config_from_hf(hf: dict, **overrides: Any) -> MistralConfig:
    """MistralConfig from a HF config.json dict (tied embeddings are not supported)."""
    if hf.get("tie_word_embeddings", False):
        raise ValueError("config.json: tie_word_embeddings=true is not a Mistral layout")
    heads = int(hf["num_attention_heads"])
    fields = dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        intermediate_size=int(hf["intermediate_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        sliding_window=int(hf.get("sliding_window") or 0),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=int(hf.get("bos_token_id", 1) or 1),
        eos_token_id=int(hf.get("eos_token_id", 2) or 2))
    fields.update(overrides)
    return MistralConfig(**fields)


def config_to_hf(cfg: MistralConfig, torch_dtype: str = "float32") -> dict:
    """A HF MistralForCausalLM config.json dict for cfg."""
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "sliding_window": cfg.sliding_window or None,
            "max_position_embeddings": cfg.max_position_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": torch_dtype,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}


# One entry per parameter: our path, HF name ({i} = layer), HF shape, HF -> ours, ours -> HF.
Entry = tuple[tuple[str, ...], str, tuple[int, ...], Callable, Callable]


def layout(cfg: MistralConfig) -> tuple[list[Entry], list[Entry]]:
    """(global entries, per-layer entries) of the HF <-> ours mapping."""
    d, h, k, hd, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size)
    same = lambda w: w
    t = lambda w: w.T
    glob = [
        (("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d), same, same),
        (("norm", "scale"), "model.norm.weight", (d,), same, same),
        (("lm_head", "kernel"), "lm_head.weight", (v, d), t, t),
    ]
    proj = lambda n_out: (lambda w: w.T.reshape(d, n_out, hd), lambda x: x.reshape(d, -1).T)
    layer = [
        (("layers", "input_layernorm", "scale"), "model.layers.{i}.input_layernorm.weight",
         (d,), same, same),
        (("layers", "post_attention_layernorm", "scale"),
         "model.layers.{i}.post_attention_layernorm.weight", (d,), same, same),
        (("layers", "self_attn", "q_proj", "kernel"), "model.layers.{i}.self_attn.q_proj.weight",
         (h * hd, d), *proj(h)),
        (("layers", "self_attn", "k_proj", "kernel"), "model.layers.{i}.self_attn.k_proj.weight",
         (k * hd, d), *proj(k)),
        (("layers", "self_attn", "v_proj", "kernel"), "model.layers.{i}.self_attn.v_proj.weight",
         (k * hd, d), *proj(k)),
        (("layers", "self_attn", "o_proj", "kernel"), "model.layers.{i}.self_attn.o_proj.weight",
         (d, h * hd), lambda w: w.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T),
        (("layers", "mlp", "gate_proj", "kernel"), "model.layers.{i}.mlp.gate_proj.weight",
         (f, d), t, t),
        (("layers", "mlp", "up_proj", "kernel"), "model.layers.{i}.mlp.up_proj.weight",
         (f, d), t, t),
        (("layers", "mlp", "down_proj", "kernel"), "model.layers.{i}.mlp.down_proj.weight",
         (d, f), t, t),
    ]
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
    """Reads a HF Mistral directory (config.json + safetensors, single file or sharded).

    Returns (config, params as numpy). Missing, unexpected or mis-shaped tensors raise
    ValueError naming the tensor and both shapes.
    """
    cfg_path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{model_dir}: missing {CONFIG}")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    files = safetensors_io.open_dir(model_dir)
    glob, layer = layout(cfg)
    expected = {name: (path, shape, to_ours) for path, name, shape, to_ours, _ in glob}
    for path, name, shape, to_ours, _ in layer:
        for i in range(cfg.num_layers):
            expected[name.format(i=i)] = (path, shape, to_ours)
    unexpected = sorted(set(files) - set(expected))
    if unexpected:
        raise ValueError(f"{model_dir}: unexpected tensors {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} (not in a Mistral of "
                         f"this config.json)")
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ValueError(f"{model_dir}: missing tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for name, (_, shape, _) in expected.items():
        actual = files[name].shape(name)
        if actual != shape:
            raise ValueError(f"{model_dir}: tensor {name} has shape {actual}, config.json "
                             f"implies {shape}")
    params: dict = {}
    for path, name, _, to_ours, _ in glob:
        _set(params, path, np.array(_cast(to_ours(files[name].get(name)), dtype)))
    for path, name, _, to_ours, _ in layer:
        first = _cast(to_ours(files[name.format(i=0)].get(name.format(i=0))), dtype)
        stacked = np.empty((cfg.num_layers, *first.shape), first.dtype)
        for i in range(cfg.num_layers):
            stacked[i] = _cast(to_ours(files[name.format(i=i)].get(name.format(i=i))), dtype)
        _set(params, path, stacked)
    return cfg, params


def hf_tensors(cfg: MistralConfig, params: dict, dtype: str | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor of our params, layer by layer."""
    glob, layer = layout(cfg)
    for path, name, _, _, to_hf in glob:
        yield name, np.ascontiguousarray(_cast(to_hf(np.asarray(_get(params, path))), dtype))
    for i in range(cfg.num_layers):
        for path, name, _, _, to_hf in layer:
            yield name.format(i=i), np.ascontiguousarray(
                _cast(to_hf(np.asarray(_get(params, path)[i])), dtype))


def save_hf_mistral(cfg: MistralConfig, params: dict, out_dir: str, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, tokenizer_path: str | None = None) -> None:
    """Exports our params as a HF Mistral directory (loadable by `from_pretrained`)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config_to_hf(cfg, dtype or cfg.param_dtype), f, indent=2)
    safetensors_io.save_sharded(hf_tensors(cfg, params, dtype), out_dir, max_shard_bytes)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER))


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
    """Writes our checkpoint (Orbax params, model_config.json, tokenizer.model) atomically:
    into a temporary sibling directory, renamed into place when complete."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    with atomic_directory(out_dir, prefix=".ckpt-") as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
        cfg.to_json(os.path.join(tmp, "model_config.json"))
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER))


def convert_hf_to_checkpoint(model_dir: str, out_dir: str, dtype: str | None = None,
                             overwrite: bool = False) -> MistralConfig:
    """HF Mistral directory -> our checkpoint directory; returns the model config."""
    cfg, params = load_hf_mistral(model_dir, dtype)
    tok = os.path.join(model_dir, TOKENIZER)
    save_checkpoint(out_dir, cfg, params, tok if os.path.exists(tok) else None, overwrite)
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
