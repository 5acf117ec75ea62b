"""Parity of the Flax Mistral decoder with Hugging Face's MistralForCausalLM (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clara_jax.clara.formats.hf_mistral import load_hf_mistral  # noqa: E402
from clara_jax.model import decode  # noqa: E402
from clara_jax.model.mistral import Mistral, embed_tokens  # noqa: E402

TOL = 1e-4


def make_hf(tmp_path_factory, sliding_window=None, seed=0):
    torch.manual_seed(seed)
    hc = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, rope_theta=1e6,
        rms_norm_eps=1e-5, sliding_window=sliding_window, attn_implementation="eager",
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.MistralForCausalLM(hc).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm layout cannot hide
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path, safe_serialization=True)
    cfg, params = load_hf_mistral(str(path))
    return hf, cfg, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_hf(tmp_path_factory)


def batch(seed=0, b=3, t=12, pads=(0, 4, 7)):
    ids = np.random.RandomState(seed).randint(3, 128, (b, t))
    mask = np.ones((b, t), np.int64)
    for row, n in enumerate(pads[:b]):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def hf_forward(hf, ids=None, mask=None, embeds=None, positions=None):
    with torch.no_grad():
        out = hf(input_ids=None if ids is None else torch.tensor(ids),
                 inputs_embeds=None if embeds is None else torch.tensor(embeds),
                 attention_mask=None if mask is None else torch.tensor(mask),
                 position_ids=None if positions is None else torch.tensor(positions),
                 output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def max_err(a, b, mask=None):
    a, b = np.asarray(a), np.asarray(b)
    if mask is not None:
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.abs(a - b).max())


def test_logits_and_hidden_states_match_hf(models):
    hf, cfg, params = models
    ids, _ = batch(pads=(0, 0, 0))
    ref_logits, ref_hidden = hf_forward(hf, ids)
    out = Mistral(cfg).apply({"params": params}, jnp.asarray(ids))
    assert max_err(out.logits, ref_logits) < TOL
    assert max_err(out.hidden_states, ref_hidden) < TOL


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padding_matches_hf(models, explicit_positions):
    hf, cfg, params = models
    ids, mask = batch()
    positions = np.asarray(decode.prompt_positions(jnp.asarray(mask))) if explicit_positions \
        else None
    ref_logits, ref_hidden = hf_forward(hf, ids, mask, positions=positions)
    out = Mistral(cfg).apply({"params": params}, jnp.asarray(ids),
                             attention_mask=jnp.asarray(mask),
                             positions=None if positions is None else jnp.asarray(positions))
    assert max_err(out.logits, ref_logits, mask) < TOL
    assert max_err(out.hidden_states, ref_hidden, mask) < TOL


def test_inputs_embeds_match_hf_and_ids(models):
    hf, cfg, params = models
    ids, mask = batch(seed=1)
    embeds = np.asarray(embed_tokens(params, jnp.asarray(ids)))
    embeds = embeds + 0.01 * np.random.RandomState(2).randn(*embeds.shape).astype(np.float32)
    ref_logits, _ = hf_forward(hf, mask=mask, embeds=embeds)
    model = Mistral(cfg)
    out = model.apply({"params": params}, inputs_embeds=jnp.asarray(embeds),
                      attention_mask=jnp.asarray(mask))
    assert max_err(out.logits, ref_logits, mask) < TOL
    from_ids = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    from_embeds = model.apply({"params": params},
                              inputs_embeds=embed_tokens(params, jnp.asarray(ids)),
                              attention_mask=jnp.asarray(mask))
    assert max_err(from_ids.logits, from_embeds.logits) == 0.0


def test_sliding_window_matches_hf(tmp_path_factory):
    hf, cfg, params = make_hf(tmp_path_factory, sliding_window=4, seed=3)
    assert cfg.sliding_window == 4
    ids, _ = batch(seed=4, pads=(0, 0, 0))
    ref_logits, _ = hf_forward(hf, ids)
    out = Mistral(cfg).apply({"params": params}, jnp.asarray(ids))
    assert max_err(out.logits, ref_logits) < TOL
    full = Mistral(cfg.replace(sliding_window=0)).apply({"params": params}, jnp.asarray(ids))
    assert max_err(full.logits, ref_logits) > 1e-3  # the window really changes the result


@pytest.mark.parametrize("mode", [dict(scan_layers=False), dict(remat_policy="full"),
                                  dict(remat_policy="dots", scan_layers=False)])
def test_execution_modes_agree_in_value_and_gradient(models, mode):
    _, cfg, params = models
    ids, mask = batch(seed=5)

    def loss(p, c):
        out = Mistral(c).apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        return jnp.mean(jax.nn.logsumexp(out.logits, -1) * mask)

    ref_v, ref_g = jax.value_and_grad(loss)(params, cfg)
    v, g = jax.value_and_grad(loss)(params, cfg.replace(**mode))
    assert abs(float(v - ref_v)) < 1e-6
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g, ref_g)
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-6


def test_gradients_match_torch_autograd(models):
    hf, cfg, params = models
    ids, mask = batch(seed=6)
    labels = np.where(mask > 0, np.roll(ids, -1, axis=1), -100)
    labels[:, -1] = -100

    hf.zero_grad()
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    logp = torch.log_softmax(out.logits, -1)
    lab = torch.tensor(labels)
    valid = lab >= 0
    nll = -logp.gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    (nll * valid).sum().div(valid.sum()).backward()
    ref_q = hf.model.layers[1].self_attn.q_proj.weight.grad.numpy().T.reshape(64, 4, 16)
    ref_embed = hf.model.embed_tokens.weight.grad.numpy()

    def loss(p):
        logits = Mistral(cfg).apply({"params": p}, jnp.asarray(ids),
                                    attention_mask=jnp.asarray(mask)).logits
        lp = jax.nn.log_softmax(logits, -1)
        lab_j = jnp.asarray(labels)
        nll = -jnp.take_along_axis(lp, jnp.maximum(lab_j, 0)[..., None], -1)[..., 0]
        return jnp.sum(nll * (lab_j >= 0)) / jnp.sum(lab_j >= 0)

    g = jax.grad(loss)(params)
    assert max_err(g["layers"]["self_attn"]["q_proj"]["kernel"][1], ref_q) < 1e-5
    assert max_err(g["embed_tokens"]["embedding"], ref_embed) < 1e-5


def test_greedy_decode_matches_hf_generate(models):
    hf, cfg, params = models
    ids, mask = batch(seed=7)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = ref[:, ids.shape[1]:].numpy()
    out = decode.generate(Mistral(cfg), {"params": params}, input_ids=jnp.asarray(ids),
                          attention_mask=jnp.asarray(mask), max_new_tokens=16, eos_id=2, pad_id=0)
    ours = np.asarray(out.tokens)
    assert ours.shape == (3, 16)
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)


def test_shared_prefix_is_prefilled_once_with_the_same_tokens(models):
    """Rows starting with the same 9 tokens (left padded to different lengths): the prefix
    split off and prefilled once gives Hugging Face's greedy tokens and logits."""
    hf, cfg, params = models
    rng = np.random.default_rng(11)
    common = rng.integers(3, 128, 9)
    rows = [np.concatenate([common, rng.integers(3, 128, n)]) for n in (5, 12, 1)]
    t = 24
    ids = np.zeros((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    prefix, ids_s, mask_s = decode.split_shared_prefix(ids, mask, bucket=8)
    assert prefix.shape == (1, 9) and ids_s.shape == (3, 16)
    assert mask_s.sum(1).tolist() == [5, 12, 1]
    limited, _, mask_l = decode.split_shared_prefix(ids, mask, limit=4, bucket=8)
    assert limited.shape == (1, 4) and mask_l.sum(1).tolist() == [10, 17, 6]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = ref[:, t:].numpy()
    model = Mistral(cfg)
    out = decode.generate(model, {"params": params}, input_ids=jnp.asarray(ids_s),
                          attention_mask=jnp.asarray(mask_s), max_new_tokens=12, eos_id=2,
                          pad_id=0, prefix_ids=jnp.asarray(prefix))
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :ref.shape[1]], ref)


