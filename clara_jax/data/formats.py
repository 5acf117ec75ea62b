"""CLaRa's JSONL formats: read, validate, normalise; errors name file, line and field.

Formats (the official ones, accepted as they are):
  pretrain    {"data_type": "qa"|"paraphrase", "question": [str], "answers": [str], "docs": [str]}
              qa: question[i] pairs with answers[i]; paraphrase: the target is answers[0]
              (its question is ignored). data_type defaults to "qa".
  instruct    {"question": str, "docs": [str] * k, "answer": str | "answers": [str] |
              "golden_answers": [str]} (the first answer is the target; `pos_index` optional)
  end_to_end  {"question": str, "docs": [str] * N, "answer"|..., "pos_index": [int] (optional)}
  eval        as end_to_end; `golden_answers` may hold several aliases.
  text        {"text": str, "id": str (optional)}: a corpus to index, or text with newlines
              (chat-formatted examples) for base-LM pretraining; an optional "prompt" (a
              proper prefix of text) is context only there: no loss on its tokens.

As the official `preprocess_data` (openrlhf/datasets/sft_dataset.py): the documents are the
first list among "docs", "context", "content"; the answers come from the first of "answer"
(a string), "answers" (a list), "golden_answers" (a list) holding that type (eval rows look
at golden_answers first: every alias scores).

Every record comes back normalised (see `normalise`), in file order, with its source
`file:line`. Invalid lines raise `DataError` by default; with skip_invalid they are counted
and listed instead. Valid records are never dropped or reordered.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Sequence

FORMATS = ("pretrain", "instruct", "end_to_end", "eval", "text")
ANSWER_KEYS = ("answer", "answers", "golden_answers")


class DataError(ValueError):
    """A bad input line: `file:line: field: message`."""

    def __init__(self, path: str, line: int, field: str, message: str):
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{path}:{line}: {field}: {message}")


@dataclasses.dataclass
class ReadReport:
    """What reading produced: counts, and the skipped lines as `file:line: field: message`."""

    records: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)

    def write_skipped(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in self.skipped)


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Sorted files matching the paths or globs (comma-separated string or list);
    FileNotFoundError naming any pattern that matches nothing."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern.strip())))
        if not matched:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        files.extend(matched)
    return files


def _text(value: Any, path: str, line: int, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(path, line, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, line, field, "is empty")
    return value


def _texts(value: Any, path: str, line: int, field: str, allow_empty_items: bool = False
           ) -> list[str]:
    if not isinstance(value, list):
        raise DataError(path, line, field, f"expected a list of strings, got "
                        f"{type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if allow_empty_items and isinstance(v, str):
            out.append(v)
        else:
            out.append(_text(v, path, line, f"{field}[{i}]"))
    return out


# The official `preprocess_data` (openrlhf/datasets/sft_dataset.py) takes the first of these
# keys whose value has its type: "answer" a string, "answers" a list, "golden_answers" a list.
ANSWER_TYPES = {"answer": str, "answers": list, "golden_answers": list}
# ... and the documents from the first of these that holds a list.
DOC_KEYS = ("docs", "context", "content")


def _answers(rec: dict, path: str, line: int, prefer_golden: bool = False) -> list[str]:
    """The record's answers (first = target), from the first key of ANSWER_KEYS (reversed
    with prefer_golden) whose value has the official type; DataError naming the first key
    present with another type, or "answer" when none is present."""
    keys = ANSWER_KEYS[::-1] if prefer_golden else ANSWER_KEYS
    for key in keys:
        if isinstance(rec.get(key), ANSWER_TYPES[key]):
            value = rec[key]
            texts = _texts([value] if isinstance(value, str) else value, path, line, key)
            if not texts:
                raise DataError(path, line, key, "has no answer")
            return texts
    for key in keys:
        if key in rec:
            kind = "a string" if ANSWER_TYPES[key] is str else "a list of strings"
            raise DataError(path, line, key, f"expected {kind}, got {type(rec[key]).__name__}")
    raise DataError(path, line, "answer", f"missing (one of {ANSWER_KEYS} is required)")


def _docs(rec: dict, path: str, line: int) -> list[str]:
    """The record's documents: the first of DOC_KEYS holding a list (as officially); DataError
    naming the first key present otherwise, or "docs" when none is."""
    key = next((k for k in DOC_KEYS if isinstance(rec.get(k), list)), None)
    if key is None:
        key = next((k for k in DOC_KEYS if k in rec), None)
        if key is None:
            raise DataError(path, line, "docs", f"missing (one of {DOC_KEYS} is required)")
    docs = _texts(rec[key], path, line, key)
    if not docs:
        raise DataError(path, line, key, "has no document")
    return docs


def normalise(rec: Any, fmt: str, path: str, line: int, *, k: int | None = None,
              num_candidates: int | None = None) -> dict:
    """Validates one parsed record and returns it normalised:

    pretrain -> {"data_type", "questions": [str], "answers": [str], "docs": [str]}
    text     -> {"text": str, "id": str (default: the source), "prompt": str (if given)}
    others   -> {"question": str, "docs": [str], "answers": [str] (first = target),
                 "pos_index": [int]}
    plus "source": "file:line". `k` (instruct) / `num_candidates` (end_to_end, eval) fix
    len(docs) when given.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; known: {FORMATS}")
    if not isinstance(rec, dict):
        raise DataError(path, line, "record", f"expected a JSON object, got {type(rec).__name__}")
    source = f"{path}:{line}"
    if fmt == "text":
        if "text" not in rec:
            raise DataError(path, line, "text", "missing")
        doc_id = rec.get("id", source)
        if not isinstance(doc_id, (str, int)):
            raise DataError(path, line, "id", f"expected a string, got {type(doc_id).__name__}")
        text = _text(rec["text"], path, line, "text")
        out = {"text": text, "id": str(doc_id), "source": source}
        if "prompt" in rec:
            prompt = _text(rec["prompt"], path, line, "prompt")
            if not text.startswith(prompt) or len(prompt) == len(text):
                raise DataError(path, line, "prompt", "must be a proper prefix of text")
            out["prompt"] = prompt
        return out
    if fmt == "pretrain":
        kind = rec.get("data_type", "qa")   # the official default
        if kind not in ("qa", "paraphrase"):
            raise DataError(path, line, "data_type", f"must be 'qa' or 'paraphrase', got {kind!r}")
        if kind == "qa" and "question" not in rec:
            raise DataError(path, line, "question", "missing")
        docs = _docs(rec, path, line)
        answers = _answers(rec, path, line)
        if kind == "qa":
            questions = _texts(rec["question"], path, line, "question")
            if not questions:
                raise DataError(path, line, "question", "has no question")
            if len(questions) != len(answers):
                raise DataError(path, line, "answers", f"{len(answers)} answers for "
                                f"{len(questions)} questions")
        else:
            # The official code ignores a paraphrase record's question.
            questions = _texts(rec["question"], path, line, "question", allow_empty_items=True) \
                if isinstance(rec.get("question"), list) else []
        return {"data_type": kind, "questions": questions, "answers": answers, "docs": docs,
                "source": source}

    if "question" not in rec:
        raise DataError(path, line, "question", "missing")
    question = _text(rec["question"], path, line, "question")
    docs = _docs(rec, path, line)
    expected = k if fmt == "instruct" else num_candidates
    if expected is not None and len(docs) != expected:
        what = "k" if fmt == "instruct" else "num_candidates"
        raise DataError(path, line, "docs", f"has {len(docs)} documents, the config's {what} "
                        f"is {expected}")
    # The official evaluation scores against golden_answers (all aliases) when a row has it.
    answers = _answers(rec, path, line, prefer_golden=fmt == "eval")
    pos = rec.get("pos_index", [])
    if pos is None:
        pos = []
    if not isinstance(pos, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                            for p in pos):
        raise DataError(path, line, "pos_index", "expected a list of integers")
    bad = [p for p in pos if not 0 <= p < len(docs)]
    if bad:
        raise DataError(path, line, "pos_index", f"{bad} out of range for {len(docs)} docs")
    return {"question": question, "docs": docs, "answers": answers, "pos_index": list(pos),
            "source": source}


def read_jsonl(paths: str | Sequence[str], fmt: str, *, k: int | None = None,
               num_candidates: int | None = None, skip_invalid: bool = False
               ) -> tuple[list[dict], ReadReport]:
    """Reads and validates every line of the files (in order). Returns (records, report)."""
    report = ReadReport()
    records: list[dict] = []
    for path in expand_paths(paths):
        for line_no, raw in _lines(path):
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, line_no, "bytes", f"not UTF-8 ({e.reason} at byte "
                                    f"{e.start})") from None
                if not text.strip():
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(path, line_no, "json", f"not JSON ({e.msg}, column "
                                    f"{e.colno})") from None
                records.append(normalise(rec, fmt, path, line_no, k=k,
                                         num_candidates=num_candidates))
            except DataError as e:
                if not skip_invalid:
                    raise
                report.skipped.append(str(e))
    report.records = len(records)
    return records, report


def _lines(path: str) -> Iterable[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            yield i, raw.rstrip(b"\r\n")
