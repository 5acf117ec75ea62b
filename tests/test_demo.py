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


def test_base_lessons_are_answers_read_from_their_document(tmp_path):
    """The base's texts: one chat per document asking each of its questions (the first turn
    in the full-text layout `evaluate` uses, which is the loss-free prompt), and closed-book
    answers for one question in four; every lesson answer is written in its document."""
    import re
    synthetic.generate_corpus(str(tmp_path / "w"), seed=3, num_entities=40, k=1,
                              multi_hop=False, questions_per_entity=4, name_style="lists",
                              doc_style="plain")
    out = demo.write_base_text([str(tmp_path / "w")], str(tmp_path / "base.jsonl"), 4)
    records = [json.loads(line) for line in open(out)]
    qa = [json.loads(line) for s in ("train", "eval")
          for line in open(tmp_path / "w" / f"instruct_{s}.jsonl")]
    lessons = [r for r in records if "Background:" in r["text"]]
    closed = [r for r in records if "Background:" not in r["text"]]
    assert len(lessons) == len({r["docs"][r["pos_index"][0]] for r in qa})
    assert len(closed) == (len(qa) + 3) // 4
    n_answers = 0
    for r in records:
        assert r["text"].startswith(r["prompt"]) and r["prompt"].endswith("[/INST]")
        answers = re.findall(r"\[/INST\] (.*?)</s>", r["text"])
        assert answers and all(answers)
        if r in lessons:
            background = r["prompt"].split("Background:\n")[1].split("\n\nQuestion:")[0]
            assert all(a in background for a in answers), (answers, background)
            n_answers += len(answers)
    assert n_answers == len(qa)


def test_whole_words_make_every_answer_one_token_sequence_of_its_document(tmp_path):
    """With the demo's tokenizer words, an answer's tokens appear, in order, in its gold
    document's tokens: reading is copying whole tokens."""
    from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
    synthetic.generate_corpus(str(tmp_path / "w"), seed=5, num_entities=40, k=1,
                              multi_hop=False, questions_per_entity=4, name_style="lists",
                              doc_style="plain")
    words = open(demo.write_whole_words(str(tmp_path / "words.txt"))).read().split()
    base = demo.write_base_text([str(tmp_path / "w")], str(tmp_path / "base.jsonl"))
    texts = [json.loads(line)["text"] for line in open(base)]
    tok = ClaraTokenizer.from_file(train_sentencepiece(texts, str(tmp_path / "sp"), 1024,
                                                       whole_words=words), n_mem=1)
    rows = [json.loads(line) for line in open(tmp_path / "w" / "eval.jsonl")]
    for r in rows:
        doc = tok.encode(r["docs"][r["pos_index"][0]])
        ans = tok.encode(r["answer"])   # "▁word" pieces, as after "[/INST] "
        assert any(doc[i:i + len(ans)] == ans for i in range(len(doc))), r


def test_paired_margin_and_check_on_made_up_scores():
    """The check passes claims that hold by 3 standard errors and fails, naming them, those
    that do not; a paired difference that is the same for every question has SE 1/n."""
    excess, se, sigmas = demo.paired_margin([1.0] * 50 + [0.0] * 50, [], 0.3)
    assert excess == pytest.approx(0.2) and se == pytest.approx(0.5 / 99 ** 0.5 * 100 ** 0.5 / 10, rel=1e-3)
    assert demo.paired_margin([1.0] * 10, [0.0] * 10) == (1.0, 0.1, 10.0)
    cfg = _demo_config(**{"check.gate": "base,compression,retrieval", "rates": "4,16,32"})
    n = 400
    rng = random.Random(0)
    flip = lambda p: [float(rng.random() < p) for _ in range(n)]
    pq = {"full text/1/oracle//em": flip(0.9), "closed book/-/-//em": flip(0.02)}
    for rate, oracle in ((4, 0.85), (16, 0.7), (32, 0.6)):
        pq[f"compressed/{rate}/oracle/after stage 3/em"] = flip(oracle)
        pq[f"compressed/{rate}/normal/after stage 3/em"] = flip(oracle * 0.95)
        pq[f"compressed/{rate}/normal/after stage 3/hit1"] = flip(0.9)
        pq[f"compressed/{rate}/normal/before stage 3/hit1"] = flip(0.1)
    report, failures = demo.check(cfg, pq)
    assert failures == [] and len(report) == 2 + 1 + 2 + 2 + 2 * 3
    pq["compressed/16/normal/after stage 3/hit1"] = flip(0.3)   # stage 3 gained 0.2 only
    report, failures = demo.check(cfg, pq)
    assert len(failures) == 1 and "16x Recall@1 gain" in failures[0]
    assert failures[0].startswith("FAIL [retrieval]")
    # Outside the gated groups a missed claim is reported, not a failure.
    report, failures = demo.check(_demo_config(**{"check.gate": "base"}), pq)
    assert failures == [] and sum(line.startswith("MISS [retrieval] 16x Recall@1")
                                  for line in report) == 1
    with pytest.raises(ValueError, match="config.check.gate: unknown claim groups"):
        demo.check(_demo_config(**{"check.gate": "base,speed"}), pq)


