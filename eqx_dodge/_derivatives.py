r"""How the directional derivatives $d_j = \nabla L \cdot t_j$ are taken.

By default in forward mode, one `jax.jvp` for all the tangents of a chunk. JAX cannot
apply forward mode to a function with a `jax.custom_vjp` inside; `jvp` turns JAX's
bare error about it into one that says what to do, for every estimator. The way out
that needs no change to the loss is `derivative="central"`: central finite
differences along the same tangents,

$$d_j \approx \frac{L(\theta + h t_j) - L(\theta - h t_j)}{2h},$$

two forward passes per tangent and no derivative of the loss at all. Its error is
$\frac{h^2}{6}\nabla^3 L[t_j, t_j, t_j]$ (plus $O(h^4)$) from the truncated Taylor
series, and about $\varepsilon\,(|L| + \sum_i |\theta_i\,\partial_i L|)/h$ from
rounding the loss and the moved parameters in a float format with machine epsilon
$\varepsilon$; see the docs' troubleshooting page.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
from jax.interpreters.partial_eval import dce_jaxpr
from jaxtyping import Array, PyTree, Scalar

from ._checks import ScalarLike


# JAX's message (jax/_src/interpreters/ad.py), raised when `custom_lin` is lowered.
_JAX_CUSTOM_VJP_ERROR = (
    "can't apply forward-mode autodiff (jvp) to a custom_vjp function."
)

CUSTOM_VJP_HELP = """\
eqx_dodge differentiates the loss in forward mode (`jax.jvp`), and forward mode \
cannot differentiate a function with a `jax.custom_vjp` (a hand-written reverse-mode \
rule). Something inside the loss defines one{where}. Depending on where it comes from:

- diffrax: its default adjoint `RecursiveCheckpointAdjoint` (and \
`BacksolveAdjoint`) is a custom_vjp; pass `adjoint=diffrax.ForwardMode()` to \
`diffrax.diffeqsolve` (`DirectAdjoint()` works too, except with stochastic \
Runge-Kutta solvers such as ShARK unless they are built with `scan_kind="lax"`).
- optimistix: `adjoint=optx.RecursiveCheckpointAdjoint()` is a custom_vjp; the \
default `optx.ImplicitAdjoint()` works in forward mode.
- `eqx.internal.while_loop(..., kind="checkpointed")`: use `kind="lax"` or \
`kind="bounded"`.
- your own `jax.custom_vjp` or `eqx.filter_custom_vjp`: write the rule as a \
`jax.custom_jvp` (or `eqx.filter_custom_jvp`) instead; JAX derives reverse mode from \
it too.
- otherwise: estimate the directional derivatives by central finite differences, \
two extra forward passes per direction, with `derivative="central"` (step \
`finite_difference_step`) in `filter_dodge`, `filter_value_and_dodge`, \
`sharded_dodge`, `sharded_value_and_dodge` or `OnlineDodge`, and in the optax \
transforms `dodge` (every source), `adam_dodge` and `scale_by_adam_dodge`, e.g. \
`eqx_dodge.adam_dodge(1e-3, key=0, derivative="central")`.

See "Troubleshooting" in the eqx_dodge docs."""


def _custom_lin(jaxpr: jax.extend.core.Jaxpr) -> jax.extend.core.JaxprEqn | None:
    """The first `custom_lin` equation of `jaxpr` (nested ones included): what
    `jax.jvp` leaves of a `custom_vjp` whose inputs carry a tangent."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_lin":
            return eqn
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found = _custom_lin(sub)
        if found is not None:
            return found
    return None


class After(NamedTuple):
    """What the arrays a jvp's function closes over (the loss's batch, its labels)
    are made to depend on (`_depending_on`): `zero`, a boolean that is always
    false but that XLA cannot fold (it depends on what the chunks before computed,
    or on the loop's counter), and whether the floating-point arrays take it in
    too, or only the signed integer ones. The loss therefore always sees its data
    as given (a check inside it, `eqx.error_if` on the labels, sees the real
    labels)."""

    zero: Array
    floats: bool = True


