"""Ahead-of-time compilation for TPU topologies from this CPU (`clara_jax.aot`): the real
stage steps compile with abstract sharded inputs, the report's numbers are consistent with
the shardings, and programs that cannot fit are reported as not fitting."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from clara_jax import aot
from clara_jax.train import compiled_step
from config_files import load_config



def config(name, arg="model=tiny", **overrides):
    return load_config(os.path.join("configs", name), arg, **overrides)


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


def test_parse_topology_and_errors():
    chip, shape = aot.parse_topology("v5e:16x16")
    assert (chip.name, chip.hbm_gib, shape) == ("v5e", 16, (16, 16))
    assert aot.parse_topology("v4:2x2x4")[1] == (2, 2, 4)
    with pytest.raises(ValueError, match="unknown chip 'v9'"):
        aot.parse_topology("v9:2x2")
    with pytest.raises(ValueError, match=r"expected v5p:NxNxN"):
        aot.parse_topology("v5p:4x4")


def test_count_collectives_counts_sync_and_async_once():
    hlo = """
  %ag = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p), dimensions={0}
  %ags = (bf16[2,128], bf16[8,128]) all-gather-start(bf16[2,128]{1,0} %q), dimensions={0}
  %agd = bf16[8,128]{1,0} all-gather-done((bf16[2,128], bf16[8,128]) %ags)
  %ar = f32[] all-reduce(f32[] %x), to_apply=%add
  %rs = f32[4]{0} reduce-scatter(f32[16]{0} %y), dimensions={0}, to_apply=%add
  %cp = f32[4]{0} collective-permute(f32[4]{0} %z), source_target_pairs={{0,1}}
