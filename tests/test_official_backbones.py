"""CLaRa on Llama, Qwen2 and Phi-3 against Apple's own code (../shared/reference/ml-clara,
unmodified), as tests/test_official_code.py does for Mistral.

For each backbone a tiny random Hugging Face base (transformers' own classes: Llama with
llama3 RoPE scaling and tied embeddings, Qwen2 with q/k/v biases, tied embeddings and more
embedding rows than its tokenizer has tokens, Phi-3 with fused qkv_proj / gate_up_proj and
partial rotary) is saved with a tiny byte-level BPE tokenizer.json in the layout of that
family's tokenizer (Llama 3, Qwen2.5, Phi-4; trained as in tests/test_hf_tokenizer.py). The
official CLaRa model is built over it by its own constructor, its LoRA A and B made non-zero,
saved with its own `save_pretrained`, and loaded by `Clara.from_apple`. Bounds: memory states
and losses 1e-4; greedy token ids and top-k indices identical.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "ml-clara")
if not os.path.exists(os.path.join(REFERENCE, "openrlhf", "models", "modeling_clara.py")):
    pytest.skip(f"Apple's code is not at {REFERENCE} (CI lays ../shared beside the project)",
                allow_module_level=True)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402

from clara_jax.clara import losses  # noqa: E402
from clara_jax.clara.formats import apple  # noqa: E402
from clara_jax.clara.model import Clara  # noqa: E402
from clara_jax.clara.tokenizer import HFClaraTokenizer  # noqa: E402
from clara_jax.data import formats  # noqa: E402
from clara_jax.data.pipeline import FeatureSpec, featurize_batch  # noqa: E402
from tests.test_hf_tokenizer import build_tokenizer_dir  # noqa: E402

pytestmark = pytest.mark.slow

DOC_MAX_LENGTH, RATE, N_MEM, LORA_R = 32, 8, 4, 8
MAX_LEN = 512
WEIGHT_STD = 0.4  # base weights: large enough that greedy answers depend on the input
TOL = 1e-4
ANSWERS = ["Paris", "in 1901", "a farmer"]
# backbone -> tokenizer layout (tests/test_hf_tokenizer.LAYOUTS); the Qwen directory's name
# contains "qwen", which the official bos/eos rule looks for.
BACKBONES = {"llama": "llama3", "qwen2": "qwen2.5", "phi3": "phi4"}
EXTRA_ROWS = {"llama": 0, "qwen2": 40, "phi3": 0}  # embedding rows past the tokenizer


def _hf_config(name: str, tok) -> "transformers.PretrainedConfig":
    kw = dict(vocab_size=len(tok) + EXTRA_ROWS[name], hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              max_position_embeddings=4096)
    if name == "llama":
        return transformers.LlamaConfig(
            **kw, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if name == "qwen2":
        return transformers.Qwen2Config(**kw, rope_theta=1e6, tie_word_embeddings=True,
                                        use_sliding_window=False)
    return transformers.Phi3Config(**kw, rope_theta=10000.0, partial_rotary_factor=0.5,
                                   original_max_position_embeddings=4096, pad_token_id=None)


def make_base(work: str, name: str) -> str:
    """A random base of `name` (weights std WEIGHT_STD, bfloat16-exact: the official loader reads
    the base in bfloat16) with its tokenizer files, in `work`/tiny-<layout>."""
    path = build_tokenizer_dir(os.path.join(work, f"tiny-{BACKBONES[name]}"), BACKBONES[name])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(name, tok))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_((torch.randn_like(p) * WEIGHT_STD).bfloat16().float())
    hf.save_pretrained(path, safe_serialization=True)
    return path


def make_official(base: str, out_dir: str):
    """The official CLaRa over `base` (stage-1 adapters plus a query reasoner, LoRA B
    non-zero, the eos row of lm_head zeroed so greedy decoding runs its full length), in
    float32 eval mode, saved to out_dir with its own save_pretrained."""
    mc = common.load_official(REFERENCE)
    cfg = mc.CLaRaConfig(decoder_model_name=base, doc_max_length=DOC_MAX_LENGTH,
                         compr_rate=RATE, lora=True, lora_r=LORA_R, sep=True,
                         different_mem_tokens=True, training_stage="stage1",
                         load_adapters=True, generation_top_k=1, compr_model_name=None)
    torch.manual_seed(1)
    with contextlib.redirect_stdout(io.StringIO()):
        official = mc.CLaRa(cfg)
        official.decoder.add_adapter(official._get_peft_config(lora_r=LORA_R),
                                     "query_reasoner_adapter")
        official.adapter_keys.append("query_reasoner_adapter")
        official._set_all_adapters()
    official = official.float()
    with torch.no_grad():
        for pname, p in official.decoder.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn_like(p) * 0.02)
        official.decoder.get_output_embeddings().weight[
            official.decoder_tokenizer.eos_token_id] = 0.0
    official.save_pretrained(out_dir)
    return official.eval()


@pytest.fixture(scope="module", params=list(BACKBONES))
def pair(request, tmp_path_factory):
    """(backbone, official CLaRa, our Clara, documents, questions, work dir)."""
    name = request.param
    work = str(tmp_path_factory.mktemp(f"official_{name}"))
    base = make_base(work, name)
    release = os.path.join(work, "release")
    official = make_official(base, release)
    ours = Clara.from_apple(release, base)
    docs = common.documents_of_tokens(ours.tokenizer, 8, 40)  # longer than doc_max_length
    return name, official, ours, docs, common.questions(4), work


def _close(a, b, tol: float, what: str) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    print(f"{what}: max abs error {err:.3g} (bound {tol:g})")
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"
    return err


def test_release_loads_as_the_backbone(pair):
    """The release's tables are len(tokenizer) rows (Qwen2: fewer than the base's), the
    tokenizer is the tokenizer.json one, and Phi-3's fused adapters were split."""
    name, official, ours, _, _, _ = pair
    assert isinstance(ours.tokenizer, HFClaraTokenizer)
    assert ours.model_config.architecture == name
    assert ours.model_config.vocab_size == len(official.decoder_tokenizer) == \
        official.decoder.get_input_embeddings().weight.shape[0]
    assert ours.tokenizer.mem_token_ids == official.decoder_tokenizer.mem_token_ids
    assert (ours.tokenizer.bos_id, ours.tokenizer.eos_id, ours.tokenizer.pad_id) == (
        official.decoder_tokenizer.bos_token_id, official.decoder_tokenizer.eos_token_id,
        official.decoder_tokenizer.pad_token_id)
    if name == "phi3":  # the export fuses the split adapter back, key for key
        state = {k: v for k, v in official.decoder.get_adapter_state_dict(
            "encoder_adapter").items() if ".lora_" in k}  # PEFT adds the resized tables
        back = apple.adapter_to_peft(ours.adapters["encoder"], ours.model_config)
        assert set(back) == set(state)
        for key, value in state.items():
            np.testing.assert_array_equal(back[key], value.numpy())


