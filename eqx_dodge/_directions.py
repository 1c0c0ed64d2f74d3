"""Direction samplers: the random tangents along which DODGE differentiates."""

import math
from typing import TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree, UInt32


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


# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), the hash behind JAX's default
# PRNG: rotation constants and key schedule of Random123's threefry2x32.
_THREEFRY_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_THREEFRY_ROUNDS = 20
_THREEFRY_PARITY = 0x1BD11BDA


def threefry_2x32(
    key_words: UInt32[Array, "2"], counters: UInt32[Array, " n"]
) -> tuple[UInt32[Array, " n"], UInt32[Array, " n"]]:
    """Threefry-2x32-20 of the counter pairs `(counters, 0)` under the key `key_words`:
    the function `jax.extend.random.threefry_2x32` computes, written with `jnp` so that
    XLA fuses it with the sign unpacking that consumes it."""
    k0, k1 = key_words[0], key_words[1]
    schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(_THREEFRY_PARITY))
    x0 = counters + schedule[0]
    x1 = jnp.broadcast_to(schedule[1], counters.shape)
    for r in range(_THREEFRY_ROUNDS):
        rotation = _THREEFRY_ROTATIONS[r % len(_THREEFRY_ROTATIONS)]
        x0 = x0 + x1
        x1 = (x1 << jnp.uint32(rotation)) | (x1 >> jnp.uint32(32 - rotation))
        x1 = x1 ^ x0
        if r % 4 == 3:
            injection = r // 4 + 1
            x0 = x0 + schedule[injection % 3]
            x1 = x1 + schedule[(injection + 1) % 3] + jnp.uint32(injection)
    return x0, x1


def _is_threefry(key: PRNGKeyArray) -> bool:
    return str(jax.random.key_impl(key)) == "threefry2x32"


def _rademacher_like(key: PRNGKeyArray, tree: PyTree) -> PyTree:
    # Signs come from random bits, one bit each, 64 per Threefry call (both output
    # words), with a counter range of their own for every leaf so that each leaf's
    # signs are generated where they are used rather than sliced out of one long
    # array. `jax.random.bits` hashes one counter per 32-bit word (the two output
    # words are xor-ed) and `jax.random.rademacher` spends 32 bits per sign: on a
    # 2-core CPU the per-leaf `rademacher` draw costs more than the jvp itself
    # (DODGE.md §1, "Measured"), and this form makes a k = 1 step of the
    # 784-256-256-10 MLP 13 % (batch 256) and 29 % (batch 16) faster than one
    # `jax.random.bits` draw unpacked. Keys of other implementations (`impl="rbg"`,
    # ...) use their own generator through `jax.random.bits`.
    leaves, treedef = jax.tree.flatten(tree)
    key_words = jax.random.key_data(key) if _is_threefry(key) else None
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32).reshape(1, 1, -1)
    signs = []
    offset = 0  # the first counter of the current leaf
    for index, leaf in enumerate(leaves):
        size = math.prod(leaf.shape)
        num_pairs = -(-size // (2 * _BITS_PER_WORD))
        if key_words is not None:
            if offset + num_pairs > 2**32:
                raise ValueError(
                    "Rademacher directions support at most 2³⁸ coordinates."
                )
            counters = jnp.arange(offset, offset + num_pairs, dtype=jnp.uint32)
            words = jnp.stack(threefry_2x32(key_words, counters), axis=1)
        else:
            words = jax.random.bits(
                jax.random.fold_in(key, index), (num_pairs, 2), jnp.uint32
            )
        bits = (words[..., None] >> shifts) & jnp.uint32(1)
        leaf_bits = bits.reshape(-1)[:size].reshape(leaf.shape)
        # 1 - 2·bit maps {0, 1} to {+1, -1}, exactly, in every floating dtype.
        signs.append((1 - 2 * leaf_bits.astype(jnp.int32)).astype(leaf.dtype))
        offset += num_pairs
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

    - `key`: a JAX PRNG key. Rademacher signs are bits of Threefry-2x32, JAX's
        default generator, one bit per sign; a key of another implementation
        (`jax.random.key(seed, impl="rbg")`, ...) draws its bits with
        `jax.random.bits`. The same key always gives the same direction.
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
