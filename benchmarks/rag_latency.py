"""Answer latency of one backbone answering from 5 retrieved documents: the documents' full
text in the prompt vs the documents compressed in advance at rates 4, 16, 32, 128.

    python benchmarks/rag_latency.py --clara_src /path/to/ml-clara [--reps 3] [--quick]
        [--out_dir benchmarks/results]

One random local Mistral base (benchmarks/common.py; nothing is downloaded) and one CLaRa
release per rate over it (its memory tokens and adapters). Q questions, each with the same
5 documents of doc_max_length tokens; greedy, exactly max_new_tokens new tokens per answer.
Full text: ours `Clara.generate_from_full_text` (base model, adapters off); the official
code has no full-text path, so its side is its decoder's Hugging Face `generate` on the
same prompt string with its adapters disabled. Compressed: `generate_from_compressed_
documents_and_questions` on both sides, from states computed before timing. Prefill is the
latency with max_new_tokens = 1. Prompt length: tokens of the longest prompt (before our
padding to a multiple of 64). Writes rag_latency.json and rag_latency.png to --out_dir.
float32, warm-up first, every call interleaved with every other, medians.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from clara_jax.clara import generation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from train_step import CONFIGS  # noqa: E402

SIZES = {"mid": dict(n_questions=8, docs_per_question=5, max_new_tokens=32,
                     rates=(4, 16, 32, 128)),
         "quick": dict(n_questions=2, docs_per_question=2, max_new_tokens=4, rates=(4, 16))}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for side, style in (("ours", "o-"), ("official", "s--")):
        pts = [r for r in rows if r["side"] == side and r["rate"] != "full text"]
        full = [r for r in rows if r["side"] == side and r["rate"] == "full text"]
        if not pts:
            continue
        line, = ax1.plot([r["rate"] for r in pts], [r["latency (s)"] for r in pts], style,
                         label=f"{side}: compressed")
        if full:
            ax1.axhline(full[0]["latency (s)"], color=line.get_color(), ls=":",
                        label=f"{side}: full text")
    pts = [r for r in rows if r["side"] == "ours" and r["rate"] != "full text"]
    full = [r for r in rows if r["side"] == "ours" and r["rate"] == "full text"]
    ax2.plot([r["rate"] for r in pts], [r["prompt tokens"] for r in pts], "o-",
             label="compressed")
    ax2.axhline(full[0]["prompt tokens"], color="gray", ls=":", label="full text")
    for ax, ylabel in ((ax1, "answer latency (s, batch)"), (ax2, "prompt length (tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("compression rate")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Answering from 5 documents: full text vs compressed in advance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clara_src", default=None, help="checkout of github.com/apple/ml-clara")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny config (smoke test)")
    ap.add_argument("--work_dir", default="/tmp/clara_bench")
    ap.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(
        __file__)), "results"))
    a = ap.parse_args()

    from clara_jax.clara import prompts

    name = "quick" if a.quick else "mid"
    c, s = CONFIGS[name], SIZES[name]
    q, k, t = s["n_questions"], s["docs_per_question"], s["max_new_tokens"]
    base_dir = common.make_base_dir(
        os.path.join(a.work_dir, f"base_{name}"), hidden=c["hidden"], layers=c["layers"],
        heads=c["heads"], kv_heads=c["kv_heads"], intermediate=c["intermediate"],
        base_vocab=c["base_vocab"])
    models = {r: common.make_official_and_ours(
        a.clara_src, a.work_dir, doc_max_length=c["doc_max_length"], compress_rate=r,
        base_dir=base_dir) for r in s["rates"]}
    first_official, first_ours = models[s["rates"][0]]
    docs = common.documents_of_tokens(first_ours.tokenizer, k, c["doc_max_length"])
    questions = common.questions(q)
    groups = [docs] * q
    full_prompts = [prompts.full_text_string(x, docs) for x in questions]
    prompt_tokens = {"full text": max(len(first_ours.tokenizer.encode(p)) for p in full_prompts)}

    fns = {}

    def check(ids, n_new, what):
        assert all(len(r) == n_new for r in ids), (what, [len(r) for r in ids])

    for n_new in (t, 1):
        def full_ours(n_new=n_new):
            check(first_ours.generate_from_full_text(questions, groups, n_new).token_ids,
                  n_new, "full text")
        fns[("full text", "ours", n_new)] = full_ours
    for r, (official, ours) in models.items():
        states = ours.compress_documents(docs)
        states = np.broadcast_to(states, (q, *states.shape))
        batch = generation.memory_prompts(ours.tokenizer, questions, k, "instruct",
                                          ours.length_bucket)
        prompt_tokens[r] = int(batch.attention_mask.sum(1).max())
        for n_new in (t, 1):
            def comp_ours(ours=ours, states=states, n_new=n_new):
                check(ours.generate_from_compressed_documents_and_questions(
                    questions, states, n_new).token_ids, n_new, "compressed")
            fns[(r, "ours", n_new)] = comp_ours
    if first_official is not None:
        import torch
        tok = first_official.decoder_tokenizer
        enc = tok(full_prompts, return_tensors="pt", padding="longest", add_special_tokens=False)
        assert enc["attention_mask"].sum(1).max() == prompt_tokens["full text"], \
            "official and our tokenizers disagree on the full-text prompt"
        for n_new in (t, 1):
            def full_official(n_new=n_new):
                dec = first_official.decoder
                dec.disable_adapters()
                try:
                    with torch.no_grad():
                        out = dec.generate(**enc, max_new_tokens=n_new, do_sample=False)
                finally:
                    dec.enable_adapters()
                assert out.shape[1] - enc["input_ids"].shape[1] == n_new
            fns[("full text", "official", n_new)] = full_official
        for r, (official, ours) in models.items():
            official.eval()
            with torch.no_grad():
                states_t, _ = official.compress_documents(docs)
            states_t = states_t.repeat(q, 1, 1)  # [q * k, n, d], question-major
            for n_new in (t, 1):
                def comp_official(official=official, states_t=states_t, n_new=n_new):
                    with torch.no_grad():
                        official.generate_from_compressed_documents_and_questions(
                            questions, states_t, max_new_tokens=n_new)
                fns[(r, "official", n_new)] = comp_official
    print(f"{len(fns)} timed calls, warm-up then {a.reps} interleaved reps", flush=True)
    secs = common.interleaved({f"{key[0]} {key[1]} {key[2]}": fn for key, fn in fns.items()},
                              a.reps, warmup=1)
    med = {key: common.median(secs[f"{key[0]} {key[1]} {key[2]}"]) for key in fns}
    rows = []
    for side in ("ours", "official"):
        for rate in ["full text", *s["rates"]]:
            if (rate, side, t) not in med:
                continue
            lat, pre = med[(rate, side, t)], med[(rate, side, 1)]
            rows.append({"side": side, "rate": rate, "prompt tokens": prompt_tokens[rate],
                         "latency (s)": lat, "prefill (s)": pre,
                         "vs full text": f"{med[('full text', side, t)] / lat:.1f}x lower"
                         if rate != "full text" else "1x",
                         "generated tokens/s": q * t / lat})
    os.makedirs(a.out_dir, exist_ok=True)
    print(f"\nconfig {name}: hidden {c['hidden']}, {c['layers']} layers, {q} questions x {k} "
          f"documents of <= {c['doc_max_length']} tokens, {t} new tokens; float32; median of "
          f"{a.reps}; {common.load_line()}")
    if first_official is None:
        print("official side not run (no --clara_src): our side only")
    common.print_table(rows, ["side", "rate", "prompt tokens", "latency (s)", "prefill (s)",
                              "vs full text", "generated tokens/s"])
    common.write_json(os.path.join(a.out_dir, "rag_latency.json"),
                      {"config": c, "sizes": s, "load": common.load_line(), "rows": rows,
                       "seconds": {k_: v for k_, v in secs.items()}})
    plot(rows, os.path.join(a.out_dir, "rag_latency.png"))
    print(f"wrote {a.out_dir}/rag_latency.json and rag_latency.png")


if __name__ == "__main__":
    main()
