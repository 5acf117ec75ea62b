"""A run built from its config: the one recipe `train`, `clara_jax.aot` and the benchmarks use.

`build_run(c, mesh, model_cfg, base_vocab, params, adapters)` gives the run's model config
(CLaRa's special tokens appended after the tokenizer's `base_vocab` pieces, the run's
execution settings), its `ClaraConfig` (LoRA rank / alpha / dropout from the config), the
`Mistral` module, optimizer and steps (`StepSetup`), the train state on its shardings (real
arrays, or with `params=None` abstract `ShapeDtypeStruct`s carrying their `NamedSharding`s,
nothing model-sized allocated), the batch the step reads and its model FLOPs. The data
format of each stage is `pipeline.STAGE_FORMAT`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax import parallel
from clara_jax.clara.config import STAGES, TRAINABLE_ADAPTERS, ClaraConfig
from clara_jax.data import pipeline
from clara_jax.model.config import MistralConfig, preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import Mistral, init_params, parameter_shardings
from clara_jax.train import base_lm, compiled_step, init_config, inputs
from clara_jax.train import step as step_lib
from clara_jax.train.optim import SCHEDULES, learning_rate_schedule, make_optimizer
from clara_jax.train.compiled_step import with_sharding
from clara_jax.train.start import resize_vocab

ALL_STAGES = STAGES + ("base_lm",)
# Model-config fields set by the run, not the checkpoint: parameters do not depend on them.
EXECUTION_FIELDS = ("remat_policy", "scan_layers", "attention_impl")


# -- the config ---------------------------------------------------------------------------

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
    if c.lr_schedule not in SCHEDULES:
        bad("lr_schedule", f"must be one of {SCHEDULES}, got {c.lr_schedule!r}")
    if c.instruct.decoder_init not in DECODER_INITS:
        bad("instruct.decoder_init", f"must be one of {DECODER_INITS}, got "
            f"{c.instruct.decoder_init!r}")
    if c.end_to_end.query_reasoner_init not in QUERY_REASONER_INITS:
        bad("end_to_end.query_reasoner_init", f"must be one of {QUERY_REASONER_INITS}, got "
            f"{c.end_to_end.query_reasoner_init!r}")
    if c.stage in ("end_to_end", "retrieval_pretrain") and c.generation_top_k > c.num_candidates:
        bad("generation_top_k", f"k={c.generation_top_k} is larger than num_candidates "
            f"{c.num_candidates}")
    if c.on_nonfinite not in ("stop", "skip"):
        bad("on_nonfinite", f"must be 'stop' or 'skip', got {c.on_nonfinite!r}")
    if not 0.0 <= c.max_skipped_fraction <= 1.0:
        bad("max_skipped_fraction", f"must be in [0, 1], got {c.max_skipped_fraction}")
    div = c.divergence
    for field in ("zero_grad_rows", "chance_rows"):
        if int(div[field]) < 0:
            bad(f"divergence.{field}", f"must be >= 0 (0: off), got {div[field]}")
    if not div.chance_tolerance > 0:
        bad("divergence.chance_tolerance", f"must be positive, got {div.chance_tolerance}")
    if not div.max_abs_param > 0:
        bad("divergence.max_abs_param", f"must be positive, got {div.max_abs_param}")
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
    # A CLaRa checkpoint's compression, memory tokens, stride and rank against the run's.
    init_config.check(c)
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


def lora_alpha(c: ml_collections.ConfigDict) -> float:
    """config.lora_alpha, or the official 2 x lora_rank when it is unset."""
    alpha = c.get("lora_alpha")
    return 2.0 * c.lora_rank if alpha is None else float(alpha)


def clara_config(c: ml_collections.ConfigDict, first_mem_token_id: int) -> ClaraConfig:
    """The run's ClaraConfig: compression, loss weights, LoRA rank / alpha / dropout."""
    return ClaraConfig(
        doc_max_length=c.doc_max_length, compress_rate=c.compress_rate,
        generation_top_k=c.generation_top_k, sep=c.sep,
        different_mem_tokens=c.different_mem_tokens, first_mem_token_id=first_mem_token_id,
        mse_weight=c.mse_weight, temperature=c.temperature,
        retrieval_temperature=c.retrieval_temperature,
        lora=LoraConfig(rank=c.lora_rank, alpha=lora_alpha(c), dropout=c.lora_dropout))


def execution_config(c: ml_collections.ConfigDict, model_cfg: MistralConfig) -> MistralConfig:
    """model_cfg with the run's execution settings (`EXECUTION_FIELDS`) where the config sets
    them; None (the default) keeps the preset's or checkpoint's value."""
    return model_cfg.replace(**{f: c[f] for f in EXECUTION_FIELDS if c.get(f) is not None})


