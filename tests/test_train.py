"""The trainer: config validation before compiling, learning on the synthetic data, exact
resume after a hard kill, sharded steps equal across meshes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clara_jax.train import metrics as metrics_lib
from clara_jax.train import setup as setup_lib
from clara_jax.train import start as start_lib
from clara_jax.train import train as train_lib
from config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name="configs/pretrain.py", arg=""):
    return load_config(name, arg)


@pytest.mark.parametrize("field,value,message", [
    ("doc_max_length", 30, "doc_max_length: 30 is not a positive multiple of compress_rate 4"),
    ("stage", "stage9", "stage: unknown stage"),
    ("batch_size", 3, "batch_size: 3 is not divisible by mesh data x fsdp = 8"),
    ("init_from", "/nonexistent/dir", "init_from: /nonexistent/dir does not exist"),
])
def test_invalid_configs_fail_naming_the_field(field, value, message):
    c = config()
    c[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        setup_lib.validate_config(c, n_devices=8)


def test_base_init_fields_are_validated_and_head_starts_as_the_embedding():
    """lm_head_init and rope_theta shape a base trained from scratch only; 'embedding' makes
    lm_head the transpose of the token embedding, so each token scores itself highest."""
    import jax
    import numpy as np
    from clara_jax.model.config import preset
    from clara_jax.model.mistral import init_params

    c = config("configs/pretrain_base_tiny.py")
    setup_lib.validate_config(c, n_devices=8)
    for field, value, message in (("lm_head_init", "zeros", "lm_head_init: must be"),
                                  ("rope_theta", -1.0, "rope_theta: -1.0")):
        bad = config("configs/pretrain_base_tiny.py")
        bad[field] = value
        with pytest.raises(ValueError, match=message):
            setup_lib.validate_config(bad, n_devices=8)
    bad = config("configs/pretrain_base_tiny.py")
    bad.init_from = ROOT   # any existing directory: the point is that it is not empty
    with pytest.raises(ValueError, match="lm_head_init: 'embedding' initialises a base"):
        setup_lib.validate_config(bad, n_devices=8)
    params = jax.device_get(init_params(preset("tiny", vocab_size=96), jax.random.key(0)))
    tied = start_lib.head_from_embedding(params)
    emb = np.asarray(params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(tied["lm_head"]["kernel"], emb.T)
    assert (np.argmax(emb @ tied["lm_head"]["kernel"], axis=1) == np.arange(96)).all()
    assert not (np.argmax(emb @ params["lm_head"]["kernel"], axis=1) == np.arange(96)).all()


def test_k_larger_than_candidates_and_bad_mesh():
    c = config("configs/end_to_end.py")
    c.generation_top_k = 21
    with pytest.raises(ValueError, match="generation_top_k: k=21 is larger than num_candidates 20"):
        setup_lib.validate_config(c, n_devices=8)
    c = config()
    c.mesh.data, c.mesh.fsdp = 3, 1
    with pytest.raises(ValueError, match="mesh: mesh shape .* does not divide the 8 devices"):
        setup_lib.validate_config(c, n_devices=8)


def tiny_run(workdir, stage_file, steps, **overrides):
    c = config(stage_file)
    c.total_steps = steps
    c.batch_size = 8
    c.log_every = 1
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.max_len = 128
    c.data.synthetic_entities = 60
    for k, v in overrides.items():
        if "." in k:
            a, b = k.split(".")
            c[a][b] = v
        else:
            c[k] = v
    return train_lib.train(c, str(workdir))


def losses_of(workdir):
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_every_stage_learns_on_the_synthetic_data(tmp_path):
    """base LM -> stage 1 (SCP) -> stage 2 (instruct) -> stage 3 (end to end) and retrieval
    pretraining, each from the previous stage's exported model; every loss goes down."""
    # The usual random lm_head: this test is about every stage learning, not about reading.
    base = tiny_run(tmp_path / "base", "configs/pretrain_base_tiny.py", 40, learning_rate=3e-3,
                    vocab_size=400, lm_head_init="random")
    loss = losses_of(tmp_path / "base")
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.5
    common = dict(max_len=256, doc_max_length=32, num_candidates=8, generation_top_k=2)
    s1 = tiny_run(tmp_path / "s1", "configs/pretrain.py", 30, learning_rate=1e-3,
                  init_from=base["model_dir"], **common)
    s2 = tiny_run(tmp_path / "s2", "configs/instruct.py", 30, learning_rate=1e-3,
                  init_from=s1["model_dir"], **common)
    s3 = tiny_run(tmp_path / "s3", "configs/end_to_end.py", 30, learning_rate=1e-3,
                  init_from=s2["model_dir"], temperature=0.1, **common)
    ret = tiny_run(tmp_path / "ret", "configs/retrieval_pretrain.py", 30, learning_rate=1e-3,
                   init_from=s2["model_dir"], temperature=0.1, **common)
    for name in ("s1", "s2", "s3", "ret"):
        loss = losses_of(tmp_path / name)
        assert np.mean(loss[-5:]) < np.mean(loss[:5]), (name, loss)
    rows = [json.loads(l) for l in open(tmp_path / "s3" / "metrics.jsonl")]
    assert "recall@1" in rows[-1] and "truncated_docs_epoch" in rows[-1]
    from clara_jax import Clara
    model = Clara.load(str(tmp_path / "s3"))  # a work directory loads as a ready model
    assert model.compress_documents(["Ana was born in Zan."]).shape == (1, 8, 128)
    out = model.generate_from_questions(["Where was Ana born?"], [["Ana was born in Zan."] * 3],
                                        max_new_tokens=4, k=2)
    assert out.topk_indices.shape == (1, 2)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_parameters(tmp_path):
    args = ["--config=configs/pretrain_base_tiny.py:steps=12", "--config.batch_size=8",
            "--config.max_len=64", "--config.log_every=1", "--config.checkpoint_every=3",
            "--config.eval_every=1000", "--config.data.synthetic_entities=40",
            "--config.vocab_size=400"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = lambda wd: subprocess.Popen([sys.executable, "-m", "clara_jax.train", f"--workdir={wd}",
                                       *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)

    def finish(proc):
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]

    finish(run(tmp_path / "a"))
    proc = run(tmp_path / "b")
    ckpt = tmp_path / "b" / "checkpoints" / "3"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert killed, "the run finished before it could be killed"
    finish(run(tmp_path / "b"))
    from clara_jax.clara.formats.hf_mistral import load_checkpoint
    _, a = load_checkpoint(str(tmp_path / "a" / "model"))
    _, b = load_checkpoint(str(tmp_path / "b" / "model"))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU


def test_train_step_is_the_same_on_every_mesh():
    from clara_jax import parallel
    from clara_jax.clara.config import ClaraConfig
    from clara_jax.model.config import preset
    from clara_jax.model.lora import LoraConfig
    from clara_jax.model.mistral import Mistral, init_params, logical_axes
    from clara_jax.train import step as step_lib
    from clara_jax.train.optim import make_optimizer

    mcfg = preset("tiny", num_heads=4, num_kv_heads=2, vocab_size=512)
    ccfg = ClaraConfig(doc_max_length=16, compress_rate=4, generation_top_k=2,
                       first_mem_token_id=500, lora=LoraConfig(rank=4, alpha=8, dropout=0.1))
    model = Mistral(mcfg, ccfg.lora)
    base = init_params(mcfg, jax.random.key(0))
    adapters = setup_lib.fresh_adapters(mcfg, ccfg.lora, jax.random.key(1))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)  # non-zero B
    rng = np.random.RandomState(0)
    b, k = 8, 2
    le = 16 + 3 + 4
    doc_ids = rng.randint(3, 500, (b, k, le))
    doc_ids[..., -4:] = np.arange(500, 504)
    prompt = rng.randint(3, 500, (b, 40))
    prompt[:, 5:15] = np.tile(np.r_[500:504, 506, 500:504, 506], (b, 1))
    labels = np.where(np.arange(40) >= 30, prompt, -100)
    batch = {"doc_ids": doc_ids, "doc_mask": np.ones_like(doc_ids), "prompt_ids": prompt,
             "prompt_mask": np.ones_like(prompt), "labels": labels}
    specs = logical_axes(mcfg, ccfg.lora)

    def step_on_every_mesh(tx):
        step = step_lib.make_train_step(model, ccfg, "instruct", tx, dropout=True)
        results = []
        for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
            n = int(np.prod(shape))
            mesh = parallel.make_mesh(shape, jax.devices()[:n])
            p = jax.device_put(base, parallel.logical_sharding(specs["params"], mesh))
            a = {name: jax.device_put(t, parallel.logical_sharding(specs["lora"], mesh))
                 for name, t in adapters.items()}
            state = step_lib.create_train_state(p, a, "instruct", tx, jax.random.key(2))
            gb = {key: jax.device_put(jnp.asarray(v), parallel.batch_sharding(mesh, v.ndim))
                  for key, v in batch.items()}
            with parallel.axis_rules(mesh):
                new_state, metrics = jax.jit(step)(state, gb)
            results.append((float(metrics["loss"]), jax.device_get(new_state.trainable)))
        return results

    def max_diff(a, b):
        return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda x, y: float(np.abs(x - y).max()), a, b)))

    # SGD with lr 1: the updated parameters differ exactly by the gradients, so this bounds
    # the sharded gradients against the single-device ones.
    sgd = step_on_every_mesh(optax.sgd(1.0))
    for loss, trainable in sgd[1:]:
        assert abs(loss - sgd[0][0]) < 1e-5
        assert max_diff(trainable, sgd[0][1]) < 1e-5
    # The trainer's AdamW: its first update is lr * g / (|g| + eps), close to lr * sign(g), so a
    # gradient entry within float rounding of zero may move by up to lr on one mesh and not on
    # another. Bound the difference by 2% of lr (1e-3): the rounding is ~1e-7 relative.
    adam = step_on_every_mesh(make_optimizer(1e-3, 10))
    for loss, trainable in adam[1:]:
        assert abs(loss - adam[0][0]) < 1e-5
        assert max_diff(trainable, adam[0][1]) < 2e-5


