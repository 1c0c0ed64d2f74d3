"""How the estimators call the user's loss: `value_fn` of the optax transforms as a
function of the trainable leaves, and the loss's other arguments in each trace."""

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import optax
from jaxtyping import Array, PyTree

from ._checks import check_callable, loss_and_aux
from ._directions import check_direction, trainable


def fresh_nodes(tree: PyTree) -> PyTree:
    """`tree` with new PyTree nodes around the same leaves, made in the trace that
    calls this. The estimators trace the loss several times (the jvp, the live-leaf
    analysis) with its other arguments closed over; a Flax NNX Variable (a
    BatchNorm's running statistics) may only be mutated in the trace that made it,
    so each trace of the loss gets Variables of its own."""
    return jax.tree.map(lambda leaf: leaf, tree)


def note_closed_over_variables(error: Exception) -> None:
    """Tells a Flax NNX user what to do when the loss mutated a Variable that it
    closed over (made in another trace than the estimator's)."""
    if type(error).__name__ == "TraceContextError":
        error.add_note(
            "eqx_dodge traces the loss inside its own transformations: pass NNX "
            "state that the loss updates (BatchNorm statistics from `nnx.split`) "
            "as an argument of the loss (a keyword argument of `update` for the "
            "optax transforms, e.g. `stats=stats`) instead of closing over it."
        )


