"""TFDS datasets of CLaRa's JSONL formats, prepared once to array_record and read back as
random-access data sources (no TensorFlow needed).

    builder = clara_builder("end_to_end", ["train.jsonl"], data_dir, eval_files=["eval.jsonl"])
    builder.download_and_prepare()          # validates every line (formats.py), writes once
    source = builder.as_data_source(split="train")
    records = RecordSource(source)           # records[i] -> the normalised record dict

Each example stores the normalised record as JSON text plus its `file:line`; the dataset
version and the source files' sizes and modification times are in the builder's metadata,
so a changed input is prepared again under a new config name rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import tensorflow_datasets as tfds

from clara_jax.data import formats

DATASET_VERSION = "1.0.0"
NAMES = {"pretrain": "clara_pretrain", "instruct": "clara_instruct",
         "end_to_end": "clara_end_to_end", "eval": "clara_eval"}


def _fingerprint(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def clara_builder(fmt: str, train_files: str | Sequence[str], data_dir: str, *,
                  eval_files: str | Sequence[str] = (), k: int | None = None,
                  num_candidates: int | None = None) -> tfds.core.GeneratorBasedBuilder:
    """A TFDS builder (array_record) for JSONL files of one official format."""
    if fmt not in NAMES:
        raise ValueError(f"unknown data format {fmt!r}; known: {sorted(NAMES)}")
    splits = {"train": formats.expand_paths(train_files)}
    if eval_files:
        splits["eval"] = formats.expand_paths(eval_files)
    all_files = [p for files in splits.values() for p in files]
    config_name = f"k{k or 0}_n{num_candidates or 0}_{_fingerprint(all_files)}"

    with tfds.core.registered.skip_registration():
        builder_cls = _builder_class(fmt, splits, all_files, config_name, k, num_candidates)
    return builder_cls(data_dir=data_dir, config=config_name, file_format="array_record")


def _builder_class(fmt, splits, all_files, config_name, k, num_candidates):
    """A GeneratorBasedBuilder subclass for one set of input files (not registered)."""

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = NAMES[fmt]
        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "CLaRa JSONL records, normalised by "
                                          "clara_jax.data.formats."}
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name,
                                                   description=f"{fmt} from {all_files}")]

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self, description=f"CLaRa {fmt} records", disable_shuffling=True,
                features=tfds.features.FeaturesDict({"record": tfds.features.Text(),
                                                     "source": tfds.features.Text()}),
                metadata=tfds.core.MetadataDict(format=fmt, files=all_files, k=k or 0,
                                                num_candidates=num_candidates or 0))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {name: self._generate_examples(files) for name, files in splits.items()}

        def _generate_examples(self, files):
            records, _ = formats.read_jsonl(files, fmt, k=k, num_candidates=num_candidates)
            for i, rec in enumerate(records):
                yield i, {"record": json.dumps(rec, ensure_ascii=False), "source": rec["source"]}

    return Builder


class RecordSource:
    """Random access to normalised records in a TFDS data source (grain-compatible)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        text = self.source[index]["record"]
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


def prepared_records(fmt: str, train_files, data_dir: str, split: str = "train", **kw
                     ) -> RecordSource:
    """Prepares (once) and opens one split as a RecordSource."""
    builder = clara_builder(fmt, train_files, data_dir, **kw)
    builder.download_and_prepare()
    return RecordSource(builder.as_data_source(split=split))
