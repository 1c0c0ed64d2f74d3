"""The local-loss versions of `activity.py`'s MLP 64-H-10, built from its weights.

- `local_model`: two blocks (Ren et al.'s LG-BP / LG-FG-A with one local loss per
    block): the hidden layer with a local linear head H-10 of its own, then the
    output layer as the last block's head.
- `grouped_model`: the same, with the hidden layer's H units split into `GROUPS`
    groups, each one Linear layer (so one perturbation point, with a tangent of its
    own under `separate_layers=True`) and one local loss: the local head applied to
    the hidden features with every other group's `stop_gradient`ed (Ren et al.'s
    group-wise local losses). Each group's loss then reaches only its own units, so a
    unit's activity estimate carries the noise of H/GROUPS outputs, not of H.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
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
    """A Linear layer's output units as `len(groups)` Linear layers, then ReLU."""

    groups: tuple[eqx.nn.Linear, ...]

    def __call__(self, x: jax.Array) -> jax.Array:
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
        outputs = []
        for group in range(self.num_groups):
            live = jnp.arange(features.shape[0]) // size == group
            outputs.append(self.linear(jnp.where(live, features, stopped)))
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
