"""`derivative="central"` in the optax transforms: every source passes it on, with the
step it is given.

The exactness check uses a separable cubic, `L(w) = Σ a_i w_i³/6 + quadratic`. Along a
direction `u`, central differences with step `h` give exactly (no higher Taylor terms)
`∇L·u + (h²/6) Σ a_i u_i³`. With Rademacher entries `u_i = ±1`, `u_i³ = u_i`; with
a candidate of `p` entries `±1` scaled to unit norm, `u_i³ = u_i/p`. Either way the
central estimate of `L` is the jvp estimate of `L + κ (h²/6) a·w` (`κ = 1` or
`1/p`) along the same directions, so a transform that ignores the option (no shift)
or takes another step (another shift) fails it; a quadratic could not tell them
apart, as central differences are exact for it.
"""

# optax types `updates` and states as array trees; these tests index them as the
# dicts and tuples they are, and pass `None` updates, as users of the transforms do.
# pyright: reportArgumentType=false, reportIndexIssue=false, reportAttributeAccessIssue=false

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge

from .helpers import BAD_OPTIONS


P = 4
W0 = {"w": jnp.array([0.3, -0.2, 0.5, 0.1])}
CURVATURE = jnp.array([1.0, -2.0, 1.5, 0.5])
TARGET = jnp.array([0.5, 0.0, 0.2, -0.3])
CANDIDATE = {"w": jnp.array([1.0, -1.0, 1.0, 1.0])}  # entries ±1: ĉ_i³ = ĉ_i / p
STEP = 0.3  # large, so that rounding (ε|L|/h) is far below the shift (h²/6)·a


def cubic(params, shift=0.0):
    w = params["w"]
    return (
        jnp.sum(CURVATURE * w**3) / 6
        + 0.5 * jnp.sum((w - TARGET) ** 2)
        + shift * jnp.dot(CURVATURE, w)
    )


@jax.custom_vjp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


softplus.defvjp(
    lambda x: (softplus(x), x), lambda x, cotangent: (cotangent * jax.nn.sigmoid(x),)
)


def custom_vjp_loss(params):
    return jnp.sum((softplus(params["w"]) - softplus(TARGET)) ** 2)


# name: (factory(**derivative options), whether `updates` is a candidate, κ). The
# candidate sources evaluate the candidate alone (exploration directions would not
# have entries of equal size), except in the training test.
TRANSFORMS = {
    "dodge random": (lambda **o: eqx_dodge.dodge(key=0, num_directions=2, **o), 0, 1),
    "dodge random baseline": (
        lambda **o: eqx_dodge.dodge(key=0, baseline_decay=0.9, **o),
        0,
        1,
    ),
    "dodge updates": (lambda **o: eqx_dodge.dodge(source="updates", **o), 1, 1 / P),
    "dodge ema": (lambda **o: eqx_dodge.dodge(source="ema", **o), 1, 1 / P),
    "adam_dodge random": (
        lambda **o: eqx_dodge.adam_dodge(0.1, key=0, num_directions=2, **o),
        0,
        1,
    ),
    # Adam's first step along candidates of entries ±1 has entries ±1 too.
    "adam_dodge updates": (
        lambda **o: eqx_dodge.adam_dodge(0.1, source="updates", **o),
        1,
        1 / P,
    ),
}


def _updates_and_states(transform, loss, candidate, steps=2):
    """The outputs and states of `steps` updates at `W0`, compiled as one program."""

    def step(state, _):
        updates, state = transform.update(candidate, state, W0, value_fn=loss)
        return state, (updates, state)

    scan = jax.jit(lambda state: jax.lax.scan(step, state, length=steps)[1])
    return scan(transform.init(W0))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_central_is_jvp_of_the_shifted_cubic(name):
    """Two updates (the second with a moved key, a nonzero baseline, Adam's moments).
    Catches a source that ignores `derivative` or `finite_difference_step`, the wrong
    step along Adam's direction, and a recorded value taken at a perturbed point."""
    factory, has_candidate, kappa = TRANSFORMS[name]
    candidate = CANDIDATE if has_candidate else None
    central_updates, central_states = _updates_and_states(
        factory(derivative="central", finite_difference_step=STEP), cubic, candidate
    )

    def shifted(params):
        return cubic(params, shift=kappa * STEP**2 / 6)

    jvp_updates, jvp_states = _updates_and_states(factory(), shifted, candidate)
    # The shift moves the estimates by about 4e-3 to 3e-2: far above the tolerance.
    np.testing.assert_allclose(central_updates["w"], jvp_updates["w"], atol=2e-6)
    values = optax.tree.get(central_states, "value")
    np.testing.assert_allclose(values, jnp.full(2, cubic(W0)), rtol=1e-6)
    # What the updates may hide (Adam's first step is ±1 whatever the estimate): the
    # states, moments and baseline included, but the recorded loss.
    for field in ("mu", "nu", "baseline", "average", "estimate"):
        central = optax.tree.get(central_states, field, default=None)
        jvp = optax.tree.get(jvp_states, field, default=None)
        assert (central is None) == (jvp is None)
        if central is not None:
            np.testing.assert_allclose(central["w"], jvp["w"], atol=2e-6, rtol=1e-5)


