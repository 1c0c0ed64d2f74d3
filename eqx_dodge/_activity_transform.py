"""`dodge_activity`: the activity-perturbed estimator of `activity_value_and_dodge`
as an optax transformation, its `value_fn` the loss of one example."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree

from ._activity import activity_value_and_dodge, ActivityOptions
from ._checks import KeyLike, split_stored_key, stored_key
from ._directions import check_direction, trainable
from ._record import record_options, recording_transform
from ._value_fn import check_update_call, rebuild_hint, value_fn_kwargs


class DodgeActivityState(NamedTuple):
    """State of [`eqx_dodge.dodge_activity`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `key`: the raw data (`jax.random.key_data`) of the PRNG key, split at every
        update.
    - `value`, `aux`, `notfinite_count`, `total_notfinite`: the record of the
        latest update, as described in [`eqx_dodge.dodge`][]; `value` is the mean
        loss of the batch and `aux` stacks the examples' `aux` along a leading axis.
    """

    count: Array
    key: PyTree
    value: Array
    aux: PyTree
    notfinite_count: Array
    total_notfinite: Array


def dodge_activity(
    key: KeyLike,
    *,
    num_directions: int = 1,
    separate_layers: bool = False,
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Activity-perturbed forward gradients as an optax transformation.

    Replaces the incoming updates by the estimate of
    [`eqx_dodge.activity_value_and_dodge`][] for the mean loss of a batch: every
    `eqx.nn.Linear` and `eqx.nn.Conv` of `params` gets random tangents on its
    outputs, drawn independently for every example. Follow it with any optimizer:

    ```python
    def example_loss(model, x, y):  # the loss of ONE example
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

    optim = optax.chain(eqx_dodge.dodge_activity(key=0), optax.adam(1e-3))
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    updates, opt_state = optim.update(
        None, opt_state, model, value_fn=example_loss, x=x_batch, y=y_batch
    )
    model = eqx.apply_updates(model, updates)
    ```

    **Calling `update`.** `update(updates, state, params, *, value_fn, **batch)`:

    - `params` is the model itself (an Equinox Module): the perturbation points
        are found in it, so the layers must be there as `eqx.nn.Linear`/
        `eqx.nn.Conv` Modules, and `value_fn` calls it with them wrapped. Its
        `eqx.filter(model, eqx.is_inexact_array)` serves only a model whose call
        needs no non-array field (`eqx.nn.MLP` needs its activation), since
        `eqx.combine` cannot rebuild the model from the wrapped layers; the state
        may be initialised from either. In a PyTree without such layers (a Flax
        params dict) every leaf gets weight-space directions, which is
        weight-perturbed DODGE.
    - `value_fn(params, **example)` is the loss of **one** example. The keyword
        arguments of `update` that `value_fn` takes by name are the batch: PyTrees
        of arrays sharing a leading (example) axis, split along it. (This is the
        extra-argument convention of [`eqx_dodge.dodge`][], with the arguments
        split per example.) The estimate is that of the batch mean.
    - `updates` is ignored (pass `None`), but checked to be shaped like `params`
        when given.

    **Arguments:**

    - `key`: a PRNG key or an int seed; kept in the state and split at every step.
    - `num_directions`, `separate_layers`: as for
        [`eqx_dodge.activity_value_and_dodge`][].
    - `has_aux`, `aux_init`, `skip_nonfinite`: as for [`eqx_dodge.dodge`][]; with
        `has_aux=True`, `value_fn` returns `(loss, aux)` for one example, and
        `aux_init` declares the examples' `aux` stacked along a leading batch axis.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.DodgeActivityState`][].
    """
    options = ActivityOptions(key, num_directions, separate_layers, has_aux)
    record = record_options(has_aux, aux_init, skip_nonfinite)
    data, impl = stored_key(key, True, "for the activity tangents")

    def init(params, initial_record):
        return DodgeActivityState(jnp.zeros((), jnp.int32), data, *initial_record)

    def step(updates, state, example_batch, params):
        if updates is not None:
            check_direction(updates, trainable(params), name="updates")
        example_loss, batch = example_batch
        next_key, step_key = split_stored_key(state.key, impl)
        estimator = activity_value_and_dodge(
            example_loss,
            key=step_key,
            num_directions=options.num_directions,
            separate_layers=options.separate_layers,
            has_aux=record.has_aux,
        )
        try:
            out, estimate = estimator(params, *batch)
        except Exception as error:
            hint = rebuild_hint(params, activity=True)
            if hint is not None:
                error.add_note(hint)
            raise
        value, aux = out if record.has_aux else (out, None)
        return estimate, state._replace(key=next_key), value, aux, None

    return recording_transform("dodge_activity", record, init, step, _example_batch)


def _example_batch(
    name: str, params: Any, value_fn: Any, extra_args: dict[str, Any], has_aux: bool
) -> tuple[tuple[Callable, tuple], Any]:
    """`((example_loss, batch), params)` for `recording_transform`: `value_fn` with
    its batch keyword arguments taken positionally, as `activity_value_and_dodge`
    splits positional arguments per example, and those arguments."""
    del has_aux  # the estimator checks the loss's output itself
    check_update_call(name, params, value_fn, _USAGE)
    batch = value_fn_kwargs(value_fn, extra_args)
    if not batch:
        raise TypeError(
            f"`{name}.update` got no batch: pass the batch arrays as keyword "
            "arguments of `update` named as the arguments of `value_fn` after the "
            f"model, {_USAGE}"
        )
    names = tuple(batch)

    def example_loss(model, *example):
        return value_fn(model, **dict(zip(names, example)))

    return (example_loss, tuple(batch.values())), params


_USAGE = (
    "`value_fn(model, x, y)` is the loss of ONE example and `update(..., "
    "value_fn=example_loss, x=x_batch, y=y_batch)` gives it the batch, split along "
    "the leading axis of each array."
)
