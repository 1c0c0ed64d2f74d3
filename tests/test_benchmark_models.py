"""`benchmarks/_models.py`: the rematerialised losses that step_cost.py times as
backprop's memory-saving baseline compute the plain losses' values and gradients."""

import importlib

import equinox as eqx
import jax
import numpy as np
import pytest


# The benchmark scripts are not a package; pytest puts their folder on the path.
_models = importlib.import_module("_models")


def small_problems():
    keys = jax.random.split(jax.random.key(0), 7)
    mlp = eqx.nn.MLP(6, 10, 8, 2, activation=jax.nn.relu, key=keys[0])
    # T = 6: three checkpointed segments of 2 steps (2 is the divisor nearest √6).
    lstm = _models.LSTM(4, 8, keys[2])
    return {
        "mlp": (mlp, _models.mlp_loss, _models.mlp_remat_loss, (5, 6), (5,)),
        "conv": (
            _models.ConvNet(keys[1]),
            _models.conv_loss,
            _models.conv_remat_loss,
            (3, 1, 28, 28),
            (3,),
        ),
        "lstm": (lstm, _models.lstm_loss, _models.lstm_remat_loss, (6, 3, 4), (6, 3)),
        "conv_deep": (
            _models.DeepConvNet(3, keys[3]),
            _models.conv_loss,
            _models.deep_conv_remat_loss,
            (2, 1, 28, 28),
            (2,),
        ),
    }


@pytest.mark.parametrize("name", ["mlp", "conv", "lstm", "conv_deep"])
def test_remat_loss_is_the_loss(name):
    model, loss, remat_loss, x_shape, y_shape = small_problems()[name]
    x = jax.random.normal(jax.random.key(1), x_shape)
    y = jax.random.randint(jax.random.key(2), y_shape, 0, 10)

    @eqx.filter_jit
    def both(model):
        return (
            eqx.filter_value_and_grad(loss)(model, x, y),
            eqx.filter_value_and_grad(remat_loss)(model, x, y),
        )

    (value, grad), (remat_value, remat_grad) = both(model)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grad), jax.tree.leaves(grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
