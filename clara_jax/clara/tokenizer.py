"""CLaRa's tokenizer: Mistral's sentencepiece model plus CLaRa's added special tokens.

Reproduces, id for id, what the official code's decoder tokenizer gives
(`AutoTokenizer.from_pretrained(<Mistral-7B-Instruct-v0.2>, use_fast=True)` followed by
`add_special_tokens({"additional_special_tokens": mem + ["<AE>", "<ENC>", "<SEP>"]})`,
apple/ml-clara openrlhf/models/modeling_clara.py:452-506) without transformers:

* Added tokens are appended after the base vocabulary in the official order: `<MEM0>` ..
  `<MEM{n-1}>` (or one shared `<MEM>` when different_mem_tokens is off), `<AE>`, `<ENC>`,
  `<SEP>` (modeling_clara.py:464-474). With n = 8 this gives 32000 + 11 = 32011 ids, the
  embedding size in the official training logs (scripts/train_instruction_tuning.log:332).
* Text is split on every special token -- the base's `<unk>`, `<s>`, `</s>` (added tokens of
  the fast tokenizer) and CLaRa's -- leftmost-longest, before any normalisation; `[INST]` and
  `[/INST]` are plain text for Mistral-7B-Instruct-v0.2.
* Each text piece is then encoded on its own with Mistral's "legacy" normaliser (prepend
  "▁", spaces -> "▁") and byte-fallback BPE, so every piece following a special token gets a
  dummy-prefix "▁" (e.g. "<s>hello" -> [1, "▁hello"]). Empty pieces give no ids.
* Decoding mirrors the fast tokenizer's decoder: "▁" -> " ", runs of byte pieces decoded as
  UTF-8 (each byte of an invalid run becomes U+FFFD), one leading space stripped.
* There is no pad token in Mistral's tokenizer; the official code sets pad = bos
  (modeling_clara.py:502-503).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

AE_TOKEN = "<AE>"
ENC_TOKEN = "<ENC>"
SEP_TOKEN = "<SEP>"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def mem_token_strings(n_mem: int, different_mem_tokens: bool = True) -> list[str]:
    """The n memory-token strings of one document (modeling_clara.py:464-474)."""
    if different_mem_tokens:
        return [f"<MEM{i}>" for i in range(n_mem)]
    return ["<MEM>"] * n_mem


def _legacy_sentencepiece(model_proto: bytes) -> spm.SentencePieceProcessor:
    """A processor whose normaliser is the fast tokenizer's legacy one: identity mapping, a
    dummy "▁" prefix, whitespace kept as is (no collapsing)."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    spec = proto.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = True
    spec.remove_extra_whitespaces = False
    spec.escape_whitespaces = True
    proto.ClearField("denormalizer_spec")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


