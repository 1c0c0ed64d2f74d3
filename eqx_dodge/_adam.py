"""`adam_dodge`: Adam's per-coordinate scaling folded into the DODGE direction."""

from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._directions import check_sampler, Sampler, trainable
from ._estimator import check_random_options, Mode
from ._transform import (
    bias_corrected,
    candidate_updates,
    check_exploration,
    key_data,
    loss_of_trainable,
    projected_estimate,
    split_key,
)


AdamSource: TypeAlias = Literal["updates", "random"]
ADAM_SOURCES: tuple[str, ...] = ("updates", "random")


class ScaleByAdamDodgeState(NamedTuple):
    """State of [`eqx_dodge.scale_by_adam_dodge`][].

    - `count`: the number of updates taken so far (int32 scalar).
    - `mu`, `nu`: Adam's first and second moments, of the candidates (source
        `"updates"`) or of past unbiased DODGE estimates (source `"random"`).
    - `key`: raw PRNG key data for the random directions (`None` for `"updates"`).
    """

    count: Array
    mu: PyTree
    nu: PyTree
    key: PyTree


def _check_decay(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | jax.Array):
        raise TypeError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    if isinstance(value, int | float) and not 0 <= value < 1:
        raise ValueError(f"`{name}` must lie in [0, 1), got {value}.")


def _check_nonnegative(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | jax.Array):
        raise TypeError(f"`{name}` must be a non-negative float, got {value!r}.")
    if isinstance(value, int | float) and value < 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}.")


def _root_mean_square(tree: PyTree) -> Array:
    leaves = jax.tree.leaves(tree)
    size = sum(leaf.size for leaf in leaves)
    squares = sum(
        (jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves),
        start=jnp.zeros((), jnp.float32),
    )
    return jnp.sqrt(squares / max(size, 1))


