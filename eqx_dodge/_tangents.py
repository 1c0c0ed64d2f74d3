"""The tangents of one DODGE estimate: what they are drawn from and how the directional
derivatives along them combine. Every estimator (the function wrappers, the optax
transforms, `OnlineDodge`, the sharded wrappers) gets its tangents from
`draw_tangents` or `explored_tangents`.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray, PyTree, Scalar

from ._directions import (
    accumulation_dtype,
    check_direction,
    check_num_parts,
    flat_positions,
    largest_magnitude,
    num_coordinates,
    orthogonal_direction,
    part_indices,
    sample_direction,
    scale_to_unit,
    select_part,
    squared_norm,
)


# On XLA:CPU, k directions cost less when run a few at a time, one chunk after
# another, than all at once in one `vmap`: the k tangents of the parameters and of
# every activation no longer spill out of the caches, and the peak memory drops from
# k tangents to `CPU_CHUNK`. This holds for a loss with a loop of its own too (a
# recurrent model): its k/c passes repeat the sequential steps with smaller matmuls,
# and an LSTM-128 step with k = 64 then takes no longer than in one `vmap` while its
# peak memory drops from 59 to 4 MiB. Measured in benchmarks/step_cost.py and
# benchmarks/k_formulations.py; other backends keep one `vmap` over all k.
CPU_CHUNK = 4
MAX_CHUNKS = 16


class Layout(eqx.Module):
    """Where the trainable leaves live: how a direction is drawn, norms summed and
    partition blocks assigned. This one is for leaves held whole on one device;
    `_sharded_layout.py` has one for leaves split over the devices of a mesh."""

    def direction(self, key: PRNGKeyArray, primal: PyTree, sampler: str) -> PyTree:
        return sample_direction(key, primal, sampler)

    def squared_norm(self, tree: PyTree) -> Scalar:
        return squared_norm(tree)

    def largest_magnitude(self, tree: PyTree) -> Scalar:
        return largest_magnitude(tree)

    def part_indices(self, primal: PyTree, num_parts: int) -> PyTree:
        return part_indices(primal, num_parts)

    def num_coordinates(self, primal: PyTree) -> int:
        return num_coordinates(primal)

    def positions(self, primal: PyTree) -> PyTree:
        """The flat index of every coordinate among all the `p` coordinates."""
        return flat_positions(primal)

    def check_num_parts(self, primal: PyTree, num_parts: int) -> None:
        check_num_parts(self.num_coordinates(primal), num_parts)

    def restrict(self, mask: tuple[bool, ...]) -> "Layout":
        """This layout for the leaves of the primal where `mask` is true (the live
        leaves, `_live.py`)."""
        del mask
        return self

    def chunk_size(self, num_directions: int) -> int:
        """How many of the k directions one vectorised jvp carries."""
        if jax.default_backend() != "cpu":
            return num_directions
        return max(CPU_CHUNK, -(-num_directions // MAX_CHUNKS))


SINGLE_DEVICE = Layout()


def widest_float() -> jnp.dtype:
    """float64 where `jax_enable_x64` is on, else float32: the dtype of the weights
    `w_j`, so that `1/k` is no coarser than float64 parameters (read when traced:
    the flag may be set after import)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


class Tangents(eqx.Module):
    """k tangents, drawn a chunk at a time from `seeds` (one entry per tangent along
    the leading axis), and the weights `w_j` of the estimate `Σ_j w_j d_j t_j`."""

    seeds: eqx.AbstractVar[PyTree]

    @property
    def num(self) -> int:
        return jax.tree.leaves(self.seeds)[0].shape[0]

    @abc.abstractmethod
    def draw(self, seeds: PyTree) -> PyTree:
        """The tangents of a chunk of `seeds`, stacked along a leading axis."""

    @abc.abstractmethod
    def weights(self, seeds: PyTree) -> Float[Array, " c"]:
        """The weights of the tangents of a chunk of `seeds`."""

    @property
    def accumulates(self) -> bool:
        """Whether the estimate is the weighted sum of the tangents, accumulated chunk
        by chunk; if not, `gather` forms it from all the derivatives at the end."""
        return True

    def gather(self, derivatives: Array) -> PyTree:
        del derivatives
        raise TypeError(f"{type(self).__name__} accumulates its estimate.")


class RandomTangents(Tangents):
    """Independent random directions, one per key (`mode="average"`)."""

    seeds: Key[Array, " k"]
    template: PyTree
    layout: Layout
    sampler: str = eqx.field(static=True)

    def draw(self, seeds: Key[Array, " c"]) -> PyTree:
        return jax.vmap(
            lambda k: self.layout.direction(k, self.template, self.sampler)
        )(seeds)

    def weights(self, seeds: Key[Array, " c"]) -> Float[Array, " c"]:
        return jnp.full(seeds.shape, 1 / self.num, widest_float())


