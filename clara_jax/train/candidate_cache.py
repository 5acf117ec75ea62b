"""Stage 3 against cached compressed candidates (`config.end_to_end.cache_candidates`).

The encoder is frozen in stage 3, so every distinct candidate document of the training and
eval data is compressed once (eval mode, no dropout) before training, through the corpus
index code (`clara_jax.infer.index`: batched, sharded, resumable, checksummed, stamped with
the encoder fingerprint, compress_rate and doc_max_length) into `{workdir}/candidate_cache`,
keyed by the sha256 of the document text. The states are then held on the devices as one
table [num_distinct_docs, n, hidden] (replicated over the mesh), and each batch carries
`doc_index` [B, N] (rows of that table) instead of candidate token ids, so the step gathers
states instead of running the encoder (`losses.candidate_states`).

A cache built by another encoder, compression setting or data set is refused (delete the
directory to rebuild it); a valid one is reused; an interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax.infer.index import build_index

CACHE_DIR = "candidate_cache"


def doc_key(text: str) -> str:
    """The cache key of a document: sha256 (hex) of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def distinct_documents(*record_lists: Sequence[dict]) -> list[dict]:
    """Every distinct candidate text of the records (`docs` lists) in first-seen order, as
    {"id": doc_key(text), "text": text}."""
    seen: dict[str, str] = {}
    for records in record_lists:
        for rec in records:
            for text in rec["docs"]:
                seen.setdefault(doc_key(text), text)
    return [{"id": k, "text": t} for k, t in seen.items()]


@dataclasses.dataclass
class CandidateCache:
    """table: states [U, n, hidden] on the devices; rows: doc_key -> table row."""

    table: jax.Array
    rows: dict[str, int]

    def record_rows(self, records: Sequence[dict]) -> np.ndarray:
        """Table rows [R, N] (int32) of each record's candidates, in order."""
        try:
            return np.asarray([[self.rows[doc_key(t)] for t in rec["docs"]]
                               for rec in records], np.int32)
        except KeyError:
            raise KeyError("a candidate document is not in the candidate cache (built from "
                           "other data)") from None

    @staticmethod
    def swap_in(batch: dict, record_rows: np.ndarray) -> dict:
        """A pipeline batch with `doc_ids` / `doc_mask` replaced by `doc_index` [B, N], looked
        up by the batch's record positions (`index`)."""
        out = {k: v for k, v in batch.items() if k not in ("doc_ids", "doc_mask")}
        out["doc_index"] = record_rows[np.asarray(batch["index"])]
        return out


def build_candidate_cache(model, record_lists: Sequence[Sequence[dict]], directory: str, *,
                          batch_size: int, mesh: Mesh, chunk_size: int = 4096,
                          progress: bool = True) -> CandidateCache:
    """Compresses (or reuses) every distinct candidate of `record_lists` with `model`'s
    encoder adapter (a `Clara`) and returns the device-resident table (model compute dtype,
    replicated over `mesh`). ValueError when `directory` holds a cache of another encoder,
    compress_rate, doc_max_length or data set."""
    docs = distinct_documents(*record_lists)
    try:
        index = build_index(model, docs, directory, batch_size=batch_size,
                            chunk_size=chunk_size, mesh=mesh, progress=progress)
    except ValueError as e:
        if "holds an index of another input or model" not in str(e):
            raise
        raise ValueError(f"stale candidate cache: {e}") from None
    states = index.all_states().astype(jnp.dtype(model.model_config.dtype))
    table = jax.device_put(states, NamedSharding(mesh, PartitionSpec()))
    return CandidateCache(table, {d["id"]: i for i, d in enumerate(docs)})
