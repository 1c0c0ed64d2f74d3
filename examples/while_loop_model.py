"""A model that reverse mode cannot train and DODGE can.

The model solves a fixed-point equation `z = tanh(A z + U x + b)` by iterating until
the update is smaller than a tolerance, inside `jax.lax.while_loop`: the number of
iterations depends on the data and on the parameters. `jax.grad` (and so
`eqx.filter_grad`) raises on such a loop, because reverse mode must store every
iterate and cannot know how many there will be. Forward mode carries the tangent
along with the iterates, so `jax.jvp`, and with it `eqx_dodge.filter_dodge`, works
unchanged.

(An implicit-function-theorem adjoint, as in deep equilibrium models, is the
reverse-mode way around this; it needs a second solver and a custom VJP. DODGE needs
nothing.)

Run: `python examples/while_loop_model.py`.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

import eqx_dodge


class FixedPointModel(eqx.Module):
    """`y = v·z* + c` where `z*` solves `z = tanh(A z + U x + b)`."""

    recurrent: Float[Array, "state state"]
    encoder: eqx.nn.Linear
    readout: eqx.nn.Linear
    tolerance: float = eqx.field(static=True)
    max_iterations: int = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        state_size: int,
        *,
        key: PRNGKeyArray,
        tolerance: float = 1e-5,
        max_iterations: int = 500,
    ):
        rkey, ekey, okey = jax.random.split(key, 3)
        self.recurrent = 0.3 * jax.random.normal(rkey, (state_size, state_size))
        self.encoder = eqx.nn.Linear(in_size, state_size, key=ekey)
        self.readout = eqx.nn.Linear(state_size, "scalar", key=okey)
        self.tolerance = tolerance
        self.max_iterations = max_iterations

    def contraction(self) -> Float[Array, "state state"]:
        # ‖A‖₂ ≤ ‖A‖_F ≤ 0.9 and tanh is 1-Lipschitz, so the iteration contracts and
        # the fixed point exists and is unique whatever the parameters.
        norm = jnp.linalg.norm(self.recurrent)
        return self.recurrent * jnp.minimum(1.0, 0.9 / norm)

    def solve(self, x: Float[Array, " in_size"]) -> tuple[Array, Int[Array, ""]]:
        recurrent = self.contraction()
        injection = self.encoder(x)

        def update(z):
            return jnp.tanh(recurrent @ z + injection)

        def not_converged(carry):
            z, previous, iteration = carry
            gap = jnp.max(jnp.abs(z - previous))
            return (gap > self.tolerance) & (iteration < self.max_iterations)

        def body(carry):
            z, _, iteration = carry
            return update(z), z, iteration + 1

        z0 = jnp.zeros_like(injection)
        z, _, iterations = jax.lax.while_loop(
            not_converged, body, (update(z0), z0, jnp.array(1))
        )
        return z, iterations

    def __call__(self, x: Float[Array, " in_size"]) -> Scalar:
        z, _ = self.solve(x)
        return self.readout(z)


def make_data(key: PRNGKeyArray, num_examples: int, in_size: int):
    xkey, wkey = jax.random.split(key)
    x = jax.random.normal(xkey, (num_examples, in_size))
    w = jax.random.normal(wkey, (in_size,))
    y = jnp.sin(x @ w) + 0.5 * x[:, 0] * x[:, 1]
    return x, y


def loss_fn(model: FixedPointModel, x: Array, y: Array) -> Scalar:
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def train(
    model: FixedPointModel,
    x: Array,
    y: Array,
    *,
    key: PRNGKeyArray,
    num_steps: int,
    learning_rate: float,
    num_directions: int,
) -> tuple[FixedPointModel, Float[Array, " num_steps"]]:
    """Trains with DODGE and SGD with momentum; returns the model and the loss
    before each step."""
    optimizer = optax.sgd(learning_rate, momentum=0.9)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)

    def step(carry, step_key):
        params, opt_state = carry
        model = eqx.combine(params, static)
        loss, grads = eqx_dodge.filter_value_and_dodge(
            loss_fn, key=step_key, num_directions=num_directions
        )(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (eqx.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run(params, opt_state):
        keys = jax.random.split(key, num_steps)
        return jax.lax.scan(step, (params, opt_state), keys)

    (params, _), losses = run(params, opt_state)
    return eqx.combine(params, static), losses


LEARNING_RATE = 3e-2


def main(num_steps: int = 1000, seed: int = 0) -> dict:
    key = jax.random.key(seed)
    data_key, model_key, train_key = jax.random.split(key, 3)
    x, y = make_data(data_key, 128, 4)
    model = FixedPointModel(4, 8, key=model_key)

    try:
        eqx.filter_grad(loss_fn)(model, x, y)
        reverse_mode = "eqx.filter_grad worked (unexpected)"
    except ValueError as error:
        reverse_mode = f"eqx.filter_grad raises: {str(error).splitlines()[0]}"
    print(reverse_mode)

    iterations = jax.vmap(lambda xi: model.solve(xi)[1])(x)
    print(
        f"fixed-point iterations per example: {int(iterations.min())} to "
        f"{int(iterations.max())} (data dependent)"
    )
    trained, losses = train(
        model,
        x,
        y,
        key=train_key,
        num_steps=num_steps,
        learning_rate=LEARNING_RATE,
        num_directions=8,
    )
    final = float(loss_fn(trained, x, y))
    print(
        f"DODGE (8 random directions, SGD): loss {float(losses[0]):.4f} -> {final:.4f}"
    )
    return {"initial_loss": float(losses[0]), "final_loss": final, "losses": losses}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a while_loop model with DODGE.")
    parser.add_argument("--num-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.num_steps, args.seed)
