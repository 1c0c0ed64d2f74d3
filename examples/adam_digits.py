"""Swapping `optax.adam` for `eqx_dodge.adam_dodge` in an Equinox training loop.

Trains the same small MLP on scikit-learn's `load_digits` (1797 8×8 digits, shipped
with scikit-learn) with five optimizers, for the same number of steps:

- `optax.adam` on backpropagated gradients (the reference);
- `eqx_dodge.adam_dodge(source="updates")` given the same backpropagated gradients
    as candidates (equal to Adam when the gradient is the candidate and the loss is
    linear; a rank-one version of Adam otherwise);
- `eqx_dodge.adam_dodge` with random directions: forward mode only, no backward pass
    (Adam's moments of the unbiased DODGE estimates, with the key in the state);
- `optax.chain(eqx_dodge.dodge(key=...), optax.adam(...))`: forward mode only (the
    same method as the line above, composed by hand);
- `optax.chain(eqx_dodge.dodge(key=...), optax.sgd(...))`: forward mode only.

The training step is the ordinary optax loop; only the optimizer and the `value_fn`
keyword change:

```python
updates, opt_state = optim.update(grads, opt_state, model, value_fn=loss, x=x, y=y)
```

Run `python examples/adam_digits.py` (about a minute on a laptop CPU) or with
`--quick` for a few seconds' smoke run.
"""

# --8<-- [start:imports]
import argparse
import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits

import eqx_dodge


# --8<-- [end:imports]
# --8<-- [start:data]
def load(key: PRNGKeyArray, test_fraction: float = 0.2):
    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)  # pyright: ignore
    y = jnp.asarray(digits.target, jnp.int32)  # pyright: ignore
    order = jax.random.permutation(key, x.shape[0])
    x, y = x[order], y[order]
    num_test = int(test_fraction * x.shape[0])
    return (x[num_test:], y[num_test:]), (x[:num_test], y[:num_test])


def loss(
    model: eqx.nn.MLP, x: Float[Array, "batch 64"], y: Int[Array, " batch"]
) -> Float[Array, ""]:
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(model: eqx.nn.MLP, x: Array, y: Array) -> float:
    return float(jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y))


# --8<-- [end:data]
# --8<-- [start:optimizers]
def optimizers(
    num_directions: int, seed: int
) -> dict[str, tuple[optax.GradientTransformationExtraArgs, bool]]:
    """Name → (optimizer, whether it is given backpropagated gradients)."""
    k = num_directions
    return {
        "optax.adam (backprop)": (
            optax.with_extra_args_support(optax.adam(3e-3)),
            True,
        ),
        "adam_dodge, backprop candidate": (
            eqx_dodge.adam_dodge(3e-3, source="updates"),
            True,
        ),
        "adam_dodge (random)": (
            eqx_dodge.adam_dodge(3e-3, key=seed, num_directions=k),
            False,
        ),
        "dodge(random) + optax.adam": (
            optax.chain(
                eqx_dodge.dodge(key=seed, num_directions=k),
                optax.adam(3e-3),
            ),
            False,
        ),
        "dodge(random) + optax.sgd": (
            optax.chain(
                eqx_dodge.dodge(key=seed, num_directions=k),
                optax.sgd(0.02),  # 0.05 diverges: the estimate is ~sqrt(p/k) times g
            ),
            False,
        ),
    }


# --8<-- [end:optimizers]
# --8<-- [start:train]
def train(
    optim: optax.GradientTransformationExtraArgs,
    backprop: bool,
    model: eqx.nn.MLP,
    train_data: tuple[Array, Array],
    *,
    steps: int,
    batch_size: int,
    key: PRNGKeyArray,
) -> tuple[eqx.nn.MLP, Array]:
    """`steps` minibatch updates in one jitted `lax.scan`; returns the losses."""
    x_train, y_train = train_data
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batches = jax.random.randint(key, (steps, batch_size), 0, x_train.shape[0])

    @jax.jit
    def run(params, opt_state):
        def step(carry, batch):
            params, opt_state = carry
            model = eqx.combine(params, static)
            x, y = x_train[batch], y_train[batch]
            if backprop:
                value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
            else:
                # Forward mode only: the optimizer evaluates the loss under jax.jvp.
                value, grads = loss(model, x, y), None
            updates, opt_state = optim.update(
                grads,  # pyright: ignore[reportArgumentType]
                opt_state,
                model,  # pyright: ignore[reportArgumentType]
                value_fn=loss,
                x=x,
                y=y,
            )
            return (eqx.apply_updates(params, updates), opt_state), value

        return jax.lax.scan(step, (params, opt_state), batches)

    (params, _), losses = run(params, optim.init(params))
    return eqx.combine(params, static), losses


# --8<-- [end:train]
# --8<-- [start:main]
def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description="DODGE optimizers against Adam on load_digits."
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds' run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--num-directions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 3000)

    key = jax.random.key(args.seed)
    data_key, model_key, batch_key = jax.random.split(key, 3)
    train_data, test_data = load(data_key)
    model = eqx.nn.MLP(64, 10, 64, 2, key=model_key)
    num_parameters = sum(
        leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    print(
        f"load_digits: {train_data[0].shape[0]} train / {test_data[0].shape[0]} test; "
        f"MLP with {num_parameters} parameters; {steps} steps of batch "
        f"{args.batch_size}; {args.num_directions} random directions per step."
    )
    results: dict[str, dict[str, Any]] = {}
    for name, (optim, backprop) in optimizers(args.num_directions, args.seed).items():
        start = time.perf_counter()
        trained, losses = train(
            optim,
            backprop,
            model,
            train_data,
            steps=steps,
            batch_size=args.batch_size,
            key=batch_key,
        )
        results[name] = {
            "train_loss": float(jnp.mean(losses[-max(steps // 20, 1) :])),
            "test_accuracy": accuracy(trained, *test_data),
            "seconds": time.perf_counter() - start,
        }
        print(
            f"{name:32s} final train loss {results[name]['train_loss']:.3f}  "
            f"test accuracy {results[name]['test_accuracy']:.3f}  "
            f"({results[name]['seconds']:.1f} s incl. compilation)"
        )
    return results


# --8<-- [end:main]


if __name__ == "__main__":
    main()
