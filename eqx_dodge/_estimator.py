"""The DODGE estimator shared by the function wrappers and the optax transforms.

Everything here works on `primal`, the PyTree of trainable (inexact-array) leaves, and
on `fun(primal) -> (value, aux)`, a function of those leaves alone.
"""

from collections.abc import Callable, Set
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._directions import (
    _part_indices,
    check_num_parts,
    check_sampler,
    random_direction,
    random_directions,
)


Mode: TypeAlias = str  # one of MODES; see `Sampler` for why not a `Literal`
MODES: tuple[str, ...] = ("average", "partition")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")


def check_num_directions(num_directions: int) -> None:
    if isinstance(num_directions, bool) or not isinstance(num_directions, int):
        raise TypeError(
            f"`num_directions` must be a Python int, got {num_directions!r}."
        )
    if num_directions < 1:
        raise ValueError(f"`num_directions` must be at least 1, got {num_directions}.")


def check_random_options(num_directions: int, sampler: str, mode: str) -> None:
    check_num_directions(num_directions)
    check_sampler(sampler)
    check_mode(mode)


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
    for path_leaf, primal_leaf in zip(
        jax.tree_util.tree_leaves_with_path(direction), jax.tree.leaves(primal)
    ):
        path, leaf = path_leaf
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if shape != primal_leaf.shape or dtype != primal_leaf.dtype:
            raise ValueError(
                f"`{name}` leaf at {jax.tree_util.keystr(path)} has shape {shape} "
                f"and dtype {dtype}; the model's leaf there has shape "
                f"{primal_leaf.shape} and dtype {primal_leaf.dtype}."
            )


def _accumulation_dtype(tree: PyTree) -> Any:
    # Norms of half-precision leaves are accumulated in float32 (float64 when a leaf
    # is float64); stated explicitly because strict promotion has no common type for
    # float16 and bfloat16.
    wide = any(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(tree))
    return jnp.float64 if wide else jnp.float32


class Layout(eqx.Module):
    """Where the trainable leaves live: how directions are drawn, norms summed and
    partition blocks assigned. This one is for leaves held whole on one device;
    `_sharded.py` has one for leaves split over the devices of a mesh."""

    def directions(
        self,
        key: PRNGKeyArray,
        primal: PyTree,
        num_directions: int | None,
        sampler: str,
        indices: Array | None = None,
    ) -> PyTree:
        """One direction (`num_directions=None`), or directions `indices` (all by
        default) of the stack of `num_directions`."""
        if num_directions is None:
            return random_direction(key, primal, sampler=sampler)
        return random_directions(key, primal, num_directions, sampler, indices)

    def squared_norm(self, tree: PyTree) -> Scalar:
        dtype = _accumulation_dtype(tree)
        return sum(
            (jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jax.tree.leaves(tree)),
            start=jnp.zeros((), dtype),
        )

    def part_indices(self, primal: PyTree, num_parts: int) -> PyTree:
        return _part_indices(primal, num_parts)

    def check_num_parts(self, primal: PyTree, num_parts: int) -> None:
        check_num_parts(primal, num_parts)

    def chunk_size(self, num_directions: int, primitives: Set[str]) -> int:
        """How many of the k directions one vectorised jvp carries; see `_CPU_CHUNK`."""
        return _chunk_size(num_directions, primitives)


SINGLE_DEVICE = Layout()


def unit_direction(candidate: PyTree, layout: Layout = SINGLE_DEVICE) -> PyTree:
    """`candidate / ‖candidate‖`, and zeros (not NaN) for a zero candidate."""
    squared_norm = layout.squared_norm(candidate)
    positive = squared_norm > 0
    inverse_norm = jnp.where(
        positive, jax.lax.rsqrt(jnp.where(positive, squared_norm, 1)), 0
    )
    return jax.tree.map(
        lambda leaf: (leaf.astype(squared_norm.dtype) * inverse_norm).astype(
            leaf.dtype
        ),
        candidate,
    )


