"""A train step compiled ahead of time and serialised (`clara_jax.aot --topology=local
--serialize=PATH`) runs in `train` (`config.compiled_step=PATH`) instead of a fresh compile,
trains exactly like the jitted step, and is refused, naming the file and every differing
field, when it was compiled for another run or another backend."""

import importlib.util
import json
import logging
import os
import pickle

import jax
import numpy as np
import pytest

from clara_jax import aot
from clara_jax.train import compiled_step
from clara_jax.train import setup as setup_lib
from clara_jax.train import train as train_lib
from config_files import load_config



def config(**overrides):
    """Tiny stage 1 (SCP), 3 steps of batch 8 on the 8 CPU devices, no eval."""
    return load_config("configs/pretrain.py", "model=tiny", **{
        "total_steps": 3, "batch_size": 8, "max_len": 256, "log_every": 1, "eval_every": 1000,
        "checkpoint_every": 1000, **overrides})


def write_fingerprint_only(path, fingerprint):
    """A serialised-step file with no executable record at all: enough to test the refusals,
    which must all happen before the executable is read."""
    with open(path, "wb") as f:
        pickle.dump({"format": compiled_step.FINGERPRINT_FORMAT, "fingerprint": fingerprint}, f)


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


@needs_libtpu
def test_a_tpu_executable_is_refused_here_naming_the_platform(tmp_path):
    c = config()
    tpu = aot.build_program(c, aot.topology_devices("v5e:2x2")[0])
    tpu.fingerprint["topology"] = "v5e:2x2"
    path = str(tmp_path / "tpu_step.pkl")
    write_fingerprint_only(path, tpu.fingerprint)
    setup_lib.validate_config(config(compiled_step=path))   # the config itself matches
    local = aot.build_program(c, jax.devices())
    with pytest.raises(ValueError) as err:
        compiled_step.load_train_step(path, c, local.model_cfg, local.mesh, local.args[0],
                            local.in_shardings[0])
    msg = str(err.value)
    assert msg.startswith(f"config.compiled_step: {path} (compiled for v5e:2x2: 4 x TPU v5")
    assert "platform: compiled 'tpu', this run 'cpu': an executable compiled for tpu cannot " \
           "run on cpu" in msg and "--topology=local" in msg
    assert "device_count: compiled 4, this run 8" in msg
    assert "mesh: compiled {'data': 4, 'fsdp': 1, 'tensor': 1}, this run {'data': 8" in msg


def test_a_step_compiled_for_another_config_is_refused_naming_each_field(tmp_path):
    c = config()
    local = aot.build_program(c, jax.devices())
    path = str(tmp_path / "step.pkl")
    write_fingerprint_only(path, local.fingerprint)
    # Fields the step does not depend on may differ; the fingerprint is then the same.
    setup_lib.validate_config(config(compiled_step=path, seed=7, log_every=5))
    with pytest.raises(ValueError, match=r"config.compiled_step: .*step.pkl .*1 difference"
                                         r"\(s\):\n  config.batch_size: compiled 8, this run 16$"):
        setup_lib.validate_config(config(compiled_step=path, batch_size=16))
    with pytest.raises(ValueError, match="config.learning_rate: compiled 0.001, this run 0.002"):
        setup_lib.validate_config(config(compiled_step=path, learning_rate=2e-3))
    # A LoRA rank the state does not have: the config field and the adapter leaves.
    c8 = config(lora_rank=8)
    other = aot.build_program(c8, jax.devices())
    with pytest.raises(ValueError) as err:
        compiled_step.load_train_step(path, c8, other.model_cfg, other.mesh, other.args[0],
                            other.in_shardings[0])
    msg = str(err.value)
    assert "config.lora_rank: compiled 16, this run 8" in msg
    assert "state.trainable['decoder']" in msg and "float32[4, 128, 16]" in msg
    assert "float32[4, 128, 8]" in msg
    with pytest.raises(ValueError, match="config.compiled_step: .*missing.pkl does not exist"):
        setup_lib.validate_config(config(compiled_step=str(tmp_path / "missing.pkl")))
    decode = aot.build_program(c, jax.devices(), decode=True)
    write_fingerprint_only(path, decode.fingerprint)
    with pytest.raises(ValueError, match="mode: compiled 'decode', this run 'train'"):
        setup_lib.validate_config(config(compiled_step=path))


