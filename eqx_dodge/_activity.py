r"""Activity-perturbed forward gradients (Ren, Kornblith, Liao & Hinton, *Scaling
Forward Gradient With Local Losses*, ICLR 2023).

Every `eqx.nn.Linear` and `eqx.nn.Conv` of the model is a *perturbation point*: its
output `z` gets a random tangent `v`, drawn independently for every example, every
point, every call of the point within an example and every direction. The other
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
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, UInt32

from ._checks import (
    as_key,
    check_callable,
    check_int,
    check_scalar_loss,
    first_argument,
    KeyLike,
)
from ._directions import sample_direction, trainable
from ._filter import _DodgeWrapper, WrapperMethods
from ._tangents import weighted_sum
from ._threefry import rademacher_like


PointLayer = eqx.nn.Linear | eqx.nn.Conv
# Points are numbered in 16 bits, calls of one point within an example in the other 16.
_INDEX_BITS = 16


def is_point(node: Any) -> bool:
    """Whether `node` is a layer whose output is perturbed."""
    return isinstance(node, PointLayer)


# --- Random signs -------------------------------------------------------------------


def _point_words(
    words: UInt32[Array, "2"], index: int, call: int
) -> UInt32[Array, "2"]:
    """The key words of one call of one point: Threefry keys are meant to carry
    application identifiers (Salmon et al., SC 2011), so the point index and call
    number are written into the second word of the example's random key."""
    tag = (call << _INDEX_BITS) | index
    return words ^ jnp.array([0, tag % 2**32], jnp.uint32)


def _signs(words: UInt32[Array, "2"], like: Array) -> Array:
    """Rademacher signs shaped and typed like `like`, from raw Threefry key words."""
    return rademacher_like(jax.random.wrap_key_data(words, impl="threefry2x32"), like)


# --- The two point rules ------------------------------------------------------------


@ft.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _inject(z: Array, epsilon: Float[Array, " g"], signs: Array, group: int) -> Array:
    # The output `z + ε_g v` at `ε = 0`, the only point it is evaluated at: the
    # primal is `z` itself, so that under a `vmap` over directions (which batches
    # `v`) the primal computation is not batched and runs once.
    del epsilon, signs, group
    return z


@_inject.defjvp
def _inject_jvp(group, primals, tangents):
    z, _, signs = primals
    z_dot, epsilon_dot, _ = tangents
    return z, z_dot + epsilon_dot[group].astype(z.dtype) * signs


@jax.custom_vjp
def _fixed_cotangent(z: Array, cotangent: Array) -> Array:
    del cotangent
    return z


def _fixed_cotangent_fwd(z, cotangent):
    return z, cotangent


def _fixed_cotangent_bwd(cotangent, incoming):
    # The incoming cotangent (what backpropagation would use) is ignored: the point
    # receives `d_b v_b` from pass A instead, so pass B never chains through layers.
    del incoming
    return cotangent, jnp.zeros_like(cotangent)


_fixed_cotangent.defvjp(_fixed_cotangent_fwd, _fixed_cotangent_bwd)


# --- Perturbation points ------------------------------------------------------------


class _Calls:
    """How many times each point has been called in the current trace of one
    example, so that a layer called in a Python loop gets a fresh tangent per call.
    Both passes trace the example the same way, so they count the same calls."""

    def __init__(self):
        self.count = 0

    def next(self) -> int:
        if self.count >= 2 ** (32 - _INDEX_BITS):
            raise ValueError(
                "A Linear or Conv layer was called more than "
                f"{2 ** (32 - _INDEX_BITS)} times for one example."
            )
        self.count += 1
        return self.count - 1


class _TangentContext(eqx.Module):
    """Pass A, one example and one direction: the raw words of its signs and the
    perturbation scales `ε` (zero; their tangents select the groups)."""

    words: UInt32[Array, "2"]
    epsilon: Float[Array, " g"]

    def apply(self, layer: Callable, x: Array, words: Array, group: int, key) -> Array:
        z = layer(x, key=key)
        return _inject(z, self.epsilon, _signs(words, z), group)


class _CotangentContext(eqx.Module):
    """Pass B, one example: the words of every direction and the derivatives
    `d[j, g]` of pass A, which make the fixed cotangents `c = mean_j d[j, g] v_j`."""

    words: UInt32[Array, "k 2"]
    derivatives: Float[Array, "k g"]

    def apply(self, layer: Callable, x: Array, words: Array, group: int, key) -> Array:
        z = layer(x, key=key)
        signs = jax.vmap(lambda w: _signs(w, z))(words)
        scale = self.derivatives[:, group] / self.derivatives.shape[0]
        cotangent = jnp.tensordot(scale, signs.astype(jnp.float32), axes=1)
        return _fixed_cotangent(z, cotangent.astype(z.dtype))


