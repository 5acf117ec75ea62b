"""Shared helpers of the benchmark scripts: matmul peak, timing, tables."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Sequence


def time_fn(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> list[float]:
    """Seconds per call after `warmup` calls; fn must block until its result is ready."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def jax_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s of jax on this machine (median of reps)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    secs = time_fn(lambda: f(a).block_until_ready(), 2, reps)
    return 2 * n ** 3 / median(secs)


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s of torch on this machine (median of reps)."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(n, n)
    secs = time_fn(lambda: a @ a, 2, reps)
    return 2 * n ** 3 / median(secs)


def print_table(rows: list[dict], headers: Sequence[str]) -> str:
    """Prints (and returns) a markdown table of rows (dicts keyed by header)."""
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in headers) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str | None, obj) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


# -- the official PyTorch CLaRa beside ours, on one random local Mistral base ----------------

OFFICIAL_FILE = os.path.join("openrlhf", "models", "modeling_clara.py")

# Mistral-7B-Instruct-v0.2's chat template as our prompts.mistral_chat renders it
# ("<s> [INST] {system}\n\n{user} [/INST]"( " {answer}</s>")), for the official tokenizer.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] + '\n\n' %}"
    "{%- set msgs = messages[1:] %}{%- else %}{%- set sys = '' %}{%- set msgs = messages %}"
    "{%- endif %}{{ bos_token }}{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{{ ' [INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- else %}{{ ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}")


def load_official(clara_src: str):
    """The module `modeling_clara` of a checkout of apple/ml-clara at clara_src, imported from
    its file (not vendored; the package's __init__ is skipped). Needs transformers 4.56.2 and
    peft 0.17.1."""
    import importlib.util
    path = os.path.join(clara_src, OFFICIAL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--clara_src {clara_src}: no {OFFICIAL_FILE} (expected a "
                                "checkout of github.com/apple/ml-clara)")
    spec = importlib.util.spec_from_file_location("official_modeling_clara", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invented_words(n: int, seed: int = 0) -> list[str]:
    """n distinct invented words (2-4 syllables)."""
    import numpy as np
    rng = np.random.RandomState(seed)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(list(cons)) + rng.choice(list(vows))
                          for _ in range(rng.randint(2, 5))))
    return sorted(words)


def invented_documents(n_docs: int, n_words: int, seed: int = 0) -> list[str]:
    """n_docs random sentences of n_words invented words each (long enough to fill
    doc_max_length tokens when n_words >= doc_max_length)."""
    import numpy as np
    vocab = invented_words(3000)
    rng = np.random.RandomState(seed)
    return [" ".join(vocab[i] for i in rng.randint(0, len(vocab), n_words)).capitalize() + "."
            for _ in range(n_docs)]


def make_base_dir(out_dir: str, *, hidden: int, layers: int, heads: int, kv_heads: int,
                  intermediate: int, base_vocab: int, seed: int = 0,
                  initializer_range: float = 0.02) -> str:
    """A random Hugging Face Mistral base (float32 safetensors whose values are bfloat16-exact,
    so the official loader's bfloat16 round trip changes nothing; weights drawn with std
    `initializer_range`, larger values giving greedy answers that depend on the input) with a
    sentencepiece `tokenizer.model` of base_vocab pieces, its fast tokenizer and a Mistral
    chat template.
    Reused when out_dir already holds one."""
    if os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        return out_dir
    import torch
    import transformers
    from clara_jax.clara.tokenizer import train_sentencepiece

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    hc = transformers.MistralConfig(
        vocab_size=base_vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=intermediate, rope_theta=1e6, rms_norm_eps=1e-5,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        initializer_range=initializer_range)
    hf = transformers.MistralForCausalLM(hc)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    hf.save_pretrained(out_dir, safe_serialization=True)
    lines = invented_documents(4000, 40, seed=seed + 1)
    sp = train_sentencepiece(lines, os.path.join(out_dir, "sp"), base_vocab, seed=seed)
    os.replace(sp, os.path.join(out_dir, "tokenizer.model"))
    os.remove(os.path.join(out_dir, "sp.vocab"))
    tok = transformers.LlamaTokenizerFast(
        vocab_file=os.path.join(out_dir, "tokenizer.model"), legacy=True, from_slow=True,
        add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
        add_prefix_space=True)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return out_dir


class cuda_means_cpu:
    """Context manager: `Tensor.to("cuda")` stays on the CPU (the official `_generate` moves
    its inputs to "cuda" unconditionally; nothing else of its code changes)."""

    def __enter__(self):
        import torch
        self._to = torch.Tensor.to
        orig = self._to

        def to(t, *args, **kwargs):
            args = tuple("cpu" if a == "cuda" else a for a in args)
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return orig(t, *args, **kwargs)

        torch.Tensor.to = to
        return self

    def __exit__(self, *exc):
        import torch
        torch.Tensor.to = self._to


