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
import pytest

from clara_jax.clara import prompts
from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data.formats import read_jsonl
from clara_jax.data.synthetic import generate_corpus
from clara_jax.eval import evaluate as ev
from clara_jax.eval.metrics import (accuracy, answer_scores, exact_match, f1_score,
                                    normalize_answer, retrieval_scores)
from clara_jax.model.config import preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import Mistral, init_params

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


def _brute_force_retrieval(preds, ks=(1, 3, 5)):
    out = {}
    for k in ks:
        rec, prec = [], []
        for p in preds:
            hits = len(set(p["topk"][:k]) & set(p["pos_index"]))
            rec.append(hits / len(p["pos_index"]) if p["pos_index"] else 0.0)
            prec.append(hits / k)
        out[f"recall@{k}"], out[f"precision@{k}"] = np.mean(rec), np.mean(prec)
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
        for key, value in _brute_force_retrieval(preds).items():
            assert summary[key] == pytest.approx(value), (mode, setting, key)
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
         f"--data={world['root'] / 'data' / 'eval.jsonl'}", "--mode=all", "--setting=oracle",
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
        assert summary == combined[mode]
    assert "recall@1" in combined["compressed"]
