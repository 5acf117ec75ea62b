"""The model a run starts from (`config.init_from`): a training work directory, a saved Clara,
a converted Hugging Face base, or nothing (a random base of the preset shape and a
sentencepiece tokenizer trained on the run's text)."""

from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from clara_jax.clara.model import Clara
from clara_jax.clara.formats.parts import load_tokenizer, tokenizer_path_in
from clara_jax.clara.tokenizer import HF_TOKENIZER_FILE, ClaraTokenizer, train_sentencepiece
from clara_jax.clara.formats.hf_mistral import load_checkpoint
from clara_jax.model.config import MistralConfig, preset
from clara_jax.model.mistral import init_params


def load_start(c: ml_collections.ConfigDict, workdir: str,
               text_lines: Callable[[], list[str]]) -> dict:
    """The run's starting point: {model_cfg, params, adapters (or None), tokenizer_path}.

    init_from may be: a training work directory (its exported `model/`), a saved Clara
    directory, a converted Hugging Face base (`python -m clara_jax.convert hf-mistral`), or
    empty: a fresh random `scratch_model_config(c)` with a sentencepiece model trained on
    `text_lines()` into `{workdir}/tokenizer`.
    """
    src = c.init_from
    if src and os.path.isdir(os.path.join(src, "model")):
        src = os.path.join(src, "model")
    if src and os.path.exists(os.path.join(src, "clara_config.json")):
        clara = Clara.load(src)
        return {"model_cfg": clara.model_config, "params": clara.params,
                "adapters": dict(clara.adapters), "tokenizer_path": clara.tokenizer_path}
    if src and os.path.exists(os.path.join(src, "model_config.json")):
        model_cfg, params = load_checkpoint(src)
        tok_path = tokenizer_path_in(src)
        if tok_path is None:
            raise FileNotFoundError(f"config.init_from: {src} has no tokenizer.model or "
                                    f"tokenizer.json")
        return {"model_cfg": model_cfg, "params": params, "adapters": None,
                "tokenizer_path": tok_path}
    if src:
        raise ValueError(f"config.init_from: {src} is neither a work directory, a saved Clara "
                         f"nor a converted checkpoint (no model/, clara_config.json or "
                         f"model_config.json)")
    tok_dir = os.path.join(workdir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok_path = os.path.join(tok_dir, "tokenizer.model")
    model_cfg = scratch_model_config(c)
    if not os.path.exists(tok_path):
        words_file = c.get("whole_words", "")
        words = open(words_file, encoding="utf-8").read().split() if words_file else ()
        made = train_sentencepiece(text_lines(), os.path.join(tok_dir, "tokenizer"),
                                   model_cfg.vocab_size, whole_words=words)
        assert made == tok_path
    params = jax.device_get(init_params(model_cfg, jax.random.key(c.seed)))
    if c.get("lm_head_init", "random") == "embedding":
        params = head_from_embedding(params)
    return {"model_cfg": model_cfg, "params": params, "adapters": None,
            "tokenizer_path": tok_path}


def scratch_model_config(c: ml_collections.ConfigDict) -> MistralConfig:
    """The base of a run trained from scratch: preset `c.model` with the config's vocab_size
    (its tokenizer's piece count) and rope_theta where set."""
    model_cfg = preset(c.model, vocab_size=int(c.get("vocab_size", preset(c.model).vocab_size)))
    if c.get("rope_theta"):
        model_cfg = model_cfg.replace(rope_theta=float(c.rope_theta))
    return model_cfg


def run_tokenizer(c: ml_collections.ConfigDict, tokenizer_path: str) -> ClaraTokenizer:
    """The run's tokenizer: n = doc_max_length / compress_rate memory tokens (one for
    base_lm, which uses none), appended after the tokenizer's own tokens (a tokenizer.json is
    read with its tokenizer_config.json and tokenizer_name.json)."""
    n_mem = 1 if c.stage == "base_lm" else c.doc_max_length // c.compress_rate
    different = c.stage == "base_lm" or c.different_mem_tokens
    if os.path.basename(tokenizer_path) == HF_TOKENIZER_FILE:  # with its companions
        return load_tokenizer(os.path.dirname(os.path.abspath(tokenizer_path)), n_mem,
                              different)[0]
    return ClaraTokenizer.from_file(tokenizer_path, n_mem, different)


def resize_vocab(params: dict, vocab: int, rng: np.random.Generator) -> dict:
    """Resizes embed_tokens and lm_head (absent with tied embeddings) to `vocab` rows. Growing
    appends rows that are the mean of the existing rows plus N(0, 0.02) noise (the added
    special tokens start near the average token); shrinking keeps the first `vocab` rows, as
    transformers' `resize_token_embeddings` does (a base with more rows than its tokenizer,
    such as Qwen2.5, whose CLaRa tokens then keep the base's rows at their ids)."""
    emb = np.asarray(params["embed_tokens"]["embedding"])
    old = emb.shape[0]
    if vocab < old:
        out = dict(params)
        out["embed_tokens"] = {"embedding": emb[:vocab]}
        if "lm_head" in params:
            out["lm_head"] = {"kernel": np.asarray(params["lm_head"]["kernel"])[:, :vocab]}
        return out
    if vocab == old:
        return params
    new_e = emb.mean(0) + 0.02 * rng.standard_normal((vocab - old, emb.shape[1]))
    out = dict(params)
    out["embed_tokens"] = {"embedding": np.concatenate([emb, new_e.astype(emb.dtype)])}
    if "lm_head" in params:
        head = np.asarray(params["lm_head"]["kernel"])
        new_h = head.mean(1)[:, None] + 0.02 * rng.standard_normal((head.shape[0], vocab - old))
        out["lm_head"] = {"kernel": np.concatenate([head, new_h.astype(head.dtype)], axis=1)}
    return out


def head_from_embedding(params: dict) -> dict:
    """Base parameters whose output projection `lm_head` [D, V] starts as the transpose of the
    token embedding [V, D] (the two stay separate weights, as in Mistral). A residual stream
    that holds a token's embedding then already scores that token highest, so copying a word
    from the context, the skill a reader needs, is one attention map away instead of also
    needing an output map learnt from scratch: on the demo's reading lessons the tiny base
    answers from its document within a few hundred steps instead of not at all. With tied
    embeddings (no lm_head) the output projection already is the embedding: unchanged."""
    if "lm_head" not in params:
        return params
    embedding = params["embed_tokens"]["embedding"]
    return {**params, "lm_head": {**params["lm_head"], "kernel": np.array(embedding).T.copy()}}
