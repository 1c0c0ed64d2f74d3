"""Activity-perturbed forward gradients: unbiasedness, variance formulas, API."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxtyping import Array, Int, PRNGKeyArray

import eqx_dodge

from .helpers import assert_tree_allclose, flat_batched


NUM_KEYS = 2**14


def cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


class ConvNet(eqx.Module):
    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray):
        conv_key, linear_key = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 2, 3, key=conv_key)
        self.linear = eqx.nn.Linear(18, 2, key=linear_key)

    def __call__(self, image: Array) -> Array:
        return self.linear(jnp.tanh(self.conv(image)).reshape(-1))


class TokenModel(eqx.Module):
    """Weight-space leaves (an embedding, a LayerNorm, a free scale) around a Linear
    layer called twice in a Python loop."""

    embedding: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    hidden: eqx.nn.Linear
    readout: eqx.nn.Linear
    scale: Array

    def __init__(self, key: PRNGKeyArray):
        keys = jax.random.split(key, 4)
        self.embedding = eqx.nn.Embedding(5, 4, key=keys[0])
        self.norm = eqx.nn.LayerNorm(4)
        self.norm = eqx.tree_at(
            lambda n: (n.weight, n.bias),
            self.norm,
            tuple(jax.random.normal(k, (4,)) for k in jax.random.split(keys[1])),
        )
        self.hidden = eqx.nn.Linear(4, 4, key=keys[2])
        self.readout = eqx.nn.Linear(4, 2, key=keys[3])
        self.scale = jnp.array(1.3)

    def __call__(self, tokens: Int[Array, " t"]) -> Array:
        features = jnp.mean(jax.vmap(self.embedding)(tokens), axis=0)
        hidden = self.norm(features)
        for _ in range(2):
            hidden = jnp.tanh(self.hidden(hidden))
        return self.scale * self.readout(hidden)


def mean_loss(example_loss):
    def loss(model, *batch):
        return jnp.mean(
            jax.vmap(example_loss, in_axes=(None,) + (0,) * len(batch))(model, *batch)
        )

    return loss


def estimates_over_keys(model, batch, **options):
    """The estimates for `NUM_KEYS` keys, one jitted `vmap`, flattened per key."""

    @jax.jit
    def run(keys):
        def one(key):
            return eqx_dodge.activity_dodge(cross_entropy, key=key, **options)(
                model, *batch
            )

        return flat_batched(jax.vmap(one)(keys))

    return run(jax.random.split(jax.random.key(0), NUM_KEYS))


def assert_unbiased(estimates, gradient):
    flat = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(gradient)])
    assert estimates.shape[1] == flat.shape[0]
    mean = jnp.mean(estimates, axis=0)
    error = jnp.std(estimates, axis=0) / jnp.sqrt(estimates.shape[0])
    # Every coordinate is noisy here (the weight-space leaves included), so the
    # z-score of the sample mean is well defined everywhere.
    assert jnp.all(error > 0)
    z = jnp.abs(mean - flat) / error
    assert jnp.max(z) < 5, float(jnp.max(z))


def mlp_problem():
    model = eqx.nn.MLP(3, 2, 4, 2, activation=jnp.tanh, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (5, 3))
    y = jnp.array([0, 1, 1, 0, 1])
    return model, (x, y)


@ft.cache
def mlp_estimates(separate_layers: bool = False, num_directions: int = 1):
    # Shared by the tests below: compiling is most of their cost on a small CPU.
    model, batch = mlp_problem()
    return estimates_over_keys(
        model, batch, separate_layers=separate_layers, num_directions=num_directions
    )


@pytest.mark.parametrize("separate_layers", [False, True])
def test_unbiased_mlp(separate_layers):
    model, batch = mlp_problem()
    gradient = eqx.filter_jit(eqx.filter_grad(mean_loss(cross_entropy)))(model, *batch)
    assert_unbiased(mlp_estimates(separate_layers), gradient)


def test_unbiased_conv():
    model = ConvNet(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (4, 1, 5, 5))
    y = jnp.array([0, 1, 1, 0])
    gradient = eqx.filter_jit(eqx.filter_grad(mean_loss(cross_entropy)))(model, x, y)
    assert_unbiased(estimates_over_keys(model, (x, y)), gradient)


def test_unbiased_weight_space_leaves_and_repeated_calls():
    model = TokenModel(jax.random.key(5))
    tokens = jax.random.randint(jax.random.key(6), (4, 3), 0, 5)
    y = jnp.array([0, 1, 1, 0])
    gradient = eqx.filter_jit(eqx.filter_grad(mean_loss(cross_entropy)))(
        model, tokens, y
    )
    assert_unbiased(estimates_over_keys(model, (tokens, y)), gradient)


class AttentionModel(eqx.Module):
    """Layers applied under the model's own `vmap`s inside one example: the
    per-token projections of `eqx.nn.MultiheadAttention` and a Linear layer under
    two nested `vmap`s (tokens × features)."""

    attention: eqx.nn.MultiheadAttention
    mixer: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray):
        keys = jax.random.split(key, 3)
        self.attention = eqx.nn.MultiheadAttention(2, 4, key=keys[0])
        self.mixer = eqx.nn.Linear(1, 2, key=keys[1])
        self.readout = eqx.nn.Linear(8, 2, key=keys[2])

    def __call__(self, tokens: Array) -> Array:
        hidden = jnp.tanh(self.attention(tokens, tokens, tokens))
        mixed = jax.vmap(jax.vmap(self.mixer))(hidden[..., None])
        return self.readout(jnp.mean(jnp.tanh(mixed), axis=0).reshape(-1))


def test_unbiased_with_layers_under_the_models_own_vmaps():
    """Catches one tangent shared by every application of a layer under a `vmap`
    inside the example (a per-token projection): the cross terms of different
    tokens then bias the estimate (a z-score of 30 before each application got
    its own signs)."""
    model = AttentionModel(jax.random.key(18))
    tokens = jax.random.normal(jax.random.key(19), (3, 3, 4))
    y = jnp.array([0, 1, 1])
    gradient = eqx.filter_jit(eqx.filter_grad(mean_loss(cross_entropy)))(
        model, tokens, y
    )
    for separate_layers in (False, True):
        estimates = estimates_over_keys(
            model, (tokens, y), separate_layers=separate_layers
        )
        assert_unbiased(estimates, gradient)


def test_a_vmap_around_the_estimator_gives_each_member_its_own_call():
    """A `vmap` around the estimator with one key (an ensemble of models, several
    data sets) gives each member the estimate it gets alone, as `vmap` must. Catches
    the signs' batching rule taking such a `vmap` for the model's own and drawing new
    signs per member (it did, before the words depended on the inputs)."""
    keys = jax.random.split(jax.random.key(22), 3)
    models = eqx.filter_vmap(lambda k: eqx.nn.MLP(3, 2, 4, 1, key=k))(keys)
    xs = jax.random.normal(jax.random.key(23), (3, 5, 3))
    y = jnp.array([0, 1, 1, 0, 1])

    def estimate(model, x):
        grads = eqx_dodge.activity_dodge(cross_entropy, key=7, num_directions=2)(
            model, x, y
        )
        return eqx.filter(grads, eqx.is_array)

    over_models = eqx.filter_jit(
        eqx.filter_vmap(estimate, in_axes=(eqx.if_array(0), None))
    )
    over_data = eqx.filter_jit(eqx.filter_vmap(estimate, in_axes=(None, 0)))
    alone = eqx.filter_jit(estimate)
    first_model = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, models)
    for index in range(3):
        member = jax.tree.map(lambda a: a[index] if eqx.is_array(a) else a, models)
        for batched, single in (
            (over_models(models, xs[0]), alone(member, xs[0])),
            (over_data(first_model, xs), alone(first_model, xs[index])),
        ):
            for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
                assert jnp.allclose(a[index], b, rtol=1e-5, atol=1e-6)


class Gated(eqx.Module):
    """A layer of one's own: parameters in a hand-written product."""

    weight: Array
    gate: Array

    def __call__(self, x: Array) -> Array:
        return (self.weight @ x) * jax.nn.sigmoid(self.gate)


