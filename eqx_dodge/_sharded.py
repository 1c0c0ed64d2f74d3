"""Data-parallel (and model-parallel) DODGE over a `jax.sharding.Mesh`.

Every device draws the same random directions from the same replicated key, so the
only values that must cross the network at each step are the `k` directional
derivatives (and the loss): one all-reduce of `k + 1` floats, where data-parallel
backpropagation all-reduces a `p`-float gradient.
"""

import functools as ft
import math
from collections.abc import Callable, Hashable, Sequence, Set
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._directions import (
    check_num_parts,
    random_direction,
    random_directions,
    Sampler,
    trainable,
)
from ._estimator import (
    _accumulation_dtype,
    _as_value_and_aux,
    check_direction,
    check_random_options,
    Layout,
    Mode,
    value_and_estimate,
)
from ._filter import _check_source, _DodgeWrapper, check_first_argument_by_position


BatchReduction: TypeAlias = Literal["mean", "sum"]
_BATCH_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
AxisNames: TypeAlias = str | tuple[str, ...]

_sentinel: Any = object()


def _axis_tuple(axes: Hashable | Sequence[Hashable] | None) -> tuple[Hashable, ...]:
    if axes is None:
        return ()
    if isinstance(axes, tuple | list):
        return tuple(axes)
    return (axes,)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _spec_axes(spec: PartitionSpec) -> tuple[Hashable, ...]:
    """The mesh axes a `PartitionSpec` shards over, in the order it names them."""
    return tuple(axis for entry in spec for axis in _axis_tuple(entry))


def _shard_index(axes: tuple[Hashable, ...]) -> Array:
    """This device's position along `axes` (major to minor), as one int32 index."""
    index = jnp.zeros((), jnp.int32)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index


def _broadcast_specs(param_specs: Any, tree: PyTree) -> PyTree:
    """A `PartitionSpec` for every array leaf of `tree`, `None` at its other leaves.

    `param_specs` is one `PartitionSpec` for every leaf, or a PyTree prefix of
    `tree` with a `PartitionSpec` (or `None`, meaning replicated) at its leaves.
    """
    if param_specs is None:
        param_specs = PartitionSpec()

    def is_spec(x):
        return x is None or isinstance(x, PartitionSpec)

    def broadcast(spec, subtree):
        spec = PartitionSpec() if spec is None else spec
        return jax.tree.map(lambda leaf: spec if eqx.is_array(leaf) else None, subtree)

    try:
        return jax.tree.map(broadcast, param_specs, tree, is_leaf=is_spec)
    except ValueError as error:
        raise ValueError(
            "`param_specs` must be a `PartitionSpec`, or a PyTree prefix of the "
            "model (the first argument) with a `PartitionSpec` or `None` at its "
            f"leaves.\n{error}"
        ) from None


def _leaf_group(spec: PartitionSpec, mesh_axes: tuple[Hashable, ...]) -> tuple:
    named = set(_spec_axes(spec))
    return tuple(axis for axis in mesh_axes if axis in named)


