"""Question-answering evaluation of a `Clara` model: CLaRa and two baselines on one backbone.

Modes (what the generator reads):
  compressed   the selected documents' memory-token states (CLaRa)
  full_text    the selected documents' text in the prompt (text RAG baseline,
               `prompts.full_text_string`)
  closed_book  no documents (`prompts.closed_book_string`)

Settings (which documents the generator reads, for compressed and full_text):
  first   the first top_k documents of each record in file order, no ranking: the official
          stage1 / stage1_2 evaluation (`evaluation/evaluate.py --stage stage1|stage1_2`:
          `docs[:5]`, compressed and answered as `generate_from_text` does). With the
          official `eval_processed_with_pos.jsonl` (`--gold_retrieval`) its first 5 documents
          hold the positives.
  gold    `first` with the gold documents guaranteed: every `pos_index` document plus the
          earliest non-gold ones, top_k in all, in file order; no ranking. The gold-retrieval
          input for records that carry `pos_index` (the README's Oracle, "gold document
          included") on a stage1 / stage1_2 model.
  normal  the query reasoner ranks each record's N candidates by cosine in the compressed space
          (`Clara.retrieve`) and the top_k go to the generator, best first: the official
          stage2 evaluation (`--stage stage2`, `generate_from_questions` over all candidates).
  oracle  `normal` with the gold documents guaranteed: all of `pos_index`, filled up to top_k
          with the query reasoner's best non-gold candidates, in the query reasoner's order.
          (A model without an encoder reads the `gold` selection here.)
  In gold and oracle a record without positives, or with more than top_k, is an error.

`OFFICIAL` maps the official `--stage` names (and ours) to the official script's setting and
max_new_tokens: 128 for stage1 / stage1_2 (the default of the official
`generate_from_compressed_documents_and_questions`, which its stage-1 path calls without one),
64 for stage2 (`generate_from_questions(..., max_new_tokens=64)`); max_new_tokens=None takes
the setting's official value (`OFFICIAL_MAX_NEW_TOKENS`).

In normal and oracle the query reasoner's ranking is computed (for compressed and full_text),
and when any record has `pos_index` the summary has the official Recall@k / Precision@k
(k = 1, 3, 5) over the generation_top_k list (the ranking's first top_k, the official
`topk_idx`: so for k > top_k they equal the top_k values), and `ranking_recall@k` over the
query reasoner's full ranking (`metrics.retrieval_scores`; rows without positives count 0 as
officially, `*_pos` keys average over the rows that have them). first and gold rank nothing
and report no retrieval metric (as officially for stage1). Every distinct document the
generator or the ranking needs is compressed once per call (in first / gold only the selected
ones). Documents longer than the encoder window (doc_max_length tokens) are cut, as the
official encoder does; full_text mode gives the generator exactly the text the encoder saw, so
the two modes read the same information. `truncated_docs` counts the distinct documents cut.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from clara_jax.clara import prompts
from clara_jax.clara.model import Clara
from clara_jax.eval import metrics

MODES = ("compressed", "full_text", "closed_book")
SETTINGS = ("first", "gold", "normal", "oracle")
RANKED = ("normal", "oracle")  # the settings that run the query reasoner
RETRIEVAL_KS = (1, 3, 5)
OFFICIAL_MAX_NEW_TOKENS = {"first": 128, "gold": 128, "normal": 64, "oracle": 64}
# The official evaluation per stage (its `--stage` names and ours): setting, max_new_tokens,
# top_k (`--generation_top_k` default 5; stage1 reads `docs[:5]`).
OFFICIAL = {"stage1": ("first", 128, 5), "stage1_2": ("first", 128, 5),
            "stage2": ("normal", 64, 5)}
OFFICIAL.update(pretrain=OFFICIAL["stage1"], instruct=OFFICIAL["stage1_2"],
                end_to_end=OFFICIAL["stage2"])
GOLD_KEYS = ("golden_answers", "answers", "answer")  # the official script prefers golden_answers


def gold_answers(record: dict, index: int) -> list[str]:
    """The record's gold aliases (first = the one the official score uses)."""
    for key in GOLD_KEYS:
        if key in record:
            value = record[key]
            golds = [value] if isinstance(value, str) else value
            if (not isinstance(golds, (list, tuple)) or not golds or
                    not all(isinstance(g, str) for g in golds)):
                raise ValueError(f"{_where(record, index)}: {key}: expected a string or a "
                                 f"non-empty list of strings, got {value!r}")
            return list(golds)
    raise ValueError(f"{_where(record, index)}: answer: missing (one of {GOLD_KEYS})")


