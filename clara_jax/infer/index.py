"""A compressed corpus index: every document's memory-token states, computed once, on disk.

    index = build_index(clara, "docs.jsonl", "INDEX")     # resumable (compress_corpus CLI)
    index = open_index("INDEX", model=clara)             # verifies settings and checksums
    doc_ids, scores, rows = search(clara, index, ["Who founded Zan?"], k=5)
    states = index.states(rows[0])                       # [k, n, hidden] for the generator

This module builds an index; reading it (`CorpusIndex`, `open_index`, `search`, the layout of
the directory) is `clara_jax.infer.corpus_index`, whose names are importable from here too.

Every chunk holds chunk_size documents except the last. Chunk files are written to a temporary
name and renamed, then meta.json (also renamed into place) records them, so an interrupted
build leaves only complete chunks and a rerun continues after the last one.

On several hosts (`jax.distributed`, or `host=(index, count)` given by hand) host h compresses
chunks h, h + count, ... on its own devices into the same directory (a shared file system),
recording them in `host_{h}_of_{count}.json`; once every chunk is recorded, meta.json is
written (by host 0 after a barrier under jax.distributed) and the index is the same, byte for
byte, as a one-host build.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from clara_jax import parallel
from clara_jax.clara import prompts
from clara_jax.clara.compress import compress_jit, map_in_padded_batches
from clara_jax.data.corpus import iter_corpus, read_corpus, scan_corpus
from clara_jax.errors import UserError
from clara_jax.infer.corpus_index import (
    FORMAT_VERSION, META, STATE_DTYPES, CorpusIndex, default_mesh, differences,
    encoder_fingerprint, model_settings, open_index, read_json, read_meta, search)
from clara_jax.model.mistral import parameter_shardings

# The index API: building here, reading and search from corpus_index.
__all__ = ["CorpusIndex", "build_index", "compress_texts", "default_mesh", "encoder_fingerprint",
           "model_settings", "open_index", "read_docs", "search"]


# -- input documents ---------------------------------------------------------------------------

def read_docs(path: str) -> Iterator[dict]:
    """Documents {"id", "text"} of a JSONL or .txt corpus file, lazily (the rules:
    `clara_jax.data.corpus`). Bad lines raise UserError naming file:line: field."""
    return iter_corpus(path)


def _docs_source(docs: str | Sequence, chunk_size: int
                 ) -> tuple[dict, int, Iterable[dict]]:
    """(input identity for meta.json, number of documents, iterator of {"id", "text"}).

    A file is read whole first (every line validated, counted, hashed) and read again as
    the chunks are written, each chunk checked against that first pass before it is
    compressed, so a bad line is found before anything is written and a file changed
    meanwhile never ends up in a chunk."""
    if isinstance(docs, (str, os.PathLike)):
        scan = scan_corpus(os.path.abspath(docs), every=chunk_size)
        return ({"source": scan.path, "sha256": scan.sha256}, scan.num_docs,
                read_corpus(scan))
    rows = []
    for i, d in enumerate(docs):
        row = {"id": str(i), "text": d} if isinstance(d, str) else {"id": d["id"],
                                                                     "text": d["text"]}
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"documents[{i}]: text is empty or not a string")
        rows.append(row)
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["id"], r["text"]]).encode() + b"\n")
    return {"source": "<list>", "sha256": h.hexdigest()}, len(rows), rows


# -- writing ----------------------------------------------------------------------------------

def _write_atomic(path: str, data: bytes) -> str:
    """Writes bytes to path via a temporary file + rename; returns their sha256."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


# -- building ------------------------------------------------------------------------------------

def _placed_params(model, mesh: Mesh) -> tuple[dict, dict]:
    """The base and the encoder adapter laid out on `mesh` by the logical-axis rules."""
    shardings, _ = parameter_shardings(model.model_config, model.config.lora, mesh)
    return (jax.device_put(model.params, shardings["params"]),
            jax.device_put(model.adapters["encoder"], shardings["lora"]))


