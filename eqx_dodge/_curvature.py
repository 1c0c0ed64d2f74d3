r"""`curvature_aware_dodge`: a Newton step along one direction, from the first and
second directional derivatives of one nested forward-mode pass, with a safeguard.

The step of CARS (Kim, Cai, McKenzie & Yin, "Curvature-Aware Derivative-Free
Optimization"), which estimates $\nabla L\cdot u$ and $u^\top H u$ by finite
differences; here `jax.jvp` of `jax.jvp` gives both exactly. See the docs' concept
page "Curvature-aware steps".
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree, Scalar

from ._checks import (
    check_bool,
    check_nonnegative,
    check_option,
    KeyLike,
    SAMPLERS,
    ScalarLike,
    split_stored_key,
    stored_key,
)
from ._derivatives import jvp
from ._directions import check_direction, sample_direction, squared_norm
from ._live import split_live
from ._record import record_options, recording_transform
from ._tangents import unit


def slope_and_curvature(
    value_and_aux: Callable[[PyTree], tuple[Array, Any]],
    primal: PyTree,
    direction: PyTree,
) -> tuple[Scalar, Scalar, Scalar, Any]:
    r"""`(L, ∇L·u, uᵀHu, aux)` at `primal` along `direction` u: the jvp of the
    jvp, one forward pass carrying a first- and a second-order tangent."""

    def slope(_primal):
        value, derivative, aux = jvp(
            value_and_aux, (_primal,), (direction,), has_aux=True
        )
        return (value, derivative), aux

    (value, derivative), (_, curvature), aux = jvp(
        slope, (primal,), (direction,), has_aux=True
    )
    return value, derivative, curvature, aux


class CurvatureAwareDodgeState(NamedTuple):
    """State of [`eqx_dodge.curvature_aware_dodge`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `key`: raw PRNG key data for the random directions (`None` with `key=None`,
        when the direction is the incoming `updates`).
    - `accepted`, `rejected`: how many updates took the Newton step, and how many
        fell back to the plain step (int32 scalars; a skipped non-finite update
        counts in neither).
    - `curvature`: the curvature $u^\\top H u / \\|u\\|^2$ along the latest
        direction (`nan` before the first update).
    - `value`, `aux`, `notfinite_count`, `total_notfinite`: the record of the
        latest update, as described in [`eqx_dodge.dodge`][].
    """

    count: Array
    key: PyTree
    accepted: Array
    rejected: Array
    curvature: Array
    value: Array
    aux: PyTree
    notfinite_count: Array
    total_notfinite: Array


def curvature_aware_dodge(
    learning_rate: ScalarLike,
    *,
    key: KeyLike | None = None,
    sampler: str = "rademacher",
    curvature_floor: ScalarLike = 0.0,
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
    trial: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""A curvature-aware step along one direction (CARS), with a safeguard.

    At each update one direction $u$ is drawn (with `key`), or taken from the
    incoming `updates` (with `key=None`: a candidate such as a gradient guess). One
    nested forward-mode pass of `value_fn` (`jax.jvp` of `jax.jvp`) gives the slope
    $d = \nabla L\cdot u$ and the curvature $c = u^\top H u$ exactly, and the
    Newton step along $u$, the minimiser of the quadratic model
    $L + t d + \tfrac12 t^2 c$, is

    $$\Delta_{\text{Newton}} = -\frac{d}{c}\,u,$$

    the exact line minimiser along $u$ when the loss is quadratic. It does not
    depend on the length of $u$. The safeguard takes it only if

    1. the curvature along the unit direction, $c/\|u\|^2$, exceeds
        `curvature_floor` (otherwise the model has no minimiser), and
    2. the loss decreases: $L(\theta + \Delta_{\text{Newton}}) < L(\theta)$, by one
        more forward pass of `value_fn` (with `trial=True`, the default);

    and otherwise falls back to the plain DODGE step along the same direction,
    $-\eta\,d\,u$ with $\eta$ = `learning_rate` (for a candidate, scaled to unit
    length first: $-\eta (g\cdot\hat c)\hat c$, as `dodge(source="updates")`).
    The state counts the accepted and rejected Newton steps.

    The output is the update itself, signed, as optax's line searches output
    theirs: apply it with `optax.apply_updates` / `eqx.apply_updates` as it is,
    with no learning rate after it. (A transformation chained after it, e.g.
    `optax.scale(0.5)` for a damped step, changes the step after the safeguard
    checked it.)

    ```python
    optim = eqx_dodge.curvature_aware_dodge(1e-3, key=0)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    updates, opt_state = optim.update(
        None, opt_state, model, value_fn=lambda m: loss(m, x, y)
    )
    model = eqx.apply_updates(model, updates)
    ```

    `update(updates, state, params, *, value_fn, **extra_args)` is called as for
    [`eqx_dodge.dodge`][], with the same record in the state (loss, `aux`,
    non-finite counts). Its cost: the nested pass carries a first- and a
    second-order tangent, plus one forward pass for the safeguard; on the digits
    MLPs of `benchmarks/guess_quality.py` an update takes about 1.5–2 times a
    `dodge_random` update.

    Where this differs from CARS: CARS is derivative-free and estimates $d$ and
    $c$ by first- and second-order finite differences along $u$; here forward mode
    takes them exactly, and there is no finite-difference step to choose. CARS's
    safeguard, when the candidate does not decrease the loss, chooses an alternate
    step size of its own; here the alternative is the plain DODGE step, which is
    taken without a check (`learning_rate=0` stays in place instead). There is no
    `derivative="central"`: the second difference $(L_+ - 2L + L_-)/h^2$ loses
    about $\varepsilon |L| / h^2$ to rounding, too much in float32 at the steps
    that keep the first derivative accurate.

    **Arguments:**

    - `learning_rate`: $\eta \ge 0$, the learning rate of the fallback step.
    - `key`: a PRNG key (typed or legacy), an int seed or a 0-d integer array, for
        random directions; `None` (the default) takes the direction from the
        incoming `updates`, which must then be given.
    - `sampler`: `"rademacher"` or `"gaussian"` entries for random directions;
        `"orthogonal"` is accepted and draws the Rademacher direction (there is one
        direction per update, with nothing to be orthogonal to).
    - `curvature_floor`: the smallest curvature along the unit direction,
        $c/\|u\|^2$, for which the Newton step is tried (default `0.0`: any
        positive curvature). A floor bounds the Newton step by
        $|d| / (\|u\|^2 \cdot \text{floor})$ times $\|u\|$.
    - `trial`: whether the safeguard evaluates the loss after the Newton step
        (default `True`); with `False`, every step with curvature above the floor
        is taken, saving that forward pass.
    - `has_aux`, `aux_init`, `skip_nonfinite`: as for [`eqx_dodge.dodge`][]. A
        Newton step whose trial loss is not finite is rejected, not skipped.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.CurvatureAwareDodgeState`][].
    """
    check_nonnegative("learning_rate", learning_rate)
    check_option("sampler", sampler, SAMPLERS)
    check_nonnegative("curvature_floor", curvature_floor)
    check_bool("trial", trial)
    record = record_options(has_aux, aux_init, skip_nonfinite)
    data, impl = (None, None)
    if key is not None:
        data, impl = stored_key(key, True, "for random directions")

    def init(params, initial_record):
        del params
        zero = jnp.zeros((), jnp.int32)
        nan = jnp.array(jnp.nan, jnp.float32)
        return CurvatureAwareDodgeState(zero, data, zero, zero, nan, *initial_record)

    def step(updates, state, fun, primal):
        next_key = state.key
        split = split_live(fun, primal, has_aux=True)
        if updates is not None:
            check_direction(updates, primal, name="updates")
        if data is None:
            if updates is None:
                raise ValueError(
                    "`curvature_aware_dodge(key=None)` steps along the incoming "
                    "`updates` (a candidate direction), got `updates=None`; pass the "
                    "candidate as the first argument of `update`, or a `key` for "
                    "random directions."
                )
            direction = unit(split.restrict(updates))
        else:
            next_key, step_key = split_stored_key(state.key, impl)
            direction = sample_direction(step_key, split.live, sampler)
        live_fun = split.of(fun)
        value, slope, curvature, aux = slope_and_curvature(
            live_fun, split.live, direction
        )
        # The step is formed in at least float32 (float64 for float64 leaves), so
        # that a half-precision loss does not round the Newton step.
        squared = squared_norm(direction)
        wide = jnp.promote_types(value.dtype, squared.dtype)
        slope, curvature = slope.astype(wide), curvature.astype(wide)
        squared = squared.astype(wide)
        unit_curvature = curvature / jnp.where(squared > 0, squared, 1)
        floor = jnp.asarray(curvature_floor, wide)
        curved = (squared > 0) & (unit_curvature > floor)
        newton = -slope / jnp.where(curved, curvature, 1)

        def along(scale):
            return jax.tree.map(
                lambda u: (scale * u.astype(wide)).astype(u.dtype), direction
            )

        accept = curved
        if trial:
            moved = jax.tree.map(jnp.add, split.live, along(newton))
            accept = accept & (live_fun(moved)[0] < value)
        fallback = -jnp.asarray(learning_rate, wide) * slope
        output = along(jnp.where(accept, newton, fallback))
        new_state = state._replace(
            key=next_key,
            accepted=state.accepted + accept.astype(jnp.int32),
            rejected=state.rejected + (~accept).astype(jnp.int32),
            curvature=unit_curvature.astype(jnp.float32),
        )
        return split.widen(output), new_state, value, aux, None

    return recording_transform("curvature_aware_dodge", record, init, step)