def _depending_on(consts: list, after: After | None) -> list:
    """The arrays a jaxpr closes over, made to depend on `after.zero`: signed integer
    ones shifted by it, floating-point ones (if `after.floats`) scaled by `1 + zero`;
    themselves, exactly, as `zero` is false. Otherwise XLA computes what the
    chunks of directions derive from them alike once, ahead of the first chunk, and
    holds it until the last:

    - the gather indices built from the labels (an LSTM's 100 × 32 labels: 38 KiB,
        0.13 of `step_cost`'s parameters, hoisted out of the loop over chunks);
    - for unrolled chunks (`_estimator.py`, losses with a convolution on CPU), the
        copy of the batch in the layout a convolution wants (128 images of 28 × 28:
        0.4 MiB, 6 times the parameters of `step_cost`'s conv net).

    A loss with a loop keeps its floating-point data shared: a matmul reads it in
    place, and a scaled copy would be held through all the chunks. A signed integer
    array's shift is fused into what reads it (a 12.8 MB token array, sliced or
    gathered per step, gains no copy). Unsigned ones (a legacy PRNG key's data,
    uint8 pixels) stay shared: the random bits of a dropout mask drawn from a key
    in every chunk took 0.6 parameter buffers more than drawn once (an MLP
    784-256-256-10, batch 256)."""
    if after is None:
        return consts

    def depending(c):
        if not isinstance(c, jax.Array):
            return c
        if jnp.issubdtype(c.dtype, jnp.signedinteger):
            return c + after.zero.astype(c.dtype)
        if after.floats and jnp.issubdtype(c.dtype, jnp.inexact):
            return c * (1 + after.zero.astype(c.dtype))
        return c

    return [depending(c) for c in consts]


def jvp(
    fun: Callable,
    primals: tuple,
    tangents: tuple,
    *,
    has_aux: bool = False,
    after: After | None = None,
):
    """`jax.jvp`, with JAX's bare error about a `custom_vjp` explained.

    Under `jit` JAX raises that error only when the whole computation is lowered,
    outside eqx_dodge (and for a single tangent, without `vmap`, nowhere nearer). So
    the jvp is traced to a jaxpr here, checked, and evaluated into the surrounding
    trace: one trace of `fun`, as before. Every forward-mode pass of the package goes
    through here, so that each estimator raises the same `TypeError`. The arrays
    `fun` closes over are made to depend on `after`, if given (`_depending_on`).
    """

    def pushforward(primals, tangents):
        return jax.jvp(fun, primals, tangents, has_aux=has_aux)

    try:
        closed, out_dynamic, out_static = eqx.filter_make_jaxpr(pushforward)(
            primals, tangents
        )
    except ValueError as error:
        if "callbacks do not support JVP" in str(error):
            error.add_note(
                "eqx_dodge differentiates the loss in forward mode, which JAX does "
                "not define for `jax.pure_callback`. Estimate the directional "
                'derivatives by central finite differences, `derivative="central"` '
                "(with more than one direction the callback must accept a batch: "
                "give `jax.pure_callback` a `vmap_method`)."
            )
        raise
    # Dead code first: a custom_vjp whose derivative no output uses (a diagnostic in
    # the aux, a normaliser under `stop_gradient`) leaves a `custom_lin` that
    # lowering drops, as it does for `jax.jit(jax.jvp(...))`.
    jaxpr, used = dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    eqn = _custom_lin(jaxpr)
    if eqn is not None:
        source = getattr(eqn.params["bwd"], "debug_info", None)
        source = getattr(source, "func_src_info", None)
        where = f" (its backward rule: {source})" if source else ""
        raise TypeError(CUSTOM_VJP_HELP.format(where=where)) from TypeError(
            _JAX_CUSTOM_VJP_ERROR
        )
    inputs = jax.tree.leaves(eqx.filter((primals, tangents), eqx.is_array))
    inputs = [x for x, needed in zip(inputs, used, strict=True) if needed]
    consts = _depending_on(list(closed.consts), after)
    closed = jax.extend.core.ClosedJaxpr(jaxpr, consts)
    # An output that is a constant of the jaxpr (an aux leaf that does not depend on
    # the inputs, e.g. `eqx.nn.BatchNorm`'s first-time flag) comes back as a Python
    # scalar; as an array, with the dtype and weak type it was traced with, it
    # matches `eqx.filter_grad`'s aux and does not make `eqx.filter_jit` retrace.
    outputs = [
        out if isinstance(out, jax.Array) else jnp.asarray(out)
        for out in jax.extend.core.jaxpr_as_fun(closed)(*inputs)
    ]
    return eqx.combine(
        jax.tree.unflatten(jax.tree.structure(out_dynamic), outputs), out_static
    )