class WithGated(eqx.Module):
    gated: eqx_dodge.ActivityPoint | Gated
    readout: eqx.nn.Linear

    def __call__(self, x: Array) -> Array:
        return self.readout(jnp.tanh(self.gated(x)))


def gated_model(mark: bool) -> WithGated:
    keys = jax.random.split(jax.random.key(20), 3)
    gated = Gated(jax.random.normal(keys[0], (4, 3)), jax.random.normal(keys[1], (4,)))
    readout = eqx.nn.Linear(4, 2, key=keys[2])
    return WithGated(eqx_dodge.ActivityPoint(gated) if mark else gated, readout)


def test_activity_point_marks_a_module_of_ones_own():
    """`ActivityPoint` makes a Module a perturbation point: unbiased, and its weight
    estimate for one example is the outer product of the output's estimated
    derivative with the input (rank one), which a weight-space direction (the
    Module left unmarked) is not."""
    x = jax.random.normal(jax.random.key(21), (4, 3))
    y = jnp.array([0, 1, 1, 0])
    model = gated_model(mark=True)
    gradient = eqx.filter_jit(eqx.filter_grad(mean_loss(cross_entropy)))(model, x, y)
    assert_unbiased(estimates_over_keys(model, (x, y)), gradient)
    assert jnp.allclose(model(x[0]), gated_model(mark=False)(x[0]))

    def one_example_weight(model):
        estimate = eqx_dodge.activity_dodge(cross_entropy, key=1)(model, x[:1], y[:1])
        gated = estimate.gated
        return gated.layer if isinstance(gated, eqx_dodge.ActivityPoint) else gated

    marked = one_example_weight(model)
    assert jnp.linalg.matrix_rank(marked.weight) == 1
    assert jnp.allclose(marked.weight, jnp.outer(marked.weight[:, 0] / x[0, 0], x[0]))
    assert jnp.linalg.matrix_rank(one_example_weight(gated_model(False)).weight) > 1


