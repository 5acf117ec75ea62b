"""The training loop of every CLaRa stage (and of the base LM trained from scratch).

    python -m clara_jax.train --config=configs/pretrain.py:model=tiny --workdir=DIR \
        [--config.total_steps=100 ...]

`train` reads top to bottom, like big_vision's trainer:
  1. validate the config (before anything compiles); build the mesh
  2. the starting model (`start.load_start`) and the tokenizer
  3. data: JSONL files, or the synthetic corpus generated into the work directory (`inputs`)
  4. the run (`setup.build_run`: model, optimizer, shardings, state), the jitted steps and
     the Orbax checkpointer (resume from the latest step if any)
  5. the loop: metrics (console + TensorBoard), eval, checkpoints, SIGTERM, the divergence
     checks (`divergence`)
  6. export the trained model to `{workdir}/model` (a `Clara.load`-able directory)

A run that diverges raises `errors.DivergenceError` (no export; summary.json has
`"diverged"`); one stopped by SIGTERM saves its state and raises `errors.Preempted`.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clara_jax import parallel
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.data import pipeline
from clara_jax.errors import DivergenceError, Preempted
from clara_jax.train import (base_lm, candidate_cache, compiled_step, divergence, init_config,
                             inputs)
from clara_jax.train import step as step_lib
from clara_jax.train import resume
from clara_jax.train.checkpoint import Checkpointer, saved_steps
from clara_jax.train.metrics import Meter, MetricsLog
from clara_jax.train.setup import Run, build_run, model_flops, validate_config
from clara_jax.train.start import load_start, run_tokenizer

__all__ = ["train", "evaluate_loss", "export_model"]


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) a training run; returns the final summary (also in summary.json)."""
    c = init_config.adopt(c)   # config.adopt_checkpoint_config: init_from's CLaRa fields
    validate_config(c)
    record = resume.check_config(c, workdir)   # refuses a changed run before anything is built
    mesh = parallel.mesh_from_config(c.mesh)
    files = inputs.data_files(c, workdir)
    start = load_start(c, workdir, lambda: inputs.text_lines(c, files))
    tok = run_tokenizer(c, start["tokenizer_path"])
    data = (base_lm.text_data(c, files, tok) if c.stage == "base_lm"
            else inputs.stage_data(c, files, tok, workdir))
    run = build_run(c, mesh, start["model_cfg"], tok.base_vocab_size, start["params"],
                    start["adapters"], k_instruct=data.k_instruct)
    write_config(c, workdir, resume.base_identity(start["params"], run.model_cfg.vocab_size,
                                                  c.seed), record)
    for note in run.setup.sharding_notes:
        print(f"sharding: {note}")
    ckpt = Checkpointer(workdir, keep=c.keep_checkpoints,
                        on_corrupt=c.on_corrupt_checkpoint)
    data_it = pipeline.make_iterator(data.train, worker_count=c.data.worker_count)
    state = restore(ckpt, run, data_it)
    train_step, state = jitted_train_step(c, run, state)
    eval_step = jax.jit(run.setup.eval_step)
    cache = candidates_of(c, workdir, run, state, tok, start["tokenizer_path"], data)
    guard = divergence.Guard(c, run.model_cfg.vocab_size, int(state.step))
    try:
        state, last = loop(c, workdir, run, state, train_step, eval_step, data, data_it, ckpt,
                           cache, guard)
    except DivergenceError as e:
        write_summary(workdir, {"stage": c.stage, "steps": guard.step, "last": guard.last,
                                "diverged": str(e), "skipped_steps": guard.skipped})
        raise
    return finish(c, workdir, run, state, last, start["tokenizer_path"], guard.skipped)


def write_config(c: ml_collections.ConfigDict, workdir: str, base_id: str,
                 record: dict | None) -> None:
    """`{workdir}/config.json` (the current config) and `{workdir}/configs/start_NNN.json`
    (this start's config and frozen-base identity, never overwritten), after checking the
    base identity against the recorded one (`record`: `resume.check_config`'s, None for a
    fresh run). Written only once the resume checks passed."""
    os.makedirs(workdir, exist_ok=True)
    resume.record_start(c, workdir, base_id, record)


def restore(ckpt: Checkpointer, run: Run, data_it) -> step_lib.TrainState:
    """The newest intact checkpoint's state (and data iterator position) if any (a step
    failing its checksum manifest is named and skipped: `Checkpointer.restore`), else the
    run's fresh state."""
    if not saved_steps(ckpt.directory):
        return run.state
    state, data_state = ckpt.restore(run.state, run.mesh)
    if data_state is not None:
        data_it.set_state(data_state)
    print(f"resumed from {ckpt.directory} at step {int(state.step)}")
    return state


