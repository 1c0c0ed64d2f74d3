"""`sampler="orthogonal"`: `k` directions `u_i = h_i ⊙ d` sharing one sign vector `d`,
with Walsh rows `h_i` and a tail of `p mod K` coordinates given to one direction
each. The expected Gram matrix, mean and variance are computed here from the
construction's definition (docs, "Multiple directions"), not from the library.

The loss is linear, `L(w) = g·w`, so its gradient is `g` exactly and the estimate
`(1/k) Σ_i (g·u_i) u_i` depends on the directions alone.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_dodge
from eqx_dodge._sharded_layout import make_layout
from eqx_dodge._sources import baseline_contraction
from eqx_dodge._tangents import random_tangents

from .helpers import assert_unbiased, dodge_variance, flat, flat_batched


# p = 19 coordinates in two leaves: not a multiple of K = 2, 4 or 8.
SHAPES = {"w": (3, 5), "b": (4,)}
P_TOTAL = 19
NUM_SAMPLES = 2**15


def zeros():
    return {name: jnp.zeros(shape) for name, shape in SHAPES.items()}


GRADIENT = np.random.default_rng(3).standard_normal(P_TOTAL).astype(np.float32)


def linear_loss(params):
    return jnp.dot(jnp.asarray(GRADIENT), flat(params))


def draw(key, k, params=None):
    """The `k` directions `filter_dodge(key=key, sampler="orthogonal")` uses, as a
    `k × p` matrix."""
    params = zeros() if params is None else params
    tangents = random_tangents(key, params, k, "orthogonal", "average")
    return flat_batched(tangents.draw(tangents.seeds))


def tail_owners(p, k):
    """`K`, `B` and, for each coordinate, the direction owning it (−1 in blocks)."""
    rows = 1 << (k - 1).bit_length()
    blocked = p - p % rows
    owner = np.full(p, -1)
    owner[blocked:] = np.arange(p - blocked) % k
    return rows, blocked, owner


def squared_couplings(p, k):
    """`M(c, c')²` for `M = Σ_i h_i h_iᵀ`, from the construction: in the blocks
    `(Σ_{i<k} (−1)^popcount(i & (c ⊕ c')))²`, `k` between a block and a tail
    coordinate, `k²` between tail coordinates of one direction."""
    rows, blocked, owner = tail_owners(p, k)
    c = np.arange(p)
    delta = (c[:, None] ^ c[None, :]) % rows
    parity = np.array(
        [[bin(i & d).count("1") % 2 for d in range(rows)] for i in range(k)]
    )
    walsh_sums = np.sum(1 - 2 * parity, axis=0)
    couplings = walsh_sums[delta].astype(float) ** 2
    in_tail = c >= blocked
    couplings[in_tail[:, None] != in_tail[None, :]] = k
    both = in_tail[:, None] & in_tail[None, :]
    couplings[both] = np.where(owner[:, None] == owner[None, :], k**2, 0)[both]
    return couplings


def orthogonal_variance(g, k):
    """`Var ĝ_c = (1/k²) Σ_{c'≠c} M(c, c')² g_{c'}²` (the `d_c d_{c'}` are
    uncorrelated, and `M(c, c) = k` for every `c`)."""
    couplings = squared_couplings(g.size, k)
    np.fill_diagonal(couplings, 0)
    return couplings @ np.square(g) / k**2


def test_exactly_orthogonal_and_unit_on_average():
    ks = (2, 3, 8)
    draws = jax.jit(lambda key: [draw(key, k) for k in ks])(jax.random.key(0))
    for k, directions in zip(ks, draws):
        directions = np.asarray(directions)
        _, blocked, owner = tail_owners(P_TOTAL, k)
        gram = directions @ directions.T
        owned = np.array([np.sum(owner == i) for i in range(k)])
        # Off-diagonal exactly zero; squared norms B + k·(tail coordinates owned).
        np.testing.assert_allclose(gram, np.diag(blocked + k * owned), atol=1e-5)
        assert np.trace(gram) == pytest.approx(k * P_TOTAL)
        # Rademacher on the blocks, ±√k on each tail coordinate of its owner only.
        assert np.all(np.abs(directions[:, :blocked]) == 1)
        mean_square = np.mean(np.square(directions), axis=0)
        np.testing.assert_allclose(mean_square, 1, rtol=1e-6)


def test_estimate_is_the_scaled_subspace_projection():
    """When `K` divides `p` (here p = 24; k = 3, K = 4 and k = K = 8) every
    `‖u_i‖² = p`, and the average `(1/k) Σ (g·u_i) u_i` is `(p/k) P_S g`, Kozak et
    al.'s step. For `k = K` the subspace is that of the parts of `d` on the residue
    classes `c mod k`: the estimate is the partition one with interleaved blocks.
    With `k = 8 > CPU_CHUNK` the estimator draws the directions in two chunks."""
    params = {"w": jnp.zeros((4, 6))}
    g = jax.random.normal(jax.random.key(4), (24,))
    key = jax.random.key(5)

    @jax.jit
    def estimates_and_directions():
        def loss(params):
            return jnp.dot(g, flat(params))

        out = []
        for k in (3, 8):
            dodge = eqx_dodge.filter_dodge(
                loss, key=key, num_directions=k, sampler="orthogonal"
            )
            out.append((flat(dodge(params)), draw(key, k, params)))
        return out, flat(eqx_dodge.random_direction(key, params))

    estimates, signs = estimates_and_directions()
    g, signs = np.asarray(g, np.float64), np.asarray(signs, np.float64)
    for k, (estimate, directions) in zip((3, 8), estimates):
        u = np.asarray(directions, np.float64)
        np.testing.assert_allclose(u @ u.T, 24 * np.eye(k), atol=1e-6)
        projection = u.T @ np.linalg.solve(u @ u.T, u @ g)
        np.testing.assert_allclose(estimate, 24 / k * projection, rtol=1e-5)
    # The parts v_r = d·[c ≡ r mod 8] and Σ_r (g·v_r) v_r.
    parts = signs * (np.arange(24) % 8 == np.arange(8)[:, None])
    interleaved = parts.T @ (parts @ g)
    np.testing.assert_allclose(estimates[1][0], interleaved, rtol=1e-5, atol=1e-6)


def test_chunks_and_keys_reproduce_the_directions():
    key = jax.random.key(6)

    @jax.jit
    def draws(key):
        tangents = random_tangents(key, zeros(), 7, "orthogonal", "average")
        whole = flat_batched(tangents.draw(tangents.seeds))
        chunks = [tangents.draw(tangents.seeds[s]) for s in (slice(0, 3), slice(3, 7))]
        return whole, jnp.concatenate([flat_batched(c) for c in chunks]), draw(key, 7)

    whole, chunked, again = draws(key)
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_array_equal(whole, again)
    other, _, _ = draws(jax.random.key(7))
    assert not np.array_equal(whole, other)


def test_one_direction_is_the_rademacher_one():
    params = zeros()

    @jax.jit
    def directions(key):
        return [
            (
                eqx_dodge.filter_dodge(linear_loss, key=key, sampler=sampler)(params),
                eqx_dodge.random_direction(key, params, sampler=sampler),
            )
            for sampler in ("orthogonal", "rademacher")
        ]

    orthogonal, rademacher = directions(jax.random.key(8))
    for a, b in zip(orthogonal, rademacher):
        np.testing.assert_array_equal(flat(a), flat(b))


def test_unbiased_with_the_derived_variance_below_independent_directions():
    keys = jax.random.split(jax.random.key(9), NUM_SAMPLES)
    params = zeros()

    @jax.jit
    def estimates(keys):
        def one(key, k):
            dodge = eqx_dodge.filter_dodge(
                linear_loss, key=key, num_directions=k, sampler="orthogonal"
            )
            return flat(dodge(params))

        return [jax.vmap(lambda key: one(key, k))(keys) for k in (3, 4)]

    g = GRADIENT
    # One Walsh row sum S(δ) ≠ 0 off δ = 0 (k = 3) and none (k = K = 4); a
    # p mod K = 3 coordinate tail in both. Chunks: the projection test.
    for k, samples in zip((3, 4), estimates(keys)):
        expected = orthogonal_variance(g, k)
        assert_unbiased(samples, jnp.asarray(g), jnp.asarray(expected))
        # Each coordinate a sum of ≤ 18 uncorrelated ±g terms: kurtosis below 3, so
        # the sample variance's relative standard error is below √(2/2¹⁵) ≈ 0.8 %.
        variance = np.var(np.asarray(samples), axis=0, ddof=1)
        np.testing.assert_allclose(variance, expected, rtol=0.06, atol=1e-6)
        # In total, less than k independent Rademacher directions.
        independent = np.sum(dodge_variance(jnp.asarray(g), num_directions=k))
        assert np.sum(variance) < 0.95 * independent
        assert np.sum(expected) < independent


@pytest.mark.parametrize("p,k", [(19, 3), (19, 8), (20, 3), (16, 16)])
def test_baseline_contraction_is_the_largest_second_moment(p, k):
    """`E‖ĝ(e)‖² ≤ q‖e‖²` with equality at the worst coordinate: for `e` one-hot at
    `c`, `E‖ĝ‖² = Σ_{c'} M(c', c)² / k²`."""
    worst = np.max(np.sum(squared_couplings(p, k), axis=0)) / k**2
    assert baseline_contraction(p, k, "orthogonal", "average") == pytest.approx(worst)


def test_sharded_directions_are_the_global_construction():
    """Model-parallel shards draw pieces of one global set of orthogonal directions:
    the global flat index decides each coordinate's Walsh sign or tail owner."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 on the CPU backend)")
    mesh = jax.make_mesh((1, 4), ("data", "model"))
    specs = {"w": P(None, "model"), "b": P("model")}
    params = {"w": jnp.zeros((3, 8)), "b": jnp.zeros(4)}  # p = 28, 28 mod 8 = 4
    layout = make_layout(specs, params, mesh, ("data",))
    sharded = jax.tree.map(
        lambda leaf, s: jax.device_put(leaf, NamedSharding(mesh, s)), params, specs
    )

    def local(params):
        tangents = random_tangents(
            jax.random.key(10), params, 5, "orthogonal", "average", layout
        )
        return tangents.draw(tangents.seeds)

    directions = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs,),
            out_specs={"w": P(None, None, "model"), "b": P(None, "model")},
        )
    )(sharded)
    u = np.concatenate(
        [np.asarray(leaf).reshape(5, -1) for leaf in jax.tree.leaves(directions)], 1
    )
    _, blocked, owner = tail_owners(28, 5)
    norms = blocked + 5 * np.bincount(owner[blocked:], minlength=5)
    np.testing.assert_allclose(u @ u.T, np.diag(norms), atol=1e-5)
    # Not the single-device directions (the shards draw their own signs), but the
    # same Walsh pattern: u_i ⊙ u_0 is h_i ⊙ h_0 on the blocks.
    single = np.asarray(jax.jit(lambda key: draw(key, 5, params))(jax.random.key(10)))
    np.testing.assert_array_equal(
        (u * u[:1])[:, :blocked], (single * single[:1])[:, :blocked]
    )


