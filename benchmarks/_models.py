"""The three models the benchmarks time, with their losses and synthetic batches.

- `mlp`: 784-256-256-10 ReLU MLP on a batch of 256 (the paper's MNIST model);
- `conv`: a small convolutional net on 28×28 single-channel images, batch 128;
- `lstm`: an LSTM with 128 units unrolled over T = 100 steps (`lax.scan`), batch 32,
    with a read-out and a cross-entropy loss at every step.

Data is random: the benchmarks measure cost, not accuracy.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


class Problem(NamedTuple):
    name: str
    description: str
    model: Any
    loss: Callable[..., Array]
    x: Array
    y: Array


def cross_entropy(logits: Float[Array, "*b c"], labels: Int[Array, "*b"]) -> Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


def mlp_loss(model: eqx.nn.MLP, x: Array, y: Array) -> Array:
    return cross_entropy(jax.vmap(model)(x), y)


class ConvNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray):
        key1, key2, key3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, stride=2, key=key1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, key=key2)
        self.linear = eqx.nn.Linear(32 * 6 * 6, 10, key=key3)

    def __call__(self, image: Float[Array, "1 28 28"]) -> Array:
        hidden = jax.nn.relu(self.conv1(image))
        hidden = jax.nn.relu(self.conv2(hidden))
        return self.linear(hidden.reshape(-1))


def conv_loss(model: ConvNet, x: Array, y: Array) -> Array:
    return cross_entropy(jax.vmap(model)(x), y)


class LSTM(eqx.Module):
    cell: eqx.nn.LSTMCell
    readout: eqx.nn.Linear

    def __init__(self, input_size: int, hidden_size: int, key: PRNGKeyArray):
        key1, key2 = jax.random.split(key)
        self.cell = eqx.nn.LSTMCell(input_size, hidden_size, key=key1)
        self.readout = eqx.nn.Linear(hidden_size, 10, key=key2)

    def __call__(self, inputs: Float[Array, "time batch features"]) -> Array:
        batch = inputs.shape[1]
        zeros = jnp.zeros((batch, self.cell.hidden_size), inputs.dtype)

        def step(state, x_t):
            state = jax.vmap(self.cell)(x_t, state)
            return state, jax.vmap(self.readout)(state[0])

        _, logits = jax.lax.scan(step, (zeros, zeros), inputs)
        return logits


def lstm_loss(model: LSTM, x: Array, y: Array) -> Array:
    return cross_entropy(model(x), y)


@eqx.filter_jit
def _models_and_data(key: PRNGKeyArray, steps: int) -> tuple:
    # Compiled whole: eagerly, every initialiser and draw would compile on its own.
    keys = jax.random.split(key, 6)
    models = (
        eqx.nn.MLP(784, 10, 256, 2, activation=jax.nn.relu, key=keys[0]),
        ConvNet(keys[1]),
        LSTM(16, 128, keys[2]),
    )
    inputs = (
        jax.random.normal(keys[3], (256, 784)),
        jax.random.normal(keys[4], (128, 1, 28, 28)),
        jax.random.normal(keys[5], (steps, 32, 16)),
    )
    targets = (
        jax.random.randint(keys[3], (256,), 0, 10),
        jax.random.randint(keys[4], (128,), 0, 10),
        jax.random.randint(keys[5], (steps, 32), 0, 10),
    )
    return models, inputs, targets


def make_problems(key: PRNGKeyArray, quick: bool = False) -> list[Problem]:
    """The benchmark problems; `quick` shrinks the LSTM's unroll (T = 10)."""
    steps = 10 if quick else 100
    models, inputs, targets = _models_and_data(key, steps)
    names = ("mlp", "conv", "lstm")
    descriptions = (
        "MLP 784-256-256-10, batch 256",
        "ConvNet 2×conv3×3/2 (16, 32 ch) + linear, 28×28, batch 128",
        f"LSTM-128 (16 inputs), T = {steps}, batch 32, loss at every step",
    )
    losses = (mlp_loss, conv_loss, lstm_loss)
    return [
        Problem(*fields)
        for fields in zip(names, descriptions, models, losses, inputs, targets)
    ]
