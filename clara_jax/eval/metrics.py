"""Answer and retrieval metrics with the official CLaRa evaluation semantics.

Reproduces the definitions of apple/ml-clara `evaluation/evaluate.py` (EvaluationMetrics,
ResultCalculator.calculate_basic_metrics / calculate_stage2_metrics):

- answers are compared after `normalize_answer(bool_mapping(s))`: the exact strings "True" /
  "False" become "yes" / "no", then lower case, ASCII punctuation removed, the words
  a / an / the removed, whitespace collapsed;
- EM: the normalised strings are equal;
- F1: token F1 of the normalised strings, except 0 when either side is "yes", "no" or
  "noanswer" and the two differ, and 0 when no token is shared (so two empty answers score 0);
- accuracy ("cover EM"): every token of the normalised gold answer occurs in the normalised
  prediction (membership, not counts; an answer that normalises to nothing is always covered);
- the official script scores against the FIRST gold answer only (`golden_answers[0]`); the
  `*_max` keys additionally take the best score over all aliases;
- Recall@k = |top-k ∩ positives| / |positives| (0 for a row without positives, which still
  counts in the mean), Precision@k = |top-k ∩ positives| / k, both averaged over all rows.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = ("yes", "no", "noanswer")


def bool_mapping(s: str) -> str:
    """The official "True" -> "yes", "False" -> "no" (exact, case-sensitive strings)."""
    return {"True": "yes", "False": "no"}.get(s, s)


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop the words a/an/the, collapse whitespace (in
    that order, as officially). The metrics apply `bool_mapping` before this."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _norm(s: str) -> str:
    return normalize_answer(bool_mapping(s))


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(_norm(prediction) == _norm(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalised strings; 0 when a yes/no/noanswer side differs from the
    other, and 0 when no token is shared (including both empty), as officially."""
    pred, ref = _norm(prediction), _norm(gold)
    if (pred in _YES_NO or ref in _YES_NO) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def accuracy(prediction: str, gold: str) -> float:
    """The official "acc" (cover exact match): 1.0 when every token of the normalised gold
    occurs among the normalised prediction's tokens (presence, not counts; a gold that
    normalises to the empty string is always covered), else 0.0."""
    pred_tokens = set(_norm(prediction).split())
    return float(all(t in pred_tokens for t in _norm(gold).split()))


def answer_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]
                  ) -> dict[str, float]:
    """Means over examples: {"em", "f1", "acc"} against each example's first gold answer (the
    official protocol), {"em_max", "f1_max", "acc_max"} maxed over all its aliases, "n"."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold lists")
    if not predictions:
        raise ValueError("no predictions to score")
    sums = dict.fromkeys(("em", "f1", "acc", "em_max", "f1_max", "acc_max"), 0.0)
    for i, (pred, aliases) in enumerate(zip(predictions, golds)):
        if isinstance(aliases, str) or len(aliases) == 0:
            raise ValueError(f"golds[{i}]: expected a non-empty list of answers, got "
                             f"{aliases!r}")
        for name, fn in (("em", exact_match), ("f1", f1_score), ("acc", accuracy)):
            sums[name] += fn(pred, aliases[0])
            sums[name + "_max"] += max(fn(pred, g) for g in aliases)
    n = len(predictions)
    return {**{k: v / n for k, v in sums.items()}, "n": n}


def retrieval_scores(topk_indices: np.ndarray, pos_index: Sequence[Sequence[int]],
                     ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """Recall@k and Precision@k of ranked candidate indices against the positives.

    topk_indices: [B, width] candidate indices, best first; pos_index: B lists of positive
    indices. For each k the first min(k, width) columns are used (so with width < k,
    "recall@k" is the recall of all `width` retrieved documents) and precision divides the
    hits by k, as the official code does with its fixed-width top-k list.
    Keys: "recall@k", "precision@k" (means over all B rows; a row without positives adds 0
    to both, as officially) and "recall@k_pos", "precision@k_pos" (means over the rows that
    have positives; NaN when none has), plus "n_with_pos".
    """
    top = np.asarray(topk_indices)
    if top.ndim != 2 or top.shape[0] != len(pos_index):
        raise ValueError(f"topk_indices shape {top.shape} does not match {len(pos_index)} "
                         f"pos_index rows (expected [B, width])")
    if top.shape[0] == 0:
        raise ValueError("no rows to score")
    has_pos = np.array([len(p) > 0 for p in pos_index], bool)
    out: dict[str, float] = {}
    for k in ks:
        if k <= 0:
            raise ValueError(f"ks must be positive, got {k}")
        width = min(k, top.shape[1])
        hits = np.array([len(set(row[:width].tolist()) & set(pos))
                         for row, pos in zip(top, pos_index)], np.float64)
        recall = np.array([h / len(p) if len(p) else 0.0 for h, p in zip(hits, pos_index)])
        precision = hits / k
        out[f"recall@{k}"] = float(recall.mean())
        out[f"precision@{k}"] = float(precision.mean())
        out[f"recall@{k}_pos"] = float(recall[has_pos].mean()) if has_pos.any() else float("nan")
        out[f"precision@{k}_pos"] = (float(precision[has_pos].mean()) if has_pos.any()
                                     else float("nan"))
    out["n_with_pos"] = int(has_pos.sum())
    return out
