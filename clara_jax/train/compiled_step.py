"""A compiled train step as a file: what `train` needs to run an executable serialised by
`python -m clara_jax.aot --serialize` (the aot package imports this module, never the
reverse; the loader lives on the train side so train needs nothing from aot).

The file (as MaxText does): two pickle records, the fingerprint of what the step was
compiled for (backend, device count, mesh, jax version, the step-relevant config fields, the
model config, every state / batch leaf's shape, dtype and PartitionSpec), then the
serialised executable. A run loads it only after comparing fingerprints, naming the file and
every differing field.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import pickle
from typing import Any, Sequence

import jax
import ml_collections
from jax.experimental import serialize_executable


def with_sharding(abstract: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying the matching leaves of `sharding`."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)


FINGERPRINT_FORMAT = 2   # 2: the fingerprint is its own pickle record, before the executable
# Config fields a compiled train step does not depend on: bookkeeping, data files, the start
# checkpoint (its shapes are in the state's signature) and the seed (the PRNG key is an input).
FINGERPRINT_IGNORED = ("seed", "init_from", "compiled_step", "log_every", "eval_every",
                       "eval_batches", "checkpoint_every", "keep_checkpoints", "on_nonfinite",
                       "max_skipped_fraction", "divergence", "peak_flops", "data",
                       "resume_overrides", "on_corrupt_checkpoint")


def config_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted field name: value} of the config, without `FINGERPRINT_IGNORED` (subtrees
    included): everything the compiled step bakes in (stage, model, shapes, optimizer and
    schedule, loss weights, mesh, execution settings)."""
    out = {}

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            name = prefix + key
            if name in FINGERPRINT_IGNORED:
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = value

    walk(c.to_dict(), "")
    return out


def signature(tree: Any) -> dict[str, str]:
    """{key path: "dtype[shape] PartitionSpec"} of a tree of arrays or ShapeDtypeStructs
    (e.g. {".trainable['encoder']...": "float32[4, 128, 16] P(None, 'fsdp', None)"})."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)

    def spec(x):
        sharding = getattr(x, "sharding", None)
        return str(getattr(sharding, "spec", sharding))

    return {jax.tree_util.keystr(path): f"{x.dtype}{list(x.shape)} {spec(x)}"
            for path, x in leaves}


def step_fingerprint(c: ml_collections.ConfigDict, model_cfg, mesh, mode: str,
                     **trees) -> dict:
    """What a step is compiled for: backend platform, device kind and count, mesh, jax
    version, `config_fields(c)`, the model config, and the `signature` of each argument tree
    (train: `state` and `batch`, sharded as the step takes them)."""
    device = mesh.devices.flat[0]
    return {"format": FINGERPRINT_FORMAT, "mode": mode, "topology": None,  # compile_report's
            "platform": device.platform, "device_kind": device.device_kind,
            "device_count": int(mesh.devices.size), "mesh": dict(mesh.shape),
            "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
            "config": config_fields(c), "model_config": dataclasses.asdict(model_cfg),
            **{name: signature(tree) for name, tree in trees.items()}}


def fingerprint_mismatches(compiled: dict, run: dict, groups: Sequence[str] = (
        "mode", "platform", "device_kind", "device_count", "mesh", "jax", "jaxlib", "config",
        "model_config", "state")) -> list[str]:
    """Lines "field: compiled X, this run Y" for every difference in `groups` between a
    stored fingerprint and this run's; dict groups are compared field by field."""
    absent = "<absent>"
    out = []
    for group in groups:
        a, b = compiled.get(group, absent), run.get(group, absent)
        if isinstance(a, dict) and isinstance(b, dict) and group != "mesh":
            # Argument trees' keys are key paths ("['doc_ids']") and values signature
            # strings (shown as they are); config keys are names, values shown as repr.
            tree = group in ("state", "batch", "inputs")
            prefix = group if tree else group + "."
            show = str if tree else repr
            for key in list(a) + [k for k in b if k not in a]:
                x, y = a.get(key, absent), b.get(key, absent)
                if x != y:
                    out.append(f"{prefix}{key}: compiled {show(x)}, this run {show(y)}")
        elif a != b:
            line = f"{group}: compiled {a!r}, this run {b!r}"
            if group == "platform":
                line += (f": an executable compiled for {a} cannot run on {b}; compile one for "
                         f"this backend where it trains: python -m clara_jax.aot --config=... "
                         f"--topology=local --serialize=PATH")
            out.append(line)
    return out


