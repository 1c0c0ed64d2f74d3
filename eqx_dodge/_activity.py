r"""Activity-perturbed forward gradients (Ren, Kornblith, Liao & Hinton, *Scaling
Forward Gradient With Local Losses*, ICLR 2023).

Every `eqx.nn.Linear`, `eqx.nn.Conv` and `ActivityPoint` of the model is a
*perturbation point*: its output `z` gets a random tangent `v`, drawn independently
for every example, every point, every call of the point within an example, every
application under the model's own `vmap` and every direction. The other
trainable leaves (norm scales, embeddings, free parameters) get a weight-space
Rademacher tangent `u` shared by the batch. Two passes form the estimate:

- pass A, forward mode: one `jax.jvp` per example gives the loss `L_b` and
    `d_b = Σ_l δ_{b,l}·v_{b,l} + ∇_θ L_b·u`, with `δ_{b,l} = ∂L_b/∂z_{b,l}`;
- pass B, a *local* reverse pass: `jax.grad` of `Σ_b L_b` with respect to the
    points' parameters only, where every point passes its output through an
    identity whose backward rule ignores the incoming cotangent and returns the fixed
    cotangent `c_{b,l} = d_b v_{b,l}`. Nothing chains through the network (the
    cotangents that would reach a point are dead code, removed under `jit`; the
    outputs stay connected so that JAX calls the rule at all): the result is exactly
    `Σ_b c_{b,l} x_{b,l}ᵀ` for a Linear layer (the weight gradient of the
    convolution for a Conv), computed by JAX's own rules for the layer.

Both passes regenerate the signs `v` from the same raw Threefry words, so nothing
leaves a trace except through its outputs.
"""

import functools as ft
import pathlib
from collections.abc import Callable
from typing import Any, TypedDict, Unpack

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, UInt32

from ._activity_points import (
    _CotangentContext,
    _TangentContext,
    ModelParts,
    split_model,
)
from ._checks import (
    as_key,
    check_callable,
    check_int,
    check_keywords,
    first_argument,
    KeyLike,
    loss_and_aux,
)
from ._derivatives import jvp, vmap_with_aux
from ._directions import accumulation_dtype, sample_direction, trainable
from ._filter import _DodgeWrapper, BatchWrapperMethods
from ._live import live_mask, zero_dead
from ._tangents import weighted_sum
from ._threefry import key_words
from ._value_fn import call_loss


class ActivityKeywords(TypedDict, total=False):
    """The keyword arguments of both `activity_*` besides `key`, declared once for
    their signatures (PEP 692); the defaults are `ActivityOptions`'s."""

    num_directions: int
    separate_layers: bool
    has_aux: bool


class ActivityOptions(eqx.Module):
    # Annotated `Any`: `__check_init__` checks them and names the argument.
    key: Any
    num_directions: Any = eqx.field(static=True, default=1)
    separate_layers: Any = eqx.field(static=True, default=False)
    has_aux: Any = eqx.field(static=True, default=False)

    def __check_init__(self):
        as_key(self.key)
        check_int("num_directions", self.num_directions, 1)
        if not isinstance(self.separate_layers, bool):
            raise TypeError(
                "`separate_layers` must be a Python bool, got "
                f"{self.separate_layers!r}."
            )
        if not isinstance(self.has_aux, bool):
            raise TypeError(f"`has_aux` must be a Python bool, got {self.has_aux!r}.")


def _batch_size(batch: tuple) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise TypeError(
            "Functions wrapped with `eqx_dodge.activity_{dodge, value_and_dodge}` "
            "need the batch as positional arrays after the model, with the examples "
            "along their leading axis; got none."
        )
    shapes = [jnp.shape(leaf) for leaf in leaves]
    sizes = {shape[0] if shape else -1 for shape in shapes}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "The positional batch arguments must share their leading (example) axis; "
            f"got shapes {shapes}."
        )
    return shapes[0][0]


