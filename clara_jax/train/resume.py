"""Resume safety: a run resumed from its checkpoints must be the run that wrote them.

Every start of `train` records its full config: `{workdir}/configs/start_NNN.json` (one per
start, never overwritten: {"config", "base_identity", "resumed_from_checkpoint"}) and
`{workdir}/config.json` (the current config). Both are written only after the resume check
passed, so a refused start leaves the record of the run untouched.

On resume (a checkpoint exists) the new config is compared with the last start's:
  - MODEL_FIELDS (the model, its frozen base, its vocabulary or its trained parameters'
    shapes; `seed` too when it builds a random base; `grad_accum` between 1 and more, which
    changes the saved optimizer state's structure) and the base identity: never changed;
  - FREE_FIELDS (how long, how often to log / eval / save, execution settings, the mesh:
    checkpoints restore onto any mesh): always free;
  - every other field changes optimisation or data: refused unless named in
    `config.resume_overrides` (comma-separated), and an accepted change is said in one line.
A refusal is one `UserError` naming every changed field with both values.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from clara_jax.errors import UserError
from clara_jax.train.checkpoint import ON_CORRUPT, saved_steps

# Fields that define the model, its frozen base or its trained parameters (shapes, which
# parameters train, the vocabulary): a checkpoint cannot be resumed under other values.
MODEL_FIELDS = ("stage", "model", "init_from", "vocab_size", "rope_theta", "lm_head_init",
                "whole_words", "doc_max_length", "compress_rate", "different_mem_tokens",
                "lora_rank", "lora_alpha", "optimize_mem_tokens", "instruct.decoder_init",
                "end_to_end.query_reasoner_init", "end_to_end.query_reasoner_init_scale",
                "end_to_end.train_decoder")
# Fields that never matter to what a checkpoint holds or how training continues from it.
# on_nonfinite is free: its own error message tells the user to rerun with "skip".
FREE_FIELDS = ("total_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
               "keep_checkpoints", "resume_overrides", "on_corrupt_checkpoint", "on_nonfinite",
               "peak_flops", "compiled_step", "remat_policy", "scan_layers", "attention_impl",
               "mesh.dcn_data", "mesh.data", "mesh.fsdp", "mesh.tensor",
               "max_skipped_fraction", "divergence.zero_grad_rows", "divergence.chance_rows",
               "divergence.chance_tolerance", "divergence.max_abs_param",
               "adopt_checkpoint_config")
ABSENT = "<unset>"


def flat_config(c: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{dotted field: JSON value} (JSON round trip, so it compares equal to a record)."""
    d = json.loads(c.to_json()) if isinstance(c, ml_collections.ConfigDict) else c
    out = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                out[prefix + key] = value
    walk(d, "")
    return out


def field_kind(name: str, config: dict[str, Any]) -> str:
    """"model", "free" or "optimisation" for a dotted field of a (flat) config."""
    if name in MODEL_FIELDS or (name == "seed" and not config.get("init_from")):
        return "model"
    if name in FREE_FIELDS:
        return "free"
    return "optimisation"


def overrides_of(c: ml_collections.ConfigDict) -> set[str]:
    return {s.strip() for s in str(c.get("resume_overrides", "") or "").split(",") if s.strip()}


def _fmt(v: Any) -> str:
    return ABSENT if v is ABSENT else json.dumps(v)


def start_records(workdir: str) -> list[str]:
    """Paths of `{workdir}/configs/start_NNN.json`, oldest first."""
    d = os.path.join(workdir, "configs")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d)
                  if n.startswith("start_") and n.endswith(".json"))


def last_record(workdir: str) -> dict | None:
    """The last start record ({"config", "base_identity", ...}); a work directory from before
    start records: {"config": config.json, "base_identity": None}; None without either."""
    records = start_records(workdir)
    if records:
        with open(records[-1]) as f:
            return json.load(f)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return {"config": json.load(f), "base_identity": None}
    return None


