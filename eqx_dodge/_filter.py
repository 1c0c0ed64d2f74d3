"""`filter_dodge` and `filter_value_and_dodge`: `eqx.filter_grad` with forward mode."""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import PRNGKeyArray, PyTree

from ._estimator import check_random_options, value_and_estimate


_sentinel: Any = object()


def check_first_argument_by_position(args: tuple, kwargs: dict, names: str) -> None:
    if len(args) == 0:
        raise TypeError(
            f"Functions wrapped with `eqx_dodge.{names}` must be given their first "
            "argument by position, not by keyword "
            + (f"(got only keywords {sorted(kwargs)}). " if kwargs else ". ")
            + "This first argument is the one that is differentiated."
        )


class _ValueAndDodgeWrapper(eqx.Module):
    _fun: Callable
    _key: PRNGKeyArray | None
    _direction: PyTree | None
    _num_directions: int = eqx.field(static=True)
    _sampler: str = eqx.field(static=True)
    _mode: str = eqx.field(static=True)
    _has_aux: bool = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return self._fun

    def __call__(self, *args, **kwargs):
        check_first_argument_by_position(
            args, kwargs, "filter_{dodge, value_and_dodge}"
        )
        x, *args = args
        diff_x, nondiff_x = eqx.partition(x, eqx.is_inexact_array)

        def fun_of_trainable(_diff_x):
            return self._fun(eqx.combine(_diff_x, nondiff_x), *args, **kwargs)

        value, estimate, aux = value_and_estimate(
            fun_of_trainable,
            diff_x,
            key=self._key,
            direction=self._direction,
            num_directions=self._num_directions,
            sampler=self._sampler,
            mode=self._mode,
            has_aux=self._has_aux,
        )
        return ((value, aux) if self._has_aux else value), estimate

    def __get__(self, instance, owner):
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


class _DodgeWrapper(eqx.Module):
    _fun_value_and_dodge: Callable  # returns `(value, estimate)`
    _has_aux: bool = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return getattr(self._fun_value_and_dodge, "__wrapped__")

    def __call__(self, /, *args, **kwargs):
        value, estimate = self._fun_value_and_dodge(*args, **kwargs)
        if self._has_aux:
            _, aux = value
            return estimate, aux
        return estimate

    def __get__(self, instance, owner):
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


def _check_source(key: Any, direction: Any, num_directions: int, mode: str) -> None:
    if key is None and direction is None:
        raise ValueError(
            "Pass exactly one of `key` (a PRNG key, for random directions) or "
            "`direction` (a candidate direction PyTree); got neither."
        )
    if key is not None and direction is not None:
        raise ValueError(
            "Pass exactly one of `key` (a PRNG key, for random directions) or "
            "`direction` (a candidate direction PyTree); got both."
        )
    if direction is not None and (num_directions != 1 or mode != "average"):
        raise ValueError(
            "`num_directions` and `mode` apply to random directions only; with a "
            "candidate `direction` leave them at their defaults."
        )


def _value_and_dodge_wrapper(
    fun: Callable,
    key: PRNGKeyArray | None,
    direction: PyTree | None,
    num_directions: int,
    sampler: str,
    mode: str,
    has_aux: bool,
) -> _ValueAndDodgeWrapper:
    check_random_options(num_directions, sampler, mode)
    _check_source(key, direction, num_directions, mode)
    if not callable(fun):
        raise TypeError(f"`fun` must be callable, got {type(fun).__name__}.")
    return _ValueAndDodgeWrapper(
        fun, key, direction, num_directions, sampler, mode, has_aux
    )


def filter_value_and_dodge(
    fun: Callable = _sentinel,
    *,
    key: PRNGKeyArray | None = None,
    direction: PyTree | None = None,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    has_aux: bool = False,
) -> Callable:
    r"""Creates a function that evaluates `fun` and a DODGE estimate of its gradient.

    The forward-mode twin of `eqx.filter_value_and_grad`, and the same calling
    convention: the estimate is taken with respect to the floating-point array leaves
    of the first positional argument, every other leaf gets `None`, and the other
    arguments pass through untouched. One `jax.jvp` gives the loss and the directional
    derivative $d = \nabla L \cdot u$ without a backward pass; the estimate is
    $d\,u$ (DODGE eq 3).

    Exactly one source of directions must be given:

    - `key`: random directions. With `num_directions=1` the direction is
        `eqx_dodge.random_direction(key, model, sampler=sampler)`; the estimate is
        unbiased, with per-coordinate variance $\|g\|^2 - g_i^2$ (Rademacher) or
        $\|g\|^2 + g_i^2$ (Gaussian).
    - `direction`: a candidate direction $c$ (a PyTree like
        `eqx.filter_grad(fun)(model, ...)`: a TBPTT or synthetic gradient, an earlier
        estimate, ...). The estimate is $(\nabla L \cdot \hat c)\,\hat c$ with
        $\hat c = c/\|c\|$: biased, but always a descent direction, and exactly the
        gradient when $c$ is. A zero candidate gives a zero estimate.

    **Arguments:**

    - `fun`: a pure function whose first argument is differentiated and which returns
        a scalar (or `(scalar, aux)` when `has_aux=True`).
    - `key`: a PRNG key for random directions. Use a fresh key at every step.
    - `direction`: a candidate direction, instead of `key`.
    - `num_directions`: the number `k` of random directions, computed in one
        vectorised forward pass.
    - `sampler`: `"rademacher"` or `"gaussian"` entries for random directions.
    - `mode`: how `k > 1` random directions combine. `"average"` averages `k`
        independent estimates (DODGE eq 9), dividing the added variance by `k`.
        `"partition"` splits one random direction into `k` zero-padded parts over
        contiguous blocks of the flattened parameters and sums their estimates
        (DODGE eq 10): the variance of coordinate $i$ only involves the other
        coordinates of its block, and `k = p` gives the exact gradient (with
        Rademacher entries).
    - `has_aux`: if `True`, `fun` returns `(value, aux)` and `aux` is passed back.

    **Returns:**

    A function with the same arguments as `fun` returning `(value, estimate)`, or
    `((value, aux), estimate)` when `has_aux=True`. The estimate has the structure of
    the first argument, the dtype of each of its floating-point leaves, and `None`
    at every other leaf.

    Can be used as a decorator, `@filter_value_and_dodge(key=key)`, also on methods.
    """
    if fun is _sentinel:
        return ft.partial(
            filter_value_and_dodge,
            key=key,
            direction=direction,
            num_directions=num_directions,
            sampler=sampler,
            mode=mode,
            has_aux=has_aux,
        )
    return eqx.module_update_wrapper(
        _value_and_dodge_wrapper(
            fun, key, direction, num_directions, sampler, mode, has_aux
        )
    )


def filter_dodge(
    fun: Callable = _sentinel,
    *,
    key: PRNGKeyArray | None = None,
    direction: PyTree | None = None,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    has_aux: bool = False,
) -> Callable:
    r"""Creates a function that returns a DODGE estimate of the gradient of `fun`.

    A drop-in replacement for `eqx.filter_grad` that uses one forward-mode pass
    (`jax.jvp`) instead of backpropagation:

    ```python
    grads = eqx.filter_grad(loss)(model, x, y)                       # before
    grads = eqx_dodge.filter_dodge(loss, key=step_key)(model, x, y)  # after
    ```

    See [`eqx_dodge.filter_value_and_dodge`][] for the estimator and its arguments;
    they are the same here.

    **Arguments:**

    - `fun`: a pure function whose first argument is differentiated and which returns
        a scalar (or `(scalar, aux)` when `has_aux=True`).
    - `key`: a PRNG key for random directions.
    - `direction`: a candidate direction, instead of `key`.
    - `num_directions`: the number `k` of random directions.
    - `sampler`: `"rademacher"` or `"gaussian"`.
    - `mode`: `"average"` or `"partition"`.
    - `has_aux`: if `True`, `fun` returns `(value, aux)`.

    **Returns:**

    A function with the same arguments as `fun` returning the estimate, a PyTree like
    the first argument with `None` at its non-floating-point leaves; or
    `(estimate, aux)` when `has_aux=True`, as `eqx.filter_grad` does.
    """
    if fun is _sentinel:
        return ft.partial(
            filter_dodge,
            key=key,
            direction=direction,
            num_directions=num_directions,
            sampler=sampler,
            mode=mode,
            has_aux=has_aux,
        )
    value_and_dodge = _value_and_dodge_wrapper(
        fun, key, direction, num_directions, sampler, mode, has_aux
    )
    return eqx.module_update_wrapper(_DodgeWrapper(value_and_dodge, has_aux))
