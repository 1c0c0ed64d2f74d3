"""Bad input raises a `TypeError` or `ValueError` that names the argument."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge

from .helpers import make_mlp, squared_loss, without_runtime_type_checks


MODEL = make_mlp(jax.random.key(0))
X = jnp.ones((2, 3))
KEY = jax.random.key(1)


def _direction():
    return jax.tree.map(jnp.ones_like, eqx.filter(MODEL, eqx.is_inexact_array))


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({}, ValueError, "got neither"),
        ({"key": KEY, "direction": "later"}, ValueError, "got both"),
        ({"key": KEY, "num_directions": 0}, ValueError, "`num_directions`"),
        ({"key": KEY, "num_directions": 2.0}, TypeError, "num_directions"),
        ({"key": KEY, "sampler": "uniform"}, ValueError, "`sampler`"),
        ({"key": KEY, "mode": "sum"}, ValueError, "`mode`"),
        ({"direction": "later", "num_directions": 2}, ValueError, "`num_directions`"),
    ],
)
def test_bad_options(options, error, match):
    options = {
        name: _direction() if value == "later" else value
        for name, value in options.items()
    }
    for wrap in (eqx_dodge.filter_dodge, eqx_dodge.filter_value_and_dodge):
        with pytest.raises(error, match=match):
            wrap(squared_loss, **options)


def test_too_many_parts():
    p = 3 * 4 + 4 + 4 * 2 + 2
    estimate = eqx_dodge.filter_dodge(
        squared_loss, key=KEY, num_directions=p, mode="partition"
    )
    estimate(MODEL, X)
    too_many = eqx_dodge.filter_dodge(
        squared_loss, key=KEY, num_directions=p + 1, mode="partition"
    )
    with pytest.raises(ValueError, match="`num_directions=27` exceeds"):
        too_many(MODEL, X)


@pytest.mark.parametrize(
    "options",
    [dict(num_directions=2), dict(mode="partition"), dict(sampler="gaussian")],
    ids=["num_directions", "mode", "sampler"],
)
def test_candidate_refuses_the_options_of_random_directions(options):
    """Options that shape random directions, given with a candidate (which is one
    direction, drawn by no sampler), are refused by name rather than ignored:
    `filter_dodge(direction=...)`, `scale_by_adam_dodge(source="updates")` and a
    candidate source without exploration directions. Catches `sampler` taken
    silently (it was, before; `num_directions` and `mode` were refused)."""
    direction = _direction()
    with pytest.raises(ValueError, match="apply to random directions only"):
        eqx_dodge.filter_dodge(squared_loss, direction=direction, **options)
    with pytest.raises(ValueError, match="apply to random directions only|must be 1"):
        eqx_dodge.scale_by_adam_dodge(source="updates", **options)
    if "num_directions" not in options:
        for source in ("updates", "ema"):
            with pytest.raises(ValueError, match="shape the random exploration"):
                eqx_dodge.dodge(source=source, **options)


def test_direction_with_other_structure():
    direction = _direction()
    wrong = {"layers": direction.layers}
    with pytest.raises(ValueError, match="`direction` must have the tree structure"):
        eqx_dodge.filter_dodge(squared_loss, direction=wrong)(MODEL, X)


@pytest.mark.parametrize(
    "replacement",
    [jnp.ones((4, 4)), jnp.ones((4, 3), jnp.float16)],
    ids=["shape", "dtype"],
)
def test_direction_with_other_leaf(replacement):
    direction = eqx.tree_at(lambda d: d.layers[0].weight, _direction(), replacement)
    with pytest.raises(ValueError, match=r"`direction` leaf at .*layers\[0\]\.weight"):
        eqx_dodge.filter_dodge(squared_loss, direction=direction)(MODEL, X)


def test_direction_of_a_single_array_model():
    """A model that is one array: the message names `direction` itself, with no
    empty leaf location ("leaf at  has shape")."""
    with pytest.raises(ValueError, match=r"^`direction` has shape \(2,\) and dtype"):
        eqx_dodge.filter_dodge(lambda w: jnp.sum(w**2), direction=jnp.ones(2))(
            jnp.ones(3)
        )


def test_forgotten_has_aux_is_pointed_out():
    def loss_and_aux(model, x):
        return squared_loss(model, x), {"batch": x.shape[0]}

    with pytest.raises(TypeError, match=r"got tuple\. If it returns .* `has_aux=True`"):
        eqx_dodge.filter_dodge(loss_and_aux, key=KEY)(MODEL, X)


@pytest.mark.parametrize(
    "returned, got",
    [((), r"an array of shape \(\)"), ((None, None), "a tuple of length 3")],
    ids=["loss alone", "three values"],
)
@pytest.mark.parametrize("estimator", ["filter_dodge", "activity_dodge", "sharded"])
def test_has_aux_without_a_pair(estimator, returned, got):
    """`has_aux=True` with a loss that returns the loss alone, or three values: a
    `TypeError` that says a pair is needed, as the optax transforms say (was
    "iteration over a 0-d array" / "too many values to unpack")."""

    def loss(model, x):
        value = squared_loss(model, x[None]) if x.ndim == 1 else squared_loss(model, x)
        return (value, *returned) if returned else value

    make = {
        "filter_dodge": lambda: eqx_dodge.filter_dodge(loss, key=KEY, has_aux=True),
        "activity_dodge": lambda: eqx_dodge.activity_dodge(loss, key=KEY, has_aux=True),
        "sharded": lambda: eqx_dodge.sharded_dodge(
            loss, mesh=jax.make_mesh((1,), ("data",)), key=KEY, has_aux=True
        ),
    }[estimator]
    with pytest.raises(
        TypeError, match=rf"must return a pair `\(loss, aux\)`, got {got}"
    ):
        make()(MODEL, X)


@pytest.mark.parametrize(
    "estimator", ["OnlineDodge", "tbptt_candidate", "synthetic_gradient", "critic"]
)
def test_recurrent_has_aux_without_a_pair(estimator):
    """The recurrent API with `has_aux=True` and a step returning `(state, loss)`:
    says `(state, (loss, aux))` is needed (was "iteration over a 0-d array")."""
    cell = eqx.nn.GRUCell(2, 3, key=jax.random.key(0))
    inputs, state = jnp.ones((4, 2)), jnp.zeros(3)

    def step(model, state, x):
        new_state = model(x, state)
        return new_state, jnp.sum(new_state)

    recurrent, critic = eqx_dodge.recurrent, eqx_dodge.recurrent.LinearCritic(3)
    online = eqx_dodge.OnlineDodge(step, has_aux=True)
    call = {
        "OnlineDodge": lambda: online(cell, online.init(cell, state, key=0), inputs),
        "tbptt_candidate": lambda: recurrent.tbptt_candidate(
            step, cell, state, inputs, key=0, max_truncation=2, has_aux=True
        ),
        "synthetic_gradient": lambda: recurrent.synthetic_gradient_candidate(
            step, cell, critic, state, inputs, has_aux=True
        ),
        "critic": lambda: recurrent.critic_loss(
            step, cell, critic, state, inputs, has_aux=True
        ),
    }[estimator]
    with pytest.raises(TypeError, match=r"must return `\(state, \(loss, aux\)\)`"):
        call()


def test_online_dodge_arguments_are_named():
    """`OnlineDodge` called with the carry and the model swapped, or with a window
    whose leaves do not share a time axis, and a critic given a batch of states
    without `batched=True`: each message names the argument and the way out
    (they failed deep inside with an `AttributeError`, a scan error, or a hint to
    change `state_size` only)."""
    cell = eqx.nn.GRUCell(2, 3, key=jax.random.key(0))
    inputs, state = jnp.ones((4, 2)), jnp.zeros(3)

    def step(model, state, x):
        new_state = model(x, state)
        return new_state, jnp.sum(new_state)

    online = eqx_dodge.OnlineDodge(step)
    carry = online.init(cell, state, key=0)
    with without_runtime_type_checks():
        with pytest.raises(TypeError, match="takes the model first.*got a GRUCell"):
            online(carry, cell, inputs)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="share a leading time axis"):
        online(cell, carry, {"x": inputs, "y": jnp.ones(3)})
    critic = eqx_dodge.recurrent.LinearCritic(3)
    with pytest.raises(ValueError, match="pass `batched=True`"):
        critic(jnp.zeros((2, 3)))
    with without_runtime_type_checks():
        with pytest.raises(TypeError, match="`scale` must be a non-negative float"):
            eqx_dodge.recurrent.synthetic_gradient_candidate(
                step,
                cell,
                critic,
                state,
                inputs,
                scale=None,  # pyright: ignore[reportArgumentType]
            )


def _flag_calls():
    """Each function taking a bool flag, as `(name, call(**flag))`."""
    cell = eqx.nn.GRUCell(2, 3, key=jax.random.key(0))
    inputs, state = jnp.ones((4, 2)), jnp.zeros(3)

    def step(model, state, x):
        new_state = model(x, state)
        return new_state, jnp.sum(new_state)

    critic = eqx_dodge.recurrent.LinearCritic(3)
    recurrent = eqx_dodge.recurrent
    return {
        "filter_dodge": lambda **f: eqx_dodge.filter_dodge(squared_loss, key=0, **f),
        "sharded_dodge": lambda **f: eqx_dodge.sharded_dodge(
            squared_loss, mesh=jax.make_mesh((1,), ("data",)), key=0, **f
        )(MODEL, X),
        "OnlineDodge": lambda **f: eqx_dodge.OnlineDodge(step, **f),
        "tbptt_candidate": lambda **f: recurrent.tbptt_candidate(
            step, cell, state, inputs, key=0, max_truncation=2, **f
        ),
        "synthetic_gradient": lambda **f: recurrent.synthetic_gradient_candidate(
            step, cell, critic, state, inputs, **f
        ),
        "critic_loss": lambda **f: recurrent.critic_loss(
            step, cell, critic, state, inputs, **f
        ),
    }


@pytest.mark.parametrize(
    "call, flag",
    [
        *[
            (call, "has_aux")
            for call in [
                "filter_dodge",
                "sharded_dodge",
                "OnlineDodge",
                "tbptt_candidate",
                "synthetic_gradient",
                "critic_loss",
            ]
        ],
        *[
            (call, flag)
            for call in ["synthetic_gradient", "critic_loss"]
            for flag in ["batched", "bootstrap_end"]
        ],
    ],
)
def test_flags_must_be_bools(call, flag):
    """`has_aux="no"` was read as `True` and `has_aux=0` or `None` as `False` by
    the estimators that did not check it (the optax transforms and the activity
    estimators did); likewise the critic's `batched` and `bootstrap_end`."""
    for bad in ["no", 0, None]:
        with without_runtime_type_checks():
            with pytest.raises(TypeError, match=rf"`{flag}` must be a Python bool"):
                _flag_calls()[call](**{flag: bad})


