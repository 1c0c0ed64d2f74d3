"""Online DODGE for recurrent models: the state tangent carried across windows.

A recurrent model is written as a step function `step(model, state, input) ->
(state, loss)` (an Equinox cell plus a readout, or anything of that shape) and a stream
is processed in truncation windows with `jax.lax.scan`. Forward mode carries, next to
the state `s_t`, its tangent `ds_t/dw·u` for each of `k` directions, so the directional
derivative of every window's loss includes the influence of all earlier windows
(DODGE §3.2) while the memory stays that of the forward pass: nothing is stored per
time step. With one-hot directions (`k = p`) this is real-time recurrent learning.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree, Scalar

from ._checks import (
    as_key,
    check_bool,
    check_callable,
    check_candidate_options,
    check_derivative_options,
    check_one_source,
    check_option,
    check_random_options,
    described,
    FINITE_DIFFERENCE_STEP,
    KeyLike,
    REDUCTIONS,
    ScalarLike,
)
from ._derivatives import central_differences, jvp, vmap_with_aux
from ._directions import check_direction, partition_direction, trainable
from ._live import LiveSplit, split_live
from ._tangents import draw_tangents


class OnlineDodgeState(NamedTuple):
    """What [`eqx_dodge.OnlineDodge`][] carries from one window to the next.

    **Fields:**

    - `state`: the recurrent state `s_t` at the end of the last window processed.
    - `tangent`: its tangent `ds_t/dw·u_j` along each direction: the leaves of
        `state` with a new leading axis of size `k`.
    - `directions`: the `k` directions `u_j`, stacked along a leading axis; shaped
        like the trainable leaves of the model, `None` elsewhere. In
        `mode="partition"` these are the `k` zero-padded parts of one direction.
    """

    state: PyTree
    tangent: PyTree
    directions: PyTree


def _check_state(state: PyTree) -> None:
    leaves = jax.tree.leaves(state)
    if not leaves:
        raise ValueError("`state` must hold at least one array.")
    for leaf in leaves:
        if not eqx.is_inexact_array(leaf) or not jnp.issubdtype(
            leaf.dtype, jnp.floating
        ):
            raise TypeError(
                "Every leaf of the recurrent `state` must be a real floating-point "
                f"array (its tangent is carried); got {type(leaf).__name__}"
                + (f" of dtype {leaf.dtype}" if hasattr(leaf, "dtype") else "")
                + "."
            )


def _check_window(inputs: PyTree) -> None:
    """The leaves of a window's `inputs` share a leading time axis."""
    lengths = {jnp.shape(leaf)[:1] for leaf in jax.tree.leaves(inputs)}
    if () in lengths or len(lengths) > 1:
        raise ValueError(
            "The leaves of a window's `inputs` must share a leading time axis (the "
            "steps scanned over); got shapes "
            f"{sorted(str(jnp.shape(leaf)) for leaf in jax.tree.leaves(inputs))}."
        )


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2


def _as_state_and_loss(step: Callable, has_aux: bool) -> Callable:
    check_bool("has_aux", has_aux)

    def state_and_loss(model, state, inputs):
        out = step(model, state, inputs)
        if not _is_pair(out):
            raise TypeError(
                "`step(model, state, input)` must return a pair `(state, loss)`"
                + (" with `loss` a pair `(loss, aux)`" if has_aux else "")
                + f"; got {type(out).__name__}."
            )
        new_state, returned = out
        if has_aux and not _is_pair(returned):
            raise TypeError(
                "With `has_aux=True`, `step(model, state, input)` must return "
                f"`(state, (loss, aux))`; its second element is {described(returned)}; "
                "pass `has_aux=False` if it is the loss alone."
            )
        loss, aux = returned if has_aux else (returned, None)
        if jnp.shape(loss) != () or not jnp.issubdtype(
            jnp.result_type(loss), jnp.floating
        ):
            raise TypeError(
                "The loss returned by `step` must be a floating-point scalar; got "
                f"shape {jnp.shape(loss)} and dtype {jnp.result_type(loss)}."
            )
        if jax.tree.structure(new_state) != jax.tree.structure(state):
            raise ValueError(
                "`step` must return a state with the structure of the state it "
                f"receives; got {jax.tree.structure(new_state)}, expected "
                f"{jax.tree.structure(state)}."
            )
        return new_state, (jnp.asarray(loss), aux)

    return state_and_loss


