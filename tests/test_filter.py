"""filter_dodge and filter_value_and_dodge: calling convention, exact identities."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge
from eqx_dodge._directions import num_coordinates

from .helpers import (
    assert_tree_allclose,
    batch_for,
    flat,
    make_models,
    squared_loss,
    tree_allclose,
    WithStatics,
)


@pytest.fixture(params=["mlp", "statics"])
def problem(request):
    model = make_models(jax.random.key(0))[request.param]
    return model, batch_for(model, jax.random.key(1))


# The references jitted once for the module (eagerly, every operation of a backward
# pass or of a Threefry hash compiles on its own).
filter_grad = eqx.filter_jit(eqx.filter_grad(squared_loss))
loss_value = eqx.filter_jit(squared_loss)
random_direction = eqx.filter_jit(eqx_dodge.random_direction)


def np_flat(tree):
    """`flat` in NumPy, for results already computed."""
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_structure_matches_filter_grad(problem, getkey):
    model, x = problem
    gradient = filter_grad(model, x)
    estimate = eqx_dodge.filter_dodge(squared_loss, key=getkey())(model, x)
    assert jax.tree.structure(estimate) == jax.tree.structure(gradient)
    if isinstance(model, WithStatics):
        assert estimate.activation is None and estimate.depth is None


def test_partition_with_one_part_per_coordinate_is_exact(problem, getkey):
    model, x = problem
    gradient = filter_grad(model, x)
    p = num_coordinates(model)
    estimate = eqx_dodge.filter_dodge(
        squared_loss, key=getkey(), num_directions=p, mode="partition"
    )(model, x)
    assert tree_allclose(estimate, gradient, rtol=1e-5, atol=1e-6)


def test_oracle_candidate_is_exact(problem):
    model, x = problem
    gradient = filter_grad(model, x)
    estimate = eqx_dodge.filter_dodge(squared_loss, direction=gradient)(model, x)
    assert tree_allclose(estimate, gradient, rtol=1e-5, atol=1e-6)


def test_candidate_estimate_is_projection(problem, getkey):
    model, x = problem
    gradient = np_flat(filter_grad(model, x))
    candidate = random_direction(getkey(), model, sampler="gaussian")
    estimate = eqx_dodge.filter_dodge(squared_loss, direction=candidate)(model, x)
    c = np_flat(candidate)
    expected = (gradient @ c) / (c @ c) * c
    np.testing.assert_allclose(np_flat(estimate), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e35])
def test_candidate_of_any_scale(problem, scale):
    """The estimate along a candidate does not depend on its scale: catches a
    squared norm that underflows (a nonzero candidate read as zero, the estimate
    lost to zeros) or overflows once ‖c‖ leaves about 1e±19 in float32, for the
    filter estimators and the optax candidate source."""
    model, x = problem
    gradient = filter_grad(model, x)
    scaled = jax.tree.map(lambda leaf: scale * leaf, gradient)
    estimate = eqx_dodge.filter_dodge(squared_loss, direction=scaled)(model, x)
    assert tree_allclose(estimate, gradient, rtol=1e-5, atol=1e-6)
    params = eqx.filter(model, eqx.is_inexact_array)
    transform = eqx_dodge.dodge(source="updates")
    updates, _ = transform.update(
        scaled, transform.init(params), model, value_fn=squared_loss, x=x
    )
    assert tree_allclose(updates, gradient, rtol=1e-5, atol=1e-6)


def test_candidate_near_float32_limits(problem):
    """A candidate of entries ±3e37 (its squared norm overflows even after scaling
    by 2^-60): the same estimate as along ±1."""
    model, x = problem
    signs = jax.tree.map(jnp.sign, filter_grad(model, x))
    huge = jax.tree.map(lambda leaf: 3e37 * leaf, signs)
    expected = eqx_dodge.filter_dodge(squared_loss, direction=signs)(model, x)
    estimate = eqx_dodge.filter_dodge(squared_loss, direction=huge)(model, x)
    assert tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)


def test_zero_candidate_gives_zero_estimate(problem):
    model, x = problem
    zero = jax.tree.map(np.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    value, estimate = eqx_dodge.filter_value_and_dodge(squared_loss, direction=zero)(
        model, x
    )
    assert np.isfinite(value)
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(estimate))


def test_value_is_the_loss(problem, getkey):
    model, x = problem
    value, _ = eqx_dodge.filter_value_and_dodge(
        squared_loss, key=getkey(), num_directions=3
    )(model, x)
    np.testing.assert_allclose(value, loss_value(model, x), rtol=1e-5, atol=1e-8)


def test_same_key_same_estimate_different_key_different(problem):
    model, x = problem
    key = jax.random.key(42)
    first = eqx_dodge.filter_dodge(squared_loss, key=key, num_directions=2)(model, x)
    again = eqx_dodge.filter_dodge(squared_loss, key=key, num_directions=2)(model, x)
    other = eqx_dodge.filter_dodge(
        squared_loss, key=jax.random.key(43), num_directions=2
    )(model, x)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again))
    )
    assert not np.array_equal(np_flat(first), np_flat(other))


def test_single_direction_is_listing_one(problem, getkey):
    """k = 1 is the paper's Listing 1 with `random_direction(key, model)`."""
    model, x = problem
    key = getkey()

    @eqx.filter_jit
    def listing_one(model, key):
        diff, static = eqx.partition(model, eqx.is_inexact_array)
        direction = eqx_dodge.random_direction(key, model)
        _, derivative = jax.jvp(
            lambda d: squared_loss(eqx.combine(d, static), x), (diff,), (direction,)
        )
        return jax.tree.map(lambda u: derivative * u, direction)

    expected = listing_one(model, key)
    estimate = eqx_dodge.filter_dodge(squared_loss, key=key)(model, x)
    assert tree_allclose(estimate, expected, rtol=1e-6, atol=0)


