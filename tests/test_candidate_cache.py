"""Stage 3 against cached compressed candidates: the same loss and gradients as compressing
in the step (dropout off), stale caches refused, reuse, and a short run through the trainer."""

import json
import os
import sys

import jax
import numpy as np
import optax
import pytest

from clara_jax.clara.config import ClaraConfig
from clara_jax.clara.model import Clara
from clara_jax.clara.tokenizer import ClaraTokenizer, train_sentencepiece
from clara_jax.data import synthetic
from clara_jax.data.pipeline import FeatureSpec, featurize_batch
from clara_jax.infer.index import default_mesh
from clara_jax.model.config import preset
from clara_jax.model.lora import LoraConfig
from clara_jax.model.mistral import init_params
from clara_jax.train import candidate_cache
from clara_jax.train import step as step_lib
from clara_jax.train import setup as setup_lib
from clara_jax.train import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_MAX, RATE, K = 16, 4, 2


def make_clara(sp_path, cfg, params=None, adapters=None, mcfg=None):
    tok = ClaraTokenizer.from_file(sp_path, cfg.n_mem)
    mcfg = mcfg or preset("tiny", vocab_size=tok.base_vocab_size + 16, hidden_size=64,
                          num_layers=2, head_dim=16, intermediate_size=128)
    if params is None:
        params = init_params(mcfg, jax.random.key(0))
        adapters = setup_lib.fresh_adapters(mcfg, cfg.lora, jax.random.key(1))
        leaves, treedef = jax.tree_util.tree_flatten(adapters)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        adapters = jax.tree_util.tree_unflatten(treedef, [  # non-zero B: every adapter acts
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return Clara(mcfg, cfg, params, adapters, tok, tokenizer_path=sp_path, batch_size=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    synthetic.generate_corpus(str(root / "data"), seed=0, num_entities=40)
    rows = [json.loads(l) for l in open(root / "data" / "corpus.jsonl")][:10]
    texts = [r["text"] for r in rows]
    sp = train_sentencepiece(texts * 3, str(root / "sp"), 400)
    cfg = ClaraConfig(doc_max_length=DOC_MAX, compress_rate=RATE, generation_top_k=K,
                      temperature=0.1, lora=LoraConfig(rank=4, alpha=8, dropout=0.1))
    model = make_clara(sp, cfg)
    rng = np.random.RandomState(0)
    # 4 questions x 6 candidates from a pool of 10 documents: candidates repeat across rows.
    records = [{"docs": [texts[i] for i in rng.choice(10, 6, replace=False)]} for _ in range(4)]
    return dict(root=root, model=model, sp=sp, records=records,
                questions=["Where was Lo born?", "Who founded Ka?", "When?", "Which city?"],
                answers=["In Zan.", "Bo.", "1901.", "Doufaim."])


def test_cached_step_equals_compressing_step(setup, tmp_path):
    model, records = setup["model"], setup["records"]
    cache = candidate_cache.build_candidate_cache(
        model, [records], str(tmp_path / "cc"), batch_size=4, mesh=default_mesh(),
        progress=False)
    distinct = {t for r in records for t in r["docs"]}
    assert cache.table.shape == (len(distinct), DOC_MAX // RATE, 64) and len(distinct) < 24
    spec = FeatureSpec("end_to_end", DOC_MAX, model.config.n_mem, max_len=256, k=K,
                       num_candidates=6)
    examples = [{"question": q, "docs": r["docs"], "answers": [a], "pos_index": [0],
                 "source": f"test:{i}"}
                for i, (q, r, a) in enumerate(zip(setup["questions"], records, setup["answers"]))]
    plain = featurize_batch(examples, model.tokenizer, spec)   # "index": record positions 0..3
    rows = cache.record_rows(records)
    cached = candidate_cache.CandidateCache.swap_in(dict(plain), rows)
    cached.pop("index")
    assert "doc_ids" not in cached and cached["doc_index"].shape == (4, 6)
    cached["doc_table"] = cache.table

    step = jax.jit(step_lib.make_train_step(model.model, model.config, "end_to_end",
                                            optax.sgd(1.0), dropout=False))
    state = step_lib.create_train_state(model.params, dict(model.adapters), "end_to_end",
                                        optax.sgd(1.0), jax.random.key(0))
    new_plain, m_plain = step(state, plain)
    new_cached, m_cached = step(state, cached)
    assert abs(float(m_plain["loss"]) - float(m_cached["loss"])) < 1e-6
    np.testing.assert_array_equal(m_plain["topk_indices"], m_cached["topk_indices"])
    # SGD at lr 1: new - old = -gradient, so this compares the gradients.
    for name in ("query_reasoner", "decoder"):
        g_plain = jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a),
                                         state.trainable[name], new_plain.trainable[name])
        g_cached = jax.tree_util.tree_map(lambda a, b: np.asarray(b) - np.asarray(a),
                                          state.trainable[name], new_cached.trainable[name])
        diff = max(float(np.abs(a - b).max()) for a, b in zip(
            jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_cached)))
        scale = max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(g_plain))
        assert diff < 1e-6 and scale > 1e-4, (name, diff, scale)