def model_configs(c: ml_collections.ConfigDict, model_cfg: MistralConfig, base_vocab: int
                  ) -> tuple[MistralConfig, ClaraConfig | None]:
    """(the run's model config, its ClaraConfig or None for base_lm) from the starting
    model's config and its tokenizer's length: CLaRa's special tokens (memory tokens first)
    are appended after the `base_vocab` tokens, and the vocabulary becomes exactly
    `base_vocab` + the added tokens, as the official `resize_token_embeddings(len(tokenizer))`
    makes it (grown for Mistral, cut for a base with more rows than its tokenizer, such as
    Qwen2.5); then the run's execution settings."""
    cfg = None
    if c.stage != "base_lm":
        cfg = clara_config(c, first_mem_token_id=base_vocab)
        vocab = base_vocab + cfg.num_added_tokens
        if model_cfg.vocab_size != vocab:
            model_cfg = model_cfg.replace(vocab_size=vocab)
    return execution_config(c, model_cfg), cfg


# -- adapters, steps, state ---------------------------------------------------------------

def fresh_adapters(model_cfg: MistralConfig, lora: LoraConfig, rng: jax.Array) -> dict:
    """PEFT-initialised encoder, decoder and query-reasoner adapters (B = 0)."""
    model = Mistral(model_cfg, lora)

    def init(key):
        return nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["lora"])

    init = jax.jit(init)
    keys = jax.random.split(rng, 3)
    return {name: init(k) for name, k in zip(("encoder", "decoder", "query_reasoner"), keys)}


# config.instruct.decoder_init and config.end_to_end.query_reasoner_init values.
DECODER_INITS = ("fresh", "keep")
QUERY_REASONER_INITS = ("auto", "encoder", "keep")


def start_adapters(c: ml_collections.ConfigDict, adapters: dict | None,
                   fresh: Callable[[], dict]) -> dict:
    """The adapters a run starts from (before any checkpoint restore), from the start's
    (`adapters`, None for a base) and `fresh()`, PEFT-initialised ones (`fresh_adapters`;
    called only when one is needed), as the official stage transitions do:

      - a base gets fresh encoder, decoder and query reasoner;
      - instruct (stage 1_2) with config.instruct.decoder_init "fresh" replaces the start's
        decoder with a fresh one (the official `from_pretrained` skips the stage-1 decoder
        adapter and adds a new one); "keep" continues the start's;
      - stages that train the query reasoner (end_to_end, retrieval_pretrain) take it from
        `initial_query_reasoner`; the others keep the start's (a fresh one where it has none).
    """
    if not adapters:
        return fresh()
    adapters = dict(adapters)
    init = c.instruct.decoder_init
    if init not in DECODER_INITS:
        raise ValueError(f"config.instruct.decoder_init: must be one of {DECODER_INITS}, "
                         f"got {init!r}")
    if c.stage == "instruct" and init == "fresh":
        adapters["decoder"] = fresh()["decoder"]
    if "query_reasoner" in TRAINABLE_ADAPTERS.get(c.stage, ()):
        return initial_query_reasoner(c, adapters, fresh)
    if "query_reasoner" not in adapters:
        adapters["query_reasoner"] = fresh()["query_reasoner"]
    return adapters


def is_untrained(adapter: dict) -> bool:
    """Whether every LoRA B of `adapter` is exactly 0: PEFT's initialisation, whose update
    A @ B is 0 (a query reasoner stages 1-2 carry without training it)."""
    leaves = jax.tree_util.tree_leaves_with_path(adapter)
    return all(not np.any(np.asarray(jax.device_get(x))) for path, x in leaves
               if getattr(path[-1], "key", None) == "lora_b")


def initial_query_reasoner(c: ml_collections.ConfigDict, adapters: dict,
                           fresh: Callable[[], dict] | None = None) -> dict:
    """`adapters` with the query reasoner a query-reasoner-training stage starts from, by
    config.end_to_end.query_reasoner_init:

      - "auto" (official): the encoder's adapter when the start has no trained query
        reasoner (none, as in Apple's stage-1 / 1_2 checkpoints, or an untrained one,
        `is_untrained`, as ours of stages 1-2 carry); a trained one (an end_to_end
        checkpoint) is kept. The official `_handle_query_reasoner_adapter_loading`;
      - "encoder": the encoder's adapter whatever the start has;
      - "keep": the start's (cold: B = 0 after stages 1-2), `fresh()`'s where it has none.

    A copy of the encoder has its LoRA B multiplied by
    config.end_to_end.query_reasoner_init_scale (1: the encoder as it is; 0: the base's own
    states, like a fresh adapter; in between: a weakened warm start, from which end-to-end
    training has something to raise)."""
    e2e = c.end_to_end
    init = e2e.query_reasoner_init
    if init not in QUERY_REASONER_INITS:
        raise ValueError(f"config.end_to_end.query_reasoner_init: must be one of "
                         f"{QUERY_REASONER_INITS}, got {init!r}")
    own = adapters.get("query_reasoner")
    if init == "keep" or (init == "auto" and own is not None and not is_untrained(own)):
        if own is None:
            if fresh is None:
                raise ValueError("config.end_to_end.query_reasoner_init: 'keep' needs a "
                                 "query reasoner in the start checkpoint; it has none")
            own = fresh()["query_reasoner"]
        return {**adapters, "query_reasoner": own}
    scale = float(e2e.query_reasoner_init_scale)

    def copy(path, x):
        return x * scale if getattr(path[-1], "key", None) == "lora_b" else x

    return {**adapters, "query_reasoner": jax.tree_util.tree_map_with_path(
        copy, adapters["encoder"])}


