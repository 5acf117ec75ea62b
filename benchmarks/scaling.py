"""How step time and memory grow with the run's shape: a table and a plot to plan a run.

    python benchmarks/scaling.py [--quick] [--parts cpu,aot] [--reps 3] [--no_cache]
        [--factors k,candidates,doc_max_length,compress_rate] [--pretrain_factors ...]
        [--aot_models tiny,mid] [--topology v5e:2x2] [--fsdp 1,2,4] [--aot_from scaling.json]
        [--out_dir benchmarks/results/scaling]

CPU part: the trainer's own step and state (`clara_jax.train.setup.build_run`,
AdamW, LoRA dropout on, jitted with the state donated as `train` does) on one CPU device,
varying one factor at a time from a base point: documents kept per query (top-k k),
candidates per query (N), document length (doc_max_length) and compression rate. Stage 3
runs uncached (the step compresses the B x N candidates itself, as officially) and with the
candidate cache (`end_to_end.cache_candidates`: states gathered from a [B x N, n, D] table,
the worst case of no candidate shared between questions); stage 1 (SCP, one document per
example) varies document length and rate. Batches are random ids in the pipeline's layout
(`train_step.stage_batches`). Time: median of `--reps` steps after one warm-up step. Memory:
XLA's compiled memory analysis of the step, `peak = arguments + outputs - donated (aliased)
+ temporaries` (`clara_jax.aot.memory_breakdown` without the generated code; not the
process RSS).

AOT part: `clara_jax.aot.compile_report` of the stage-3 step (uncached, the official
lengths) for a v5e topology at several fsdp widths (the rest of the chips in `data`):
per-device memory against the chip's 16 GiB. `--aot_models mistral_1b,mistral_3b` adds
Mistral-shaped configs between `mid` and 7B (TinyLlama-1.1B- and Llama-3.2-3B-like widths,
32k vocabulary, bf16 + full remat as the 7B preset; not released checkpoints); the 1B
compile had not finished after 9 minutes on this loaded 2-core CPU, so the default leaves
them out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from train_step import stage_batches  # noqa: E402

MiB = 1024 ** 2
GiB = 1024 ** 3

# The CPU base point (tiny preset: hidden 128, 4 layers) and the values each factor takes.
BASE = dict(model="tiny", batch=4, candidates=20, k=5, doc_max_length=128, compress_rate=16,
            prompt_len=256, answer_len=16)
FACTORS = {"k": (1, 2, 5, 10), "candidates": (5, 10, 20, 40),
           "doc_max_length": (64, 128, 256, 512), "compress_rate": (4, 16, 32, 128)}
PRETRAIN_FACTORS = ("doc_max_length", "compress_rate")
QUICK_FACTORS = {name: (values[0], values[-1]) for name, values in FACTORS.items()}

# AOT: Mistral-shaped models between `mid` and 7B (bf16 + full remat, as the 7B preset).
EXTRA_MODELS = {
    "mistral_1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                       num_kv_heads=4, head_dim=64, intermediate_size=5632),
    "mistral_3b": dict(vocab_size=32000, hidden_size=3072, num_layers=28, num_heads=24,
                       num_kv_heads=8, head_dim=128, intermediate_size=8192),
}
AOT_MODELS = ("tiny", "mid")
AOT_TOPOLOGY = "v5e:2x2"
AOT_FSDP = (1, 2, 4)


# -- CPU ----------------------------------------------------------------------------------

def run_config(point: dict, stage: str, cached: bool = False):
    """The trainer's ConfigDict for a sweep point (`BASE`'s keys) and stage ("pretrain" |
    "end_to_end") on one device; validated (ValueError naming the field)."""
    from configs.common import base_config
    from clara_jax.train import setup as setup_lib
    c = base_config(stage, point["model"])
    c.doc_max_length = point["doc_max_length"]
    c.compress_rate = point["compress_rate"]
    c.batch_size = point["batch"]
    c.max_len = point["prompt_len"]
    c.generation_top_k = 1 if stage == "pretrain" else point["k"]
    c.num_candidates = point["candidates"]
    c.pretrain_k = 1
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.end_to_end.cache_candidates = cached
    setup_lib.validate_config(c, n_devices=1)
    k, n_mem = c.generation_top_k, c.doc_max_length // c.compress_rate
    slots_end = 40 + k * (n_mem + 1)   # where stage3_batch puts the memory slots
    if slots_end > point["prompt_len"] - point["answer_len"]:
        raise ValueError(f"prompt_len {point['prompt_len']}: k={k} x ({n_mem} memory tokens + "
                         f"<SEP>) after 40 prompt tokens plus a {point['answer_len']}-token "
                         "answer do not fit")
    return c


def compiled_memory(compiled) -> dict:
    """`clara_jax.aot.memory_breakdown` of a compiled step, with `peak` = its total without
    the generated code: arguments + outputs - aliased (donated) + temporaries."""
    from clara_jax import aot
    out = aot.memory_breakdown(compiled)
    out["peak_bytes"] = out["total_bytes"] - out["generated_code_bytes"]
    return out


def measure_step(point: dict, stage: str, cached: bool = False, reps: int = 3) -> dict:
    """Seconds per step (median of reps after one warm-up step), compile seconds and XLA's
    memory analysis of the trainer's step at a sweep point, on the first CPU device."""
    import jax
    import jax.numpy as jnp
    from clara_jax import parallel
    from clara_jax.model.config import preset
    from clara_jax.model.mistral import init_params
    from clara_jax.train import setup as setup_lib

    c = run_config(point, stage, cached)
    base = preset(c.model)
    # The run's vocabulary (special tokens appended) from the start: no resize_vocab.
    model_cfg, cfg = setup_lib.model_configs(c, base, base.vocab_size)
    mesh = parallel.mesh_from_config(c.mesh, jax.devices()[:1])
    built = setup_lib.build_run(c, mesh, model_cfg, base.vocab_size,
                                init_params(model_cfg, jax.random.key(0)))
    setup, state = built.setup, built.state
    batch = {key: jnp.asarray(v, jnp.int32)
             for key, v in stage_batches(point, cfg.first_mem_token_id)[stage].items()}
    if cached:
        b, n = point["batch"], point["candidates"]
        del batch["doc_ids"], batch["doc_mask"]
        batch["doc_index"] = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
        batch["doc_table"] = 0.02 * jax.random.normal(
            jax.random.key(3), (b * n, cfg.n_mem, model_cfg.hidden_size), model_cfg.dtype)
    with parallel.axis_rules(mesh):
        t0 = time.perf_counter()
        compiled = jax.jit(setup.train_step, donate_argnums=(0,)).lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        holder = [state]

        def run():
            holder[0], metrics = compiled(holder[0], batch)
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at {point} {stage}")

        secs = common.time_fn(run, warmup=1, reps=reps)
    return {"s/step": common.median(secs), "secs": secs, "compile_s": compile_s,
            **compiled_memory(compiled)}


