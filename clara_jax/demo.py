"""`make demo`: CLaRa end to end on CPU, on the synthetic corpus (config: configs/demo.py).

    python -m clara_jax.demo --workdir=workdir/demo [--config=configs/demo.py --config.rates=4,16]

1. generate synthetic worlds of invented entities: some for the base LM, others (each split
   into train / eval entities) for the CLaRa stages and the evaluation;
2. pretrain a tiny base LM from scratch on the base worlds' reading lessons (documents
   followed by questions and answers about them) and chat-formatted document-QA,
   paraphrase, text-RAG and closed-book examples;
3. at each compression rate: stage 1 (SCP), stage 2 (instruct), stage 3 (end to end), each with
   `clara_jax.train` from the previous stage's model;
4. evaluate on the held-out entities: closed book and full text (the base model, same backbone)
   against compressed documents at each rate, in the normal (query reasoner picks top_k of 20
   candidates) and oracle (gold documents given) settings, and the query reasoner's Recall@1/@5
   before and after stage 3;
5. write `results.md`, `results.json` and `f1_vs_rate.png` into the work directory, print the
   table, and fail unless compressed F1 (gold documents, compressed) beats closed book and
   stage 3 raised Recall@1, at every rate.

Every step is resumable: rerunning skips finished stages and resumes unfinished ones.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIG_DIR, "demo.py"),
                                "Demo config (configs/demo.py).", lock_config=True)
flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes everything.")
flags.DEFINE_integer("train_rate", 0, "Internal: train only this rate's stages 1-3 (one "
                     "process of the parallel run), with --resolved_config.")
flags.DEFINE_string("resolved_config", "", "Internal: the demo config as JSON (with "
                    "--train_rate).")
flags.DEFINE_string("cpus", "", "Internal: CPUs to pin the --train_rate process to (0,1,...).")
FLAGS = flags.FLAGS

CLARA_STAGES = ("stage1", "stage2", "stage3")   # trained at each rate, in this order
STAGE_FILES = {"base": "pretrain_base_tiny.py", "stage1": "pretrain.py",
               "stage2": "instruct.py", "stage3": "end_to_end.py"}


# -- data ----------------------------------------------------------------------------------

def reading_passages(path: str, rng: random.Random) -> list[str]:
    """The plain-text reading lessons of one world's `pretrain_text.txt` (a document line
    followed by its "Question: ... Answer: ..." lines): each document with its questions in
    shuffled order, and each pair of neighbouring documents with the questions of both mixed,
    so that a question always has its document in context (answer tokens are then about a
    tenth of the text: the signal that teaches the base to read)."""
    groups: list[list[str]] = []
    for line in open(path, encoding="utf-8").read().splitlines():
        if not line.strip():
            continue
        if line.startswith("Question:") and groups:
            groups[-1].append(line)
        else:
            groups.append([line])
    out = []
    for i, g in enumerate(groups):
        qa = g[1:]
        rng.shuffle(qa)
        out.append("\n".join([g[0]] + qa))
        if i + 1 < len(groups):
            h = groups[i + 1]
            qa = g[1:] + h[1:]
            rng.shuffle(qa)
            out.append("\n".join([g[0], h[0]] + qa))
    return out


def write_base_text(world_dirs: list[str], out_path: str) -> str:
    """The base LM's pretraining texts (JSONL {"text"}) from the base worlds, which share no
    entity with the worlds CLaRa is trained and evaluated on: reading lessons
    (`reading_passages`), document QA and paraphrases with the document as text (the stage-1 prompts with text instead of
    memory tokens), text-RAG answers and, for a quarter of the questions, closed-book ones
    (the layouts `evaluate` uses for its baselines). Many small worlds, each seen about once, make reading the context cheaper
    than memorising it. Returns out_path."""
    from clara_jax.clara import prompts
    from clara_jax.data import formats

    texts: list[str] = []
    rng = random.Random(0)
    for world_dir in world_dirs:
        texts += reading_passages(os.path.join(world_dir, "pretrain_text.txt"), rng)
        scp, _ = formats.read_jsonl([os.path.join(world_dir, f"pretrain_{s}.jsonl")
                                     for s in ("train", "eval")], "pretrain")
        for i, r in enumerate(scp):
            background = "\n".join(r["docs"])
            if r["data_type"] == "qa":
                target = "\n".join(f"Question: {q}\nAnswer: {a}"
                                   for q, a in zip(r["questions"], r["answers"]))
                texts.append(prompts.mistral_chat(prompts.SYSTEM_QA,
                                                  f"Background:\n{background}", target))
            else:
                instruction = prompts.PARAPHRASE_INSTRUCTIONS[
                    i % len(prompts.PARAPHRASE_INSTRUCTIONS)]
                texts.append(prompts.mistral_chat(prompts.SYSTEM_PARAPHRASE,
                                                  instruction.format(docs=background),
                                                  r["answers"][0]))
        qa, _ = formats.read_jsonl([os.path.join(world_dir, f"instruct_{s}.jsonl")
                                    for s in ("train", "eval")], "instruct")
        for i, r in enumerate(qa):
            texts.append(prompts.full_text_string(r["question"], r["docs"], r["answers"][0]))
            if i % 4 == 0:  # enough to learn the layout; guessing is not what it should learn
                texts.append(prompts.closed_book_string(r["question"], r["answers"][0]))
    rng.shuffle(texts)
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    return out_path


def make_worlds(cfg, workdir: str) -> dict[str, list[str]]:
    """Generates the synthetic worlds (idempotent): {"base": dirs, "clara": dirs}. The first
    CLaRa world's eval split (held-out entities) is the evaluation set."""
    from clara_jax.data import synthetic

    out: dict[str, list[str]] = {"base": [], "clara": []}
    for role, count, first_seed in (("clara", cfg.worlds, cfg.seed),
                                    ("base", cfg.base.worlds, cfg.seed + 1000)):
        for i in range(count):
            path = os.path.join(workdir, "data", f"{role}_world{i}")
            if not os.path.exists(os.path.join(path, "manifest.json")):
                synthetic.generate_corpus(path, seed=first_seed + i,
                                          num_entities=cfg.num_entities,
                                          num_candidates=cfg.num_candidates, k=cfg.top_k,
                                          places_seed=cfg.places_seed,
                                          questions_per_entity=cfg.questions_per_entity,
                                          multi_hop=cfg.multi_hop)
            out[role].append(path)
    return out


