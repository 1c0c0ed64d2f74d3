"""The three models the benchmarks time, with their losses and synthetic batches.

- `mlp`: 784-256-256-10 ReLU MLP on a batch of 256 (the paper's MNIST model);
- `conv`: a small convolutional net on 28×28 single-channel images, batch 128;
- `lstm`: an LSTM with 128 units unrolled over T = 100 steps (`lax.scan`), batch 32,
    with a read-out and a cross-entropy loss at every step;
- `mlp_large` (`large_mlp_problem`, timed by `step_cost.py --large` only):
    784-2048-2048-10 ReLU MLP (p = 5.8 M) on a batch of 256;
- `conv_deep` (`deep_conv_problem`, whose memory `cpu_flags.py` compiles): eight
    3×3 convolutions of 16 channels at 28×28, batch 64, where activations, not
    parameters, fill the memory.

Data is random: the benchmarks measure cost, not accuracy.
"""

import math
from collections.abc import Callable, Sequence
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
    # The same loss rematerialised, as users who run out of memory write it for
    # backprop: the same value and gradient, fewer activations stored.
    remat_loss: Callable[..., Array]


def cross_entropy(logits: Float[Array, "*b c"], labels: Int[Array, "*b"]) -> Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


def mlp_loss(model: eqx.nn.MLP, x: Array, y: Array) -> Array:
    return cross_entropy(jax.vmap(model)(x), y)


def mlp_remat_loss(model: eqx.nn.MLP, x: Array, y: Array) -> Array:
    """`mlp_loss` with each layer (and its activation) under `eqx.filter_checkpoint`:
    backprop stores every layer's input only and recomputes the rest on the way
    back."""

    def hidden(layer: eqx.nn.Linear, h: Array) -> Array:
        return model.activation(layer(h))

    def forward(h: Array) -> Array:
        for layer in model.layers[:-1]:
            h = eqx.filter_checkpoint(hidden)(layer, h)
        return eqx.filter_checkpoint(_apply)(model.layers[-1], h)

    return cross_entropy(jax.vmap(forward)(x), y)


def _apply(layer: Callable[[Array], Array], h: Array) -> Array:
    return layer(h)


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


def _conv_block(conv: eqx.nn.Conv2d, h: Array) -> Array:
    return jax.nn.relu(conv(h))


def _remat_conv_loss(
    convs: Sequence[eqx.nn.Conv2d], linear: eqx.nn.Linear, x: Array, y: Array
) -> Array:
    """The loss of ReLU conv layers then a linear readout, each layer under
    `eqx.filter_checkpoint`."""

    def forward(image: Array) -> Array:
        for conv in convs:
            image = eqx.filter_checkpoint(_conv_block)(conv, image)
        return eqx.filter_checkpoint(_apply)(linear, image.reshape(-1))

    return cross_entropy(jax.vmap(forward)(x), y)


def conv_remat_loss(model: ConvNet, x: Array, y: Array) -> Array:
    """`conv_loss` with each layer under `eqx.filter_checkpoint`."""
    return _remat_conv_loss((model.conv1, model.conv2), model.linear, x, y)


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


def segment_length(length: int) -> int:
    """The divisor of `length` nearest its square root (the smaller one on a tie)."""
    root = math.sqrt(length)
    divisors = [d for d in range(1, length + 1) if length % d == 0]
    return min(divisors, key=lambda d: (abs(d - root), d))


def lstm_remat_loss(model: LSTM, x: Array, y: Array) -> Array:
    """`lstm_loss` as √T checkpointed segments of the scan: backprop stores one
    state per segment and recomputes each segment's steps on the way back."""
    length, batch = x.shape[:2]
    segments = (length // segment_length(length), segment_length(length))
    zeros = jnp.zeros((batch, model.cell.hidden_size), x.dtype)

    def step(state, inputs):
        x_t, y_t = inputs
        state = jax.vmap(model.cell)(x_t, state)
        return state, cross_entropy(jax.vmap(model.readout)(state[0]), y_t)

    @jax.checkpoint
    def segment(state, inputs):
        state, losses = jax.lax.scan(step, state, inputs)
        return state, jnp.sum(losses)

    inputs = (x.reshape(segments + x.shape[1:]), y.reshape(segments + y.shape[1:]))
    _, totals = jax.lax.scan(segment, (zeros, zeros), inputs)
    return jnp.sum(totals) / length


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
    remat_losses = (mlp_remat_loss, conv_remat_loss, lstm_remat_loss)
    return [
        Problem(*fields)
        for fields in zip(
            names, descriptions, models, losses, inputs, targets, remat_losses
        )
    ]


@eqx.filter_jit
def _large_mlp_and_data(key: PRNGKeyArray) -> tuple:
    keys = jax.random.split(key, 2)
    model = eqx.nn.MLP(784, 10, 2048, 2, activation=jax.nn.relu, key=keys[0])
    x = jax.random.normal(keys[1], (256, 784))
    return model, x, jax.random.randint(keys[1], (256,), 0, 10)


def large_mlp_problem(key: PRNGKeyArray) -> Problem:
    """An MLP wide enough (p = 5.8 M) that drawing a direction is a visible part of
    a step and each extra direction's tangent costs nearly a forward pass."""
    model, x, y = _large_mlp_and_data(key)
    description = "MLP 784-2048-2048-10, batch 256"
    return Problem("mlp_large", description, model, mlp_loss, x, y, mlp_remat_loss)


class DeepConvNet(eqx.Module):
    convs: tuple[eqx.nn.Conv2d, ...]
    linear: eqx.nn.Linear

    def __init__(self, depth: int, key: PRNGKeyArray):
        keys = jax.random.split(key, depth + 1)
        self.convs = tuple(
            eqx.nn.Conv2d(1 if i == 0 else 16, 16, 3, padding=1, key=keys[i])
            for i in range(depth)
        )
        self.linear = eqx.nn.Linear(16 * 28 * 28, 10, key=keys[-1])

    def __call__(self, image: Float[Array, "1 28 28"]) -> Array:
        for conv in self.convs:
            image = jax.nn.relu(conv(image))
        return self.linear(image.reshape(-1))


def deep_conv_remat_loss(model: DeepConvNet, x: Array, y: Array) -> Array:
    """`conv_loss` on the deep net with each layer under `eqx.filter_checkpoint`."""
    return _remat_conv_loss(model.convs, model.linear, x, y)


@eqx.filter_jit
def _deep_conv_and_data(key: PRNGKeyArray, depth: int) -> tuple:
    keys = jax.random.split(key, 2)
    x = jax.random.normal(keys[1], (64, 1, 28, 28))
    return DeepConvNet(depth, keys[0]), x, jax.random.randint(keys[1], (64,), 0, 10)


def deep_conv_problem(key: PRNGKeyArray, depth: int = 8) -> Problem:
    """A conv net deep enough that keeping every layer's activations (what
    backprop does) costs several times one layer's."""
    model, x, y = _deep_conv_and_data(key, depth)
    description = f"ConvNet {depth}×conv3×3 (16 ch, 28×28) + linear, batch 64"
    return Problem(
        "conv_deep", description, model, conv_loss, x, y, deep_conv_remat_loss
    )
