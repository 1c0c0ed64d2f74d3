"""Directions: the random tangents along which DODGE differentiates, and their parts."""

import functools
import itertools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from ._checks import as_key, check_int, check_option, KeyLike, SAMPLERS
from ._threefry import normal_like, rademacher_like


def trainable(tree: PyTree) -> PyTree:
    """The part of `tree` that DODGE differentiates: its inexact-array leaves, with
    `None` everywhere else (the same convention as `eqx.filter_grad`)."""
    target = eqx.filter(tree, eqx.is_inexact_array)
    for leaf in jax.tree.leaves(target):
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(
                "eqx_dodge supports real floating-point leaves only; the first "
                f"argument holds a leaf of dtype {leaf.dtype}."
            )
    return target


def num_coordinates(tree: PyTree) -> int:
    """The number `p` of trainable coordinates of `tree` (a static Python int)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(trainable(tree)))


def accumulation_dtype(tree: PyTree) -> Any:
    # Sums of half-precision leaves are accumulated in float32 (float64 when a leaf
    # is float64); stated explicitly because strict promotion has no common type for
    # float16 and bfloat16.
    wide = any(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(tree))
    return jnp.float64 if wide else jnp.float32


def squared_norm(tree: PyTree) -> Scalar:
    """`‖tree‖²` over all array leaves, accumulated in at least float32."""
    dtype = accumulation_dtype(tree)
    return sum(
        (jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jax.tree.leaves(tree)),
        start=jnp.zeros((), dtype),
    )


def largest_magnitude(tree: PyTree) -> Scalar:
    """`max |x|` over all array leaves (0 for none), in at least float32."""
    dtype = accumulation_dtype(tree)
    leaves = jax.tree.leaves(tree)
    return functools.reduce(
        jnp.maximum,
        [jnp.max(jnp.abs(leaf.astype(dtype)), initial=0) for leaf in leaves],
        jnp.zeros((), dtype),
    )


def scale_to_unit(tree: PyTree, squared: Scalar) -> PyTree:
    """`tree / √squared`, and zeros (never NaN) when `squared` is zero."""
    positive = squared > 0
    inverse = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, squared, 1)), 0)
    return jax.tree.map(
        lambda leaf: (leaf.astype(squared.dtype) * inverse).astype(leaf.dtype), tree
    )


def check_direction(direction: PyTree, primal: PyTree, name: str = "direction") -> None:
    """Raises a `ValueError` unless `direction` matches `primal` leaf for leaf."""
    direction_structure = jax.tree.structure(direction)
    primal_structure = jax.tree.structure(primal)
    if direction_structure != primal_structure:
        raise ValueError(
            f"`{name}` must have the tree structure of the trainable (inexact-array) "
            "leaves of the model, with `None` elsewhere, as returned by "
            f"`eqx.filter_grad`.\nExpected {primal_structure},\ngot "
            f"{direction_structure}."
        )
    for (path, leaf), primal_leaf in zip(
        jax.tree_util.tree_leaves_with_path(direction), jax.tree.leaves(primal)
    ):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if shape != primal_leaf.shape or dtype != primal_leaf.dtype:
            location = jax.tree_util.keystr(path)
            subject = f"`{name}` leaf at {location}" if location else f"`{name}`"
            raise ValueError(
                f"{subject} has shape {shape} and dtype {dtype}; the model's leaf "
                f"there has shape {primal_leaf.shape} and dtype {primal_leaf.dtype}."
            )


def sample_direction(key: PRNGKeyArray, primal: PyTree, sampler: str) -> PyTree:
    """One direction shaped like `primal` (a tree of arrays), from a typed key. One
    direction of the `"orthogonal"` sampler is the Rademacher one (`k = 1` in
    `orthogonal_direction`)."""
    if sampler == "gaussian":
        return normal_like(key, primal)
    return rademacher_like(key, primal)


def flat_positions(tree: PyTree) -> PyTree:
    """For each coordinate of the array leaves of `tree`, its int32 index in the
    coordinates flattened in leaf order."""
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    positions = [
        jnp.arange(offset, offset + size, dtype=jnp.int32).reshape(leaf.shape)
        for leaf, size, offset in zip(
            leaves, sizes, itertools.accumulate(sizes, initial=0)
        )
    ]
    return jax.tree.unflatten(treedef, positions)


def orthogonal_direction(
    signs: PyTree,
    positions: PyTree,
    total: int,
    index: Int[Array, ""],
    num_directions: int,
) -> PyTree:
    """Direction `index` of the `k = num_directions` exactly orthogonal directions
    of `sampler="orthogonal"`: `u_i = h_i ⊙ d`.

    `d = signs` is one Rademacher vector shared by the `k` directions, and `h_i` a
    fixed pattern over the flat coordinate index `c` (`positions`, of `total = p`
    coordinates). With `K` the power of two `≥ k` and `B = p − (p mod K)`, the
    first `B` coordinates carry the Walsh (Sylvester–Hadamard) row `i`,
    `h_i(c) = (−1)^popcount(i & c)`, orthogonal to row `l ≠ i` over every aligned
    block of `K` coordinates; each of the last `p mod K` coordinates belongs to one
    direction only, `(c − B) mod k`, with value `√k`, so that disjoint supports keep
    that tail orthogonal too. Every coordinate has `Σ_i h_i(c)² = k`, hence
    `E[(1/k) Σ_i u_i u_iᵀ] = I`. Each `u_i` is a Rademacher vector on the first `B`
    coordinates, and `k = 1` gives `d` itself. The docs' "Several directions" page
    derives the variance. (`√k` is rounded to the leaf's dtype: in half precision
    the tail's `E[u²]` is off by that rounding.)
    """
    if total >= 2**31:
        raise ValueError(
            "`sampler='orthogonal'` supports fewer than 2³¹ coordinates; use "
            "`sampler='rademacher'`."
        )
    rows = 1 << (num_directions - 1).bit_length()
    blocked = total - total % rows
    row = index.astype(jnp.int32)

    def leaf_direction(sign, position):
        parity = jax.lax.population_count(position & row) & 1
        pattern = (1 - 2 * parity).astype(sign.dtype)
        if blocked < total:
            owner = (position - blocked) % num_directions == row
            root_k = jnp.asarray(math.sqrt(num_directions), sign.dtype)
            tail = jnp.where(owner, root_k, jnp.zeros((), sign.dtype))
            pattern = jnp.where(position < blocked, pattern, tail)
        return pattern * sign

    return jax.tree.map(leaf_direction, signs, positions)


# Called eagerly, the sampler's hash would dispatch (and compile) each of its
# hundreds of small operations on its own; compiled whole it is one program per
# model structure.
_sample_direction_jit = eqx.filter_jit(sample_direction)


def random_direction(
    key: KeyLike, tree: PyTree, *, sampler: str = "rademacher"
) -> PyTree:
    """Draws one random direction shaped like the trainable part of `tree`.

    Every inexact-array leaf of `tree` gets an array of the same shape and dtype whose
    entries are independent, zero-mean and of unit variance, so that for any gradient
    `g` the estimate `(g·u) u` is unbiased. Every other leaf becomes `None`, exactly as
    in the output of `eqx.filter_grad`. This is the direction that
    `filter_dodge(..., key=key)` uses with one direction.

    **Arguments:**

    - `key`: a PRNG key (`jax.random.key`, a legacy `jax.random.PRNGKey`) or an int
        seed. Rademacher signs are bits of Threefry-2x32, JAX's default generator;
        a key of another implementation (`jax.random.key(seed, impl="rbg")`, the
        faster choice on GPU and TPU) draws its bits with `jax.random.bits`. The
        same key always gives the same direction.
    - `tree`: any PyTree, e.g. an Equinox model.
    - `sampler`: `"rademacher"` (entries ±1 with equal probability; the lowest
        variance) or `"gaussian"` (standard normal entries). `"orthogonal"`, which
        makes `k > 1` directions of [`eqx_dodge.filter_dodge`][] orthogonal to each
        other, draws the Rademacher direction here: a single direction has nothing
        to be orthogonal to.

    **Returns:**

    A PyTree with the structure of `tree`, holding the direction at the inexact-array
    leaves and `None` elsewhere.
    """
    check_option("sampler", sampler, SAMPLERS)
    return _sample_direction_jit(as_key(key), trainable(tree), sampler)


def part_of(position: Int[Array, "..."], total: int, num_parts: int) -> Array:
    """The part `⌊i·k/p⌋` of the coordinate at flat `position` i of `total` p."""
    # int64 is unavailable without x64, so keep i·k below 2³¹.
    if total * num_parts < 2**31:
        return (position * num_parts) // total
    return (position.astype(jnp.float32) * (num_parts / total)).astype(jnp.int32)


def part_indices(tree: PyTree, num_parts: int) -> PyTree:
    """For each coordinate of the array leaves of `tree`, the index of its part.

    The parts are contiguous, balanced blocks of the coordinates flattened in leaf
    order: every coordinate is covered once and each part holds `⌊p/k⌋` or `⌈p/k⌉`.
    """
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
    return jax.tree.map(
        lambda position: part_of(position, total, num_parts), flat_positions(tree)
    )


def check_num_parts(num_coordinates: int, num_parts: int) -> None:
    if num_parts > num_coordinates:
        raise ValueError(
            f"`num_directions={num_parts}` exceeds the number of trainable "
            f"coordinates p={num_coordinates}; in `mode='partition'` each of the "
            "`num_directions` parts needs at least one coordinate. (Leaves the loss "
            "does not depend on, e.g. behind `jax.lax.stop_gradient`, do not count.)"
        )


def select_part(direction: PyTree, indices: PyTree, part: Array) -> PyTree:
    """`direction` on the coordinates of part `part`, zero elsewhere."""
    return jax.tree.map(
        lambda u, p: jnp.where(p == part, u, jnp.zeros((), u.dtype)), direction, indices
    )


def partition_direction(direction: PyTree, num_directions: int) -> PyTree:
    """Splits one direction into `num_directions` zero-padded parts with disjoint
    supports.

    Part `j` equals `direction` on the coordinates of block `j` and zero elsewhere;
    the blocks are contiguous, balanced slices of the coordinates flattened in leaf
    order, so the parts sum to `direction`. This is the partition scheme of DODGE:
    `Σ_j (g·u_j) u_j` has, for a coordinate `i` in block `j`, variance
    `Σ_{l∈P_j, l≠i} g(l)²` with Rademacher entries, and equals `g` exactly when
    `num_directions` is the number of coordinates `p`.

    **Arguments:**

    - `direction`: a PyTree of arrays, e.g. the output of
        [`eqx_dodge.random_direction`][].
    - `num_directions`: the number `k` of parts, `1 ≤ k ≤ p`.

    **Returns:**

    A PyTree like `direction` whose leaves have a new leading axis of size
    `num_directions`.
    """
    check_int("num_directions", num_directions, 1)
    check_num_parts(num_coordinates(direction), num_directions)
    indices = part_indices(direction, num_directions)
    parts = jnp.arange(num_directions, dtype=jnp.int32)
    return jax.vmap(lambda j: select_part(direction, indices, j))(parts)
