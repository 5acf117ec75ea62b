"""grain input pipelines: records -> fixed-shape numpy batches for each CLaRa stage.

    records (formats.read_jsonl, or a TFDS data source) -> MapDataset of record indices
      -> shard by host (process_index / process_count) -> shuffle(seed), reshuffled per epoch
      -> featurize (tokenise, build prompts, pad to static lengths) -> batch(drop_remainder)
      -> IterDataset (optional worker processes and prefetch); iterator state is restorable

Every array has a shape fixed by the config, so the train step compiles once. Features per
example (see `clara_jax.clara.losses` for how they are used):
  pretrain / instruct: doc_ids, doc_mask [k, Le]; prompt_ids, prompt_mask, labels [L]
  end_to_end / retrieval_pretrain / eval: query_ids, query_mask [Lq]; doc_ids, doc_mask
      [N, Le]; pos_mask [N]; prompt_ids, prompt_mask, labels [L] (k = generation_top_k slots)
  all: truncated_docs, truncated_prompt (counts, for the metrics); index (record position)
with Le = doc_max_length + 3 + n, Lq = query_max_length + 3 + n, L = max_len.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import grain
import numpy as np

from clara_jax.clara import prompts
from clara_jax.clara.tokenizer import ClaraTokenizer

# The one stage -> data format (`formats.read_jsonl`) table. base_lm trains on the text of
# the pretrain records' documents (packed by `pack_text`, not featurised).
STAGE_FORMAT = {"pretrain": "pretrain", "instruct": "instruct", "end_to_end": "end_to_end",
                "retrieval_pretrain": "end_to_end", "eval": "eval", "base_lm": "pretrain"}
FEATURE_STAGES = tuple(s for s in STAGE_FORMAT if s != "base_lm")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Static lengths of one stage's features (tokens)."""

    stage: str
    doc_max_length: int
    n_mem: int
    max_len: int
    k: int                     # documents in the prompt
    num_candidates: int = 0    # stage 3 / eval: candidates per question
    query_max_length: int = 0  # stage 3: query encoder text length (0 -> doc_max_length)
    sep: bool = True           # memory-slot stride n + 1 (n without; prompts.build_decoder_batch)

    def __post_init__(self):
        if self.stage not in FEATURE_STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; known: {sorted(FEATURE_STAGES)}")
        if self.stage in ("end_to_end", "retrieval_pretrain", "eval"):
            if self.num_candidates <= 0:
                raise ValueError(f"stage {self.stage} needs num_candidates > 0")
            if self.k > self.num_candidates:
                raise ValueError(f"k ({self.k}) is larger than num_candidates "
                                 f"({self.num_candidates})")


