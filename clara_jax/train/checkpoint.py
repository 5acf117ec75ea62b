"""Orbax checkpoints of a training run: train state (without the frozen base) + data iterator,
each step with a checksum manifest checked before it is restored.

Saved under `{workdir}/checkpoints/{step}` by an `ocp.CheckpointManager`: asynchronous, the
last `keep` kept, and atomic (Orbax writes into `{step}.orbax-checkpoint-tmp*` and renames it
when the save is complete). The frozen base is not saved again: it comes from the run's
`init_from` on resume.

Integrity: once a save has finished, `{step}/manifest.json` lists the size and sha256 of every
file of the step (state and `data/`, the iterator state); a background thread writes it as
soon as Orbax has finished the save, and `wait` / `save` / `close` write any still missing.
`restore` checks the newest step against its manifest (a missing, extra, resized or changed
file, a missing `data/`); a step that fails is skipped for the previous one
(`on_corrupt="refuse"`: raise `StorageError` instead) and, once an intact step is restored,
named in one line and moved to `{workdir}/corrupt_checkpoints/{step}`; no intact step raises
`StorageError` naming each step's fault and moves nothing. A step without a manifest
(the process died between Orbax's rename and the manifest, milliseconds) is "unverified": it
is restored with Orbax's own checks (truncated files, missing metadata) and a one-line note, so
a SIGKILL right after a save does not lose that save; any error restoring it falls back.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax.errors import StorageError, UserError
from clara_jax.train.step import TrainState

MANIFEST = "manifest.json"
TMP_MARK = ".orbax-checkpoint-tmp"
ON_CORRUPT = ("fallback", "refuse")


def _saved_part(state: TrainState) -> dict:
    return {"step": state.step, "trainable": state.trainable, "frozen": state.frozen,
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}


def saved_steps(directory: str) -> list[int]:
    """The finalized steps under a checkpoints directory (integer-named dirs), ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _file_digests(step_dir: str) -> dict[str, dict]:
    """{path relative to step_dir: {size (bytes), sha256}} of every file but the manifest."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel == MANIFEST:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = {"size": os.path.getsize(path), "sha256": h.hexdigest()}
    return dict(sorted(out.items()))


def write_manifest(step_dir: str) -> None:
    """`{step_dir}/manifest.json` (written to a temporary name, then renamed)."""
    files = _file_digests(step_dir)
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files, "data": os.path.isdir(os.path.join(step_dir, "data"))}, f,
                  indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def check_step(step_dir: str) -> str | None:
    """None if the step matches its manifest and has its data/ iterator state; else what is
    wrong, naming the file ("no manifest" for an unverified step)."""
    if not os.path.isdir(os.path.join(step_dir, "data")):
        return "no data/ (the data iterator state)"
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return "no manifest"
    try:
        with open(path) as f:
            want = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    have = _file_digests(step_dir)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        return f"missing file {missing[0]}"
    if extra:
        return f"extra file {extra[0]}"
    for rel, w in want.items():
        if have[rel]["size"] != w["size"]:
            return f"file {rel} has {have[rel]['size']} bytes, the manifest {w['size']}"
        if have[rel]["sha256"] != w["sha256"]:
            return f"file {rel} changed (sha256 differs from the manifest)"
    return None


def remove_unfinished_saves(directory: str) -> list[str]:
    """Removes `*.orbax-checkpoint-tmp*` left by a save that never finished (killed, disk
    full), saying so in one line each; returns their paths."""
    removed = sorted(glob.glob(os.path.join(directory, f"*{TMP_MARK}*")))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        print(f"checkpoint: removed an unfinished save {path}")
    return removed


class Checkpointer:
    """Save / restore the train state and the grain iterator state of one work directory."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True,
                 on_corrupt: str = "fallback"):
        if on_corrupt not in ON_CORRUPT:
            raise UserError(f"config.on_corrupt_checkpoint: must be one of {ON_CORRUPT}, "
                             f"got {on_corrupt!r}")
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.on_corrupt = on_corrupt
        if jax.process_index() == 0:
            remove_unfinished_saves(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._pending: set[int] = set()   # saved here, manifest not yet written

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _write_manifests(self, up_to: int | None = None) -> None:
        """The manifests of the steps this checkpointer saved (up to step `up_to`) whose save
        has finished. Only the steps it saved: a step found without one (written by a run
        that died) stays unverified rather than being vouched for."""
        if jax.process_index() != 0:
            return
        with self._lock:
            finished = set(saved_steps(self.directory))
            for step in sorted(self._pending):
                if up_to is not None and step > up_to:
                    continue
                self._pending.discard(step)
                if step in finished:
                    try:
                        write_manifest(os.path.join(self.directory, str(step)))
                    except FileNotFoundError:   # deleted (max_to_keep) meanwhile
                        pass

    def _watch(self, step: int) -> None:
        while self.manager.is_saving_in_progress():
            time.sleep(0.01)
        self._write_manifests(up_to=step)

    def save(self, step: int, state: TrainState, data_state: Any | None, force: bool = False
             ) -> bool:
        self.manager.wait_until_finished()   # Orbax would wait here anyway
        self._write_manifests()
        args = {"state": ocp.args.StandardSave(_saved_part(state))}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved and jax.process_index() == 0:
            with self._lock:
                self._pending.add(step)
            self._watcher = threading.Thread(target=self._watch, args=(step,), daemon=True)
            self._watcher.start()
        return saved

    def _restore_step(self, step: int, template: TrainState, mesh: Mesh | None
                      ) -> tuple[TrainState, Any]:
        def target(x):
            sharding = getattr(x, "sharding", None)
            if mesh is not None and (sharding is None or len(sharding.device_set) == 1):
                sharding = NamedSharding(mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        abstract = jax.tree_util.tree_map(target, _saved_part(template))
        args = {"state": ocp.args.StandardRestore(abstract), "data": ocp.args.JsonRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        saved = restored["state"]
        state = template.replace(step=saved["step"], trainable=saved["trainable"],
                                 frozen=saved["frozen"], opt_state=saved["opt_state"],
                                 rng=jax.random.wrap_key_data(saved["rng"]))
        return state, restored["data"]

    def _set_aside(self, broken: list[tuple[int, str]], resumed: int) -> None:
        """Moves the steps newer than `resumed` that are not intact to
        `{workdir}/corrupt_checkpoints/{step}` (so the run can save those steps again),
        one line each."""
        if jax.process_index() == 0:
            for step, problem in broken:
                aside = os.path.join(self.workdir, "corrupt_checkpoints", str(step))
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(os.path.join(self.directory, str(step)), aside)
                print(f"checkpoint step {step} is not intact: {problem}; moved to {aside}, "
                      f"falling back to the previous step (resuming from step {resumed})")
        self.manager.reload()

    def restore(self, template: TrainState, mesh: Mesh | None = None
                ) -> tuple[TrainState, Any | None]:
        """The newest intact step restored onto the shapes and shardings of `template` (so
        onto any mesh; leaves of the template on one device, e.g. step, rng, optimizer
        counts, are restored replicated over `mesh`), and its data iterator state. Newer
        steps failing their manifest are set aside (module docstring); with
        on_corrupt="refuse" the first one raises StorageError, and so does having no intact
        step (nothing is moved then). FileNotFoundError when there is no checkpoint."""
        steps = saved_steps(self.directory)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        broken: list[tuple[int, str]] = []
        for step in reversed(steps):
            problem = check_step(os.path.join(self.directory, str(step)))
            if problem == "no manifest":
                try:
                    restored = self._restore_step(step, template, mesh)
                except Exception as e:   # noqa: BLE001 - any failure of an unverified step
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    problem = f"no manifest, and Orbax cannot restore it ({first})"
                else:
                    print(f"checkpoint step {step} has no manifest (the run stopped before "
                          f"writing it): unverified, restored with Orbax's checks only")
                    self._set_aside(broken, step)
                    return restored
            elif problem is None:
                restored = self._restore_step(step, template, mesh)
                if broken:
                    self._set_aside(broken, step)
                return restored
            if self.on_corrupt == "refuse":
                raise StorageError(
                    f"checkpoint {os.path.join(self.directory, str(step))}: {problem} "
                    f"(on_corrupt_checkpoint=refuse; set it to 'fallback' to resume from the "
                    f"previous intact step)")
            broken.append((step, problem))
        raise StorageError(f"no intact checkpoint in {self.directory}: "
                           + "; ".join(f"step {s}: {p}" for s, p in broken))

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._write_manifests()
        self.manager.close()
