"""Models and losses shared by the tests of the optax transformations."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


P = 12  # coordinates of the test problems


class Model(eqx.Module):
    """A small model with non-trainable leaves: an int array, a function, a flag."""

    weight: jax.Array
    bias: jax.Array
    table: jax.Array
    activation: Callable = eqx.field(static=True)
    flag: bool = eqx.field(static=True)

    def __init__(self, key):
        wkey, bkey = jax.random.split(key)
        self.weight = jax.random.normal(wkey, (3, 3))
        self.bias = jax.random.normal(bkey, (3,))
        self.table = jnp.arange(3, dtype=jnp.int32)
        self.activation = jnp.tanh
        self.flag = True

    def __call__(self, x):
        return self.activation(self.weight @ x + self.bias) * self.table.astype(x.dtype)


def model_loss(model, x, y):
    return jnp.mean(jnp.square(jax.vmap(model)(x) - y))


def data(key):
    xkey, ykey = jax.random.split(key)
    return jax.random.normal(xkey, (8, 3)), jax.random.normal(ykey, (8, 3))


def nonconvex_loss(key):
    """A random non-convex function of a dict of two leaves."""
    akey, bkey, ckey = jax.random.split(key, 3)
    a = jax.random.normal(akey, (16, P))
    b = jax.random.normal(bkey, (16,))
    c = jax.random.normal(ckey, (16,))

    def loss(params):
        w = jnp.concatenate([params["w"].reshape(-1), params["b"]])
        return jnp.dot(c, jnp.sin(a @ w + b)) + 0.01 * jnp.sum(w**4)

    return loss


def initial(key):
    w = jax.random.normal(key, (P,))
    return {"w": w[:8].reshape(2, 4), "b": w[8:]}


def flat(tree):
    return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(tree)])


def quadratic():
    """`L(w) = ½ wᵀHw + h·w` and a point `w0` with its gradient."""
    key = jax.random.key(0)
    mkey, hkey, wkey = jax.random.split(key, 3)
    m = jax.random.normal(mkey, (P, P)) / math.sqrt(P)
    hessian = m @ m.T + jnp.eye(P)
    linear = jax.random.normal(hkey, (P,))

    def loss(params):
        w = flat(params)
        return 0.5 * w @ hessian @ w + linear @ w

    w0 = initial(wkey)
    return loss, w0, jax.grad(loss)(w0)


def along_keys(transform, state, keys, params, value_fn, updates=None):
    """One update per key, vectorised: the state's key is replaced by each key."""

    @jax.jit
    @jax.vmap
    def run(key):
        keyed = state._replace(key=jax.random.key_data(key))
        estimate, _ = transform.update(updates, keyed, params, value_fn=value_fn)
        return flat(estimate)

    return run(keys)


def descent_slopes(optim):
    """`g·update` and `‖g‖‖update‖` at every step of 20-step runs of `optim`, on four
    random non-convex losses, with four kinds of candidate as incoming updates."""

    def trajectory(key, weights):
        # `weights` mixes the exact gradient, its negative (adversarial), noise and
        # zero into the candidate; one-hot rows give each kind of candidate.
        loss = nonconvex_loss(key)
        params = initial(jax.random.fold_in(key, 1))

        def step(carry, step_key):
            params, state = carry
            grad = jax.grad(loss)(params)
            noise = initial(step_key)
            candidate = jax.tree.map(
                lambda g, n: weights[0] * g - weights[1] * g + weights[2] * n,
                grad,
                noise,
            )
            updates, state = optim.update(candidate, state, params, value_fn=loss)
            slope = flat(grad) @ flat(updates)
            scale = jnp.linalg.norm(flat(grad)) * jnp.linalg.norm(flat(updates))
            return (optax.apply_updates(params, updates), state), (slope, scale)

        keys = jax.random.split(jax.random.fold_in(key, 2), 20)
        return jax.lax.scan(step, (params, optim.init(params)), keys)[1]

    keys = jax.random.split(jax.random.key(5), 4)
    kinds = jnp.eye(4, 3)  # gradient, −gradient, noise, zero
    return jax.jit(
        jax.vmap(jax.vmap(trajectory, in_axes=(None, 0)), in_axes=(0, None))
    )(keys, kinds)
