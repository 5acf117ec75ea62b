"""`export-apple` of a model made by clara-jax (not an imported release) is loaded by Apple's
own `CLaRa.from_pretrained` (../shared/reference/ml-clara, unmodified) into the same model.

The model: a random tiny base with its own sentencepiece tokenizer, the vocabulary grown by the
trainer's `resize_vocab`, adapters with non-zero LoRA B and alpha = r (not the official 2r, so
the export folds the scale into B), saved as a training work directory's `model/` (no Apple
config). The official loader reads the base in bfloat16, so every weight is made
bfloat16-exact (float32 values) first; the `</s>` row of lm_head is zeroed so that greedy
decoding runs its full length on both sides.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "ml-clara")
if not os.path.exists(os.path.join(REFERENCE, "openrlhf", "models", "modeling_clara.py")):
    pytest.skip(f"Apple's code is not at {REFERENCE} (CI lays ../shared beside the project)",
                allow_module_level=True)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402

from clara_jax.clara import prompts  # noqa: E402
from clara_jax.clara.config import ClaraConfig  # noqa: E402
from clara_jax.clara.formats import apple  # noqa: E402
from clara_jax.clara.model import Clara  # noqa: E402
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece  # noqa: E402
from clara_jax.model.config import preset  # noqa: E402
from clara_jax.model.lora import LoraConfig  # noqa: E402
from clara_jax.model.mistral import init_params  # noqa: E402
from clara_jax.train import setup as setup_lib  # noqa: E402
from clara_jax.train import start as start_lib  # noqa: E402

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_PLATFORMS="cpu")
BASE_VOCAB = 400


def bf16_exact(tree):
    return jax.tree.map(
        lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)), tree)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our Clara, the export directory, documents, questions); exported by the CLI."""
    root = tmp_path_factory.mktemp("export_apple")
    docs = common.invented_documents(4, 30, seed=5)
    tok_path = train_sentencepiece(common.invented_documents(2000, 30, seed=1),
                                   str(root / "sp"), BASE_VOCAB)
    mcfg = preset("tiny", vocab_size=BASE_VOCAB, num_layers=2)
    # Weights 5x the usual init (std ~0.1): greedy answers then depend on the input.
    base = jax.tree.map(lambda x: np.asarray(x) * (5.0 if np.ndim(x) >= 2 else 1.0),
                        jax.device_get(init_params(mcfg, jax.random.key(0))))
    cfg = ClaraConfig(doc_max_length=32, compress_rate=8, generation_top_k=1, sep=True,
                      different_mem_tokens=True, lora=LoraConfig(rank=4, alpha=4.0))
    tok = ClaraTokenizer.from_file(tok_path, cfg.n_mem)
    params = start_lib.resize_vocab(base, tok.vocab_size, np.random.default_rng(0))
    params["lm_head"]["kernel"][:, tok.eos_id] = 0.0
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape),
                            setup_lib.fresh_adapters(mcfg, cfg.lora, jax.random.key(1)))
    model = Clara(mcfg.replace(vocab_size=tok.vocab_size), cfg, bf16_exact(params),
                  bf16_exact(adapters), tok, tokenizer_path=tok_path)
    assert model.apple_config == {}
    model.save(str(root / "workdir" / "model"))
    out = root / "release"
    proc = subprocess.run([sys.executable, "-m", "clara_jax.convert", "export-apple",
                           f"--checkpoint={root / 'workdir'}", f"--out_dir={out}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training_stage stage2" in proc.stdout
    return Clara.load(str(root / "workdir")), str(out), docs, common.questions(2)


def test_config_has_every_official_field_and_names_the_written_base(exported):
    model, out, _, _ = exported
    mc = common.load_official(REFERENCE)
    config = json.load(open(os.path.join(out, "config.json")))
    fields = [n for n in inspect.signature(mc.CLaRaConfig.__init__).parameters
              if n not in ("self", "kwargs")]
    assert sorted(set(fields) - set(config)) == []
    base = os.path.join(out, "base_model")
    assert config["decoder_model_name"] == base and os.path.isabs(base)
    assert config["auto_map"] == {"AutoConfig": "modeling_clara.CLaRaConfig",
                                  "AutoModel": "modeling_clara.CLaRa"}
    assert (config["model_type"], config["training_stage"], config["lora"],
            config["compr_model_name"], config["quantization"], config["pure_inference"]) == \
        ("CLaRa", "stage2", True, None, "no", False)
    assert (config["doc_max_length"], config["compr_rate"], config["lora_r"], config["sep"],
            config["different_mem_tokens"], config["generation_top_k"]) == (32, 8, 4, True,
                                                                            True, 1)
    hf = json.load(open(os.path.join(base, "config.json")))
    assert hf["vocab_size"] == BASE_VOCAB == model.tokenizer.base_vocab_size
    # The official tokenizer of the written base encodes id for id like ours, and its chat
    # template renders our prompts.
    official_tok = transformers.AutoTokenizer.from_pretrained(base, use_fast=True)
    for text in ["Who founded Zan in 1901?", "  two  spaces\nand a newline",
                 "<s>bos inside</s> text", "café naïve 東京 12345"]:
        assert official_tok.encode(text, add_special_tokens=False) == \
            model.tokenizer.encode(text), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    assert official_tok.apply_chat_template(messages, tokenize=False) == \
        prompts.mistral_chat("Be brief.", "Q?")


def test_official_from_pretrained_gives_the_same_states_and_answer(exported):
    model, out, docs, qs = exported
    mc = common.load_official(REFERENCE)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = mc.CLaRa.from_pretrained(out).float().eval()
    assert sorted(loaded.adapter_keys) == ["decoder_adapter", "encoder_adapter",
                                           "query_reasoner_adapter"]
    with torch.no_grad():
        states, _ = loaded.compress_documents(docs[:3])
    ours = model.compress_documents(docs[:3])
    err = float(np.max(np.abs(states.numpy() - ours)))
    print(f"official from_pretrained of our export: states max abs error {err:.3g} "
          f"(largest state {float(np.max(np.abs(ours))):.3g})")
    assert err <= 1e-4
    seen = []
    decode = loaded.decoder_tokenizer.batch_decode

    def batch_decode(ids, **kw):
        seen.append(ids.tolist())
        return decode(ids, **kw)

    loaded.decoder_tokenizer.batch_decode = batch_decode
    with common.cuda_means_cpu(), torch.no_grad():
        loaded.generate_from_text(qs, [docs[:1], docs[1:2]], max_new_tokens=6)
    got = model.generate_from_text(qs, [docs[:1], docs[1:2]], max_new_tokens=6)
    assert got.token_ids == seen[-1]
    assert len({tuple(r) for r in seen[-1]}) == 2   # the two answers differ: a real check


def test_export_reads_back_and_base_dir_points_at_an_existing_base(exported, tmp_path):
    """Our loader reads the release over its written base (the same model, alpha folded into
    B); `base_dir` names an existing base instead of writing one, and one of another
    vocabulary is refused naming the field."""
    model, out, docs, _ = exported
    back = Clara.load(out, base_model_dir=os.path.join(out, "base_model"))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.config.lora.alpha == 8.0   # Apple's 2r; B carries the factor 4 / 8
    np.testing.assert_allclose(back.compress_documents(docs[:2]),
                               model.compress_documents(docs[:2]), atol=1e-5)
    base = os.path.join(out, "base_model")
    model.export_apple(str(tmp_path / "over"), base_dir=base, training_stage="stage1")
    config = json.load(open(tmp_path / "over" / "config.json"))
    assert (config["decoder_model_name"], config["training_stage"]) == (base, "stage1")
    assert not os.path.exists(tmp_path / "over" / "base_model")
    bad = tmp_path / "bad_base"
    bad.mkdir()
    hf = json.load(open(os.path.join(base, "config.json")))
    # Fewer rows than the tokenizer (more are allowed: Qwen2.5 has them).
    (bad / "config.json").write_text(json.dumps({**hf, "vocab_size": 300}))
    with pytest.raises(ValueError, match=r"config.json: vocab_size is 300, this model needs "
                                         r"at least 400"):
        model.export_apple(str(tmp_path / "refused"), base_dir=str(bad))
    assert not os.path.exists(tmp_path / "refused")
    with pytest.raises(ValueError, match="training_stage 'stage3' is not one of Apple's"):
        apple.save(str(tmp_path / "refused"), model.parts, training_stage="stage3")