def check_config(c: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Before anything is built: None for a fresh run (no checkpoint), else the last start
    record after checking `c` against it. Raises UserError naming every changed model field
    and every changed optimisation field not in resume_overrides (both values); prints one
    line for accepted overrides."""
    on_corrupt = c.get("on_corrupt_checkpoint", "fallback")
    if on_corrupt not in ON_CORRUPT:
        raise UserError(f"config.on_corrupt_checkpoint: must be one of {ON_CORRUPT}, got "
                        f"{on_corrupt!r}")
    steps = saved_steps(os.path.join(os.path.abspath(workdir), "checkpoints"))
    if not steps:
        return None
    record = last_record(workdir)
    if record is None:
        raise UserError(f"{workdir} has checkpoints (step {steps[-1]}) but no config.json or "
                        f"configs/start_*.json recording the run's settings; resume refused")
    old, new = flat_config(record["config"]), flat_config(c)
    allowed = overrides_of(c)
    unknown = sorted(n for n in allowed if n not in old and n not in new)
    if unknown:
        raise UserError(f"config.resume_overrides: unknown field(s) {', '.join(unknown)}")
    refused_model, refused_opt, accepted = [], [], []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, ABSENT), new.get(name, ABSENT)
        if a == b:
            continue
        kind = field_kind(name, new)
        if field_kind(name, old) == "model":   # seed that built the recorded base
            kind = "model"
        if name == "grad_accum" and (a == ABSENT or b == ABSENT or (a > 1) != (b > 1)):
            kind = "model"   # accumulation (optax.MultiSteps) changes the saved opt_state
        change = f"{name} {_fmt(a)} -> {_fmt(b)}"
        if kind == "model":
            refused_model.append(change)
        elif kind == "optimisation":
            (accepted if name in allowed else refused_opt).append(change)
    where = f"resuming {workdir} (checkpoint step {steps[-1]})"
    if refused_model or refused_opt:
        parts = []
        if refused_model:
            parts.append("model fields cannot change: " + ", ".join(refused_model)
                         + " (start a new work directory)")
        if refused_opt:
            names = ",".join(ch.split(" ")[0] for ch in refused_opt)
            parts.append("changed: " + ", ".join(refused_opt)
                         + f" (to accept, set --config.resume_overrides={names})")
        raise UserError(f"{where}: " + "; ".join(parts))
    if accepted:
        print(f"resume: overriding the recorded config (resume_overrides): "
              + ", ".join(accepted))
    return record


def base_identity(params: dict, vocab_size: int | None = None, seed: int | None = None
                  ) -> str:
    """A fingerprint of the frozen base: sha256 over every leaf's path, dtype, shape and 4096
    evenly spaced values (plus `seed` when the run grows the vocabulary, whose new rows it
    draws). Sampled rather than hashing all bytes: reading every weight of a 7B base costs
    seconds to minutes per start, while any other base (another seed, another checkpoint,
    further training) differs in every weight, so a sample tells bases apart at no cost;
    it also covers how the base was built (init_from, seed, preset) without listing the
    recipe. The leaves may be numpy or jax arrays (only the sample is fetched).
    `vocab_size`: the run's vocabulary; rows beyond the base's are seeded."""
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, x in leaves:
        flat = x.reshape(-1)
        stride = max(1, flat.shape[0] // 4096)
        sample = np.asarray(flat[::stride][:4096])
        h.update(f"{jax.tree_util.keystr(path)} {sample.dtype} {tuple(x.shape)}".encode())
        h.update(np.ascontiguousarray(sample).tobytes())
    rows = params["embed_tokens"]["embedding"].shape[0]
    if vocab_size is not None and seed is not None and rows < vocab_size:
        h.update(f"grown to {vocab_size} rows with seed {seed}".encode())
    return h.hexdigest()[:32]


def record_start(c: ml_collections.ConfigDict, workdir: str, base_id: str,
                 record: dict | None) -> str:
    """Checks the base identity against the last start's (UserError naming both), then
    writes `{workdir}/configs/start_NNN.json` and `{workdir}/config.json`; returns the start
    record's path. `record`: what `check_config` returned (None for a fresh run)."""
    if record is not None and record.get("base_identity") not in (None, base_id):
        raise UserError(f"resuming {workdir}: the frozen base differs from the one the run "
                        f"was trained on (base identity {record['base_identity']} -> "
                        f"{base_id}; init_from {c.get('init_from')!r}): start a new work "
                        f"directory")
    d = os.path.join(workdir, "configs")
    n = len(start_records(workdir))
    if jax.process_index() != 0:   # one writer (a shared file system on multi-host runs)
        return os.path.join(d, f"start_{n:03d}.json")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"start_{n:03d}.json")
    while os.path.exists(path):
        n += 1
        path = os.path.join(d, f"start_{n:03d}.json")
    out = {"config": json.loads(c.to_json()), "base_identity": base_id,
           "resumed_from_checkpoint": record is not None}
    _write_json(path, out, exclusive=True)
    _write_json(os.path.join(workdir, "config.json"), out["config"])
    return path


def _write_json(path: str, obj: Any, exclusive: bool = False) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if exclusive and os.path.exists(path):
        raise FileExistsError(path)
    os.replace(tmp, path)