def _instruct_setup():
    """A tiny instruct-stage problem: model, ClaraConfig (memory tokens 500..503), base,
    adapters with non-zero B, and one batch of 8 whose documents and prompts use every
    memory token."""
    from clara_jax.clara.config import ClaraConfig
    from clara_jax.model.config import preset
    from clara_jax.model.lora import LoraConfig
    from clara_jax.model.mistral import Mistral, init_params

    mcfg = preset("tiny", num_heads=4, num_kv_heads=2, vocab_size=512, num_layers=2)
    ccfg = ClaraConfig(doc_max_length=16, compress_rate=4, generation_top_k=2,
                       first_mem_token_id=500, lora=LoraConfig(rank=4, alpha=8, dropout=0.1))
    base = init_params(mcfg, jax.random.key(0))
    adapters = setup_lib.fresh_adapters(mcfg, ccfg.lora, jax.random.key(1))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
    rng = np.random.RandomState(0)
    b, le = 8, 16 + 3 + 4
    doc_ids = rng.randint(3, 500, (b, 2, le))
    doc_ids[..., -4:] = np.arange(500, 504)
    prompt = rng.randint(3, 500, (b, 40))
    prompt[:, 5:15] = np.tile(np.r_[500:504, 506, 500:504, 506], (b, 1))
    labels = np.where(np.arange(40) >= 30, prompt, -100)
    batch = {"doc_ids": doc_ids, "doc_mask": np.ones_like(doc_ids), "prompt_ids": prompt,
             "prompt_mask": np.ones_like(prompt), "labels": labels}
    return Mistral(mcfg, ccfg.lora), ccfg, base, adapters, batch


