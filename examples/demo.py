"""Train an MLP on scikit-learn's handwritten digits with DODGE and with backprop.

The same Equinox + Optax training loop runs twice: once with `eqx.filter_grad` and
once with `eqx_dodge.filter_dodge` (k random directions, one forward pass, no
backward pass). Prints both test accuracies and writes `demo.png`.

    python examples/demo.py [--num-directions 16] [--steps 4000] [--quick]
"""

import argparse
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jaxtyping import Array, Float, Int, PRNGKeyArray  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import eqx_dodge  # noqa: E402


def load_data(seed: int = 0) -> tuple[Array, Array, Array, Array]:
    """The 1797 8×8 digits, scaled to [0, 1], split 1500 train / 297 test."""
    digits = load_digits()
    images = np.asarray(digits.data, np.float32) / 16.0  # pyright: ignore
    labels = np.asarray(digits.target, np.int32)  # pyright: ignore
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    return (
        jnp.asarray(images[:1500]),
        jnp.asarray(labels[:1500]),
        jnp.asarray(images[1500:]),
        jnp.asarray(labels[1500:]),
    )


def cross_entropy(
    model: eqx.nn.MLP, images: Float[Array, "b 64"], labels: Int[Array, " b"]
) -> Float[Array, ""]:
    logits = jax.vmap(model)(images)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(
    model: eqx.nn.MLP, images: Float[Array, "b 64"], labels: Int[Array, " b"]
) -> Float[Array, ""]:
    predictions = jnp.argmax(jax.vmap(model)(images), axis=-1)
    return jnp.mean((predictions == labels).astype(jnp.float32))


def train(
    estimate_gradient: Callable,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    key: PRNGKeyArray,
    data: tuple[Array, Array, Array, Array],
    label: str,
    steps_per_chunk: int = 100,
) -> dict[str, list[float]]:
    """An ordinary Equinox + Optax loop; `estimate_gradient(model, x, y, key)` is the
    only thing that differs between backprop and DODGE."""
    train_x, train_y, test_x, test_y = data
    model_key, loop_key = jax.random.split(key)
    model = eqx.nn.MLP(64, 10, 64, 2, activation=jax.nn.relu, key=model_key)
    optimiser = optax.adam(learning_rate)
    trainable, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimiser.init(trainable)

    def step(carry, key):
        trainable, opt_state = carry
        batch_key, direction_key = jax.random.split(key)
        index = jax.random.choice(batch_key, train_x.shape[0], (batch_size,), False)
        model = eqx.combine(trainable, static)
        loss = cross_entropy(model, train_x[index], train_y[index])
        grads = estimate_gradient(model, train_x[index], train_y[index], direction_key)
        updates, opt_state = optimiser.update(grads, opt_state, trainable)
        return (eqx.apply_updates(trainable, updates), opt_state), loss

    @eqx.filter_jit
    def run_chunk(trainable, opt_state, keys):
        (trainable, opt_state), losses = jax.lax.scan(
            step, (trainable, opt_state), keys
        )
        model = eqx.combine(trainable, static)
        return trainable, opt_state, jnp.mean(losses), accuracy(model, test_x, test_y)

    history = {"step": [], "loss": [], "test_accuracy": []}
    keys = jax.random.split(loop_key, steps).reshape(-1, steps_per_chunk)
    for chunk, chunk_keys in enumerate(tqdm(keys, desc=label, unit="chunk")):
        trainable, opt_state, loss, test_accuracy = run_chunk(
            trainable, opt_state, chunk_keys
        )
        history["step"].append((chunk + 1) * steps_per_chunk)
        history["loss"].append(float(loss))
        history["test_accuracy"].append(float(test_accuracy))
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description="Digits MLP: DODGE vs backprop.")
    parser.add_argument("--num-directions", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output", default="demo.png")
    parser.add_argument("--quick", action="store_true", help="200 steps, for tests")
    args = parser.parse_args()
    steps = 200 if args.quick else args.steps
    data = load_data()
    k = args.num_directions

    def backprop(model, x, y, key):
        del key
        return eqx.filter_grad(cross_entropy)(model, x, y)

    def dodge(model, x, y, key):
        return eqx_dodge.filter_dodge(cross_entropy, key=key, num_directions=k)(
            model, x, y
        )

    results = {}
    for label, estimate in [("filter_grad", backprop), (f"DODGE k={k}", dodge)]:
        start = time.perf_counter()
        results[label] = train(
            estimate,
            steps=steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            key=jax.random.key(0),
            data=data,
            label=label,
        )
        seconds = time.perf_counter() - start
        print(
            f"{label:>12}: test accuracy {results[label]['test_accuracy'][-1]:.3f} "
            f"after {steps} steps ({seconds:.1f} s)"
        )

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in results.items():
        loss_axis.plot(history["step"], history["loss"], label=label)
        accuracy_axis.plot(history["step"], history["test_accuracy"], label=label)
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log")
    accuracy_axis.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    accuracy_axis.legend()
    figure.suptitle("MLP on load_digits: backprop vs DODGE (forward mode only)")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
