"""The perturbation points of `activity_{dodge, value_and_dodge}`: the Linear and
Conv layers wrapped so that their outputs get a random tangent (pass A) or a fixed
cotangent (pass B), the raw Threefry words their signs are drawn from, and the model
split around them for the two passes."""

import functools as ft
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Float, PyTree, UInt32

from ._directions import trainable
from ._threefry import key_words, rademacher_like


class ActivityPoint(eqx.Module):
    """Marks a Module of your own as a perturbation point of the activity
    estimators ([`eqx_dodge.activity_dodge`][], [`eqx_dodge.dodge_activity`][]),
    as every `eqx.nn.Linear` and `eqx.nn.Conv` already is.

    ```python
    class Gated(eqx.Module):  # parameters used in a hand-written product
        weight: jax.Array
        gate: jax.Array

        def __call__(self, x):
            return (self.weight @ x) * jax.nn.sigmoid(self.gate)

    self.gated = eqx_dodge.ActivityPoint(Gated(weight, gate))  # in the model
    ```

    Called, it calls the Module it wraps, with the same arguments, and returns
    its output; outside the activity estimators it changes nothing. Inside them, the
    output (one array) gets a random tangent per example, and every floating-point
    leaf of the wrapped Module gets its estimate from that output's estimated
    derivative, chained back through the Module alone: unbiased whatever the Module
    computes, with a variance set by the size of its output instead of the number
    of its parameters. A Linear or Conv layer inside it is part of the point, not a
    point of its own. Its parameters must not be read outside its call.

    **Arguments:**

    - `layer`: the Module (any callable PyTree) to perturb at its output.
    """

    layer: Callable

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer(*args, **kwargs)


PointLayer = eqx.nn.Linear | eqx.nn.Conv | ActivityPoint
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


def _draw(
    words: UInt32[Array, "*w 2"], like: Array, num_folded: int
) -> Float[Array, "..."]:
    """Signs shaped `words.shape[:-1] + like.shape`: entry `[w, f, ...]` comes from
    `words[w]` with the index `f` of `like`'s `num_folded` leading axes (the
    applications of a layer under the model's own `vmap`s) hashed into it."""
    folded = like.shape[:num_folded]
    one_application = like[(0,) * num_folded]

    def draw(words: UInt32[Array, "2"]) -> Array:
        key = jax.random.wrap_key_data(words, impl="threefry2x32")
        return rademacher_like(key, one_application, kept_apart=True)

    def applications(words: UInt32[Array, "2"]) -> Array:
        if not num_folded:
            return draw(words)
        key = jax.random.wrap_key_data(words, impl="threefry2x32")
        per_application = key_words(key, (math.prod(folded),))
        return jax.vmap(draw)(per_application).reshape(like.shape)

    for _ in range(words.ndim - 1):
        applications = jax.vmap(applications)
    return applications(words)


@ft.cache
def _signs_folding(num_folded: int) -> Callable[[Array, Array], Array]:
    """`_draw` with `num_folded` axes folded, and a batching rule that tells the
    axes of a `vmap` apart. Where the words are batched, the `vmap` is this
    library's (over examples or directions), whose words already differ. Where only
    the layer's output is, the `vmap` is the model's own inside one example (a
    per-token `jax.vmap(self.linear)(tokens)`): each application needs a tangent of
    its own, or the cross terms of different applications bias the estimate, so the
    axis is folded into the hash. Both passes fold the same axes in the same order
    whatever the nesting of their own `vmap`s, so they draw the same signs."""

    @custom_vmap
    def signs(words: Array, like: Array) -> Array:
        return _draw(words, like, num_folded)

    @signs.def_vmap
    def _(axis_size, in_batched, words, like):
        del axis_size
        words_batched, like_batched = in_batched
        if words_batched:
            return signs(words, like[0] if like_batched else like), True
        folded = _signs_folding(num_folded + 1)(words, like)
        return jnp.moveaxis(folded, words.ndim - 1, 0), True

    return signs


def _signs(words: UInt32[Array, "2"], like: Array) -> Array:
    """Rademacher signs shaped and typed like `like`, from raw Threefry key words,
    fresh for every application of the layer under the model's own `vmap`s. Both
    passes read them transposed (per example, laid out for the layers' matmuls):
    their hash is kept apart so that it runs once per word."""
    return _signs_folding(0)(words, jax.lax.stop_gradient(like))


# --- The two point rules ------------------------------------------------------------


@jax.custom_jvp
def _inject(z: Array, epsilon: Float[Array, ""], signs: Array) -> Array:
    # The output `z + ε v` at `ε = 0`, the only point it is evaluated at: the
    # primal is `z` itself, so that under a `vmap` over directions (which batches
    # `v`) the primal computation is not batched and runs once.
    del epsilon, signs
    return z


@_inject.defjvp
def _inject_jvp(primals, tangents):
    z, _, signs = primals
    z_dot, epsilon_dot, _ = tangents
    return z, z_dot + epsilon_dot.astype(z.dtype) * signs


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
    """Pass A, one example and one direction: the raw words of its signs, the
    perturbation scale `ε` (zero; its tangent is one) and the group whose points
    inject a tangent in this pass (`None`: every point)."""

    words: UInt32[Array, "2"]
    epsilon: Float[Array, ""]
    group: int | None = eqx.field(static=True)

    def apply(self, z: Array, words: Array, group: int) -> Array:
        if self.group is not None and group != self.group:
            return z
        return _inject(z, self.epsilon, _signs(words, z))