def _raised_here(error: BaseException) -> bool:
    """Whether `error` was raised by eqx_dodge's own code (its innermost frame)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return pathlib.Path(traceback.tb_frame.f_code.co_filename).parent == _PACKAGE


_PACKAGE = pathlib.Path(__file__).parent


def _is_none(x: Any) -> bool:
    return x is None


def _example_value(
    fun: Callable, kwargs: dict, has_aux: bool, model: PyTree, example: tuple
) -> tuple[Array, Any]:
    """The checked loss of one example and its `aux` (`None` without `has_aux`)."""
    try:
        out = call_loss(fun, model, example, kwargs)
    except Exception as error:
        if _raised_here(error):  # eqx_dodge's own messages say what is wrong
            raise
        if any(leaf is None for leaf in jax.tree.leaves(model, is_leaf=_is_none)):
            # Most likely the trainable half of `eqx.partition`, combined inside.
            error.add_note(
                "eqx_dodge's activity estimators hand `example_loss` its first "
                "argument with each Linear and Conv layer wrapped (where its output "
                "is perturbed), so a model split with `eqx.partition` cannot be put "
                "back together with `eqx.combine` inside the loss. Pass the whole "
                "model and freeze the other part inside the loss with "
                "`jax.lax.stop_gradient` (the FAQ: 'How do I freeze part of a "
                "model?'); its leaves then get exact zeros."
            )
            raise
        shapes = jax.tree.map(jnp.shape, example)
        error.add_note(
            "eqx_dodge's activity estimators call `example_loss` on ONE example at a "
            f"time, the batch's leading axis removed (here shapes {shapes}), under "
            "`jax.vmap`: a loss written for a whole batch (one that vmaps the model "
            "over it) fails on one example, and a layer that needs the batch "
            "(`eqx.nn.BatchNorm`) is not supported."
        )
        raise
    return loss_and_aux(out, "example_loss", has_aux)


def _draw_tangents(
    key: Any, others: PyTree, num_directions: int, batch_size: int
) -> tuple[UInt32[Array, "k b 2"], PyTree]:
    """The raw words of the points' signs and the other leaves' directions `u`."""
    point_key, other_key = jax.random.split(as_key(key))
    # Raw Threefry words for every (direction, example); each point folds in its
    # index and call number.
    words = key_words(point_key, (num_directions, batch_size))
    if num_directions == 1:
        other_keys = other_key[None]
    else:
        other_keys = jax.random.split(other_key, num_directions)
    directions = jax.vmap(lambda k: sample_direction(k, others, "rademacher"))(
        other_keys
    )
    return words, directions


def _depending_on(words: UInt32[Array, "k b 2"], inputs: Any) -> UInt32[Array, "k b 2"]:
    """`words`, made to depend on every array the estimator receives, so that a
    `vmap` around the estimator that batches any of them (an ensemble of models,
    step sizes, data sets with one key) batches the words too. The signs' batching
    rule (`_activity_points._signs_folding`) then takes it for a `vmap` of the
    library's, and each member draws the signs it would draw alone; only a `vmap`
    inside the example (the model's own) batches a layer's output but not the words.
    The dependency is on one entry of each array, through a test XLA cannot fold:
    the words change only when such an entry is NaN, the same in both cases."""
    arrays = [
        x
        for x in jax.tree.leaves(inputs)
        if eqx.is_array(x) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    if not arrays:
        return words
    firsts = jnp.concatenate([jnp.ravel(x)[:1].astype(jnp.float32) for x in arrays])
    return words + jnp.any(jnp.isnan(firsts)).astype(words.dtype)


def _without_dead_leaves(
    directions: PyTree, parts: ModelParts, example_value: Callable, batch: tuple
) -> PyTree:
    """`directions` with zeros at the weight-space leaves whose tangent never reaches
    the loss (frozen behind `jax.lax.stop_gradient`): their estimate is then exactly
    zero, as `eqx.filter_grad`'s, instead of drifting by `d·u`. The points need no
    such care: their estimate is pass B's gradient, zero behind a `stop_gradient`."""
    example = jax.tree.map(lambda leaf: leaf[0], batch)

    def value(others):
        model = eqx.combine(parts.layers, others, parts.static)
        return example_value(model, example)[0]

    return zero_dead(directions, live_mask(value, parts.others))


def _example_derivatives(
    example_value: Callable,
    parts: ModelParts,
    example: tuple,
    words_jb: UInt32[Array, "2"],
    direction: PyTree,
):
    """Pass A for one example and one direction: its loss, the derivatives `d[g]`
    (one per group, or a single one) and its `aux`.

    With several groups, each group's pass is a `jvp` of its own in which only its
    points inject a tangent and only its weight-space leaves carry one: everything
    before a group's first point has a zero tangent that JAX does not compute, so a
    pass costs the network downstream of its points, not the whole network (a
    `vmap` over the groups would carry a dense zero tangent through every layer).
    XLA computes the passes' shared primal once."""
    group_of = parts.other_group_tree(direction)

    def group_pass(group: int | None):
        def selected(g):
            return group is None or g == group

        mask = jax.tree.map(selected, group_of)
        others, fixed = eqx.partition(parts.others, mask)

        def loss(epsilon, others):
            context = _TangentContext(words_jb, epsilon, group)
            model = parts.with_points(parts.layers, eqx.combine(others, fixed), context)
            return example_value(model, example)

        epsilon = jnp.zeros((), jnp.float32)
        tangents = (jnp.ones((), jnp.float32), eqx.filter(direction, mask))
        return jvp(loss, (epsilon, others), tangents, has_aux=True)

    if parts.num_groups == 1:
        value, derivative, aux = group_pass(None)
        return value, derivative[None], aux
    passes = [group_pass(group) for group in range(parts.num_groups)]
    value, _, aux = passes[0]
    return value, jnp.stack([derivative for _, derivative, _ in passes]), aux


def _forward_pass(
    example_value: Callable,
    parts: ModelParts,
    batch: tuple,
    words: UInt32[Array, "k b 2"],
    directions: PyTree,
) -> tuple[Array, Float[Array, "k b g"], Any]:
    """Pass A: the loss and the derivatives d[j, b, g]."""
    example_derivatives = ft.partial(_example_derivatives, example_value, parts)

    def direction_derivatives(words_j, direction):
        return vmap_with_aux(
            lambda example, w: example_derivatives(example, w, direction),
            (0, 0, 0),
            batch,
            words_j,
        )

    values, derivatives, aux = vmap_with_aux(
        direction_derivatives, (None, 0, None), words, directions
    )
    num_directions, batch_size = words.shape[:2]
    derivatives = derivatives.reshape(num_directions, batch_size, parts.num_groups)
    # At least float32 (float64 losses keep float64).
    derivatives = derivatives.astype(accumulation_dtype(derivatives))
    return values, derivatives, aux


def _local_pass(
    example_value: Callable,
    parts: ModelParts,
    batch: tuple,
    words: UInt32[Array, "k b 2"],
    derivatives: Float[Array, "k b g"],
) -> PyTree:
    """Pass B: the points' parameters, from the fixed cotangents d_b v_b."""
    if parts.num_points == 0:
        return parts.layers

    def cotangent_loss(layers, example, words_b, derivatives_b):
        context = _CotangentContext(words_b, derivatives_b)
        model = parts.with_points(layers, parts.others, context)
        return example_value(model, example)[0]

    def batch_sum(layers):
        values = jax.vmap(cotangent_loss, in_axes=(None, 0, 1, 1))(
            layers, batch, words, derivatives
        )
        return jnp.sum(values)

    batch_size = words.shape[1]
    layer_sums = jax.grad(batch_sum)(parts.layers)
    return jax.tree.map(lambda g: (g / batch_size).astype(g.dtype), layer_sums)


def _assemble_estimate(
    model: PyTree,
    parts: ModelParts,
    layer_estimate: PyTree,
    directions: PyTree,
    derivatives: Float[Array, "k b g"],
) -> PyTree:
    """The points' estimate from pass B and `(mean_b d_b) u` for the other leaves,
    averaged over directions and cast to the model's dtypes."""
    num_directions = derivatives.shape[0]
    coefficients = jnp.mean(derivatives, axis=1) / num_directions
    other_estimate = jax.tree.map(
        lambda u, g: weighted_sum(u, coefficients[:, g]),
        directions,
        parts.other_group_tree(directions),
    )
    estimate = eqx.combine(layer_estimate, other_estimate)
    return jax.tree.map(lambda e, p: e.astype(p.dtype), estimate, trainable(model))


class _ActivityValueAndDodgeWrapper(BatchWrapperMethods):
    _fun: Callable
    _options: ActivityOptions

    def __call__(self, *args, **kwargs):
        first_argument(args, kwargs, "activity_{dodge, value_and_dodge}")
        return _activity_jit(self, args, kwargs)

    def _value_and_estimate(self, args: tuple, kwargs: dict) -> tuple[Any, PyTree]:
        model, batch = args[0], tuple(args[1:])
        options = self._options
        batch_size = _batch_size(batch)
        parts = split_model(model, options.separate_layers)
        example_value = ft.partial(_example_value, self._fun, kwargs, options.has_aux)
        words, directions = _draw_tangents(
            options.key, parts.others, options.num_directions, batch_size
        )
        words = _depending_on(words, (model, batch, kwargs))
        directions = _without_dead_leaves(directions, parts, example_value, batch)
        values, derivatives, aux = _forward_pass(
            example_value, parts, batch, words, directions
        )
        value = jnp.mean(values)
        layer_estimate = _local_pass(example_value, parts, batch, words, derivatives)
        estimate = _assemble_estimate(
            model, parts, layer_estimate, directions, derivatives
        )
        return ((value, aux) if options.has_aux else value), estimate


# Compiled as a whole, as `filter_dodge` is: outside `jit` a call costs one
# compilation (cached for the same loss and shapes) instead of running operation by
# operation; inside `jit` it is inlined.
@eqx.filter_jit
def _activity_jit(wrapper: _ActivityValueAndDodgeWrapper, args: tuple, kwargs: dict):
    return wrapper._value_and_estimate(args, kwargs)


def _activity_wrapper(
    function: str, example_loss: Any, key: Any, options: ActivityKeywords
) -> _ActivityValueAndDodgeWrapper:
    """The value-and-estimate wrapper of `example_loss` for the public `function`,
    its arguments checked."""
    check_callable("example_loss", example_loss)
    check_keywords(function, options, ActivityKeywords)
    return _ActivityValueAndDodgeWrapper(example_loss, ActivityOptions(key, **options))


def activity_value_and_dodge(
    example_loss: Callable, *, key: KeyLike, **options: Unpack[ActivityKeywords]
) -> Callable:
    r"""Creates a function that evaluates the mean loss of a batch and an
    activity-perturbed forward-gradient estimate of its gradient.

    Activity perturbation (Ren, Kornblith, Liao & Hinton, *Scaling Forward Gradient
    With Local Losses*, ICLR 2023) perturbs the *outputs* of the layers instead of
    their weights. Every `eqx.nn.Linear` and `eqx.nn.Conv` (`Conv1d`, `Conv2d`,
    `Conv3d`) found anywhere in the model, and every Module marked with
    [`eqx_dodge.ActivityPoint`][], is a perturbation point: its output
    $z_{b,l}$ for example $b$ gets a Rademacher tangent $v_{b,l}$ of its own, and one
    forward-mode pass gives each example's directional derivative
    $d_b = \sum_l \delta_{b,l}\cdot v_{b,l} + \nabla_\theta L_b \cdot u$, where
    $\delta_{b,l} = \partial L_b/\partial z_{b,l}$ and $u$ is a weight-space
    Rademacher tangent on every other floating-point leaf (norm scales, embeddings,
    ...), shared by the batch. The estimates

    $$
    \hat W_l = \frac1B \sum_b d_b\, v_{b,l}\, x_{b,l}^\top ,\qquad
    \hat c_l = \frac1B \sum_b d_b\, v_{b,l} ,\qquad
    \hat\theta = \Big(\frac1B \sum_b d_b\Big)\, u
    $$

    are unbiased for the gradient of the batch mean $\frac1B\sum_b L_b$, with a
    variance lower than weight perturbation's by about the layers' fan-in and the
    batch size. The products with the layer inputs $x_{b,l}$ come from a second,
    local pass: `jax.grad` of the points' parameters in which every point receives
    the fixed cotangent $d_b v_{b,l}$ at its output instead of the one coming from
    the rest of the network, so nothing is backpropagated through the network.

    !!! warning

        A layer applied under a `lax.scan`, `lax.map` or `lax.while_loop` *inside*
        `example_loss` (a recurrent cell in a scan) gets one tangent for all its
        applications, which biases its estimate. A layer called several times in a
        Python loop or under the model's own `jax.vmap` (the per-token projections
        of `eqx.nn.MultiheadAttention`) gets a fresh tangent per application and
        stays unbiased. BatchNorm in training mode mixes examples and cannot be used
        per example.

    **Arguments:**

    - `example_loss`: the loss of ONE example, `example_loss(model, *example,
        **kwargs)`, returning a scalar (or `(scalar, aux)` when `has_aux=True`).
    - `key`: a PRNG key (`jax.random.key`, a legacy `jax.random.PRNGKey`) or an int
        seed. Use a fresh key at every step.
    - `num_directions`: the number `k` of independent draws of all the tangents,
        averaged (default 1); the forward-mode pass carries them in one `vmap`, the
        local pass runs once whatever `k`.
    - `separate_layers`: if `True` (default `False`), each point gets its own
        forward-mode pass, and so does each Module holding other leaves directly (a
        LayerNorm), so that no other layer's noise enters a layer's estimate: lower
        variance for `L + M` tangent passes instead of one. A point's pass carries
        a tangent from that point on only, so it costs the network downstream of
        the point; the passes share one primal forward pass. With
        [`eqx_dodge.LocalLosses`][] it keeps every block's estimate free of the
        other blocks' losses.
    - `has_aux`: if `True` (default `False`), `example_loss` returns `(value, aux)`;
        the `aux` of every example is passed back, stacked along a leading batch
        axis.

    **Returns:**

    A function called as `(model, *batch, **kwargs)`: the positional `batch`
    arguments are PyTrees of arrays sharing a leading (example) axis, split along
    it; the keyword arguments are passed whole to every example. It returns
    `(value, estimate)`, or `((value, aux), estimate)` when `has_aux=True`, where
    `value` is the mean loss over the batch and `estimate` is shaped like
    `eqx.filter_grad`'s output for that mean (the dtype of each floating-point leaf,
    `None` at every other leaf).
    """
    wrapper = _activity_wrapper("activity_value_and_dodge", example_loss, key, options)
    return eqx.module_update_wrapper(wrapper)


def activity_dodge(
    example_loss: Callable, *, key: KeyLike, **options: Unpack[ActivityKeywords]
) -> Callable:
    r"""Creates a function that returns an activity-perturbed forward-gradient
    estimate of the gradient of a batch's mean loss.

    The estimate of [`eqx_dodge.activity_value_and_dodge`][], without the value:

    ```python
    def example_loss(model, x, y):  # one example
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

    grads = eqx.filter_grad(batch_mean_loss)(model, x, y)                 # before
    grads = eqx_dodge.activity_dodge(example_loss, key=k)(model, x, y)    # after
    ```

    **Arguments:** the same as [`eqx_dodge.activity_value_and_dodge`][]'s:
    `example_loss`, `key`, `num_directions`, `separate_layers`, `has_aux`.

    **Returns:**

    A function called as `(model, *batch, **kwargs)` returning the estimate, a PyTree
    like the model with `None` at its non-floating-point leaves; or
    `(estimate, aux)` when `has_aux=True`.
    """
    wrapper = _activity_wrapper("activity_dodge", example_loss, key, options)
    return eqx.module_update_wrapper(_DodgeWrapper(wrapper, wrapper._options.has_aux))