def test_random_direction_entries(getkey):
    tree = {"a": jnp.zeros((1000,)), "b": jnp.zeros((7, 3), jnp.float16), "c": 3}
    rademacher = random_direction(getkey(), tree)
    assert rademacher["c"] is None and rademacher["b"].dtype == jnp.float16
    signs = np.asarray(rademacher["a"])
    assert np.all(np.abs(signs) == 1)
    assert abs(float(np.mean(signs))) < 4 / np.sqrt(1000)
    gaussian = random_direction(getkey(), tree, sampler="gaussian")
    assert gaussian["b"].shape == (7, 3) and gaussian["b"].dtype == jnp.float16
    assert abs(float(np.std(np.asarray(gaussian["a"]))) - 1) < 0.1


def test_partition_direction_parts_are_disjoint_and_sum_back(getkey):
    direction = {"a": jnp.arange(1.0, 8.0), "b": jnp.ones((2, 2))}
    parts = jax.jit(eqx_dodge.partition_direction, static_argnums=1)(direction, 3)
    assert parts["a"].shape == (3, 7) and parts["b"].shape == (3, 2, 2)
    parts = jax.tree.map(np.asarray, parts)
    summed = jax.tree.map(lambda leaf: np.sum(leaf, axis=0), parts)
    assert_tree_allclose(summed, direction, rtol=0, atol=0)
    nonzero = np.concatenate([(parts["a"] != 0), (parts["b"] != 0).reshape(3, 4)], 1)
    nonzero = nonzero.astype(np.int32)
    assert np.all(np.sum(nonzero, axis=0) == 1)
    assert set(np.sum(nonzero, axis=1).tolist()) <= {3, 4}


def test_has_aux(problem, getkey):
    model, x = problem

    def loss_with_aux(model, x):
        return squared_loss(model, x), {"batch": x.shape[0], "mean": jnp.mean(x)}

    key = getkey()
    (value, aux), estimate = eqx_dodge.filter_value_and_dodge(
        loss_with_aux, key=key, num_directions=4, has_aux=True
    )(model, x)
    assert aux["batch"] == 8
    np.testing.assert_allclose(aux["mean"], np.mean(x), rtol=1e-5, atol=1e-8)
    estimate_only, aux_again = eqx_dodge.filter_dodge(
        loss_with_aux, key=key, num_directions=4, has_aux=True
    )(model, x)
    assert aux_again["batch"] == 8
    np.testing.assert_array_equal(np_flat(estimate), np_flat(estimate_only))
    np.testing.assert_allclose(value, loss_value(model, x), rtol=1e-5, atol=1e-8)


