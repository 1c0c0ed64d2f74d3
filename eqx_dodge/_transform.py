"""`dodge`: the DODGE estimator as an optax gradient transformation."""

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._directions import (
    check_num_parts,
    check_sampler,
    num_coordinates,
    partition_direction,
    random_direction,
    random_directions,
    Sampler,
    trainable,
)
from ._estimator import (
    check_direction,
    check_mode,
    check_random_options,
    directional_derivatives,
    Mode,
    unit_direction,
    value_and_estimate,
)


Source: TypeAlias = Literal["updates", "random", "ema"]
SOURCES: tuple[str, ...] = ("updates", "random", "ema")


class DodgeState(NamedTuple):
    """State of [`eqx_dodge.dodge`][]. Fields a configuration does not use are `None`.

    - `count`: the number of updates taken so far (int32 scalar).
    - `key`: the raw data (`jax.random.key_data`) of the PRNG key for random
        directions, split at every update. Raw data rather than a typed key, so that
        `eqx.tree_serialise_leaves` can save the state.
    - `average`: the moving average `ḡ` of gradient guesses (source `"ema"`).
    - `estimate`: the previous DODGE estimate (source `"ema"`), the guess used when
        no candidate comes in.
    - `baseline`: the moving average `b` of past estimates (`baseline_rate`).
    """

    count: Array
    key: PyTree
    average: PyTree
    estimate: PyTree
    baseline: PyTree


# ---------------------------------------------------------------------------------
# Helpers shared with `_adam.py`.


def check_rate(rate: Any, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise TypeError(f"`{name}` must be a float in (0, 1], got {rate!r}.")
    if not 0 < rate <= 1:
        raise ValueError(f"`{name}` must lie in (0, 1], got {rate}.")


def check_exploration(num_directions: Any, mode: str) -> None:
    """`num_directions` random directions added to a candidate: 0 is allowed."""
    if isinstance(num_directions, bool) or not isinstance(num_directions, int):
        raise TypeError(
            f"`num_directions` must be a Python int, got {num_directions!r}."
        )
    if num_directions < 0:
        raise ValueError(
            "`num_directions` (random exploration directions added to the "
            f"candidate) must be at least 0, got {num_directions}."
        )
    check_mode(mode)
    if num_directions == 0 and mode != "average":
        raise ValueError(
            "`mode` applies to random directions only; with `num_directions=0` "
            "leave it at its default."
        )


def key_data(key: Any, needed: bool, why: str) -> tuple[Array | None, Any]:
    """Validates `key` and returns `(raw key data, key implementation)`."""
    if not needed:
        if key is not None:
            raise ValueError(
                f"`key` is unused {why}; pass `key=None`, or ask for random "
                "directions with `num_directions`."
            )
        return None, None
    if key is None:
        raise ValueError(
            f"`key` is required {why}: pass a PRNG key, e.g. `key=jax.random.key(0)`, "
            "or an int seed."
        )
    if isinstance(key, bool):
        raise TypeError(f"`key` must be a PRNG key or an int seed, got {key!r}.")
    if isinstance(key, int):
        key = jax.random.key(key)
    elif isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        pass
    elif isinstance(key, jax.Array) and key.dtype == jnp.uint32:
        # A legacy `jax.random.PRNGKey`: raw data of the default implementation.
        key = jax.random.wrap_key_data(key)
    else:
        raise TypeError(
            "`key` must be a PRNG key (`jax.random.key(seed)`) or an int seed, got "
            f"{type(key).__name__}."
        )
    if key.shape != ():
        raise ValueError(f"`key` must be a single PRNG key, got shape {key.shape}.")
    return jax.random.key_data(key), jax.random.key_impl(key)


def split_key(data: Array, impl: Any) -> tuple[Array, PRNGKeyArray]:
    """Splits the stored key: `(raw data of the next state key, key for this step)`."""
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(data, impl=impl))
    return jax.random.key_data(next_key), step_key


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
    if not callable(value_fn):
        raise TypeError(f"`value_fn` must be callable, got {type(value_fn).__name__}.")
    kwargs = _value_fn_kwargs(value_fn, extra_args)
    primal = trainable(params)
    rest = eqx.filter(params, eqx.is_inexact_array, inverse=True)

    def fun(_primal):
        value = value_fn(eqx.combine(_primal, rest), **kwargs)
        if (
            not isinstance(value, jax.Array | float)
            or jnp.shape(value) != ()
            or not jnp.issubdtype(jnp.result_type(value), jnp.floating)
        ):
            raise TypeError(
                "`value_fn` must return the loss as a floating-point scalar, got "
                f"{type(value).__name__} of shape {getattr(value, 'shape', ())}."
            )
        return jnp.asarray(value)

    return fun, primal


