"""Evaluation: official metric semantics on hand-worked examples, baseline prompt strings, the
evaluation driver on a tiny random Clara (every mode and setting), bad input, and the CLI."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clara_jax.clara import prompts
from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data.formats import read_jsonl
from clara_jax.data.pipeline import FeatureSpec, featurize_batch
from clara_jax.data.synthetic import generate_corpus
from clara_jax.eval import evaluate as ev
from clara_jax.eval.metrics import (accuracy, answer_scores, exact_match, f1_score,
                                    normalize_answer, retrieval_scores)
from clara_jax.model.config import preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import Mistral, init_params
from clara_jax.train import inputs as train_inputs
from clara_jax.train import step as step_lib
from clara_jax.train.metrics import Meter, recall_widths, retrieval_recall
from clara_jax.train.train import evaluate_loss

# -- metrics ---------------------------------------------------------------------------------


def test_normalize_answer_follows_the_official_order():
    assert normalize_answer("The  Cat, a hat!") == "cat hat"
    assert normalize_answer("An apple's core.") == "apples core"  # punctuation goes first
    assert normalize_answer("the theory of Anathema") == "theory of anathema"  # whole words
    assert normalize_answer("  A-B\tC ") == "ab c"
    assert normalize_answer("True") == "true"  # the yes/no mapping is the metrics' job


def test_exact_match_f1_and_accuracy_hand_worked():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris France", "Paris") == 0.0
    assert exact_match("True", "yes") == 1.0 and exact_match("False", "No") == 1.0
    assert exact_match("true", "yes") == 0.0  # only the exact strings True/False are mapped
    assert exact_match("", "") == 1.0
    # F1: 1 shared token; precision 1/2, recall 1 -> 2/3.
    assert f1_score("Paris France", "the Paris") == pytest.approx(2 / 3)
    # "in paris in 1900" vs "paris 1900 in": shared {in:1, paris:1, 1900:1} = 3; p 3/4, r 1.
    assert f1_score("in Paris in 1900", "Paris, 1900 in") == pytest.approx(2 * 0.75 / 1.75)
    assert f1_score("yes", "yes indeed") == 0.0  # a yes/no side that differs scores 0
    assert f1_score("no doubt", "no") == 0.0
    assert f1_score("noanswer", "no answer") == 0.0
    assert f1_score("False", "no") == 1.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("", "") == 0.0  # no shared token: 0, as officially (unlike SQuAD)
    assert f1_score("Paris", "Lyon") == 0.0
    # Accuracy: every gold token present in the prediction (presence, not counts).
    assert accuracy("He was born in Paris, France.", "Paris France") == 1.0
    assert accuracy("Paris", "Paris France") == 0.0
    assert accuracy("paris", "Paris Paris") == 1.0
    assert accuracy("", "Paris") == 0.0
    assert accuracy("anything", "The") == 1.0  # a gold that normalises to nothing
    assert accuracy("True", "yes") == 1.0


def test_normalisation_cases_that_tell_implementations_apart():
    """Cases where a SQuAD-style or Unicode-aware normaliser would differ from the official
    `evaluation/evaluate.py` one (ASCII string.punctuation, articles after punctuation,
    exact-string True/False mapping before normalising, yes/no rule after it)."""
    assert normalize_answer("“Paris” — France") == "“paris” — france"  # not ASCII: kept
    assert normalize_answer("a.k.a. Bob") == "aka bob"  # punctuation first: "a" is not a word
    assert normalize_answer("The-end of an era") == "theend of era"
    assert normalize_answer("Ünïcode\u00a0Text") == "ünïcode text"  # str.split whitespace
    assert exact_match(" True", "yes") == 0.0  # the mapping wants the exact string
    assert exact_match("True", "True.") == 0.0  # "yes" vs "true"
    assert f1_score("Yes.", "yes") == 1.0  # the yes/no rule reads the normalised strings
    assert f1_score("Yes, he did", "yes") == 0.0
    assert f1_score("the the cat", "cat cat") == pytest.approx(2 / 3)  # "cat" vs "cat cat"
    # Shared tokens count by multiset: 1 of "cat cat dog" (p 1/3, r 1) -> 0.5.
    assert f1_score("a cat cat dog", "cat") == pytest.approx(0.5)
    assert accuracy("cat", "cat cat") == 1.0 and accuracy("a cat", "the cat") == 1.0
    assert accuracy("False", "no") == 1.0 and accuracy("false", "no") == 0.0


def test_answer_scores_first_gold_and_max_over_aliases():
    preds = ["Paris", "Lyon", "", "The Big Apple city"]
    golds = [["paris"], ["Marseille", "Lyon"], ["x"], ["New York", "Big Apple"]]
    s = answer_scores(preds, golds)
    assert s["n"] == 4
    assert s["em"] == pytest.approx(1 / 4) and s["em_max"] == pytest.approx(2 / 4)
    # Row 4: first gold F1 0; alias "big apple" vs "big apple city": p 2/3, r 1 -> 0.8.
    assert s["f1"] == pytest.approx(1 / 4)
    assert s["f1_max"] == pytest.approx((1 + 1 + 0 + 0.8) / 4)
    assert s["acc"] == pytest.approx(1 / 4) and s["acc_max"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        answer_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"golds\[0\]"):
        answer_scores(["a"], [[]])


def test_retrieval_scores_hand_worked():
    top = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 0, 2, 3, 4]])
    pos = [[1], [9, 2], []]  # the last row has no positives: counts 0 in the official means
    s = retrieval_scores(top, pos)
    assert s["recall@1"] == 0.0 and s["precision@1"] == 0.0
    assert s["recall@3"] == pytest.approx(1 / 3)
    assert s["precision@3"] == pytest.approx((1 / 3) / 3)
    assert s["recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["precision@5"] == pytest.approx((0.2 + 0.2 + 0) / 3)
    assert s["recall@5_pos"] == pytest.approx(0.75)
    assert s["precision@5_pos"] == pytest.approx(0.2)
    assert s["n_with_pos"] == 2
    # Width 2 < k = 3: the 2 columns are used, precision still divides by k.
    s = retrieval_scores(np.array([[2, 1]]), [[1]], ks=(1, 3))
    assert s["recall@1"] == 0.0 and s["recall@3"] == 1.0
    assert s["precision@3"] == pytest.approx(1 / 3)
    assert np.isnan(retrieval_scores(np.array([[0]]), [[]], ks=(1,))["recall@1_pos"])
    with pytest.raises(ValueError, match="does not match"):
        retrieval_scores(np.array([[0, 1]]), [[0], [1]])


# -- a tiny random Clara -----------------------------------------------------------------------

DOC_MAX, RATE = 112, 28


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Clara (distinct random adapters) and 8 synthetic eval records."""
    root = tmp_path_factory.mktemp("eval")
    generate_corpus(str(root / "data"), seed=0, num_entities=40, num_candidates=10)
    records, _ = read_jsonl(str(root / "data" / "eval.jsonl"), "eval")
    lines = [d for r in records for d in r["docs"]]
    with open(root / "data" / "pretrain_text.txt") as f:
        lines += f.read().splitlines()
    sp = train_sentencepiece(lines, str(root / "sp"), vocab_size=400)
    tok = ClaraTokenizer.from_file(sp, DOC_MAX // RATE)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    cfg = ClaraConfig(doc_max_length=DOC_MAX, compress_rate=RATE, generation_top_k=3,
                      first_mem_token_id=tok.mem_token_ids[0], lora=lora)
    mcfg = preset("tiny", vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=128)
    params = init_params(mcfg, jax.random.key(0))
    shapes = nn.meta.unbox(jax.eval_shape(Mistral(mcfg, lora).init, jax.random.key(1),
                                          jnp.zeros((1, 1), jnp.int32))["lora"])
    rng = np.random.default_rng(0)
    adapters = {name: jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32), shapes)
        for name in ("encoder", "decoder", "query_reasoner")}
    model = Clara(mcfg, cfg, params, adapters, tok, tokenizer_path=sp, batch_size=8)
    return {"model": model, "records": records[:8], "root": root, "tok": tok}


