"""JSONL readers: official example data reads; every bad-input case names file:line:field."""

import json
import os

import pytest

from clara_jax.data.formats import DataError, read_jsonl

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                      "ml-clara-examples", "pretrain_data.jsonl")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="../shared example data not present")
def test_official_pretrain_example_reads_completely():
    records, report = read_jsonl(SHARED, "pretrain")
    with open(SHARED, "rb") as f:
        n_lines = sum(1 for line in f if line.strip())
    assert report.records == len(records) == n_lines and not report.skipped
    assert all(len(r["questions"]) == len(r["answers"]) for r in records)
    assert records[0]["source"].endswith(":1")


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return str(path)


GOOD = json.dumps({"question": "q?", "docs": ["a", "b"], "answer": "x", "pos_index": [1]})
BAD_CASES = [
    ("{not json", "json"),
    (json.dumps({"docs": ["a", "b"], "answer": "x"}), "question"),
    (json.dumps({"question": 3, "docs": ["a", "b"], "answer": "x"}), "question"),
    (json.dumps({"question": "  ", "docs": ["a", "b"], "answer": "x"}), "question"),
    (json.dumps({"question": "q", "docs": ["a", ""], "answer": "x"}), "docs[1]"),
    (json.dumps({"question": "q", "docs": ["a"], "answer": "x"}), "docs"),
    (json.dumps({"question": "q", "docs": ["a", "b"]}), "answer"),
    (json.dumps({"question": "q", "docs": ["a", "b"], "answer": "x", "pos_index": [2]}),
     "pos_index"),
    (b'{"question": "q\xff", "docs": ["a", "b"], "answer": "x"}', "bytes"),
]


@pytest.mark.parametrize("line,field", BAD_CASES)
def test_bad_line_raises_with_file_line_field(tmp_path, line, field):
    path = write(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "instruct", k=2)
    assert e.value.line == 2 and e.value.field == field
    assert str(e.value).startswith(f"{path}:2: {field}:")


def test_skip_invalid_counts_and_keeps_order(tmp_path):
    lines = [GOOD.replace("q?", f"q{i}?") for i in range(3)]
    path = write(tmp_path, [lines[0], BAD_CASES[0][0], lines[1], BAD_CASES[1][0], lines[2]])
    records, report = read_jsonl(path, "instruct", k=2, skip_invalid=True)
    assert [r["question"] for r in records] == ["q0?", "q1?", "q2?"]
    assert len(report.skipped) == 2 and ":2: json:" in report.skipped[0]
    out = tmp_path / "work" / "skipped.txt"
    report.write_skipped(str(out))
    assert out.read_text().count("\n") == 2


def test_answer_aliases_and_pretrain_kinds(tmp_path):
    path = write(tmp_path, [json.dumps({"question": "q", "docs": ["a"] * 3,
                                        "golden_answers": ["A", "alias"], "pos_index": [0, 2]})])
    (rec,), _ = read_jsonl(path, "eval", num_candidates=3)
    assert rec["answers"] == ["A", "alias"] and rec["pos_index"] == [0, 2]
    pre = write(tmp_path, [
        json.dumps({"data_type": "paraphrase", "question": [""], "answers": ["p"], "docs": ["d"]}),
        json.dumps({"data_type": "qa", "question": ["a", "b"], "answers": ["x"], "docs": ["d"]}),
    ], "p.jsonl")
    with pytest.raises(DataError, match=r":2: answers: 1 answers for 2 questions"):
        read_jsonl(pre, "pretrain")
    with pytest.raises(FileNotFoundError, match="nothing*"):
        read_jsonl(str(tmp_path / "nothing*.jsonl"), "eval")


def test_text_format_reads_ids_and_multiline_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "d1", "text": "line one\\nline two"}\n{"text": "no id"}\n'
                    '{"id": "d3"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:3: text: missing"):
        read_jsonl(str(path), "text")
    recs, report = read_jsonl(str(path), "text", skip_invalid=True)
    assert [r["text"] for r in recs] == ["line one\nline two", "no id"]
    assert recs[0]["id"] == "d1" and recs[1]["id"] == f"{path}:2"
    assert len(report.skipped) == 1


