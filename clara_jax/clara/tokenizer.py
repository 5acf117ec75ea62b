"""CLaRa's tokenizer: a base model's tokenizer plus CLaRa's added special tokens.

Two backends behind one interface (`ClaraTokenizer`), each giving the ids of the official
code's decoder tokenizer (`AutoTokenizer.from_pretrained(<decoder>, use_fast=True)` followed
by `add_special_tokens({"additional_special_tokens": existing + mem + ["<AE>", "<ENC>",
"<SEP>"]})`, apple/ml-clara openrlhf/models/modeling_clara.py:452-506):

* `SentencePieceClaraTokenizer`: Mistral's sentencepiece `tokenizer.model`, reproduced
  without transformers (the legacy Llama/Mistral layout; details in its docstring).
* `HFClaraTokenizer`: a Hugging Face `tokenizer.json` byte-level BPE (Llama 3, Qwen2.5,
  Phi-4) run by the `tokenizers` library, loaded the way transformers' fast tokenizer loads
  it with its tokenizer_config.json (details in its docstring).

Shared by both (modeling_clara.py:460-503):
* CLaRa's tokens are `<MEM0>` .. `<MEM{n-1}>` (or one shared `<MEM>` when
  different_mem_tokens is off), `<AE>`, `<ENC>`, `<SEP>`, added as special tokens after the
  base's own additional special tokens; new ones take the next free ids (with Mistral and
  n = 8: 32000 + 11 = 32011, the embedding size of the official training logs).
* A Qwen tokenizer (the model name contains "qwen") without a bos (eos) token takes the first
  (second) additional special token as bos (eos); pad is bos when the base has no pad token;
  sep_token is `<SEP>` (the chat template sees these in its special-token variables).
* The chat template (`chat_template`, rendered by `clara.chat`) is the model's own; a
  sentencepiece tokenizer without one has Mistral-7B-Instruct-v0.2's.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from clara_jax.clara import chat

AE_TOKEN = "<AE>"
ENC_TOKEN = "<ENC>"
SEP_TOKEN = "<SEP>"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# tokenizer_config.json fields naming special tokens, as transformers reads them.
_SPECIAL_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                   "mask_token")


def mem_token_strings(n_mem: int, different_mem_tokens: bool = True) -> list[str]:
    """The n memory-token strings of one document (modeling_clara.py:464-474)."""
    if different_mem_tokens:
        return [f"<MEM{i}>" for i in range(n_mem)]
    return ["<MEM>"] * n_mem


def clara_tokens(n_mem: int, different_mem_tokens: bool = True) -> list[str]:
    """CLaRa's added special tokens in the official order: memory tokens (one `<MEM>` when
    shared), `<AE>`, `<ENC>`, `<SEP>`."""
    if n_mem <= 0:
        raise ValueError(f"n_mem must be positive, got {n_mem}")
    mem = mem_token_strings(n_mem, different_mem_tokens)
    return list(dict.fromkeys(mem)) + [AE_TOKEN, ENC_TOKEN, SEP_TOKEN]


class ClaraTokenizer:
    """The tokenizer interface the rest of clara_jax uses (either backend).

    Attributes: `base_vocab_size` (ids before CLaRa's tokens), `vocab_size` (base + added: the
    decoder's embedding rows), `n_mem`, `different_mem_tokens`, `mem_tokens`, `mem_token_ids`
    (length n; n copies of one id when different_mem_tokens is off), `added_tokens` (CLaRa's
    new tokens, in id order), `ae_token_id`, `enc_token_id`, `sep_token_id`, `bos_token` /
    `bos_id`, `eos_token` / `eos_id`, `unk_token` / `unk_id` (None when the base has none),
    `pad_id`, `special_ids` (ids dropped by decode(skip_special_tokens=True)),
    `special_tokens_map` (the template variables: bos_token, eos_token, ...,
    additional_special_tokens), `chat_template` (Jinja2 source or None).
    """

    ae_token = AE_TOKEN
    enc_token = ENC_TOKEN
    sep_token = SEP_TOKEN

    base_vocab_size: int
    vocab_size: int
    n_mem: int
    different_mem_tokens: bool
    mem_tokens: list[str]
    mem_token_ids: list[int]
    added_tokens: list[str]
    ae_token_id: int
    enc_token_id: int
    sep_token_id: int
    bos_token: str
    bos_id: int
    eos_token: str
    eos_id: int
    unk_token: str | None
    unk_id: int | None
    pad_id: int
    special_ids: frozenset[int]
    special_tokens_map: dict[str, Any]
    chat_template: str | None
    chat_template_source: str  # where chat_template came from, for error messages

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, n_mem: int, different_mem_tokens: bool = True
                  ) -> "ClaraTokenizer":
        """From a sentencepiece `.model` file, or a Hugging Face `.json` tokenizer file (read
        with the tokenizer_config.json beside it, if any)."""
        path = os.fspath(path)
        if path.endswith(".json"):
            return HFClaraTokenizer.from_json_file(path, n_mem, different_mem_tokens)
        return SentencePieceClaraTokenizer.from_model_file(path, n_mem, different_mem_tokens)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, doc_max_length: int, compress_rate: int,
                 different_mem_tokens: bool = True, model_name: str | None = None
                 ) -> "ClaraTokenizer":
        """From a Hugging Face model directory; n = doc_max_length // compress_rate
        (modeling_clara.py:339,461).

        A byte-level BPE `tokenizer.json` gives an `HFClaraTokenizer`; a `tokenizer.model`
        (with no tokenizer.json, or one in the legacy Llama/Mistral layout) a
        `SentencePieceClaraTokenizer`; any other tokenizer.json raises ValueError.
        tokenizer_config.json (special tokens, chat_template) and chat_template.jinja are read
        when present. model_name (default: the directory path) is the name the official
        Qwen rule looks at.
        """
        if compress_rate <= 0 or doc_max_length % compress_rate:
            raise ValueError(f"doc_max_length ({doc_max_length}) must be a positive multiple "
                             f"of compress_rate ({compress_rate})")
        n_mem = doc_max_length // compress_rate
        model_dir = os.fspath(model_dir)
        json_path = os.path.join(model_dir, "tokenizer.json")
        model_path = os.path.join(model_dir, "tokenizer.model")
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        template, template_source = _chat_template(model_dir, config, config_path)
        if os.path.exists(json_path):
            with open(json_path, encoding="utf-8") as f:
                text = f.read()
            spec = json.loads(text)
            if _is_byte_level_bpe(spec):
                return HFClaraTokenizer(
                    text, config, n_mem, different_mem_tokens, chat_template=template,
                    chat_template_source=template_source,
                    model_name=model_dir if model_name is None else model_name,
                    source=json_path)
            if not _is_legacy_llama(spec):
                raise ValueError(
                    f"{json_path}: expected the legacy Llama/Mistral normaliser (Prepend + "
                    f"Replace, no pre-tokenizer) or a byte-level BPE; got "
                    f"normalizer={_normalizer_kinds(spec)}, "
                    f"pre_tokenizer={spec.get('pre_tokenizer')}")
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json or tokenizer.model")
        with open(model_path, "rb") as f:
            return SentencePieceClaraTokenizer(f.read(), n_mem, different_mem_tokens,
                                               chat_template=template,
                                               chat_template_source=template_source)

    def _set_clara_ids(self, token_to_id: Mapping[str, int], n_mem: int,
                       different_mem_tokens: bool) -> None:
        """Sets the CLaRa token attributes from the ids the backend gave them."""
        self.n_mem = n_mem
        self.different_mem_tokens = different_mem_tokens
        self.mem_tokens = mem_token_strings(n_mem, different_mem_tokens)
        self.mem_token_ids = [token_to_id[t] for t in self.mem_tokens]
        self.ae_token_id = token_to_id[AE_TOKEN]
        self.enc_token_id = token_to_id[ENC_TOKEN]
        self.sep_token_id = token_to_id[SEP_TOKEN]

    # -- chat ---------------------------------------------------------------------------

    @property
    def compiled_chat_template(self) -> jinja2.Template:
        """The chat template compiled for `clara.chat` (ValueError when there is none)."""
        compiled = self.__dict__.get("_compiled_chat_template")
        if compiled is None:
            if self.chat_template is None:
                raise ValueError(f"{self.chat_template_source}: no chat_template (CLaRa's "
                                 "prompts need the model's chat template)")
            compiled = chat.compile_template(self.chat_template)
            self.__dict__["_compiled_chat_template"] = compiled
        return compiled

    def __getstate__(self) -> dict:
        """Pickled without the compiled template (Jinja2 templates do not pickle; data-loader
        worker processes receive the tokenizer)."""
        state = dict(self.__dict__)
        state.pop("_compiled_chat_template", None)
        return state

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation's text, as transformers' `apply_chat_template(tokenize=False)`
        renders it with this tokenizer; encode it to get `tokenize=True`'s ids."""
        return chat.render(self.compiled_chat_template, messages, self.special_tokens_map,
                           add_generation_prompt=add_generation_prompt, **kwargs)

    # -- encoding / decoding (backend) --------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str | None:
        raise NotImplementedError

    def split_special(self, text: str) -> list[str]:
        """Text cut at special tokens (kept as their own items; empty pieces dropped)."""
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text` as the official tokenizer gives them with add_special_tokens=False;
        `add_bos`/`add_eos` add the bos/eos ids around them."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` as the official tokenizer decodes it (ids out of range dropped)."""
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False
                     ) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def batch_decode(self, rows: Iterable[Sequence[int]], skip_special_tokens: bool = True
                     ) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_vocab_size={self.base_vocab_size}, "
                f"n_mem={self.n_mem}, different_mem_tokens={self.different_mem_tokens}, "
                f"vocab_size={self.vocab_size})")


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


class SentencePieceClaraTokenizer(ClaraTokenizer):
    """Mistral's sentencepiece tokenizer with CLaRa's special tokens, id for id what
    `LlamaTokenizerFast` (legacy, as Mistral-7B-Instruct-v0.2 ships it) gives, without
    transformers:

    * Added tokens are appended after the base vocabulary (Mistral has no additional special
      tokens of its own).
    * Text is split on every special token -- the base's `<unk>`, `<s>`, `</s>` (added tokens
      of the fast tokenizer) and CLaRa's -- leftmost-longest, before any normalisation;
      `[INST]` and `[/INST]` are plain text for Mistral-7B-Instruct-v0.2.
    * Each text piece is then encoded on its own with Mistral's "legacy" normaliser (prepend
      "▁", spaces -> "▁") and byte-fallback BPE, so every piece following a special token
      gets a dummy-prefix "▁" (e.g. "<s>hello" -> [1, "▁hello"]). Empty pieces give no ids.
    * Decoding mirrors the fast tokenizer's decoder: "▁" -> " ", runs of byte pieces decoded
      as UTF-8 (each byte of an invalid run becomes U+FFFD), one leading space stripped.
    * There is no pad token in Mistral's tokenizer: pad = bos.
    * chat_template: the given one, else Mistral-7B-Instruct-v0.2's (`chat.MISTRAL_CHAT_TEMPLATE`).
    """

    def __init__(self, model_proto: bytes, n_mem: int, different_mem_tokens: bool = True, *,
                 chat_template: str | None = None,
                 chat_template_source: str = "Mistral-7B-Instruct-v0.2 (built in)"):
        added = clara_tokens(n_mem, different_mem_tokens)
        self._sp = _legacy_sentencepiece(model_proto)
        sp = self._sp
        self.base_vocab_size = sp.get_piece_size()
        self.unk_id = sp.unk_id()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        if min(self.unk_id, self.bos_id, self.eos_id) < 0:
            raise ValueError("the sentencepiece model needs <unk>, <s> and </s> pieces")
        self.unk_token = sp.id_to_piece(self.unk_id)
        self.bos_token = sp.id_to_piece(self.bos_id)
        self.eos_token = sp.id_to_piece(self.eos_id)
        # No pad piece in Mistral's model: pad = bos, as the official code sets it.
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.bos_id

        self.added_tokens = added
        self._token_to_id: dict[str, int] = {}
        for i, tok in enumerate(added):
            self._token_to_id[tok] = self.base_vocab_size + i
        self.vocab_size = self.base_vocab_size + len(added)
        self._set_clara_ids(self._token_to_id, n_mem, different_mem_tokens)

        # Base special pieces: <unk>, <s>, </s> and any other control pieces become added
        # special tokens of the fast tokenizer, so they are matched in raw text too.
        base_special = {self.unk_id, self.bos_id, self.eos_id}
        base_special.update(i for i in range(self.base_vocab_size) if sp.is_control(i))
        for i in sorted(base_special):
            self._token_to_id.setdefault(sp.id_to_piece(i), i)
        self.special_ids = frozenset(self._token_to_id.values())
        self._id_to_special = {i: t for t, i in self._token_to_id.items()}
        alternatives = sorted(self._token_to_id, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self._byte_of = {}
        for i in range(self.base_vocab_size):
            if sp.is_byte(i):
                self._byte_of[i] = int(_BYTE_PIECE.match(sp.id_to_piece(i)).group(1), 16)

        self.special_tokens_map = {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.id_to_token(self.pad_id),
            "sep_token": SEP_TOKEN, "additional_special_tokens": list(added)}
        self.chat_template = (chat.MISTRAL_CHAT_TEMPLATE if chat_template is None
                              else chat_template)
        self.chat_template_source = chat_template_source

    @classmethod
    def from_model_file(cls, path: str | os.PathLike, n_mem: int,
                        different_mem_tokens: bool = True) -> "SentencePieceClaraTokenizer":
        """From a sentencepiece `tokenizer.model` file (Mistral's chat template)."""
        with open(path, "rb") as f:
            return cls(f.read(), n_mem, different_mem_tokens)

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
        return [p for p in self._split_re.split(text) if p]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos else []
        for i, piece in enumerate(self._split_re.split(text)):
            if i % 2:  # a special token (captured group)
                ids.append(self._token_to_id[piece])
            elif piece:
                ids.extend(self._sp.encode(piece))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
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


def _token_content(value: Any) -> str | None:
    """A tokenizer_config.json special-token value (string, AddedToken dict or null)."""
    if value is None or isinstance(value, str):
        return value
    return value["content"]


def _added_key(t: tokenizers.AddedToken) -> tuple:
    return (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before . ? ! , and English clitics."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _load_as_transformers(tokenizer_json: str, config: Mapping[str, Any]
                          ) -> tokenizers.Tokenizer:
    """The backend tokenizer as transformers' fast tokenizer holds it after loading
    tokenizer.json with this tokenizer_config.json (HFClaraTokenizer's first two steps)."""
    spec = json.loads(tokenizer_json)
    pre = spec.get("pre_tokenizer") or {}
    prefix_space = bool(config.get("add_prefix_space", False))
    if "add_prefix_space" in pre and pre["add_prefix_space"] != prefix_space:
        pre["add_prefix_space"] = prefix_space
        tokenizer_json = json.dumps(spec)
    tk = tokenizers.Tokenizer.from_str(tokenizer_json)
    tk.no_truncation()
    tk.no_padding()

    present = {_added_key(t) for t in tk.get_added_tokens_decoder().values()}
    specials = [_token_content(config.get(f)) for f in _SPECIAL_FIELDS]
    specials += [_token_content(t) for t in config.get("additional_special_tokens") or []]
    special_strings = {t for t in specials if t is not None}
    to_add: list[tokenizers.AddedToken] = []
    decoder_entries = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(decoder_entries.items(), key=lambda kv: int(kv[0])):
        fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized",
                                        "special") if k in entry}
        t = tokenizers.AddedToken(entry["content"], **fields)
        if _added_key(t) not in present:
            to_add.append(t)
    known = {t.content for t in tk.get_added_tokens_decoder().values()}
    known.update(t.content for t in to_add)
    for content in specials:
        if content is not None and content not in known:
            to_add.append(tokenizers.AddedToken(content, special=True))
            known.add(content)
    for t in to_add:
        t.special = t.special or t.content in special_strings
    if to_add:
        tk.add_tokens(to_add)
    return tk