class _ShardedLayout(Layout):
    """How the trainable leaves are laid out over the model axes of the mesh.

    Leaves sharded over the same set of mesh axes form a *group*. A group draws its
    directions from its own key, folded with the device's position along the group's
    axes: every shard gets an independent piece of the direction, and the devices
    that hold the same shard (the data-parallel replicas) draw the same piece.
    """

    groups: tuple[tuple[Hashable, ...], ...] = eqx.field(static=True)
    leaf_groups: tuple[int, ...] = eqx.field(static=True)
    leaf_specs: tuple[PartitionSpec, ...] = eqx.field(static=True)
    global_shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    @property
    def is_sharded(self) -> bool:
        return any(self.groups)

    def _group_tree(self, tree: PyTree, group: int) -> PyTree:
        leaves, treedef = jax.tree.flatten(tree)
        picked = [
            leaf if leaf_group == group else None
            for leaf, leaf_group in zip(leaves, self.leaf_groups)
        ]
        return jax.tree.unflatten(treedef, picked)

    def _group_key(self, key: PRNGKeyArray, group: int) -> PRNGKeyArray:
        group_key = jax.random.fold_in(key, group)
        return jax.random.fold_in(group_key, _shard_index(self.groups[group]))

    def directions(
        self,
        key: PRNGKeyArray,
        primal: PyTree,
        num_directions: int | None,
        sampler: Sampler,
        indices: Array | None = None,
    ) -> PyTree:
        """The local shard of one direction (`num_directions=None`) or of a stack."""
        if not self.is_sharded:
            # Replicated parameters draw exactly the single-device directions.
            return super().directions(key, primal, num_directions, sampler, indices)
        pieces = []
        for group in range(len(self.groups)):
            group_key = self._group_key(key, group)
            subtree = self._group_tree(primal, group)
            if num_directions is None:
                pieces.append(random_direction(group_key, subtree, sampler=sampler))
            else:
                pieces.append(
                    random_directions(
                        group_key, subtree, num_directions, sampler, indices
                    )
                )
        return eqx.combine(*pieces)

    def chunk_size(self, num_directions: int, primitives: Set[str]) -> int:
        # All k directions in one vectorised jvp, so that their derivatives cross
        # the network in a single all-reduce of k + 1 floats.
        del primitives
        return num_directions

    def squared_norm(self, tree: PyTree) -> Scalar:
        """`‖tree‖²` of the global (unsharded) tree, from the local shards."""
        dtype = _accumulation_dtype(tree)
        total = jnp.zeros((), dtype)
        for group, axes in enumerate(self.groups):
            local = sum(
                (
                    jnp.sum(jnp.square(leaf.astype(dtype)))
                    for leaf in jax.tree.leaves(self._group_tree(tree, group))
                ),
                start=jnp.zeros((), dtype),
            )
            total = total + (jax.lax.psum(local, axes) if axes else local)
        return total

    def check_num_parts(self, primal: PyTree, num_parts: int) -> None:
        del primal, num_parts  # checked on the global tree, before `shard_map`

    def part_indices(self, primal: PyTree, num_parts: int) -> PyTree:
        """Like `_directions._part_indices`, but for the local shard of each leaf: the
        blocks are contiguous slices of the *global* coordinates in leaf order."""
        leaves, treedef = jax.tree.flatten(primal)
        total = sum(math.prod(shape) for shape in self.global_shapes)
        indices = []
        offset = 0
        for leaf, spec, global_shape in zip(
            leaves, self.leaf_specs, self.global_shapes
        ):
            flat = jnp.zeros(leaf.shape, jnp.int32)
            entries = tuple(spec) + (None,) * (leaf.ndim - len(spec))
            for dim, entry in enumerate(entries):
                start = _shard_index(_axis_tuple(entry)) * leaf.shape[dim]
                position = start + jax.lax.broadcasted_iota(jnp.int32, leaf.shape, dim)
                flat = flat * global_shape[dim] + position
            flat = offset + flat
            # int64 is unavailable without x64, so keep i·k below 2³¹.
            if total * num_parts < 2**31:
                part = (flat * num_parts) // total
            else:
                scale = num_parts / total
                part = (flat.astype(jnp.float32) * scale).astype(jnp.int32)
            indices.append(part)
            offset += math.prod(global_shape)
        return jax.tree.unflatten(treedef, indices)


def _make_layout(
    diff_specs: PyTree, diff: PyTree, mesh: Mesh, data_axes: tuple[str, ...]
) -> _ShardedLayout:
    specs = jax.tree.leaves(diff_specs, is_leaf=_is_spec)
    leaves = jax.tree.leaves(diff)
    mesh_axes = tuple(mesh.axis_names)
    groups: list[tuple] = [()]
    leaf_groups = []
    for spec, leaf in zip(specs, leaves):
        axes = _spec_axes(spec)
        if set(axes) & set(data_axes):
            raise ValueError(
                f"`param_specs` shards a parameter of shape {leaf.shape} over the "
                f"data axis {data_axes} ({spec}); parameters must be replicated over "
                "the data axes (sharding them too, as in FSDP, is not supported)."
            )
        if len(spec) > leaf.ndim:
            raise ValueError(
                f"`param_specs` gives {spec} for a parameter of shape {leaf.shape}."
            )
        group = _leaf_group(spec, mesh_axes)
        if group not in groups:
            groups.append(group)
        leaf_groups.append(groups.index(group))
    return _ShardedLayout(
        tuple(groups),
        tuple(leaf_groups),
        tuple(specs),
        tuple(tuple(leaf.shape) for leaf in leaves),
    )


class _ShardedValueAndDodgeWrapper(eqx.Module):
    _fun: Callable
    _mesh: Mesh = eqx.field(static=True)
    _data_axes: tuple[str, ...] = eqx.field(static=True)
    _param_specs: Any
    _key: PRNGKeyArray | None
    _direction: PyTree | None
    _num_directions: int = eqx.field(static=True)
    _sampler: Sampler = eqx.field(static=True)
    _mode: Mode = eqx.field(static=True)
    _has_aux: bool = eqx.field(static=True)
    _batch_reduction: BatchReduction = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return self._fun

    def _reduce(self, value: Array) -> Array:
        if self._batch_reduction == "mean":
            return jax.lax.pmean(value, self._data_axes)
        return jax.lax.psum(value, self._data_axes)

    def __call__(self, *args, **kwargs):
        check_first_argument_by_position(
            args, kwargs, "sharded_{dodge, value_and_dodge}"
        )
        model, *batch = args
        num_shards = math.prod(self._mesh.shape[axis] for axis in self._data_axes)
        dynamic_model, static_model = eqx.partition(model, eqx.is_array)
        dynamic_batch, static_batch = eqx.partition(batch, eqx.is_array)
        dynamic_kwargs, static_kwargs = eqx.partition(kwargs, eqx.is_array)
        for path, leaf in jax.tree_util.tree_leaves_with_path(dynamic_batch):
            if leaf.ndim == 0 or leaf.shape[0] % num_shards != 0:
                raise ValueError(
                    f"Positional argument {path[0].idx + 1} (a batch) holds an array "
                    f"of shape {leaf.shape} at {jax.tree_util.keystr(path[1:])}; "
                    "every array after the first argument is split along its "
                    "leading axis over the data axes "
                    f"{self._data_axes}, so that axis must be a multiple of "
                    f"{num_shards}. Pass per-step constants as keyword arguments "
                    "(they are replicated)."
                )

        model_specs = _broadcast_specs(self._param_specs, model)
        diff = trainable(model)
        diff_specs = jax.tree.map(
            lambda spec, leaf: spec if eqx.is_inexact_array(leaf) else None,
            model_specs,
            model,
            is_leaf=lambda x: x is None or _is_spec(x),
        )
        layout = _make_layout(diff_specs, diff, self._mesh, self._data_axes)
        if self._key is not None and self._mode == "partition":
            check_num_parts(diff, self._num_directions)
        if self._direction is not None:
            check_direction(self._direction, diff)

        model_leaves, model_treedef = jax.tree.flatten(dynamic_model)
        batch_leaves, batch_treedef = jax.tree.flatten(dynamic_batch)
        kwargs_leaves, kwargs_treedef = jax.tree.flatten(dynamic_kwargs)
        direction_leaves, direction_treedef = jax.tree.flatten(self._direction)
        key_leaves = [] if self._key is None else [self._key]
        estimate_treedef = jax.tree.structure(diff)
        estimate_specs = jax.tree.leaves(diff_specs, is_leaf=_is_spec)
        data_spec = PartitionSpec(self._data_axes)
        aux_treedef = []

        def body(
            key_leaves, model_leaves, direction_leaves, batch_leaves, kwargs_leaves
        ):
            local_model = eqx.combine(
                jax.tree.unflatten(model_treedef, model_leaves), static_model
            )
            local_batch = eqx.combine(
                jax.tree.unflatten(batch_treedef, batch_leaves), static_batch
            )
            local_kwargs = eqx.combine(
                jax.tree.unflatten(kwargs_treedef, kwargs_leaves), static_kwargs
            )
            direction = jax.tree.unflatten(direction_treedef, direction_leaves)
            key = key_leaves[0] if key_leaves else None
            diff_model, nondiff_model = eqx.partition(local_model, eqx.is_inexact_array)
            local_value_and_aux = _as_value_and_aux(
                lambda _diff: self._fun(
                    eqx.combine(_diff, nondiff_model), *local_batch, **local_kwargs
                ),
                self._has_aux,
            )

            def global_value_and_aux(_diff):
                # The all-reduce sits inside the differentiated function, so its jvp
                # is the all-reduce of the k local directional derivatives: one
                # collective of k + 1 floats, and never a parameter-sized one.
                value, aux = local_value_and_aux(_diff)
                return self._reduce(value), aux

            value, estimate, aux = value_and_estimate(
                global_value_and_aux,
                diff_model,
                key=key,
                direction=direction,
                num_directions=self._num_directions,
                sampler=self._sampler,
                mode=self._mode,
                has_aux=True,
                layout=layout,
            )
            aux_leaves, treedef = jax.tree.flatten(aux)
            aux_treedef.append(treedef)
            # Each data shard has its own `aux`: stack them along a new leading axis.
            aux_leaves = [jnp.expand_dims(leaf, 0) for leaf in aux_leaves]
            return value, jax.tree.leaves(estimate), aux_leaves

        inputs = (
            key_leaves,
            model_leaves,
            direction_leaves,
            batch_leaves,
            kwargs_leaves,
        )
        in_specs = (
            [PartitionSpec()] * len(key_leaves),
            jax.tree.leaves(model_specs, is_leaf=_is_spec),
            estimate_specs if self._direction is not None else [],
            [data_spec] * len(batch_leaves),
            [PartitionSpec()] * len(kwargs_leaves),
        )
        if all(kind == AxisType.Explicit for kind in self._mesh.axis_types):
            # With explicit axes, `shard_map` requires every input to be laid out
            # as its spec says already; with auto axes it moves them itself. Do the
            # same here (a no-op for inputs that are already in place).
            inputs = jax.tree.map(
                lambda leaf, spec: jax.sharding.reshard(
                    leaf, NamedSharding(self._mesh, spec)
                ),
                inputs,
                in_specs,
                is_leaf=_is_spec,
            )
        mapped = jax.shard_map(
            body,
            mesh=self._mesh,
            in_specs=in_specs,
            out_specs=(PartitionSpec(), estimate_specs, data_spec),
        )
        value, estimate_leaves, aux_leaves = mapped(*inputs)
        estimate = jax.tree.unflatten(estimate_treedef, estimate_leaves)
        if self._has_aux:
            aux = jax.tree.unflatten(aux_treedef[-1], aux_leaves)
            return (value, aux), estimate
        return value, estimate

    def __get__(self, instance, owner):
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


def _check_data_axes(mesh: Any, data_axis: Any) -> tuple[str, ...]:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}."
        )
    data_axes = _axis_tuple(data_axis)
    if not data_axes:
        raise ValueError("`data_axis` must name at least one axis of `mesh`.")
    for axis in data_axes:
        if axis not in mesh.axis_names:
            raise ValueError(
                f"`data_axis` names {axis!r}, which is not an axis of `mesh` "
                f"(its axes are {mesh.axis_names})."
            )
    return tuple(str(axis) for axis in data_axes)


def sharded_value_and_dodge(
    fun: Callable = _sentinel,
    *,
    mesh: Mesh,
    data_axis: AxisNames = "data",
    param_specs: PyTree | None = None,
    key: PRNGKeyArray | None = None,
    direction: PyTree | None = None,
    num_directions: int = 1,
    sampler: Sampler = "rademacher",
    mode: Mode = "average",
    has_aux: bool = False,
    batch_reduction: BatchReduction = "mean",
) -> Callable:
    r"""[`eqx_dodge.filter_value_and_dodge`][], data-parallel over a device mesh.

    The returned function takes `(model, *batch, **kwargs)`, like `fun`. It runs
    `fun` under `jax.shard_map`: every array in `batch` is split along its leading
    axis over the data axes of `mesh`, the model and the keyword arguments are
    replicated, and each device

    1. draws the same `k` random directions from the same (replicated) `key`;
    2. computes the loss of its batch shard and the `k` directional derivatives in
        one forward pass (`jax.jvp`, vectorised over the directions);
    3. all-reduces the loss and the `k` derivatives, **one collective of `k + 1`
        floats**, where data-parallel backpropagation all-reduces `p` floats;
    4. forms the estimate $\frac1k\sum_j d_j u_j$ (or the partition sum) locally,
        identical on every device.

    The all-reduce is applied to the loss *inside* the differentiated function:
    $L = \operatorname{mean}_s L_s$ over the data shards $s$, whose directional
    derivative is $\operatorname{mean}_s (\nabla L_s \cdot u)$. So the result equals
    `filter_value_and_dodge(fun, key=key, ...)(model, *full_batch)` on one device,
    same directions and all, up to floating-point rounding.

    !!! tip "Means and sums"

        `batch_reduction="mean"` (the default) combines the shard losses with
        `jax.lax.pmean`: right when `fun` returns a **mean** over the examples of its
        batch and the shards are equal (they are: the leading axis must divide
        evenly). If `fun` returns a **sum** over examples, use
        `batch_reduction="sum"` (`jax.lax.psum`). For anything else (e.g. a mean
        over unmasked tokens, whose count differs between shards), return the
        shard's sum divided by the *global* count and use `"sum"`.

    **Model parallelism.** `param_specs` may shard parameters over the other
    (model) axes of `mesh`, e.g. `PartitionSpec(None, "model")` for a weight split
    by columns. `fun` then runs on the local shards of those parameters, exactly as
    any `jax.shard_map` code does: it must do its own model-axis collectives (e.g.
    `jax.lax.psum(h @ w2, "model")` after a row-split layer) and return a loss that
    is the same on every model shard. The directions are drawn shard by shard: each
    group of leaves sharded over the same mesh axes gets the key
    `fold_in(fold_in(key, group), shard position)`, so shards get independent
    pieces of the direction, every data-parallel replica of a shard draws the same
    piece, and neither the directions nor the estimate are ever gathered. The
    estimate comes back sharded like the parameters. With sharded parameters the
    directions differ from the single-device ones for the same key (they have the
    same distribution); `mode="partition"` still splits the *global* coordinates,
    flattened in leaf order, into `k` contiguous blocks.

    **Arguments:**

    - `fun`: a pure function `fun(model, *batch, **kwargs)` returning a scalar loss
        averaged over its batch (or `(loss, aux)` when `has_aux=True`). Its first
        argument is differentiated (its floating-point array leaves).
    - `mesh`: the `jax.sharding.Mesh` to run on.
    - `data_axis`: the name of the mesh axis (or a tuple of names) the batch is
        split over; the loss and the derivatives are all-reduced over it.
    - `param_specs`: how the model is laid out over the mesh: `None` (replicated,
        pure data parallelism), one `PartitionSpec` for every array leaf, or a PyTree
        prefix of the model with a `PartitionSpec` (or `None`) at its leaves. It may
        not name a data axis.
    - `key`: a PRNG key for random directions (replicated). Use a fresh key at every
        step.
    - `direction`: a candidate direction, instead of `key`, laid out like the
        parameters.
    - `num_directions`: the number `k` of random directions.
    - `sampler`: `"rademacher"` or `"gaussian"`.
    - `mode`: `"average"` or `"partition"`, as in
        [`eqx_dodge.filter_value_and_dodge`][].
    - `has_aux`: if `True`, `fun` returns `(value, aux)`.
    - `batch_reduction`: `"mean"` or `"sum"`: how the losses of the data shards
        combine into the loss of the whole batch.

    **Returns:**

    A function with the same arguments as `fun` returning `(value, estimate)`, or
    `((value, aux), estimate)` when `has_aux=True`. `value` is the loss of the whole
    batch (replicated). The estimate has the structure of the model with `None` at
    its non-floating-point leaves, replicated or sharded like the parameters. Each
    array leaf of `aux` gains a leading axis, one entry per data shard.

    Call it inside `jax.jit` / `eqx.filter_jit` with the batch already sharded over
    the data axis (`jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))`)
    so that no data moves between devices either.

    !!! example

        ```python
        mesh = jax.make_mesh((jax.device_count(),), ("data",))

        @eqx.filter_jit
        def step(model, opt_state, x, y, key):
            loss, estimate = eqx_dodge.sharded_value_and_dodge(
                loss_fn, mesh=mesh, key=key, num_directions=8
            )(model, x, y)
            updates, opt_state = optimizer.update(estimate, opt_state, model)
            return eqx.apply_updates(model, updates), opt_state, loss
        ```
    """
    if fun is _sentinel:
        return ft.partial(
            sharded_value_and_dodge,
            mesh=mesh,
            data_axis=data_axis,
            param_specs=param_specs,
            key=key,
            direction=direction,
            num_directions=num_directions,
            sampler=sampler,
            mode=mode,
            has_aux=has_aux,
            batch_reduction=batch_reduction,
        )
    check_random_options(num_directions, sampler, mode)
    _check_source(key, direction, num_directions, mode)
    if not callable(fun):
        raise TypeError(f"`fun` must be callable, got {type(fun).__name__}.")
    data_axes = _check_data_axes(mesh, data_axis)
    if batch_reduction not in _BATCH_REDUCTIONS:
        raise ValueError(
            f"`batch_reduction` must be one of {_BATCH_REDUCTIONS}, got "
            f"{batch_reduction!r}."
        )
    wrapper = _ShardedValueAndDodgeWrapper(
        fun,
        mesh,
        data_axes,
        param_specs,
        key,
        direction,
        num_directions,
        sampler,
        mode,
        has_aux,
        batch_reduction,
    )
    return eqx.module_update_wrapper(wrapper)


