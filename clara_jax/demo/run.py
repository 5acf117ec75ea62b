"""The whole demo: worlds and base, the stages at every rate, evaluation, check and results."""

from __future__ import annotations

import json
import os
import time

from clara_jax.demo.base import export_base, shipped_base
from clara_jax.demo.check import check
from clara_jax.demo.report import (evaluate_base, evaluate_models, format_results,
                                   kind_table, plot, read_eval_records)
from clara_jax.demo.stages import (cpu_groups, run_stage, stage_config, train_rate,
                                   train_rates_in_parallel)
from clara_jax.demo.worlds import (make_worlds, write_base_text, write_eval_file,
                                   write_whole_words)


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
    """config.rates ("4,16") as a list of ints."""
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
    records = read_eval_records(cfg, eval_file)
    if only_base:
        kinds_md, by_kind = kind_table(records, per_question)
        print(kinds_md, flush=True)
        if export_base_to:
            export_base(cfg, base, export_base_to, base_seconds, rows, by_kind)
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
    kinds_md, by_kind = kind_table(records, per_question)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(f"- {line}" for line in report) + "\n\n" +
                kinds_md + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "check": report, "failures": failures, "seconds": seconds,
                   "by_kind": by_kind, "per_question": per_question,
                   "config": json.loads(cfg.to_json())}, f, indent=2)
    plot(rows, os.path.join(workdir, "f1_vs_rate.png"))
    print("\n" + table + "\n\n" + "\n".join(report) + "\n\n" + kinds_md + "\n")
    print(f"demo finished in {seconds / 60:.1f} min; results in {workdir}/results.md, "
          f"results.json, f1_vs_rate.png")
    return {"rows": rows, "report": report, "failures": failures, "seconds": seconds}
