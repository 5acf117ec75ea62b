"""Evaluating the demo: the base alone (closed book, full text), CLaRa at every rate (normal
and oracle, before and after stage 3), the table by system and by question kind, the plot."""

from __future__ import annotations

import os
from typing import Any

import matplotlib
import numpy as np

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.clara.formats.hf_mistral import load_checkpoint
from clara_jax.data import formats, synthetic
from clara_jax.eval.evaluate import evaluate
from clara_jax.train.start import resize_vocab

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def base_as_clara(cfg, base_dir: str):
    """The pretrained base alone as a `Clara` with no adapters (for the baselines): its
    tokenizer with one memory token, the added tokens' rows appended."""

    model_cfg, params = load_checkpoint(base_dir)
    tok_path = os.path.join(base_dir, "tokenizer.model")
    tok = ClaraTokenizer.from_file(tok_path, n_mem=1)
    params = resize_vocab(params, tok.vocab_size, np.random.default_rng(0))
    config = ClaraConfig(doc_max_length=cfg.doc_max_length, compress_rate=cfg.doc_max_length,
                         generation_top_k=cfg.top_k, first_mem_token_id=tok.mem_token_ids[0])
    return Clara(model_cfg.replace(vocab_size=tok.vocab_size), config, params, {}, tok,
                 tokenizer_path=tok_path)


def read_eval_records(cfg, eval_file: str) -> list[dict]:
    records, _ = formats.read_jsonl(eval_file, "eval", num_candidates=cfg.num_candidates)
    return records[:cfg.eval.limit] if cfg.eval.limit else records


def evaluate_base(cfg, eval_file: str, base_dir: str) -> tuple[list[dict], dict]:
    """Closed book and full text (oracle) on the base alone, before any CLaRa stage: how well
    it reads. Returns (rows, per-question scores) as `evaluate_models`."""

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
                                                "recall@1", "n")},
               # the query reasoner's top 5 (its official recall@5 stops at top_k = 1)
               "recall@5": summary.get("ranking_recall@5")}
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
    matplotlib.use("Agg")

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


def kind_table(records: list[dict], per_question: dict[str, list[float]]
               ) -> tuple[str, dict[str, dict[str, float]]]:
    """EM by question kind (`synthetic.question_kind`: birthplace, birth year, founder, ...)
    for closed book, full text (oracle) and compressed documents (oracle, after stage 3) at
    every rate present in `per_question` (`Table.per_question`, in the order of `records`).
    Shows what the base and the compressor read and what they do not. Returns (markdown
    table, {kind: {column: EM, "n": count}})."""
    columns = {"closed book": "closed book/-/-//em", "full text": "full text/1/oracle//em"}
    rates = sorted({int(k.split("/")[1]) for k in per_question if k.startswith("compressed/")})
    columns.update({f"{r}x (oracle)": f"compressed/{r}/oracle/after stage 3/em" for r in rates})
    columns = {name: key for name, key in columns.items() if key in per_question}
    kinds = [synthetic.question_kind(r["question"]) for r in records]
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds), key=lambda k: (-kinds.count(k), k)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = {"n": len(idx), **{name: float(np.mean([per_question[key][i] for i in idx]))
                                       for name, key in columns.items()}}
    lines = ["| question kind | n | " + " | ".join(f"EM {c}" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    lines += [f"| {kind} | {row['n']} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |"
              for kind, row in out.items()]
    return "\n".join(lines), out