def test_baseline_prompt_strings(world):
    tok = world["tok"]
    q, docs = "Who founded Kalbouk Guild?", ["First doc.", "Second\ndoc."]
    closed = prompts.closed_book_string(q)
    assert closed == f"<s> [INST] {prompts.SYSTEM_ANSWER}\n\nQuestion:{q} [/INST]"
    assert prompts.closed_book_string(q, "Ana Rok") == closed + " Ana Rok</s>"
    # Text RAG is the instruct prompt with the documents' text where the memory slots are.
    instruct_prompt, instruct_full = prompts.answer_strings(tok, q, "Ana", 2)
    slots = prompts.memory_slots(tok, 2)
    assert prompts.full_text_string(q, docs) == instruct_prompt.replace(
        slots, "First doc.\nSecond doc.")
    assert prompts.full_text_string(q, docs, "Ana") == instruct_full.replace(
        slots, "First doc.\nSecond doc.")
    with pytest.raises(TypeError):
        prompts.full_text_string(q, "one string")
    # Labels cover exactly the answer and </s>.
    batch = prompts.text_batch(tok, [q, q], [docs, docs[:1]], ["Ana Rok", "Bo"], max_len=512)
    for row, answer in zip(range(2), ["Ana Rok", "Bo"]):
        labelled = batch.labels[row][batch.labels[row] != prompts.IGNORE_INDEX]
        assert labelled.tolist() == tok.encode(f" {answer}</s>")[-len(labelled):]
        assert tok.decode(labelled) == answer
    gen = prompts.text_batch(tok, [q], None, None, max_len=512)
    assert (gen.labels == prompts.IGNORE_INDEX).all()
    assert gen.input_ids[0][gen.attention_mask[0] == 1].tolist() == tok.encode(closed)


