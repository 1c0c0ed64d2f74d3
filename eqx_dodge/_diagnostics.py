"""Diagnostics of gradient-estimate quality: optional, for logging, never needed to
train."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Key, PRNGKeyArray, PyTree, Scalar, UInt32

from ._checks import legacy_key_shape
from ._directions import accumulation_dtype, largest_magnitude


def _dot(a: list[Array], b: list[Array], dtype) -> Scalar:
    return sum((jnp.vdot(x, y) for x, y in zip(a, b)), start=jnp.zeros((), dtype))


def _scaled_leaves(tree: PyTree, dtype) -> list[Array]:
    """The leaves of `tree` in `dtype`, divided by their largest magnitude (by 1
    for a zero tree), so that their squares neither overflow nor underflow (in
    float32, squares of norms beyond about 1e±19 would)."""
    largest = largest_magnitude(tree).astype(dtype)
    largest = jnp.where(largest > 0, largest, 1)
    return [x.astype(dtype) / largest for x in jax.tree.leaves(tree)]


def cosine_similarity(estimate: PyTree, gradient: PyTree) -> Scalar:
    r"""The cosine of the angle between a gradient estimate and the gradient.

    $\cos = \hat g \cdot g / (\|\hat g\|\,\|g\|)$ over all the leaves together, as if
    both were flattened into one vector. `None` leaves (as in the output of
    `eqx.filter_grad`) are skipped. If either argument is zero the result is `0`, not
    NaN.

    For a DODGE estimate $(g \cdot u)\,u$ this is $|g \cdot u| / (\|g\|\,\|u\|) \ge 0$
    (the estimate is a descent direction whatever the sign of $g \cdot u$); for a
    random Rademacher or Gaussian direction its square has expectation $1/p$, with
    $p$ the number of coordinates.
    The oracle direction $u = g$ gives 1.

    **Arguments:**

    - `estimate`: a PyTree, e.g. the output of [`eqx_dodge.filter_dodge`][].
    - `gradient`: a PyTree of the same structure, e.g. the output of
        `eqx.filter_grad`.

    **Returns:**

    A scalar in $[-1, 1]$, computed in at least float32.
    """
    if jax.tree.structure(estimate) != jax.tree.structure(gradient):
        raise ValueError(
            "`estimate` and `gradient` must have the same tree structure, got "
            f"{jax.tree.structure(estimate)} and {jax.tree.structure(gradient)}."
        )
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(estimate), jax.tree.leaves(gradient)
    ):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"`estimate` and `gradient` must have leaves of the same shapes; at "
                f"{jax.tree_util.keystr(path) or 'the top'} they are {jnp.shape(a)} "
                f"and {jnp.shape(b)}."
            )
    dtype = accumulation_dtype((estimate, gradient))
    a, b = _scaled_leaves(estimate, dtype), _scaled_leaves(gradient, dtype)
    norms = _dot(a, a, dtype) * _dot(b, b, dtype)
    positive = norms > 0
    inverse = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, norms, 1)), 0)
    return jnp.clip(_dot(a, b, dtype) * inverse, -1, 1)


def estimator_moments(
    estimator: Callable[[PRNGKeyArray], PyTree],
    keys: Key[Array, " num_keys"] | UInt32[Array, "num_keys 2"],
) -> tuple[PyTree, PyTree]:
    r"""The empirical per-coordinate mean and variance of a random estimator.

    Evaluates `estimator(key)` for every key of `keys` in one vectorised call
    (`jax.vmap`) and returns the sample mean and the unbiased sample variance
    (divisor $n - 1$) of every coordinate. For a DODGE estimate with Rademacher
    directions and a fixed gradient the variance of coordinate $i$ should be close to
    $\|g\|^2 - g_i^2$ (DODGE eq 8).

    ```python
    def estimator(key):
        return eqx_dodge.filter_dodge(loss, key=key)(model, x, y)

    mean, variance = eqx_dodge.diagnostics.estimator_moments(
        estimator, jax.random.split(key, 1000)
    )
    ```

    Memory grows with `len(keys)` times the size of one estimate.

    **Arguments:**

    - `estimator`: a function from a PRNG key to a PyTree of arrays (`None` leaves are
        allowed and stay `None`).
    - `keys`: a batch of PRNG keys, e.g. `jax.random.split(key, n)` with `n ≥ 2`.

    **Returns:**

    `(mean, variance)`, two PyTrees with the structure of one estimate.
    """
    typed = isinstance(keys, jax.Array) and jnp.issubdtype(
        keys.dtype, jax.dtypes.prng_key
    )
    legacy = (
        jnp.ndim(keys) == 2
        and jnp.shape(keys)[-1:] == legacy_key_shape()
        and jnp.result_type(keys) == jnp.uint32
    )
    if not (typed and jnp.ndim(keys) == 1) and not legacy:
        # A single legacy key (`uint32[2]`) would otherwise be read as two seeds.
        raise ValueError(
            "`keys` must be a batch of PRNG keys, e.g. `jax.random.split(key, n)`: "
            "typed keys of shape `(n,)` or legacy uint32 keys of shape `(n, 2)`; got "
            f"an array of shape {jnp.shape(keys)} and dtype {jnp.result_type(keys)}."
        )
    num_keys = jnp.shape(keys)[0]
    if num_keys < 2:
        raise ValueError(f"`keys` must hold at least 2 keys, got {num_keys}.")
    samples = jax.vmap(estimator)(keys)
    mean = jax.tree.map(lambda leaf: jnp.mean(leaf, axis=0), samples)
    variance = jax.tree.map(lambda leaf: jnp.var(leaf, axis=0, ddof=1), samples)
    return mean, variance