def test_optimize_mem_tokens_trains_only_the_memory_token_rows():
    """With optimize_mem_tokens the memory tokens' embedding rows train beside the adapters
    (official: a gradient hook keeps only mem_token_ids' rows); every other row, <AE> / <ENC> /
    <SEP> included, stays bitwise equal, and the optimizer never sees the full table."""
    from clara_jax.train import step as step_lib
    from clara_jax.train.optim import make_optimizer

    model, ccfg, base, adapters, batch = _instruct_setup()
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    table = np.asarray(base["embed_tokens"]["embedding"])

    # SGD with lr 1: the change of the rows is exactly minus their gradient.
    tx = optax.sgd(1.0)
    state = step_lib.create_train_state(base, adapters, "instruct", tx, jax.random.key(2))
    state = step_lib.train_mem_embeddings(state, ccfg, tx)
    assert state.trainable["mem_embeddings"].shape == (4, 128)
    step = jax.jit(step_lib.make_train_step(model, ccfg, "instruct", tx, dropout=False))
    new_state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 1.0
    new_base, new_adapters = step_lib.with_mem_embeddings(
        new_state.base, {**new_state.frozen, **new_state.trainable}, ccfg)
    assert "mem_embeddings" not in new_adapters
    new_table = np.asarray(new_base["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(new_table[:500], table[:500])
    np.testing.assert_array_equal(new_table[504:], table[504:])  # <AE>, <ENC>, <SEP>, rest
    grad = table[500:504] - new_table[500:504]
    assert np.all(np.abs(grad).max(axis=1) > 0), "every memory row gets a gradient"

    # The same gradient computed directly through the loss.
    from clara_jax.clara import losses

    def loss_of_rows(rows):
        b2, a2 = step_lib.with_mem_embeddings(base, {**adapters, "mem_embeddings": rows}, ccfg)
        return losses.stage_loss("instruct")(model, b2, a2, batch, ccfg)[0]

    direct = jax.jit(jax.grad(loss_of_rows))(jnp.asarray(table[500:504]))
    np.testing.assert_allclose(direct, grad, rtol=1e-4, atol=1e-7)
    # The adapters still train.
    assert not np.array_equal(np.asarray(new_adapters["decoder"]["layers"]["mlp"]["up_proj"]
                                         ["lora_a"]),
                              np.asarray(adapters["decoder"]["layers"]["mlp"]["up_proj"]["lora_a"]))

    # AdamW's state holds nothing of vocabulary size: the frozen table has no optimizer state.
    adam = make_optimizer(1e-3, 10)
    state = step_lib.train_mem_embeddings(
        step_lib.create_train_state(base, adapters, "instruct", adam, jax.random.key(2)),
        ccfg, adam)
    assert all(512 not in np.shape(x) for x in jax.tree_util.tree_leaves(state.opt_state))


def test_dcn_data_mesh_step_equals_one_device():
    """mesh.dcn_data folds slices into the data axis: (2 dcn) x (2 data, 2 fsdp, 1 tensor) on 8
    devices is a (4, 2, 1) mesh, slice-major, and gives the one-device step."""
    from clara_jax import parallel
    from clara_jax.model.mistral import logical_axes
    from clara_jax.train import step as step_lib

    mesh = parallel.make_mesh((2, 2, 1), jax.devices(), dcn_data=2)
    assert mesh.devices.shape == (4, 2, 1)
    # Slice 0 (the first 4 devices) owns the first half of the data axis.
    assert {d.id for d in mesh.devices[:2].flat} == {d.id for d in jax.devices()[:4]}
    with pytest.raises(ValueError, match="mesh dcn_data 3 does not divide the 8 devices"):
        parallel.make_mesh((-1, 1, 1), jax.devices(), dcn_data=3)
    with pytest.raises(ValueError, match=r"does not divide the 4 devices per slice \(dcn_data 2"):
        parallel.make_mesh((3, 1, 1), jax.devices(), dcn_data=2)

    model, ccfg, base, adapters, batch = _instruct_setup()
    specs = logical_axes(model.config, ccfg.lora)
    step = step_lib.make_train_step(model, ccfg, "instruct", optax.sgd(1.0), dropout=True)
    results = []
    for mesh in (parallel.make_mesh((1, 1, 1), jax.devices()[:1]), mesh):
        p = jax.device_put(base, parallel.logical_sharding(specs["params"], mesh))
        a = {n: jax.device_put(t, parallel.logical_sharding(specs["lora"], mesh))
             for n, t in adapters.items()}
        state = step_lib.create_train_state(p, a, "instruct", optax.sgd(1.0), jax.random.key(2))
        gb = {k: jax.device_put(jnp.asarray(v), parallel.batch_sharding(mesh, v.ndim))
              for k, v in batch.items()}
        with parallel.axis_rules(mesh):
            new_state, metrics = jax.jit(step)(state, gb)
        results.append((float(metrics["loss"]), jax.device_get(new_state.trainable)))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    diff = jax.tree_util.tree_map(lambda x, y: float(np.abs(x - y).max()), results[0][1],
                                  results[1][1])
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-5


def test_config_fields_of_mesh_dcn_mem_tokens_and_peak_flops():
    c = config()
    c.mesh.dcn_data, c.mesh.data, c.mesh.fsdp = 3, -1, 1
    with pytest.raises(ValueError, match="config.mesh: mesh dcn_data 3 does not divide"):
        setup_lib.validate_config(c, n_devices=8)
    c.mesh.dcn_data, c.mesh.fsdp, c.batch_size = 2, 2, 12
    with pytest.raises(ValueError, match="batch_size: 12 is not divisible by mesh dcn_data x "
                                         "data x fsdp = 8"):
        setup_lib.validate_config(c, n_devices=8)
    c.batch_size = 16
    c.optimize_mem_tokens = True
    setup_lib.validate_config(c, n_devices=8)  # no longer refused
    c.peak_flops = -1.0
    with pytest.raises(ValueError, match="config.peak_flops: must be >= 0"):
        setup_lib.validate_config(c, n_devices=8)
    c = config("configs/pretrain_base_tiny.py")
    c.optimize_mem_tokens = True
    with pytest.raises(ValueError, match="config.optimize_mem_tokens: base_lm trains every"):
        setup_lib.validate_config(c, n_devices=8)


def test_mfu_is_model_flops_over_the_peak_of_every_device():
    assert metrics_lib.mfu(4e12, 0.0) == {}
    n = jax.device_count()
    assert metrics_lib.mfu(4e12, 1e12) == {"mfu": pytest.approx(4.0 / n)}


def test_lora_dropout_mask_has_no_structure():
    """The hashed keep-mask behaves as independent Bernoulli draws: the rate holds at 0.1 and
    0.5 and per row, neighbouring elements, neighbouring rows, the same element under two
    keys and two leading axes are uncorrelated (|r| below 5 standard errors), and a row of
    2^32 elements is refused before anything is allocated."""
    from clara_jax.model import lora
    for rate in (0.1, 0.5):
        m = np.asarray(lora.dropout_keep_mask((2048, 1024), rate, jax.random.key(3)), float)
        assert abs(m.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / m.size)
        per_row = m.mean(axis=1)          # 1024 draws a row: rows are not offset copies
        assert per_row.std() < 1.5 * np.sqrt(rate * (1 - rate) / m.shape[1])
        se = 5 / np.sqrt(m.size)
        assert abs(np.corrcoef(m[:, :-1].ravel(), m[:, 1:].ravel())[0, 1]) < se
        assert abs(np.corrcoef(m[:-1].ravel(), m[1:].ravel())[0, 1]) < se
        other = np.asarray(lora.dropout_keep_mask((2048, 1024), rate, jax.random.key(4)), float)
        assert abs(np.corrcoef(m.ravel(), other.ravel())[0, 1]) < se
    m3 = np.asarray(lora.dropout_keep_mask((16, 128, 256), 0.1, jax.random.key(5)), float)
    assert abs(np.corrcoef(m3[:-1].ravel(), m3[1:].ravel())[0, 1]) < 5 / np.sqrt(m3.size)
    with pytest.raises(ValueError, match="shorter than 2\\^32"):
        lora.dropout_keep_mask((1, 2**32), 0.1, jax.random.key(0))


def test_lora_dropout_rate_scale_and_use():
    """LoRA dropout zeroes 10% of the adapter input and scales the rest by 1/0.9;
    Linear applies it only when not deterministic, with the `dropout` rng."""
    from clara_jax.model import lora
    x = jnp.ones((1000, 512))
    y = np.asarray(lora.dropout(x, 0.1, jax.random.key(0)))
    assert abs((y == 0).mean() - 0.1) < 0.003  # 512,000 draws: 7 standard deviations
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.9], rtol=1e-6)
    np.testing.assert_array_equal(y, np.asarray(lora.dropout(x, 0.1, jax.random.key(0))))
    assert not np.array_equal(y, np.asarray(lora.dropout(x, 0.1, jax.random.key(1))))
    assert lora.dropout(x, 0.0, jax.random.key(0)) is x
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    layer = lora.Linear((8,), ("embed", "mlp"), lora=cfg, name="q_proj")
    xs = jax.random.normal(jax.random.key(3), (16, 8))
    v = layer.init(jax.random.key(4), xs)
    v = {**v, "lora": jax.tree_util.tree_map(lambda t: t + 0.5, v["lora"])}  # B != 0
    train = lora.Linear((8,), ("embed", "mlp"), lora=cfg, deterministic=False, name="q_proj")
    a = train.apply(v, xs, rngs={"dropout": jax.random.key(5)})
    b = train.apply(v, xs, rngs={"dropout": jax.random.key(6)})
    det = layer.apply(v, xs)
    assert not np.allclose(a, b) and not np.allclose(a, det)
    # Unbiased: over 4,000 masks the mean is the deterministic output within 5 standard
    # errors.
    outs = jax.vmap(lambda k: train.apply(v, xs, rngs={"dropout": k}))(
        jax.random.split(jax.random.key(7), 4000))
    err = np.asarray(jnp.abs(outs.mean(0) - det))
    assert np.all(err < 5 * np.asarray(outs.std(0)) / np.sqrt(4000))