def _where(record: dict, index: int) -> str:
    source = record.get("source") if isinstance(record, dict) else None
    return f"records[{index}]" + (f" ({source})" if source else "")


def validate_records(records: Sequence[dict], *, mode: str, setting: str, top_k: int) -> None:
    """ValueError naming the record (index and source) and field of the first bad input."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; known: {MODES}")
    if setting not in SETTINGS:
        raise ValueError(f"setting: unknown {setting!r}; known: {SETTINGS}")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if not records:
        raise ValueError("no records to evaluate")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"records[{i}]: expected a dict, got {type(rec).__name__}")
        where = _where(rec, i)
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: question: empty or not a string ({q!r})")
        gold_answers(rec, i)
        if mode == "closed_book":
            continue
        docs = rec.get("docs")
        if not isinstance(docs, (list, tuple)) or not docs:
            raise ValueError(f"{where}: docs: no documents")
        for j, d in enumerate(docs):
            if not isinstance(d, str) or not d.strip():
                raise ValueError(f"{where}: docs[{j}]: empty or not a string")
        if top_k > len(docs):
            raise ValueError(f"{where}: docs: top_k={top_k} is larger than its {len(docs)} "
                             f"candidates")
        pos = rec.get("pos_index") or []
        if not all(isinstance(p, int) and 0 <= p < len(docs) for p in pos):
            raise ValueError(f"{where}: pos_index: {pos} not indices into {len(docs)} docs")
        if setting in ("gold", "oracle"):
            if not pos:
                raise ValueError(f"{where}: pos_index: the {setting} setting needs gold "
                                 f"documents")
            if len(set(pos)) > top_k:
                raise ValueError(f"{where}: pos_index: {len(set(pos))} gold documents do not "
                                 f"fit in top_k={top_k}")


def oracle_selection(ranking: Sequence[int], pos_index: Sequence[int], top_k: int) -> list[int]:
    """All gold indices plus the best-ranked non-gold ones, top_k in all, in ranking order.
    ranking: every candidate index, best first."""
    gold = set(pos_index)
    fill = top_k - len(gold)
    out = []
    for j in ranking:
        j = int(j)
        if j in gold:
            out.append(j)
        elif fill > 0:
            out.append(j)
            fill -= 1
    return out


def encoder_text(model: Clara, text: str) -> tuple[str, bool]:
    """The part of `text` the encoder reads (it keeps doc_max_length + 3 tokens of
    `<ENC><s>{text}</s>`, `prompts.encode_documents`), and whether it was cut."""
    tok = model.tokenizer
    width = model.config.doc_max_length + 3
    ids = tok.encode(f"{tok.enc_token}{tok.bos_token}{text}{tok.eos_token}")
    if len(ids) <= width:
        return text, False
    return tok.decode(ids[:width], skip_special_tokens=True), True


def compress_unique(model: Clara, texts: Sequence[str]) -> tuple[np.ndarray, int]:
    """Memory states [len(texts), n, D] of distinct texts, in chunks of model.batch_size with a
    progress bar; also the number of texts the encoder cut."""
    _, _, n_cut = prompts.encode_documents(model.tokenizer, texts, model.config.doc_max_length,
                                           model.config.n_mem)
    out = []
    step = model.batch_size
    with tqdm(total=len(texts), desc="compress", unit="doc", leave=False) as bar:
        for start in range(0, len(texts), step):
            out.append(model.compress_documents(texts[start:start + step]))
            bar.update(len(out[-1]))
    return np.concatenate(out), n_cut


def _pad(items: list, size: int) -> list:
    """items padded to `size` by repeating the last one (static batch shapes)."""
    return items + [items[-1]] * (size - len(items))


def official_settings(stage: str) -> dict[str, Any]:
    """The official evaluation of a stage (`--stage` of `evaluation/evaluate.py`: stage1,
    stage1_2, stage2, or ours: pretrain, instruct, end_to_end) as evaluate's keyword
    arguments {setting, max_new_tokens, top_k}; ValueError naming the known ones."""
    if stage not in OFFICIAL:
        raise ValueError(f"stage: unknown {stage!r}; known: {tuple(OFFICIAL)}")
    setting, max_new_tokens, top_k = OFFICIAL[stage]
    return {"setting": setting, "max_new_tokens": max_new_tokens, "top_k": top_k}


def resolve_settings(stage: str | None = None, setting: str | None = None,
                     top_k: int | None = None, max_new_tokens: int | None = None
                     ) -> dict[str, Any]:
    """{setting, top_k, max_new_tokens}: the given values, the rest from `stage`'s official
    evaluation (`official_settings`), or without a stage setting normal, top_k 5 and the
    setting's official max_new_tokens."""
    official = official_settings(stage) if stage else {"setting": "normal", "top_k": 5}
    setting = setting or official["setting"]
    if setting not in SETTINGS:
        raise ValueError(f"setting: unknown {setting!r}; known: {SETTINGS}")
    return {"setting": setting,
            "top_k": official["top_k"] if top_k is None else top_k,
            "max_new_tokens": (official.get("max_new_tokens", OFFICIAL_MAX_NEW_TOKENS[setting])
                               if max_new_tokens is None else max_new_tokens)}