"""
    assert aot.count_collectives(hlo) == {"all-gather": 2, "reduce-scatter": 1,
                                          "all-reduce": 1, "all-to-all": 0,
                                          "collective-permute": 1}


def test_build_program_uses_config_overrides_and_validates():
    devices = jax.devices()[:4]
    c = config("pretrain.py", **{"mesh.data": 2, "mesh.fsdp": 2, "batch_size": 4,
                                        "remat_policy": "dots", "scan_layers": False})
    program = aot.build_program(c, devices)
    assert program.model_cfg.remat_policy == "dots" and not program.model_cfg.scan_layers
    # The tokenizer's 16 memory tokens + <AE>, <ENC>, <SEP> follow the 1024-token base.
    assert program.model_cfg.vocab_size == 1024 + 16 + 3
    state, batch = program.args
    assert batch["prompt_ids"].shape == (4, c.max_len)
    assert batch["doc_ids"].shape == (4, 1, c.doc_max_length + 3 + 16)
    assert "pos_mask" not in batch and "index" not in batch
    # Only the trained adapters, and (pretrain's official default) the memory-token embedding
    # rows, carry optimizer state; every leaf is abstract and sharded.
    assert set(state.trainable) == {"encoder", "decoder", "mem_embeddings"}
    assert set(state.frozen) == {"query_reasoner"}
    assert state.trainable["mem_embeddings"].shape == (16, 128)
    leaves = jax.tree_util.tree_leaves(program.args)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    emb = state.base["embed_tokens"]["embedding"]
    assert emb.sharding.shard_shape(emb.shape) == (1043, 128 // 2)   # embed over fsdp 2
    # Arguments per device, by hand: the sharded leaves' bytes.
    expected = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in leaves)
    assert aot.argument_bytes(program) == expected
    with pytest.raises(ValueError, match="config.batch_size: 6 is not divisible"):
        aot.build_program(config("pretrain.py", **{"mesh.data": 2, "mesh.fsdp": 2,
                                                          "batch_size": 6}), devices)
    with pytest.raises(ValueError, match="MistralConfig.remat_policy"):
        aot.build_program(config("pretrain.py", remat_policy="some"), devices)


@pytest.mark.parametrize("model,base_vocab,hidden,params", [
    ("phi4_mini", 200064, 3072, 3_836_055_552), ("llama3_2_1b", 128256, 2048, 1_235_836_928)])
def test_build_program_for_tied_embedding_backbones(model, base_vocab, hidden, params):
    """Stage 1 of the non-Mistral presets as the pod table compiles it (fsdp 4, one
    2048-token sequence per device), abstract: the vocabulary is the base's plus CLaRa's 8
    memory tokens + 3, tied (no lm_head), and the odd vocabulary (200075 for Phi-4-mini)
    leaves the embedding sharded over fsdp on its `embed` dimension."""
    c = config("pretrain.py", f"model={model}", **{"mesh.data": 1, "mesh.fsdp": 4,
                                                  "batch_size": 4})
    program = aot.build_program(c, jax.devices()[:4])
    cfg = program.model_cfg
    assert cfg.vocab_size == base_vocab + 8 + 3 and cfg.tie_word_embeddings
    assert (cfg.remat_policy, cfg.scan_layers, cfg.param_dtype) == ("full", True, "bfloat16")
    assert cfg.num_params == params
    state, batch = program.args
    assert "lm_head" not in state.base and program.description["sharding_notes"] == []
    emb = state.base["embed_tokens"]["embedding"]
    assert emb.shape == (cfg.vocab_size, hidden)
    assert emb.sharding.shard_shape(emb.shape) == (cfg.vocab_size, hidden // 4)
    assert batch["prompt_ids"].shape == (4, 2048) and batch["doc_ids"].shape == (4, 1, 267)
    # Per device: a quarter of the bf16 weights, plus the adapters and their optimizer
    # state (a few percent on top).
    weights = 2 * params / 4
    assert weights < aot.argument_bytes(program) < 1.2 * weights


def test_program_batch_is_what_the_train_loop_feeds_the_step():
    """The batch features are the pipeline's after `inputs.split_batch`: retrieval
    pretraining keeps `pos_mask` (its loss reads it), and its step traces on that batch."""
    from clara_jax import parallel
    program = aot.build_program(config("retrieval_pretrain.py", batch_size=8, max_len=128),
                                jax.devices())
    state, batch = program.args
    assert batch["pos_mask"].shape == (8, 20) and "index" not in batch
    with parallel.axis_rules(program.mesh):
        _, metrics = jax.eval_shape(program.fn, state, batch)
    assert metrics["loss"].shape == ()


@needs_libtpu
@pytest.mark.slow
def test_stage1_tiny_compiles_for_v5e_2x2(tmp_path):
    c = config("pretrain.py", **{"mesh.data": 2, "mesh.fsdp": 2})
    report, compiled = aot.compile_report(c, "v5e:2x2")
    assert report["devices"] == 4 and report["fits"] and report["chip"] == "v5e"
    m = report["memory"]
    assert min(m["argument_bytes"], m["temp_bytes"], m["total_bytes"]) > 0
    # The compiler's argument size is our sum of the sharded leaves plus TPU tile padding
    # (a rank-16 LoRA dimension is stored in 128-wide tiles).
    program = aot.build_program(c, aot.topology_devices("v5e:2x2")[0])
    assert aot.argument_bytes(program) <= m["argument_bytes"] <= 2 * aot.argument_bytes(program)
    # FSDP over 2 devices gathers weights and reduces gradients.
    assert report["collectives"]["all-gather"] > 0 and report["collectives"]["all-reduce"] > 0
    # Counting every scanned layer (4) adds FLOPs to XLA's once-per-loop count, and the
    # total is within a small factor of the model's matmul FLOPs.
    assert report["cost_corrected_for_scan"]
    assert report["flops_per_device"] > 1.5 * report["xla_flops_per_device"]
    assert 0.8 < report["flops_per_device"] / report["model_flops_per_device"] < 3.0
    assert report["estimated_step_seconds"] > 0 and 0 < report["estimated_mfu"] < 1
    assert "FITS" in aot.format_report(report)
    path = tmp_path / "step.pkl"
    compiled_step.serialize(compiled, str(path), program.fingerprint)
    fingerprint, stored = compiled_step.read_serialized(str(path), executable=True)
    assert len(stored["payload"]) > 1000
    assert stored["in_tree"] == jax.tree_util.tree_structure((program.args, {}))
    assert (fingerprint["platform"], fingerprint["device_count"]) == ("tpu", 4)
    assert fingerprint["config"]["batch_size"] == c.batch_size


@needs_libtpu
@pytest.mark.slow
def test_stage3_tiny_compiles_and_reports_not_fitting_on_small_hbm():
    c = config("end_to_end.py", **{"mesh.data": 2, "mesh.fsdp": 2, "batch_size": 8})
    report, _ = aot.compile_report(c, "v5e:2x2", hbm_gib=0.01, correct_scan_cost=False)
    assert report["stage"] == "end_to_end" and report["batch"]["doc_ids"] == [8, 20, 83]
    assert report["memory"]["total_bytes"] > 0 and report["flops_per_device"] > 0
    assert sum(report["collectives"].values()) > 0
    # The same program against 10 MiB of HBM does not fit.
    assert report["hbm_bytes"] == int(0.01 * aot.GiB)
    assert not report["fits"] and report["hbm_fraction"] > 1
    assert "DOES NOT FIT" in aot.format_report(report)


@needs_libtpu
@pytest.mark.slow
def test_7b_on_one_chip_is_rejected_as_not_fitting():
    # Batch 1 x 512 tokens fits (14.8 GiB: 14.0 of arguments, 0.65 of temporaries); the bf16
    # weights (7.24 B x 2 bytes) plus the activations of 16 x 2048 tokens do not.
    c = config("pretrain.py", "model=mistral_7b", batch_size=16, max_len=2048)
    report, compiled = aot.compile_report(c, "v5e:1x1")
    assert compiled is None and not report["fits"]
    assert report["memory"]["argument_bytes"] > 7.2e9 * 2 > 16 * aot.GiB * 0.8
    assert report["memory"]["total_bytes"] > report["hbm_bytes"]
    assert "DOES NOT FIT" in aot.format_report(report)


@needs_libtpu
@pytest.mark.slow
def test_decode_step_compiles_with_a_sharded_cache():
    c = config("end_to_end.py", **{"mesh.data": 2, "mesh.fsdp": 2, "batch_size": 4,
                                          "max_len": 128})
    report, _ = aot.compile_report(c, "v5e:2x2", decode=True, correct_scan_cost=False)
    assert report["mode"] == "decode" and report["fits"]
    # The cache alone, per device: k and v [L=4, B/4=1, S=128, K=2, hd=32] float32.
    cache_bytes = 2 * 4 * 1 * 128 * 2 * 32 * 4
    assert report["memory"]["argument_bytes"] > cache_bytes
    assert report["memory"]["alias_bytes"] >= cache_bytes   # the donated cache is updated in place
    assert report["flops_per_device"] > 0
