"""The samplers: the Rademacher sampler's bits are Threefry's, and its signs are fair
and independent across coordinates, leaves, bit positions and keys; the Gaussian
sampler's entries are standard normal and independent across leaves and keys.

Each check averages ±1 products over `N` draws, so under independence the average has
standard error `1/√N`; the tolerance is 5 standard errors (a two-sided false alarm
probability below 10⁻⁶ per check).
"""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.extend.random import threefry_2x32 as jax_threefry_2x32

import eqx_dodge
from eqx_dodge._threefry import threefry_2x32


NUM_KEYS = 512
# Leaf sizes that are not multiples of the 64 signs of one Threefry call, so that
# every leaf's last call is only partly used.
SHAPES = {"w": (300, 33), "b": (17,), "c": (5, 5, 5), "d": (300, 33)}


def _keys(impl):
    if impl == "legacy":
        return jax.vmap(jax.random.PRNGKey)(jnp.arange(NUM_KEYS))
    return jax.random.split(jax.random.key(0, impl=impl), NUM_KEYS)


@jax.jit
def _threefry_outputs(key_words, counters):
    return jnp.concatenate(threefry_2x32(key_words, counters))


def test_threefry_is_jax_threefry():
    key_words = jax.random.key_data(jax.random.key(7))
    counters = jnp.arange(2**31 - 500, 2**31 + 500, dtype=jnp.uint32)
    expected = jax_threefry_2x32(
        key_words, jnp.concatenate([counters, jnp.zeros_like(counters)])
    )
    assert jnp.array_equal(_threefry_outputs(key_words, counters), expected)


def _assert_zero_mean(products, what):
    products = jnp.asarray(products, jnp.float32)
    tolerance = 5 / math.sqrt(products.size)
    mean = float(jnp.mean(products))
    assert abs(mean) < tolerance, f"{what}: mean {mean:.2e}, tolerance {tolerance:.2e}"


@pytest.mark.parametrize("impl", ["threefry2x32", "legacy", "rbg"])
def test_rademacher_signs_are_fair_and_independent(impl):
    tree = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}

    @jax.jit
    def draw(keys):
        return jax.vmap(lambda key: eqx_dodge.random_direction(key, tree))(keys)

    directions = draw(_keys(impl))
    for name, shape in SHAPES.items():
        assert directions[name].shape == (NUM_KEYS,) + shape
    signs = jnp.concatenate(
        [directions[name].reshape(NUM_KEYS, -1) for name in SHAPES], axis=1
    )
    assert bool(jnp.all(jnp.abs(signs) == 1))
    _assert_zero_mean(signs, "sign")
    # Each bit position of a 64-bit Threefry output, on its own.
    for leaf in ("w", "d"):
        flat = directions[leaf].reshape(NUM_KEYS, -1)
        usable = flat[:, : flat.shape[1] // 64 * 64].reshape(NUM_KEYS, -1, 64)
        for position in range(64):
            _assert_zero_mean(usable[:, :, position], f"{leaf} bit {position}")
    _assert_zero_mean(signs[:, 1:] * signs[:, :-1], "neighbouring coordinates")
    _assert_zero_mean(signs[1:] * signs[:-1], "neighbouring keys")
    # Two leaves of the same shape must not share their bits.
    _assert_zero_mean(directions["w"] * directions["d"], "leaves w and d")


def test_rademacher_directions_are_deterministic_per_key():
    tree = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}
    for impl in ("threefry2x32", "rbg"):
        key = jax.random.key(3, impl=impl)
        first = eqx_dodge.random_direction(key, tree)
        second = jax.jit(eqx_dodge.random_direction)(key, tree)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, first, second))


def test_gaussian_entries_are_standard_and_independent():
    """One draw per dtype is sliced into the leaves: a wrong offset would give two
    leaves of the same shape (`w`, `d`) the same entries, a wrong scale the wrong
    second moment, a dtype group mixed up the wrong dtype. (The draw is
    `jax.random.normal`'s for every key implementation; threefry keys only, as
    vmapped `rbg` keys draw one key at a time.)"""
    tree = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}
    tree["half"] = jnp.zeros((300, 33), jnp.bfloat16)

    @jax.jit
    def draw(keys):
        return jax.vmap(
            lambda key: eqx_dodge.random_direction(key, tree, sampler="gaussian")
        )(keys)

    directions = draw(_keys("threefry2x32"))
    for name, leaf in tree.items():
        assert directions[name].shape == (NUM_KEYS,) + leaf.shape
        assert directions[name].dtype == leaf.dtype
    entries = jnp.concatenate(
        [directions[name].reshape(NUM_KEYS, -1) for name in SHAPES], axis=1
    )
    _assert_zero_mean(entries, "entry")
    # E u² = 1 with Var u² = 2: the same 5-standard-error tolerance, scaled by √2.
    second_moment = float(jnp.mean(entries**2))
    assert abs(second_moment - 1) < 5 * math.sqrt(2 / entries.size)
    _assert_zero_mean(entries[1:] * entries[:-1], "neighbouring keys")
    _assert_zero_mean(directions["w"] * directions["d"], "leaves w and d")
    half = directions["half"].astype(jnp.float32)
    _assert_zero_mean(half * directions["w"], "bfloat16 leaf and leaf w")
    _assert_zero_mean(half[:, :17] * directions["b"][..., None], "leaf b")