def sweep_points(base: dict, factors: dict) -> list[tuple[str, object, dict]]:
    """(factor, value, point) for each value of each factor, the others at the base point."""
    return [(name, v, {**base, name: v}) for name, values in factors.items() for v in values]


def cpu_sweep(base: dict = BASE, factors: dict = FACTORS, reps: int = 3,
              pretrain_factors=PRETRAIN_FACTORS, cached: bool = True) -> list[dict]:
    """One row per (factor, value, stage, candidates mode): the point, s/step and memory.
    Points repeated across factors (the base point) are measured once."""
    from tqdm import tqdm
    jobs = []
    for name, v, point in sweep_points(base, factors):
        modes = [("end_to_end", False)] + ([("end_to_end", True)] if cached else [])
        if name in pretrain_factors:
            modes.append(("pretrain", False))
        jobs += [(name, v, point, stage, c) for stage, c in modes]
    done: dict = {}
    rows = []
    bar = tqdm(jobs, desc="cpu sweep", unit="step")
    for name, v, point, stage, c in bar:
        key = (tuple(sorted(point.items())), stage, c)
        if key not in done:
            done[key] = measure_step(point, stage, c, reps)
        m = done[key]
        bar.set_postfix_str(f"{name}={v} {stage}{' cached' if c else ''}: "
                            f"{m['s/step']:.3f} s, {m['peak_bytes'] / MiB:.0f} MiB")
        rows.append({"factor": name, "value": v, "stage": stage,
                     "candidates": ("cached" if c else "compressed in step")
                     if stage == "end_to_end" else "-",
                     "point": point, **m})
    return rows


