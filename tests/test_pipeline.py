"""grain pipelines: exact arrays from the prompt builders, static shapes, host shards,
restorable iterator state."""

import dataclasses
import os

import numpy as np
import pytest

from clara_jax.clara import prompts
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data import pipeline

WORDS = "ana bo cy was born in the city of zan rok firm founded by year who where what".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.RandomState(0)
    lines = [" ".join(rng.choice(WORDS, 8)) for _ in range(500)]
    path = train_sentencepiece(lines, str(tmp_path_factory.mktemp("sp") / "sp"), 300)
    return ClaraTokenizer.from_file(path, n_mem=4)


def e2e_records(n, n_cand=5):
    rng = np.random.RandomState(1)
    return [{"question": f"who was born in {i}?",
             "docs": [" ".join(rng.choice(WORDS, rng.randint(3, 30))) for _ in range(n_cand)],
             "answers": [f"ana {i}"], "pos_index": [i % n_cand], "source": f"x:{i + 1}"}
            for i in range(n)]


SPEC = pipeline.FeatureSpec(stage="end_to_end", doc_max_length=16, n_mem=4, max_len=320, k=2,
                            num_candidates=5)


def test_features_equal_prompt_builders_and_shapes_are_static(tok):
    recs = e2e_records(10)
    ds = pipeline.make_dataset(recs, tok, SPEC, batch_size=4, shuffle=False, num_epochs=1)
    shapes = pipeline.feature_shapes(SPEC, 4)
    batches = list(ds)
    assert len(batches) == 2  # drop_remainder
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == shapes
    first = batches[0]
    ids, mask, _ = prompts.encode_documents(tok, recs[0]["docs"], 16, 4)
    np.testing.assert_array_equal(first["doc_ids"][0], ids)
    dec = prompts.end_to_end(tok, [recs[0]["question"]], ["ana 0"], k=2, max_len=320)
    np.testing.assert_array_equal(first["prompt_ids"][0], dec.input_ids[0])
    np.testing.assert_array_equal(first["labels"][0], dec.labels[0])
    assert first["pos_mask"][0].tolist() == [1, 0, 0, 0, 0]
    assert first["truncated_docs"].sum() > 0  # documents of up to 30 words exceed 16 tokens


