"""Tests of `eqx_dodge.scale_by_adam_dodge` and `eqx_dodge.adam_dodge`."""

# optax types `updates`, `params` and states as array trees; these tests pass `None`
# updates, Equinox models and NamedTuple states, as users of the transforms do.
# pyright: reportArgumentType=false, reportAttributeAccessIssue=false

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge

from .optax_problems import (
    data,
    descent_slopes,
    flat,
    initial,
    Model,
    model_loss,
    P,
    quadratic,
)


@pytest.mark.parametrize(
    "b1, b2, eps, eps_root", [(0.9, 0.999, 1e-8, 0.0), (0.5, 0.9, 1e-3, 1e-6)]
)
def test_linear_loss_matches_optax_adam(b1, b2, eps, eps_root, getkey):
    """With a constant gradient and the exact gradient as candidate, `m̂ = g`, so
    `(g·u)u = c⊙g`: Adam's update, step for step (a schedule included)."""
    slope = {
        "w": jax.random.normal(getkey(), (3, 4)),
        "b": jax.random.normal(getkey(), (5,)),
    }

    def loss(params):
        return optax.tree.vdot(slope, params)

    schedule = optax.linear_schedule(1e-2, 1e-3, 20)
    ours = eqx_dodge.adam_dodge(schedule, b1, b2, eps, eps_root, source="updates")
    reference = optax.adam(schedule, b1, b2, eps, eps_root)

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state, reference_state = carry
            grad = jax.grad(loss)(params)
            updates, state = ours.update(grad, state, params, value_fn=loss)
            expected, reference_state = reference.update(grad, reference_state, params)
            carry = (optax.apply_updates(params, updates), state, reference_state)
            return carry, (flat(updates), flat(expected))

        init = (params, ours.init(params), reference.init(params))
        return jax.lax.scan(step, init, length=20)[1]

    params = jax.tree.map(jnp.zeros_like, slope)
    # optax.adam computes `decay**count` with an int32 count: not strict-clean.
    with jax.numpy_dtype_promotion("standard"):
        updates, expected = run(params)
    np.testing.assert_allclose(updates, expected, rtol=1e-5, atol=1e-9)
    assert jnp.all(jnp.abs(expected) > 1e-4)


def test_float64_matches_optax_adam_to_float64():
    """With `jax_enable_x64` and float64 parameters, the linear-loss comparison
    above holds to float64's precision: catches Adam's bias correction or the
    appendix-A scale `s` computed in float32 (relative errors of 1e-8)."""
    with jax.enable_x64(True):
        slope = {"w": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4)}
        assert slope["w"].dtype == jnp.float64

        def loss(params):
            return optax.tree.vdot(slope, params)

        ours = eqx_dodge.adam_dodge(1e-2, 0.5, 0.9, source="updates")
        reference = optax.adam(1e-2, 0.5, 0.9)
        params = jax.tree.map(jnp.zeros_like, slope)
        state, reference_state = ours.init(params), reference.init(params)
        for _ in range(3):
            grad = jax.grad(loss)(params)
            updates, state = ours.update(grad, state, params, value_fn=loss)
            with jax.numpy_dtype_promotion("standard"):  # optax's `decay**count`
                expected, reference_state = reference.update(
                    grad, reference_state, params
                )
            assert flat(updates).dtype == jnp.float64
            np.testing.assert_allclose(
                flat(updates), flat(expected), rtol=1e-14, atol=0
            )
            params = optax.apply_updates(params, updates)


def test_updates_source_descends_with_any_candidate():
    """The appendix-A step `s·a` is a descent direction for every candidate (the
    random source is Adam on unbiased estimates: a descent direction on average
    only, tested in test_optax_common.py)."""
    optim = optax.chain(
        optax.clip_by_global_norm(1.0),  # clips the candidate: still any candidate
        eqx_dodge.adam_dodge(0.05, source="updates"),
    )
    slopes, scales = descent_slopes(optim)
    assert jnp.all(slopes <= 1e-6 * scales)
    assert jnp.mean(slopes < -1e-6 * scales) > 0.5


@pytest.mark.parametrize(
    "options",
    [
        {"num_directions": 1},
        {"num_directions": 3, "mode": "partition"},
        {"num_directions": 2, "sampler": "gaussian"},
    ],
)
def test_random_source_is_adam_on_dodge_estimates(options):
    """Exactly `chain(dodge(key=...), scale_by_adam())` (same key, same directions):
    catches moments fed anything but the unbiased estimate, or a different step."""
    loss, w0, _ = quadratic()
    ours = eqx_dodge.scale_by_adam_dodge(key=4, **options)
    theirs = optax.chain(eqx_dodge.dodge(key=4, **options), optax.scale_by_adam())

    @jax.jit
    def run(params):
        def step(carry, _):
            params, our_state, their_state = carry
            our_output, our_state = ours.update(None, our_state, params, value_fn=loss)
            their_output, their_state = theirs.update(
                None, their_state, params, value_fn=loss
            )
            params = jax.tree.map(lambda p, o: p - 0.05 * o, params, our_output)
            return (params, our_state, their_state), (
                flat(our_output),
                flat(their_output),
            )

        return jax.lax.scan(
            step, (params, ours.init(params), theirs.init(params)), length=10
        )[1]

    with jax.numpy_dtype_promotion("standard"):  # optax.scale_by_adam needs it
        our_outputs, their_outputs = run(w0)
    np.testing.assert_allclose(our_outputs, their_outputs, rtol=1e-5, atol=1e-7)