class OrthogonalTangents(Tangents):
    """`k` exactly orthogonal directions sharing one sign vector drawn from `key`
    (`sampler="orthogonal"`, `mode="average"`); the seeds are the directions'
    indices, so a chunk draws its directions alone."""

    seeds: Int[Array, " k"]
    key: PRNGKeyArray
    template: PyTree
    layout: Layout

    def draw(self, seeds: Int[Array, " c"]) -> PyTree:
        # The signs and positions, shared, are computed once per chunk.
        signs = self.layout.direction(self.key, self.template, "rademacher")
        positions = self.layout.positions(self.template)
        total = self.layout.num_coordinates(self.template)
        return jax.vmap(
            lambda i: orthogonal_direction(signs, positions, total, i, self.num)
        )(seeds)

    def weights(self, seeds: Int[Array, " c"]) -> Float[Array, " c"]:
        return jnp.full(seeds.shape, 1 / self.num, widest_float())


class PartitionTangents(Tangents):
    """The `k` zero-padded parts of one random direction (`mode="partition"`)."""

    seeds: Int[Array, " k"]
    base: PyTree
    indices: PyTree

    def draw(self, seeds: Int[Array, " c"]) -> PyTree:
        return jax.vmap(lambda j: select_part(self.base, self.indices, j))(seeds)

    def weights(self, seeds: Int[Array, " c"]) -> Float[Array, " c"]:
        return jnp.ones(seeds.shape, widest_float())

    @property
    def accumulates(self) -> bool:
        return False

    def gather(self, derivatives: Array) -> PyTree:
        # Coordinate i lies in exactly one part j, so Σ_j d_j u_j(i) = d_{j(i)} u(i):
        # a gather instead of a k-fold sum over mostly-zero parts.
        return jax.tree.map(
            lambda u, part: derivatives[part].astype(u.dtype) * u,
            self.base,
            self.indices,
        )


class FixedTangents(Tangents):
    """Tangents formed up front: a candidate, possibly with exploration."""

    seeds: Int[Array, " k"]
    stacked: PyTree
    coefficients: Float[Array, " k"]

    def draw(self, seeds: Int[Array, " c"]) -> PyTree:
        return jax.tree.map(lambda t: t[seeds], self.stacked)

    def weights(self, seeds: Int[Array, " c"]) -> Float[Array, " c"]:
        return self.coefficients[seeds]


def fixed_tangents(stacked: PyTree, weights: Float[Array, " k"]) -> FixedTangents:
    num = weights.shape[0]
    return FixedTangents(jnp.arange(num, dtype=jnp.int32), stacked, weights)


def unit(candidate: PyTree, layout: Layout = SINGLE_DEVICE) -> PyTree:
    """`candidate / ‖candidate‖` (its global norm), zeros for a zero candidate."""
    squared = layout.squared_norm(candidate)
    # ‖c‖² underflows or overflows in float32 once ‖c‖ leaves about 1e±19, which
    # would turn a nonzero candidate into zeros. There c is first divided by its
    # largest magnitude; elsewhere the divisor is 1 and nothing changes.
    rescue = (squared < jnp.finfo(squared.dtype).tiny) | jnp.isinf(squared)
    largest = layout.largest_magnitude(candidate)
    divisor = jnp.where(rescue & (largest > 0), largest, 1)
    scaled = jax.tree.map(lambda leaf: leaf.astype(squared.dtype) / divisor, candidate)
    return jax.tree.map(
        lambda leaf, direction: direction.astype(leaf.dtype),
        candidate,
        scale_to_unit(scaled, layout.squared_norm(scaled)),
    )


def random_tangents(
    key: PRNGKeyArray,
    primal: PyTree,
    num_directions: int,
    sampler: str,
    mode: str,
    layout: Layout = SINGLE_DEVICE,
) -> Tangents:
    """`num_directions` random tangents. One direction is the direction
    `random_direction(key, primal)` draws (the paper's Listing 1); `k > 1` average
    the directions of `jax.random.split(key, k)`, or the `k` orthogonal directions
    of `key` (`sampler="orthogonal"`), or partition the one direction."""
    if mode == "partition" and num_directions > 1:
        layout.check_num_parts(primal, num_directions)
        return PartitionTangents(
            jnp.arange(num_directions, dtype=jnp.int32),
            layout.direction(key, primal, sampler),
            layout.part_indices(primal, num_directions),
        )
    if sampler == "orthogonal" and num_directions > 1:
        indices = jnp.arange(num_directions, dtype=jnp.int32)
        return OrthogonalTangents(indices, key, primal, layout)
    keys = key[None] if num_directions == 1 else jax.random.split(key, num_directions)
    return RandomTangents(keys, primal, layout, sampler)


