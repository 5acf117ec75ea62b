"""CLaRa core against Hugging Face + PEFT (float32): Apple-format import, compression, MSE,
stage losses, straight-through top-k gradients, and the Apple round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from clara_jax.clara import generation, losses  # noqa: E402
from clara_jax.clara.compress import compress  # noqa: E402
from clara_jax.clara.config import canonical_stage  # noqa: E402
from clara_jax.clara.formats import apple  # noqa: E402
from clara_jax.clara.formats.hf_mistral import load_hf_mistral  # noqa: E402
from clara_jax.clara.model import Clara  # noqa: E402
from clara_jax.clara.retrieval import encode_queries  # noqa: E402
from clara_jax.clara.tokenizer import train_sentencepiece  # noqa: E402
from clara_jax.data.pipeline import FeatureSpec, featurize_batch  # noqa: E402
from clara_jax.model.mistral import Mistral  # noqa: E402

V0, D, L, H, KV, HD, F = 320, 64, 2, 4, 2, 16, 96
DOC_MAX, RATE = 16, 4
N_MEM = DOC_MAX // RATE
MEM = list(range(V0, V0 + N_MEM))
AE, ENC, SEP = V0 + N_MEM, V0 + N_MEM + 1, V0 + N_MEM + 2
VOCAB = V0 + N_MEM + 3
BOS, EOS, PAD = 1, 2, 1
TOL = 1e-4
WORDS = [f"{a} {b} of the {c} was born in {d}." for a, b, c, d in zip(
    "Ana Bo Cy Dee Eli Fay Gus Hal".split(), "Rok Sel Tam Umi Vey Wex Yol Zan".split(),
    "city firm band club team town guild farm".split(),
    "1901 1922 1933 1944 1955 1966 1977 1988".split())]


def official_topk(logits, k, temperature):
    """The official relaxation (torch), used as the reference for forward and gradient."""
    b, n = logits.shape
    perturbed = logits / max(temperature, 1e-6)
    _, idx = perturbed.topk(k, dim=-1)
    hard = torch.zeros(b, k, n, dtype=logits.dtype).scatter_(2, idx.unsqueeze(-1), 1.0)
    soft = torch.zeros_like(hard)
    taken = torch.zeros(b, n, dtype=logits.dtype)
    for j in range(k):
        masked = perturbed + ((1.0 - taken.detach()) + 1e-8).log()
        soft[:, j, :] = torch.softmax(masked, dim=-1)
        taken = torch.clamp(taken + hard[:, j, :], max=1.0)
    return hard + (soft - soft.detach()), idx


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny Mistral base dir and an Apple-format CLaRa release over it, plus the torch model."""
    torch.manual_seed(0)
    hc = transformers.MistralConfig(
        vocab_size=V0, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, head_dim=HD, intermediate_size=F, rope_theta=1e6,
        rms_norm_eps=1e-5, attn_implementation="eager", bos_token_id=BOS, eos_token_id=EOS)
    hf = transformers.MistralForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    base_dir = tmp_path_factory.mktemp("base")
    hf.save_pretrained(base_dir, safe_serialization=True)
    sp_path = train_sentencepiece(WORDS * 40, str(tmp_path_factory.mktemp("sp") / "sp"), V0)
    (base_dir / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
    hf.resize_token_embeddings(VOCAB)
    with torch.no_grad():
        hf.get_input_embeddings().weight[V0:] = torch.randn(VOCAB - V0, D) * 0.02
        hf.get_output_embeddings().weight[V0:] = torch.randn(VOCAB - V0, D) * 0.02
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    names = ["encoder_adapter", "decoder_adapter", "query_reasoner_adapter"]
    for name in names:
        hf.add_adapter(lcfg, adapter_name=name)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn_like(p) * 0.05)
    hf.eval()
    clara_dir = tmp_path_factory.mktemp("clara")
    torch.save({n: hf.get_adapter_state_dict(n) for n in names}, clara_dir / "adapters.pth")
    torch.save({"model.embed_tokens.weight": hf.get_input_embeddings().weight.detach().clone(),
                "lm_head.weight": hf.get_output_embeddings().weight.detach().clone()},
               clara_dir / "decoder_first_last_layers.pth")
    (clara_dir / "config.json").write_text(json.dumps({
        "doc_max_length": DOC_MAX, "compr_rate": RATE, "lora_r": 4, "sep": True,
        "different_mem_tokens": True, "generation_top_k": 2, "training_stage": "stage2",
        "lora": True, "decoder_model_name": str(base_dir)}))
    base_cfg, base_params = load_hf_mistral(str(base_dir))
    model_cfg, cfg, params, adapters, _ = apple.load_apple(str(clara_dir), base_params, base_cfg)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    adapters = jax.tree_util.tree_map(jnp.asarray, adapters)
    return dict(hf=hf, model=Mistral(model_cfg, cfg.lora), cfg=cfg, model_cfg=model_cfg,
                params=params, adapters=adapters, clara_dir=clara_dir, base_dir=base_dir,
                base=(base_cfg, base_params))


