"""Ahead-of-time compilation of a stage's real training step (or the decode step) for a TPU
topology, from any host (this CPU is enough): per-device memory against the chip's HBM, FLOPs
and bytes, the collectives in the program, an estimated step time and MFU, before a pod runs.
`--topology=local` compiles for this process's own devices instead (what `train` would run).

    python -m clara_jax.aot --config=configs/pretrain.py:model=mistral_7b \
        --topology=v5e:16x16 [--config.mesh.data=1 --config.mesh.fsdp=-1] \
        [--config.batch_size=256] [--config.remat_policy=full] [--decode] \
        [--hbm_gib=16] [--report_json=report.json] [--serialize=step.pkl]

Everything is abstract: parameters, adapters, optimizer state and batch are
`jax.ShapeDtypeStruct`s carrying the `NamedSharding`s the trainer uses (nothing the size of
the model is ever allocated). The step is `clara_jax.train.train.make_step_setup`'s, the state
`init_state`'s (under `jax.eval_shape`) and the batch shapes `pipeline.feature_shapes`', so
what compiles here is what `python -m clara_jax.train` runs. Devices come from
`jax.experimental.topologies.get_topology_desc` (needs libtpu: the `tpu` extra).

Numbers: `memory_analysis()` and `cost_analysis()` of the compiled SPMD program are per
device. The step-time estimate is a roofline, max(FLOPs / peak bf16 FLOP/s, bytes accessed /
HBM bandwidth), per device; it ignores communication and overlap, so it is a lower bound.
MFU = model FLOPs per device (`train._model_flops`: 3 x forward matmul FLOPs from token
counts) / peak / estimated time. Collective counts are static instruction counts in the
optimised HLO (an op inside the scanned layer loop counts once).

Serialised steps (the file format lives in `clara_jax.train.compiled_step`, which `train`
imports; this module imports train, never the reverse): `--serialize=PATH` writes the compiled executable with a
fingerprint of what it was compiled for (backend platform, device count, mesh, jax version,
the step-relevant config fields, the model config, and every state / batch leaf's shape,
dtype and PartitionSpec). `python -m clara_jax.train --config.compiled_step=PATH` then runs
that executable instead of compiling, after refusing (naming the file and every differing
field) one that does not match the run. An executable runs only on the backend it was
compiled for: serialise with `--topology=local` on the machine type that trains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from clara_jax import parallel
from clara_jax.model.config import preset
from clara_jax.model.mistral import Mistral, init_params
from clara_jax.train import step as step_lib
from clara_jax.train import train as train_lib
from clara_jax.train.compiled_step import (serialize, state_sharding, step_fingerprint,
                                           with_sharding)

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (one JAX device; v4 and v5p as megacore): HBM in GiB, peak dense bf16
    FLOP/s, HBM bandwidth in bytes/s; `megacore` chips fuse their two TensorCores."""

    name: str
    hbm_gib: float
    peak_flops: float
    hbm_bandwidth: float
    megacore: bool = False
    pod_prefix: str = ""   # the accelerator-type prefix (v5e is sold as v5litepod)


