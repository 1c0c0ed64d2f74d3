import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_dodge

from .helpers import load_script


example = load_script("examples/while_loop_model.py")


def test_reverse_mode_raises_and_dodge_trains():
    key = jax.random.key(0)
    data_key, model_key = jax.random.split(key)
    x, y = example.make_data(data_key, 64, 4)
    model = example.FixedPointModel(4, 8, key=model_key)

    # The trip count of the solver depends on the data. (Jitted, as everything
    # below: eagerly, every operation of the loop would compile on its own.)
    iterations = eqx.filter_jit(jax.vmap(lambda xi: model.solve(xi)[1]))(x)
    assert jnp.min(iterations) < jnp.max(iterations)

    with pytest.raises(ValueError, match="Reverse-mode differentiation"):
        eqx.filter_grad(example.loss_fn)(model, x, y)

    # Forward mode goes through the loop: the DODGE estimate along a direction is
    # (g·u)u, and g·u matches a central finite difference of the loss.
    direction = eqx_dodge.random_direction(jax.random.key(1), model)
    # Jitted: eagerly, each operation of the estimator compiles on its own.
    estimate = eqx.filter_jit(
        eqx_dodge.filter_dodge(example.loss_fn, direction=direction)
    )(model, x, y)
    unit = eqx_dodge.diagnostics.cosine_similarity(estimate, direction)
    assert jnp.abs(jnp.abs(unit) - 1) < 1e-5
    params, static = eqx.partition(model, eqx.is_inexact_array)
    norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(direction)))
    step = 1e-2

    @eqx.filter_jit
    def loss_at(t):
        moved = jax.tree.map(lambda p, u: p + t * u / norm, params, direction)
        return example.loss_fn(eqx.combine(moved, static), x, y)

    finite_difference = (loss_at(jnp.float32(step)) - loss_at(jnp.float32(-step))) / (
        2 * step
    )
    derivative = (
        sum(
            jnp.sum(e * u)
            for e, u in zip(jax.tree.leaves(estimate), jax.tree.leaves(direction))
        )
        / norm
    )
    assert jnp.abs(derivative - finite_difference) < 1e-2 * (
        jnp.abs(finite_difference) + 1e-2
    )

    # That DODGE trains the model is checked where the docs run the example
    # (`docs/tutorials/while_loop.md`: the loss halves in 200 steps).