def projected_estimate(
    fun: Callable[[PyTree], Array],
    primal: PyTree,
    candidate: PyTree,
    *,
    scale: PyTree | None,
    key: PRNGKeyArray | None,
    num_directions: int,
    sampler: Sampler,
    mode: Mode,
) -> PyTree:
    """The DODGE estimate along a candidate, plus random exploration orthogonal to it.

    Works in coordinates whitened by the positive per-coordinate `scale` `s` (`None`
    means 1): with `ū = s⊙c/‖s⊙c‖` (zero for a zero candidate) and random `r_j`
    projected orthogonally to `ū`, the tangents are `t_0 = s⊙ū` and `t_j = s⊙r̃_j`, and
    the estimate is `(g·t_0)t_0 + w Σ_j (g·t_j)t_j` (`w = 1/k` for `"average"`, 1 for
    `"partition"`). Its dot product with `g` is a sum of squares (descent), and with
    random directions its mean is `s²⊙g` whatever the candidate, because
    `E[r̃ r̃ᵀ] = I − ūūᵀ` completes `ūūᵀ` to the identity.
    """
    if scale is not None:
        candidate = optax.tree.mul(scale, candidate)
    unit = unit_direction(candidate)
    if num_directions == 0:
        tangents = jax.tree.map(lambda u: u[None], unit)
        weights = jnp.ones((1,), jnp.float32)
    else:
        assert key is not None
        if mode == "partition" or num_directions == 1:
            # One direction: `random_direction(key, primal)`, as `filter_dodge` draws.
            check_num_parts(primal, num_directions)
            base = random_direction(key, primal, sampler=sampler)
            random = partition_direction(base, num_directions)
            weight = 1.0
        else:
            random = random_directions(key, primal, num_directions, sampler)
            weight = 1 / num_directions
        overlaps = jax.vmap(lambda r: jnp.asarray(optax.tree.vdot(r, unit)))(random)

        def stack(u, r):
            overlap = overlaps.astype(r.dtype).reshape((-1,) + (1,) * u.ndim)
            projected = r - overlap * u[None]
            return jnp.concatenate([u[None], projected])

        tangents = jax.tree.map(stack, unit, random)
        weights = jnp.concatenate(
            [jnp.ones((1,), jnp.float32), jnp.full((num_directions,), weight)]
        )
    if scale is not None:
        tangents = jax.tree.map(lambda t, s: t * s[None], tangents, scale)
    _, derivatives, _ = directional_derivatives(
        fun, primal, tangents, has_aux=False, stacked=True
    )
    coefficients = weights * derivatives.astype(jnp.float32)
    return jax.tree.map(
        lambda t: jnp.tensordot(coefficients.astype(t.dtype), t, axes=1), tangents
    )


def candidate_updates(updates: Any, primal: PyTree, source: str) -> None:
    if updates is None:
        raise ValueError(
            f"The `{source!r}` source uses the incoming `updates` as the candidate "
            "direction, got `updates=None`; pass the candidate (e.g. a truncated or "
            "surrogate gradient) as the first argument of `update`."
        )
    check_direction(updates, primal, name="updates")


def _all_zero(tree: PyTree) -> Array:
    return jnp.all(
        jnp.stack([jnp.all(leaf == 0) for leaf in jax.tree.leaves(tree)] or [True])
    )