def test_compress_documents_states(pair):
    name, official, ours, docs, _, _ = pair
    with torch.no_grad():
        states, _ = official.compress_documents(docs[:4])
    assert float(np.max(np.abs(states.numpy()))) > 0.1
    _close(states.numpy(), ours.compress_documents(docs[:4]), TOL,
           f"{name}: compress_documents states")


def test_stage1_qa_loss(pair):
    """The official stage-1 QA loss (its own collate on the records) against ours."""
    name, official, ours, docs, qs, _ = pair
    rows = [(docs[i:i + 1], [qs[i], qs[i + 1]], [ANSWERS[i], ANSWERS[i + 1]], "qa", [])
            for i in range(2)]
    official.training_stage, official.generation_top_k = "stage1", 1
    if REFERENCE not in sys.path:
        sys.path.insert(0, REFERENCE)
    from openrlhf.datasets import sft_dataset
    collate = sft_dataset.make_collate_fn(official, enc_max_len=DOC_MAX_LENGTH,
                                          dec_max_len=1024, qa_loss=True)
    with torch.no_grad():
        loss, extra = official(batch=collate(rows))
    records = [formats.normalise({"data_type": "qa", "question": q, "answers": a, "docs": d},
                                 "pretrain", "records", i + 1)
               for i, (d, q, a, _, _) in enumerate(rows)]
    feats = featurize_batch(records, ours.tokenizer,
                            FeatureSpec("pretrain", doc_max_length=DOC_MAX_LENGTH, n_mem=N_MEM,
                                        max_len=MAX_LEN, k=1))
    batch = {k: jnp.asarray(v) for k, v in feats.items()}
    _, m = losses.stage_loss("pretrain")(ours.model, ours.params, ours.adapters, batch,
                                         ours.config.replace(generation_top_k=1))
    _close(float(loss), float(m["ce_loss"]), TOL, f"{name}: stage-1 QA loss")
    _close(float(extra["mse_loss"]), float(m["mse_loss"]), TOL, f"{name}: stage-1 MSE")


def _capture_ids(official):
    """Records the ids the official generators decode (they return text)."""
    seen = []
    decode = official.decoder_tokenizer.batch_decode

    def batch_decode(ids, **kw):
        seen.append(ids.tolist())
        return decode(ids, **kw)

    official.decoder_tokenizer.batch_decode = batch_decode
    return seen, decode


