"""A compressed corpus index: every document's memory-token states, computed once, on disk.

    index = build_index(clara, "docs.jsonl", "INDEX")     # resumable; python -m clara_jax.compress_corpus
    index = open_index("INDEX", model=clara)             # verifies settings and checksums
    doc_ids, scores, rows = search(clara, index, ["Who founded Zan?"], k=5)
    states = index.states(rows[0])                       # [k, n, hidden] for the generator

Layout of an index directory:
  meta.json            settings (encoder fingerprint, compress_rate, doc_max_length, n_mem,
                       hidden, dtype, chunk_size), the input's identity, document and
                       truncation counts, and one entry per chunk with its checksums
  chunk_00000.npy      memory states [rows, n_mem, hidden] of documents 0 .. chunk_size - 1
  chunk_00000.jsonl    their {"id", "text"}, one per line
Every chunk holds chunk_size documents except the last. Chunk files are written to a temporary
name and renamed, then meta.json (also renamed into place) records them, so an interrupted
build leaves only complete chunks and a rerun continues after the last one. States are read
back lazily (memory-mapped), so corpora larger than memory work.

On several hosts (`jax.distributed`, or `host=(index, count)` given by hand) host h compresses
chunks h, h + count, ... on its own devices into the same directory (a shared file system),
recording them in `host_{h}_of_{count}.json`; once every chunk is recorded, meta.json is
written (by host 0 after a barrier under jax.distributed) and the index is the same, byte for
byte, as a one-host build.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax import parallel
from clara_jax.clara import prompts
from clara_jax.clara.compress import compress_jit, map_in_padded_batches
from clara_jax.clara.retrieval import l2_normalize
from clara_jax.model.mistral import parameter_shardings

META = "meta.json"
FORMAT_VERSION = 1
STATE_DTYPES = ("float32", "float16")
# Settings that must match between an index and the model / build that uses it.
# Model-config fields that change how, not what, is computed (left out of the fingerprint).
EXECUTION_FIELDS = ("scan_layers", "remat_policy", "attention_impl", "max_position_embeddings")


# -- the encoder's identity --------------------------------------------------------------------

def _hash_tree(h, tree: Any, prefix: str) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{prefix}{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape};".encode())
        h.update(np.ascontiguousarray(arr).tobytes())


def encoder_fingerprint(model) -> str:
    """sha256 (hex) of what decides a document's memory states besides its text: the encoder
    adapter arrays, the base embedding table and the base shape and dtypes (model config
    without `EXECUTION_FIELDS`). `model` is a
    `Clara` (or anything with `model_config`, `params`, `adapters`)."""
    h = hashlib.sha256()
    shape = {k: v for k, v in model.model_config.to_dict().items() if k not in EXECUTION_FIELDS}
    h.update(json.dumps(shape, sort_keys=True).encode())
    _hash_tree(h, model.adapters["encoder"], "encoder")
    _hash_tree(h, model.params["embed_tokens"], "embed_tokens")
    return h.hexdigest()


def model_settings(model, dtype: str = "float32") -> dict:
    """The index settings a model produces (compared with an index's meta.json)."""
    return {"fingerprint": encoder_fingerprint(model),
            "compress_rate": model.config.compress_rate,
            "doc_max_length": model.config.doc_max_length, "n_mem": model.config.n_mem,
            "hidden": model.model_config.hidden_size, "dtype": dtype}


# -- input documents ---------------------------------------------------------------------------

def _file_identity(path: str) -> tuple[str, int]:
    """(sha256 of the file's bytes, number of non-blank lines), read in one streaming pass."""
    h = hashlib.sha256()
    count = 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            count += bool(line.strip())
    return h.hexdigest(), count


def read_docs(path: str) -> Iterator[dict]:
    """Documents of a file, lazily: JSONL rows {"id": str, "text": str}, or a .txt file with
    one document per line (id `name:line`). Bad rows raise ValueError naming file:line:field."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".txt"):
                yield {"id": f"{name}:{lineno}", "text": line.rstrip("\n")}
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object with id and text")
            for field in ("id", "text"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ValueError(f"{path}:{lineno}: {field}: missing, empty or not a string")
            yield {"id": row["id"], "text": row["text"]}


def _docs_source(docs: str | Sequence) -> tuple[dict, int, Iterable[dict]]:
    """(input identity for meta.json, number of documents, iterator of {"id", "text"})."""
    if isinstance(docs, (str, os.PathLike)):
        path = os.path.abspath(docs)
        digest, count = _file_identity(path)
        return {"source": path, "sha256": digest}, count, read_docs(path)
    rows = []
    for i, d in enumerate(docs):
        row = {"id": str(i), "text": d} if isinstance(d, str) else {"id": d["id"],
                                                                     "text": d["text"]}
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError(f"documents[{i}]: text is empty or not a string")
        rows.append(row)
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["id"], r["text"]]).encode() + b"\n")
    return {"source": "<list>", "sha256": h.hexdigest()}, len(rows), rows


# -- files ---------------------------------------------------------------------------------------

def _write_atomic(path: str, data: bytes) -> str:
    """Writes bytes to path via a temporary file + rename; returns their sha256."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _read_meta(directory: str) -> dict | None:
    return _read_json(os.path.join(directory, META))


def _differences(meta: dict, expected: dict) -> list[str]:
    return [f"{k}: index has {meta.get(k)!r}, expected {v!r}" for k, v in expected.items()
            if meta.get(k) != v]


# -- building ------------------------------------------------------------------------------------

def default_mesh() -> Mesh:
    """All local devices on the batch (data) axis."""
    return parallel.make_mesh([-1, 1, 1], jax.local_devices())


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
    diffs = _differences(meta, settings)
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
    identity, total, rows = _docs_source(docs)
    if total == 0:
        raise ValueError(f"{identity['source']}: no documents")
    settings = {**model_settings(model, dtype), "chunk_size": chunk_size}
    os.makedirs(out_dir, exist_ok=True)
    meta = _read_meta(out_dir)
    if meta is not None:
        _check_same_build(meta, settings, identity, out_dir, "an index")
        if meta["complete"]:
            return open_index(out_dir, model, verify=False)
    host_index, host_count = host or (jax.process_index(), jax.process_count())
    if not 0 <= host_index < host_count:
        raise ValueError(f"host index {host_index} is not in [0, {host_count})")
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
    host_record = _read_json(path)
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
    meta = _read_meta(out_dir)
    return open_index(out_dir, model, verify=False) if meta and meta["complete"] else None


def _compress_chunks(model, rows: Iterable[dict], total: int, todo: Sequence[int],
                     out_dir: str, record, *, batch_size: int, chunk_size: int, dtype: str, mesh: Mesh,
                     max_chunks: int | None, progress: bool, desc: str) -> None:
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
        host_record = _read_json(_host_file(out_dir, h, host_count))
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


# -- reading -------------------------------------------------------------------------------------

@dataclasses.dataclass
class CorpusIndex:
    """An opened index directory (see the module docstring). Rows are global document
    positions 0 .. len - 1 in input order."""

    directory: str
    meta: dict
    _docs_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.meta["num_docs"]

    @property
    def num_chunks(self) -> int:
        return len(self.meta["chunks"])

    @property
    def chunk_size(self) -> int:
        return self.meta["chunk_size"]

    @property
    def state_shape(self) -> tuple[int, int]:
        """(n_mem, hidden) of one document."""
        return self.meta["n_mem"], self.meta["hidden"]

    def chunk_states(self, i: int) -> np.ndarray:
        """States [rows, n_mem, hidden] of chunk i, memory-mapped (read lazily)."""
        return np.load(os.path.join(self.directory, self.meta["chunks"][i]["file"]),
                       mmap_mode="r")

    def chunk_docs(self, i: int) -> list[dict]:
        """The {"id", "text"} of chunk i's documents (the last few chunks read are kept)."""
        if i not in self._docs_cache:
            if len(self._docs_cache) >= 8:
                self._docs_cache.pop(next(iter(self._docs_cache)))
            with open(os.path.join(self.directory, self.meta["chunks"][i]["docs"]),
                      encoding="utf-8") as f:
                self._docs_cache[i] = [json.loads(line) for line in f]
        return self._docs_cache[i]

    def doc(self, row: int) -> dict:
        """{"id", "text"} of global row `row`."""
        return self.chunk_docs(row // self.chunk_size)[row % self.chunk_size]

    def states(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """States [*rows.shape, n_mem, hidden] (float32) of the given global rows."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, *self.state_shape), np.float32)
        flat = rows.reshape(-1)
        for c in np.unique(flat // self.chunk_size):
            sel = np.nonzero(flat // self.chunk_size == c)[0]
            out[sel] = self.chunk_states(int(c))[flat[sel] % self.chunk_size]
        return out.reshape(*rows.shape, *self.state_shape)

    def all_states(self) -> np.ndarray:
        """Every document's states [len, n_mem, hidden] (float32) in one array (small indexes)."""
        return np.concatenate([np.asarray(self.chunk_states(i), np.float32)
                               for i in range(self.num_chunks)])


def open_index(directory: str, model=None, *, verify: bool = True) -> CorpusIndex:
    """Opens an index; with `model`, refuses one built with another encoder, compress_rate or
    doc_max_length. Every chunk must exist with the recorded shape; with `verify`, its
    checksums must match. Errors name the directory, the chunk file and what is wrong."""
    meta = _read_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"{directory}: no {META} (not a corpus index)")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory}/{META}: format {meta.get('format')!r}, this code reads "
                         f"{FORMAT_VERSION}")
    if not meta["complete"]:
        raise ValueError(f"{directory}: incomplete index ({meta['num_docs']} documents so far); "
                         f"rerun the build to resume it")
    if model is not None:
        expected = model_settings(model, meta["dtype"])
        diffs = _differences(meta, expected)
        if diffs:
            raise ValueError(f"{directory}: built with another encoder or settings than this "
                             f"model: " + "; ".join(diffs))
    n, d = meta["n_mem"], meta["hidden"]
    for i, ch in enumerate(meta["chunks"]):
        for key, sha_key in (("file", "sha256"), ("docs", "docs_sha256")):
            path = os.path.join(directory, ch[key])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: chunk {i} is missing")
            if verify and _file_sha256(path) != ch[sha_key]:
                raise ValueError(f"{path}: chunk {i} is corrupt (sha256 mismatch)")
        path = os.path.join(directory, ch["file"])
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"{path}: chunk {i} is unreadable ({e})") from None
        want = (ch["rows"], n, d)
        if arr.shape != want or arr.dtype != np.dtype(meta["dtype"]):
            raise ValueError(f"{path}: chunk {i} has shape {arr.shape} {arr.dtype}, expected "
                             f"{want} {meta['dtype']}")
        if i < len(meta["chunks"]) - 1 and ch["rows"] != meta["chunk_size"]:
            raise ValueError(f"{path}: chunk {i} has {ch['rows']} rows, expected "
                             f"{meta['chunk_size']}")
    if sum(ch["rows"] for ch in meta["chunks"]) != meta["num_docs"]:
        raise ValueError(f"{directory}/{META}: chunk rows do not add up to num_docs "
                         f"{meta['num_docs']}")
    return CorpusIndex(os.path.abspath(directory), meta)


