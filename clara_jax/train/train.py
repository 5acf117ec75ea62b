"""One trainer for every CLaRa stage (and for pretraining a tiny base LM from scratch).

    python -m clara_jax.train --config=configs/pretrain.py:model=tiny --workdir=DIR \
        [--config.total_steps=100 ...]

Reads like big_vision's trainer, top to bottom:
  1. validate the config (before anything compiles); build the mesh
  2. load the starting model (`init_from`) and the tokenizer
  3. data: JSONL files, or the synthetic corpus generated into the work directory
  4. train state, jitted step, Orbax checkpointer (resume from the latest step if any)
  5. the loop: metrics (console + TensorBoard), eval, checkpoints, SIGTERM, non-finite guard
  6. export the trained model to `{workdir}/model` (a `Clara.load`-able directory)
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clara_jax import parallel
from clara_jax.clara.config import STAGES, ClaraConfig
from clara_jax.clara.losses import causal_lm_loss
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data import formats, pipeline
from clara_jax.model.config import MistralConfig, preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import Mistral, init_params
from clara_jax.train import compiled_step
from clara_jax.train import step as step_lib
from clara_jax.train.checkpoint import Checkpointer
from clara_jax.train.optim import learning_rate_schedule, make_optimizer

ALL_STAGES = STAGES + ("base_lm",)


# -- 1. config ---------------------------------------------------------------------------

def validate_config(c: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
    """Raises ValueError naming the field of the first invalid setting."""
    n_devices = n_devices or jax.device_count()

    def bad(field: str, why: str):
        raise ValueError(f"config.{field}: {why}")

    if c.stage not in ALL_STAGES:
        bad("stage", f"unknown stage {c.stage!r}; known: {ALL_STAGES}")
    preset(c.model)  # raises naming the preset
    if c.doc_max_length <= 0 or c.compress_rate <= 0 or c.doc_max_length % c.compress_rate:
        bad("doc_max_length", f"{c.doc_max_length} is not a positive multiple of "
            f"compress_rate {c.compress_rate}")
    for field in ("total_steps", "batch_size", "max_len", "log_every", "checkpoint_every",
                  "eval_every", "grad_accum", "lora_rank", "generation_top_k"):
        if int(c[field]) <= 0:
            bad(field, f"must be positive, got {c[field]}")
    words_file = c.get("whole_words", "")
    if words_file and not os.path.isfile(words_file):
        bad("whole_words", f"{words_file} is not a file")
    if lora_alpha(c) <= 0:
        bad("lora_alpha", f"must be positive, got {c.lora_alpha}")
    if not 0.0 <= c.lora_dropout < 1.0:
        bad("lora_dropout", f"must be in [0, 1), got {c.lora_dropout}")
    if c.learning_rate <= 0:
        bad("learning_rate", f"must be positive, got {c.learning_rate}")
    if c.stage in ("end_to_end", "retrieval_pretrain") and c.generation_top_k > c.num_candidates:
        bad("generation_top_k", f"k={c.generation_top_k} is larger than num_candidates "
            f"{c.num_candidates}")
    if c.on_nonfinite not in ("stop", "skip"):
        bad("on_nonfinite", f"must be 'stop' or 'skip', got {c.on_nonfinite!r}")
    try:
        mesh_shape = parallel.mesh_from_config(c.mesh, list(range(n_devices))).devices.shape
    except ValueError as e:
        bad("mesh", str(e))
    batch_shards = mesh_shape[0] * mesh_shape[1]
    if c.batch_size % batch_shards:
        axes = "data x fsdp" if c.mesh.get("dcn_data", 1) == 1 else "dcn_data x data x fsdp"
        bad("batch_size", f"{c.batch_size} is not divisible by mesh {axes} = {batch_shards}")
    head_init = c.get("lm_head_init", "random")
    if head_init not in ("random", "embedding"):
        bad("lm_head_init", f"must be 'random' or 'embedding', got {head_init!r}")
    if head_init == "embedding" and (c.stage != "base_lm" or c.init_from):
        bad("lm_head_init", "'embedding' initialises a base trained from scratch (stage "
            "base_lm, empty init_from); this run starts from existing weights")
    if c.get("rope_theta") is not None and (c.rope_theta <= 0 or c.init_from):
        bad("rope_theta", f"{c.rope_theta}: a positive base period for a model trained from "
            f"scratch (empty init_from; a checkpoint keeps its own)")
    if c.optimize_mem_tokens and c.stage == "base_lm":
        bad("optimize_mem_tokens", "base_lm trains every weight already (and adds no memory "
            "tokens); set it to False")
    if c.get("peak_flops", 0) < 0:
        bad("peak_flops", f"must be >= 0 (FLOP/s per device; 0 = unknown), got {c.peak_flops}")
    if c.init_from and not os.path.exists(c.init_from):
        bad("init_from", f"{c.init_from} does not exist")
    if c.stage == "end_to_end" and c.get("end_to_end", {}).get("cache_candidates", False):
        if c.optimize_mem_tokens:
            bad("end_to_end.cache_candidates", "the memory-token embeddings train "
                "(optimize_mem_tokens), so cached candidate states would go stale; set one of "
                "them to False")
        if jax.process_count() > 1:
            bad("end_to_end.cache_candidates", f"building the candidate cache on "
                f"{jax.process_count()} processes is not implemented; set it to False")
    if c.get("compiled_step"):
        if c.stage == "end_to_end" and c.end_to_end.cache_candidates:
            bad("compiled_step", "a serialised step compresses its candidates itself; set "
                "end_to_end.cache_candidates=False")
        # Names the file and each differing field.
        compiled_step.check_compiled_step_config(c.compiled_step, c)


def clara_config(c: ml_collections.ConfigDict, first_mem_token_id: int) -> ClaraConfig:
    return ClaraConfig(
        doc_max_length=c.doc_max_length, compress_rate=c.compress_rate,
        generation_top_k=c.generation_top_k, sep=c.sep,
        different_mem_tokens=c.different_mem_tokens, first_mem_token_id=first_mem_token_id,
        mse_weight=c.mse_weight, temperature=c.temperature,
        retrieval_temperature=c.retrieval_temperature,
        lora=LoraConfig(rank=c.lora_rank, alpha=lora_alpha(c), dropout=c.lora_dropout))


def lora_alpha(c: ml_collections.ConfigDict) -> float:
    """config.lora_alpha, or the official 2 x lora_rank when it is unset."""
    alpha = c.get("lora_alpha")
    return 2.0 * c.lora_rank if alpha is None else float(alpha)


# -- 2. the starting model ----------------------------------------------------------------

def resize_vocab(params: dict, vocab: int, rng: np.random.Generator) -> dict:
    """Grows embed_tokens and lm_head to `vocab` rows; new rows are the mean of the existing
    rows plus N(0, 0.02) noise (the added special tokens start near the average token)."""
    emb = np.asarray(params["embed_tokens"]["embedding"])
    head = np.asarray(params["lm_head"]["kernel"])
    old = emb.shape[0]
    if vocab < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab}")
    if vocab == old:
        return params
    new_e = emb.mean(0) + 0.02 * rng.standard_normal((vocab - old, emb.shape[1]))
    new_h = head.mean(1)[:, None] + 0.02 * rng.standard_normal((head.shape[0], vocab - old))
    out = dict(params)
    out["embed_tokens"] = {"embedding": np.concatenate([emb, new_e.astype(emb.dtype)])}
    out["lm_head"] = {"kernel": np.concatenate([head, new_h.astype(head.dtype)], axis=1)}
    return out


def initial_query_reasoner(c: ml_collections.ConfigDict, adapters: dict) -> dict:
    """The query reasoner a run starts from (before any checkpoint restore). A start with
    none (an Apple stage-1/2 checkpoint) copies the encoder, as the official code does; so
    does config.end_to_end.query_reasoner_init == "encoder" for any start. The copy's LoRA B
    matrices are multiplied by config.end_to_end.query_reasoner_init_scale (1: the encoder
    as it is; 0: the base's own states, like a fresh adapter; in between: a weakened warm
    start, from which end-to-end training has something to raise)."""
    e2e = c.get("end_to_end", ml_collections.ConfigDict())
    init = e2e.get("query_reasoner_init", "")
    if init not in ("", "encoder"):
        raise ValueError(f"config.end_to_end.query_reasoner_init: must be '' or 'encoder', "
                         f"got {init!r}")
    if "query_reasoner" in adapters and init != "encoder":
        return adapters
    scale = float(e2e.get("query_reasoner_init_scale", 1.0))

    def copy(path, x):
        return x * scale if getattr(path[-1], "key", None) == "lora_b" else x

    return {**adapters, "query_reasoner": jax.tree_util.tree_map_with_path(
        copy, adapters["encoder"])}


def fresh_adapters(model_cfg: MistralConfig, lora: LoraConfig, rng: jax.Array) -> dict:
    """PEFT-initialised encoder, decoder and query-reasoner adapters (B = 0)."""
    import flax.linen as nn
    model = Mistral(model_cfg, lora)

    def init(key):
        return nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["lora"])

    init = jax.jit(init)
    keys = jax.random.split(rng, 3)
    return {name: init(k) for name, k in zip(("encoder", "decoder", "query_reasoner"), keys)}


def load_start(c: ml_collections.ConfigDict, workdir: str, text_lines) -> dict:
    """The run's starting point: {model_cfg, params, adapters (or None), tokenizer_path}.

    init_from may be: a training work directory (its exported `model/`), a saved Clara
    directory, a converted Hugging Face base (`python -m clara_jax.convert hf-mistral`), or
    empty: a fresh random `c.model` with a sentencepiece model trained on the run's text.
    """
    src = c.init_from
    if src and os.path.isdir(os.path.join(src, "model")):
        src = os.path.join(src, "model")
    if src and os.path.exists(os.path.join(src, "clara_config.json")):
        from clara_jax.clara.model import Clara
        clara = Clara.load(src)
        return {"model_cfg": clara.model_config, "params": clara.params,
                "adapters": dict(clara.adapters), "tokenizer_path": clara.tokenizer_path}
    if src and os.path.exists(os.path.join(src, "model_config.json")):
        from clara_jax.convert.hf_mistral import load_checkpoint
        model_cfg, params = load_checkpoint(src)
        tok_path = os.path.join(src, "tokenizer.model")
        if not os.path.exists(tok_path):
            raise FileNotFoundError(f"config.init_from: {src} has no tokenizer.model")
        return {"model_cfg": model_cfg, "params": params, "adapters": None,
                "tokenizer_path": tok_path}
    if src:
        raise ValueError(f"config.init_from: {src} is neither a work directory, a saved Clara "
                         f"nor a converted checkpoint (no model/, clara_config.json or "
                         f"model_config.json)")
    # From scratch: a tokenizer trained on the run's text, a random base of the preset shape.
    tok_dir = os.path.join(workdir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok_path = os.path.join(tok_dir, "tokenizer.model")
    vocab = int(c.get("vocab_size", preset(c.model).vocab_size))
    if not os.path.exists(tok_path):
        words_file = c.get("whole_words", "")
        words = open(words_file, encoding="utf-8").read().split() if words_file else ()
        made = train_sentencepiece(text_lines(), os.path.join(tok_dir, "tokenizer"), vocab,
                                   whole_words=words)
        assert made == tok_path
    model_cfg = preset(c.model, vocab_size=vocab)
    if c.get("rope_theta"):
        model_cfg = model_cfg.replace(rope_theta=float(c.rope_theta))
    params = jax.device_get(init_params(model_cfg, jax.random.key(c.seed)))
    if c.get("lm_head_init", "random") == "embedding":
        params = head_from_embedding(params)
    return {"model_cfg": model_cfg, "params": params, "adapters": None,
            "tokenizer_path": tok_path}


def head_from_embedding(params: dict) -> dict:
    """Base parameters whose output projection `lm_head` [D, V] starts as the transpose of the
    token embedding [V, D] (the two stay separate weights, as in Mistral). A residual stream
    that holds a token's embedding then already scores that token highest, so copying a word
    from the context, the skill a reader needs, is one attention map away instead of also
    needing an output map learnt from scratch: on the demo's reading lessons the tiny base
    answers from its document within a few hundred steps instead of not at all."""
    embedding = params["embed_tokens"]["embedding"]
    return {**params, "lm_head": {**params["lm_head"], "kernel": np.array(embedding).T.copy()}}


# -- 3. data -------------------------------------------------------------------------------

def data_files(c: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """The run's files by role: train / eval JSONL, text. Generates the synthetic corpus into
    `{workdir}/data` when config.data.train_files is empty."""
    if c.data.train_files:
        return {"train": c.data.train_files, "eval": c.data.eval_files or "",
                "text": c.data.train_files}
    from clara_jax.data import synthetic
    out = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        synthetic.generate_corpus(out, seed=c.seed, num_entities=c.data.synthetic_entities,
                                  num_candidates=c.num_candidates, k=c.generation_top_k,
                                  multi_hop=c.generation_top_k >= 2)
    fmt = {"pretrain": "pretrain", "instruct": "instruct", "end_to_end": "end_to_end",
           "retrieval_pretrain": "end_to_end", "base_lm": "pretrain"}[c.stage]
    return {"train": os.path.join(out, f"{fmt}_train.jsonl"),
            "eval": os.path.join(out, f"{fmt}_eval.jsonl"),
            "text": os.path.join(out, "pretrain_text.txt")}


def feature_spec(c: ml_collections.ConfigDict, n_mem: int, k_instruct: int) -> pipeline.FeatureSpec:
    k = {"pretrain": c.pretrain_k, "instruct": k_instruct}.get(c.stage, c.generation_top_k)
    return pipeline.FeatureSpec(stage=c.stage, doc_max_length=c.doc_max_length, n_mem=n_mem,
                                max_len=c.max_len, k=k, num_candidates=c.num_candidates,
                                query_max_length=c.query_max_length)


def read_records(c, files: str, workdir: str, role: str) -> list[dict]:
    fmt = pipeline.STAGE_FORMAT[c.stage]
    records, report = formats.read_jsonl(
        files, fmt, num_candidates=c.num_candidates if fmt != "instruct" else None,
        skip_invalid=c.data.skip_invalid)
    if report.skipped:
        path = os.path.join(workdir, f"skipped_{role}.txt")
        report.write_skipped(path)
        print(f"{role}: skipped {len(report.skipped)} invalid lines (listed in {path})")
    return records


# -- 4./5. the run ------------------------------------------------------------------------

EXECUTION_FIELDS = ("remat_policy", "scan_layers", "attention_impl")


def execution_config(c: ml_collections.ConfigDict, model_cfg: MistralConfig) -> MistralConfig:
    """model_cfg with the run's execution settings (`EXECUTION_FIELDS`) where the config sets
    them; None (the default) keeps the preset's or checkpoint's value. Parameters and
    checkpoints do not depend on these."""
    return model_cfg.replace(**{f: c[f] for f in EXECUTION_FIELDS if c.get(f) is not None})


class StepSetup(NamedTuple):
    """Everything a run's step needs besides data, shared by `train` and `clara_jax.aot`:
    the optimizer and schedule, the (un-jitted) train / eval steps, the NamedShardings of
    the base parameters and of one adapter tree (None for base_lm), and a note for each array
    replicated over a mesh axis that does not divide it (`parallel.fit_shardings`)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable
    eval_step: Callable
    param_sharding: Any
    lora_sharding: Any
    sharding_notes: tuple[str, ...] = ()