def test_hosts_see_disjoint_complete_shards(tok):
    recs = e2e_records(12)
    seen = []
    for host in range(2):
        ds = pipeline.make_dataset(recs, tok, SPEC, batch_size=2, shuffle=True, seed=3,
                                   num_epochs=1, shard_index=host, shard_count=2)
        seen.append(sorted(int(i) for b in ds for i in b["index"]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_epochs_reshuffle_and_seed_fixes_order(tok):
    recs = e2e_records(8)
    order = lambda seed: [int(i) for b in pipeline.make_dataset(
        recs, tok, SPEC, batch_size=4, seed=seed, num_epochs=2) for i in b["index"]]
    a, b = order(0), order(0)
    assert a == b and sorted(a[:8]) == list(range(8)) and a[:8] != a[8:]
    assert order(1) != a


def test_restored_iterator_continues_exactly(tok):
    recs = e2e_records(12)
    ds = pipeline.make_dataset(recs, tok, SPEC, batch_size=3, seed=5)
    it = pipeline.make_iterator(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = pipeline.make_iterator(pipeline.make_dataset(recs, tok, SPEC, batch_size=3, seed=5))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_spec_validation():
    with pytest.raises(ValueError, match="larger than num_candidates"):
        pipeline.FeatureSpec(stage="end_to_end", doc_max_length=16, n_mem=4, max_len=64, k=6,
                             num_candidates=5)
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.FeatureSpec(stage="stage7", doc_max_length=16, n_mem=4, max_len=64, k=1)


def test_worker_processes_give_the_same_batches(tok):
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    recs = e2e_records(12)
    ds = lambda: pipeline.make_dataset(recs, tok, SPEC, batch_size=3, seed=2)
    plain = pipeline.make_iterator(ds())
    workers = pipeline.make_iterator(ds(), worker_count=2)
    for _ in range(6):
        a, b = next(plain), next(workers)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_pretrain_and_instruct_features_equal_prompt_builders(tok):
    pre = [{"data_type": "qa", "questions": ["who was born?", "where?"],
            "answers": ["ana", "zan"], "docs": ["ana was born in zan"], "source": "p:1"},
           {"data_type": "paraphrase", "questions": [], "answers": ["zan is where ana was born"],
            "docs": ["ana was born in zan"], "source": "p:2"}]
    spec = pipeline.FeatureSpec(stage="pretrain", doc_max_length=16, n_mem=4, max_len=320, k=1)
    (b,) = list(pipeline.make_dataset(pre, tok, spec, batch_size=2, shuffle=False,
                                      num_epochs=1))
    qa = prompts.pretrain_qa(tok, [pre[0]["questions"]], [pre[0]["answers"]], k=1, max_len=320)
    np.testing.assert_array_equal(b["prompt_ids"][0], qa.input_ids[0])
    np.testing.assert_array_equal(b["labels"][0], qa.labels[0])
    instruction = pipeline.Featurize(pre, tok, spec).map(1)["prompt_ids"]
    assert (instruction != b["prompt_ids"][0]).any()
    ins = [{"question": "who?", "docs": ["ana was born", "bo was born"], "answers": ["ana"],
            "pos_index": [0], "source": "i:1"}] * 2
    spec = pipeline.FeatureSpec(stage="instruct", doc_max_length=16, n_mem=4, max_len=320, k=2)
    (b,) = list(pipeline.make_dataset(ins, tok, spec, batch_size=2, shuffle=False, num_epochs=1))
    ref = prompts.instruct(tok, ["who?"], ["ana"], k=2, max_len=320)
    np.testing.assert_array_equal(b["prompt_ids"][1], ref.input_ids[0])
    np.testing.assert_array_equal(b["labels"][1], ref.labels[0])
    docs, _, _ = prompts.encode_documents(tok, ins[0]["docs"], 16, 4)
    np.testing.assert_array_equal(b["doc_ids"][0], docs)


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                      "ml-clara-examples", "pretrain_data.jsonl")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="../shared example data not present")
def test_official_example_flows_through_the_pipeline(tok):
    from clara_jax.data import formats
    records, _ = formats.read_jsonl(SHARED, "pretrain")
    spec = pipeline.FeatureSpec(stage="pretrain", doc_max_length=64, n_mem=4, max_len=1024, k=1)
    it = iter(pipeline.make_dataset(records, tok, spec, batch_size=8, num_epochs=1))
    shapes = pipeline.feature_shapes(spec, 8)
    for _ in range(3):
        b = next(it)
        assert {k: v.shape for k, v in b.items()} == shapes
        assert b["truncated_docs"].sum() > 0  # ~95-word documents exceed 64 tokens


def test_prompt_cut_before_its_answer_is_an_error_naming_the_record(tok):
    recs = e2e_records(2)
    prompt, _ = prompts.answer_strings(tok, recs[0]["question"], None, 2)
    cut = len(tok.encode(prompt))  # room for the prompt, none for the answer
    spec = pipeline.FeatureSpec(stage="end_to_end", doc_max_length=16, n_mem=4, max_len=cut,
                                k=2, num_candidates=5)
    ds = pipeline.make_dataset(recs, tok, spec, batch_size=2, shuffle=False, num_epochs=1)
    with pytest.raises(ValueError, match=rf"x:1: the prompt \(\d+ tokens with its answer\) is "
                                         rf"cut at max_len={cut} before any answer token"):
        next(iter(ds))
    spec = spec._replace(max_len=24) if hasattr(spec, "_replace") else dataclasses.replace(
        spec, max_len=24)
    ds = pipeline.make_dataset(recs, tok, spec, batch_size=2, shuffle=False, num_epochs=1)
    with pytest.raises(ValueError, match=r"x:1: .*memory slots do not fit in max_len=24"):
        next(iter(ds))


def test_pack_text_adds_bos_eos_once(tok):
    plain = "ana was born in zan"
    chat = prompts.mistral_chat("who", "where", "zan")  # "<s> [INST] ... zan</s>"
    one = tok.encode(plain, add_bos=True, add_eos=True) + tok.encode(chat)
    rows = pipeline.pack_text([plain, chat] * 40, tok, 64)
    assert tok.encode(chat)[0] == tok.bos_id and tok.encode(chat)[-1] == tok.eos_id
    np.testing.assert_array_equal(rows[0, :len(one)], one)


def test_pack_text_never_splits_a_text_and_ignores_padding(tok):
    texts = [f"text {i}" + " zan ana" * (i % 5) for i in range(60)]
    encoded = [tok.encode(t, add_bos=True, add_eos=True) for t in texts]
    assert max(map(len, encoded)) <= 48
    rows = pipeline.pack_text(texts, tok, 48)
    # Reading the rows back, texts come out whole and in order; only row tails are padding.
    found = []
    for r in rows:
        r = list(r)
        body = r[:r.index(-1)] if -1 in r else r
        assert all(x == -1 for x in r[len(body):])
        while body:
            n = body.index(tok.eos_id) + 1
            found.append(body[:n])
            body = body[n:]
    assert found == encoded
    long = pipeline.pack_text(["ana " * 80], tok, 48)          # longer than a row: cut
    assert long.shape[0] >= 2 and (long[0] >= 0).all()
    batch = next(iter(pipeline.text_dataset(rows, batch_size=4, pad_id=tok.pad_id,
                                            shuffle=False)))
    pad = rows[:4] < 0
    assert (batch["labels"][pad] == prompts.IGNORE_INDEX).all()
    assert (batch["ids"][pad] == tok.pad_id).all()
    np.testing.assert_array_equal(batch["ids"][~pad], rows[:4][~pad])

def test_pack_text_prompts_are_context_without_loss(tok):
    """A text with a prompt: its prompt tokens keep their ids in `ids` but get no label; the
    rest (answer and </s>) is labelled; a text without a prompt is labelled throughout."""
    prompt = prompts.mistral_chat("who", "where was ana born")
    text = prompts.mistral_chat("who", "where was ana born", "zan")
    plain = "ana was born in zan"
    rows = pipeline.pack_text([text, plain], tok, 64, [prompt, None])
    batch = next(iter(pipeline.text_dataset(rows, batch_size=1, pad_id=tok.pad_id,
                                            shuffle=False)))
    ids_text, ids_plain = tok.encode(text), tok.encode(plain, add_bos=True, add_eos=True)
    n_prompt = len(tok.encode(prompt))
    n = len(ids_text) + len(ids_plain)
    np.testing.assert_array_equal(batch["ids"][0, :n], ids_text + ids_plain)
    labels = batch["labels"][0]
    assert (labels[:n_prompt] == prompts.IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[n_prompt:len(ids_text)], ids_text[n_prompt:])
    np.testing.assert_array_equal(labels[len(ids_text):n], ids_plain)
    assert (labels[n:] == prompts.IGNORE_INDEX).all()
    # Without prompts the rows are exactly those of plain packing.
    np.testing.assert_array_equal(pipeline.pack_text([text, plain], tok, 64),
                                  pipeline.pack_text([text, plain], tok, 64, [None, None]))
    cut = "ana wa"     # ends inside a word: its last piece is not one of the text's
    assert tok.encode(plain)[:len(tok.encode(cut))] != tok.encode(cut)
    with pytest.raises(ValueError, match="does not tokenize as the start of its text"):
        pipeline.pack_text([plain], tok, 64, [cut])
    with pytest.raises(ValueError, match="1 prompts for 2 texts"):
        pipeline.pack_text([text, plain], tok, 64, [None])
    # A prompted text longer than a row is refused (a cut would leave its answers without
    # their prompt), naming it; without a prompt it is cut into row-sized pieces.
    n_text = len(ids_text)
    with pytest.raises(ValueError, match=rf"text 1: {n_text} tokens with a prompt do not fit "
                                         rf"in max_len {n_text - 1}"):
        pipeline.pack_text([plain, text], tok, n_text - 1, [None, prompt])
    assert pipeline.pack_text([text], tok, n_text - 1).shape[0] == 2
