"""Apple's inference API on clara-jax: `CLaRa` with the official method names, signatures,
defaults and return types (apple/ml-clara `openrlhf/models/modeling_clara.py`), so that the
official notebook's calls run with only the import changed:

    from clara_jax.compat import AutoModel      # instead of `from transformers import AutoModel`
    model = AutoModel.from_pretrained(release_dir, trust_remote_code=True).to("cuda")
    texts = model.generate_from_paraphrase(questions=[""], documents=[docs], max_new_tokens=64)
    texts = model.generate_from_text(questions=questions, documents=documents, max_new_tokens=64)
    texts, topk = model.generate_from_questions(questions=questions, documents=candidates)
    emb, mse = model.compress_documents(docs)
    texts = model.generate_from_compressed_documents_and_questions(questions, emb)

Every method calls `clara_jax.clara.model.Clara` (held as `model.clara`); nothing is computed
here. Differences from the official class, all on purpose:

- Arrays are numpy, not torch: `compress_documents` gives (float32 [N, n, D], numpy float32
  scalar), `generate_from_questions` gives topk as int64 [B, k]. torch tensors are accepted
  as `compressed_documents`.
- Decoding is greedy in every method (the official methods are greedy too);
  `generate_from_paraphrase` uses the first paraphrase instruction where the official code
  draws one at random.
- The model is not mutated: the official `generate_from_text`, `generate_from_paraphrase` and
  `generate_from_compressed_documents_and_questions` set `generation_top_k` to the number of
  documents per question, which then changes what `generate_from_questions` selects; here
  `generation_top_k` is the config's (or `from_pretrained(..., generation_top_k=k)`).
- `.to(...)` and `.eval()` return the model unchanged (JAX places arrays on its default
  device; inference never uses dropout).
- `generate_from_questions(stage2_mips=True)` (Apple's retrieval server) and
  `time_count=True` raise NotImplementedError.
"""

from __future__ import annotations

import json
import os
from typing import Any, List

import numpy as np

from clara_jax.clara import formats
from clara_jax.clara.model import Clara

__all__ = ["CLaRa", "AutoModel"]

# from_pretrained keywords the official code accepts that change nothing here.
_IGNORED = ("trust_remote_code", "device_map", "attn_implementation", "low_cpu_mem_usage")
# from_pretrained keywords passed on to `Clara.load` (ours).
_SETTINGS = ("base_model_dir", "batch_size", "length_bucket", "merge_adapters", "share_prefix")


def _dtype_name(dtype: Any) -> str:
    """'bfloat16' from 'bfloat16', torch.bfloat16 or numpy's bfloat16."""
    return str(getattr(dtype, "name", dtype)).removeprefix("torch.")


