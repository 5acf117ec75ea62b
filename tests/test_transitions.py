"""The official stage transitions and stage defaults (configs/common.py; docs/training.md,
"Official stage transitions and defaults"): stage 1 trains the memory-token embedding rows
and nothing else of the table, later stages none of it; instruct starts a fresh decoder
adapter over stage 1's encoder (or keeps stage 1's decoder); end_to_end starts its query
reasoner as a copy of the encoder (or keeps the cold one); the constant schedule; the 7B
stage configs' official values."""

import jax
import numpy as np
import pytest

from clara_jax import Clara, parallel
from clara_jax.model.config import preset
from clara_jax.model.mistral import Mistral
from clara_jax.train import setup as setup_lib
from clara_jax.train.optim import learning_rate_schedule
from clara_jax.train.start import load_start, run_tokenizer
from config_files import load_config
from test_train import tiny_run

COMMON = dict(max_len=192, doc_max_length=16, num_candidates=4, generation_top_k=2,
              learning_rate=1e-2)


def start_state(stage_file: str, init_from: str, workdir, **overrides):
    """The train state a run of `stage_file` from `init_from` starts with (step 0, before any
    update): what `train` builds, without its data."""
    c = load_config(stage_file, init_from=init_from, **{**COMMON, **overrides})
    setup_lib.validate_config(c)
    start = load_start(c, str(workdir), lambda: [])
    tok = run_tokenizer(c, start["tokenizer_path"])
    run = setup_lib.build_run(c, parallel.mesh_from_config(c.mesh), start["model_cfg"],
                              tok.base_vocab_size, start["params"], start["adapters"])
    return jax.device_get(run.state)


def lora_b(tree: dict) -> list[np.ndarray]:
    return [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if jax.tree_util.keystr(path).endswith("['lora_b']")]


