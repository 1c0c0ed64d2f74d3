"""The Rademacher sampler's hash and sign layout, pinned.

`threefry_2x32` must equal JAX's own Threefry bit for bit, and the signs a key gives
must not change by accident: the golden strings below are the exact signs of a small
MLP for two keys. A deliberate change of the layout updates them in the same commit,
with a CHANGELOG line saying that directions for a given key changed.
"""

import math
import os
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32 as jax_threefry_2x32

import eqx_dodge
from eqx_dodge._threefry import key_words, rademacher_like, threefry_2x32


COUNTER_RANGES = [(0, 1000), (2**31 - 500, 2**31 + 500), (2**32 - 1000, 2**32)]


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1])
@pytest.mark.parametrize("start, stop", COUNTER_RANGES)
def test_threefry_equals_jax_threefry(seed, start, stop):
    """Catches a wrong rotation constant, key schedule or round count."""
    key_words = jax.random.key_data(jax.random.key(seed))
    counters = jnp.arange(start, stop, dtype=jnp.uint32)
    ours = jax.jit(threefry_2x32)(key_words, counters)
    expected = jax_threefry_2x32(
        key_words, jnp.concatenate([counters, jnp.zeros_like(counters)])
    )
    assert jnp.array_equal(jnp.concatenate(ours), expected)


def _signs_by_documented_layout(key, sizes):
    """The documented layout, rebuilt from JAX's hash: leaf `l` hashes the counters
    `offset_l … offset_l + ⌈size_l/64⌉ − 1`, takes both output words of each, and
    reads their bits from the least significant; bit 1 is the sign −1."""
    key_words = jax.random.key_data(key)
    signs, offset = [], 0
    for size in sizes:
        calls = -(-size // 64)
        counters = jnp.arange(offset, offset + calls, dtype=jnp.uint32)
        words = jax_threefry_2x32(
            key_words, jnp.concatenate([counters, jnp.zeros_like(counters)])
        )
        pairs = np.stack([np.asarray(words[:calls]), np.asarray(words[calls:])], 1)
        bits = (pairs.reshape(-1)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
        signs.append(1 - 2 * bits.reshape(-1)[:size].astype(np.int32))
        offset += calls
    return signs


def test_signs_follow_the_documented_layout():
    """Catches signs drawn from other counters, words or bit positions."""
    tree = {"a": jnp.zeros((130,)), "b": jnp.zeros((3, 7)), "c": jnp.zeros((64,))}
    key = jax.random.key(11)
    direction = eqx_dodge.random_direction(key, tree)
    leaves = jax.tree.leaves(direction)
    expected = _signs_by_documented_layout(key, [math.prod(x.shape) for x in leaves])
    for leaf, signs in zip(leaves, expected):
        np.testing.assert_array_equal(np.ravel(leaf), signs)


# The exact signs (1 for −1) of `eqx.nn.MLP(2, 2, 3, 1, key=jax.random.key(0))`'s
# leaves, flattened in leaf order, for two keys.
GOLDEN = {0: "10011000100110110", 2026: "10000010100100101"}


@pytest.mark.parametrize("seed", sorted(GOLDEN))
def test_golden_signs(seed):
    """Catches any change of the directions a given key draws."""
    model = eqx.nn.MLP(2, 2, 3, 1, key=jax.random.key(0))
    forms = [jax.random.key(seed), jax.random.PRNGKey(seed), seed, jnp.int32(seed)]
    for key in forms:
        direction = eqx_dodge.random_direction(key, model)
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(direction)])
        assert "".join("1" if v < 0 else "0" for v in flat.tolist()) == GOLDEN[seed]
    # `filter_dodge` uses the same direction: for the loss Σ w, g = 1 and the
    # estimate is (Σ_i u_i) u.
    signs = jnp.asarray([1.0 - 2 * int(bit) for bit in GOLDEN[seed]])
    estimate = eqx_dodge.filter_dodge(
        lambda m: sum(jnp.sum(x) for x in jax.tree.leaves(eqx.filter(m, eqx.is_array))),
        key=jax.random.key(seed),
    )(model)
    flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(estimate)])
    assert jnp.array_equal(flat, jnp.sum(signs) * signs)


def test_kept_apart_words_give_the_same_signs():
    """Catches `kept_apart` changing the signs it only moves into a buffer."""
    tree = {"a": jnp.zeros((130,)), "b": jnp.zeros((3, 7))}
    key = jax.random.key(5)
    fused = rademacher_like(key, tree)
    apart = rademacher_like(key, tree, kept_apart=True)
    for x, y in zip(jax.tree.leaves(fused), jax.tree.leaves(apart)):
        np.testing.assert_array_equal(x, y)