def bias_corrected(moment: PyTree, decay: Any, count: Array) -> PyTree:
    """`moment / (1 − decay^count)`, and the (zero) moment itself at count 0.

    `optax.tree.bias_correction` computes `decay**count` with an int32 `count`, which
    strict dtype promotion rejects.
    """
    power = jnp.asarray(decay, jnp.float32) ** count.astype(jnp.float32)
    correction = 1 - power
    correction = jnp.where(count > 0, correction, 1)
    return jax.tree.map(lambda m: m / correction.astype(m.dtype), moment)


def baseline_contraction(p: int, num_directions: int, sampler: str, mode: str) -> float:
    """`q` such that `E‖Σ_j w_j (e·u_j)u_j‖² = q‖e‖²` for the random directions."""
    extra = 2 if sampler == "gaussian" else 0
    if mode == "partition":
        return float(-(-p // num_directions) + extra)
    return (p + num_directions - 1 + extra) / num_directions


def check_baseline_rate(
    rate: float, primal: PyTree, num_directions: int, sampler: str, mode: str
) -> None:
    q = baseline_contraction(num_coordinates(primal), num_directions, sampler, mode)
    if rate >= 2 / q:
        raise ValueError(
            f"`baseline_rate={rate}` makes the baseline diverge for these "
            f"{num_coordinates(primal)} parameters: its error is multiplied by "
            f"1 - 2β + β²·{q:g} per step in mean square, so it must be below "
            f"{2 / q:.3g}; {1 / q:.3g} converges fastest."
        )


# ---------------------------------------------------------------------------------


def dodge(
    source: Source = "random",
    *,
    key: PRNGKeyArray | int | None = None,
    num_directions: int | None = None,
    sampler: Sampler = "rademacher",
    mode: Mode = "average",
    ema_rate: float | None = None,
    baseline_rate: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The DODGE gradient estimator as an optax transformation.

    Replaces the incoming updates by a DODGE estimate of the gradient of the loss,
    computed with forward-mode differentiation (`jax.jvp`) of `value_fn` at `params`:
    $\hat g = \sum_j w_j (g \cdot u_j)\, u_j$ for directions $u_j$ chosen by `source`.
    Follow it with any optimizer:

    ```python
    optim = optax.chain(eqx_dodge.dodge("random", key=0), optax.sgd(1e-2))
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    updates, opt_state = optim.update(
        None, opt_state, model, value_fn=lambda m: loss(m, x, y)
    )
    model = eqx.apply_updates(model, updates)
    ```

    **Calling `update`.** `update(updates, state, params, *, value_fn, **extra_args)`:

    - `params` is the PyTree that `value_fn` takes; it may be a whole Equinox model
        with non-array leaves. The estimate is taken with respect to its
        floating-point array leaves (`eqx.is_inexact_array`), exactly as
        `eqx.filter_grad` would; other leaves are held fixed.
    - `value_fn(params, **kwargs)` returns the scalar loss; it is evaluated once,
        under `jax.jvp`. This is the extra argument optax's line searches use. As
        there, the extra keyword arguments of `update` whose names are parameters of
        `value_fn` are passed on to it, so `update(..., value_fn=loss, x=x, y=y)`
        works for `def loss(model, x, y)`; the others are left to the other
        transforms of the chain.
    - `updates` is the candidate direction for `"updates"`, the optional gradient
        guess for `"ema"`, and ignored by `"random"` (pass `None`). When given, it
        must be shaped like `eqx.filter(params, eqx.is_inexact_array)` (e.g. the
        output of `eqx.filter_grad`).

    The output has that shape too: the estimate, with `None` at non-floating-point
    leaves. Without a baseline its dot product with the gradient is always $\ge 0$,
    so following `-learning_rate` times it is a descent step (for a small enough
    rate), whatever the candidate.

    **Sources of directions.**

    - `"updates"`: the incoming updates are a candidate $c$ (a truncated-BPTT,
        synthetic or surrogate gradient...) and the estimate is
        $(g \cdot c)\, c / \|c\|^2$, the projection of the gradient on the candidate;
        exactly $g$ when $c$ is the gradient, zero when $c$ is zero.
    - `"random"`: `num_directions` fresh random directions per step, combined by
        `mode` as in [`eqx_dodge.filter_dodge`][]; unbiased. The PRNG key lives in the
        state and is split at each update, as in `optax.add_noise`.
    - `"ema"`: the moving-average method of DODGE §3.3. The state keeps
        $\bar g \leftarrow \bar g + \alpha (\tilde g - \bar g)$, where the guess
        $\tilde g$ is the incoming updates, or the previous estimate when the updates
        are `None` or all zero, and the direction is $\bar g / \|\bar g\|$.

    With `"updates"` and `"ema"`, `num_directions = k > 0` adds `k` random
    exploration directions, projected orthogonally to the candidate direction
    $\hat c$: the estimate becomes
    $(g\cdot\hat c)\hat c + \frac{1}{k}\sum_j (g\cdot\tilde r_j)\tilde r_j$, which is
    unbiased for any candidate (the random part covers exactly what $\hat c$ misses)
    and whose variance shrinks as $\hat c$ aligns with the gradient. Without a
    candidate, `"ema"` needs this exploration to ever leave $\bar g = 0$.

    **Arguments:**

    - `source`: `"updates"`, `"random"` or `"ema"`, as above.
    - `key`: a PRNG key or an int seed; required whenever random directions are used
        and rejected otherwise.
    - `num_directions`: the number of random directions: for `"random"` (default 1)
        or the exploration directions added to the candidate for `"updates"`
        (default 0) and `"ema"` (default 1). All `1 + k` directional derivatives come
        from one vectorised forward pass.
    - `sampler`: `"rademacher"` or `"gaussian"` entries for random directions.
    - `mode`: `"average"` or `"partition"`, how `k > 1` random directions combine
        (see [`eqx_dodge.filter_value_and_dodge`][]).
    - `ema_rate`: the rate $\alpha \in (0, 1]$ of the `"ema"` moving average
        (default 0.1).
    - `baseline_rate`: for `"random"` only: if a float $\beta \in (0, 1]$, subtract
        a baseline (DODGE appendix A.1, eq 13): with $b$ the bias-corrected moving
        average, of rate $\beta$, of past estimates,
        $\hat g_b = \sum_j w_j ((g - b) \cdot u_j)\, u_j + b$. For Rademacher
        directions ($u(i)^2 = 1$) this is exactly
        $u(i)\sum_k u(k) g(k) - u(i)\sum_{k \ne i} u(k) b(k)$; for Gaussian
        directions it is the control-variate form of the same idea. It stays
        unbiased because $b$ depends on past directions only, and (Rademacher,
        one direction) its variance is $\sum_{k \ne i}(g(k) - b(k))^2$ instead of
        $\sum_{k \ne i} g(k)^2$ (eq 16). No extra forward pass: $b \cdot u$ comes out
        of the same jvp. Costs one PyTree of state. The estimate is no longer of
        the form $(g\cdot u)u$, so descent holds in expectation, not at every step.

        **Choosing $\beta$.** For a fixed gradient the baseline's error
        $e = b - g$ follows $e \leftarrow e - \beta \sum_j w_j (e\cdot u_j) u_j$,
        so $E\|e\|^2$ is multiplied by $1 - 2\beta + \beta^2 q$ at each step, with
        $q = (p + k - 1)/k$ for `"average"` ($(p + k + 1)/k$ with Gaussian
        entries)
        and $q = \lceil p/k \rceil$ for `"partition"` ($+2$ with Gaussian
        entries), $p$ the number of parameters. The baseline converges to the
        gradient (and the variance to zero) iff $\beta < 2/q$, fastest at
        $\beta = 1/q$; larger rates make it diverge, so `init` raises an error
        for them. Small rates also let $b$ follow a drifting gradient only
        slowly: the baseline pays off when the gradient changes little over about
        $q$ steps.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.DodgeState`][].

    !!! tip

        To accumulate estimates over several minibatches, put the accumulation after
        DODGE, `optax.chain(dodge(...), multi_steps.gradient_transformation())` with
        `multi_steps = optax.MultiSteps(opt, k)`.
        Wrapping DODGE inside `optax.MultiSteps` instead estimates the gradient on
        the last minibatch only (with the accumulated candidate for `"updates"`).

    !!! warning

        Candidate-based estimates (`"updates"`, `"ema"` without exploration) are
        descent directions but biased. Do not chain them into plain `optax.adam`:
        its per-coordinate scaling times the rank-one $\hat c \hat c^\top$ is not
        positive definite, so the descent guarantee is lost (DODGE appendix A).
        Use [`eqx_dodge.adam_dodge`][], which puts the scaling inside the
        direction. Unbiased estimates (`"random"`, or candidates with exploration)
        are safe to feed to `optax.adam` in expectation.
    """
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}.")
    if num_directions is None:
        num_directions = 0 if source == "updates" else 1
    if source == "random":
        check_random_options(num_directions, sampler, mode)
    else:
        check_exploration(num_directions, mode)
        check_sampler(sampler)
    average_rate = 0.1 if ema_rate is None else ema_rate
    if source == "ema":
        check_rate(average_rate, "ema_rate")
    elif ema_rate is not None:
        raise ValueError(
            f"`ema_rate` applies to `source='ema'` only, got source {source!r}."
        )
    if baseline_rate is not None:
        if source != "random":
            raise ValueError(
                "`baseline_rate` applies to `source='random'` only: a baseline keeps "
                f"random-direction estimates unbiased; got source {source!r}."
            )
        check_rate(baseline_rate, "baseline_rate")
    if num_directions == 0:
        why = f"with source {source!r} and `num_directions=0`"
    elif source == "random":
        why = "for random directions"
    else:
        why = (
            f"for the {num_directions} random exploration direction(s) of source "
            f"{source!r} (`num_directions=0` turns exploration off)"
        )
    data, impl = key_data(key, num_directions > 0, why)

    def init_fn(params):
        primal = trainable(params)
        if baseline_rate is not None:
            check_baseline_rate(baseline_rate, primal, num_directions, sampler, mode)
        zeros = optax.tree.zeros_like(primal)
        return DodgeState(
            count=jnp.zeros((), jnp.int32),
            key=data,
            average=zeros if source == "ema" else None,
            estimate=zeros if source == "ema" else None,
            baseline=zeros if baseline_rate is not None else None,
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        fun, primal = loss_of_trainable("dodge", params, value_fn, extra_args)
        if state.key is None:
            next_key, step_key = None, None
        else:
            next_key, step_key = split_key(state.key, impl)
        average = baseline = previous = None
        if source == "updates":
            candidate_updates(updates, primal, source)
            estimate = projected_estimate(
                fun,
                primal,
                updates,
                scale=None,
                key=step_key,
                num_directions=num_directions,
                sampler=sampler,
                mode=mode,
            )
        elif source == "ema":
            if updates is None:
                guess = state.estimate
            else:
                check_direction(updates, primal, name="updates")
                empty = _all_zero(updates)
                guess = jax.tree.map(
                    lambda u, e: jnp.where(empty, e, u), updates, state.estimate
                )
            average = optax.tree.update_moment(
                guess, state.average, 1 - average_rate, 1
            )
            estimate = projected_estimate(
                fun,
                primal,
                average,
                scale=None,
                key=step_key,
                num_directions=num_directions,
                sampler=sampler,
                mode=mode,
            )
            previous = estimate
        else:
            if updates is not None:
                check_direction(updates, primal, name="updates")
            if baseline_rate is not None:
                baseline = bias_corrected(
                    state.baseline, 1 - baseline_rate, state.count
                )

            def loss(_primal):
                # With a baseline, differentiate L(w) − b·w: its directional
                # derivative is (g − b)·u.
                value = fun(_primal)
                if baseline is None:
                    return value
                shift = jnp.asarray(optax.tree.vdot(baseline, _primal))
                return value - shift.astype(value.dtype)

            _, estimate, _ = value_and_estimate(
                loss,
                primal,
                key=step_key,
                direction=None,
                num_directions=num_directions,
                sampler=sampler,
                mode=mode,
                has_aux=False,
            )
            if baseline_rate is not None:
                estimate = optax.tree.add(estimate, baseline)
                baseline = optax.tree.update_moment(
                    estimate, state.baseline, 1 - baseline_rate, 1
                )
        new_state = DodgeState(
            count=jnp.asarray(optax.safe_increment(state.count)),
            key=next_key,
            average=average,
            estimate=previous,
            baseline=baseline,
        )
        return estimate, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