def test_activity_point_needs_one_floating_array():
    model = eqx_dodge.ActivityPoint(eqx.nn.Lambda(lambda x: (x, x)))
    with pytest.raises(TypeError, match="ActivityPoint"):
        eqx_dodge.activity_dodge(lambda m, x: jnp.sum(m(x)[0]), key=0)(
            model, jnp.ones((2, 3))
        )


def test_variance_of_one_layer():
    # One example through one Linear layer: the estimate of W_ij is
    # (δ·v) v_i x_j, of variance (‖δ‖² − δ_i²) x_j²; weight perturbation's is
    # ‖δ‖²‖x‖² − δ_i² x_j².
    layer = eqx.nn.Linear(4, 3, use_bias=False, key=jax.random.key(7))
    x = jax.random.normal(jax.random.key(8), (1, 4))
    target = jnp.array([[0.3, -1.0, 2.0]])

    def example_loss(layer, x, target):
        return jnp.sum(jnp.sin(layer(x)) * target)

    delta = jnp.cos(layer(x[0])) * target[0]
    squared = jnp.sum(delta**2)
    activity = (squared - delta[:, None] ** 2) * x[0][None, :] ** 2
    weight = squared * jnp.sum(x[0] ** 2) - (delta[:, None] * x[0][None, :]) ** 2

    @jax.jit
    def run(keys):
        def one(key):
            return (
                eqx_dodge.activity_dodge(example_loss, key=key)(layer, x, target),
                eqx_dodge.filter_dodge(mean_loss(example_loss), key=key)(
                    layer, x, target
                ),
            )

        activity, weight = jax.vmap(one)(keys)
        return activity.weight, weight.weight

    keys = jax.random.split(jax.random.key(9), NUM_KEYS)
    activity_estimates, weight_estimates = run(keys)
    centred = activity_estimates - jnp.mean(activity_estimates, axis=0, keepdims=True)
    variance = jnp.mean(centred**2, axis=0)
    # The standard error of a sample variance is √((μ₄ − σ⁴)/n).
    error = jnp.sqrt((jnp.mean(centred**4, axis=0) - variance**2) / NUM_KEYS)
    assert jnp.all(jnp.abs(variance - activity) <= 5 * error)
    assert jnp.all(activity < weight)
    assert jnp.all(variance < jnp.var(weight_estimates, axis=0))


