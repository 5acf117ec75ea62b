"""Meshes and the one table that maps logical axis names to mesh axes.

Every parameter and key activation of the decoder carries logical names (`batch`, `length`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `LOGICAL_AXIS_RULES`
maps them onto the mesh axes `data`, `fsdp`, `tensor`. A name may list several candidates; the
first whose mesh axis is still free in that array wins (so activations shard their batch over
`data` x `fsdp` while weights shard `embed` over `fsdp`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); one entry may be -1 for "the remaining devices".

    Raises ValueError naming the shape when it does not divide the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if known <= 0 or len(devices) % known:
        raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices")
    shape = [len(devices) // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} uses {int(np.prod(shape))} devices, "
                         f"but {len(devices)} are present")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(logical_specs: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (e.g. `mistral.logical_axes`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a [B, ...] input batch: B over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def axis_rules(rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
    """Context manager activating the rules for activation constraints inside jit."""
    return nn.logical_axis_rules(list(rules))
