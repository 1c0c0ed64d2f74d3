"""Tests of `eqx_dodge.dodge`, the optax transformation."""

# optax types `updates`, `params` and states as array trees; these tests pass `None`
# updates, Equinox models and NamedTuple states, as users of the transforms do.
# pyright: reportArgumentType=false, reportAttributeAccessIssue=false
# pyright: reportIndexIssue=false

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge

from .helpers import assert_tree_allclose, assert_unbiased, dodge_variance
from .optax_problems import (
    along_keys,
    data,
    descent_slopes,
    flat,
    Model,
    model_loss,
    P,
    quadratic as _quadratic,
)


# The same problem for every test, built once (eagerly it costs a compile per
# operation of its gradient).
quadratic = functools.cache(_quadratic)


def np_flat(tree):
    """`flat` in NumPy, for results already computed (no eager JAX operations,
    each of which would compile on its own)."""
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def np_noise(seed, tree):
    """Standard normal noise shaped like `tree`, from NumPy's generator."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), tree
    )


# -- the three sources ------------------------------------------------------------


def test_updates_source_projects_on_candidate():
    loss, w0, grad = quadratic()
    candidate = jax.tree.map(np.add, grad, np_noise(0, grad))
    transform = eqx_dodge.dodge(source="updates")
    update = jax.jit(ft_update(transform, loss))
    state = transform.init(w0)
    estimate, _ = update(candidate, state, w0)
    c, g = np_flat(candidate), np_flat(grad)
    np.testing.assert_allclose(np_flat(estimate), (g @ c) / (c @ c) * c, rtol=1e-5)
    # The exact gradient as candidate is the oracle; a zero candidate gives zero.
    estimate, _ = update(grad, state, w0)
    np.testing.assert_allclose(np_flat(estimate), g, rtol=1e-5)
    zero = jax.tree.map(np.zeros_like, grad)
    estimate, _ = update(zero, state, w0)
    assert np.all(np_flat(estimate) == 0)


def ft_update(transform, loss):
    def update(updates, state, params):
        return transform.update(updates, state, params, value_fn=loss)

    return update


def test_random_source_matches_filter_dodge(getkey):
    model = Model(getkey())
    x, y = data(getkey())
    key = getkey()
    transform = eqx_dodge.dodge(key=key, num_directions=3)
    state = transform.init(eqx.filter(model, eqx.is_inexact_array))

    # Both in one program (and the keys: eagerly, each operation compiles alone).
    @eqx.filter_jit
    def update_and_reference(model, state, key):
        estimate, state = transform.update(
            None, state, model, value_fn=model_loss, x=x, y=y
        )
        # The state's key is split as `optax.add_noise` does: (next, this step).
        next_key, step_key = jax.random.split(key)
        expected = eqx_dodge.filter_dodge(model_loss, key=step_key, num_directions=3)(
            model, x, y
        )
        return estimate, state, expected, jax.random.key_data(next_key)

    estimate, state, expected, next_key = update_and_reference(model, state, key)
    assert_tree_allclose(estimate, expected, rtol=1e-6, atol=1e-7)
    assert estimate.table is None
    np.testing.assert_array_equal(state.key, next_key)


@pytest.mark.parametrize(
    "num_directions, sampler, mode",
    [
        (1, "rademacher", "average"),
        (3, "gaussian", "average"),
        (4, "rademacher", "partition"),
    ],
)
def test_random_source_unbiased(num_directions, sampler, mode):
    loss, w0, grad = quadratic()
    transform = eqx_dodge.dodge(
        key=0, num_directions=num_directions, sampler=sampler, mode=mode
    )
    n = 20_000
    keys = jax.random.split(jax.random.key(1), n)
    samples = along_keys(transform, transform.init(w0), keys, w0, loss)
    g = flat(grad)
    parts = jnp.arange(P) * num_directions // P if mode == "partition" else None
    variance = dodge_variance(
        g, sampler=sampler, num_directions=num_directions, parts=parts
    )
    assert_unbiased(samples, g, variance)


def test_updates_source_with_exploration_unbiased():
    """Random directions orthogonal to any candidate complete it: unbiased."""
    loss, w0, grad = quadratic()
    candidate = jax.tree.map(np.subtract, np_noise(1, grad), grad)
    transform = eqx_dodge.dodge(source="updates", key=0, num_directions=3)
    n = 20_000
    keys = jax.random.split(jax.random.key(2), n)
    samples = np.asarray(
        along_keys(transform, transform.init(w0), keys, w0, loss, candidate)
    )
    mean = np.mean(samples, axis=0)
    standard_error = np.std(samples, axis=0) / math.sqrt(n)
    c, g = np_flat(candidate), np_flat(grad)
    assert np.all(np.abs(mean - g) < 4 * standard_error)
    # It is far from the projection on the (bad) candidate alone.
    assert np.linalg.norm(mean - g) < 0.1 * np.linalg.norm((g @ c) / (c @ c) * c - g)


@pytest.mark.parametrize("with_candidates", [False, True])
def test_ema_source_converges_to_gradient_direction(with_candidates):
    loss, w0, grad = quadratic()
    g = flat(grad)
    if with_candidates:
        # Noisy candidates (noise as large as the gradient) and no exploration: the
        # average removes the noise, cos ≈ 1 − α‖noise‖²/(4‖g‖²) ≈ 0.997 for α = 0.01.
        transform = eqx_dodge.dodge(source="ema", ema_decay=0.99)
        scale = jnp.linalg.norm(g) / math.sqrt(P)
    else:
        # No candidate: random exploration orthogonal to ḡ; the exploration's noise
        # vanishes as ḡ aligns with g, so the cosine tends to 1.
        transform = eqx_dodge.dodge(
            source="ema", key=0, num_directions=2, ema_decay=0.95
        )
        scale = jnp.zeros(())

    @jax.jit
    def run(state):
        def step(state, key):
            if with_candidates:
                noisy = jax.tree.map(
                    lambda leaf, k: leaf + scale * jax.random.normal(k, leaf.shape),
                    grad,
                    {"b": key, "w": jax.random.fold_in(key, 1)},
                )
                _, state = transform.update(noisy, state, w0, value_fn=loss)
            else:
                _, state = transform.update(None, state, w0, value_fn=loss)
            average = flat(state.average)
            cosine = average @ g / (jnp.linalg.norm(average) * jnp.linalg.norm(g))
            return state, cosine

        keys = jax.random.split(jax.random.key(3), 2000)
        return jax.lax.scan(step, state, keys)[1]

    cosines = np.asarray(run(transform.init(w0)))
    assert np.all(cosines[-100:] > 0.99)
    # Step 0 of the candidate-free run has ḡ = 0 (cosine NaN); it then improves.
    assert cosines[10] < cosines[-1]


def test_ema_falls_back_on_previous_estimate():
    loss, w0, grad = quadratic()
    transform = eqx_dodge.dodge(source="ema", key=0, num_directions=2, ema_decay=0.5)
    state = transform.init(w0)
    update = jax.jit(ft_update(transform, loss))
    estimate, state = update(grad, state, w0)
    np.testing.assert_allclose(np_flat(state.average), 0.5 * np_flat(grad), rtol=1e-6)
    # All-zero updates: the guess is the previous estimate.
    zero = jax.tree.map(np.zeros_like, grad)
    _, new_state = update(zero, state, w0)
    expected = 0.5 * np_flat(state.average) + 0.5 * np_flat(estimate)
    np.testing.assert_allclose(np_flat(new_state.average), expected, rtol=1e-6)
    _, none_state = update(None, state, w0)
    np.testing.assert_allclose(np_flat(none_state.average), expected, rtol=1e-6)


def test_ema_without_guesses_or_exploration_is_refused():
    """One direction and no incoming updates: the average of guesses could never
    leave zero, and every update would be zero. Refused, naming the ways out; with
    exploration (k >= 2 and a key) `None` is fine."""
    loss, w0, _ = quadratic()
    transform = eqx_dodge.dodge(source="ema")
    with pytest.raises(ValueError, match="`updates=None`.*`num_directions >= 2`"):
        transform.update(None, transform.init(w0), w0, value_fn=loss)
    exploring = eqx_dodge.dodge(source="ema", key=0, num_directions=2)
    estimate, _ = exploring.update(None, exploring.init(w0), w0, value_fn=loss)
    assert np.linalg.norm(np_flat(estimate)) > 0


# -- baseline ---------------------------------------------------------------------


def test_baseline_unbiased_with_eq16_variance():
    loss, w0, grad = quadratic()
    g = flat(grad)
    n = 20_000
    keys = jax.random.split(jax.random.key(4), n)
    plain = eqx_dodge.dodge(key=0)
    with_baseline = eqx_dodge.dodge(key=0, baseline_decay=0.9)
    # A baseline close to g (independent of the directions).
    noise = np_noise(2, grad)
    baseline = jax.tree.map(lambda g, n: g + 0.1 * n, grad, noise)
    state = with_baseline.init(w0)._replace(baseline=baseline)
    samples = along_keys(with_baseline, state, keys, w0, loss)
    plain_samples = along_keys(plain, plain.init(w0), keys, w0, loss)
    # Eq 16, deterministic g: the one-direction variance of g − b.
    variance = dodge_variance(g - flat(baseline))
    assert_unbiased(samples, g, variance)
    # Each coordinate is a weighted Rademacher sum, whose kurtosis is at most 3, so
    # the sample variance has relative standard deviation at most sqrt(2/n).
    tolerance = 5 * math.sqrt(2 / n)
    np.testing.assert_allclose(jnp.var(samples, axis=0), variance, rtol=tolerance)
    plain_variance = dodge_variance(g)
    np.testing.assert_allclose(
        jnp.var(plain_samples, axis=0), plain_variance, rtol=tolerance
    )
    assert jnp.all(variance < 0.1 * plain_variance)


def test_baseline_is_moving_average_of_estimates():
    loss, w0, grad = quadratic()
    transform = eqx_dodge.dodge(key=0, baseline_decay=0.9)
    update = jax.jit(ft_update(transform, loss))
    state = transform.init(w0)
    estimate, state = update(None, state, w0)
    # Step 0: the baseline is zero, so the estimate is the plain one.
    plain_transform = eqx_dodge.dodge(key=0)
    plain, _ = jax.jit(ft_update(plain_transform, loss))(
        None, plain_transform.init(w0), w0
    )
    np.testing.assert_allclose(np_flat(estimate), np_flat(plain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np_flat(state.baseline), 0.1 * np_flat(estimate), rtol=1e-6
    )
    # Step 1 uses that baseline as it is (no bias correction: the baseline grows from
    # zero at its own rate, within its stability bound from the first step).
    second, state2 = update(None, state, w0)
    b = np_flat(state.baseline)

    @jax.jit
    def sampled_direction(key_data):
        sample_key = jax.random.split(jax.random.wrap_key_data(key_data))[1]
        return eqx_dodge.random_direction(sample_key, w0)

    u = np_flat(sampled_direction(state.key))
    d = np_flat(grad) @ u
    np.testing.assert_allclose(
        np_flat(second), (d - b @ u) * u + b, rtol=1e-4, atol=1e-4
    )


def test_baseline_early_steps_descend():
    """A baseline with `optax.sgd` on a small regression MLP (33 parameters, decay
    0.99) lowers the loss from the first steps on, as the plain estimate does.
    Catches 0.1's bias-corrected baseline, whose rate is about 1/count in the first
    steps, above its stability bound 2/q: with it this run climbs from 0.34 to 0.87
    by step 20 and overflows by step 60 (measured)."""
    model = eqx.nn.MLP(2, "scalar", 8, 1, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 2))
    y = jnp.sin(x[:, 0]) * jnp.cos(x[:, 1])
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

    @jax.jit
    def losses(params):
        optimizer = optax.chain(
            eqx_dodge.dodge(key=0, baseline_decay=0.99), optax.sgd(1e-2)
        )

        def step(carry, _):
            params, state = carry
            updates, state = optimizer.update(None, state, params, value_fn=loss)
            return (optax.apply_updates(params, updates), state), loss(params)

        return jax.lax.scan(step, (params, optimizer.init(params)), length=120)[1]

    curve = np.asarray(losses(params))
    # Measured: 0.342 at step 0, then 0.297, 0.254, 0.220, 0.195, 0.171 every 20
    # steps (without a baseline 0.299, 0.259, 0.227, 0.208, 0.184).
    assert np.max(curve) == curve[0]
    assert np.all(curve[20::20] < curve[:-20:20])
    assert curve[-1] < 0.6 * curve[0]


@pytest.mark.parametrize("num_directions, mode", [(1, "average"), (3, "partition")])
def test_baseline_converges_to_gradient(num_directions, mode):
    """At `β = 1/q` the baseline error contracts by `1 − 1/q` per step in mean
    square, so at fixed parameters `b → g` and the estimates become exact."""
    loss, w0, grad = quadratic()
    q = P if mode == "average" and num_directions == 1 else math.ceil(P / 3)
    transform = eqx_dodge.dodge(
        key=0, num_directions=num_directions, mode=mode, baseline_decay=1 - 1 / q
    )

    @jax.jit
    def run(state):
        def step(state, _):
            estimate, state = transform.update(None, state, w0, value_fn=loss)
            return state, flat(estimate)

        return jax.lax.scan(step, state, length=40 * q)

    state, estimates = run(transform.init(w0))
    estimates = np.asarray(estimates)
    g = np_flat(grad)
    np.testing.assert_allclose(np_flat(state.baseline), g, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(estimates[-1], g, rtol=1e-3, atol=1e-3)
    assert np.linalg.norm(estimates[0] - g) > 0.1 * np.linalg.norm(g)


def test_baseline_decay_too_small_raises():
    _, w0, _ = quadratic()
    # p = 12 coordinates, one Rademacher direction: q = 12, the rate 1 − decay must
    # be below 2/q = 1/6.
    with pytest.raises(ValueError, match="baseline_decay"):
        eqx_dodge.dodge(key=0, baseline_decay=0.8).init(w0)
    eqx_dodge.dodge(key=0, baseline_decay=0.84).init(w0)


def test_baseline_decay_checked_under_inject_hyperparams():
    """`optax.inject_hyperparams` passes the decay to `init` as a concrete array:
    it is refused there as the float is (it made the baseline's norm 1e18 after 60
    steps at fixed parameters when it was let through)."""
    _, w0, _ = quadratic()
    injected = optax.inject_hyperparams(eqx_dodge.dodge, static_args="num_directions")
    with pytest.raises(ValueError, match="baseline_decay"):
        injected(key=0, baseline_decay=0.8).init(w0)
    injected(key=0, baseline_decay=0.84).init(w0)


def test_baseline_with_no_parameter():
    """A group that owns no floating-point parameter (`optax.masked` with nothing
    selected, integer leaves only) has no baseline to fit: `init` and `update` run,
    as they do without a baseline, and the update is empty."""
    params = {"w": jnp.ones(3), "n": jnp.arange(2)}
    optim = optax.masked(
        eqx_dodge.dodge(key=0, baseline_decay=0.99), {"w": False, "n": False}
    )
    state = optim.init(params)
    updates, _ = optim.update(
        optax.tree.zeros_like(params), state, params, value_fn=lambda p: 0.0
    )
    assert np.all(np.asarray(updates["w"]) == 0)
    eqx_dodge.dodge(key=0, baseline_decay=0.99).init({"n": jnp.arange(2)})


# -- descent ----------------------------------------------------------------------


CONFIGS = [
    ("updates", {}),
    ("ema", {"key": 0, "mode": "partition", "num_directions": 4}),
    ("random", {"key": 0, "num_directions": 4, "mode": "partition"}),
]


@pytest.mark.parametrize("source, options", CONFIGS)
def test_descent_with_any_candidate(source, options):
    """`g·update ≤ 0` at every step, for exact, adversarial, noisy and zero
    candidates, on random non-convex losses. (Not with a baseline: that estimate is
    unbiased but not of the form `(g·u)u`.)"""
    # Clipping keeps the steps bounded on the quartic; it is a positive scaling, so
    # it preserves the sign of `g·update`.
    optim = optax.chain(
        eqx_dodge.dodge(source=source, **options),
        optax.clip_by_global_norm(1.0),
        optax.sgd(0.05),
    )

    slopes, scales = map(np.asarray, descent_slopes(optim))
    assert np.all(slopes <= 1e-6 * scales)
    # Not vacuous: most steps move.
    assert np.mean(slopes < -1e-6 * scales) > 0.5


# -- optax integration ------------------------------------------------------------


def test_chain_with_clip_and_equinox_partition(getkey):
    model = Model(getkey())
    x, y = data(getkey())
    dodge = eqx_dodge.dodge(key=7, num_directions=2)
    optim = optax.chain(dodge, optax.clip_by_global_norm(0.1), optax.sgd(0.5))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = optim.init(params)

    @eqx.filter_jit
    def step(model, state):
        updates, state = optim.update(
            None, state, model, value_fn=lambda m: model_loss(m, x, y)
        )
        return eqx.apply_updates(model, updates), state, updates

    new_model, new_state, updates = step(model, state)

    @eqx.filter_jit
    def estimates(model, params):
        fresh = dodge.init(params)
        estimate, _ = dodge.update(
            None, fresh, model, value_fn=lambda m: model_loss(m, x, y)
        )
        # From the partitioned parameters: `value_fn` recombines.
        partitioned, _ = dodge.update(
            None,
            fresh,
            params,
            value_fn=lambda p: model_loss(eqx.combine(p, static), x, y),
        )
        return estimate, partitioned

    estimate, partitioned = estimates(model, params)
    norm = np.linalg.norm(np_flat(estimate))
    expected = jax.tree.map(lambda e: -0.5 * e * min(1, 0.1 / norm), estimate)
    assert_tree_allclose(updates, expected, rtol=1e-5, atol=1e-7)
    assert jnp.array_equal(new_model.table, model.table)
    assert new_model.activation is jnp.tanh
    # The same estimate from the partitioned parameters.
    assert_tree_allclose(partitioned, estimate, rtol=1e-6, atol=1e-7)
    # Training decreases the loss.
    model_t, state_t = model, state
    for _ in range(30):
        model_t, state_t, _ = step(model_t, state_t)
    loss = eqx.filter_jit(model_loss)
    assert loss(model_t, x, y) < loss(model, x, y)


def test_filter_grad_candidate_on_equinox_model(getkey):
    """`eqx.filter_grad` output (None at the int leaf) is a valid candidate; as the
    exact gradient, the estimate is the gradient itself."""
    model = Model(getkey())
    x, y = data(getkey())
    transform = eqx_dodge.dodge(source="updates")

    @eqx.filter_jit
    def step(model):
        grads = eqx.filter_grad(model_loss)(model, x, y)
        state = transform.init(eqx.filter(model, eqx.is_array))
        estimate, _ = transform.update(
            grads, state, model, value_fn=model_loss, x=x, y=y
        )
        return estimate, grads

    estimate, grads = step(model)
    assert estimate.table is None
    assert_tree_allclose(estimate, grads, rtol=1e-5, atol=1e-7)


def test_value_fn_receives_matching_extra_args(getkey):
    model = Model(getkey())
    x, y = data(getkey())
    transform = eqx_dodge.dodge(key=3)
    state = transform.init(eqx.filter(model, eqx.is_inexact_array))
    by_name, _ = eqx.filter_jit(transform.update)(
        None, state, model, value_fn=model_loss, x=x, y=y, unrelated=jnp.ones(2)
    )
    closure, _ = eqx.filter_jit(transform.update)(
        None, state, model, value_fn=lambda m: model_loss(m, x, y)
    )
    assert_tree_allclose(by_name, closure, rtol=1e-6, atol=1e-7)


def test_multisteps(getkey):
    loss, w0, _ = quadratic()
    dodge = eqx_dodge.dodge(key=11)
    # Accumulate DODGE estimates: MultiSteps after the estimator.
    accumulate = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
    optim = optax.chain(dodge, accumulate.gradient_transformation())

    @jax.jit
    def run(params):
        def step(carry, _):
            state, dodge_state = carry
            updates, state = optim.update(None, state, params, value_fn=loss)
            estimate, dodge_state = dodge.update(
                None, dodge_state, params, value_fn=loss
            )
            return (state, dodge_state), (flat(updates), flat(estimate))

        init = (optim.init(params), dodge.init(params))
        return jax.lax.scan(step, init, length=3)[1]

    # optax's MultiSteps mixes int32 and float32 arrays: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        updates, estimates = map(np.asarray, run(w0))
    assert np.all(updates[:2] == 0)
    np.testing.assert_allclose(
        updates[2], -0.1 * np.mean(estimates, axis=0), rtol=1e-5, atol=1e-7
    )
    # DODGE inside MultiSteps would estimate on the last minibatch only: refused
    # (tests/test_optax_wrappers.py).


@pytest.mark.parametrize(
    "source, options",
    [
        ("random", {"key": 0, "baseline_decay": 0.8, "num_directions": 2}),
        ("ema", {"key": 0, "num_directions": 2}),
        ("updates", {"key": 0, "num_directions": 2}),
    ],
)
def test_state_round_trip(tmp_path, source, options):
    loss, w0, grad = quadratic()
    optim = optax.chain(eqx_dodge.dodge(source=source, **options), optax.sgd(0.01))

    @jax.jit
    def steps(params, state):
        def step(carry, _):
            params, state = carry
            candidate = jax.grad(loss)(params)
            updates, state = optim.update(candidate, state, params, value_fn=loss)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), length=5)[0]

    params, state = steps(w0, optim.init(w0))
    path = tmp_path / "state.eqx"
    eqx.tree_serialise_leaves(path, (params, state))
    template = (w0, optim.init(w0))
    loaded = eqx.tree_deserialise_leaves(path, template)
    assert_tree_allclose(loaded, (params, state), rtol=0, atol=0)
    resumed = steps(*loaded)
    straight = steps(params, state)
    assert_tree_allclose(resumed, straight, rtol=0, atol=0)


# -- errors -----------------------------------------------------------------------


def test_update_errors(getkey):
    loss, w0, grad = quadratic()
    transform = eqx_dodge.dodge(key=0)
    state = transform.init(w0)
    # The checks run while tracing: `filter_eval_shape` traces without compiling
    # (eagerly, the work before an error compiles operation by operation).
    update = functools.partial(eqx.filter_eval_shape, transform.update)
    with pytest.raises(ValueError, match="params"):
        update(None, state, None, value_fn=loss)
    with pytest.raises(ValueError, match="value_fn"):
        update(None, state, w0)
    with pytest.raises(TypeError, match="value_fn"):
        update(None, state, w0, value_fn=3)
    with pytest.raises(TypeError, match="value_fn"):
        update(None, state, w0, value_fn=lambda p: flat(p))
    with pytest.raises(ValueError, match="updates"):
        update({"w": grad["w"]}, state, w0, value_fn=loss)
    candidate = eqx_dodge.dodge(source="updates")
    candidate_update = functools.partial(eqx.filter_eval_shape, candidate.update)
    with pytest.raises(ValueError, match="updates"):
        candidate_update(None, candidate.init(w0), w0, value_fn=loss)
    bad = {"w": grad["w"], "b": grad["b"][:2]}
    with pytest.raises(ValueError, match="updates"):
        candidate_update(bad, candidate.init(w0), w0, value_fn=loss)


@pytest.mark.parametrize(
    "options, error, name",
    [
        ({"source": "forward"}, ValueError, "source"),
        ({"source": "random"}, ValueError, "key"),
        ({"source": "ema", "num_directions": 2}, ValueError, "key"),
        ({"source": "updates", "key": 0}, ValueError, "key"),
        ({"key": "seed"}, TypeError, "key"),
        (
            {"key": jax.random.split(jax.random.key(0), 2)},
            TypeError,  # the type checker: a key array of shape (2,)
            "key",
        ),
        ({"key": 0, "num_directions": 0}, ValueError, "num_directions"),
        ({"key": 0, "num_directions": 1.5}, TypeError, "num_directions"),
        ({"source": "updates", "num_directions": 0}, ValueError, "num_directions"),
        ({"key": 0, "mode": "sum"}, ValueError, "mode"),
        ({"key": 0, "sampler": "u"}, ValueError, "sampler"),
        ({"source": "updates", "mode": "partition"}, ValueError, "mode"),
        ({"source": "ema", "ema_decay": 1.0}, ValueError, "ema_decay"),
        ({"source": "ema", "ema_decay": -0.5}, ValueError, "ema_decay"),
        ({"key": 0, "ema_decay": 0.9}, ValueError, "ema_decay"),
        ({"source": "ema", "baseline_decay": 0.9}, ValueError, "baseline_decay"),
        ({"key": 0, "baseline_decay": 1.0}, ValueError, "baseline_decay"),
    ],
)
def test_constructor_errors(options, error, name):
    with pytest.raises(error, match=name):
        eqx_dodge.dodge(**options)


def test_partition_needs_enough_coordinates():
    loss, w0, _ = quadratic()
    transform = eqx_dodge.dodge(key=0, num_directions=P + 1, mode="partition")
    with pytest.raises(ValueError, match="num_directions"):
        transform.update(None, transform.init(w0), w0, value_fn=loss)