def sharded_dodge(
    fun: Callable = _sentinel,
    *,
    mesh: Mesh,
    data_axis: AxisNames = "data",
    param_specs: PyTree | None = None,
    key: PRNGKeyArray | None = None,
    direction: PyTree | None = None,
    num_directions: int = 1,
    sampler: Sampler = "rademacher",
    mode: Mode = "average",
    has_aux: bool = False,
    batch_reduction: BatchReduction = "mean",
) -> Callable:
    """[`eqx_dodge.filter_dodge`][], data-parallel over a device mesh.

    Returns only the estimate (and `aux` when `has_aux=True`); see
    [`eqx_dodge.sharded_value_and_dodge`][] for how it runs and for the arguments,
    which are the same here.

    **Arguments:**

    - `fun`: the loss, `fun(model, *batch, **kwargs)`.
    - `mesh`, `data_axis`, `param_specs`: the device mesh, the axis (or axes) the
        batch is split over, and the layout of the parameters.
    - `key` / `direction`, `num_directions`, `sampler`, `mode`, `has_aux`: as in
        [`eqx_dodge.filter_dodge`][].
    - `batch_reduction`: `"mean"` or `"sum"`.

    **Returns:**

    A function with the same arguments as `fun` returning the estimate, or
    `(estimate, aux)` when `has_aux=True`.
    """
    if fun is _sentinel:
        return ft.partial(
            sharded_dodge,
            mesh=mesh,
            data_axis=data_axis,
            param_specs=param_specs,
            key=key,
            direction=direction,
            num_directions=num_directions,
            sampler=sampler,
            mode=mode,
            has_aux=has_aux,
            batch_reduction=batch_reduction,
        )
    value_and_dodge = sharded_value_and_dodge(
        fun,
        mesh=mesh,
        data_axis=data_axis,
        param_specs=param_specs,
        key=key,
        direction=direction,
        num_directions=num_directions,
        sampler=sampler,
        mode=mode,
        has_aux=has_aux,
        batch_reduction=batch_reduction,
    )
    return eqx.module_update_wrapper(_DodgeWrapper(value_and_dodge, has_aux))