class StepSetup(NamedTuple):
    """The optimizer and schedule, the (un-jitted) train / eval steps, the NamedShardings of
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
                    mesh: Mesh) -> StepSetup:
    """The optimizer, steps and parameter shardings of the run described by `c` on `mesh`."""
    schedule = learning_rate_schedule(c.learning_rate, c.total_steps, c.warmup_ratio,
                                      c.min_lr_ratio, c.lr_schedule)
    tx = make_optimizer(c.learning_rate, c.total_steps, warmup_ratio=c.warmup_ratio,
                        min_lr_ratio=c.min_lr_ratio, b1=c.b1, b2=c.b2,
                        weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
                        accumulation_steps=c.grad_accum, lr_schedule=c.lr_schedule)
    if c.stage == "base_lm":
        shardings, notes = parameter_shardings(model.config, None, mesh)
        return StepSetup(tx, schedule, step_lib.make_base_lm_step(model, tx, schedule),
                         step_lib.make_base_lm_eval_step(model), shardings["params"], None,
                         tuple(notes))
    shardings, notes = parameter_shardings(model.config, cfg.lora, mesh)
    return StepSetup(tx, schedule,
                     step_lib.make_train_step(model, cfg, c.stage, tx, schedule, c.dropout),
                     step_lib.make_eval_step(model, cfg, c.stage),
                     shardings["params"], shardings["lora"], tuple(notes))


def trainable_adapters(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The adapters a CLaRa stage trains: the official ones (`TRAINABLE_ADAPTERS`), less the
    decoder in end_to_end with `end_to_end.train_decoder` False (then only the query
    reasoner learns, from the frozen generator's loss)."""
    names = TRAINABLE_ADAPTERS[c.stage]
    if c.stage == "end_to_end" and not c.end_to_end.train_decoder:
        names = tuple(n for n in names if n != "decoder")
    return names


def init_state(c: ml_collections.ConfigDict, setup: StepSetup, cfg: ClaraConfig | None,
               params: dict, adapters: dict | None) -> step_lib.TrainState:
    """A fresh train state (also under `jax.eval_shape`): base_lm trains every base weight;
    a CLaRa stage its adapters, and with optimize_mem_tokens the memory-token rows."""
    if c.stage == "base_lm":
        return base_lm.init_state(params, setup.tx, jax.random.key(c.seed))
    state = step_lib.create_train_state(params, adapters, c.stage, setup.tx,
                                        jax.random.key(c.seed), trainable_adapters(c))
    if c.optimize_mem_tokens:
        state = step_lib.train_mem_embeddings(state, cfg, setup.tx)
    return state


