"""`curvature_aware_dodge`: the nested jvp's second derivative, the Newton step, the
safeguard and its counts, and the transform inside optax."""

# optax types `updates` and states as array trees; these tests index updates as the
# dicts they are and pass `None` updates, as users of the transforms do.
# pyright: reportArgumentType=false, reportIndexIssue=false, reportOptionalSubscript=false

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge
from eqx_dodge._curvature import slope_and_curvature

from .helpers import assert_tree_allclose


A = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
B = jnp.array([1.0, -2.0, 0.5])
W0 = {"w": jnp.array([1.0, 2.0, -1.0])}


def quadratic(params):
    x = params["w"]
    return 0.5 * x @ A @ x - B @ x


def concave(params):
    return -quadratic(params)


def log_cosh(params):
    # Curvature sech²(3) ≈ 0.0099 at w = 3, slope tanh(3): the Newton step lands
    # at w ≈ −98, far uphill.
    return jnp.sum(jnp.log(jnp.cosh(params["w"])))


@jax.jit
def _derivatives_and_references(key):
    """The nested jvp's value, slope and curvature of a two-layer tanh network's
    loss along a random direction, and the references from `jax.grad` and
    `jax.hessian`."""
    keys = jax.random.split(key, 4)
    x = jax.random.normal(keys[0], (8, 3))
    flat = jax.random.normal(keys[1], (4 * 3 + 2 * 4,))
    u = jax.random.normal(keys[2], flat.shape)

    def loss(flat):
        hidden, output = flat[:12].reshape(4, 3), flat[12:].reshape(2, 4)
        predictions = jnp.tanh(x @ hidden.T) @ output.T
        return jnp.mean(jnp.square(predictions - 0.5))

    value, slope, curvature, _ = slope_and_curvature(lambda f: (loss(f), None), flat, u)
    hessian = jax.hessian(loss)(flat)
    references = (loss(flat), jax.grad(loss)(flat) @ u, u @ hessian @ u)
    return (value, slope, curvature), references


def test_nested_jvp_curvature_equals_hessian():
    """`jvp` of `jvp` gives `∇L·u` and `uᵀHu` of a small network as `jax.grad` and
    `jax.hessian` do (float32: agreement to rounding)."""
    ours, references = _derivatives_and_references(jax.random.key(0))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(references), rtol=1e-5)
    # The model is far from linear: a test with zero curvature would prove nothing.
    assert abs(float(ours[2])) > 1e-2


def _first_update(optimizer, loss, params=W0, updates=None):
    state = optimizer.init(params)
    return optimizer.update(updates, state, params, value_fn=loss)


@jax.jit
def _first_updates():
    """The first update and state of each case of the two tests below, in one
    program, and the direction the transform draws from `key=3`."""
    _, step_key = jax.random.split(jax.random.key(3))
    direction = eqx_dodge.random_direction(step_key, W0)["w"]
    w3, one = {"w": jnp.array([3.0])}, {"w": jnp.array([1.0])}

    # Curvature 1e-3 along u = 1: the Newton step would help.
    def shallow(params):
        return 5e-4 * jnp.sum(jnp.square(params["w"])) - params["w"][0]

    steps = {
        "random": _first_update(eqx_dodge.curvature_aware_dodge(0.1, key=3), quadratic),
        "gradient": _first_update(
            eqx_dodge.curvature_aware_dodge(0.1),
            quadratic,
            updates=jax.grad(quadratic)(W0),
        ),
        "concave": _first_update(eqx_dodge.curvature_aware_dodge(0.1, key=3), concave),
        "overshoot": _first_update(
            eqx_dodge.curvature_aware_dodge(0.1), log_cosh, w3, one
        ),
        "no trial": _first_update(
            eqx_dodge.curvature_aware_dodge(0.1, trial=False), log_cosh, w3, one
        ),
        "floor": _first_update(
            eqx_dodge.curvature_aware_dodge(0.1, curvature_floor=1e-2),
            shallow,
            w3,
            one,
        ),
    }
    with_aux = eqx_dodge.curvature_aware_dodge(
        0.1, key=0, has_aux=True, aux_init=jnp.zeros(())
    )
    steps["nan"] = _first_update(
        with_aux, lambda params: (jnp.nan * quadratic(params), jnp.ones(()))
    )
    return direction, steps


def _counts(state) -> tuple[int, int]:
    return int(state.accepted), int(state.rejected)


NP_A, NP_B, NP_W0 = np.asarray(A, np.float64), np.asarray(B), np.asarray(W0["w"])


def _np_quadratic(x):
    return 0.5 * x @ NP_A @ x - NP_B @ x