def test_random_source_first_steps_and_moments():
    loss, w0, grad = quadratic()
    transform = eqx_dodge.scale_by_adam_dodge(key=3)
    update = jax.jit(lambda s: transform.update(None, s, w0, value_fn=loss))
    state = transform.init(w0)
    output, state = update(state)
    # Step 1: m̂ = ĝ, v̂ = ĝ², so the output is ĝ/(|ĝ| + ε) = sign(d)·u.
    key = jax.random.split(jax.random.key(3))[1]
    u = flat(eqx_dodge.random_direction(key, w0))
    d = flat(grad) @ u
    np.testing.assert_allclose(flat(output), jnp.sign(d) * u, rtol=1e-5)
    np.testing.assert_allclose(flat(state.mu), 0.1 * d * u, rtol=1e-5)
    np.testing.assert_allclose(flat(state.nu), 0.001 * d**2 * u**2, rtol=1e-5)
    # Step 2: the next estimate, from the next split of the stored key, feeds both.
    _, new_state = update(state)
    key = jax.random.split(jax.random.wrap_key_data(state.key))[1]
    u = flat(eqx_dodge.random_direction(key, w0))
    estimate = (flat(grad) @ u) * u
    np.testing.assert_allclose(
        flat(new_state.mu), 0.9 * flat(state.mu) + 0.1 * estimate, rtol=1e-4
    )
    assert new_state.count == 2


def test_zero_candidate_gives_zero_update():
    loss, w0, grad = quadratic()
    optim = eqx_dodge.adam_dodge(1e-2, source="updates")
    zero = jax.tree.map(jnp.zeros_like, grad)
    updates, _ = jax.jit(lambda s: optim.update(zero, s, w0, value_fn=loss))(
        optim.init(w0)
    )
    assert jnp.all(flat(updates) == 0)


def test_equinox_model_and_round_trip(tmp_path, getkey):
    model = Model(getkey())
    x, y = data(getkey())
    optim = optax.chain(
        optax.clip_by_global_norm(1.0),
        eqx_dodge.adam_dodge(
            optax.exponential_decay(0.05, 10, 0.9), key=1, num_directions=2
        ),
    )

    @eqx.filter_jit
    def steps(model, state):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(carry, _):
            params, state = carry
            model = eqx.combine(params, static)
            updates, state = optim.update(
                None, state, model, value_fn=model_loss, x=x, y=y
            )
            return (eqx.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), length=10)
        return eqx.combine(params, static), state

    state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    trained, state = steps(model, state)
    assert model_loss(trained, x, y) < model_loss(model, x, y)
    assert jnp.array_equal(trained.table, model.table)
    path = tmp_path / "state.eqx"
    eqx.tree_serialise_leaves(path, (trained, state))
    template = (model, optim.init(eqx.filter(model, eqx.is_inexact_array)))
    loaded = eqx.tree_deserialise_leaves(path, template)
    assert eqx.tree_equal(steps(*loaded), steps(trained, state))


def test_update_errors():
    loss, w0, _ = quadratic()
    transform = eqx_dodge.scale_by_adam_dodge(source="updates")
    state = transform.init(w0)
    with pytest.raises(ValueError, match="updates"):
        transform.update(None, state, w0, value_fn=loss)
    with pytest.raises(ValueError, match="value_fn"):
        transform.update(initial(jax.random.key(0)), state, w0)
    with pytest.raises(ValueError, match="params"):
        transform.update(initial(jax.random.key(0)), state, None, value_fn=loss)


@pytest.mark.parametrize(
    "options, error, name",
    [
        ({"b1": 1.0}, ValueError, "b1"),
        ({"b2": -0.1}, ValueError, "b2"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"eps_root": -1.0}, ValueError, "eps_root"),
        ({"source": "ema"}, ValueError, "source"),
        ({"source": "random"}, ValueError, "key"),
        ({"source": "updates", "key": 0}, ValueError, "key"),
        ({"source": "updates", "num_directions": 2}, ValueError, "num_directions"),
        ({"source": "updates", "mode": "partition"}, ValueError, "`mode`"),
        ({"key": 0, "num_directions": 0}, ValueError, "num_directions"),
        ({"key": 0, "mode": "sum"}, ValueError, "mode"),
        ({"key": 0, "sampler": "uniform"}, ValueError, "sampler"),
    ],
)
def test_constructor_errors(options, error, name):
    with pytest.raises(error, match=name):
        eqx_dodge.scale_by_adam_dodge(**options)
    with pytest.raises(error, match=name):
        eqx_dodge.adam_dodge(1e-3, **options)


def test_partition_needs_enough_coordinates():
    loss, w0, _ = quadratic()
    transform = eqx_dodge.adam_dodge(
        1e-3, key=0, num_directions=P + 1, mode="partition"
    )
    with pytest.raises(ValueError, match="num_directions"):
        transform.update(None, transform.init(w0), w0, value_fn=loss)
