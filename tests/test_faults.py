"""How training fails: a diverged run (dead gradient, loss at chance, unbounded or non-finite
parameters, too many skipped steps) raises DivergenceError and exports nothing; SIGTERM saves
and exits 75, and the resumed run equals an uninterrupted one; metrics.jsonl holds each step
once after a resume; every command-line failure is one line with its exit status."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from clara_jax import errors
from clara_jax.train import divergence
from clara_jax.train import metrics as metrics_lib
from clara_jax.train import train as train_lib
from config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny base-LM run of the CLI tests (and its in-process twin, `base_config`).
CLI_ARGS = ["--config=configs/pretrain_base_tiny.py:steps=12", "--config.batch_size=8",
            "--config.max_len=64", "--config.log_every=1", "--config.checkpoint_every=3",
            "--config.eval_every=1000", "--config.data.synthetic_entities=40",
            "--config.vocab_size=400"]
ENV = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_MAX_="0",
           MALLOC_TRIM_THRESHOLD_=str(4 << 30))   # no cpu_malloc note on stderr


def cli(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "clara_jax", "train", *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)


def cli_result(*args) -> tuple[int, list[str]]:
    proc = cli(*args)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.splitlines()


def base_config(steps=12, **overrides) -> ml_collections.ConfigDict:
    c = load_config("configs/pretrain_base_tiny.py", f"steps={steps}")
    c.update_from_flattened_dict({"batch_size": 8, "max_len": 64, "log_every": 1,
                                  "checkpoint_every": 3, "eval_every": 1000,
                                  "data.synthetic_entities": 40, "vocab_size": 400,
                                  **overrides})
    return c


# -- the checks themselves (no training) ---------------------------------------------------

def guard(config="configs/pretrain.py", **overrides):
    c = load_config(config)
    c.total_steps, c.warmup_ratio = 100, 0.1
    c.update_from_flattened_dict(overrides)
    return divergence.Guard(c, vocab_size=400, first_step=0)


def test_dead_gradient_trips_after_its_rows_in_a_row():
    g = guard()
    for step, norm in ((1, 0.0), (2, 0.0), (3, 0.5), (4, 0.0), (5, 0.0)):
        g.row(step, {"grad_norm": norm, "loss": 3.0})   # never 3 zeros in a row
    with pytest.raises(errors.DivergenceError, match=r"step 6: grad norm exactly 0 at 3 log "):
        g.row(6, {"grad_norm": 0.0, "loss": 3.0})


def test_loss_at_chance_trips_only_after_warmup_and_when_stuck():
    chance = math.log(400)
    g = guard()
    for step in range(1, 11):       # the warm-up (10 steps): a fresh model sits at chance
        g.row(step, {"grad_norm": 1.0, "ce_loss": chance, "loss": 9.0})
    for step in range(11, 15):      # then 4 rows at chance: not yet 5
        g.row(step, {"grad_norm": 1.0, "ce_loss": chance + 5e-4, "loss": 9.0})
    g.row(15, {"grad_norm": 1.0, "ce_loss": chance - 0.01, "loss": 9.0})   # it moved: reset
    for step in range(16, 20):
        g.row(step, {"grad_norm": 1.0, "ce_loss": chance, "loss": 9.0})
    with pytest.raises(errors.DivergenceError, match=r"step 20: loss 5.99\d+ within 0.001 of "
                                                     r"ln\(vocabulary\) = 5.991465"):
        g.row(20, {"grad_norm": 1.0, "ce_loss": chance, "loss": 9.0})


def test_the_chance_check_reads_the_next_token_loss():
    """The CLaRa stages' ce_loss (their loss adds the MSE term), the base LM's loss; a
    stage without a next-token loss (retrieval pretraining) is never at chance."""
    chance = math.log(400)
    for config, row in (("configs/pretrain_base_tiny.py", {"loss": chance}),
                        ("configs/pretrain.py", {"ce_loss": chance, "loss": 9.0})):
        g = guard(config, **{"divergence.chance_rows": 1})
        g.row(11, {"grad_norm": 1.0, **row})   # the first chance_rows rows never count
        with pytest.raises(errors.DivergenceError, match="ln\\(vocabulary\\)"):
            g.row(12, {"grad_norm": 1.0, **row})
    g = guard("configs/retrieval_pretrain.py", **{"divergence.chance_rows": 1})
    for step in range(11, 20):
        g.row(step, {"grad_norm": 1.0, "loss": chance})


def test_parameters_must_be_finite_and_bounded():
    g = guard(**{"divergence.max_abs_param": 100.0})
    g.params(1, {"a": np.full((3,), -99.0, np.float32), "b": {"c": np.zeros((2, 2))}})
    with pytest.raises(errors.DivergenceError, match=r"step 2: max \|parameter\| = 101 "):
        g.params(2, {"a": np.array([1.0, -101.0], np.float32)})
    with pytest.raises(errors.DivergenceError, match=r"step 3: max \|parameter\| = nan"):
        g.params(3, {"a": np.array([1.0, np.nan], np.float32)})


def test_skipped_fraction_is_checked_past_a_minimum_and_at_the_end():
    g = guard(max_skipped_fraction=0.1)
    g.skips(10, 5, final=False)                   # too few steps to judge yet
    g.skips(40, 4, final=False)                   # 10%: allowed
    with pytest.raises(errors.DivergenceError, match=r"5 of 40 steps skipped"):
        g.skips(40, 5, final=False)
    with pytest.raises(errors.DivergenceError, match=r"2 of 6 steps skipped"):
        guard().skips(6, 2, final=True)


def test_new_config_fields_are_validated():
    from clara_jax.train.setup import validate_config
    for field, value, message in (("max_skipped_fraction", 1.5, "max_skipped_fraction: must "),
                                  ("divergence.zero_grad_rows", -1, "zero_grad_rows: must be"),
                                  ("divergence.max_abs_param", 0.0, "max_abs_param: must be")):
        c = load_config("configs/pretrain.py", **{field: value})
        with pytest.raises(ValueError, match=message):
            validate_config(c, n_devices=8)


def test_metrics_log_drops_the_rows_a_resume_runs_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')   # a row cut short by a crash
    log = metrics_lib.MetricsLog(str(tmp_path), first_step=3, total_steps=10)
    assert [json.loads(l)["step"] for l in open(path)] == [1, 2, 3]
    log.train({"step": 4, "loss": 0.5})
    log.close()
    assert [json.loads(l)["step"] for l in open(path)] == [1, 2, 3, 4]


# -- tiny runs -----------------------------------------------------------------------------

def test_huge_learning_rate_never_checkpoints_its_weights(tmp_path):
    """lr 1e38: step 1 makes weights of ~1e38 (still finite). They are not saved as a 'last
    good checkpoint': the run stops there, naming the step, and exports nothing."""
    wd = tmp_path / "run"
    with pytest.raises(errors.DivergenceError, match=r"diverged at step 1: max \|parameter\|"):
        train_lib.train(base_config(learning_rate=1e38, checkpoint_every=1), str(wd))
    assert not (wd / "checkpoints").exists() or not os.listdir(wd / "checkpoints")
    assert not (wd / "model").exists()
    summary = json.load(open(wd / "summary.json"))
    assert summary["diverged"].startswith("diverged at step 1: max |parameter|")


