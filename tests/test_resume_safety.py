"""Resume safety: a changed config is refused naming every field (the run's records intact),
accepted overrides are said, checkpoints are checked against their checksum manifests and a
damaged newest step falls back to the previous intact one."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from clara_jax.errors import StorageError, UserError
from clara_jax.train import checkpoint as ckpt_lib
from clara_jax.train import resume
from clara_jax.train import train as train_lib
from config_files import load_config


def base_run(workdir, steps=9, **overrides):
    """A tiny base LM trained from scratch (random base built from the seed): 8 sequences of
    64 tokens a step, a checkpoint every 3 steps."""
    c = load_config("configs/pretrain_base_tiny.py", f"steps={steps}", **{
        "batch_size": 8, "max_len": 64, "log_every": 1, "checkpoint_every": 3,
        "eval_every": 1000, "data.synthetic_entities": 40, "vocab_size": 400,
        "keep_checkpoints": 3})
    c.update_from_flattened_dict(overrides)
    return train_lib.train(c, str(workdir))


def params_of(workdir):
    from clara_jax.clara.formats.hf_mistral import load_checkpoint
    return jax.tree_util.tree_leaves(load_checkpoint(str(workdir / "model"))[1])


def assert_same_params(a, b):
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_array_equal(x, y)


def snapshot(workdir):
    """The bytes of config.json and of every start record."""
    files = ["config.json"] + [f"configs/{n}" for n in sorted(os.listdir(workdir / "configs"))]
    return {f: (workdir / f).read_bytes() for f in files}


@pytest.fixture(scope="module")
def run9(tmp_path_factory):
    """An uninterrupted 9-step run (checkpoints 3, 6 and 9)."""
    root = tmp_path_factory.mktemp("runs")
    base_run(root / "nine", steps=9)
    return root


def copy_run(root, dst):
    """The 9-step run as if it had stopped after its step-6 checkpoint."""
    shutil.copytree(root / "nine", dst)
    shutil.rmtree(dst / "checkpoints" / "9")
    return dst


def test_records_and_manifests_of_a_run(run9):
    wd = run9 / "nine"
    assert sorted(os.listdir(wd / "configs")) == ["start_000.json"]
    rec = json.loads((wd / "configs" / "start_000.json").read_text())
    assert rec["config"] == json.loads((wd / "config.json").read_text())
    assert len(rec["base_identity"]) == 32 and rec["resumed_from_checkpoint"] is False
    for step in (3, 6, 9):
        step_dir = wd / "checkpoints" / str(step)
        assert ckpt_lib.check_step(str(step_dir)) is None
        files = json.loads((step_dir / "manifest.json").read_text())["files"]
        assert any(f.startswith("data/") for f in files)
        assert any(f.startswith("state/") for f in files)


@pytest.mark.parametrize("change,message", [
    ({"compress_rate": 8, "doc_max_length": 32},
     "model fields cannot change: compress_rate 4 -> 8, doc_max_length 64 -> 32"),
    ({"seed": 1}, "model fields cannot change: seed 0 -> 1"),
    ({"learning_rate": 1e-3, "batch_size": 16},
     "changed: batch_size 8 -> 16, learning_rate 0.003 -> 0.001 (to accept, set "
     "--config.resume_overrides=batch_size,learning_rate)"),
    ({"seed": 1, "learning_rate": 1e-3, "resume_overrides": "learning_rate"},
     "model fields cannot change: seed 0 -> 1"),
])
def test_changed_config_is_refused_naming_every_field_and_records_stay(run9, tmp_path,
                                                                       change, message):
    wd = copy_run(run9, tmp_path / "wd")
    before = snapshot(wd)
    with pytest.raises(UserError) as e:
        base_run(wd, steps=12, **change)
    text = str(e.value)
    assert "\n" not in text and message in text and "checkpoint step 6" in text, text
    assert snapshot(wd) == before   # config.json and the start records untouched
    assert ckpt_lib.saved_steps(str(wd / "checkpoints")) == [3, 6]


def test_override_is_accepted_and_said_and_extension_is_free(run9, tmp_path, capsys):
    wd = copy_run(run9, tmp_path / "wd")
    out = base_run(wd, steps=12, learning_rate=1e-3, resume_overrides="learning_rate",
                   log_every=2)
    assert out["steps"] == 12
    printed = capsys.readouterr().out
    assert ("resume: overriding the recorded config (resume_overrides): learning_rate "
            "0.003 -> 0.001") in printed
    assert "resumed from" in printed and "at step 6" in printed
    assert sorted(os.listdir(wd / "configs")) == ["start_000.json", "start_001.json"]
    rec = json.loads((wd / "configs" / "start_001.json").read_text())
    assert rec["config"]["learning_rate"] == 1e-3 and rec["resumed_from_checkpoint"] is True
    assert json.loads((wd / "config.json").read_text())["learning_rate"] == 1e-3
    with pytest.raises(UserError, match="resume_overrides: unknown field"):
        base_run(wd, steps=15, resume_overrides="learning_rat")


def damage(step_dir, how):
    state = step_dir / "state"
    big = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "bytes":        # 4 KiB overwritten in place, same size
        raw = bytearray(big.read_bytes())
        at = len(raw) // 2
        raw[at:at + 4096] = bytes(4096)
        big.write_bytes(bytes(raw))
        return str(big.relative_to(step_dir))
    if how == "truncate":
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
        return str(big.relative_to(step_dir))
    if how == "data":
        shutil.rmtree(step_dir / "data")
        return "data/"
    if how == "metadata":
        (state / "_METADATA").unlink()
        return "state/_METADATA"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["bytes", "truncate", "data", "metadata"])
def test_damaged_newest_step_falls_back_to_the_previous_one(run9, tmp_path, capsys, how):
    wd = copy_run(run9, tmp_path / "wd")
    name = damage(wd / "checkpoints" / "6", how)
    out = base_run(wd, steps=9)
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if "checkpoint step 6 is not intact" in l)
    assert (name.rstrip("/") in line) or ("data/" in line and how == "data"), line
    assert "falling back to the previous step (resuming from step 3)" in line
    assert "at step 3" in printed
    assert (wd / "corrupt_checkpoints" / "6").is_dir()
    assert out["steps"] == 9
    assert_same_params(wd, run9 / "nine")   # step 3's state and data order: bitwise equal


def test_refuse_mode_and_nothing_intact_raise_storage_error(run9, tmp_path):
    wd = copy_run(run9, tmp_path / "wd")
    damage(wd / "checkpoints" / "6", "bytes")
    with pytest.raises(StorageError, match=r"checkpoints/6: file state/.* changed"):
        base_run(wd, steps=9, on_corrupt_checkpoint="refuse")
    damage(wd / "checkpoints" / "3", "data")
    with pytest.raises(StorageError) as e:
        base_run(wd, steps=9)
    assert "no intact checkpoint" in str(e.value) and "step 6: file" in str(e.value)
    assert "step 3: no data/" in str(e.value)
    assert ckpt_lib.saved_steps(str(wd / "checkpoints")) == [3, 6]   # nothing moved: a
    assert not (wd / "corrupt_checkpoints").exists()                  # rerun refuses again


def test_unverified_step_restores_with_a_note_and_tmp_dirs_are_removed(run9, tmp_path,
                                                                       capsys):
    wd = copy_run(run9, tmp_path / "wd")
    (wd / "checkpoints" / "6" / "manifest.json").unlink()   # killed before the manifest
    tmp = wd / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    out = base_run(wd, steps=9)
    printed = capsys.readouterr().out
    assert f"checkpoint: removed an unfinished save {tmp}" in printed
    assert "checkpoint step 6 has no manifest" in printed and "at step 6" in printed
    assert not tmp.exists() and out["steps"] == 9
    assert not (wd / "checkpoints" / "6" / "manifest.json").exists()   # not vouched for later
    assert ckpt_lib.check_step(str(wd / "checkpoints" / "9")) is None
    assert_same_params(wd, run9 / "nine")


def recorded_clara_run(tmp_path, **fields):
    """A work directory with a start record of a tiny pretrain run from `fields` and a
    (stand-in) step-3 checkpoint directory: enough for the config check, nothing trained."""
    c = load_config("configs/pretrain.py", **fields)
    resume.record_start(c, str(tmp_path), "base-a", None)
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("init_from,change,message", [
    ("", {"lora_rank": 8}, "model fields cannot change: lora_rank 16 -> 8"),
    ("", {"compress_rate": 8}, "model fields cannot change: compress_rate 4 -> 8"),
    ("", {"different_mem_tokens": False, "lora_alpha": 8.0},
     "model fields cannot change: different_mem_tokens true -> false, lora_alpha null -> 8.0"),
    ("", {"grad_accum": 2}, "model fields cannot change: grad_accum 1 -> 2"),
    ("", {"end_to_end.query_reasoner_init": "encoder"},
     "model fields cannot change: end_to_end.query_reasoner_init \"auto\" -> \"encoder\""),
    ("", {"instruct.decoder_init": "keep"},
     "model fields cannot change: instruct.decoder_init \"fresh\" -> \"keep\""),
    # the seed of a run started from a saved model only orders data and draws dropout
    ("INIT", {"seed": 1, "lora_dropout": 0.0, "data.train_files": "x.jsonl"},
     "changed: data.train_files \"\" -> \"x.jsonl\", lora_dropout 0.1 -> 0.0, seed 0 -> 1 "
     "(to accept, set --config.resume_overrides=data.train_files,lora_dropout,seed)"),
])
def test_clara_stage_fields_are_classified(tmp_path, init_from, change, message):
    init = str(tmp_path) if init_from == "INIT" else ""
    wd = recorded_clara_run(tmp_path / "wd", init_from=init)
    c = load_config("configs/pretrain.py", init_from=init, **change)
    with pytest.raises(UserError) as e:
        resume.check_config(c, str(wd))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    c.resume_overrides = ",".join(k for k in change)
    if "model fields" in message:
        with pytest.raises(UserError, match="model fields cannot change"):
            resume.check_config(c, str(wd))
    else:
        assert resume.check_config(c, str(wd))["base_identity"] == "base-a"


def test_free_fields_and_a_changed_base(tmp_path):
    wd = recorded_clara_run(tmp_path / "wd")
    c = load_config("configs/pretrain.py", total_steps=1000, log_every=1, eval_every=5,
                    checkpoint_every=7, keep_checkpoints=5, on_nonfinite="skip",
                    **{"mesh.data": 1, "mesh.fsdp": 8})
    record = resume.check_config(c, str(wd))
    before = snapshot(wd)
    with pytest.raises(UserError, match="the frozen base differs .* base-a -> base-b"):
        resume.record_start(c, str(wd), "base-b", record)
    assert snapshot(wd) == before
    resume.record_start(c, str(wd), "base-a", record)
    assert sorted(os.listdir(wd / "configs")) == ["start_000.json", "start_001.json"]
    assert snapshot(wd)["configs/start_000.json"] == before["configs/start_000.json"]


def test_base_identity_tells_bases_apart():
    from clara_jax.model.config import preset
    from clara_jax.model.mistral import init_params
    cfg = preset("tiny", vocab_size=400)
    a = jax.device_get(init_params(cfg, jax.random.key(0)))
    b = jax.device_get(init_params(cfg, jax.random.key(1)))
    assert resume.base_identity(a) == resume.base_identity(jax.tree_util.tree_map(
        np.copy, a))
    assert resume.base_identity(a) != resume.base_identity(b)
    assert resume.base_identity(a, 500, 0) != resume.base_identity(a, 500, 1)
    assert resume.base_identity(a, 400, 0) == resume.base_identity(a, 400, 1)


def test_manifest_is_written_as_soon_as_an_async_save_finishes(tmp_path):
    """Without wait / close: a kill between saves finds the last step verified."""
    import jax.numpy as jnp
    from clara_jax.train.step import TrainState
    state = TrainState(step=jnp.array(3), base={}, trainable={"w": jnp.arange(1000.0)},
                       frozen={}, opt_state={"m": jnp.ones(1000)}, rng=jax.random.key(0))
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    try:
        ck.save(3, state, {"pos": 7}, force=True)
        manifest = tmp_path / "checkpoints" / "3" / "manifest.json"
        for _ in range(500):
            if manifest.exists():
                break
            time.sleep(0.01)
        assert manifest.exists()
        assert ckpt_lib.check_step(str(tmp_path / "checkpoints" / "3")) is None
        restored, data = ck.restore(state)
        assert data == {"pos": 7} and int(restored.step) == 3
        np.testing.assert_array_equal(restored.trainable["w"], state.trainable["w"])
    finally:
        ck.close()