def _brute_force_retrieval(preds, top_k, ks=(1, 3, 5)):
    """The official recall / precision over the top_k list (`calculate_stage2_metrics` on
    `topk_idx` of width generation_top_k) and recall over the whole ranking."""
    out = {}
    for k in ks:
        rec, prec, rank = [], [], []
        for p in preds:
            hits = len(set(p["topk"][:top_k][:k]) & set(p["pos_index"]))
            rec.append(hits / len(p["pos_index"]) if p["pos_index"] else 0.0)
            prec.append(hits / k)
            rank.append(len(set(p["topk"][:k]) & set(p["pos_index"])) / len(p["pos_index"])
                        if p["pos_index"] else 0.0)
        out[f"recall@{k}"], out[f"precision@{k}"] = np.mean(rec), np.mean(prec)
        out[f"ranking_recall@{k}"] = np.mean(rank)
    return out


def test_evaluate_every_mode_and_setting(world):
    model, records, tok = world["model"], world["records"], world["tok"]
    top_k = 3
    run = lambda mode, setting: ev.evaluate(model, records, mode=mode, setting=setting,
                                            top_k=top_k, batch_size=5, max_new_tokens=4)
    all_docs = {d for r in records for d in r["docs"]}
    width = DOC_MAX + 3
    n_cut = sum(len(tok.encode(f"<ENC><s>{d}</s>")) > width for d in all_docs)
    assert 0 < n_cut < len(all_docs)  # the check below sees both kinds
    results = {}
    for mode, setting in [("compressed", "normal"), ("compressed", "oracle"),
                          ("full_text", "normal"), ("full_text", "oracle"),
                          ("closed_book", "normal")]:
        summary, preds = run(mode, setting)
        results[mode, setting] = summary, preds
        assert len(preds) == len(records) == summary["n"]
        assert [p["index"] for p in preds] == list(range(len(records)))
        for key in ("em", "f1", "acc", "em_max", "f1_max", "acc_max", "avg_output_length",
                    "truncated_docs", "seconds", "examples_per_second"):
            assert key in summary, (mode, setting, key)
        for p, r in zip(preds, records):
            assert p["golds"] == r["answers"] and p["question"] == r["question"]
            assert p["em"] == exact_match(p["prediction"], r["answers"][0])
            assert p["f1"] == f1_score(p["prediction"], r["answers"][0])
            assert p["acc"] == accuracy(p["prediction"], r["answers"][0])
        assert summary["em"] == pytest.approx(np.mean([p["em"] for p in preds]))
        if mode == "closed_book":
            assert "recall@1" not in summary and summary["truncated_docs"] == 0
            assert all(p["topk"] == [] and p["selected"] == [] for p in preds)
            continue
        assert summary["truncated_docs"] == n_cut and summary["distinct_docs"] == len(all_docs)
        for key, value in _brute_force_retrieval(preds, top_k).items():
            assert summary[key] == pytest.approx(value), (mode, setting, key)
        # The official list is the generator's top_k = 3: recall@5 stops there.
        assert summary["recall@5"] == summary["recall@3"]
        for p, r in zip(preds, records):
            assert len(p["topk"]) == min(len(r["docs"]), 5)
            assert len(p["selected"]) == top_k
            if setting == "normal":
                assert p["selected"] == p["topk"][:top_k]
            else:
                gold = set(r["pos_index"])
                assert gold <= set(p["selected"])
                fill = [j for j in p["topk"] if j not in gold][:top_k - len(gold)]
                assert [j for j in p["selected"] if j not in gold] == fill
                # In the query reasoner's order (golds ranked below topk come last).
                rank = {j: n for n, j in enumerate(p["topk"])}
                assert sorted(p["selected"], key=lambda j: rank.get(j, 99)) == p["selected"]
    # The ranking does not depend on the setting or the generator's input.
    for mode in ("compressed", "full_text"):
        assert [p["topk"] for p in results[mode, "oracle"][1]] == \
            [p["topk"] for p in results["compressed", "normal"][1]]
    # Compressed + normal is Clara's end-to-end path.
    direct = model.generate_from_questions([r["question"] for r in records],
                                           [r["docs"] for r in records], max_new_tokens=4,
                                           k=top_k)
    normal = results["compressed", "normal"][1]
    assert direct.topk_indices.tolist() == [p["selected"] for p in normal]
    assert direct.texts == [p["prediction"] for p in normal]


