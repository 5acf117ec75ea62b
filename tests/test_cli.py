"""`python -m clara_jax <verb>`: one entry point that lists and runs every command."""

import importlib.util
import json
import os
import subprocess
import sys

from clara_jax.__main__ import VERBS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "clara_jax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_every_verb_and_each_verb_has_a_runnable_module():
    out = run("--help")
    assert out.returncode == 0
    for verb, (module, _) in VERBS.items():
        assert f"  {verb} " in out.stdout, verb
        assert importlib.util.find_spec(module) is not None, module
    bad = run("trian")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "unknown verb 'trian'" in bad.stderr and "train" in bad.stderr


def test_a_verb_runs_its_module_with_its_flags(tmp_path):
    out = run("synthetic", f"--out_dir={tmp_path}", "--num_entities=40", "--seed=3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.load(open(tmp_path / "manifest.json"))["seed"] == 3
    helped = run("synthetic", "--help")
    assert "--out_dir" in helped.stdout + helped.stderr   # absl prints the module's flags
