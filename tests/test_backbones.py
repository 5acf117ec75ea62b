"""Backbones beyond Mistral (Llama with llama3 RoPE scaling, Qwen2 with q/k/v biases, Phi-3
with fused weights, partial rotary and longrope): tiny random transformers models saved with
save_pretrained, imported, run against transformers (float32), exported back, checked by
`verify-hf`, and trained through CLaRa's stage-1 loss with LoRA on every linear layer."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clara_jax.clara import losses  # noqa: E402
from clara_jax.clara.config import ClaraConfig  # noqa: E402
from clara_jax.clara.formats import hf_mistral, safetensors_io  # noqa: E402
from clara_jax.convert.verify import verify_hf  # noqa: E402
from clara_jax.model.lora import LORA_TARGETS, LoraConfig  # noqa: E402
from clara_jax.model.mistral import Mistral  # noqa: E402

V, D, L, H, KV, F = 160, 64, 2, 4, 2, 96
T = 12  # sequence length: within the longrope model's original 16 positions
TOL = 1e-4
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
              num_key_value_heads=KV, intermediate_size=F, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, attn_implementation="eager")


def hf_configs():
    return {
        "llama": transformers.LlamaConfig(
            **COMMON, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=64,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "qwen2": transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True,
                                          use_sliding_window=False),
        "phi3": transformers.Phi3Config(**COMMON, rope_theta=10000.0, partial_rotary_factor=0.5,
                                        max_position_embeddings=64,
                                        original_max_position_embeddings=64),
        "phi3_longrope": transformers.Phi3Config(
            **COMMON, rope_theta=10000.0, partial_rotary_factor=0.75, tie_word_embeddings=True,
            max_position_embeddings=64, original_max_position_embeddings=16,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2, 3.0, 4.1],
                          "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]}),
    }


NAMES = ("llama", "qwen2", "phi3", "phi3_longrope")


def randomize(model):
    """Weights of order one (and non-zero biases): logits of order one, so that a mapping
    error shows far above the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if "bias" in name else 0.25))


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """{name: (transformers model, single-file dir, sharded dir)}."""
    torch.manual_seed(0)
    out = {}
    for name, hc in hf_configs().items():
        hf = transformers.AutoModelForCausalLM.from_config(hc, torch_dtype=torch.float32).eval()
        randomize(hf)
        single = tmp_path_factory.mktemp(f"{name}_single")
        hf.save_pretrained(single, safe_serialization=True)
        sharded = tmp_path_factory.mktemp(f"{name}_sharded")
        hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
        out[name] = (hf, single, sharded)
    return out


def ids_batch(seed=0, b=3):
    return np.random.default_rng(seed).integers(0, V, (b, T))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids)).logits.numpy()


def our_logits(cfg, params, ids):
    return np.asarray(Mistral(cfg).apply({"params": jax.tree_util.tree_map(jnp.asarray, params)},
                                         jnp.asarray(ids, jnp.int32)).logits)


