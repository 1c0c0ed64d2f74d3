"""Data-parallel (and model-parallel) DODGE over a `jax.sharding.Mesh`.

Every device draws the same random directions from the same replicated key, so the
only values that must cross the network at each step are the `k` directional
derivatives (and the loss): one all-reduce of `k + 1` floats, where data-parallel
backpropagation all-reduces a `p`-float gradient.
"""

import math
from collections.abc import Callable
from typing import Any, Required, Unpack

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._checks import (
    as_key,
    check_keywords,
    check_option,
    first_argument,
    loss_and_aux,
    REDUCTIONS,
)
from ._directions import check_direction, check_num_parts, num_coordinates, trainable
from ._estimator import value_and_estimate
from ._filter import (
    _DodgeWrapper,
    _sentinel,
    BatchWrapperMethods,
    estimator_options,
    EstimatorKeywords,
    EstimatorOptions,
    wrap,
)
from ._live import split_live
from ._sharded_layout import (
    axis_tuple,
    broadcast_specs,
    is_spec,
    make_layout,
    ShardedLayout,
)
from ._tangents import draw_tangents
from ._value_fn import call_loss


AxisNames = str | tuple[str, ...]


class ShardedKeywords(EstimatorKeywords, total=False):
    """The keyword arguments of both `sharded_*` besides `has_aux`."""

    mesh: Required[Mesh]
    data_axis: AxisNames
    param_specs: PyTree | None
    batch_reduction: str


def _check_batch(batch: PyTree, num_shards: int, data_axes: tuple[str, ...]) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        if leaf.ndim == 0 or leaf.shape[0] % num_shards != 0:
            location = jax.tree_util.keystr(path[1:])
            holds = f"holds an array of shape {leaf.shape} at {location}"
            raise ValueError(
                f"Positional argument {path[0].idx + 1} (a batch) "
                f"{holds if location else f'is an array of shape {leaf.shape}'}; "
                "every array after the first argument is split along its leading "
                f"axis over the data axes {data_axes}, so that axis must be a "
                f"multiple of {num_shards}. Pass per-step constants as keyword "
                "arguments (they are replicated)."
            )


def _laid_out(mesh: Mesh, leaves: list, specs: list) -> list:
    """With explicit mesh axes, `shard_map` requires every input to be laid out as
    its spec says already (with auto axes it moves them itself): reshard them, a
    no-op for inputs already in place."""
    if not all(kind == AxisType.Explicit for kind in mesh.axis_types):
        return leaves
    return [
        jax.sharding.reshard(leaf, NamedSharding(mesh, spec))
        for leaf, spec in zip(leaves, specs)
    ]


def _check_data_axes(mesh: Any, data_axis: Any) -> tuple[str, ...]:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}."
        )
    data_axes = axis_tuple(data_axis)
    if not data_axes:
        raise ValueError("`data_axis` must name at least one axis of `mesh`.")
    for axis in data_axes:
        if axis not in mesh.axis_names:
            raise ValueError(
                f"`data_axis` names {axis!r}, which is not an axis of `mesh` "
                f"(its axes are {mesh.axis_names})."
            )
    return tuple(str(axis) for axis in data_axes)


