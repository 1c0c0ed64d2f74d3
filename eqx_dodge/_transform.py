"""`dodge`: the DODGE estimator as an optax gradient transformation, dispatching to one
builder per source of directions (as optax's `alias.py` composes its builders)."""

from typing import Any

import optax
from jaxtyping import PyTree

from ._checks import (
    check_chunk_size,
    check_derivative_options,
    check_option,
    check_record_options,
    FINITE_DIFFERENCE_STEP,
    KeyLike,
    ScalarLike,
)
from ._sources import dodge_ema, dodge_random, dodge_updates


SOURCES: tuple[str, ...] = ("random", "updates", "ema")


def dodge(
    *,
    source: str = "random",
    key: KeyLike | None = None,
    num_directions: int = 1,
    sampler: str = "rademacher",
    mode: str = "average",
    ema_decay: ScalarLike | None = None,
    baseline_decay: ScalarLike | None = None,
    has_aux: bool = False,
    aux_init: PyTree = None,
    skip_nonfinite: bool = True,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The DODGE gradient estimator as an optax transformation.

    Replaces the incoming updates by a DODGE estimate of the gradient of the loss,
    computed with forward-mode differentiation (`jax.jvp`) of `value_fn` at `params`
    (or central finite differences, with `derivative="central"`):
    $\hat g = \sum_j w_j (g \cdot u_j)\, u_j$ for directions $u_j$ chosen by `source`.
    Follow it with any optimizer:

    ```python
    optim = optax.chain(eqx_dodge.dodge(key=0), optax.sgd(1e-2))
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
        under `jax.jvp` (`2k + 1` times, without it, with `derivative="central"`).
        This is the extra argument optax's line searches use. As there, the extra
        keyword arguments of `update` whose names are parameters of `value_fn`
        are passed on to it, so `update(..., value_fn=loss, x=x, y=y)`
        works for `def loss(model, x, y)`; the others are left to the other
        transforms of the chain. `updates`, `state` and `params` cannot reach
        `value_fn` that way (they are `update`'s own arguments): bind them,
        `value_fn=functools.partial(loss, state=bn_state)` or a `lambda`.
        With `has_aux=True`, `value_fn` returns `(loss, aux)`.
    - `updates` is the candidate direction for `"updates"`, the optional gradient
        guess for `"ema"`, and ignored by `"random"` (pass `None`). When given, it
        must be shaped like `eqx.filter(params, eqx.is_inexact_array)` (e.g. the
        output of `eqx.filter_grad`).

    The output has that shape too: the estimate, with `None` at non-floating-point
    leaves. Without a baseline its dot product with the gradient is always
    $\ge 0$, so following `-learning_rate` times it is a descent step (for a small
    enough rate), whatever the candidate.

    **The record in the state.** Every state ends with four fields, filled in at
    each `update` from the same forward pass as the estimate:

    - `value`: the loss at `params` (`inf` before the first update), as optax's
        line searches store it: `optax.tree.get(opt_state, "value")` finds it in
        a chain (e.g. for logging, or `optax.contrib.reduce_on_plateau`).
    - `aux`: with `has_aux=True`, the `aux` that `value_fn` returned at the latest
        finite update (`aux_init` before the first), e.g. the new `eqx.nn.State`
        of a BatchNorm model; `None` otherwise.
    - `notfinite_count`, `total_notfinite`: as in `optax.apply_if_finite`, the
        number of consecutive updates, and of all updates, whose loss or estimate
        was not finite (NaN or ±inf).

    With `skip_nonfinite=True` (the default) such an update is skipped: its
    output is zero and the state is left as it was (moments, baseline, averages,
    `count`, `aux`) except that the PRNG key moves on, so that every key is used
    once, and that `value` and the counts record the step. With
    `skip_nonfinite=False` the non-finite estimate is returned and stored as is,
    as in optax, and only counted. Skipped steps are never silent: check
    `total_notfinite`.

    **Inside optax wrappers.**

    - `optax.MultiSteps` cannot wrap DODGE transforms (`init` raises an error): it
        would estimate on the last minibatch of each group only. Accumulate the
        estimates after DODGE instead:
        `optax.chain(dodge(key=...), optax.MultiSteps(optax.adam(lr), k))`.
    - `optax.apply_if_finite`, `optax.masked` and `optax.partition` map over the
        incoming `updates`, so pass a tree there rather than `None`: the candidate
        for `"updates"`, zeros (`optax.tree.zeros_like(params)`) otherwise.
        `apply_if_finite` checks those incoming updates, before the estimate
        exists; non-finite losses are caught by `skip_nonfinite`.
    - Inside `optax.masked` / `optax.partition`, `params` reaches `value_fn` as the
        group this transform owns, with `None` at the other leaves; rebuild the
        model with the one the training loop holds,
        `value_fn=lambda p: loss(eqx.combine(p, model), x, y)`, and only the owned
        leaves are differentiated.
    - Wrappers that do arithmetic on `params` themselves (`MultiSteps`,
        `inject_hyperparams`, `contrib.schedule_free`) need a tree of arrays: pass
        `params=eqx.filter(model, eqx.is_inexact_array)` to `init` and `update`,
        and rebuild the model in `value_fn` as above. See the docs page "Optax
        wrappers and training loops".

    **Sources of directions.**

    - `"updates"`: the incoming updates are a candidate $c$ (a truncated-BPTT,
        synthetic or surrogate gradient...) and the estimate is
        $(g \cdot c)\, c / \|c\|^2$, the projection of the gradient on the candidate;
        exactly $g$ when $c$ is the gradient, zero when $c$ is zero.
    - `"random"`: `num_directions` fresh random directions per step, combined by
        `mode` as in [`eqx_dodge.filter_dodge`][]; unbiased. The PRNG key lives in the
        state and is split at each update, as in `optax.add_noise`.
    - `"ema"`: the moving-average method of the DODGE paper (§3.3). The state keeps
        $\bar g \leftarrow \lambda \bar g + (1 - \lambda) \tilde g$ with
        $\lambda$ = `ema_decay`, where the guess
        $\tilde g$ is the incoming updates, or the previous estimate when the updates
        are `None` or all zero, and the direction is $\bar g / \|\bar g\|$.

    `num_directions` is always the number of directions evaluated (directional
    derivatives taken), all in one vectorised forward pass. With `"updates"` and
    `"ema"` the first is the candidate, and `num_directions = k > 1` adds `k − 1`
    random exploration directions, projected orthogonally to the candidate
    direction $\hat c$: the estimate becomes
    $(g\cdot\hat c)\hat c + \frac{1}{k-1}\sum_j (g\cdot\tilde r_j)\tilde r_j$
    (with `mode="average"`), which is
    unbiased for any candidate (the random part covers exactly what $\hat c$ misses)
    and whose variance shrinks as $\hat c$ aligns with the gradient. Without a
    candidate, `"ema"` needs this exploration to ever leave $\bar g = 0$: with one
    direction, `updates=None` raises a `ValueError`.

    **Arguments:**

    - `source`: `"updates"`, `"random"` or `"ema"`, as above.
    - `key`: a PRNG key (typed or legacy), an int seed or a 0-d integer array;
        required whenever random directions are drawn and rejected otherwise.
    - `num_directions`: the number of directions evaluated at each step: random
        ones for `"random"`; the candidate and `num_directions − 1` random
        exploration directions for `"updates"` and `"ema"`.
    - `sampler`: `"rademacher"`, `"gaussian"` or `"orthogonal"` (`k > 1` directions
        exactly orthogonal to each other) random directions, as in
        [`eqx_dodge.filter_value_and_dodge`][].
    - `mode`: `"average"` or `"partition"`, how `k > 1` random directions combine
        (see [`eqx_dodge.filter_value_and_dodge`][]).
    - `ema_decay`: for `"ema"` only: the decay $\lambda \in [0, 1)$ of its moving
        average, as in `optax.ema` (default 0.9).
    - `baseline_decay`: for `"random"` only: if a float in $[0, 1)$, subtract
        a baseline (DODGE appendix A.1): with $b$ the moving average of past
        estimates, $b \leftarrow \lambda b + \beta \hat g$ with decay
        $\lambda$ = `baseline_decay` and rate $\beta = 1 - \lambda$, starting at
        $b = 0$,
        $\hat g_b = \sum_j w_j ((g - b) \cdot u_j)\, u_j + b$. For Rademacher
        directions ($u(i)^2 = 1$) this is exactly
        $u(i)\sum_k u(k) g(k) - u(i)\sum_{k \ne i} u(k) b(k)$; for Gaussian
        directions it is the control-variate form of the same idea. It stays
        unbiased because $b$ depends on past directions only, and (Rademacher,
        one direction) its variance is $\sum_{k \ne i}(g(k) - b(k))^2$ instead of
        $\sum_{k \ne i} g(k)^2$. No extra forward pass: $b \cdot u$ comes out
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
        for them. For `"partition"` with blocks of unequal size, and for
        `sampler="orthogonal"` when the power of two $K \ge k$ does not divide
        $p$, $q$ is an upper bound (the largest coefficient): the factor is then
        at most $1 - 2\beta + \beta^2 q$, and the refusal is conservative.
        Small rates also let $b$ follow a drifting gradient only slowly: the
        baseline pays off when the gradient changes little over about $q$ steps.

    - `has_aux`: whether `value_fn` returns `(loss, aux)`; the state then keeps
        the latest `aux`.
    - `aux_init`: with `has_aux=True` (required then), the `aux` the state holds
        before the first update. It fixes the structure, shapes and dtypes `aux`
        must have, as the state's structure is fixed at `init`.
    - `skip_nonfinite`: whether to skip updates whose loss or estimate is not
        finite, as described above (default `True`).
    - `derivative`, `finite_difference_step`: `"jvp"` (the default) takes each
        directional derivative exactly, by forward mode; `"central"` by central
        finite differences with step `finite_difference_step` (default `1e-3`), for
        losses that forward mode cannot differentiate (a `jax.custom_vjp` inside:
        diffrax's default adjoint, ...). Their cost and error are as for
        [`eqx_dodge.filter_value_and_dodge`][]. Under `optax.inject_hyperparams`
        the step is injected like the other floats, while `derivative`, a string,
        stays static.
    - `chunk_size`: how many of the `num_directions` directions one vectorised
        `jax.jvp` carries; the others follow in chunks of that many, one after
        the other, so the tangents alive at once are those of one chunk. The
        estimate is the same for any chunk size (up to float rounding). `None`
        (the default) lets the backend decide: chunks of at least 4 on CPU, where
        they measured faster, and all the directions at once elsewhere, where one
        `vmap` measured faster but its memory grows with `num_directions`: set it
        on a GPU to bound the memory of many directions (as in
        [`eqx_dodge.filter_value_and_dodge`][]). With a candidate (`"updates"`,
        `"ema"`) each chunk draws its exploration directions and projects them
        orthogonally to the candidate, so they are never stored all at once:
        besides the chunk, the unit candidate is one more parameter-sized buffer.

    **Returns:**

    An `optax.GradientTransformationExtraArgs`: [`eqx_dodge.dodge_random`][],
    [`eqx_dodge.dodge_updates`][] or [`eqx_dodge.dodge_ema`][], each with a state of
    its own.

    !!! tip

        To accumulate estimates over several minibatches, put the accumulation after
        DODGE: `optax.chain(dodge(key=...), optax.MultiSteps(optax.adam(lr), k))`.
        Each minibatch gets its own directions, and the mean of the k unbiased
        estimates is an unbiased estimate of the gradient over the k minibatches.

    !!! warning

        Candidate-based estimates (`"updates"`, `"ema"` without exploration) are
        descent directions but biased. Do not chain them into plain `optax.adam`:
        its per-coordinate scaling times the rank-one $\hat c \hat c^\top$ is not
        positive definite, so the descent guarantee is lost (DODGE paper, appendix
        A).
        Use [`eqx_dodge.adam_dodge`][], which puts the scaling inside the
        direction. Unbiased estimates (`"random"`, or candidates with exploration)
        are safe to feed to `optax.adam` in expectation.
    """
    check_option("source", source, SOURCES)
    if ema_decay is not None and source != "ema":
        raise ValueError(
            f"`ema_decay` applies to `source='ema'` only, got source {source!r}."
        )
    if baseline_decay is not None and source != "random":
        raise ValueError(
            "`baseline_decay` applies to `source='random'` only: a baseline keeps "
            f"random-direction estimates unbiased; got source {source!r}."
        )
    check_record_options(has_aux, aux_init, skip_nonfinite)
    check_derivative_options(derivative, finite_difference_step)
    check_chunk_size(chunk_size)
    options: dict[str, Any] = dict(
        num_directions=num_directions,
        sampler=sampler,
        mode=mode,
        has_aux=has_aux,
        aux_init=aux_init,
        skip_nonfinite=skip_nonfinite,
        derivative=derivative,
        finite_difference_step=finite_difference_step,
        chunk_size=chunk_size,
    )
    if source == "random":
        if key is None:
            raise ValueError(
                "`key` is required for random directions: pass a PRNG key, e.g. "
                "`key=jax.random.key(0)`, or an int seed."
            )
        return dodge_random(key, baseline_decay=baseline_decay, **options)
    if source == "updates":
        return dodge_updates(key=key, **options)
    return dodge_ema(
        key=key, ema_decay=0.9 if ema_decay is None else ema_decay, **options
    )
