"""ClaraTokenizer against Hugging Face's LlamaTokenizerFast (legacy, as Mistral-7B-Instruct-v0.2
ships it) on a small sentencepiece BPE model trained here: exact ids, exact decoded text."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from clara_jax.clara.tokenizer import ClaraTokenizer, mem_token_strings  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her document question "
         "answer background memory token paris france genus plant mexico guatemala skate "
         "flip year who what where when compress retrieval model instruction").split()
N_MEM = 12  # > 10 so that <MEM1> / <MEM10> overlap


def train_sp_model(path: str, vocab_size: int = 500, seed: int = 0) -> str:
    """Trains a Llama-style sentencepiece BPE model (byte fallback, unk 0 / bos 1 / eos 2,
    identity normalisation, whitespace kept) on generated text; returns the model path."""
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        if rng.random() < 0.3:
            s = s.capitalize() + rng.choice(".?!,:")
        if rng.random() < 0.1:
            s += f" {rng.randint(0, 99999)}"
        if rng.random() < 0.05:
            s += " café naïve Ærø 東京"
        lines.append(s)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=path, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, num_threads=1, minloglevel=2)
    return path + ".model"


def hf_tokenizer(model_path: str, n_mem: int, different_mem_tokens: bool = True):
    """The official decoder tokenizer (modeling_clara.py:452-506) built from the same model.

    add_prefix_space=True makes the conversion produce Mistral's tokenizer.json layout
    (normaliser Prepend("▁") + Replace(" ", "▁"), decoder ending in Strip); without it
    transformers 4.56 drops the Prepend and the Strip.
    """
    tok = transformers.LlamaTokenizerFast(vocab_file=model_path, legacy=True, from_slow=True,
                                          add_prefix_space=True, padding_side="left")
    extra = tok.special_tokens_map.get("additional_special_tokens", [])
    if different_mem_tokens:
        mem = mem_token_strings(n_mem)
    else:
        mem = ["<MEM>"]
    tok.add_special_tokens({"additional_special_tokens": extra + mem + ["<AE>", "<ENC>", "<SEP>"]})
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sp_model(str(tmp_path_factory.mktemp("sp") / "tokenizer"))


@pytest.fixture(scope="module")
def toks(model_path):
    return ClaraTokenizer.from_file(model_path, N_MEM), hf_tokenizer(model_path, N_MEM)


ATOMS = ["the", "document", "Question", "Answer:", "Paris", ".", ",", "?", "!", ":", ";", "é",
         "東京", "🙂", "naïve", "Ærø", "x\u0301", "ß", "Ω", "\u00a0", "'", '"', "123", "4",
         "\u2581", "<", ">", "s>", "<<s>>", "<MEM", "<MEM99>", "< s>", "[INST]", "[/INST]",
         " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n",
         "<MEM0>", "<MEM1>", "<MEM3>", "<MEM10>", "<MEM11>", "<SEP>", "<ENC>", "<AE>", "<s>",
         "</s>", "<unk>"]


def random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  hello", "hello  ", "\n", "<s>", "<s> [INST] hi [/INST]",
           "<ENC><s>the document</s>", "<MEM1><MEM10><MEM11><SEP>\n\nQuestion:who"]
    while len(out) < count:
        parts = [rng.choice(ATOMS) + (" " if rng.random() < 0.4 else "")
                 for _ in range(rng.randint(1, 16))]
        if rng.random() < 0.3:
            parts.insert(0, " " * rng.randint(1, 3))
        out.append("".join(parts))
    return out


def test_reference_is_mistral_layout(toks):
    _, hf = toks
    spec = json.loads(hf._tokenizer.to_str())
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert spec["pre_tokenizer"] is None
    assert [d["type"] for d in spec["decoder"]["decoders"]] == [
        "Replace", "ByteFallback", "Fuse", "Strip"]


def test_vocabulary_and_special_ids(toks):
    tok, hf = toks
    assert tok.base_vocab_size == 500
    assert tok.vocab_size == len(hf) == 500 + N_MEM + 3 == len(tok)
    mem = mem_token_strings(N_MEM)
    assert tok.mem_tokens == mem
    assert tok.mem_token_ids == hf.convert_tokens_to_ids(mem) == list(range(500, 500 + N_MEM))
    assert tok.ae_token_id == hf.convert_tokens_to_ids("<AE>") == 500 + N_MEM
    assert tok.enc_token_id == hf.convert_tokens_to_ids("<ENC>") == 501 + N_MEM
    assert tok.sep_token_id == hf.convert_tokens_to_ids("<SEP>") == 502 + N_MEM
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (hf.unk_token_id, hf.bos_token_id,
                                                    hf.eos_token_id) == (0, 1, 2)
    assert tok.pad_id == hf.pad_token_id == 1
    assert set(tok.special_ids) == set(hf.all_special_ids)
    for i in list(range(0, 515, 7)) + [500, 513, 514]:
        assert tok.id_to_token(i) == hf.convert_ids_to_tokens(i)
        assert tok.token_to_id(tok.id_to_token(i)) == i


def test_encode_matches_hf(toks):
    tok, hf = toks
    strings = random_strings(400, seed=1)
    assert sum(any(s in x for s in ("<MEM3>", "<SEP>", "<ENC>", "<AE>", "<s>", "</s>"))
               for x in strings) > 200
    for s in strings:
        want = hf(s, add_special_tokens=False)["input_ids"]
        assert tok.encode(s) == want, repr(s)
        assert tok.encode(s, add_bos=True) == hf(s)["input_ids"], repr(s)  # add_bos_token
        assert tok.encode(s, add_bos=True, add_eos=True) == [1] + want + [2]


def test_batch_encode_and_legacy_prefix(toks):
    tok, hf = toks
    strings = ["<s>hello", "a <s> b", "<ENC><s>the model</s>"]
    assert tok.encode_batch(strings) == hf(strings, add_special_tokens=False)["input_ids"]
    # Every piece after a special token gets the dummy-prefix "▁".
    assert tok.encode("<s>the") == [1] + tok.encode("the")
    assert tok.split_special("a<MEM10>b<s>") == ["a", "<MEM10>", "b", "<s>"]


def test_decode_matches_hf(toks):
    tok, hf = toks
    for s in random_strings(300, seed=2):
        ids = hf(s, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), repr(s)
    rng = np.random.default_rng(3)
    for _ in range(300):  # arbitrary ids: broken byte runs, specials anywhere
        ids = rng.integers(0, len(hf), size=int(rng.integers(0, 24))).tolist()
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids
    rows = [[1, 5, 6], [2, 300]]
    assert tok.batch_decode(rows) == hf.batch_decode(rows, skip_special_tokens=True)


def test_shared_memory_token(model_path):
    tok = ClaraTokenizer.from_file(model_path, 4, different_mem_tokens=False)
    hf = hf_tokenizer(model_path, 4, different_mem_tokens=False)
    assert tok.mem_tokens == ["<MEM>"] * 4
    assert tok.mem_token_ids == [500] * 4 == [hf.convert_tokens_to_ids("<MEM>")] * 4
    assert tok.vocab_size == len(hf) == 504
    assert (tok.ae_token_id, tok.enc_token_id, tok.sep_token_id) == (501, 502, 503)
    for s in ["<MEM><MEM><SEP>\n\nQuestion:x", "<MEM0> <MEM>", *random_strings(50, 4)]:
        assert tok.encode(s) == hf(s, add_special_tokens=False)["input_ids"], repr(s)


def test_from_dir(model_path, tmp_path):
    hf = hf_tokenizer(model_path, 8)
    hf.save_pretrained(tmp_path)  # tokenizer.json (legacy layout) + tokenizer.model
    tok = ClaraTokenizer.from_dir(tmp_path, doc_max_length=256, compress_rate=32)
    assert tok.n_mem == 8 and tok.vocab_size == 511 == len(hf)
    assert tok.encode("<ENC><s>who was</s>") == hf("<ENC><s>who was</s>",
                                                     add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError):
        ClaraTokenizer.from_dir(tmp_path, doc_max_length=250, compress_rate=32)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="legacy"):
        ClaraTokenizer.from_dir(tmp_path, doc_max_length=256, compress_rate=32)
