"""HFClaraTokenizer and chat templates against transformers, on tiny byte-level BPE tokenizers
trained here in the layouts of Llama 3, Qwen2.5 and Phi-4 (pre-tokenizer regexes, special
tokens, tokenizer_config.json), and the Mistral sentencepiece tokenizer of test_tokenizer.

The reference is `AutoTokenizer.from_pretrained(dir, use_fast=True)` followed by the official
decoder-tokenizer steps (modeling_clara.py:452-506, re-enacted below and checked against
Apple's own function when ../shared/reference/ml-clara is there); ids, decoded text and
chat-template ids must be equal.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from clara_jax.clara import chat, prompts  # noqa: E402
from clara_jax.clara.tokenizer import (ClaraTokenizer, HFClaraTokenizer,  # noqa: E402
                                       SentencePieceClaraTokenizer, mem_token_strings)
from tests.test_prompts import MISTRAL_TEMPLATE, Official  # noqa: E402
from tests.test_tokenizer import hf_tokenizer, train_sp_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "ml-clara")
DOC_MAX, RATE = 64, 16
N = DOC_MAX // RATE

# Pre-tokenizer regexes as published in the models' tokenizer.json files.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
               r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Chat templates written from the published formats.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}\n"
    "    {% if loop.index0 == 0 %}\n"
    "        {% set content = bos_token + content %}\n"
    "    {% endif %}\n"
    "    {{ content }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}\n"
    "{% endif %}\n")
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a tiny assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
PHI4_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
# A Gemma-like template without a system role (the official fallback's case).
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _added(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


# name -> (pre-tokenizer, normalizer, tokens in tokenizer.json, tokens only in
# tokenizer_config.json's added_tokens_decoder, tokenizer_config fields, chat template)
LAYOUTS = {
    "llama3": dict(
        pre=pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=None,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"],
        config_only=["<|reserved_special_token_1|>"],
        non_special=[],
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "clean_up_tokenization_spaces": True,
                "tokenizer_class": "PreTrainedTokenizerFast"},
        template=LLAMA3_TEMPLATE),
    "qwen2.5": dict(
        pre=pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC(),
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"],
        config_only=[],
        non_special=["<tool_call>"],
        config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "unk_token": None, "errors": "replace",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>",
                                              "<|object_ref_start|>"],
                "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer"},
        template=QWEN25_TEMPLATE),
    "phi4": dict(  # a plain GPT-2 ByteLevel pre-tokenizer: the loader resets add_prefix_space
        pre=pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
        normalizer=None,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"],
        config_only=[],
        non_special=[],
        config={"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|dummy_85|>",
                "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                "tokenizer_class": "GPT2Tokenizer"},
        template=PHI4_TEMPLATE),
}

WORDS = ("the of and to in is was for on that with as by at from document question answer "
         "background memory token paris france genus plant mexico who what where when "
         "compress retrieval model don't it's we're I'm café naïve Ærø 東京 北京 Ω ß").split()
ATOMS = ["the", " the", "document", "Question", "Answer:", "Paris", ".", ",", "?", "!", ":",
         "é", "e\u0301", "東京", "🙂", "naïve", "Ærø", "ß", "Ω", "\u00a0", "'", '"', "don't",
         "'S", "I'm", "123", "4", "12345678", "3.14", "2024-01-05", " ", "  ", "   ", "\t",
         "\n", "\n\n", " \n ", "\r\n", "<", ">", "<MEM", "<MEM99>", "<|", "|>",
         "<MEM0>", "<MEM1>", "<MEM3>", "<SEP>", "<ENC>", "<AE>", "<|im_start|>", "<|im_end|>",
         "<|eot_id|>", "<|begin_of_text|>", "<|endoftext|>", "<tool_call>", "<s>", "[INST]"]


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        if rng.random() < 0.3:
            s = s.capitalize() + rng.choice(".?!,:") + "\n"
        if rng.random() < 0.2:
            s += f" {rng.randint(0, 99999)}"
        lines.append(s)
    return lines


def build_tokenizer_dir(path: str, layout: str, vocab_size: int = 700) -> str:
    """A byte-level BPE tokenizer.json + tokenizer_config.json in `layout` (LAYOUTS), trained
    on generated text."""
    spec = LAYOUTS[layout]
    tk = tokenizers.Tokenizer(models.BPE())
    if spec["normalizer"] is not None:
        tk.normalizer = spec["normalizer"]
    tk.pre_tokenizer = spec["pre"]
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    tk.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                   for t in spec["non_special"]])
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    decoder = {str(i): _added(t.content, t.special)
               for i, t in tk.get_added_tokens_decoder().items()}
    next_id = tk.get_vocab_size(with_added_tokens=True)
    for i, t in enumerate(spec["config_only"]):
        decoder[str(next_id + i)] = _added(t)
    config = dict(spec["config"], added_tokens_decoder=decoder, chat_template=spec["template"],
                  model_max_length=4096)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def official_steps(hf, model_name: str, different_mem_tokens: bool = True):
    """modeling_clara.py:460-503 on a loaded fast tokenizer (an independent re-enactment)."""
    extra = hf.special_tokens_map.get("additional_special_tokens", [])
    mem = mem_token_strings(N) if different_mem_tokens else ["<MEM>"]
    hf.add_special_tokens({"additional_special_tokens": extra + mem + ["<AE>", "<ENC>",
                                                                     "<SEP>"]})
    if hf.bos_token is None and "qwen" in model_name.lower():
        hf.bos_token = hf.special_tokens_map["additional_special_tokens"][0]
    if hf.eos_token is None and "qwen" in model_name.lower():
        hf.eos_token = hf.special_tokens_map["additional_special_tokens"][1]
    hf.sep_token = "<SEP>"
    if hf.pad_token_id is None:
        hf.pad_token_id = hf.bos_token_id
    return hf


def reference(path: str, different_mem_tokens: bool = True):
    hf = transformers.AutoTokenizer.from_pretrained(path, use_fast=True, padding_side="left")
    return official_steps(hf, path, different_mem_tokens)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    path = build_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / f"tiny-{request.param}"),
                               request.param)
    tok = ClaraTokenizer.from_dir(path, DOC_MAX, RATE)
    return request.param, path, tok, reference(path)


def random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  hello", "hello  ", "\n", "<ENC><|begin_of_text|>the document<|eot_id|>",
           "<MEM1><MEM0><MEM3><SEP>\n\nQuestion:who", "a<MEM0>b", "東京🙂\n\n 123456"]
    while len(out) < count:
        parts = [rng.choice(ATOMS) + (" " if rng.random() < 0.4 else "")
                 for _ in range(rng.randint(1, 16))]
        if rng.random() < 0.3:
            parts.insert(0, " " * rng.randint(1, 3))
        out.append("".join(parts))
    return out


# -- tokenizer ---------------------------------------------------------------------------------

def test_vocabulary_and_special_ids(pair):
    layout, _, tok, hf = pair
    assert isinstance(tok, HFClaraTokenizer)
    assert tok.vocab_size == len(hf) == tok.base_vocab_size + N + 3
    assert tok.mem_token_ids == hf.convert_tokens_to_ids(mem_token_strings(N))
    assert tok.mem_token_ids == list(range(tok.base_vocab_size, tok.base_vocab_size + N))
    assert (tok.ae_token_id, tok.enc_token_id, tok.sep_token_id) == tuple(
        hf.convert_tokens_to_ids(["<AE>", "<ENC>", "<SEP>"]))
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id,
                                                    hf.pad_token_id)
    assert tok.unk_id == hf.unk_token_id
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.special_ids == {i for i, t in hf.added_tokens_decoder.items() if t.special}
    for i in range(0, tok.vocab_size, 7):
        assert tok.id_to_token(i) == hf.convert_ids_to_tokens(i)
        assert tok.token_to_id(tok.id_to_token(i)) == i
    if layout == "qwen2.5":  # the official Qwen rule: bos = first additional special token
        assert tok.bos_token == "<|im_start|>" and tok.pad_id == hf.convert_tokens_to_ids(
            "<|endoftext|>")
    if layout == "llama3":  # no pad token: pad = bos; the config-only token was added
        assert tok.pad_id == tok.bos_id
        assert tok.token_to_id("<|reserved_special_token_1|>") == tok.base_vocab_size - 1


def test_encode_matches_transformers(pair):
    _, _, tok, hf = pair
    texts = random_strings(300, 1)
    for s in texts:
        assert tok.encode(s) == hf(s, add_special_tokens=False)["input_ids"], repr(s)
    assert tok.encode_batch(texts[:50], add_bos=True, add_eos=True) == [
        [hf.bos_token_id] + hf.encode(s, add_special_tokens=False) + [hf.eos_token_id]
        for s in texts[:50]]
    # Memory tokens stay whole inside text, and "<MEM1>" is not cut into "<MEM1" + ...
    ids = tok.encode("x<MEM1><MEM0> <SEP>y")
    assert ids[1:3] == tok.mem_token_ids[1::-1] and tok.sep_token_id in ids


def test_decode_matches_transformers(pair):
    _, _, tok, hf = pair
    rng = random.Random(2)
    rows = [tok.encode(s) for s in random_strings(150, 3)]
    rows += [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
             for _ in range(150)]  # includes split multi-byte characters
    for row in rows:
        for skip in (True, False):
            assert tok.decode(row, skip) == hf.decode(row, skip_special_tokens=skip), row
    assert tok.batch_decode(rows[:5]) == hf.batch_decode(rows[:5], skip_special_tokens=True)
    assert tok.decode([-100, *rows[0]]) == hf.decode(rows[0], skip_special_tokens=True)


def test_shared_memory_token(tmp_path):
    path = build_tokenizer_dir(str(tmp_path / "tiny-qwen"), "qwen2.5")
    tok = ClaraTokenizer.from_dir(path, DOC_MAX, RATE, different_mem_tokens=False)
    hf = reference(path, different_mem_tokens=False)
    assert tok.mem_token_ids == [hf.convert_tokens_to_ids("<MEM>")] * N
    assert tok.vocab_size == len(hf)
    for s in ["<MEM><MEM><SEP>\n\nQuestion:x", "<MEM0> <MEM>", *random_strings(40, 4)]:
        assert tok.encode(s) == hf(s, add_special_tokens=False)["input_ids"], repr(s)


@pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE, "openrlhf")),
                    reason=f"Apple's code is not at {REFERENCE}")
def test_reenactment_is_the_official_function(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    mc = common.load_official(REFERENCE)
    for layout in LAYOUTS:
        path = build_tokenizer_dir(str(tmp_path / f"tiny-{layout}"), layout)
        cfg = mc.CLaRaConfig(decoder_model_name=path, doc_max_length=DOC_MAX, compr_rate=RATE,
                             different_mem_tokens=True)
        with contextlib.redirect_stdout(io.StringIO()):
            official = mc.CLaRa._create_decoder_tokenizer(cfg)
        ours = reference(path)
        assert official.get_vocab() == ours.get_vocab()
        assert official.special_tokens_map == ours.special_tokens_map
        assert official.pad_token_id == ours.pad_token_id
        tok = ClaraTokenizer.from_dir(path, DOC_MAX, RATE)
        assert tok.mem_token_ids == official.mem_token_ids
        assert (tok.bos_id, tok.eos_id, tok.sep_token_id) == (
            official.bos_token_id, official.eos_token_id, official.sep_token_id)


def test_pickle_round_trip(pair):
    """Data-loader workers get the tokenizer pickled (after it has rendered prompts)."""
    _, _, tok, _ = pair
    prompt = prompts.answer_strings(tok, "who? 東京", None, 2)[0]
    again = pickle.loads(pickle.dumps(tok))
    assert prompts.answer_strings(again, "who? 東京", None, 2)[0] == prompt
    assert again.encode(prompt) == tok.encode(prompt)


def test_from_file_and_errors(pair, tmp_path):
    _, path, tok, _ = pair
    same = ClaraTokenizer.from_file(os.path.join(path, "tokenizer.json"), N)
    assert same.vocab_size == tok.vocab_size and same.encode("who 東京") == tok.encode("who 東京")
    # No bos token and no Qwen name: the encoder inputs could not be written.
    config = json.load(open(os.path.join(path, "tokenizer_config.json")))
    spec = open(os.path.join(path, "tokenizer.json")).read()
    no_bos = dict(config, bos_token=None)
    with pytest.raises(ValueError, match="bos_token"):
        HFClaraTokenizer(spec, no_bos, N, model_name="tiny-llama")
    # No chat template: prompts fail naming the file.
    bare = HFClaraTokenizer(spec, config, N, chat_template=None, model_name=path,
                            chat_template_source="x/tokenizer_config.json")
    with pytest.raises(ValueError, match="x/tokenizer_config.json: no chat_template"):
        prompts.answer_strings(bare, "who?", None, 1)
    # A WordPiece tokenizer.json is neither layout.
    wp = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (tmp_path / "d").mkdir()
    wp.save(str(tmp_path / "d" / "tokenizer.json"))
    with pytest.raises(ValueError, match="byte-level BPE"):
        ClaraTokenizer.from_dir(tmp_path / "d", DOC_MAX, RATE)


# -- chat templates ----------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who was  東京?\n"}],
    [{"role": "system", "content": "Answer with <SEP> once."},
     {"role": "user", "content": "Background:\n<MEM0><MEM1><MEM2><MEM3><SEP>\n\nQuestion:x"},
     {"role": "assistant", "content": " Paris, 1987. 🙂 "}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "  and 123?"}],
]


@pytest.fixture(scope="module")
def mistral_pair(tmp_path_factory):
    """The sentencepiece tokenizer from a directory whose tokenizer_config.json has Mistral's
    template, and its transformers twin."""
    path = tmp_path_factory.mktemp("mistral")
    model = train_sp_model(str(path / "sp"))
    hf = hf_tokenizer(model, N)
    hf.sep_token = "<SEP>"  # modeling_clara.py:483 (hf_tokenizer stops before it)
    hf.chat_template = MISTRAL_TEMPLATE
    hf.save_pretrained(path)
    return ClaraTokenizer.from_dir(path, DOC_MAX, RATE), hf, model


def _all_pairs(pair, mistral_pair):
    return [(pair[2], pair[3]), mistral_pair[:2]]


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_ids_match_transformers(pair, mistral_pair, conversation,
                                              generation_prompt):
    for tok, hf in _all_pairs(pair, mistral_pair):
        messages = CONVERSATIONS[conversation]
        want = hf.apply_chat_template(messages, tokenize=True,
                                      add_generation_prompt=generation_prompt)
        text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
        assert tok.encode(text) == want


def test_mistral_template_from_dir_is_the_builtin(mistral_pair):
    """A Mistral directory's own template and the built-in one (tokenizer.model alone) give
    the same prompts, which are today's `mistral_chat` strings."""
    tok, hf, model_path = mistral_pair
    plain = ClaraTokenizer.from_file(model_path, N)
    assert tok.special_tokens_map == plain.special_tokens_map == hf.special_tokens_map
    assert isinstance(tok, SentencePieceClaraTokenizer)
    assert tok.chat_template == MISTRAL_TEMPLATE  # read from the directory
    assert plain.chat_template == chat.MISTRAL_CHAT_TEMPLATE
    for q, a in [("who? a:\\ b", "yes"), ("東京\n", None)]:
        got = prompts.answer_strings(tok, q, a, 2)
        assert got == prompts.answer_strings(plain, q, a, 2)
        user = ("Background:\n" + prompts.memory_slots(tok, 2) + "\n\nQuestion:"
                + q.replace(":\\ ", ": "))
        assert got[0] == prompts.mistral_chat(prompts.SYSTEM_ANSWER, user)
        assert got[1] == (None if a is None else
                          prompts.mistral_chat(prompts.SYSTEM_ANSWER, user, a))


