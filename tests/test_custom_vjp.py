"""Forward mode's hard limit, a `jax.custom_vjp` in the loss: every estimator explains
JAX's bare error the same way, diffrax's forward-mode adjoints train, optimistix's
implicit solutions differentiate exactly, and
`derivative="central"` matches the jvp to its error formula and trains what forward
mode cannot differentiate."""

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from jax.experimental.jet import jet

import eqx_dodge

from .helpers import BAD_OPTIONS, flat


EPS = float(jnp.finfo(jnp.float32).eps)


@jax.custom_vjp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


softplus.defvjp(
    lambda x: (softplus(x), x), lambda x, cotangent: (cotangent * jax.nn.sigmoid(x),)
)


@eqx.filter_custom_vjp
def filter_softplus(vjp_arg):
    return jnp.logaddexp(vjp_arg, 0.0)


@filter_softplus.def_fwd
def _filter_softplus_fwd(perturbed, vjp_arg):
    del perturbed
    return filter_softplus(vjp_arg), None


@filter_softplus.def_bwd
def _filter_softplus_bwd(residuals, cotangent, perturbed, vjp_arg):
    del residuals, perturbed
    return cotangent * jax.nn.sigmoid(vjp_arg)


def mlp(activation, seed=0):
    return eqx.nn.MLP(3, 2, 4, 1, activation=activation, key=jax.random.key(seed))


X = jax.random.normal(jax.random.key(1), (8, 3))
Y = jnp.tanh(X[:, :2] - X[:, 1:])


def squared_loss(model, x, y):
    return jnp.mean(jnp.square(jax.vmap(model)(x) - y))


def assert_explained(error_info):
    message = str(error_info.value)
    for fix in ("diffrax.ForwardMode()", 'kind="lax"', "custom_jvp", "central"):
        assert fix in message
    cause = error_info.value.__cause__
    assert isinstance(cause, TypeError) and "custom_vjp" in str(cause)


# --- The error, from every estimator ------------------------------------------------


def _online(model, key):
    def step(model, state, inputs):
        state = softplus(model(inputs)) - state
        return state, jnp.sum(state**2)

    runner = eqx_dodge.OnlineDodge(step, num_directions=2)
    carry = runner.init(model, jnp.zeros(2), key=key)
    return runner(model, carry, X)[1]


def _optax(transform, model):
    state = transform.init(eqx.filter(model, eqx.is_inexact_array))
    return transform.update(None, state, model, value_fn=squared_loss, x=X, y=Y)[0]


def _activity(model, key):
    def example_loss(model, x, y):
        return jnp.sum(jnp.square(model(x) - y))

    return eqx_dodge.activity_dodge(example_loss, key=key)(model, X, Y)


