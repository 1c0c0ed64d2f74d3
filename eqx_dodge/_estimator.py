"""The DODGE estimator shared by the function wrappers and the optax transforms.

Everything here works on `primal`, the PyTree of trainable (inexact-array) leaves, and
on `fun(primal) -> (value, aux)`, a function of those leaves alone.
"""

from collections.abc import Callable
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
    split_into_parts,
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
    ) -> PyTree:
        """One direction (`num_directions=None`) or a stack of them."""
        if num_directions is None:
            return random_direction(key, primal, sampler=sampler)
        return random_directions(key, primal, num_directions, sampler)

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
        value, derivatives, aux = directional_derivatives(
            fun,
            primal,
            split_into_parts(base, part_indices, num_directions),
            has_aux=has_aux,
            stacked=True,
        )
        # Coordinate i lies in exactly one part j, so Σ_j d_j u_j(i) = d_{j(i)} u(i):
        # a gather instead of a k-fold sum over mostly-zero parts.
        estimate = jax.tree.map(
            lambda u, part: _scale(u, derivatives[part]), base, part_indices
        )
        return value, estimate, aux

    tangents = layout.directions(key, primal, num_directions, sampler)
    value, derivatives, aux = directional_derivatives(
        fun, primal, tangents, has_aux=has_aux, stacked=True
    )
    weights = derivatives / num_directions
    estimate = jax.tree.map(
        lambda u: jnp.tensordot(weights.astype(u.dtype), u, axes=1), tangents
    )
    return value, estimate, aux
