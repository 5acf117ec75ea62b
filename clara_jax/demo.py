"""`make demo`: CLaRa end to end on CPU, on synthetic worlds (config: configs/demo.py).

    python -m clara_jax.demo --workdir=workdir/demo [--config.rates=4,16,32 ...]
    python -m clara_jax.demo --only=base --config.base.shipped= --workdir=DIR \
        [--export_base=clara_jax/demo_base]        # (re)make the shipped base

1. generate synthetic worlds of invented entities (list names, plain documents), each split
   into train and held-out entities; the held-out questions of the first `eval_worlds` are
   the evaluation set;
2. the base: the one shipped in `clara_jax/demo_base` (when the config asks for the base it
   describes), else a tiny Mistral trained here on reading lessons about worlds of its own;
3. at each compression rate: stage 1 (pretrain, SCP), stage 2 (instruct), stage 3
   (end_to_end), each with `clara_jax.train` from the previous stage's model, the rates in
   concurrent processes;
4. evaluate on the held-out entities: closed book and full text on the base, compressed
   documents in the normal and oracle settings, Recall@1/@5 before and after stage 3;
5. write `results.md`, `results.json` and `f1_vs_rate.png`, print the table and every claim's
   paired margin (`check`), and exit 1 unless the claims of `config.check.gate` hold.

Every step is resumable: rerunning skips finished stages and resumes unfinished ones.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIG_DIR, "demo.py"),
                                "Demo config (configs/demo.py).", lock_config=True)
flags.DEFINE_string("workdir", "workdir/demo", "Where the demo writes everything.")
flags.DEFINE_enum("only", "", ["", "base"], "'base': make the worlds, train the base LM and "
                  "report how well it reads (closed book, full text); nothing else.")
flags.DEFINE_string("export_base", "", "With --only=base: copy the trained base and its "
                    "recipe to this directory (clara_jax/demo_base is the shipped one).")
flags.DEFINE_integer("train_rate", 0, "Internal: train only this rate's stages 1-3 (one "
                     "process of the parallel run), with --resolved_config.")
flags.DEFINE_string("resolved_config", "", "Internal: the demo config as JSON (with "
                    "--train_rate).")
flags.DEFINE_string("cpus", "", "Internal: CPUs to pin the --train_rate process to (0,1,...).")
FLAGS = flags.FLAGS

# Trained at each rate, in this order (the paper's stages 1, 2 and 3); also the names of their
# config files, their data files and their sections of configs/demo.py.
CLARA_STAGES = ("pretrain", "instruct", "end_to_end")
STAGE_FILES = {"base": "pretrain_base_tiny.py", "pretrain": "pretrain.py",
               "instruct": "instruct.py", "end_to_end": "end_to_end.py"}
# The fields of the demo's `base` section that are trainer fields of the base's run.
BASE_TRAINER_FIELDS = ("max_len", "vocab_size", "lm_head_init", "rope_theta", "b2",
                       "warmup_ratio")


# -- data ----------------------------------------------------------------------------------

def write_base_text(world_dirs: list[str], out_path: str, closed_book_every: int = 4) -> str:
    """The base LM's pretraining texts (JSONL {"text", "prompt"}) from the base worlds, which
    share no entity with the worlds CLaRa is trained and evaluated on. One reading lesson per
    document: a chat whose first turn is the text-RAG prompt `evaluate` uses for its full-text
    baseline (the document, then a question) and whose later turns ask the document's other
    questions, each followed by its answer; the loss skips the first prompt (context) and
    covers the answers (the signal that teaches reading) and the later questions. Also
    closed-book answers for one question in `closed_book_every` (loss on the answer only).
    Returns out_path."""
    from clara_jax.clara import prompts
    from clara_jax.data import formats

    records: list[dict] = []
    rng = random.Random(0)
    for world_dir in world_dirs:
        qa, _ = formats.read_jsonl([os.path.join(world_dir, f"instruct_{s}.jsonl")
                                    for s in ("train", "eval")], "instruct")
        by_doc: dict[str, list[tuple[str, str]]] = {}
        for i, r in enumerate(qa):
            gold = r["docs"][r["pos_index"][0]]
            by_doc.setdefault(gold, []).append((r["question"], r["answers"][0]))
            if closed_book_every and i % closed_book_every == 0:
                records.append({"text": prompts.closed_book_string(r["question"],
                                                                   r["answers"][0]),
                                "prompt": prompts.closed_book_string(r["question"])})
        for doc, pairs in by_doc.items():
            rng.shuffle(pairs)
            (q, a), rest = pairs[0], pairs[1:]
            prompt = prompts.full_text_string(q, [doc])
            text = prompts.full_text_string(q, [doc], a) + "".join(
                f"[INST] Question:{q} [/INST] {a}</s>" for q, a in rest)
            records.append({"text": text, "prompt": prompt})
    rng.shuffle(records)
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return out_path


def write_whole_words(out_path: str) -> str:
    """The words the base's tokenizer keeps as single tokens: every name, place, year, kind,
    occupation and industry of list-named worlds (`synthetic.single_token_words`), so that
    answering from a document is copying whole tokens. Returns out_path."""
    from clara_jax.data import synthetic
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(synthetic.single_token_words()) + "\n")
    return out_path


def make_worlds(cfg, workdir: str, roles: Sequence[str] = ("clara", "base")
                ) -> dict[str, list[str]]:
    """Generates the synthetic worlds of `roles` (idempotent): {"base": dirs, "clara": dirs}.
    CLaRa worlds have seeds cfg.seed, cfg.seed + 1, ...; the base's cfg.base.seed, ... (apart,
    so that the base knows none of the facts CLaRa is evaluated on, and the same for every
    cfg.seed). The first `cfg.eval_worlds` CLaRa worlds' eval splits (held-out entities) are
    the evaluation set."""
    from clara_jax.data import synthetic

    out: dict[str, list[str]] = {"base": [], "clara": []}
    for role, count, first_seed in (("clara", cfg.worlds, cfg.seed),
                                    ("base", cfg.base.worlds, cfg.base.seed)):
        if role not in roles:
            continue
        for i in range(count):
            path = os.path.join(workdir, "data", f"{role}_world{i}")
            if not os.path.exists(os.path.join(path, "manifest.json")):
                synthetic.generate_corpus(path, seed=first_seed + i,
                                          num_entities=cfg.num_entities,
                                          num_candidates=cfg.num_candidates, k=cfg.top_k,
                                          places_seed=cfg.places_seed,
                                          questions_per_entity=cfg.questions_per_entity,
                                          multi_hop=cfg.multi_hop,
                                          name_style=cfg.name_style, doc_style=cfg.doc_style)
            out[role].append(path)
    return out


def write_eval_file(cfg, worlds: dict[str, list[str]], workdir: str) -> str:
    """The held-out questions of the first `cfg.eval_worlds` CLaRa worlds in one file."""
    path = os.path.join(workdir, "data", "eval.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for w in worlds["clara"][:cfg.eval_worlds]:
            f.write(open(os.path.join(w, "eval.jsonl"), encoding="utf-8").read())
    return path


# -- training ------------------------------------------------------------------------------

def stage_config(cfg, name: str, worlds: dict[str, list[str]], rate: int | None,
                 init_from: str):
    """The trainer config of one demo stage: the stage's config file plus the demo's values.
    Stages train on the train splits of the CLaRa worlds (all, or the stage's first `worlds`)
    and evaluate their loss on the first world's eval split."""
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
    c.lora_rank = cfg.lora_rank
    train_worlds = worlds["clara"][:s.get("worlds") or len(worlds["clara"])]
    c.data.train_files = ",".join(os.path.join(w, f"{name}_train.jsonl") for w in train_worlds)
    c.data.eval_files = os.path.join(worlds["clara"][0], f"{name}_eval.jsonl")
    if name == "end_to_end":
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
    if "model_dir" not in summary:   # stopped before total_steps (SIGTERM): resumable
        raise RuntimeError(f"{workdir}: {c.stage} stopped at step {summary['steps']} of "
                           f"{c.total_steps}; rerun to resume it")
    last = summary.get("last", {})
    print(f"   {time.time() - t0:.0f} s; loss {last.get('loss', float('nan')):.3f}, "
          f"eval loss {last.get('eval_loss', float('nan')):.3f}", flush=True)
    return summary["model_dir"]


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

def base_as_clara(cfg, base_dir: str):
    """The pretrained base alone as a `Clara` with no adapters (for the baselines): its
    tokenizer with one memory token, the added tokens' rows appended."""
    import numpy as np
    from clara_jax.clara.config import ClaraConfig
    from clara_jax.clara.model import Clara
    from clara_jax.clara.tokenizer import ClaraTokenizer
    from clara_jax.convert.hf_mistral import load_checkpoint
    from clara_jax.train.train import resize_vocab

    model_cfg, params = load_checkpoint(base_dir)
    tok_path = os.path.join(base_dir, "tokenizer.model")
    tok = ClaraTokenizer.from_file(tok_path, n_mem=1)
    params = resize_vocab(params, tok.vocab_size, np.random.default_rng(0))
    config = ClaraConfig(doc_max_length=cfg.doc_max_length, compress_rate=cfg.doc_max_length,
                         generation_top_k=cfg.top_k, first_mem_token_id=tok.mem_token_ids[0])
    return Clara(model_cfg.replace(vocab_size=tok.vocab_size), config, params, {}, tok,
                 tokenizer_path=tok_path)


def read_eval_records(cfg, eval_file: str) -> list[dict]:
    from clara_jax.data import formats
    records, _ = formats.read_jsonl(eval_file, "eval", num_candidates=cfg.num_candidates)
    return records[:cfg.eval.limit] if cfg.eval.limit else records


def evaluate_base(cfg, eval_file: str, base_dir: str) -> tuple[list[dict], dict]:
    """Closed book and full text (oracle) on the base alone, before any CLaRa stage: how well
    it reads. Returns (rows, per-question scores) as `evaluate_models`."""
    from clara_jax.eval.evaluate import evaluate

    records = read_eval_records(cfg, eval_file)
    kw = dict(top_k=cfg.top_k, batch_size=cfg.eval.batch_size,
              max_new_tokens=cfg.eval.max_new_tokens, adapter=None)
    table = Table()
    base = base_as_clara(cfg, base_dir)
    table.add("closed book", "-", "-", evaluate(base, records, mode="closed_book", **kw))
    table.add("full text", 1, "oracle", evaluate(base, records, mode="full_text",
                                                 setting="oracle", **kw))
    return table.rows, table.per_question


class Table:
    """Rows of the demo table and the per-question scores the check pairs: {"<system>/<rate>/
    <setting>/<stage>/<em|hit1>": [0/1 per question]} ("hit1": the query reasoner's first
    document is a gold one)."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []
        self.per_question: dict[str, list[float]] = {}

    def add(self, system: str, rate, setting: str, result, stage: str = "") -> None:
        summary, preds = result
        row = {"system": system, "rate": rate, "setting": setting, "stage": stage,
               **{k: summary.get(k) for k in ("em", "f1", "acc", "em_max", "f1_max",
                                                "recall@1", "recall@5", "n")}}
        self.rows.append(row)
        key = f"{system}/{rate}/{setting}/{stage}"
        self.per_question[f"{key}/em"] = [float(p["em"]) for p in preds]
        if row.get("recall@1") is not None:
            self.per_question[f"{key}/hit1"] = [
                float(bool(p["topk"]) and p["topk"][0] in p["pos_index"]) for p in preds]
        print(f"   {system:<12} rate={rate!s:<4} {setting:<7} {stage:<14} "
              f"EM {row['em']:.3f}  F1 {row['f1']:.3f}" +
              (f"  R@1 {row['recall@1']:.3f}" if row.get("recall@1") is not None else ""),
              flush=True)


def evaluate_models(cfg, eval_file: str, models: dict[int, dict[str, str]]
                    ) -> tuple[list[dict], dict]:
    """The CLaRa rows of the demo table at every rate: compressed documents in the normal
    setting (the query reasoner picks top_k of the candidates) before and after stage 3, in
    the oracle setting (the gold document given) after it, and full text in the normal
    setting with the documents the lowest rate's trained query reasoner picks. Returns (rows,
    per-question scores) as `Table`."""
    from clara_jax.clara.model import Clara
    from clara_jax.eval.evaluate import evaluate

    records = read_eval_records(cfg, eval_file)
    kw = dict(top_k=cfg.top_k, batch_size=cfg.eval.batch_size,
              max_new_tokens=cfg.eval.max_new_tokens)
    table = Table()
    rates = sorted(models)
    for rate in rates:
        before = Clara.load(models[rate]["instruct"])
        table.add("compressed", rate, "normal", evaluate(before, records, mode="compressed",
                                                         setting="normal", **kw),
                  "before stage 3")
        after = Clara.load(models[rate]["end_to_end"])
        for setting in ("oracle", "normal"):
            table.add("compressed", rate, setting, evaluate(after, records, mode="compressed",
                                                            setting=setting, **kw),
                      "after stage 3")
        if rate == rates[0]:
            table.add("full text", 1, "normal", evaluate(after, records, mode="full_text",
                                                         setting="normal", adapter=None, **kw))
    return table.rows, table.per_question


def format_results(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| system | compression | setting | stage | EM | F1 | Recall@1 | Recall@5 | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["rate"] if r["rate"] in ("-",) else f"{r['rate']}x"
        lines.append(f"| {r['system']} | {rate} | {r['setting']} | {r['stage'] or '-'} | "
                     f"{f(r['em'])} | {f(r['f1'])} | {f(r.get('recall@1'))} | "
                     f"{f(r.get('recall@5'))} | {r.get('n')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Left: F1 and EM against compression rate (compressed documents after stage 3, oracle
    and normal), full text and closed book as horizontal lines. Right: Recall@1 of the query
    reasoner before and after stage 3."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    comp = lambda setting, stage: sorted(
        (r["rate"], r) for r in rows if r["system"] == "compressed"
        and r["setting"] == setting and r["stage"] == stage)
    for setting, color in (("oracle", "C0"), ("normal", "C1")):
        pts = comp(setting, "after stage 3")
        for metric, style in (("f1", "-o"), ("em", "--s")):
            ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], style, color=color,
                    label=f"compressed ({setting}) {metric.upper()}")
    for r in rows:
        if r["system"] in ("closed book", "full text"):
            color = {"closed book": "gray", "oracle": "green", "normal": "olive"}[
                "closed book" if r["system"] == "closed book" else r["setting"]]
            label = r["system"] + ("" if r["system"] == "closed book" else f" ({r['setting']})")
            ax.axhline(r["f1"], color=color, ls=":", label=f"{label} F1")
    for stage, style in (("before stage 3", "--s"), ("after stage 3", "-o")):
        pts = comp("normal", stage)
        ax_r.plot([p[0] for p in pts], [p[1]["recall@1"] for p in pts], style, label=stage)
    for axis, ylabel, title in ((ax, "F1 / EM (held-out entities)", "answers vs compression rate"),
                                (ax_r, "Recall@1 of the query reasoner",
                                 "retrieval, trained by the generator's loss")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("compression rate")
        axis.set_ylabel(ylabel)
        axis.set_ylim(0, 1.02)
        axis.legend(fontsize=6)
        axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the check -----------------------------------------------------------------------------

def paired_margin(a: Sequence[float], b: Sequence[float] = (), offset: float = 0.0,
                  scale_b: float = 1.0) -> tuple[float, float, float]:
    """The claim mean(a) - scale_b * mean(b) >= offset on paired per-question scores (b empty:
    a alone): returns (excess over offset, standard error of the mean paired difference,
    excess in standard errors). An error of zero (every question alike) counts as 1/n."""
    import numpy as np
    d = np.asarray(a, np.float64)
    if len(b):
        d = d - scale_b * np.asarray(b, np.float64)
    n = len(d)
    se = max(float(d.std(ddof=1)) / np.sqrt(n) if n > 1 else 1.0, 1.0 / n)
    excess = float(d.mean()) - offset
    return excess, se, excess / se


CLAIM_GROUPS = ("base", "compression", "retrieval")


def check(cfg, per_question: dict[str, list[float]]) -> tuple[list[str], list[str]]:
    """The demo's claims, each on paired per-question scores with a margin of at least
    cfg.check.min_sigmas standard errors (`paired_margin`), in three groups (CLAIM_GROUPS).
    Claims of the groups in cfg.check.gate decide the exit status ("ok" / "FAIL"); the others
    are measured and reported as targets ("met" / "MISS"). Returns (report lines, failures).

    - the base reads: full text (oracle) EM >= min_full_text_em, closed book <= max_closed_book_em;
    - compressed (oracle, after stage 3) EM at the lowest rate within max_gap_to_full_text of
      full text, and >= min_em_at_16x at every rate of 16 or more;
    - EM falls (weakly) as the rate rises: no rate is significantly above a lower one;
    - stage 3 raises Recall@1 by >= min_recall_gain at every rate;
    - after stage 3, normal-setting EM >= min_normal_over_oracle x oracle EM at every rate."""
    k, pq = cfg.check, per_question
    rates = sorted({int(key.split("/")[1]) for key in pq if key.startswith("compressed/")})
    comp = lambda r, setting, stage="after stage 3", m="em": pq[
        f"compressed/{r}/{setting}/{stage}/{m}"]
    full = pq["full text/1/oracle//em"]
    closed = [-x for x in pq["closed book/-/-//em"]]
    gate = {g.strip() for g in str(k.gate).split(",") if g.strip()}
    unknown = gate - set(CLAIM_GROUPS)
    if unknown:
        raise ValueError(f"config.check.gate: unknown claim groups {sorted(unknown)}; known: "
                         f"{CLAIM_GROUPS}")
    # (group, name, target, a, b, offset, scale of b); offset None: a - b not significantly
    # below 0 (a higher rate's EM not significantly above a lower rate's).
    claims = [
        ("base", "full text (oracle) EM", f">= {k.min_full_text_em}", full, [],
         k.min_full_text_em, 1),
        ("base", "closed book EM", f"<= {k.max_closed_book_em}", closed, [],
         -k.max_closed_book_em, 1),
        ("compression", f"compressed {rates[0]}x (oracle) EM - full text EM",
         f">= -{k.max_gap_to_full_text}", comp(rates[0], "oracle"), full,
         -k.max_gap_to_full_text, 1)]
    claims += [("compression", f"compressed {r}x (oracle) EM", f">= {k.min_em_at_16x}",
                comp(r, "oracle"), [], k.min_em_at_16x, 1) for r in rates if r >= 16]
    claims += [("compression", f"compressed {lo}x - {hi}x (oracle) EM", "not significantly < 0",
                comp(lo, "oracle"), comp(hi, "oracle"), None, 1)
               for lo, hi in zip(rates, rates[1:])]
    for r in rates:
        claims.append(("retrieval", f"{r}x Recall@1 gain from stage 3", f">= {k.min_recall_gain}",
                       comp(r, "normal", m="hit1"), comp(r, "normal", "before stage 3", "hit1"),
                       k.min_recall_gain, 1))
        claims.append(("retrieval", f"{r}x normal EM - {k.min_normal_over_oracle} x oracle EM",
                       ">= 0", comp(r, "normal"), comp(r, "oracle"), 0.0,
                       k.min_normal_over_oracle))
    report, failures = [], []
    for group, name, target, a, b, offset, scale in claims:
        excess, se, sigmas = paired_margin(a, b, offset or 0.0, scale)
        ok = sigmas > -k.min_sigmas if offset is None else sigmas >= k.min_sigmas
        status = ("ok  " if ok else "FAIL") if group in gate else ("met " if ok else "MISS")
        line = (f"{status} [{group}] {name} {target}: margin {excess:+.3f} (SE {se:.3f}, "
                f"{sigmas:+.1f} SE; needs {'> -' if offset is None else '>= '}{k.min_sigmas})")
        report.append(line)
        if not ok and group in gate:
            failures.append(line)
    return report, failures


# -- the run -------------------------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SHIPPED_BASE = os.path.join(_PACKAGE_DIR, "demo_base")
# The demo config fields a base depends on (with every field of cfg.base but `shipped`).
BASE_FIELDS = ("model", "name_style", "doc_style", "num_entities", "num_candidates",
               "questions_per_entity", "places_seed", "top_k", "multi_hop", "doc_max_length",
               "scan_layers")


def base_recipe(cfg) -> dict:
    """Everything that determines the demo's base, as {dotted config field: value}: the
    BASE_FIELDS and every field of cfg.base but `shipped`."""
    recipe = {k: cfg[k] for k in BASE_FIELDS}
    recipe.update({f"base.{k}": v for k, v in cfg.base.items() if k != "shipped"})
    return json.loads(json.dumps(recipe))


def shipped_base(cfg) -> str | None:
    """The model directory of the shipped base when cfg.base.shipped names one (relative to
    the package, e.g. "demo_base", or absolute), None when it is empty (train the base).
    Raises ValueError, naming the first differing field, when the config asks for another
    base than the one shipped, so that an override never silently uses a base it does not
    describe."""
    if not cfg.base.shipped:
        return None
    path = os.path.join(_PACKAGE_DIR, cfg.base.shipped)   # an absolute path stays as it is
    info_path = os.path.join(path, "base_info.json")
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"config.base.shipped: {path} has no base_info.json (make one "
                                f"with --only=base --export_base=DIR, or pass "
                                f"--config.base.shipped= to train the base)")
    shipped, wanted = json.load(open(info_path))["recipe"], base_recipe(cfg)
    diff = sorted(k for k in set(wanted) | set(shipped) if wanted.get(k) != shipped.get(k))
    if diff:
        raise ValueError(f"config.{diff[0]}: {wanted.get(diff[0])!r} differs from the "
                         f"shipped base's {shipped.get(diff[0])!r} ({path}); pass "
                         f"--config.base.shipped= to train a base for this config")
    return os.path.join(path, "model")


def export_base(cfg, base_dir: str, out_dir: str, seconds: float, rows: list[dict]) -> None:
    """Copies a trained base (`base_dir`, a model directory) to out_dir/model with
    base_info.json: its recipe (`base_recipe`), training time, machine and probe rows."""
    import platform
    import shutil
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    shutil.copytree(base_dir, os.path.join(out_dir, "model"))
    flags_ = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "AVX-512" if " avx512f" in flags_ else "AVX2" if " avx2" in flags_ else "other"
    info = {"recipe": base_recipe(cfg), "train_seconds": round(seconds),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {isa}",
            "probe": [{k: r[k] for k in ("system", "setting", "em", "f1", "n")} for r in rows]}
    with open(os.path.join(out_dir, "base_info.json"), "w") as f:
        json.dump(info, f, indent=2)


def prepare(cfg, workdir: str) -> tuple[dict[str, list[str]], str, str]:
    """Worlds and the base: the shipped one (`shipped_base`), else one trained here on the
    base worlds (reused when already there); returns (worlds, eval file, base model dir)."""
    rates = parse_rates(cfg)
    for r in rates:
        if cfg.doc_max_length % r:
            raise ValueError(f"config.rates: doc_max_length {cfg.doc_max_length} is not a "
                             f"multiple of compression rate {r}")
    base = shipped_base(cfg)
    worlds = make_worlds(cfg, workdir, ("clara",) if base else ("clara", "base"))
    eval_file = write_eval_file(cfg, worlds, workdir)
    if base:
        print(f"== base: the shipped one ({base})", flush=True)
        return worlds, eval_file, base
    data_dir = os.path.join(workdir, "data")
    write_base_text(worlds["base"], os.path.join(data_dir, "base_text.jsonl"),
                    cfg.base.closed_book_every)
    write_whole_words(os.path.join(data_dir, "whole_words.txt"))
    base = run_stage(stage_config(cfg, "base", worlds, None, ""), os.path.join(workdir, "base"))
    return worlds, eval_file, base


def parse_rates(cfg) -> list[int]:
    return [int(r) for r in str(cfg.rates).split(",") if r.strip()]


def run(cfg, workdir: str, only_base: bool = False, export_base_to: str = "") -> dict:
    """Runs (or resumes) the whole demo, or with only_base the base and its probe (then
    exported to export_base_to when given); returns {"rows", "report", "failures",
    "seconds"}."""
    t0 = time.time()
    rates = parse_rates(cfg)
    worlds, eval_file, base = prepare(cfg, workdir)
    base_seconds = time.time() - t0
    print("== the base on held-out entities", flush=True)
    rows, per_question = evaluate_base(cfg, eval_file, base)
    if only_base:
        if export_base_to:
            export_base(cfg, base, export_base_to, base_seconds, rows)
            print(f"base exported to {export_base_to}")
        return {"rows": rows, "report": [], "failures": [], "seconds": time.time() - t0}
    groups = cpu_groups(len(rates)) if cfg.parallel_rates else [[]]
    if len(groups) > 1:
        train_rates_in_parallel(cfg, rates, workdir, groups)   # the loop below reuses them
    models = {rate: train_rate(cfg, worlds, rate, base, workdir) for rate in rates}
    print("== CLaRa on held-out entities", flush=True)
    clara_rows, clara_pq = evaluate_models(cfg, eval_file, models)
    rows += clara_rows
    per_question.update(clara_pq)
    report, failures = check(cfg, per_question) if cfg.eval.check else ([], [])
    seconds = time.time() - t0
    table = format_results(rows)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(f"- {line}" for line in report) + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "check": report, "failures": failures, "seconds": seconds,
                   "per_question": per_question, "config": json.loads(cfg.to_json())},
                  f, indent=2)
    plot(rows, os.path.join(workdir, "f1_vs_rate.png"))
    print("\n" + table + "\n\n" + "\n".join(report) + "\n")
    print(f"demo finished in {seconds / 60:.1f} min; results in {workdir}/results.md, "
          f"results.json, f1_vs_rate.png")
    return {"rows": rows, "report": report, "failures": failures, "seconds": seconds}


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    if FLAGS.train_rate:   # one rate's stages, in a process of train_rates_in_parallel
        import ml_collections
        if FLAGS.cpus:     # before JAX creates its CPU client, which sizes its thread pool
            os.sched_setaffinity(0, [int(c) for c in FLAGS.cpus.split(",")])
        cfg = ml_collections.ConfigDict(json.load(open(FLAGS.resolved_config)))
        base = shipped_base(cfg) or json.load(open(os.path.join(
            FLAGS.workdir, "base", "summary.json")))["model_dir"]
        train_rate(cfg, make_worlds(cfg, FLAGS.workdir, ("clara",)), FLAGS.train_rate, base,
                   FLAGS.workdir)
        return
    import jax
    from clara_jax import cpu_malloc
    cpu_malloc.warn_if_unset(jax.default_backend())
    if FLAGS.export_base and FLAGS.only != "base":
        raise app.UsageError("--export_base needs --only=base")
    out = run(FLAGS.config, FLAGS.workdir, only_base=FLAGS.only == "base",
              export_base_to=FLAGS.export_base)
    if out["failures"]:
        print(f"DEMO CHECK FAILED ({len(out['failures'])} of {len(out['report'])} claims):\n  "
              + "\n  ".join(out["failures"]))
        sys.exit(1)
    if out["report"]:
        missed = [line for line in out["report"] if line.startswith("MISS")]
        print(f"demo check passed: the claims of {FLAGS.config.check.gate} hold, each by at "
              f"least {FLAGS.config.check.min_sigmas} standard errors" +
              (f"; {len(missed)} target(s) of other groups not met (MISS above)"
               if missed else ""))


if __name__ == "__main__":
    app.run(main)