def test_constant_aux_leaves_are_arrays_as_with_filter_grad():
    """An aux array that does not depend on the inputs (`eqx.nn.BatchNorm`'s
    first-time flag) is a constant of the traced jvp: it comes back as an array with
    the dtype and weak type `eqx.filter_value_and_grad` gives, not as a Python
    scalar, so a jitted step that returns it and takes it back is traced once."""
    model = eqx.nn.MLP(3, 1, 8, 1, key=jax.random.key(0))
    x = jnp.ones((4, 3))

    def loss_with_aux(model, x):
        constants = {"flag": jnp.array(False), "count": jnp.array(3)}
        loss = jnp.mean(jax.vmap(model)(x) ** 2)
        return loss, {**constants, "half": jnp.array(0.5)}

    def signature(aux):
        return {
            name: (type(leaf), leaf.dtype, leaf.weak_type) for name, leaf in aux.items()
        }

    (_, grad_aux), _ = eqx.filter_value_and_grad(loss_with_aux, has_aux=True)(model, x)
    for num_directions in (1, 4):
        (_, aux), _ = eqx_dodge.filter_value_and_dodge(
            loss_with_aux, key=0, num_directions=num_directions, has_aux=True
        )(model, x)
        assert signature(aux) == signature(grad_aux)

    traces = []

    @eqx.filter_jit
    def step(model, aux, key):
        traces.append(None)
        (_, aux), estimate = eqx_dodge.filter_value_and_dodge(
            loss_with_aux, key=key, has_aux=True
        )(model, x)
        return eqx.apply_updates(model, estimate), aux

    aux = grad_aux
    for seed in range(3):
        model, aux = step(model, aux, jnp.asarray(seed))
    assert len(traces) == 1


def test_decorator_and_extra_arguments(getkey):
    model = make_models(jax.random.key(0))["mlp"]
    x = batch_for(model, jax.random.key(1))
    key = getkey()

    @eqx_dodge.filter_dodge(key=key)
    def loss(model, x, *, offset):
        return squared_loss(model, x) + offset

    decorated = loss(model, x, offset=jnp.array(1.0))
    plain = eqx_dodge.filter_dodge(squared_loss, key=key)(model, x)
    assert jnp.allclose(flat(decorated), flat(plain))
    assert loss.__wrapped__.__name__ == "loss"


def test_method_decorator(getkey):
    key = getkey()

    class Regressor(eqx.Module):
        weight: jax.Array

        @eqx_dodge.filter_dodge(key=key, num_directions=2)
        def estimate(self, x):
            return jnp.sum(jnp.square(x @ self.weight))

    regressor = Regressor(jnp.ones((3,)))
    x = jnp.ones((2, 3))
    estimate: Regressor = regressor.estimate(x)  # pyright: ignore[reportAssignmentType]
    expected = eqx_dodge.filter_dodge(
        lambda r, x: jnp.sum(jnp.square(x @ r.weight)), key=key, num_directions=2
    )(regressor, x)
    assert jnp.allclose(estimate.weight, expected.weight)


@pytest.mark.parametrize("jit", [jax.jit, eqx.filter_jit])
def test_under_jit(problem, getkey, jit):
    model, x = problem
    key = getkey()
    eager = eqx_dodge.filter_dodge(squared_loss, key=key, num_directions=4)(model, x)

    @jit
    def step(trainable, key):
        model_ = eqx.combine(
            trainable, eqx.filter(model, eqx.is_inexact_array, inverse=True)
        )
        return eqx_dodge.filter_dodge(squared_loss, key=key, num_directions=4)(
            model_, x
        )

    jitted = step(eqx.filter(model, eqx.is_inexact_array), key)
    assert tree_allclose(eager, jitted, rtol=1e-5, atol=1e-7)


def test_jitted_wrapper_module(problem, getkey):
    model, x = problem
    wrapper = eqx_dodge.filter_dodge(
        squared_loss, key=getkey(), mode="partition", num_directions=3
    )
    assert tree_allclose(
        wrapper(model, x), eqx.filter_jit(wrapper)(model, x), rtol=1e-5, atol=1e-7
    )


