"""Hugging Face import/export: multi-shard import, lossless round trips, transformers loads
our export, bad directories fail naming the tensor and both shapes, conversion is atomic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clara_jax.clara.formats import hf_mistral, safetensors_io  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    hc = transformers.MistralConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, rope_theta=1e6)
    hf = transformers.MistralForCausalLM(hc).eval()
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(single, safe_serialization=True)
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(sharded / safetensors_io.INDEX_FILE)
    return hf, single, sharded


def leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


def test_sharded_and_single_file_import_identically(hf_dirs):
    _, single, sharded = hf_dirs
    cfg_a, a = hf_mistral.load_hf_mistral(str(single))
    cfg_b, b = hf_mistral.load_hf_mistral(str(sharded))
    assert cfg_a == cfg_b and cfg_a.num_layers == 3 and cfg_a.head_dim == 8
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_export_round_trips_and_loads_in_transformers(hf_dirs, tmp_path):
    hf, single, _ = hf_dirs
    cfg, params = hf_mistral.load_hf_mistral(str(single))
    out = tmp_path / "exported"
    hf_mistral.save_hf_mistral(cfg, params, str(out), max_shard_bytes=30_000)
    cfg2, params2 = hf_mistral.load_hf_mistral(str(out))
    assert cfg2 == cfg
    for x, y in zip(leaves(params), leaves(params2)):
        np.testing.assert_array_equal(x, y)
    reloaded = transformers.MistralForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf(ids).logits.numpy())
    for name, tensor in hf.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy())


def test_bfloat16_import_and_export(hf_dirs, tmp_path):
    _, single, _ = hf_dirs
    cfg, params = hf_mistral.load_hf_mistral(str(single), dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert str(params["lm_head"]["kernel"].dtype) == "bfloat16"
    hf_mistral.save_hf_mistral(cfg, params, str(tmp_path / "bf16"))
    m = transformers.MistralForCausalLM.from_pretrained(tmp_path / "bf16", torch_dtype="auto")
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_checkpoint_round_trip_and_cli(hf_dirs, tmp_path):
    _, single, _ = hf_dirs
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "clara_jax.convert", "hf-mistral", f"--model_dir={single}",
           f"--out_dir={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg, params = hf_mistral.load_checkpoint(str(out))
    _, ref = hf_mistral.load_hf_mistral(str(single))
    for x, y in zip(leaves(params), leaves(ref)):
        np.testing.assert_array_equal(x, y)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "clara_jax.convert", "nonsense"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr


def copy_dir(src, dst, edit):
    tensors = {}
    f = safetensors_io.SafetensorsFile(str(src / "model.safetensors"))
    for name in f.names():
        tensors[name] = np.array(f.get(name))
    edit(tensors)
    os.makedirs(dst)
    (dst / "config.json").write_text((src / "config.json").read_text())
    safetensors_io.save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_bad_directories_name_the_problem(hf_dirs, tmp_path):
    _, single, _ = hf_dirs
    name = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_mistral.load_hf_mistral(str(tmp_path))
    missing = copy_dir(single, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_proj"):
        hf_mistral.load_hf_mistral(str(missing))
    extra = copy_dir(single, tmp_path / "extra",
                     lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", np.zeros(1)))
    with pytest.raises(ValueError, match="unexpected tensors.*layers.9"):
        hf_mistral.load_hf_mistral(str(extra))
    shape = copy_dir(single, tmp_path / "shape",
                     lambda t: t.__setitem__(name, np.zeros((8, 32), np.float32)))
    with pytest.raises(ValueError, match=rf"{name} has shape \(8, 32\), config.json implies "
                                         r"\(16, 32\)"):
        hf_mistral.load_hf_mistral(str(shape))


def test_interrupted_conversion_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    _, single, _ = hf_dirs
    out = tmp_path / "out"

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(hf_mistral.MistralConfig, "to_json", boom)
    with pytest.raises(KeyboardInterrupt):
        hf_mistral.convert_hf_to_checkpoint(str(single), str(out))
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".ckpt-")] == []