def test_separate_layers_lower_variance():
    # Each layer's estimate no longer carries the other layers' terms δ_m·v_m.
    joint = jnp.var(mlp_estimates(False), axis=0)
    separate = jnp.var(mlp_estimates(True), axis=0)
    assert jnp.sum(separate) < 0.5 * jnp.sum(joint)


def test_num_directions_divides_variance():
    # Averages of 4 independent draws: a quarter of the variance. The summed sample
    # variances over 2¹⁴ keys are within a few percent.
    ratio = jnp.sum(jnp.var(mlp_estimates(False, 4), axis=0)) / jnp.sum(
        jnp.var(mlp_estimates(False), axis=0)
    )
    assert 0.2 < ratio < 0.3, float(ratio)


def test_value_aux_and_jit():
    model, (x, y) = mlp_problem()

    def with_aux(model, x, y):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits

    @eqx.filter_jit
    def run(model, x, y, key):
        value_and_estimate = eqx_dodge.activity_value_and_dodge(
            with_aux, key=key, has_aux=True
        )(model, x, y)
        estimate_and_aux = eqx_dodge.activity_dodge(with_aux, key=key, has_aux=True)(
            model, x, y
        )
        return value_and_estimate, estimate_and_aux

    ((value, aux), estimate), (same, other) = run(model, x, y, jax.random.key(11))
    assert jnp.allclose(value, mean_loss(cross_entropy)(model, x, y))
    assert jnp.allclose(aux, jax.vmap(model)(x))
    assert jnp.array_equal(other, aux)
    for a, b, p in zip(
        jax.tree.leaves(estimate), jax.tree.leaves(same), jax.tree.leaves(model)
    ):
        assert a.dtype == p.dtype and a.shape == p.shape
        assert jnp.array_equal(a, b)


def test_key_forms_dtypes_and_key_reuse():
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(12))
    model = jax.tree.map(
        lambda p: p.astype(jnp.bfloat16) if eqx.is_inexact_array(p) else p, model
    )
    x = jax.random.normal(jax.random.key(13), (3, 3)).astype(jnp.bfloat16)
    y = jnp.array([0, 1, 1])

    def example_loss(model, x, y):
        logits = model(x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    @eqx.filter_jit
    def run(key, num_directions=1, separate_layers=False):
        return eqx_dodge.activity_dodge(
            example_loss,
            key=key,
            num_directions=num_directions,
            separate_layers=separate_layers,
        )(model, x, y)

    typed, seed = run(jax.random.key(3)), run(3)
    for a, b in zip(jax.tree.leaves(typed), jax.tree.leaves(seed)):
        assert a.dtype == jnp.bfloat16
        assert jnp.array_equal(a, b)
    with jax.debug_key_reuse(True):
        run(jax.random.key(0), 3, True)


def test_errors():
    model, (x, y) = mlp_problem()
    # The messages name the argument (under the tests' runtime type checks, the
    # annotations catch the wrong types first, naming it too).
    with pytest.raises(TypeError, match="key"):
        eqx_dodge.activity_dodge(cross_entropy, key="seed")  # pyright: ignore
    with pytest.raises((TypeError, ValueError), match="key"):
        eqx_dodge.activity_dodge(cross_entropy, key=jax.random.split(jax.random.key(0)))
    with pytest.raises(ValueError, match="`num_directions`"):
        eqx_dodge.activity_dodge(cross_entropy, key=0, num_directions=0)
    with pytest.raises(TypeError, match="num_directions"):
        eqx_dodge.activity_dodge(cross_entropy, key=0, num_directions=2.0)  # pyright: ignore
    with pytest.raises(TypeError, match="separate_layers"):
        eqx_dodge.activity_dodge(cross_entropy, key=0, separate_layers=1)  # pyright: ignore
    with pytest.raises(TypeError, match="example_loss"):
        eqx_dodge.activity_dodge(None, key=0)  # pyright: ignore
    with pytest.raises(ValueError, match="leading"):
        eqx_dodge.activity_dodge(cross_entropy, key=0)(model, x, y[:3])
    with pytest.raises(TypeError, match="by position"):
        eqx_dodge.activity_dodge(cross_entropy, key=0)(model=model)
    # A stack of layers run under `lax.scan` (JAX's own error was an IndexError in
    # the scan's length inference).
    scanned = eqx.nn.MLP(4, 3, 8, 3, key=jax.random.key(3), scan=True)
    x4 = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"\.layers\[1\] has stacked weights"):
        eqx_dodge.activity_dodge(cross_entropy, key=0)(scanned, x4, y[:2])


