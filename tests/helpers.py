"""Small models, losses and loaders shared by the tests."""

import importlib.util
import pathlib
import sys
import types
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree


class WithStatics(eqx.Module):
    """A model holding non-array leaves: an activation function and an int field."""

    weight: Float[Array, "3 4"]
    bias: Float[Array, "3"]
    scale: Float[Array, ""]
    activation: Callable
    depth: int

    def __init__(self, key: PRNGKeyArray):
        weight_key, bias_key = jax.random.split(key)
        self.weight = jax.random.normal(weight_key, (3, 4))
        self.bias = jax.random.normal(bias_key, (3,))
        self.scale = jnp.array(1.5)
        self.activation = jnp.tanh
        self.depth = 2

    def __call__(self, x: Float[Array, "4"]) -> Float[Array, "3"]:
        for _ in range(self.depth):
            x = self.activation(self.weight @ x + self.bias)
            x = jnp.concatenate([x, x[:1]])
        return self.scale * x[:3]


def make_mlp(key: PRNGKeyArray) -> eqx.nn.MLP:
    return eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=key)


def make_models(key: PRNGKeyArray) -> dict[str, eqx.Module]:
    mlp_key, statics_key = jax.random.split(key)
    return {"mlp": make_mlp(mlp_key), "statics": WithStatics(statics_key)}


def batch_for(model: eqx.Module, key: PRNGKeyArray) -> Float[Array, "8 n"]:
    in_size = 3 if isinstance(model, eqx.nn.MLP) else 4
    return jax.random.normal(key, (8, in_size))


def squared_loss(model: eqx.Module, x: Float[Array, "batch n"]) -> Float[Array, ""]:
    return jnp.mean(jnp.square(jax.vmap(model)(x) - 0.5))  # pyright: ignore


def flat(tree: PyTree) -> Float[Array, " p"]:
    """The inexact leaves of `tree` concatenated (last axes flattened, leading kept)."""
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def flat_batched(tree: PyTree) -> Float[Array, "n p"]:
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], 1)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> types.ModuleType:
    """Imports a script of the repository (an example, a benchmark, a tutorial) as a
    module, from its path relative to the repository root."""
    path = ROOT / relative_path
    name = relative_path.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered so that dataclasses and NamedTuples can find their module.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
