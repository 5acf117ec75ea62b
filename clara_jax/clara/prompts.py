"""CLaRa's prompts and pure-numpy builders of fixed-shape encoder / decoder batches.

Every string and layout reproduces apple/ml-clara (the released checkpoints were trained on
them); file:line references are to that repository:
  M = openrlhf/models/modeling_clara.py, D = openrlhf/datasets/sft_dataset.py.

Encoder input (M:886-911): the string `<ENC>{bos}{text}{eos}` (Mistral: `<ENC><s>{text}</s>`),
tokenised without added special tokens, right-truncated to max_length + 3, LEFT padded with
pad (Mistral: pad = bos) to max_length + 3, then the n memory tokens appended (mask 1):
shape [N, max_length + 3 + n]. Documents use max_length = doc_max_length (D:121); stage-3
training queries use the decoder max length (D:194), inference queries doc_max_length (M:635).

Decoder prompts (M:975-1181) are [system, user(, assistant)] conversations in the decoder's
own chat template (`clara.chat`: the prompt with add_generation_prompt, the row with the
answer without it). For Mistral-7B-Instruct-v0.2 (the sentencepiece tokenizer's default),
whose system message is folded into the first user turn:
  prompt   = "<s> [INST] {system}\\n\\n{user} [/INST]"
  response = prompt + " {assistant}</s>"
(add_generation_prompt adds nothing for this template). Each of the k documents is its n
memory tokens followed by `<SEP>` (M:978-979, M:1126-1127). The user text gets
`.replace(":\\\\ ", ": ")` as in the official code. Batches are tokenised without added
special tokens, right-truncated to max_len and LEFT padded (M:457, D:148-155); labels are the
ids with -100 on padding and on the first len(tokenize(prompt)) real tokens, so the loss
covers the answer and `</s>` (D:37-54, D:160-166). Labels are aligned with input_ids (the
loss shifts them, as Hugging Face does).

Shapes here are static: rows are left padded to `max_len` (the official code pads to the
longest row; the extra left padding is masked out and, Hugging Face's positions being
arange(L) with RoPE, changes nothing but float rounding).
"""

from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import numpy as np

from clara_jax.clara import chat
from clara_jax.clara.tokenizer import ClaraTokenizer

IGNORE_INDEX = -100  # M:40

# System prompts, verbatim (M:993, M:1036, M:1081 = M:1129).
SYSTEM_QA = ("You are a helpful assistant. Given a document, your task is to generate some "
             "single questions to cover all key information of the document and answer them "
             "sequentially.")
SYSTEM_PARAPHRASE = ("You are a helpful assistant. Your task is follow the instructions to "
                     "paraphrase the background information.")
SYSTEM_ANSWER = ("You are a helpful assistant. Your task is to extract relevant information "
                 "from provided documents and to answer to questions as briefly as possible.")

# The 13 paraphrase instructions, verbatim and in order (M:41-55); {docs} = memory slots.
PARAPHRASE_INSTRUCTIONS: tuple[str, ...] = (
    "Background: {docs} means the same as",
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences "
    "above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we "
    "got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just "
    "read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition "
    "of:",
    "The essence of background: {docs} is captured again in the following statement:",
)


class DecoderBatch(NamedTuple):
    """A fixed-shape decoder batch (all int32 numpy arrays).

    input_ids, attention_mask, labels: [B, max_len], left padded (labels -100 where no loss;
    all -100 for generation prompts). mem_positions: [B, k * n] prompt positions of the memory
    slots, document-major. n_truncated: rows longer than max_len (cut on the right).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    mem_positions: np.ndarray
    n_truncated: int


# -- strings ---------------------------------------------------------------------------------

def memory_slots(tok: ClaraTokenizer, k: int) -> str:
    """k documents' placeholders: (n memory tokens + `<SEP>`) * k (M:978-979)."""
    return ("".join(tok.mem_tokens) + tok.sep_token) * k


def _template(tok: ClaraTokenizer | None) -> tuple:
    """(compiled chat template, special-tokens map) of tok; Mistral's with <s> / </s> for
    None."""
    if tok is None:
        return chat.MISTRAL_TEMPLATE, chat.MISTRAL_SPECIAL_TOKENS
    return tok.compiled_chat_template, tok.special_tokens_map