class ReadsFields(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x: Array) -> Array:
        size = self.linear.out_features
        assert isinstance(size, int)
        return self.linear(x) / size


class ReadsWeight(ReadsFields):
    def __call__(self, x: Array) -> Array:
        return self.linear.weight @ x


def test_a_failing_example_loss_is_told_it_gets_one_example():
    """A loss written for a batch (vmapping the model) fails inside JAX on one
    example: a note says the activity estimators pass one example, with its shapes.
    eqx_dodge's own errors raised inside the loss get no such note."""
    model, (x, y) = mlp_problem()

    def batch_loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    with pytest.raises(Exception) as caught:
        eqx_dodge.activity_dodge(batch_loss, key=0)(model, x, y)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "on ONE example at a time" in notes
    assert f"shapes ({x.shape[1:]}, ())" in notes
    linear = eqx.nn.Linear(3, 2, key=jax.random.key(14))
    x3, y3 = jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
    with pytest.raises(AttributeError, match="reads `.weight`") as own:
        eqx_dodge.activity_dodge(cross_entropy, key=0)(ReadsWeight(linear), x3, y3)
    assert "ONE example" not in "\n".join(getattr(own.value, "__notes__", []))


def test_layer_fields_read_through_weights_do_not():
    linear = eqx.nn.Linear(3, 2, key=jax.random.key(14))
    x, y = jax.random.normal(jax.random.key(15), (4, 3)), jnp.array([0, 1, 1, 0])
    estimate = eqx.filter_jit(eqx_dodge.activity_dodge(cross_entropy, key=0))(
        ReadsFields(linear), x, y
    )
    assert estimate.linear.weight.shape == (2, 3)
    with pytest.raises(AttributeError, match="reads `.weight`"):
        eqx_dodge.activity_dodge(cross_entropy, key=0)(ReadsWeight(linear), x, y)


def test_keyword_arguments_stay_whole_under_filter_jit():
    """`eqx.filter_jit` binds a call to its function's signature: with the loss's
    own, a keyword naming one of its parameters became positional, so part of the
    batch, and was sliced per example (here the class weights `w`, as long as the
    batch, silently changed the loss). Catches a wrapper that shows the loss's
    signature."""
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(16))
    x, y = jax.random.normal(jax.random.key(17), (4, 3)), jnp.array([0, 1, 1, 0])
    w = jnp.array([0.5, 1.0, 1.5, 2.0])

    def weighted(model, x, y, w):
        return jnp.sum(w) * cross_entropy(model, x, y)

    estimator = eqx_dodge.activity_value_and_dodge(weighted, key=0)
    value, estimate = estimator(model, x, y, w=w)
    jitted_value, jitted_estimate = eqx.filter_jit(estimator)(model, x, y, w=w)
    np.testing.assert_allclose(jitted_value, value, rtol=1e-6)
    assert_tree_allclose(jitted_estimate, estimate, rtol=1e-5, atol=1e-7)
    dodge = eqx_dodge.activity_dodge(weighted, key=0)
    assert_tree_allclose(eqx.filter_jit(dodge)(model, x, y, w=w), estimate, rtol=1e-5)


def test_calls_outside_jit_compile_once():
    """Called outside `jit` with the same loss and shapes, the estimator is traced
    once and its compiled program reused (it ran operation by operation, tracing
    the loss at every call: about 100 ms a call for a small MLP, against under
    1 ms)."""
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(16))
    traces = []

    def loss(model, x, y):
        traces.append(None)
        return cross_entropy(model, x, y)

    estimator = eqx_dodge.activity_dodge(loss, key=0)
    x, y = jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
    estimator(model, x, y)
    first = len(traces)
    for scale in (2.0, 3.0):
        estimator(model, scale * x, y)
    assert len(traces) == first


