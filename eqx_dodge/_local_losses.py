r"""Local losses: a model trained as a sequence of blocks, each with a small head of
its own and `stop_gradient` between the blocks (Ren, Kornblith, Liao & Hinton,
*Scaling Forward Gradient With Local Losses*, ICLR 2023), and the local-loss gradient
as DODGE's candidate for the global loss (Fournier, Rivaud, Belilovsky, Eickenberg &
Oyallon, *Can Forward Gradient Match Backpropagation?*, ICML 2023).
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree, Scalar

from ._activity import activity_dodge
from ._checks import as_key, check_callable, check_scalar_loss, KeyLike
from ._filter import filter_dodge


def _as_callables(name: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"`{name}` must be a sequence of callables, got {type(value).__name__}."
        )
    value = tuple(value)
    for index, item in enumerate(value):
        if not callable(item):
            raise TypeError(
                f"`{name}[{index}]` must be callable, got {type(item).__name__}."
            )
    return value


class LocalLosses(eqx.Module):
    r"""A model made of blocks, each followed by a small head of its own.

    Block $k$ maps $h_{k-1}$ to $h_k$ ($h_0 = x$, the input) and head $k$ maps $h_k$
    to an output $o_k$ on which a *local loss* $\ell_k = \ell(o_k, y)$ is taken. The
    model's prediction is the last head's output on the whole chain of blocks:

    $$o = \mathrm{head}_K(\mathrm{block}_K(\cdots \mathrm{block}_1(x)))$$

    so the global loss $\ell(o, y)$ is the last block's local loss, differentiated
    through every block. [`eqx_dodge.LocalLosses.local_outputs`][] runs the same
    forward pass with `jax.lax.stop_gradient` at the input of every block after the
    first: the local loss $\ell_k$ then reaches block $k$ and head $k$ only, and the
    gradient of $\sum_k \ell_k$ with respect to block $k$'s parameters is
    $\nabla \ell_k$. [`eqx_dodge.local_loss`][] builds that sum for one example.

    ```python
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    model = eqx_dodge.LocalLosses(
        blocks=(eqx.nn.Sequential([eqx.nn.Linear(8, 16, key=key1),
                                   eqx.nn.Lambda(jax.nn.relu)]),
                eqx.nn.Identity()),
        heads=(eqx.nn.Linear(16, 3, key=key2),   # a local head for block 1
               eqx.nn.Linear(16, 3, key=key3)),  # the model's output layer
    )
    ```

    Trained with `jax.grad` of the summed local losses, this is Ren et al.'s
    local-loss backprop (LG-BP); with
    `eqx_dodge.activity_dodge(eqx_dodge.local_loss(output_loss), key=key,
    separate_layers=True)`, their LG-FG-A: every layer's tangent reaches its own
    block's loss only, in forward-mode passes that share one primal pass.

    **Arguments:**

    - `blocks`: a sequence of callables (usually Modules) `block(h) -> h`, in order.
    - `heads`: a sequence of callables `head(h) -> output`, one per block; `heads[k]`
        reads the output of `blocks[k]`. The last head is the model's output layer.
    """

    blocks: tuple = eqx.field(converter=ft.partial(_as_callables, "blocks"))
    heads: tuple = eqx.field(converter=ft.partial(_as_callables, "heads"))

    def __check_init__(self):
        if not self.blocks:
            raise ValueError("`blocks` must hold at least one block, got none.")
        if len(self.heads) != len(self.blocks):
            raise ValueError(
                f"`heads` must hold one head per block: got {len(self.blocks)} "
                f"blocks and {len(self.heads)} heads."
            )

    def __call__(self, x: PyTree) -> PyTree:
        """The prediction: the last head on the chain of all blocks, with nothing
        stopped (its gradient is the global loss's, through every block).

        **Arguments:**

        - `x`: the input of the first block.

        **Returns:**

        The last head's output.
        """
        for block in self.blocks:
            x = block(x)
        return self.heads[-1](x)

    def local_outputs(self, x: PyTree) -> tuple[PyTree, ...]:
        """The output of every head, in block order, from one forward pass in which
        the input of every block after the first passes through
        `jax.lax.stop_gradient`. The last one equals the prediction.

        **Arguments:**

        - `x`: the input of the first block.

        **Returns:**

        A tuple with one output per head.
        """
        outputs = []
        for index, (block, head) in enumerate(zip(self.blocks, self.heads)):
            if index > 0:
                x = jax.lax.stop_gradient(x)
            x = block(x)
            outputs.append(head(x))
        return tuple(outputs)


def _check_model(model: Any) -> None:
    if not isinstance(model, LocalLosses):
        raise TypeError(
            "`model` must be an `eqx_dodge.LocalLosses` (blocks with local heads), "
            f"got {type(model).__name__}."
        )


class _LocalLoss(eqx.Module):
    output_loss: Callable

    def __call__(self, model: Any, x: PyTree, *targets, **kwargs) -> Scalar:
        _check_model(model)
        losses = [
            check_scalar_loss(
                self.output_loss(output, *targets, **kwargs), "output_loss"
            )
            for output in model.local_outputs(x)
        ]
        return ft.reduce(jnp.add, losses)


def local_loss(output_loss: Callable) -> Callable:
    r"""The sum of the local losses of an [`eqx_dodge.LocalLosses`][] model, for one
    example.

    $$\ell_{\mathrm{local}}(x, y) = \sum_{k=1}^K \ell(o_k, y)$$

    with $o_k$ the outputs of [`eqx_dodge.LocalLosses.local_outputs`][], so that each
    block's parameters see only their own block's loss. It is an `example_loss` for
    [`eqx_dodge.activity_dodge`][] (with `separate_layers=True`, Ren et al.'s LG-FG-A)
    and, averaged over a batch with `jax.vmap`, a loss for `eqx.filter_grad` (their
    LG-BP):

    ```python
    def output_loss(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    example_loss = eqx_dodge.local_loss(output_loss)
    x, y = jax.random.normal(key1, (32, 8)), jnp.arange(32) % 3
    grads = eqx_dodge.activity_dodge(
        example_loss, key=key2, separate_layers=True
    )(model, x, y)
    ```

    **Arguments:**

    - `output_loss`: the loss of one output, `output_loss(output, *targets,
        **kwargs)`, returning a scalar; the same for every head.

    **Returns:**

    A function `example_loss(model, x, *targets, **kwargs)` of one example: `model`
    an [`eqx_dodge.LocalLosses`][], `x` its input, the targets and keyword arguments
    passed to `output_loss` for every head. It returns the sum of the local losses.
    """
    check_callable("output_loss", output_loss)
    return _LocalLoss(output_loss)


def _batch_mean(example_loss: Callable) -> Callable:
    def loss(model, x, *targets):
        in_axes = (None, 0) + (0,) * len(targets)
        return jnp.mean(jax.vmap(example_loss, in_axes=in_axes)(model, x, *targets))

    return loss


def _global_loss(output_loss: Callable, model: LocalLosses, x, *targets) -> Scalar:
    return check_scalar_loss(output_loss(model(x), *targets), "output_loss")


def _auxiliary_mask(gradient: PyTree) -> PyTree:
    """`True` at the leaves of the heads of all blocks but the last (the heads the
    global loss does not use), `False` elsewhere, shaped like `gradient`."""
    mask = jax.tree.map(lambda _: False, gradient)
    if len(gradient.heads) == 1:
        return mask
    return eqx.tree_at(
        lambda m: m.heads[:-1],
        mask,
        replace_fn=lambda head: jax.tree.map(lambda _: True, head),
    )


class _LocalGuessDodge(eqx.Module):
    output_loss: Callable
    key: Any

    def __call__(self, model: Any, x: PyTree, *targets) -> PyTree:
        _check_model(model)
        example_loss = _LocalLoss(self.output_loss)
        if self.key is None:
            local_gradient = eqx.filter_grad(_batch_mean(example_loss))(
                model, x, *targets
            )
        else:
            local_gradient = activity_dodge(
                example_loss, key=self.key, separate_layers=True
            )(model, x, *targets)
        auxiliary = _auxiliary_mask(local_gradient)
        candidate = jax.tree.map(
            lambda g, a: jnp.zeros_like(g) if a else g, local_gradient, auxiliary
        )
        global_loss = _batch_mean(ft.partial(_global_loss, self.output_loss))
        projection = filter_dodge(global_loss, direction=candidate)(model, x, *targets)
        return jax.tree.map(
            lambda p, g, a: g if a else p, projection, local_gradient, auxiliary
        )


def local_guess_dodge(output_loss: Callable, *, key: KeyLike | None = None) -> Callable:
    r"""DODGE for the global loss of an [`eqx_dodge.LocalLosses`][] model, with the
    gradient of its local losses as the candidate ("global target, local guess",
    Fournier et al., ICML 2023).

    The candidate $c$ is the gradient of the batch mean of
    [`eqx_dodge.local_loss`][]`(output_loss)`: exact, by backpropagation within each
    block (cheap: no gradient crosses a block boundary) when `key` is `None`, or its
    activity-perturbed estimate ([`eqx_dodge.activity_dodge`][] with
    `separate_layers=True`) when `key` is given. On the blocks and the last head the
    estimate is the projection of the global gradient $g = \nabla L$, $L$ the batch
    mean of `output_loss(model(x), *targets)`, on the candidate:

    $$\hat g = (g \cdot \hat c)\, \hat c ,\qquad \hat c = c / \|c\| ,$$

    with $g \cdot \hat c$ from one forward-mode pass
    ([`eqx_dodge.filter_dodge`][] with `direction`). It is a descent direction for
    the global loss whatever the candidate (biased unless $c \parallel g$). The heads
    of the other blocks do not enter the global loss ($g$ is zero there): they get
    their local-loss gradient, as the auxiliary networks of Fournier et al. do.

    **Arguments:**

    - `output_loss`: the loss of one output, `output_loss(output, *targets)`,
        returning a scalar (as in [`eqx_dodge.local_loss`][]).
    - `key`: `None` for the exact local gradient as the candidate; a PRNG key (or
        an int seed) for its activity-perturbed estimate. Use a fresh key at every
        step.

    **Returns:**

    A function `(model, x, *targets)` of a batch (the examples along the leading
    axis of `x` and of every target) returning the estimate, shaped like
    `eqx.filter_grad`'s output for `model`.
    """
    check_callable("output_loss", output_loss)
    if key is not None:
        key = as_key(key)
    return _LocalGuessDodge(output_loss, key)