def test_first_and_gold_settings_read_file_order_without_ranking(world):
    """The official stage1 / stage1_2 evaluation (`first`: docs[:top_k] as they stand) and
    its gold-guaranteed variant (`gold`): no query reasoner, no retrieval metric, only the
    documents read are compressed; compressed + first is `Clara.generate_from_text` on the
    first top_k documents."""
    model, records = world["model"], world["records"]
    top_k = 3
    assert any(max(r["pos_index"]) >= top_k for r in records)  # gold differs from first
    for mode in ("compressed", "full_text"):
        for setting in ("first", "gold"):
            summary, preds = ev.evaluate(model, records, mode=mode, setting=setting,
                                         top_k=top_k, batch_size=5, max_new_tokens=4)
            assert summary["setting"] == setting and summary["max_new_tokens"] == 4
            assert not any(k.startswith(("recall@", "ranking_recall@", "precision@"))
                           for k in summary), summary
            read = set()
            for p, r in zip(preds, records):
                assert p["topk"] == []
                gold = sorted(set(r["pos_index"]))
                if setting == "first":
                    assert p["selected"] == list(range(top_k))
                else:
                    rest = [j for j in range(len(r["docs"])) if j not in gold]
                    assert p["selected"] == sorted(gold + rest[:top_k - len(gold)])
                read |= {r["docs"][j] for j in p["selected"]}
            assert summary["distinct_docs"] == (len(read) if mode == "compressed" else 0)
            if (mode, setting) == ("compressed", "first"):
                direct = model.generate_from_text([r["question"] for r in records],
                                                  [r["docs"][:top_k] for r in records],
                                                  max_new_tokens=4)
                assert direct.texts == [p["prediction"] for p in preds]