@pytest.mark.parametrize("option", ["sampler", "mode", "derivative"])
def test_options_of_the_wrong_type(option):
    """A string option given as another type is a `TypeError` (a bad type), an
    unknown string a `ValueError` (a bad value), both naming the option; was a
    `ValueError` for both."""
    wrong_type: dict[str, Any] = {option: 0}
    unknown: dict[str, Any] = {option: "unknown"}
    with without_runtime_type_checks():
        with pytest.raises(TypeError, match=rf"`{option}` must be one of the strings"):
            eqx_dodge.filter_dodge(squared_loss, key=0, **wrong_type)
    with pytest.raises(ValueError, match=rf"`{option}` must be one of"):
        eqx_dodge.filter_dodge(squared_loss, key=0, **unknown)


def test_differentiated_argument_by_keyword():
    estimate = eqx_dodge.filter_dodge(squared_loss, key=KEY)
    with pytest.raises(TypeError, match="first argument by position"):
        estimate(model=MODEL, x=X)


@pytest.mark.parametrize(
    "bad_loss,match",
    [
        (lambda model, x: jax.vmap(model)(x), r"scalar .* shape \(2, 2\)"),
        (lambda model, x: "loss", "scalar"),
        (lambda model, x: jnp.sum(x > 0), "floating-point scalar"),
        (lambda model, x: np.float32(1.0), "NumPy value is a constant to JAX"),
    ],
    ids=["vector", "string", "integer", "numpy"],
)
def test_fun_must_return_a_floating_scalar(bad_loss, match):
    with pytest.raises(TypeError, match=match):
        eqx_dodge.filter_dodge(bad_loss, key=KEY)(MODEL, X)


def test_complex_leaves_are_refused():
    model = {"w": jnp.ones((2,), jnp.complex64)}
    with pytest.raises(TypeError, match="real floating-point"):
        eqx_dodge.filter_dodge(lambda m: jnp.sum(jnp.abs(m["w"])), key=KEY)(model)


def test_bad_partition_direction_arguments():
    with pytest.raises(ValueError, match="`num_directions`"):
        eqx_dodge.partition_direction({"a": jnp.ones(3)}, 0)
    with pytest.raises(ValueError, match="exceeds"):
        eqx_dodge.partition_direction({"a": jnp.ones(3)}, 4)
