"""Where a train step's time goes: a jax.profiler trace of our stage-1 / stage-3 step at the
`train_step.py` config, summarised per XLA op category from XProf's trace data.

    python benchmarks/profile_step.py [--stage pretrain|end_to_end] [--steps 2] [--quick]
        [--trace_dir /tmp/clara_profile] [--json out.json]

Prints a table: op category (dot = the matmuls, elementwise fusions, copies and transposes,
reductions, gathers / scatters, loop control, ...) and its share of the XLA:CPU thunk time
(self time, summed over the compute threads), plus the ten most expensive ops. The trace stays in --trace_dir for TensorBoard / XProf
(`xprof --logdir DIR`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import models, stage_batches  # noqa: E402


CONTAINERS = ("ThunkExecutor", "ThreadpoolListener", "PjitFunction", "$", "end:")


def thunk_self_times(xspace_path: str) -> list[tuple[str, float]]:
    """(XLA thunk name, self time in us) for every XLA:CPU thunk event in a trace (XProf's
    trace viewer data; on CPU the device-op tools are empty, the thunks are host events):
    an event's self time is its duration minus that of the events nested in it on the same
    thread; runtime wrappers and Python frames are left out."""
    from xprof.convert import raw_to_tool_data
    data, _ = raw_to_tool_data.xspace_to_tool_data([xspace_path], "trace_viewer", {})
    trace = json.loads(data if isinstance(data, str) else data.decode())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    xla_threads = {(e.get("pid"), e.get("tid")) for e in events if e.get("ph") == "M" and
                   e.get("name") == "thread_name" and "XLA" in e["args"].get("name", "")}
    by_thread: dict = collections.defaultdict(list)
    for e in events:
        where = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X" and where in xla_threads and not e["name"].startswith(CONTAINERS):
            by_thread[where].append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []        # [end, event, child time]
        for e in evs:
            end = e["ts"] + e.get("dur", 0)
            while stack and stack[-1][0] <= e["ts"]:
                done = stack.pop()
                out.append((done[1]["name"], done[1].get("dur", 0) - done[2]))
            if stack:
                stack[-1][2] += e.get("dur", 0)
            stack.append([end, e, 0.0])
        out += [(d[1]["name"], d[1].get("dur", 0) - d[2]) for d in stack]
    return out


def category(name: str) -> str:
    """An op category from a thunk name (`dot.3`, `dot_add_fusion.2` -> matmul, ...)."""
    base = name.split(".")[0]
    if base.startswith(("dot", "convolution", "ynn_fusion")) or "_dot" in base or \
            "convolution" in base:
        return "matmul (dot; ynn_fusion = XNNPACK dot fusion)"
    for prefix, cat in (("while", "loop control (while)"), ("copy", "copy / transpose"),
                        ("transpose", "copy / transpose"), ("scatter", "gather / scatter"),
                        ("gather", "gather / scatter"), ("dynamic", "dynamic slice / update"),
                        ("reduce", "reduce"), ("sort", "sort"), ("rng", "random bits"),
                        ("custom-call", "custom-call")):
        if base.startswith(prefix):
            return cat
    if "fusion" in base or base.startswith("wrapped_"):
        return "elementwise fusion"
    return "other (" + base + ")"


def summarise(times: list[tuple[str, float]]) -> dict:
    """{"categories": {name: {"self_ms", "share"}}, "total_ms", "top": ten op names}."""
    total = sum(t for _, t in times) or 1.0
    cats: dict[str, float] = collections.Counter()
    ops: dict[str, float] = collections.Counter()
    for name, t in times:
        cats[category(name)] += t
        ops[name] += t
    return {"total_ms": total / 1e3,
            "categories": {c: {"self_ms": t / 1e3, "share": t / total}
                           for c, t in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"op": n, "category": category(n), "self_ms": t / 1e3, "share": t / total}
                    for n, t in ops.most_common(10)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="pretrain", choices=["pretrain", "end_to_end"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--work_dir", default="/tmp/clara_bench")
    ap.add_argument("--trace_dir", default="/tmp/clara_profile")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from clara_jax.train import step as step_lib
    from clara_jax.train.optim import make_optimizer

    name, c, _, ours = models(a.quick, a.work_dir, None)
    k = 1 if a.stage == "pretrain" else c["k"]
    our_stage = a.stage
    cfg = ours.config.replace(generation_top_k=k)
    tx = make_optimizer(1e-4, 100)
    fn = jax.jit(step_lib.make_train_step(ours.model, cfg, our_stage, tx, dropout=True))
    batch = {key: jnp.asarray(v) for key, v in
             stage_batches(c, ours.config.first_mem_token_id)[a.stage].items()}
    state = step_lib.create_train_state(ours.params, dict(ours.adapters), our_stage, tx,
                                        jax.random.key(2))
    state, m = fn(state, batch)           # compile + warm-up
    float(m["loss"])
    run_dir = os.path.join(a.trace_dir, f"{a.stage}_{name}_{int(time.time())}")
    t0 = time.perf_counter()
    with jax.profiler.trace(run_dir):
        for _ in range(a.steps):
            state, m = fn(state, batch)
            float(m["loss"])
    wall = (time.perf_counter() - t0) / a.steps
    paths = glob.glob(os.path.join(run_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"no .xplane.pb written under {run_dir}")
    summary = summarise(thunk_self_times(paths[0]))
    summary.update(stage=a.stage, config=name, steps=a.steps, wall_s_per_step=wall,
                   trace=paths[0], load_average=os.getloadavg())
    print(f"{a.stage} ({name} config), {a.steps} profiled steps, {wall:.2f} s/step wall; "
          f"XLA thunk time summed over threads {summary['total_ms'] / a.steps:.0f} ms/step; "
          f"load average {os.getloadavg()[0]:.1f}; trace: {paths[0]}")
    print("| op category | share of thunk time | ms per step (all threads) |")
    print("|---|---|---|")
    for cat, v in summary["categories"].items():
        print(f"| {cat} | {100 * v['share']:.1f}% | {v['self_ms'] / a.steps:.0f} |")
    print("\nmost expensive ops:")
    for t in summary["top"]:
        print(f"  {100 * t['share']:5.1f}%  {t['self_ms'] / a.steps:8.1f} ms  "
              f"[{t['category']}] {t['op']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
    main()