def test_skipping_most_steps_is_a_divergence(tmp_path):
    """on_nonfinite=skip with lr 1e38: every step after the first is non-finite and skipped;
    more than max_skipped_fraction of them fails the run (no model) and summary.json counts
    them."""
    wd = tmp_path / "run"
    c = base_config(steps=6, learning_rate=1e38, on_nonfinite="skip", log_every=1000,
                    checkpoint_every=1000, **{"divergence.max_abs_param": 3e38})
    with pytest.raises(errors.DivergenceError, match=r"diverged at step 6: 5 of 6 steps "
                                                     r"skipped .* max_skipped_fraction=0.1"):
        train_lib.train(c, str(wd))
    summary = json.load(open(wd / "summary.json"))
    assert summary["skipped_steps"] == 5 and "diverged" in summary
    assert not (wd / "model").exists()


def test_dead_gradient_run_exits_4_with_one_line_and_no_model(tmp_path):
    """lr 1e3: the gradient dies at step 2 and the loss sits at ln(400); before, the run
    ended with exit 0 and exported the dead model."""
    wd = tmp_path / "run"
    rc, err = cli_result(f"--workdir={wd}", *CLI_ARGS, "--config.learning_rate=1e3")
    assert rc == errors.EXIT_DIVERGED, err
    assert len(err) == 1 and err[0].startswith("train: diverged at step "), err
    assert "grad norm exactly 0 at 3 log rows" in err[0]
    assert not (wd / "model").exists()
    assert "grad norm exactly 0" in json.load(open(wd / "summary.json"))["diverged"]


