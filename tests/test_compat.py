"""clara_jax.compat.CLaRa: the official notebook's calls (apple/ml-clara inference.ipynb, only
the paths changed) on a tiny Apple-format release, the answers equal to `Clara`'s, and each
method's signature equal to the official one (when ../shared/reference/ml-clara is present)."""

import inspect
import json
import os
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402

from clara_jax.clara.compress import compress  # noqa: E402
from clara_jax.clara import prompts  # noqa: E402
from clara_jax.compat import AutoModel, CLaRa  # noqa: E402

CLARA_SRC = os.path.join(os.path.dirname(ROOT), "shared", "reference", "ml-clara")
DOC_MAX, RATE = 32, 8

# The notebook's documents and questions, verbatim.
NOTEBOOK_DOCS = [
    "Weldenia is a monotypic genus of flowering plant in the family Commelinaceae, first describ ed in 1829. It has one single species: Weldenia candida, which grows originally in Mexico and Guatemala.",
    "Hagsatera is a genus of flowering plants from the orchid family, Orchidaceae. There are two known species, native to Mexico and Guatemala",
    "Alsobia is a genus of flowering plants in the family Gesneriaceae, native to Mexico, Guatemala and Costa Rica. The two species are succulent, stoloniferous herbs and were previously included in the genus \"Episcia\". Recent molecular studies have supported the separation of \"Alsobia\" from \"Episcia\""
]
NOTEBOOK_QUESTION = "Which genus of plant grows originally in Mexico and Guatemala, Phylica or Weldenia?"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(Apple-format release dir whose config.json names its base, the same model as `Clara`)
    on the benchmarks' random quick-size Mistral (no official code needed)."""
    work = str(tmp_path_factory.mktemp("compat"))
    base = common.make_base_dir(os.path.join(work, "base"), hidden=64, layers=2, heads=4,
                                kv_heads=2, intermediate=128, base_vocab=400)
    _, clara = common.make_official_and_ours(None, work, doc_max_length=DOC_MAX,
                                             compress_rate=RATE, base_dir=base, batch_size=4)
    return os.path.join(work, f"release_d{DOC_MAX}_r{RATE}"), base, clara


def test_notebook_pretraining_paraphrase(release):
    path, _, clara = release
    unirag = AutoModel.from_pretrained(path, trust_remote_code=True).to('cuda')

    # Example documents and question:
    documents = [
        NOTEBOOK_DOCS
    ]

    questions = ["" for _ in range(len(documents))]

    # End-to-end usage
    out = unirag.generate_from_paraphrase(questions=questions, documents=documents, max_new_tokens=64)
    print('Generated answer', out)

    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert out == clara.generate_from_paraphrase(documents, max_new_tokens=64).texts
    assert out[0].strip()


def test_notebook_instruction_tuning(release):
    path, _, clara = release
    unirag = AutoModel.from_pretrained(path, trust_remote_code=True).to('cuda')

    # Example documents and question:
    documents = [
        NOTEBOOK_DOCS
    ]

    questions = [NOTEBOOK_QUESTION]

    # instruction tuning inference
    out = unirag.generate_from_text(questions=questions, documents=documents, max_new_tokens=64)
    print('Generated answer', out)

    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert out == clara.generate_from_text(questions, documents, max_new_tokens=64).texts


def test_notebook_end_to_end(release):
    path, _, clara = release
    unirag = AutoModel.from_pretrained(path, trust_remote_code=True).to('cuda')

    documents = [[NOTEBOOK_DOCS[0] for _ in range(20)]]
    questions = [NOTEBOOK_QUESTION]

    # instruction tuning inference
    #the k is decided by the generation_top_k in the config.json
    out = unirag.generate_from_questions(questions=questions, documents=documents, max_new_tokens=64)
    print('Generated answer', out)

    texts, topk = out
    ref = clara.generate_from_questions(questions, documents, max_new_tokens=64)
    assert isinstance(texts, list) and isinstance(texts[0], str) and texts == ref.texts
    assert isinstance(topk, np.ndarray) and topk.dtype == np.int64
    assert topk.shape == (1, unirag.generation_top_k) == (1, 1)
    np.testing.assert_array_equal(topk, ref.topk_indices)


def test_generation_top_k_override_and_distinct_candidates(release):
    path, _, clara = release
    model = CLaRa.from_pretrained(path, generation_top_k=2, device_map="auto")
    assert model.generation_top_k == 2 and clara.config.generation_top_k == 1
    docs = common.documents_of_tokens(clara.tokenizer, 8, DOC_MAX)
    questions = common.questions(2)
    groups = [docs[:4], docs[4:]]
    texts, topk = model.generate_from_questions(questions, max_new_tokens=8, documents=groups)
    ref = clara.generate_from_questions(questions, groups, max_new_tokens=8, k=2)
    assert texts == ref.texts and topk.shape == (2, 2)
    np.testing.assert_array_equal(topk, ref.topk_indices)
    assert all(len(set(row)) == 2 and 0 <= min(row) and max(row) < 4 for row in topk.tolist())