# name: (optimizer(**derivative options), whether `updates` is the gradient).
TRAINED = {
    "dodge random": (
        lambda **o: optax.chain(eqx_dodge.dodge(key=0, **o), optax.sgd(0.1)),
        False,
    ),
    "dodge updates": (
        lambda **o: optax.chain(
            eqx_dodge.dodge(source="updates", key=1, num_directions=2, **o),
            optax.sgd(0.1),
        ),
        True,
    ),
    "dodge ema": (
        lambda **o: optax.chain(eqx_dodge.dodge(source="ema", **o), optax.sgd(0.1)),
        True,
    ),
    "adam_dodge random": (lambda **o: eqx_dodge.adam_dodge(0.1, key=0, **o), False),
    "adam_dodge updates": (
        lambda **o: eqx_dodge.adam_dodge(0.05, source="updates", **o),
        True,
    ),
}
START = {"w": jnp.array([2.0, -1.0, 1.5, 0.5])}


@pytest.mark.parametrize("name", list(TRAINED))
def test_custom_vjp_loss_needs_central_and_trains_with_it(name):
    """Catches a transform whose error does not point to `derivative="central"`, and
    one that does not pass the option to its estimator (it would raise) or takes
    wrong derivatives with it (the loss would not fall)."""
    factory, with_gradient = TRAINED[name]

    def run(optimizer, steps):
        def step(carry, _):
            params, state = carry
            gradient = jax.grad(custom_vjp_loss)(params) if with_gradient else None
            updates, state = optimizer.update(
                gradient, state, params, value_fn=custom_vjp_loss
            )
            return (optax.apply_updates(params, updates), state), None

        init = (START, optimizer.init(START))
        scan = jax.jit(lambda carry: jax.lax.scan(step, carry, length=steps)[0][0])
        return custom_vjp_loss(scan(init))

    with pytest.raises(TypeError, match='derivative="central"') as info:
        run(factory(), 1)
    assert "adam_dodge" in str(info.value)
    # 30 steps end at 1% to 6% of the initial loss (2.5); `adam_dodge random`, the
    # slowest with one direction, stays below 6% with keys 0 to 3.
    initial = custom_vjp_loss(START)
    assert run(factory(derivative="central"), 30) < 0.25 * initial


def test_inject_hyperparams():
    """`derivative` stays a static string and `finite_difference_step` is injected
    (an array) and used: catches an injected step replaced by the default, whose
    estimates would miss the shift of the cubic (seen in Adam's first moment)."""
    options = dict(key=0, derivative="central", finite_difference_step=STEP)
    injected = optax.inject_hyperparams(
        eqx_dodge.adam_dodge, static_args=("num_directions",)
    )(learning_rate=0.1, **options)
    state = injected.init(W0)
    assert state.hyperparams["finite_difference_step"].shape == ()
    assert "derivative" not in state.hyperparams
    injected_updates, injected_states = _updates_and_states(injected, cubic, None)
    plain_updates, plain_states = _updates_and_states(
        eqx_dodge.adam_dodge(0.1, **options), cubic, None
    )
    # Injected hyperparameters are float32 arrays: 1 − b2 differs from the plain
    # float's by 1.3e-5 relative (see test_optax_common.py).
    np.testing.assert_allclose(injected_updates["w"], plain_updates["w"], rtol=1e-4)
    mu = optax.tree.get(injected_states, "mu")
    np.testing.assert_allclose(
        mu["w"], optax.tree.get(plain_states, "mu")["w"], rtol=1e-5
    )


BUILDERS = {
    "dodge": lambda **o: eqx_dodge.dodge(key=0, **o),
    "dodge_random": lambda **o: eqx_dodge.dodge_random(0, **o),
    "dodge_updates": lambda **o: eqx_dodge.dodge_updates(**o),
    "dodge_ema": lambda **o: eqx_dodge.dodge_ema(**o),
    "scale_by_adam_dodge": lambda **o: eqx_dodge.scale_by_adam_dodge(key=0, **o),
    "adam_dodge updates": lambda **o: eqx_dodge.adam_dodge(1e-2, source="updates", **o),
}


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("options, error, name", BAD_OPTIONS)
def test_bad_derivative_options_name_the_argument(builder, options, error, name):
    """Catches a builder that forgets `check_derivative_options` (a bad value would
    pass silently or fail deep inside the first `update`)."""
    with pytest.raises(error, match=name):
        BUILDERS[builder](**options)