@pytest.mark.slow   # ~2.5 min on one core: three compiles of the tiny run
def test_sigterm_exits_75_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = ([a.replace("steps=12", "steps=40") for a in CLI_ARGS]
            + ["--config.checkpoint_every=100"])
    wd = tmp_path / "b"
    proc = cli(f"--workdir={wd}", *args)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (
            metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_PREEMPTED, err
    err = err.splitlines()
    assert len(err) == 1 and "preempted (SIGTERM) at step" in err[0], err
    stopped = json.load(open(wd / "summary.json"))["steps"]
    assert 2 <= stopped < 40 and "model_dir" not in json.load(open(wd / "summary.json"))
    c = base_config(steps=40, checkpoint_every=100)
    resumed = train_lib.train(c, str(wd))
    reference = train_lib.train(c, str(tmp_path / "a"))
    assert resumed["steps"] == reference["steps"] == 40
    steps = [json.loads(l)["step"] for l in open(metrics)]
    assert steps == list(range(1, 41))   # each step once
    from clara_jax.clara.formats.hf_mistral import load_checkpoint
    _, a = load_checkpoint(reference["model_dir"])
    _, b = load_checkpoint(resumed["model_dir"])
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU


# -- command-line failures before training (no compile) -------------------------------------

def test_command_line_failures_are_one_line_with_their_status(tmp_path):
    wd = str(tmp_path / "wd")
    rc, err = cli_result(f"--workdir={wd}", *CLI_ARGS, "--config.bogus=1")
    assert (rc, err) == (2, ["train: unknown config field 'config.bogus' (--config.bogus)"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = cli_result("--config=configs/pretrain.py:model=tiny", f"--workdir={wd}",
                         f"--config.data.train_files={empty}")
    assert (rc, err) == (2, [f"train: config.data.train_files: {empty} is empty"])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, err = cli_result(f"--workdir={blocker}/wd", *CLI_ARGS)
    assert rc == errors.EXIT_STORAGE and len(err) == 1, err
    assert err[0].startswith("train: Not a directory: ") and str(blocker) in err[0], err
    if os.geteuid() != 0:   # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, err = cli_result(f"--workdir={locked}", *CLI_ARGS)
        assert rc == errors.EXIT_STORAGE and len(err) == 1, err
        assert err[0].startswith("train: Permission denied: ") and str(locked) in err[0], err


@pytest.mark.slow   # needs root (a small tmpfs); ~50 s
def test_a_full_disk_is_one_line_naming_the_file_exit_3(tmp_path):
    """A checkpoint save that fills the disk: Orbax's background threads used to print
    ~1,500 lines of tracebacks ending in `ImportError: sys.meta_path is None`."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs",
                                            str(disk)], capture_output=True).returncode:
        pytest.skip("needs root to mount a 3 MB tmpfs")
    try:
        rc, err = cli_result(f"--workdir={disk}/wd", *CLI_ARGS)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert rc == errors.EXIT_STORAGE, err
    assert len(err) == 1 and err[0].startswith(f"train: No space left on device: {disk}/wd/"), err


def test_failed_writes_are_storage_errors_naming_the_file_and_out_of_memory_is_not():
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file '
                      '"/ck/3.tmp/": Failed writing: "/ck/3.tmp/d/abc": Failed to write 5570560 '
                      "bytes to file 17: No space left on device [os_error_code='28']")
    assert errors.exit_status(full) == errors.EXIT_STORAGE
    assert errors.one_line(full) == "No space left on device: /ck/3.tmp/d/abc"
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    assert errors.exit_status(oom) == 1
    assert errors.one_line(oom).startswith("RuntimeError: RESOURCE_EXHAUSTED: Out of memory")
    disk = OSError(28, "No space left on device", "/wd/config.json")
    assert errors.exit_status(disk) == errors.EXIT_STORAGE
    assert errors.one_line(disk) == "No space left on device: /wd/config.json"
