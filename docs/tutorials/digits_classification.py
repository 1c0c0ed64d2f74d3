"""Classify handwritten digits with DODGE: no backward pass, one `jax.jvp` per step.

Trains the same small MLP on scikit-learn's 8×8 digits with backpropagation
(`eqx.filter_grad`, the reference) and with `eqx_dodge.filter_dodge` for several
numbers of random directions, and prints the test accuracy of each.

Run it from the repository root:

    python docs/tutorials/digits_classification.py           # the full run
    python docs/tutorials/digits_classification.py --quick   # a few seconds
"""

# --8<-- [start:imports]
import argparse
import time
from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits

import eqx_dodge


# --8<-- [end:imports]


# --8<-- [start:data]
class Dataset(NamedTuple):
    x_train: Float[Array, "n_train 64"]
    y_train: Int[Array, " n_train"]
    x_test: Float[Array, "n_test 64"]
    y_test: Int[Array, " n_test"]


def load_dataset(seed: int, test_fraction: float = 0.25) -> Dataset:
    """The 1797 digits of `sklearn.datasets.load_digits`, scaled to [0, 1] and split
    at random into a training and a test set."""
    pixels, labels = load_digits(return_X_y=True)
    x = (np.asarray(pixels) / 16.0).astype(np.float32)
    y = np.asarray(labels).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = int(round(test_fraction * len(y)))
    test, train = order[:num_test], order[num_test:]
    return Dataset(
        jnp.asarray(x[train]),
        jnp.asarray(y[train]),
        jnp.asarray(x[test]),
        jnp.asarray(y[test]),
    )


# --8<-- [end:data]


# --8<-- [start:loss]
def loss_fn(
    model: eqx.nn.MLP, x: Float[Array, "batch 64"], y: Int[Array, " batch"]
) -> Float[Array, ""]:
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model: eqx.nn.MLP, x: Float[Array, "n 64"], y: Int[Array, " n"]) -> Array:
    predictions = jnp.argmax(jax.vmap(model)(x), axis=-1)
    return jnp.mean(predictions == y)


# --8<-- [end:loss]


# --8<-- [start:train]
def gradient_estimate(
    model: eqx.nn.MLP, x: Array, y: Array, key: PRNGKeyArray, num_directions: int
):
    """The gradient used for one step: exact with `num_directions=0` (backprop), else
    DODGE with `num_directions` random Rademacher directions."""
    if num_directions == 0:
        return eqx.filter_grad(loss_fn)(model, x, y)
    dodge = eqx_dodge.filter_dodge(loss_fn, key=key, num_directions=num_directions)
    return dodge(model, x, y)


@eqx.filter_jit
def train(
    model: eqx.nn.MLP,
    data: Dataset,
    key: PRNGKeyArray,
    *,
    num_directions: int,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
) -> tuple[eqx.nn.MLP, Float[Array, " num_steps"]]:
    """Minibatch SGD for `num_steps` steps, all inside one `jax.lax.scan`."""
    optimizer = optax.sgd(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)

    def step(carry, step_key):
        params, opt_state = carry
        batch_key, direction_key = jax.random.split(step_key)
        batch = jax.random.choice(
            batch_key, data.y_train.shape[0], (batch_size,), replace=False
        )
        model = eqx.combine(params, static)
        x, y = data.x_train[batch], data.y_train[batch]
        grads = gradient_estimate(model, x, y, direction_key, num_directions)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        return (params, opt_state), loss_fn(model, x, y)

    keys = jax.random.split(key, num_steps)
    (params, _), losses = jax.lax.scan(step, (params, opt_state), keys)
    return eqx.combine(params, static), losses


# --8<-- [end:train]


# --8<-- [start:main]
# DODGE adds variance that grows like p/k (p coordinates, k directions), so fewer
# directions need a smaller step. These come from a coarse sweep over
# {0.003, 0.01, 0.03, 0.1, 0.3, 1} with 3000 steps; k = 0 is backpropagation.
LEARNING_RATES = {0: 1.0, 1: 0.01, 10: 0.1, 100: 0.3}


class Result(NamedTuple):
    first_loss: float
    last_loss: float
    test_accuracy: float
    seconds: float


def main(
    *,
    directions: Sequence[int] = (0, 1, 10, 100),
    num_steps: int = 3000,
    batch_size: int = 128,
    width: int = 32,
    seed: int = 0,
) -> dict[int, Result]:
    """Trains one model per entry of `directions` (0 means backpropagation) from the
    same initialisation, on the same minibatches, and reports each."""
    data = load_dataset(seed)
    model_key, train_key = jax.random.split(jax.random.key(seed))
    model = eqx.nn.MLP(64, 10, width, depth=1, activation=jax.nn.tanh, key=model_key)
    num_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    print(f"MLP 64-{width}-10: p = {num_params} parameters, {num_steps} steps")
    results = {}
    for num_directions in directions:
        start = time.perf_counter()
        trained, losses = train(
            model,
            data,
            train_key,
            num_directions=num_directions,
            num_steps=num_steps,
            batch_size=batch_size,
            learning_rate=LEARNING_RATES[num_directions],
        )
        result = Result(
            first_loss=float(losses[0]),
            last_loss=float(losses[-num_steps // 10 :].mean()),
            test_accuracy=float(accuracy(trained, data.x_test, data.y_test)),
            seconds=time.perf_counter() - start,
        )
        name = "backprop" if num_directions == 0 else f"DODGE, k = {num_directions}"
        print(
            f"{name:>15}: training loss {result.first_loss:.3f} -> "
            f"{result.last_loss:.3f}, test accuracy {result.test_accuracy:.3f} "
            f"({result.seconds:.1f} s)"
        )
        results[num_directions] = result
    return results


# --8<-- [end:main]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Digits classification with DODGE and with backpropagation."
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds' run")
    args = parser.parse_args()
    if args.quick:
        main(num_steps=300)
    else:
        main()