def chat_string(tok: ClaraTokenizer | None, system: str, user: str,
                assistant: str | None = None) -> str:
    """[system, user(, assistant)] in tok's chat template (`chat.system_user_chat`: without
    an assistant turn the generation prompt is added); tok None: Mistral-7B-Instruct-v0.2's
    with <s> / </s>."""
    return chat.system_user_chat(*_template(tok), system, user, assistant)


def system_prefix(system: str, tok: ClaraTokenizer | None = None) -> str:
    """The text every `chat_string` prompt with this system message starts with (for
    Mistral: "<s> [INST] {system}\\n\\n")."""
    return chat.system_prefix(*_template(tok), system)


def mistral_chat(system: str, user: str, assistant: str | None = None, *,
                 bos: str = "<s>", eos: str = "</s>") -> str:
    """Mistral-7B-Instruct-v0.2's format: "{bos} [INST] {system}\\n\\n{user} [/INST]"
    (+ " {assistant}{eos}"); add_generation_prompt makes no difference."""
    return chat.system_user_chat(chat.MISTRAL_TEMPLATE, {"bos_token": bos, "eos_token": eos},
                                 system, user, assistant)


def _user(text: str) -> str:
    return text.replace(":\\ ", ": ")  # the official `.replace(':\ ', ': ')`


def qa_strings(tok: ClaraTokenizer, questions: Sequence[str], answers: Sequence[str] | None,
               k: int) -> tuple[str, str | None]:
    """Stage-1 QA (M:991-1032): user "Background:\\n{docs}"; assistant = the lines
    "Question: {q}\\nAnswer: {a}" joined by "\\n". Returns (prompt, response or None)."""
    user = _user(f"Background:\n{memory_slots(tok, k)}")
    prompt = chat_string(tok, SYSTEM_QA, user)
    if answers is None:
        return prompt, None
    target = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(questions, answers))
    return prompt, chat_string(tok, SYSTEM_QA, user, target)


def paraphrase_strings(tok: ClaraTokenizer, answer: str | None, k: int, instruction: int
                       ) -> tuple[str, str | None]:
    """Stage-1 paraphrase (M:1034-1077): user = PARAPHRASE_INSTRUCTIONS[instruction] with
    {docs} = the memory slots; assistant = the paraphrase (the record's answers[0], D:130-136).
    """
    user = _user(PARAPHRASE_INSTRUCTIONS[instruction].format(docs=memory_slots(tok, k)))
    prompt = chat_string(tok, SYSTEM_PARAPHRASE, user)
    if answer is None:
        return prompt, None
    return prompt, chat_string(tok, SYSTEM_PARAPHRASE, user, answer)


def answer_strings(tok: ClaraTokenizer, question: str, answer: str | None, k: int
                   ) -> tuple[str, str | None]:
    """Instruction tuning and end-to-end (M:1079-1122, M:1124-1181, identical strings):
    user "Background:\\n{docs}\\n\\nQuestion:{q}" (no space after the colon)."""
    user = _user(f"Background:\n{memory_slots(tok, k)}\n\nQuestion:{question}")
    prompt = chat_string(tok, SYSTEM_ANSWER, user)
    if answer is None:
        return prompt, None
    return prompt, chat_string(tok, SYSTEM_ANSWER, user, answer)


# Baselines over the same backbone (not in the official code): the instruct layout and system
# text of `answer_strings` with no documents, or with the documents' text where the memory
# slots would be, in tok's chat template (tok None: Mistral's). Pure functions of their
# arguments; for Mistral, with an answer the string ends " {answer}</s>" (the loss covers
# the answer and `</s>`), without one it ends " [/INST]".

def closed_book_string(question: str, answer: str | None = None,
                       tok: ClaraTokenizer | None = None) -> str:
    """Closed book: "<s> [INST] {SYSTEM_ANSWER}\\n\\nQuestion:{q} [/INST]"( " {a}</s>")."""
    return chat_string(tok, SYSTEM_ANSWER, _user(f"Question:{question}"), answer)


def full_text_string(question: str, documents: Sequence[str], answer: str | None = None,
                     tok: ClaraTokenizer | None = None) -> str:
    """Text RAG: the instruct layout with "Background:\\n" followed by the documents' text,
    one per line (newlines inside a document become spaces), then "\\n\\nQuestion:{q}"."""
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not one string")
    background = "\n".join(d.replace("\n", " ") for d in documents)
    return chat_string(tok, SYSTEM_ANSWER,
                       _user(f"Background:\n{background}\n\nQuestion:{question}"), answer)