class _Point(eqx.Module):
    """A Linear or Conv layer whose output is perturbed (pass A) or receives a fixed
    cotangent (pass B)."""

    layer: PointLayer
    context: _TangentContext | _CotangentContext
    index: int = eqx.field(static=True)
    group: int = eqx.field(static=True)
    calls: _Calls = eqx.field(static=True)

    def __getattr__(self, name: str) -> Any:
        # Only called for names `_Point` lacks. The layer's static fields
        # (`in_features`, `out_channels`, ...) read through; its arrays do not, since
        # a weight used outside the layer's call would be left out of the estimate.
        if name.startswith("__") or name in _POINT_FIELDS:
            raise AttributeError(name)
        value = getattr(self.layer, name)
        if eqx.is_array(value):
            raise AttributeError(
                f"`example_loss` reads `.{name}` of a {type(self.layer).__name__} "
                "layer directly. eqx_dodge.activity_dodge perturbs the outputs of "
                "Linear and Conv layers, so it needs them called (`layer(x)`); a "
                "weight used outside a call would be left out of its estimate."
            )
        return value

    def __call__(self, x: Array, *, key=None) -> Array:
        call = self.calls.next()

        def point_words(words):
            return _point_words(words, self.index, call)

        words = self.context.words
        words = point_words(words) if words.ndim == 1 else jax.vmap(point_words)(words)
        return self.context.apply(self.layer, x, words, self.group, key)


_POINT_FIELDS = frozenset(("layer", "context", "index", "group", "calls"))


def _with_points(
    model: PyTree, context: _TangentContext | _CotangentContext, separate: bool
) -> PyTree:
    """`model` with each Linear and Conv layer replaced by a `_Point`."""
    leaves, treedef = jax.tree.flatten(model, is_leaf=is_point)
    index = 0
    wrapped = []
    for leaf in leaves:
        if is_point(leaf):
            group = index if separate else 0
            leaf = _Point(leaf, context, index, group, _Calls())
            index += 1
        wrapped.append(leaf)
    return jax.tree.unflatten(treedef, wrapped)


def _point_mask(model: PyTree) -> PyTree:
    """`True` at the inexact leaves of the perturbation points, `False` elsewhere."""

    def mark(node):
        if is_point(node):
            return jax.tree.map(eqx.is_inexact_array, node)
        return False

    return jax.tree.map(mark, model, is_leaf=is_point)


def _num_points(model: PyTree) -> int:
    return sum(map(is_point, jax.tree.leaves(model, is_leaf=is_point)))


# --- The estimator ------------------------------------------------------------------


class ActivityOptions(eqx.Module):
    # Annotated `Any`: `__check_init__` checks them and names the argument.
    key: Any
    num_directions: Any = eqx.field(static=True)
    separate_layers: Any = eqx.field(static=True)
    has_aux: Any = eqx.field(static=True)

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


class _ActivityValueAndDodgeWrapper(WrapperMethods):
    _fun: Callable
    _options: ActivityOptions

    def __call__(self, *args, **kwargs):
        first_argument(args, kwargs, "activity_{dodge, value_and_dodge}")
        model, *batch = args
        batch = tuple(batch)
        options = self._options
        has_aux = options.has_aux
        num_directions = options.num_directions
        batch_size = _batch_size(batch)

        layers, rest = eqx.partition(trainable(model), _point_mask(model))
        others, _ = eqx.partition(rest, eqx.is_inexact_array)
        static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
        num_points = _num_points(model)
        if num_points >= 2**_INDEX_BITS:
            raise ValueError(
                f"At most {2**_INDEX_BITS - 1} Linear and Conv layers are supported, "
                f"the model has {num_points}."
            )
        has_others = len(jax.tree.leaves(others)) > 0
        separate = options.separate_layers
        num_groups = (num_points + has_others) if separate else 1
        num_groups = max(num_groups, 1)
        other_group = num_groups - 1

        def example_value(model, example):
            out = self._fun(model, *example, **kwargs)
            value, aux = out if has_aux else (out, None)
            return check_scalar_loss(value, "example_loss", has_aux), aux

        point_key, other_key = jax.random.split(as_key(options.key))
        # Raw Threefry words for every (direction, example); each point folds in its
        # index and call number. One draw of bits consumes the key once, whatever
        # its implementation.
        words = jax.random.bits(point_key, (num_directions, batch_size, 2), jnp.uint32)
        if num_directions == 1:
            other_keys = other_key[None]
        else:
            other_keys = jax.random.split(other_key, num_directions)
        directions = jax.vmap(lambda k: sample_direction(k, others, "rademacher"))(
            other_keys
        )

        # Pass A: the loss and the derivatives d[j, b, g].
        def tangent_pass(example, words_jb, epsilon_dot, other_dot):
            def loss(epsilon, others):
                context = _TangentContext(words_jb, epsilon)
                full = eqx.combine(layers, others, static)
                return example_value(_with_points(full, context, separate), example)

            epsilon = jnp.zeros((num_groups,), jnp.float32)
            return jax.jvp(
                loss, (epsilon, others), (epsilon_dot, other_dot), has_aux=True
            )

        def example_derivatives(example, words_jb, direction):
            if num_groups == 1:
                return tangent_pass(
                    example, words_jb, jnp.ones((1,), jnp.float32), direction
                )
            selections = jnp.eye(num_groups, dtype=jnp.float32)

            def group_pass(selection):
                on = selection[other_group].astype(jnp.float32)
                other_dot = jax.tree.map(lambda u: u * on.astype(u.dtype), direction)
                return tangent_pass(example, words_jb, selection, other_dot)

            return jax.vmap(group_pass, out_axes=(None, 0, None))(selections)

        def direction_derivatives(words_j, direction):
            return jax.vmap(example_derivatives, in_axes=(0, 0, None))(
                batch, words_j, direction
            )

        values, derivatives, aux = jax.vmap(
            direction_derivatives, out_axes=(None, 0, None)
        )(words, directions)
        derivatives = derivatives.reshape(num_directions, batch_size, num_groups)
        derivatives = derivatives.astype(jnp.float32)
        value = jnp.mean(values)

        # Pass B: the points' parameters, from the fixed cotangents d_b v_b.
        def cotangent_loss(layers, example, words_b, derivatives_b):
            context = _CotangentContext(words_b, derivatives_b)
            full = eqx.combine(layers, others, static)
            value, _ = example_value(_with_points(full, context, separate), example)
            return value

        def batch_sum(layers):
            values = jax.vmap(cotangent_loss, in_axes=(None, 0, 1, 1))(
                layers, batch, words, derivatives
            )
            return jnp.sum(values)

        if num_points > 0:
            layer_sums = jax.grad(batch_sum)(layers)
            layer_estimate = jax.tree.map(
                lambda g: (g / batch_size).astype(g.dtype), layer_sums
            )
        else:
            layer_estimate = layers
        coefficients = jnp.mean(derivatives[:, :, other_group], axis=1)
        other_estimate = weighted_sum(directions, coefficients / num_directions)
        estimate = eqx.combine(layer_estimate, other_estimate)
        estimate = jax.tree.map(
            lambda e, p: e.astype(p.dtype), estimate, trainable(model)
        )
        return ((value, aux) if has_aux else value), estimate