class Featurize(grain.transforms.Map):
    """Normalised record -> dict of fixed-shape int32 arrays (see the module docstring)."""

    def __init__(self, records: Sequence[dict], tokenizer: ClaraTokenizer, spec: FeatureSpec,
                 seed: int = 0):
        self.records, self.tok, self.spec, self.seed = records, tokenizer, spec, seed

    def map(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        rec = self.records[index]
        spec, tok = self.spec, self.tok
        out: dict[str, np.ndarray] = {"index": np.int32(index)}
        doc_ids, doc_mask, cut_docs = prompts.encode_documents(
            tok, rec["docs"], spec.doc_max_length, spec.n_mem)
        out.update(doc_ids=doc_ids, doc_mask=doc_mask)
        if spec.stage == "pretrain":
            if len(rec["docs"]) != spec.k:
                raise ValueError(f"{rec['source']}: docs: {len(rec['docs'])} documents, the "
                                 f"pretrain stage is configured for {spec.k}")
            if rec["data_type"] == "qa":
                pair = prompts.qa_strings(tok, rec["questions"], rec["answers"], spec.k)
            else:
                # The official code draws the instruction with random.choice; here it is a
                # deterministic function of (seed, record index) so runs are reproducible.
                instruction = random.Random(self.seed * 1_000_003 + index).randrange(
                    len(prompts.PARAPHRASE_INSTRUCTIONS))
                pair = prompts.paraphrase_strings(tok, rec["answers"][0], spec.k, instruction)
        else:
            pair = prompts.answer_strings(tok, rec["question"], rec["answers"][0], spec.k)
        try:
            dec = prompts.build_decoder_batch(tok, [pair], spec.k, spec.max_len, sep=spec.sep)
        except ValueError as e:
            raise ValueError(f"{rec['source']}: {e}") from None
        if not (dec.labels[0] != prompts.IGNORE_INDEX).any():
            need = len(tok.encode(pair[1]))
            raise ValueError(f"{rec['source']}: the prompt ({need} tokens with its answer) is "
                             f"cut at max_len={spec.max_len} before any answer token; raise "
                             f"config.max_len (or shorten the documents / k)")
        out.update(prompt_ids=dec.input_ids[0], prompt_mask=dec.attention_mask[0],
                   labels=dec.labels[0])
        cut_prompt = dec.n_truncated
        if spec.stage in ("end_to_end", "retrieval_pretrain", "eval"):
            q_ids, q_mask, cut_q = prompts.encode_documents(
                tok, [rec["question"]], spec.query_max_length or spec.doc_max_length, spec.n_mem)
            pos = np.zeros((spec.num_candidates,), np.int32)
            pos[rec["pos_index"]] = 1
            out.update(query_ids=q_ids[0], query_mask=q_mask[0], pos_mask=pos)
            cut_prompt += cut_q
        out.update(truncated_docs=np.int32(cut_docs), truncated_prompt=np.int32(cut_prompt))
        return out


def featurize_batch(records: Sequence[dict], tokenizer: ClaraTokenizer, spec: FeatureSpec,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Every record (normalised, as `data.formats.normalise` makes them) featurized and stacked:
    one batch [len(records), ...] for `clara_jax.clara.losses.stage_loss(spec.stage)`, without
    a dataset (a loss on a few examples, tests)."""
    featurize = Featurize(records, tokenizer, spec, seed)
    rows = [featurize.map(i) for i in range(len(records))]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def make_dataset(records: Sequence[dict], tokenizer: ClaraTokenizer, spec: FeatureSpec, *,
                 batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                 drop_remainder: bool = True) -> grain.MapDataset:
    """A batched MapDataset over this host's shard of `records` (a list, or any random-access
    source such as `tfds_builders.RecordSource`; records are read lazily by index).

    Shard i of n holds records i, i + n, ... (so hosts see disjoint, complete shards); with
    `shuffle` each epoch is a new permutation of the shard, fixed by `seed`. num_epochs None
    repeats forever.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    ds = grain.MapDataset.range(len(records))[shard_index::shard_count]
    if len(ds) < batch_size and drop_remainder:
        raise ValueError(f"{len(ds)} records on this host is fewer than one batch of "
                         f"{batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(Featurize(records, tokenizer, spec, seed))
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_iterator(ds: grain.MapDataset, worker_count: int = 0, prefetch: int = 2
                  ) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state()` / `set_state(state)`), optionally with worker
    processes (multiprocessing prefetch) for tokenisation."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def host_shard() -> tuple[int, int]:
    """(process_index, process_count) of this host in a multi-host JAX job."""
    import jax
    return jax.process_index(), jax.process_count()


def feature_shapes(spec: FeatureSpec, batch_size: int) -> dict[str, tuple[int, ...]]:
    """The static shape of every batched feature (for ahead-of-time compilation)."""
    le = spec.doc_max_length + 3 + spec.n_mem
    shapes: dict[str, Any] = {"index": (batch_size,), "prompt_ids": (batch_size, spec.max_len),
                              "prompt_mask": (batch_size, spec.max_len),
                              "labels": (batch_size, spec.max_len),
                              "truncated_docs": (batch_size,), "truncated_prompt": (batch_size,)}
    if spec.stage in ("end_to_end", "retrieval_pretrain", "eval"):
        lq = (spec.query_max_length or spec.doc_max_length) + 3 + spec.n_mem
        shapes.update(doc_ids=(batch_size, spec.num_candidates, le),
                      doc_mask=(batch_size, spec.num_candidates, le),
                      query_ids=(batch_size, lq), query_mask=(batch_size, lq),
                      pos_mask=(batch_size, spec.num_candidates))
    else:
        shapes.update(doc_ids=(batch_size, spec.k, le), doc_mask=(batch_size, spec.k, le))
    return shapes


def pack_text(lines: Sequence[str], tokenizer: ClaraTokenizer, max_len: int,
              prompts: Sequence[str | None] | None = None) -> np.ndarray:
    """Tokenises texts as `<s> text </s>` and packs them into rows [R, max_len] (int32) for
    base-LM pretraining. A text never straddles two rows (a question keeps the documents it
    is about in its context): it starts a new row when it does not fit in what is left of the
    current one, and the rest of that row is padding, marked -1 (`text_dataset` turns it into
    the pad id with an ignored label). A text longer than max_len is cut into max_len pieces;
    one with a prompt raises ValueError instead (its later pieces would miss their context).
    A text that already starts with `<s>` or ends with `</s>` (a chat-formatted example) is
    not given a second one.

    prompts: per text, None (loss on every token) or a prefix of the text whose tokens are
    context only: they are stored as -2 - id, and `text_dataset` gives them no label. The
    prompt's tokens must be the first tokens of the text's (true when the rest starts with a
    space); otherwise ValueError."""
    rows: list[list[int]] = []
    current: list[int] = []
    prompts = [None] * len(lines) if prompts is None else prompts
    if len(prompts) != len(lines):
        raise ValueError(f"{len(prompts)} prompts for {len(lines)} texts")
    for n, (line, prompt) in enumerate(zip(lines, prompts)):
        text = line.strip()
        if not text:
            continue
        ids = tokenizer.encode(text, add_bos=not text.startswith(tokenizer.bos_token),
                               add_eos=not text.endswith(tokenizer.eos_token))
        if prompt:
            head = tokenizer.encode(prompt.strip(), add_bos=not text.startswith(
                tokenizer.bos_token))
            if ids[:len(head)] != head:
                raise ValueError(f"the prompt {prompt[:40]!r}... does not tokenize as the "
                                 f"start of its text")
            ids = [-2 - i for i in head] + ids[len(head):]
            if len(ids) > max_len:   # its pieces after the first would lose their context
                raise ValueError(f"text {n}: {len(ids)} tokens with a prompt do not fit in "
                                 f"max_len {max_len} (raise max_len or shorten the text)")
        if len(current) + len(ids) > max_len and current:
            rows.append(current)
            current = []
        while len(ids) > max_len:
            rows.append(ids[:max_len])
            ids = ids[max_len:]
        current.extend(ids)
    if current:
        rows.append(current)
    if not rows:
        raise ValueError("no text to pack: every line is empty")
    out = np.full((len(rows), max_len), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def text_dataset(rows: np.ndarray, *, batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1) -> grain.MapDataset:
    """Batches {"ids", "labels": [B, max_len]} of packed text rows (`pack_text`; padding
    becomes `pad_id` in ids and IGNORE_INDEX in labels, prompt tokens keep their id and get
    IGNORE_INDEX), sharded and shuffled like `make_dataset`."""
    ds = grain.MapDataset.source(rows)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)

    def features(r):
        r = np.asarray(r, np.int32)
        ids = np.where(r == -1, pad_id, np.where(r < -1, -2 - r, r))
        return {"ids": ids.astype(np.int32),
                "labels": np.where(r < 0, prompts.IGNORE_INDEX, r).astype(np.int32)}

    return ds.map(features).batch(batch_size, drop_remainder=True)
