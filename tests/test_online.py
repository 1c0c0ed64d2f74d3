import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge
from eqx_dodge._directions import num_coordinates
from eqx_dodge._online import scan_window

from .helpers import assert_unbiased, dodge_variance


INPUT, HIDDEN, WINDOWS, LENGTH = 2, 3, 3, 5


class RNN(eqx.Module):
    """A recurrent cell and a linear readout, without biases: the estimators treat
    every leaf alike, and each leaf costs its own Threefry hash in every direction
    drawn, a large part of what these tests compile."""

    cell: eqx.Module
    readout: eqx.nn.Linear

    def __init__(self, key, cell_type: type[eqx.Module] = eqx.nn.GRUCell):
        cell_key, readout_key = jax.random.split(key)
        self.cell = cell_type(INPUT, HIDDEN, use_bias=False, key=cell_key)  # pyright: ignore
        self.readout = eqx.nn.Linear(HIDDEN, "scalar", use_bias=False, key=readout_key)


def gru_step(model, state, inputs):
    x, y = inputs
    state = model.cell(x, state)
    return state, jnp.square(model.readout(state) - y)


def lstm_step(model, state, inputs):
    x, y = inputs
    state = model.cell(x, state)
    return state, jnp.square(model.readout(state[0]) - y)


def make_stream(key):
    x_key, y_key = jax.random.split(key)
    xs = jax.random.normal(x_key, (WINDOWS, LENGTH, INPUT))
    ys = jax.random.normal(y_key, (WINDOWS, LENGTH))
    return xs, ys


def run_online(online, model, carry, stream):
    """All windows in one `lax.scan`; returns per-window values, estimates, carry."""

    def body(carry, window):
        value, estimate, carry = online(model, carry, window)
        return carry, (value, estimate)

    carry, (values, estimates) = jax.lax.scan(body, carry, stream)
    return values, estimates, carry


def window_losses(model, state0, stream):
    """Every window's (summed) loss, through the whole history from `state0`."""

    def body(state, window):
        value, (state, _) = scan_window(gru_step, model, state, window, reduction="sum")
        return state, value

    _, values = jax.lax.scan(body, state0, stream)
    return values


@eqx.filter_jit
def window_gradients(model, state0, stream):
    """Row i: the exact (BPTT) gradient of window i's loss, flattened."""
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    jacobian = jax.jacrev(
        lambda _diff: window_losses(eqx.combine(_diff, static), state0, stream)
    )(diff)
    return jnp.concatenate(
        [x.reshape(WINDOWS, -1) for x in jax.tree.leaves(jacobian)], axis=1
    )


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def np_flat(tree):
    """`flat` in NumPy, for results already computed (no eager JAX operations,
    each of which would compile on its own)."""
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_carried_tangent_equals_one_long_jvp(getkey):
    model = RNN(getkey(), eqx.nn.LSTMCell)
    stream = make_stream(getkey())
    state0 = (jnp.zeros(HIDDEN), jnp.zeros(HIDDEN))
    online = eqx_dodge.OnlineDodge(lstm_step, num_directions=4, reduction="sum")
    long_inputs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stream)

    # The windows and the reference, one jvp through the whole stream, in one
    # program (eagerly, every operation of the reference would compile on its own).
    @eqx.filter_jit
    def online_and_long_jvp(model, key):
        carry = online.init(model, state0, key=key)
        values, estimates, carry = run_online(online, model, carry, stream)
        diff, static = eqx.partition(model, eqx.is_inexact_array)

        def long_run(_diff):
            value, (state, _) = scan_window(
                lstm_step,
                eqx.combine(_diff, static),
                state0,
                long_inputs,
                reduction="sum",
            )
            return value, state

        def along(direction):
            return jax.jvp(long_run, (diff,), (direction,))

        return values, estimates, carry, jax.vmap(along)(carry.directions)

    values, estimates, carry, long = online_and_long_jvp(model, getkey())
    (value, state), (derivative, tangent) = long
    np.testing.assert_allclose(np.sum(values), value[0], rtol=1e-5)
    for carried, expected in zip(jax.tree.leaves(carry.tangent), tangent):
        np.testing.assert_allclose(carried, expected, rtol=1e-4, atol=1e-6)
    for carried, expected in zip(jax.tree.leaves(carry.state), state):
        np.testing.assert_allclose(carried, expected[0], rtol=1e-5, atol=1e-7)
    # Σ_windows (1/k) Σ_j d_j u_j with the long jvp's d_j.
    summed = jax.tree.map(lambda e: np.sum(e, axis=0), estimates)
    expected_estimate = jax.tree.map(
        lambda u: np.tensordot(np.asarray(derivative) / 4, u, axes=1),
        carry.directions,
    )
    np.testing.assert_allclose(
        np_flat(summed), np_flat(expected_estimate), rtol=1e-4, atol=1e-5
    )


