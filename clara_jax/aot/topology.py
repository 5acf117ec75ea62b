"""TPU chips and topologies to compile for, and this process's own devices (`local`)."""

from __future__ import annotations

import dataclasses
import math
import os

import jax

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
    from jax.experimental import topologies   # after libtpu's environment is set
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
