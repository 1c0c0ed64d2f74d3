r"""Gradient guesses: directions built from the batch's activations.

For a linear layer $y = Wx + b$ the loss gradient over a batch is
$\partial L/\partial W = \sum_b \delta_b x_b^\top$ and $\partial L/\partial b =
\sum_b \delta_b$, where $x_b$ is the layer's input and $\delta_b = \partial L /
\partial y_b$ for example $b$. Whatever $\delta$ is, the rows of the weight gradient lie
in the span of the batch's incoming activations, a subspace of dimension at most the
batch size; an isotropic random direction spreads over all $p$ coordinates instead.
Singhal et al. (2023, "How to Guess a Gradient") use this to build guesses whose
cosine similarity with the gradient is far higher than a random direction's, at the
same cost of one forward-mode pass. Two guesses live here:

- the *activation-subspace* guess replaces the unknown $\delta_b$ by random
    $\varepsilon_b$: $\sum_b \varepsilon_b x_b^\top$;
- the *$W^\top$* guess draws the random perturbation one layer later and pulls it back
    through that layer, as backpropagation would:
    $\tilde\delta_b = \sigma'(z_b) \odot W_{\text{next}}^\top \varepsilon_b$, with $z$
    the layer's output before its activation $\sigma$.

Biases are treated as the weights of a constant input 1, so their guess is
$\sum_b \tilde\delta_b$: again the exact form of the true bias gradient with
$\tilde\delta$ in place of $\delta$.

Cost: a guess runs the model's layers over the batch once (a forward pass, no
tangents), on top of the jvp that DODGE then takes along it. The layers keep their
natural relative scales (no per-layer normalisation): a layer with larger inputs or
more outputs gets a larger share of the direction, as it would in the gradient.
"""

import functools as ft
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from ._checks import check_option, KeyLike, SAMPLERS
from ._directions import random_direction, trainable


class _Stage(NamedTuple):
    """One linear layer of a chain, where it sits in the model, and what follows it."""

    where: Callable[[Any], Any]
    linear: eqx.nn.Linear
    activation: Callable[[Array], Array]


def _identity(x: Any) -> Any:
    return x


def _compose(first: Callable, second: Callable) -> Callable[[Array], Array]:
    return lambda x: second(first(x))


def _mlp_stages(model: eqx.nn.MLP) -> tuple[Callable, list[_Stage]]:
    if model.scan:
        raise ValueError(
            "`eqx.nn.MLP(..., scan=True)` is not supported by the gradient guesses; "
            "build the MLP with `scan=False` (the default)."
        )
    for name in ("activation", "final_activation"):
        if jax.tree.leaves(eqx.filter(getattr(model, name), eqx.is_inexact_array)):
            # Its parameters would get no direction (only the Linear layers do).
            raise ValueError(
                f"`model.{name}` is a {type(getattr(model, name)).__name__} with "
                "parameters of its own (a learnt activation), which the guess would "
                "leave without a direction. The gradient guesses take an "
                "`eqx.nn.MLP` with parameter-free activations (`jax.nn.relu`). For "
                "this model, record the Linear layers' inputs and use "
                "`eqx_dodge.layer_activation_guess`, mixed with a random direction "
                "for the other parameters."
            )
    apply_per_neuron = eqx.filter_vmap(lambda a, b: a(b))

    def hidden_activation(i: int) -> Callable[[Array], Array]:
        # The MLP keeps one copy of its activation per neuron (in case it is learnt);
        # layer i uses slice i of it, exactly as `eqx.nn.MLP.__call__` does.
        activation = jax.tree.map(
            lambda leaf: leaf[i] if eqx.is_array(leaf) else leaf, model.activation
        )
        return ft.partial(apply_per_neuron, activation)

    if model.out_size == "scalar":
        final = model.final_activation
    else:
        final = ft.partial(apply_per_neuron, model.final_activation)
    num_layers = len(model.layers)
    stages = [
        _Stage(
            (lambda m, i=i: m.layers[i]),
            layer,
            final if i == num_layers - 1 else hidden_activation(i),
        )
        for i, layer in enumerate(model.layers)
    ]
    return _identity, stages