def doc_batch(seed, n_docs):
    """Encoder inputs as the official code builds them: left-padded <ENC><s>text</s>, then MEMs."""
    rng = np.random.RandomState(seed)
    ids = np.full((n_docs, DOC_MAX + 3 + N_MEM), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i in range(n_docs):
        text = rng.randint(3, V0, rng.randint(3, DOC_MAX + 1)).tolist()
        row = [ENC, BOS] + text + [EOS]
        row = row[:DOC_MAX + 3]
        ids[i, DOC_MAX + 3 - len(row):DOC_MAX + 3] = row
        mask[i, DOC_MAX + 3 - len(row):] = 1
        ids[i, DOC_MAX + 3:] = MEM
    return ids, mask


def prompt_batch(seed, b, k, length=40):
    """Left-padded decoder prompts with k memory slots (n MEMs + <SEP> each) and an answer."""
    rng = np.random.RandomState(seed)
    ids = np.full((b, length), PAD, np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i in range(b):
        prompt = [BOS] + rng.randint(3, V0, 3).tolist() + (MEM + [SEP]) * k + \
            rng.randint(3, V0, 4).tolist()
        answer = rng.randint(3, V0, rng.randint(2, 6)).tolist() + [EOS]
        row = prompt + answer
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
        labels[i, length - len(answer):] = answer
    return ids, mask, labels


def torch_compress(hf, ids, mask, adapter="encoder_adapter"):
    hf.set_adapter(adapter)
    with torch.no_grad():
        emb = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 output_hidden_states=True).hidden_states[-1]
    is_mem = torch.isin(torch.tensor(ids), torch.tensor(MEM))
    att = torch.tensor(mask).bool()
    mem_m, txt_m = (is_mem & att).float(), (~is_mem & att).float()
    mem_mean = (emb * mem_m[..., None]).sum(1) / mem_m.sum(1, keepdim=True)
    txt_mean = (emb * txt_m[..., None]).sum(1) / txt_m.sum(1, keepdim=True)
    mse = torch.nn.functional.mse_loss(txt_mean, mem_mean)
    return emb[is_mem].reshape(len(ids), N_MEM, D), mse


def torch_generator_loss(hf, states, ids, mask, labels, k):
    hf.set_adapter("decoder_adapter")
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.tensor(ids)).clone()
        first = torch.argmax((torch.tensor(ids) == MEM[0]).int(), dim=1)
        for i in range(len(ids)):
            for j in range(k):
                s = int(first[i]) + j * (N_MEM + 1)
                emb[i, s:s + N_MEM] = states[i * k + j]
        return hf(inputs_embeds=emb, attention_mask=torch.tensor(mask),
                  labels=torch.tensor(labels)).loss