ESTIMATORS = {
    "filter_dodge": lambda m, k: eqx_dodge.filter_dodge(squared_loss, key=k)(m, X, Y),
    "filter_value_and_dodge k=6": lambda m, k: eqx_dodge.filter_value_and_dodge(
        squared_loss, key=k, num_directions=6
    )(m, X, Y),
    "sharded_dodge": lambda m, k: eqx_dodge.sharded_dodge(
        squared_loss, mesh=jax.make_mesh((1,), ("data",)), key=k
    )(m, X, Y),
    "dodge": lambda m, k: _optax(eqx_dodge.dodge(key=k), m),
    "adam_dodge": lambda m, k: _optax(eqx_dodge.adam_dodge(1e-2, key=k), m),
    "OnlineDodge": _online,
    "activity_dodge": _activity,
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_explains_custom_vjp(name):
    """Under `jit`, as in a training step, JAX raises only when lowering, outside
    eqx_dodge; catches an estimator whose jvp bypasses the shared check."""
    model = mlp(softplus)
    with pytest.raises(TypeError, match="forward mode cannot differentiate") as info:
        eqx.filter_jit(ESTIMATORS[name])(model, jax.random.key(0))
    assert_explained(info)


def _solve(adjoint):
    def loss(rates):
        term = diffrax.ODETerm(lambda t, y, args: -args * y + 1.0)
        solution = diffrax.diffeqsolve(
            term,
            diffrax.Euler(),
            t0=0.0,
            t1=1.0,
            dt0=0.5,
            y0=jnp.ones(3),
            args=rates,
            adjoint=adjoint,
            max_steps=2,
        )
        assert solution.ys is not None
        return jnp.sum(jnp.square(solution.ys[-1] - jnp.array([0.2, 0.5, 0.8])))

    return loss


def _while_loop(kind):
    def loss(scale):
        def body(carry):
            step, value = carry
            return step + 1, jnp.tanh(scale * value)

        final = eqx.internal.while_loop(
            lambda carry: carry[0] < 3, body, (0, jnp.ones(3)), max_steps=3, kind=kind
        )
        return jnp.sum(final[1])

    return loss


def _softplus_sum(activation):
    return lambda x: jnp.sum(activation(x) ** 2)


SOURCES = {
    "jax.custom_vjp": _softplus_sum(softplus),
    "eqx.filter_custom_vjp": _softplus_sum(filter_softplus),
    "diffrax default adjoint": _solve(diffrax.RecursiveCheckpointAdjoint()),
    "while_loop checkpointed": _while_loop("checkpointed"),
}
WHILE_LOOP_FIXES = ("lax", "bounded")
X0 = jnp.array([0.5, 1.0, 2.0])


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_custom_vjp_source_is_explained(name):
    with pytest.raises(TypeError, match="forward mode cannot differentiate") as info:
        eqx_dodge.filter_dodge(SOURCES[name], key=0)(X0)
    assert_explained(info)


@pytest.mark.parametrize("kind", WHILE_LOOP_FIXES)
def test_the_while_loop_fixes_differentiate_exactly(kind):
    """The candidate estimate along the true gradient is the gradient: catches a
    suggested `kind` that forward mode cannot differentiate, or gets wrong."""
    # The reference is reverse mode through the checkpointed loop they replace.
    gradient = jax.jit(jax.grad(SOURCES["while_loop checkpointed"]))(X0)
    estimate = eqx_dodge.filter_dodge(_while_loop(kind), direction=gradient)(X0)
    np.testing.assert_allclose(estimate, gradient, rtol=1e-5, atol=1e-7)


def _train(loss, params, *, steps, learning_rate, **options):
    """SGD on DODGE estimates, one jitted scan; the losses before each step."""

    @jax.jit
    def run(params, keys):
        def step(params, key):
            value, estimate = eqx_dodge.filter_value_and_dodge(
                loss, key=key, **options
            )(params)
            return jax.tree.map(
                lambda p, e: p - learning_rate * e, params, estimate
            ), value

        return jax.lax.scan(step, params, keys)[1]

    return run(params, jax.random.split(jax.random.key(0), steps))


@pytest.mark.parametrize(
    "adjoint, derivative",
    [
        (diffrax.ForwardMode(), "jvp"),
        (diffrax.DirectAdjoint(), "jvp"),
        (diffrax.RecursiveCheckpointAdjoint(), "central"),
    ],
    ids=["ForwardMode", "DirectAdjoint", "default adjoint, central"],
)
def test_diffrax_trains(adjoint, derivative):
    """A neural-ODE-style fit: the two forward-mode adjoints train with DODGE, and
    the default adjoint does with central differences."""
    losses = _train(
        _solve(adjoint), X0, steps=30, learning_rate=0.3, derivative=derivative
    )
    assert losses[-1] < 0.2 * losses[0], losses


def _equilibrium_loss(solve):
    """A deep-equilibrium layer, `y = tanh(W y + x)`, found by an optimistix solver
    inside the loss: optimistix differentiates its solutions implicitly through a
    `custom_jvp`, which forward mode goes through."""

    def loss(layer, x):
        def residual(y, args):
            return y - jnp.tanh(args[0](y) + args[1])

        y = solve(residual, x, (layer, x))
        return jnp.sum(jnp.square(y - 0.3))

    return loss


OPTIMISTIX_SOLVES = {
    "root_find Newton": lambda fn, x, args: (
        optx.root_find(
            fn, optx.Newton(rtol=1e-6, atol=1e-6), jnp.zeros_like(x), args=args
        ).value
    ),
    "least_squares LevenbergMarquardt": lambda fn, x, args: (
        optx.least_squares(
            fn, optx.LevenbergMarquardt(rtol=1e-6, atol=1e-6), jnp.zeros_like(x), args
        ).value
    ),
}


@pytest.mark.parametrize("name", list(OPTIMISTIX_SOLVES))
def test_optimistix_implicit_solutions_are_differentiated_exactly(name):
    """With `mode="partition"` and `k = p`, every parameter gets its own direction
    and the estimate is the gradient: equal to `eqx.filter_grad`'s through the
    solver's implicit adjoint (an estimator that lost the solver's dependence on the
    parameters, or mistook a `custom_jvp` for a `custom_vjp`, would fail)."""
    loss = _equilibrium_loss(OPTIMISTIX_SOLVES[name])
    layer = eqx.nn.Linear(3, 3, key=jax.random.key(0))
    layer = eqx.tree_at(lambda lin: lin.weight, layer, 0.3 * layer.weight)
    x = jnp.array([0.5, -1.0, 2.0])
    p = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(layer, eqx.is_array)))
    estimate = eqx.filter_jit(
        eqx_dodge.filter_dodge(
            loss, num_directions=p, mode="partition", key=jax.random.key(1)
        )
    )(layer, x)
    gradient = eqx.filter_grad(loss)(layer, x)
    np.testing.assert_allclose(flat(estimate), flat(gradient), rtol=1e-4, atol=1e-6)
    assert float(jnp.linalg.norm(flat(gradient))) > 1e-2