def cpu_table(rows: list[dict]) -> str:
    """Markdown: one line per row, with time and peak memory relative to the factor's
    first value in the same stage/mode."""
    first: dict = {}
    out = []
    for r in rows:
        ref = first.setdefault((r["factor"], r["stage"], r["candidates"]), r)
        out.append({"factor": r["factor"], "value": r["value"], "stage": r["stage"],
                    "candidates": r["candidates"], "s/step": r["s/step"],
                    "x time": f"{r['s/step'] / ref['s/step']:.2f}",
                    "peak MiB": r["peak_bytes"] / MiB,
                    "x peak": f"{r['peak_bytes'] / ref['peak_bytes']:.2f}",
                    "temp MiB": r["temp_bytes"] / MiB, "args MiB": r["argument_bytes"] / MiB,
                    "compile s": r["compile_s"]})
    return common.print_table(out, ["factor", "value", "stage", "candidates", "s/step",
                                    "x time", "peak MiB", "x peak", "temp MiB", "args MiB",
                                    "compile s"])


# -- AOT ----------------------------------------------------------------------------------

@contextlib.contextmanager
def extra_presets(models: dict):
    """`clara_jax.model.config.PRESETS` plus `models` (name -> MistralConfig fields over the
    7B preset's execution settings) inside the block, so that `clara_jax.aot` builds them."""
    from clara_jax.model import config as config_lib
    added = {name: config_lib.PRESETS["mistral_7b"].replace(**fields)
             for name, fields in models.items() if name not in config_lib.PRESETS}
    config_lib.PRESETS.update(added)
    try:
        yield
    finally:
        for name in added:
            del config_lib.PRESETS[name]


def aot_sweep(models=AOT_MODELS, topology: str = AOT_TOPOLOGY, fsdp_widths=AOT_FSDP,
              batch_size: int = 16) -> list[dict]:
    """Per-device memory of the stage-3 step (uncached, the official lengths: documents of
    256 tokens at rate 32, 20 candidates, k = 5, prompts of 2048 unless the preset is
    `tiny`) compiled for `topology` with each fsdp width (data = chips / fsdp)."""
    from configs.common import base_config
    from clara_jax import aot
    from tqdm import tqdm
    rows = []
    with extra_presets(EXTRA_MODELS):
        jobs = [(m, w) for m in models for w in fsdp_widths]
        for model, width in tqdm(jobs, desc="aot sweep", unit="compile"):
            c = base_config("end_to_end", model)
            c.batch_size = batch_size
            c.mesh.data, c.mesh.fsdp = -1, width
            c.end_to_end.cache_candidates = False
            report, _ = aot.compile_report(c, topology, correct_scan_cost=False)
            m = report["memory"]
            rows.append({"model": model, "params": report["num_params"], "topology": topology,
                         "mesh": report["mesh"], "fsdp": width, "batch": batch_size,
                         "doc_max_length": int(c.doc_max_length), "max_len": int(c.max_len),
                         "dtype": report["param_dtype"], "remat": report["remat_policy"],
                         "argument_bytes": m["argument_bytes"], "temp_bytes": m["temp_bytes"],
                         "total_bytes": m["total_bytes"], "hbm_bytes": report["hbm_bytes"],
                         "fits": report["fits"],
                         "compile_s": report.get("compile_seconds", 0.0)})
            print(f"{model} fsdp={width}: {m['total_bytes'] / GiB:.2f} GiB/device, "
                  f"compile {rows[-1]['compile_s']:.0f} s", flush=True)
    return rows


def aot_table(rows: list[dict]) -> str:
    out = [{"model": r["model"], "params": f"{r['params'] / 1e6:,.1f}M",
            "dtype / remat": f"{r['dtype']} / {r['remat']}",
            "mesh": " x ".join(f"{k} {v}" for k, v in r["mesh"].items()),
            "per-device GiB": r["total_bytes"] / GiB,
            "params+opt GiB": r["argument_bytes"] / GiB, "temp GiB": (r["temp_bytes"] or 0) / GiB,
            "fits 16 GiB": "yes" if r["fits"] else "NO", "compile s": r["compile_s"]}
           for r in rows]
    return common.print_table(out, ["model", "params", "dtype / remat", "mesh",
                                    "per-device GiB", "params+opt GiB", "temp GiB",
                                    "fits 16 GiB", "compile s"])


# -- plot and main ------------------------------------------------------------------------