class ClaraTokenizer:
    """Mistral sentencepiece tokenizer with CLaRa's special tokens (ids after the base vocab).

    Attributes: `base_vocab_size`, `vocab_size` (base + added), `n_mem`, `mem_tokens`,
    `mem_token_ids` (length n; n copies of one id when different_mem_tokens is off),
    `ae_token_id`, `enc_token_id`, `sep_token_id`, `bos_id`, `eos_id`, `unk_id`, `pad_id`.
    """

    bos_token = "<s>"
    eos_token = "</s>"
    ae_token = AE_TOKEN
    enc_token = ENC_TOKEN
    sep_token = SEP_TOKEN

    def __init__(self, model_proto: bytes, n_mem: int, different_mem_tokens: bool = True):
        if n_mem <= 0:
            raise ValueError(f"n_mem must be positive, got {n_mem}")
        self._sp = _legacy_sentencepiece(model_proto)
        sp = self._sp
        self.base_vocab_size: int = sp.get_piece_size()
        self.unk_id: int = sp.unk_id()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        if min(self.unk_id, self.bos_id, self.eos_id) < 0:
            raise ValueError("the sentencepiece model needs <unk>, <s> and </s> pieces")
        self.unk_token = sp.id_to_piece(self.unk_id)
        self.bos_token = sp.id_to_piece(self.bos_id)
        self.eos_token = sp.id_to_piece(self.eos_id)
        # No pad piece in Mistral's model: pad = bos, as the official code sets it.
        self.pad_id: int = sp.pad_id() if sp.pad_id() >= 0 else self.bos_id

        self.n_mem = n_mem
        self.different_mem_tokens = different_mem_tokens
        self.mem_tokens = mem_token_strings(n_mem, different_mem_tokens)
        added = list(dict.fromkeys(self.mem_tokens)) + [AE_TOKEN, ENC_TOKEN, SEP_TOKEN]
        self.added_tokens: list[str] = added
        self._token_to_id: dict[str, int] = {}
        for i, tok in enumerate(added):
            self._token_to_id[tok] = self.base_vocab_size + i
        self.vocab_size: int = self.base_vocab_size + len(added)
        self.mem_token_ids: list[int] = [self._token_to_id[t] for t in self.mem_tokens]
        self.ae_token_id = self._token_to_id[AE_TOKEN]
        self.enc_token_id = self._token_to_id[ENC_TOKEN]
        self.sep_token_id = self._token_to_id[SEP_TOKEN]

        # Base special pieces: <unk>, <s>, </s> and any other control pieces become added
        # special tokens of the fast tokenizer, so they are matched in raw text too.
        base_special = {self.unk_id, self.bos_id, self.eos_id}
        base_special.update(i for i in range(self.base_vocab_size) if sp.is_control(i))
        for i in sorted(base_special):
            self._token_to_id.setdefault(sp.id_to_piece(i), i)
        self.special_ids: frozenset[int] = frozenset(self._token_to_id.values())
        self._id_to_special = {i: t for t, i in self._token_to_id.items()}
        alternatives = sorted(self._token_to_id, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self._byte_of = {}
        for i in range(self.base_vocab_size):
            if sp.is_byte(i):
                self._byte_of[i] = int(_BYTE_PIECE.match(sp.id_to_piece(i)).group(1), 16)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, n_mem: int, different_mem_tokens: bool = True
                  ) -> "ClaraTokenizer":
        """From a sentencepiece `tokenizer.model` file."""
        with open(path, "rb") as f:
            return cls(f.read(), n_mem, different_mem_tokens)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, doc_max_length: int, compress_rate: int,
                 different_mem_tokens: bool = True) -> "ClaraTokenizer":
        """From a model directory holding `tokenizer.model`; n = doc_max_length // compress_rate
        (modeling_clara.py:339,461).

        If the directory also holds a Hugging Face `tokenizer.json`, its normaliser must be
        the legacy Llama/Mistral one this class reproduces; anything else raises ValueError.
        """
        if compress_rate <= 0 or doc_max_length % compress_rate:
            raise ValueError(f"doc_max_length ({doc_max_length}) must be a positive multiple "
                             f"of compress_rate ({compress_rate})")
        _check_tokenizer_json(os.path.join(model_dir, "tokenizer.json"))
        return cls.from_file(os.path.join(model_dir, "tokenizer.model"),
                             doc_max_length // compress_rate, different_mem_tokens)

    # -- encoding -----------------------------------------------------------------------

    def token_to_id(self, token: str) -> int:
        """Id of a special token or base piece (unknown -> unk id)."""
        if token in self._token_to_id:
            return self._token_to_id[token]
        return self._sp.piece_to_id(token)

    def id_to_token(self, i: int) -> str:
        if i in self._id_to_special:
            return self._id_to_special[i]
        return self._sp.id_to_piece(i)

    def split_special(self, text: str) -> list[str]:
        """Text cut at special tokens (kept as their own items; empty pieces dropped)."""
        return [p for p in self._split_re.split(text) if p]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text` exactly as HF's fast tokenizer gives with add_special_tokens=False;
        `add_bos`/`add_eos` add <s>/</s> around them."""
        ids: list[int] = [self.bos_id] if add_bos else []
        for i, piece in enumerate(self._split_re.split(text)):
            if i % 2:  # a special token (captured group)
                ids.append(self._token_to_id[piece])
            elif piece:
                ids.extend(self._sp.encode(piece))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False
                     ) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    # -- decoding -----------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` as HF's fast tokenizer decodes it (ids out of range are dropped)."""
        parts: list[str] = []
        pending: list[int] = []

        def flush() -> None:
            if pending:
                raw = bytes(pending)
                try:
                    parts.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * len(raw))
                pending.clear()

        for i in ids:
            i = int(i)
            if i in self.special_ids:
                if skip_special_tokens:
                    continue
                flush()
                parts.append(self._id_to_special[i])
            elif i in self._byte_of:
                pending.append(self._byte_of[i])
            elif 0 <= i < self.base_vocab_size:
                flush()
                parts.append(self._sp.id_to_piece(i).replace("\u2581", " "))
        flush()
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text

    def batch_decode(self, rows: Iterable[Sequence[int]], skip_special_tokens: bool = True
                     ) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"ClaraTokenizer(base_vocab_size={self.base_vocab_size}, n_mem={self.n_mem}, "
                f"different_mem_tokens={self.different_mem_tokens}, "
                f"vocab_size={self.vocab_size})")


def _check_tokenizer_json(path: str) -> None:
    """Raises ValueError if an HF tokenizer.json does not use the legacy Llama normaliser
    (Prepend "▁" + Replace " " -> "▁", no pre-tokenizer) that ClaraTokenizer reproduces."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    norm = spec.get("normalizer") or {}
    kinds = [n.get("type") for n in norm.get("normalizers", [])]
    if kinds != ["Prepend", "Replace"] or spec.get("pre_tokenizer") is not None:
        raise ValueError(f"{path}: expected the legacy Llama/Mistral normaliser "
                         f"(Prepend + Replace, no pre-tokenizer); got normalizer={kinds}, "
                         f"pre_tokenizer={spec.get('pre_tokenizer')}")


def train_sentencepiece(lines: Iterable[str], model_prefix: str, vocab_size: int = 1000,
                        seed: int = 0, whole_words: Sequence[str] = ()) -> str:
    """Trains a Llama/Mistral-style sentencepiece BPE model (byte fallback, unk 0 / bos 1 /
    eos 2, no pad piece, identity normalisation, dummy prefix) on `lines`; returns the path
    of the `.model` file. Used for tiny models trained from scratch (tests, the demo).
    `whole_words` become single pieces "▁word" (counted in vocab_size): a word after a space
    is then one token wherever it appears, followed by punctuation or not."""
    bad = [w for w in whole_words if not w or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"whole_words must be non-empty words without spaces, got {bad[:3]}")
    spm.set_random_generator_seed(seed)  # sentencepiece samples sentences at random
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, num_threads=1, minloglevel=2,
        shuffle_input_sentence=False,
        user_defined_symbols=["\u2581" + w for w in dict.fromkeys(whole_words)])
    return model_prefix + ".model"
