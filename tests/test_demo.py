"""`make demo`'s job, on its embedded default config, checking its own result."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_end_to_end_and_passes_its_own_checks(tmp_path):
    """The whole demo (corpus, base LM, stages 1-3 at each rate, evaluation). It exits 1 unless
    compressed F1 beats closed book and stage 3 raised Recall@1 at every rate."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as `make demo` runs
    proc = subprocess.run([sys.executable, "-m", "clara_jax.demo", f"--workdir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.load(open(tmp_path / "results.json"))
    assert results["failures"] == []
    systems = {(r["system"], str(r["rate"]), r["setting"], r["stage"]) for r in results["rows"]}
    for rate in ("4", "16"):
        assert ("compressed", rate, "normal", "after stage 3") in systems
        assert ("compressed", rate, "oracle", "after stage 3") in systems
        assert ("compressed", rate, "normal", "before stage 3") in systems
    assert ("closed book", "-", "-", "") in systems
    assert (tmp_path / "results.md").read_text().startswith("| system |")
    assert (tmp_path / "f1_vs_rate.png").stat().st_size > 1000
    print(proc.stdout[-3000:])
