"""The local-loss versions of the activity benchmarks' models, built from their
weights (`activity.py`'s MLP 64-H-10; `activity_models.py`'s deeper MLPs and conv net).

- `local_model`: two blocks (Ren et al.'s LG-BP / LG-FG-A with one local loss per
    block): the hidden layer with a local linear head H-10 of its own, then the
    output layer as the last block's head.
- `grouped_model`: the same, with the hidden layer's H units split into `GROUPS`
    groups, each one Linear layer (so one perturbation point, with a tangent of its
    own under `separate_layers=True`) and one local loss: the local head applied to
    the hidden features with every other group's `stop_gradient`ed (Ren et al.'s
    group-wise local losses). Each group's loss then reaches only its own units, so a
    unit's activity estimate carries the noise of H/GROUPS outputs, not of H.
- `stack_local_model`: both for a stack of any depth of Linear or Conv2d layers (a
    conv layer's groups are groups of channels).
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_dodge


GROUPS = 8


def output_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy of one output, or the sum over the rows of a stack of outputs
    (a grouped head's, one row per group)."""
    labels = jnp.broadcast_to(y, logits.shape[:-1])
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _auxiliary_head(key: jax.Array, hidden: int) -> eqx.nn.Linear:
    # Not `fold_in(key, 1)`: for Threefry that is `split(key)[1]`, the MLP's own
    # output layer, and two equal heads would make the local loss the global one.
    return eqx.nn.Linear(hidden, 10, key=jax.random.fold_in(key, 7))


def local_model(mlp: eqx.nn.MLP, key: jax.Array) -> eqx_dodge.LocalLosses:
    hidden, output = mlp.layers
    return eqx_dodge.LocalLosses(
        blocks=[
            eqx.nn.Sequential([hidden, eqx.nn.Lambda(jax.nn.relu)]),
            eqx.nn.Identity(),
        ],
        heads=[_auxiliary_head(key, hidden.weight.shape[0]), output],
    )


class GroupedLayer(eqx.Module):
    """A layer's output units (or channels) as `len(groups)` layers, then ReLU."""

    groups: tuple[eqx.nn.Linear, ...]

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        # `key` because `eqx.nn.Sequential` passes one to its layers.
        return jax.nn.relu(jnp.concatenate([group(x) for group in self.groups]))


class GroupedHead(eqx.Module):
    """One output per group of hidden units: the head on the features with the other
    groups' stopped. The head is called once per group in a Python loop, so each call
    gets a tangent of its own (under a `vmap` they would share one)."""

    linear: eqx.nn.Linear
    num_groups: int = eqx.field(static=True)

    def __call__(self, features: jax.Array) -> jax.Array:
        size = features.shape[0] // self.num_groups
        stopped = jax.lax.stop_gradient(features)
        # Groups are along the first axis (features, or a conv layer's channels).
        shape = (features.shape[0],) + (1,) * (features.ndim - 1)
        outputs = []
        for group in range(self.num_groups):
            live = (jnp.arange(features.shape[0]) // size == group).reshape(shape)
            mixed = jnp.where(live, features, stopped)
            outputs.append(self.linear(mixed.reshape(-1)))
        return jnp.stack(outputs)


def grouped_model(mlp: eqx.nn.MLP, key: jax.Array) -> eqx_dodge.LocalLosses:
    hidden, output = mlp.layers
    size = hidden.weight.shape[0] // GROUPS
    groups = []
    for group in range(GROUPS):
        rows = slice(group * size, (group + 1) * size)
        linear = eqx.nn.Linear(hidden.weight.shape[1], size, key=jax.random.key(0))
        assert hidden.bias is not None
        linear = eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            linear,
            (hidden.weight[rows], hidden.bias[rows]),
        )
        groups.append(linear)
    head = GroupedHead(_auxiliary_head(key, hidden.weight.shape[0]), GROUPS)
    return eqx_dodge.LocalLosses(
        blocks=[GroupedLayer(tuple(groups)), eqx.nn.Identity()], heads=[head, output]
    )


def split_layer(layer: eqx.nn.Linear | eqx.nn.Conv2d, groups: int) -> tuple:
    """A Linear or Conv2d layer as `groups` layers of the same kind, each holding an
    equal slice of its output units (channels) with the same weights."""
    size = layer.weight.shape[0] // groups
    parts = []
    for group in range(groups):
        rows = slice(group * size, (group + 1) * size)
        if isinstance(layer, eqx.nn.Linear):
            part = eqx.nn.Linear(layer.in_features, size, key=jax.random.key(0))
        else:
            part = eqx.nn.Conv2d(
                layer.in_channels,
                size,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                key=jax.random.key(0),
            )
        assert layer.bias is not None
        part = eqx.tree_at(
            lambda p: (p.weight, p.bias), part, (layer.weight[rows], layer.bias[rows])
        )
        parts.append(part)
    return tuple(parts)


def _feature_sizes(hidden, prepare, input_shape) -> list[int]:
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    x = jax.eval_shape(prepare, x)
    sizes = []
    for layer in hidden:
        x = jax.eval_shape(layer, x)
        sizes.append(int(np.prod(x.shape)))
    return sizes


def stack_local_model(
    hidden: list,
    output: eqx.nn.Linear,
    key: jax.Array,
    *,
    input_shape: tuple[int, ...],
    prepare: Callable = lambda x: x,
    groups: int | None = None,
) -> eqx_dodge.LocalLosses:
    """A stack `output(flatten(relu(hidden[-1](... relu(hidden[0](prepare(x)))))))`
    as one block per hidden layer (Linear or Conv2d, then ReLU), each with a local
    linear head on its flattened features, and a last block whose head is `output`:
    `local_model` for any depth and for conv layers. With `groups`, every hidden
    layer is split into `groups` layers with a local loss each (`grouped_model`)."""
    sizes = _feature_sizes(hidden, prepare, input_shape)
    blocks, heads = [], []
    for index, (layer, size) in enumerate(zip(hidden, sizes)):
        # Not `fold_in(key, i)` for small i: see `_auxiliary_head`.
        linear = eqx.nn.Linear(size, 10, key=jax.random.fold_in(key, 7 + index))
        if groups is None:
            block = [layer, eqx.nn.Lambda(jax.nn.relu)]
            head = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), linear])
        else:
            block: list = [GroupedLayer(split_layer(layer, groups))]
            head = GroupedHead(linear, groups)
        if index == 0:
            block.insert(0, eqx.nn.Lambda(prepare))
        blocks.append(eqx.nn.Sequential(block))
        heads.append(head)
    blocks.append(eqx.nn.Identity())
    heads.append(eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), output]))
    return eqx_dodge.LocalLosses(blocks=blocks, heads=heads)
