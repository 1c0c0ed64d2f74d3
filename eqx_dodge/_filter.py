"""`filter_dodge` and `filter_value_and_dodge`: `eqx.filter_grad` with forward mode."""

import abc
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload, TypedDict, Unpack

import equinox as eqx
from jaxtyping import Array, PyTree

from ._checks import (
    as_key,
    check_bool,
    check_callable,
    check_candidate_options,
    check_chunk_size,
    check_derivative_options,
    check_keywords,
    check_one_source,
    check_random_options,
    FINITE_DIFFERENCE_STEP,
    first_argument,
    KeyLike,
    ScalarLike,
)
from ._directions import check_direction, trainable
from ._estimator import value_and_estimate
from ._live import LiveSplit, split_live
from ._tangents import (
    candidate_tangents,
    draw_tangents,
    Layout,
    SINGLE_DEVICE,
    Tangents,
)
from ._value_fn import call_loss


_sentinel: Any = object()


class EstimatorKeywords(TypedDict, total=False):
    """The keyword arguments of `filter_*` and `sharded_*` besides `has_aux` (explicit
    for the overloads on it), declared once for all their signatures (PEP 692); the
    defaults are `EstimatorOptions`'s."""

    key: KeyLike | None
    direction: PyTree | None
    num_directions: int
    sampler: str
    mode: str
    derivative: str
    finite_difference_step: ScalarLike
    chunk_size: int | None


class EstimatorOptions(eqx.Module):
    """Where the directions come from and how the estimate is formed: the options
    shared by `filter_*`, `sharded_*` and their decorator forms, with their
    defaults."""

    key: KeyLike | None = None
    direction: PyTree | None = None
    num_directions: int = eqx.field(static=True, default=1)
    sampler: str = eqx.field(static=True, default="rademacher")
    mode: str = eqx.field(static=True, default="average")
    has_aux: bool = eqx.field(static=True, default=False)
    derivative: str = eqx.field(static=True, default="jvp")
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP
    chunk_size: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_bool("has_aux", self.has_aux)
        check_random_options(self.num_directions, self.sampler, self.mode)
        check_derivative_options(self.derivative, self.finite_difference_step)
        check_chunk_size(self.chunk_size)
        check_one_source(self.key, self.direction)
        if self.key is not None:
            as_key(self.key)
        else:
            check_candidate_options(self.num_directions, self.mode, self.sampler)

    def tangents(self, split: LiveSplit, layout: Layout = SINGLE_DEVICE) -> Tangents:
        """The tangents of the live leaves of `split` (a candidate is checked
        against all the trainable leaves, then restricted to the live ones)."""
        if self.direction is not None:
            check_direction(self.direction, split.primal)
            # Not `draw_tangents`: the restriction of a one-array tree whose array
            # the loss does not use is `None`, which would read as no candidate.
            return candidate_tangents(split.restrict(self.direction), layout)
        return draw_tangents(
            split.live,
            key=None if self.key is None else as_key(self.key),
            direction=None,
            num_directions=self.num_directions,
            sampler=self.sampler,
            mode=self.mode,
            layout=layout,
        )


def estimator_options(
    function: str, has_aux: bool, options: Mapping[str, Any]
) -> EstimatorOptions:
    """The `**options` given to the public `function`, checked, with the key as a
    typed key array (an int seed would be a static value under `jit` and recompile
    for every seed)."""
    check_keywords(function, options, EstimatorKeywords)
    with warnings.catch_warnings():
        # `__check_init__` refuses an array in a static field (`chunk_size=
        # jnp.array(4)`) with a TypeError naming it; equinox's warning about
        # such a field would come first (and, under `-W error`, instead).
        warnings.filterwarnings("ignore", "A JAX array is being set as static")
        checked = EstimatorOptions(has_aux=has_aux, **options)
    if checked.key is None:
        return checked
    return eqx.tree_at(lambda o: o.key, checked, as_key(checked.key))


class WrapperMethods(eqx.Module):
    """`__wrapped__` and method binding, as `eqx.filter_grad`'s wrappers have."""

    _fun: eqx.AbstractVar[Callable]

    @abc.abstractmethod
    def __call__(self, *args, **kwargs) -> Any:
        """Calls the wrapped function."""

    @property
    def __wrapped__(self):
        return self._fun

    def __get__(self, instance, owner):
        del owner
        if instance is None:
            return self
        return eqx.Partial(self, instance)