def _as_value_and_aux(
    fun: Callable[[PyTree], Any], has_aux: bool
) -> Callable[[PyTree], tuple[Array, Any]]:
    def value_and_aux(primal):
        out = fun(primal)
        value, aux = out if has_aux else (out, None)
        if not isinstance(value, jax.Array | float) or jnp.shape(value) != ():
            raise TypeError(
                "`fun` must return a scalar (a float or a 0-d floating array)"
                + (
                    " as the first element of its `(value, aux)` pair"
                    if has_aux
                    else ""
                )
                + f", got {type(value).__name__} of shape {jnp.shape(value)}."
            )
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(
                f"`fun` must return a floating-point scalar, got dtype "
                f"{jnp.result_type(value)}."
            )
        return jnp.asarray(value), aux

    return value_and_aux


def directional_derivatives(
    fun: Callable[[PyTree], Any],
    primal: PyTree,
    tangents: PyTree,
    *,
    has_aux: bool,
    stacked: bool,
) -> tuple[Scalar, Array, Any]:
    """One forward pass that returns `(value, d, aux)` with `d = ∇fun·tangent`.

    With `stacked=True` the tangents carry a leading axis of size k and `d` has shape
    `(k,)`; the primal is not batched, so under `vmap` it is computed only once.
    """
    value_and_aux = _as_value_and_aux(fun, has_aux)

    def jvp(tangent):
        return jax.jvp(value_and_aux, (primal,), (tangent,), has_aux=True)

    if stacked:
        value, derivatives, aux = jax.vmap(jvp, out_axes=(None, 0, None))(tangents)
    else:
        value, derivative, aux = jvp(tangents)
        derivatives = derivative[None]
    return value, derivatives, aux


def _scale(tangent: Array, derivative: Array) -> Array:
    return derivative.astype(tangent.dtype) * tangent


# On XLA:CPU, k directions cost less when run a few at a time, one chunk after
# another, than all at once in one `vmap`: the k tangents of the parameters and of
# every activation no longer spill out of the caches, and the peak memory drops from
# k tangents to `_CPU_CHUNK`. A `lax.scan` over the chunks keeps them sequential, but
# XLA:CPU runs convolutions inside a loop several times slower, so a loss with a
# convolution gets the chunks unrolled instead (at most `_MAX_CHUNKS` of them). A loss
# with a loop of its own (a recurrent model) keeps all k directions in one `vmap`:
# chunks would repeat its sequential steps with k/c times smaller matmuls. Measured
# in benchmarks/k_formulations.py; other backends keep one `vmap` over all k.
_CPU_CHUNK = 4
_MAX_CHUNKS = 16


def _primitives(fun: Callable[[PyTree], Any], primal: PyTree) -> set[str]:
    """The names of the primitives in `fun`, nested ones included."""
    names: set[str] = set()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fun)(primal).jaxpr)
    return names