def test_a_batch_other_than_the_compiled_one_is_refused_naming_the_feature():
    """E.g. an instruct run whose data has another number of documents than compiled."""
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(np.zeros((8,), np.float32), rows)
    batch = {"doc_ids": jax.device_put(np.ones((8, 5), np.int32), rows)}
    compiled = jax.jit(lambda s, b: (s + b["doc_ids"].sum(1), {"loss": s.sum()})).lower(
        state, batch).compile()
    step = compiled_step.CompiledTrainStep("step.pkl", compiled, compiled_step.signature(batch))
    state = step.place(np.zeros((8,), np.float32))
    assert state.sharding.is_equivalent_to(rows, 1)
    state, metrics = step(state, batch)
    np.testing.assert_array_equal(np.asarray(state), 5.0)
    other = {"doc_ids": jax.device_put(np.ones((8, 3), np.int32), rows)}
    with pytest.raises(ValueError, match=r"config.compiled_step: step.pkl was compiled for "
                                         r"another batch: batch\['doc_ids'\]: compiled "
                                         r"int32\[8, 5\] P\('data',\), this run "
                                         r"int32\[8, 3\] P\('data',\)$"):
        step(state, other)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from clara_jax.data import synthetic
    out = tmp_path_factory.mktemp("data")
    synthetic.generate_corpus(str(out), seed=0, num_entities=60)
    return str(out / "pretrain_train.jsonl")


def _trained(workdir):
    from clara_jax.clara.model import Clara
    model = Clara.load(str(workdir / "model"))
    losses = [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")]
    return losses, model.params, dict(model.adapters)


@pytest.mark.slow
def test_serialized_stage1_step_trains_like_the_jitted_step(tmp_path, data_file, caplog):
    c = config(**{"data.train_files": data_file})
    path = str(tmp_path / "stage1_step.pkl")
    report, compiled = aot.compile_report(c, "local", correct_scan_cost=False,
                                          serialize_to=path)
    assert report["devices"] == 8 and report["executable"] == path
    assert report["executable_bytes"] == os.path.getsize(path) > 10_000
    assert report["estimated_step_seconds"] is None   # no roofline for the CPU
    assert "8 x cpu" in aot.format_report(report)
    del compiled

    # The compiled run compiles no train step (jax logs every compilation it does).
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            train_lib.train(config(**{"data.train_files": data_file, "compiled_step": path}),
                            str(tmp_path / "compiled"))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert compiles and not any("train_step" in m for m in compiles), compiles
    train_lib.train(config(**{"data.train_files": data_file}), str(tmp_path / "jitted"))

    losses_c, params_c, adapters_c = _trained(tmp_path / "compiled")
    losses_j, params_j, adapters_j = _trained(tmp_path / "jitted")
    assert len(losses_c) == 3 and np.all(np.isfinite(losses_c))
    np.testing.assert_allclose(losses_c, losses_j, rtol=0, atol=1e-6)
    leaves_c, tree_c = jax.tree_util.tree_flatten((params_c, adapters_c))
    leaves_j, tree_j = jax.tree_util.tree_flatten((params_j, adapters_j))
    assert tree_c == tree_j
    for a, b in zip(leaves_c, leaves_j):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # ...and the steps did train: the decoder's LoRA B, zero at the start, moved.
    lora_b = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
        adapters_c["decoder"]) if "lora_b" in jax.tree_util.keystr(p)]
    assert lora_b and max(float(np.abs(b).max()) for b in lora_b) > 0

    # The real executable, for another batch size: refused before any data or compile.
    with pytest.raises(ValueError, match=r"(?s)stage1_step.pkl .*config.batch_size: compiled 8, "
                                         r"this run 16"):
        train_lib.train(config(**{"data.train_files": data_file, "compiled_step": path,
                                  "batch_size": 16}), str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused" / "model")