def jitted_train_step(c: ml_collections.ConfigDict, run: Run, state: step_lib.TrainState
                      ) -> tuple[Callable, step_lib.TrainState]:
    """(the step, the state placed for it): `jax.jit` of the run's step with the state
    donated, or the executable serialised at config.compiled_step (fingerprint checked)."""
    if not c.get("compiled_step"):
        return jax.jit(run.setup.train_step, donate_argnums=(0,)), state
    step = compiled_step.load_train_step(c.compiled_step, c, run.model_cfg, run.mesh, state,
                                         run.state_sharding)
    return step, step.place(state)


class Candidates:
    """Stage 3 against cached compressed candidates (`candidate_cache`): the cache and the
    rows of the train / eval records in it."""

    def __init__(self, cache: candidate_cache.CandidateCache, data: inputs.Data):
        self.cache = cache
        self.train_rows = cache.record_rows(data.train_records)
        self.eval_rows = cache.record_rows(data.eval_records)


def candidates_of(c: ml_collections.ConfigDict, workdir: str, run: Run, state,
                  tok: ClaraTokenizer, tokenizer_path: str, data: inputs.Data
                  ) -> Candidates | None:
    """With end_to_end.cache_candidates: every distinct candidate compressed once by the
    frozen encoder (`{workdir}/candidate_cache`); None otherwise."""
    if not (c.stage == "end_to_end" and c.end_to_end.cache_candidates):
        return None
    encoder = Clara(run.model_cfg, run.clara_cfg, state.base,
                    {**state.frozen, **state.trainable}, tok, tokenizer_path=tokenizer_path)
    cache = candidate_cache.build_candidate_cache(
        encoder, [data.train_records, data.eval_records],
        os.path.join(workdir, candidate_cache.CACHE_DIR), batch_size=c.batch_size,
        mesh=run.mesh)
    return Candidates(cache, data)


def loop(c: ml_collections.ConfigDict, workdir: str, run: Run, state, train_step: Callable,
         eval_step: Callable, data: inputs.Data, data_it, ckpt: Checkpointer,
         cand: Candidates | None, guard: divergence.Guard
         ) -> tuple[step_lib.TrainState, dict]:
    """Steps from the state's step to total_steps, logging every log_every steps, evaluating
    every eval_every, checkpointing every checkpoint_every and on SIGTERM (then stopping);
    returns (state, the last log row with the last eval's metrics as eval_*). `guard`'s
    checks run at every log row and before every checkpoint (DivergenceError); a non-finite
    step stops the run at once with on_nonfinite=stop (a device sync per step)."""
    cache = cand.cache if cand else None
    to_global = lambda batch: inputs.local_batch_to_global(
        batch, lambda ndim: parallel.batch_sharding(run.mesh, ndim), cache)
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    log = MetricsLog(workdir, int(state.step), c.total_steps)
    meter = Meter(c.batch_size, data.n_train, c.get("peak_flops", 0))
    last: dict[str, Any] = {}
    guard.last = last
    step_flops = None
    skipped = jnp.zeros((), jnp.int32)   # on the device: counted without a sync per step
    try:
        with parallel.axis_rules(run.mesh):
            for step in range(int(state.step), c.total_steps):
                batch, extras = inputs.split_batch(next(data_it), c.stage, cache,
                                                   cand.train_rows if cand else None)
                if step_flops is None:  # batch shapes are static: the same every step
                    step_flops = model_flops(run.model_cfg, batch)
                meter.add(step, batch, extras, step_flops)
                state, metrics = train_step(state, to_global(batch))
                done = guard.step = step + 1
                skipped = skipped + (metrics["finite"] == 0).astype(jnp.int32)
                logged = done % c.log_every == 0 or done == c.total_steps
                if logged:
                    m = jax.device_get(metrics)
                    if not float(m["finite"]):
                        nonfinite(c, ckpt, done)
                    last = guard.last = meter.row(done, m)
                    log.train(last)
                    guard.skips(done, int(skipped), final=done == c.total_steps)
                    guard.row(done, m)
                    guard.params(done, state.trainable)
                elif c.on_nonfinite == "stop" and not bool(metrics["finite"]):
                    nonfinite(c, ckpt, done)
                if data.eval is not None and (done % c.eval_every == 0
                                              or done == c.total_steps):
                    ev = evaluate_loss(eval_step, state, data.eval, c.eval_batches, to_global,
                                       c.stage, cache, cand.eval_rows if cand else None)
                    log.eval({**ev, "step": done})
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                if done % c.checkpoint_every == 0 or done == c.total_steps or stop["signal"]:
                    if not logged:   # only finite, bounded states are saved
                        guard.params(done, state.trainable)
                    ckpt.save(done, state, data_it.get_state(), force=True)
                if stop["signal"]:
                    ckpt.wait()
                    print(f"SIGTERM: saved step {done} to {ckpt.directory}")
                    break
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        log.close()
    guard.skipped = int(skipped)
    return state, last


