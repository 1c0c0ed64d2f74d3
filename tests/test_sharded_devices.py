"""Multi-device checks of `eqx_dodge.sharded_value_and_dodge`, on 8 devices.

`tests/conftest.py` asks JAX for 8 CPU devices before anything uses one, so these run
in the main test process; on a backend with fewer devices they are skipped.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scaling
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_dodge
from eqx_dodge._directions import num_coordinates, part_indices
from eqx_dodge._sharded_layout import make_layout

from .helpers import assert_tree_allclose, layout_directions


NUM_DEVICES = 8
BATCH = 32


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < NUM_DEVICES:
        pytest.skip(
            f"needs {NUM_DEVICES} devices, {jax.default_backend()} has "
            f"{jax.device_count()} (tests/conftest.py sets 8 on the CPU backend)"
        )


def data_mesh(axis_type=AxisType.Explicit):
    return jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))


def shard_batch(mesh, *arrays, axis: str | tuple[str, ...] = "data"):
    return tuple(jax.device_put(a, NamedSharding(mesh, P(axis))) for a in arrays)


def _flat_leaves(tree):
    return [np.ravel(leaf) for leaf in jax.tree.leaves(tree)]


def mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@pytest.fixture(scope="module")
def problem():
    model_key, x_key, y_key = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.MLP(12, 3, 16, 2, key=model_key)
    x = jax.random.normal(x_key, (BATCH, 12))
    y = jax.random.normal(y_key, (BATCH, 3))
    return model, x, y


# Data parallelism: the same estimate as one device on the whole batch.


# No ("partition", 1): one part is the whole direction, and the estimator draws it
# exactly as ("average", 1) does (`random_tangents` partitions only for k > 1).
@pytest.mark.parametrize(
    "mode, num_directions, axis_type",
    [
        ("average", 1, AxisType.Explicit),
        ("average", 8, AxisType.Explicit),
        ("partition", 8, AxisType.Explicit),
        ("average", 8, AxisType.Auto),
    ],
)
def test_data_parallel_equals_single_device(problem, mode, num_directions, axis_type):
    """The sharded estimate is the one-device estimate on the whole batch, and the
    compiled step all-reduces k + 1 floats: the k derivatives and the loss."""
    model, x, y = problem
    mesh = data_mesh(axis_type)
    key = jax.random.key(1)
    params, static = eqx.partition(model, eqx.is_array)

    def step(params, x, y):
        model = eqx.combine(params, static)
        return eqx_dodge.sharded_value_and_dodge(
            mse, mesh=mesh, key=key, num_directions=num_directions, mode=mode
        )(model, x, y)

    sharded_x, sharded_y = shard_batch(mesh, x, y)
    compiled = jax.jit(step).lower(params, sharded_x, sharded_y).compile()
    value, estimate = compiled(params, sharded_x, sharded_y)
    expected_value, expected = eqx.filter_jit(
        eqx_dodge.filter_value_and_dodge(
            mse, key=key, num_directions=num_directions, mode=mode
        )
    )(model, x, y)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)
    # The estimate is not zero: the comparison has something to compare.
    assert np.linalg.norm(np.concatenate(_flat_leaves(expected))) > 1e-3
    for leaf in jax.tree.leaves(estimate):
        assert leaf.sharding.is_fully_replicated

    text = scaling.hlo_text(compiled)
    shapes = scaling.all_reduce_shapes(text)
    assert {dtype for dtype, _ in shapes} == {"f32"}
    assert sum(math.prod(shape) for _, shape in shapes) == num_directions + 1
    assert scaling.all_reduce_bytes(text) == 4 * (num_directions + 1)
    assert scaling.other_collectives(text) == []


def test_candidate_direction_sum_reduction_and_aux(problem):
    model, x, y = problem
    mesh = data_mesh()
    candidate = eqx.filter_jit(eqx.filter_grad(mse))(model, x[:8], y[:8])

    def summed(model, x, y):
        residual = jax.vmap(model)(x) - y
        return jnp.sum(residual**2), jnp.mean(residual, axis=1)

    @eqx.filter_jit
    def sharded(model, x, y):
        return eqx_dodge.sharded_value_and_dodge(
            summed,
            mesh=mesh,
            direction=candidate,
            has_aux=True,
            batch_reduction="sum",
        )(model, x, y)

    (value, aux), estimate = sharded(model, *shard_batch(mesh, x, y))
    (expected_value, expected_aux), expected = eqx.filter_jit(
        eqx_dodge.filter_value_and_dodge(summed, direction=candidate, has_aux=True)
    )(model, x, y)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-5)
    # One aux per data shard, stacked along a new leading axis.
    assert aux.shape == (NUM_DEVICES, BATCH // NUM_DEVICES)
    np.testing.assert_allclose(aux.reshape(-1), expected_aux, rtol=1e-6)


def test_two_data_axes(problem):
    """A batch split over two mesh axes (e.g. hosts × local devices)."""
    model, x, y = problem
    mesh = jax.make_mesh((2, 4), ("hosts", "data"))
    key = jax.random.key(7)
    x, y = shard_batch(mesh, x, y, axis=("hosts", "data"))
    value, estimate = eqx.filter_jit(
        lambda m, x, y: eqx_dodge.sharded_value_and_dodge(
            mse, mesh=mesh, data_axis=("hosts", "data"), key=key, num_directions=4
        )(m, x, y)
    )(model, x, y)
    expected_value, expected = eqx.filter_jit(
        eqx_dodge.filter_value_and_dodge(mse, key=key, num_directions=4)
    )(model, *problem[1:])
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)


def test_sharded_dodge_returns_the_estimate(problem):
    model, x, y = problem
    mesh = data_mesh()
    key = jax.random.key(2)
    estimate = eqx.filter_jit(
        lambda m, x, y: eqx_dodge.sharded_dodge(mse, mesh=mesh, key=key)(m, x, y)
    )(model, *shard_batch(mesh, x, y))
    expected = eqx.filter_jit(eqx_dodge.filter_dodge(mse, key=key))(model, x, y)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)


# Model parallelism: parameters split over a "model" axis, directions drawn per shard.


def megatron_loss(reduce):
    """A two-layer MLP split Megatron-style: `w1` by columns, `w2` by rows."""

    def loss(params, x, y):
        hidden = jnp.tanh(x @ params["w1"] + params["b1"][None])
        out = reduce(hidden @ params["w2"]) + params["b2"][None]
        return jnp.mean((out - y) ** 2)

    return loss


MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P()}


@pytest.fixture(scope="module")
def model_parallel_problem():
    keys = jax.random.split(jax.random.key(3), 4)
    params = {
        "w1": jax.random.normal(keys[0], (12, 8)) / 3,
        "b1": 0.1 * jax.random.normal(keys[1], (8,)),
        "w2": jax.random.normal(keys[2], (8, 3)) / 3,
        "b2": jnp.zeros(3),
    }
    x = jax.random.normal(keys[3], (BATCH, 12))
    y = jnp.sin(x[:, :3])
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    return params, shard_like_model(mesh, params), x, y, mesh


def shard_like_model(mesh, tree):
    return jax.tree.map(
        lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)),
        tree,
        MODEL_SPECS,
    )


def shard_local_directions(mesh, params, key, num_directions):
    """The global directions that the shards draw, assembled for the reference."""
    layout = make_layout(MODEL_SPECS, params, mesh, ("data",))
    stacked = num_directions is not None
    out_specs = jax.tree.map(
        lambda spec: P(None, *spec) if stacked else spec,
        MODEL_SPECS,
        is_leaf=lambda s: isinstance(s, P),
    )
    draw = jax.shard_map(
        lambda p: layout_directions(layout, key, p, num_directions),
        mesh=mesh,
        in_specs=(MODEL_SPECS,),
        out_specs=out_specs,
    )
    directions = jax.jit(draw)(shard_like_model(mesh, params))
    # Gathered onto one device, for the single-device reference only.
    return jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)), directions)


@pytest.mark.parametrize(
    "mode, num_directions", [("average", 1), ("average", 8), ("partition", 8)]
)
def test_model_parallel_estimate(model_parallel_problem, mode, num_directions):
    params, sharded_params, x, y, mesh = model_parallel_problem
    key = jax.random.key(4)
    local_loss = megatron_loss(lambda z: jax.lax.psum(z, "model"))
    global_loss = megatron_loss(lambda z: z)

    value, estimate = jax.jit(
        lambda p, x, y: eqx_dodge.sharded_value_and_dodge(
            local_loss,
            mesh=mesh,
            param_specs=MODEL_SPECS,
            key=key,
            num_directions=num_directions,
            mode=mode,
        )(p, x, y)
    )(sharded_params, *shard_batch(mesh, x, y))

    stacked = mode == "average" and num_directions > 1
    directions = shard_local_directions(
        mesh, params, key, num_directions if stacked else None
    )

    # The reference in one program (eagerly, every operation compiles on its own).
    @jax.jit
    def reference(params, directions, x, y):
        def derivative(tangent):
            return jax.jvp(lambda p: global_loss(p, x, y), (params,), (tangent,))[1]

        if stacked:
            weights = jax.vmap(derivative)(directions) / num_directions
            expected = jax.tree.map(lambda u: jnp.tensordot(weights, u, 1), directions)
        else:
            parts = part_indices(params, num_directions)
            derivatives = jax.vmap(derivative)(
                eqx_dodge.partition_direction(directions, num_directions)
            )
            expected = jax.tree.map(lambda u, j: derivatives[j] * u, directions, parts)
        return global_loss(params, x, y), expected

    global_value, expected = reference(params, directions, x, y)
    if not stacked:
        # The two model shards of `w1` draw different signs (not one piece twice).
        w1 = np.asarray(directions["w1"])
        assert not np.array_equal(w1[:, :4], w1[:, 4:])
    np.testing.assert_allclose(value, global_value, rtol=1e-6)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)
    for name, spec in MODEL_SPECS.items():
        leaf = estimate[name]
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)


@pytest.mark.parametrize("scale", [1.0, 3e37])
def test_model_parallel_candidate_direction(model_parallel_problem, scale):
    """Sharded parameters along a candidate: the global projection, at any scale
    of the candidate (its norm and largest magnitude reduced over the model axis:
    entries of ±3e37 overflow a float32 squared norm)."""
    params, sharded_params, x, y, mesh = model_parallel_problem
    global_loss = megatron_loss(lambda z: z)
    gradient = jax.jit(jax.grad(global_loss))(params, x[:4], y[:4])
    candidate = jax.tree.map(lambda leaf: scale * jnp.sign(leaf), gradient)
    value, estimate = jax.jit(
        lambda p, c, x, y: eqx_dodge.sharded_value_and_dodge(
            megatron_loss(lambda z: jax.lax.psum(z, "model")),
            mesh=mesh,
            param_specs=MODEL_SPECS,
            direction=c,
        )(p, x, y)
    )(sharded_params, shard_like_model(mesh, candidate), *shard_batch(mesh, x, y))
    _, expected = eqx.filter_jit(
        eqx_dodge.filter_value_and_dodge(
            global_loss, direction=jax.tree.map(jnp.sign, gradient)
        )
    )(params, x, y)
    assert_tree_allclose(estimate, expected, rtol=1e-5, atol=1e-6)


def test_model_parallel_hlo_gathers_nothing(model_parallel_problem):
    params, sharded_params, x, y, mesh = model_parallel_problem
    num_directions = 8
    step = jax.jit(
        lambda p, x, y, key: eqx_dodge.sharded_value_and_dodge(
            megatron_loss(lambda z: jax.lax.psum(z, "model")),
            mesh=mesh,
            param_specs=MODEL_SPECS,
            key=key,
            num_directions=num_directions,
        )(p, x, y)
    )
    lowered = step.lower(sharded_params, *shard_batch(mesh, x, y), jax.random.key(0))
    text = scaling.hlo_text(lowered.compile())
    assert scaling.other_collectives(text) == []
    sizes = sorted(math.prod(shape) for _, shape in scaling.all_reduce_shapes(text))
    local_batch = BATCH // 4
    # Over "data": the loss and the k derivatives. Over "model": the activations
    # that the model's own `psum` sums (and their k tangents); never a parameter.
    assert sizes == sorted([1, num_directions, local_batch * 3, local_batch * 3 * 8])


# Gradient data parallelism, for comparison, all-reduces the p-float gradient.


def test_hlo_gradient_data_parallel_all_reduces_p_floats(problem):
    model, x, y = problem
    mesh = data_mesh(AxisType.Auto)
    params, static = eqx.partition(model, eqx.is_array)

    def step(params, x, y):
        return eqx.filter_value_and_grad(mse)(eqx.combine(params, static), x, y)

    text = scaling.compiled_text(step, params, *shard_batch(mesh, x, y))
    shapes = scaling.all_reduce_shapes(text)
    p = num_coordinates(model)
    assert sum(math.prod(shape) for _, shape in shapes) == p + 1
    parameter_shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
    assert parameter_shapes <= {shape for _, shape in shapes}


# Training: eight devices follow the one-device loss curve.


def test_digits_training_matches_single_device():
    from sklearn.datasets import load_digits

    all_images, all_labels = load_digits(return_X_y=True)
    num_batches, batch = 7, 256
    order = np.random.default_rng(0).permutation(len(all_labels))
    order = order[: num_batches * batch]
    images = jnp.asarray(all_images[order] / 16.0, jnp.float32)
    labels = jnp.asarray(all_labels[order], jnp.int32)
    images = images.reshape(num_batches, batch, 64)
    labels = labels.reshape(num_batches, batch)
    model = eqx.nn.MLP(64, 10, 32, 1, key=jax.random.key(5))
    # k = 4 directions: one chunk per step, so each training program compiles one
    # jvp (k = 8 directions in two chunks are compared step by step above).
    optimizer = optax.sgd(0.1)
    num_steps = 100
    step_keys = jax.random.split(jax.random.key(6), num_steps)
    mesh = data_mesh()

    def cross_entropy(model, x, y):
        logits = jax.vmap(model)(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def train(value_and_dodge, images, labels):
        params, static = eqx.partition(model, eqx.is_array)

        def step(carry, inputs):
            params, opt_state = carry
            index, key = inputs
            x = images[index % num_batches]
            y = labels[index % num_batches]
            model_now = eqx.combine(params, static)
            loss, estimate = value_and_dodge(key)(model_now, x, y)
            updates, opt_state = optimizer.update(estimate, opt_state, model_now)
            params = eqx.filter(eqx.apply_updates(model_now, updates), eqx.is_array)
            return (params, opt_state), loss

        carry = (params, optimizer.init(params))
        _, losses = jax.lax.scan(step, carry, (jnp.arange(num_steps), step_keys))
        return losses

    one_device = jax.jit(
        lambda images, labels: train(
            lambda key: eqx_dodge.filter_value_and_dodge(
                cross_entropy, key=key, num_directions=4
            ),
            images,
            labels,
        )
    )(images, labels)
    sharded_images = jax.device_put(images, NamedSharding(mesh, P(None, "data")))
    sharded_labels = jax.device_put(labels, NamedSharding(mesh, P(None, "data")))
    eight_devices = jax.jit(
        lambda images, labels: train(
            lambda key: eqx_dodge.sharded_value_and_dodge(
                cross_entropy, mesh=mesh, key=key, num_directions=4
            ),
            images,
            labels,
        )
    )(sharded_images, sharded_labels)
    # Training works at all: the loss falls well below its start, log(10) ≈ 2.3.
    assert float(jnp.mean(one_device[-10:])) < 0.8 * float(one_device[0])
    # Only the order of the float sums differs (measured: ≤ 2e-7 relative over the
    # 100 steps).
    np.testing.assert_allclose(eight_devices, one_device, rtol=1e-5)


# The benchmark's smoke run.


def test_scaling_benchmark_quick(tmp_path):
    rows = scaling.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "scaling.json").exists()
    assert (tmp_path / "scaling.png").exists()
    for row in rows:
        assert row["dodge"]["all_reduce_bytes"] == 4 * (scaling.NUM_DIRECTIONS + 1)
        assert row["gradient"]["all_reduce_bytes"] == 4 * (row["num_parameters"] + 1)


def test_keyword_arguments_stay_whole_under_filter_jit(problem):
    """`eqx.filter_jit` binds a call to its function's signature: with the loss's
    own, a keyword naming one of its parameters became positional, so part of the
    batch, and was split over the devices (here the per-output weights `w`,
    shaped like a batch, silently changed the loss). Catches a wrapper that
    shows the loss's signature."""
    model, x, y = problem
    w = jnp.linspace(0.5, 2.0, BATCH)

    def weighted(model, x, y, w):
        return jnp.sum(w) * mse(model, x, y)

    estimator = eqx_dodge.sharded_value_and_dodge(weighted, mesh=data_mesh(), key=0)
    value, estimate = estimator(model, x, y, w=w)
    jitted_value, jitted_estimate = eqx.filter_jit(estimator)(model, x, y, w=w)
    np.testing.assert_allclose(jitted_value, value, rtol=1e-6)
    assert_tree_allclose(jitted_estimate, estimate, rtol=1e-5, atol=1e-7)
    dodge = eqx_dodge.sharded_dodge(weighted, mesh=data_mesh(), key=0)
    assert_tree_allclose(eqx.filter_jit(dodge)(model, x, y, w=w), estimate, rtol=1e-5)
