"""Inference throughput, ours vs the official PyTorch CLaRa: documents/s of
`compress_documents`, and answer latency / generated tokens/s of `generate_from_text`.

    python benchmarks/compress_and_generate.py --clara_src /path/to/ml-clara [--reps 3] [--quick]

Same weights and texts on both sides (benchmarks/common.py builds a random local Mistral
base and one CLaRa release through the official constructor; nothing is downloaded);
without --clara_src only our side runs. generate_from_text: Q questions x 5 documents of
doc_max_length tokens, greedy, exactly max_new_tokens new tokens per answer (the random
model's `</s>` logit is pinned to 0 so no answer stops early). The per-token decode time
is (t(max_new_tokens) - t(1)) / (max_new_tokens - 1); t(1) is compression + prefill.
The official calls run under torch.no_grad() in eval mode; its `_generate` moves inputs
to "cuda", which `common.cuda_means_cpu` keeps on the CPU. float32, warm-up first, both
sides interleaved, medians.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from train_step import CONFIGS  # noqa: E402

SIZES = {"mid": dict(n_questions=8, docs_per_question=5, max_new_tokens=32, compress_docs=64),
         "quick": dict(n_questions=2, docs_per_question=2, max_new_tokens=4, compress_docs=4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clara_src", default=None, help="checkout of github.com/apple/ml-clara")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--work_dir", default="/tmp/clara_bench")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    name = "quick" if a.quick else "mid"
    c, s = CONFIGS[name], SIZES[name]
    base_dir = common.make_base_dir(
        os.path.join(a.work_dir, f"base_{name}"), hidden=c["hidden"], layers=c["layers"],
        heads=c["heads"], kv_heads=c["kv_heads"], intermediate=c["intermediate"],
        base_vocab=c["base_vocab"])
    official, ours = common.make_official_and_ours(
        a.clara_src, a.work_dir, doc_max_length=c["doc_max_length"],
        compress_rate=c["compress_rate"], base_dir=base_dir)
    q, k, t = s["n_questions"], s["docs_per_question"], s["max_new_tokens"]
    docs = common.documents_of_tokens(ours.tokenizer, max(s["compress_docs"], q * k),
                                      c["doc_max_length"])
    questions = common.questions(q)
    groups = [docs[i * k:(i + 1) * k] for i in range(q)]
    to_compress = docs[:s["compress_docs"]]
    answers = {}

    fns = {"compress ours": lambda: ours.compress_documents(to_compress)}
    for n_new in (t, 1):  # answers: those of the last max_new_tokens call
        def gen(n_new=n_new):
            out = ours.generate_from_text(questions, groups, max_new_tokens=n_new)
            assert all(len(r) == n_new for r in out.token_ids), [len(r) for r in out.token_ids]
            if n_new == t:
                answers["ours"] = out.texts
        fns[f"generate {n_new} ours"] = gen
    if official is not None:
        import torch
        official.eval()

        def compress_official():
            with torch.no_grad():
                official.compress_documents(to_compress)
        fns["compress official"] = compress_official
        for n_new in (t, 1):
            def gen_official(n_new=n_new):
                with torch.no_grad(), common.cuda_means_cpu():
                    out = official.generate_from_text(questions, groups, max_new_tokens=n_new)
                if n_new == t:
                    answers["official"] = out
            fns[f"generate {n_new} official"] = gen_official
    order = sorted(fns, key=lambda n: (n.split(" ")[0] != "compress", n.split(" ")[1]))
    print(f"{len(fns)} timed calls, warm-up then {a.reps} interleaved reps", flush=True)
    secs = common.interleaved({n: fns[n] for n in order}, a.reps, warmup=1)
    med = {n: common.median(v) for n, v in secs.items()}
    rows = []
    sides = ["ours"] + (["official"] if official is not None else [])
    for side in sides:
        label = "ours (clara-jax)" if side == "ours" else "official (PyTorch)"
        full, one = med[f"generate {t} {side}"], med[f"generate 1 {side}"]
        rows.append({"implementation": label,
                     "compress_documents docs/s": len(to_compress) / med[f"compress {side}"],
                     f"generate_from_text {q}x{k} docs x {t} tokens (s)": full,
                     "compress + prefill (s)": one,
                     "ms per decode step": 1e3 * (full - one) / (t - 1),
                     "generated tokens/s": q * t / full})
    if official is not None:
        rows[0]["speed-up (generate)"] = f"{med[f'generate {t} official'] / med[f'generate {t} ours']:.2f}x"
        rows[0]["speed-up (compress)"] = f"{med['compress official'] / med['compress ours']:.2f}x"
        same = sum(x.strip() == y.strip() for x, y in zip(answers["ours"], answers["official"]))
        print(f"identical greedy answers (ours vs official): {same}/{q}")
    print(f"\nconfig {name}: hidden {c['hidden']}, {c['layers']} layers, doc_max_length "
          f"{c['doc_max_length']}, compress_rate {c['compress_rate']}, compress_documents on "
          f"{len(to_compress)} documents; float32; median of {a.reps}; {common.load_line()}")
    if official is None:
        print("official side not run (no --clara_src): our side only")
    headers = ["implementation", "compress_documents docs/s", "speed-up (compress)",
               f"generate_from_text {q}x{k} docs x {t} tokens (s)", "speed-up (generate)",
               "compress + prefill (s)", "ms per decode step", "generated tokens/s"]
    common.print_table(rows, headers)
    common.write_json(a.json, {"config": c, "sizes": s, "load": common.load_line(),
                               "seconds": secs, "rows": rows, "answers": answers})


if __name__ == "__main__":
    main()