CHIPS = {
    "v4": Chip("v4", 32, 275e12, 1.2e12, megacore=True, pod_prefix="v4"),
    "v5e": Chip("v5e", 16, 197e12, 0.82e12, pod_prefix="v5litepod"),
    "v5p": Chip("v5p", 95, 459e12, 2.76e12, megacore=True, pod_prefix="v5p"),
    "v6e": Chip("v6e", 32, 918e12, 1.64e12, pod_prefix="v6e"),
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
LOCAL = "local"   # --topology=local: this process's devices


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
    """`v5e:16x16` -> (CHIPS["v5e"], (16, 16)); ValueError naming the topology otherwise."""
    name, _, dims = topology.partition(":")
    if name not in CHIPS:
        raise ValueError(f"topology {topology!r}: unknown chip {name!r}; known: {sorted(CHIPS)}")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    ndim = 3 if CHIPS[name].megacore else 2
    if len(shape) != ndim or min(shape) <= 0:
        raise ValueError(f"topology {topology!r}: expected {name}:" + "x".join("N" * ndim)
                         + f" (chips per dimension), e.g. {name}:" + "x".join(["2"] * ndim))
    return CHIPS[name], shape


def topology_devices(topology: str) -> tuple[list, Chip]:
    """Compile-only TPU devices of a topology (one per chip) and the chip.

    Sets libtpu's environment (no metadata-server query, a matching accelerator type, one
    local worker, no single-process lockfile) with `os.environ.setdefault` first, which keeps
    the output free of its warnings. Wrap-around links as on the real slices: v4 / v5p when every dimension is a
    multiple of 4 (full cubes), v5e / v6e along a dimension of 16.
    """
    chip, shape = parse_topology(topology)
    chips = math.prod(shape)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                          f"{chip.pod_prefix}-{chips * (2 if chip.megacore else 1)}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # Compile-only: do not take (or wait for) the lock a process using real TPUs would hold.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    if chip.megacore:
        wrap = (all(d % 4 == 0 for d in shape),) * 3
    else:
        wrap = tuple(d == 16 for d in shape) + (False,)
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=topology,
        chip_config_name="megacore" if chip.megacore else "default",
        chips_per_host_bounds=(min(2, shape[0]), min(2, shape[1]), 1), num_slices=1,
        wrap=wrap)
    devices = list(topo.devices)
    if len(devices) != chips:
        raise RuntimeError(f"topology {topology!r} gave {len(devices)} devices, expected "
                           f"{chips} (one per chip)")
    return devices, chip


def local_devices(peak_flops: float = 0.0) -> tuple[list, Chip]:
    """This process's devices (`jax.devices()`, what `train` runs on) and a Chip describing
    them: memory per device from the backend (`bytes_limit`), or host RAM / device count
    where it reports none (CPU); `peak_flops` per device if known (0: no roofline)."""
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    memory = stats.get("bytes_limit") or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices))
    return devices, Chip(devices[0].device_kind, memory / GiB, float(peak_flops), 0.0)


