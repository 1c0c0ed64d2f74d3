"""eqx_dodge's optax transforms inside optax's own wrappers, as users write them:
`MultiSteps`, `apply_if_finite`, `partition`/`masked`, `inject_hyperparams`,
`contrib.schedule_free`; the loss and `aux` in the state; non-finite losses."""

# optax types `updates`, `params` and states as array trees; these tests pass
# Equinox models and read NamedTuple states, as users of the transforms do.
# pyright: reportArgumentType=false, reportAttributeAccessIssue=false
# pyright: reportIndexIssue=false

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge

from .helpers import assert_tree_allclose, make_mlp, squared_loss


@pytest.fixture
def problem(getkey):
    """A tiny MLP, its array leaves (`None` elsewhere) and a batch."""
    model = make_mlp(getkey())
    return (
        model,
        eqx.filter(model, eqx.is_inexact_array),
        jax.random.normal(getkey(), (8, 3)),
    )


# -- MultiSteps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "inner",
    [
        lambda: eqx_dodge.adam_dodge(1e-2, key=0),
        lambda: optax.chain(eqx_dodge.dodge(source="updates"), optax.sgd(0.1)),
    ],
    ids=["adam_dodge", "dodge updates"],
)
def test_multi_steps_around_dodge_is_refused(problem, inner):
    """Wrapped, the estimate would see the last minibatch only: `init` says so and
    names the pattern that accumulates estimates."""
    _, params, _ = problem
    # Raised while tracing: `filter_eval_shape` checks it without compiling.
    with pytest.raises(ValueError, match=r"optax\.chain\(eqx_dodge\.dodge"):
        eqx.filter_eval_shape(
            optax.MultiSteps(inner(), every_k_schedule=2).init, params
        )


def test_dodge_then_multi_steps_accumulates_estimates(problem):
    """`chain(dodge, MultiSteps(adam, 2))`: nothing moves at the first minibatch;
    the second applies Adam's first step to the mean of the two minibatches'
    estimates, each along its own directions."""
    model, params, x = problem
    batches = (x[:4], x[4:])
    optim = optax.chain(
        eqx_dodge.dodge(key=7), optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    )

    @jax.jit
    def run(params):
        state = optim.init(params)
        outputs = []
        for batch in batches:
            output, state = optim.update(
                None,
                state,
                params,
                value_fn=lambda p: squared_loss(eqx.combine(p, model), batch),
            )
            outputs.append(output)
        key, estimates = jax.random.key(7), []
        for batch in batches:
            key, step_key = jax.random.split(key)
            estimate = eqx_dodge.filter_dodge(squared_loss, key=step_key)(model, batch)
            estimates.append(estimate)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, *estimates)
        adam = optax.adam(1e-2)
        return outputs, adam.update(mean, adam.init(params))[0]

    with jax.numpy_dtype_promotion("standard"):
        (first, second), expected = run(params)
    assert all(jnp.all(leaf == 0) for leaf in jax.tree.leaves(first))
    assert_tree_allclose(second, expected, rtol=1e-5, atol=1e-7)


# -- non-finite losses and apply_if_finite ------------------------------------------


def _nan_run(optim, params, model, x, updates) -> tuple[list[Any], list[Any]]:
    """Three updates, the second with a NaN loss; returns the updates and states."""

    @jax.jit
    def step(state, scale):
        return optim.update(
            updates,
            state,
            params,
            value_fn=lambda p: scale * squared_loss(eqx.combine(p, model), x),
        )

    with jax.numpy_dtype_promotion("standard"):
        states, outputs = [optim.init(params)], []
        for scale in (1.0, jnp.nan, 1.0):
            output, state = step(states[-1], jnp.float32(scale))
            outputs.append(output)
            states.append(state)
    return outputs, states


def test_apply_if_finite_around_adam_dodge_skips_nan_loss(problem):
    """The NaN arises inside the transform, after `apply_if_finite`'s check of the
    incoming (zero) updates: `adam_dodge` skips it itself, leaving Adam's moments
    and count as they were, moving the key on, and counting the skip."""
    model, params, x = problem
    optim = optax.apply_if_finite(eqx_dodge.adam_dodge(1e-2, key=0), 3)
    outputs, states = _nan_run(optim, params, model, x, optax.tree.zeros_like(params))
    before, skipped, after = (state.inner_state[0] for state in states[1:])
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(outputs[1]))
    assert_tree_allclose((skipped.mu, skipped.nu), (before.mu, before.nu))
    assert skipped.count == before.count == 1
    assert not np.array_equal(skipped.key, before.key)
    assert np.isnan(skipped.value)
    assert skipped.notfinite_count == skipped.total_notfinite == 1
    # The next finite step goes on from the unpoisoned moments.
    assert after.count == 2 and after.notfinite_count == 0
    assert after.total_notfinite == 1
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(after.mu))
    assert np.isclose(after.value, eqx.filter_jit(squared_loss)(model, x))


