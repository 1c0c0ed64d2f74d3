"""The samplers of random directions: Rademacher signs as bits of Threefry-2x32,
JAX's default hash, and standard normal entries.

Signs are generated where they are used, one bit each and 64 per hash call, with a
counter range of its own for every leaf. `jax.random.rademacher` spends 32 bits per
sign and `jax.random.bits` one hash per 32-bit word; on a 2-core CPU the former costs
more than the jvp it feeds. The layout of the signs (leaf `l` uses counters
`offset_l, …, offset_l + ⌈size_l/64⌉ − 1`, both output words, bits from least
significant) is pinned by golden-value tests: changing it changes every direction
drawn from a given key, and is recorded in the CHANGELOG when done on purpose.
"""

import functools as ft
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree, UInt32


# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011): the rotation constants and
# key schedule of Random123's threefry2x32, as in `jax.extend.random.threefry_2x32`.
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_ROUNDS = 20
_PARITY = 0x1BD11BDA
_BITS_PER_WORD = 32
_MAX_COUNTERS = 2**32
_FEW_WORDS = 16


def threefry_2x32(
    key_words: UInt32[Array, "2"], counters: UInt32[Array, " n"]
) -> tuple[UInt32[Array, " n"], UInt32[Array, " n"]]:
    """Threefry-2x32-20 of the counter pairs `(counters, 0)` under the key `key_words`:
    what `jax.extend.random.threefry_2x32` computes, written with `jnp` so that XLA
    fuses it with the sign unpacking that consumes it."""
    k0, k1 = key_words[0], key_words[1]
    schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
    x0 = counters + schedule[0]
    x1 = jnp.broadcast_to(schedule[1], counters.shape)
    for r in range(_ROUNDS):
        rotation = _ROTATIONS[r % len(_ROTATIONS)]
        x0 = x0 + x1
        x1 = (x1 << jnp.uint32(rotation)) | (x1 >> jnp.uint32(32 - rotation))
        x1 = x1 ^ x0
        if r % 4 == 3:
            injection = r // 4 + 1
            x0 = x0 + schedule[injection % 3]
            x1 = x1 + schedule[(injection + 1) % 3] + jnp.uint32(injection)
    return x0, x1


def is_threefry(key: PRNGKeyArray) -> bool:
    return str(jax.random.key_impl(key)) == "threefry2x32"


def key_words(key: PRNGKeyArray, shape: tuple[int, ...]) -> UInt32[Array, "... 2"]:
    """Raw key words, one pair per entry of `shape`, for `jax.random.wrap_key_data`:
    Threefry of the counters `0, 1, …` under `key`, distinct counters hashed as a
    split hashes them, with the signs' own hash. JAX's `jax.random.bits` runs
    Threefry's rounds in a loop on CPU, which cost a third of an activity step with
    16 directions on a small MLP. Keys of other implementations use their own
    generator."""
    if not is_threefry(key):
        return jax.random.bits(key, (*shape, 2), jnp.uint32)
    counters = jnp.arange(math.prod(shape), dtype=jnp.uint32)
    words = jnp.stack(threefry_2x32(jax.random.key_data(key), counters), axis=-1)
    return words.reshape(*shape, 2)


def _kept_apart(words: UInt32[Array, "n 2"]) -> UInt32[Array, "n 2"]:
    """`words`, unchanged, in a buffer of their own instead of fused into the code
    that unpacks their bits.

    Fused, the hash is computed inside the loop over the signs. Where the signs are
    written in their own order the compiled loop hashes each word once; where the
    consumer reads them transposed (the activity estimator's per-example tangents,
    laid out for a matmul) it hashes again for every sign, 32 times the work, which
    was most of an activity step with 16 directions. XLA does not fuse an integer
    division by a non-constant into a consumer that reads each element many times,
    so a division by a one it cannot fold keeps the words in memory: a 32nd of the
    signs' size."""
    one = (words[:1, :1] | jnp.uint32(1)) // (words[:1, :1] | jnp.uint32(1))
    return words // one


