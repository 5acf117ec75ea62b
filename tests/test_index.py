"""The compressed corpus index: exact chunked, sharded retrieval equals brute force; resumed
builds equal uninterrupted ones; stale or corrupt indexes are refused naming the cause."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data import synthetic
from clara_jax.infer import index as index_lib
from clara_jax.model.config import preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import init_params
from clara_jax.train.setup import fresh_adapters

DOC_MAX, RATE = 16, 4
N_DOCS = 37           # 37 documents in chunks of 8: four full chunks and a partial one
CHUNK = 8


def random_adapters(mcfg, lora, seed):
    """Fresh adapters with non-zero B (so every adapter changes the output)."""
    adapters = fresh_adapters(mcfg, lora, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def tiny_clara(sp_path, seed=0):
    cfg = ClaraConfig(doc_max_length=DOC_MAX, compress_rate=RATE, generation_top_k=2,
                      lora=LoraConfig(rank=4, alpha=8, dropout=0.1))
    tok = ClaraTokenizer.from_file(sp_path, cfg.n_mem)
    # vocabulary with room for the 8 memory tokens of compress_rate 2 (see `variant`)
    mcfg = preset("tiny", vocab_size=tok.base_vocab_size + 16, hidden_size=64, num_layers=2,
                  head_dim=16, intermediate_size=128)
    params = init_params(mcfg, jax.random.key(0))
    return Clara(mcfg, cfg, params, random_adapters(mcfg, cfg.lora, seed), tok,
                 tokenizer_path=sp_path, batch_size=8)


def variant(model, *, encoder_seed=None, compress_rate=None):
    """The same model with another encoder adapter or another compression rate."""
    adapters, cfg, tok = dict(model.adapters), model.config, model.tokenizer
    if encoder_seed is not None:
        adapters["encoder"] = jax.tree_util.tree_map(
            lambda x: x + 0.01 * jax.random.normal(jax.random.key(encoder_seed), x.shape),
            adapters["encoder"])
    if compress_rate is not None:
        cfg = cfg.replace(compress_rate=compress_rate)
        tok = ClaraTokenizer.from_file(model.tokenizer_path, cfg.n_mem)
    return Clara(model.model_config, cfg, model.params, adapters, tok,
                 tokenizer_path=model.tokenizer_path, batch_size=model.batch_size)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synthetic.generate_corpus(str(root / "data"), seed=0, num_entities=40)
    rows = [json.loads(l) for l in open(root / "data" / "corpus.jsonl")][:N_DOCS]
    assert len(rows) == N_DOCS
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sp = train_sentencepiece([r["text"] for r in rows] * 3, str(root / "sp"), 400)
    model = tiny_clara(sp)
    return dict(root=root, docs=str(docs), rows=rows, sp=sp, model=model)


@pytest.fixture(scope="module")
def built(world):
    out = str(world["root"] / "index")
    index = index_lib.build_index(world["model"], world["docs"], out, batch_size=4,
                                  chunk_size=CHUNK, progress=False)
    return index


def test_index_layout_and_states_match_direct_compression(world, built):
    assert len(built) == N_DOCS and built.num_chunks == 5
    assert [c["rows"] for c in built.meta["chunks"]] == [8, 8, 8, 8, 5]
    states = built.all_states()
    assert states.shape == (N_DOCS, DOC_MAX // RATE, 64)
    direct = world["model"].compress_documents([r["text"] for r in world["rows"]])
    np.testing.assert_allclose(states, direct, atol=1e-5)
    assert built.doc(9) == world["rows"][9]
    np.testing.assert_array_equal(built.states([[9, 36]]), states[[[9, 36]]])


def test_search_equals_brute_force(world, built):
    model = world["model"]
    questions = ["Where was Lo born?", "Which company did Ka found?", "When was it founded?"]
    k = 10  # more than one chunk's worth, so the running top-k merges across chunks
    ids, scores, rows = index_lib.search(model, built, questions, k)
    q = model.encode_questions(questions).astype(np.float64)
    d = built.all_states().reshape(N_DOCS, -1).astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        d / np.linalg.norm(d, axis=1, keepdims=True)).T
    want = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(cos, want, 1), atol=1e-5)
    assert ids == [[world["rows"][r]["id"] for r in row] for row in want]
    # k = every document: the partial last chunk takes part and its padding never does.
    _, all_scores, all_rows = index_lib.search(model, built, questions, N_DOCS)
    # Every document once, in the brute-force order up to near-ties (scores within 1e-5
    # may swap: float32 here, float64 there).
    assert all(sorted(r) == list(range(N_DOCS)) for r in np.asarray(all_rows))
    np.testing.assert_allclose(np.take_along_axis(cos, np.asarray(all_rows), 1),
                               -np.sort(-cos, axis=1), atol=1e-5)
    assert np.isfinite(all_scores).all()
    with pytest.raises(ValueError, match=f"k=38 must be in \\[1, {N_DOCS}\\]"):
        index_lib.search(model, built, questions, N_DOCS + 1)


def test_resume_after_interruption_gives_identical_chunks(world, built, tmp_path):
    out = str(tmp_path / "resumed")
    part = index_lib.build_index(world["model"], world["docs"], out, batch_size=4,
                                 chunk_size=CHUNK, max_chunks=2, progress=False)
    assert part is None
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["num_docs"] == 16 and not meta["complete"]
    with pytest.raises(ValueError, match="incomplete index"):
        index_lib.open_index(out)
    # A chunk written but not yet recorded (killed before meta.json) is simply redone.
    shutil.copy(os.path.join(built.directory, "chunk_00003.npy"),
                os.path.join(out, "chunk_00002.npy"))
    resumed = index_lib.build_index(world["model"], world["docs"], out, batch_size=4,
                                    chunk_size=CHUNK, progress=False)
    assert len(resumed) == N_DOCS
    for a, b in zip(resumed.meta["chunks"], built.meta["chunks"]):
        assert a["sha256"] == b["sha256"] and a["docs_sha256"] == b["docs_sha256"]
    np.testing.assert_array_equal(resumed.all_states(), built.all_states())


def test_refuses_other_checkpoint_compress_rate_and_input(world, built, tmp_path):
    other = variant(world["model"], encoder_seed=7)
    with pytest.raises(ValueError, match="fingerprint: index has"):
        index_lib.open_index(built.directory, other)
    with pytest.raises(ValueError, match="fingerprint"):
        index_lib.build_index(other, world["docs"], built.directory, chunk_size=CHUNK,
                              progress=False)
    rate2 = variant(world["model"], compress_rate=2)
    with pytest.raises(ValueError, match="compress_rate: index has 4, expected 2"):
        index_lib.open_index(built.directory, rate2)
    shorter = str(tmp_path / "fewer.jsonl")
    with open(shorter, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in world["rows"][:-1])
    with pytest.raises(ValueError, match="input: index was built from .*docs.jsonl"):
        index_lib.build_index(world["model"], shorter, built.directory, chunk_size=CHUNK,
                              progress=False)
    assert index_lib.open_index(built.directory, world["model"]).meta == built.meta


def test_corrupt_or_missing_chunk_is_named(built, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(built.directory, bad)
    path = os.path.join(bad, "chunk_00002.npy")
    arr = np.load(path)
    arr[0, 0, 0] += 1.0
    np.save(path, arr)
    with pytest.raises(ValueError, match="chunk_00002.npy: chunk 2 is corrupt"):
        index_lib.open_index(bad)
    np.save(path, arr[:3])  # wrong shape (checksums off: the shape check still catches it)
    with pytest.raises(ValueError, match=r"chunk_00002.npy: chunk 2 has shape \(3, 4, 64\)"):
        index_lib.open_index(bad, verify=False)
    shutil.copy(os.path.join(built.directory, "chunk_00002.npy"), path)
    index_lib.open_index(bad)  # repaired
    os.remove(os.path.join(bad, "chunk_00004.jsonl"))
    with pytest.raises(FileNotFoundError, match="chunk_00004.jsonl: chunk 4 is missing"):
        index_lib.open_index(bad, verify=False)


def test_bad_input_rows_name_file_and_line(world, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: text: missing"):
        index_lib.build_index(world["model"], str(path), str(tmp_path / "i"), progress=False)


def test_answer_library_and_both_clis(world, built, tmp_path):
    from clara_jax.infer.answer import answer

    out = answer(world["model"], built, ["Where was Lo born?"], k=3, max_new_tokens=4)
    assert len(out[0]["documents"]) == 3 and isinstance(out[0]["answer"], str)
    assert [d["id"] for d in out[0]["documents"]] == index_lib.search(
        world["model"], built, ["Where was Lo born?"], 3)[0][0]
    ckpt = str(tmp_path / "ckpt")
    world["model"].save(ckpt)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=root, text=True,
                                       capture_output=True, timeout=300)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in world["rows"][:6]))
    made = run("clara_jax.compress_corpus", f"--checkpoint={ckpt}", f"--input={small}",
               f"--out_dir={tmp_path / 'idx'}", "--chunk_size=4", "--batch_size=2")
    assert made.returncode == 0, made.stderr[-3000:]
    assert "6 documents in 2 chunks" in made.stdout
    assert index_lib.open_index(str(tmp_path / "idx"), world["model"]).num_chunks == 2
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(r["text"] for r in world["rows"][:6]) + "\n")
    got = run("clara_jax.answer", f"--checkpoint={ckpt}", f"--docs={txt}",
              "--question=Who is Lo?", "--k=2", "--max_new_tokens=3")
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.startswith("Q: Who is Lo?\nA: ")
    assert got.stdout.count("docs.txt:") == 2  # two retrieved documents, ids name:line


def test_hosts_share_the_chunks_and_build_the_same_index(world, built, tmp_path):
    """Two hosts (simulated one after the other): each compresses every second chunk into
    the same directory; the index is complete once both have, equal to a one-host build."""
    out = str(tmp_path / "hosts")
    kw = dict(batch_size=4, chunk_size=CHUNK, progress=False)
    assert index_lib.build_index(world["model"], world["docs"], out, host=(1, 2), **kw) is None
    assert sorted(f for f in os.listdir(out) if f.endswith(".npy")) == [
        "chunk_00001.npy", "chunk_00003.npy"]
    assert not os.path.exists(os.path.join(out, "meta.json"))
    # Host 0 is interrupted after one chunk, then resumes.
    assert index_lib.build_index(world["model"], world["docs"], out, host=(0, 2),
                                 max_chunks=1, **kw) is None
    with pytest.raises(ValueError, match="another number of hosts"):
        index_lib.build_index(world["model"], world["docs"], out, host=(0, 3), **kw)
    with pytest.raises(ValueError, match="another number of hosts"):
        index_lib.build_index(world["model"], world["docs"], out, **kw)
    index = index_lib.build_index(world["model"], world["docs"], out, host=(0, 2), **kw)
    assert index is not None and len(index) == N_DOCS
    assert [c["sha256"] for c in index.meta["chunks"]] == [
        c["sha256"] for c in built.meta["chunks"]]
    np.testing.assert_array_equal(index.all_states(), built.all_states())
    index_lib.open_index(out, world["model"])  # checksums verified
    with pytest.raises(ValueError, match="host index 2"):
        index_lib.build_index(world["model"], world["docs"], str(tmp_path / "x"),
                              host=(2, 2), **kw)
    # The CLI, as two hosts sharing the work by hand.
    ckpt = str(tmp_path / "ckpt")
    world["model"].save(ckpt)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in world["rows"][:6]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = [subprocess.run([sys.executable, "-m", "clara_jax.compress_corpus",
                            f"--checkpoint={ckpt}", f"--input={small}",
                            f"--out_dir={tmp_path / 'idx'}", "--chunk_size=2", "--batch_size=2",
                            f"--host_index={h}", "--host_count=2"],
                           cwd=root, text=True, capture_output=True, timeout=300)
            for h in (1, 0)]
    assert [o.returncode for o in outs] == [0, 0], outs[-1].stderr[-3000:]
    assert "complete once every host has run" in outs[0].stdout
    assert "6 documents in 3 chunks" in outs[1].stdout