def test_apple_import_shapes_and_config(release):
    cfg, model_cfg, adapters = release["cfg"], release["model_cfg"], release["adapters"]
    assert (cfg.n_mem, cfg.sep, cfg.generation_top_k, cfg.lora.rank) == (N_MEM, True, 2, 4)
    assert model_cfg.vocab_size == VOCAB and cfg.first_mem_token_id == V0
    assert set(adapters) == {"encoder", "decoder", "query_reasoner"}
    assert adapters["encoder"]["layers"]["self_attn"]["o_proj"]["lora_a"].shape == (L, H, HD, 4)


def test_compress_and_mse_match_peft(release):
    ids, mask = doc_batch(0, 5)
    ref_states, ref_mse = torch_compress(release["hf"], ids, mask)
    states, mse = compress(release["model"], release["params"], release["adapters"]["encoder"],
                           jnp.asarray(ids), jnp.asarray(mask), N_MEM)
    assert states.shape == (5, N_MEM, D)
    assert float(jnp.abs(states - ref_states.numpy()).max()) < TOL
    assert abs(float(mse) - float(ref_mse)) < TOL


def test_instruct_loss_matches_peft(release):
    k, b = 2, 3
    doc_ids, doc_mask = doc_batch(1, b * k)
    ids, mask, labels = prompt_batch(2, b, k)
    ref_states, ref_mse = torch_compress(release["hf"], doc_ids, doc_mask)
    ref_ce = torch_generator_loss(release["hf"], ref_states, ids, mask, labels, k)
    batch = {"doc_ids": doc_ids.reshape(b, k, -1), "doc_mask": doc_mask.reshape(b, k, -1),
             "prompt_ids": ids, "prompt_mask": mask, "labels": labels}
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    loss, metrics = losses.compressed_generation_loss(
        release["model"], release["params"], release["adapters"], batch, release["cfg"])
    assert abs(float(metrics["ce_loss"]) - float(ref_ce)) < TOL
    assert abs(float(loss) - float(ref_ce + 0.1 * ref_mse)) < TOL


def end_to_end_batch(seed, b, n_cand):
    doc_ids, doc_mask = doc_batch(seed, b * n_cand)
    q_ids, q_mask = doc_batch(seed + 100, b)
    ids, mask, labels = prompt_batch(seed + 200, b, 2)
    return {"query_ids": q_ids, "query_mask": q_mask,
            "doc_ids": doc_ids.reshape(b, n_cand, -1), "doc_mask": doc_mask.reshape(b, n_cand, -1),
            "prompt_ids": ids, "prompt_mask": mask, "labels": labels}


def test_end_to_end_loss_matches_peft(release):
    b, n_cand, k = 2, 6, 2
    batch = end_to_end_batch(3, b, n_cand)
    hf = release["hf"]
    docs, _ = torch_compress(hf, batch["doc_ids"].reshape(b * n_cand, -1),
                             batch["doc_mask"].reshape(b * n_cand, -1))
    q, _ = torch_compress(hf, batch["query_ids"], batch["query_mask"], "query_reasoner_adapter")
    docs = docs.reshape(b, n_cand, -1)
    scores = torch.bmm(torch.nn.functional.normalize(q.reshape(b, -1), dim=-1).unsqueeze(1),
                       torch.nn.functional.normalize(docs, dim=-1).transpose(1, 2)).squeeze(1)
    w, idx = official_topk(scores, k, 0.02)
    selected = torch.einsum("bkn,bnd->bkd", w, docs).reshape(b * k, N_MEM, D)
    ref = torch_generator_loss(hf, selected, batch["prompt_ids"], batch["prompt_mask"],
                               batch["labels"], k)
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    loss, metrics = losses.end_to_end_loss(release["model"], release["params"],
                                           release["adapters"], jb, release["cfg"])
    np.testing.assert_array_equal(np.asarray(metrics["topk_indices"]), idx.numpy())
    assert abs(float(loss) - float(ref)) < TOL