def _fusions_that_hash(hlo: str) -> dict[str, str]:
    """The result type of every fused computation of compiled HLO text that runs
    Threefry's rounds (an `xor` in its body)."""
    hashing = {}
    computation = re.compile(r"\n(%fused\S* \(.*?\) -> .*?) \{\n(.*?)\n\}", re.S)
    for header, body in computation.findall(hlo):
        if " xor(" in body:
            name, result = header.split(" ", 1)[0], header.rsplit("-> ", 1)[1]
            hashing[name] = result
    return hashing


def test_activity_signs_are_hashed_apart_from_their_use():
    """Catches the per-example signs' hash fused into the tangent and cotangent code
    that reads them transposed, where XLA recomputes it for every sign (most of an
    activity step's time with 16 directions): every fusion that hashes must write
    the words, unsigned integers, not the signs or what they feed."""
    model = eqx.nn.MLP(8, 3, 16, 1, key=jax.random.key(0))
    x, y = jnp.ones((32, 8)), jnp.zeros((32,), jnp.int32)

    def example_loss(model, x, y):
        return -jax.nn.log_softmax(model(x))[y]

    def estimate(params):
        model_ = eqx.combine(params, static)
        grads = eqx_dodge.activity_dodge(
            example_loss, key=jax.random.key(1), num_directions=4, separate_layers=True
        )(model_, x, y)
        return eqx.filter(grads, eqx.is_array)

    params, static = eqx.partition(model, eqx.is_array)
    hlo = jax.jit(estimate).lower(params).compile().as_text()
    assert hlo is not None
    hashing = _fusions_that_hash(hlo)
    assert hashing, "no fusion runs the hash: the test no longer sees it"
    for name, result in hashing.items():
        assert result.lstrip("(").startswith("u32"), (name, result)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_key_words_are_distinct_pairs_of_every_key_implementation(impl):
    """Catches the activity estimator's per-example key words repeated across
    directions or examples (a shared tangent, which would bias nothing but cut the
    variance reduction silently), or a key implementation they cannot be drawn
    from; and checks that the estimator accepts such keys."""
    key = jax.random.key(7, impl=impl)
    words = key_words(key, (4, 33))
    assert words.shape == (4, 33, 2) and words.dtype == jnp.uint32
    pairs = {tuple(pair) for pair in np.asarray(words).reshape(-1, 2).tolist()}
    assert len(pairs) == 4 * 33
    np.testing.assert_array_equal(
        words, jax.jit(key_words, static_argnums=1)(key, (4, 33))
    )
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    estimate = eqx_dodge.activity_dodge(
        lambda model, x: jnp.sum(model(x)), key=key, num_directions=2
    )(model, jnp.ones((5, 3)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(estimate))


_SMALL_MODELS_SCRIPT = """
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_dodge


def loss(w):
    return jnp.sum(jnp.tanh(w) ** 2)


for size in (16, 20, 32):
    estimate = eqx_dodge.filter_dodge(loss, key=0, num_directions=2)
    eqx.filter_jit(estimate)(jnp.ones(size))


def after_one_step(w):
    return loss(w - 0.1 * eqx_dodge.filter_dodge(loss, key=0, num_directions=2)(w))


jax.jit(jax.grad(after_one_step))(jnp.ones(16))

# Every family of estimator on a model of one word pair (20 parameters).
w = jnp.ones(20)
for options in (
    dict(sampler="orthogonal"),
    dict(mode="partition"),
    dict(derivative="central"),
    dict(chunk_size=1),
):
    estimate = eqx_dodge.filter_dodge(loss, key=0, num_directions=2, **options)
    eqx.filter_jit(estimate)(w)
for optim in (
    eqx_dodge.dodge(key=0, num_directions=2, baseline_decay=0.99),
    eqx_dodge.dodge(source="ema", key=0, num_directions=2),
    eqx_dodge.adam_dodge(1e-2, key=0, num_directions=2),
    eqx_dodge.curvature_aware_dodge(1e-2, key=0),
):
    step = eqx.filter_jit(lambda s: optim.update(w, s, w, value_fn=loss))
    step(optim.init(w))
mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))


def example_loss(model, x, y):
    return optax.l2_loss(model(x), y).sum()


estimate = eqx_dodge.activity_dodge(example_loss, key=0, num_directions=2)
eqx.filter_jit(estimate)(mlp, jnp.ones((3, 2)), jnp.ones((3, 2)))
"""


def test_small_models_compile_with_xlas_default_flags():
    """A model of 16 to 32 parameters (one hash word pair) with two directions
    compiles with XLA's default optimisations, which this suite turns off
    (`conftest.py`), so it runs in a fresh interpreter without them: each family
    of estimator, and `jax.grad` through an estimate. Catches the hash fused into
    the unpacking of the signs of a second draw, which XLA:CPU's LLVM backend never
    finished compiling (16–23 and 26–32 parameters, jaxlib 0.10;
    `_threefry._FEW_WORDS`)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "XLA_FLAGS")
    }
    try:
        result = subprocess.run(
            [sys.executable, "-c", _SMALL_MODELS_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the estimate of a 16-parameter model did not finish")
    assert result.returncode == 0, result.stderr[-3000:]
