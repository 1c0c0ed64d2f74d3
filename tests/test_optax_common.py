"""optax's common optimizer tests (optax `_src/alias_test.py`), run on every eqx_dodge
optimizer, and the boundedness of `adam_dodge`'s steps.

The convergence problems and tolerances are optax's own: the parabola from
(−1, 10, 1) and Rosenbrock from (0, 0), 10 000 steps, `rtol = atol = 3e-2`.
"""

# optax types `updates` and states as array trees; these tests index updates as the
# dicts they are and pass `None` updates, as users of the transforms do.
# pyright: reportArgumentType=false, reportIndexIssue=false, reportOptionalSubscript=false

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge
from eqx_dodge._checks import check_int


STEPS = 10_000
TARGET = jnp.array([1.0, -1.0, 2.0])


def parabola(params):
    return jnp.sum(jnp.square(params["w"] - TARGET))


def rosenbrock(params):
    x, y = params["w"][0], params["w"][1]
    return jnp.square(1 - x) + 100 * jnp.square(y - x**2)


PROBLEMS = {
    "parabola": (parabola, jnp.array([-1.0, 10.0, 1.0]), TARGET),
    "rosenbrock": (rosenbrock, jnp.array([0.0, 0.0]), jnp.array([1.0, 1.0])),
}

# (name, factory(p), whether `update` gets the exact gradient as `updates`). The
# learning rate of one random direction for Adam is the measured rule the docs quote
# (benchmarks/adam_problems.py: the largest rate of its grid at which three seeds all
# meet the tolerance on Rosenbrock, 30 times below optax's); SGD keeps optax's own.
OPTIMIZERS = {
    "adam_dodge exact": (
        lambda p: eqx_dodge.adam_dodge(1e-1, key=0, num_directions=p, mode="partition"),
        False,
    ),
    "adam_dodge one direction": (lambda p: eqx_dodge.adam_dodge(3e-3, key=0), False),
    "adam_dodge updates": (
        lambda p: eqx_dodge.adam_dodge(1e-1, source="updates"),
        True,
    ),
    "dodge + sgd exact": (
        lambda p: optax.chain(
            eqx_dodge.dodge(key=0, num_directions=p, mode="partition"),
            optax.sgd(1e-3, momentum=0.9),
        ),
        False,
    ),
    "dodge + sgd one direction": (
        lambda p: optax.chain(eqx_dodge.dodge(key=0), optax.sgd(1e-3)),
        False,
    ),
}


def _run(optimizer, loss, initial, exact_gradient, steps=STEPS):
    params = {"w": initial}
    state = optimizer.init(params)

    def step(carry, _):
        params, state = carry
        updates = jax.grad(loss)(params) if exact_gradient else None
        updates, state = optimizer.update(updates, state, params, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, state), length=steps)
    return params["w"]


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_converges_on_optax_problems(name, problem):
    """Catches an optimizer that does not descend, or whose steps blow up (0.1's
    random-source `adam_dodge` ended at (45, 615) on Rosenbrock)."""
    loss, initial, optimum = PROBLEMS[problem]
    factory, exact_gradient = OPTIMIZERS[name]
    optimizer = factory(initial.shape[0])
    final = jax.jit(ft.partial(_run, optimizer, loss, exact_gradient=exact_gradient))(
        initial
    )
    np.testing.assert_allclose(final, optimum, rtol=3e-2, atol=3e-2)


def _side_by_side(ours, theirs, loss, params, inputs):
    """Runs `ours` (DODGE, from `value_fn`) and `theirs` (optax, from the exact
    gradient) on the same parameters, which follow `theirs`, in one scan over
    `inputs` (extra arguments of the loss); returns both updates at every step."""

    def step(carry, extra):
        params, our_state, their_state = carry
        our_updates, our_state = ours.update(
            None, our_state, params, value_fn=loss, extra=extra
        )
        gradient = jax.grad(loss)(params, extra)
        their_updates, their_state = theirs.update(gradient, their_state, params)
        params = optax.apply_updates(params, their_updates)
        return (params, our_state, their_state), (our_updates, their_updates)

    @jax.jit
    def run(params):
        with jax.numpy_dtype_promotion("standard"):  # optax.adam needs it
            carry = (params, ours.init(params), theirs.init(params))
            return jax.lax.scan(step, carry, inputs)[1]

    return run(params)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_exact_estimates_take_optax_adam_steps(problem):
    """With k = p parts the estimate is the gradient, so the first steps are
    `optax.adam`'s to float tolerance (later ones drift apart by rounding only)."""
    loss, initial, _ = PROBLEMS[problem]
    p = initial.shape[0]
    ours = eqx_dodge.adam_dodge(1e-1, key=3, num_directions=p, mode="partition")
    our_updates, their_updates = _side_by_side(
        ours,
        optax.adam(1e-1),
        lambda params, extra: loss(params),
        {"w": initial},
        jnp.zeros(20),
    )
    np.testing.assert_allclose(
        our_updates["w"], their_updates["w"], rtol=1e-5, atol=1e-7
    )


