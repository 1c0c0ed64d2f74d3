"""Candidate directions for recurrent models: truncated BPTT and synthetic gradients.

A candidate `c` is any guess of the gradient; DODGE turns it into the descent
direction `(∇L·ĉ)ĉ` with one jvp (DODGE §3.2–3.3). Both candidates here are computed by
backpropagation through a bounded window, so their memory does not grow with the
stream either.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Scalar

from ._checks import (
    as_key,
    check_bool,
    check_int,
    check_nonnegative,
    check_option,
    KeyLike,
    REDUCTIONS,
)
from ._online import _as_state_and_loss, cut_gradient_every, scan_window


def tbptt_candidate(
    step: Callable,
    model: PyTree,
    state: PyTree,
    inputs: PyTree,
    *,
    key: KeyLike,
    max_truncation: int,
    reduction: str = "mean",
    has_aux: bool = False,
) -> PyTree:
    """A candidate direction for a recurrent model: the truncated-BPTT gradient.

    The truncation length `τ` is drawn uniformly from `1..max_truncation` with `key`
    (randomising it helps DODGE most for short truncations, `max_truncation = 3` in
    the paper, §5.4.1), and the window's loss is backpropagated through at most the
    last `τ` steps before each loss: the state's gradient path is cut every `τ`
    steps. The state entering the window is treated as a constant.

    Use it as `filter_dodge(loss, direction=candidate)`, as
    `OnlineDodge.redirect(..., direction=candidate)`, or as the updates fed to an
    optax DODGE transformation: it is shaped like `eqx.filter_grad`'s output.

    **Arguments:**

    - `step`: `step(model, state, input) -> (state, loss)` as in
        [`eqx_dodge.OnlineDodge`][].
    - `model`: the model; its floating-point array leaves are differentiated.
    - `state`: the recurrent state entering the window.
    - `inputs`: the window's inputs, with a leading time axis.
    - `key`: a PRNG key (or an int seed) for the truncation length.
    - `max_truncation`: the largest truncation length, a Python int `≥ 1`.
    - `reduction`: `"mean"` or `"sum"` of the per-step losses.
    - `has_aux`: whether `step` returns `(state, (loss, aux))`.

    **Returns:**

    The truncated gradient, a PyTree like the model with `None` at its
    non-floating-point leaves.
    """
    check_int("max_truncation", max_truncation, 1)
    check_option("reduction", reduction, REDUCTIONS)
    truncation = jax.random.randint(
        as_key(key), (), 1, max_truncation + 1, dtype=jnp.int32
    )

    def loss(_model):
        value, _ = scan_window(
            step,
            _model,
            jax.lax.stop_gradient(state),
            inputs,
            reduction=reduction,
            has_aux=has_aux,
            truncation=truncation,
        )
        return value

    return eqx.filter_grad(loss)(model)


def _flatten_state(state: PyTree, state_size: int) -> Array:
    """The state's leaves raveled and concatenated; its size must be the critic's."""
    flat = jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(state)])
    if flat.shape != (state_size,):
        raise ValueError(
            f"The critic was built with `state_size={state_size}`, but one recurrent "
            f"state has {flat.size} entries (its leaves' shapes "
            f"{[jnp.shape(leaf) for leaf in jax.tree.leaves(state)]}): build it with "
            f"`state_size={flat.size}`, or, if the state holds a batch of states "
            "along a leading axis, pass `batched=True`."
        )
    return flat


class LinearCritic(eqx.Module):
    r"""A linear estimate $V(s) = b + w \cdot s$ of the loss still to come from the
    recurrent state $s$ (all its leaves flattened and concatenated). Starts at zero.
    """

    weight: Float[Array, " state"]
    bias: Float[Array, ""]

    def __init__(self, state_size: int):
        """**Arguments:**

        - `state_size`: the number of entries of one recurrent state.
        """
        self.weight = jnp.zeros(state_size)
        self.bias = jnp.zeros(())

    def __call__(self, state: PyTree) -> Scalar:
        """**Arguments:**

        - `state`: one recurrent state (any PyTree of arrays with `state_size`
            entries in all).

        **Returns:**

        The estimate $V(s)$, a scalar.
        """
        flat = _flatten_state(state, self.weight.shape[0])
        return self.bias + jnp.vdot(self.weight, flat)


class QuadraticCritic(eqx.Module):
    r"""A quadratic estimate $V(s) = b + w \cdot s + \tfrac12 s^\top M s$ of the loss
    still to come from the recurrent state $s$ (the paper's choice, §5.4.3): a
    [`eqx_dodge.recurrent.LinearCritic`][] plus the curvature $M$. Starts at zero.
    """

    linear: LinearCritic
    curvature: Float[Array, "state state"]

    def __init__(self, state_size: int):
        """**Arguments:**

        - `state_size`: the number of entries of one recurrent state.
        """
        self.linear = LinearCritic(state_size)
        self.curvature = jnp.zeros((state_size, state_size))

    def __call__(self, state: PyTree) -> Scalar:
        """**Arguments:**

        - `state`: one recurrent state (any PyTree of arrays with `state_size`
            entries in all).

        **Returns:**

        The estimate $V(s)$, a scalar.
        """
        s = _flatten_state(state, self.curvature.shape[0])
        return self.linear(state) + 0.5 * jnp.vdot(s, self.curvature @ s)


def _critic_value(critic: Callable, state: PyTree, batched: bool) -> Scalar:
    if batched:
        return jnp.sum(jax.vmap(critic)(state))
    return critic(state)


def _chunked_window(
    step: Callable,
    model: PyTree,
    state: PyTree,
    inputs: PyTree,
    truncation: int,
    has_aux: bool,
):
    """Scans the window; returns the per-step losses and the states entering every
    step, with the gradient path cut every `truncation` steps."""
    state_and_loss = _as_state_and_loss(step, has_aux)

    def body(carry, inputs_t):
        s, t = carry
        entering = s
        s = cut_gradient_every(truncation, t, s)
        s, (loss, _) = state_and_loss(model, s, inputs_t)
        return (s, t + 1), (loss, entering)

    (final_state, _), (losses, entering) = jax.lax.scan(
        body, (state, jnp.zeros((), jnp.int32)), inputs
    )
    return losses, entering, final_state


def synthetic_gradient_candidate(
    step: Callable,
    model: PyTree,
    critic: Callable[[PyTree], Scalar],
    state: PyTree,
    inputs: PyTree,
    *,
    truncation: int = 5,
    scale: float = 0.5,
    bootstrap_end: bool = True,
    batched: bool = False,
    has_aux: bool = False,
) -> PyTree:
    r"""A candidate direction from synthetic gradients (Jaderberg et al. 2017).

    Backpropagation is cut every `truncation` steps, and at each cut the gradient of
    the loss still to come with respect to the state is replaced by that of a critic,
    $\text{scale}\cdot\nabla_s V(s)$:

    $$c = \nabla_w \Big[\sum_t \ell_t + \text{scale} \sum_{\text{cuts } k} V(s_k)\Big]$$

    with the state held constant after each cut. With a zero critic this is the
    TBPTT gradient with truncation `truncation`. Train the critic with
    [`eqx_dodge.recurrent.critic_loss`][]. The paper used a quadratic critic,
    truncation 5 and scale 0.5 (§5.4.3).

    **Arguments:**

    - `step`: `step(model, state, input) -> (state, loss)`.
    - `model`: the model; its floating-point array leaves are differentiated.
    - `critic`: `critic(state) -> scalar`, e.g.
        [`eqx_dodge.recurrent.QuadraticCritic`][]; not differentiated here.
    - `state`: the recurrent state entering the window (held constant).
    - `inputs`: the window's inputs, with a leading time axis.
    - `truncation`: steps between cuts, a Python int.
    - `scale`: the weight of the synthetic gradient.
    - `bootstrap_end`: whether the critic also stands for the loss after the window
        (a stream), or the window is a whole episode.
    - `batched`: whether the state leaves carry a leading batch axis; the critic is
        then applied per example and summed.
    - `has_aux`: whether `step` returns `(state, (loss, aux))`.

    **Returns:**

    The candidate, a PyTree like the model with `None` at its non-floating-point
    leaves. The per-step losses are summed.
    """
    check_int("truncation", truncation, 1)
    check_nonnegative("scale", scale)
    check_bool("bootstrap_end", bootstrap_end)
    check_bool("batched", batched)

    def surrogate(_model):
        losses, entering, final_state = _chunked_window(
            step, _model, jax.lax.stop_gradient(state), inputs, truncation, has_aux
        )
        length = losses.shape[0]
        values = jax.vmap(lambda s: _critic_value(critic, s, batched))(entering)
        is_cut = (jnp.arange(length) > 0) & (jnp.arange(length) % truncation == 0)
        total = jnp.sum(losses) + scale * jnp.sum(jnp.where(is_cut, values, 0))
        if bootstrap_end:
            total = total + scale * _critic_value(critic, final_state, batched)
        return total

    return eqx.filter_grad(surrogate)(model)


def _chunk_gradient_targets(
    critic: Callable,
    step: Callable,
    model: PyTree,
    entering: PyTree,
    inputs: PyTree,
    starts: list[int],
    length: int,
    truncation: int,
    bootstrap_end: bool,
    batched: bool,
    has_aux: bool,
) -> list[PyTree]:
    """For each chunk, `∂/∂s_k [chunk loss + V(s_{k+1})]` at its start state `s_k`:
    the bootstrapped target of the synthetic gradient (Jaderberg et al. 2017)."""
    state_and_loss = _as_state_and_loss(step, has_aux)
    targets = []
    for start in starts:
        stop = min(start + truncation, length)
        chunk_inputs = jax.tree.map(lambda x: x[start:stop], inputs)

        def chunk_value(s, _chunk_inputs=chunk_inputs, _stop=stop):
            def body(s, inputs_t):
                s, (loss, _) = state_and_loss(model, s, inputs_t)
                return s, loss

            s, losses = jax.lax.scan(body, s, _chunk_inputs)
            value = jnp.sum(losses)
            if _stop < length or bootstrap_end:
                value = value + _critic_value(critic, s, batched)
            return value

        start_state = jax.tree.map(lambda x: x[start], entering)
        targets.append(jax.grad(chunk_value)(start_state))
    return targets


def critic_loss(
    step: Callable,
    model: PyTree,
    critic: Callable[[PyTree], Scalar],
    state: PyTree,
    inputs: PyTree,
    *,
    truncation: int = 5,
    match: str = "gradient",
    bootstrap_end: bool = True,
    batched: bool = False,
    has_aux: bool = False,
) -> Scalar:
    r"""The loss that trains the critic of
    [`eqx_dodge.recurrent.synthetic_gradient_candidate`][].

    The window is cut into chunks of `truncation` steps starting at states
    $s_0, s_\tau, s_{2\tau}, \ldots$. With `match="gradient"` (synthetic gradients,
    Jaderberg et al. 2017, as in the paper) the critic's gradient regresses onto the
    gradient of the chunk's summed loss plus the critic's own (stopped) value at the
    next chunk's start,
    $\tfrac12 \sum_k \big\|\nabla V(s_k) - \nabla_{s_k}[\ell_k + V(s_{k+1})]\big\|^2$;
    with `match="value"` the critic's value regresses onto the temporal-difference
    target, $\tfrac12 \sum_k \big(V(s_k) - [\ell_k + V(s_{k+1})]\big)^2$. After the
    window, $V(s_{\text{end}})$ stands for the rest of the stream when
    `bootstrap_end=True`, and zero otherwise. Differentiate it with respect to
    the critic, `eqx.filter_grad(lambda c: critic_loss(step, model, c, ...))(critic)`;
    the model is not trained by it.

    **Arguments:** as for [`eqx_dodge.recurrent.synthetic_gradient_candidate`][], in
    the same order, and `match`, `"gradient"` or `"value"`.

    **Returns:**

    A scalar.
    """
    check_int("truncation", truncation, 1)
    check_option("match", match, ("gradient", "value"))
    check_bool("bootstrap_end", bootstrap_end)
    check_bool("batched", batched)
    losses, entering, final_state = jax.lax.stop_gradient(
        _chunked_window(step, model, state, inputs, truncation, has_aux)
    )
    length = losses.shape[0]
    starts = list(range(0, length, truncation))
    if match == "gradient":
        arrays, others = eqx.partition(critic, eqx.is_array)
        frozen = eqx.combine(jax.lax.stop_gradient(arrays), others)
        targets = _chunk_gradient_targets(
            frozen,
            step,
            model,
            entering,
            inputs,
            starts,
            length,
            truncation,
            bootstrap_end,
            batched,
            has_aux,
        )
        total = jnp.zeros(())
        for start, target in zip(starts, targets):
            start_state = jax.tree.map(lambda x: x[start], entering)
            prediction = jax.grad(lambda s: _critic_value(critic, s, batched))(
                start_state
            )
            total = total + 0.5 * sum(
                jnp.sum(jnp.square(p - t))
                for p, t in zip(jax.tree.leaves(prediction), jax.tree.leaves(target))
            )
        return total
    values = jnp.stack(
        [
            _critic_value(critic, jax.tree.map(lambda x: x[k], entering), batched)
            for k in starts
        ]
    )
    chunk_losses = jnp.stack([jnp.sum(losses[k : k + truncation]) for k in starts])
    end_value = (
        _critic_value(critic, final_state, batched)
        if bootstrap_end
        else jnp.zeros((), values.dtype)
    )
    next_values = jnp.concatenate([values[1:], end_value[None]])
    targets = jax.lax.stop_gradient(chunk_losses + next_values)
    return 0.5 * jnp.sum(jnp.square(values - targets))
