"""TFDS builders: array_record preparation and data sources give back exactly the records
the JSONL readers give, and the grain pipeline reads them to the same arrays."""

import numpy as np
import pytest

from clara_jax.data import formats, pipeline, synthetic, tfds_builders


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    synthetic.generate_corpus(str(out), seed=0, num_entities=40, num_candidates=6, k=3)
    return out


@pytest.mark.parametrize("fmt,stem,kw", [
    ("pretrain", "pretrain", {}), ("instruct", "instruct", {"k": 3}),
    ("end_to_end", "end_to_end", {"num_candidates": 6}), ("eval", "end_to_end", {})])
def test_round_trip_through_array_record(corpus, tmp_path, fmt, stem, kw):
    train = str(corpus / f"{stem}_train.jsonl")
    ev = str(corpus / f"{stem}_eval.jsonl")
    builder = tfds_builders.clara_builder(fmt, train, str(tmp_path), eval_files=ev, **kw)
    builder.download_and_prepare()
    assert str(builder.info.version) == tfds_builders.DATASET_VERSION
    assert any(p.name.endswith(tuple(f"array_record-{i:05d}-of-00001" for i in range(1)))
               or "array_record" in p.name for p in builder.data_path.iterdir())
    for split, path in (("train", train), ("eval", ev)):
        expected, _ = formats.read_jsonl(path, fmt, **kw)
        source = tfds_builders.RecordSource(builder.as_data_source(split=split))
        assert len(source) == len(expected)
        assert [source[i] for i in range(len(source))] == expected


def test_pipeline_from_tfds_equals_pipeline_from_jsonl(corpus, tmp_path):
    from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
    lines = open(corpus / "pretrain_text.txt").read().splitlines()
    tok = ClaraTokenizer.from_file(train_sentencepiece(lines, str(tmp_path / "sp"), 400), 4)
    path = str(corpus / "end_to_end_train.jsonl")
    spec = pipeline.FeatureSpec(stage="end_to_end", doc_max_length=32, n_mem=4, max_len=320,
                                k=2, num_candidates=6)
    records, _ = formats.read_jsonl(path, "end_to_end")
    source = tfds_builders.prepared_records("end_to_end", path, str(tmp_path / "tfds"))
    a = list(pipeline.make_dataset(records, tok, spec, batch_size=4, num_epochs=1, seed=1))
    b = list(pipeline.make_dataset(source, tok, spec, batch_size=4, num_epochs=1, seed=1))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_bad_input_fails_at_prepare_time(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "docs": ["a"], "answer": "x"}\n{oops\n')
    builder = tfds_builders.clara_builder("instruct", str(bad), str(tmp_path / "d"))
    with pytest.raises(formats.DataError, match=r"bad.jsonl:2: json"):
        builder.download_and_prepare()
