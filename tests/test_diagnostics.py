import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eqx_dodge
from eqx_dodge.diagnostics import cosine_similarity, estimator_moments

from .helpers import dodge_variance


def _loss(model, x, y):
    logits = jax.vmap(model)(x)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def _problem(getkey):
    model = eqx.nn.MLP(8, 3, 6, 1, key=getkey())
    x = jax.random.normal(getkey(), (16, 8))
    y = jax.random.randint(getkey(), (16,), 0, 3)
    return model, x, y


def test_cosine_identities(getkey):
    model, x, y = _problem(getkey)
    gradient = eqx.filter_grad(_loss)(model, x, y)
    # `None` leaves (the activations) are skipped.
    assert jnp.allclose(cosine_similarity(gradient, gradient), 1, atol=1e-6)
    negated = jax.tree.map(jnp.negative, gradient)
    assert jnp.allclose(cosine_similarity(negated, gradient), -1, atol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, gradient)
    assert cosine_similarity(zero, gradient) == 0
    scaled = jax.tree.map(lambda leaf: 3 * leaf, gradient)
    assert jnp.allclose(cosine_similarity(scaled, gradient), 1, atol=1e-6)
    # The oracle direction: DODGE along the true gradient returns it.
    oracle = eqx_dodge.filter_dodge(_loss, direction=gradient)(model, x, y)
    assert jnp.allclose(cosine_similarity(oracle, gradient), 1, atol=1e-5)
    # Orthogonal trees.
    a = {"u": jnp.array([1.0, 0.0]), "v": jnp.array([0.0])}
    b = {"u": jnp.array([0.0, 2.0]), "v": jnp.array([0.0])}
    assert cosine_similarity(a, b) == 0
    with pytest.raises(ValueError, match="structure"):
        cosine_similarity(a, {"u": a["u"]})


@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1e12, 1e25])
def test_cosine_of_very_small_or_large_vectors(scale):
    """Parallel vectors give 1 (antiparallel -1) at any float32 scale: catches
    squared norms that underflow to 0 (a cosine of 0) or overflow to inf (0 or
    NaN) once a norm leaves about 1e±19, as a diverging estimate's does."""
    g = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
    big = jax.tree.map(lambda x: scale * x, g)
    np.testing.assert_allclose(cosine_similarity(big, g), 1, rtol=1e-6)
    np.testing.assert_allclose(cosine_similarity(g, big), 1, rtol=1e-6)
    negated = jax.tree.map(jnp.negative, big)
    np.testing.assert_allclose(cosine_similarity(negated, big), -1, rtol=1e-6)


@pytest.mark.parametrize("sampler", ["rademacher", "gaussian"])
def test_random_cosine_squared_is_one_over_p(sampler, getkey):
    model, x, y = _problem(getkey)
    gradient = eqx.filter_grad(_loss)(model, x, y)
    flat = ravel_pytree(gradient)[0]
    p = flat.size
    num_samples = 4096

    @jax.jit
    @jax.vmap
    def squared_cosine(key):
        estimate = eqx_dodge.filter_dodge(_loss, key=key, sampler=sampler)(model, x, y)
        return cosine_similarity(estimate, gradient) ** 2

    samples = squared_cosine(jax.random.split(getkey(), num_samples))
    # cos² = (g·u)² / (‖g‖² ‖u‖²). Rademacher: ‖u‖² = p and
    # E(g·u)⁴ = 3‖g‖⁴ − 2Σg⁴, so Var cos² = (2 − 2Σg⁴/‖g‖⁴)/p². Gaussian: cos² is
    # Beta(1/2, (p−1)/2), of variance 2(p−1)/(p²(p+2)). Both have mean exactly 1/p.
    if sampler == "rademacher":
        kurtosis = jnp.sum(flat**4) / jnp.sum(flat**2) ** 2
        variance = (2 - 2 * kurtosis) / p**2
    else:
        variance = 2 * (p - 1) / (p**2 * (p + 2))
    standard_error = jnp.sqrt(variance / num_samples)
    assert jnp.abs(jnp.mean(samples) - 1 / p) < 5 * standard_error
    # The test can fail: 1/p is several standard errors away from 2/p.
    assert 1 / p > 10 * standard_error


def test_estimator_moments_match_dodge_variance(getkey):
    # Linear loss: the gradient is the constant vector c, so for Rademacher directions
    # the estimate has mean c and per-coordinate variance ‖c‖² − c_i² (DODGE eq 8).
    c = jax.random.normal(getkey(), (12,))
    params = {"w": jnp.zeros(12)}

    def loss(params):
        return jnp.dot(params["w"], c)

    def estimator(key):
        return eqx_dodge.filter_dodge(loss, key=key)(params)

    num_samples = 8192
    mean, variance = jax.jit(estimator_moments, static_argnums=0)(
        estimator, jax.random.split(getkey(), num_samples)
    )
    expected = dodge_variance(c)
    # ĝ_i − c_i = u_i S_i with S_i = Σ_{k≠i} c_k u_k: Var S_i² = 2σ⁴ − 2Σ_{k≠i} c_k⁴.
    fourth = jnp.sum(c**4) - c**4
    mean_error = jnp.sqrt(expected / num_samples)
    variance_error = jnp.sqrt((2 * expected**2 - 2 * fourth) / num_samples)
    assert jnp.all(jnp.abs(mean["w"] - c) < 5 * mean_error)
    assert jnp.all(jnp.abs(variance["w"] - expected) < 5 * variance_error)
    # The check can fail: the Gaussian variance ‖c‖² + c_i² is far from it.
    assert jnp.max(2 * c**2 / variance_error) > 10


def test_estimator_moments_errors_and_none_leaves(getkey):
    with pytest.raises(ValueError, match="at least 2"):
        estimator_moments(lambda key: jnp.zeros(3), jax.random.split(getkey(), 1))
    mean, variance = estimator_moments(
        lambda key: {"a": jax.random.normal(key, (2,)), "b": None},
        jax.random.split(getkey(), 3),
    )
    assert mean["b"] is None and variance["b"] is None
    assert mean["a"].shape == (2,) and variance["a"].shape == (2,)


def test_estimator_moments_refuses_a_single_legacy_key(getkey):
    """`jax.random.PRNGKey(0)` is one key of shape (2,), not two seeds: it would give
    "moments" of two samples. The type hint refuses it under the tests' runtime
    checks; without them (as users run) the function's own check does."""
    unchecked = inspect.unwrap(estimator_moments)
    with pytest.raises(ValueError, match=r"batch of PRNG keys.*shape \(2,\)"):
        unchecked(lambda key: jnp.zeros(3), jax.random.PRNGKey(0))
    legacy_batch = jax.random.split(jax.random.PRNGKey(0), 3)  # shape (3, 2)
    mean, _ = unchecked(lambda key: jax.random.normal(key, (2,)), legacy_batch)
    assert mean.shape == (2,)
    # Floats of a legacy batch's shape are no keys: named `keys`, not the `key`
    # the estimator fails on.
    with pytest.raises(ValueError, match=r"`keys` must be.*dtype float32"):
        unchecked(lambda key: jnp.zeros(3), jnp.zeros((3, 2)))


def test_cosine_similarity_names_leaves_of_other_shapes():
    with pytest.raises(ValueError, match=r"at \['w'\] they are \(3,\) and \(2,\)"):
        cosine_similarity({"w": jnp.ones(3)}, {"w": jnp.ones(2)})