def test_official_settings_per_stage_and_default_max_new_tokens(world):
    """`--stage` of the official evaluate.py -> (setting, max_new_tokens, top_k): stage1 /
    stage1_2 read docs[:5] with the default 128 new tokens, stage2 generate_from_questions
    with 64; our stage names mean the same; None takes the setting's official value."""
    for stage, ours in (("stage1", "pretrain"), ("stage1_2", "instruct"),
                        ("stage2", "end_to_end")):
        assert ev.official_settings(stage) == ev.official_settings(ours)
    assert ev.official_settings("stage1") == {"setting": "first", "max_new_tokens": 128,
                                              "top_k": 5}
    assert ev.official_settings("stage2") == {"setting": "normal", "max_new_tokens": 64,
                                              "top_k": 5}
    assert ev.OFFICIAL_MAX_NEW_TOKENS == {"first": 128, "gold": 128, "normal": 64,
                                          "oracle": 64}
    with pytest.raises(ValueError, match="stage: unknown 'stage3'"):
        ev.official_settings("stage3")
    summary, _ = ev.evaluate(world["model"], world["records"][:1], mode="closed_book",
                             setting="gold", batch_size=1)
    assert summary["max_new_tokens"] == 128
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        ev.evaluate(world["model"], world["records"][:1], mode="closed_book", max_new_tokens=0)
    # The CLI: --stage fills what is not given explicitly.
    assert ev.resolve_settings("stage1_2") == {"setting": "first", "top_k": 5,
                                               "max_new_tokens": 128}
    assert ev.resolve_settings("end_to_end", top_k=3) == {"setting": "normal", "top_k": 3,
                                                          "max_new_tokens": 64}
    assert ev.resolve_settings("stage1", setting="gold", max_new_tokens=7) == {
        "setting": "gold", "top_k": 5, "max_new_tokens": 7}
    assert ev.resolve_settings() == {"setting": "normal", "top_k": 5, "max_new_tokens": 64}
    assert ev.resolve_settings(setting="first")["max_new_tokens"] == 128
    with pytest.raises(ValueError, match="setting: unknown 'best'"):
        ev.resolve_settings(setting="best")


# -- recall@k in the training metrics ---------------------------------------------------------


def test_retrieval_recall_hand_worked_in_graph():
    """Per row |topk[:j] ∩ positives| / |positives|, averaged over the rows with positives
    (the official trainer skips the others); j = 1, 3, 5 up to k, and k."""
    top = jnp.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 0, 2, 3, 4]])
    pos = np.zeros((3, 12), np.int32)
    pos[0, 1] = 1            # hit at rank 2: recall@1 0, @3 1, @5 1
    pos[1, [2, 9]] = 1       # one of two at rank 5: 0, 0, 0.5
    m = jax.jit(retrieval_recall)(top, jnp.asarray(pos))   # row 2: no positives, left out
    assert float(m["n_with_pos"]) == 2
    assert float(m["recall@1"]) == 0.0
    assert float(m["recall@3"]) == pytest.approx(0.5)
    assert float(m["recall@5"]) == pytest.approx(0.75)
    assert recall_widths(5) == [1, 3, 5] and recall_widths(2) == [1, 2]
    assert recall_widths(1) == [1] and recall_widths(8) == [1, 3, 5, 8]
    m = retrieval_recall(top[:, :2], jnp.asarray(pos))
    assert set(m) == {"n_with_pos", "recall@1", "recall@2"}
    m = retrieval_recall(top, jnp.zeros((3, 12), jnp.int32))
    assert float(m["n_with_pos"]) == 0 and float(m["recall@1"]) == 0.0