def test_query_reasoner_starts_from_the_encoder_weakened_on_request():
    """initial_query_reasoner: "auto" (official) copies the encoder for a start whose query
    reasoner is absent or untrained (B = 0) and keeps a trained one; "keep" keeps an untrained
    one; "encoder" copies the encoder's adapter with its LoRA B scaled (A untouched)."""
    enc = {"layer": {"q_proj": {"lora_a": jnp.ones((2, 3)), "lora_b": jnp.full((3, 2), 2.0)}}}
    cold = {"layer": {"q_proj": {"lora_a": jnp.full((2, 3), 3.0), "lora_b": jnp.zeros((3, 2))}}}
    own = jax.tree_util.tree_map(lambda x: x + 1.0, cold)   # trained: B != 0
    c = config("configs/end_to_end.py")
    assert c.end_to_end.query_reasoner_init == "auto"
    kept = setup_lib.initial_query_reasoner(c, {"encoder": enc, "query_reasoner": own})
    assert kept["query_reasoner"] is own
    warm = setup_lib.initial_query_reasoner(c, {"encoder": enc, "query_reasoner": cold})
    for name in ("lora_a", "lora_b"):   # the encoder's, not the cold A
        np.testing.assert_array_equal(warm["query_reasoner"]["layer"]["q_proj"][name],
                                      enc["layer"]["q_proj"][name])
    c.end_to_end.query_reasoner_init = "keep"
    assert setup_lib.initial_query_reasoner(
        c, {"encoder": enc, "query_reasoner": cold})["query_reasoner"] is cold
    c.end_to_end.query_reasoner_init = "encoder"
    c.end_to_end.query_reasoner_init_scale = 0.25
    weak = setup_lib.initial_query_reasoner(c, {"encoder": enc, "query_reasoner": own})
    q = weak["query_reasoner"]["layer"]["q_proj"]
    np.testing.assert_array_equal(q["lora_a"], enc["layer"]["q_proj"]["lora_a"])
    np.testing.assert_array_equal(q["lora_b"], 0.5 * np.ones((3, 2)))
    assert weak["encoder"] is enc
    c = config("configs/end_to_end.py")
    copied = setup_lib.initial_query_reasoner(c, {"encoder": enc})
    np.testing.assert_array_equal(copied["query_reasoner"]["layer"]["q_proj"]["lora_b"],
                                  enc["layer"]["q_proj"]["lora_b"])
    c.end_to_end.query_reasoner_init = "decoder"
    with pytest.raises(ValueError, match=r"query_reasoner_init: must be one of \('auto', "
                                         r"'encoder', 'keep'\), got 'decoder'"):
        setup_lib.initial_query_reasoner(c, {"encoder": enc})