def make_official_and_ours(clara_src: str | None, work_dir: str, *, doc_max_length: int,
                           compress_rate: int, base_dir: str, lora_r: int = 16, seed: int = 0,
                           batch_size: int = 16):
    """(official CLaRa in float32 train mode or None, our Clara) with the same weights.

    The official model is built by its own constructor from the local base (stage-1
    adapters) plus a query_reasoner_adapter, its LoRA B matrices set to small random values
    and the lm_head row of `</s>` zeroed (so that greedy decoding of this random model never
    stops early), then saved with its own `save_pretrained` (Apple's release format), which
    our `Clara.from_apple` loads. Without clara_src the same is done by
    `tests/test_clara_core.py`-style PEFT calls on the Hugging Face model alone."""
    import torch
    import transformers
    from clara_jax.clara.model import Clara

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    clara_dir = os.path.join(work_dir, f"release_d{doc_max_length}_r{compress_rate}")
    official = None
    if clara_src:
        mc = load_official(clara_src)
        cfg = mc.CLaRaConfig(decoder_model_name=base_dir, doc_max_length=doc_max_length,
                             compr_rate=compress_rate, lora=True, lora_r=lora_r, sep=True,
                             different_mem_tokens=True, training_stage="stage1",
                             load_adapters=True, generation_top_k=1, compr_model_name=None)
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            official = mc.CLaRa(cfg)
            peft_cfg = official._get_peft_config(lora_r=lora_r)
            official.decoder.add_adapter(peft_cfg, "query_reasoner_adapter")
            official.adapter_keys.append("query_reasoner_adapter")
            official._set_all_adapters()
        official = official.float()
        hf = official.decoder
    else:
        import peft
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        n_mem = doc_max_length // compress_rate
        hf.resize_token_embeddings(hf.config.vocab_size + n_mem + 3)
        lcfg = peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear",
                               lora_dropout=0.1)
        for name in ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter"):
            hf.add_adapter(lcfg, adapter_name=name)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.01)
        hf.get_output_embeddings().weight[2] = 0.0
    names = ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter")
    if official is not None:
        official.save_pretrained(clara_dir)
    else:
        import json
        os.makedirs(clara_dir, exist_ok=True)
        torch.save({n: hf.get_adapter_state_dict(n) for n in names},
                   os.path.join(clara_dir, "adapters.pth"))
        torch.save({"model.embed_tokens.weight": hf.get_input_embeddings().weight.detach(),
                    "lm_head.weight": hf.get_output_embeddings().weight.detach()},
                   os.path.join(clara_dir, "decoder_first_last_layers.pth"))
        with open(os.path.join(clara_dir, "config.json"), "w") as f:
            json.dump({"doc_max_length": doc_max_length, "compr_rate": compress_rate,
                       "lora_r": lora_r, "sep": True, "different_mem_tokens": True,
                       "generation_top_k": 1, "training_stage": "stage1", "lora": True,
                       "decoder_model_name": base_dir}, f)
    ours = Clara.from_apple(clara_dir, base_dir, batch_size=batch_size)
    return official, ours


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured interleaved (a, b, a, b, ...) after `warmup`
    calls of each, so that load changes on a shared machine hit every side alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
            print(f"  {name}: {out[name][-1]:.3f} s", flush=True)
    return out


def load_line() -> str:
    """`uptime`'s load averages, the core count and the malloc setting, for the tables'
    captions."""
    from clara_jax import cpu_malloc
    one, five, fifteen = os.getloadavg()
    return (f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores; "
            f"{cpu_malloc.describe()}")


def documents_of_tokens(tok, n_docs: int, n_tokens: int, seed: int = 0) -> list[str]:
    """n_docs invented documents of at most n_tokens tokens each under tok (ours; the
    official tokenizer encodes them identically), as long as whole words allow."""
    out = []
    for text in invented_documents(n_docs, 2 * n_tokens, seed=seed):
        words = text.split(" ")
        lo, hi = 1, len(words)
        while lo < hi:  # the most words whose encoding fits
            mid = (lo + hi + 1) // 2
            if len(tok.encode(" ".join(words[:mid]))) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[:lo]))
    return out


def questions(n: int, seed: int = 0) -> list[str]:
    """n invented questions."""
    return [f"Who founded {d.split(' ')[0]} in {d.split(' ')[1]}?"
            for d in invented_documents(n, 4, seed=seed + 100)]