def _sequential_stages(model: eqx.nn.Sequential) -> tuple[Callable, list[_Stage]]:
    prefix: Callable = _identity
    stages: list[_Stage] = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, eqx.nn.Linear):
            stages.append(_Stage((lambda m, i=i: m.layers[i]), layer, _identity))
            continue
        if isinstance(layer, eqx.nn.Dropout) and not layer.inference:
            raise ValueError(
                f"`model.layers[{i}]` is an `eqx.nn.Dropout`, which needs a key, and "
                "the gradient guesses run the model's layers without one. Pass "
                "`eqx.nn.inference_mode(model)` to the guess: it then guesses from "
                "the activations without dropout (the loss keeps its own dropout)."
            )
        if jax.tree.leaves(eqx.filter(layer, eqx.is_inexact_array)):
            # Its parameters would get no direction, and the layers between
            # Linear layers are taken as elementwise activations.
            raise ValueError(
                f"`model.layers[{i}]` is a {type(layer).__name__} with parameters of "
                "its own, which the guess would leave without a direction. The "
                "gradient guesses take an `eqx.nn.Sequential` of Linear layers with "
                "parameter-free elementwise activations between them "
                "(`eqx.nn.Lambda(jax.nn.relu)`). For another model, record the "
                "Linear layers' inputs and use `eqx_dodge.layer_activation_guess`, "
                "mixed with a random direction for the other parameters."
            )
        if stages:
            last = stages[-1]
            stages[-1] = _Stage(
                last.where, last.linear, _compose(last.activation, layer)
            )
        else:
            prefix = _compose(prefix, layer)
    if not stages:
        raise ValueError("`model` is an `eqx.nn.Sequential` without any Linear layer.")
    return prefix, stages


def _stages(model: Any) -> tuple[Callable, list[_Stage]]:
    """Splits a supported model into `prefix` and a chain of linear stages.

    Per example, the model computes `x → prefix(x)`, then, stage after stage,
    `x → activation(linear(x))`.
    """
    if isinstance(model, eqx.nn.Linear):
        return _identity, [_Stage(_identity, model, _identity)]
    if isinstance(model, eqx.nn.MLP):
        return _mlp_stages(model)
    if isinstance(model, eqx.nn.Sequential):
        return _sequential_stages(model)
    raise TypeError(
        "`activation_guess` and `transpose_guess` run their own forward pass and "
        "support `eqx.nn.Linear`, `eqx.nn.MLP` and `eqx.nn.Sequential` (of Linear "
        f"layers and elementwise layers) only, got {type(model).__name__}. For "
        "another model, record the input of each Linear layer in your own forward "
        "pass and call `eqx_dodge.layer_activation_guess`."
    )


class _Record(NamedTuple):
    inputs: Float[Array, " batch in_features"]
    outputs: Float[Array, " batch out_features"]
    slopes: Float[Array, " batch out_features"]


def _forward(model: Any, x: Array) -> tuple[list[_Stage], list[_Record]]:
    """Runs the model's own layers over the batch `x` and records, for every linear
    stage, its inputs, its outputs before the activation, and the slope of the
    activation there (the derivative of an elementwise function, from one jvp)."""
    prefix, stages = _stages(model)
    batch = x.shape[0]
    records = []
    h = jax.vmap(prefix)(x)
    for index, stage in enumerate(stages):
        name = "`x`" if index == 0 else f"The model's layer before Linear {index}"
        _check_layer_inputs(stage.linear, h, name)
        z = jax.vmap(stage.linear)(h)

        def activate(z_, activation=stage.activation):
            return jax.jvp(activation, (z_,), (jnp.ones_like(z_),))

        h_next, slope = jax.vmap(activate)(z)
        records.append(
            _Record(
                h.reshape(batch, -1), z.reshape(batch, -1), slope.reshape(batch, -1)
            )
        )
        h = h_next
    return stages, records


def _layer_guess(
    linear: eqx.nn.Linear, deltas: Float[Array, " batch out_features"], inputs: Array
) -> tuple[Array, Array | None]:
    """`Σ_b δ_b x_bᵀ` for the weight and `Σ_b δ_b` for the bias of `linear`."""
    dtype = linear.weight.dtype
    deltas = deltas.astype(dtype)
    inputs = inputs.reshape(inputs.shape[0], -1).astype(dtype)
    weight = (deltas.T @ inputs).reshape(linear.weight.shape)
    if linear.bias is None:
        return weight, None
    return weight, jnp.sum(deltas, axis=0).reshape(linear.bias.shape)


def _assemble(
    model: PyTree, guesses: Sequence[tuple[Callable, Array, Array | None]]
) -> PyTree:
    """Zeros shaped like the trainable part of `model`, with each Linear layer's
    weight and bias, found by `where`, replaced by its guess."""
    direction = jax.tree.map(jnp.zeros_like, trainable(model))
    for where, weight, bias in guesses:
        direction = eqx.tree_at(lambda d: where(d).weight, direction, weight)
        if bias is not None:
            direction = eqx.tree_at(lambda d: where(d).bias, direction, bias)
    return direction


def _check_batch(x: Any, name: str = "x") -> None:
    if not isinstance(x, jax.Array) or x.ndim < 1:
        raise ValueError(
            f"`{name}` must be a batch of inputs, an array with a leading batch axis; "
            f"got {type(x).__name__} with shape {jnp.shape(x)}."
        )


