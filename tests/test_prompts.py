"""Prompt builders against the official recipe run with Hugging Face's tokenizer.

The reference below re-enacts apple/ml-clara's steps (modeling_clara.py:867-911, 975-1181;
sft_dataset.py:37-54, 112-224) with LlamaTokenizerFast + Mistral-7B-Instruct-v0.2's chat
template; the builders must give the same ids, masks, labels and memory slots.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from clara_jax.clara import prompts  # noqa: E402
from clara_jax.clara.tokenizer import ClaraTokenizer  # noqa: E402
from tests.test_tokenizer import hf_tokenizer, train_sp_model  # noqa: E402

# Mistral-7B-Instruct-v0.2 tokenizer_config.json chat_template (Hugging Face hub).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")

# Independent copies of the official strings (modeling_clara.py:41-55, 993, 1036, 1081).
SYS_QA = ("You are a helpful assistant. Given a document, your task is to generate some single "
          "questions to cover all key information of the document and answer them "
          "sequentially.")
SYS_PARA = ("You are a helpful assistant. Your task is follow the instructions to paraphrase "
            "the background information.")
SYS_ANS = ("You are a helpful assistant. Your task is to extract relevant information from "
           "provided documents and to answer to questions as briefly as possible.")
PARA = [
    'Background: {docs} means the same as',
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences "
    "above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition "
    "of:",
    "The essence of background: {docs} is captured again in the following statement:",
]

DOC_MAX, RATE = 64, 16
N = DOC_MAX // RATE


# -- the official recipe with the HF tokenizer ------------------------------------------------

class Official:
    def __init__(self, hf, k: int):
        self.hf, self.k = hf, k
        self.mem_tokens = hf.special_tokens_map["additional_special_tokens"][:N]
        if "<MEM>" in self.mem_tokens:
            self.mem_tokens = ["<MEM>"] * N
        self.docs = ("".join(self.mem_tokens) + "<SEP>") * k

    def chat(self, system, user, answer):
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": user.replace(':\\ ', ': ')}]
        prompt = self.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        if answer is None:
            return prompt
        response = self.hf.apply_chat_template(
            msgs + [{"role": "assistant", "content": answer}], tokenize=False,
            add_generation_prompt=False, enable_thinking=False)
        return len(self.hf.encode(prompt, add_special_tokens=False)), response

    def qa(self, qs, ans):
        target = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(qs, ans))
        return self.chat(SYS_QA, f"Background:\n{self.docs}", target)

    def paraphrase(self, answer, instruction):
        return self.chat(SYS_PARA, instruction.format(docs=self.docs), answer)

    def standard(self, q, answer):
        return self.chat(SYS_ANS, f"Background:\n{self.docs}\n\nQuestion:{q}", answer)

    def collate(self, prompt_responses, max_len):
        enc = self.hf([pr[1] for pr in prompt_responses], return_tensors="np",
                      padding="longest", add_special_tokens=False, truncation=True,
                      max_length=max_len)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = np.where(mask.astype(bool), ids, self.hf.pad_token_id)
        for i, (plen, _) in enumerate(prompt_responses):
            valid = np.flatnonzero(mask[i])
            labels[i, :min(valid[0] + plen, valid[-1] + 1)] = -100
        return ids, mask, labels

    def generation(self, instructions, max_len=1024):
        enc = self.hf(instructions, return_tensors="np", padding="longest",
                      add_special_tokens=False, truncation=True, max_length=max_len)
        return enc["input_ids"], enc["attention_mask"]

    def mem_positions(self, ids):
        first = np.argmax(ids == self.hf.convert_tokens_to_ids(self.mem_tokens[0]), axis=1)
        slot = np.arange(self.k)[:, None] * (N + 1) + np.arange(N)[None, :]
        return first[:, None] + slot.reshape(1, -1)

    def encoder(self, texts, max_length):
        enc = self.hf([f"<ENC><s>{t}</s>" for t in texts], return_tensors="np",
                      padding="max_length", max_length=max_length + 3, truncation=True,
                      add_special_tokens=False)
        mem = np.array([self.hf.convert_tokens_to_ids(self.mem_tokens)] * len(texts))
        return (np.concatenate([enc["input_ids"], mem], 1),
                np.concatenate([enc["attention_mask"], np.ones_like(mem)], 1))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sp_model(str(tmp_path_factory.mktemp("sp") / "tokenizer"))


@pytest.fixture(scope="module")
def toks(model_path):
    hf = hf_tokenizer(model_path, N)
    hf.chat_template = MISTRAL_TEMPLATE
    return ClaraTokenizer.from_file(model_path, N), hf


def check_batch(batch: prompts.DecoderBatch, want_ids, want_mask, want_labels, want_pos,
                max_len: int, pad_id: int = 1):
    b, length = want_ids.shape
    for a in batch[:4]:
        assert a.dtype == np.int32 and a.shape[0] == b
    assert batch.input_ids.shape == batch.labels.shape == (b, max_len)
    np.testing.assert_array_equal(batch.input_ids[:, -length:], want_ids)
    np.testing.assert_array_equal(batch.attention_mask[:, -length:], want_mask)
    np.testing.assert_array_equal(batch.labels[:, -length:], want_labels)
    assert np.all(batch.input_ids[:, :-length] == pad_id)
    assert np.all(batch.attention_mask[:, :-length] == 0)
    assert np.all(batch.labels[:, :-length] == -100)
    np.testing.assert_array_equal(batch.mem_positions, want_pos + (max_len - length))


def rand_text(rng: random.Random, lo=1, hi=12) -> str:
    atoms = ["who", "is", "the", "genus", "of", "Paris", "?", ".", ",", "é", "東京", "🙂",
             "\n", "  ", "1987", "a:\\ b", "<s>", "x:", "Answer", "[INST]"]
    return "".join(rng.choice(atoms) + rng.choice(["", " ", " "])
                   for _ in range(rng.randint(lo, hi)))


def test_strings_verbatim():
    assert prompts.SYSTEM_QA == SYS_QA
    assert prompts.SYSTEM_PARAPHRASE == SYS_PARA
    assert prompts.SYSTEM_ANSWER == SYS_ANS
    assert list(prompts.PARAPHRASE_INSTRUCTIONS) == PARA and len(PARA) == 13


def test_chat_strings_match_template(toks):
    tok, hf = toks
    ref = Official(hf, k=2)
    plen, resp = ref.standard("who? a:\\ b", "yes")
    prompt, response = prompts.answer_strings(tok, "who? a:\\ b", "yes", 2)
    assert response == resp and len(tok.encode(prompt)) == plen
    assert prompt == ref.standard("who? a:\\ b", None)
    assert response.startswith("<s> [INST] " + SYS_ANS + "\n\nBackground:\n<MEM0>")
    assert response.endswith("\n\nQuestion:who? a: b [/INST] yes</s>")


@pytest.mark.parametrize("k,max_len", [(3, 400), (3, 160), (1, 110)])
def test_instruct_and_end_to_end(toks, k, max_len):
    tok, hf = toks
    rng = random.Random(k + max_len)
    qs = [rand_text(rng) for _ in range(6)]
    ans = [rand_text(rng, 1, 30 if i % 2 else 3) for i in range(6)]
    ref = Official(hf, k)
    ids, mask, labels = ref.collate([ref.standard(q, a) for q, a in zip(qs, ans)], max_len)
    batch = prompts.instruct(tok, qs, ans, k=k, max_len=max_len)
    check_batch(batch, ids, mask, labels, ref.mem_positions(ids), max_len)
    full = [len(tok.encode(prompts.answer_strings(tok, q, a, k)[1])) for q, a in zip(qs, ans)]
    assert batch.n_truncated == sum(n > max_len for n in full)
    if max_len == 160:
        assert 0 < batch.n_truncated < 6
    if max_len == 110:  # cut inside the prompt: no label survives
        assert batch.n_truncated == 6 and np.all(batch.labels == -100)
    # Loss covers the answer and </s>: the last real label of an uncut row is eos.
    for i, n in enumerate(full):
        if n <= max_len:
            assert batch.labels[i, -1] == tok.eos_id
            assert (batch.labels[i] != -100).sum() == len(tok.encode(
                prompts.answer_strings(tok, qs[i], ans[i], k)[1])) - len(
                tok.encode(prompts.answer_strings(tok, qs[i], None, k)[0]))
    e2e = prompts.end_to_end(tok, qs, ans, k=k, max_len=max_len)
    for a, b in zip(batch[:4], e2e[:4]):
        np.testing.assert_array_equal(a, b)


def test_pretrain_qa(toks):
    tok, hf = toks
    rng = random.Random(5)
    qs = [[rand_text(rng) for _ in range(rng.randint(1, 4))] for _ in range(5)]
    ans = [[rand_text(rng, 1, 4) for _ in q] for q in qs]
    ref = Official(hf, 1)
    ids, mask, labels = ref.collate([ref.qa(q, a) for q, a in zip(qs, ans)], 220)
    batch = prompts.pretrain_qa(tok, qs, ans, k=1, max_len=220)
    check_batch(batch, ids, mask, labels, ref.mem_positions(ids), 220)
    assert batch.mem_positions.shape == (5, N)
    qs, ans = ["who is it?", "where?"], ["him", "in Paris, France."]
    one = prompts.pretrain_qa(tok, [qs], [ans], k=1, max_len=220)
    text = tok.decode(one.labels[0][one.labels[0] >= 0], skip_special_tokens=False)
    assert text == ("Question: who is it?\nAnswer: him\n"
                    "Question: where?\nAnswer: in Paris, France.</s>")


def test_pretrain_paraphrase(toks):
    tok, hf = toks
    rng = random.Random(6)
    paras = [rand_text(rng, 2, 20) for _ in range(13)]
    for k in (1, 2):
        ref = Official(hf, k)
        ids, mask, labels = ref.collate(
            [ref.paraphrase(a, PARA[i]) for i, a in enumerate(paras)], 160)
        batch = prompts.pretrain_paraphrase(tok, paras, k=k, max_len=160,
                                            instruction=list(range(13)))
        check_batch(batch, ids, mask, labels, ref.mem_positions(ids), 160)
    # Without indices: draws like the official random.choice for the same seed.
    random.seed(11)
    official = [PARA.index(random.choice(PARA)) for _ in range(13)]
    drawn = prompts._instruction_indices(13, None, random.Random(11))
    assert drawn == official
    one = prompts.pretrain_paraphrase(tok, paras[:2], k=1, max_len=160, instruction=4)
    two = prompts.pretrain_paraphrase(tok, paras[:2], k=1, max_len=160,
                                      rng=np.random.default_rng(0))
    assert one.input_ids.shape == two.input_ids.shape == (2, 160)


def test_generation_prompts(toks):
    tok, hf = toks
    rng = random.Random(7)
    qs = [rand_text(rng) for _ in range(4)]
    ref = Official(hf, 2)
    ids, mask = ref.generation([ref.standard(q, None) for q in qs])  # M:701-713, M:792-800
    for stage in ("instruct", "end_to_end"):
        batch = prompts.generation_prompts(tok, qs, k=2, max_len=1024, stage=stage)
        check_batch(batch, ids, mask, np.full_like(ids, -100), ref.mem_positions(ids), 1024)
        assert batch.n_truncated == 0
    # generate_from_paraphrase (M:766-767): the prompt alone.
    ids, mask = ref.generation([ref.paraphrase(None, PARA[3])] * 2)
    batch = prompts.generation_prompts(tok, ["", ""], k=2, max_len=300, stage="paraphrase",
                                       instruction=3)
    check_batch(batch, ids, mask, np.full_like(ids, -100), ref.mem_positions(ids), 300)
    qa = prompts.generation_prompts(tok, ["", ""], k=1, max_len=200, stage="pretrain_qa")
    # Legacy tokenisation: the piece after <SEP> gets its own "▁", hence two spaces.
    assert tok.decode(qa.input_ids[0], skip_special_tokens=False).endswith(
        "Background:\n<MEM0><MEM1><MEM2><MEM3><SEP>  [/INST]")
    for stage in ("nope", "stage1_2", "stage2"):   # Apple's names stop at the boundaries
        with pytest.raises(ValueError, match="unknown generation stage"):
            prompts.generation_prompts(tok, qs, k=2, stage=stage)


def test_encode_documents(toks):
    tok, hf = toks
    rng = random.Random(8)
    docs = [rand_text(rng, 0, 3) for _ in range(3)] + [rand_text(rng, 40, 80) for _ in range(3)]
    docs += ["", "<SEP> inside </s> text <MEM1>"]
    ref = Official(hf, 1)
    want_ids, want_mask = ref.encoder(docs, DOC_MAX)
    ids, mask, n_cut = prompts.encode_documents(tok, docs, DOC_MAX, N)
    assert ids.shape == mask.shape == (len(docs), DOC_MAX + 3 + N)
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    lengths = [len(hf(f"<ENC><s>{d}</s>", add_special_tokens=False)["input_ids"]) for d in docs]
    assert n_cut == sum(n > DOC_MAX + 3 for n in lengths) and n_cut >= 1
    np.testing.assert_array_equal(ids[:, -N:], np.tile(tok.mem_token_ids, (len(docs), 1)))
    # Uncut rows end with </s>, start (after padding) with <ENC> <s>; padding is bos, mask 0.
    for row, n in enumerate(lengths):
        width = DOC_MAX + 3
        if n <= width:
            assert ids[row, width - 1] == tok.eos_id
            assert list(ids[row, width - n:width - n + 2]) == [tok.enc_token_id, tok.bos_id]
            assert np.all(ids[row, :width - n] == tok.pad_id) and mask[row, :width - n].sum() == 0
    # Queries in stage-3 training use the decoder max length (D:194).
    qids, qmask, _ = prompts.encode_documents(tok, docs[:2], 100, N)
    np.testing.assert_array_equal(qids, ref.encoder(docs[:2], 100)[0])
    with pytest.raises(ValueError):
        prompts.encode_documents(tok, docs, DOC_MAX, N + 1)


def test_shared_memory_token(model_path):
    tok = ClaraTokenizer.from_file(model_path, N, different_mem_tokens=False)
    hf = hf_tokenizer(model_path, N, different_mem_tokens=False)
    hf.chat_template = MISTRAL_TEMPLATE
    ref = Official(hf, 2)
    assert ref.mem_tokens == ["<MEM>"] * N
    qs, ans = ["who is it?", "what?"], ["him", "a genus of plant"]
    ids, mask, labels = ref.collate([ref.standard(q, a) for q, a in zip(qs, ans)], 128)
    batch = prompts.instruct(tok, qs, ans, k=2, max_len=128)
    check_batch(batch, ids, mask, labels, ref.mem_positions(ids), 128)
    d_ids, d_mask, _ = prompts.encode_documents(tok, ["the genus", "x"], DOC_MAX, N)
    np.testing.assert_array_equal(d_ids, ref.encoder(["the genus", "x"], DOC_MAX)[0])


def test_static_shapes_and_slot_overflow(toks):
    tok, _ = toks
    a = prompts.instruct(tok, ["q"], ["a"], k=5, max_len=200)
    b = prompts.instruct(tok, ["a much longer question " * 3, "q"], ["x " * 30, "y"], k=5,
                         max_len=200)
    assert a.input_ids.shape == (1, 200) and b.input_ids.shape == (2, 200)
    assert a.mem_positions.shape == (1, 5 * N) and b.mem_positions.shape == (2, 5 * N)
    ids = b.input_ids[np.arange(2)[:, None], b.mem_positions]
    np.testing.assert_array_equal(ids, np.tile(tok.mem_token_ids * 5, (2, 1)))
    # Each slot is followed by <SEP>.
    sep_at = b.mem_positions.reshape(2, 5, N)[:, :, -1] + 1
    assert np.all(b.input_ids[np.arange(2)[:, None], sep_at] == tok.sep_token_id)
    with pytest.raises(ValueError, match="memory slots"):
        prompts.instruct(tok, ["q"], ["a"], k=5, max_len=100)