class _ShardedValueAndDodgeWrapper(BatchWrapperMethods):
    _fun: Callable
    _options: EstimatorOptions
    _mesh: Mesh = eqx.field(static=True)
    _data_axes: tuple[str, ...] = eqx.field(static=True)
    _param_specs: Any
    _batch_reduction: str = eqx.field(static=True)

    def __check_init__(self):
        check_option("batch_reduction", self._batch_reduction, REDUCTIONS)

    def _local(self, layout: ShardedLayout, key, direction, model, batch, kwargs):
        """One device's part. The all-reduce of the loss sits inside the
        differentiated function, so its jvp all-reduces the k local directional
        derivatives: one collective of k + 1 floats, never a parameter-sized one."""
        diff = trainable(model)
        rest = eqx.filter(model, eqx.is_inexact_array, inverse=True)
        reduce = jax.lax.pmean if self._batch_reduction == "mean" else jax.lax.psum

        def global_value(_diff):
            out = call_loss(self._fun, eqx.combine(_diff, rest), batch, kwargs)
            value, aux = loss_and_aux(out, "fun", self._options.has_aux)
            return reduce(value, self._data_axes), aux

        # The dead leaves are left out of the directions and of the layout alike.
        split = split_live(global_value, diff, has_aux=True)
        layout = layout.restrict(split.mask)
        tangents = draw_tangents(
            split.live,
            key=key,
            direction=None if direction is None else split.restrict(direction),
            num_directions=self._options.num_directions,
            sampler=self._options.sampler,
            mode=self._options.mode,
            layout=layout,
        )
        value, estimate, aux = value_and_estimate(
            split.of(global_value),
            split.live,
            tangents,
            has_aux=True,
            layout=layout,
            derivative=self._options.derivative,
            finite_difference_step=self._options.finite_difference_step,
            chunk_size=self._options.chunk_size,
        )
        # Each data shard has its own `aux`: stacked along a new leading axis.
        aux = jax.tree.map(lambda leaf: jnp.expand_dims(leaf, 0), aux)
        return value, jax.tree.leaves(split.widen(estimate)), aux

    def _specs(self, key, direction, model, batch, kwargs) -> tuple[list, list]:
        """The `PartitionSpec` of every array leaf of the inputs, in leaf order, and
        those of the estimate's leaves."""
        replicated = PartitionSpec()
        model_specs = broadcast_specs(self._param_specs, model)
        diff_specs = jax.tree.map(
            lambda spec, leaf: spec if eqx.is_inexact_array(leaf) else None,
            model_specs,
            model,
            is_leaf=lambda x: x is None or is_spec(x),
        )
        estimate_specs = jax.tree.leaves(diff_specs, is_leaf=is_spec)
        in_specs = (
            [replicated] * len(jax.tree.leaves(key))
            + (estimate_specs if direction is not None else [])
            + jax.tree.leaves(model_specs, is_leaf=is_spec)
            + [PartitionSpec(self._data_axes)] * len(jax.tree.leaves(batch))
            + [replicated] * len(jax.tree.leaves(kwargs))
        )
        return in_specs, estimate_specs

    def __call__(self, *args, **kwargs):
        first_argument(args, kwargs, "sharded_{dodge, value_and_dodge}")
        return _sharded_call_jit(self, args, kwargs)

    def _call(self, args: tuple, kwargs: dict):
        model, *batch = args
        options = self._options
        key = None if options.key is None else as_key(options.key)
        diff = trainable(model)
        if key is not None and options.mode == "partition":
            check_num_parts(num_coordinates(diff), options.num_directions)
        if options.direction is not None:
            check_direction(options.direction, diff)
        inputs = (key, options.direction, model, batch, kwargs)
        dynamic, static = eqx.partition(inputs, eqx.is_array)
        num_shards = math.prod(self._mesh.shape[axis] for axis in self._data_axes)
        _check_batch(dynamic[3], num_shards, self._data_axes)
        in_specs, estimate_specs = self._specs(*dynamic)
        layout = make_layout(estimate_specs, diff, self._mesh, self._data_axes)
        leaves, treedef = jax.tree.flatten(dynamic)

        def body(*local_leaves):
            local = eqx.combine(jax.tree.unflatten(treedef, local_leaves), static)
            return self._local(layout, *local)

        mapped = jax.shard_map(
            body,
            mesh=self._mesh,
            in_specs=tuple(in_specs),
            out_specs=(PartitionSpec(), estimate_specs, PartitionSpec(self._data_axes)),
        )
        value, estimate, aux = mapped(*_laid_out(self._mesh, leaves, in_specs))
        estimate = jax.tree.unflatten(jax.tree.structure(diff), estimate)
        return ((value, aux) if options.has_aux else value), estimate