class _Official(Official):
    """The official prompt recipe (tests.test_prompts.Official) for any base: the memory
    tokens are CLaRa's, whatever additional special tokens the base has."""

    def __init__(self, hf, k: int):
        super().__init__(hf, k)
        self.mem_tokens = mem_token_strings(N)
        self.docs = ("".join(self.mem_tokens) + "<SEP>") * k


def test_prompt_batches_match_the_official_recipe(pair):
    _, _, tok, hf = pair
    qs = ["who is the genus?", "東京 1987\n", "a:\\ b  c", "Paris, France."]
    ans = ["the plant.", "Ω 🙂", "no", "yes\n\n2"]
    ref = _Official(hf, k=2)
    ids, mask, labels = ref.collate([ref.standard(q, a) for q, a in zip(qs, ans)], 300)
    batch = prompts.instruct(tok, qs, ans, k=2, max_len=300)
    length = ids.shape[1]
    np.testing.assert_array_equal(batch.input_ids[:, -length:], ids)
    np.testing.assert_array_equal(batch.attention_mask[:, -length:], mask)
    np.testing.assert_array_equal(batch.labels[:, -length:], labels)
    np.testing.assert_array_equal(batch.mem_positions,
                                  ref.mem_positions(ids) + (300 - length))
    assert np.all(batch.input_ids[:, :-length] == tok.pad_id)
    gen = prompts.generation_prompts(tok, qs, k=2, max_len=300)
    want_ids, _ = ref.generation([ref.standard(q, None) for q in qs])
    np.testing.assert_array_equal(gen.input_ids[:, -want_ids.shape[1]:], want_ids)
    qa_len, qa_resp = ref.qa(["who?", "when?"], ["x", "1987"])
    prompt, response = prompts.qa_strings(tok, ["who?", "when?"], ["x", "1987"], 2)
    assert response == qa_resp and len(tok.encode(prompt)) == qa_len
    # The shared prefix of the baselines' prompts is the text before the user's turn.
    prefix = prompts.system_prefix(prompts.SYSTEM_ANSWER, tok)
    closed = prompts.closed_book_string("who?", tok=tok)
    assert closed.startswith(prefix) and prefix
    assert closed == hf.apply_chat_template(
        [{"role": "system", "content": prompts.SYSTEM_ANSWER},
         {"role": "user", "content": "Question:who?"}], tokenize=False,
        add_generation_prompt=True)