@pytest.mark.parametrize("field,value,message", [
    ("lora_alpha", -1.0, "lora_alpha: must be positive"),
    ("lora_dropout", 1.0, r"lora_dropout: must be in \[0, 1\)"),
])
def test_lora_fields_are_validated(field, value, message):
    c = config()
    c[field] = value
    with pytest.raises(ValueError, match=message):
        setup_lib.validate_config(c, n_devices=8)


@pytest.mark.slow
def test_lora_alpha_and_dropout_fields_change_the_trained_adapters(tmp_path):
    """config.lora_alpha and config.lora_dropout reach the model: the exported adapters
    record them, and three steps from the same start give other adapters with either
    changed; the default is the official alpha = 2r, dropout 0.1."""
    from clara_jax import Clara
    runs = {"default": {}, "alpha": {"lora_alpha": 2.0}, "dropout": {"lora_dropout": 0.0}}
    models = {}
    for name, extra in runs.items():
        tiny_run(tmp_path / name, "configs/pretrain.py", 3, learning_rate=1e-3,
                 doc_max_length=32, max_len=256, lora_rank=4, **extra)
        models[name] = Clara.load(str(tmp_path / name))
    lora = {n: m.config.lora for n, m in models.items()}
    assert (lora["default"].alpha, lora["default"].dropout) == (8.0, 0.1)   # 2 x rank 4
    assert lora["alpha"].alpha == 2.0 and lora["dropout"].dropout == 0.0
    flat = {n: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
        m.adapters["encoder"])]) for n, m in models.items()}
    assert not np.allclose(flat["default"], flat["alpha"])
    assert not np.allclose(flat["default"], flat["dropout"])