class _CotangentContext(eqx.Module):
    """Pass B, one example: the words of every direction and the derivatives
    `d[j, g]` of pass A, which make the fixed cotangents `c = mean_j d[j, g] v_j`."""

    words: UInt32[Array, "k 2"]
    derivatives: Float[Array, "k g"]

    def apply(self, z: Array, words: Array, group: int) -> Array:
        signs = jax.vmap(lambda w: _signs(w, z))(words)
        scale = self.derivatives[:, group] / self.derivatives.shape[0]
        cotangent = jnp.tensordot(scale, signs.astype(scale.dtype), axes=1)
        return _fixed_cotangent(z, cotangent.astype(z.dtype))


class _Point(eqx.Module):
    """A Linear or Conv layer (or an `ActivityPoint`) whose output is perturbed
    (pass A) or receives a fixed cotangent (pass B)."""

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

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        z = self.layer(*args, **kwargs)
        if not isinstance(z, jax.Array) or not jnp.issubdtype(z.dtype, jnp.inexact):
            raise TypeError(
                f"A perturbation point ({type(self.layer).__name__}) returned "
                f"{type(z).__name__}; the activity estimators perturb an output "
                "that is one floating-point array. Wrap the part of the Module "
                "that computes such an array in `eqx_dodge.ActivityPoint` instead."
            )
        call = self.calls.next()

        def point_words(words):
            return _point_words(words, self.index, call)

        words = self.context.words
        words = point_words(words) if words.ndim == 1 else jax.vmap(point_words)(words)
        return self.context.apply(z, words, self.group)


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


def _check_unstacked(model: PyTree) -> None:
    """A Linear or Conv whose weight has extra leading axes is a stack of layers
    applied under `lax.scan` or `vmap` (`eqx.nn.MLP(..., scan=True)` builds one):
    its wrapped call would break the scan, and one perturbation for the whole
    stack would not be per layer."""
    for path, node in jax.tree_util.tree_leaves_with_path(model, is_leaf=is_point):
        if isinstance(node, eqx.nn.Linear):
            expected = 2
        elif isinstance(node, eqx.nn.Conv):
            expected = node.num_spatial_dims + 2
        else:
            continue
        shape = getattr(node.weight, "shape", None)
        if shape is not None and len(shape) != expected:
            raise ValueError(
                f"The layer at {jax.tree_util.keystr(path) or 'the top'} has "
                f"stacked weights of shape {shape}: a stack of layers applied under "
                "`lax.scan` or `vmap`, as `eqx.nn.MLP(..., scan=True)` builds. The "
                "activity estimators perturb each layer's output and cannot "
                "perturb inside that loop: build the MLP with `scan=False` (the "
                "default), or use weight-perturbed DODGE (`eqx_dodge.filter_dodge`)."
            )


def _num_points(model: PyTree) -> int:
    return sum(map(is_point, jax.tree.leaves(model, is_leaf=is_point)))


def weight_space_groups(
    others: PyTree, first: int, separate: bool
) -> tuple[tuple[int, ...], int]:
    """The tangent group of each weight-space leaf of `others` (in leaf order) and
    the number of groups they use. Without `separate` they share one group. With it,
    the leaves held directly by one Module (a LayerNorm's weight and bias) share a
    group and different Modules get different ones, so that a norm scale's estimate
    never carries the noise of a layer elsewhere: with `stop_gradient` between the
    blocks of `eqx_dodge.LocalLosses`, nothing of a later block's loss reaches it."""
    owners = [path[:-1] for path, _ in jax.tree_util.tree_leaves_with_path(others)]
    if not owners:
        return (), 0
    if not separate:
        return (first,) * len(owners), 1
    numbers: dict[tuple, int] = {}
    groups = tuple(first + numbers.setdefault(owner, len(numbers)) for owner in owners)
    return groups, len(numbers)


# --- The model split for the two passes ---------------------------------------------


class ModelParts(NamedTuple):
    """The model split for the two passes: the points' trainable leaves, the other
    trainable leaves, the rest, and how the tangents are grouped (`other_groups`:
    the group of each leaf of `others`, after the points' groups)."""

    layers: PyTree
    others: PyTree
    static: PyTree
    separate: bool
    num_points: int
    num_groups: int
    other_groups: tuple[int, ...]

    def other_group_tree(self, like: PyTree) -> PyTree:
        """`other_groups` as a PyTree shaped like `like` (a direction of `others`)."""
        return jax.tree.unflatten(jax.tree.structure(like), self.other_groups)

    def with_points(
        self,
        layers: PyTree,
        others: PyTree,
        context: _TangentContext | _CotangentContext,
    ) -> PyTree:
        full = eqx.combine(layers, others, self.static)
        return _with_points(full, context, self.separate)


def split_model(model: PyTree, separate: bool) -> ModelParts:
    _check_unstacked(model)
    layers, rest = eqx.partition(trainable(model), _point_mask(model))
    others, _ = eqx.partition(rest, eqx.is_inexact_array)
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    num_points = _num_points(model)
    if num_points >= 2**_INDEX_BITS:
        raise ValueError(
            f"At most {2**_INDEX_BITS - 1} Linear and Conv layers are supported, "
            f"the model has {num_points}."
        )
    first = num_points if separate else 0
    other_groups, num_other_groups = weight_space_groups(others, first, separate)
    num_groups = max((num_points + num_other_groups) if separate else 1, 1)
    return ModelParts(
        layers, others, static, separate, num_points, num_groups, other_groups
    )