def assert_same(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A two-step pretrain run from scratch with the official defaults (its adapters trained,
    B != 0): (its work directory, the saved model)."""
    root = tmp_path_factory.mktemp("transitions")
    tiny_run(root / "s1", "configs/pretrain.py", 2, **COMMON)
    return root / "s1", Clara.load(str(root / "s1"))


@pytest.mark.slow
def test_pretrain_trains_the_memory_rows_only_and_instruct_none(stage1, tmp_path):
    """Official: stage 1 trains the <MEM> embedding rows (a gradient hook keeps only
    mem_token_ids' rows) and later stages re-freeze the table: pretrain changes exactly the
    memory rows of the embedding (not <AE>/<ENC>/<SEP>, not lm_head); instruct and end_to_end
    train none of it."""
    workdir, s1 = stage1
    assert load_config("configs/pretrain.py").optimize_mem_tokens
    start = start_state("configs/pretrain.py", "", workdir)   # what s1 started from
    assert start.trainable["mem_embeddings"].shape == (s1.config.n_mem, 128)
    first, n = s1.config.first_mem_token_id, s1.config.n_mem
    e0 = np.asarray(start.base["embed_tokens"]["embedding"])
    e1 = np.asarray(s1.params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(e1[:first], e0[:first])
    np.testing.assert_array_equal(e1[first + n:], e0[first + n:])
    assert np.all(np.abs(e1[first:first + n] - e0[first:first + n]).max(axis=1) > 0)
    np.testing.assert_array_equal(s1.params["lm_head"]["kernel"],
                                  start.base["lm_head"]["kernel"])
    for stage in ("instruct", "end_to_end"):
        assert not load_config(f"configs/{stage}.py").optimize_mem_tokens
        state = start_state(f"configs/{stage}.py", str(workdir), tmp_path)
        assert set(state.trainable) == set(setup_lib.TRAINABLE_ADAPTERS[stage]), stage
        np.testing.assert_array_equal(state.base["embed_tokens"]["embedding"], e1)


@pytest.mark.slow
@pytest.mark.parametrize("decoder_init", ["fresh", "keep"])
def test_instruct_starts_a_fresh_decoder_over_the_stage1_encoder(stage1, tmp_path,
                                                                 decoder_init):
    """Official stage1_2: the stage-1 decoder adapter is dropped for a new one (A random,
    B = 0), the encoder adapter kept; instruct.decoder_init="keep" keeps stage 1's decoder."""
    workdir, s1 = stage1
    assert all(np.any(b) for b in lora_b(s1.adapters["decoder"]))   # stage 1 trained it
    state = start_state("configs/instruct.py", str(workdir), tmp_path,
                        **{"instruct.decoder_init": decoder_init})
    assert_same(state.trainable["encoder"], s1.adapters["encoder"])
    decoder = state.trainable["decoder"]
    if decoder_init == "keep":
        assert_same(decoder, s1.adapters["decoder"])
    else:
        assert all(not np.any(b) for b in lora_b(decoder))
        a = decoder["layers"]["mlp"]["up_proj"]["lora_a"]
        assert np.std(a) > 0 and not np.array_equal(
            a, s1.adapters["decoder"]["layers"]["mlp"]["up_proj"]["lora_a"])
    assert "mem_embeddings" not in state.trainable


@pytest.mark.slow
@pytest.mark.parametrize("init", ["auto", "keep"])
def test_end_to_end_query_reasoner_starts_as_the_encoder(stage1, tmp_path, init):
    """Official stage2 from a stage-1 / 1_2 checkpoint (which has no query reasoner): the
    query reasoner is a copy of the encoder adapter at step 0; ours carry an untrained one
    (B = 0), which "auto" (the default) treats the same; "keep" starts from that cold one."""
    workdir, s1 = stage1
    assert all(not np.any(b) for b in lora_b(s1.adapters["query_reasoner"]))
    assert load_config("configs/end_to_end.py").end_to_end.query_reasoner_init == "auto"
    state = start_state("configs/end_to_end.py", str(workdir), tmp_path,
                        **{"end_to_end.query_reasoner_init": init})
    assert_same(state.frozen["encoder"], s1.adapters["encoder"])
    assert_same(state.trainable["decoder"], s1.adapters["decoder"])   # kept, as officially
    want = s1.adapters["encoder"] if init == "auto" else s1.adapters["query_reasoner"]
    assert_same(state.trainable["query_reasoner"], want)


def test_constant_schedule_is_the_peak_at_every_step():
    """lr_schedule="constant" (official stage 2, `--lr_scheduler constant`): the peak rate
    from step 0 on, no warmup, no decay; "cosine" warms up from 0 and ends at min_lr_ratio."""
    constant = learning_rate_schedule(5e-6, 100, warmup_ratio=0.03, min_lr_ratio=0.1,
                                      kind="constant")
    np.testing.assert_array_equal([float(constant(s)) for s in range(101)], [5e-6] * 101)
    cosine = learning_rate_schedule(5e-6, 100, 0.03, 0.1, kind="cosine")
    assert float(cosine(0)) == 0.0 and float(cosine(3)) == pytest.approx(5e-6)
    assert float(cosine(100)) == pytest.approx(5e-7)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        learning_rate_schedule(1e-4, 100, kind="linear")


def test_the_7b_stage_configs_carry_the_official_values():
    """scripts/train_pretraining.sh, train_instruction_tuning.sh, train_stage_end_to_end.sh
    (and train_sft.py's defaults): the run's optimizer schedule follows the config."""
    official = {
        "pretrain": dict(learning_rate=1e-4, batch_size=128, max_len=2048,
                         lr_schedule="cosine", optimize_mem_tokens=True, pretrain_k=1),
        "instruct": dict(learning_rate=1e-4, batch_size=128, max_len=2048,
                         lr_schedule="cosine", optimize_mem_tokens=False, generation_top_k=5),
        "end_to_end": dict(learning_rate=5e-6, batch_size=32, max_len=1024,
                           lr_schedule="constant", optimize_mem_tokens=False,
                           generation_top_k=5),
    }
    for stage, values in official.items():
        c = load_config(f"configs/{stage}.py", "model=mistral_7b")
        got = {k: c[k] for k in values}
        assert got == values, stage
        assert (c.doc_max_length, c.compress_rate, c.warmup_ratio, c.min_lr_ratio, c.b1, c.b2,
                c.max_grad_norm, c.weight_decay, c.lora_rank) == (256, 32, 0.03, 0.1, 0.9,
                                                                   0.95, 1.0, 0.0, 16)
        assert c.instruct.decoder_init == "fresh"
        assert c.end_to_end.query_reasoner_init == "auto"
    # The run's schedule (the one its optimizer and logged learning_rate use).
    c = load_config("configs/end_to_end.py", "model=mistral_7b", total_steps=50)
    model_cfg, cfg = setup_lib.model_configs(c, preset(c.model), 32000)
    mesh = parallel.mesh_from_config(c.mesh)
    setup = setup_lib.make_step_setup(c, Mistral(model_cfg, cfg.lora), cfg, mesh)
    assert {float(setup.schedule(s)) for s in (0, 1, 25, 50)} == {5e-6}


@pytest.mark.parametrize("field,value", [("lr_schedule", "linear"),
                                         ("instruct.decoder_init", "random"),
                                         ("end_to_end.query_reasoner_init", "")])
def test_transition_fields_are_validated(field, value):
    c = load_config("configs/end_to_end.py", **{field: value})
    with pytest.raises(ValueError, match=f"config.{field}: must be one of"):
        setup_lib.validate_config(c, n_devices=8)