def test_the_shipped_base_is_used_only_for_the_config_it_was_made_with(tmp_path):
    """The demo uses the base in the package (clara_jax/demo_base) when the config asks for
    the base it describes; a changed base field is refused, naming it, never silently
    served the shipped base; an empty base.shipped trains one."""
    cfg = _demo_config()
    shipped = demo.shipped_base(cfg)
    assert shipped == os.path.join(demo.SHIPPED_BASE, "model")
    assert os.path.exists(os.path.join(shipped, "model_config.json"))
    info = json.load(open(os.path.join(demo.SHIPPED_BASE, "base_info.json")))
    assert info["recipe"] == demo.base_recipe(cfg) and info["train_seconds"] > 0
    full = next(r for r in info["probe"] if r["system"] == "full text")
    closed = next(r for r in info["probe"] if r["system"] == "closed book")
    assert full["em"] >= cfg.check.min_full_text_em and closed["em"] <= cfg.check.max_closed_book_em
    with pytest.raises(ValueError, match=r"config.base.steps: 7 differs from the shipped"):
        demo.shipped_base(_demo_config(**{"base.steps": 7}))
    with pytest.raises(ValueError, match=r"config.doc_style: 'varied' differs"):
        demo.shipped_base(_demo_config(doc_style="varied"))
    assert demo.shipped_base(_demo_config(**{"base.shipped": ""})) is None
    with pytest.raises(FileNotFoundError, match="has no base_info.json"):
        demo.shipped_base(_demo_config(**{"base.shipped": str(tmp_path)}))


def test_an_exported_base_is_the_shipped_base_of_its_config(tmp_path):
    """export_base writes the model and base_info.json (recipe, time, probe, EM by kind);
    a config naming that directory as base.shipped gets its model, and one with another
    base field is refused."""
    model = tmp_path / "trained"
    model.mkdir()
    (model / "model_config.json").write_text("{}")
    cfg = _demo_config()
    rows = [{"system": "full text", "setting": "oracle", "em": 0.5, "f1": 0.5, "n": 4}]
    out = tmp_path / "export"
    demo.export_base(cfg, str(model), str(out), 12.4, rows, {"founder": {"n": 4, "full text": 0.5}})
    info = json.load(open(out / "base_info.json"))
    assert info["recipe"] == demo.base_recipe(cfg) and info["train_seconds"] == 12
    assert info["probe"] == rows and info["probe_by_kind"]["founder"]["full text"] == 0.5
    assert demo.shipped_base(_demo_config(**{"base.shipped": str(out)})) == str(out / "model")
    with pytest.raises(ValueError, match=r"config.base.learning_rate"):
        demo.shipped_base(_demo_config(**{"base.shipped": str(out), "base.learning_rate": 0.5}))


def test_a_stage_that_stops_early_is_an_error_naming_it(tmp_path, monkeypatch):
    """A stage stopped before its last step (SIGTERM: the trainer saves, writes summary.json
    without a model and raises Preempted) stops the demo with the stage and its step, still
    a Preempted (exit status 75: rerun to resume)."""
    from clara_jax.errors import Preempted
    from clara_jax.train import train as train_lib
    cfg = _demo_config()
    worlds = {"clara": [str(tmp_path / "w0")], "base": []}
    c = demo.stage_config(cfg, "instruct", worlds, 4, str(tmp_path / "base"))

    def stopped(c, wd):
        os.makedirs(wd, exist_ok=True)
        with open(os.path.join(wd, "summary.json"), "w") as f:
            json.dump({"stage": c.stage, "steps": 2, "last": {}}, f)
        raise Preempted("preempted (SIGTERM) at step 2 of 150")

    monkeypatch.setattr(train_lib, "train", stopped)
    with pytest.raises(Preempted, match=r"instruct stopped at step 2 of 150 \(SIGTERM\); rerun"):
        demo.run_stage(c, str(tmp_path / "instruct"))