def test_orthogonal_rejects_partition_mode():
    match = "`sampler='orthogonal'`.*`mode='average'`"
    options: dict[str, Any] = dict(
        num_directions=2, sampler="orthogonal", mode="partition"
    )
    with pytest.raises(ValueError, match=match):
        eqx_dodge.filter_dodge(linear_loss, key=0, **options)
    with pytest.raises(ValueError, match=match):
        eqx_dodge.dodge(key=0, **options)
    with pytest.raises(ValueError, match=match):
        eqx_dodge.scale_by_adam_dodge(key=0, **options)
    with pytest.raises(ValueError, match=match):
        eqx_dodge.OnlineDodge(lambda model, state, x: (state, x), **options)


def test_optax_transform_with_orthogonal_directions():
    """`dodge_random` forms the same estimate as `filter_dodge` from its step key."""
    params = zeros()
    transform = eqx_dodge.dodge(key=11, num_directions=3, sampler="orthogonal")

    @eqx.filter_jit
    def step():
        state = transform.init(params)
        updates, _ = transform.update(params, state, params, value_fn=linear_loss)
        _, step_key = jax.random.split(jax.random.key(11))
        expected = eqx_dodge.filter_dodge(
            linear_loss, key=step_key, num_directions=3, sampler="orthogonal"
        )(params)
        return updates, expected

    updates, expected = step()
    np.testing.assert_allclose(flat(updates), flat(expected), rtol=1e-6)
