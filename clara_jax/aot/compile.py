"""The abstract program of a run's step (`build_program`: the trainer's own step, state and
batch, from `clara_jax.train.setup.build_run`), lowered and compiled for a set of devices
(`lower_and_compile`)."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax import parallel
from clara_jax.model.decode import decode_step, init_cache
from clara_jax.train import setup as setup_lib
from clara_jax.train.compiled_step import step_fingerprint, with_sharding
from clara_jax.train.start import scratch_model_config


@dataclasses.dataclass
class Program:
    """A function with abstract, sharded arguments, ready to lower (see `build_program`)."""

    fn: Any
    args: tuple
    in_shardings: tuple
    out_shardings: Any
    donate_argnums: tuple
    mesh: Any
    model_flops: float       # global model FLOPs of one call
    model_cfg: Any
    description: dict
    fingerprint: dict = dataclasses.field(default_factory=dict)   # `step_fingerprint`


def build_program(c: ml_collections.ConfigDict, devices: Sequence[Any], decode: bool = False,
                  num_layers: int | None = None) -> Program:
    """The run's train step (or, with `decode`, the one-token KV-cache step of the decoder
    adapter with a cache of `max_len` tokens for `batch_size` rows) over `devices`, with
    abstract sharded arguments: `setup.build_run` of the from-scratch base (the preset with
    config.vocab_size), as `train` builds it. Validates `c` (ValueError naming the field)
    first. `num_layers` replaces the preset's depth, unrolled (for `scan_corrected_cost`)."""
    setup_lib.validate_config(c, n_devices=len(devices))
    mesh = parallel.mesh_from_config(c.mesh, devices)
    base = scratch_model_config(c)
    run = setup_lib.build_run(c, mesh, base, base.vocab_size, num_layers=num_layers)
    model_cfg = run.model_cfg
    description = {"stage": c.stage, "model": c.model, "batch_size": int(c.batch_size),
                   "max_len": int(c.max_len), "mode": "decode" if decode else "train",
                   "mesh": dict(mesh.shape), "num_params": model_cfg.num_params,
                   "vocab_size": model_cfg.vocab_size,
                   **{f: getattr(model_cfg, f) for f in setup_lib.EXECUTION_FIELDS},
                   "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
                   "sharding_notes": list(run.setup.sharding_notes)}
    if decode:
        return _decode_program(c, run, description)
    state, batch = run.state, run.batch
    description["batch"] = {k: list(v.shape) for k, v in batch.items()}
    if c.stage in ("end_to_end", "retrieval_pretrain"):
        # The step compresses its candidates itself (end_to_end.cache_candidates=False); the
        # cached variant reads a corpus-sized table instead and needs less compute.
        description["candidates"] = "compressed in the step"
    b_sharding = {k: v.sharding for k, v in batch.items()}
    return Program(run.setup.train_step, (state, batch), (run.state_sharding, b_sharding),
                   (run.state_sharding, NamedSharding(mesh, PartitionSpec())), (0,), mesh,
                   run.model_flops, model_cfg, description,
                   step_fingerprint(c, model_cfg, mesh, "train", state=state, batch=batch))


def _decode_program(c: ml_collections.ConfigDict, run: setup_lib.Run, description: dict
                    ) -> Program:
    """The decoder's one-token step over the run's (abstract) base and decoder adapter."""
    model, setup, mesh, state = run.model, run.setup, run.mesh, run.state
    cfg = model.config
    batch, length = int(c.batch_size), int(c.max_len)
    if c.stage == "base_lm":
        variables = {"params": state.trainable["base"]}
    else:
        variables = {"params": state.base,
                     "lora": {**state.frozen, **state.trainable}["decoder"]}
    v_sharding = {"params": setup.param_sharding}
    if "lora" in variables:
        v_sharding["lora"] = setup.lora_sharding
    cache = jax.eval_shape(functools.partial(init_cache, cfg, batch, length))
    kv = ("layers", "batch", "length", "kv_heads", "head_dim")
    c_sharding, notes = parallel.fit_shardings(parallel.logical_sharding(
        {"k": PartitionSpec(*kv), "v": PartitionSpec(*kv),
         "valid": PartitionSpec("batch", "length"), "index": PartitionSpec()}, mesh), cache,
        name="cache")
    row = parallel.batch_sharding(mesh, 1)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row)
    position = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row)
    logits_sharding, logit_notes = parallel.fit_shardings(
        parallel.logical_sharding(PartitionSpec("batch", "vocab"), mesh),
        jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32), name="logits")
    description["sharding_notes"] += notes + logit_notes

    def step(variables, token, position, cache):
        return decode_step(model, variables, token, position, cache)

    description["batch"] = {"token": [batch], "cache_length": length}
    # One token attending to `length` cached keys: 2 x MACs of the dense layers and lm_head,
    # plus 4 * heads * head_dim * length per layer for QK^T and PV (= flops_per_token(2 L)).
    flops = batch * cfg.flops_per_token(2 * length)
    args = (with_sharding(variables, v_sharding), token, position,
            with_sharding(cache, c_sharding))
    return Program(step, args, (v_sharding, row, row, c_sharding),
                   (logits_sharding, c_sharding), (3,), mesh, flops, cfg, description,
                   step_fingerprint(c, cfg, mesh, "decode", inputs=args))


def lower_and_compile(program: Program):
    """(compiled executable, seconds to lower and compile) under the mesh and the rules."""
    start = time.time()
    # The same context as the trainer's loop, so the same program compiles.
    with parallel.axis_rules(program.mesh):
        jitted = jax.jit(program.fn, in_shardings=program.in_shardings,
                         out_shardings=program.out_shardings,
                         donate_argnums=program.donate_argnums)
        compiled = jitted.lower(*program.args).compile()
    return compiled, time.time() - start