def scale_by_adam_dodge(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    source: AdamSource = "random",
    key: PRNGKeyArray | int | None = None,
    num_directions: int | None = None,
    sampler: Sampler = "rademacher",
    mode: Mode = "average",
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's rescaling, built into the DODGE direction (DODGE appendix A, eq 12).

    The counterpart of `optax.scale_by_adam` for DODGE. Adam multiplies the gradient
    by $c = 1/(\sqrt{\hat v} + \epsilon)$ per coordinate; applied to a DODGE estimate
    $(g\cdot u)u$ from a non-random direction, that product need not be a descent
    direction. Here the scaling goes into the direction instead:

    $$u = \frac{c \odot \hat m}{\sqrt{\sum_k c(k)\,\hat m(k)^2}}, \qquad
    \text{output} = (g \cdot u)\, u,$$

    with $g$ the gradient of `value_fn` at `params` (one `jax.jvp`). Then
    $g \cdot \text{output} = (g\cdot u)^2 \ge 0$ for every $u$: a descent direction
    after `optax.scale_by_learning_rate`. When $\hat m = g$ the output is
    $c \odot g$, Adam's update: for a linear loss with the exact gradient as
    candidate, `adam_dodge` and `optax.adam` take identical steps.

    `update(updates, state, params, *, value_fn, **extra_args)` takes `params` and
    `value_fn` as in [`eqx_dodge.dodge`][].

    **Where $m$ and $v$ come from** (`source`):

    - `"updates"`: the incoming updates are a candidate gradient (the exact
        gradient, a truncated-BPTT or a surrogate gradient). $m$ and $v$ are Adam's
        moments of the candidates, updated with the current candidate before the
        direction is formed, exactly as `optax.scale_by_adam` does; so step 0 uses
        $\hat m = \tilde g_0$, $\hat v = \tilde g_0^2$, and a zero candidate gives a
        zero update.
    - `"random"`: no candidate; $m$ and $v$ are the moments of past DODGE estimates.
        Each step uses $\hat m, \hat v$ from the previous steps and adds
        `num_directions` random exploration directions, drawn in the coordinates
        whitened by $\sqrt{c}$ and projected orthogonally to $u$ there:
        $\text{output} = (g\cdot u)u + \frac{1}{k}\sum_j (g\cdot t_j)t_j$ with
        $t_j = \sqrt{c}\odot\tilde r_j$. Its mean is exactly $c \odot g$ (Adam's
        scaled gradient) for any $\hat m$, it is still a descent direction, and its
        variance shrinks as $\hat m$ aligns with the gradient. The unbiased raw
        estimate $\text{output}/c$ then feeds $m$ and $v$. At step 0 there are no
        moments: the directions are unscaled random ones and the output is the plain
        DODGE estimate divided by its root mean square, a positive scalar, which
        keeps descent and gives the unit per-coordinate size of Adam's first step.

    !!! warning

        Do not chain a non-random DODGE estimate (`eqx_dodge.dodge("updates")` or
        `"ema"`) into plain `optax.adam`: Adam's diagonal scaling times the rank-one
        $uu^\top$ is not positive definite, so the descent guarantee is lost. Use
        this transformation, which applies the scaling inside the direction.
        Random-direction estimates are unbiased, so `optax.chain(dodge("random"),
        optax.adam(...))` is sound (in expectation).

    **Arguments:**

    - `b1`, `b2`: the decay rates of the first and second moments, in $[0, 1)$.
    - `eps`: added to $\sqrt{\hat v}$, as in Adam.
    - `eps_root`: added to $\hat v$ inside the square root, as in Adam.
    - `source`: `"updates"` or `"random"`, as above.
    - `key`: a PRNG key or an int seed, for `"random"` (rejected for `"updates"`).
    - `num_directions`: the number of random exploration directions for `"random"`
        (default 1); not used by `"updates"`.
    - `sampler`: `"rademacher"` or `"gaussian"`.
    - `mode`: `"average"` or `"partition"`, how the random directions combine.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_dodge.ScaleByAdamDodgeState`][]. Its output has the sign of the gradient,
    like `optax.scale_by_adam`: follow it by a negative scaling.
    """
    if source not in ADAM_SOURCES:
        raise ValueError(f"`source` must be one of {ADAM_SOURCES}, got {source!r}.")
    _check_decay(b1, "b1")
    _check_decay(b2, "b2")
    _check_nonnegative(eps, "eps")
    _check_nonnegative(eps_root, "eps_root")
    if source == "updates":
        if num_directions not in (None, 0):
            raise ValueError(
                "`num_directions` applies to `source='random'` only; the "
                "`'updates'` source follows its candidates' moments alone."
            )
        num_directions = 0
        check_exploration(num_directions, mode)
        check_sampler(sampler)
        data, impl = key_data(key, False, "with source 'updates'")
    else:
        num_directions = 1 if num_directions is None else num_directions
        check_random_options(num_directions, sampler, mode)
        data, impl = key_data(key, True, "for random directions")

    def init_fn(params):
        primal = trainable(params)
        return ScaleByAdamDodgeState(
            count=jnp.zeros((), jnp.int32),
            mu=optax.tree.zeros_like(primal),
            nu=optax.tree.zeros_like(primal),
            key=data,
        )

    def moments(mu, nu, count):
        mu_hat = bias_corrected(mu, b1, count)
        nu_hat = bias_corrected(nu, b2, count)
        # `sqrt(c)`: the estimate `(g·u)u` with `u = sqrt(c)⊙unit(sqrt(c)⊙m̂)` is the
        # `u` of eq 12.
        scale = jax.tree.map(
            lambda v: jax.lax.rsqrt(jnp.sqrt(v + eps_root) + eps), nu_hat
        )
        return mu_hat, scale

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        fun, primal = loss_of_trainable(
            "scale_by_adam_dodge", params, value_fn, extra_args
        )
        count = jnp.asarray(optax.safe_increment(state.count))
        if source == "updates":
            candidate_updates(updates, primal, source)
            mu = optax.tree.update_moment(updates, state.mu, b1, 1)
            nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
            mu_hat, scale = moments(mu, nu, count)
            output = projected_estimate(
                fun,
                primal,
                mu_hat,
                scale=scale,
                key=None,
                num_directions=0,
                sampler=sampler,
                mode=mode,
            )
            return output, ScaleByAdamDodgeState(count, mu, nu, None)

        assert data is not None
        next_key, step_key = split_key(state.key, impl)
        first = state.count == 0
        mu_hat, scale = moments(state.mu, state.nu, state.count)
        scale = jax.tree.map(lambda s: jnp.where(first, jnp.ones_like(s), s), scale)
        output = projected_estimate(
            fun,
            primal,
            mu_hat,
            scale=scale,
            key=step_key,
            num_directions=num_directions,
            sampler=sampler,
            mode=mode,
        )
        # `output = c ⊙ ĥ` in expectation `c ⊙ g`, so `output / c` is unbiased for g.
        raw = jax.tree.map(lambda o, s: o / jnp.square(s), output, scale)
        mu = optax.tree.update_moment(raw, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(raw, state.nu, b2, 2)
        rms = _root_mean_square(output)
        normaliser = jnp.where(first & (rms > 0), rms, 1)
        output = jax.tree.map(lambda o: o / normaliser.astype(o.dtype), output)
        return output, ScaleByAdamDodgeState(count, mu, nu, next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_dodge(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    source: AdamSource = "random",
    key: PRNGKeyArray | int | None = None,
    num_directions: int | None = None,
    sampler: Sampler = "rademacher",
    mode: Mode = "average",
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
        `mode`: as for [`eqx_dodge.scale_by_adam_dodge`][].

    **Returns:**

    An `optax.GradientTransformationExtraArgs`.
    """
    return optax.chain(
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
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
