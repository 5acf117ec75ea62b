"""Compression-rate sweep: one training run per compress_rate, then a table of the results.

    python -m clara_jax.train.sweep --config=configs/sweeps/compression_rate.py:rates=4,16 \
        --workdir=DIR [--config.total_steps=...]
    python -m clara_jax.train.sweep_table --workdir=DIR

Run r lives in `{DIR}/rate_{r}` (an ordinary training work directory: resumed when
interrupted, skipped when its summary says it finished). `sweep_table` reads every
`rate_*/summary.json` and `config.json` and writes `{DIR}/sweep_table.md` and `.json`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from clara_jax.train.setup import validate_config
from clara_jax.train.train import train

RATES_FIELD = "sweep_compress_rates"
# Table columns after the rate and the memory-token count, in this order, when any run has
# them; then any other recall@k / eval_recall@k.
METRICS = ("loss", "ce_loss", "mse_loss", "recall@1", "eval_loss", "eval_ce_loss",
           "eval_mse_loss", "eval_recall@1", "tokens_per_s")
RECALL = ("recall@", "eval_recall@")


def sweep_configs(c: ml_collections.ConfigDict) -> list[tuple[int, ml_collections.ConfigDict]]:
    """(rate, run config) for every rate of `c.sweep_compress_rates`; ValueError naming the
    field when a rate is not positive, repeated, or does not divide doc_max_length."""
    rates = [int(r) for r in c.get(RATES_FIELD) or ()]
    if not rates:
        raise ValueError(f"config.{RATES_FIELD}: no compression rates to sweep")
    if len(set(rates)) != len(rates) or min(rates) <= 0:
        raise ValueError(f"config.{RATES_FIELD}: rates must be positive and distinct, got "
                         f"{rates}")
    bad = [r for r in rates if c.doc_max_length % r]
    if bad:
        lcm = math.lcm(*rates)
        raise ValueError(f"config.doc_max_length: {c.doc_max_length} is not a multiple of the "
                         f"compression rates {bad} (use a multiple of {lcm})")
    out = []
    for r in rates:
        run = ml_collections.ConfigDict(c.to_dict())
        del run[RATES_FIELD]
        run.compress_rate = r
        out.append((r, run))
    return out


def run_sweep(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every rate (validated up front, before anything compiles) into
    `{workdir}/rate_{r}`, then writes and returns the table (`tabulate`)."""
    runs = sweep_configs(c)
    for _, run in runs:
        validate_config(run)
    os.makedirs(workdir, exist_ok=True)
    for r, run in runs:
        run_dir = os.path.join(workdir, f"rate_{r}")
        summary = _read_json(os.path.join(run_dir, "summary.json"))
        if summary and summary.get("steps", 0) >= run.total_steps:
            print(f"rate {r}: finished earlier ({run_dir}), skipped")
            continue
        print(f"rate {r}: training {run.stage} with {run.doc_max_length // r} memory tokens "
              f"-> {run_dir}")
        train(run, run_dir)
    return write_table(workdir)


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tabulate(workdir: str) -> list[dict]:
    """One row per `{workdir}/rate_*` run, by rate: compress_rate, n_mem, stage, steps
    (finished / total) and the final metrics of `METRICS` (and recall@k) the run reported."""
    rows = []
    for run_dir in glob.glob(os.path.join(workdir, "rate_*")):
        m = re.fullmatch(r"rate_(\d+)", os.path.basename(run_dir))
        config = _read_json(os.path.join(run_dir, "config.json"))
        if m is None or config is None:
            continue
        summary = _read_json(os.path.join(run_dir, "summary.json")) or {}
        last = summary.get("last", {})
        row = {"compress_rate": int(config["compress_rate"]),
               "n_mem": int(config["doc_max_length"]) // int(config["compress_rate"]),
               "stage": config["stage"], "steps": int(summary.get("steps", 0)),
               "total_steps": int(config["total_steps"])}
        row.update({k: v for k, v in last.items() if k in METRICS or k.startswith(RECALL)})
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"{workdir}: no rate_*/config.json (not a sweep directory)")
    return sorted(rows, key=lambda r: r["compress_rate"])


def markdown(rows: list[dict]) -> str:
    """A Markdown table of `tabulate` rows (metric columns that no run has are left out)."""
    metrics = [k for k in METRICS if any(k in r for r in rows)]
    metrics += sorted({k for r in rows for k in r if k.startswith(RECALL)} - set(metrics))
    head = ["compress_rate", "memory tokens", "stage", "steps", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["compress_rate"]), str(r["n_mem"]), r["stage"],
                 f"{r['steps']}/{r['total_steps']}"]
        cells += [_fmt(r[k]) if k in r else "" for k in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"


def write_table(workdir: str) -> dict:
    """Writes `{workdir}/sweep_table.md` and `sweep_table.json`; returns
    {"rows": [...], "markdown": str}."""
    rows = tabulate(workdir)
    text = markdown(rows)
    with open(os.path.join(workdir, "sweep_table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "sweep_table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return {"rows": rows, "markdown": text}


def _cli() -> None:
    config_flags.DEFINE_config_file("config", None, "Sweep config "
                                    "(configs/sweeps/compression_rate.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Sweep directory: one rate_{r} run directory per rate.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        print(run_sweep(flags.FLAGS.config, flags.FLAGS.workdir)["markdown"])

    app.run(main)


if __name__ == "__main__":
    _cli()