def call_loss(
    fun: Callable, first: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """`fun(first, *args, **kwargs)` in the current trace: `args` and `kwargs` get
    fresh nodes (`fresh_nodes`), and the error of an NNX Variable that `fun` closed
    over gets a note saying what to do."""
    args, kwargs = fresh_nodes((args, kwargs))
    try:
        return fun(first, *args, **kwargs)
    except Exception as error:
        note_closed_over_variables(error)
        raise


# What `update` itself takes: these names cannot reach `value_fn` as extra arguments.
_UPDATE_ARGUMENTS = ("updates", "state", "params")


def value_fn_kwargs(value_fn: Callable, extra_args: dict[str, Any]) -> dict[str, Any]:
    # The convention of optax's line searches: the extra arguments of `update` whose
    # names are parameters of `value_fn` (other than the first) are passed on to it.
    # Other extra arguments are meant for other transforms of the chain.
    try:
        parameters = list(inspect.signature(value_fn).parameters.values())
    except (TypeError, ValueError):
        return {}
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [parameter for parameter in parameters[1:] if parameter.kind in by_name]
    missing = [
        parameter.name
        for parameter in named
        if parameter.default is inspect.Parameter.empty
        and parameter.name not in extra_args
    ]
    if missing:
        reserved = [name for name in missing if name in _UPDATE_ARGUMENTS]
        raise TypeError(
            f"`value_fn` needs the argument(s) {missing}, which `update` was not "
            "given: pass them as keyword arguments of `update` (`x=x`), or bind them "
            "to `value_fn` (`functools.partial(loss, x=x)`, or "
            "`lambda model: loss(model, x)`)."
            + (
                f" {reserved} cannot be passed to `update` by keyword, as `update` "
                "takes arguments of those names itself: bind them."
                if reserved
                else ""
            )
        )
    names = {parameter.name for parameter in named}
    return {name: value for name, value in extra_args.items() if name in names}


def _is_masked(node: Any) -> bool:
    return isinstance(node, optax.MaskedNode)


def _unmasked(tree: PyTree) -> PyTree:
    """`tree` with `None` where `optax.masked` put a `MaskedNode`."""
    return jax.tree.map(
        lambda x: None if _is_masked(x) else x, tree, is_leaf=_is_masked
    )


def _is_nnx_state(tree: Any) -> bool:
    """Whether `tree` is a Flax NNX `State` (without importing Flax)."""
    kind = type(tree)
    return kind.__name__ == "State" and kind.__module__.startswith("flax.nnx")


def rebuild_hint(
    params: PyTree, activity: bool = False, error: Exception | None = None
) -> str | None:
    """What to tell a user whose `value_fn` failed (with `error`) on a partial
    `params`, or on an `nnx.State` used as the module (a `TypeError` or
    `AttributeError`); with `activity`, for the activity estimators, whose
    `value_fn` gets the layers wrapped and cannot rebuild the model with
    `eqx.combine`."""
    nodes = jax.tree.leaves(params, is_leaf=lambda x: x is None or _is_masked(x))
    rebuild = (
        "combine it with the whole model your training loop holds, e.g. "
        "`value_fn=lambda p: loss(eqx.combine(p, model), x, y)`: the leaves of `p` "
        "are the ones differentiated, the rest come from `model`."
    )
    if activity:
        rebuild = (
            "the activity estimators hand `value_fn` that tree with each Linear and "
            "Conv layer wrapped (where its output is perturbed), so `eqx.combine` "
            "cannot rebuild the model from it. Pass the model itself as `params` "
            "to `update` (the state may still be initialised from "
            "`eqx.filter(model, eqx.is_inexact_array)`)."
        )
    if _is_nnx_state(params) and isinstance(error, TypeError | AttributeError):
        return (
            "`nnx.Optimizer.update` hands the transform the `nnx.State` of the "
            "parameters its `wrt` selects, and `value_fn` receives that state, not "
            "the module: rebuild the module inside it, e.g. with "
            "`graphdef, _, rest = nnx.split(model, nnx.Param, ...)` before the "
            "update and `value_fn=lambda state: loss(nnx.merge(graphdef, state, "
            "rest), x, y)` (the Flax page of the eqx_dodge docs)."
        )
    if any(_is_masked(node) for node in nodes):
        return (
            "Inside `optax.masked` / `optax.partition`, `value_fn` receives only the "
            "group of parameters this transform owns, with `None` at the other "
            "leaves; " + rebuild
        )
    if any(node is None for node in nodes):
        return (
            "`params` holds `None` leaves (as `eqx.filter(model, eqx.is_inexact_array)`"
            " does, which optax wrappers such as `MultiSteps`, `inject_hyperparams` "
            "and `schedule_free` need), and `value_fn` receives that tree; " + rebuild
        )
    return None


_USAGE = (
    "a function of the parameters returning the scalar loss to differentiate, e.g. "
    "`value_fn=lambda model: loss(model, x, y)`, or `value_fn=loss` with `x=x, y=y` "
    "passed as further keyword arguments of `update`."
)


def check_update_call(
    name: str, params: Any, value_fn: Any, usage: str = _USAGE
) -> None:
    """The errors of an `update` called without `params` or a callable `value_fn`
    (`usage` says what `value_fn` should be)."""
    if params is None:
        raise ValueError(
            f"`{name}.update` needs the current parameters: call "
            "`update(updates, state, params, value_fn=...)`; `params` is the PyTree "
            "that `value_fn` takes (e.g. the Equinox model)."
        )
    if value_fn is None:
        raise ValueError(f"`{name}.update` needs `value_fn=...`: {usage}")
    check_callable("value_fn", value_fn)


def loss_of_trainable(
    name: str, params: Any, value_fn: Any, extra_args: dict[str, Any], has_aux: bool
) -> tuple[Callable[[PyTree], tuple[Array, Any]], PyTree]:
    """Checks `params` and `value_fn` and returns `(fun, primal)`, where `primal` is
    the trainable part of `params` and `fun(primal)` is `(loss, aux)` (`aux` is
    `None` unless `has_aux`)."""
    check_update_call(name, params, value_fn)
    kwargs = value_fn_kwargs(value_fn, extra_args)
    primal = trainable(params)
    rest = eqx.filter(params, eqx.is_inexact_array, inverse=True)

    def fun(_primal):
        try:
            out = call_loss(value_fn, _unmasked(eqx.combine(_primal, rest)), (), kwargs)
        except Exception as error:
            hint = rebuild_hint(params, error=error)
            if hint is not None:
                error.add_note(hint)
            raise
        return loss_and_aux(out, "value_fn", has_aux)

    return fun, primal


def candidate_of(updates: Any, primal: PyTree, source: str) -> PyTree:
    """The incoming `updates` as a candidate direction, checked against `primal`."""
    if updates is None:
        raise ValueError(
            f"The {source!r} source uses the incoming `updates` as the candidate "
            "direction, got none (`updates=None` or a tree without arrays); pass "
            "the candidate (e.g. a truncated or surrogate gradient) as the first "
            "argument of `update`."
        )
    check_direction(updates, primal, name="updates")
    return updates