def test_partition_with_p_parts_is_rtrl(getkey):
    model = RNN(getkey())
    stream = make_stream(getkey())
    state0 = jnp.zeros(HIDDEN)
    p = num_coordinates(model)
    online = eqx_dodge.OnlineDodge(
        gru_step, num_directions=p, mode="partition", reduction="sum"
    )

    @eqx.filter_jit
    def estimates(model, key):
        carry = online.init(model, state0, key=key)
        return run_online(online, model, carry, stream)[1]

    estimate = np.concatenate(
        [
            np.reshape(x, (WINDOWS, -1))
            for x in jax.tree.leaves(estimates(model, getkey()))
        ],
        axis=1,
    )
    exact = window_gradients(model, state0, stream)
    np.testing.assert_allclose(estimate, exact, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampler", ["rademacher", "gaussian"])
def test_unbiased_over_random_directions(getkey, sampler):
    model = RNN(getkey())
    stream = make_stream(getkey())
    state0 = jnp.zeros(HIDDEN)
    online = eqx_dodge.OnlineDodge(gru_step, sampler=sampler, reduction="sum")
    num_samples = 20_000

    @jax.jit
    def estimates(keys):
        def one(key):
            carry = online.init(model, state0, key=key)
            _, estimate, _ = run_online(online, model, carry, stream)
            return flat(jax.tree.map(lambda e: jnp.sum(e, axis=0), estimate))

        return jax.vmap(one)(keys)

    samples = estimates(jax.random.split(getkey(), num_samples))
    g = jnp.sum(window_gradients(model, state0, stream), axis=0)
    variance = dodge_variance(g, sampler=sampler)
    # 5 standard errors per coordinate: a false alarm among ~60 coordinates has
    # probability below 1e-4.
    assert_unbiased(samples, g, variance)
    # The empirical variance matches DODGE eq 6–8 (within 10 %).
    np.testing.assert_allclose(jnp.var(samples, axis=0), variance, rtol=0.1)


def test_average_of_k_directions_and_mean_reduction(getkey):
    model = RNN(getkey())
    stream = make_stream(getkey())
    state0 = jnp.zeros(HIDDEN)
    online = eqx_dodge.OnlineDodge(gru_step, num_directions=3)

    @eqx.filter_jit
    def first_window(model, key):
        carry = online.init(model, state0, key=key)
        window = jax.tree.map(lambda x: x[0], stream)
        value, estimate, _ = online(model, carry, window)
        exact_value = window_losses(model, state0, stream)[0] / LENGTH
        return value, estimate, exact_value, carry.directions

    value, estimate, exact_value, directions = first_window(model, getkey())
    np.testing.assert_allclose(value, exact_value, rtol=1e-6)
    g = np.asarray(window_gradients(model, state0, stream)[0]) / LENGTH
    u = np.stack([np_flat(jax.tree.map(lambda d: d[j], directions)) for j in range(3)])
    np.testing.assert_allclose(np_flat(estimate), (u @ g) @ u / 3, rtol=1e-4, atol=1e-6)


def test_candidate_direction_and_redirect(getkey):
    model = RNN(getkey())
    stream = make_stream(getkey())
    state0 = jnp.zeros(HIDDEN)
    online = eqx_dodge.OnlineDodge(gru_step, reduction="sum")
    _, unravel = jax.flatten_util.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
    exact = unravel(window_gradients(model, state0, stream)[0])

    @eqx.filter_jit
    def oracle_then_redirect(model, exact):
        carry = online.init(model, state0, direction=exact)
        first = jax.tree.map(lambda x: x[0], stream)
        _, oracle, carry = online(model, carry, first)
        tangent = carry.tangent
        zero = jax.tree.map(jnp.zeros_like, exact)
        carry = online.redirect(model, carry, direction=zero)
        _, estimate, _ = online(model, carry, first)
        return oracle, tangent, carry.tangent, estimate

    oracle, tangent, redirected_tangent, estimate = oracle_then_redirect(model, exact)
    # The exact gradient as the candidate gives back the gradient (the oracle).
    np.testing.assert_allclose(np_flat(oracle), np_flat(exact), rtol=1e-4, atol=1e-6)
    assert np.any(np_flat(tangent) != 0)
    assert np.all(np_flat(redirected_tangent) == 0)
    assert np.all(np_flat(estimate) == 0)


@eqx.filter_jit
def forward_step(model, state, x, y):
    return gru_step(model, state, (x, y))[0]


@eqx.filter_jit
def backward_step(model, state, x, y, state_cotangent, loss_cotangent):
    """Backpropagation through one `gru_step` from `state`: the cotangents of the
    model and of `state`, given those of the new state and of the step's loss."""
    _, vjp = eqx.filter_vjp(lambda m, s: gru_step(m, s, (x, y)), model, state)
    model_cotangent, state_cotangent = vjp((state_cotangent, loss_cotangent))
    return flat(model_cotangent), state_cotangent


def forward_states(model, state0, window):
    """The states entering every step of `window`, and the final one."""
    xs, ys = (np.asarray(a) for a in window)
    states = [state0]
    for t in range(LENGTH):
        states.append(forward_step(model, states[-1], xs[t], ys[t]))
    return states


def backpropagate(model, states, window, start, stop, state_cotangent, loss_weights):
    """Backpropagation by hand, one step at a time, from step `stop - 1` down to
    step `start`, whose entering state is held constant: the model's cotangent for
    the loss `Σ_t loss_weights[t]·ℓ_t` plus `state_cotangent`·s_stop."""
    xs, ys = (np.asarray(a) for a in window)
    total = np.zeros(num_coordinates(model), np.float32)
    for t in reversed(range(start, stop)):
        model_cotangent, state_cotangent = backward_step(
            model, states[t], xs[t], ys[t], state_cotangent, loss_weights[t]
        )
        total += np.asarray(model_cotangent)
    return total


# The references are explicit backpropagation through jitted single steps (each
# compiled once, then reused by every step of every reference) rather than autodiff
# through an unrolled Python loop, whose program grows with every step of every
# truncation (and which, run eagerly, compiles every operation on its own).


def reference_tbptt(model, state0, window, truncation):
    """TBPTT by hand: loss t backpropagates to the last multiple of `truncation`."""
    states = forward_states(model, state0, window)
    zero_state = np.zeros(HIDDEN, np.float32)
    total = np.zeros(num_coordinates(model), np.float32)
    for t in range(LENGTH):
        start = (t // truncation) * truncation
        only_t = np.eye(LENGTH, dtype=np.float32)[t]
        total += backpropagate(model, states, window, start, t + 1, zero_state, only_t)
    return total


def test_windows_outside_jit_compile_once():
    """The README's loop calls `online(model, carry, window)` outside `jit`: the
    window is compiled once and reused (it was traced, and its scan compiled, at
    every window: 300 ms a window for a small GRU, against under 1 ms)."""
    cell = eqx.nn.GRUCell(3, 4, key=jax.random.key(0))
    traces = []

    def step(model, state, x):
        traces.append(None)
        state = model(x, state)
        return state, jnp.sum(state**2)

    online = eqx_dodge.OnlineDodge(step, num_directions=2)
    carry = online.init(cell, jnp.zeros(4), key=0)
    windows = jnp.ones((3, 5, 3))
    _, _, carry = online(cell, carry, windows[0])
    first = len(traces)
    for window in windows[1:]:
        _, _, carry = online(cell, carry, window)
    assert len(traces) == first


def test_tbptt_candidate(getkey):
    model = RNN(getkey())
    xs, ys = make_stream(getkey())
    window = (xs[0], ys[0])
    state0 = jax.random.normal(getkey(), (HIDDEN,))
    references = np.stack(
        [reference_tbptt(model, state0, window, tau) for tau in (1, 2, 3)]
    )

    def candidate(model, key, max_truncation, reduction):
        return eqx_dodge.recurrent.tbptt_candidate(
            gru_step,
            model,
            state0,
            window,
            key=key,
            max_truncation=max_truncation,
            reduction=reduction,
        )

    def window_value(_model):
        value, _ = scan_window(gru_step, _model, state0, window)
        return value

    @eqx.filter_jit
    def run(model, keys, key):
        samples = jax.vmap(lambda k: flat(candidate(model, k, 3, "sum")))(keys)
        # `max_truncation=1`: always one step; with the default mean over the steps.
        one_step = candidate(model, key, 1, "mean")
        # Usable as a candidate direction of `filter_dodge`.
        estimate = eqx_dodge.filter_dodge(window_value, direction=one_step)(model)
        gradient = eqx.filter_grad(window_value)(model)
        return samples, one_step, estimate, gradient

    samples, one_step, estimate, gradient = run(
        model, jax.random.split(getkey(), 300), getkey()
    )
    assert jax.tree.structure(one_step) == jax.tree.structure(
        eqx.filter(model, eqx.is_inexact_array)
    )
    c = np_flat(one_step)
    np.testing.assert_allclose(c, references[0] / LENGTH, rtol=1e-4, atol=1e-6)
    samples = np.asarray(samples)
    distance = np.max(np.abs(samples[:, None, :] - references[None, :, :]), axis=-1)
    nearest = np.argmin(distance, axis=1)
    assert np.all(np.min(distance, axis=1) < 1e-5)
    # Uniform over {1, 2, 3}: each truncation is drawn 100 ± 8 times out of 300.
    counts = np.bincount(nearest, minlength=3)
    assert np.all(np.abs(counts - 100) < 41)  # 5 standard deviations
    # DODGE along it is exactly (g·ĉ)ĉ, with g backpropagated through the window.
    # (Catches a candidate whose leaves do not line up with the model's, or a
    # projection with the wrong scale or sign.)
    g = np_flat(gradient)
    expected = (g @ c) / (c @ c) * c
    np.testing.assert_allclose(np_flat(estimate), expected, rtol=1e-4, atol=1e-6)
    assert np.linalg.norm(expected) > 1e-3 * np.linalg.norm(g)


def test_errors(getkey):
    model = RNN(getkey())
    state0 = jnp.zeros(HIDDEN)
    online = eqx_dodge.OnlineDodge(gru_step)
    # The checks run while tracing: `filter_eval_shape` traces without compiling.
    trace = eqx.filter_eval_shape
    with pytest.raises(ValueError, match="exactly one of"):
        trace(online.init, model, state0)
    with pytest.raises(ValueError, match="exactly one of"):
        trace(
            online.init,
            model,
            state0,
            key=getkey(),
            direction=eqx.filter(model, eqx.is_array),
        )
    with pytest.raises(TypeError, match="floating-point"):
        trace(online.init, model, jnp.zeros(HIDDEN, jnp.int32), key=getkey())
    with pytest.raises(ValueError, match="num_directions"):
        trace(
            eqx_dodge.OnlineDodge(
                gru_step, num_directions=10**6, mode="partition"
            ).init,
            model,
            state0,
            key=getkey(),
        )
    stream = make_stream(getkey())
    with pytest.raises(ValueError, match="max_truncation"):
        trace(
            lambda: eqx_dodge.recurrent.tbptt_candidate(
                gru_step, model, state0, stream, key=getkey(), max_truncation=0
            )
        )

    def bad_step(model, state, inputs):
        return gru_step(model, state, inputs)[1]

    bad = eqx_dodge.OnlineDodge(bad_step)
    window = jax.tree.map(lambda x: x[0], stream)
    with pytest.raises(TypeError, match="pair"):
        trace(lambda: bad(model, bad.init(model, state0, key=getkey()), window))


def reference_synthetic(model, critic, state0, window, truncation, scale):
    """Chunk by chunk by hand: each chunk's summed loss plus the scaled critic at
    its end, differentiated with the chunk's start state held constant."""
    states = forward_states(model, state0, window)
    critic_gradient = eqx.filter_jit(jax.grad(lambda c, s: c(s), argnums=1))
    every_step = np.ones(LENGTH, np.float32)
    total = np.zeros(num_coordinates(model), np.float32)
    for start in range(0, LENGTH, truncation):
        stop = min(start + truncation, LENGTH)
        end_cotangent = scale * np.asarray(critic_gradient(critic, states[stop]))
        total += backpropagate(
            model, states, window, start, stop, end_cotangent, every_step
        )
    return total


def test_synthetic_gradient_candidate(getkey):
    model = RNN(getkey())
    xs, ys = make_stream(getkey())
    window = (xs[0], ys[0])
    state0 = jax.random.normal(getkey(), (HIDDEN,))
    zero_critic = eqx_dodge.recurrent.QuadraticCritic(HIDDEN)
    critic = eqx.tree_at(
        lambda c: (c.linear.weight, c.curvature),
        zero_critic,
        (
            jax.random.normal(getkey(), (HIDDEN,)),
            jax.random.normal(getkey(), (HIDDEN, HIDDEN)),
        ),
    )

    # Both critics in one vmapped trace (the default `scale` is 0.5).
    @eqx.filter_jit
    @eqx.filter_vmap
    def synthetic(critic):
        return flat(
            eqx_dodge.recurrent.synthetic_gradient_candidate(
                gru_step, model, critic, state0, window, truncation=2
            )
        )

    critics = jax.tree.map(lambda *leaves: jnp.stack(leaves), zero_critic, critic)
    zero, candidate = synthetic(critics)
    # A zero critic: TBPTT with a fixed truncation.
    np.testing.assert_allclose(
        zero, reference_tbptt(model, state0, window, 2), rtol=1e-4, atol=1e-6
    )
    expected = reference_synthetic(model, critic, state0, window, 2, 0.5)
    np.testing.assert_allclose(candidate, expected, rtol=1e-4, atol=1e-5)
    # A critic of another state size is named, not a bare dot_general error.
    for wrong in (
        eqx_dodge.recurrent.QuadraticCritic(HIDDEN + 1),
        eqx_dodge.recurrent.LinearCritic(HIDDEN - 1),
    ):
        with pytest.raises(ValueError, match=rf"`state_size={HIDDEN}`"):
            eqx_dodge.recurrent.synthetic_gradient_candidate(
                gru_step, model, wrong, state0, window, truncation=2
            )


def test_value_critic_learns_the_loss_to_go():
    # The state counts time (s_t = t / T) and every step costs 1, so the loss still
    # to come from s_t is T - t = T (1 - s_t): linear, which a linear critic can fit.
    length, truncation = 12, 3

    def counting_step(model, state, x):
        del model
        return state + x, jnp.ones(())

    inputs = jnp.full((length, 1), 1 / length)
    state0 = jnp.zeros(1)
    optimizer_lr = 0.05

    @jax.jit
    def train(critic):
        def body(critic, _):
            grads = eqx.filter_grad(
                lambda c: eqx_dodge.recurrent.critic_loss(
                    counting_step,
                    None,
                    c,
                    state0,
                    inputs,
                    truncation=truncation,
                    match="value",
                    bootstrap_end=False,
                )
            )(critic)
            return jax.tree.map(lambda c, g: c - optimizer_lr * g, critic, grads), None

        critic, _ = jax.lax.scan(body, critic, None, length=3000)
        return critic

    critic = train(eqx_dodge.recurrent.LinearCritic(1))
    for k in range(0, length, truncation):
        np.testing.assert_allclose(
            critic(jnp.full((1,), k / length)), length - k, rtol=1e-3
        )


def test_synthetic_gradient_critic_learns_the_future_gradient(getkey):
    # s' = a·s with loss ½‖s'‖² per step: the loss still to come from s is
    # ½ s² a²/(1 − a²), whose gradient m·s, m = a²/(1 − a²), a quadratic critic holds.
    a, batch, length, truncation = 0.8, 64, 6, 2

    def decaying_step(model, state, x):
        del model, x
        state = a * state
        return state, 0.5 * jnp.sum(jnp.square(state))

    inputs = jnp.zeros(length)

    @jax.jit
    def train(critic, key):
        def body(critic, key):
            state0 = jax.random.normal(key, (batch, 1))
            grads = eqx.filter_grad(
                lambda c: eqx_dodge.recurrent.critic_loss(
                    decaying_step,
                    None,
                    c,
                    state0,
                    inputs,
                    truncation=truncation,
                    batched=True,
                )
            )(critic)
            return jax.tree.map(lambda c, g: c - 0.005 * g, critic, grads), None

        critic, _ = jax.lax.scan(body, critic, jax.random.split(key, 1000))
        return critic

    critic = train(eqx_dodge.recurrent.QuadraticCritic(1), getkey())
    np.testing.assert_allclose(critic.curvature[0, 0], a**2 / (1 - a**2), rtol=1e-3)
    np.testing.assert_allclose(critic.linear.weight[0], 0.0, atol=1e-4)


def test_memory_does_not_grow_with_the_stream(getkey):
    model = RNN(getkey())
    state0 = jnp.zeros(HIDDEN)
    online = eqx_dodge.OnlineDodge(gru_step, num_directions=4)
    window = 10

    def dodge(model, stream):
        carry = online.init(model, state0, key=jax.random.key(0))
        windows = jax.tree.map(lambda x: x.reshape((-1, window) + x.shape[1:]), stream)
        total = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))

        def body(carry_and_total, window):
            carry, total = carry_and_total
            _, estimate, carry = online(model, carry, window)
            return (carry, jax.tree.map(jnp.add, total, estimate)), None

        (_, total), _ = jax.lax.scan(body, (carry, total), windows)
        return total

    def bptt(model, stream):
        def loss(_model):
            value, _ = scan_window(gru_step, _model, state0, stream)
            return value

        return eqx.filter_grad(loss)(model)

    def temporary_bytes(fun, length):
        stream = (jnp.zeros((length, INPUT)), jnp.zeros(length))
        compiled = eqx.filter_jit(fun).lower(model, stream).compile()
        analysis = compiled.compiled.memory_analysis()
        return analysis.temp_size_in_bytes

    short, long = 100, 2000
    # Backprop stores every step (the check can fail); online DODGE does not.
    assert temporary_bytes(bptt, long) > 5 * temporary_bytes(bptt, short)
    assert temporary_bytes(dodge, long) <= temporary_bytes(dodge, short) + 1024
