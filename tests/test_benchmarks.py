"""Smoke test of the CPU benchmark scripts: each runs end to end with --quick (a tiny
config, our side only: the official side needs --clara_src) and prints its table."""

import json
import os
import subprocess
import sys

import pytest

# Each script imports jax and torch, builds a random base and release, and compiles: 86-290 s
# of wall time on the loaded 2-core machine (about 12-40 s of CPU).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick",
                          "--reps", "1", *args], capture_output=True, text=True, env=env,
                         timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "our side only" in out.stdout
    return out.stdout


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench"))


def test_train_step_quick(work_dir, tmp_path):
    out = run("train_step.py", "--work_dir", work_dir, "--json", str(tmp_path / "t.json"))
    rows = json.load(open(tmp_path / "t.json"))["rows"]
    assert [r["implementation"] for r in rows] == ["ours", "ours", "ours, cached candidates"]
    assert all(r["s/step"] > 0 and r["model GFLOP/s"] > 0 for r in rows)
    assert "| stage |" in out


def test_compress_and_generate_quick(work_dir, tmp_path):
    out = run("compress_and_generate.py", "--work_dir", work_dir,
              "--json", str(tmp_path / "c.json"))
    rows = json.load(open(tmp_path / "c.json"))["rows"]
    assert len(rows) == 1 and rows[0]["compress_documents docs/s"] > 0
    assert "ms per decode step" in out


def test_rag_latency_quick(work_dir, tmp_path):
    run("rag_latency.py", "--work_dir", work_dir, "--out_dir", str(tmp_path))
    rows = json.load(open(tmp_path / "rag_latency.json"))["rows"]
    assert [r["rate"] for r in rows] == ["full text", 4, 16]
    # prompts shrink as the rate grows; the full text is the longest
    assert rows[0]["prompt tokens"] > rows[1]["prompt tokens"] > rows[2]["prompt tokens"]
    assert os.path.getsize(tmp_path / "rag_latency.png") > 1000


def test_profile_step_quick(work_dir, tmp_path):
    """A jax.profiler trace of our stage-1 step, read back with XProf: the XLA:CPU thunks are
    found, and their time splits into categories with matmuls among them."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"),
                          "--quick", "--work_dir", work_dir, "--trace_dir", str(tmp_path),
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True,
                         env=env, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(tmp_path / "p.json"))
    shares = [v["share"] for v in summary["categories"].values()]
    assert abs(sum(shares) - 1.0) < 1e-6 and summary["total_ms"] > 0
    assert any(c.startswith("matmul") and v["self_ms"] > 0
               for c, v in summary["categories"].items())
    assert os.path.exists(summary["trace"]) and "| op category |" in out.stdout
