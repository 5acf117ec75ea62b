"""Training the demo's stages: the trainer config of each stage, one stage run (resumable),
the three CLaRa stages at one rate, and the rates in concurrent pinned processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

from tqdm import tqdm

from clara_jax.errors import Preempted
from clara_jax.train import train as train_lib

# configs/ beside the package (the stage config files and configs/demo.py).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
# Trained at each rate, in this order (the paper's stages 1, 2 and 3); also the names of their
# config files, their data files and their sections of configs/demo.py.
CLARA_STAGES = ("pretrain", "instruct", "end_to_end")
STAGE_FILES = {"base": "pretrain_base_tiny.py", "pretrain": "pretrain.py",
               "instruct": "instruct.py", "end_to_end": "end_to_end.py"}
# The fields of the demo's `base` section that are trainer fields of the base's run.
BASE_TRAINER_FIELDS = ("max_len", "vocab_size", "lm_head_init", "rope_theta", "b2",
                       "warmup_ratio")


def stage_config(cfg, name: str, worlds: dict[str, list[str]], rate: int | None,
                 init_from: str):
    """The trainer config of one demo stage: the stage's config file plus the demo's values.
    Stages train on the train splits of the CLaRa worlds (all, or the stage's first `worlds`)
    and evaluate their loss on the first world's eval split."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}",
                                                  os.path.join(CONFIG_DIR, STAGE_FILES[name]))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(CONFIG_DIR))
    spec.loader.exec_module(module)
    c = module.get_config(f"model={cfg.model}")
    s = cfg[name]
    c.seed = cfg.seed
    c.total_steps = s.steps
    c.learning_rate = s.learning_rate
    c.batch_size = s.batch_size
    c.log_every = max(s.steps // 20, 1)
    c.eval_every = s.steps
    c.checkpoint_every = max(s.steps // 4, 1)
    c.init_from = init_from
    c.scan_layers = cfg.scan_layers
    if name == "base":
        data_dir = os.path.dirname(worlds["base"][0])
        for field in BASE_TRAINER_FIELDS:
            c[field] = s[field]
        c.data.train_files = os.path.join(data_dir, "base_text.jsonl")
        c.whole_words = os.path.join(data_dir, "whole_words.txt")
        return c
    c.doc_max_length = cfg.doc_max_length
    c.compress_rate = rate
    c.generation_top_k = cfg.top_k
    c.num_candidates = cfg.num_candidates
    c.max_len = s.max_len
    for field in ("lora_rank", "lora_alpha", "lora_dropout"):
        c[field] = cfg[field]
    c.optimize_mem_tokens = s.optimize_mem_tokens
    train_worlds = worlds["clara"][:s.get("worlds") or len(worlds["clara"])]
    c.data.train_files = ",".join(os.path.join(w, f"{name}_train.jsonl") for w in train_worlds)
    c.data.eval_files = os.path.join(worlds["clara"][0], f"{name}_eval.jsonl")
    if name == "instruct":
        c.instruct.decoder_init = s.decoder_init
    if name == "end_to_end":
        c.temperature = s.temperature
        c.end_to_end.train_decoder = s.train_decoder
        c.end_to_end.query_reasoner_init = s.query_reasoner_init
    return c


def run_stage(c, workdir: str) -> str:
    """Trains (or resumes, or skips when finished) one stage; returns its model directory."""
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        done = json.load(open(summary_path))
        if done.get("model_dir") and done.get("steps", 0) >= c.total_steps:
            print(f"{workdir}: done ({done['steps']} steps), reusing")
            return done["model_dir"]
    t0 = time.time()
    print(f"== {c.stage} -> {workdir} ({c.total_steps} steps)", flush=True)
    try:
        summary = train_lib.train(c, workdir)
    except Preempted as e:   # stopped before total_steps (SIGTERM), its state saved
        raise Preempted(f"{workdir}: {c.stage} stopped at step {_steps_of(summary_path)} of "
                        f"{c.total_steps} (SIGTERM); rerun to resume it") from e
    last = summary.get("last", {})
    print(f"   {time.time() - t0:.0f} s; loss {last.get('loss', float('nan')):.3f}, "
          f"eval loss {last.get('eval_loss', float('nan')):.3f}", flush=True)
    return summary["model_dir"]


def _steps_of(summary_path: str) -> int | str:
    """The steps a stopped stage's summary.json records ("?" without one)."""
    try:
        return json.load(open(summary_path))["steps"]
    except (OSError, ValueError, KeyError):
        return "?"


def train_rate(cfg, worlds: dict[str, list[str]], rate: int, base: str, workdir: str
               ) -> dict[str, str]:
    """The CLaRa stages at one compression rate, each from the previous stage's model;
    returns {"pretrain": model_dir, "instruct": ..., "end_to_end": ...}."""
    prev, models = base, {}
    for name in CLARA_STAGES:
        wd = os.path.join(workdir, f"rate{rate}", name)
        prev = models[name] = run_stage(stage_config(cfg, name, worlds, rate, prev), wd)
    return models


def cpu_groups(n_jobs: int) -> list[list[int]]:
    """One CPU group per job, for `train_rates_in_parallel`: with at most as many jobs as
    CPUs, this process's CPUs split into `n_jobs` disjoint groups of (nearly) equal size;
    with more jobs than CPUs, every job gets every CPU (all jobs run at once and the OS
    shares the CPUs: 3 rates on 2 cores take 1.5x, not 2x, the time of one rate, as no core
    idles while the last rate trains). One group (no split) where CPU affinity is
    unavailable."""
    if not hasattr(os, "sched_getaffinity"):
        return [[]]
    cpus = sorted(os.sched_getaffinity(0))
    if n_jobs > len(cpus):
        return [cpus] * n_jobs
    n = max(1, n_jobs)
    return [cpus[i::n] for i in range(n)]


def _stage_progress(workdir: str, rates: list[int]) -> int:
    """Steps finished so far over every stage of every rate (from each stage's
    summary.json once done, else the last row of its metrics.jsonl)."""
    done = 0
    for rate in rates:
        for name in CLARA_STAGES:
            wd = os.path.join(workdir, f"rate{rate}", name)
            try:
                done += json.load(open(os.path.join(wd, "summary.json")))["steps"]
                continue
            except (OSError, ValueError, KeyError):
                pass
            try:
                with open(os.path.join(wd, "metrics.jsonl")) as f:
                    lines = f.read().splitlines()
                done += json.loads(lines[-1])["step"] if lines else 0
            except (OSError, ValueError, KeyError):
                pass
    return done


def train_rates_in_parallel(cfg, rates: list[int], workdir: str,
                            groups: list[list[int]]) -> None:
    """Trains the rates' stages in concurrent processes (`python -m clara_jax.demo
    --train_rate=R`), at most one per CPU group of `groups` (`cpu_groups`; an empty group
    is not pinned), each pinned to its group: on a 2-core CPU two one-core processes did
    1.2x the work of one two-core process on the tiny model (stage 1: 14,500 against 11,900
    tokens/s). Numbers differ from a run with another thread
    count in float rounding only (a reduction split over threads adds in another order).
    Each process logs to `<workdir>/rate<R>/train.log`; a progress bar follows their steps.
    Raises RuntimeError naming the rate and its log if a process fails."""

    config_path = os.path.join(workdir, "demo_config.json")
    with open(config_path, "w") as f:
        f.write(cfg.to_json(indent=2))
    total = len(rates) * sum(cfg[name].steps for name in CLARA_STAGES)
    pending = list(rates)
    running: dict[int, tuple[subprocess.Popen, str, Any, int]] = {}
    free = list(range(len(groups)))
    print(f"== stages 1-3 at rates {', '.join(map(str, rates))}: {len(groups)} processes "
          f"in parallel (CPUs {groups}); logs in {workdir}/rate<R>/train.log", flush=True)
    bar = tqdm(total=total, unit="step", desc="stages 1-3", initial=_stage_progress(workdir, rates))
    try:
        while pending or running:
            while pending and free:
                rate, slot = pending.pop(0), free.pop(0)
                log_path = os.path.join(workdir, f"rate{rate}", "train.log")
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                log = open(log_path, "a")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "clara_jax.demo", f"--workdir={workdir}",
                     f"--train_rate={rate}", f"--resolved_config={config_path}",
                     f"--cpus={','.join(map(str, groups[slot]))}"],
                    stdout=log, stderr=subprocess.STDOUT)
                running[rate] = (proc, log_path, log, slot)
            time.sleep(2.0)
            steps = _stage_progress(workdir, rates)
            if steps > bar.n:
                bar.update(steps - bar.n)
            for rate, (proc, log_path, log, slot) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[rate]
                free.append(slot)
                if proc.returncode != 0:
                    tail = "".join(open(log_path, errors="replace").readlines()[-20:])
                    raise RuntimeError(f"rate {rate}: stages 1-3 failed (exit "
                                       f"{proc.returncode}); log {log_path}, last lines:\n{tail}")
    finally:
        bar.close()
        for proc, _, log, _ in running.values():
            proc.kill()
            log.close()