def state_sharding(state: step_lib.TrainState, setup: StepSetup, mesh: Mesh
                   ) -> step_lib.TrainState:
    """NamedShardings of a (possibly abstract) TrainState: base weights and adapters by their
    logical axes, the optimizer's parameter-shaped leaves like the trainable tree, anything
    else (step, counts, PRNG key, extra trainable rows) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def tree_sharding(tree: dict) -> dict:
        out = {}
        for name, sub in tree.items():
            if name == "base":
                out[name] = setup.param_sharding
            elif isinstance(sub, dict) and setup.lora_sharding is not None:
                out[name] = setup.lora_sharding
            else:
                out[name] = jax.tree_util.tree_map(lambda _: replicated, sub)
        return out

    trainable = tree_sharding(state.trainable)
    opt = optax.tree_map_params(setup.tx, lambda _, s: s, state.opt_state, trainable,
                                transform_non_params=lambda _: replicated)
    return state.replace(step=replicated, base=setup.param_sharding if state.base else {},
                         trainable=trainable, frozen=tree_sharding(state.frozen),
                         opt_state=opt, rng=replicated)


def model_flops(model_cfg: MistralConfig, batch: dict) -> float:
    """Matmul FLOPs of one train step (forward + backward = 3 x forward) from the token
    counts of `batch` (arrays or ShapeDtypeStructs); cached candidates (`doc_index`, no
    `doc_ids`) are not encoded, so they add none."""
    if "ids" in batch:
        return 3.0 * batch["ids"].size * model_cfg.flops_per_token(batch["ids"].shape[-1])
    fwd = 0.0
    for ids_key in ("doc_ids", "query_ids"):
        if ids_key in batch:
            length = batch[ids_key].shape[-1]
            fwd += batch[ids_key].size * model_cfg.flops_per_token(length, compute_logits=False)
    fwd += batch["prompt_ids"].size * model_cfg.flops_per_token(batch["prompt_ids"].shape[-1])
    return 3.0 * fwd


def batch_shapes(c: ml_collections.ConfigDict, cfg: ClaraConfig | None,
                 k_instruct: int | None = None) -> dict[str, tuple[int, ...]]:
    """Global shapes of what the step reads (int32), as the loop splits a pipeline batch;
    stage 3 with its candidates compressed in the step (no candidate cache)."""
    if c.stage == "base_lm":
        return {"ids": (c.batch_size, c.max_len), "labels": (c.batch_size, c.max_len)}
    spec = inputs.feature_spec(c, cfg.n_mem, k_instruct or c.generation_top_k)
    return inputs.split_batch(pipeline.feature_shapes(spec, c.batch_size), c.stage)[0]


# -- the run ------------------------------------------------------------------------------

class Run(NamedTuple):
    """Everything a run computes with, besides its data (see `build_run`)."""

    model_cfg: MistralConfig
    clara_cfg: ClaraConfig | None    # None for base_lm
    model: Mistral
    mesh: Mesh
    setup: StepSetup
    state: step_lib.TrainState       # arrays, or ShapeDtypeStructs carrying their shardings
    state_sharding: step_lib.TrainState
    batch: dict                      # {feature: ShapeDtypeStruct [B, ...] with its sharding}
    model_flops: float               # of one step over `batch`, all devices
    data_format: str                 # pipeline.STAGE_FORMAT[stage]


def build_run(c: ml_collections.ConfigDict, mesh: Mesh, model_cfg: MistralConfig,
              base_vocab: int, params: dict | None = None, adapters: dict | None = None, *,
              k_instruct: int | None = None, num_layers: int | None = None) -> Run:
    """The run `c` on `mesh`, from the starting model's config and tokenizer vocabulary size
    (`model_configs`). `params` (its base weights, as loaded) gives a real state: the
    vocabulary resized by `resize_vocab` where needed, `adapters` (or fresh ones) as the stage
    transition takes them (`start_adapters`), everything placed on its shardings. None gives
    an abstract one (`jax.eval_shape`). `k_instruct`: documents per instruct record
    (default generation_top_k); `num_layers` replaces the depth, unrolled (for
    `clara_jax.aot.scan_corrected_cost`)."""
    model_cfg, cfg = model_configs(c, model_cfg, base_vocab)
    if num_layers is not None:
        model_cfg = model_cfg.replace(num_layers=num_layers, scan_layers=False)
    model = Mistral(model_cfg, None if cfg is None else cfg.lora)
    setup = make_step_setup(c, model, cfg, mesh)
    make_state = functools.partial(init_state, c, setup, cfg)
    if params is None:
        key = jax.random.key(c.seed)
        params = jax.eval_shape(functools.partial(init_params, model_cfg), key)
        if cfg is not None:
            adapters = jax.eval_shape(functools.partial(fresh_adapters, model_cfg, cfg.lora),
                                      key)
        state = jax.eval_shape(make_state, params, adapters)
        sharding = state_sharding(state, setup, mesh)
        state = with_sharding(state, sharding)
    else:
        if params["embed_tokens"]["embedding"].shape[0] != model_cfg.vocab_size:
            params = resize_vocab(params, model_cfg.vocab_size, np.random.default_rng(c.seed))
        params = place(params, setup.param_sharding)
        if cfg is not None:
            fresh = functools.cache(functools.partial(
                fresh_adapters, model_cfg, cfg.lora, jax.random.key(c.seed + 1)))
            adapters = start_adapters(c, adapters, fresh)
            adapters = {n: place(a, setup.lora_sharding) for n, a in adapters.items()}
        state = make_state(params, adapters)
        sharding = state_sharding(state, setup, mesh)
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=parallel.batch_sharding(mesh, len(s)))
             for k, s in batch_shapes(c, cfg, k_instruct).items()}
    return Run(model_cfg, cfg, model, mesh, setup, state, sharding, batch,
               model_flops(model_cfg, batch), pipeline.STAGE_FORMAT[c.stage])


def place(tree: dict, sharding: Any) -> dict:
    """A tree of host (numpy) or device arrays as jax arrays on `sharding`."""
    return jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree), sharding)

