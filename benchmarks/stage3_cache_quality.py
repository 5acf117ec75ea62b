"""Stage 3 with and without the candidate cache from the same stage-2 model of a demo run:
Recall@1/@5 and EM/F1 on the demo's held-out questions, and training time.

    python benchmarks/stage3_cache_quality.py --demo_workdir workdir/demo [--rate 8] [--steps 40]

Needs a finished (or at least stage-2-finished) `make demo` work directory; writes
`{demo_workdir}/stage3_cache_quality/` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo_workdir", required=True)
    ap.add_argument("--rate", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    from clara_jax import demo
    from clara_jax.clara.model import Clara
    from clara_jax.eval.evaluate import evaluate

    spec = importlib.util.spec_from_file_location("demo_config",
                                                  os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.end_to_end.steps = args.steps
    wd = os.path.abspath(args.demo_workdir)
    worlds = demo.make_worlds(cfg, wd)
    instruct = os.path.join(wd, f"rate{args.rate}", "instruct", "model")
    if not os.path.isdir(instruct):
        raise FileNotFoundError(f"{instruct}: run `make demo` (at least through stage 2) first")
    records = demo.read_eval_records(cfg, demo.write_eval_file(cfg, worlds, wd))
    kw = dict(mode="compressed", setting="normal", top_k=cfg.top_k, max_new_tokens=16)
    before, _ = evaluate(Clara.load(instruct), records, **kw)
    rows = []
    for cache in (True, False):
        c = demo.stage_config(cfg, "end_to_end", worlds, args.rate, instruct)
        c.end_to_end.cache_candidates = cache
        t0 = time.time()
        model_dir = demo.run_stage(c, os.path.join(wd, "stage3_cache_quality", f"cache_{cache}"))
        seconds = time.time() - t0
        s, _ = evaluate(Clara.load(model_dir), records, **kw)
        rows.append((cache, s, seconds))
    print(f"\nquery reasoner Recall@1 before stage 3: {before['recall@1']:.3f}\n")
    print("| stage 3 | Recall@1 | Recall@5 | EM | F1 | train time (s) |")
    print("|---|---|---|---|---|---|")
    for cache, s, seconds in rows:
        name = "cached candidates" if cache else "recompressed every step (official)"
        print(f"| {name} | {s['recall@1']:.3f} | {s['recall@5']:.3f} | {s['em']:.3f} | "
              f"{s['f1']:.3f} | {seconds:.0f} |")
    with open(os.path.join(wd, "stage3_cache_quality", "results.json"), "w") as f:
        json.dump({"before": before, "rows": [{"cache": c, **s, "seconds": t}
                                              for c, s, t in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