def test_split_batch_keeps_pos_mask_for_the_ranking_stages():
    batch = {"prompt_ids": np.zeros((2, 4)), "pos_mask": np.ones((2, 3)),
             "truncated_docs": np.zeros(2), "truncated_prompt": np.zeros(2)}
    for stage in ("end_to_end", "retrieval_pretrain"):
        step_batch, extras = train_inputs.split_batch(batch, stage)
        assert "pos_mask" in step_batch and set(extras) == {"truncated_docs",
                                                            "truncated_prompt"}
    for stage in ("pretrain", "instruct"):
        assert "pos_mask" not in train_inputs.split_batch(batch, stage)[0]


def test_end_to_end_step_reports_the_official_recall_on_a_crafted_batch(world):
    """The stage-3 train step on a tiny model: recall@1 / recall@3 (k = 3) from the step's
    own topk_indices against a pos_mask crafted around them, and in the log row."""
    model, records = world["model"], world["records"][:3]
    cfg = model.config
    spec = FeatureSpec("eval", cfg.doc_max_length, cfg.n_mem, max_len=192,
                       k=cfg.generation_top_k, num_candidates=10)
    batch, _ = train_inputs.split_batch(featurize_batch(records, world["tok"], spec),
                                        "end_to_end")
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}
    tx = optax.sgd(0.0)   # the state stays as it is: both calls see the same model
    state = step_lib.create_train_state(model.params, model.adapters, "end_to_end", tx,
                                        jax.random.key(0))
    train_step = jax.jit(step_lib.make_train_step(model.model, cfg, "end_to_end", tx,
                                                  dropout=False))
    batch["pos_mask"] = jnp.zeros((3, 10), jnp.int32)
    _, metrics = train_step(state, batch)
    assert float(metrics["n_with_pos"]) == 0.0
    top = np.asarray(metrics["topk_indices"])
    assert top.shape == (3, 3)
    pos = np.zeros((3, 10), np.int32)
    pos[0, top[0, 0]] = 1
    pos[0, [j for j in range(10) if j not in top[0]][0]] = 1   # a positive not retrieved
    pos[2, top[2, 2]] = 1                                       # row 1: no positives
    batch["pos_mask"] = jnp.asarray(pos)
    # row 0: 1 of 2 at rank 1 -> 0.5, 0.5; row 2: its one positive at rank 3 -> 0, 1.
    expected = {"recall@1": 0.25, "recall@3": 0.75, "n_with_pos": 2.0}
    _, train_metrics = train_step(state, batch)
    np.testing.assert_array_equal(np.asarray(train_metrics["topk_indices"]), top)
    assert {k: float(train_metrics[k]) for k in expected} == pytest.approx(expected)
    # The eval step adds the same keys (`step.with_recall`).
    assert set(step_lib.with_recall({"topk_indices": jnp.asarray(top)}, batch)) == {
        "topk_indices", *expected}
    row = Meter(3, 3, 0.0).row(1, jax.device_get(train_metrics))
    assert row["recall@1"] == pytest.approx(0.25) and row["recall@3"] == pytest.approx(0.75)


def test_log_rows_and_eval_means_of_recall():
    """A log row leaves recall out when no row had positives (as the official trainer);
    the eval mean weights each batch's recall by its rows with positives."""
    row = Meter(2, 2, 0.0).row(1, {"loss": np.float32(1.0), "recall@1": np.float32(0.0),
                                   "n_with_pos": np.float32(0.0)})
    assert "recall@1" not in row and "n_with_pos" not in row and row["loss"] == 1.0
    outs = iter([{"loss": 2.0, "recall@1": 1.0, "n_with_pos": 1.0},
                 {"loss": 4.0, "recall@1": 0.0, "n_with_pos": 3.0},
                 {"loss": 6.0, "recall@1": 0.0, "n_with_pos": 0.0}])
    batches = [{"pos_mask": np.zeros((1, 2))}] * 3
    ev_row = evaluate_loss(lambda state, b: next(outs), None, batches, 5, lambda b: b,
                           "end_to_end")
    assert ev_row == {"loss": pytest.approx(4.0), "recall@1": pytest.approx(0.25)}
    outs = iter([{"loss": 1.0, "recall@1": 0.0, "n_with_pos": 0.0}])
    assert evaluate_loss(lambda state, b: next(outs), None, batches[:1], 5, lambda b: b,
                         "end_to_end") == {"loss": 1.0}