def test_every_step_shares_the_non_finite_guard():
    """`step.apply_if_finite`, used by the CLaRa stages' step and the base-LM step: a finite
    loss and gradient apply the update; a non-finite one keeps trainable and optimizer
    state as they were and reports finite False."""
    from clara_jax.train import step as step_lib
    tx = optax.sgd(0.5)
    trainable = {"w": jnp.ones((2,))}
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), base={}, trainable=trainable,
                                frozen={}, opt_state=tx.init(trainable), rng=jax.random.key(0))
    new, _, norm, finite = step_lib.apply_if_finite(state, {"w": jnp.full((2,), 2.0)},
                                                    jnp.float32(1.0), tx)
    assert bool(finite) and float(norm) == pytest.approx(8 ** 0.5)
    np.testing.assert_array_equal(new["w"], [0.0, 0.0])
    for grads, loss in (({"w": jnp.array([1.0, jnp.nan])}, jnp.float32(1.0)),
                        ({"w": jnp.ones((2,))}, jnp.float32(jnp.inf))):
        new, _, _, finite = step_lib.apply_if_finite(state, grads, loss, tx)
        assert not bool(finite)
        np.testing.assert_array_equal(new["w"], [1.0, 1.0])


@pytest.mark.slow
def test_end_to_end_can_train_the_query_reasoner_alone(tmp_path):
    """end_to_end.train_decoder=False: stage 3 trains only the query reasoner, from the
    generator's loss; the decoder adapter stays as it started (fresh LoRA B = 0, bitwise),
    while by default (official) both learn."""
    from clara_jax import Clara

    c = config("configs/end_to_end.py")
    assert setup_lib.trainable_adapters(c) == ("query_reasoner", "decoder")
    c.end_to_end.train_decoder = False
    assert setup_lib.trainable_adapters(c) == ("query_reasoner",)
    b_norm = {}
    for train_decoder in (False, True):
        wd = tmp_path / f"decoder_{train_decoder}"
        tiny_run(wd, "configs/end_to_end.py", 2, learning_rate=1e-2, doc_max_length=32,
                 max_len=256, num_candidates=4, generation_top_k=2, temperature=0.1,
                 **{"end_to_end.train_decoder": train_decoder})
        adapters = Clara.load(str(wd)).adapters
        b_norm[train_decoder] = {
            name: sum(float(np.abs(x).sum()) for path, x in
                      jax.tree_util.tree_leaves_with_path(adapters[name])
                      if "lora_b" in jax.tree_util.keystr(path))
            for name in ("decoder", "query_reasoner")}
    assert b_norm[False]["decoder"] == 0.0 and b_norm[False]["query_reasoner"] > 0
    assert b_norm[True]["decoder"] > 0 and b_norm[True]["query_reasoner"] > 0