def test_adam_dodge_skipped_steps_hold_the_schedule(problem):
    """A skipped step leaves the learning-rate schedule's count where it was, with
    Adam's: otherwise skipped steps would use up a warm-up or decay (here the whole
    of a 3-step linear decay, so that the next finite step would be exactly zero),
    which `optax.apply_if_finite(optax.adam(schedule))` does not do."""
    model, params, x = problem
    schedule = optax.linear_schedule(1.0, 0.0, transition_steps=3)
    optim = eqx_dodge.adam_dodge(schedule, key=0)
    step = eqx.filter_jit(
        lambda state, scale: optim.update(
            None,
            state,
            params,
            value_fn=lambda p: scale * squared_loss(eqx.combine(p, model), x),
        )
    )
    state = optim.init(params)
    for _ in range(3):
        _, state = step(state, jnp.float32(jnp.nan))
    assert state[0].total_notfinite == 3 and state[0].count == 0
    assert state[1].count == 0
    output, state = step(state, jnp.float32(1.0))
    assert state[1].count == 1
    # The first Adam step at the schedule's first rate: every coordinate ±1.
    leaves = jax.tree.leaves(output)
    np.testing.assert_allclose(
        np.abs(np.concatenate([np.ravel(o) for o in leaves])), 1.0, rtol=1e-4
    )


def test_skip_nonfinite_off_passes_nan_to_apply_if_finite(problem):
    """With `skip_nonfinite=False` the NaN estimate comes out (and is counted), so
    an `apply_if_finite` after DODGE rejects it before Adam's moments see it."""
    model, params, x = problem
    optim = optax.chain(
        eqx_dodge.dodge(key=0, skip_nonfinite=False),
        optax.apply_if_finite(optax.adam(1e-2), 3),
    )
    outputs, states = _nan_run(optim, params, model, x, None)
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(outputs[1]))
    dodge_state, guard = states[2]
    assert dodge_state.count == 2 and dodge_state.total_notfinite == 1
    assert guard.total_notfinite == 1
    adam_mu = guard.inner_state[0].mu
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(adam_mu))


# -- partition and masked ------------------------------------------------------------


def test_partition_differentiates_only_the_owned_group(problem):
    """`optax.partition` with DODGE for the last layer, the rest frozen:
    `value_fn` gets the owned group and rebuilds the model with `eqx.combine`; the
    estimate equals `filter_dodge`'s with respect to that layer alone."""
    model, params, x = problem
    labels = jax.tree.map(lambda _: "frozen", params)
    last = lambda m: (m.layers[-1].weight, m.layers[-1].bias)  # noqa: E731
    labels = eqx.tree_at(last, labels, ("dodge", "dodge"))
    optim = optax.partition(
        {"dodge": eqx_dodge.dodge(key=3), "frozen": optax.set_to_zero()},
        lambda _: labels,
    )

    def loss(group):
        return squared_loss(eqx.combine(group, model), x)

    mask = jax.tree.map(lambda label: label == "dodge", labels)
    masked = optax.masked(eqx_dodge.dodge(key=3), mask)
    zeros = optax.tree.zeros_like(params)

    @jax.jit
    def run(params):
        estimate, state = optim.update(zeros, optim.init(params), params, value_fn=loss)
        # `optax.masked` alone, the building block of `partition`.
        alone, _ = masked.update(zeros, masked.init(params), params, value_fn=loss)
        step_key = jax.random.split(jax.random.key(3))[1]
        expected = eqx_dodge.filter_dodge(loss, key=step_key)(eqx.filter(params, mask))
        return estimate, state, alone, expected, loss(params)

    estimate, state, alone, expected, value = run(params)
    assert_tree_allclose(last(estimate), last(expected), rtol=1e-6)
    assert_tree_allclose(last(alone), last(expected), rtol=1e-6)
    assert all(
        np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(estimate.layers[0])
    )
    assert np.isclose(optax.tree.get(state, "value"), value)
    # A `value_fn` that takes the group for the model is told what it receives
    # (while tracing: `filter_eval_shape` checks it without compiling).
    with pytest.raises(TypeError) as error:
        eqx.filter_eval_shape(
            optim.update, zeros, state, params, value_fn=lambda p: squared_loss(p, x)
        )
    assert "eqx.combine(p, model)" in "".join(error.value.__notes__)


# -- the loss and aux in the state; value_fn's arguments -----------------------------