def scan_window(
    step: Callable,
    model: PyTree,
    state: PyTree,
    inputs: PyTree,
    *,
    reduction: str = "mean",
    has_aux: bool = False,
    truncation: Int[Array, ""] | int | None = None,
) -> tuple[Scalar, tuple[PyTree, Any]]:
    """Runs `step` over the leading axis of `inputs` with `jax.lax.scan`.

    Returns `(loss, (final_state, aux))` with `loss` the mean or sum of the per-step
    losses. With `truncation=τ`, the state's gradient path is cut every `τ` steps
    (at steps `τ, 2τ, ...` of the window): reverse mode through this function is then
    truncated backpropagation through time with truncation length `τ`, which may be a
    traced integer.
    """
    state_and_loss = _as_state_and_loss(step, has_aux)

    def body(carry, inputs_t):
        s, t = carry
        if truncation is not None:
            s = cut_gradient_every(truncation, t, s)
        s, (loss, aux) = state_and_loss(model, s, inputs_t)
        return (s, t + 1), (loss, aux)

    (final_state, _), (losses, aux) = jax.lax.scan(
        body, (state, jnp.zeros((), jnp.int32)), inputs
    )
    value = jnp.sum(losses) if reduction == "sum" else jnp.mean(losses)
    return value, (final_state, aux)


def cut_gradient_every(truncation: int | Array, t: Array, state: PyTree) -> PyTree:
    """`state` with its gradient path cut when step `t > 0` is a multiple of
    `truncation` (truncated backpropagation through time)."""
    cut = (t > 0) & (t % truncation == 0)
    return jax.tree.map(
        lambda leaf: jnp.where(cut, jax.lax.stop_gradient(leaf), leaf), state
    )


def _live_directions(split: LiveSplit, directions: PyTree, mode: str) -> PyTree:
    """The stacked `directions` (drawn at `init`, before the loss is seen) on the
    live leaves of `split`. Random entries are independent, so dropping those of the
    dead leaves leaves directions distributed as if drawn on the live leaves alone;
    the parts of one direction (`mode="partition"`) are formed again over the live
    coordinates. Both are fixed functions of `directions`, so the carried tangent
    stays a derivative along the same directions from window to window.
    (`sampler="orthogonal"` directions keep their mean, `E[(1/k) Σ u uᵀ] = I`, on
    any subset of the coordinates, but are exactly orthogonal over the live leaves
    only when every leaf is live.)"""
    live = split.restrict(directions)
    num = jax.tree.leaves(directions)[0].shape[0]
    if split.all_live or mode != "partition" or num == 1:
        return live
    # The parts have disjoint supports: their sum is the direction they split.
    base = jax.tree.map(lambda parts: jnp.sum(parts, axis=0), live)
    return partition_direction(base, num)