# --- Central differences ------------------------------------------------------------

# `derivative="central"` at float32's default step (rounding dominates) and at a step
# where the Taylor terms dominate and can be checked one by one.
SMALL_STEP, LARGE_STEP = 1e-3, 5e-2
NUM_KEYS = 16


def _smooth_loss(model):
    return squared_loss(model, X, Y)


def _derivative(estimate, direction):
    # A k = 1 estimate is `d u` with Rademacher `u`, entries ±1: `d = u·estimate / p`.
    return jnp.vdot(flat(direction), flat(estimate)) / flat(direction).size


@pytest.fixture(scope="module")
def measured():
    """For `NUM_KEYS` Rademacher directions `u_j` on a smooth loss: the derivative by
    jvp, by central differences at both steps, and `L'''`, `L⁽⁵⁾` along `u_j`; all in
    one compilation (the step is a traced argument)."""
    model = mlp(jnp.tanh)

    @jax.jit
    def one(key, step):
        direction = eqx_dodge.random_direction(key, model)

        def derivative(**options):
            estimate = eqx_dodge.filter_dodge(_smooth_loss, key=key, **options)(model)
            return _derivative(estimate, direction)

        def along(t):
            moved = jax.tree.map(lambda u: t * u, direction)
            return _smooth_loss(eqx.apply_updates(model, moved))

        # Taylor-mode: the derivatives of `along` at 0 up to the fifth, in one pass.
        _, series = jet(along, (0.0,), ((1.0, 0.0, 0.0, 0.0, 0.0),))
        return {
            "jvp": derivative(),
            "central": derivative(derivative="central", finite_difference_step=step),
            "third": series[2],
            "fifth": series[4],
        }

    keys = jax.random.split(jax.random.key(7), NUM_KEYS)
    results = {
        step: jax.vmap(one, in_axes=(0, None))(keys, jnp.float32(step))
        for step in (SMALL_STEP, LARGE_STEP)
    }
    gradient = flat(eqx.filter_grad(_smooth_loss)(model))
    params = flat(eqx.filter(model, eqx.is_inexact_array))
    return results, float(_smooth_loss(model)), gradient, params


def _rounding_bound(step, loss, gradient, params):
    """Float32 rounding in the difference quotient: each moved parameter `θ_i ± h`
    is rounded by up to `ε|θ_i ± h|/2`, each loss evaluation by about `8ε|L|` (the
    MLP's few operations and the mean), both divided by `2h`."""
    moved = jnp.sum(jnp.abs(gradient) * (jnp.abs(params) + step))
    return EPS * (8 * abs(loss) + float(moved) / 2) / step