def test_stale_cache_refused_and_valid_cache_reused(setup, tmp_path):
    model, records = setup["model"], setup["records"]
    directory = str(tmp_path / "cc")
    first = candidate_cache.build_candidate_cache(model, [records], directory, batch_size=4,
                                                  mesh=default_mesh(), progress=False)
    chunk = os.path.join(directory, "chunk_00000.npy")
    stamp = os.stat(chunk).st_mtime_ns
    again = candidate_cache.build_candidate_cache(model, [records], directory, batch_size=4,
                                                  mesh=default_mesh(), progress=False)
    assert os.stat(chunk).st_mtime_ns == stamp  # reused, not recompressed
    np.testing.assert_array_equal(np.asarray(first.table), np.asarray(again.table))
    other_encoder = dict(model.adapters)
    other_encoder["encoder"] = jax.tree_util.tree_map(lambda x: x * 1.01, model.adapters["encoder"])
    variants = {
        "fingerprint": make_clara(setup["sp"], model.config, model.params, other_encoder,
                                  model.model_config),
        "compress_rate: index has 4, expected 2": make_clara(
            setup["sp"], model.config.replace(compress_rate=2), model.params, model.adapters,
            model.model_config),
        "doc_max_length: index has 16, expected 32": make_clara(
            setup["sp"], model.config.replace(doc_max_length=32), model.params,
            model.adapters, model.model_config),
    }
    for what, variant in variants.items():
        with pytest.raises(ValueError, match=f"stale candidate cache: .*{what}"):
            candidate_cache.build_candidate_cache(variant, [records], directory, batch_size=4,
                                                  mesh=default_mesh(), progress=False)


def test_cache_conflicts_with_training_mem_tokens():
    sys.path.insert(0, ROOT)
    from configs import end_to_end
    c = end_to_end.get_config()
    c.optimize_mem_tokens = True
    with pytest.raises(ValueError, match="config.end_to_end.cache_candidates: the memory-token"):
        setup_lib.validate_config(c, n_devices=8)


@pytest.mark.slow
def test_short_stage3_run_with_the_cache(tmp_path):
    sys.path.insert(0, ROOT)
    from configs import end_to_end
    c = end_to_end.get_config()
    c.update(total_steps=2, batch_size=8, log_every=1, eval_every=2, eval_batches=1,
             checkpoint_every=1000, max_len=256, doc_max_length=16, num_candidates=4,
             generation_top_k=2, vocab_size=400)
    c.data.synthetic_entities = 40
    assert c.end_to_end.cache_candidates
    summary = train_lib.train(c, str(tmp_path))
    assert summary["steps"] == 2 and np.isfinite(summary["last"]["loss"])
    assert np.isfinite(summary["last"]["eval_loss"])
    # the official recall@j of the step's top-k (k = 2), in the train and eval rows
    assert {"recall@1", "recall@2", "n_with_pos", "eval_recall@1", "eval_recall@2"} <= set(
        summary["last"]) and 0 <= summary["last"]["recall@2"] <= 1
    meta = json.load(open(tmp_path / "candidate_cache" / "meta.json"))
    assert meta["complete"] and meta["n_mem"] == 4
    records = [json.loads(l) for l in open(tmp_path / "data" / "end_to_end_train.jsonl")]
    records += [json.loads(l) for l in open(tmp_path / "data" / "end_to_end_eval.jsonl")]
    assert meta["num_docs"] == len({d for r in records for d in r["docs"]})


def test_encoder_passes_never_project_to_the_vocabulary(setup):
    import re

    from clara_jax.clara.compress import compress
    from clara_jax.clara.prompts import encode_documents

    model = setup["model"]
    vocab = model.model_config.vocab_size
    ids, mask, _ = encode_documents(model.tokenizer, setup["records"][0]["docs"], DOC_MAX,
                                    model.config.n_mem)
    has_vocab_axis = lambda jaxpr: re.search(rf"\[[0-9,]*,{vocab}\]", str(jaxpr)) is not None
    enc = jax.make_jaxpr(lambda i, m: compress(model.model, model.params,
                                               model.adapters["encoder"], i, m,
                                               model.config.n_mem))(ids, mask)
    full = jax.make_jaxpr(lambda i, m: model.model.apply(
        {"params": model.params, "lora": model.adapters["encoder"]}, i,
        attention_mask=m).logits)(ids, mask)
    assert has_vocab_axis(full) and not has_vocab_axis(enc)