def test_the_demo_passes_its_adapter_settings_to_every_stage(tmp_path):
    """lora_rank, lora_alpha and lora_dropout of the demo config reach each stage's trainer
    config (the trainer's own test shows that they change the trained adapters)."""
    worlds = {"clara": [str(tmp_path / "w0")], "base": []}
    cfg = _demo_config(lora_rank=8, lora_alpha=4.0, lora_dropout=0.0)
    for name in demo.CLARA_STAGES:
        c = demo.stage_config(cfg, name, worlds, 4, str(tmp_path / "base"))
        assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (8, 4.0, 0.0)
    c = demo.stage_config(_demo_config(), "pretrain", worlds, 4, str(tmp_path / "base"))
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (16, None, 0.1)


def test_the_demo_sets_its_own_stage_transitions(tmp_path):
    """The demo departs from the official transitions (the stage files' defaults) on purpose,
    by name: no memory-token training, stage 2 keeps stage 1's decoder, stage 3 keeps the
    cold query reasoner; each field of the demo config reaches the stage's trainer config."""
    worlds = {"clara": [str(tmp_path / "w0")], "base": []}

    def stages(cfg):
        return {name: demo.stage_config(cfg, name, worlds, 4, str(tmp_path / "base"))
                for name in demo.CLARA_STAGES}

    def transitions(got):
        return (tuple(c.optimize_mem_tokens for c in got.values()),
                got["instruct"].instruct.decoder_init,
                got["end_to_end"].end_to_end.query_reasoner_init)

    official = ((True, False, False), "fresh", "auto")
    assert transitions({name: load_config(f"configs/{name}.py")
                        for name in demo.CLARA_STAGES}) == official
    assert transitions(stages(_demo_config())) == ((False, False, False), "keep", "keep")
    assert transitions(stages(_demo_config(**{
        "pretrain.optimize_mem_tokens": True, "instruct.decoder_init": "fresh",
        "end_to_end.query_reasoner_init": "auto"}))) == official


def test_a_base_without_encoder_reads_only_full_text_with_the_gold_document(tmp_path):
    """The shipped base as a `Clara` without adapters: full text in the oracle setting works
    (the gold document, no retrieval metric); what needs an encoder is refused, naming it."""
    from clara_jax.eval.evaluate import evaluate
    cfg = _demo_config()
    synthetic.generate_corpus(str(tmp_path / "w"), seed=7, num_entities=120, k=1,
                              multi_hop=False, questions_per_entity=4, name_style="lists",
                              doc_style="plain")
    records = demo.read_eval_records(cfg, str(tmp_path / "w" / "eval.jsonl"))[:8]
    base = demo.base_as_clara(cfg, demo.shipped_base(cfg))
    summary, preds = evaluate(base, records, mode="full_text", setting="oracle", top_k=1,
                              batch_size=8, max_new_tokens=4, adapter=None)
    assert summary["n"] == 8 and "recall@1" not in summary
    assert all(p["selected"] == p["pos_index"] for p in preds)
    for mode, setting in (("compressed", "oracle"), ("full_text", "normal")):
        with pytest.raises(ValueError, match=f"mode '{mode}', setting '{setting}' needs an "
                                             f"encoder adapter"):
            evaluate(base, records, mode=mode, setting=setting, top_k=1, batch_size=8,
                     adapter=None)


def test_cpu_groups_split_this_process_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    for n in range(1, len(cpus) + 1):        # disjoint groups covering every CPU
        groups = demo.cpu_groups(n)
        assert len(groups) == n
        assert sorted(c for g in groups for c in g) == cpus
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
    for n in (len(cpus) + 1, 64):           # more jobs than CPUs: all at once, sharing all
        assert demo.cpu_groups(n) == [cpus] * n


def test_a_failing_rate_process_is_named_with_its_log(tmp_path):
    """A parallel rate process that fails (here: no base model to start from, neither shipped
    nor trained) stops the demo with the rate, the exit code and its log's last lines."""
    cfg = _demo_config(rates="2,4", **{"base.shipped": ""})
    with pytest.raises(RuntimeError, match=r"rate (\d): stages 1-3 failed .*rate\1/train.log"):
        demo.train_rates_in_parallel(cfg, [2, 4], str(tmp_path), [[], []])