def compress_texts(model, texts: Sequence[str], *, batch_size: int, mesh: Mesh,
                   placed: tuple[dict, dict] | None = None) -> tuple[np.ndarray, int]:
    """Memory states [len(texts), n, hidden] (float32, eval mode) and the number of texts cut
    to doc_max_length. Batches of `batch_size` (rounded up to a multiple of the mesh's batch
    shards; the last one padded) are sharded over the mesh's data x fsdp axes."""
    cfg = model.config
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = -(-batch_size // shards) * shards
    base, enc = placed or _placed_params(model, mesh)
    ids, mask, n_cut = prompts.encode_documents(model.tokenizer, list(texts), cfg.doc_max_length,
                                                cfg.n_mem)
    sharding = parallel.batch_sharding(mesh, 2)

    def states(cid: np.ndarray, cmask: np.ndarray) -> jax.Array:
        with parallel.axis_rules(mesh):
            return compress_jit(model.model, base, enc, jax.device_put(cid, sharding),
                                jax.device_put(cmask, sharding), cfg.n_mem)[0]

    return map_in_padded_batches(states, ids, mask, bs).astype(np.float32), n_cut


def _write_chunk(model, batch: list[dict], out_dir: str, i: int, dtype: str, *,
                 batch_size: int, mesh: Mesh, placed: tuple[dict, dict]) -> dict:
    """Compresses one chunk's documents and writes chunk_{i}.npy / .jsonl (atomically);
    returns its meta.json entry."""
    states, n_cut = compress_texts(model, [d["text"] for d in batch], batch_size=batch_size,
                                   mesh=mesh, placed=placed)
    buf = io.BytesIO()
    np.save(buf, states.astype(np.dtype(dtype)), allow_pickle=False)
    sha = _write_atomic(os.path.join(out_dir, f"chunk_{i:05d}.npy"), buf.getvalue())
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in batch)
    docs_sha = _write_atomic(os.path.join(out_dir, f"chunk_{i:05d}.jsonl"),
                             lines.encode("utf-8"))
    return {"file": f"chunk_{i:05d}.npy", "docs": f"chunk_{i:05d}.jsonl", "rows": len(batch),
            "sha256": sha, "docs_sha256": docs_sha, "truncated": n_cut}


def _check_same_build(meta: dict, settings: dict, identity: dict, out_dir: str,
                      what: str) -> None:
    """ValueError naming every difference between a recorded build and this one."""
    diffs = differences(meta, settings)
    if meta.get("input", {}).get("sha256") != identity["sha256"]:
        diffs.append(f"input: index was built from {meta.get('input', {}).get('source')} "
                     f"(sha256 {meta.get('input', {}).get('sha256', '')[:12]}), this is "
                     f"{identity['source']} (sha256 {identity['sha256'][:12]})")
    if diffs:
        raise ValueError(f"{out_dir} holds {what} of another input or model; delete it or "
                         f"choose another directory. Differences: " + "; ".join(diffs))