def evaluate_loss(eval_step: Callable, state, eval_ds, max_batches: int,
                  to_global: Callable[[dict], dict], stage: str, candidates=None,
                  record_rows=None) -> dict:
    """Mean of the eval metrics (scalars) over up to max_batches held-out batches.
    to_global: a host batch -> global arrays; candidates, record_rows: the stage-3 candidate
    cache and the eval records' rows in it."""
    sums: dict[str, float] = {}
    n = 0
    for batch in eval_ds:
        if n >= max_batches:
            break
        batch, _ = inputs.split_batch(batch, stage, candidates, record_rows)
        m = jax.device_get(eval_step(state, to_global(batch)))
        rows = float(m.get("n_with_pos", 0.0))
        for k, v in m.items():
            if np.ndim(v) == 0 and k != "n_with_pos":
                # recall@k: weighted by the batch's rows with positives (a mean over them)
                sums[k] = sums.get(k, 0.0) + float(v) * (rows if k.startswith("recall@") else 1)
        sums["n_with_pos"] = sums.get("n_with_pos", 0.0) + rows
        n += 1
    with_pos = sums.pop("n_with_pos", 0.0)
    return {k: v / (with_pos if k.startswith("recall@") else max(n, 1))
            for k, v in sums.items() if with_pos > 0 or not k.startswith("recall@")}


def nonfinite(c: ml_collections.ConfigDict, ckpt: Checkpointer, step: int) -> None:
    """A step whose loss or gradient was not finite (its update not applied): raises
    DivergenceError with on_nonfinite == "stop", else says so and goes on (the loop counts
    the skipped steps against max_skipped_fraction)."""
    if c.on_nonfinite == "stop":
        ckpt.wait()
        raise DivergenceError(
            f"diverged at step {step}: non-finite loss or gradient (update not applied); the "
            f"last good checkpoint is step {ckpt.latest_step()} (--config.on_nonfinite=skip "
            f"skips such steps instead)")
    print(f"step {step}: non-finite loss or gradient, update skipped")


def write_summary(workdir: str, summary: dict) -> None:
    """`{workdir}/summary.json`, replaced atomically."""
    path = os.path.join(workdir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)


def finish(c: ml_collections.ConfigDict, workdir: str, run: Run, state, last: dict,
           tokenizer_path: str, skipped_steps: int = 0) -> dict:
    """The run's summary {stage, steps, last, skipped_steps (, model_dir)} written to
    summary.json; a run that reached total_steps exports its model first. A run stopped
    before total_steps (SIGTERM; its state is saved) raises Preempted after writing it."""
    steps = int(state.step)
    summary = {"stage": c.stage, "steps": steps, "last": last, "skipped_steps": skipped_steps}
    if steps >= c.total_steps:
        if c.stage == "base_lm":
            summary["model_dir"] = base_lm.export(workdir, run.model_cfg, state, tokenizer_path)
        else:
            summary["model_dir"] = export_model(workdir, run, state, tokenizer_path)
    write_summary(workdir, summary)
    if steps < c.total_steps:
        raise Preempted(f"preempted (SIGTERM) at step {steps} of {c.total_steps}; the state "
                        f"is saved in {os.path.join(os.path.abspath(workdir), 'checkpoints')}; "
                        f"rerun the same command to resume")
    return summary


def export_model(workdir: str, run: Run, state, tokenizer_path: str) -> str:
    """Writes `{workdir}/model`, a saved Clara; returns that directory. With
    optimize_mem_tokens the trained memory-token rows go back into the embedding table."""
    cfg = run.clara_cfg
    out = os.path.join(workdir, "model")
    tok = ClaraTokenizer.from_file(tokenizer_path, cfg.n_mem, cfg.different_mem_tokens)
    base, adapters = step_lib.with_mem_embeddings(state.base,
                                                  {**state.frozen, **state.trainable}, cfg)
    Clara(run.model_cfg, cfg, jax.device_get(base), jax.device_get(adapters), tok,
          tokenizer_path=tokenizer_path).save(out)
    return out
