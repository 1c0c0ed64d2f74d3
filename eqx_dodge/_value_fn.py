"""How the optax transforms call `value_fn`: the loss of the trainable leaves."""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree

from ._checks import check_callable, check_scalar_loss
from ._directions import check_direction, trainable


def _value_fn_kwargs(value_fn: Callable, extra_args: dict[str, Any]) -> dict[str, Any]:
    # The convention of optax's line searches: the extra arguments of `update` whose
    # names are parameters of `value_fn` (other than the first) are passed on to it.
    # Other extra arguments are meant for other transforms of the chain.
    try:
        parameters = list(inspect.signature(value_fn).parameters.values())
    except (TypeError, ValueError):
        return {}
    names = {
        parameter.name
        for parameter in parameters[1:]
        if parameter.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {name: value for name, value in extra_args.items() if name in names}


def loss_of_trainable(
    name: str, params: Any, value_fn: Any, extra_args: dict[str, Any]
) -> tuple[Callable[[PyTree], Array], PyTree]:
    """Checks `params` and `value_fn` and returns `(fun, primal)`, where `primal` is
    the trainable part of `params` and `fun(primal)` is the loss."""
    if params is None:
        raise ValueError(
            f"`{name}.update` needs the current parameters: call "
            "`update(updates, state, params, value_fn=...)`; `params` is the PyTree "
            "that `value_fn` takes (e.g. the Equinox model)."
        )
    if value_fn is None:
        raise ValueError(
            f"`{name}.update` needs `value_fn=...`: a function of the parameters "
            "returning the scalar loss to differentiate, e.g. "
            "`value_fn=lambda model: loss(model, x, y)`, or `value_fn=loss` with "
            "`x=x, y=y` passed as further keyword arguments of `update`."
        )
    check_callable("value_fn", value_fn)
    kwargs = _value_fn_kwargs(value_fn, extra_args)
    primal = trainable(params)
    rest = eqx.filter(params, eqx.is_inexact_array, inverse=True)

    def fun(_primal):
        return check_scalar_loss(
            value_fn(eqx.combine(_primal, rest), **kwargs), "value_fn"
        )

    return fun, primal


def candidate_of(updates: Any, primal: PyTree, source: str) -> PyTree:
    """The incoming `updates` as a candidate direction, checked against `primal`."""
    if updates is None:
        raise ValueError(
            f"The {source!r} source uses the incoming `updates` as the candidate "
            "direction, got `updates=None`; pass the candidate (e.g. a truncated or "
            "surrogate gradient) as the first argument of `update`."
        )
    check_direction(updates, primal, name="updates")
    return updates
