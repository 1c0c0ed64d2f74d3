"""Small models, losses and loaders shared by the tests."""

import contextlib
import importlib.util
import pathlib
import sys
import types
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


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


def parameter_bytes(model: PyTree) -> int:
    """The bytes of the array leaves of `model`: one parameter-sized buffer."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def tree_allclose(a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Whether `a` and `b` have the same tree structure and every pair of leaves is
    `jnp.allclose` (shapes must match; `None` leaves are skipped on both sides)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.shape == y.shape and bool(jnp.allclose(x, y, rtol=rtol, atol=atol))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def assert_tree_allclose(
    actual: PyTree, expected: PyTree, rtol: float = 1e-5, atol: float = 1e-8
) -> None:
    """`tree_allclose` as an assertion that names the first leaf that differs."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    pairs = zip(
        jax.tree.leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    )
    for (path, x), y in pairs:
        np.testing.assert_allclose(
            np.asarray(x),
            np.asarray(y),
            rtol=rtol,
            atol=atol,
            err_msg=f"leaf {jax.tree_util.keystr(path)}",
        )


def dodge_variance(
    gradient: Float[Array, " p"],
    *,
    sampler: str = "rademacher",
    num_directions: int = 1,
    parts: Int[Array, " p"] | None = None,
) -> Float[Array, " p"]:
    """Per-coordinate variance of the DODGE estimate for a fixed gradient `g` (flat).

    One direction, `(g·u)u`: Rademacher `‖g‖² − g_i²` (DODGE eq 8); Gaussian
    `‖g‖² + g_i²` (Var u_i² = 2). Averaging `num_directions` independent directions
    divides by k (eq 9). Partition mode (`parts[i]` the block of coordinate i, one
    direction split into blocks, eq 10): the sum runs over coordinate i's block only,
    so Rademacher gives `Σ_{l in block(i), l≠i} g_l²`.
    """
    squares = jnp.square(gradient)
    own = squares if sampler == "gaussian" else -squares
    if parts is not None:
        same_block = (parts[:, None] == parts[None, :]).astype(squares.dtype)
        return same_block @ squares + own
    return (jnp.sum(squares) + own) / num_directions


def assert_unbiased(
    samples: Float[Array, "n p"],
    mean: Float[Array, " p"],
    variance: Float[Array, " p"],
    z: float = 5.0,
    atol: float = 1e-7,
) -> None:
    """Every coordinate of the sample mean of the `n` rows of `samples` lies within
    `z` standard errors `√(variance/n)` of `mean` (`atol` for zero-variance
    coordinates). With `z = 5` a false alarm per coordinate has probability ≈ 6e-7."""
    n = samples.shape[0]
    error = jnp.abs(jnp.mean(samples, axis=0) - mean)
    bound = z * jnp.sqrt(variance / n) + atol
    bad = np.flatnonzero(np.asarray(error > bound))
    assert bad.size == 0, (
        f"{bad.size} of {error.size} coordinates biased: coordinate {bad[:5]} "
        f"errors {np.asarray(error)[bad[:5]]} > bounds {np.asarray(bound)[bad[:5]]}"
    )


def layout_directions(layout, key, params, num_directions):
    """The directions a sharded layout draws on this device: one (`None`), or the
    stack of `num_directions` drawn from `jax.random.split(key, num_directions)`,
    as the estimator draws them."""
    if num_directions is None:
        return layout.direction(key, params, "rademacher")
    keys = jax.random.split(key, num_directions)
    return jax.vmap(lambda k: layout.direction(k, params, "rademacher"))(keys)


# Bad `derivative` / `finite_difference_step` values, the error each must raise, and
# what its message must name.
BAD_OPTIONS = [
    (dict(derivative="forward"), ValueError, "`derivative`"),
    (dict(derivative="central", finite_difference_step=0.0), ValueError, "`finite"),
    (dict(derivative="central", finite_difference_step=-1e-3), ValueError, "`finite"),
    # jaxtyping's check of the annotation, in the tests, also names the argument.
    (dict(derivative="central", finite_difference_step="1e-3"), TypeError, "finite"),
    (dict(finite_difference_step=1e-2), ValueError, "`finite_difference_step`"),
]


@contextlib.contextmanager
def without_runtime_type_checks():
    """The suite checks annotations at run time (jaxtyping with beartype), which
    refuses a wrongly typed argument before eqx_dodge's own check can: within this
    context a test reaches that check, as a user without a type checker does."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)