def test_central_matches_jvp_within_the_error_bound(measured):
    """At the default step: `|d_central − d_jvp| ≤ (h²/6)|L'''|` (doubled, for
    `L'''` at an intermediate point) plus the rounding bound. Catches a wrong scale of
    the step or of the quotient; the bound is 0.1% of the gradient's norm."""
    results, loss, gradient, params = measured
    r = results[SMALL_STEP]
    bound = SMALL_STEP**2 / 3 * jnp.abs(r["third"]) + _rounding_bound(
        SMALL_STEP, loss, gradient, params
    )
    assert float(jnp.max(bound)) < 1e-3 * float(jnp.linalg.norm(gradient))
    error = jnp.abs(r["central"] - r["jvp"])
    assert bool(jnp.all(error <= bound)), (error, bound)


def test_central_error_is_the_taylor_remainder(measured):
    """At a large step the error is the Taylor remainder of the central quotient,
    `(h²/6) L''' + (h⁴/120) L⁽⁵⁾`, to within 2% of its first term: catches a forward
    difference (error `(h/2) L''`), a step not along `u` as drawn, or a sign."""
    results, loss, gradient, params = measured
    r = results[LARGE_STEP]
    first = LARGE_STEP**2 / 6 * r["third"]
    remainder = first + LARGE_STEP**4 / 120 * r["fifth"]
    error = r["central"] - r["jvp"]
    rounding = _rounding_bound(LARGE_STEP, loss, gradient, params)
    assert bool(jnp.all(jnp.abs(error - remainder) <= 0.02 * jnp.abs(first) + rounding))


def test_central_chunks_value_and_aux(measured):
    """`k = 16` directions run in chunks (a scan on CPU) are the directions of the
    per-key results above; the estimate is `(1/k) Σ_j d_j u_j` with their central
    derivatives, and the value and aux come from the unperturbed model."""
    results, _, _, _ = measured
    model = mlp(jnp.tanh)

    def with_aux(model):
        return _smooth_loss(model), jax.vmap(model)(X)

    keys = jax.random.split(jax.random.key(7), NUM_KEYS)

    @eqx.filter_jit
    def run(model):
        (value, aux), estimate = eqx_dodge.filter_value_and_dodge(
            with_aux,
            key=jax.random.key(7),
            num_directions=NUM_KEYS,
            derivative="central",
            has_aux=True,
        )(model)
        directions = jax.vmap(lambda k: flat(eqx_dodge.random_direction(k, model)))(
            keys
        )
        return value, aux, flat(estimate), directions, with_aux(model)

    value, aux, estimate, directions, (loss, outputs) = run(model)
    assert value == loss
    np.testing.assert_array_equal(aux, outputs)
    expected = results[SMALL_STEP]["central"] @ directions / NUM_KEYS
    np.testing.assert_allclose(estimate, expected, rtol=1e-5, atol=1e-7)


def test_central_trains_a_model_with_a_custom_vjp():
    """An MLP whose activation is a `jax.custom_vjp`, which forward mode refuses
    (above): central differences train it, four directions per step."""
    model = mlp(softplus)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params):
        return squared_loss(eqx.combine(params, static), X, Y)

    losses = _train(
        loss,
        params,
        steps=150,
        learning_rate=0.05,
        derivative="central",
        num_directions=4,
    )
    assert losses[-1] < 0.3 * losses[0], losses


def test_sharded_central_matches_filter():
    """Two data shards, each perturbed pass all-reducing its loss: the same estimate
    as on one device, up to the rounding of the shard means divided by `2h`."""
    model = mlp(jnp.tanh)
    mesh = jax.make_mesh((2,), ("data",))
    options: dict[str, Any] = dict(key=3, derivative="central", num_directions=2)
    value, estimate = eqx.filter_jit(
        eqx_dodge.sharded_value_and_dodge(squared_loss, mesh=mesh, **options)
    )(model, X, Y)
    single_value, single = eqx_dodge.filter_value_and_dodge(squared_loss, **options)(
        model, X, Y
    )
    np.testing.assert_allclose(value, single_value, rtol=4 * EPS)
    # Each derivative may differ by `2 · 4ε|L| / 2h`; an estimate entry is their mean.
    atol = 8 * EPS * float(single_value) / SMALL_STEP
    np.testing.assert_allclose(flat(estimate), flat(single), atol=atol)


