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
the model is ever allocated). Step, state and batch are `clara_jax.train.setup.build_run`'s
(abstract), so what compiles here is what `python -m clara_jax.train` runs. Devices come from
`jax.experimental.topologies.get_topology_desc` (needs libtpu: the `tpu` extra).

Numbers: `memory_analysis()` and `cost_analysis()` of the compiled SPMD program are per
device. The step-time estimate is a roofline, max(FLOPs / peak bf16 FLOP/s, bytes accessed /
HBM bandwidth), per device; it ignores communication and overlap, so it is a lower bound.
MFU = model FLOPs per device (`setup.model_flops`: 3 x forward matmul FLOPs from token
counts) / peak / estimated time. Collective counts are static instruction counts in the
optimised HLO (an op inside the scanned layer loop counts once).

Modules, each importing only those before it: `topology` (chips, TPU topologies, local
devices), `compile` (`build_program`, `lower_and_compile`), `report` (`compile_report`:
compile and analyse memory, cost, collectives, roofline; `format_report`), `__main__` (the
command line).

Serialised steps (the file format lives in `clara_jax.train.compiled_step`, which `train`
imports; this package imports train, never the reverse): `--serialize=PATH` writes the
compiled executable with a fingerprint of what it was compiled for (backend platform,
device count, mesh, jax version, the step-relevant config fields, the model config, and
every state / batch leaf's shape, dtype and PartitionSpec). `python -m clara_jax.train --config.compiled_step=PATH` then runs
that executable instead of compiling, after refusing (naming the file and every differing
field) one that does not match the run. An executable runs only on the backend it was
compiled for: serialise with `--topology=local` on the machine type that trains.
"""

from clara_jax.aot.compile import Program, build_program, lower_and_compile
from clara_jax.aot.report import (COLLECTIVES, analyse, argument_bytes, compile_report,
                                  count_collectives, format_report, memory_breakdown,
                                  out_of_memory_report, scan_corrected_cost)
from clara_jax.aot.topology import (CHIPS, GiB, LOCAL, Chip, local_devices, parse_topology,
                                    topology_devices)

__all__ = ["CHIPS", "COLLECTIVES", "Chip", "GiB", "LOCAL", "Program", "analyse", "argument_bytes",
           "build_program", "compile_report", "count_collectives", "format_report",
           "local_devices", "lower_and_compile", "memory_breakdown", "out_of_memory_report",
           "parse_topology", "scan_corrected_cost", "topology_devices"]