def test_baselines_use_the_named_adapter(world):
    model, records = world["model"], world["records"][:5]
    qs = [r["question"] for r in records]
    base = model.generate_closed_book(qs, max_new_tokens=4)
    dec = model.generate_closed_book(qs, max_new_tokens=4, adapter="decoder")
    assert base.token_ids != dec.token_ids  # random adapters change the greedy tokens
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.generate_closed_book(qs, adapter="nope")
    with pytest.raises(ValueError, match=r"documents\[1\]"):
        model.generate_from_full_text(qs[:2], [["a doc"], []])


@pytest.mark.parametrize("change, mode, setting, top_k, message", [
    (lambda r: r[2].update(question="  "), "compressed", "normal", 3, r"records\[2\].*question"),
    (lambda r: r[1].update(docs=[]), "full_text", "normal", 3, r"records\[1\].*docs: no doc"),
    (lambda r: r[0]["docs"].__setitem__(4, ""), "compressed", "normal", 3,
     r"records\[0\].*docs\[4\]"),
    (lambda r: None, "compressed", "normal", 11, r"records\[0\].*top_k=11 is larger than its 10"),
    (lambda r: r[3].update(pos_index=[]), "compressed", "oracle", 3,
     r"records\[3\].*pos_index: the oracle setting needs gold"),
    (lambda r: r[3].update(pos_index=[0, 1, 2, 3]), "full_text", "oracle", 3,
     r"records\[3\].*4 gold documents do not fit in top_k=3"),
    (lambda r: r[4].update(pos_index=[]), "full_text", "gold", 3,
     r"records\[4\].*pos_index: the gold setting needs gold"),
    (lambda r: None, "compressed", "reranked", 3, "setting: unknown 'reranked'"),
    (lambda r: r[5].pop("answers"), "closed_book", "normal", 3, r"records\[5\].*answer: missing"),
    (lambda r: None, "retrieval", "normal", 3, "mode: unknown"),
])
def test_bad_input_names_the_record_and_field(world, change, mode, setting, top_k, message):
    records = json.loads(json.dumps(world["records"]))
    change(records)
    with pytest.raises(ValueError, match=message):
        ev.evaluate(world["model"], records, mode=mode, setting=setting, top_k=top_k)


def test_cli_writes_predictions_and_summary(world, tmp_path):
    ckpt = tmp_path / "model"
    world["model"].save(str(ckpt))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "clara_jax.evaluate", f"--checkpoint={ckpt}",
         f"--data={world['root'] / 'data' / 'eval.jsonl'}", "--mode=all", "--stage=stage2",
         "--setting=oracle",
         "--top_k=2", "--limit=3", "--batch_size=4", "--max_new_tokens=3", f"--out_dir={out}"],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| compressed | oracle |" in proc.stdout and "| closed_book |" in proc.stdout
    combined = json.loads((out / "summary.json").read_text())
    assert set(combined) == set(ev.MODES)
    for mode in ev.MODES:
        lines = (out / mode / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 3
        summary = json.loads((out / mode / "summary.json").read_text())
        assert summary["n"] == 3 and summary["setting"] == "oracle"
        assert (summary["stage"], summary["top_k"], summary["max_new_tokens"]) == (
            "stage2", 2, 3)   # explicit flags over the stage's official ones
        assert summary == combined[mode]
    assert "recall@1" in combined["compressed"]
