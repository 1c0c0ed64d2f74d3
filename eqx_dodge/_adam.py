"""`adam_dodge`: Adam driven by DODGE estimates, with steps bounded like Adam's."""

from typing import Any, cast, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree

from ._checks import (
    check_candidate_options,
    check_decay,
    check_int,
    check_nonnegative,
    check_option,
    check_random_options,
    derivative_options,
    DerivativeOptions,
    FINITE_DIFFERENCE_STEP,
    KeyLike,
    ScalarLike,
    split_stored_key,
    stored_key,
)
from ._directions import accumulation_dtype, scale_to_unit, squared_norm, trainable
from ._estimator import live_estimate, run_tangents, value_and_aux_of
from ._live import split_live
from ._record import record_options, recording_transform, RecordOptions
from ._tangents import fixed_tangents, random_tangents
from ._value_fn import candidate_of


ADAM_SOURCES: tuple[str, ...] = ("random", "updates")


class ScaleByAdamDodgeState(NamedTuple):
    """State of [`eqx_dodge.scale_by_adam_dodge`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `mu`, `nu`: Adam's first and second moments, of the DODGE estimates (source
        `"random"`) or of the candidates (source `"updates"`).
    - `key`: raw PRNG key data for the random directions (`None` for `"updates"`).
    - `value`, `aux`, `notfinite_count`, `total_notfinite`: the record of the
        latest update, as described in [`eqx_dodge.scale_by_adam_dodge`][].
    """

    count: Array
    mu: PyTree
    nu: PyTree
    key: PyTree
    value: Array
    aux: PyTree
    notfinite_count: Array
    total_notfinite: Array


def bias_corrected(moment: PyTree, decay: Any, count: Array) -> PyTree:
    """`moment / (1 − decay^count)`. (`optax.tree.bias_correction` raises `decay**count`
    to an int32 power, which strict dtype promotion rejects.) In at least float32,
    float64 for float64 moments."""
    dtype = accumulation_dtype(moment)
    correction = 1 - jnp.asarray(decay, dtype) ** count.astype(dtype)
    return jax.tree.map(lambda m: m / correction.astype(m.dtype), moment)