# -- abstract inputs ----------------------------------------------------------------------

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
    abstract sharded arguments. Validates `c` (ValueError naming the field) first.
    `num_layers` replaces the preset's depth, unrolled (for `scan_corrected_cost`)."""
    train_lib.validate_config(c, n_devices=len(devices))
    base_lm = c.stage == "base_lm"
    model_cfg = preset(c.model, vocab_size=int(c.get("vocab_size", preset(c.model).vocab_size)))
    cfg = None
    if not base_lm:
        # The tokenizer appends CLaRa's special tokens after the base vocabulary.
        cfg = train_lib.clara_config(c, first_mem_token_id=model_cfg.vocab_size)
        model_cfg = model_cfg.replace(vocab_size=model_cfg.vocab_size + cfg.num_added_tokens)
    model_cfg = train_lib.execution_config(c, model_cfg)
    if num_layers is not None:
        model_cfg = model_cfg.replace(num_layers=num_layers, scan_layers=False)
    model = Mistral(model_cfg, None if base_lm else cfg.lora)
    mesh = parallel.mesh_from_config(c.mesh, devices)
    setup = train_lib.make_step_setup(c, model, cfg, mesh)
    key = jax.random.key(c.seed)
    params = jax.eval_shape(functools.partial(init_params, model_cfg), key)
    adapters = None
    if not base_lm:
        adapters = jax.eval_shape(functools.partial(train_lib.fresh_adapters, model_cfg,
                                                    cfg.lora), key)
    batch_sharding = functools.partial(parallel.batch_sharding, mesh)
    description = {"stage": c.stage, "model": c.model, "batch_size": int(c.batch_size),
                   "max_len": int(c.max_len), "mode": "decode" if decode else "train",
                   "mesh": dict(mesh.shape), "num_params": model_cfg.num_params,
                   "vocab_size": model_cfg.vocab_size,
                   **{f: getattr(model_cfg, f) for f in train_lib.EXECUTION_FIELDS},
                   "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
                   "sharding_notes": list(setup.sharding_notes)}
    if decode:
        return _decode_program(c, model, params, adapters, setup, mesh, description)

    def make_state(p, a):
        state = train_lib.init_state(c, setup, p, a)
        if c.get("optimize_mem_tokens"):   # as `train` does
            state = step_lib.train_mem_embeddings(state, cfg, setup.tx)
        return state

    state = jax.eval_shape(make_state, params, adapters)
    s_sharding = state_sharding(state, setup, mesh)
    if base_lm:
        shapes = {"ids": (c.batch_size, c.max_len), "labels": (c.batch_size, c.max_len)}
    else:
        spec = train_lib.feature_spec(c, cfg.n_mem, c.generation_top_k)
        from clara_jax.data.pipeline import feature_shapes
        # What the step reads, as the train loop splits it (metrics-only features dropped).
        shapes, _ = train_lib.split_batch(feature_shapes(spec, c.batch_size), c.stage)
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=batch_sharding(len(s)))
             for k, s in shapes.items()}
    b_sharding = {k: v.sharding for k, v in batch.items()}
    description["batch"] = {k: list(v) for k, v in shapes.items()}
    if c.stage in ("end_to_end", "retrieval_pretrain"):
        # The step compresses its candidates itself (end_to_end.cache_candidates=False); the
        # cached variant reads a corpus-sized table instead and needs less compute.
        description["candidates"] = "compressed in the step"
    state = with_sharding(state, s_sharding)
    return Program(setup.train_step, (state, batch),
                   (s_sharding, b_sharding), (s_sharding, NamedSharding(mesh, PartitionSpec())),
                   (0,), mesh, train_lib._model_flops(model_cfg, batch, c.stage), model_cfg,
                   description, step_fingerprint(c, model_cfg, mesh, "train", state=state,
                                                 batch=batch))


def _decode_program(c, model, params, adapters, setup, mesh, description) -> Program:
    from clara_jax.model.decode import decode_step, init_cache
    cfg = model.config
    batch, length = int(c.batch_size), int(c.max_len)
    variables = {"params": params}
    v_sharding = {"params": setup.param_sharding}
    if adapters is not None:
        variables["lora"] = adapters["decoder"]
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


