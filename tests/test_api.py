"""The 0.2 API reads as one design: every function takes a key in every form, options
are checked the same way everywhere, and no path uses a key twice."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge
from eqx_dodge._checks import as_key

from .helpers import squared_loss


@pytest.fixture(scope="module")
def problem():
    # Without biases: two leaves instead of four. Key handling does not depend on
    # the leaves, and every leaf costs a Threefry hash of its own in each
    # direction drawn, which dominates the compilation time of these tests.
    model = eqx.nn.MLP(
        3, 2, 4, 1, use_bias=False, use_final_bias=False, key=jax.random.key(0)
    )
    x = jax.random.normal(jax.random.key(1), (8, 3))
    return model, x


def _key_forms(seed):
    legacy = jax.random.PRNGKey(seed)
    return [
        jax.random.key(seed),
        legacy,
        seed,
        jnp.int32(seed),
        np.int64(seed),  # a NumPy scalar: static under `filter_jit`
        np.asarray(seed),
        np.asarray(legacy),
    ]


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _estimators(model, x):
    """Every public way to turn a key into an estimate or a direction."""
    mesh = jax.make_mesh((1,), ("data",))

    def optax_estimate(transform, value_fn=squared_loss):
        params = eqx.filter(model, eqx.is_inexact_array)
        state = transform.init(params)
        return transform.update(None, state, model, value_fn=value_fn, x=x)[0]

    def example_loss(model, x):  # one example: `update` splits the batch `x`
        return jnp.mean(jnp.square(model(x) - 0.5))

    def online(key):
        def step(model, state, inputs):
            state = jnp.tanh(model(inputs) + state)
            return state, jnp.sum(state**2)

        runner = eqx_dodge.OnlineDodge(step, num_directions=3)
        carry = runner.init(model, jnp.zeros(2), key=key)
        return runner(model, carry, x)[1]

    return {
        "random_direction": lambda key: eqx_dodge.random_direction(key, model),
        "filter_dodge k=1": lambda key: eqx_dodge.filter_dodge(squared_loss, key=key)(
            model, x
        ),
        "filter_dodge k=6": lambda key: eqx_dodge.filter_dodge(
            squared_loss, key=key, num_directions=6
        )(model, x),
        "sharded_dodge": lambda key: eqx_dodge.sharded_dodge(
            squared_loss, mesh=mesh, key=key, num_directions=2
        )(model, x),
        "dodge": lambda key: optax_estimate(eqx_dodge.dodge(key=key)),
        "adam_dodge": lambda key: optax_estimate(eqx_dodge.adam_dodge(1e-2, key=key)),
        "dodge_activity": lambda key: optax_estimate(
            eqx_dodge.dodge_activity(key=key, num_directions=2), example_loss
        ),
        "OnlineDodge": online,
        "activation_guess": lambda key: eqx_dodge.activation_guess(key, model, x),
    }


@pytest.mark.parametrize(
    "name",
    [
        "random_direction",
        "filter_dodge k=1",
        "filter_dodge k=6",
        "sharded_dodge",
        "dodge",
        "adam_dodge",
        "dodge_activity",
        "OnlineDodge",
        "activation_guess",
    ],
)
def test_every_key_form_gives_the_same_result(problem, name):
    """Catches a function that rejects a key form, or reads an int seed or a legacy
    key differently from `jax.random.key(seed)`; among them a traced 0-d integer
    seed (under `jit`, or from `inject_hyperparams`)."""
    # Under `filter_jit`: an int seed is then a static Python value, the other forms
    # (the `jnp.int32` seed too) are traced arrays, as in a training step.
    estimator = eqx.filter_jit(_estimators(*problem)[name])
    results = [_flat(estimator(key)) for key in _key_forms(42)]
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], rtol=1e-6)
    # Another key gives another result (a key of the first form: no new compile).
    assert not np.allclose(results[0], _flat(estimator(jax.random.key(43))))


def test_legacy_keys_of_another_default_implementation(problem):
    """With `jax_default_prng_impl="rbg"`, `jax.random.PRNGKey` has 4 words, not
    2: read as `jax.random.key` reads it (it was refused for its shape)."""
    model, x = problem
    with jax.default_prng_impl("rbg"):
        legacy = jax.random.PRNGKey(7)
        assert legacy.shape == (4,)
        expected = eqx_dodge.filter_dodge(squared_loss, key=jax.random.key(7))(model, x)
        estimate = eqx_dodge.filter_dodge(squared_loss, key=legacy)(model, x)
    np.testing.assert_array_equal(_flat(estimate), _flat(expected))


def test_numpy_seeds_outside_jit(problem):
    """Outside `jit` a NumPy seed or legacy key is not traced into an array first:
    read as `jax.random.key` reads it; a NumPy bool or float is refused."""
    model, _ = problem
    expected = _flat(eqx_dodge.random_direction(jax.random.key(7), model))
    for key in (
        np.int64(7),
        np.asarray(7, np.uint32),
        np.asarray(jax.random.PRNGKey(7)),
    ):
        np.testing.assert_array_equal(
            _flat(eqx_dodge.random_direction(key, model)), expected
        )
    for bad in (np.bool_(True), np.float64(7.0)):
        with pytest.raises(TypeError, match="`key` must be a PRNG key"):
            as_key(bad)


def test_no_key_is_used_twice(problem):
    """Every path passes JAX's key-reuse checker (catches a key split again for every
    chunk of directions). The checker runs while tracing: tracing each path is
    enough."""
    model, x = problem
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = eqx.filter_jit(eqx.filter_grad(squared_loss))(model, x)
    with jax.debug_key_reuse(True):
        for estimator in _estimators(model, x).values():
            eqx.filter_eval_shape(estimator, jax.random.key(1))
        for k, mode in [(8, "average"), (33, "average"), (8, "partition")]:
            estimator = eqx_dodge.filter_dodge(
                squared_loss, key=jax.random.key(2), num_directions=k, mode=mode
            )
            eqx.filter_eval_shape(estimator, model, x)
        for source in ("updates", "ema"):
            transform = eqx_dodge.dodge(source=source, key=3, num_directions=5)

            def two_steps(state, transform=transform):
                for _ in range(2):
                    _, state = transform.update(
                        grads, state, model, value_fn=squared_loss, x=x
                    )
                return state

            eqx.filter_eval_shape(two_steps, transform.init(params))


BAD_OPTIONS = [
    (dict(sampler="uniform"), ValueError, "`sampler`"),
    (dict(mode="mean"), ValueError, "`mode`"),
    (dict(num_directions=0), ValueError, "`num_directions`"),
    # Type errors name the argument too; under the tests' runtime type checker the
    # message is beartype's, which quotes it as 'num_directions'.
    (dict(num_directions=2.0), TypeError, "num_directions"),
    (dict(num_directions=True), TypeError, "num_directions"),
    (dict(key="seed"), TypeError, "key"),
    (dict(key=jnp.zeros(3)), TypeError, "key"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), TypeError, "key"),
]


def _public_factories():
    mesh = jax.make_mesh((1,), ("data",))
    return {
        "filter_dodge": lambda **o: eqx_dodge.filter_dodge(squared_loss, **o),
        "filter_value_and_dodge": lambda **o: eqx_dodge.filter_value_and_dodge(
            squared_loss, **o
        ),
        "sharded_dodge": lambda **o: eqx_dodge.sharded_dodge(
            squared_loss, mesh=mesh, **o
        ),
        "dodge": lambda **o: eqx_dodge.dodge(**o),
        "dodge_updates": lambda **o: eqx_dodge.dodge(source="updates", **o),
        "adam_dodge": lambda **o: eqx_dodge.adam_dodge(1e-3, **o),
    }


@pytest.mark.parametrize("options, error, name", BAD_OPTIONS)
@pytest.mark.parametrize(
    "factory",
    [
        "filter_dodge",
        "filter_value_and_dodge",
        "sharded_dodge",
        "dodge",
        "dodge_updates",
        "adam_dodge",
    ],
)
def test_bad_options_name_the_argument(factory, options, error, name):
    """One convention everywhere: a bad value is a `ValueError`, a bad type a
    `TypeError`, and the message names the argument."""
    options = {"key": 0, **options}
    if (
        factory == "dodge_updates"
        and "key" in options
        and "num_directions" not in options
    ):
        options["num_directions"] = 2  # so that the key is used
    with pytest.raises(error, match=name):
        _public_factories()[factory](**options)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: eqx_dodge.dodge(source="adam", key=0), "`source`"),
        (lambda: eqx_dodge.adam_dodge(1e-3, source="ema", key=0), "`source`"),
        (lambda: eqx_dodge.dodge(key=0, ema_decay=0.9), "`ema_decay`"),
        (lambda: eqx_dodge.dodge(source="ema", ema_decay=1.5), "`ema_decay`"),
        (lambda: eqx_dodge.dodge(source="updates", baseline_decay=0.9), "baseline"),
        (lambda: eqx_dodge.dodge(source="updates", key=0), "`key`"),
        (lambda: eqx_dodge.dodge(), "`key`"),
        (
            lambda: eqx_dodge.OnlineDodge(lambda m, s, x: (s, 0.0), reduction="max"),
            "`reduction`",
        ),
        (lambda: eqx_dodge.adam_dodge(1e-3, b1=1.0, key=0), "`b1`"),
    ],
)
def test_option_errors_are_value_errors(call, name):
    with pytest.raises(ValueError, match=name):
        call()
