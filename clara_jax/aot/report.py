"""What a compiled step needs, per device: memory (XLA's analysis, or the compiler's
out-of-memory message), FLOPs and bytes (corrected for the scanned layer loop), collectives,
a roofline step time and MFU (`compile_report`: build, compile, analyse), and the
human-readable summary (`format_report`)."""

from __future__ import annotations

import math
import re
import os
import time
from typing import Any, Sequence

import jax
import ml_collections

from clara_jax.aot.compile import Program, build_program, lower_and_compile
from clara_jax.aot.topology import LOCAL, Chip, GiB, local_devices, topology_devices
from clara_jax.train.compiled_step import serialize

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Static count of each collective in optimised HLO text (sync ops and async `-start`s;
    `-done`s are not counted twice)."""
    counts = {}
    for name in COLLECTIVES:
        counts[name] = len(re.findall(rf"\s{re.escape(name)}(?:-start)?\(", hlo_text))
    return counts


def cost(compiled) -> tuple[float, float]:
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
    xla_flops, xla_bytes = cost(compiled)
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
    two = cost(compiled)
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
        layer_cost = scan_corrected_cost(c, devices, decode, cost(compiled), layers)
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