# -- compile and analyse ----------------------------------------------------------------

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


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Static count of each collective in optimised HLO text (sync ops and async `-start`s;
    `-done`s are not counted twice)."""
    counts = {}
    for name in COLLECTIVES:
        counts[name] = len(re.findall(rf"\s{re.escape(name)}(?:-start)?\(", hlo_text))
    return counts


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def argument_bytes(program: Program) -> int:
    """Bytes of one device's shards of the program's arguments (before TPU tile padding)."""
    total = 0
    for a in jax.tree_util.tree_leaves(program.args):
        shard = a.sharding.shard_shape(a.shape)
        total += math.prod(shard) * a.dtype.itemsize
    return int(total)


_HBM_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def memory_breakdown(compiled) -> dict[str, int]:
    """Bytes per device from XLA's memory analysis of a compiled program: arguments,
    outputs, aliased (donated arguments reused as outputs), temporaries, generated code, and
    total = arguments + outputs - aliased + temporaries + generated code."""
    mem = compiled.memory_analysis()
    memory = {"argument_bytes": int(mem.argument_size_in_bytes),
              "output_bytes": int(mem.output_size_in_bytes),
              "alias_bytes": int(mem.alias_size_in_bytes),
              "temp_bytes": int(mem.temp_size_in_bytes),
              "generated_code_bytes": int(mem.generated_code_size_in_bytes)}
    memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                             - memory["alias_bytes"] + memory["temp_bytes"]
                             + memory["generated_code_bytes"])
    return memory


def analyse(compiled, program: Program, chip: Chip, hbm_gib: float | None = None,
            layer_cost: tuple[float, float] | None = None) -> dict:
    """The report: the description plus memory, cost, collectives, roofline time, MFU, fit.

    `layer_cost`: (flops, bytes) per device corrected for the scanned layer loop (XLA's cost
    analysis counts a loop body once; see `scan_corrected_cost`); None uses XLA's numbers.
    """
    n = program.mesh.devices.size
    hbm = float(hbm_gib if hbm_gib is not None else chip.hbm_gib) * GiB
    report = {**program.description, "chip": chip.name, "devices": n, "hbm_bytes": int(hbm),
              "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
              "model_flops_per_device": program.model_flops / n}
    memory = memory_breakdown(compiled)
    xla_flops, xla_bytes = _cost(compiled)
    flops, bytes_accessed = layer_cost or (xla_flops, xla_bytes)
    # A local backend of unknown peak / bandwidth (0) has no roofline: those fields are None.
    roofline = chip.peak_flops > 0 and chip.hbm_bandwidth > 0
    compute_s = flops / chip.peak_flops if roofline else None
    memory_s = bytes_accessed / chip.hbm_bandwidth if roofline else None
    step_s = max(compute_s, memory_s) if roofline else None
    report.update(
        memory=memory, fits=memory["total_bytes"] <= hbm,
        hbm_fraction=memory["total_bytes"] / hbm,
        flops_per_device=flops, bytes_accessed_per_device=bytes_accessed,
        xla_flops_per_device=xla_flops, xla_bytes_accessed_per_device=xla_bytes,
        cost_corrected_for_scan=layer_cost is not None,
        # XLA counted the scanned layer loop's body once: time and MFU are then not meaningful.
        cost_counts_layer_loop_once=(layer_cost is None and program.model_cfg.scan_layers
                                     and program.model_cfg.num_layers > 1),
        model_compute_seconds=report["model_flops_per_device"] / chip.peak_flops
        if roofline else None,
        collectives=count_collectives(compiled.as_text()),
        estimated_step_seconds=step_s, compute_seconds=compute_s, memory_seconds=memory_s,
        bound=("compute" if compute_s >= memory_s else "memory") if roofline else None,
        estimated_mfu=(report["model_flops_per_device"] / chip.peak_flops / step_s
                       if step_s > 0 else 0.0) if roofline else None)
    return report


def out_of_memory_report(error: Exception, program: Program, chip: Chip,
                         hbm_gib: float | None = None) -> dict:
    """The report of a program the TPU compiler rejected for lack of HBM (it refuses to
    build an executable that cannot run): the arguments' bytes from their shardings plus the
    temporaries the compiler asked for."""
    n = program.mesh.devices.size
    hbm = float(hbm_gib if hbm_gib is not None else chip.hbm_gib) * GiB
    match = _HBM_OOM.search(str(error))
    temps = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None
    args = argument_bytes(program)
    total = args + (temps or 0)
    return {**program.description, "chip": chip.name, "devices": n, "hbm_bytes": int(hbm),
            "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
            "model_flops_per_device": program.model_flops / n,
            "memory": {"argument_bytes": args, "temp_bytes": temps, "total_bytes": total},
            "fits": False, "hbm_fraction": total / hbm,
            "compile_error": str(error).strip().splitlines()[0][:500]}


def scan_corrected_cost(c: ml_collections.ConfigDict, devices: Sequence[Any], decode: bool,
                        scanned: tuple[float, float], num_layers: int) -> tuple[float, float]:
    """(flops, bytes accessed) per device of all `num_layers` layers.

    XLA's cost analysis counts the body of the scanned layer loop once, so the scanned
    program costs about base + 1 layer. One more compile, of the same step with 2 layers
    unrolled (base + 2 layers), gives the layer's cost; the total is
    scanned + (num_layers - 1) x (two_layers - scanned).
    """
    compiled, _ = lower_and_compile(build_program(c, devices, decode, num_layers=2))
    two = _cost(compiled)
    return tuple(s + (num_layers - 1) * max(t - s, 0.0) for s, t in zip(scanned, two))


def compile_report(c: ml_collections.ConfigDict, topology: str, *, decode: bool = False,
                   hbm_gib: float | None = None, correct_scan_cost: bool = True,
                   serialize_to: str | None = None) -> tuple[dict, Any]:
    """Compiles the run `c` (train step, or decode step) for `topology` (e.g. "v5e:16x16",
    or "local": this process's devices, as `train` would); returns (report dict, compiled
    executable or None when it does not fit).

    `correct_scan_cost`: one extra 2-layer compile to count every scanned layer's FLOPs and
    bytes (see `scan_corrected_cost`); without it the roofline uses XLA's raw numbers.
    `serialize_to`: also write the executable and its fingerprint there (see `serialize`).
    """
    if topology == LOCAL:
        devices, chip = local_devices(c.get("peak_flops", 0.0))
    else:
        devices, chip = topology_devices(topology)
    program = build_program(c, devices, decode=decode)
    program.fingerprint["topology"] = topology
    start = time.time()
    try:
        compiled, seconds = lower_and_compile(program)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report = out_of_memory_report(e, program, chip, hbm_gib)
        report.update(topology=topology, compile_seconds=time.time() - start,
                      total_seconds=time.time() - start)
        return report, None
    layers = program.model_cfg.num_layers
    layer_cost = None
    if correct_scan_cost and program.model_cfg.scan_layers and layers > 2:
        layer_cost = scan_corrected_cost(c, devices, decode, _cost(compiled), layers)
    report = analyse(compiled, program, chip, hbm_gib, layer_cost)
    report.update(topology=topology, compile_seconds=seconds,
                  total_seconds=time.time() - start)
    if serialize_to:
        serialize(compiled, serialize_to, program.fingerprint)
        report.update(executable=serialize_to, executable_bytes=os.path.getsize(serialize_to))
    return report, compiled


def format_report(r: dict) -> str:
    """A human-readable summary of a report (per-device numbers)."""
    g = lambda b: "?" if b is None else f"{b / GiB:.2f} GiB"
    m = r["memory"]
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    n = r["num_params"]
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    lines = [
        f"{r['mode']} step of stage {r['stage']} ({r['model']}, {size} "
        f"parameters, {r['param_dtype']} params / {r['dtype']} compute) on {r['topology']} "
        f"({r['devices']} x {r['chip'] if r['topology'] == LOCAL else 'TPU ' + r['chip']}), "
        f"mesh {mesh}",
        f"  global batch {r['batch_size']}, max_len {r['max_len']}; remat_policy "
        f"{r['remat_policy']}, scan_layers {r['scan_layers']}, attention_impl "
        f"{r['attention_impl']}; compiled in {r['compile_seconds']:.1f} s "
        f"({r['total_seconds']:.1f} s in all)"]
    if "compile_error" in r:
        lines += [
            f"  the TPU compiler rejected the program: {r['compile_error']}",
            f"  memory per device: arguments {g(m['argument_bytes'])}, temps "
            f"{g(m['temp_bytes'])}; total at least {g(m['total_bytes'])} of "
            f"{g(r['hbm_bytes'])} HBM ({100 * r['hbm_fraction']:.0f}%): {verdict}"]
        return "\n".join(lines)
    lines += [
        "  memory per device: arguments {}, outputs {}, aliased {}, temps {}, generated code "
        "{}".format(g(m["argument_bytes"]), g(m["output_bytes"]), g(m["alias_bytes"]),
                    g(m["temp_bytes"]), g(m["generated_code_bytes"])),
        f"  total {g(m['total_bytes'])} of {g(r['hbm_bytes'])} "
        f"{'device memory' if r['topology'] == LOCAL else 'HBM'} "
        f"({100 * r['hbm_fraction']:.0f}%): {verdict}",
        f"  per device: {r['flops_per_device'] / 1e12:.3f} TFLOP, "
        f"{r['bytes_accessed_per_device'] / 1e9:.2f} GB accessed ("
        + ("every scanned layer counted" if r["cost_corrected_for_scan"] else "XLA's count")
        + f"; XLA alone: {r['xla_flops_per_device'] / 1e12:.3f} TFLOP, "
        f"{r['xla_bytes_accessed_per_device'] / 1e9:.2f} GB); model "
        f"{r['model_flops_per_device'] / 1e12:.3f} TFLOP",
        "  collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
    ] + [f"  replicated: {n}" for n in r.get("sharding_notes", [])]
    if r["estimated_step_seconds"] is None:
        lines.append("  (no roofline time or MFU: this backend's peak FLOP/s and memory "
                     "bandwidth are unknown)")
        return "\n".join(lines)
    lines.append(f"  model FLOPs at the chip's peak: {1e3 * r['model_compute_seconds']:.1f} ms "
                 f"per step (100% MFU)")
    if r["cost_counts_layer_loop_once"]:
        lines.append("  (XLA counted the scanned layer loop once, so no roofline time or MFU "
                     "here; rerun with --correct_scan_cost)")
    else:
        lines.append(
            f"  estimated step {1e3 * r['estimated_step_seconds']:.1f} ms ({r['bound']}-bound: "
            f"compute {1e3 * r['compute_seconds']:.1f} ms, HBM "
            f"{1e3 * r['memory_seconds']:.1f} ms), estimated MFU "
            f"{100 * r['estimated_mfu']:.1f}%")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------

def _cli() -> None:
    import json

    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "Target TPU topology: v4:AxBxC, v5e:AxB, v5p:AxBxC, "
                        "v6e:AxB (chips per dimension), e.g. v5e:16x16 = v5e-256; or 'local': "
                        "this process's devices, as `python -m clara_jax.train` would run.")
    flags.DEFINE_bool("decode", False, "Compile the one-token KV-cache decode step (batch "
                      "config.batch_size, cache of config.max_len tokens) instead of training.")
    flags.DEFINE_float("hbm_gib", None, "Override the chip's HBM (GiB) for the fit verdict.")
    flags.DEFINE_string("report_json", None, "Also write the report as JSON here.")
    flags.DEFINE_string("serialize", None, "Write the compiled executable and its fingerprint "
                        "here, for `python -m clara_jax.train --config.compiled_step=PATH`.")
    flags.DEFINE_bool("correct_scan_cost", True, "One more (2-layer, unrolled) compile so "
                      "FLOPs and bytes count every scanned layer (XLA counts a loop body once).")
    flags.mark_flags_as_required(["config", "topology"])
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        if FLAGS.topology != LOCAL and jax.config.jax_platforms is None:
            # The host's own backend stays CPU: compiling for a topology needs no local TPU
            # (and must not grab one a trainer on this machine is using).
            jax.config.update("jax_platforms", "cpu")
        report, compiled = compile_report(FLAGS.config, FLAGS.topology, decode=FLAGS.decode,
                                          hbm_gib=FLAGS.hbm_gib,
                                          correct_scan_cost=FLAGS.correct_scan_cost,
                                          serialize_to=FLAGS.serialize)
        print(format_report(report))
        if FLAGS.report_json:
            with open(FLAGS.report_json, "w") as f:
                json.dump(report, f, indent=2)
            print(f"report: {FLAGS.report_json}")
        if "executable" in report:
            use = (f"; train with --config.compiled_step={report['executable']}"
                   if report["mode"] == "train" else "")
            print(f"executable: {report['executable']} ({report['executable_bytes']} bytes)"
                  + use)

    app.run(main)


if __name__ == "__main__":
    _cli()