@pytest.mark.slow
def test_the_demo_pipeline_runs_and_resumes_on_a_micro_config(tmp_path):
    """Every step of the demo (worlds, base LM, stages 1-3 at two rates in parallel processes,
    evaluation, table, plot, check) at a few steps each; a rerun reuses every finished stage
    and gives the same table, and so does a run that trains the rates one after the other in
    the same process."""
    overrides = {
        "rates": "2,4", "num_entities": 40, "worlds": 2, "eval_worlds": 1,
        "num_candidates": 6, "base.shipped": "", "base.steps": 4, "base.worlds": 1,
        "base.batch_size": 8, "pretrain.steps": 3, "pretrain.batch_size": 8,
        "instruct.steps": 2, "instruct.batch_size": 8, "end_to_end.steps": 2,
        "end_to_end.batch_size": 8, "end_to_end.worlds": 1, "eval.limit": 8,
        "eval.batch_size": 8, "eval.max_new_tokens": 4,
        # 32 memory tokens at 2x, and a tokenizer trained on a few texts splits more words
        "pretrain.max_len": 320, "instruct.max_len": 160, "end_to_end.max_len": 160}
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
    assert len(first["report"]) == 2 + 1 + 1 + 2 * 2   # every claim checked (none at 16x)
    assert set(first["failures"]) <= set(first["report"])
    tmp_path = tmp_path / "parallel"
    for rate in (2, 4):                          # trained in their own processes
        assert len(demo.cpu_groups(2)) < 2 or "== end_to_end" in (tmp_path / f"rate{rate}" / "train.log").read_text()
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["rows"] == first["rows"] and saved["config"]["rates"] == "2,4"
    assert (tmp_path / "results.md").read_text().startswith("| system |")
    assert (tmp_path / "f1_vs_rate.png").stat().st_size > 1000
    assert len(open(tmp_path / "data" / "base_text.jsonl").readlines()) >= 40   # a lesson per document
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
        for stage in demo.CLARA_STAGES:
            losses = [json.load(open(d / f"rate{rate}" / stage / "summary.json"))["last"]["loss"]
                      for d in (tmp_path, serial_dir)]
            assert losses[0] == pytest.approx(losses[1], rel=1e-4), (rate, stage, losses)


@pytest.mark.slow
def test_make_demo_passes_its_own_check(tmp_path):
    """The embedded default, as `make demo` runs it (the shipped base; the rates' stages in
    one process per core): it must exit 0, i.e. every claim of the gated groups holds by
    3 standard errors, and every other claim is measured and reported with its margin."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip()
    proc = subprocess.run([sys.executable, "-m", "clara_jax.demo", "--workdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=3600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    out = json.load(open(tmp_path / "results.json"))
    cfg = _demo_config()
    assert out["failures"] == [] and out["config"]["rates"] == cfg.rates
    gate = cfg.check.gate.split(",")
    rates = [int(r) for r in cfg.rates.split(",")]
    # base 2, the gap at the lowest rate, EM at each rate >= 16, each pair of neighbouring
    # rates, and Recall@1 gain and normal / oracle at every rate
    assert len(out["check"]) == 2 + 1 + sum(r >= 16 for r in rates) + len(rates) - 1 + \
        2 * len(rates)
    assert all(line.startswith("ok  ") for line in out["check"]
               if line.split("[")[1].split("]")[0] in gate)
    rows = {(r["system"], str(r["rate"]), r["setting"], r["stage"]): r for r in out["rows"]}
    full, closed = rows[("full text", "1", "oracle", "")], rows[("closed book", "-", "-", "")]
    assert full["em"] - closed["em"] > 0.15 and full["n"] == closed["n"] == 320
    for rate in cfg.rates.split(","):
        assert rows[("compressed", rate, "normal", "after stage 3")]["recall@1"] is not None
    assert (tmp_path / "f1_vs_rate.png").stat().st_size > 1000


def test_em_by_question_kind_averages_each_kind_and_column():
    """kind_table groups the per-question scores by question kind, one column per system
    present (closed book, full text, each rate's compressed oracle after stage 3)."""
    records = [{"question": q} for q in ("Where was Ann Bo born?", "Who founded Tolpa Guild?",
                                         "Where was Cy Do born?", "Who founded Rildou House?")]
    pq = {"closed book/-/-//em": [0, 0, 0, 1], "full text/1/oracle//em": [1, 1, 0, 1],
          "compressed/4/oracle/after stage 3/em": [1, 0, 1, 0],
          "compressed/4/normal/after stage 3/em": [0, 0, 0, 0]}
    table, by_kind = demo.kind_table(records, pq)
    assert by_kind == {"birthplace": {"n": 2, "closed book": 0.0, "full text": 0.5,
                                      "4x (oracle)": 1.0},
                       "founder": {"n": 2, "closed book": 0.5, "full text": 1.0,
                                   "4x (oracle)": 0.0}}
    assert table.splitlines()[0] == ("| question kind | n | EM closed book | EM full text | "
                                     "EM 4x (oracle) |")
    assert "| birthplace | 2 | 0.00 | 0.50 | 1.00 |" in table
