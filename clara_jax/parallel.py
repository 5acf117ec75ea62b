"""Meshes and the one table that maps logical axis names to mesh axes.

Every parameter and key activation of the decoder carries logical names (`batch`, `length`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `LOGICAL_AXIS_RULES`
maps them onto the mesh axes `data`, `fsdp`, `tensor`. A name may list several candidates; the
first whose mesh axis is still free in that array wins (so activations shard their batch over
`data` x `fsdp` while weights shard `embed` over `fsdp`).

Multi-slice (several TPU slices joined by the data-center network, DCN): `dcn_data` slices of
pure data parallelism are folded into the `data` axis, slice-major, so the mesh keeps its three
axes and the rules above stay as they are: `fsdp`, `tensor` and the in-slice part of `data`
stay on a slice's fast interconnect (ICI), and only the gradient reduction over `data` crosses
DCN. The batch is therefore sharded over (dcn_data x data) x fsdp.
"""

from __future__ import annotations

import contextlib
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


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None,
              dcn_data: int = 1) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) of shape (dcn_data * data, fsdp, tensor).

    `shape` is the per-slice (data, fsdp, tensor); one entry may be -1 for "the remaining
    devices". With dcn_data > 1 on devices that know their slice (TPU `slice_index`), the
    layout is `mesh_utils.create_hybrid_device_mesh` (each slice a contiguous block of
    `data`); elsewhere (CPU tests) the device list is reshaped in order. Raises ValueError
    naming the shape when it does not divide the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    if dcn_data < 1 or len(devices) % dcn_data:
        raise ValueError(f"mesh dcn_data {dcn_data} does not divide the {len(devices)} devices")
    per_slice = len(devices) // dcn_data
    known = int(np.prod([s for s in shape if s != -1]))
    if known <= 0 or per_slice % known:
        where = f"the {len(devices)} devices" if dcn_data == 1 else \
            f"the {per_slice} devices per slice (dcn_data {dcn_data})"
        raise ValueError(f"mesh shape {shape} does not divide {where}")
    shape = [per_slice // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != per_slice:
        raise ValueError(f"mesh shape {shape} x dcn_data {dcn_data} uses "
                         f"{int(np.prod(shape)) * dcn_data} devices, but {len(devices)} are "
                         f"present")
    if dcn_data > 1 and hasattr(devices[0], "slice_index"):
        from jax.experimental import mesh_utils
        try:
            grid = mesh_utils.create_hybrid_device_mesh(shape, [dcn_data, 1, 1], devices)
        except (ValueError, AssertionError) as e:
            raise ValueError(f"mesh dcn_data {dcn_data} x {shape} does not fit the slices of "
                             f"these devices: {e}") from e
    else:
        grid = np.asarray(devices).reshape([dcn_data * shape[0], *shape[1:]])
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a config's `mesh` fields (data, fsdp, tensor, dcn_data)."""
    return make_mesh([mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor], devices,
                     dcn_data=int(mesh_cfg.get("dcn_data", 1)))


def logical_sharding(logical_specs: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (e.g. `mistral.logical_axes`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def fit_shardings(shardings: Any, shapes: Any, name: str = "") -> tuple[Any, list[str]]:
    """Leaves out of each array's sharding the mesh axes that do not divide its dimension.

    shardings: a tree of NamedShardings; shapes: the matching tree of arrays or
    ShapeDtypeStructs. An array dimension of size n sharded over mesh axes (a, b) keeps a, then
    b, only while their product divides n; the array is replicated over the axes it drops (for
    example a CLaRa vocabulary of 32011 rows with `tensor` 4: CLaRa freezes the embedding, so
    this costs memory, not optimizer state). Returns (fitted tree, one note per changed array,
    naming `name` + its path, its dimension and the axes dropped)."""
    notes: list[str] = []

    def fit(path, sharding, x):
        spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
        fitted = []
        for dim, (n, axes) in enumerate(zip(x.shape, spec)):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            kept, size = [], 1
            for a in names:
                if n % (size * sharding.mesh.shape[a]) == 0:
                    kept.append(a)
                    size *= sharding.mesh.shape[a]
            if len(kept) < len(names):
                dropped = [a for a in names if a not in kept]
                notes.append(f"{name}{jax.tree_util.keystr(path)}: dimension {dim} of {tuple(x.shape)} "
                             f"is not divisible by mesh axis "
                             + ", ".join(f"{a}={sharding.mesh.shape[a]}" for a in dropped)
                             + "; replicated over it")
            fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        return NamedSharding(sharding.mesh, PartitionSpec(*fitted), memory_kind=sharding.memory_kind)

    tree = jax.tree_util.tree_map_with_path(fit, shardings, shapes)
    return tree, notes


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a [B, ...] input batch: B over data (including dcn_data) x fsdp, the
    rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
    """Context for tracing sharded code: `mesh` as the current mesh (`jax.set_mesh`) and the
    logical-axis rules, so the activation constraints (`nn.with_logical_constraint`) take
    effect. Both are needed: Flax applies a constraint only under a mesh set this way (the
    legacy `with mesh:` leaves every constraint a silent no-op)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield
