"""How trainable leaves lie over a `jax.sharding.Mesh`: where each device draws its
piece of a direction, sums norms and assigns partition blocks."""

import math
from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._directions import (
    accumulation_dtype,
    largest_magnitude,
    part_of,
    sample_direction,
    squared_norm,
)
from ._tangents import Layout


def axis_tuple(axes: Hashable | Sequence[Hashable] | None) -> tuple[Hashable, ...]:
    if axes is None:
        return ()
    if isinstance(axes, tuple | list):
        return tuple(axes)
    return (axes,)


def is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _spec_axes(spec: PartitionSpec) -> tuple[Hashable, ...]:
    """The mesh axes a `PartitionSpec` shards over, in the order it names them."""
    return tuple(axis for entry in spec for axis in axis_tuple(entry))


def _shard_index(axes: tuple[Hashable, ...]) -> Array:
    """This device's position along `axes` (major to minor), as one int32 index."""
    index = jnp.zeros((), jnp.int32)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index


def broadcast_specs(param_specs: Any, tree: PyTree) -> PyTree:
    """A `PartitionSpec` for every array leaf of `tree`, `None` at its other leaves.

    `param_specs` is one `PartitionSpec` for every leaf, or a PyTree prefix of
    `tree` with a `PartitionSpec` (or `None`, meaning replicated) at its leaves.
    """
    if param_specs is None:
        param_specs = PartitionSpec()

    def broadcast(spec, subtree):
        spec = PartitionSpec() if spec is None else spec
        return jax.tree.map(lambda leaf: spec if eqx.is_array(leaf) else None, subtree)

    try:
        return jax.tree.map(
            broadcast, param_specs, tree, is_leaf=lambda x: x is None or is_spec(x)
        )
    except ValueError as error:
        raise ValueError(
            "`param_specs` must be a `PartitionSpec`, or a PyTree prefix of the "
            "model (the first argument) with a `PartitionSpec` or `None` at its "
            f"leaves.\n{error}"
        ) from None


class ShardedLayout(Layout):
    """How the trainable leaves are laid out over the model axes of the mesh.

    Leaves sharded over the same set of mesh axes form a *group*. A group draws its
    piece of a direction from the direction's key folded with the group and with the
    device's position along the group's axes: every shard gets an independent piece,
    and the devices that hold the same shard (the data-parallel replicas) draw the
    same piece.
    """

    groups: tuple[tuple[Hashable, ...], ...] = eqx.field(static=True)
    leaf_groups: tuple[int, ...] = eqx.field(static=True)
    leaf_specs: tuple[PartitionSpec, ...] = eqx.field(static=True)
    global_shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    def _group_tree(self, tree: PyTree, group: int) -> PyTree:
        leaves, treedef = jax.tree.flatten(tree)
        picked = [
            leaf if leaf_group == group else None
            for leaf, leaf_group in zip(leaves, self.leaf_groups)
        ]
        return jax.tree.unflatten(treedef, picked)

    def direction(self, key: PRNGKeyArray, primal: PyTree, sampler: str) -> PyTree:
        if not any(self.groups):
            # Replicated parameters draw exactly the single-device directions.
            return sample_direction(key, primal, sampler)
        pieces = []
        for group, axes in enumerate(self.groups):
            group_key = jax.random.fold_in(key, group)
            group_key = jax.random.fold_in(group_key, _shard_index(axes))
            subtree = self._group_tree(primal, group)
            pieces.append(sample_direction(group_key, subtree, sampler))
        return eqx.combine(*pieces)

    def chunk_size(self, num_directions: int) -> int:
        # All k directions in one vectorised jvp, so that their derivatives cross
        # the network in a single all-reduce of k + 1 floats.
        return num_directions

    def squared_norm(self, tree: PyTree) -> Scalar:
        """`‖tree‖²` of the global (unsharded) tree, from the local shards."""
        total = jnp.zeros((), accumulation_dtype(tree))
        for group, axes in enumerate(self.groups):
            local = squared_norm(self._group_tree(tree, group))
            total = total + (jax.lax.psum(local, axes) if axes else local)
        return total

    def largest_magnitude(self, tree: PyTree) -> Scalar:
        """`max |x|` of the global (unsharded) tree, from the local shards."""
        largest = jnp.zeros((), accumulation_dtype(tree))
        for group, axes in enumerate(self.groups):
            local = largest_magnitude(self._group_tree(tree, group))
            largest = jnp.maximum(largest, jax.lax.pmax(local, axes) if axes else local)
        return largest

    def restrict(self, mask: tuple[bool, ...]) -> "ShardedLayout":
        def kept(values: tuple) -> tuple:
            return tuple(value for value, live in zip(values, mask) if live)

        return ShardedLayout(
            self.groups,
            kept(self.leaf_groups),
            kept(self.leaf_specs),
            kept(self.global_shapes),
        )

    def num_coordinates(self, primal: PyTree) -> int:
        del primal  # local shards: the global shapes count the coordinates
        return sum(math.prod(shape) for shape in self.global_shapes)

    def positions(self, primal: PyTree) -> PyTree:
        """The flat index of every coordinate of the local shard of each leaf among
        the *global* coordinates in leaf order, as on one device."""
        leaves, treedef = jax.tree.flatten(primal)
        indices = []
        offset = 0
        for leaf, spec, shape in zip(leaves, self.leaf_specs, self.global_shapes):
            position = jnp.zeros(leaf.shape, jnp.int32)
            entries = tuple(spec) + (None,) * (leaf.ndim - len(spec))
            for dim, entry in enumerate(entries):
                start = _shard_index(axis_tuple(entry)) * leaf.shape[dim]
                index = start + jax.lax.broadcasted_iota(jnp.int32, leaf.shape, dim)
                position = position * shape[dim] + index
            indices.append(offset + position)
            offset += math.prod(shape)
        return jax.tree.unflatten(treedef, indices)

    def part_indices(self, primal: PyTree, num_parts: int) -> PyTree:
        """The parts of the local shard of each leaf: contiguous blocks of the
        *global* coordinates in leaf order, as on one device."""
        total = self.num_coordinates(primal)
        return jax.tree.map(
            lambda position: part_of(position, total, num_parts),
            self.positions(primal),
        )


def make_layout(
    diff_specs: PyTree, diff: PyTree, mesh: Mesh, data_axes: tuple[str, ...]
) -> ShardedLayout:
    specs = jax.tree.leaves(diff_specs, is_leaf=is_spec)
    leaves = jax.tree.leaves(diff)
    groups: list[tuple] = [()]
    leaf_groups = []
    for spec, leaf in zip(specs, leaves):
        named = set(_spec_axes(spec))
        if named & set(data_axes):
            raise ValueError(
                f"`param_specs` shards a parameter of shape {leaf.shape} over the "
                f"data axis {data_axes} ({spec}); parameters must be replicated over "
                "the data axes (sharding them too, as in FSDP, is not supported)."
            )
        if len(spec) > leaf.ndim:
            raise ValueError(
                f"`param_specs` gives {spec} for a parameter of shape {leaf.shape}."
            )
        group = tuple(axis for axis in mesh.axis_names if axis in named)
        if group not in groups:
            groups.append(group)
        leaf_groups.append(groups.index(group))
    return ShardedLayout(
        tuple(groups),
        tuple(leaf_groups),
        tuple(specs),
        tuple(tuple(leaf.shape) for leaf in leaves),
    )
