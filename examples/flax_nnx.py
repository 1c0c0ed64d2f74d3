"""DODGE with a Flax NNX model.

`eqx_dodge.filter_dodge` differentiates the floating-point array leaves of its first
argument, whatever PyTree holds them. A Flax NNX module is not a PyTree itself, but
`nnx.split` turns it into a static `GraphDef` and an `nnx.State` of parameters, which
is one; `nnx.merge` rebuilds the module inside the loss. So the loss takes the
parameter state first:

```python
graphdef, params = nnx.split(model, nnx.Param)

def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    ...

grads = eqx_dodge.filter_dodge(loss_fn, key=key)(params, x, y)  # an nnx.State
```

and the estimate is an `nnx.State` like `jax.grad(loss_fn)(params, x, y)`, ready for
`optax`. This script trains a small MLP on scikit-learn's digits this way.

Needs `flax` (in the `dev` extra). Run: `python examples/flax_nnx.py`.
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

import eqx_dodge


class MLP(nnx.Module):
    def __init__(self, in_size: int, width: int, out_size: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_size, width, rngs=rngs)
        self.output = nnx.Linear(width, out_size, rngs=rngs)

    def __call__(self, x: Float[Array, "batch in_size"]) -> Array:
        return self.output(jax.nn.relu(self.hidden(x)))


def load_data() -> tuple[Float[Array, "n 64"], Int[Array, " n"]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, dtype=jnp.float32)  # pyright: ignore
    y = jnp.asarray(digits.target, dtype=jnp.int32)  # pyright: ignore
    return x, y


def make_loss(graphdef: nnx.GraphDef):
    def loss_fn(params: nnx.State, x: Array, y: Array) -> Scalar:
        model = nnx.merge(graphdef, params)
        log_probs = jax.nn.log_softmax(model(x))
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

    return loss_fn


def train(
    model: MLP,
    x: Array,
    y: Array,
    *,
    key: PRNGKeyArray,
    num_steps: int,
    learning_rate: float,
    num_directions: int,
    batch_size: int = 128,
) -> tuple[nnx.State, Float[Array, " num_steps"]]:
    """SGD with momentum on DODGE estimates; returns the trained parameter state and
    the minibatch loss of every step."""
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = make_loss(graphdef)
    optimizer = optax.sgd(learning_rate, momentum=0.9)

    def step(carry, step_key):
        params, opt_state = carry
        batch_key, direction_key = jax.random.split(step_key)
        index = jax.random.randint(batch_key, (batch_size,), 0, x.shape[0])
        loss, grads = eqx_dodge.filter_value_and_dodge(
            loss_fn, key=direction_key, num_directions=num_directions
        )(params, x[index], y[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run(params):
        carry = (params, optimizer.init(params))
        (params, _), losses = jax.lax.scan(
            step, carry, jax.random.split(key, num_steps)
        )
        return params, losses

    return run(params)


def main(num_steps: int = 2000, seed: int = 0) -> dict:
    x, y = load_data()
    model = MLP(64, 32, 10, rngs=nnx.Rngs(seed))
    graphdef, _ = nnx.split(model, nnx.Param)
    params, losses = train(
        model,
        x,
        y,
        key=jax.random.key(seed),
        num_steps=num_steps,
        learning_rate=LEARNING_RATE,
        num_directions=NUM_DIRECTIONS,
    )
    trained = nnx.merge(graphdef, params)
    accuracy = float(jnp.mean(jnp.argmax(trained(x), axis=1) == y))
    final = float(make_loss(graphdef)(params, x, y))
    print(
        f"Flax NNX MLP 64-32-10 on digits, DODGE with {NUM_DIRECTIONS} random "
        f"directions: minibatch loss {float(losses[0]):.3f} -> full-data loss "
        f"{final:.3f}, training accuracy {accuracy:.3f} after {num_steps} steps"
    )
    return {"initial_loss": float(losses[0]), "final_loss": final, "accuracy": accuracy}


LEARNING_RATE = 1e-2
NUM_DIRECTIONS = 16


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DODGE with a Flax NNX model.")
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    main(arguments.num_steps, arguments.seed)
