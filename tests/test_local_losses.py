"""Local losses (Ren et al.'s LG-FG-A and LG-BP) and the local-loss gradient as the
candidate for the global loss (Fournier et al.): targets, unbiasedness, the absence
of cross-block terms, the projection identity, errors."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge

from .helpers import assert_tree_allclose, assert_unbiased, flat, flat_batched


NUM_KEYS = 2**12


def output_loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def random_norm(size, key):
    norm = eqx.nn.LayerNorm(size)
    weight_key, bias_key = jax.random.split(key)
    return eqx.tree_at(
        lambda n: (n.weight, n.bias),
        norm,
        (
            1 + jax.random.normal(weight_key, (size,)),
            jax.random.normal(bias_key, (size,)),
        ),
    )


def make_model() -> eqx_dodge.LocalLosses:
    """Two blocks (a Linear, a LayerNorm with random scales, tanh) and a Linear head
    for each: points and weight-space leaves in both blocks."""
    keys = jax.random.split(jax.random.key(1), 6)

    def block(in_size, out_size, key_linear, key_norm):
        return eqx.nn.Sequential(
            [
                eqx.nn.Linear(in_size, out_size, key=key_linear),
                random_norm(out_size, key_norm),
                eqx.nn.Lambda(jnp.tanh),
            ]
        )

    return eqx_dodge.LocalLosses(
        blocks=[block(3, 4, keys[0], keys[1]), block(4, 4, keys[2], keys[3])],
        heads=[eqx.nn.Linear(4, 2, key=keys[4]), eqx.nn.Linear(4, 2, key=keys[5])],
    )


def make_batch():
    x = jax.random.normal(jax.random.key(2), (4, 3))
    return x, jnp.array([0, 1, 1, 0])


def batch_mean(example_loss):
    def loss(model, x, y):
        return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, 0))(model, x, y))

    return loss


def weighted_local_loss(last_weight):
    """`ℓ_1 + last_weight · ℓ_2` for one example."""

    def loss(model, x, y):
        first, last = model.local_outputs(x)
        return output_loss(first, y) + last_weight * output_loss(last, y)

    return loss


def unstopped_local_loss(model, x, y):
    """The sum of the local losses without `stop_gradient` between the blocks."""
    first = model.heads[0](model.blocks[0](x))
    return output_loss(first, y) + output_loss(model(x), y)


@eqx.filter_jit
def targets(model, x, y):
    def gradient(example_loss):
        return eqx.filter_grad(batch_mean(example_loss))(model, x, y)

    outputs = jax.vmap(model.local_outputs)(x)
    return (
        (outputs[-1], jax.vmap(model)(x)),
        gradient(eqx_dodge.local_loss(output_loss)),
        gradient(weighted_local_loss(0.0)),
        gradient(unstopped_local_loss),
    )


def test_prediction_and_local_target():
    model, (x, y) = make_model(), make_batch()
    (last_output, prediction), target, first_only, unstopped = targets(model, x, y)
    assert_tree_allclose(last_output, prediction)
    # Each block's parameters get exactly their own block's loss gradient...
    assert_tree_allclose(target.blocks[0], first_only.blocks[0])
    assert_tree_allclose(target.heads[0], first_only.heads[0])
    assert not jnp.any(flat(first_only.blocks[1]))
    # ...which is not what the same sum gives without `stop_gradient`.
    assert not jnp.allclose(
        flat(unstopped.blocks[0]), flat(target.blocks[0]), atol=1e-3
    )


@pytest.mark.parametrize("separate_layers", [True, False])
def test_activity_unbiased_for_sum_of_local_losses(separate_layers):
    model, batch = make_model(), make_batch()
    example_loss = eqx_dodge.local_loss(output_loss)
    # Jitted: eagerly, every operation of the backward pass compiles on its own.
    target = eqx.filter_jit(eqx.filter_grad(batch_mean(example_loss)))(model, *batch)

    @jax.jit
    def estimates(keys):
        def one(key):
            return eqx_dodge.activity_dodge(
                example_loss, key=key, separate_layers=separate_layers
            )(model, *batch)

        return flat_batched(jax.vmap(one)(keys))

    samples = estimates(jax.random.split(jax.random.key(0), NUM_KEYS))
    variance = jnp.var(samples, axis=0)
    assert jnp.all(variance > 0)
    assert_unbiased(samples, flat(target), variance)


@ft.partial(jax.jit, static_argnums=1)
def first_block_estimate(last_weight, separate_layers):
    """The estimate of the first block and its head for `ℓ_1 + w ℓ_2`, with the
    same key for every weight `w` (traced: one compilation serves every weight,
    and nothing is folded at compile time)."""
    model, batch = make_model(), make_batch()
    estimate = eqx_dodge.activity_dodge(
        weighted_local_loss(last_weight),
        key=jax.random.key(3),
        separate_layers=separate_layers,
    )(model, *batch)
    return flat((estimate.blocks[0], estimate.heads[0]))


def test_no_signal_from_later_blocks():
    # Separate tangents: the first block's layers and its LayerNorm get exactly the
    # same estimate whatever the last block's loss.
    separate = [
        np.asarray(first_block_estimate(np.float32(w), True)) for w in (1.0, 0.0, 5.0)
    ]
    for other in separate[1:]:
        np.testing.assert_array_equal(other, separate[0])
    # One tangent for all layers: the last loss's noise enters the first block.
    joint = [first_block_estimate(np.float32(w), False) for w in (1.0, 0.0)]
    assert not np.allclose(joint[0], joint[1])


@eqx.filter_jit
def guess_and_references(model, x, y, key):
    """The local-guess estimate, its candidate's local gradient (exact, or the
    activity estimate for `key`) and the global gradient."""
    estimate = eqx_dodge.local_guess_dodge(output_loss, key=key)(model, x, y)
    example_loss = eqx_dodge.local_loss(output_loss)
    if key is None:
        local = eqx.filter_grad(batch_mean(example_loss))(model, x, y)
    else:
        local = eqx_dodge.activity_dodge(example_loss, key=key, separate_layers=True)(
            model, x, y
        )
    global_loss = batch_mean(lambda m, x, y: output_loss(m(x), y))
    return estimate, local, eqx.filter_grad(global_loss)(model, x, y)


def without_auxiliary_head(tree):
    return eqx.tree_at(
        lambda t: t.heads[0], tree, replace_fn=lambda h: jax.tree.map(jnp.zeros_like, h)
    )


@pytest.mark.parametrize("use_key", [False, True])
def test_local_guess_is_projection_of_global_gradient(use_key):
    model, (x, y) = make_model(), make_batch()
    key = jax.random.key(4) if use_key else None
    estimate, local, global_gradient = guess_and_references(model, x, y, key)
    candidate = flat(without_auxiliary_head(local))
    direction = candidate / jnp.linalg.norm(candidate)
    expected = jnp.dot(flat(global_gradient), direction) * direction
    projection = flat(without_auxiliary_head(estimate))
    assert jnp.allclose(projection, expected, rtol=1e-4, atol=1e-6)
    # A descent direction for the global loss (the global gradient is zero on the
    # auxiliary head, which follows its local gradient instead).
    assert jnp.dot(projection, flat(global_gradient)) > 0
    assert not jnp.any(flat(global_gradient.heads[0]))
    assert_tree_allclose(estimate.heads[0], local.heads[0], rtol=1e-5, atol=1e-7)


def test_errors():
    model, (x, y) = make_model(), make_batch()
    # Errors raised while tracing: `filter_eval_shape` checks them without
    # compiling (eagerly, the work before an error compiles op by op).
    trace = eqx.filter_eval_shape
    linear = eqx.nn.Linear(3, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`heads`"):
        eqx_dodge.LocalLosses(blocks=[linear, linear], heads=[linear])
    with pytest.raises(ValueError, match="`blocks`"):
        eqx_dodge.LocalLosses(blocks=[], heads=[])
    with pytest.raises(TypeError, match="`blocks`"):
        eqx_dodge.LocalLosses(blocks=linear, heads=[linear])  # pyright: ignore
    with pytest.raises(TypeError, match=r"`heads\[1\]`"):
        eqx_dodge.LocalLosses(blocks=[linear, linear], heads=[linear, 3])
    # Under the suite's jaxtyping hook, beartype names the argument first.
    with pytest.raises(TypeError, match="output_loss"):
        eqx_dodge.local_loss(3)  # pyright: ignore
    with pytest.raises(TypeError, match="output_loss"):
        eqx_dodge.local_guess_dodge(None)  # pyright: ignore
    with pytest.raises(TypeError, match="`model`"):
        trace(eqx_dodge.local_loss(output_loss), linear, x[0], y[0])
    with pytest.raises(TypeError, match="`model`"):
        trace(eqx_dodge.local_guess_dodge(output_loss), linear, x, y)
    with pytest.raises(TypeError, match="`output_loss`"):
        trace(eqx_dodge.local_loss(lambda logits, y: logits), model, x[0], y[0])
