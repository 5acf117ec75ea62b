"""The synthetic corpus: deterministic, valid in every official format, disjoint splits,
answers present in the positive documents."""

import filecmp
import json
import os

import pytest

from clara_jax.data import formats, synthetic


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, synthetic.generate_corpus(str(out), seed=0, num_entities=80,
                                          num_candidates=12, k=4)


def test_deterministic_for_a_seed(corpus, tmp_path):
    out, info = corpus
    synthetic.generate_corpus(str(tmp_path / "a"), seed=0, num_entities=80, num_candidates=12,
                              k=4)
    synthetic.generate_corpus(str(tmp_path / "b"), seed=1, num_entities=80, num_candidates=12,
                              k=4)
    for name in info["files"]:
        assert filecmp.cmp(out / name, tmp_path / "a" / name, shallow=False), name
    assert not filecmp.cmp(out / "eval.jsonl", tmp_path / "b" / "eval.jsonl", shallow=False)


def test_every_file_reads_in_its_official_format(corpus):
    out, _ = corpus
    for part in ("train", "eval"):
        pre, _ = formats.read_jsonl(str(out / f"pretrain_{part}.jsonl"), "pretrain")
        assert {r["data_type"] for r in pre} == {"qa", "paraphrase"}
        ins, _ = formats.read_jsonl(str(out / f"instruct_{part}.jsonl"), "instruct", k=4)
        e2e, _ = formats.read_jsonl(str(out / f"end_to_end_{part}.jsonl"), "end_to_end",
                                    num_candidates=12)
        assert ins and e2e
        for r in ins + e2e:
            assert r["pos_index"] and any(r["answers"][0] in r["docs"][i] for i in r["pos_index"])
        multi = [r for r in e2e if r["question"].startswith("In which city was the founder")]
        assert multi and all(len(r["pos_index"]) == 2 for r in multi)
    ev, _ = formats.read_jsonl(str(out / "eval.jsonl"), "eval", num_candidates=12)
    assert len(ev) > 10


def test_single_hop_distractors_do_not_mention_the_subject(corpus):
    out, _ = corpus
    e2e, _ = formats.read_jsonl(str(out / "end_to_end_eval.jsonl"), "end_to_end")
    for r in e2e:
        if r["question"].startswith("Where was "):
            subject = r["question"][len("Where was "):-len(" born?")]
            for i, d in enumerate(r["docs"]):
                if i not in r["pos_index"]:  # hard distractors may name the subject, not answer
                    assert not (subject in d and r["answers"][0] in d)


def test_train_and_eval_entities_are_disjoint(corpus):
    out, _ = corpus
    manifest = json.loads((out / "manifest.json").read_text())
    eval_names = set(manifest["eval_entities"])
    train_text = (out / "pretrain_text.txt").read_text()
    assert eval_names and not any(name in train_text for name in eval_names)
    train_qs = [json.loads(l)["question"] for l in open(out / "end_to_end_train.jsonl")]
    assert not any(name in q for q in train_qs for name in eval_names)


def test_documents_have_a_useful_length(corpus):
    out, _ = corpus
    lengths = [len(json.loads(l)["text"].split()) for l in open(out / "corpus.jsonl")]
    assert min(lengths) >= 30 and max(lengths) <= 250


def test_worlds_with_one_places_seed_share_their_map_only():
    a = synthetic.World(1, 20, 10, 8, 3, places_seed=7)
    b = synthetic.World(2, 20, 10, 8, 3, places_seed=7)
    c = synthetic.World(1, 20, 10, 8, 3)
    assert a.cities == b.cities and a.countries == b.countries
    assert not {p["name"] for p in a.people} & {p["name"] for p in b.people}
    assert {p["city"] for p in a.people + b.people} <= {x["name"] for x in a.cities}
    assert c.cities != a.cities


def test_without_multi_hop_every_question_has_one_gold_document(tmp_path):
    synthetic.generate_corpus(str(tmp_path), seed=0, num_entities=40, num_candidates=8, k=1,
                              multi_hop=False, questions_per_entity=4)
    ins, _ = formats.read_jsonl(str(tmp_path / "instruct_train.jsonl"), "instruct", k=1)
    e2e, _ = formats.read_jsonl(str(tmp_path / "end_to_end_eval.jsonl"), "end_to_end",
                                num_candidates=8)
    for r in ins + e2e:
        assert len(r["pos_index"]) == 1 and r["answers"][0] in r["docs"][r["pos_index"][0]]
    assert not any("founder of" in r["question"] for r in ins + e2e)
    with pytest.raises(ValueError, match="k=1"):
        synthetic.generate_corpus(str(tmp_path / "x"), seed=0, num_entities=40, k=1)


def test_list_named_worlds_answer_in_whole_tokens(tmp_path):
    """name_style="lists": names, places and years come from fixed lists, and a tokenizer
    trained with `single_token_words` holds each answer word as one token, the same token in
    the question's document (after a space, before punctuation): reading is copying."""
    from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
    out = tmp_path / "w"
    synthetic.generate_corpus(str(out), seed=5, num_entities=80, num_candidates=8, k=1,
                              multi_hop=False, questions_per_entity=4, name_style="lists")
    words = synthetic.single_token_words()
    assert len(set(words)) == len(words)
    lines = open(out / "pretrain_text.txt").read().splitlines()
    tok = ClaraTokenizer.from_file(train_sentencepiece(lines, str(tmp_path / "sp"), 900,
                                                       whole_words=words), n_mem=2)
    recs, _ = formats.read_jsonl(str(out / "end_to_end_eval.jsonl"), "end_to_end",
                                 num_candidates=8)
    assert recs
    for r in recs:
        answer, doc = r["answers"][0], r["docs"][r["pos_index"][0]]
        ids = tok.encode(answer)
        assert len(ids) == len(answer.split()) and set(answer.split()) <= set(words), answer
        doc_ids = tok.encode(doc)
        assert any(doc_ids[i:i + len(ids)] == ids for i in range(len(doc_ids))), (answer, doc)
        assert not doc.startswith(tuple(words))   # a name never starts a document
    world = synthetic.World(1, 20, 10, 8, 3, places_seed=7, name_style="lists")
    assert {p["name"].split()[0] for p in world.people} <= set(words)
    with pytest.raises(ValueError, match="name_style='lists' has too few names: cities 100"):
        synthetic.World(1, 20, 10, 100, 3, name_style="lists")
    with pytest.raises(ValueError, match="whole_words must be non-empty words"):
        train_sentencepiece(lines, str(tmp_path / "sp2"), 900, whole_words=["two words"])


def test_every_question_has_its_kind(corpus):
    """question_kind names the template of every question the generator writes, and the
    answer is the entity field that kind asks for (so the demo's EM-by-kind table is
    about what it says); any other text is "other"."""
    out, _ = corpus
    recs = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
    kinds = [synthetic.question_kind(r["question"]) for r in recs]
    assert "other" not in kinds
    assert {"birthplace", "birth year", "founder", "founding year"} <= set(kinds)
    for r, kind in zip(recs, kinds):
        gold = r["docs"][r["pos_index"][0]]
        if kind in ("birth year", "founding year"):
            assert r["answer"].isdigit() and r["answer"] in gold
    assert synthetic.question_kind("Who founded?") == "other"
    assert synthetic.question_kind("Where is the river?") == "other"
    assert synthetic.question_kind("Where is Tolpa Guild based?") == "headquarters"