# `(model, /, *batch, **kwargs)`: see `BatchWrapperMethods`.
_BATCH_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_ONLY),
        inspect.Parameter("batch", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


class BatchWrapperMethods(WrapperMethods):
    """`WrapperMethods` of an estimator whose positional arguments after the model
    are the batch (split per example or per device) and whose keyword arguments are
    passed whole: its signature is `(model, *batch, **kwargs)`, not the loss's.
    `eqx.filter_jit` binds a call to its function's signature, and the loss's would
    turn a keyword argument that names one of its parameters into a positional
    one, and so into part of the batch."""

    @property
    def __signature__(self) -> inspect.Signature:
        return _BATCH_SIGNATURE


class _ValueAndDodgeWrapper(WrapperMethods):
    _fun: Callable
    _options: EstimatorOptions

    def __call__(self, *args, **kwargs):
        first_argument(args, kwargs, "filter_{dodge, value_and_dodge}")
        return _value_and_estimate_jit(self, args, kwargs)


# Compiled as a whole, so that a call outside `jit` costs one compilation (cached
# for the same function and shapes) instead of compiling the Threefry rounds, the
# chunks and the jvp one operation at a time; inside `jit` it is inlined.
@eqx.filter_jit
def _value_and_estimate_jit(wrapper: _ValueAndDodgeWrapper, args: tuple, kwargs: dict):
    x, *rest = args
    diff_x = trainable(x)
    nondiff_x = eqx.filter(x, eqx.is_inexact_array, inverse=True)

    def fun_of_trainable(_diff_x):
        return call_loss(wrapper._fun, eqx.combine(_diff_x, nondiff_x), rest, kwargs)

    options = wrapper._options
    split = split_live(fun_of_trainable, diff_x, has_aux=options.has_aux)
    value, estimate, aux = value_and_estimate(
        split.of(fun_of_trainable),
        split.live,
        options.tangents(split),
        has_aux=options.has_aux,
        derivative=options.derivative,
        finite_difference_step=options.finite_difference_step,
        chunk_size=options.chunk_size,
    )
    return ((value, aux) if options.has_aux else value), split.widen(estimate)


class _DodgeWrapper(WrapperMethods):
    _fun: Callable  # returns `(value, estimate)`
    _has_aux: bool = eqx.field(static=True)

    @property
    def __wrapped__(self):
        return getattr(self._fun, "__wrapped__")

    @property
    def __signature__(self) -> inspect.Signature:
        # The signature of the wrapper it calls, not of `__wrapped__` (the loss):
        # they differ for the batch estimators (`BatchWrapperMethods`).
        return inspect.signature(self._fun)

    def __call__(self, /, *args, **kwargs):
        value, estimate = self._fun(*args, **kwargs)
        if self._has_aux:
            _, aux = value
            return estimate, aux
        return estimate


def wrap(fun: Any, make: Callable[[Callable], eqx.Module]) -> Callable:
    """`make(fun)`, or the decorator that applies it when `fun` is not given."""
    if fun is _sentinel:
        return lambda f: wrap(f, make)
    check_callable("fun", fun)
    return eqx.module_update_wrapper(make(fun))


@overload
def filter_value_and_dodge(
    *, has_aux: bool = False, **options: Unpack[EstimatorKeywords]
) -> Callable[[Callable], Callable]: ...


@overload
def filter_value_and_dodge(
    fun: Callable,
    *,
    has_aux: Literal[False] = False,
    **options: Unpack[EstimatorKeywords],
) -> Callable[..., tuple[Array, PyTree]]: ...


@overload
def filter_value_and_dodge(
    fun: Callable, *, has_aux: Literal[True], **options: Unpack[EstimatorKeywords]
) -> Callable[..., tuple[tuple[Array, Any], PyTree]]: ...


def filter_value_and_dodge(
    fun: Callable = _sentinel,
    *,
    has_aux: bool = False,
    **options: Unpack[EstimatorKeywords],
) -> Callable:
    r"""Creates a function that evaluates `fun` and a DODGE estimate of its gradient.

    The forward-mode twin of `eqx.filter_value_and_grad`, and the same calling
    convention: the estimate is taken with respect to the floating-point array leaves
    of the first positional argument, every other leaf gets `None`, and the other
    arguments pass through untouched. One `jax.jvp` gives the loss and the directional
    derivative $d = \nabla L \cdot u$ without a backward pass; the estimate is
    $d\,u$.

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
    - `key`: a PRNG key (`jax.random.key`, a legacy `jax.random.PRNGKey`) or an int
        seed, for random directions. Use a fresh key at every step.
    - `direction`: a candidate direction, instead of `key` (both default to `None`:
        pass one of them).
    - `num_directions`: the number `k` of directions evaluated (default 1), in one
        vectorised forward pass (a few at a time on CPU).
    - `sampler`: the entries of random directions: `"rademacher"` (the default; ±1
        with equal probability), `"gaussian"`, or `"orthogonal"`: with
        `mode="average"` and `k > 1`, the `k` directions are exactly orthogonal to
        each other, ±1 vectors (±√k or 0 on the last `p mod K` coordinates, `K`
        the power of two ≥ `k`; stochastic subspace descent, Kozak et al. 2019),
        so the estimate is about $\frac pk$ times the projection of the gradient on
        a random `k`-dimensional subspace, with less variance than `k` independent
        directions (see the docs' "Several directions" page). With one direction it
        is the Rademacher one.
    - `mode`: how `k > 1` random directions combine. `"average"` (the default)
        averages `k` independent estimates, dividing the added variance by `k`.
        `"partition"` splits one random direction into `k` zero-padded parts over
        contiguous blocks of the flattened parameters and sums their estimates: the
        variance of coordinate $i$ only involves the other coordinates of its block,
        and `k = p` gives the exact gradient (with Rademacher entries).
    - `has_aux`: if `True` (default `False`), `fun` returns `(value, aux)` and `aux`
        is passed back.
    - `derivative`: how each directional derivative $\nabla L \cdot u$ is taken.
        `"jvp"` (the default): exactly, by forward mode. `"central"`: by central
        finite differences, $(L(\theta + h u) - L(\theta - h u)) / 2h$, two forward
        passes per direction plus one for the value and `aux` (taken at $\theta$),
        for losses that forward mode cannot differentiate (a `jax.custom_vjp`
        inside: diffrax's default adjoint, `eqx.filter_custom_vjp`, ...). The same
        `key` gives the same directions either way. Its error per direction is
        about $\frac{h^2}{6} |\nabla^3 L[u, u, u]|$ plus float rounding of order
        $\varepsilon\,(|L| + \sum_i |\theta_i \partial_i L|)/h$ (see the
        Troubleshooting page of the docs).
    - `finite_difference_step`: the step $h$ of `derivative="central"` along the
        direction $u$ as drawn (Rademacher entries $\pm 1$, so every parameter
        moves by $\pm h$; a candidate is scaled to unit norm first). The default
        `1e-3` suits float32 parameters and losses of order one.
    - `chunk_size`: how many of the `num_directions` directions one vectorised
        `jax.jvp` carries; the others follow in chunks of that many, one after the
        other (each chunk evaluates the loss again), so the tangents alive at once
        are those of one chunk. The estimate is the same for any chunk size (up to
        float rounding). `None` (the default) lets the backend decide: chunks of
        at least 4 on CPU (and of `k/16` beyond 64), where they measured faster,
        and all the directions at once elsewhere, where one `vmap` measured faster
        but its memory grows with `num_directions`: set it on a GPU to bound the
        memory of many directions. Two costs of several chunks: `jax.grad`
        through the estimate needs them in one (`chunk_size=num_directions`; the
        chunks run in a `while_loop`, which has no reverse mode), and on CPU a
        loss with a convolution unrolls its chunks, so compilation takes longer
        the more chunks there are.

    **Returns:**

    A function with the same arguments as `fun` returning `(value, estimate)`, or
    `((value, aux), estimate)` when `has_aux=True`. The estimate has the structure of
    the first argument, the dtype of each of its floating-point leaves, and `None`
    at every other leaf. Leaves the value does not depend on (frozen with
    `jax.lax.stop_gradient`, or unused) get no direction, do not count in `p` and
    get exact zeros, as with `eqx.filter_grad`; see "How do I freeze part of a
    model?" in the FAQ.

    Can be used as a decorator, `@filter_value_and_dodge(key=key)`, also on methods.
    """
    checked = estimator_options("filter_value_and_dodge", has_aux, options)
    return wrap(fun, lambda f: _ValueAndDodgeWrapper(f, checked))


def filter_dodge(
    fun: Callable = _sentinel,
    *,
    has_aux: bool = False,
    **options: Unpack[EstimatorKeywords],
) -> Callable:
    r"""Creates a function that returns a DODGE estimate of the gradient of `fun`.

    A drop-in replacement for `eqx.filter_grad` that uses one forward-mode pass
    (`jax.jvp`) instead of backpropagation:

    ```python
    grads = eqx.filter_grad(loss)(model, x, y)                       # before
    grads = eqx_dodge.filter_dodge(loss, key=step_key)(model, x, y)  # after
    ```

    **Arguments:** the same as [`eqx_dodge.filter_value_and_dodge`][]'s: `fun`, and
    one of `key` (random directions) or `direction` (a candidate), `num_directions`,
    `sampler`, `mode`, `has_aux`, `derivative`, `finite_difference_step`,
    `chunk_size`.

    **Returns:**

    A function with the same arguments as `fun` returning the estimate, a PyTree like
    the first argument with `None` at its non-floating-point leaves; or
    `(estimate, aux)` when `has_aux=True`, as `eqx.filter_grad` does.
    """
    checked = estimator_options("filter_dodge", has_aux, options)
    return wrap(
        fun, lambda f: _DodgeWrapper(_ValueAndDodgeWrapper(f, checked), has_aux)
    )