def test_compress_documents_then_generate(release):
    path, _, clara = release
    model = CLaRa.from_pretrained(path, batch_size=4)   # 6 documents: a padded second chunk
    docs = common.documents_of_tokens(clara.tokenizer, 6, DOC_MAX)
    questions = common.questions(3)
    emb, mse = model.compress_documents(docs)
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
    assert emb.shape == (6, DOC_MAX // RATE, 64) and emb.shape[0] == len(docs)
    np.testing.assert_array_equal(emb, clara.compress_documents(docs))
    # The MSE is the official one: over all documents at once (one batch, no chunking; the
    # adapter unmerged, hence a tolerance).
    ids, mask, _ = prompts.encode_documents(clara.tokenizer, docs, DOC_MAX, DOC_MAX // RATE)
    _, whole = compress(clara.model, clara.params, clara.adapters["encoder"], ids, mask,
                        DOC_MAX // RATE)
    assert isinstance(mse, np.float32) and mse > 0
    assert abs(float(mse) - float(whole)) <= 1e-4 * float(whole)
    # [B * k, n, D] as the official method takes it, numpy or torch.
    texts = model.generate_from_compressed_documents_and_questions(questions, emb,
                                                                   max_new_tokens=8)
    groups = [docs[0:2], docs[2:4], docs[4:6]]
    assert texts == clara.generate_from_text(questions, groups, max_new_tokens=8).texts
    assert texts == model.generate_from_compressed_documents_and_questions(
        questions, torch.from_numpy(emb), max_new_tokens=8)


def test_loads_every_format(release, tmp_path):
    path, base, clara = release
    docs = common.documents_of_tokens(clara.tokenizer, 2, DOC_MAX)
    expected = clara.compress_documents(docs)
    # An Apple release whose config.json names a base that is not here: refused, naming it;
    # base_model_dir= overrides it.
    moved = tmp_path / "release"
    shutil.copytree(path, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["decoder_model_name"] = "/mnt/ceph_rbd/model/Mistral-7B-Instruct-v0.2"
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: decoder_model_name "
                                         r"'/mnt/ceph_rbd/model/Mistral-7B-Instruct-v0.2' is "
                                         r"not a local directory; pass base_model_dir="):
        CLaRa.from_pretrained(str(moved))
    model = CLaRa.from_pretrained(str(moved), base_model_dir=base)
    np.testing.assert_array_equal(model.compress_documents(docs)[0], expected)
    # Our saved format.
    clara.save(str(tmp_path / "ours"))
    model = CLaRa.from_pretrained(str(tmp_path / "ours"))
    np.testing.assert_array_equal(model.compress_documents(docs)[0], expected)


def test_what_cannot_be_honoured_is_refused(release):
    path, _, _ = release
    with pytest.raises(ValueError, match=r"keyword\(s\) \['compr_rate'\] not supported"):
        CLaRa.from_pretrained(path, compr_rate=4)
    with pytest.raises(TypeError, match="positional arguments"):
        CLaRa.from_pretrained(path, "extra")
    model = CLaRa.from_pretrained(path)
    q, docs = ["Who?"], [["Ana Rok was born in 1901."]]
    with pytest.raises(NotImplementedError, match="stage2_mips=True retrieves from Apple's "
                                                  "retrieval server"):
        model.generate_from_questions(q, stage2_mips=True)
    with pytest.raises(NotImplementedError, match="time_count=True"):
        model.generate_from_questions(q, documents=docs, time_count=True)
    with pytest.raises(ValueError, match="needs documents="):
        model.generate_from_questions(q)
    with pytest.raises(ValueError, match="2 questions for 1 document lists"):
        model.generate_from_paraphrase(["", ""], docs)


METHODS = ["from_pretrained", "compress_documents", "generate_from_text",
           "generate_from_paraphrase", "generate_from_questions",
           "generate_from_compressed_documents_and_questions"]


@pytest.mark.skipif(not os.path.isdir(CLARA_SRC),
                    reason="../shared/reference/ml-clara (Apple's code) not present")
def test_signatures_match_the_official_class():
    official = common.load_official(CLARA_SRC).CLaRa

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in METHODS:
        assert params(getattr(CLaRa, name)) == params(getattr(official, name)), name
