"""`eqx_dodge.sharded_value_and_dodge`: argument checks here, on one device; the
multi-device checks in `sharded_checks.py`, run on 8 simulated devices in a
subprocess (JAX fixes its device count when it starts)."""

import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import eqx_dodge


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_on_eight_simulated_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    # This checkout first, and the benchmarks folder: `sharded_checks.py` imports
    # `scaling`, which imports its sibling `_common`.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "benchmarks")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "sharded_checks.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


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
    value, estimate = eqx_dodge.sharded_value_and_dodge(
        loss, mesh=mesh, key=key, num_directions=3
    )(model, x)
    expected_value, expected = eqx_dodge.filter_value_and_dodge(
        loss, key=key, num_directions=3
    )(model, x)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(estimate) == jax.tree.structure(expected)


def test_decorator_and_method(setup, getkey):
    mesh, model, x = setup
    key = getkey()

    class Wrapper(eqx.Module):
        scale: float

        @eqx_dodge.sharded_dodge(mesh=mesh, key=key)
        def __call__(self, model, x):
            return self.scale * loss(model, x)

    estimate = Wrapper(2.0)(model, x)
    expected = eqx_dodge.filter_dodge(lambda m, x: 2.0 * loss(m, x), key=key)(model, x)
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_errors(setup, getkey):
    mesh, model, x = setup
    key = getkey()
    with pytest.raises(ValueError, match="`data_axis` names 'batch'"):
        eqx_dodge.sharded_value_and_dodge(loss, mesh=mesh, data_axis="batch", key=key)
    # The runtime type checker of the tests may catch these first (a TypeError).
    with pytest.raises((TypeError, ValueError), match="batch_reduction"):
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
    with pytest.raises(ValueError, match="split along its leading axis"):
        value_and_dodge(model, jnp.ones(()))
    with pytest.raises(ValueError, match="replicated over the data axes"):
        eqx_dodge.sharded_value_and_dodge(
            loss, mesh=mesh, key=key, param_specs=P("data")
        )(model, x)
    with pytest.raises(ValueError, match="`param_specs` must be a `PartitionSpec`"):
        eqx_dodge.sharded_value_and_dodge(
            loss, mesh=mesh, key=key, param_specs=[P(), P()]
        )(model, x)
    with pytest.raises(ValueError, match="exceeds the number of trainable"):
        eqx_dodge.sharded_value_and_dodge(
            loss, mesh=mesh, key=key, num_directions=1000, mode="partition"
        )(model, x)
    with pytest.raises(TypeError, match="must return a scalar"):
        eqx_dodge.sharded_value_and_dodge(
            lambda m, x: jax.vmap(m)(x), mesh=mesh, key=key
        )(model, x)


def test_model_axis_wrapper_passed_through_filter_jit(getkey):
    # The model-parallel path on a 1 × 1 mesh, with the wrapper (and its dict of
    # specs) passed as an argument of `eqx.filter_jit`.
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params = {"w": jax.random.normal(getkey(), (3, 2)), "b": jnp.zeros(2)}
    x = jax.random.normal(getkey(), (4, 3))

    def linear_loss(params, x, reduce=lambda z: jax.lax.psum(z, "model")):
        # Output columns are split over "model": sum the squares across the shards.
        squares = jnp.sum((x @ params["w"] + params["b"][None]) ** 2)
        return reduce(squares) / (x.shape[0] * 2)

    value_and_dodge = eqx_dodge.sharded_value_and_dodge(
        linear_loss,
        mesh=mesh,
        param_specs={"w": P(None, "model"), "b": P("model")},
        key=getkey(),
        num_directions=2,
    )
    value, estimate = eqx.filter_jit(lambda f, p, x: f(p, x))(
        value_and_dodge, params, x
    )
    expected = linear_loss(params, x, reduce=lambda z: z)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert jax.tree.structure(estimate) == jax.tree.structure(params)
    assert float(jnp.sum(jnp.abs(estimate["w"]))) > 0
