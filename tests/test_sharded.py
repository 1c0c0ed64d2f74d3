"""`eqx_dodge.sharded_value_and_dodge` on one-device meshes: argument checks and
the degenerate meshes. The multi-device checks are in `test_sharded_devices.py`."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_dodge
from eqx_dodge._sharded_layout import make_layout

from .helpers import assert_tree_allclose, layout_directions


def loss(model, x):
    return jnp.mean(jax.vmap(model)(x) ** 2)


@pytest.fixture
def setup(getkey):
    mesh = jax.make_mesh((1,), ("data",))
    model = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    x = jax.random.normal(getkey(), (4, 3))
    return mesh, model, x


def test_one_device_mesh_equals_filter_value_and_dodge(setup, getkey):
    mesh, model, x = setup
    key = getkey()
    value, estimate = eqx.filter_jit(
        eqx_dodge.sharded_value_and_dodge(loss, mesh=mesh, key=key, num_directions=3)
    )(model, x)
    # Jitted: eagerly, the estimator compiles each of its hundreds of operations.
    expected_value, expected = eqx.filter_jit(
        eqx_dodge.filter_value_and_dodge(loss, key=key, num_directions=3)
    )(model, x)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(estimate) == jax.tree.structure(expected)


def test_decorator_and_method(setup, getkey):
    """As with `eqx.filter_grad`, a decorated method differentiates its first
    argument, the instance: catches a wrapper that drops or rebinds it."""
    mesh, model, x = setup
    key = getkey()

    class Wrapper(eqx.Module):
        scale: jax.Array

        @eqx_dodge.sharded_dodge(mesh=mesh, key=key)
        def __call__(self, model, x):
            return self.scale * loss(model, x)

    wrapper = Wrapper(jnp.array(2.0))
    estimate = wrapper(model, x)
    expected = eqx_dodge.filter_dodge(lambda w, m, x: w.scale * loss(m, x), key=key)(
        wrapper, model, x
    )
    assert isinstance(estimate, Wrapper)
    np.testing.assert_allclose(estimate.scale, expected.scale, rtol=1e-6)
    assert float(estimate.scale) != 0


def test_errors(setup, getkey):
    mesh, model, x = setup
    key = getkey()

    def jit_call(fun, **options):
        # Under jit: the errors are raised while tracing, and eagerly each of the
        # estimator's operations would compile on its own.
        wrapper = eqx_dodge.sharded_value_and_dodge(fun, **options)
        return eqx.filter_jit(wrapper)(model, x)

    with pytest.raises(ValueError, match="`data_axis` names 'batch'"):
        eqx_dodge.sharded_value_and_dodge(loss, mesh=mesh, data_axis="batch", key=key)
    with pytest.raises(ValueError, match="`batch_reduction`"):
        eqx_dodge.sharded_value_and_dodge(
            loss,
            mesh=mesh,
            key=key,
            batch_reduction="max",  # pyright: ignore
        )
    with pytest.raises(ValueError, match="got neither"):
        eqx_dodge.sharded_value_and_dodge(loss, mesh=mesh)
    value_and_dodge = eqx_dodge.sharded_value_and_dodge(loss, mesh=mesh, key=key)
    with pytest.raises(TypeError, match="by position"):
        value_and_dodge(model=model, x=x)
    # A batch that is one array has no location inside it to name.
    with pytest.raises(ValueError, match=r"\(a batch\) is an array of shape \(\);"):
        eqx.filter_jit(value_and_dodge)(model, jnp.ones(()))
    with pytest.raises(ValueError, match=r"holds an array of shape \(\) at \['x'\]"):
        eqx.filter_jit(value_and_dodge)(model, {"x": jnp.ones(())})
    with pytest.raises(ValueError, match="replicated over the data axes"):
        jit_call(loss, mesh=mesh, key=key, param_specs=P("data"))
    with pytest.raises(ValueError, match="`param_specs` must be a `PartitionSpec`"):
        jit_call(loss, mesh=mesh, key=key, param_specs=[P(), P()])
    with pytest.raises(ValueError, match="exceeds the number of trainable"):
        jit_call(loss, mesh=mesh, key=key, num_directions=1000, mode="partition")
    with pytest.raises(TypeError, match="floating-point scalar"):
        jit_call(lambda m, x: jax.vmap(m)(x), mesh=mesh, key=key)


def test_model_axis_wrapper_passed_through_filter_jit(getkey):
    """The model-parallel path on a 1 × 1 mesh, with the wrapper (and its dict of
    specs) passed as an argument of `eqx.filter_jit`: the estimate is exactly
    `(1/k) Σ_j (g·u_j) u_j` for the directions the shard draws. Catches a wrong
    derivative or weight (a missing `1/k`, a derivative of the wrong direction)."""
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    specs = {"w": P(None, "model"), "b": P("model")}
    params = {"w": jax.random.normal(getkey(), (3, 2)), "b": jnp.zeros(2)}
    x = jax.random.normal(getkey(), (4, 3))
    key = getkey()

    def linear_loss(params, x, reduce=lambda z: jax.lax.psum(z, "model")):
        # Output columns are split over "model": sum the squares across the shards.
        squares = jnp.sum((x @ params["w"] + params["b"][None]) ** 2)
        return reduce(squares) / (x.shape[0] * 2)

    value_and_dodge = eqx_dodge.sharded_value_and_dodge(
        linear_loss, mesh=mesh, param_specs=specs, key=key, num_directions=2
    )
    value, estimate = eqx.filter_jit(lambda f, p, x: f(p, x))(
        value_and_dodge, params, x
    )
    global_loss = ft.partial(linear_loss, x=x, reduce=lambda z: z)
    np.testing.assert_allclose(value, global_loss(params), rtol=1e-6)
    layout = make_layout(specs, params, mesh, ("data",))
    directions = jax.jit(
        jax.shard_map(
            lambda p: layout_directions(layout, key, p, 2),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=jax.tree.map(
                lambda spec: P(None, *spec), specs, is_leaf=lambda s: isinstance(s, P)
            ),
        )
    )(
        jax.tree.map(
            lambda leaf, s: jax.device_put(leaf, NamedSharding(mesh, s)), params, specs
        )
    )
    derivatives = jax.vmap(lambda u: jax.jvp(global_loss, (params,), (u,))[1])(
        directions
    )
    expected = jax.tree.map(lambda u: jnp.tensordot(derivatives / 2, u, 1), directions)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)