def _as_numpy(x: Any) -> np.ndarray:
    """float32 numpy of a numpy/jax array or a torch tensor (any device or dtype)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):   # torch, without importing it
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def apple_base_dir(release_dir: str) -> str:
    """The base model directory an Apple release names in its config.json
    (`decoder_model_name`, as the official `from_pretrained` reads it); ValueError when it is
    not a local directory."""
    path = os.path.join(release_dir, "config.json")
    with open(path) as f:
        base = json.load(f).get("decoder_model_name")
    if not base or not os.path.isdir(base):
        raise ValueError(f"{path}: decoder_model_name {base!r} is not a local directory; pass "
                         "base_model_dir= (a Hugging Face Mistral directory)")
    return base


class CLaRa:
    """A `Clara` behind Apple's `CLaRa` inference methods (module docstring)."""

    def __init__(self, clara: Clara):
        self.clara = clara

    def _texts(self, out) -> List[str]:
        """The answers as the official `batch_decode(..., skip_special_tokens=True)` gives them
        (not stripped: `Clara`'s `.texts` are)."""
        return [self.clara.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in out.token_ids]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args, **kwargs) -> "CLaRa":
        """Loads an Apple release (over the base its config.json's `decoder_model_name` names,
        or `base_model_dir=`), our saved model or a training work directory (`Clara.load`).

        Keywords: `generation_top_k` (overrides the config's, as the official code does),
        `dtype` / `torch_dtype` (the base weights' dtype), our `Clara` settings (`batch_size`,
        `length_bucket`, `merge_adapters`, `share_prefix`); trust_remote_code, device_map,
        attn_implementation and low_cpu_mem_usage are accepted and change nothing. Any other
        keyword is refused (the official code would set it on the config)."""
        path = pretrained_model_name_or_path
        if args:
            raise TypeError(f"CLaRa.from_pretrained({path!r}, ...): positional arguments after "
                            "the path are not used; pass keywords")
        top_k = kwargs.pop("generation_top_k", None)
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        dtype = torch_dtype if dtype is None else dtype
        if kwargs.pop("pure_inference", True) is not True:
            raise ValueError("pure_inference=False (load only the adapters a training stage "
                             "continues from) is for training; clara_jax.compat loads them all")
        for name in _IGNORED:
            kwargs.pop(name, None)
        unknown = sorted(set(kwargs) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"CLaRa.from_pretrained: keyword(s) {unknown} not supported "
                             f"(accepted: generation_top_k, dtype, torch_dtype, "
                             f"{', '.join(_SETTINGS + _IGNORED)})")
        if (kwargs.get("base_model_dir") is None
                and formats.detect(path) == formats.APPLE):
            kwargs["base_model_dir"] = apple_base_dir(path)
        clara = Clara.load(path, dtype=None if dtype is None else _dtype_name(dtype), **kwargs)
        if top_k is not None:
            clara.config = clara.config.replace(generation_top_k=int(top_k))
        return cls(clara)

    # -- torch.nn.Module calls the notebook makes -----------------------------------------

    def to(self, *args, **kwargs) -> "CLaRa":
        """The model itself (JAX keeps the weights on its default device)."""
        return self

    def eval(self) -> "CLaRa":
        """The model itself (inference never uses dropout)."""
        return self

    # -- config values the official class holds as attributes -----------------------------

    @property
    def generation_top_k(self) -> int:
        return self.clara.config.generation_top_k

    @property
    def doc_max_length(self) -> int:
        return self.clara.config.doc_max_length

    @property
    def compr_rate(self) -> int:
        return self.clara.config.compress_rate

    # -- the official methods -------------------------------------------------------------

    def compress_documents(self, documents: List[str]) -> tuple[np.ndarray, np.float32]:
        """(memory states float32 [len(documents), n, hidden], MSE between mean memory and
        mean text states: a numpy float32 scalar)."""
        states, mse = self.clara.compress_documents_and_mse(documents)
        return states, np.float32(mse)

    def generate_from_text(self, questions: List[str], documents: List[List[str]],
                           max_new_tokens: int = 128) -> List[str]:
        """Answers from each question's documents (same count per question), compressed."""
        return self._texts(self.clara.generate_from_text(questions, documents, max_new_tokens))

    def generate_from_paraphrase(self, questions: list[str], documents: list[list[str]],
                                 max_new_tokens: int = 128) -> list[str]:
        """Each group of documents reconstructed from its memory tokens (the questions are
        not used, as in the official code; one per group)."""
        if len(questions) != len(documents):
            raise ValueError(f"{len(questions)} questions for {len(documents)} document lists")
        return self._texts(self.clara.generate_from_paraphrase(documents, max_new_tokens))

    def generate_from_compressed_documents_and_questions(
            self, questions: List[str], compressed_documents: Any,
            max_new_tokens: int = 128) -> List[str]:
        """Answers from `compress_documents` output: [B * k, n, D] (k per question, in
        order), numpy or torch."""
        return self._texts(self.clara.generate_from_compressed_documents_and_questions(
            questions, _as_numpy(compressed_documents), max_new_tokens))

    def generate_from_questions(self, questions: List[str], max_new_tokens: int = 128,
                                temperature: float = 0.5, documents: List[List[str]] = None,
                                stage2_mips: bool = False, stage2_retrieval_top_n: int = None,
                                time_count: bool = False) -> tuple[List[str], np.ndarray]:
        """End to end: (answers, top-k indices int64 [B, generation_top_k]) over each
        question's candidate `documents`. `temperature` and `stage2_retrieval_top_n` change
        nothing (in the official code neither does either outside stage2_mips)."""
        if stage2_mips:
            raise NotImplementedError(
                "stage2_mips=True retrieves from Apple's retrieval server (url_retrieval), "
                "which clara_jax.compat does not call; pass documents= (candidates per "
                "question), or answer from a compressed corpus with python -m clara_jax.answer")
        if time_count:
            raise NotImplementedError("time_count=True is not supported; time the call (or "
                                      "see benchmarks/rag_latency.py for each phase)")
        if documents is None:
            raise ValueError("generate_from_questions needs documents= (candidates per "
                             "question) unless stage2_mips=True")
        out = self.clara.generate_from_questions(questions, documents, max_new_tokens)
        return self._texts(out), np.asarray(out.topk_indices, np.int64)


# The notebook's `from transformers import AutoModel` becomes `from clara_jax.compat import
# AutoModel`: `AutoModel.from_pretrained(release, trust_remote_code=True)` is a `CLaRa`.
AutoModel = CLaRa
