"""A run's data: its files (or the synthetic corpus generated into the work directory), the
records read in the stage's format (`pipeline.STAGE_FORMAT`), the grain datasets of this
host's shard, and the split of a pipeline batch into what the step reads and host extras."""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.errors import UserError
from clara_jax.data import formats, pipeline, synthetic

# The batch features whose ones are tokens the step reads (encoder and decoder inputs).
TOKEN_MASKS = ("doc_mask", "query_mask", "prompt_mask")


class Data(NamedTuple):
    """The datasets of this host's shard (batches of batch_size / hosts rows) and what the
    loop needs to know of them."""

    train: Any                       # grain dataset, repeating
    eval: Any | None                 # one pass, or None without eval files
    n_train: int                     # training rows (for the epoch count)
    train_records: list[dict] = []   # the records (CLaRa stages; for the candidate cache)
    eval_records: list[dict] = []
    k_instruct: int | None = None    # documents per instruct record


def data_files(c: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """The run's files by role: train / eval JSONL, text. Generates the synthetic corpus into
    `{workdir}/data` when config.data.train_files is empty."""
    if c.data.train_files:
        for role in ("train", "eval"):
            for path in formats.expand_paths(c.data[f"{role}_files"] or []):
                if os.path.getsize(path) == 0:
                    raise UserError(f"config.data.{role}_files: {path} is empty")
        return {"train": c.data.train_files, "eval": c.data.eval_files or "",
                "text": c.data.train_files}
    out = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        synthetic.generate_corpus(out, seed=c.seed, num_entities=c.data.synthetic_entities,
                                  num_candidates=c.num_candidates, k=c.generation_top_k,
                                  multi_hop=c.generation_top_k >= 2)
    fmt = pipeline.STAGE_FORMAT[c.stage]
    return {"train": os.path.join(out, f"{fmt}_train.jsonl"),
            "eval": os.path.join(out, f"{fmt}_eval.jsonl"),
            "text": os.path.join(out, "pretrain_text.txt")}


def text_records(c: ml_collections.ConfigDict, files: dict[str, str]
                 ) -> tuple[list[str], list[str | None]]:
    """The run's texts (a tokenizer's training text; base_lm's corpus) and, per text, its
    loss-free prompt (or None): lines of .txt files, {"text", "prompt"} JSONL for base_lm,
    the documents of the stage's records otherwise."""
    out, prompts = [], []
    for path in formats.expand_paths(files["text"]):
        if path.endswith(".txt"):
            with open(path) as f:
                out.extend(f.read().splitlines())
        elif c.stage == "base_lm":  # JSONL {"text": ...}: texts that may hold newlines
            recs, _ = formats.read_jsonl(path, "text", skip_invalid=c.data.skip_invalid)
            out.extend(r["text"] for r in recs)
            prompts.extend(r.get("prompt") for r in recs)
        else:
            recs, _ = formats.read_jsonl(path, pipeline.STAGE_FORMAT[c.stage],
                                         skip_invalid=True)
            out.extend(d for r in recs for d in r["docs"])
        prompts.extend([None] * (len(out) - len(prompts)))
    return out, prompts


def text_lines(c: ml_collections.ConfigDict, files: dict[str, str]) -> list[str]:
    """The texts of `text_records`."""
    return text_records(c, files)[0]


def read_records(c: ml_collections.ConfigDict, files: str, workdir: str, role: str
                 ) -> list[dict]:
    """Records of `files` in the stage's format; invalid lines listed in
    `{workdir}/skipped_{role}.txt` when config.data.skip_invalid lets them be skipped."""
    fmt = pipeline.STAGE_FORMAT[c.stage]
    records, report = formats.read_jsonl(
        files, fmt, num_candidates=c.num_candidates if fmt != "instruct" else None,
        skip_invalid=c.data.skip_invalid)
    if report.skipped:
        path = os.path.join(workdir, f"skipped_{role}.txt")
        report.write_skipped(path)
        print(f"{role}: skipped {len(report.skipped)} invalid lines (listed in {path})")
    return records


def feature_spec(c: ml_collections.ConfigDict, n_mem: int, k_instruct: int
                 ) -> pipeline.FeatureSpec:
    """The static feature lengths of a CLaRa stage's batches."""
    k = {"pretrain": c.pretrain_k, "instruct": k_instruct}.get(c.stage, c.generation_top_k)
    return pipeline.FeatureSpec(stage=c.stage, doc_max_length=c.doc_max_length, n_mem=n_mem,
                                max_len=c.max_len, k=k, num_candidates=c.num_candidates,
                                query_max_length=c.query_max_length, sep=c.sep)


def stage_data(c: ml_collections.ConfigDict, files: dict[str, str], tok: ClaraTokenizer,
               workdir: str) -> Data:
    """A CLaRa stage's featurised datasets (host shard) of the train / eval JSONL files."""
    shard_index, shard_count = pipeline.host_shard()
    local_bs = c.batch_size // shard_count
    train_records = read_records(c, files["train"], workdir, "train")
    at_least_one_batch(len(range(shard_index, len(train_records), shard_count)), local_bs,
                       files["train"], "train")
    k_instruct = len(train_records[0]["docs"]) if c.stage == "instruct" else c.generation_top_k
    spec = feature_spec(c, tok.n_mem, k_instruct)
    train_ds = pipeline.make_dataset(train_records, tok, spec, batch_size=local_bs, seed=c.seed,
                                     shard_index=shard_index, shard_count=shard_count)
    eval_ds, eval_records = None, []
    if files["eval"]:
        eval_records = read_records(c, files["eval"], workdir, "eval")
        at_least_one_batch(len(range(shard_index, len(eval_records), shard_count)), local_bs,
                           files["eval"], "eval")
        eval_ds = pipeline.make_dataset(eval_records, tok, spec, batch_size=local_bs,
                                        shuffle=False, num_epochs=1, shard_index=shard_index,
                                        shard_count=shard_count)
    return Data(train_ds, eval_ds, len(train_records), train_records, eval_records, k_instruct)


def at_least_one_batch(n: int, batch_size: int, files: str, role: str) -> None:
    """UserError naming the files when `n` records (of this host) are fewer than one batch."""
    if n < batch_size:
        raise UserError(f"config.data.{role}_files: {files} holds {n} usable records (per "
                        f"host), fewer than one batch of {batch_size}")


RANKING_STAGES = ("end_to_end", "retrieval_pretrain")


def split_batch(batch: dict, stage: str, candidates=None, record_rows=None
                ) -> tuple[dict, dict]:
    """A pipeline batch -> (what the step reads, host-side extras: the truncation counts).
    `pos_mask` stays in the batch of the stages that rank candidates (end_to_end,
    retrieval_pretrain: retrieval pretraining's loss reads it, and both steps compute recall@k
    from it); with the stage-3 candidate cache, candidate ids become `doc_index`."""
    batch = dict(batch)
    extras = {key: batch.pop(key, 0) for key in ("truncated_docs", "truncated_prompt")}
    if stage not in RANKING_STAGES:
        batch.pop("pos_mask", None)
    if candidates is not None:
        batch = candidates.swap_in(batch, record_rows)
    batch.pop("index", None)
    return batch, extras


def local_batch_to_global(batch: dict, sharding_fn: Callable[[int], Any],
                          candidates=None) -> dict:
    """This host's batch as global arrays (`sharding_fn(ndim)`: the batch sharding); with a
    CandidateCache, plus its `doc_table`."""
    out = {k: jax.make_array_from_process_local_data(sharding_fn(v.ndim), np.asarray(v))
           for k, v in batch.items()}
    if candidates is not None:
        out["doc_table"] = candidates.table
    return out
