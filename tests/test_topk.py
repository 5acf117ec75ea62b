"""straight_through_topk: hard forward, the official relaxation's gradient backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from clara_jax.clara.topk import hard_topk, soft_topk_relaxation, straight_through_topk


def scores(seed=0, b=3, n=7):
    return jax.random.normal(jax.random.key(seed), (b, n))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_forward_is_hard_topk_in_descending_order(k):
    s = scores()
    w, idx = straight_through_topk(s, k, 0.02)
    _, ref = jax.lax.top_k(s, k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(jax.nn.one_hot(ref, 7)))
    assert w.shape == (3, k, 7) and idx.dtype == jnp.int32


def test_backward_equals_autodiff_of_relaxation():
    s = scores(1)
    g = jax.random.normal(jax.random.key(2), (3, 3, 7))
    _, vjp = jax.vjp(lambda x: straight_through_topk(x, 3, 0.5)[0], s)
    _, ref_vjp = jax.vjp(lambda x: soft_topk_relaxation(x, 3, 0.5), s)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]), atol=1e-6)
    assert float(jnp.abs(vjp(g)[0]).max()) > 0


def test_relaxation_gradient_numerically():
    with jax.enable_x64(True):
        s = jax.random.normal(jax.random.key(3), (2, 5), dtype=jnp.float64)
        check_grads(lambda x: soft_topk_relaxation(x, 2, 0.7), (s,), order=1, modes=["rev"])


def test_relaxation_masks_already_chosen_documents():
    s = jnp.array([[3.0, 2.0, 1.0, 0.0]])
    p = soft_topk_relaxation(s, 2, 1.0)
    assert float(p[0, 1, 0]) < 1e-7  # slot 2 cannot pick slot 1's document
    np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-6)


def test_jit_and_vmap():
    s = scores(4)
    f = jax.jit(lambda x: straight_through_topk(x, 2, 0.1))
    w, idx = f(s)
    wv, idxv = jax.vmap(lambda x: straight_through_topk(x[None], 2, 0.1))(s)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idxv[:, 0]))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(wv[:, 0]))


def test_k_larger_than_candidates_raises():
    with pytest.raises(ValueError, match="k=8 is larger than the number of candidates N=7"):
        straight_through_topk(scores(), 8, 0.02)


def test_gradient_ascent_learns_to_select_the_rewarded_document():
    reward = jnp.zeros((1, 6)).at[0, 4].set(1.0)  # only document 4 helps
    s = jnp.zeros((1, 6)).at[0, 0].set(1.0)

    def objective(x):
        w, _ = straight_through_topk(x, 1, 0.5)
        return jnp.sum(w[:, 0] * reward)

    for _ in range(50):
        s = s + 0.5 * jax.grad(objective)(s)
    assert int(hard_topk(s, 1)[1][0, 0]) == 4