def _chunk_size(num_directions: int, primitives: Set[str] = frozenset()) -> int:
    if jax.default_backend() != "cpu" or primitives & {"scan", "while"}:
        return num_directions
    return max(_CPU_CHUNK, -(-num_directions // _MAX_CHUNKS))


def _in_chunks(
    fun: Callable[[PyTree], Any],
    primal: PyTree,
    num_directions: int,
    tangents_of: Callable[[Array], PyTree],
    combine: Callable[[PyTree, Array], PyTree],
    *,
    has_aux: bool,
    layout: "Layout",
) -> tuple[Scalar, Array, Any, PyTree]:
    """The k directional derivatives, `_chunk_size(k)` directions at a time.

    `tangents_of(indices)` stacks the tangents of the given direction indices and
    `combine(tangents, derivatives)` maps one chunk to a PyTree that is summed over
    the chunks. Returns `(value, derivatives, aux, sum)`.
    """
    primitives = _primitives(fun, primal) if num_directions > _CPU_CHUNK else set()
    chunk = layout.chunk_size(num_directions, primitives)
    # The first chunk holds the remainder, so every later chunk is full.
    first = num_directions - chunk * ((num_directions - 1) // chunk)
    rest = (num_directions - first) // chunk

    def run(indices):
        tangents = tangents_of(indices)
        value, derivatives, aux = directional_derivatives(
            fun, primal, tangents, has_aux=has_aux, stacked=True
        )
        return value, derivatives, aux, combine(tangents, derivatives)

    value, derivatives, aux, total = run(jnp.arange(first))
    if rest == 0:
        return value, derivatives, aux, total

    def body(total, indices):
        _, derivatives, _, part = run(indices)
        return jax.tree.map(jnp.add, total, part), derivatives

    indices = first + jnp.arange(rest * chunk).reshape(rest, chunk)
    if "conv_general_dilated" in primitives:
        # Unrolled by hand: `lax.scan(unroll=True)` over a single chunk still emits
        # a one-trip loop.
        chunks = []
        for chunk_indices in indices:
            total, chunk_derivatives = body(total, chunk_indices)
            chunks.append(chunk_derivatives)
        more = jnp.stack(chunks)
    else:
        total, more = jax.lax.scan(body, total, indices)
    return value, jnp.concatenate([derivatives, more.reshape(-1)]), aux, total


def value_and_estimate(
    fun: Callable[[PyTree], Any],
    primal: PyTree,
    *,
    key: PRNGKeyArray | None,
    direction: PyTree | None,
    num_directions: int,
    sampler: str,
    mode: str,
    has_aux: bool,
    layout: Layout = SINGLE_DEVICE,
) -> tuple[Scalar, PyTree, Any]:
    """Evaluates `fun(primal)` and its DODGE gradient estimate in one forward pass.

    Returns `(value, estimate, aux)`; the estimate has the structure of `primal`.
    """

    def along(tangent):
        value, derivatives, aux = directional_derivatives(
            fun, primal, tangent, has_aux=has_aux, stacked=False
        )
        return value, jax.tree.map(lambda u: _scale(u, derivatives[0]), tangent), aux

    if direction is not None:
        check_direction(direction, primal)
        return along(unit_direction(direction, layout))

    assert key is not None
    if mode == "partition":
        layout.check_num_parts(primal, num_directions)
    if num_directions == 1:
        # Both modes coincide; the direction is `random_direction(key, primal)`, the
        # one the paper's Listing 1 would draw from the same key.
        return along(layout.directions(key, primal, None, sampler))

    if mode == "partition":
        base = layout.directions(key, primal, None, sampler)
        part_indices = layout.part_indices(primal, num_directions)

        def parts(indices):
            # Parts `indices` of `base`, as `split_into_parts` would stack them.
            def part(j):
                return jax.tree.map(
                    lambda u, p: jnp.where(p == j, u, jnp.zeros((), u.dtype)),
                    base,
                    part_indices,
                )

            return jax.vmap(part)(indices)

        value, derivatives, aux, _ = _in_chunks(
            fun,
            primal,
            num_directions,
            parts,
            lambda tangents, derivatives: None,
            has_aux=has_aux,
            layout=layout,
        )
        # Coordinate i lies in exactly one part j, so Σ_j d_j u_j(i) = d_{j(i)} u(i):
        # a gather instead of a k-fold sum over mostly-zero parts.
        estimate = jax.tree.map(
            lambda u, part: _scale(u, derivatives[part]), base, part_indices
        )
        return value, estimate, aux

    def directions(indices):
        return layout.directions(key, primal, num_directions, sampler, indices)

    def weighted_sum(tangents, derivatives):
        weights = derivatives / num_directions

        def leaf_sum(u):
            # Sum the chunks in at least float32, so low-precision leaves lose no
            # more than the one final rounding.
            dtype = jnp.float32 if jnp.finfo(u.dtype).bits < 32 else u.dtype
            return jnp.tensordot(weights.astype(dtype), u.astype(dtype), axes=1)

        return jax.tree.map(leaf_sum, tangents)

    value, _, aux, estimate = _in_chunks(
        fun,
        primal,
        num_directions,
        directions,
        weighted_sum,
        has_aux=has_aux,
        layout=layout,
    )
    estimate = jax.tree.map(lambda e, p: e.astype(p.dtype), estimate, primal)
    return value, estimate, aux