def test_greedy_decode_from_embeds_matches_ids(models):
    _, cfg, params = models
    ids, mask = batch(seed=8)
    model = Mistral(cfg)
    a = decode.generate(model, {"params": params}, input_ids=jnp.asarray(ids),
                        attention_mask=jnp.asarray(mask), max_new_tokens=8)
    b = decode.generate(model, {"params": params},
                        inputs_embeds=embed_tokens(params, jnp.asarray(ids)),
                        attention_mask=jnp.asarray(mask), max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_decode_stops_each_row_at_eos(models):
    _, cfg, params = models
    ids, mask = batch(seed=9)
    model = Mistral(cfg)
    free = decode.generate(model, {"params": params}, input_ids=jnp.asarray(ids),
                           attention_mask=jnp.asarray(mask), max_new_tokens=10, eos_id=-1)
    # Declare the third greedy token of row 0 to be EOS: row 0 must stop there, others go on.
    eos = int(free.tokens[0, 2])
    out = decode.generate(model, {"params": params}, input_ids=jnp.asarray(ids),
                          attention_mask=jnp.asarray(mask), max_new_tokens=10, eos_id=eos,
                          pad_id=0)
    row0 = np.asarray(out.tokens[0])
    first = int(np.argmax(row0 == eos))
    assert first <= 2 and int(out.lengths[0]) == first + 1
    assert np.all(row0[first + 1:] == 0)
    rows = decode.trim(out, eos_id=eos)
    assert len(rows[0]) == first and eos not in rows[0]


def test_sampling_is_seeded_and_top_p_zero_is_greedy(models):
    _, cfg, params = models
    ids, mask = batch(seed=10)
    model = Mistral(cfg)
    kw = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=6,
              eos_id=-1)
    greedy = decode.generate(model, {"params": params}, **kw)
    s1 = decode.generate(model, {"params": params}, temperature=1.0, rng=jax.random.key(1), **kw)
    s2 = decode.generate(model, {"params": params}, temperature=1.0, rng=jax.random.key(1), **kw)
    s3 = decode.generate(model, {"params": params}, temperature=1.0, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(s1.tokens), np.asarray(s2.tokens))
    assert not np.array_equal(np.asarray(s1.tokens), np.asarray(s3.tokens))
    nucleus = decode.generate(model, {"params": params}, temperature=1.0, top_p=1e-6,
                              rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))


def test_bfloat16_compute_is_close_to_float32(models):
    _, cfg, params = models
    ids, mask = batch(seed=11)
    ref = Mistral(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    out = Mistral(cfg.replace(dtype="bfloat16")).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.logits.dtype == jnp.bfloat16
    assert max_err(out.logits.astype(jnp.float32), ref.logits, mask) < 0.1


def test_eight_simulated_devices():
    assert jax.device_count() == 8
