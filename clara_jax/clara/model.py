"""`Clara`: strings and numpy in, strings and numpy out, over the functional core.

    model = Clara.from_apple(clara_dir, base_model_dir)   # Apple's release format
    model.save(out_dir); model = Clara.load(out_dir)      # our format (Orbax + JSON)
    model.export_apple(out_dir)
    emb = model.compress_documents(docs)                  # [len(docs), n, hidden]
    out = model.generate_from_text(questions, documents)  # out.texts, out.token_ids

Batches are padded to static shapes (documents in chunks of `batch_size`, prompts to a
multiple of `length_bucket` tokens), so repeated calls reuse compiled programs. Decoding is
greedy by default. Inference never uses dropout, and by default runs each adapter folded into
a copy of the base weights (`merge_adapters`: no LoRA matmuls; one extra copy of the weights,
kept for the adapter used last).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.clara import losses, prompts
from clara_jax.clara.compress import compress
from clara_jax.clara.config import ClaraConfig, canonical_stage
from clara_jax.clara.retrieval import cosine_scores, encode_queries
from clara_jax.clara.splice import splice
from clara_jax.clara.tokenizer import ClaraTokenizer
from clara_jax.fileio import atomic_directory
from clara_jax.model import decode
from clara_jax.model.config import MistralConfig
from clara_jax.model.lora import LoraConfig, merge_lora
from clara_jax.model.mistral import Mistral, embed_tokens

TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass
class GenerationOutput:
    """texts: decoded answers; token_ids: generated ids per row (EOS cut);
    topk_indices: [B, k] retrieved candidates (generate_from_questions only)."""

    texts: list[str]
    token_ids: list[list[int]]
    topk_indices: np.ndarray | None = None


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, -(-x // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("model", "n_mem"))
def compress_jit(model, base, adapter, ids, mask, n_mem):
    """Jitted `compress`: (memory states [B, n, D], MSE term) in eval mode."""
    return compress(model, base, adapter, ids, mask, n_mem)


@functools.partial(jax.jit, static_argnames=("model", "n_mem"))
def _queries_jit(model, base, adapter, ids, mask, n_mem):
    return encode_queries(model, base, adapter, ids, mask, n_mem)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def _generate_jit(model, base, adapter, ids, mask, positions, states, max_new_tokens, eos_id,
                  pad_id, prefix_ids=None):
    embeds = embed_tokens(base, ids, jnp.dtype(model.config.dtype))
    embeds = splice(embeds, positions, states)
    variables = {"params": base} if adapter is None else {"params": base, "lora": adapter}
    return decode.generate(model, variables, inputs_embeds=embeds,
                           attention_mask=mask, max_new_tokens=max_new_tokens, eos_id=eos_id,
                           pad_id=pad_id, prefix_ids=prefix_ids)


@functools.partial(jax.jit, static_argnames=("lora",))
def _merge_jit(base, adapter, lora):
    return merge_lora(base, adapter, lora)


def map_in_padded_batches(fn, ids: np.ndarray, mask: np.ndarray, batch_size: int
                          ) -> np.ndarray:
    """fn(ids, mask) over rows [R, L] in batches of exactly batch_size rows (the last one
    padded by repeating its final row, so one compiled program serves every batch); the
    outputs' first R rows, concatenated (numpy)."""
    outs = []
    for start in range(0, len(ids), batch_size):
        cid, cmask = ids[start:start + batch_size], mask[start:start + batch_size]
        n = len(cid)
        if n < batch_size:
            cid = np.concatenate([cid, np.repeat(cid[-1:], batch_size - n, 0)])
            cmask = np.concatenate([cmask, np.repeat(cmask[-1:], batch_size - n, 0)])
        outs.append(np.asarray(fn(cid, cmask))[:n])
    return np.concatenate(outs)


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
        # Generation prefills the tokens every prompt of a batch starts with (the instruction
        # text, up to the first memory slot) once, not once per row (`decode.split_shared_prefix`).
        self.share_prefix = share_prefix
        # Tokens of the text every answer prompt starts with: how much of a text prompt is
        # shared (`_split_prefix`).
        self._system_prefix_length = len(tokenizer.encode(prompts.system_prefix(
            prompts.SYSTEM_ANSWER, bos=tokenizer.bos_token)))
        self._merged: tuple[tuple, dict] | None = None

    # -- construction and storage ------------------------------------------------------

    @classmethod
    def from_apple(cls, clara_dir: str, base_model_dir: str, dtype: str | None = None,
                   **kwargs) -> "Clara":
        """Loads Apple's release (adapters.pth, decoder_first_last_layers.pth, config.json)
        over a Hugging Face Mistral base directory (safetensors + tokenizer.model)."""
        from clara_jax.convert import apple
        from clara_jax.convert.hf_mistral import load_hf_mistral

        base_cfg, base_params = load_hf_mistral(base_model_dir, dtype=dtype)
        model_cfg, cfg, params, adapters, apple_cfg = apple.load_apple(
            clara_dir, base_params, base_cfg)
        tok_path = os.path.join(base_model_dir, TOKENIZER_FILE)
        tok = ClaraTokenizer.from_dir(base_model_dir, cfg.doc_max_length, cfg.compress_rate,
                                      cfg.different_mem_tokens)
        if tok.base_vocab_size != base_cfg.vocab_size:
            raise ValueError(f"{tok_path}: {tok.base_vocab_size} pieces but the base model's "
                             f"vocabulary is {base_cfg.vocab_size}")
        return cls(model_cfg, cfg, _to_device(params), _to_device(adapters), tok,
                   tokenizer_path=tok_path, apple_config=apple_cfg, **kwargs)

    def export_apple(self, out_dir: str) -> None:
        """Writes Apple's release format (readable by the official `CLaRa.from_pretrained`)."""
        from clara_jax.convert import apple
        apple.save_apple(out_dir, jax.device_get(self.params), jax.device_get(self.adapters),
                         self.model_config, self.config, self.apple_config)

    def save(self, out_dir: str) -> None:
        """Our format: Orbax `state/` (params, adapters), JSON configs, tokenizer.model.
        Written to a temporary sibling and renamed, so a crash never leaves it half-written."""
        import orbax.checkpoint as ocp

        if self.tokenizer_path is None:
            raise ValueError("this Clara has no tokenizer.model path to save")
        with atomic_directory(out_dir, prefix=".clara-") as tmp:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(tmp, "state"),
                           {"params": self.params, "adapters": self.adapters})
            self.model_config.to_json(os.path.join(tmp, "model_config.json"))
            with open(os.path.join(tmp, "clara_config.json"), "w") as f:
                json.dump(_clara_config_to_dict(self.config), f, indent=2, sort_keys=True)
            with open(os.path.join(tmp, "apple_config.json"), "w") as f:
                json.dump(self.apple_config, f, indent=2, sort_keys=True)
            shutil.copyfile(self.tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))

    @classmethod
    def load(cls, path: str, **kwargs) -> "Clara":
        """Loads a directory written by `save`, or a training work directory (its model)."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        if os.path.isdir(os.path.join(path, "model")) and not os.path.exists(
                os.path.join(path, "clara_config.json")):
            path = os.path.join(path, "model")  # a training work directory's exported model
        for name in ("state", "model_config.json", "clara_config.json", TOKENIZER_FILE):
            if not os.path.exists(os.path.join(path, name)):
                raise FileNotFoundError(f"{path}: missing {name} (not a saved Clara directory)")
        model_cfg = MistralConfig.from_json(os.path.join(path, "model_config.json"))
        with open(os.path.join(path, "clara_config.json")) as f:
            cfg = _clara_config_from_dict(json.load(f))
        apple_cfg = {}
        if os.path.exists(os.path.join(path, "apple_config.json")):
            with open(os.path.join(path, "apple_config.json")) as f:
                apple_cfg = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(os.path.join(path, "state"))
        tok_path = os.path.join(path, TOKENIZER_FILE)
        tok = ClaraTokenizer.from_file(tok_path, cfg.n_mem, cfg.different_mem_tokens)
        return cls(model_cfg, cfg, state["params"], state["adapters"], tok,
                   tokenizer_path=tok_path, apple_config=apple_cfg, **kwargs)

    # -- compression and retrieval -------------------------------------------------------

    def _chunks(self, ids: np.ndarray, mask: np.ndarray, fn) -> np.ndarray:
        return map_in_padded_batches(lambda i, m: fn(jnp.asarray(i), jnp.asarray(m)), ids, mask,
                                     self.batch_size)

    def _check_texts(self, texts: Sequence[str], what: str) -> None:
        if len(texts) == 0:
            raise ValueError(f"no {what} given")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what}[{i}] is empty or not a string")

    def compress_documents(self, documents: Sequence[str]) -> np.ndarray:
        """Memory-token states [len(documents), n, hidden] (float32) under the encoder adapter.
        Documents longer than doc_max_length are cut (as the official code does)."""
        self._check_texts(documents, "documents")
        ids, mask, _ = prompts.encode_documents(self.tokenizer, documents,
                                                self.config.doc_max_length, self.config.n_mem)
        params, adapter = self._weights("encoder")
        fn = lambda i, m: compress_jit(self.model, params, adapter, i, m, self.config.n_mem)[0]
        return self._chunks(ids, mask, fn).astype(np.float32)

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        """Query-reasoner representations [B, n * hidden] (questions encoded like documents)."""
        self._check_texts(questions, "questions")
        ids, mask, _ = prompts.encode_documents(self.tokenizer, questions,
                                                self.config.doc_max_length, self.config.n_mem)
        params, adapter = self._weights("query_reasoner")
        fn = lambda i, m: _queries_jit(self.model, params, adapter, i, m, self.config.n_mem)
        return self._chunks(ids, mask, fn)

    def retrieve(self, questions: Sequence[str], candidate_states: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of candidate_states [B, N, n, hidden] by cosine with the query reasoner:
        (indices [B, k], scores [B, k]), descending."""
        n_cand = candidate_states.shape[1]
        if k > n_cand:
            raise ValueError(f"k={k} is larger than the number of candidates {n_cand}")
        q = self.encode_questions(questions)
        scores = cosine_scores(jnp.asarray(q), jnp.asarray(candidate_states).reshape(
            len(questions), n_cand, -1))
        top_scores, top_idx = jax.lax.top_k(scores, k)
        return np.asarray(top_idx), np.asarray(top_scores)

    # -- generation ----------------------------------------------------------------------

    def _adapter(self, name: str | None) -> dict | None:
        """The named adapter tree, or None (the base model alone) for None."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(self.adapters)}")
        return None if name is None else self.adapters[name]

    def _weights(self, name: str | None) -> tuple[dict, dict | None]:
        """(params, adapter) to run under the named adapter (None: the base alone). With
        merge_adapters: the base with the adapter folded in, and None."""
        adapter = self._adapter(name)
        if adapter is None or not self.merge_adapters:
            return self.params, adapter
        key = (name, id(self.params), id(adapter))
        if self._merged is None or self._merged[0] != key:
            self._merged = None  # drop the previous copy before making the next
            self._merged = (key, _merge_jit(self.params, adapter, self.config.lora))
        return self._merged[1], None

    def _generate(self, batch: prompts.DecoderBatch, states: np.ndarray, max_new_tokens: int,
                  topk: np.ndarray | None = None, adapter: str | None = "decoder"
                  ) -> GenerationOutput:
        b, k, n, d = states.shape
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        params, lora = self._weights(adapter)
        ids, mask, mem_positions, prefix = self._split_prefix(batch)
        out = _generate_jit(self.model, params, lora, jnp.asarray(ids), jnp.asarray(mask),
                            jnp.asarray(mem_positions), jnp.asarray(states.reshape(b, k * n, d)),
                            max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad,
                            prefix_ids=prefix)
        ids = decode.trim(out, eos_id=eos)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        return GenerationOutput(texts, ids, topk)

    def _split_prefix(self, batch: prompts.DecoderBatch
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, jax.Array | None]:
        """(ids, mask, mem_positions, prefix ids [1, P] or None): with share_prefix, the
        batch without the instruction text its rows share (the system message; with memory
        slots, everything before the first one). Document text that rows happen to share is
        not shared, so the saving is the one any batch of questions gets."""
        ids, mask, mem = batch.input_ids, batch.attention_mask, batch.mem_positions
        if not self.share_prefix:
            return ids, mask, mem, None
        if mem.shape[1]:
            limit = int((mem[:, 0] - (ids.shape[1] - mask.sum(1))).min())
        else:
            limit = self._system_prefix_length
        prefix, ids_s, mask_s = decode.split_shared_prefix(ids, mask, limit, self.length_bucket)
        if prefix.shape[1] == 0:
            return ids, mask, mem, None
        return ids_s, mask_s, mem - (ids.shape[1] - ids_s.shape[1]), jnp.asarray(prefix)

    def _prompts(self, questions: Sequence[str], k: int, stage: str,
                 instruction: int | None = 0) -> prompts.DecoderBatch:
        probe = prompts.generation_prompts(self.tokenizer, questions, k=k, max_len=100_000,
                                           stage=stage, instruction=instruction)
        longest = int(probe.attention_mask.sum(1).max())
        return prompts.generation_prompts(self.tokenizer, questions, k=k,
                                          max_len=_round_up(longest, self.length_bucket),
                                          stage=stage, instruction=instruction)

    def generate_from_compressed_documents_and_questions(
            self, questions: Sequence[str], compressed_documents: np.ndarray,
            max_new_tokens: int = 64, adapter: str | None = "decoder") -> GenerationOutput:
        """Answers from precompressed documents: [B, k, n, D], or Apple's [B * k, n, D]
        (generator: the `adapter`, default the decoder; None = the base model alone)."""
        self._check_texts(questions, "questions")
        states = np.asarray(compressed_documents, np.float32)
        if states.ndim == 3:
            if states.shape[0] % len(questions):
                raise ValueError(f"{states.shape[0]} compressed documents do not divide "
                                 f"evenly among {len(questions)} questions")
            states = states.reshape(len(questions), -1, *states.shape[1:])
        if states.shape[0] != len(questions) or states.shape[2] != self.config.n_mem:
            raise ValueError(f"compressed_documents shape {states.shape} does not match "
                             f"{len(questions)} questions x k x n={self.config.n_mem} x hidden")
        batch = self._prompts(questions, states.shape[1], "instruct")
        return self._generate(batch, states, max_new_tokens, adapter=adapter)

    def _generate_text(self, rows: Sequence[str], max_new_tokens: int, adapter: str | None
                       ) -> GenerationOutput:
        """Greedy answers to plain-text prompts (no memory slots), left padded to a multiple
        of length_bucket tokens."""
        tok = self.tokenizer
        longest = max(len(tok.encode(r)) for r in rows)
        batch = prompts.build_decoder_batch(tok, [(r, None) for r in rows], 0,
                                            _round_up(longest, self.length_bucket))
        params, lora = self._weights(adapter)
        variables = {"params": params} if lora is None else {"params": params, "lora": lora}
        ids, mask, _, prefix = self._split_prefix(batch)
        out = decode.generate(self.model, variables, input_ids=jnp.asarray(ids),
                              attention_mask=jnp.asarray(mask), max_new_tokens=max_new_tokens,
                              eos_id=tok.eos_id, pad_id=tok.pad_id, prefix_ids=prefix)
        ids = decode.trim(out, eos_id=tok.eos_id)
        texts = [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
        return GenerationOutput(texts, ids)

    def generate_closed_book(self, questions: Sequence[str], max_new_tokens: int = 64,
                             adapter: str | None = None) -> GenerationOutput:
        """Baseline: answers without documents (`prompts.closed_book_string`), by the base
        model alone (adapter None) or under the named adapter."""
        self._check_texts(questions, "questions")
        return self._generate_text([prompts.closed_book_string(q) for q in questions],
                                   max_new_tokens, adapter)

    def generate_from_full_text(self, questions: Sequence[str],
                                documents: Sequence[Sequence[str]], max_new_tokens: int = 64,
                                adapter: str | None = None) -> GenerationOutput:
        """Baseline text RAG: the documents' text in the prompt (`prompts.full_text_string`;
        any number per question), by the base model alone (adapter None) or under the named
        adapter."""
        self._check_texts(questions, "questions")
        if len(documents) != len(questions):
            raise ValueError(f"{len(documents)} document lists for {len(questions)} questions")
        for i, docs in enumerate(documents):
            if isinstance(docs, str):
                raise ValueError(f"documents[{i}] is a string; expected a list of documents")
            self._check_texts(docs, f"documents[{i}]")
        return self._generate_text(
            [prompts.full_text_string(q, d) for q, d in zip(questions, documents)],
            max_new_tokens, adapter)

    def generate_from_text(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                           max_new_tokens: int = 64) -> GenerationOutput:
        """Compresses each question's documents (equal count k per question), then answers."""
        self._check_texts(questions, "questions")
        k = _equal_count(documents, len(questions))
        states = self.compress_documents([d for docs in documents for d in docs])
        return self.generate_from_compressed_documents_and_questions(
            questions, states.reshape(len(questions), k, *states.shape[1:]), max_new_tokens)

    def generate_from_paraphrase(self, documents: Sequence[str] | Sequence[Sequence[str]],
                                 max_new_tokens: int = 64, instruction: int = 0
                                 ) -> GenerationOutput:
        """Reconstructs documents from their memory tokens (stage-1 paraphrase prompt; the
        official code draws the instruction at random, here it is chosen: default 0)."""
        groups = [[d] if isinstance(d, str) else list(d) for d in documents]
        k = _equal_count(groups, len(groups))
        states = self.compress_documents([d for g in groups for d in g])
        batch = self._prompts([""] * len(groups), k, "paraphrase", instruction)
        return self._generate(batch, states.reshape(len(groups), k, *states.shape[1:]),
                              max_new_tokens)

    def generate_from_questions(self, questions: Sequence[str],
                                documents: Sequence[Sequence[str]], max_new_tokens: int = 64,
                                k: int | None = None) -> GenerationOutput:
        """End to end: the query reasoner picks k (default generation_top_k) of each
        question's candidate documents in the compressed space, the generator answers."""
        self._check_texts(questions, "questions")
        n_cand = _equal_count(documents, len(questions))
        k = k or self.config.generation_top_k
        if k > n_cand:
            raise ValueError(f"k={k} is larger than the {n_cand} candidates per question")
        states = self.compress_documents([d for docs in documents for d in docs])
        states = states.reshape(len(questions), n_cand, *states.shape[1:])
        idx, _ = self.retrieve(questions, states, k)
        selected = np.take_along_axis(states, idx[:, :, None, None], axis=1)
        batch = self._prompts(questions, k, "end_to_end")
        return self._generate(batch, selected, max_new_tokens, topk=idx)

    # -- training loss -------------------------------------------------------------------

    def loss(self, questions: Sequence, documents: Sequence[Sequence[str]],
             answers: Sequence, stage: str = "instruct", max_len: int = 512) -> dict:
        """Stage loss on one batch (eval mode): {"loss", "mse_loss"} as floats.

        pretrain: questions[i], answers[i] are lists (QA pairs; an empty question list means a
        paraphrase record with target answers[i][0]); instruct / end_to_end: strings;
        end_to_end treats documents[i] as the candidates.
        """
        stage = canonical_stage(stage)
        batch = self.make_batch(questions, documents, answers, stage, max_len)
        fn = losses.stage_loss(stage)
        loss, metrics = fn(self.model, self.params, self.adapters, batch, self.config)
        return {"loss": float(loss), "mse_loss": float(metrics["mse_loss"])}

    def make_batch(self, questions: Sequence, documents: Sequence[Sequence[str]],
                   answers: Sequence, stage: str, max_len: int) -> dict:
        """Arrays for `losses.stage_loss(stage)` from strings (see `losses` for the layout)."""
        stage = canonical_stage(stage)
        tok, cfg = self.tokenizer, self.config
        b = len(questions)
        n_docs = _equal_count(documents, b)
        doc_ids, doc_mask, _ = prompts.encode_documents(
            tok, [d for docs in documents for d in docs], cfg.doc_max_length, cfg.n_mem)
        batch = {"doc_ids": doc_ids.reshape(b, n_docs, -1),
                 "doc_mask": doc_mask.reshape(b, n_docs, -1)}
        if stage == "pretrain":
            rows = []
            for q, a in zip(questions, answers):
                if len(q):
                    rows.append(prompts.qa_strings(tok, q, a, n_docs))
                else:
                    rows.append(prompts.paraphrase_strings(tok, a[0], n_docs, 0))
            dec = prompts.build_decoder_batch(tok, rows, n_docs, max_len)
        else:
            k = n_docs if stage == "instruct" else cfg.generation_top_k
            dec = prompts.instruct(tok, list(questions), [_first(a) for a in answers], k=k,
                                   max_len=max_len)
        batch.update(prompt_ids=dec.input_ids, prompt_mask=dec.attention_mask, labels=dec.labels)
        if stage in ("end_to_end", "retrieval_pretrain"):
            q_ids, q_mask, _ = prompts.encode_documents(tok, list(questions), cfg.doc_max_length,
                                                        cfg.n_mem)
            batch.update(query_ids=q_ids, query_mask=q_mask)
        return jax.tree_util.tree_map(jnp.asarray, batch)


def _first(answer) -> str:
    return answer if isinstance(answer, str) else answer[0]


def _equal_count(groups: Sequence[Sequence[str]], b: int) -> int:
    """The common length of every group (documents per question); ValueError otherwise."""
    if len(groups) != b:
        raise ValueError(f"{len(groups)} document lists for {b} questions")
    counts = {len(g) for g in groups}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every question needs the same, non-zero number of documents; got "
                         f"{sorted(counts)}")
    return counts.pop()


def _to_device(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _clara_config_to_dict(cfg: ClaraConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["lora"] = dataclasses.asdict(cfg.lora)
    d["lora"]["targets"] = list(cfg.lora.targets)
    return d


def _clara_config_from_dict(d: dict) -> ClaraConfig:
    d = dict(d)
    lora = dict(d.pop("lora"))
    lora["targets"] = tuple(lora["targets"])
    return ClaraConfig(**d, lora=LoraConfig(**lora))