def activity_value_and_dodge(
    example_loss: Callable,
    *,
    key: KeyLike,
    num_directions: int = 1,
    separate_layers: bool = False,
    has_aux: bool = False,
) -> Callable:
    r"""Creates a function that evaluates the mean loss of a batch and an
    activity-perturbed forward-gradient estimate of its gradient.

    Activity perturbation (Ren, Kornblith, Liao & Hinton, *Scaling Forward Gradient
    With Local Losses*, ICLR 2023) perturbs the *outputs* of the layers instead of
    their weights. Every `eqx.nn.Linear` and `eqx.nn.Conv` (`Conv1d`, `Conv2d`,
    `Conv3d`) found anywhere in the model is a perturbation point: its output
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

        A layer applied under a `jax.vmap`, `lax.scan` or `lax.while_loop` *inside*
        `example_loss` (a per-token `jax.vmap(self.linear)(tokens)`, as in
        `eqx.nn.MultiheadAttention`, or a recurrent cell in a scan) gets one tangent
        for all those applications, which biases its estimate. A layer called several
        times in a Python loop gets a fresh tangent per call and stays unbiased.
        BatchNorm in training mode mixes examples and cannot be used per example.

    **Arguments:**

    - `example_loss`: the loss of ONE example, `example_loss(model, *example,
        **kwargs)`, returning a scalar (or `(scalar, aux)` when `has_aux=True`).
    - `key`: a PRNG key (`jax.random.key`, a legacy `jax.random.PRNGKey`) or an int
        seed. Use a fresh key at every step.
    - `num_directions`: the number `k` of independent draws of all the tangents,
        averaged; the forward-mode pass carries them in one `vmap`, the local pass
        runs once whatever `k`.
    - `separate_layers`: if `True`, each point gets its own forward-mode pass (the
        points' passes vectorised with `vmap`), and the other leaves one more, so that
        no other layer's noise enters a layer's estimate: lower variance for about
        `L + 1` forward-mode passes instead of one.
    - `has_aux`: if `True`, `example_loss` returns `(value, aux)`; the `aux` of
        every example is passed back, stacked along a leading batch axis.

    **Returns:**

    A function called as `(model, *batch, **kwargs)`: the positional `batch`
    arguments are PyTrees of arrays sharing a leading (example) axis, split along
    it; the keyword arguments are passed whole to every example. It returns
    `(value, estimate)`, or `((value, aux), estimate)` when `has_aux=True`, where
    `value` is the mean loss over the batch and `estimate` is shaped like
    `eqx.filter_grad`'s output for that mean (the dtype of each floating-point leaf,
    `None` at every other leaf).
    """
    check_callable("example_loss", example_loss)
    options = ActivityOptions(key, num_directions, separate_layers, has_aux)
    return eqx.module_update_wrapper(
        _ActivityValueAndDodgeWrapper(example_loss, options)
    )


def activity_dodge(
    example_loss: Callable,
    *,
    key: KeyLike,
    num_directions: int = 1,
    separate_layers: bool = False,
    has_aux: bool = False,
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
    check_callable("example_loss", example_loss)
    options = ActivityOptions(key, num_directions, separate_layers, has_aux)
    return eqx.module_update_wrapper(
        _DodgeWrapper(_ActivityValueAndDodgeWrapper(example_loss, options), has_aux)
    )