@pytest.mark.parametrize("name", NAMES)
def test_import_matches_transformers(backbones, name):
    hf, single, sharded = backbones[name]
    assert os.path.exists(sharded / safetensors_io.INDEX_FILE)
    cfg, params = hf_mistral.load_hf_mistral(str(single))
    cfg_b, params_b = hf_mistral.load_hf_mistral(str(sharded))
    assert cfg == cfg_b
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_b)):
        np.testing.assert_array_equal(x, y)
    # The block layout is Mistral's whatever the checkpoint stores (Phi-3's fused weights
    # are split), so LoRA targets and sharding rules apply unchanged.
    assert set(params["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(params["layers"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert ("lm_head" in params) == (not hf.config.tie_word_embeddings)
    assert ("bias" in params["layers"]["self_attn"]["q_proj"]) == (name == "qwen2")
    ids = ids_batch()
    ref, ours = hf_logits(hf, ids), our_logits(cfg, params, ids)
    assert np.abs(ref).max() > 0.5  # logits of order one: the tolerance below means something
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("name,change", [
    ("llama", dict(rope_scaling="none")),
    ("phi3", dict(partial_rotary_factor=1.0)),
    ("phi3_longrope", dict(rope_scaling="none", rope_short_factor=())),
    ("qwen2", None),
])
def test_each_switch_matters(backbones, name, change):
    """Turning a variant's switch off moves the logits far beyond the tolerance."""
    hf, single, _ = backbones[name]
    cfg, params = hf_mistral.load_hf_mistral(str(single))
    if change is None:  # Qwen2: drop the q/k/v biases
        cfg = cfg.replace(qkv_bias=False)
        for proj in ("q_proj", "k_proj", "v_proj"):
            del params["layers"]["self_attn"][proj]["bias"]
    else:
        cfg = cfg.replace(**change)
    ids = ids_batch()
    assert np.abs(our_logits(cfg, params, ids) - hf_logits(hf, ids)).max() > 100 * TOL


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_into_transformers(backbones, name, tmp_path):
    hf, single, _ = backbones[name]
    cfg, params = hf_mistral.load_hf_mistral(str(single))
    out = tmp_path / "exported"
    hf_mistral.save_hf_mistral(cfg, params, str(out), max_shard_bytes=30_000)
    cfg2, params2 = hf_mistral.load_hf_mistral(str(out))
    assert cfg2 == cfg
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(x, y)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    ref_state = hf.state_dict()
    for key, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), ref_state[key].numpy(), err_msg=key)
    ids = ids_batch(1)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


