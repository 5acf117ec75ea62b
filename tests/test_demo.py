"""`make demo`'s job: its base-LM text and its whole pipeline on a micro config."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from clara_jax import demo
from clara_jax.data import synthetic
from config_files import load_config



def _demo_config(**overrides):
    return load_config("configs/demo.py", **overrides)


def test_every_reading_question_has_its_document_in_the_same_text(tmp_path):
    synthetic.generate_corpus(str(tmp_path / "w"), seed=3, num_entities=40)
    path = str(tmp_path / "w" / "pretrain_text.txt")
    passages = demo.reading_passages(path, random.Random(0))
    lines = open(path).read().splitlines()
    n_docs = sum(not line.startswith("Question:") for line in lines)
    assert len(passages) == 2 * n_docs - 1          # each document, and each neighbour pair
    for p in passages:
        docs = [x for x in p.split("\n") if not x.startswith("Question:")]
        questions = [x for x in p.split("\n") if x.startswith("Question:")]
        assert 1 <= len(docs) <= 2 and questions
        for q in questions:   # the answer is read from a document of the same text
            assert q.split(" Answer: ")[1] in " ".join(docs), (q, docs)
    # The base text: every reading lesson, and closed-book examples for a quarter of the QA.
    out = demo.write_base_text([str(tmp_path / "w")], str(tmp_path / "base.jsonl"))
    texts = [json.loads(line)["text"] for line in open(out)]
    assert sum(t in passages for t in texts) == len(passages)
    closed = [t for t in texts if "[INST]" in t and "Background" not in t and "Question:" in t]
    full = [t for t in texts if "[INST]" in t and "Background:" in t and "\n\nQuestion:" in t]
    assert 0 < len(closed) < len(full)


def test_cpu_groups_split_this_process_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    for n in (1, 2, 3, 64):
        groups = demo.cpu_groups(n)
        assert len(groups) == min(n, len(cpus))
        assert sorted(c for g in groups for c in g) == cpus
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_a_failing_rate_process_is_named_with_its_log(tmp_path):
    """A parallel rate process that fails (here: no base model to start from) stops the demo
    with the rate, the exit code and its log's last lines."""
    cfg = _demo_config(rates="2,4")
    with pytest.raises(RuntimeError, match=r"rate (\d): stages 1-3 failed .*rate\1/train.log"):
        demo.train_rates_in_parallel(cfg, [2, 4], str(tmp_path), [[], []])


@pytest.mark.slow
def test_the_demo_pipeline_runs_and_resumes_on_a_micro_config(tmp_path):
    """Every step of the demo (worlds, base LM, stages 1-3 at two rates in parallel processes,
    evaluation, table, plot, check) at a few steps each; a rerun reuses every finished stage
    and gives the same table, and so does a run that trains the rates one after the other in
    the same process."""
    overrides = {
        "rates": "2,4", "num_entities": 40, "worlds": 2, "num_candidates": 6,
        "base.steps": 4, "base.worlds": 1, "base.batch_size": 8, "stage1.steps": 3,
        "stage1.batch_size": 8, "stage2.steps": 2, "stage2.batch_size": 8, "stage3.steps": 2,
        "stage3.batch_size": 8, "stage3.worlds": 1, "eval.limit": 8, "eval.batch_size": 8,
        "eval.max_new_tokens": 4}
    cfg = _demo_config(**overrides)
    first = demo.run(cfg, str(tmp_path / "parallel"))
    systems = {(r["system"], str(r["rate"]), r["setting"], r["stage"]) for r in first["rows"]}
    assert systems == {(s, rate, setting, stage) for rate in ("2", "4")
                       for s, setting, stage in (("compressed", "normal", "before stage 3"),
                                                 ("compressed", "oracle", "after stage 3"),
                                                 ("compressed", "normal", "after stage 3"))} | {
        ("closed book", "-", "-", ""), ("full text", "1", "oracle", ""),
        ("full text", "1", "normal", "")}
    assert all(r["n"] == 8 for r in first["rows"])
    assert isinstance(first["failures"], list)   # the check ran (a few steps cannot pass it)
    tmp_path = tmp_path / "parallel"
    for rate in (2, 4):                          # trained in their own processes
        assert len(demo.cpu_groups(2)) < 2 or "== end_to_end" in (tmp_path / f"rate{rate}" / "train.log").read_text()
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["rows"] == first["rows"] and saved["config"]["rates"] == "2,4"
    assert (tmp_path / "results.md").read_text().startswith("| system |")
    assert (tmp_path / "f1_vs_rate.png").stat().st_size > 1000
    assert len(open(tmp_path / "data" / "base_text.jsonl").readlines()) > 100
    second = demo.run(cfg, str(tmp_path))            # every stage is reused, not retrained
    assert second["rows"] == first["rows"]
    assert second["seconds"] < first["seconds"]
    # The same stages trained one after the other in this process (from the same base).
    serial_dir = tmp_path.parent / "serial"
    shutil.copytree(tmp_path / "data", serial_dir / "data")
    shutil.copytree(tmp_path / "base", serial_dir / "base")
    serial_cfg = _demo_config(**{**overrides, "parallel_rates": False})
    serial = demo.run(serial_cfg, str(serial_dir))
    key = lambda r: (r["system"], str(r["rate"]), r["setting"], r["stage"])
    assert sorted(map(key, serial["rows"])) == sorted(map(key, first["rows"]))
    for rate in (2, 4):   # one thread or several: equal up to float rounding
        for stage in ("stage1", "stage2", "stage3"):
            losses = [json.load(open(d / f"rate{rate}" / stage / "summary.json"))["last"]["loss"]
                      for d in (tmp_path, serial_dir)]
            assert losses[0] == pytest.approx(losses[1], rel=1e-4), (rate, stage, losses)


@pytest.mark.slow
def test_make_demo_passes_its_own_check(tmp_path):
    """The embedded default, as `make demo` runs it (one CPU device per process, about 15
    minutes on 2 cores): it must exit 0, i.e. at every rate compressed F1 (oracle) is above
    closed book and stage 3 raised Recall@1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip()
    proc = subprocess.run([sys.executable, "-m", "clara_jax.demo", "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=3600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    out = json.load(open(tmp_path / "results.json"))
    assert out["failures"] == [] and out["config"]["rates"] == "2,4"
    rows = {(r["system"], str(r["rate"]), r["setting"], r["stage"]): r for r in out["rows"]}
    closed = rows[("closed book", "-", "-", "")]["f1"]
    for rate in ("2", "4"):
        assert rows[("compressed", rate, "oracle", "after stage 3")]["f1"] > closed
        assert (rows[("compressed", rate, "normal", "after stage 3")]["recall@1"] >
                rows[("compressed", rate, "normal", "before stage 3")]["recall@1"])
    assert (tmp_path / "f1_vs_rate.png").stat().st_size > 1000
