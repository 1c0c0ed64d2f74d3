import jax
import jax.numpy as jnp
from flax import nnx
from jax.flatten_util import ravel_pytree

import eqx_dodge

from .helpers import load_script


example = load_script("examples/flax_nnx.py")


def test_dodge_on_nnx_state_matches_grad_structure_and_descends():
    x, y = example.load_data()
    x, y = x[:64], y[:64]
    model = example.MLP(64, 16, 10, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = example.make_loss(graphdef)
    gradient = jax.grad(loss_fn)(params, x, y)

    @jax.jit
    def estimates(params, gradient):
        random = eqx_dodge.filter_dodge(loss_fn, key=jax.random.key(1))(params, x, y)
        oracle = eqx_dodge.filter_dodge(loss_fn, direction=gradient)(params, x, y)
        return random, oracle

    estimate, oracle = estimates(params, gradient)
    assert jax.tree.structure(estimate) == jax.tree.structure(gradient)
    assert isinstance(estimate, nnx.State)

    # The true gradient as the candidate direction gives it back exactly.
    for a, b in zip(jax.tree.leaves(oracle), jax.tree.leaves(gradient)):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6)

    # Random directions: always a descent direction, g·ĝ = (g·u)² ≥ 0.
    flat_gradient = ravel_pytree(gradient)[0]

    @jax.jit
    @jax.vmap
    def inner(key):
        estimate = eqx_dodge.filter_dodge(loss_fn, key=key)(params, x, y)
        return ravel_pytree(estimate)[0] @ flat_gradient

    assert jnp.all(inner(jax.random.split(jax.random.key(2), 64)) >= 0)


def test_training_nnx_model_with_dodge_reduces_loss():
    x, y = example.load_data()
    model = example.MLP(64, 32, 10, rngs=nnx.Rngs(0))
    graphdef, initial = nnx.split(model, nnx.Param)
    loss_fn = example.make_loss(graphdef)
    params, _ = example.train(
        model,
        x,
        y,
        key=jax.random.key(0),
        num_steps=150,
        learning_rate=example.LEARNING_RATE,
        num_directions=example.NUM_DIRECTIONS,
    )
    before = loss_fn(initial, x, y)
    after = loss_fn(params, x, y)
    assert jnp.isfinite(after) and after < 0.7 * before