# Compiled as a whole, as `filter_value_and_dodge` is (see `_filter.py`).
@eqx.filter_jit
def _sharded_call_jit(wrapper: _ShardedValueAndDodgeWrapper, args: tuple, kwargs: dict):
    return wrapper._call(args, kwargs)


def _sharded_wrapper(
    function: str, has_aux: bool, options: ShardedKeywords
) -> Callable[[Callable], _ShardedValueAndDodgeWrapper]:
    """What wraps `fun` for the public `function` with these `**options`, checked
    once here for both `sharded_*`."""
    check_keywords(function, options, ShardedKeywords)
    estimator: dict[str, Any] = dict(options)
    mesh = estimator.pop("mesh")
    data_axis = estimator.pop("data_axis", "data")
    param_specs = estimator.pop("param_specs", None)
    batch_reduction = estimator.pop("batch_reduction", "mean")
    checked = estimator_options(function, has_aux, estimator)
    data_axes = _check_data_axes(mesh, data_axis)
    return lambda f: _ShardedValueAndDodgeWrapper(
        f, checked, mesh, data_axes, param_specs, batch_reduction
    )


def sharded_value_and_dodge(
    fun: Callable = _sentinel,
    *,
    has_aux: bool = False,
    **options: Unpack[ShardedKeywords],
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
    - `mesh`: the `jax.sharding.Mesh` to run on (required).
    - `data_axis`: the name of the mesh axis (or a tuple of names) the batch is
        split over, `"data"` by default; the loss and the derivatives are
        all-reduced over it.
    - `param_specs`: how the model is laid out over the mesh: `None` (the default:
        replicated, pure data parallelism), one `PartitionSpec` for every array
        leaf, or a PyTree prefix of the model with a `PartitionSpec` (or `None`) at
        its leaves. It may not name a data axis.
    - `key`: a PRNG key or an int seed for random directions (replicated). Use a
        fresh key at every step.
    - `direction`: a candidate direction, instead of `key`, laid out like the
        parameters (both default to `None`: pass one of them).
    - `num_directions`: the number `k` of directions evaluated (default 1).
    - `sampler`: `"rademacher"` (the default), `"gaussian"` or `"orthogonal"`, as
        in [`eqx_dodge.filter_value_and_dodge`][]; orthogonal directions are
        indexed by the global coordinates, so they are orthogonal over the whole
        model whatever `param_specs` shards.
    - `mode`: `"average"` (the default) or `"partition"`, as in
        [`eqx_dodge.filter_value_and_dodge`][].
    - `has_aux`: if `True` (default `False`), `fun` returns `(value, aux)`.
    - `batch_reduction`: `"mean"` (the default) or `"sum"`: how the losses of the
        data shards combine into the loss of the whole batch.
    - `derivative`, `finite_difference_step`: `"jvp"` (the default: forward mode) or
        `"central"` (central finite differences with step $h$, for a loss with a
        `jax.custom_vjp` inside), as in [`eqx_dodge.filter_value_and_dodge`][].
        With `"central"` each of the `2k + 1` forward passes all-reduces its loss:
        `2k + 1` collectives of one float.
    - `chunk_size`: how many of the directions one vectorised jvp carries, as in
        [`eqx_dodge.filter_value_and_dodge`][]. By default all `k` at once here, so
        that their derivatives cross the network in one all-reduce; in chunks, one
        all-reduce per chunk.

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
    return wrap(fun, _sharded_wrapper("sharded_value_and_dodge", has_aux, options))


def sharded_dodge(
    fun: Callable = _sentinel,
    *,
    has_aux: bool = False,
    **options: Unpack[ShardedKeywords],
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
    - `derivative`, `finite_difference_step`, `chunk_size`: as in
        [`eqx_dodge.filter_dodge`][].

    **Returns:**

    A function with the same arguments as `fun` returning the estimate, or
    `(estimate, aux)` when `has_aux=True`.
    """
    sharded = _sharded_wrapper("sharded_dodge", has_aux, options)
    return wrap(fun, lambda f: _DodgeWrapper(sharded(f), has_aux))