def _optimizer(name):
    factory, exact_gradient = OPTIMIZERS[name]
    return factory(3), exact_gradient


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_extra_arguments_meant_for_others(name):
    """Catches a transform that forwards every extra argument to `value_fn` (or
    rejects them): `update` must accept arguments meant for other transforms."""
    optimizer, exact_gradient = _optimizer(name)
    params = {"w": jnp.array([-1.0, 10.0, 1.0])}
    state = optimizer.init(params)

    def update(**extra_args):
        updates = jax.grad(parabola)(params) if exact_gradient else None
        return optimizer.update(updates, state, params, value_fn=parabola, **extra_args)

    # The same computation with and without the argument (which implies the same
    # updates), compared as traced programs: nothing needs compiling.
    expected = jax.make_jaxpr(update)()
    got = jax.make_jaxpr(lambda: update(unexpected_argument=1.0))()
    assert str(got) == str(expected)


@pytest.mark.parametrize("name", ["adam_dodge one direction", "adam_dodge exact"])
def test_inject_hyperparams_equals_plain(name):
    """`key` and the float hyperparameters arrive as arrays; the updates must be the
    same as without `inject_hyperparams`."""
    exact = name == "adam_dodge exact"
    options = dict(num_directions=3, mode="partition") if exact else {}
    plain = eqx_dodge.adam_dodge(1e-2, key=5, **options)
    injected = optax.inject_hyperparams(
        eqx_dodge.adam_dodge, static_args=("num_directions",)
    )(learning_rate=1e-2, key=5, **options)
    params = {"w": jnp.array([-1.0, 10.0, 1.0])}

    def run(optimizer, state):
        def step(carry, _):
            params, state = carry
            updates, state = optimizer.update(None, state, params, value_fn=parabola)
            return (optax.apply_updates(params, updates), state), updates["w"]

        return jax.lax.scan(step, (params, state), length=3)[1]

    # Both runs in one program, from the states `init` returns.
    both = jax.jit(lambda p, i: (run(plain, p), run(injected, i)))
    plain_steps, injected_steps = both(plain.init(params), injected.init(params))
    # Injected hyperparameters are float32 arrays: 1 − b2 differs from the plain
    # float's by 1.3e-5 relative, which moves the step by about 6e-6.
    np.testing.assert_allclose(plain_steps, injected_steps, rtol=1e-4)