def test_dtypes_are_preserved(getkey):
    model = {
        "half": jnp.ones((4,), jnp.float16),
        "single": jnp.ones((3,), jnp.float32),
        "bfloat": jnp.ones((2,), jnp.bfloat16),
    }

    def loss(model):
        return sum(
            (jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in model.values()),
            start=jnp.zeros(()),
        )

    for options in (
        {"key": getkey()},
        {"key": getkey(), "num_directions": 3},
        {"key": getkey(), "num_directions": 3, "mode": "partition"},
        {"direction": jax.tree.map(jnp.ones_like, model)},
    ):
        # Dtypes and shapes are static: tracing gives them without compiling.
        estimate = eqx.filter_eval_shape(eqx_dodge.filter_dodge(loss, **options), model)
        for name, leaf in model.items():
            assert estimate[name].dtype == leaf.dtype
            assert estimate[name].shape == leaf.shape


def test_float64_losses_keep_float64_exactness():
    """With `jax_enable_x64`, the estimates the docs call exact are exact to float64,
    not to float32: the candidate itself, `k = p` parts, `k = p` orthogonal
    directions, and activity perturbation of a one-unit output (`(g·u)u = g` for
    `u = ±1`). The weights `1/k` and the derivatives were float32 (errors of 1e-8)."""
    with jax.enable_x64(True):
        w = {"a": jnp.linspace(-1.0, 1.0, 7), "b": jnp.linspace(0.5, 2.0, 6)}
        assert w["a"].dtype == jnp.float64

        def loss(p):
            return jnp.sum(p["a"] ** 3) + jnp.sum(jnp.sin(p["b"]) * p["b"])

        g = np_flat(jax.grad(loss)(w))
        exact = {
            "candidate": dict(direction=jax.grad(loss)(w)),
            "partition k=p": dict(key=0, num_directions=13, mode="partition"),
            "orthogonal k=p": dict(key=0, num_directions=13, sampler="orthogonal"),
        }
        for name, options in exact.items():
            estimate = np_flat(eqx_dodge.filter_dodge(loss, **options)(w))
            np.testing.assert_allclose(estimate, g, rtol=1e-13, atol=0, err_msg=name)

        linear = eqx.nn.MLP(4, 1, 8, 0, key=jax.random.key(0))  # one Linear, 4 -> 1
        linear = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, linear
        )
        x = jax.random.normal(jax.random.key(1), (8, 4), jnp.float64)

        def example_loss(model, x):
            return jnp.sin(model(x)[0]) ** 2

        def batch_loss(model, x):
            return jnp.mean(jax.vmap(lambda one: example_loss(model, one))(x))

        expected = np_flat(eqx.filter_grad(batch_loss)(linear, x))
        estimate = np_flat(eqx_dodge.activity_dodge(example_loss, key=0)(linear, x))
        np.testing.assert_allclose(estimate, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("num_directions", [1, 2, 8])
def test_aux_with_non_array_leaves(num_directions):
    """An aux holding a string and the model itself (its activation functions are
    not arrays), as `eqx.filter_grad(has_aux=True)` allows: returned as it was, for
    one direction, one chunk of several and several chunks, and by the activity
    estimator. Catches the aux put through `vmap` whole ("is not a valid JAX
    type") and the primitive scan that traced the loss with `jax.make_jaxpr`."""
    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    x = jnp.ones((3, 2))

    def loss(model, x):
        out = jax.vmap(model)(x)
        return jnp.mean(out**2), {"out": out, "tag": "train", "model": model}

    (value, aux), estimate = eqx_dodge.filter_value_and_dodge(
        loss, has_aux=True, key=0, num_directions=num_directions
    )(model, x)
    (expected_value, expected), _ = eqx.filter_value_and_grad(loss, has_aux=True)(
        model, x
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    assert aux["tag"] == "train" and aux["model"].activation is jax.nn.relu
    np.testing.assert_allclose(aux["out"], expected["out"], rtol=1e-6)
    assert jax.tree.structure(estimate) == jax.tree.structure(
        eqx.filter(model, eqx.is_inexact_array)
    )

    def example_loss(model, x):
        out = model(x)
        return jnp.sum(out**2), {"out": out, "tag": "train"}

    _, activity_aux = eqx_dodge.activity_dodge(
        example_loss, has_aux=True, key=0, num_directions=num_directions
    )(model, x)
    assert activity_aux["tag"] == "train"
    np.testing.assert_allclose(activity_aux["out"], expected["out"], rtol=1e-6)