def plot(cpu_rows: list[dict], aot_rows: list[dict], path: str) -> None:
    """One column per factor (s/step above, peak MiB below), plus the AOT panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    factors = list(dict.fromkeys(r["factor"] for r in cpu_rows))
    cols = len(factors) + (1 if aot_rows else 0)
    fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 7), squeeze=False)
    for j, name in enumerate(factors):
        rows = [r for r in cpu_rows if r["factor"] == name]
        for series in dict.fromkeys((r["stage"], r["candidates"]) for r in rows):
            sel = [r for r in rows if (r["stage"], r["candidates"]) == series]
            label = series[0] + ("" if series[1] == "-" else f", {series[1]}")
            xs = [r["value"] for r in sel]
            axes[0, j].plot(xs, [r["s/step"] for r in sel], "o-", label=label)
            axes[1, j].plot(xs, [r["peak_bytes"] / MiB for r in sel], "o-", label=label)
        for i, ylabel in enumerate(("s/step (CPU)", "peak MiB (XLA)")):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xlabel(name)
            axes[i, j].set_ylabel(ylabel)
            axes[i, j].set_ylim(bottom=0)
            axes[i, j].grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
    if aot_rows:
        ax = axes[0, -1]
        for model in dict.fromkeys(r["model"] for r in aot_rows):
            sel = [r for r in aot_rows if r["model"] == model]
            ax.plot([r["fsdp"] for r in sel], [r["total_bytes"] / GiB for r in sel], "o-",
                    label=model)
        ax.axhline(aot_rows[0]["hbm_bytes"] / GiB, color="k", ls="--", lw=1, label="HBM")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"fsdp width ({aot_rows[0]['topology']})")
        ax.set_ylabel("per-device GiB (AOT, stage 3)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        axes[1, -1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report_text(result: dict) -> str:
    """The markdown tables (printed) of a result dict (see `main`)."""
    text = []
    if result["cpu"]:
        text.append(f"CPU, tiny preset, base point {result['base']}; float32, 1 device; "
                    f"median of {result['reps']} steps; {result['load_before']} before, "
                    f"{result['load_after_cpu']} after\n")
        text.append(cpu_table(result["cpu"]))
    if result["aot"]:
        r = result["aot"][0]
        text.append(f"\nAOT, stage-3 step (uncached), {r['topology']}, global batch "
                    f"{r['batch']}\n")
        text.append(aot_table(result["aot"]))
    return "\n".join(text) + "\n"


def write_outputs(result: dict, out_dir: str) -> None:
    """scaling.md (tables), scaling.json (result) and scaling.png (plot) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "scaling.md"), "w") as f:
        f.write(report_text(result))
    common.write_json(os.path.join(out_dir, "scaling.json"), result)
    plot(result["cpu"], result["aot"], os.path.join(out_dir, "scaling.png"))
    print(f"wrote {out_dir}/scaling.{{md,json,png}}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 values per factor, one AOT model and width (a smoke test)")
    ap.add_argument("--parts", default="cpu,aot")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "benchmarks", "results", "scaling"))
    ap.add_argument("--aot_models", default=",".join(AOT_MODELS))
    ap.add_argument("--topology", default=AOT_TOPOLOGY)
    ap.add_argument("--fsdp", default=",".join(map(str, AOT_FSDP)))
    ap.add_argument("--factors", default=",".join(FACTORS), help="stage-3 factors to vary")
    ap.add_argument("--pretrain_factors", default=",".join(PRETRAIN_FACTORS),
                    help="factors also measured in stage 1 (empty: none)")
    ap.add_argument("--no_cache", action="store_true",
                    help="stage 3 uncached only (no run with the candidate cache)")
    ap.add_argument("--aot_from", default=None,
                    help="take the AOT rows from this earlier scaling.json instead of compiling")
    a = ap.parse_args()
    parts = a.parts.split(",")
    result = {"base": BASE, "reps": a.reps, "load_before": common.load_line(), "cpu": [],
              "aot": []}
    if "cpu" in parts:
        factors = {name: (QUICK_FACTORS if a.quick else FACTORS)[name]
                   for name in a.factors.split(",")}
        result["cpu"] = cpu_sweep(BASE, factors, a.reps,
                                  tuple(filter(None, a.pretrain_factors.split(","))),
                                  cached=not a.no_cache)
        result["load_after_cpu"] = common.load_line()
    if "aot" in parts:
        if a.aot_from:
            with open(a.aot_from) as f:
                result["aot"] = json.load(f)["aot"]
        else:
            models = ("tiny",) if a.quick else tuple(a.aot_models.split(","))
            widths = (1,) if a.quick else tuple(int(w) for w in a.fsdp.split(","))
            result["aot"] = aot_sweep(models, a.topology, widths)
    result["load_after"] = common.load_line()
    write_outputs(result, a.out_dir)


if __name__ == "__main__":
    main()