def test_end_to_end_gradients_reach_query_reasoner_not_encoder(release):
    batch = jax.tree_util.tree_map(jnp.asarray, end_to_end_batch(4, 2, 6))
    cfg = release["cfg"].replace(temperature=0.5)

    def loss_fn(adapters):
        return losses.end_to_end_loss(release["model"], release["params"], adapters, batch, cfg)[0]

    grads = jax.grad(loss_fn)(release["adapters"])
    norm = {name: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(t))))
            for name, t in grads.items()}
    assert norm["query_reasoner"] > 0 and norm["decoder"] > 0
    assert norm["encoder"] == 0.0


def test_query_states_match_peft(release):
    ids, mask = doc_batch(5, 3)
    ref, _ = torch_compress(release["hf"], ids, mask, "query_reasoner_adapter")
    ours = encode_queries(release["model"], release["params"],
                          release["adapters"]["query_reasoner"], jnp.asarray(ids),
                          jnp.asarray(mask), N_MEM)
    assert float(jnp.abs(ours - ref.reshape(3, -1).numpy()).max()) < TOL


def test_retrieval_pretrain_loss_is_multi_positive_infonce(release):
    batch = end_to_end_batch(6, 2, 6)
    batch["pos_mask"] = np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    loss, _ = losses.retrieval_pretrain_loss(release["model"], release["params"],
                                             release["adapters"], jb, release["cfg"])
    docs, _ = compress(release["model"], release["params"], release["adapters"]["encoder"],
                       jb["doc_ids"].reshape(12, -1), jb["doc_mask"].reshape(12, -1), N_MEM)
    from clara_jax.clara.retrieval import cosine_scores
    q = encode_queries(release["model"], release["params"], release["adapters"]["query_reasoner"],
                       jb["query_ids"], jb["query_mask"], N_MEM)
    s = np.asarray(cosine_scores(q, docs.reshape(2, 6, -1))[0]) / 0.02
    expected = np.log(np.exp(s).sum()) - np.log(np.exp(s[[0, 2]]).sum())  # row 2: no positives
    assert abs(float(loss) - expected) < 1e-3