def make_step_setup(c: ml_collections.ConfigDict, model: Mistral, cfg: ClaraConfig | None,
                    mesh) -> StepSetup:
    """The optimizer, steps and parameter shardings of the run described by `c` on `mesh`."""
    from clara_jax.model.mistral import parameter_shardings
    base_lm = c.stage == "base_lm"
    schedule = learning_rate_schedule(c.learning_rate, c.total_steps, c.warmup_ratio,
                                      c.min_lr_ratio)
    tx = make_optimizer(c.learning_rate, c.total_steps, warmup_ratio=c.warmup_ratio,
                        min_lr_ratio=c.min_lr_ratio, b1=c.b1, b2=c.b2,
                        weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
                        accumulation_steps=c.grad_accum)
    shardings, notes = parameter_shardings(model.config, None if base_lm else cfg.lora, mesh)
    if base_lm:
        return StepSetup(tx, schedule, make_base_lm_step(model, tx, schedule),
                         make_base_lm_eval(model), shardings["params"], None, tuple(notes))
    return StepSetup(tx, schedule,
                     step_lib.make_train_step(model, cfg, c.stage, tx, schedule, c.dropout),
                     step_lib.make_eval_step(model, cfg, c.stage),
                     shardings["params"], shardings["lora"], tuple(notes))


