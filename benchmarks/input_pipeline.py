"""Input pipeline throughput per stage on the synthetic corpus (it must never be the
bottleneck).

    python benchmarks/input_pipeline.py [--batches 30 --batch_size 16 --workers 0]

Tokenisation + prompt building + padding + batching through grain, from JSONL records; reports
batches/s and tokens/s (non-padding tokens of documents, queries and prompts) per stage.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args()

    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
    from clara_jax.data import formats, pipeline, synthetic

    tmp = tempfile.mkdtemp()
    synthetic.generate_corpus(tmp, seed=0, num_entities=240)
    lines = open(os.path.join(tmp, "pretrain_text.txt")).read().splitlines()
    tok = ClaraTokenizer.from_file(train_sentencepiece(lines, os.path.join(tmp, "sp"), 1024),
                                   n_mem=16)
    stages = [("pretrain", "pretrain_train.jsonl", 1), ("instruct", "instruct_train.jsonl", 5),
              ("end_to_end", "end_to_end_train.jsonl", 5)]
    rows = []
    for stage, fname, k in stages:
        records, _ = formats.read_jsonl(os.path.join(tmp, fname), pipeline.STAGE_FORMAT[stage])
        spec = pipeline.FeatureSpec(stage=stage, doc_max_length=64, n_mem=16, max_len=512, k=k,
                                    num_candidates=20)
        it = pipeline.make_iterator(pipeline.make_dataset(records, tok, spec,
                                                          batch_size=a.batch_size),
                                    worker_count=a.workers)
        next(it)
        t, tokens = time.perf_counter(), 0
        for _ in range(a.batches):
            b = next(it)
            tokens += int(sum(np.sum(b[key]) for key in b if key.endswith("mask")))
        secs = time.perf_counter() - t
        rows.append({"stage": stage, "batch": a.batch_size, "batches/s": a.batches / secs,
                     "examples/s": a.batches * a.batch_size / secs, "tokens/s": tokens / secs})
    common.print_table(rows, ["stage", "batch", "batches/s", "examples/s", "tokens/s"])
    common.write_json(a.json_out, rows)


if __name__ == "__main__":
    main()