def test_text_prompt_must_be_a_proper_prefix_of_its_text(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text('{"text": "Q: where? A: zan", "prompt": "Q: where? A:"}\n'
                    '{"text": "Q: where? A: zan", "prompt": "Q: who?"}\n'
                    '{"text": "Q: where?", "prompt": "Q: where?"}\n')
    recs, report = read_jsonl(str(path), "text", skip_invalid=True)
    assert [r.get("prompt") for r in recs] == ["Q: where? A:"]
    assert len(report.skipped) == 2
    with pytest.raises(DataError, match=r"lm.jsonl:2: prompt: must be a proper prefix of text"):
        read_jsonl(str(path), "text")


def test_eval_rows_score_against_golden_answers_first(tmp_path):
    row = {"question": "q?", "docs": ["d1", "d2"], "answer": "a", "golden_answers": ["b", "c"]}
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert read_jsonl(str(path), "eval")[0][0]["answers"] == ["b", "c"]
    assert read_jsonl(str(path), "end_to_end")[0][0]["answers"] == ["a"]


def test_official_defaults_data_type_doc_keys_and_answer_order(tmp_path):
    """As the official preprocess_data: data_type defaults to "qa"; "context" / "content"
    lists are the documents when "docs" is absent (or not a list); answers come from the
    first of answer (str), answers (list), golden_answers (list) that has its type."""
    pre = write(tmp_path, [
        json.dumps({"question": ["q"], "answers": ["a"], "context": ["c"]}),
        json.dumps({"data_type": "paraphrase", "answer": "p", "content": ["d"]}),
    ], "p.jsonl")
    qa, para = read_jsonl(pre, "pretrain")[0]
    assert (qa["data_type"], qa["questions"], qa["answers"], qa["docs"]) == ("qa", ["q"], ["a"],
                                                                             ["c"])
    assert (para["data_type"], para["questions"], para["answers"], para["docs"]) == (
        "paraphrase", [], ["p"], ["d"])
    rows = [
        ({"docs": ["d", "e"], "context": ["x", "y"], "answer": "a"}, ["d", "e"], ["a"]),
        ({"docs": "d", "context": ["x", "y"], "answer": "a"}, ["x", "y"], ["a"]),
        ({"content": ["x", "y"], "answer": ["l"], "answers": ["b"]}, ["x", "y"], ["b"]),
        ({"docs": ["d", "e"], "answers": "s", "golden_answers": ["g", "h"]}, ["d", "e"],
         ["g", "h"]),
        ({"docs": ["d", "e"], "answer": "a", "answers": ["b"]}, ["d", "e"], ["a"]),
    ]
    path = write(tmp_path, [json.dumps({"question": "q", **r}) for r, _, _ in rows], "i.jsonl")
    recs, _ = read_jsonl(path, "instruct", k=2)
    assert [(r["docs"], r["answers"]) for r in recs] == [(d, a) for _, d, a in rows]


@pytest.mark.parametrize("record,message", [
    ({"question": "q", "answer": "a"}, "docs: missing (one of ('docs', 'context', 'content')"),
    ({"question": "q", "context": "c", "answer": "a"}, "context: expected a list of strings"),
    ({"question": "q", "docs": ["a", "b"], "answer": ["x"]}, "answer: expected a string, got "
                                                             "list"),
    ({"question": "q", "docs": ["a", "b"], "answers": "x"}, "answers: expected a list of strings"),
    ({"question": "q", "docs": ["a", "b"], "golden_answers": []}, "golden_answers: has no answer"),
])
def test_official_keys_with_the_wrong_type_name_the_field(tmp_path, record, message):
    path = write(tmp_path, [json.dumps(record)])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "instruct", k=2)
    assert str(e.value).startswith(f"{path}:1: {message}")