def init_state(c: ml_collections.ConfigDict, setup: StepSetup, params: dict,
               adapters: dict | None) -> step_lib.TrainState:
    """A fresh train state (also under `jax.eval_shape` for abstract shapes): base_lm trains
    every base weight (`trainable={"base": params}`); a CLaRa stage its adapters."""
    if c.stage == "base_lm":
        return step_lib.TrainState(step=jnp.zeros((), jnp.int32), base={},
                                   trainable={"base": params}, frozen={},
                                   opt_state=setup.tx.init({"base": params}),
                                   rng=jax.random.key(c.seed))
    return step_lib.create_train_state(params, adapters, c.stage, setup.tx,
                                       jax.random.key(c.seed))


def _local_batch_to_global(batch: dict, sharding_fn, candidates=None) -> dict:
    """This host's batch as global arrays; with a CandidateCache, plus its `doc_table`."""
    out = {k: jax.make_array_from_process_local_data(sharding_fn(v.ndim), np.asarray(v))
           for k, v in batch.items()}
    if candidates is not None:
        out["doc_table"] = candidates.table
    return out


def _model_flops(model_cfg: MistralConfig, batch: dict, stage: str) -> float:
    """Matmul FLOPs of one train step (forward + backward = 3 x forward), from token counts."""
    fwd = 0.0
    if "ids" in batch:
        return 3.0 * batch["ids"].size * model_cfg.flops_per_token(batch["ids"].shape[-1])
    for ids_key in ("doc_ids", "query_ids"):
        if ids_key in batch:
            length = batch[ids_key].shape[-1]
            fwd += batch[ids_key].size * model_cfg.flops_per_token(length, compute_logits=False)
    fwd += batch["prompt_ids"].size * model_cfg.flops_per_token(batch["prompt_ids"].shape[-1])
    return 3.0 * fwd


