"""An opened corpus index (see `clara_jax.infer.index` for building one): its layout, the
settings that must match the model that reads it, and exact top-k search over it.

Layout of an index directory:
  meta.json            settings (encoder fingerprint, compress_rate, doc_max_length, n_mem,
                       hidden, dtype, chunk_size), the input's identity, document and
                       truncation counts, and one entry per chunk with its checksums
  chunk_00000.npy      memory states [rows, n_mem, hidden] of documents 0 .. chunk_size - 1
  chunk_00000.jsonl    their {"id", "text"}, one per line
Every chunk holds chunk_size documents except the last. States are read back lazily
(memory-mapped), so corpora larger than memory work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax import parallel
from clara_jax.clara.retrieval import l2_normalize

META = "meta.json"
FORMAT_VERSION = 1
STATE_DTYPES = ("float32", "float16")
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
    without `EXECUTION_FIELDS`). `model` is a `Clara` (or anything with `model_config`,
    `params`, `adapters`)."""
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


# -- files --------------------------------------------------------------------------------------

def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_meta(directory: str) -> dict | None:
    """An index directory's meta.json, or None (nothing built there yet)."""
    return read_json(os.path.join(directory, META))


def differences(meta: dict, expected: dict) -> list[str]:
    """One line per setting whose recorded value differs from `expected`."""
    return [f"{k}: index has {meta.get(k)!r}, expected {v!r}" for k, v in expected.items()
            if meta.get(k) != v]


def default_mesh() -> Mesh:
    """All local devices on the batch (data) axis."""
    return parallel.make_mesh([-1, 1, 1], jax.local_devices())


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
    meta = read_meta(directory)
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
        diffs = differences(meta, expected)
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