class OnlineDodge(eqx.Module):
    r"""Online DODGE for a recurrent model processed in truncation windows.

    The model is described by one step function,

    ```python
    def step(model, state, x):           # one time step
        state = model.cell(x, state)     # e.g. eqx.nn.GRUCell / LSTMCell
        loss = jnp.mean((model.readout(state) - y_of(x)) ** 2)
        return state, loss
    ```

    and the stream is cut into windows (`inputs` with a leading time axis). For each
    window, one `jax.jvp` through `jax.lax.scan`, vectorised over the `k` directions
    $u_j$ with the primal computed once, returns the window loss $L$ and its
    directional derivatives $d_j = \nabla_w L \cdot u_j$, where $\nabla_w L$ is the
    total derivative through the whole history of the stream: the state tangent
    $\frac{ds_t}{dw} u_j$ is carried across windows in an
    [`eqx_dodge.OnlineDodgeState`][]. Memory does not grow with the number of steps;
    nothing is stored per step.

    The estimate is $\frac1k \sum_j d_j u_j$ (`mode="average"`, unbiased for random
    directions), $\sum_j d_j u_j$ over the parts of one random direction
    (`mode="partition"`; with `k = p` one-hot parts it is the exact gradient, i.e.
    RTRL), or $(\nabla_w L \cdot \hat c)\,\hat c$ for a candidate $c$.

    The directions stay fixed while the tangent is carried: the tangent is a
    derivative along those directions and is meaningless for others. Call
    [`eqx_dodge.OnlineDodge.redirect`][] to draw new ones (or to pass a new
    candidate); it restarts the tangent at zero, so the next estimate ignores the
    influence of the parameters on the state before that point, as truncated
    backpropagation would.

    !!! warning
        When the parameters are updated between windows, the carried tangent mixes
        derivatives taken at the successive parameter values, exactly as in RTRL;
        the estimate is then exact only in the limit of small learning rates.

    **Example:**

    ```python
    online = eqx_dodge.OnlineDodge(step, num_directions=8)
    carry = online.init(model, state0, key=key)
    for window in windows:                 # or inside jax.lax.scan
        loss, estimate, carry = online(model, carry, window)
        updates, opt_state = optimizer.update(estimate, opt_state)
        model = eqx.apply_updates(model, updates)
    ```

    **Arguments:**

    - `step`: `step(model, state, input) -> (state, loss)`, one time step of the
        recurrent model; `state` is a PyTree of floating-point arrays and `loss` a
        scalar. With `has_aux=True` it returns `(state, (loss, aux))`.
    - `num_directions`: the number `k` of random directions evaluated (a candidate
        is one direction: pass it to an `OnlineDodge` with the default 1).
    - `sampler`: `"rademacher"`, `"gaussian"` or `"orthogonal"` (`k > 1` directions
        exactly orthogonal to each other) random directions, as in
        [`eqx_dodge.filter_value_and_dodge`][].
    - `mode`: `"average"` of `k` independent directions, or `"partition"` of one
        direction into `k` parts over contiguous blocks of the flattened parameters
        (`k = p` gives RTRL).
    - `reduction`: the window loss is the `"mean"` or `"sum"` of the per-step losses.
    - `has_aux`: whether `step` returns auxiliary per-step outputs.
    - `derivative`: `"jvp"` (the default) carries the exact state tangent in forward
        mode. `"central"`, for steps that forward mode cannot differentiate (a
        `jax.custom_vjp` inside), takes central finite differences instead: each
        window runs from the states $s \pm h\,T_j$ at the parameters
        $\theta \pm h\,u_j$, with $T_j$ the carried tangent, and
        $d_j = (L^+ - L^-)/2h$ and the next tangent $(s^+ - s^-)/2h$ come from the
        two runs. The carried tangent keeps its meaning (the even terms of the
        perturbed states cancel in the differences: the error is $O(h^2)$), at
        $2k + 1$ forward passes of the window instead of one.
    - `finite_difference_step`: the step $h$ of `derivative="central"` (see
        [`eqx_dodge.filter_value_and_dodge`][]).
    """

    step: Callable
    num_directions: int = eqx.field(default=1, static=True, kw_only=True)
    sampler: str = eqx.field(default="rademacher", static=True, kw_only=True)
    mode: str = eqx.field(default="average", static=True, kw_only=True)
    reduction: str = eqx.field(default="mean", static=True, kw_only=True)
    has_aux: bool = eqx.field(default=False, static=True, kw_only=True)
    derivative: str = eqx.field(default="jvp", static=True, kw_only=True)
    finite_difference_step: ScalarLike = eqx.field(
        default=FINITE_DIFFERENCE_STEP, kw_only=True
    )

    def __check_init__(self):
        check_callable("step", self.step)
        check_bool("has_aux", self.has_aux)
        check_random_options(self.num_directions, self.sampler, self.mode)
        check_option("reduction", self.reduction, REDUCTIONS)
        check_derivative_options(self.derivative, self.finite_difference_step)

    def _directions(
        self, model: PyTree, key: KeyLike | None, direction: PyTree | None
    ) -> PyTree:
        check_one_source(key, direction)
        if direction is not None:
            # Not the sampler: it stays in use for the windows started with a key.
            check_candidate_options(self.num_directions, self.mode)
        primal = trainable(model)
        tangents = draw_tangents(
            primal,
            key=None if key is None else as_key(key),
            direction=direction,
            num_directions=self.num_directions,
            sampler=self.sampler,
            mode=self.mode,
        )
        return tangents.draw(tangents.seeds)

    def init(
        self,
        model: PyTree,
        state: PyTree,
        *,
        key: KeyLike | None = None,
        direction: PyTree | None = None,
    ) -> OnlineDodgeState:
        """Starts a stream at `state`, with a zero tangent.

        **Arguments:**

        - `model`: the model whose floating-point array leaves are differentiated.
        - `state`: the initial recurrent state (taken not to depend on the model).
        - `key`: a PRNG key (or an int seed) drawing the random directions; or
        - `direction`: a candidate direction, shaped like `eqx.filter_grad`'s output.

        **Returns:**

        An [`eqx_dodge.OnlineDodgeState`][].
        """
        _check_state(state)
        directions = self._directions(model, key, direction)
        num = jax.tree.leaves(directions)[0].shape[0]
        tangent = jax.tree.map(
            lambda leaf: jnp.zeros((num,) + leaf.shape, leaf.dtype), state
        )
        return OnlineDodgeState(state, tangent, directions)

    def redirect(
        self,
        model: PyTree,
        carry: OnlineDodgeState,
        *,
        key: KeyLike | None = None,
        direction: PyTree | None = None,
    ) -> OnlineDodgeState:
        """New directions (from `key`, or a candidate `direction`) for the stream in
        `carry`: the state is kept and its tangent restarts at zero.

        **Arguments:**

        - `model`: the model, as passed to the windows.
        - `carry`: the [`eqx_dodge.OnlineDodgeState`][] of the stream.
        - `key`: a PRNG key for new random directions, or
        - `direction`: a candidate direction shaped like the model's floating-point
            leaves (exactly one of `key` and `direction`).

        **Returns:**

        An [`eqx_dodge.OnlineDodgeState`][].
        """
        return self.init(model, carry.state, key=key, direction=direction)

    def _derivatives(
        self, window: Callable, primals: tuple, tangents: tuple
    ) -> tuple[tuple[Any, PyTree], Array, PyTree, Any]:
        """`((value, final_state), d, final_tangent, aux)` of one window: the
        derivatives `d_j` and the carried tangents, stacked over the directions,
        by forward mode (the primal computed once) or by central differences."""
        if self.derivative == "central":
            (value, final_state), aux = window(*primals)
            derivatives, final_tangent = central_differences(
                lambda moved: window(*moved),
                primals,
                tangents,
                self.finite_difference_step,
            )
            return (value, final_state), derivatives, final_tangent, aux

        def along(direction, tangent):
            return jvp(window, primals, (direction, tangent), has_aux=True)

        out, (derivatives, final_tangent), aux = vmap_with_aux(
            along, (None, 0, None), *tangents
        )
        return out, derivatives, final_tangent, aux

    def __call__(
        self, model: PyTree, carry: OnlineDodgeState, inputs: PyTree
    ) -> tuple[Any, PyTree, OnlineDodgeState]:
        """Processes one window of the stream.

        **Arguments:**

        - `model`: the model; its floating-point array leaves are differentiated.
        - `carry`: the [`eqx_dodge.OnlineDodgeState`][] from `init` or the previous
            window.
        - `inputs`: the window's inputs, a PyTree whose leaves share a leading time
            axis scanned over.

        **Returns:**

        `(value, estimate, carry)`: the window loss (or `(value, aux)` with
        `has_aux=True`, `aux` stacked over the window's steps), the DODGE estimate
        of its gradient shaped like `eqx.filter_grad`'s output, and the carry for the
        next window.
        """
        if not isinstance(carry, OnlineDodgeState):
            raise TypeError(
                "`OnlineDodge(...)(model, carry, inputs)` takes the model first and "
                "then the `OnlineDodgeState` that `init` (or the previous window) "
                f"returned; got {described(carry)} as `carry`."
            )
        _check_window(inputs)
        check_direction(
            jax.tree.map(lambda leaf: leaf[0], carry.directions),
            trainable(model),
            name="carry.directions",
        )
        return _window_jit(self, model, carry, inputs)

    def _window(
        self, model: PyTree, carry: OnlineDodgeState, inputs: PyTree
    ) -> tuple[Any, PyTree, OnlineDodgeState]:
        """`__call__` once its arguments are checked."""
        diff_model, static_model = eqx.partition(model, eqx.is_inexact_array)

        def window(_diff_model, state):
            value, (final_state, aux) = scan_window(
                self.step,
                eqx.combine(_diff_model, static_model),
                state,
                inputs,
                reduction=self.reduction,
                has_aux=self.has_aux,
            )
            return (value, final_state), aux

        # A leaf is live if its tangent reaches the loss or the state carried on.
        split = split_live(lambda d: window(d, carry.state)[0], diff_model)
        directions = _live_directions(split, carry.directions, self.mode)

        (value, final_state), derivatives, final_tangent, aux = self._derivatives(
            split.of(window), (split.live, carry.state), (directions, carry.tangent)
        )
        # Average mode divides by k; partition parts and a candidate sum.
        weights = derivatives
        if self.mode == "average" and derivatives.shape[0] > 1:
            weights = derivatives / derivatives.shape[0]
        estimate = jax.tree.map(
            lambda u: jnp.tensordot(weights.astype(u.dtype), u, axes=1), directions
        )
        estimate = split.widen(estimate)
        new_carry = OnlineDodgeState(final_state, final_tangent, carry.directions)
        return ((value, aux) if self.has_aux else value), estimate, new_carry


# Compiled as a whole, as `filter_dodge` is: outside `jit` a window costs one
# compilation (cached for the same step function and shapes) instead of compiling
# the window's scan at every call; inside `jit` it is inlined.
@eqx.filter_jit
def _window_jit(online: OnlineDodge, model: PyTree, carry: OnlineDodgeState, inputs):
    return online._window(model, carry, inputs)
