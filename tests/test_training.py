"""`filter_dodge` dropped into an ordinary Equinox + Optax training loop."""

import runpy
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import eqx_dodge


ROOT = Path(__file__).parent.parent


def _digits():
    digits = load_digits()
    images = jnp.asarray(np.asarray(digits.data, np.float32) / 16.0)  # pyright: ignore
    labels = jnp.asarray(np.asarray(digits.target, np.int32))  # pyright: ignore
    return images, labels


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


@pytest.mark.parametrize("optimiser", [optax.sgd(0.05), optax.adam(1e-2)])
def test_swapping_filter_grad_for_filter_dodge_trains(optimiser):
    images, labels = _digits()
    model = eqx.nn.MLP(64, 10, 32, 1, activation=jax.nn.relu, key=jax.random.key(0))
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    # The loop of the Equinox MLP example, with one line changed.
    @eqx.filter_jit
    def make_step(model, opt_state, x, y, key):
        loss, grads = eqx_dodge.filter_value_and_dodge(  # was eqx.filter_value_and_grad
            loss_fn, key=key, num_directions=8
        )(model, x, y)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss

    initial = loss_fn(model, images, labels)
    key = jax.random.key(1)
    # optax.adam's bias correction mixes Python floats with its int32 step count,
    # which the test suite's strict promotion refuses; users run with the default.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(300):
            key, batch_key, step_key = jax.random.split(key, 3)
            index = jax.random.choice(batch_key, images.shape[0], (64,), False)
            model, opt_state, _ = make_step(
                model, opt_state, images[index], labels[index], step_key
            )
    final = loss_fn(model, images, labels)
    # Chance level is log(10) ≈ 2.30; a clear drop, well beyond batch noise.
    assert final < 0.7 * initial


def test_demo_runs(tmp_path, monkeypatch, capsys):
    """`make demo`'s script, in this process (its imports are already loaded)."""
    output = tmp_path / "demo.png"
    script = str(ROOT / "examples" / "demo.py")
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--output", str(output)])
    # The demo is user code, run with JAX's default dtype promotion (`optax.adam`
    # is not clean under the suite's strict promotion).
    with jax.numpy_dtype_promotion("standard"):
        runpy.run_path(script, run_name="__main__")
    printed = capsys.readouterr().out
    assert "filter_grad: test accuracy" in printed
    assert "DODGE k=16: test accuracy" in printed
    assert output.stat().st_size > 10_000