def text_batch(tok: ClaraTokenizer, questions: Sequence[str],
               documents: Sequence[Sequence[str]] | None, answers: Sequence[str] | None, *,
               max_len: int) -> DecoderBatch:
    """Baseline batch (no memory slots): closed book when documents is None, else text RAG.
    With answers the rows carry labels on the answer and `</s>`; without, they are
    generation prompts (labels all -100)."""
    if documents is not None and len(documents) != len(questions):
        raise ValueError(f"{len(documents)} document lists for {len(questions)} questions")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    pairs = []
    for i, q in enumerate(questions):
        a = None if answers is None else answers[i]
        make = ((lambda ans: closed_book_string(q, ans, tok)) if documents is None else
                (lambda ans: full_text_string(q, documents[i], ans, tok)))
        pairs.append((make(None), None if a is None else make(a)))
    return build_decoder_batch(tok, pairs, 0, max_len)


# -- encoder inputs --------------------------------------------------------------------------

def encode_documents(tok: ClaraTokenizer, docs: Sequence[str], doc_max_length: int,
                     n_mem: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Encoder inputs (M:886-911): `<ENC><s>{text}</s>` right-truncated and left padded to
    doc_max_length + 3, then the n memory tokens.

    Returns ids, mask int32 [N, doc_max_length + 3 + n] and the number of documents cut.
    Pass the decoder max length as doc_max_length for stage-3 training queries (D:194).
    """
    if n_mem != tok.n_mem:
        raise ValueError(f"n_mem {n_mem} != the tokenizer's {tok.n_mem} memory tokens")
    width = doc_max_length + 3
    ids = np.full((len(docs), width + n_mem), tok.pad_id, np.int32)
    mask = np.zeros((len(docs), width + n_mem), np.int32)
    ids[:, width:] = tok.mem_token_ids
    mask[:, width:] = 1
    n_truncated = 0
    for row, text in enumerate(docs):
        toks = tok.encode(f"{tok.enc_token}{tok.bos_token}{text}{tok.eos_token}")
        if len(toks) > width:
            toks = toks[:width]
            n_truncated += 1
        if toks:
            ids[row, width - len(toks):width] = toks
            mask[row, width - len(toks):width] = 1
    return ids, mask, n_truncated


# -- decoder batches -------------------------------------------------------------------------

def build_decoder_batch(tok: ClaraTokenizer, pairs: Sequence[tuple[str, str | None]], k: int,
                        max_len: int, *, sep: bool = True) -> DecoderBatch:
    """Tokenises (prompt, response) pairs into a left-padded DecoderBatch (D:147-166).

    With a response the row is the response and the first len(tokenize(prompt)) real tokens
    get label -100 (D:37-54); without one (generation) the row is the prompt and every label
    is -100. Memory slots are found like M:925-944: from the first `<MEM0>`, k slots of
    n + 1 tokens (n memory tokens, `<SEP>`) with `sep`, of n tokens without (M:929: the
    prompt text still has a `<SEP>` after each document's memory tokens, M:978, so document
    j > 0 is written from the `<SEP>` of document j - 1 on and the last k - 1 placeholders
    keep their token embeddings); ValueError if they do not fit in the row.
    """
    n = tok.n_mem
    b = len(pairs)
    ids = np.full((b, max_len), tok.pad_id, np.int32)
    mask = np.zeros((b, max_len), np.int32)
    labels = np.full((b, max_len), IGNORE_INDEX, np.int32)
    offsets = (np.arange(k)[:, None] * (n + int(sep)) + np.arange(n)[None, :]).reshape(-1)
    mem_positions = np.zeros((b, k * n), np.int32)
    n_truncated = 0
    for row, (prompt, response) in enumerate(pairs):
        toks = tok.encode(prompt if response is None else response)
        prompt_len = len(toks) if response is None else len(tok.encode(prompt))
        if len(toks) > max_len:
            toks = toks[:max_len]
            n_truncated += 1
        start = max_len - len(toks)
        ids[row, start:] = toks
        mask[row, start:] = 1
        labels[row, start + min(prompt_len, len(toks)):] = toks[min(prompt_len, len(toks)):]
        hits = np.flatnonzero(ids[row, start:] == tok.mem_token_ids[0])
        if k and (hits.size == 0 or start + hits[0] + offsets[-1] >= max_len):
            raise ValueError(f"row {row}: the {k} memory slots do not fit in max_len={max_len}")
        if k:
            mem_positions[row] = start + hits[0] + offsets
    return DecoderBatch(ids, mask, labels, mem_positions, n_truncated)


def pretrain_qa(tok: ClaraTokenizer, questions: Sequence[Sequence[str]],
                answers: Sequence[Sequence[str]], *, k: int, max_len: int, sep: bool = True
                ) -> DecoderBatch:
    """Stage-1 QA batch: record i asks questions[i] with answers[i] (lists) about its k
    compressed documents (D:137-142, qa_loss on)."""
    if len(questions) != len(answers):
        raise ValueError("questions and answers differ in length")
    return build_decoder_batch(
        tok, [qa_strings(tok, q, a, k) for q, a in zip(questions, answers)], k, max_len,
        sep=sep)


def _instruction_indices(b: int, instruction: int | Sequence[int] | None,
                         rng: random.Random | np.random.Generator | None) -> list[int]:
    if instruction is None:
        r = rng if rng is not None else random  # the official random.choice (M:1037)
        if isinstance(r, np.random.Generator):
            return [int(i) for i in r.integers(len(PARAPHRASE_INSTRUCTIONS), size=b)]
        return [r.randrange(len(PARAPHRASE_INSTRUCTIONS)) for _ in range(b)]
    if isinstance(instruction, int):
        return [instruction] * b
    if len(instruction) != b:
        raise ValueError("need one instruction index per record")
    return [int(i) for i in instruction]


def pretrain_paraphrase(tok: ClaraTokenizer, paraphrases: Sequence[str], *, k: int,
                        max_len: int, instruction: int | Sequence[int] | None = None,
                        rng: random.Random | np.random.Generator | None = None,
                        sep: bool = True) -> DecoderBatch:
    """Stage-1 paraphrase batch: target paraphrases[i] (a record's answers[0]); instruction
    index per record, or drawn uniformly with `rng` as the official random.choice does."""
    idx = _instruction_indices(len(paraphrases), instruction, rng)
    return build_decoder_batch(
        tok, [paraphrase_strings(tok, a, k, i) for a, i in zip(paraphrases, idx)], k, max_len,
        sep=sep)


def instruct(tok: ClaraTokenizer, questions: Sequence[str], answers: Sequence[str], *, k: int,
             max_len: int, sep: bool = True) -> DecoderBatch:
    """Instruction-tuning (stage 2, `instruct`) batch: k compressed documents, a question, its answer
    (D:137-142 -> M:986-987)."""
    if len(questions) != len(answers):
        raise ValueError("questions and answers differ in length")
    return build_decoder_batch(
        tok, [answer_strings(tok, q, a, k) for q, a in zip(questions, answers)], k, max_len,
        sep=sep)


def end_to_end(tok: ClaraTokenizer, questions: Sequence[str], answers: Sequence[str], *,
               k: int, max_len: int, sep: bool = True) -> DecoderBatch:
    """End-to-end (stage 3, `end_to_end`) batch: same layout as `instruct` with the k selected documents
    (D:197-224 -> M:1124-1181)."""
    return instruct(tok, questions, answers, k=k, max_len=max_len, sep=sep)


def generation_prompts(tok: ClaraTokenizer, questions: Sequence[str], *, k: int,
                       max_len: int = 1024, stage: str = "instruct",
                       instruction: int | Sequence[int] | None = None,
                       rng: random.Random | np.random.Generator | None = None,
                       sep: bool = True) -> DecoderBatch:
    """Left-padded prompts without answers, for decoding (labels all -100).

    stage "instruct" / "end_to_end": `generate_from_text` / `generate_from_questions`
    (M:792-800, M:701-713); "paraphrase": `generate_from_paraphrase` (M:766-767; questions
    only set the batch size); "pretrain" / "pretrain_qa": the QA prompt (no official
    generator). Our stage names only (Apple's are converted where they enter:
    `config.canonical_stage`). The official generators truncate at max_length=1024.
    """
    if stage in ("instruct", "end_to_end"):
        pairs = [answer_strings(tok, q, None, k) for q in questions]
    elif stage == "paraphrase":
        idx = _instruction_indices(len(questions), instruction, rng)
        pairs = [paraphrase_strings(tok, None, k, i) for i in idx]
    elif stage in ("pretrain_qa", "pretrain"):
        pairs = [qa_strings(tok, (), None, k) for _ in questions]
    else:
        raise ValueError(f"unknown generation stage {stage!r}; known: instruct, end_to_end, "
                         f"paraphrase, pretrain (pretrain_qa)")
    return build_decoder_batch(tok, pairs, k, max_len, sep=sep)
