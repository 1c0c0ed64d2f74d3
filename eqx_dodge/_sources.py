"""One optax builder per source of directions, each with its own state:
`dodge_random`, `dodge_updates` and `dodge_ema`. `dodge` dispatches among them."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree

from ._checks import (
    check_decay,
    check_random_options,
    derivative_options,
    DerivativeOptions,
    FINITE_DIFFERENCE_STEP,
    KeyLike,
    ScalarLike,
    shapes_random_directions,
    split_stored_key,
    stored_key,
)
from ._directions import check_direction, num_coordinates, trainable
from ._estimator import live_estimate
from ._live import split_live
from ._record import record_options, recording_transform
from ._tangents import explored_tangents, random_tangents
from ._value_fn import candidate_of


def _explored_estimate(
    fun,
    primal: PyTree,
    candidate: PyTree,
    key: Any,
    derivatives: DerivativeOptions,
    **options: Any,
) -> tuple[Array, PyTree, Any]:
    """`(value, estimate, aux)` along the candidate (projected onto the live leaves)
    and its random exploration directions."""
    split = split_live(fun, primal, has_aux=True)
    tangents = explored_tangents(
        split.live, split.restrict(candidate), key=key, **options
    )
    return live_estimate(fun, split, tangents, derivatives)


def _step_keys(data: Array | None, impl: Any) -> tuple[Array | None, Any]:
    return (None, None) if data is None else split_stored_key(data, impl)


def _exploration_key(
    key: Any, num_directions: int, mode: str, sampler: str, source: str
):
    if num_directions == 1 and shapes_random_directions(mode, sampler):
        raise ValueError(
            f"`mode` and `sampler` shape the random exploration directions of source "
            f"{source!r}; with `num_directions=1` there are none: leave them at their "
            "defaults ('average' and 'rademacher'), or add exploration directions "
            "with `num_directions > 1`."
        )
    why = (
        f"for the {num_directions - 1} random exploration direction(s) of source "
        f"{source!r} (`num_directions=1` evaluates the candidate alone)"
        if num_directions > 1
        else f"with source {source!r} and `num_directions=1` (the candidate alone)"
    )
    return stored_key(key, num_directions > 1, why)


class DodgeRandomState(NamedTuple):
    """State of [`eqx_dodge.dodge_random`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `key`: the raw data (`jax.random.key_data`) of the PRNG key, split at every
        update; raw data so that `eqx.tree_serialise_leaves` can save it.
    - `baseline`: the moving average `b` of past estimates (`None` without
        `baseline_decay`).
    - `value`, `aux`, `notfinite_count`, `total_notfinite`: the record of the
        latest update, as described in [`eqx_dodge.dodge`][].
    """

    count: Array
    key: PyTree
    baseline: PyTree
    value: Array
    aux: PyTree
    notfinite_count: Array
    total_notfinite: Array


def baseline_contraction(p: int, num_directions: int, sampler: str, mode: str) -> float:
    """`q` such that `E‖Σ_j w_j (e·u_j)u_j‖² ≤ q‖e‖²` for the random directions
    (with equality for averaged Rademacher and Gaussian ones, and for equal
    partition blocks; an upper bound, the largest coefficient, otherwise)."""
    extra = 2 if sampler == "gaussian" else 0
    if sampler == "orthogonal" and num_directions > 1:
        # `(B + k⌈t/k⌉)/k` with `t = p mod K` tail coordinates and `B = p − t`: the
        # largest coefficient of `e_c²` in the second moment (docs, "Multiple
        # directions"); `p/k` when `K` divides `p`.
        rows = 1 << (num_directions - 1).bit_length()
        tail = p % rows
        return (p - tail) / num_directions + -(-tail // num_directions)
    if mode == "partition":
        return float(-(-p // num_directions) + extra)
    return (p + num_directions - 1 + extra) / num_directions


def _check_baseline(decay: Any, primal: PyTree, k: int, sampler: str, mode: str):
    """Refuses a decay that makes the baseline diverge, also one that comes as a
    concrete array (`optax.inject_hyperparams` passes its hyperparameters so to
    `init`); a traced one (`init` under `jit`) cannot be checked."""
    p = num_coordinates(primal)
    if p == 0:
        return  # no parameter (an empty `optax.masked` group): no baseline to fit
    try:
        decay = float(decay)
    except jax.errors.ConcretizationTypeError:
        return
    q = baseline_contraction(p, k, sampler, mode)
    if 1 - decay >= 2 / q:
        raise ValueError(
            f"`baseline_decay={decay}` makes the baseline diverge for these {p} "
            f"parameters: with rate β = 1 − baseline_decay its error is multiplied "
            f"by 1 − 2β + β²·{q:g} per step in mean square, so β must be below "
            f"{2 / q:.3g} (`baseline_decay` above {1 - 2 / q:.6g}); β = {1 / q:.3g} "
            "converges fastest."
        )


def dodge_random(
    key: KeyLike,
    *,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    baseline_decay: ScalarLike | None = None,
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DODGE with fresh random directions at every step: `dodge(source="random")`.

    The unbiased estimate $\sum_j w_j (g\cdot u_j) u_j$ of the gradient of
    `value_fn` at `params`; see [`eqx_dodge.dodge`][] for how to call `update` and
    for `baseline_decay`.

    **Arguments:** `key`, `num_directions`, `sampler`, `mode`, `baseline_decay`,
    `has_aux`, `aux_init`, `skip_nonfinite`, `derivative`, `finite_difference_step`,
    `chunk_size`,
    as for [`eqx_dodge.dodge`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.DodgeRandomState`][].
    """
    check_random_options(num_directions, sampler, mode)
    if baseline_decay is not None:
        check_decay("baseline_decay", baseline_decay)
    record = record_options(has_aux, aux_init, skip_nonfinite)
    derivatives = derivative_options(derivative, finite_difference_step, chunk_size)
    data, impl = stored_key(key, True, "for random directions")

    def init(params, initial_record):
        primal = trainable(params)
        baseline = None
        if baseline_decay is not None:
            _check_baseline(baseline_decay, primal, num_directions, sampler, mode)
            baseline = optax.tree.zeros_like(primal)
        zero = jnp.zeros((), jnp.int32)
        return DodgeRandomState(zero, data, baseline, *initial_record)

    def step(updates, state, fun, primal):
        if updates is not None:
            check_direction(updates, primal, name="updates")
        next_key, step_key = split_stored_key(state.key, impl)
        split = split_live(fun, primal, has_aux=True)
        tangents = random_tangents(step_key, split.live, num_directions, sampler, mode)
        baseline = state.baseline
        if baseline is None:
            value, estimate, aux = live_estimate(fun, split, tangents, derivatives)
        else:
            # Differentiate L(w) − b·w, whose directional derivative is (g − b)·u,
            # then add b back: unbiased, since b depends on past directions only.
            def shifted(_primal):
                value, aux = fun(_primal)
                shift = jnp.asarray(optax.tree.vdot(baseline, _primal))
                return value - shift.astype(value.dtype), (value, aux)

            _, estimate, (value, aux) = live_estimate(
                shifted, split, tangents, derivatives
            )
            estimate = optax.tree.add(estimate, split.project(baseline))
            baseline = optax.tree.update_moment(estimate, baseline, baseline_decay, 1)
        new_state = state._replace(key=next_key, baseline=baseline)
        return estimate, new_state, value, aux, None

    return recording_transform("dodge_random", record, init, step)


class DodgeUpdatesState(NamedTuple):
    """State of [`eqx_dodge.dodge_updates`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `key`: raw PRNG key data for the exploration directions (`None` when
        `num_directions=1`).
    - `value`, `aux`, `notfinite_count`, `total_notfinite`: the record of the
        latest update, as described in [`eqx_dodge.dodge`][].
    """

    count: Array
    key: PyTree
    value: Array
    aux: PyTree
    notfinite_count: Array
    total_notfinite: Array


def dodge_updates(
    *,
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
    r"""DODGE along the incoming updates as a candidate: `dodge(source="updates")`.

    The estimate $(g\cdot\hat c)\hat c$ for the candidate $c$ passed as `updates`,
    plus `num_directions − 1` random exploration directions orthogonal to it; see
    [`eqx_dodge.dodge`][].

    **Arguments:** `key`, `num_directions`, `sampler`, `mode`, `has_aux`,
    `aux_init`, `skip_nonfinite`, `derivative`, `finite_difference_step`, `chunk_size`,
    as for
    [`eqx_dodge.dodge`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.DodgeUpdatesState`][].
    """
    check_random_options(num_directions, sampler, mode)
    record = record_options(has_aux, aux_init, skip_nonfinite)
    data, impl = _exploration_key(key, num_directions, mode, sampler, "updates")
    derivatives = derivative_options(derivative, finite_difference_step, chunk_size)
    options = dict(num_directions=num_directions, sampler=sampler, mode=mode)

    def init(params, initial_record):
        del params
        return DodgeUpdatesState(jnp.zeros((), jnp.int32), data, *initial_record)

    def step(updates, state, fun, primal):
        candidate = candidate_of(updates, primal, "updates")
        next_key, step_key = _step_keys(state.key, impl)
        value, estimate, aux = _explored_estimate(
            fun, primal, candidate, step_key, derivatives, **options
        )
        new_state = state._replace(key=next_key)
        return estimate, new_state, value, aux, None

    return recording_transform("dodge_updates", record, init, step)


class DodgeEmaState(NamedTuple):
    """State of [`eqx_dodge.dodge_ema`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `key`: raw PRNG key data for the exploration directions (`None` when
        `num_directions=1`).
    - `average`: the moving average `ḡ` of gradient guesses.
    - `estimate`: the previous estimate, the guess used when no candidate comes in.
    - `value`, `aux`, `notfinite_count`, `total_notfinite`: the record of the
        latest update, as described in [`eqx_dodge.dodge`][].
    """

    count: Array
    key: PyTree
    average: PyTree
    estimate: PyTree
    value: Array
    aux: PyTree
    notfinite_count: Array
    total_notfinite: Array


def _all_zero(tree: PyTree) -> Array:
    return jnp.all(
        jnp.stack([jnp.all(leaf == 0) for leaf in jax.tree.leaves(tree)] or [True])
    )


def dodge_ema(
    *,
    key: KeyLike | None = None,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    ema_decay: ScalarLike = 0.9,
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DODGE along a moving average of gradient guesses: `dodge(source="ema")`.

    See [`eqx_dodge.dodge`][].

    **Arguments:** `key`, `num_directions`, `sampler`, `mode`, `ema_decay`,
    `has_aux`, `aux_init`, `skip_nonfinite`, `derivative`, `finite_difference_step`,
    `chunk_size`,
    as for [`eqx_dodge.dodge`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.DodgeEmaState`][].
    """
    check_random_options(num_directions, sampler, mode)
    check_decay("ema_decay", ema_decay)
    record = record_options(has_aux, aux_init, skip_nonfinite)
    data, impl = _exploration_key(key, num_directions, mode, sampler, "ema")
    derivatives = derivative_options(derivative, finite_difference_step, chunk_size)
    options = dict(num_directions=num_directions, sampler=sampler, mode=mode)

    def init(params, initial_record):
        zeros = optax.tree.zeros_like(trainable(params))
        zero = jnp.zeros((), jnp.int32)
        return DodgeEmaState(zero, data, zeros, zeros, *initial_record)

    def step(updates, state, fun, primal):
        if updates is None and num_directions == 1:
            raise ValueError(
                "`dodge(source='ema')` with `num_directions=1` differentiates along "
                "its moving average of gradient guesses alone, and with "
                "`updates=None` it has no guess: the average, and every update, "
                "would stay zero. Pass gradient guesses as the `updates` (e.g. "
                "truncated-BPTT gradients), or explore with `num_directions >= 2` "
                "and a `key`."
            )
        guess = state.estimate
        if updates is not None:
            check_direction(updates, primal, name="updates")
            empty = _all_zero(updates)
            guess = jax.tree.map(lambda u, e: jnp.where(empty, e, u), updates, guess)
        average = optax.tree.update_moment(guess, state.average, ema_decay, 1)
        next_key, step_key = _step_keys(state.key, impl)
        value, estimate, aux = _explored_estimate(
            fun, primal, average, step_key, derivatives, **options
        )
        new_state = state._replace(key=next_key, average=average, estimate=estimate)
        return estimate, new_state, value, aux, None

    return recording_transform("dodge_ema", record, init, step)