@pytest.mark.parametrize("name", NAMES)
def test_verify_hf_passes(backbones, name):
    _, single, _ = backbones[name]
    parity = verify_hf(str(single))
    assert parity.architecture == name.split("_")[0]
    assert parity.max_abs_diff < TOL


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clara_jax.convert", *args], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_verify_hf_cli_exit_codes(backbones, tmp_path):
    """0 on a faithful directory; 1 on a converted checkpoint whose one weight was changed;
    non-zero with a one-line error on a config.json that the import cannot map."""
    _, single, _ = backbones["qwen2"]
    ok = run_cli("verify-hf", f"--model_dir={single}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "max |logit difference|" in ok.stdout and "within" in ok.stdout

    converted = tmp_path / "converted"
    assert run_cli("hf-mistral", f"--model_dir={single}", f"--out_dir={converted}"
                   ).returncode == 0
    assert verify_hf(str(single), str(converted)).max_abs_diff < TOL

    cfg, params = hf_mistral.load_hf_mistral(str(single))
    params["layers"]["mlp"]["down_proj"]["kernel"][1, 3, :] += 0.5
    tampered = tmp_path / "tampered_ckpt"
    hf_mistral.save_checkpoint(str(tampered), cfg, params)
    assert verify_hf(str(single), str(tampered)).max_abs_diff > 100 * TOL
    bad = run_cli("verify-hf", f"--model_dir={single}", f"--checkpoint={tampered}")
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "ABOVE" in bad.stdout

    remapped = tmp_path / "remapped"
    remapped.mkdir()
    for f in os.listdir(single):
        os.symlink(single / f, remapped / f) if f != "config.json" else None
    hc = json.loads((single / "config.json").read_text())
    hc["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (remapped / "config.json").write_text(json.dumps(hc))
    with pytest.raises(ValueError, match="rope_scaling type 'linear' is not supported for "
                       "Qwen2ForCausalLM"):
        verify_hf(str(remapped))


def test_unsupported_architecture_is_refused_in_one_line(backbones, tmp_path):
    _, single, _ = backbones["llama"]
    hc = json.loads((single / "config.json").read_text())
    hc["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(hc))
    with pytest.raises(ValueError) as err:
        hf_mistral.load_hf_mistral(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg
    assert str(tmp_path / "config.json") in msg
    del hc["architectures"]
    hc["model_type"] = "gemma"
    (tmp_path / "config.json").write_text(json.dumps(hc))
    with pytest.raises(ValueError, match="unsupported model_type 'gemma'"):
        hf_mistral.load_hf_mistral(str(tmp_path))


def stage1_batch(seed, b, k, n_mem, first_mem, doc_len=10, length=24):
    """Left-padded documents followed by their memory tokens, and prompts holding k memory
    slots (n_mem tokens + <SEP>) and an answer (labels on the answer only)."""
    rng = np.random.default_rng(seed)
    mem = list(range(first_mem, first_mem + n_mem))
    sep = first_mem + n_mem + 2
    doc_ids = np.zeros((b * k, doc_len + n_mem), np.int32)
    doc_mask = np.zeros_like(doc_ids)
    for i in range(b * k):
        n = int(rng.integers(3, doc_len + 1))
        doc_ids[i, doc_len - n:doc_len] = rng.integers(3, first_mem, n)
        doc_mask[i, doc_len - n:] = 1
        doc_ids[i, doc_len:] = mem
    ids = np.zeros((b, length), np.int32)
    mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
    for i in range(b):
        answer = rng.integers(3, first_mem, 3).tolist() + [2]
        row = [1] + rng.integers(3, first_mem, 2).tolist() + (mem + [sep]) * k + answer
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
        labels[i, length - len(answer):] = answer
    return {"doc_ids": doc_ids.reshape(b, k, -1), "doc_mask": doc_mask.reshape(b, k, -1),
            "prompt_ids": ids, "prompt_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", ("llama", "qwen2", "phi3"))
def test_clara_stage1_loss_trains_lora_on_every_linear(backbones, name):
    _, single, _ = backbones[name]
    model_cfg, params = hf_mistral.load_hf_mistral(str(single))
    n_mem, k = 2, 2
    first_mem = V - n_mem - 3  # the last rows stand in for <MEM>s, <AE>, <ENC>, <SEP>
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    cfg = ClaraConfig(doc_max_length=8, compress_rate=4, generation_top_k=k,
                      first_mem_token_id=first_mem, lora=lora)
    model = Mistral(model_cfg, lora)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    rngs = jax.random.split(jax.random.key(1), 2)
    adapters = {}
    shapes = nn.meta.unbox(jax.eval_shape(model.init, rngs[0], jnp.zeros((1, 1), jnp.int32))
                           ["lora"])
    for role, rng in zip(("encoder", "decoder"), rngs):
        # lora_b starts at zero (PEFT); random here so that lora_a's gradient is non-zero too.
        leaves, treedef = jax.tree_util.tree_flatten(shapes)
        keys = jax.random.split(rng, len(leaves))
        adapters[role] = jax.tree_util.tree_unflatten(
            treedef, [0.05 * jax.random.normal(key, x.shape) for key, x in zip(keys, leaves)])
    batch = jax.tree_util.tree_map(jnp.asarray, stage1_batch(0, 2, k, n_mem, first_mem))

    @jax.jit
    def loss_and_grads(trainable):
        return jax.value_and_grad(lambda a: losses.compressed_generation_loss(
            model, params, a, batch, cfg), has_aux=True)(trainable)

    (loss, metrics), grads = loss_and_grads(adapters)
    assert np.isfinite(float(loss)) and float(metrics["mse_loss"]) > 0
    for role in ("encoder", "decoder"):
        layer = grads[role]["layers"]
        found = {**layer["self_attn"], **layer["mlp"]}
        assert set(found) == set(LORA_TARGETS)
        for target, g in found.items():
            for part in ("lora_a", "lora_b"):
                norm = float(jnp.linalg.norm(g[part]))
                assert np.isfinite(norm) and norm > 0, (role, target, part)


@pytest.mark.parametrize("preset", ("llama3_2_1b", "qwen2_5_1_5b", "phi4_mini"))
def test_aot_builds_stage1_for_the_backbone_presets(preset):
    """`python -m clara_jax.aot` builds the stage-1 step of each preset (abstract, sharded,
    traced; not compiled): the published sizes, tied embeddings without an lm_head."""
    from clara_jax import aot, parallel
    from config_files import load_config
    c = load_config(os.path.join("configs", "pretrain.py"), f"model={preset}",
                    **{"mesh.data": 2, "mesh.fsdp": 4, "batch_size": 8, "max_len": 256})
    program = aot.build_program(c, jax.devices()[:8])
    state, batch = program.args
    cfg = program.model_cfg
    assert cfg.architecture == {"llama3_2_1b": "llama", "qwen2_5_1_5b": "qwen2",
                                "phi4_mini": "phi3"}[preset]
    assert "lm_head" not in state.base
    assert state.base["embed_tokens"]["embedding"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert ("bias" in state.base["layers"]["self_attn"]["q_proj"]) == (preset == "qwen2_5_1_5b")
    assert set(state.trainable["encoder"]["layers"]["mlp"]) == {"gate_proj", "up_proj",
                                                                 "down_proj"}
    with parallel.axis_rules(program.mesh):
        _, metrics = jax.eval_shape(program.fn, state, batch)
    assert metrics["loss"].shape == ()


def _phi3_adapter(cfg, rank, equal_a, seed=0):
    """A random adapter tree of cfg (q/k/v and gate/up sharing their A when equal_a)."""
    from clara_jax.clara.formats.apple import _PARENT, _shapes
    rng = np.random.default_rng(seed)
    layers, shared = {}, {}
    for module in LORA_TARGETS:
        in_shape, out_shape = _shapes(cfg, module)
        group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu",
                 "up_proj": "gu"}.get(module, module)
        a = rng.normal(size=(cfg.num_layers, *in_shape, rank)).astype(np.float32)
        if equal_a:
            a = shared.setdefault(group, a)
        b = rng.normal(size=(cfg.num_layers, rank, *out_shape)).astype(np.float32)
        layers.setdefault(_PARENT[module], {})[module] = {"lora_a": a, "lora_b": b}
    return {"layers": layers}


def test_phi3_fused_lora_round_trip_and_refusal():
    """Phi-3's PEFT adapters live on the fused qkv_proj / gate_up_proj: our split adapter is
    written fused and read back exactly when the split A's are equal, and refused in one line
    naming the module otherwise."""
    from clara_jax.clara.formats import apple
    cfg = hf_mistral.config_from_hf(hf_configs()["phi3"].to_dict())
    adapter = _phi3_adapter(cfg, 4, equal_a=True)
    state = apple.adapter_to_peft(adapter, cfg)
    assert {k.split(".")[4] for k in state} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                 "down_proj"}
    qkv_b = state["model.layers.1.self_attn.qkv_proj.lora_B.weight"]
    assert qkv_b.shape == ((H + 2 * KV) * (D // H), 4)
    back = apple.adapter_from_peft(state, cfg)
    for x, y in zip(jax.tree_util.tree_leaves(adapter), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"^layers\.0\.self_attn\.qkv_proj: the LoRA A of "
                                         r"k_proj differs"):
        apple.adapter_to_peft(_phi3_adapter(cfg, 4, equal_a=False), cfg)
    with pytest.raises(ValueError, match="unexpected key .*q_proj"):
        apple.adapter_from_peft({"model.layers.0.self_attn.q_proj.lora_A.weight":
                                 np.zeros((4, D), np.float32)}, cfg)


def test_training_resizes_to_the_tokenizer_like_the_official_code():
    """A base with more embedding rows than its tokenizer (Qwen2.5: 151,936 rows, 151,665
    tokens) trains over exactly len(tokenizer) rows, the first ones kept, as the official
    `resize_token_embeddings(len(tokenizer))` cuts it; a smaller one grows."""
    from clara_jax.train import setup as setup_lib
    from tests.config_files import load_config
    from clara_jax.train.start import resize_vocab
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": rng.normal(size=(V, D)).astype(np.float32)},
              "lm_head": {"kernel": rng.normal(size=(D, V)).astype(np.float32)}}
    cut = resize_vocab(params, V - 20, rng)
    np.testing.assert_array_equal(cut["embed_tokens"]["embedding"],
                                  params["embed_tokens"]["embedding"][:V - 20])
    np.testing.assert_array_equal(cut["lm_head"]["kernel"], params["lm_head"]["kernel"][:, :V - 20])
    grown = resize_vocab(params, V + 5, rng)
    assert grown["embed_tokens"]["embedding"].shape == (V + 5, D)
    cfg = hf_mistral.config_from_hf(hf_configs()["qwen2"].to_dict())
    c = load_config("configs/pretrain.py")
    model_cfg, clara_cfg = setup_lib.model_configs(c, cfg, V - 40)
    assert model_cfg.vocab_size == V - 40 + clara_cfg.num_added_tokens < V
    assert clara_cfg.first_mem_token_id == V - 40