def build_index(model, docs: str | Sequence, out_dir: str, *, batch_size: int = 64,
                chunk_size: int = 4096, dtype: str = "float32", mesh: Mesh | None = None,
                max_chunks: int | None = None, progress: bool = True,
                host: tuple[int, int] | None = None) -> "CorpusIndex | None":
    """Compresses every document of `docs` (a JSONL / .txt path, a list of strings or of
    {"id", "text"}) once with `model`'s encoder adapter and writes the index to out_dir.

    Resumes after the last complete chunk when out_dir holds a partial build of the same
    input with the same model and settings; refuses (ValueError naming what differs) when it
    holds another one. `max_chunks` stops after writing that many chunks in this call
    (returns None if the index is not complete yet). host (index, count), by default
    (jax.process_index(), jax.process_count()): with count > 1 this process compresses
    chunks index, index + count, ... and returns None while other hosts' chunks are missing
    (see the module docstring). Returns the opened index.
    """
    if dtype not in STATE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {STATE_DTYPES}")
    if chunk_size <= 0 or batch_size <= 0:
        raise ValueError(f"chunk_size ({chunk_size}) and batch_size ({batch_size}) must be "
                         f"positive")
    identity, total, rows = _docs_source(docs, chunk_size)
    if total == 0:
        raise UserError(f"{identity['source']}: no documents")
    settings = {**model_settings(model, dtype), "chunk_size": chunk_size}
    host_index, host_count = host or (jax.process_index(), jax.process_count())
    if not 0 <= host_index < host_count:
        raise ValueError(f"host index {host_index} is not in [0, {host_count})")
    # Only now, with the input read whole and the arguments checked, is out_dir touched.
    os.makedirs(out_dir, exist_ok=True)
    meta = read_meta(out_dir)
    if meta is not None:
        _check_same_build(meta, settings, identity, out_dir, "an index")
        if meta["complete"]:
            return open_index(out_dir, model, verify=False)
    other = sorted(f for f in os.listdir(out_dir) if f.startswith("host_") and
                   f.endswith(".json") and not f.endswith(f"_of_{host_count:03d}.json"))
    if other:
        raise ValueError(f"{out_dir} holds a partial build on another number of hosts "
                         f"({other[0]}); finish it with that many or delete it")
    if host_count > 1 and meta is not None:
        raise ValueError(f"{out_dir} holds a partial one-host build; finish it on one host "
                         f"or delete it")
    n_chunks = -(-total // chunk_size)
    kw = dict(batch_size=batch_size, chunk_size=chunk_size, dtype=dtype,
              mesh=mesh or default_mesh(), max_chunks=max_chunks, progress=progress)

    if host_count == 1:
        # meta.json is the record: its chunks are always the first ones, in order.
        if meta is None:
            meta = {"format": FORMAT_VERSION, **settings, "input": identity, "num_docs": 0,
                    "truncated_docs": 0, "complete": False, "chunks": []}

        def record(i: int, entry: dict) -> None:
            meta["chunks"].append(entry)
            meta.update(num_docs=meta["num_docs"] + entry["rows"],
                        truncated_docs=meta["truncated_docs"] + entry["truncated"],
                        complete=len(meta["chunks"]) == n_chunks)
            _write_atomic(os.path.join(out_dir, META), json.dumps(meta, indent=1).encode())

        todo = range(len(meta["chunks"]), n_chunks)
        _compress_chunks(model, rows, total, todo, out_dir, record, desc="compress", **kw)
        return open_index(out_dir, model, verify=False) if meta["complete"] else None

    # Several hosts: each records its chunks in its own host file.
    path = _host_file(out_dir, host_index, host_count)
    host_record = read_json(path)
    if host_record is None:
        host_record = {"format": FORMAT_VERSION, **settings, "input": identity, "chunks": {}}
    else:
        _check_same_build(host_record, settings, identity, out_dir, f"a host file ({path})")

    def record(i: int, entry: dict) -> None:
        host_record["chunks"][str(i)] = entry
        _write_atomic(path, json.dumps(host_record, indent=1).encode())

    todo = [i for i in range(host_index, n_chunks, host_count)
            if str(i) not in host_record["chunks"]]
    _compress_chunks(model, rows, total, todo, out_dir, record,
                     desc=f"compress (host {host_index} of {host_count})", **kw)
    distributed = jax.process_count() > 1
    if distributed:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("clara_jax.index: chunks written")
    if not distributed or jax.process_index() == 0:
        _merge_host_files(out_dir, settings, identity, total, n_chunks, host_count)
    if distributed:
        multihost_utils.sync_global_devices("clara_jax.index: meta written")
    meta = read_meta(out_dir)
    return open_index(out_dir, model, verify=False) if meta and meta["complete"] else None


def _compress_chunks(model, rows: Iterable[dict], total: int, todo: Sequence[int],
                     out_dir: str, record, *, batch_size: int, chunk_size: int, dtype: str,
                     mesh: Mesh, max_chunks: int | None, progress: bool, desc: str) -> None:
    """Compresses and writes the chunks `todo` (ascending indices; chunk i = rows
    i * chunk_size ..), calling record(i, entry) after each; stops after max_chunks. The bar
    counts documents (docs/s)."""
    wanted = set(list(todo)[:max_chunks])
    if not wanted:
        return
    placed = _placed_params(model, mesh)
    bar = None
    if progress:
        from tqdm import tqdm
        docs = sum(min(chunk_size, total - i * chunk_size) for i in wanted)
        bar = tqdm(total=docs, unit="doc", desc=desc, dynamic_ncols=True,
                   mininterval=1.0)
    it = iter(rows)
    try:
        for i in range(max(wanted) + 1):
            batch = list(itertools.islice(it, chunk_size))
            if i in wanted:
                record(i, _write_chunk(model, batch, out_dir, i, dtype, batch_size=batch_size,
                                       mesh=mesh, placed=placed))
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def _host_file(out_dir: str, host_index: int, host_count: int) -> str:
    return os.path.join(out_dir, f"host_{host_index:03d}_of_{host_count:03d}.json")


def _merge_host_files(out_dir: str, settings: dict, identity: dict, total: int,
                      n_chunks: int, host_count: int) -> None:
    """Writes meta.json from the host files once together they record every chunk."""
    entries: dict[int, dict] = {}
    for h in range(host_count):
        host_record = read_json(_host_file(out_dir, h, host_count))
        if host_record is None:
            return
        entries.update({int(i): e for i, e in host_record["chunks"].items()})
    if sorted(entries) != list(range(n_chunks)):
        return
    chunks = [entries[i] for i in range(n_chunks)]
    meta = {"format": FORMAT_VERSION, **settings, "input": identity, "num_docs": total,
            "truncated_docs": sum(c["truncated"] for c in chunks), "complete": True,
            "chunks": chunks}
    _write_atomic(os.path.join(out_dir, META), json.dumps(meta, indent=1).encode())