def test_inject_hyperparams_structural_argument_error():
    """Without `static_args`, `num_directions` arrives as an array: the error names
    it (here beartype's, as the tests check annotations at run time) and, without a
    runtime type checker, says what to do."""
    optimizer = optax.inject_hyperparams(eqx_dodge.adam_dodge)(
        learning_rate=1e-2, key=0
    )
    with pytest.raises(TypeError, match="num_directions"):
        optimizer.init({"w": jnp.zeros(3)})
    with pytest.raises(TypeError, match=r"static_args=\('num_directions',\)"):
        check_int("num_directions", jnp.asarray(1), 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_dtypes_preserved(name, dtype):
    """Catches updates or states promoted to another dtype (optax's
    `test_preserve_dtype`)."""
    optimizer, exact_gradient = _optimizer(name)
    params = {"w": jnp.array([-1.0, 10.0, 1.0], dtype)}

    def loss(params):
        return parabola({"w": params["w"].astype(jnp.float32)}).astype(dtype)

    state = optimizer.init(params)

    def update(state, params):
        updates = jax.grad(loss)(params) if exact_gradient else None
        return optimizer.update(updates, state, params, value_fn=loss)

    # Dtypes are static: tracing the update gives them without compiling it.
    updates, new_state = jax.eval_shape(update, state, params)
    assert updates["w"].dtype == dtype
    assert jax.tree.map(jnp.result_type, new_state) == jax.tree.map(
        jnp.result_type, state
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_is_stable_under_cond(name):
    """`lax.cond` needs both branches to return the same state structure and dtypes
    (optax's `test_state_shape_dtype_shard_stability`)."""
    optimizer, exact_gradient = _optimizer(name)
    params = {"w": jnp.array([-1.0, 10.0, 1.0])}
    state = optimizer.init(params)

    def maybe_update(skip, state):
        updates = jax.grad(parabola)(params) if exact_gradient else None

        def update(state):
            return optimizer.update(updates, state, params, value_fn=parabola)[1]

        return jax.lax.cond(skip, lambda s: s, update, state)

    # `lax.cond` checks its branches while tracing: no need to compile.
    skipped = jax.eval_shape(maybe_update, True, state)
    updated = jax.eval_shape(maybe_update, False, state)
    assert jax.tree.structure(skipped) == jax.tree.structure(updated)


# Every kind of state: the sources of `dodge`, both of `adam_dodge`, and the
# curvature-aware step, each with an `aux_init` array of the user's.
DONATED = {
    "dodge random": lambda **aux: eqx_dodge.dodge(key=0, **aux),
    "dodge updates": lambda **aux: eqx_dodge.dodge(source="updates", **aux),
    "dodge ema": lambda **aux: eqx_dodge.dodge(
        source="ema", num_directions=2, key=0, **aux
    ),
    "adam_dodge random": lambda **aux: eqx_dodge.adam_dodge(1e-2, key=0, **aux),
    "adam_dodge updates": lambda **aux: eqx_dodge.adam_dodge(
        1e-2, source="updates", **aux
    ),
    "curvature_aware_dodge": lambda **aux: eqx_dodge.curvature_aware_dodge(
        1e-2, key=0, **aux
    ),
}


@pytest.mark.parametrize("name", sorted(DONATED))
def test_state_can_be_donated(name):
    """A state donated to a jitted step (`jax.jit(..., donate_argnums=...)`,
    `eqx.filter_jit(donate="all")`, as Equinox's examples train): catches a fresh
    state holding one buffer twice (the zero counters, Adam's zero moments: XLA
    refuses to donate it twice), and a state holding the transform's own key array
    or the user's `aux_init` (the donation deletes it: the next `init` would
    return a deleted array, and the user's array is gone)."""
    aux_init = jnp.zeros(3)
    optimizer = DONATED[name](has_aux=True, aux_init=aux_init)
    params = {"w": jnp.array([-1.0, 10.0, 1.0])}

    def loss(params):
        return parabola(params), params["w"] - TARGET

    @ft.partial(jax.jit, donate_argnums=0)
    def update(state):
        gradient = jax.grad(parabola)(params)
        return optimizer.update(gradient, state, params, value_fn=loss)

    for _ in range(2):  # a second `init` after a donated state
        state = optimizer.init(params)
        for _ in range(2):
            _, state = update(state)
        assert optax.tree.get(state, "count") == 2
    assert not aux_init.is_deleted()


@pytest.mark.parametrize(
    "aux_init, returned",
    [(0.0, "array"), (jnp.array(0.0), "array"), (jnp.zeros(()), "python float")],
    ids=["python float init", "weak init", "python float returned"],
)
def test_aux_compiles_the_step_once(aux_init, returned):
    """A Python float or a weakly typed array as `aux_init`, or as the aux the loss
    returns, was stored as given: after one update the state's aux was a strong
    array, so a jitted step compiled twice. Counts the traces of three steps."""
    # Without skipping, the returned aux is stored as it comes.
    optimizer = eqx_dodge.dodge(
        key=0, has_aux=True, aux_init=aux_init, skip_nonfinite=False
    )
    params = {"w": jnp.array([-1.0, 10.0, 1.0])}

    def loss(params):
        value = parabola(params)
        return value, (value if returned == "array" else 1.0)

    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = optimizer.update(None, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    aux = optax.tree.get(state, "aux")
    assert aux.dtype == jnp.float32 and not aux.weak_type


def test_multi_steps_after_dodge_accumulates_estimates():
    """The documented way to accumulate: `chain(dodge(...), MultiSteps(adam))`. With
    exact estimates it takes `MultiSteps(adam)`'s steps on the mean gradient."""
    multi_steps = optax.MultiSteps(optax.adam(1e-1), every_k_schedule=3)
    ours = optax.chain(
        eqx_dodge.dodge(key=0, num_directions=3, mode="partition"),
        multi_steps.gradient_transformation(),
    )
    our_updates, their_updates = _side_by_side(
        ours,
        multi_steps.gradient_transformation(),
        lambda params, extra: parabola({"w": params["w"] + extra}),
        {"w": jnp.array([-1.0, 10.0, 1.0])},
        0.1 * jnp.arange(7.0),
    )
    assert jnp.any(our_updates["w"] != 0)  # the accumulated steps were taken
    np.testing.assert_allclose(
        our_updates["w"], their_updates["w"], rtol=1e-5, atol=1e-7
    )


# Adam's step per coordinate, |m̂_t|/√v̂_t, is at most
# (1 − b1)/√(1 − b2) · (1 − b1²/b2)^(−1/2) ≈ 7.27 times the learning rate for any
# sequence of inputs (Cauchy–Schwarz on the two moving sums; the bias corrections
# only lower it). Kingma & Ba's (1 − b1)/√(1 − b2) ≈ 3.16 is the case of a single
# nonzero gradient.
ADAM_BOUND = (1 - 0.9) / (1 - 0.999) ** 0.5 / (1 - 0.9**2 / 0.999) ** 0.5
LR = 1e-2
P_BOUNDED = 8
# Per-coordinate gradient scales: zero, tiny, huge and ordinary, then permuted, so
# that coordinates wake up from zero moments and huge ones go quiet.
SCALES = jnp.array([0.0, 1e-12, 1e6, 1.0, 0.0, 1e-12, 1e6, 1.0])
WOKEN = SCALES[jnp.array([2, 3, 0, 1, 6, 7, 4, 5])]


def scaled_loss(params, scale, phase):
    w = params["w"]
    return jnp.sum(scale * jnp.sin(3 * w + phase))


def _scales_over_time(steps=120):
    switch = jnp.arange(steps) >= steps // 2
    return jnp.where(switch[:, None], WOKEN[None], SCALES[None])


@pytest.mark.parametrize(
    "options",
    [
        dict(num_directions=1),
        dict(num_directions=3),
        dict(num_directions=2, mode="partition"),
        dict(num_directions=P_BOUNDED, mode="partition"),
        dict(num_directions=2, sampler="gaussian"),
    ],
)
def test_random_source_steps_are_bounded(options):
    """Catches the 0.1 design, `c ⊙ ĝ` with `c = 1/(√v̂ + ε)` from past moments: a
    coordinate with no signal yet gets `c ≈ 10⁸`."""
    optimizer = eqx_dodge.adam_dodge(LR, key=1, **options)
    params = {"w": jnp.linspace(-1.0, 1.0, P_BOUNDED)}

    def step(carry, inputs):
        params, state = carry
        scale, phase = inputs
        updates, state = optimizer.update(
            None, state, params, value_fn=scaled_loss, scale=scale, phase=phase
        )
        return (optax.apply_updates(params, updates), state), updates["w"]

    scales = _scales_over_time()
    phases = jnp.linspace(0.0, 3.0, scales.shape[0])
    _, steps = jax.jit(lambda c: jax.lax.scan(step, c, (scales, phases)))(
        (params, optimizer.init(params))
    )
    assert jnp.all(jnp.isfinite(steps))
    assert float(jnp.max(jnp.abs(steps))) <= ADAM_BOUND * LR * (1 + 1e-5)


@pytest.mark.parametrize("candidate_scale", [1e-3, 1.0, 1e3])
def test_updates_source_steps_are_bounded_descent_steps(candidate_scale):
    """Catches an unclipped appendix-A step, which grows like ‖g‖/‖c‖ for small
    candidates, and a step that is not a descent direction."""
    optimizer = eqx_dodge.adam_dodge(LR, source="updates")
    params = {"w": jnp.linspace(-1.0, 1.0, P_BOUNDED)}
    key = jax.random.key(0)

    def step(carry, inputs):
        params, state = carry
        scale, phase, key = inputs
        gradient = jax.grad(scaled_loss)(params, scale, phase)
        # A biased candidate: the gradient, rescaled and with noise of its size.
        noise = jax.random.normal(key, (P_BOUNDED,)) * jnp.abs(gradient["w"])
        candidate = {"w": candidate_scale * (gradient["w"] + 0.5 * noise)}
        updates, state = optimizer.update(
            candidate, state, params, value_fn=scaled_loss, scale=scale, phase=phase
        )
        descent = jnp.vdot(updates["w"], gradient["w"])
        return (optax.apply_updates(params, updates), state), (updates["w"], descent)

    scales = _scales_over_time()
    phases = jnp.linspace(0.0, 3.0, scales.shape[0])
    keys = jax.random.split(key, scales.shape[0])
    _, (steps, descents) = jax.jit(
        lambda c: jax.lax.scan(step, c, (scales, phases, keys))
    )((params, optimizer.init(params)))
    assert jnp.all(jnp.isfinite(steps))
    assert float(jnp.max(jnp.abs(steps))) <= ADAM_BOUND * LR * (1 + 1e-5)
    # `updates` is minus the learning rate times the output: g·updates ≤ 0.
    assert float(jnp.max(descents)) <= 0