class HFClaraTokenizer(ClaraTokenizer):
    """A Hugging Face `tokenizer.json` (byte-level BPE: Llama 3, Qwen2.5, Phi-4) with CLaRa's
    special tokens, run by the `tokenizers` library and loaded as transformers'
    `PreTrainedTokenizerFast` (and its Qwen2 / GPT-2 subclasses) loads it:

    * the pre-tokenizer's top-level `add_prefix_space`, if it has one, is set to
      tokenizer_config.json's (False when absent);
    * tokenizer_config.json's `added_tokens_decoder` entries that tokenizer.json lacks (or has
      with other flags), then its special tokens (bos, eos, unk, sep, pad, cls, mask,
      additional_special_tokens) that are no added tokens yet, are added;
    * then CLaRa's call: add_special_tokens(existing additional special tokens + CLaRa's),
      each not normalised, not stripped, special;
    * encode = `encode(text, add_special_tokens=False)` with no truncation or padding; decode
      = the backend's decode, then transformers' `clean_up_tokenization` when
      tokenizer_config.json sets clean_up_tokenization_spaces.

    Special tokens come from tokenizer_config.json only (transformers' class defaults and the
    legacy special_tokens_map.json are not read: the published configs set every one).
    `model_name` is the name the Qwen rule looked at (the formats store it beside a copy).
    """

    def __init__(self, tokenizer_json: str, config: Mapping[str, Any], n_mem: int,
                 different_mem_tokens: bool = True, *, chat_template: str | None = None,
                 chat_template_source: str = "tokenizer_config.json", model_name: str = "",
                 source: str = "tokenizer.json"):
        added = clara_tokens(n_mem, different_mem_tokens)
        tk = _load_as_transformers(tokenizer_json, config)
        specials = {f: _token_content(config.get(f)) for f in _SPECIAL_FIELDS}
        base_extra = [_token_content(t) for t in config.get("additional_special_tokens") or []]

        # CLaRa's tokens (modeling_clara.py:462-474).
        self.base_vocab_size = tk.get_vocab_size(with_added_tokens=True)
        additional = base_extra + added
        tk.add_special_tokens([tokenizers.AddedToken(t, rstrip=False, lstrip=False,
                                                     normalized=False, special=True)
                               for t in additional])
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._tk = tk
        self.added_tokens = added
        self._set_clara_ids({t: tk.token_to_id(t) for t in added}, n_mem, different_mem_tokens)

        # bos / eos / pad (modeling_clara.py:486-503).
        is_qwen = "qwen" in model_name.lower()
        if specials["bos_token"] is None and is_qwen:
            specials["bos_token"] = additional[0]
        if specials["eos_token"] is None and is_qwen:
            specials["eos_token"] = additional[1]
        for field in ("bos_token", "eos_token"):
            if specials[field] is None:
                raise ValueError(f"{source}: tokenizer_config.json has no {field} (CLaRa's "
                                 "encoder inputs and decoding need one)")
        if specials["pad_token"] is None:
            specials["pad_token"] = specials["bos_token"]
        specials["sep_token"] = SEP_TOKEN  # the official `tokenizer.sep_token = '<SEP>'`
        self.bos_token = specials["bos_token"]
        self.eos_token = specials["eos_token"]
        self.unk_token = specials["unk_token"]
        self.bos_id = tk.token_to_id(self.bos_token)
        self.eos_id = tk.token_to_id(self.eos_token)
        self.pad_id = tk.token_to_id(specials["pad_token"])
        self.unk_id = None if self.unk_token is None else tk.token_to_id(self.unk_token)
        self.special_tokens_map = {f: v for f, v in specials.items() if v is not None}
        self.special_tokens_map["additional_special_tokens"] = additional

        decoder = tk.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in decoder.items() if t.special)
        special_texts = sorted({t.content for t in decoder.values() if t.special},
                               key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in special_texts) + ")")
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        self.source = source
        self.model_name = model_name

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, n_mem: int,
                       different_mem_tokens: bool = True, model_name: str | None = None
                       ) -> "HFClaraTokenizer":
        """From a `tokenizer.json` and the tokenizer_config.json (and chat_template.jinja)
        beside it, if any; model_name defaults to the directory path (the Qwen rule)."""
        path = os.fspath(path)
        model_dir = os.path.dirname(os.path.abspath(path))
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        template, template_source = _chat_template(model_dir, config, config_path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not _is_byte_level_bpe(json.loads(text)):
            raise ValueError(f"{path}: not a byte-level BPE tokenizer (model BPE with a "
                             "ByteLevel pre-tokenizer and decoder)")
        return cls(text, config, n_mem, different_mem_tokens, chat_template=template,
                   chat_template_source=template_source,
                   model_name=model_dir if model_name is None else model_name, source=path)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token (None when the vocabulary has no such token)."""
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def split_special(self, text: str) -> list[str]:
        return [p for p in self._split_re.split(text) if p]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False, add_eos: bool = False
                     ) -> list[list[int]]:
        rows = [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]
        head, tail = [self.bos_id] if add_bos else [], [self.eos_id] if add_eos else []
        return [head + r + tail for r in rows]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        valid = [int(i) for i in ids if 0 <= int(i) < 2 ** 32]
        text = self._tk.decode(valid, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text


# -- tokenizer files -------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _chat_template(model_dir: str, config: Mapping[str, Any], config_path: str
                   ) -> tuple[str | None, str]:
    """(template source or None, where it came from): chat_template.jinja beside the
    tokenizer, else tokenizer_config.json's chat_template (a string, or a list of named
    templates of which "default" is taken)."""
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read(), jinja_path
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            raise ValueError(f"{config_path}: chat_template lists {sorted(named)} but no "
                             "'default'")
        template = named["default"]
    return template, config_path


HF_TOKENIZER_FILE = "tokenizer.json"
# Files read beside a tokenizer.json (special tokens, chat template): copied with it.
HF_TOKENIZER_COMPANIONS = ("tokenizer_config.json", "chat_template.jinja")


def byte_level_tokenizer_json(model_dir: str | os.PathLike) -> str | None:
    """The path of `model_dir`'s tokenizer.json when it is a byte-level BPE (an
    `HFClaraTokenizer`), else None (absent, or Mistral's legacy sentencepiece layout)."""
    path = os.path.join(os.fspath(model_dir), HF_TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return path if _is_byte_level_bpe(json.load(f)) else None


def _normalizer_kinds(spec: Mapping[str, Any]) -> list:
    norm = spec.get("normalizer") or {}
    return [n.get("type") for n in norm.get("normalizers", [])]


def _is_legacy_llama(spec: Mapping[str, Any]) -> bool:
    """The legacy Llama/Mistral layout SentencePieceClaraTokenizer reproduces: normaliser
    Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer."""
    return _normalizer_kinds(spec) == ["Prepend", "Replace"] and spec.get("pre_tokenizer") is None


def _has_component(node: Any, kind: str) -> bool:
    if not isinstance(node, Mapping):
        return False
    if node.get("type") == kind:
        return True
    children = node.get("pretokenizers") or node.get("decoders") or []
    return any(_has_component(c, kind) for c in children)


def _is_byte_level_bpe(spec: Mapping[str, Any]) -> bool:
    """A BPE model with a ByteLevel pre-tokenizer and decoder (Llama 3, Qwen2, Phi-4, GPT-2)."""
    return ((spec.get("model") or {}).get("type") == "BPE"
            and _has_component(spec.get("pre_tokenizer"), "ByteLevel")
            and _has_component(spec.get("decoder"), "ByteLevel"))


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