class FrozenParts(eqx.Module):
    """`TokenModel` with its LayerNorm and its `hidden` layer frozen inside the model
    by `jax.lax.stop_gradient`, as Equinox users freeze layers."""

    inner: TokenModel

    def __call__(self, tokens: Int[Array, " t"]) -> Array:
        model = self.inner
        norm, hidden_layer = jax.lax.stop_gradient((model.norm, model.hidden))
        features = jnp.mean(jax.vmap(model.embedding)(tokens), axis=0)
        hidden = jnp.tanh(hidden_layer(norm(features)))
        return model.scale * model.readout(hidden)


@pytest.mark.parametrize("separate_layers", [False, True])
def test_leaves_frozen_by_stop_gradient_get_exactly_zero(separate_layers):
    """A weight-space leaf frozen behind `stop_gradient` (the LayerNorm) would get
    `d·u` with a random `u`, and drift at every step; it gets a zero direction, so
    its estimate is exactly zero, as `eqx.filter_grad`'s. The frozen Linear layer
    (a perturbation point) is zero through pass B. The live leaves still learn."""
    model = FrozenParts(TokenModel(jax.random.key(16)))
    tokens = jax.random.randint(jax.random.key(17), (6, 3), 0, 5)
    labels = jnp.array([0, 1, 1, 0, 1, 0])
    estimate = eqx.filter_jit(
        eqx_dodge.activity_dodge(
            cross_entropy, key=3, num_directions=2, separate_layers=separate_layers
        )
    )(model, tokens, labels)
    gradient = eqx.filter_grad(mean_loss(cross_entropy))(model, tokens, labels)
    estimate, gradient = estimate.inner, gradient.inner
    for frozen in (estimate.norm, estimate.hidden, gradient.norm, gradient.hidden):
        for leaf in jax.tree.leaves(frozen):
            assert jnp.all(leaf == 0)
    for live in (estimate.embedding, estimate.readout, estimate.scale):
        assert all(jnp.any(leaf != 0) for leaf in jax.tree.leaves(live))


def test_separate_passes_cost_the_network_downstream_of_their_layer():
    """Catches separate-layer passes that carry a dense zero tangent through the
    layers before their own (a `vmap` over one-hot group selections does): with 16
    directions on an MLP of four equal Linear layers, the tangents of the separate
    passes cross 3 + 2 + 1 + 0 layers against 3 for the single pass, so the step's
    arithmetic (XLA's count) is about twice the single pass's, not four times."""
    model = eqx.nn.MLP(64, 64, 64, 3, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    x = jnp.ones((32, 64))

    def flops(separate_layers):
        def estimate(params):
            grads = eqx_dodge.activity_dodge(
                lambda model, x: jnp.sum(jnp.tanh(model(x))),
                key=jax.random.key(1),
                separate_layers=separate_layers,
                num_directions=16,
            )(eqx.combine(params, static), x)
            return eqx.filter(grads, eqx.is_array)

        cost = jax.jit(estimate).lower(params).compile().cost_analysis()
        assert cost is not None
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    # Measured: 1.72 with passes per group, 3.19 with the vmapped one-hot passes.
    assert flops(True) / flops(False) < 2.4


def test_partitioned_model_gets_the_stop_gradient_hint():
    """A model split with `eqx.partition` and combined inside the loss cannot be
    rebuilt from the estimator's wrapped layers: the error says to freeze with
    `stop_gradient` instead, not that the loss takes one example."""
    model = eqx.nn.MLP(3, 1, 8, 2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jnp.sum(x, -1, keepdims=True)
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: m.layers[0].weight, spec, False)
    trainable, static = eqx.partition(model, spec)

    def example_loss(trainable, x, y, static):
        return jnp.mean((eqx.combine(trainable, static)(x) - y) ** 2)

    with pytest.raises(Exception) as raised:
        eqx_dodge.activity_dodge(example_loss, key=0)(trainable, x, y, static=static)
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "jax.lax.stop_gradient" in notes and "ONE example" not in notes