def _check_layer_inputs(linear: eqx.nn.Linear, inputs: Array, name: str) -> None:
    """`inputs` must be a batch of what `linear` takes: `(batch, in_features)`, or
    `(batch,)` for `in_features="scalar"`."""
    features = linear.in_features
    expected = () if features == "scalar" else (features,)
    if inputs.shape[1:] != expected:
        raise ValueError(
            f"{name} gives a Linear layer with `in_features={features!r}` inputs of "
            f"shape {inputs.shape[1:]} per example (batch shape {inputs.shape}); it "
            f"takes {expected}: pass a batch, a leading axis of examples, of its "
            "inputs."
        )


def activation_guess(
    key: KeyLike, model: PyTree, x: Array, *, sampler: str = "rademacher"
) -> PyTree:
    r"""A guess of the gradient whose weights lie in the span of the batch's
    activations (Singhal et al. 2023).

    Runs the model's own layers over the batch `x` and, for every `eqx.nn.Linear`
    layer with inputs $x_1, \dots, x_B$, returns the weight direction
    $\sum_b \varepsilon_b x_b^\top$ and the bias direction $\sum_b \varepsilon_b$,
    with independent random $\varepsilon_b$ of the layer's output size: the true
    gradient $\sum_b \delta_b x_b^\top$ with the unknown backpropagated
    $\delta_b$ replaced by noise. Each row of a weight direction lies in the
    (at most $B$-dimensional) span of that layer's inputs, where the gradient's rows
    lie too.

    Use it as the candidate direction of DODGE:

    ```python
    direction = eqx_dodge.activation_guess(guess_key, model, x)
    grads = eqx_dodge.filter_dodge(loss, direction=direction)(model, x, y)
    ```

    !!! warning

        A guess is biased: the expected DODGE estimate along it is not the gradient.
        It is still a descent direction: DODGE returns $(g \cdot \hat u)\hat u$,
        whose inner product with the gradient $g$ is $(g \cdot \hat u)^2 \geq 0$,
        for every guess. Leaves other than the Linear weights and biases (learnt
        activations, say) get a zero direction and are not trained by it.

    **Arguments:**

    - `key`: a PRNG key or an int seed; use a fresh one at every step.
    - `model`: an `eqx.nn.Linear`, an `eqx.nn.MLP` (with `scan=False`), or an
        `eqx.nn.Sequential` of Linear layers and elementwise layers. For other models
        see [`eqx_dodge.layer_activation_guess`][].
    - `x`: the batch, of shape `(batch, *input_shape)`; the model is applied to each
        example.
    - `sampler`: the distribution of the entries of $\varepsilon$: `"rademacher"` or
        `"gaussian"` (`"orthogonal"`, one direction, is `"rademacher"`).

    **Returns:**

    A PyTree like `eqx.filter(model, eqx.is_inexact_array)` (the structure of the
    output of `eqx.filter_grad`), ready to pass as `direction=`.
    """
    check_option("sampler", sampler, SAMPLERS)
    _check_batch(x)
    stages, records = _forward(model, x)
    noise = random_direction(key, [r.outputs for r in records], sampler=sampler)
    return _assemble(
        model,
        [
            (stage.where, *_layer_guess(stage.linear, eps, record.inputs))
            for stage, record, eps in zip(stages, records, noise)
        ],
    )


