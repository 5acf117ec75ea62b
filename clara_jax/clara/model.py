"""`Clara`: strings and numpy in, strings and numpy out; a thin facade over pure functions.

    model = Clara.load(path)                              # ours, or a training work directory
    model = Clara.load(release, base_model_dir=hf_dir)    # Apple's release or an adapter bundle
    model.save(out_dir); model.export_apple(out_dir)     # Apple's format (+ base_model/)
    emb = model.compress_documents(docs)                  # [len(docs), n, hidden]
    emb, mse = model.compress_documents_and_mse(docs)     # and the official MSE term
    out = model.generate_from_text(questions, documents)  # out.texts, out.token_ids

Apple's method names, signatures and return types are `clara_jax.compat.CLaRa`, built on this.

A `Clara` holds (model config, ClaraConfig, params, adapters, tokenizer) and inference
settings; its methods validate input, pick the weights and call `clara.compress`,
`clara.retrieval` and `clara.generation`. Storage is `clara.formats` (every format, below this
module in the import graph). Training builds its batches with `clara_jax.data.pipeline` and
its losses with `clara.losses`; this class has no training path.

Batches are padded to static shapes (documents in chunks of `batch_size`, prompts to a
multiple of `length_bucket` tokens), so repeated calls reuse compiled programs. Decoding is
greedy. Inference never uses dropout, and by default runs each adapter folded into a copy of
the base weights (`merge_adapters`: no LoRA matmuls; one extra copy of the weights, kept for
the adapter used last).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.clara import formats, generation, prompts
from clara_jax.clara.compress import compress_texts, compress_texts_and_mse
from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.formats import apple, ours
from clara_jax.clara.formats.parts import ClaraParts
from clara_jax.clara.generation import GenerationOutput, check_texts, equal_count
from clara_jax.clara.retrieval import encode_question_texts, top_k
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import merge_lora
from clara_jax.model.mistral import Mistral

__all__ = ["Clara", "GenerationOutput"]


@functools.partial(jax.jit, static_argnames=("lora",))
def _merge_jit(base, adapter, lora):
    return merge_lora(base, adapter, lora)


class Clara:
    """A CLaRa model: frozen base, named LoRA adapters, tokenizer and settings."""

    def __init__(self, model_config: MistralConfig, config: ClaraConfig, params: dict,
                 adapters: dict[str, dict], tokenizer: ClaraTokenizer, *,
                 tokenizer_path: str | None = None, apple_config: dict | None = None,
                 batch_size: int = 16, length_bucket: int = 64, merge_adapters: bool = True,
                 share_prefix: bool = True):
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens (base + added) but "
                             f"the model's vocabulary is {model_config.vocab_size}")
        if tokenizer.mem_token_ids[0] != config.first_mem_token_id:
            config = config.replace(first_mem_token_id=tokenizer.mem_token_ids[0])
        if tokenizer.n_mem != config.n_mem:
            raise ValueError(f"tokenizer has {tokenizer.n_mem} memory tokens, config needs "
                             f"{config.n_mem} (doc_max_length / compress_rate)")
        self.model_config = model_config
        self.config = config
        self.params = params
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.apple_config = apple_config or {}
        self.batch_size = batch_size
        self.length_bucket = length_bucket
        self.model = Mistral(model_config, config.lora)
        # Inference folds an adapter into a copy of the base (W + A @ B * alpha / r): the same
        # function up to float rounding, without the adapter's small matmuls. The copy (as
        # large as the base) is kept for the adapter used last; False runs the adapter
        # unmerged, for a model that fills its device.
        self.merge_adapters = merge_adapters
        # Prefill the instruction text every prompt of a batch starts with once
        # (`generation.split_prefix`).
        self.share_prefix = share_prefix
        self._merged: tuple[tuple, dict] | None = None

    # -- storage (clara.formats) -------------------------------------------------------

    @classmethod
    def from_parts(cls, parts: ClaraParts, **settings) -> "Clara":
        """A `Clara` over what a format read; `settings` are the constructor's keywords."""
        return cls(parts.model_config, parts.config, parts.params, parts.adapters,
                   parts.tokenizer, tokenizer_path=parts.tokenizer_path,
                   apple_config=parts.apple_config, **settings)

    @property
    def parts(self) -> ClaraParts:
        """The arrays and configs the formats write."""
        return ClaraParts(self.model_config, self.config, self.params, self.adapters,
                          self.tokenizer, self.tokenizer_path, self.apple_config)

    @classmethod
    def load(cls, path: str, base_model_dir: str | None = None, dtype: str | None = None,
             **settings) -> "Clara":
        """Any CLaRa checkpoint (`formats.load`): ours or a training work directory; an Apple
        release or an adapter bundle over `base_model_dir`."""
        return cls.from_parts(formats.load(path, base_model_dir, dtype), **settings)

    @classmethod
    def from_apple(cls, clara_dir: str, base_model_dir: str, dtype: str | None = None,
                   **settings) -> "Clara":
        """Apple's release (adapters.pth, decoder_first_last_layers.pth, config.json) over a
        Hugging Face base directory: Mistral, Llama, Qwen2 or Phi-3 (safetensors, and
        tokenizer.model or a byte-level BPE tokenizer.json with its tokenizer_config.json;
        `formats.apple.load`)."""
        return cls.from_parts(apple.load(clara_dir, base_model_dir, dtype), **settings)

    def save(self, out_dir: str) -> None:
        """Our format (`formats.ours`), written atomically."""
        ours.save(out_dir, self.parts)

    def export_apple(self, out_dir: str, base_dir: str | None = None,
                     training_stage: str | None = None) -> None:
        """Apple's release format, loaded by the official `CLaRa.from_pretrained(out_dir)`
        (`formats.apple.save`): over `base_dir` (an existing Hugging Face base), an imported
        release's base, or else this model's base written to `{out_dir}/base_model`;
        `training_stage` is Apple's name (default: the one loading every adapter)."""
        apple.save(out_dir, self.parts, base_dir=base_dir, training_stage=training_stage)

    # -- weights -------------------------------------------------------------------------

    def _weights(self, name: str | None) -> tuple[dict, dict | None]:
        """(params, adapter) to run under the named adapter (None: the base alone). With
        merge_adapters: the base with the adapter folded in, and None."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(self.adapters)}")
        if name is None:
            return self.params, None
        adapter = self.adapters[name]
        if not self.merge_adapters:
            return self.params, adapter
        key = (name, id(self.params), id(adapter))
        if self._merged is None or self._merged[0] != key:
            self._merged = None  # drop the previous copy before making the next
            self._merged = (key, _merge_jit(self.params, adapter, self.config.lora))
        return self._merged[1], None

    # -- compression and retrieval -------------------------------------------------------

    def compress_documents(self, documents: Sequence[str]) -> np.ndarray:
        """Memory-token states [len(documents), n, hidden] (float32) under the encoder adapter.
        Documents longer than doc_max_length are cut (as the official code does)."""
        check_texts(documents, "documents")
        params, adapter = self._weights("encoder")
        return compress_texts(self.model, params, adapter, self.tokenizer, documents,
                              self.config.doc_max_length, self.config.n_mem, self.batch_size)

    def compress_documents_and_mse(self, documents: Sequence[str]) -> tuple[np.ndarray, float]:
        """(`compress_documents`, the MSE between each document's mean memory state and mean
        text state, averaged over documents and features: the official `mse_loss`)."""
        check_texts(documents, "documents")
        params, adapter = self._weights("encoder")
        states, mse = compress_texts_and_mse(
            self.model, params, adapter, self.tokenizer, documents, self.config.doc_max_length,
            self.config.n_mem, self.batch_size)
        return states, float(np.mean(mse))

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        """Query-reasoner representations [B, n * hidden] (questions encoded like documents)."""
        check_texts(questions, "questions")
        params, adapter = self._weights("query_reasoner")
        return encode_question_texts(self.model, params, adapter, self.tokenizer, questions,
                                     self.config.doc_max_length, self.config.n_mem,
                                     self.batch_size)

    def retrieve(self, questions: Sequence[str], candidate_states: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of candidate_states [B, N, n, hidden] by cosine with the query reasoner:
        (indices [B, k], scores [B, k]), descending."""
        n_cand = candidate_states.shape[1]
        if k > n_cand:
            raise ValueError(f"k={k} is larger than the number of candidates {n_cand}")
        q = self.encode_questions(questions)
        idx, scores = top_k(jnp.asarray(q), jnp.asarray(candidate_states), k)
        return np.asarray(idx), np.asarray(scores)

    # -- generation ----------------------------------------------------------------------

    def _from_memory(self, questions: Sequence[str], states: np.ndarray, stage: str,
                     max_new_tokens: int, adapter: str | None = "decoder",
                     instruction: int = 0) -> GenerationOutput:
        """Answers with states [B, k, n, D] in the memory slots of `stage`'s prompts."""
        batch = generation.memory_prompts(self.tokenizer, questions, states.shape[1], stage,
                                          self.length_bucket, instruction, sep=self.config.sep)
        params, lora = self._weights(adapter)
        return generation.generate_from_memory(
            self.model, params, lora, self.tokenizer, batch, states, max_new_tokens,
            length_bucket=self.length_bucket, share_prefix=self.share_prefix)

    def _from_text(self, rows: Sequence[str], max_new_tokens: int, adapter: str | None
                   ) -> GenerationOutput:
        params, lora = self._weights(adapter)
        return generation.generate_from_text(
            self.model, params, lora, self.tokenizer, rows, max_new_tokens,
            length_bucket=self.length_bucket, share_prefix=self.share_prefix)

    def _compressed_groups(self, groups: Sequence[Sequence[str]], b: int) -> np.ndarray:
        """States [b, k, n, D] of b equal-size groups of documents."""
        k = equal_count(groups, b)
        states = self.compress_documents([d for g in groups for d in g])
        return states.reshape(b, k, *states.shape[1:])

    def generate_from_compressed_documents_and_questions(
            self, questions: Sequence[str], compressed_documents: np.ndarray,
            max_new_tokens: int = 64, adapter: str | None = "decoder") -> GenerationOutput:
        """Answers from precompressed documents: [B, k, n, D], or Apple's [B * k, n, D]
        (generator: the `adapter`, default the decoder; None = the base model alone)."""
        check_texts(questions, "questions")
        states = np.asarray(compressed_documents, np.float32)
        if states.ndim == 3:
            if states.shape[0] % len(questions):
                raise ValueError(f"{states.shape[0]} compressed documents do not divide "
                                 f"evenly among {len(questions)} questions")
            states = states.reshape(len(questions), -1, *states.shape[1:])
        if states.shape[0] != len(questions) or states.shape[2] != self.config.n_mem:
            raise ValueError(f"compressed_documents shape {states.shape} does not match "
                             f"{len(questions)} questions x k x n={self.config.n_mem} x hidden")
        return self._from_memory(questions, states, "instruct", max_new_tokens, adapter)

    def generate_closed_book(self, questions: Sequence[str], max_new_tokens: int = 64,
                             adapter: str | None = None) -> GenerationOutput:
        """Baseline: answers without documents (`prompts.closed_book_string`), by the base
        model alone (adapter None) or under the named adapter."""
        check_texts(questions, "questions")
        return self._from_text(
            [prompts.closed_book_string(q, tok=self.tokenizer) for q in questions],
            max_new_tokens, adapter)

    def generate_from_full_text(self, questions: Sequence[str],
                                documents: Sequence[Sequence[str]], max_new_tokens: int = 64,
                                adapter: str | None = None) -> GenerationOutput:
        """Baseline text RAG: the documents' text in the prompt (`prompts.full_text_string`;
        any number per question), by the base model alone (adapter None) or under the named
        adapter."""
        check_texts(questions, "questions")
        if len(documents) != len(questions):
            raise ValueError(f"{len(documents)} document lists for {len(questions)} questions")
        for i, docs in enumerate(documents):
            if isinstance(docs, str):
                raise ValueError(f"documents[{i}] is a string; expected a list of documents")
            check_texts(docs, f"documents[{i}]")
        return self._from_text(
            [prompts.full_text_string(q, d, tok=self.tokenizer)
             for q, d in zip(questions, documents)],
            max_new_tokens, adapter)

    def generate_from_text(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                           max_new_tokens: int = 64) -> GenerationOutput:
        """Compresses each question's documents (equal count k per question), then answers."""
        check_texts(questions, "questions")
        states = self._compressed_groups(documents, len(questions))
        return self.generate_from_compressed_documents_and_questions(questions, states,
                                                                     max_new_tokens)

    def generate_from_paraphrase(self, documents: Sequence[str] | Sequence[Sequence[str]],
                                 max_new_tokens: int = 64, instruction: int = 0
                                 ) -> GenerationOutput:
        """Reconstructs documents from their memory tokens (stage-1 paraphrase prompt; the
        official code draws the instruction at random, here it is chosen: default 0)."""
        groups = [[d] if isinstance(d, str) else list(d) for d in documents]
        states = self._compressed_groups(groups, len(groups))
        return self._from_memory([""] * len(groups), states, "paraphrase", max_new_tokens,
                                 instruction=instruction)

    def generate_from_questions(self, questions: Sequence[str],
                                documents: Sequence[Sequence[str]], max_new_tokens: int = 64,
                                k: int | None = None) -> GenerationOutput:
        """End to end: the query reasoner picks k (default generation_top_k) of each
        question's candidate documents in the compressed space, the generator answers."""
        check_texts(questions, "questions")
        n_cand = equal_count(documents, len(questions))
        k = k or self.config.generation_top_k
        if k > n_cand:
            raise ValueError(f"k={k} is larger than the {n_cand} candidates per question")
        states = self._compressed_groups(documents, len(questions))
        idx, _ = self.retrieve(questions, states, k)
        selected = np.take_along_axis(states, idx[:, :, None, None], axis=1)
        out = self._from_memory(questions, selected, "end_to_end", max_new_tokens)
        out.topk_indices = idx
        return out