def draw_tangents(
    primal: PyTree,
    *,
    key: PRNGKeyArray | None,
    direction: PyTree | None,
    num_directions: int,
    sampler: str,
    mode: str,
    layout: Layout = SINGLE_DEVICE,
) -> Tangents:
    """The tangents for a candidate `direction` (one unit tangent) or for
    `num_directions` random directions from `key`."""
    if direction is not None:
        check_direction(direction, primal)
        return candidate_tangents(direction, layout)
    assert key is not None
    return random_tangents(key, primal, num_directions, sampler, mode, layout)


def candidate_tangents(direction: PyTree, layout: Layout = SINGLE_DEVICE) -> Tangents:
    """The one unit tangent along a candidate `direction` (already checked)."""
    stacked = jax.tree.map(lambda u: u[None], unit(direction, layout))
    return fixed_tangents(stacked, jnp.ones((1,), widest_float()))


class ExploredTangents(Tangents):
    """The unit candidate `ĉ` (index 0) and random directions projected orthogonally
    to it (index `j ≥ 1`: `r̃_j = r_j − (r_j·ĉ)ĉ` for the random tangent `r_j` of
    index `j − 1`). Each chunk draws and projects its own, so that the exploration
    directions are never stored all at once (k parameter-sized buffers)."""

    seeds: Int[Array, " k"]
    lead: PyTree
    random: Tangents

    def _random_seeds(self, seeds: Int[Array, " c"]) -> PyTree:
        # Index 0 (the candidate) draws random tangent 0 as well, and drops it.
        index = jnp.maximum(seeds - 1, 0)
        return jax.tree.map(lambda s: s[index], self.random.seeds)

    def draw(self, seeds: Int[Array, " c"]) -> PyTree:
        directions = self.random.draw(self._random_seeds(seeds))
        overlaps = jax.vmap(lambda r: jnp.asarray(optax.tree.vdot(r, self.lead)))(
            directions
        )

        def project(u, r):
            shape = (-1,) + (1,) * u.ndim
            projected = r - overlaps.astype(r.dtype).reshape(shape) * u[None]
            return jnp.where((seeds == 0).reshape(shape), u[None], projected)

        return jax.tree.map(project, self.lead, directions)

    def weights(self, seeds: Int[Array, " c"]) -> Float[Array, " c"]:
        random = self.random.weights(self._random_seeds(seeds))
        return jnp.where(seeds == 0, 1, random).astype(widest_float())


def explored_tangents(
    primal: PyTree,
    candidate: PyTree,
    *,
    key: PRNGKeyArray | None,
    num_directions: int,
    sampler: str,
    mode: str,
) -> Tangents:
    """The unit candidate `ĉ` and `num_directions − 1` random directions projected
    orthogonally to it, `r̃_j = r_j − (r_j·ĉ)ĉ` (`ExploredTangents`).

    The estimate `(g·ĉ)ĉ + w Σ_j (g·r̃_j)r̃_j` (`w = 1/(k−1)` averaged, 1 for the
    parts of one direction) has mean `g` for any candidate, because
    `E[r̃ r̃ᵀ] = I − ĉĉᵀ` completes `ĉĉᵀ` to the identity, and its dot product with
    `g` is a sum of squares: a descent direction.
    """
    if num_directions > 1 and not jax.tree.leaves(primal):
        # No live leaf (the loss uses none of them): nothing to draw; the estimate
        # is the empty tree, as with one direction and as `eqx.filter_grad` gives.
        return fixed_tangents(primal, jnp.ones((num_directions,), widest_float()))
    lead = unit(candidate)
    if num_directions == 1:
        stacked = jax.tree.map(lambda u: u[None], lead)
        return fixed_tangents(stacked, jnp.ones((1,), widest_float()))
    assert key is not None
    random = random_tangents(key, primal, num_directions - 1, sampler, mode)
    return ExploredTangents(jnp.arange(num_directions, dtype=jnp.int32), lead, random)


def weighted_sum(tangents: PyTree, coefficients: Float[Array, " c"]) -> PyTree:
    """`Σ_j c_j t_j` over the leading axis, summed in at least float32 so that
    low-precision leaves lose no more than the one final rounding."""

    def leaf_sum(t):
        dtype = accumulation_dtype(t)
        return jnp.tensordot(coefficients.astype(dtype), t.astype(dtype), axes=1)

    return jax.tree.map(leaf_sum, tangents)