def transpose_guess(
    key: KeyLike, model: PyTree, x: Array, *, sampler: str = "rademacher"
) -> PyTree:
    r"""The $W^\top$ guess of the gradient (Singhal et al. 2023): a random output
    perturbation of the next layer, pulled back through its transposed weights.

    For a chain of Linear layers $z_i = W_i h_{i-1} + b_i$, $h_i = \sigma_i(z_i)$,
    backpropagation computes $\delta_i = \sigma_i'(z_i) \odot W_{i+1}^\top
    \delta_{i+1}$ and the weight gradient $\sum_b \delta_{i,b} h_{i-1,b}^\top$.
    This guess takes one such step from noise: $\tilde\delta_i = \sigma_i'(z_i)
    \odot W_{i+1}^\top \varepsilon_{i+1}$, with fresh random $\varepsilon_{i+1}$
    per layer and per example, and returns $\sum_b \tilde\delta_{i,b}
    h_{i-1,b}^\top$ for the weights and $\sum_b \tilde\delta_{i,b}$ for the biases.
    The last layer has no next layer and uses $\sigma_L'(z_L) \odot
    \varepsilon_L$. Compared with [`eqx_dodge.activation_guess`][], each weight
    direction also has its columns in the span of $W_{i+1}^\top$ (masked by the
    activation's slope), which the gradient's columns share.

    The slopes $\sigma'(z)$ come from a jvp with a tangent of ones, which is exact
    for the elementwise activations of `eqx.nn.MLP`; in an `eqx.nn.Sequential`, the
    layers between two Linear layers must be elementwise.

    !!! warning

        A guess is biased: the expected DODGE estimate along it is not the gradient.
        It is still a descent direction: DODGE returns $(g \cdot \hat u)\hat u$,
        whose inner product with the gradient $g$ is $(g \cdot \hat u)^2 \geq 0$,
        for every guess.

    **Arguments:**

    - `key`: a PRNG key or an int seed; use a fresh one at every step.
    - `model`: an `eqx.nn.Linear`, an `eqx.nn.MLP` (with `scan=False`), or an
        `eqx.nn.Sequential` of Linear layers and elementwise layers.
    - `x`: the batch, of shape `(batch, *input_shape)`.
    - `sampler`: the distribution of the entries of $\varepsilon$: `"rademacher"` or
        `"gaussian"` (`"orthogonal"`, one direction, is `"rademacher"`).

    **Returns:**

    A PyTree like `eqx.filter(model, eqx.is_inexact_array)`, ready to pass as
    `direction=`.
    """
    check_option("sampler", sampler, SAMPLERS)
    _check_batch(x)
    stages, records = _forward(model, x)
    noise = random_direction(key, [r.outputs for r in records], sampler=sampler)
    guesses = []
    for i, (stage, record) in enumerate(zip(stages, records)):
        if i + 1 < len(stages):
            following = stages[i + 1].linear.weight
            following = following.reshape(following.shape[0], -1)
            pulled_back = noise[i + 1].astype(following.dtype) @ following
        else:
            pulled_back = noise[i]
        deltas = record.slopes * pulled_back.astype(record.slopes.dtype)
        guesses.append(
            (stage.where, *_layer_guess(stage.linear, deltas, record.inputs))
        )
    return _assemble(model, guesses)


def layer_activation_guess(
    key: KeyLike,
    model: PyTree,
    layer_inputs: Sequence[tuple[Callable[[PyTree], eqx.nn.Linear], Array]],
    *,
    sampler: str = "rademacher",
) -> PyTree:
    r"""The activation-subspace guess for any model, given the inputs of its Linear
    layers.

    [`eqx_dodge.activation_guess`][] runs the forward pass itself, which it can do
    only for models it knows the structure of. For any other model, record the batch
    of inputs that each `eqx.nn.Linear` layer sees in your own forward pass (return
    them as auxiliary outputs, for instance) and pass them here with a function
    locating the layer, in the style of `eqx.tree_at`:

    ```python
    direction = eqx_dodge.layer_activation_guess(
        key, model, [(lambda m: m.encoder, x), (lambda m: m.head, features)]
    )
    ```

    Each listed layer gets the weight direction $\sum_b \varepsilon_b x_b^\top$
    and the bias direction $\sum_b \varepsilon_b$; every other trainable leaf gets
    zeros (so it is not trained by this direction: list every layer you want
    trained, or mix the guess with a random direction).

    !!! warning

        A guess is biased, but DODGE along it still gives a descent direction.

    **Arguments:**

    - `key`: a PRNG key or an int seed.
    - `model`: any PyTree, e.g. an Equinox model.
    - `layer_inputs`: pairs `(where, inputs)`: `where(model)` is an `eqx.nn.Linear`
        of `model` and `inputs` the batch of its inputs, of shape
        `(batch, in_features)` (or `(batch,)` for `in_features="scalar"`).
    - `sampler`: `"rademacher"` or `"gaussian"` entries of $\varepsilon$
        (`"orthogonal"`, one direction, is `"rademacher"`).

    **Returns:**

    A PyTree like `eqx.filter(model, eqx.is_inexact_array)`.
    """
    check_option("sampler", sampler, SAMPLERS)
    layers = []
    for position, (where, inputs) in enumerate(layer_inputs):
        layer = where(model)
        if not isinstance(layer, eqx.nn.Linear):
            raise TypeError(
                f"`layer_inputs[{position}]` must locate an `eqx.nn.Linear` layer of "
                f"`model`, but it locates a {type(layer).__name__}."
            )
        _check_batch(inputs, f"layer_inputs[{position}]")
        _check_layer_inputs(layer, inputs, f"`layer_inputs[{position}]`")
        layers.append((where, layer, inputs))
    shapes = [
        jnp.zeros((inputs.shape[0], layer.weight.shape[0]), layer.weight.dtype)
        for _, layer, inputs in layers
    ]
    noise = random_direction(key, shapes, sampler=sampler)
    return _assemble(
        model,
        [
            (where, *_layer_guess(layer, eps, inputs))
            for (where, layer, inputs), eps in zip(layers, noise)
        ],
    )