class BatchNormNet(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.norm = eqx.nn.BatchNorm(2, axis_name="batch", mode="batch")

    def __call__(self, x, state):
        return self.norm(jnp.tanh(self.linear(x)), state)


def batch_norm_loss(model, state, x):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    out, state = batched(x, state)
    return jnp.mean(jnp.square(out - 0.5)), state


def test_value_and_aux_in_the_state(getkey):
    """A BatchNorm model's new `State` and the loss come back in the state from the
    estimate's own forward pass; `state` reaches `value_fn` bound with
    `functools.partial` (`update` has an argument of that name itself)."""
    model, bn_state = eqx.nn.make_with_state(BatchNormNet)(getkey())
    x = jax.random.normal(getkey(), (8, 3))
    optim = eqx_dodge.adam_dodge(1e-2, key=0, has_aux=True, aux_init=bn_state)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    value, new_bn_state = eqx.filter_jit(batch_norm_loss)(model, bn_state, x)

    @eqx.filter_jit
    def step(opt_state, model, bn_state):
        value_fn = ft.partial(batch_norm_loss, state=bn_state)
        return optim.update(None, opt_state, model, value_fn=value_fn, x=x)

    with jax.numpy_dtype_promotion("standard"):
        _, opt_state = step(opt_state, model, bn_state)
    assert np.isclose(optax.tree.get(opt_state, "value"), value)
    assert_tree_allclose(optax.tree.get(opt_state, "aux"), new_bn_state)
    assert not eqx.tree_equal(new_bn_state, bn_state)
    # Without the binding, `update` cannot forward `state`: the error says so
    # (while tracing: `filter_eval_shape` checks it without compiling).
    with pytest.raises(TypeError, match=r"\['state'\].*functools\.partial"):
        eqx.filter_eval_shape(
            optim.update, None, opt_state, model, value_fn=batch_norm_loss, x=x
        )


def test_aux_must_match_aux_init(getkey):
    model, bn_state = eqx.nn.make_with_state(BatchNormNet)(getkey())
    x = jax.random.normal(getkey(), (8, 3))
    with pytest.raises(ValueError, match="aux_init"):
        eqx_dodge.dodge(key=0, has_aux=True)
    optim = eqx_dodge.dodge(key=0, has_aux=True, aux_init=jnp.zeros(3))
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    value_fn = ft.partial(batch_norm_loss, state=bn_state, x=x)
    # Raised while tracing: `filter_eval_shape` checks it without compiling.
    with pytest.raises(ValueError, match="structure of `aux_init`"):
        eqx.filter_eval_shape(optim.update, None, state, model, value_fn=value_fn)

    def wrong_shape(model):
        return batch_norm_loss(model, bn_state, x)[0], jnp.zeros(2)

    with pytest.raises(
        ValueError, match=r"(?s)shapes and dtypes of `aux_init`.*\(3,\)"
    ):
        eqx.filter_eval_shape(optim.update, None, state, model, value_fn=wrong_shape)


# -- wrappers that need `params` as a tree of arrays ----------------------------------


def test_inject_hyperparams_and_schedule_free_with_filtered_params(problem):
    """`inject_hyperparams` and `schedule_free` do arithmetic on `params`: with
    `eqx.filter(model, eqx.is_inexact_array)` and the model rebuilt in `value_fn`
    they run; a `value_fn` that expects the whole model is told how to rebuild it."""
    model, params, x = problem

    def loss(p):
        return squared_loss(eqx.combine(p, model), x)

    injected = optax.inject_hyperparams(
        eqx_dodge.adam_dodge, static_args=("num_directions",)
    )(learning_rate=1e-2, key=4)
    plain = eqx_dodge.adam_dodge(1e-2, key=4)
    free = optax.contrib.schedule_free(eqx_dodge.adam_dodge(1e-2, key=4), 1e-2)

    @jax.jit
    def run(params):
        updates = tuple(
            optim.update(None, optim.init(params), params, value_fn=loss)
            for optim in (injected, plain, free)
        )
        return updates, loss(params)

    with jax.numpy_dtype_promotion("standard"):
        ((got, injected_state), (expected, _), (_, free_state)), value = run(params)
        # Raised while tracing: `filter_eval_shape` checks it without compiling.
        with pytest.raises(TypeError) as error:
            eqx.filter_eval_shape(
                plain.update,
                None,
                plain.init(params),
                params,
                value_fn=lambda m: squared_loss(m, x),
            )
    assert_tree_allclose(got, expected, rtol=1e-5)
    assert np.isclose(optax.tree.get(injected_state, "value"), value)
    assert np.isclose(optax.tree.get(free_state, "value"), value)
    assert "eqx.filter(model, eqx.is_inexact_array)" in "".join(error.value.__notes__)