# -- training ------------------------------------------------------------------------------

def stage_config(cfg, name: str, worlds: dict[str, list[str]], rate: int | None,
                 init_from: str):
    """The trainer config of one demo stage: the stage's config file plus the demo's values.
    Stages train on the train splits of the CLaRa worlds (all, or the stage's first `worlds`)
    and evaluate on the first world's eval split."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"demo_{name}",
                                                  os.path.join(_CONFIG_DIR, STAGE_FILES[name]))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(_CONFIG_DIR))
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
        c.max_len = s.max_len
        c.vocab_size = s.vocab_size
        c.data.train_files = os.path.join(os.path.dirname(worlds["base"][0]), "base_text.jsonl")
        return c
    c.doc_max_length = cfg.doc_max_length
    c.compress_rate = rate
    c.generation_top_k = cfg.top_k
    c.num_candidates = cfg.num_candidates
    c.max_len = s.get("max_len") or cfg.max_len
    fmt = {"stage1": "pretrain", "stage2": "instruct", "stage3": "end_to_end"}[name]
    train_worlds = worlds["clara"][:s.get("worlds") or len(worlds["clara"])]
    c.data.train_files = ",".join(os.path.join(w, f"{fmt}_train.jsonl") for w in train_worlds)
    c.data.eval_files = os.path.join(worlds["clara"][0], f"{fmt}_eval.jsonl")
    if name == "stage3":
        c.temperature = s.temperature
    return c


def run_stage(c, workdir: str) -> str:
    """Trains (or resumes, or skips when finished) one stage; returns its model directory."""
    from clara_jax.train import train as train_lib
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        done = json.load(open(summary_path))
        if done.get("model_dir") and done.get("steps", 0) >= c.total_steps:
            print(f"{workdir}: done ({done['steps']} steps), reusing")
            return done["model_dir"]
    t0 = time.time()
    print(f"== {c.stage} -> {workdir} ({c.total_steps} steps)", flush=True)
    summary = train_lib.train(c, workdir)
    last = summary.get("last", {})
    print(f"   {time.time() - t0:.0f} s; loss {last.get('loss', float('nan')):.3f}, "
          f"eval loss {last.get('eval_loss', float('nan')):.3f}", flush=True)
    return summary["model_dir"]


def train_rate(cfg, worlds: dict[str, list[str]], rate: int, base: str, workdir: str
               ) -> dict[str, str]:
    """Stages 1, 2 and 3 at one compression rate, each from the previous stage's model;
    returns {"stage1": model_dir, "stage2": ..., "stage3": ...}."""
    prev, models = base, {}
    for name in CLARA_STAGES:
        wd = os.path.join(workdir, f"rate{rate}", name)
        prev = models[name] = run_stage(stage_config(cfg, name, worlds, rate, prev), wd)
    return models


def cpu_groups(n_jobs: int) -> list[list[int]]:
    """The CPUs this process may run on, split into at most `n_jobs` disjoint groups of
    (nearly) equal size; one group (no split) where CPU affinity is unavailable."""
    if not hasattr(os, "sched_getaffinity"):
        return [[]]
    cpus = sorted(os.sched_getaffinity(0))
    n = max(1, min(n_jobs, len(cpus)))
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
    import subprocess
    from tqdm import tqdm

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


# -- evaluation ----------------------------------------------------------------------------

def evaluate_models(cfg, eval_file: str, models: dict[int, dict[str, str]]
                    ) -> list[dict[str, Any]]:
    """Every row of the demo table (a dict per system and setting)."""
    from clara_jax.clara.model import Clara
    from clara_jax.data import formats
    from clara_jax.eval.evaluate import evaluate

    records, _ = formats.read_jsonl(eval_file, "eval", num_candidates=cfg.num_candidates)
    if cfg.eval.limit:
        records = records[:cfg.eval.limit]
    kw = dict(top_k=cfg.top_k, batch_size=cfg.eval.batch_size,
              max_new_tokens=cfg.eval.max_new_tokens)
    rows: list[dict[str, Any]] = []

    def add(system: str, rate, setting: str, summary: dict, stage: str = "") -> None:
        row = {"system": system, "rate": rate, "setting": setting, "stage": stage,
               **{k: summary.get(k) for k in ("em", "f1", "acc", "em_max", "f1_max",
                                                "recall@1", "recall@5", "n")}}
        rows.append(row)
        print(f"   {system:<12} rate={rate!s:<4} {setting:<7} {stage:<14} "
              f"EM {row['em']:.3f}  F1 {row['f1']:.3f}" +
              (f"  R@1 {row['recall@1']:.3f}" if row.get("recall@1") is not None else ""),
              flush=True)

    rates = sorted(models)
    for rate in rates:
        before = Clara.load(models[rate]["stage2"])
        s, _ = evaluate(before, records, mode="compressed", setting="normal", **kw)
        add("compressed", rate, "normal", s, "before stage 3")
        after = Clara.load(models[rate]["stage3"])
        for setting in ("oracle", "normal"):
            s, _ = evaluate(after, records, mode="compressed", setting=setting, **kw)
            add("compressed", rate, setting, s, "after stage 3")
        if rate == rates[0]:
            # The baselines run on the same frozen base with no adapter; documents in the
            # normal setting are the ones this rate's trained query reasoner picks.
            s, _ = evaluate(after, records, mode="closed_book", adapter=None, **kw)
            add("closed book", "-", "-", s)
            for setting in ("oracle", "normal"):
                s, _ = evaluate(after, records, mode="full_text", setting=setting,
                                adapter=None, **kw)
                add("full text", "1", setting, s)
    return rows


def format_results(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| system | compression | setting | stage | EM | F1 | Recall@1 | Recall@5 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["rate"] if r["rate"] in ("-",) else f"{r['rate']}x"
        lines.append(f"| {r['system']} | {rate} | {r['setting']} | {r['stage'] or '-'} | "
                     f"{f(r['em'])} | {f(r['f1'])} | {f(r.get('recall@1'))} | "
                     f"{f(r.get('recall@5'))} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """F1 against compression rate (compressed, after stage 3), with the baselines as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for setting, marker in (("oracle", "o"), ("normal", "s")):
        pts = sorted((r["rate"], r["f1"]) for r in rows if r["system"] == "compressed"
                     and r["setting"] == setting and r["stage"] == "after stage 3")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                label=f"compressed ({setting})")
    for r in rows:
        if r["system"] == "closed book":
            ax.axhline(r["f1"], color="gray", ls=":", label="closed book")
        if r["system"] == "full text":
            ax.axhline(r["f1"], color="green" if r["setting"] == "oracle" else "olive",
                       ls="--", label=f"full text ({r['setting']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression rate")
    ax.set_ylabel("F1 (held-out entities)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("CLaRa demo: F1 vs compression rate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check(rows: list[dict]) -> list[str]:
    """The demo's own acceptance, at every rate: reading the compressed gold documents beats
    reading none (compressed F1 in the oracle setting, after stage 3, above closed book), and
    stage 3 raised the query reasoner's Recall@1 (normal setting). Returns the failures."""
    closed = next(r["f1"] for r in rows if r["system"] == "closed book")
    failures = []
    for rate in sorted({r["rate"] for r in rows if r["system"] == "compressed"}):
        get = lambda stage, setting: next(
            r for r in rows if r["system"] == "compressed" and r["rate"] == rate
            and r["stage"] == stage and r["setting"] == setting)
        oracle = get("after stage 3", "oracle")
        after, before = get("after stage 3", "normal"), get("before stage 3", "normal")
        if not oracle["f1"] > closed:
            failures.append(f"rate {rate}: compressed F1 (oracle) {oracle['f1']:.3f} is not above "
                            f"closed book {closed:.3f}")
        if not after["recall@1"] > before["recall@1"]:
            failures.append(f"rate {rate}: stage 3 did not raise Recall@1 "
                            f"({before['recall@1']:.3f} -> {after['recall@1']:.3f})")
    return failures


# -- the run -------------------------------------------------------------------------------

def run(cfg, workdir: str) -> dict:
    """Runs (or resumes) the whole demo; returns {"rows", "failures", "seconds"}."""
    t0 = time.time()
    rates = [int(r) for r in str(cfg.rates).split(",") if r.strip()]
    for r in rates:
        if cfg.doc_max_length % r:
            raise ValueError(f"config.rates: doc_max_length {cfg.doc_max_length} is not a "
                             f"multiple of compression rate {r}")
    worlds = make_worlds(cfg, workdir)
    write_base_text(worlds["base"], os.path.join(workdir, "data", "base_text.jsonl"))
    base = run_stage(stage_config(cfg, "base", worlds, None, ""), os.path.join(workdir, "base"))
    groups = cpu_groups(len(rates)) if cfg.parallel_rates else [[]]
    if len(groups) > 1:
        train_rates_in_parallel(cfg, rates, workdir, groups)   # the loop below reuses them
    models = {rate: train_rate(cfg, worlds, rate, base, workdir) for rate in rates}
    print("== evaluation on held-out entities", flush=True)
    rows = evaluate_models(cfg, os.path.join(worlds["clara"][0], "eval.jsonl"), models)
    table = format_results(rows)
    failures = check(rows) if cfg.eval.check else []
    seconds = time.time() - t0
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "failures": failures, "seconds": seconds,
                   "config": json.loads(cfg.to_json())}, f, indent=2)
    plot(rows, os.path.join(workdir, "f1_vs_rate.png"))
    print("\n" + table + "\n")
    print(f"demo finished in {seconds / 60:.1f} min; results in {workdir}/results.md, "
          f"results.json, f1_vs_rate.png")
    return {"rows": rows, "failures": failures, "seconds": seconds}


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    if FLAGS.train_rate:   # one rate's stages, in a process of train_rates_in_parallel
        import ml_collections
        if FLAGS.cpus:     # before JAX creates its CPU client, which sizes its thread pool
            os.sched_setaffinity(0, [int(c) for c in FLAGS.cpus.split(",")])
        cfg = ml_collections.ConfigDict(json.load(open(FLAGS.resolved_config)))
        base = json.load(open(os.path.join(FLAGS.workdir, "base", "summary.json")))["model_dir"]
        train_rate(cfg, make_worlds(cfg, FLAGS.workdir), FLAGS.train_rate, base, FLAGS.workdir)
        return
    import jax
    from clara_jax import cpu_malloc
    cpu_malloc.warn_if_unset(jax.default_backend())
    out = run(FLAGS.config, FLAGS.workdir)
    if out["failures"]:
        print("DEMO CHECK FAILED:\n  " + "\n  ".join(out["failures"]))
        sys.exit(1)
    print("demo checks passed: compressed F1 (oracle) above closed book, Recall@1 raised by "
          "stage 3, at every rate")


if __name__ == "__main__":
    app.run(main)
