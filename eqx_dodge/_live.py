"""Live leaves: the trainable leaves whose tangent reaches the loss.

A leaf frozen inside the loss (behind `jax.lax.stop_gradient`, or not used at all)
has a zero gradient, which `eqx.filter_grad` returns exactly; a random direction would
still move it by `d·u` at every step. Forward mode can tell: in the jaxpr of the
loss's jvp, after dead-code elimination, the tangent input of such a leaf is unused.
DODGE treats these *dead* leaves as it treats the leaves that are not floating-point
arrays (`eqx.partition` freezing): no direction is drawn for them, they do not count
in `p` (a candidate's norm, the partition blocks), and their estimate is exactly
zero. See "How do I freeze part of a model?" in the docs' FAQ.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.interpreters.partial_eval import dce_jaxpr
from jaxtyping import PyTree


_T = TypeVar("_T")


def live_mask(fun: Callable[[PyTree], Any], primal: PyTree) -> tuple[bool, ...]:
    """For each array leaf of `primal`, in leaf order, whether its tangent reaches an
    output of `fun` (a static property of the traced function, decided at trace time).

    A leaf counts as dead only when dead-code elimination of the jvp's jaxpr removes
    every use of its tangent; a tangent used in any way (multiplied by zero in a
    `jax.custom_jvp` rule, passed to a callback) keeps its leaf live. When that
    jaxpr cannot be built (e.g. a `jax.custom_vjp` inside the loss), every leaf is
    live: the estimator then traces `fun` itself and reports, or works around, the
    problem.
    """
    leaves, treedef = jax.tree.flatten(primal)

    def tangent_out(primal_leaves, tangent_leaves):
        def of_leaves(_leaves):
            return fun(jax.tree.unflatten(treedef, _leaves))

        return jax.jvp(of_leaves, (primal_leaves,), (tangent_leaves,))[1]

    try:
        jaxpr = jax.make_jaxpr(tangent_out)(leaves, leaves).jaxpr
    except Exception:  # the estimator's own trace raises it again, or handles it
        return (True,) * len(leaves)
    _, used = dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return tuple(used[len(leaves) :])


def _select(tree: PyTree, mask: tuple[bool, ...], keep: bool) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    picked = [leaf if live == keep else None for leaf, live in zip(leaves, mask)]
    return jax.tree.unflatten(treedef, picked)


def zero_dead(tree: PyTree, mask: tuple[bool, ...]) -> PyTree:
    """`tree`, shaped like the trainable leaves (or stacked: its leaves may carry
    leading axes), with zeros at the dead leaves."""
    if all(mask):
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    kept = [leaf if live else jnp.zeros_like(leaf) for leaf, live in zip(leaves, mask)]
    return jax.tree.unflatten(treedef, kept)


class LiveSplit(eqx.Module):
    """The trainable leaves `primal` split into the `live` ones, which DODGE
    differentiates, and the `dead` ones, held fixed (`None` where the other is set).
    """

    live: PyTree
    dead: PyTree
    mask: tuple[bool, ...] = eqx.field(static=True)

    @property
    def all_live(self) -> bool:
        return all(self.mask)

    @property
    def primal(self) -> PyTree:
        """All the trainable leaves, live and dead."""
        return eqx.combine(self.live, self.dead)

    def of(self, fun: Callable[..., _T]) -> Callable[..., _T]:
        """`fun` of the trainable leaves (and other arguments) as a function of the
        live ones (and the same other arguments)."""
        if self.all_live:
            return fun
        return lambda live, *args: fun(eqx.combine(live, self.dead), *args)

    def restrict(self, tree: PyTree) -> PyTree:
        """The live leaves of `tree`, a tree shaped like the trainable leaves (or
        stacked: the leaves may carry leading axes)."""
        return tree if self.all_live else _select(tree, self.mask, True)

    def widen(self, estimate: PyTree) -> PyTree:
        """An estimate of the live leaves, with zeros at the dead ones, as
        `eqx.filter_grad` returns at leaves behind a `stop_gradient`."""
        if self.all_live:
            return estimate
        return eqx.combine(estimate, optax.tree.zeros_like(self.dead))

    def project(self, candidate: PyTree) -> PyTree:
        """`candidate` with its dead leaves set to zero: its projection onto the
        subspace where the gradient lives."""
        return zero_dead(candidate, self.mask)


def split_live(
    fun: Callable[[PyTree], Any], primal: PyTree, *, has_aux: bool = False
) -> LiveSplit:
    """Splits `primal` by the `live_mask` of the loss `fun(primal)` (its first
    output when `has_aux`: a tangent that reaches only `aux` is not differentiated).
    """
    value = (lambda _primal: fun(_primal)[0]) if has_aux else fun
    mask = live_mask(value, primal)
    return LiveSplit(_select(primal, mask, True), _select(primal, mask, False), mask)