def test_system_role_fallback(pair):
    _, path, tok, hf = pair
    config = json.load(open(os.path.join(path, "tokenizer_config.json")))
    spec = open(os.path.join(path, "tokenizer.json")).read()
    gemma_like = HFClaraTokenizer(spec, config, N, chat_template=NO_SYSTEM_TEMPLATE,
                                  model_name=path)
    hf.chat_template = NO_SYSTEM_TEMPLATE
    try:
        ref = _Official(hf, k=1)
        for q, a in [("who?", "Paris"), ("東京", None)]:
            prompt, response = prompts.answer_strings(gemma_like, q, a, 1)
            want_prompt = hf.apply_chat_template(
                [{"role": "user", "content": prompts.SYSTEM_ANSWER + "\n" + "Background:\n"
                  + ref.docs + f"\n\nQuestion:{q}"}], tokenize=False,
                add_generation_prompt=True)
            assert prompt == want_prompt
            if a is not None:
                assert response == hf.apply_chat_template(
                    [{"role": "user", "content": prompts.SYSTEM_ANSWER + "\nBackground:\n"
                      + ref.docs + f"\n\nQuestion:{q}"},
                     {"role": "assistant", "content": a}], tokenize=False)
    finally:
        hf.chat_template = config["chat_template"]


def test_template_environment():
    """The environment transformers renders in: trim/lstrip blocks, loop controls,
    raise_exception, tojson keeping non-ASCII, {% generation %}, extra variables."""
    source = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
              "{{ m | tojson }}{% generation %}[{{ m.content | trim }}]{% endgeneration %}\n"
              "{% endfor %}{{ bos_token }}{{ enable_thinking }}")
    msgs = [{"role": "user", "content": " é "}, {"role": "a", "content": "x"},
            {"role": "u", "content": "y"}]
    tok_map = {"bos_token": "<b>", "enable_thinking": True}
    got = chat.render(chat.compile_template(source), msgs, tok_map, enable_thinking=False)
    hf_env = transformers.utils.chat_template_utils._compile_jinja_template(source)
    want = hf_env.render(messages=msgs, tools=None, documents=None,
                         add_generation_prompt=False, bos_token="<b>", enable_thinking=False)
    assert got == want and "é" in got and "y" not in got
    with pytest.raises(Exception, match="nope"):
        chat.render(chat.compile_template("{{ raise_exception('nope') }}"), [], {})
