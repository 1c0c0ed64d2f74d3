"""What every optax transform of eqx_dodge records besides its own state, in the last
four fields of its state: the loss value, `value_fn`'s auxiliary output, and the
count of non-finite steps, which are skipped by default; and the `init` and `update`
around each transform's own computation that keep that record."""

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree

from ._checks import check_record_options
from ._value_fn import loss_of_trainable


class RecordOptions(NamedTuple):
    """The arguments of a transform that say what its record keeps."""

    has_aux: bool
    aux_init: PyTree
    skip_nonfinite: bool


def record_options(has_aux: Any, aux_init: Any, skip_nonfinite: Any) -> RecordOptions:
    check_record_options(has_aux, aux_init, skip_nonfinite)
    return RecordOptions(has_aux, aux_init, skip_nonfinite)


def refuse_multi_steps(name: str) -> None:
    """Raises an error when `init` is called from `optax.MultiSteps.init`."""
    # `MultiSteps` calls the inner `update` at every mini-step with the *accumulated*
    # updates and the *current* `value_fn`, and keeps its output and state only at
    # the last mini-step: a DODGE estimate inside it sees one minibatch of the k
    # (and wastes k − 1 forward passes). optax gives the inner transform no other
    # sign of the wrapper than the caller's frame.
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), optax.MultiSteps):
            raise ValueError(
                f"`optax.MultiSteps` cannot wrap `{name}`: it calls the inner "
                "`update` with the accumulated updates but the current minibatch's "
                "`value_fn`, so the DODGE estimate would see only the last "
                "minibatch of each group. Accumulate the estimates instead, after "
                "DODGE: `optax.chain(eqx_dodge.dodge(key=...), "
                "optax.MultiSteps(optax.adam(...), every_k_schedule=k))`, with "
                "`params=eqx.filter(model, eqx.is_inexact_array)`."
            )
        frame = frame.f_back


def initial_record(params: PyTree, has_aux: bool, aux_init: Any) -> tuple:
    """`(value, aux, notfinite_count, total_notfinite)` for `init`."""
    # The loss is stored in the dtype of the parameters, as optax's line searches do.
    leaves = jax.tree.leaves(eqx.filter(params, eqx.is_inexact_array))
    dtype = leaves[0].dtype if leaves else jnp.float32
    zero = jnp.zeros((), jnp.int32)
    aux = _strong_arrays(aux_init) if has_aux else None
    return jnp.array(jnp.inf, dtype), aux, zero, zero


def _strong_arrays(tree: PyTree, like: PyTree = None) -> PyTree:
    """The leaves of `tree` as arrays of their result type (or of the dtypes of the
    leaves of `like`), never weakly typed: a Python float or a weak array in the
    state, becoming a strong array after one update, would compile a jitted step
    twice."""
    dtypes = jax.tree.map(jnp.result_type, tree if like is None else like)
    return jax.tree.map(lambda x, dtype: jnp.asarray(x, dtype), tree, dtypes)


def _check_aux(aux: PyTree, aux_init: PyTree) -> None:
    def signature(tree):
        leaves = jax.tree.leaves(tree)
        return [(jnp.shape(x), jnp.result_type(x)) for x in leaves]

    structure, expected_structure = (
        jax.tree.structure(aux),
        jax.tree.structure(aux_init),
    )
    if structure != expected_structure:
        # The PyTree nodes themselves may differ (a Flax NNX `State` of Variables
        # against one of plain arrays, as `nnx.Optimizer` passes the state).
        raise ValueError(
            "The `aux` returned by `value_fn` must have the structure of `aux_init` "
            "(the state's structure is fixed at `init`).\n"
            f"Expected {expected_structure},\ngot {structure}.\nWith Flax NNX, "
            "return and initialise plain arrays: `nnx.as_pure(nnx.state(...))`."
        )
    if signature(aux) != signature(aux_init):
        raise ValueError(
            "The `aux` returned by `value_fn` must have the shapes and dtypes of "
            "`aux_init` (the state's structure is fixed at `init`).\n"
            f"Expected {signature(aux_init)},\ngot {signature(aux)}."
        )


def _all_finite(*trees: Any) -> Array:
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def record_step(
    state: Any,
    new_state: Any,
    output: PyTree,
    value: Array,
    aux: Any,
    *,
    skip_nonfinite: bool,
    checked: PyTree = None,
) -> tuple[PyTree, Any]:
    """`(output, new_state)` with the record fields filled in. A step is finite when
    the loss, `output` and `checked` are; with `skip_nonfinite`, a non-finite step
    outputs zeros and keeps the old state, except that the key moves on (every key
    is used once) and the record fields are updated."""
    finite = _all_finite(value, output, checked)
    if state.aux is not None:
        _check_aux(aux, state.aux)
        new_state = new_state._replace(aux=_strong_arrays(aux, state.aux))
    if skip_nonfinite:
        new_state = optax.tree.where(
            finite, new_state, state._replace(key=new_state.key)
        )
        output = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), output)
    notfinite_count = jnp.where(
        finite, jnp.zeros((), jnp.int32), optax.safe_increment(state.notfinite_count)
    )
    total_notfinite = jnp.where(
        finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
    )
    return output, new_state._replace(
        value=value.astype(state.value.dtype),
        notfinite_count=notfinite_count,
        total_notfinite=total_notfinite,
    )


def recording_transform(
    name: str,
    record: RecordOptions,
    init: Callable[[PyTree, tuple], Any],
    step: Callable[[Any, Any, Any, PyTree], tuple],
    loss: Callable[..., tuple[Any, PyTree]] = loss_of_trainable,
) -> optax.GradientTransformationExtraArgs:
    """The transform `name` from its own parts. `init(params, initial_record)`
    returns its state, ending with `initial_record`. `step(updates, state, fun,
    primal)` returns `(output, new_state, value, aux, checked)`, where `new_state`
    is the state after the step but for its `count` (counted here), and `checked`
    is what must be finite besides the value and output (or `None`). `fun` and
    `primal` come from `loss(name, params, value_fn, extra_args, has_aux)`: by
    default `loss_of_trainable`'s, `fun(primal)` being `(value, aux)` of `value_fn`
    on the trainable leaves `primal` of `params`."""

    def init_fn(params):
        refuse_multi_steps(name)
        state = init(params, initial_record(params, record.has_aux, record.aux_init))
        # Every leaf its own buffer, so that the state can be donated to a jitted
        # step (`eqx.filter_jit(donate="all")`): XLA refuses one buffer donated
        # twice (the zero counters, Adam's zero moments), and a donated key array
        # or `aux_init` leaf held by this transform would be deleted for the next
        # `init`.
        return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, state)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        fun, primal = loss(name, params, value_fn, extra_args, record.has_aux)
        if not jax.tree.leaves(updates) and jax.tree.leaves(primal):
            # No updates: `nnx.Optimizer.update(model, None, ...)` passes an empty
            # `nnx.State` for `None`.
            updates = None
        output, new_state, value, aux, checked = step(updates, state, fun, primal)
        new_state = new_state._replace(count=optax.safe_increment(state.count))
        return record_step(
            state,
            new_state,
            output,
            value,
            aux,
            skip_nonfinite=record.skip_nonfinite,
            checked=checked,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
