"""Corpus files for an index (`compress_corpus --input`, `answer --docs`): one reader, used
alike to count, fingerprint and read the documents, so the three always agree.

    scan = scan_corpus("docs.txt", every=4096)      # whole-file check: count, sha256, marks
    for doc in read_corpus(scan):                   # {"id": str, "text": str}, in file order
        ...

Rules (docs/data.md, "Corpus files"):
  - lines end at b"\\n" only; one trailing b"\\r" (CRLF files) is dropped;
  - every line must be UTF-8 (else `UserError` naming file:line and the byte's column);
  - a line is blank when `text.strip()` is empty by Unicode rules (`str.isspace`: spaces,
    tabs, U+00A0 no-break space, ...): blank lines are skipped and hold no document;
  - `.txt`: one document per line, id `{file name}:{line number}` (1-based, blank lines
    counted), text the line as is, except that a lone "\\r" inside it becomes a space (so an
    old Mac line end never splits or joins documents);
  - any other suffix: JSONL, one object per line with non-empty string fields "id" and
    "text" (other fields ignored); a lone "\\r" outside a JSON string is JSON whitespace, one
    inside a string is refused by the JSON parser.
The fingerprint is the sha256 of the file's bytes, read in the same pass as the documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterator

from clara_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class CorpusScan:
    """One whole pass over a corpus file: what a later read must find again.

    sha256: of the file's bytes; num_docs: non-blank lines; marks[j]: sha256 of the bytes up
    to and including the line of document min((j + 1) * every, num_docs) (1-based)."""
    path: str
    sha256: str
    num_docs: int
    every: int
    marks: tuple[str, ...]


def _parse(path: str, name: str, line_no: int, raw: bytes, is_txt: bool) -> dict | None:
    """The document of one raw line (with its b"\\n"), or None for a blank line."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{line_no}: bytes: not UTF-8 ({e.reason} at byte "
                        f"{e.start + 1} of the line)") from None
    if not text.strip():
        return None
    if is_txt:
        return {"id": f"{name}:{line_no}", "text": text.replace("\r", " ")}
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_no}: json: not JSON ({e.msg}, column {e.colno})"
                        ) from None
    if not isinstance(row, dict):
        raise UserError(f"{path}:{line_no}: json: expected an object with id and text")
    for field in ("id", "text"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise UserError(f"{path}:{line_no}: {field}: missing, empty or not a string")
    return {"id": row["id"], "text": row["text"]}


def iter_corpus(path: str, hasher=None) -> Iterator[dict]:
    """Documents {"id", "text"} of a .txt or JSONL corpus, lazily, in file order (rules in
    the module docstring). `hasher` (a hashlib object), if given, is fed every byte of the
    file; when a document is yielded it has seen exactly the bytes up to its line's end."""
    name = os.path.basename(path)
    is_txt = path.endswith(".txt")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):   # binary lines end at b"\n" only
            if hasher is not None:
                hasher.update(raw)
            doc = _parse(path, name, line_no, raw, is_txt)
            if doc is not None:
                yield doc


def scan_corpus(path: str, every: int = 4096) -> CorpusScan:
    """Reads the whole file once: validates every line (`UserError` naming file:line),
    counts the documents and fingerprints the bytes, with a mark every `every` documents
    (and after the last) for `read_corpus` to check against."""
    if every <= 0:
        raise ValueError(f"every ({every}) must be positive")
    h = hashlib.sha256()
    marks: list[str] = []
    count = 0
    for _ in iter_corpus(path, h):
        count += 1
        if count % every == 0:
            marks.append(h.copy().hexdigest())
    if count % every:
        marks.append(h.copy().hexdigest())
    return CorpusScan(path, h.hexdigest(), count, every, tuple(marks))


def read_corpus(scan: CorpusScan) -> Iterator[dict]:
    """The documents of `scan.path` again, checked against the scan as they are read: a file
    changed since raises `UserError` before the document that closes a differing stretch of
    `scan.every` documents is yielded, so a consumer taking `every` at a time never gets a
    group with content the scan did not see."""
    h = hashlib.sha256()
    count = 0

    def changed(what: str) -> UserError:
        return UserError(f"{scan.path}: changed while being read ({what}); rerun on a file "
                         f"that stays put")

    for doc in iter_corpus(scan.path, h):
        count += 1
        if count > scan.num_docs:
            raise changed(f"more than the {scan.num_docs} documents first counted")
        if count % scan.every == 0 or count == scan.num_docs:
            if h.hexdigest() != scan.marks[(count - 1) // scan.every]:
                raise changed(f"bytes up to document {count} differ")
        yield doc
    if count != scan.num_docs:
        raise changed(f"{count} documents, {scan.num_docs} first counted")
    if h.hexdigest() != scan.sha256:
        raise changed("sha256 differs")
