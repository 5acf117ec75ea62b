"""The compression-rate sweep: config arguments, validation before training, and a real
two-rate sweep on the tiny model with its table."""

import json
import os
import subprocess
import sys

import pytest

from clara_jax.train import sweep
from config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_config(arg=""):
    return load_config("configs/sweeps/compression_rate.py", arg)


def test_config_arguments_and_one_run_config_per_rate():
    c = sweep_config("stage=instruct,rates=4,16,model=tiny")
    assert c.sweep_compress_rates == (4, 16) and c.stage == "instruct"
    assert c.doc_max_length == 128  # tiny default, a multiple of the official 4..128 rates
    assert sweep_config("rates=8/32").sweep_compress_rates == (8, 32)
    assert sweep_config().sweep_compress_rates == (4, 16, 32, 128)
    runs = sweep.sweep_configs(c)
    assert [(r, run.compress_rate, run.doc_max_length // run.compress_rate)
            for r, run in runs] == [(4, 4, 32), (16, 16, 8)]
    assert all(sweep.RATES_FIELD not in run for _, run in runs)
    assert c.compress_rate == 4  # the sweep config is itself a valid run config


def test_doc_max_length_must_be_a_multiple_of_every_rate():
    c = sweep_config("rates=4,16,32,128,doc_max_length=64")
    with pytest.raises(ValueError, match=r"config.doc_max_length: 64 is not a multiple of the "
                                         r"compression rates \[128\] \(use a multiple of 128\)"):
        sweep.sweep_configs(c)
    c = sweep_config("rates=4,4")
    with pytest.raises(ValueError, match="sweep_compress_rates: rates must be positive and "
                                         "distinct"):
        sweep.sweep_configs(c)
    with pytest.raises(FileNotFoundError, match="not a sweep directory"):
        sweep.tabulate(ROOT)


@pytest.mark.slow
def test_two_rate_sweep_on_the_tiny_model_and_its_table(tmp_path):
    """`python -m clara_jax.train.sweep` at rates 4 and 8 (stage 1, 3 steps each), then
    `python -m clara_jax.train.sweep_table`: one row per rate with that run's final metrics."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    work = tmp_path / "sweep"

    def cli(module, *args):
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    cli("clara_jax.train.sweep",
        "--config=configs/sweeps/compression_rate.py:stage=pretrain,rates=4,8,doc_max_length=16",
        f"--workdir={work}", "--config.total_steps=3", "--config.batch_size=4",
        "--config.max_len=192", "--config.log_every=1", "--config.eval_every=3",
        "--config.eval_batches=1", "--config.data.synthetic_entities=40")
    assert sorted(os.listdir(work)) == ["rate_4", "rate_8", "sweep_table.json", "sweep_table.md"]
    for r in (4, 8):
        assert json.load(open(work / f"rate_{r}" / "config.json"))["compress_rate"] == r
    os.remove(work / "sweep_table.md")
    out = cli("clara_jax.train.sweep_table", f"--workdir={work}")
    rows = json.load(open(work / "sweep_table.json"))
    assert [(r["compress_rate"], r["n_mem"], r["steps"]) for r in rows] == [(4, 4, 3), (8, 2, 3)]
    for row in rows:
        last = json.load(open(work / f"rate_{row['compress_rate']}" / "summary.json"))["last"]
        assert row["loss"] == last["loss"] and row["eval_loss"] == last["eval_loss"]
    table = (work / "sweep_table.md").read_text()
    assert table in out
    assert table.splitlines()[0].startswith("| compress_rate | memory tokens | stage | steps | "
                                            "loss |")
    assert f"| 8 | 2 | pretrain | 3/3 | {rows[1]['loss']:.4f} |" in table
    # Finished runs are skipped when the sweep is run again.
    again = cli("clara_jax.train.sweep",
                "--config=configs/sweeps/compression_rate.py:rates=4,8,doc_max_length=16",
                f"--workdir={work}", "--config.total_steps=3")
    assert again.count("finished earlier") == 2
    # notebooks/compression_ablation.ipynb reads this sweep, evaluates each rate, plots.
    from tests.test_notebooks import outputs, run_notebook
    nb = run_notebook("compression_ablation.ipynb", {"CLARA_ROOT": ROOT, "SWEEP_DIR": str(work),
                                                     "EVAL_LIMIT": "8"}, tmp_path)
    text = outputs(nb)
    assert "| 4x | normal |" in text and "| 8x | normal |" in text
    assert "rates: [4, 8]" in text and (work / "ablation.png").stat().st_size > 1000


def test_table_has_a_row_per_rate_and_recall_columns_when_reported(tmp_path):
    """The table mirrors each run's config.json / summary.json (stage-3-like runs report
    recall@k); an unfinished run shows its step count and leaves missing metrics empty."""
    for rate, steps, last in [(16, 10, {"loss": 1.5, "recall@1": 0.25, "recall@5": 0.75,
                                        "eval_loss": 1.75}),
                              (4, 7, {"loss": 2.0})]:
        run = tmp_path / f"rate_{rate}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps(
            {"compress_rate": rate, "doc_max_length": 64, "stage": "end_to_end",
             "total_steps": 10}))
        (run / "summary.json").write_text(json.dumps({"steps": steps, "last": last}))
    (tmp_path / "rate_32").mkdir()  # no config.json yet: not a run
    out = sweep.write_table(str(tmp_path))
    assert [(r["compress_rate"], r["n_mem"], r["steps"]) for r in out["rows"]] == [
        (4, 16, 7), (16, 4, 10)]
    lines = (tmp_path / "sweep_table.md").read_text().splitlines()
    assert lines[0] == ("| compress_rate | memory tokens | stage | steps | loss | recall@1 | "
                        "eval_loss | recall@5 |")
    assert lines[2] == "| 4 | 16 | end_to_end | 7/10 | 2.0000 |  |  |  |"
    assert lines[3] == "| 16 | 4 | end_to_end | 10/10 | 1.5000 | 0.2500 | 1.7500 | 0.7500 |"
    assert json.load(open(tmp_path / "sweep_table.json")) == out["rows"]