def test_apple_round_trip_is_identical(release, tmp_path):
    out = tmp_path / "exported"
    apple.save_apple(str(out), release["params"], release["adapters"], release["model_cfg"],
                     release["cfg"])
    base_cfg, base_params = release["base"]
    _, cfg2, params2, adapters2, _ = apple.load_apple(str(out), base_params, base_cfg)
    assert cfg2 == release["cfg"]
    for a, b2 in zip(jax.tree_util.tree_leaves((release["params"], release["adapters"])),
                     jax.tree_util.tree_leaves((params2, adapters2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b2))


def test_bad_adapter_file_names_the_key(release, tmp_path):
    state = torch.load(release["clara_dir"] / "adapters.pth", weights_only=True)
    bad = dict(state["encoder_adapter"])
    key = next(iter(bad))
    bad[key] = bad[key][:, :-1].clone()
    with pytest.raises(ValueError, match="lora_"):
        apple.adapter_from_peft(bad, release["model_cfg"], where="adapters.pth[encoder_adapter]")
    bad = dict(state["encoder_adapter"])
    bad["model.layers.0.self_attn.q_proj.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="bogus"):
        apple.adapter_from_peft(bad, release["model_cfg"])


DOCS = ["Ana Rok of the city was born in 1901.", "Bo Sel founded the firm in 1922.",
        "Cy Tam of the band lives in Zan town.", "Dee Umi was born in the guild of 1944.",
        "Eli Vey leads the club.", "Fay Wex of the team was born in 1966."]


def torch_generate(hf, states, ids, mask, k, max_new_tokens=12):
    hf.set_adapter("decoder_adapter")
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.tensor(ids)).clone()
        first = torch.argmax((torch.tensor(ids) == MEM[0]).int(), dim=1)
        for i in range(len(ids)):
            for j in range(k):
                s = int(first[i]) + j * (N_MEM + 1)
                emb[i, s:s + N_MEM] = torch.as_tensor(states[i, j])
        out = hf.generate(inputs_embeds=emb, attention_mask=torch.tensor(mask),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                          eos_token_id=EOS)
    return out.numpy()


@pytest.fixture(scope="module")
def clara(release):
    return Clara.from_apple(str(release["clara_dir"]), str(release["base_dir"]), batch_size=4)


def test_clara_compress_documents_matches_peft(release, clara):
    from clara_jax.clara import prompts
    ids, mask, _ = prompts.encode_documents(clara.tokenizer, DOCS, DOC_MAX, N_MEM)
    ref, _ = torch_compress(release["hf"], ids.astype(np.int64), mask.astype(np.int64))
    ours = clara.compress_documents(DOCS)  # 6 documents in chunks of 4: padding exercised
    assert ours.shape == (6, N_MEM, D)
    assert float(np.abs(ours - ref.numpy()).max()) < TOL


def test_clara_greedy_generation_matches_peft_generate(release, clara):
    questions = ["Who was born in 1901?", "What did Bo Sel found?", "Where?"]
    docs = [DOCS[0:2], DOCS[2:4], DOCS[4:6]]
    out = clara.generate_from_text(questions, docs, max_new_tokens=12)
    states = clara.compress_documents(sum(docs, [])).reshape(3, 2, N_MEM, D)
    batch = generation.memory_prompts(clara.tokenizer, questions, 2, "instruct",
                                      clara.length_bucket)
    assert batch.input_ids.shape[1] % 64 == 0
    ref = torch_generate(release["hf"], states, batch.input_ids.astype(np.int64),
                         batch.attention_mask.astype(np.int64), 2)
    for row, ref_row in zip(out.token_ids, ref):
        ref_ids = [int(t) for t in ref_row]
        if EOS in ref_ids:
            ref_ids = ref_ids[:ref_ids.index(EOS)]
        assert row == ref_ids[:len(row)] and len(row) == len(ref_ids)
    assert out.texts == [clara.tokenizer.decode(r) .strip() for r in out.token_ids]
    again = clara.generate_from_compressed_documents_and_questions(
        questions, states.reshape(6, N_MEM, D), max_new_tokens=12)
    assert again.token_ids == out.token_ids


def test_clara_generate_from_questions_retrieves_like_reference(release, clara):
    questions = ["Who was born in 1901?", "Who leads the club?"]
    docs = [DOCS[:5], DOCS[1:6]]
    out = clara.generate_from_questions(questions, docs, max_new_tokens=4, k=2)
    states = clara.compress_documents(sum(docs, [])).reshape(2, 5, -1)
    q = clara.encode_questions(questions)
    scores = torch.bmm(torch.nn.functional.normalize(torch.tensor(q), dim=-1).unsqueeze(1),
                       torch.nn.functional.normalize(torch.tensor(states), dim=-1
                                                     ).transpose(1, 2)).squeeze(1)
    _, ref_idx = official_topk(scores, 2, 0.02)
    np.testing.assert_array_equal(out.topk_indices, ref_idx.numpy())
    with pytest.raises(ValueError, match="larger than"):
        clara.generate_from_questions(questions, docs, k=6)


def example_loss(model, question, docs, answer, stage):
    """A stage's loss on one example, in eval mode: the batch from the data pipeline, the loss
    from `losses` (what training computes)."""
    stage = canonical_stage(stage)
    spec = FeatureSpec(stage, model.config.doc_max_length, model.config.n_mem, max_len=512,
                       k=len(docs))
    record = {"question": question, "docs": docs, "answers": [answer], "source": "test:1"}
    batch = featurize_batch([record], model.tokenizer, spec)
    loss, metrics = losses.stage_loss(stage)(model.model, model.params, model.adapters,
                                             jax.tree_util.tree_map(jnp.asarray, batch),
                                             model.config)
    return {"loss": float(loss), "mse_loss": float(metrics["mse_loss"])}


def test_clara_save_load_and_loss(clara, tmp_path):
    clara.save(str(tmp_path / "saved"))
    loaded = Clara.load(str(tmp_path / "saved"), batch_size=4)
    np.testing.assert_array_equal(loaded.compress_documents(DOCS[:2]),
                                  clara.compress_documents(DOCS[:2]))
    a = example_loss(clara, "Who was born in 1901?", DOCS[:2], "Ana Rok", stage="instruct")
    b = example_loss(loaded, "Who was born in 1901?", DOCS[:2], "Ana Rok", stage="stage1_2")
    assert a == b and a["loss"] > 0 and a["mse_loss"] > 0
    with pytest.raises(ValueError, match="unknown stage"):
        example_loss(clara, "q", DOCS[:1], "a", stage="stage9")
    with pytest.raises(ValueError, match="empty"):
        clara.compress_documents(["fine", "  "])


def test_merged_adapters_match_unmerged(release):
    """Inference folds each adapter into a copy of the base; running it unmerged (the
    training path) gives the same states and the same greedy tokens."""
    merged = Clara.from_apple(str(release["clara_dir"]), str(release["base_dir"]), batch_size=4)
    plain = Clara.from_apple(str(release["clara_dir"]), str(release["base_dir"]), batch_size=4,
                             merge_adapters=False)
    for name in ("encoder", "query_reasoner", "decoder"):  # the adapters change the model
        leaves = jax.tree_util.tree_leaves_with_path(merged.adapters[name])
        assert max(float(jnp.abs(x).max()) for path, x in leaves
                   if path[-1].key == "lora_b") > 0.01
    np.testing.assert_allclose(merged.compress_documents(DOCS), plain.compress_documents(DOCS),
                               atol=1e-5)
    assert merged._merged[0][0] == "encoder"
    np.testing.assert_allclose(merged.encode_questions(DOCS[:2]), plain.encode_questions(DOCS[:2]),
                               atol=1e-5)
    questions, docs = ["Who was born in 1901?", "Where?"], [DOCS[0:2], DOCS[2:4]]
    a = merged.generate_from_text(questions, docs, max_new_tokens=8)
    assert a.token_ids == plain.generate_from_text(questions, docs, max_new_tokens=8).token_ids
    assert merged._merged[0][0] == "decoder" and plain._merged is None


def test_shared_prompt_prefix_changes_no_token(release, clara):
    """Generation prefills the instruction text the prompts share once: the same greedy
    tokens as prefilling every row in full, compressed and as text."""
    full = Clara.from_apple(str(release["clara_dir"]), str(release["base_dir"]), batch_size=4,
                            share_prefix=False)
    batch = generation.memory_prompts(clara.tokenizer, ["Who?", "Where was Ana Rok born?"], 2,
                                      "instruct", clara.length_bucket)
    ids, mask, mem, prefix = generation.split_prefix(clara.tokenizer, batch, clara.length_bucket,
                                                     clara.share_prefix)
    first = int(batch.mem_positions[0, 0] - (batch.input_ids.shape[1] -
                                              batch.attention_mask[0].sum()))
    assert prefix.shape == (1, first)  # the instruction text up to the first memory slot
    assert generation.split_prefix(full.tokenizer, batch, full.length_bucket,
                                   full.share_prefix)[3] is None
    from clara_jax.clara import prompts
    # Text prompts share the system message only, even when their documents are the same.
    text = prompts.text_batch(clara.tokenizer, ["Who?", "Where?"], [DOCS[:2], DOCS[:2]], None,
                              max_len=256)
    system = clara.tokenizer.encode(prompts.system_prefix(prompts.SYSTEM_ANSWER))
    assert 0 < generation.split_prefix(clara.tokenizer, text, clara.length_bucket,
                                       clara.share_prefix)[3].shape[1] <= len(system)
    questions, docs = ["Who was born in 1901?", "Where?", "What did Bo Sel found?"], \
        [DOCS[0:2], DOCS[2:4], DOCS[4:6]]
    for call in (lambda m: m.generate_from_text(questions, docs, max_new_tokens=10),
                 lambda m: m.generate_from_full_text(questions, docs, max_new_tokens=10),
                 lambda m: m.generate_closed_book(questions, max_new_tokens=10)):
        assert call(clara).token_ids == call(full).token_ids