def vmap_with_aux(fun: Callable, out_axes: tuple, *args: Any) -> tuple:
    """`jax.vmap(fun, out_axes=out_axes)(*args)` for a `fun` whose last output is
    an aux that may hold non-array leaves (a string tag, the model itself with its
    activation functions), as `eqx.filter_grad`'s aux may: those leaves pass around
    `vmap`, traced once, and come back as they were."""
    statics = []

    def arrays_only(*inputs):
        *outputs, aux = fun(*inputs)
        dynamic, static = eqx.partition(aux, eqx.is_array)
        statics.append(static)
        return (*outputs, dynamic)

    *outputs, dynamic = jax.vmap(arrays_only, out_axes=out_axes)(*args)
    return (*outputs, eqx.combine(dynamic, statics[-1]))


def _jvp_derivatives(
    value_and_aux: Callable[[PyTree], tuple[Array, Any]],
    primal: PyTree,
    tangents: PyTree,
    after: After | None,
) -> tuple[Scalar, Array, Any]:
    """One forward pass returning `(value, d, aux)`. The primal is not batched, so
    under `vmap` it is computed only once; a single tangent runs without `vmap`."""

    def along(tangent):
        return jvp(value_and_aux, (primal,), (tangent,), has_aux=True, after=after)

    if jax.tree.leaves(tangents)[0].shape[0] == 1:
        value, derivative, aux = along(jax.tree.map(lambda t: t[0], tangents))
        return value, derivative[None], aux
    return vmap_with_aux(along, (None, 0, None), tangents)


def central_differences(
    value_and_aux: Callable[[PyTree], tuple[Any, Any]],
    primal: PyTree,
    tangents: PyTree,
    step: ScalarLike,
) -> Any:
    """`(F(θ + h t_j) − F(θ − h t_j)) / 2h` for each tangent, with `F` the first
    output of `value_and_aux` (the loss; for `OnlineDodge`, the window loss and the
    final state), leaf by leaf in each leaf's dtype (the difference is taken in at
    least float32)."""

    def value_at(tangent, sign):
        moved = jax.tree.map(
            lambda p, t: p + sign * jnp.asarray(step, p.dtype) * t.astype(p.dtype),
            primal,
            tangent,
        )
        return value_and_aux(moved)[0]

    def difference(plus: Array, minus: Array) -> Array:
        dtype = jnp.promote_types(plus.dtype, jnp.float32)
        delta = plus.astype(dtype) - minus.astype(dtype)
        return (delta / (2 * jnp.asarray(step, dtype))).astype(plus.dtype)

    def along(tangent):
        return jax.tree.map(difference, value_at(tangent, 1), value_at(tangent, -1))

    if jax.tree.leaves(tangents)[0].shape[0] == 1:
        one = along(jax.tree.map(lambda t: t[0], tangents))
        return jax.tree.map(lambda leaf: leaf[None], one)
    return jax.vmap(along)(tangents)


def directional_derivatives(
    value_and_aux: Callable[[PyTree], tuple[Array, Any]],
    primal: PyTree,
    tangents: PyTree,
    derivative: str,
    finite_difference_step: ScalarLike,
    after: After | None = None,
) -> tuple[Scalar | None, Array, Any]:
    """`(value, d, aux)` for the tangents stacked along a leading axis, with `d_j`
    the derivative along `t_j`. Central differences do not evaluate the loss at
    `primal`: their value and aux are `None` (the caller evaluates them once). In
    forward mode the arrays the loss closes over depend on `after`, if given."""
    if derivative == "central":
        derivatives = central_differences(
            value_and_aux, primal, tangents, finite_difference_step
        )
        return None, derivatives, None
    return _jvp_derivatives(value_and_aux, primal, tangents, after)
