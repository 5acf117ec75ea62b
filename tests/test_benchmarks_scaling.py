"""benchmarks/scaling.py at a toy size: the trainer's step measured per sweep point, memory
that grows with the work, the table and the plot."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import scaling  # noqa: E402

TOY = dict(model="tiny", batch=2, candidates=4, k=2, doc_max_length=32, compress_rate=8,
           prompt_len=96, answer_len=16)


@pytest.fixture(scope="module")
def rows():
    return scaling.cpu_sweep(TOY, {"candidates": (2, 4), "doc_max_length": (16, 32)}, reps=1,
                             pretrain_factors=("doc_max_length",), cached=True)


def by(rows, factor, stage, candidates):
    return {r["value"]: r for r in rows
            if (r["factor"], r["stage"], r["candidates"]) == (factor, stage, candidates)}


# The sweep compiles 8 toy steps: about 1 minute on an idle 2-core CPU, 6 under load.
@pytest.mark.slow
def test_memory_and_time_grow_with_the_work(rows):
    assert all(r["s/step"] > 0 and r["compile_s"] > 0 for r in rows)
    # Uncached, the step compresses B x N candidates: twice the candidates, more temporaries.
    cand = by(rows, "candidates", "end_to_end", "compressed in step")
    assert cand[4]["temp_bytes"] > cand[2]["temp_bytes"]
    # Cached, the candidates are arguments: a float32 table [B x N, n, D] and int32 rows [B, N].
    cached = by(rows, "candidates", "end_to_end", "cached")
    n_mem, hidden, more = TOY["doc_max_length"] // TOY["compress_rate"], 128, TOY["batch"] * 2
    assert (cached[4]["argument_bytes"] - cached[2]["argument_bytes"]
            == more * n_mem * hidden * 4 + more * 4)
    # Longer documents: more encoder activations in both stages.
    for stage, mode in (("end_to_end", "compressed in step"), ("pretrain", "-")):
        doc = by(rows, "doc_max_length", stage, mode)
        assert doc[32]["peak_bytes"] > doc[16]["peak_bytes"]
    # The base point (4 candidates, 32 tokens) is measured once and shared by both factors.
    assert by(rows, "doc_max_length", "end_to_end", "cached")[32]["secs"] is cached[4]["secs"]


@pytest.mark.slow
def test_table_and_plot(rows, tmp_path):
    text = scaling.cpu_table(rows)
    for factor in ("candidates", "doc_max_length"):
        assert f"| {factor} |" in text
    assert text.count("\n") == len(rows) + 1
    path = str(tmp_path / "scaling.png")
    scaling.plot(rows, [], path)
    assert os.path.getsize(path) > 10_000


def test_run_config_names_bad_points():
    with pytest.raises(ValueError, match="generation_top_k"):
        scaling.run_config({**TOY, "k": 5}, "end_to_end")
    with pytest.raises(ValueError, match="prompt_len"):
        scaling.run_config({**TOY, "k": 4, "compress_rate": 2}, "end_to_end")


def test_extra_presets_are_scoped():
    from clara_jax.model.config import PRESETS, preset
    with scaling.extra_presets(scaling.EXTRA_MODELS):
        assert 0.9e9 < preset("mistral_1b").num_params < 1.3e9
        assert 2.5e9 < preset("mistral_3b").num_params < 3.5e9
        assert preset("mistral_3b").param_dtype == "bfloat16"
    assert "mistral_1b" not in PRESETS