def _words(
    key: PRNGKeyArray, sizes: list[int], kept_apart: bool = False
) -> list[UInt32[Array, "n 2"]]:
    """The hash words of every leaf: `⌈size/64⌉` pairs each, `_kept_apart` if
    asked."""
    num_pairs = [-(-size // (2 * _BITS_PER_WORD)) for size in sizes]
    if not is_threefry(key):
        # Keys of other implementations (`impl="rbg"`, ...) use their own generator.
        return [
            jax.random.bits(jax.random.fold_in(key, index), (n, 2), jnp.uint32)
            for index, n in enumerate(num_pairs)
        ]
    total = sum(num_pairs)
    if total > _MAX_COUNTERS:
        raise ValueError("Rademacher directions support at most 2³⁸ coordinates.")
    # One hash over the consecutive counter ranges of all leaves, not one per leaf:
    # the same words, and a twentieth of the program XLA compiles per leaf.
    counters = jnp.arange(total, dtype=jnp.uint32)
    words = jnp.stack(threefry_2x32(jax.random.key_data(key), counters), axis=1)
    # A few words are kept apart always: XLA:CPU's LLVM backend never finishes
    # compiling the hash fused into the unpacking of one word pair's 16 to 32 signs
    # when a second draw's seed depends on a value (jaxlib 0.10: any model of that
    # many parameters, with two or more directions), and a buffer of a few words
    # costs nothing.
    words = _kept_apart(words) if kept_apart or total <= _FEW_WORDS else words
    offsets = itertools.accumulate(num_pairs, initial=0)
    return [words[o : o + n] for o, n in zip(offsets, num_pairs)]


Layout = tuple[tuple[tuple[int, ...], jnp.dtype], ...]


def _like(
    draw: Callable[[PRNGKeyArray, Layout], list[Array]],
    key: PRNGKeyArray,
    tree: PyTree,
) -> PyTree:
    """`draw`'s leaves for the shapes and dtypes of `tree`'s leaves, as a tree.

    The samplers are jitted with the layout static so that their trace (twenty hash
    rounds and an unpacking per leaf) is cached per layout: a training loop, a vmap
    over keys or a test that draws directions for the same model many times traces
    them once. XLA inlines the call into the caller's program, so the hash still
    fuses with the code that consumes its output."""
    leaves, treedef = jax.tree.flatten(tree)
    layout = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)
    return jax.tree.unflatten(treedef, draw(key, layout))


def rademacher_like(
    key: PRNGKeyArray, tree: PyTree, *, kept_apart: bool = False
) -> PyTree:
    """Independent ±1 entries shaped and typed like every leaf of `tree`; with
    `kept_apart`, their hash words are computed apart from the code that uses the
    signs (`_kept_apart`): the same signs."""
    draw = ft.partial(_rademacher_leaves, kept_apart=kept_apart)
    return _like(draw, key, tree)


def normal_like(key: PRNGKeyArray, tree: PyTree) -> PyTree:
    """Independent standard normal entries shaped and typed like every leaf of
    `tree`."""
    return _like(_normal_leaves, key, tree)


@ft.partial(jax.jit, static_argnums=1, static_argnames="kept_apart")
def _rademacher_leaves(
    key: PRNGKeyArray, layout: Layout, kept_apart: bool = False
) -> list[Array]:
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32).reshape(1, 1, -1)
    sizes = [math.prod(shape) for shape, _ in layout]
    signs = []
    all_words = _words(key, sizes, kept_apart)
    for (shape, dtype), size, words in zip(layout, sizes, all_words):
        bits = (words[..., None] >> shifts) & jnp.uint32(1)
        leaf_bits = bits.reshape(-1)[:size].reshape(shape)
        # 1 - 2·bit maps {0, 1} to {+1, -1}, exactly, in every floating dtype.
        signs.append((1 - 2 * leaf_bits.astype(jnp.int32)).astype(dtype))
    return signs


# One draw per dtype, sliced into the leaves: a draw per leaf (`optax.tree.
# random_like`) compiles one hash and one inverse error function per leaf, which
# made a Gaussian step several times slower to compile than a Rademacher one.
@ft.partial(jax.jit, static_argnums=1)
def _normal_leaves(key: PRNGKeyArray, layout: Layout) -> list[Array]:
    dtypes = list(dict.fromkeys(dtype for _, dtype in layout))
    draws = {}
    for index, dtype in enumerate(dtypes):
        size = sum(math.prod(shape) for shape, d in layout if d == dtype)
        group_key = key if len(dtypes) == 1 else jax.random.fold_in(key, index)
        draws[dtype] = (jax.random.normal(group_key, (size,), dtype), 0)
    leaves = []
    for shape, dtype in layout:
        flat, offset = draws[dtype]
        size = math.prod(shape)
        leaves.append(flat[offset : offset + size].reshape(shape))
        draws[dtype] = (flat, offset + size)
    return leaves