def test_generation_token_ids(pair):
    """generate_from_text (k = 2) and generate_from_questions (k = 1, 2 of 4 candidates):
    identical greedy ids and top-k indices."""
    name, official, ours, docs, qs, _ = pair
    seen, decode = _capture_ids(official)
    try:
        with common.cuda_means_cpu(), torch.no_grad():
            groups = [docs[0:2], docs[2:4]]
            official.generate_from_text(qs[:2], groups, max_new_tokens=8)
            got = ours.generate_from_text(qs[:2], groups, max_new_tokens=8)
            assert got.token_ids == seen[-1], name
            assert len({tuple(r) for r in seen[-1]}) == 2  # the rows differ: a real check
            candidates = [docs[0:4], docs[4:8]]
            for k in (1, 2):
                official.generation_top_k = k
                _, idx = official.generate_from_questions(qs[:2], max_new_tokens=8,
                                                          documents=candidates)
                out = ours.generate_from_questions(qs[:2], candidates, max_new_tokens=8, k=k)
                np.testing.assert_array_equal(idx.numpy(), out.topk_indices)
                assert out.token_ids == seen[-1], (name, k)
    finally:
        official.decoder_tokenizer.batch_decode = decode


def test_saved_model_keeps_the_tokenizer(pair):
    """Our format stores tokenizer.json with its tokenizer_config.json (and the name the Qwen
    rule looked at): the reloaded model is the same."""
    name, _, ours, docs, qs, work = pair
    out = os.path.join(work, "ours")
    ours.save(out)
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer_name.json"} <= set(
        os.listdir(out))
    again = Clara.load(out)
    assert isinstance(again.tokenizer, HFClaraTokenizer)
    assert again.tokenizer.special_tokens_map == ours.tokenizer.special_tokens_map
    assert again.tokenizer.chat_template == ours.tokenizer.chat_template
    np.testing.assert_array_equal(again.compress_documents(docs[:2]),
                                  ours.compress_documents(docs[:2]))
    assert again.generate_from_text(qs[:1], [docs[:1]], 4).token_ids == \
        ours.generate_from_text(qs[:1], [docs[:1]], 4).token_ids


def test_adapter_bundle_over_the_base_and_its_checkpoint(pair):
    """An adapter bundle over the Hugging Face base, and over our base checkpoint of it (which
    keeps the tokenizer.json files), gives back the same adapters and added-token rows over
    the base's first len(tokenizer) rows (Qwen2: the rows past the tokenizer dropped, as the
    official resize drops them; the base rows are the base's own, not the release's copy in
    which make_official zeroed the eos row)."""
    import jax
    from clara_jax.clara import formats
    from clara_jax.clara.formats import bundle, hf_mistral
    name, _, ours, _, _, work = pair
    base = os.path.dirname(ours.tokenizer_path)
    bundle.save(os.path.join(work, "bundle"), ours.parts)
    ckpt = os.path.join(work, "base_ckpt")
    hf_mistral.convert_hf_to_checkpoint(base, ckpt)
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer_name.json"} <= set(
        os.listdir(ckpt))
    _, base_params = hf_mistral.load_hf_mistral(base)
    n = ours.tokenizer.base_vocab_size
    table = np.asarray(ours.params["embed_tokens"]["embedding"])
    want = dict(ours.params, embed_tokens={"embedding": np.concatenate(
        [base_params["embed_tokens"]["embedding"][:n], table[n:]])})
    if "lm_head" in ours.params:
        head = np.asarray(ours.params["lm_head"]["kernel"])
        want["lm_head"] = {"kernel": np.concatenate(
            [base_params["lm_head"]["kernel"][:, :n], head[:, n:]], axis=1)}
    for over in (base, ckpt):
        back = formats.load(os.path.join(work, "bundle"), over)
        assert back.model_config.vocab_size == ours.model_config.vocab_size
        assert back.tokenizer.special_tokens_map == ours.tokenizer.special_tokens_map
        for x, y in zip(jax.tree.leaves((back.params, back.adapters)),
                        jax.tree.leaves((want, ours.adapters))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_is_loaded_by_the_official_from_pretrained(pair):
    """`export_apple` with the base written beside the release (tokenizer.json files; for
    Qwen a folder whose name carries "qwen"; Phi-3's adapters fused back) is read by the
    official `CLaRa.from_pretrained` into the same compressor and greedy answers. The
    official loader puts everything in bfloat16, so the weights are made bfloat16-exact."""
    import jax
    name, official, ours, docs, qs, work = pair
    bf16 = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)), tree)
    model = Clara(ours.model_config, ours.config, bf16(ours.params), bf16(ours.adapters),
                  ours.tokenizer, tokenizer_path=ours.tokenizer_path)
    out = os.path.join(work, "exported")
    model.export_apple(out)
    assert os.path.isdir(os.path.join(out, apple.base_dir_name(ours.tokenizer)))
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = type(official).from_pretrained(out).float().eval()
    with torch.no_grad():
        states, _ = loaded.compress_documents(docs[:3])
    _close(states.numpy(), model.compress_documents(docs[:3]), TOL,
           f"{name}: exported model's states")
    seen, decode = _capture_ids(loaded)
    try:
        loaded.generation_top_k = 1
        with common.cuda_means_cpu(), torch.no_grad():
            loaded.generate_from_text(qs[:2], [docs[:1], docs[1:2]], max_new_tokens=6)
    finally:
        loaded.decoder_tokenizer.batch_decode = decode
    assert model.generate_from_text(qs[:2], [docs[:1], docs[1:2]], 6).token_ids == seen[-1]
