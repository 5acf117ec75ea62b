"""Corpus files (`clara_jax.data.corpus`): the documents counted, fingerprinted and read are
the same ones; line ends, blank lines and bad bytes follow one rule; a refused input leaves
no index behind."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from clara_jax.data import synthetic
from clara_jax.data.corpus import iter_corpus, read_corpus, scan_corpus
from clara_jax.clara.tokenizer import train_sentencepiece
from clara_jax.errors import UserError
from clara_jax.infer import index as index_lib
from test_index import tiny_clara

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEN = [f"document number {i} of ten" for i in range(1, 11)]


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_lone_cr_inside_a_line_is_a_space_and_ids_stay_line_numbers(tmp_path):
    lines = list(TEN)
    lines[3] = "document number 4\rof ten"
    path = write(tmp_path / "ten.txt", "\n".join(lines).encode())   # no final newline
    docs = list(iter_corpus(path))
    assert [d["id"] for d in docs] == [f"ten.txt:{i}" for i in range(1, 11)]
    assert docs[3]["text"] == "document number 4 of ten"
    assert docs[9]["text"] == "document number 10 of ten"
    assert [d["text"] for i, d in enumerate(docs) if i != 3] == TEN[:3] + TEN[4:]
    scan = scan_corpus(path, every=4)
    assert scan.num_docs == 10 and len(scan.marks) == 3
    assert list(read_corpus(scan)) == docs


def test_crlf_file_reads_as_the_lf_file(tmp_path):
    for name, lines in [("c.txt", TEN), ("c.jsonl", [json.dumps({"id": f"d{i}", "text": t})
                                                     for i, t in enumerate(TEN)])]:
        lf = write(tmp_path / f"lf_{name}", ("\n".join(lines) + "\n").encode())
        crlf = write(tmp_path / f"crlf_{name}", ("\r\n".join(lines) + "\r\n").encode())
        want = [{"id": d["id"].replace("lf_", "crlf_"), "text": d["text"]}
                for d in iter_corpus(lf)]
        assert list(iter_corpus(crlf)) == want and len(want) == 10
        assert scan_corpus(crlf).num_docs == 10


def test_unicode_blank_lines_are_skipped_by_count_and_read_alike(tmp_path):
    # U+00A0 no-break space, U+3000 ideographic space, a tab: blank by str.isspace.
    data = "first\n\u00a0\nthird\n\u3000\t \n\nsixth\n".encode()
    path = write(tmp_path / "blank.txt", data)
    docs = list(iter_corpus(path))
    assert docs == [{"id": "blank.txt:1", "text": "first"}, {"id": "blank.txt:3",
                    "text": "third"}, {"id": "blank.txt:6", "text": "sixth"}]
    scan = scan_corpus(path)
    assert scan.num_docs == 3 and list(read_corpus(scan)) == docs
    assert scan.sha256 == hashlib.sha256(data).hexdigest()   # the identity is the file's bytes


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    path = write(tmp_path / "bad.txt", b"fine\nbad \xff byte\nfine\n")
    with pytest.raises(UserError) as e:
        scan_corpus(path)
    assert str(e.value) == (f"{path}:2: bytes: not UTF-8 (invalid start byte at byte 5 of "
                            f"the line)")
    jsonl = write(tmp_path / "bad.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": '
                  b'"\xc3("}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: bytes: not UTF-8"):
        list(iter_corpus(jsonl))


def test_jsonl_rows_are_validated_naming_file_line_field(tmp_path):
    cases = {'{"id": "a"}': "2: text: missing, empty or not a string",
             '{"id": "", "text": "x"}': "2: id: missing, empty or not a string",
             '["a", "b"]': "2: json: expected an object with id and text",
             '{"id": "a", "text": "x"': "2: json: not JSON (Expecting ',' delimiter"}
    for line, want in cases.items():
        path = write(tmp_path / "rows.jsonl", ('{"id": "0", "text": "ok"}\n' + line +
                                               "\n").encode())
        with pytest.raises(UserError) as e:
            scan_corpus(path)
        assert str(e.value).startswith(f"{path}:{want}"), str(e.value)


def test_a_file_changed_after_the_scan_is_refused_before_the_chunk_it_changes(tmp_path):
    path = tmp_path / "moving.txt"
    path.write_text("\n".join(TEN) + "\n")
    scan = scan_corpus(str(path), every=2)
    path.write_text("\n".join(TEN[:2] + ["changed"] + TEN[3:]) + "\n")
    reader = read_corpus(scan)
    got = [next(reader) for _ in range(3)]   # chunk 1 (docs 1-2), and doc 3 of chunk 2
    assert got[2]["text"] == "changed"
    with pytest.raises(UserError, match="moving.txt: changed while being read \\(bytes up "
                       "to document 4 differ\\)"):
        next(reader)                         # chunk 2 never completes
    path.write_text("\n".join(TEN[:9]) + "\n")
    with pytest.raises(UserError, match="9 documents, 10 first counted"):
        list(read_corpus(scan))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_world")
    synthetic.generate_corpus(str(root / "data"), seed=0, num_entities=40)
    texts = [json.loads(l)["text"] for l in open(root / "data" / "corpus.jsonl")][:12]
    sp = train_sentencepiece(texts * 3, str(root / "sp"), 400)
    return tiny_clara(sp)


def test_index_of_cr_and_nbsp_corpus_has_every_line_and_refused_input_leaves_nothing(
        model, tmp_path):
    lines = list(TEN)
    lines[3] = "document number 4\rof ten"
    lines[6] = "\u00a0"
    path = write(tmp_path / "ten.txt", "\n".join(lines).encode())
    index = index_lib.build_index(model, path, str(tmp_path / "idx"), batch_size=4,
                                  chunk_size=4, progress=False)
    assert len(index) == 9 and index.num_chunks == 3
    assert [index.doc(r)["id"] for r in range(9)] == [f"ten.txt:{i}" for i in
                                                      (1, 2, 3, 4, 5, 6, 8, 9, 10)]
    assert index.doc(3)["text"] == "document number 4 of ten"
    assert index.doc(8)["text"] == "document number 10 of ten"
    # A bad line anywhere (here the last): out_dir is never created; an existing empty one
    # stays empty.
    bad = write(tmp_path / "bad.txt", ("\n".join(TEN) + "\n").encode() + b"\xe2\x82\n")
    for out in (tmp_path / "none", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(UserError, match=r"bad.txt:11: bytes: not UTF-8"):
            index_lib.build_index(model, bad, str(out), batch_size=4, chunk_size=4,
                                  progress=False)
        assert (os.listdir(out) == []) if out.name == "empty" else not out.exists()
    # A file changed after a partial build is refused, naming the input.
    part = str(tmp_path / "part")
    assert index_lib.build_index(model, path, part, batch_size=4, chunk_size=4,
                                 max_chunks=1, progress=False) is None
    with open(path, "ab") as f:
        f.write(b"\none more")
    with pytest.raises(ValueError, match="input: index was built from .*ten.txt"):
        index_lib.build_index(model, path, part, batch_size=4, chunk_size=4, progress=False)


def test_compress_corpus_cli_one_line_failure_and_quiet_success(model, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model.save(ckpt)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda path, out, *more: subprocess.run(
        [sys.executable, "-m", "clara_jax", "compress_corpus", f"--checkpoint={ckpt}",
         f"--input={path}", f"--out_dir={out}", "--chunk_size=4", "--batch_size=2", *more],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    bad = write(tmp_path / "bad.txt", b"one\ntwo \xff\n")
    out = tmp_path / "bad_idx"
    got = run(bad, out)
    assert got.returncode == 2, got.stderr[-3000:]
    assert got.stderr == (f"compress_corpus: {bad}:2: bytes: not UTF-8 (invalid start byte "
                          f"at byte 5 of the line)\n")
    assert got.stdout == "" and not out.exists()
    verbose = run(bad, out, "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    good = write(tmp_path / "good.txt", ("\n".join(TEN) + "\n").encode())
    got = run(good, tmp_path / "idx", "--noverbose")
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout == (f"{tmp_path / 'idx'}: 10 documents in 3 chunks, 10 cut to "
                          f"doc_max_length=16\n")
    # stderr holds the progress bar only: no library log lines (absl's "I1204 ..." form).
    logs = [l for l in got.stderr.replace("\r", "\n").splitlines()
            if l.strip() and not l.startswith("compress")]
    assert logs == [], logs[:5]


def test_answer_cli_one_line_failure_and_quiet_success(model, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model.save(ckpt)
    run = lambda path: subprocess.run(
        [sys.executable, "-m", "clara_jax", "answer", f"--checkpoint={ckpt}", f"--docs={path}",
         "--question=Which document?", "--k=2", "--max_new_tokens=2"], cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True, capture_output=True, timeout=300)
    bad = write(tmp_path / "bad.jsonl", b'{"id": "a", "text": "one"}\n{"id": "b"}\n')
    got = run(bad)
    assert got.returncode == 2, got.stderr[-3000:]
    assert got.stderr == f"answer: {bad}:2: text: missing, empty or not a string\n"
    assert got.stdout == ""
    lines = list(TEN)
    lines[3] = "document number 4\rof ten"
    got = run(write(tmp_path / "ten.txt", "\r\n".join(lines).encode()))
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.startswith("Q: Which document?\nA: ") and got.stdout.count("ten.txt:") == 2
    assert got.stderr == ""