def _refuse(path: str, stored: dict, problems: list[str], limit: int = 20) -> None:
    where = f"{stored.get('device_count')} x {stored.get('device_kind')}"
    if stored.get("topology"):
        where = f"{stored['topology']}: {where}"
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise ValueError(f"config.compiled_step: {path} (compiled for {where}) does not match "
                     f"this run; {len(problems)} difference(s):\n  "
                     + "\n  ".join(problems[:limit]) + more)


def serialize(compiled, path: str, fingerprint: dict) -> None:
    """Writes to `path`, as MaxText does, two pickle records: {"format", "fingerprint"}, then
    the compiled executable (`jax.experimental.serialize_executable`) with its argument /
    result tree structures {"payload", "in_tree", "out_tree"}. Checks read the first record
    only, so a mismatching 7B executable is refused without reading it."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"format": FINGERPRINT_FORMAT, "fingerprint": fingerprint}, f)
        pickle.dump({"payload": payload, "in_tree": in_tree, "out_tree": out_tree}, f)


def read_serialized(path: str, executable: bool = False) -> tuple[dict, dict | None]:
    """(fingerprint, {"payload", "in_tree", "out_tree"} or None) of a file `serialize` wrote;
    the executable record is read only when asked. ValueError naming the file otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"config.compiled_step: {path} does not exist")
    with open(path, "rb") as f:
        header = pickle.load(f)
        if not isinstance(header, dict) or header.get("format") != FINGERPRINT_FORMAT:
            raise ValueError(f"config.compiled_step: {path} is not an executable serialised by "
                             f"this clara_jax.aot (no fingerprint of format "
                             f"{FINGERPRINT_FORMAT}); serialise it again with python -m "
                             f"clara_jax.aot --serialize={path}")
        return header["fingerprint"], (pickle.load(f) if executable else None)


def read_fingerprint(path: str) -> dict:
    """The fingerprint stored with a serialised executable (ValueError naming the file)."""
    return read_serialized(path)[0]


def check_compiled_step_config(path: str, c: ml_collections.ConfigDict) -> None:
    """Refuses (ValueError naming `path` and each differing field) a serialised executable
    that is not a train step or was compiled from other step-relevant config fields."""
    stored = read_fingerprint(path)
    problems = fingerprint_mismatches(stored, {"mode": "train", "config": config_fields(c)},
                                      groups=("mode", "config"))
    if problems:
        _refuse(path, stored, problems)


def load_compiled(path: str):
    """The executable written by `serialize`, loaded on this process's backend (the same
    topology and jax / libtpu versions it was compiled for; unchecked: see `load_train_step`).
    Call it like the jitted step: `state, metrics = step(state, batch)` with arrays sharded
    exactly as compiled."""
    _, stored = read_serialized(path, executable=True)
    return serialize_executable.deserialize_and_load(stored["payload"], stored["in_tree"],
                                                     stored["out_tree"])


class CompiledTrainStep:
    """A deserialised train step: `state, metrics = step(state, batch)`. `place(state)` puts
    a state on the shardings it was compiled for; a batch whose features, shapes, dtypes or
    shardings differ from the compiled ones is refused (ValueError naming the file)."""

    def __init__(self, path: str, compiled, batch_signature: dict[str, str]):
        self.path, self.compiled, self.batch_signature = path, compiled, batch_signature
        self.state_shardings = compiled.input_shardings[0][0]

    def place(self, state):
        return jax.device_put(state, self.state_shardings)

    def __call__(self, state, batch):
        run = signature(batch)
        if run != self.batch_signature:
            problems = fingerprint_mismatches({"batch": self.batch_signature}, {"batch": run},
                                              groups=("batch",))
            raise ValueError(f"config.compiled_step: {self.path} was compiled for another "
                             f"batch: " + "; ".join(problems))
        return self.compiled(state, batch)


def load_train_step(path: str, c: ml_collections.ConfigDict, model_cfg, mesh, state,
                    shardings) -> CompiledTrainStep:
    """The train step serialised at `path`, loaded for this run after checking its
    fingerprint against the run's (config `c`, `model_cfg`, `mesh`, the `state` (arrays or
    abstract) placed on `shardings`, i.e. `setup.state_sharding(state, ...)`): ValueError
    naming the file and every difference (a platform mismatch says that the executable
    cannot run here) before anything is deserialised."""
    fingerprint = read_fingerprint(path)
    run = step_fingerprint(c, model_cfg, mesh, "train",
                           state=with_sharding(state, shardings))
    problems = fingerprint_mismatches(fingerprint, run)
    if problems:
        _refuse(path, fingerprint, problems)
    return CompiledTrainStep(path, load_compiled(path), fingerprint["batch"])