def _mfu(model_flops_per_s: float, peak_flops_per_device: float) -> dict:
    """{"mfu": achieved model FLOP/s / (peak FLOP/s per device x devices)}; {} when the
    peak is unknown (0)."""
    if not peak_flops_per_device:
        return {}
    return {"mfu": model_flops_per_s / (peak_flops_per_device * jax.device_count())}


def _retrieval_metrics(topk: np.ndarray, pos_mask: np.ndarray) -> dict:
    has = pos_mask.sum(1) > 0
    if not has.any():
        return {}
    hit1 = pos_mask[np.arange(len(topk)), topk[:, 0]] > 0
    found = np.take_along_axis(pos_mask, topk, axis=1).sum(1)
    recall_k = found / np.maximum(pos_mask.sum(1), 1)
    return {"recall@1": float(hit1[has].mean()), f"recall@{topk.shape[1]}":
            float(recall_k[has].mean())}


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) a training run; returns the final summary (also in summary.json)."""
    validate_config(c)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(c.to_json(indent=2))
    mesh = parallel.mesh_from_config(c.mesh)
    files = data_files(c, workdir)

    def text_records() -> tuple[list[str], list[str | None]]:
        """The run's texts and, per text, its loss-free prompt (or None)."""
        out, prompts_ = [], []
        for path in formats.expand_paths(files["text"]):
            if path.endswith(".txt"):
                with open(path) as f:
                    out.extend(f.read().splitlines())
            elif c.stage == "base_lm":  # JSONL {"text": ...}: texts that may hold newlines
                recs, _ = formats.read_jsonl(path, "text", skip_invalid=c.data.skip_invalid)
                out.extend(r["text"] for r in recs)
                prompts_.extend(r.get("prompt") for r in recs)
            else:
                recs, _ = formats.read_jsonl(path, pipeline.STAGE_FORMAT.get(c.stage, "pretrain"),
                                             skip_invalid=True)
                out.extend(d for r in recs for d in r["docs"])
            prompts_.extend([None] * (len(out) - len(prompts_)))
        return out, prompts_

    def text_lines() -> list[str]:
        return text_records()[0]

    start = load_start(c, workdir, text_lines)
    rng = np.random.default_rng(c.seed)
    base_lm = c.stage == "base_lm"
    if base_lm:
        tok = ClaraTokenizer.from_file(start["tokenizer_path"], n_mem=1)
        model_cfg = start["model_cfg"]
        cfg = None
    else:
        tok = ClaraTokenizer.from_file(start["tokenizer_path"], c.doc_max_length // c.compress_rate,
                                       c.different_mem_tokens)
        cfg = clara_config(c, tok.mem_token_ids[0])
        model_cfg = start["model_cfg"]
        params = start["params"]
        if model_cfg.vocab_size < tok.vocab_size:
            params = resize_vocab(params, tok.vocab_size, rng)
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
        start["params"] = params
    model_cfg = execution_config(c, model_cfg)
    model = Mistral(model_cfg, None if base_lm else cfg.lora)

    # Data.
    shard_index, shard_count = pipeline.host_shard()
    local_bs = c.batch_size // shard_count
    if base_lm:
        texts, text_prompts = text_records()
        rows = pipeline.pack_text(texts, tok, c.max_len, text_prompts)
        n_train = len(rows)
        n_eval = max(len(rows) // 20, local_bs)
        train_ds = pipeline.text_dataset(rows[n_eval:], batch_size=local_bs, seed=c.seed,
                                         pad_id=tok.pad_id,
                                         shard_index=shard_index, shard_count=shard_count)
        eval_ds = pipeline.text_dataset(rows[:n_eval], batch_size=local_bs, shuffle=False,
                                        pad_id=tok.pad_id,
                                        num_epochs=1, shard_index=shard_index,
                                        shard_count=shard_count)
    else:
        train_records = read_records(c, files["train"], workdir, "train")
        n_train = len(train_records)
        k_instruct = len(train_records[0]["docs"]) if c.stage == "instruct" else c.generation_top_k
        spec = feature_spec(c, cfg.n_mem, k_instruct)
        train_ds = pipeline.make_dataset(train_records, tok, spec, batch_size=local_bs,
                                         seed=c.seed, shard_index=shard_index,
                                         shard_count=shard_count)
        eval_ds, eval_records = None, []
        if files["eval"]:
            eval_records = read_records(c, files["eval"], workdir, "eval")
            eval_ds = pipeline.make_dataset(eval_records, tok, spec, batch_size=local_bs,
                                            shuffle=False, num_epochs=1,
                                            shard_index=shard_index, shard_count=shard_count)

    # State, step, checkpoints.
    setup = make_step_setup(c, model, cfg, mesh)
    for note in setup.sharding_notes:
        print(f"sharding: {note}")
    params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, start["params"]),
                            setup.param_sharding)
    adapters = None
    if not base_lm:
        adapters = start["adapters"] or fresh_adapters(model_cfg, cfg.lora,
                                                       jax.random.key(c.seed + 1))
        adapters = initial_query_reasoner(c, adapters)
        adapters = {n: jax.device_put(jax.tree_util.tree_map(jnp.asarray, a),
                                      setup.lora_sharding) for n, a in adapters.items()}
    state = init_state(c, setup, params, adapters)
    if c.optimize_mem_tokens:
        state = step_lib.train_mem_embeddings(state, cfg, setup.tx)
    train_step, eval_step = setup.train_step, setup.eval_step
    train_step = jax.jit(train_step, donate_argnums=(0,))
    eval_step = jax.jit(eval_step)

    ckpt = Checkpointer(workdir, keep=c.keep_checkpoints)
    data_it = pipeline.make_iterator(train_ds, worker_count=c.data.worker_count)
    first_step = 0
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state, mesh)
        if data_state is not None:
            data_it.set_state(data_state)
        first_step = int(state.step)
        print(f"resumed from {ckpt.directory} at step {first_step}")
    if c.get("compiled_step"):   # run the serialised executable instead of compiling
        train_step = compiled_step.load_train_step(c.compiled_step, c, model_cfg, mesh, state,
                                                   compiled_step.state_sharding(state, setup,
                                                                                mesh))
        state = train_step.place(state)
    # Stage 3 against cached compressed candidates (train/candidate_cache.py).
    candidates = train_rows = eval_rows = None
    if c.stage == "end_to_end" and c.end_to_end.cache_candidates:
        from clara_jax.clara.model import Clara
        from clara_jax.train import candidate_cache
        encoder = Clara(model_cfg, cfg, state.base, {**state.frozen, **state.trainable}, tok,
                        tokenizer_path=start["tokenizer_path"])
        candidates = candidate_cache.build_candidate_cache(
            encoder, [train_records, eval_records],
            os.path.join(workdir, candidate_cache.CACHE_DIR), batch_size=c.batch_size,
            mesh=mesh)
        del encoder
        train_rows = candidates.record_rows(train_records)
        eval_rows = candidates.record_rows(eval_records)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    writer = _summary_writer(workdir)
    batch_sharding = lambda ndim: parallel.batch_sharding(mesh, ndim)
    truncation = {"epoch": -1, "truncated_docs": 0, "truncated_prompts": 0}
    last: dict[str, Any] = {}
    t_last, steps_since, tokens_since, flops_since = time.time(), 0, 0, 0.0
    step_flops = None
    progress = _progress(first_step, c.total_steps)
    try:
        with parallel.axis_rules(mesh):
            for step in range(first_step, c.total_steps):
                batch = next(data_it)
                epoch = step * c.batch_size // max(n_train, 1)
                if epoch != truncation["epoch"]:
                    truncation.update(epoch=epoch, truncated_docs=0, truncated_prompts=0)
                batch, extras = split_batch(batch, c.stage, candidates, train_rows)
                pos_mask = extras["pos_mask"]
                truncation["truncated_docs"] += int(np.sum(extras["truncated_docs"]))
                truncation["truncated_prompts"] += int(np.sum(extras["truncated_prompt"]))
                tokens_since += int(sum(np.sum(batch[k]) for k in TOKEN_MASKS if k in batch)
                                    if not base_lm else batch["ids"].size)
                if step_flops is None:  # batch shapes are static: the same every step
                    step_flops = _model_flops(model_cfg, batch, c.stage)
                flops_since += step_flops
                state, metrics = train_step(state, _local_batch_to_global(batch, batch_sharding,
                                                                          candidates))
                steps_since += 1
                done = step + 1
                if done % c.log_every == 0 or done == c.total_steps:
                    m = jax.device_get(metrics)
                    if not float(m["finite"]):
                        _nonfinite(c, ckpt, done)
                    elapsed = time.time() - t_last
                    row = {"step": done, **{k: float(v) for k, v in m.items()
                                            if np.ndim(v) == 0 and k != "finite"},
                           "steps_per_s": steps_since / elapsed,
                           "tokens_per_s": tokens_since / elapsed,
                           "model_flops_per_s": flops_since / elapsed,
                           **_mfu(flops_since / elapsed, c.get("peak_flops", 0)),
                           "epoch": truncation["epoch"],
                           # documents / prompts cut to their static length so far this epoch
                           "truncated_docs_epoch": truncation["truncated_docs"],
                           "truncated_prompts_epoch": truncation["truncated_prompts"]}
                    if pos_mask is not None and "topk_indices" in m:
                        row.update(_retrieval_metrics(np.asarray(m["topk_indices"]), pos_mask))
                    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")   # as it goes: progress, crashes
                    last = row
                    _log(writer, row, "train")
                    progress(done, row)
                    t_last, steps_since, tokens_since, flops_since = time.time(), 0, 0, 0.0
                elif c.on_nonfinite == "stop" and not bool(metrics["finite"]):
                    _nonfinite(c, ckpt, done)
                if eval_ds is not None and (done % c.eval_every == 0 or done == c.total_steps):
                    ev = evaluate_loss(eval_step, state, eval_ds, c.eval_batches, batch_sharding,
                                       c.stage, candidates, eval_rows)
                    ev["step"] = done
                    _log(writer, ev, "eval")
                    last.update({f"eval_{k}": v for k, v in ev.items() if k != "step"})
                    print(f"  eval @ {done}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in ev.items() if k != "step"))
                if done % c.checkpoint_every == 0 or done == c.total_steps or stop["signal"]:
                    ckpt.save(done, state, data_it.get_state(), force=True)
                if stop["signal"]:
                    ckpt.wait()
                    print(f"SIGTERM: saved step {done} to {ckpt.directory}; exiting")
                    break
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        if writer is not None:
            writer.close()

    summary = {"stage": c.stage, "steps": int(state.step), "last": last}
    if int(state.step) >= c.total_steps:
        export_model(workdir, model_cfg, cfg, state, start["tokenizer_path"], base_lm)
        summary["model_dir"] = os.path.join(workdir, "model")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


# The batch features whose ones are tokens the step reads (encoder and decoder inputs).
TOKEN_MASKS = ("doc_mask", "query_mask", "prompt_mask")


def split_batch(batch: dict, stage: str, candidates=None, record_rows=None
                ) -> tuple[dict, dict]:
    """A pipeline batch -> (what the step reads, host-side extras). Extras: the truncation
    counts and `pos_mask` (for recall metrics). Only retrieval pretraining's loss reads
    `pos_mask` itself; with the stage-3 candidate cache, candidate ids become `doc_index`."""
    batch = dict(batch)
    extras = {key: batch.pop(key, 0) for key in ("truncated_docs", "truncated_prompt")}
    extras["pos_mask"] = (batch.get("pos_mask") if stage == "retrieval_pretrain"
                          else batch.pop("pos_mask", None))
    if candidates is not None:
        batch = candidates.swap_in(batch, record_rows)
    batch.pop("index", None)
    return batch, extras


def evaluate_loss(eval_step, state, eval_ds, max_batches: int, batch_sharding, stage: str,
                  candidates=None, record_rows=None) -> dict:
    """Mean of the eval metrics (scalars) over up to max_batches held-out batches.
    candidates, record_rows: the stage-3 candidate cache and the eval records' rows in it."""
    sums: dict[str, float] = {}
    n = 0
    for batch in eval_ds:
        if n >= max_batches:
            break
        batch, _ = split_batch(batch, stage, candidates, record_rows)
        m = jax.device_get(eval_step(state, _local_batch_to_global(
            batch, batch_sharding, candidates)))
        for k, v in m.items():
            if np.ndim(v) == 0:
                sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def export_model(workdir: str, model_cfg: MistralConfig, cfg: ClaraConfig | None, state,
                 tokenizer_path: str, base_lm: bool) -> None:
    """Writes `{workdir}/model`: a saved Clara (stages) or a converted-style base (base_lm)."""
    out = os.path.join(workdir, "model")
    if base_lm:
        from clara_jax.convert.hf_mistral import save_checkpoint
        save_checkpoint(out, model_cfg, jax.device_get(state.trainable["base"]), tokenizer_path)
        return
    from clara_jax.clara.model import Clara
    tok = ClaraTokenizer.from_file(tokenizer_path, cfg.n_mem, cfg.different_mem_tokens)
    # optimize_mem_tokens: the trained memory-token rows go back into the embedding table.
    base, adapters = step_lib.with_mem_embeddings(state.base,
                                                  {**state.frozen, **state.trainable}, cfg)
    Clara(model_cfg, cfg, jax.device_get(base), jax.device_get(adapters), tok,
          tokenizer_path=tokenizer_path).save(out)


def make_base_lm_step(model: Mistral, tx: optax.GradientTransformation, schedule):
    """Next-token training of all base weights on packed text: batch {"ids", "labels":
    [B, L]} (labels are the ids with padding ignored)."""

    def train_step(state, batch):
        def objective(trainable):
            logits = model.apply({"params": trainable["base"]}, batch["ids"]).logits
            return causal_lm_loss(logits, batch["labels"])

        loss, grads = jax.value_and_grad(objective)(state.trainable)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        trainable = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                           optax.apply_updates(state.trainable, updates),
                                           state.trainable)
        opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), opt_state,
                                           state.opt_state)
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), {
            "loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
            "learning_rate": schedule(state.step)}

    return train_step


def make_base_lm_eval(model: Mistral):
    def eval_step(state, batch):
        logits = model.apply({"params": state.trainable["base"]}, batch["ids"]).logits
        return {"loss": causal_lm_loss(logits, batch["labels"])}

    return eval_step


def _nonfinite(c, ckpt: Checkpointer, step: int) -> None:
    if c.on_nonfinite == "stop":
        ckpt.wait()
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step}; the update was not applied and the "
            f"last good checkpoint (step {ckpt.latest_step()}) is kept. Set "
            f"--config.on_nonfinite=skip to skip such updates instead.")
    print(f"step {step}: non-finite loss or gradient, update skipped")


def _summary_writer(workdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _log(writer, row: dict, prefix: str) -> None:
    if writer is None:
        return
    for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
            writer.add_scalar(f"{prefix}/{k}", v, row["step"])
    writer.flush()


def _progress(first: int, total: int):
    """A tqdm bar (to stderr) showing step, loss and throughput."""
    from tqdm import tqdm
    bar = tqdm(total=total, initial=first, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(done: int, row: dict) -> None:
        bar.update(done - bar.n)
        bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "mse_loss", "grad_norm",
                                                      "tokens_per_s", "recall@1") if k in row})
        if done >= total:
            bar.close()

    return update