def select_unranked(setting: str, n_docs: int, pos_index: Sequence[int], top_k: int
                    ) -> list[int]:
    """The documents of a setting without the query reasoner, in file order: `first` the
    first top_k; `gold` (and `oracle` on a model without encoder) every gold one plus the
    earliest non-gold ones, top_k in all."""
    if setting == "first":
        return list(range(top_k))
    return oracle_selection(range(n_docs), pos_index, top_k)


def evaluate(model: Clara, records: list[dict], *, mode: str = "compressed",
             setting: str = "normal", top_k: int = 5, batch_size: int = 16,
             max_new_tokens: int | None = None, adapter: str | None = "decoder"
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answers every record and scores it (greedy decoding).

    records: `eval` rows as `formats.read_jsonl(path, "eval")` returns them (question, docs
    [N candidates], answers / golden_answers / answer, optional pos_index). adapter: the
    generator's adapter (None = the base model alone; baselines trained on the base use None).
    max_new_tokens: None = the setting's official value (`OFFICIAL_MAX_NEW_TOKENS`).
    Batches of batch_size records (the last one padded) keep shapes static.

    Returns (summary, predictions). summary: mode, setting, top_k, max_new_tokens, n, em / f1
    / acc (first gold, official) and *_max (best alias), avg_output_length (words, as
    officially), the retrieval keys (normal / oracle, compressed / full_text, with positives:
    `metrics.retrieval_scores` over the top_k list, and ranking_recall@k over the whole
    ranking), truncated_docs, distinct_docs, seconds, examples_per_second. predictions: one
    dict per record: index, question, prediction, golds, em, f1, acc, topk (the query
    reasoner's ranking, first min(N, max(top_k, 5)); [] in first / gold), selected (the
    indices given to the generator, in prompt order), pos_index.
    """
    validate_records(records, mode=mode, setting=setting, top_k=top_k)
    if max_new_tokens is None:
        max_new_tokens = OFFICIAL_MAX_NEW_TOKENS[setting]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    t0 = time.perf_counter()
    questions = [r["question"] for r in records]
    golds = [gold_answers(r, i) for i, r in enumerate(records)]
    pos = [sorted(set(r.get("pos_index") or [])) for r in records]
    uses_docs = mode != "closed_book"
    # A model without an encoder (a base before any CLaRa stage) can neither compress nor
    # rank: it reads full text in the gold selection (also for oracle), with no retrieval
    # metric.
    has_encoder = "encoder" in model.adapters
    ranks = uses_docs and setting in RANKED and has_encoder
    if uses_docs and not has_encoder and (mode == "compressed" or setting == "normal"):
        raise ValueError(f"mode {mode!r}, setting {setting!r} needs an encoder adapter (to "
                         f"compress or rank documents); this model has {sorted(model.adapters)}")

    fixed: list[list[int]] = [[] for _ in records]   # the selection of unranked settings
    if uses_docs and not ranks:
        fixed = [select_unranked(setting, len(r["docs"]), p, top_k)
                 for r, p in zip(records, pos)]
    row_of: dict[str, int] = {}
    states = None
    n_cut = 0
    if ranks or mode == "compressed":
        for r, sel in zip(records, fixed):
            for d in (r["docs"] if ranks else [r["docs"][j] for j in sel]):
                row_of.setdefault(d, len(row_of))
        states, n_cut = compress_unique(model, list(row_of))
    compress_seconds = time.perf_counter() - t0

    predictions: list[dict] = []
    texts: list[str] = []
    n_batches = -(-len(records) // batch_size)
    for start in tqdm(range(0, len(records), batch_size), total=n_batches, desc=f"eval {mode}",
                      unit="batch", leave=False):
        idx = list(range(start, min(start + batch_size, len(records))))
        qs = _pad([questions[i] for i in idx], batch_size)
        rankings: list[list[int]] = [[] for _ in idx]
        selected = [fixed[i] for i in idx]
        if ranks:
            rankings = _rank(model, [questions[i] for i in idx],
                             [records[i]["docs"] for i in idx], states, row_of)
            selected = [oracle_selection(rk, pos[i], top_k) if setting == "oracle" else rk[:top_k]
                        for i, rk in zip(idx, rankings)]
        if mode == "compressed":
            chosen = np.stack([states[[row_of[records[i]["docs"][j]] for j in sel]]
                               for i, sel in zip(idx, selected)])
            chosen = np.concatenate([chosen, np.repeat(chosen[-1:], batch_size - len(idx), 0)])
            out = model.generate_from_compressed_documents_and_questions(
                qs, chosen, max_new_tokens, adapter=adapter)
        elif mode == "full_text":
            docs = [[encoder_text(model, records[i]["docs"][j])[0] for j in sel]
                    for i, sel in zip(idx, selected)]
            out = model.generate_from_full_text(qs, _pad(docs, batch_size), max_new_tokens,
                                                adapter=adapter)
        else:
            out = model.generate_closed_book(qs, max_new_tokens, adapter=adapter)
        for b, i in enumerate(idx):
            pred = out.texts[b]
            texts.append(pred)
            width = min(len(records[i].get("docs") or []), max(top_k, max(RETRIEVAL_KS)))
            predictions.append({
                "index": i, "question": questions[i], "prediction": pred, "golds": golds[i],
                "em": metrics.exact_match(pred, golds[i][0]),
                "f1": metrics.f1_score(pred, golds[i][0]),
                "acc": metrics.accuracy(pred, golds[i][0]),
                "topk": [int(j) for j in rankings[b][:width]],
                "selected": [int(j) for j in selected[b]],
                "pos_index": pos[i],
                **({"source": records[i]["source"]} if "source" in records[i] else {}),
            })

    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"mode": mode, "setting": setting, "top_k": top_k,
                               "max_new_tokens": max_new_tokens, "adapter": adapter}
    summary.update(metrics.answer_scores(texts, golds))
    summary["avg_output_length"] = float(np.mean([len(t.split()) for t in texts]))
    if ranks and any(pos):
        ranking = _topk_matrix(predictions)
        summary.update(metrics.retrieval_scores(ranking[:, :top_k], pos, RETRIEVAL_KS))
        full = metrics.retrieval_scores(ranking, pos, RETRIEVAL_KS)
        summary.update({f"ranking_recall@{k}": full[f"recall@{k}"] for k in RETRIEVAL_KS})
    summary.update(truncated_docs=int(n_cut), distinct_docs=len(row_of),
                   compress_seconds=compress_seconds, seconds=seconds,
                   examples_per_second=len(records) / seconds)
    return summary, predictions


def _rank(model: Clara, questions: list[str], docs: list[list[str]], states: np.ndarray,
          row_of: dict[str, int]) -> list[list[int]]:
    """Every candidate index per question, best first, by the query reasoner
    (`Clara.retrieve` with k = N, run per group of questions with the same N)."""
    out: list[list[int]] = [[] for _ in questions]
    by_n: dict[int, list[int]] = {}
    for b, d in enumerate(docs):
        by_n.setdefault(len(d), []).append(b)
    for n, rows in by_n.items():
        cand = np.stack([states[[row_of[t] for t in docs[b]]] for b in rows])  # [b, N, n, D]
        idx, _ = model.retrieve([questions[b] for b in rows], cand, n)
        for b, r in zip(rows, idx):
            out[b] = [int(j) for j in r]
    return out


def _topk_matrix(predictions: list[dict]) -> np.ndarray:
    """The `topk` lists as [B, width], padded with -1 (never a positive) where shorter."""
    width = max(len(p["topk"]) for p in predictions)
    top = np.full((len(predictions), width), -1, np.int64)
    for row, p in enumerate(predictions):
        top[row, :len(p["topk"])] = p["topk"]
    return top


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per summary (keyed by a label such as the mode)."""
    cols = [("EM", "em"), ("F1", "f1"), ("Acc", "acc"), ("EM max", "em_max"),
            ("F1 max", "f1_max"), ("R@1", "recall@1"), ("R@3", "recall@3"),
            ("R@5", "recall@5"), ("P@1", "precision@1"), ("n", "n"),
            ("ex/s", "examples_per_second")]
    lines = ["| mode | setting | " + " | ".join(c for c, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for label, s in summaries.items():
        cells = []
        for _, key in cols:
            v = s.get(key)
            if v is None:
                cells.append("-")
            elif isinstance(v, int):
                cells.append(str(v))
            else:
                cells.append(f"{v:.1f}" if key == "examples_per_second" else f"{v:.3f}")
        lines.append(f"| {label} | {s.get('setting', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