# -- retrieval -----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("k",))
def _merge_topk(queries: jax.Array, docs: jax.Array, n_valid: jax.Array, offset: jax.Array,
                best_scores: jax.Array, best_rows: jax.Array, k: int
                ) -> tuple[jax.Array, jax.Array]:
    """Running exact top-k: queries [B, F] (unit norm), docs [C, F] of which the first n_valid
    are real, global rows offset .. offset + C - 1; best_* [B, k] -> updated [B, k]."""
    d = l2_normalize(docs.astype(jnp.float32))
    scores = jnp.einsum("bf,cf->bc", queries, d, precision=jax.lax.Precision.HIGHEST)
    c = docs.shape[0]
    scores = jnp.where(jnp.arange(c)[None] < n_valid, scores, -jnp.inf)
    rows = jnp.broadcast_to(offset + jnp.arange(c, dtype=jnp.int32), scores.shape)
    top, pos = jax.lax.top_k(jnp.concatenate([best_scores, scores], 1), k)
    return top, jnp.take_along_axis(jnp.concatenate([best_rows, rows], 1), pos, 1)


def search(model, index: CorpusIndex, questions: Sequence[str], k: int,
           mesh: Mesh | None = None) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Exact top-k documents of the index for each question by cosine with the query
    reasoner (`model.encode_questions`), chunk by chunk, each chunk's documents sharded over
    the mesh's batch axes. Returns (doc ids [B][k], scores [B, k], rows [B, k]), descending."""
    if k <= 0 or k > len(index):
        raise ValueError(f"k={k} must be in [1, {len(index)}] (the index's document count)")
    n, d = index.state_shape
    if model.config.n_mem != n or model.model_config.hidden_size != d:
        raise ValueError(f"index states are [n={n}, hidden={d}], the model's are "
                         f"[n={model.config.n_mem}, hidden={model.model_config.hidden_size}]")
    mesh = mesh or default_mesh()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    c = -(-index.chunk_size // shards) * shards
    doc_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    q = l2_normalize(jnp.asarray(model.encode_questions(questions), jnp.float32))
    q = jax.device_put(q, NamedSharding(mesh, PartitionSpec()))
    b = q.shape[0]
    best_scores = jnp.full((b, k), -jnp.inf, jnp.float32)
    best_rows = jnp.full((b, k), -1, jnp.int32)
    for i in range(index.num_chunks):
        states = index.chunk_states(i)
        rows = states.shape[0]
        padded = np.zeros((c, n * d), np.float32)
        padded[:rows] = states.reshape(rows, n * d)
        best_scores, best_rows = _merge_topk(
            q, jax.device_put(padded, doc_sharding), jnp.int32(rows),
            jnp.int32(i * index.chunk_size), best_scores, best_rows, k)
    scores, rows = np.asarray(best_scores), np.asarray(best_rows)
    ids = [[index.doc(int(r))["id"] for r in row] for row in rows]
    return ids, scores, rows