FACTORIES = {
    "filter_dodge": lambda **o: eqx_dodge.filter_dodge(squared_loss, key=0, **o),
    "filter_value_and_dodge": lambda **o: eqx_dodge.filter_value_and_dodge(
        squared_loss, key=0, **o
    ),
    "sharded_dodge": lambda **o: eqx_dodge.sharded_dodge(
        squared_loss, mesh=jax.make_mesh((1,), ("data",)), key=0, **o
    ),
}


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize("options, error, name", BAD_OPTIONS)
def test_bad_derivative_options_name_the_argument(factory, options, error, name):
    with pytest.raises(error, match=name):
        FACTORIES[factory](**options)


# --- Central differences in OnlineDodge ---------------------------------------------


def _online_step(activation):
    def step(model, state, inputs):
        state = jnp.tanh(activation(model(inputs)) + 0.5 * state)
        return state, jnp.sum(state**2)

    return step


def _online_windows(activation, **options):
    """Two windows of a stream (the second starts from the first's carried tangent):
    the estimates and the final carried tangent, for 3 directions."""
    model = mlp(jnp.tanh)
    runner = eqx_dodge.OnlineDodge(
        _online_step(activation), num_directions=3, **options
    )

    @eqx.filter_jit
    def run(model):
        carry = runner.init(model, jnp.zeros(2), key=5)
        _, first, carry = runner(model, carry, X[:4])
        _, second, carry = runner(model, carry, X[4:])
        return jnp.concatenate([flat(first), flat(second), flat(carry.tangent)])

    return run(model)


def test_online_central_differences_carry_the_tangent():
    """`OnlineDodge(derivative="central")` on a step with a `custom_vjp` runs, and
    matches forward mode on the same step without it: the window derivatives and the
    carried tangent (second window included) to the `O(h²)` of central differences.
    The error shrinks fourfold when `h` halves: catches a one-sided difference or a
    tangent carried without the `±h T` start states (both `O(h)`)."""
    exact = _online_windows(lambda x: jnp.logaddexp(x, 0.0))
    central = _online_windows(softplus, derivative="central")
    np.testing.assert_allclose(central, exact, rtol=1e-2, atol=1e-3)

    def error(step):
        moved = _online_windows(
            softplus, derivative="central", finite_difference_step=step
        )
        return float(jnp.linalg.norm(moved - exact))

    ratio = error(0.2) / error(0.1)
    assert 3.0 < ratio < 5.3, ratio


@pytest.mark.parametrize("num_directions", [1, 3])
def test_custom_vjp_whose_derivative_no_output_uses(num_directions):
    """A custom_vjp only in the aux (a diagnostic) or under `stop_gradient` (a
    normaliser) needs no derivative, as `jax.jit(jax.jvp(...))` finds: the estimate
    is exact (partition, k = p), not the custom_vjp `TypeError`. Catches the check
    run before dead-code elimination."""
    w = jnp.array([0.5, -1.0, 2.0])

    def with_aux(w):
        return jnp.sum(w**2), jnp.sum(softplus(w))

    def normalised(w):
        return jnp.sum(w**2) / jax.lax.stop_gradient(jnp.sum(softplus(w)))

    estimate, aux = eqx_dodge.filter_dodge(
        with_aux, has_aux=True, key=0, num_directions=num_directions, mode="partition"
    )(w)
    np.testing.assert_allclose(aux, jnp.sum(softplus(w)), rtol=1e-6)
    other = eqx_dodge.filter_dodge(
        normalised, key=0, num_directions=num_directions, mode="partition"
    )(w)
    if num_directions == 3:
        np.testing.assert_allclose(estimate, 2 * w, rtol=1e-6)
        np.testing.assert_allclose(other, jax.grad(normalised)(w), rtol=1e-6)


def test_pure_callback_points_to_central_differences():
    def loss(w):
        shape = jax.ShapeDtypeStruct(w.shape, w.dtype)
        return jnp.sum(jax.pure_callback(np.tanh, shape, w))

    with pytest.raises(ValueError) as raised:
        eqx_dodge.filter_dodge(loss, key=0)(X0)
    assert 'derivative="central"' in "\n".join(raised.value.__notes__)
    estimate = eqx_dodge.filter_dodge(loss, key=0, derivative="central")(X0)
    assert jnp.all(jnp.isfinite(estimate))