def test_accepted_step_is_the_line_minimiser():
    """On `½xᵀAx − bᵀx` the Newton step along u is `−(g·u)/(uᵀAu) u`, the exact
    minimiser along u: the loss after it is `L − (g·u)²/(2uᵀAu)`, and no other
    multiple of u does better. Along the gradient it is exact line search."""
    direction, steps = _first_updates()
    g = NP_A @ NP_W0 - NP_B
    for name, u in (("random", np.asarray(direction)), ("gradient", g)):
        update, state = steps[name]
        update = np.asarray(update["w"])
        slope, curvature = g @ u, u @ NP_A @ u
        np.testing.assert_allclose(update, -slope / curvature * u, rtol=1e-5)
        minimum = _np_quadratic(NP_W0) - slope**2 / (2 * curvature)
        after = _np_quadratic(NP_W0 + update)
        np.testing.assert_allclose(after, minimum, rtol=1e-5)
        for t in (0.9, 1.1):
            assert _np_quadratic(NP_W0 + t * update) > after
        assert _counts(state) == (1, 0) and int(state.count) == 1
        np.testing.assert_allclose(state.value, _np_quadratic(NP_W0), rtol=1e-6)
        np.testing.assert_allclose(state.curvature, curvature / (u @ u), rtol=1e-5)


def test_safeguard_falls_back_to_the_plain_step():
    """Negative curvature, a Newton step that raises the loss, and curvature below
    `curvature_floor` all take the plain step `−η (g·u) u` and count as rejected;
    without the trial the overshooting Newton step is taken."""
    direction, steps = _first_updates()
    u = np.asarray(direction)
    concave_gradient = NP_B - NP_A @ NP_W0
    expected = {
        "concave": -0.1 * (concave_gradient @ u) * u,
        "overshoot": [-0.1 * np.tanh(3.0)],
        "floor": [-0.1 * (3e-3 - 1)],
    }
    for name, plain in expected.items():
        update, state = steps[name]
        np.testing.assert_allclose(update["w"], plain, rtol=1e-5, err_msg=name)
        assert _counts(state) == (0, 1), name
    assert float(steps["concave"][1].curvature) < 0
    update, state = steps["no trial"]
    newton = -np.tanh(3.0) * np.cosh(3.0) ** 2
    np.testing.assert_allclose(update["w"], [newton], rtol=1e-4)
    assert _counts(state) == (1, 0)


def test_chains_jits_and_round_trips(tmp_path):
    """A damped Newton step (`optax.scale(0.5)` after it) descends monotonically on
    the quadratic; the state, found by `optax.tree.get`, serialises and resumes to
    the same steps; frozen and non-array leaves get no update."""
    optimizer = optax.chain(
        eqx_dodge.curvature_aware_dodge(1e-2, key=0), optax.scale(0.5)
    )
    params = {"w": W0["w"], "frozen": jnp.ones(2), "n": 3}

    def loss(params):
        frozen = jax.lax.stop_gradient(params["frozen"])
        return quadratic(params) + jnp.sum(frozen) * params["n"]

    @jax.jit
    def steps(params, state):
        def step(carry, _):
            params, state = carry
            updates, state = optimizer.update(None, state, params, value_fn=loss)
            return (eqx.apply_updates(params, updates), state), (loss(params), updates)

        return jax.lax.scan(step, (params, state), length=6)

    trainable = eqx.filter(params, eqx.is_inexact_array)
    (params, state), (losses, updates) = steps(params, optimizer.init(trainable))
    assert updates["n"] is None
    np.testing.assert_array_equal(updates["frozen"], 0)
    assert np.all(np.diff(np.asarray(losses, np.float32)) < 0)
    assert int(optax.tree.get(state, "accepted")) == 6
    path = tmp_path / "state.eqx"
    eqx.tree_serialise_leaves(path, state)
    loaded = eqx.tree_deserialise_leaves(path, optimizer.init(trainable))
    assert_tree_allclose(loaded, state, rtol=0, atol=0)
    assert_tree_allclose(steps(params, loaded), steps(params, state), rtol=0, atol=0)


def test_nonfinite_loss_is_skipped():
    """A NaN loss outputs zeros, counts in `total_notfinite` and in neither
    `accepted` nor `rejected`, and leaves the `aux` of `has_aux` as it was."""
    update, state = _first_updates()[1]["nan"]
    np.testing.assert_array_equal(update["w"], 0)
    assert _counts(state) == (0, 0)
    assert int(state.total_notfinite) == 1 and float(state.aux) == 0


@pytest.mark.parametrize(
    "options, error, name",
    [
        (dict(learning_rate=-1.0), ValueError, "`learning_rate`"),
        (dict(sampler="uniform"), ValueError, "`sampler`"),
        (dict(curvature_floor=-1e-3), ValueError, "`curvature_floor`"),
        (dict(trial=1), TypeError, "trial"),
        (dict(num_directions=2), TypeError, "num_directions"),
        (dict(key="seed"), TypeError, "key"),
    ],
)
def test_bad_arguments_name_the_argument(options, error, name):
    options = dict(learning_rate=0.1) | options
    with pytest.raises(error, match=name):
        eqx_dodge.curvature_aware_dodge(**options)


def test_candidate_needed_without_key():
    optimizer = eqx_dodge.curvature_aware_dodge(0.1)
    update = ft.partial(eqx.filter_eval_shape, optimizer.update)
    with pytest.raises(ValueError, match="updates"):
        update(None, optimizer.init(W0), W0, value_fn=quadratic)
    with pytest.raises(ValueError, match="updates"):
        update({"w": jnp.ones(2)}, optimizer.init(W0), W0, value_fn=quadratic)