def _adam_step(
    sample: PyTree, state: ScaleByAdamDodgeState, b1, b2, eps, eps_root
) -> tuple[PyTree, PyTree, PyTree, PyTree, Array]:
    """Adam's moments updated with `sample` and the step `m̂/(√(v̂ + eps_root) + eps)`,
    exactly as `optax.scale_by_adam` computes them. Returns
    `(step, mu, nu, mu_hat, count)`."""
    count = jnp.asarray(optax.safe_increment(state.count))
    mu = optax.tree.update_moment(sample, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(sample, state.nu, b2, 2)
    mu_hat = bias_corrected(mu, b1, count)
    nu_hat = bias_corrected(nu, b2, count)
    step = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    return step, mu, nu, mu_hat, count


def _init(key_data: Array | None):
    """`init` of both sources: zero moments, and the raw key data of `"random"`."""

    def init(params, initial_record):
        zeros = optax.tree.zeros_like(trainable(params))
        zero = jnp.zeros((), jnp.int32)
        return ScaleByAdamDodgeState(zero, zeros, zeros, key_data, *initial_record)

    return init


def _scale_by_adam_dodge_random(
    b1,
    b2,
    eps,
    eps_root,
    key,
    num_directions: int,
    sampler: str,
    mode: str,
    record: RecordOptions,
    derivatives: DerivativeOptions,
) -> optax.GradientTransformationExtraArgs:
    check_random_options(num_directions, sampler, mode)
    data, impl = stored_key(key, True, "for random directions")

    def step(updates, state, fun, primal):
        del updates
        next_key, step_key = split_stored_key(state.key, impl)
        split = split_live(fun, primal, has_aux=True)
        tangents = random_tangents(step_key, split.live, num_directions, sampler, mode)
        value, estimate, aux = live_estimate(fun, split, tangents, derivatives)
        adam_step, mu, nu, _, _ = _adam_step(estimate, state, b1, b2, eps, eps_root)
        new_state = state._replace(mu=mu, nu=nu, key=next_key)
        return adam_step, new_state, value, aux, None

    return recording_transform("scale_by_adam_dodge", record, _init(data), step)


def _descent_scale(
    fun, primal: PyTree, step: PyTree, mu_hat: PyTree, derivatives: DerivativeOptions
) -> tuple[Array, Array, Any]:
    """`(s, value, aux)`: `s = (g·a)/(m̂·a)` clipped to `[−1, 1]`, for Adam's step
    `a`: `s·a` is the appendix-A output `(g·u)u`, `u = a/√(m̂·a)`, bounded by Adam's
    own step. `g·a` is the derivative along `a/‖a‖` (the finite-difference step is
    taken along that unit vector) times `‖a‖`."""
    norm_squared = squared_norm(step)
    value, (derivative,), aux, _ = run_tangents(
        value_and_aux_of(fun, True),
        primal,
        fixed_tangents(
            jax.tree.map(lambda a: a[None], scale_to_unit(step, norm_squared)),
            jnp.ones((1,), jnp.float32),
        ),
        **derivatives._asdict(),
    )
    dtype = norm_squared.dtype  # at least float32, float64 for float64 steps
    along = derivative.astype(dtype) * jnp.sqrt(norm_squared)  # g·a
    alignment = jnp.asarray(optax.tree.vdot(mu_hat, step), dtype)  # m̂·a ≥ 0
    positive = alignment > 0
    ratio = jnp.where(positive, along / jnp.where(positive, alignment, 1), 0)
    return jnp.clip(ratio, -1, 1), value, aux


def _scale_by_adam_dodge_updates(
    b1, b2, eps, eps_root, record: RecordOptions, derivatives: DerivativeOptions
) -> optax.GradientTransformationExtraArgs:
    def step(updates, state, fun, primal):
        # Projected onto the live leaves, so that dead ones keep zero moments.
        candidate = split_live(fun, primal, has_aux=True).project(
            candidate_of(updates, primal, "updates")
        )
        adam_step, mu, nu, mu_hat, _ = _adam_step(
            candidate, state, b1, b2, eps, eps_root
        )
        scale, value, aux = _descent_scale(fun, primal, adam_step, mu_hat, derivatives)
        output = jax.tree.map(lambda a: scale.astype(a.dtype) * a, adam_step)
        new_state = state._replace(mu=mu, nu=nu)
        return output, new_state, value, aux, candidate

    return recording_transform("scale_by_adam_dodge", record, _init(None), step)


def scale_by_adam_dodge(
    b1: ScalarLike = 0.9,
    b2: ScalarLike = 0.999,
    eps: ScalarLike = 1e-8,
    eps_root: ScalarLike = 0.0,
    *,
    source: str = "random",
    key: KeyLike | None = None,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's rescaling for DODGE: the counterpart of `optax.scale_by_adam`.

    Two sources, with the same bound on the step: every output coordinate is at
    most Adam's own step $|\hat m_i| / (\sqrt{\hat v_i} + \epsilon)$ in size,
    whatever the scale of the gradient, also for coordinates whose moments are
    still zero.

    - `"random"` (no candidate): $m$ and $v$ are Adam's moments of the unbiased
        DODGE estimates $\hat g = \sum_j w_j (g\cdot u_j)u_j$ along
        `num_directions` random directions, and the output is Adam's step
        $\hat m/(\sqrt{\hat v + \epsilon_{root}} + \epsilon)$: exactly
        `optax.chain(eqx_dodge.dodge(key=...), optax.scale_by_adam(...))`, with
        the key in the state. With exact estimates (`mode="partition"`,
        `num_directions` = the number of parameters) it takes `optax.adam`'s
        steps.
    - `"updates"`: the incoming updates are a candidate gradient $c$ (a
        truncated-BPTT or surrogate gradient). $m$ and $v$ are Adam's moments of
        the candidates and $a = \hat m/(\sqrt{\hat v} + \epsilon)$ Adam's step.
        Adam's diagonal scaling of a biased candidate is not a descent direction
        in general; the DODGE paper's appendix A puts the scaling inside the
        direction instead, $u = a/\sqrt{\hat m \cdot a}$ and output
        $(g\cdot u)u = s\,a$ with $s = (g\cdot a)/(\hat m\cdot a)$, one jvp
        along $a$. Then $g\cdot \text{output} = (g\cdot a)^2/(\hat m \cdot a)
        \ge 0$: a descent direction for every candidate. Here $s$ is clipped to
        $[-1, 1]$ so that the step never exceeds Adam's (unclipped, it grows like
        $\|g\|/\|c\|$ when the candidates are small). When $c$ is the
        gradient and $\hat m$ points where $g$ does (a linear loss), $s = 1$ and
        the step is Adam's; on curved losses Adam's momentum $\hat m$ lags $g$,
        $s < 1$, and the projected step is shorter than Adam's.

    **Arguments:**

    - `b1`, `b2`: the decay rates of the first and second moments, in $[0, 1)$.
    - `eps`: added to $\sqrt{\hat v}$, as in Adam.
    - `eps_root`: added to $\hat v$ inside the square root, as in Adam.
    - `source`: `"random"` or `"updates"`, as above.
    - `key`: a PRNG key or an int seed, for `"random"` (rejected for `"updates"`).
    - `num_directions`: the number of directions evaluated at each step; random
        directions for `"random"`; `"updates"` evaluates its one direction.
    - `sampler`: `"rademacher"`, `"gaussian"` or `"orthogonal"` (`k > 1` directions
        exactly orthogonal to each other), as in [`eqx_dodge.filter_value_and_dodge`][].
    - `mode`: `"average"` or `"partition"`, how random directions combine.
    - `has_aux`, `aux_init`: with `has_aux=True`, `value_fn` returns
        `(loss, aux)` and the state keeps the latest `aux`, starting from
        `aux_init`, as for [`eqx_dodge.dodge`][].
    - `skip_nonfinite`: skip updates whose loss, estimate or candidate is not
        finite (the default): the output is zero and the moments stay as they
        were, so one NaN loss cannot poison them; the key moves on and the state
        counts the skipped updates. See [`eqx_dodge.dodge`][].
    - `derivative`, `finite_difference_step`: how each directional derivative is
        taken, `"jvp"` (the default) or `"central"` finite differences with step
        $h$, as for [`eqx_dodge.dodge`][], for losses that forward mode cannot
        differentiate (a `jax.custom_vjp` inside). With `"updates"` the step is
        taken along Adam's step $a$ scaled to unit norm.
    - `chunk_size`: how many of the random directions one vectorised jvp carries,
        as for [`eqx_dodge.dodge`][].

    Calling `update` and the optax wrappers work as for [`eqx_dodge.dodge`][]; the
    loss of each update is in the state's `value`
    (`optax.tree.get(opt_state, "value")` also finds it inside `adam_dodge`'s chain).

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.ScaleByAdamDodgeState`][]. Its output has the sign of the gradient,
    like `optax.scale_by_adam`: follow it by a negative scaling.
    """
    check_option("source", source, ADAM_SOURCES)
    check_decay("b1", b1)
    check_decay("b2", b2)
    check_nonnegative("eps", eps)
    check_nonnegative("eps_root", eps_root)
    record = record_options(has_aux, aux_init, skip_nonfinite)
    derivatives = derivative_options(derivative, finite_difference_step, chunk_size)
    if source == "random":
        return _scale_by_adam_dodge_random(
            b1,
            b2,
            eps,
            eps_root,
            key,
            num_directions,
            sampler,
            mode,
            record,
            derivatives,
        )
    check_int("num_directions", num_directions, 1)
    if num_directions != 1:
        raise ValueError(
            "`num_directions` must be 1 with `source='updates'`: it evaluates the "
            "direction of Adam's step along the candidates' moments alone."
        )
    stored_key(key, False, "with source 'updates'")
    check_random_options(num_directions, sampler, mode)
    check_candidate_options(num_directions, mode, sampler)
    return _scale_by_adam_dodge_updates(b1, b2, eps, eps_root, record, derivatives)


def adam_dodge(
    learning_rate: optax.ScalarOrSchedule,
    b1: ScalarLike = 0.9,
    b2: ScalarLike = 0.999,
    eps: ScalarLike = 1e-8,
    eps_root: ScalarLike = 0.0,
    *,
    source: str = "random",
    key: KeyLike | None = None,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam for DODGE: a drop-in replacement for `optax.adam` that needs no gradient.

    `optax.chain(scale_by_adam_dodge(...), optax.scale_by_learning_rate(lr))`; see
    [`eqx_dodge.scale_by_adam_dodge`][] for the method and the sources of the moments.

    ```python
    optim = eqx_dodge.adam_dodge(1e-3, key=0, num_directions=8)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    updates, opt_state = optim.update(
        None, opt_state, model, value_fn=lambda m: loss(m, x, y)
    )
    model = eqx.apply_updates(model, updates)
    ```

    **Arguments:**

    - `learning_rate`: a float or an optax schedule, as for `optax.adam`.
    - `b1`, `b2`, `eps`, `eps_root`, `source`, `key`, `num_directions`, `sampler`,
        `mode`, `has_aux`, `aux_init`, `skip_nonfinite`, `derivative`,
        `finite_difference_step`, `chunk_size`: as for
        [`eqx_dodge.scale_by_adam_dodge`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs`.
    """
    chain = optax.chain(
        scale_by_adam_dodge(
            b1,
            b2,
            eps,
            eps_root,
            source=source,
            key=key,
            num_directions=num_directions,
            sampler=sampler,
            mode=mode,
            has_aux=has_aux,
            aux_init=aux_init,
            skip_nonfinite=skip_nonfinite,
            derivative=derivative,
            finite_difference_step=finite_difference_step,
            chunk_size=chunk_size,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    if not (callable(learning_rate) and skip_nonfinite):
        return chain
    return _schedule_holds_when_skipped(chain)


def _schedule_holds_when_skipped(
    chain: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
    """`chain`, whose learning-rate schedule (its second state) keeps its count on a
    step that `scale_by_adam_dodge` skipped (a non-finite one), as Adam's count
    does: otherwise skipped steps would use up the schedule's warm-up or decay, as
    they do not in `optax.apply_if_finite(optax.adam(schedule))`."""

    def update_fn(updates, state, params=None, **extra_args):
        updates, new_state = chain.update(updates, state, params, **extra_args)
        adam, schedule = cast(tuple, new_state)
        schedule = optax.tree.where(adam.notfinite_count > 0, state[1], schedule)
        return updates, (adam, schedule)

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)
