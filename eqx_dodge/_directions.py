"""Direction samplers: the random tangents along which DODGE differentiates."""

import math
from typing import TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree


# Plain `str` rather than a `Literal`: values are checked at run time so that a bad
# one raises a `ValueError` naming the argument, not a runtime type-checker's error.
Sampler: TypeAlias = str  # one of SAMPLERS
SAMPLERS: tuple[str, ...] = ("rademacher", "gaussian")

_BITS_PER_WORD = 32


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")


def trainable(tree: PyTree) -> PyTree:
    """The part of `tree` that DODGE differentiates: its inexact-array leaves, with
    `None` everywhere else (the same convention as `eqx.filter_grad`)."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(
                "eqx_dodge supports real floating-point leaves only; the first "
                f"argument holds a leaf of dtype {leaf.dtype}."
            )
    return eqx.filter(tree, eqx.is_inexact_array)


def num_coordinates(tree: PyTree) -> int:
    """The number `p` of trainable coordinates of `tree` (a static Python int)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(trainable(tree)))


def _rademacher_like(key: PRNGKeyArray, tree: PyTree) -> PyTree:
    # Drawing one uint32 word per 32 signs and unpacking it is several times cheaper
    # than `jax.random.rademacher` per leaf, which draws 32 bits for every sign; on a
    # 2-core CPU the per-leaf version costs more than the jvp itself
    # (DODGE.md §1, "Measured").
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    total = sum(sizes)
    num_words = -(-total // _BITS_PER_WORD)
    words = jax.random.bits(key, (num_words,), jnp.uint32)
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32)
    bits = ((words[:, None] >> shifts[None, :]) & jnp.uint32(1)).reshape(-1)
    signs = []
    offset = 0
    for leaf, size in zip(leaves, sizes):
        leaf_bits = bits[offset : offset + size].reshape(leaf.shape)
        # 1 - 2·bit maps {0, 1} to {+1, -1}, exactly, in every floating dtype.
        signs.append((1 - 2 * leaf_bits.astype(jnp.int32)).astype(leaf.dtype))
        offset += size
    return jax.tree.unflatten(treedef, signs)


def random_direction(
    key: PRNGKeyArray, tree: PyTree, *, sampler: str = "rademacher"
) -> PyTree:
    """Draws one random direction shaped like the trainable part of `tree`.

    Every inexact-array leaf of `tree` gets an array of the same shape and dtype whose
    entries are independent, zero-mean and of unit variance, so that for any gradient
    `g` the estimate `(g·u) u` is unbiased. Every other leaf becomes `None`, exactly as
    in the output of `eqx.filter_grad`.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `tree`: any PyTree, e.g. an Equinox model.
    - `sampler`: `"rademacher"` (entries ±1 with equal probability; the lowest-variance
        choice, DODGE eq 6–8) or `"gaussian"` (standard normal entries).

    **Returns:**

    A PyTree with the structure of `tree`, holding the direction at the inexact-array
    leaves and `None` elsewhere.
    """
    check_sampler(sampler)
    target = trainable(tree)
    if sampler == "rademacher":
        return _rademacher_like(key, target)
    return optax.tree.random_like(key, target, sampler=jax.random.normal)


def random_directions(
    key: PRNGKeyArray,
    tree: PyTree,
    num_directions: int,
    sampler: Sampler,
    indices: Array | None = None,
) -> PyTree:
    """`num_directions` independent directions, stacked along a new leading axis.

    Direction `i` is `random_direction(jax.random.split(key, num_directions)[i], tree)`;
    with `indices`, only the directions of those indices are drawn, in that order.
    """
    keys = jax.random.split(key, num_directions)
    if indices is not None:
        keys = keys[indices]
    return jax.vmap(lambda k: random_direction(k, tree, sampler=sampler))(keys)


def _part_indices(tree: PyTree, num_parts: int) -> PyTree:
    """For each trainable coordinate, the index of the part it belongs to.

    The parts are contiguous, balanced blocks of the coordinates flattened in leaf
    order: coordinate `i` of `p` lies in part `⌊i·k/p⌋`. Every coordinate is covered
    exactly once and each part holds `⌊p/k⌋` or `⌈p/k⌉` coordinates.
    """
    leaves, treedef = jax.tree.flatten(trainable(tree))
    total = sum(math.prod(leaf.shape) for leaf in leaves)
    indices = []
    offset = 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        # int64 is unavailable without x64, so keep i·k below 2³¹.
        flat = offset + jnp.arange(size, dtype=jnp.int32)
        if total * num_parts < 2**31:
            part = (flat * num_parts) // total
        else:
            part = (flat.astype(jnp.float32) * (num_parts / total)).astype(jnp.int32)
        indices.append(part.reshape(leaf.shape))
        offset += size
    return jax.tree.unflatten(treedef, indices)


def check_num_parts(tree: PyTree, num_parts: int) -> None:
    p = num_coordinates(tree)
    if num_parts > p:
        raise ValueError(
            f"`num_directions={num_parts}` exceeds the number of trainable "
            f"coordinates p={p}; in `mode='partition'` each of the "
            "`num_directions` parts needs at least one coordinate."
        )


def partition_direction(direction: PyTree, num_parts: int) -> PyTree:
    """Splits one direction into `num_parts` zero-padded parts with disjoint supports.

    Part `j` equals `direction` on the coordinates of block `j` and zero elsewhere; the
    blocks are contiguous, balanced slices of the coordinates flattened in leaf order,
    so the parts sum to `direction`. This is the `partition` scheme of DODGE eq 10:
    `Σ_j (g·u_j) u_j` has, for a coordinate `i` in block `j`, variance
    `Σ_{l∈P_j, l≠i} g(l)²` with Rademacher entries, and equals `g` exactly when
    `num_parts` is the number of coordinates `p`.

    **Arguments:**

    - `direction`: a PyTree of arrays, e.g. the output of
        [`eqx_dodge.random_direction`][].
    - `num_parts`: the number `k` of parts, `1 ≤ k ≤ p`.

    **Returns:**

    A PyTree like `direction` whose leaves have a new leading axis of size
    `num_parts`.
    """
    if isinstance(num_parts, bool) or not isinstance(num_parts, int):
        raise TypeError(f"`num_parts` must be an int, got {num_parts!r}.")
    if num_parts < 1:
        raise ValueError(f"`num_parts` must be at least 1, got {num_parts}.")
    check_num_parts(direction, num_parts)
    return split_into_parts(direction, _part_indices(direction, num_parts), num_parts)


def split_into_parts(direction: PyTree, part_indices: PyTree, num_parts: int) -> PyTree:
    """Stacks the `num_parts` zero-padded parts of `direction`, given the part index
    of each coordinate (`_part_indices`, or a sharded layout's equivalent)."""
    parts = jnp.arange(num_parts, dtype=jnp.int32)

    def split_leaf(leaf: Array, part: Array) -> Array:
        mask = part[None] == parts.reshape((num_parts,) + (1,) * leaf.ndim)
        return jnp.where(mask, leaf[None], jnp.zeros((), leaf.dtype))

    return jax.tree.map(split_leaf, direction, part_indices)
