"""The estimator runs k > 4 directions in chunks on CPU; it must compute the same
estimate as one `vmap` over all k directions."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge
from eqx_dodge._directions import num_coordinates, partition_direction, random_direction
from eqx_dodge._estimator import _primitives
from eqx_dodge._tangents import SINGLE_DEVICE

from .helpers import parameter_bytes


def _chunk_size(num_directions):
    return SINGLE_DEVICE.chunk_size(num_directions)


def random_directions(key, params, num_directions, sampler):
    """The k directions `filter_dodge` averages: those of `split(key, k)`."""
    keys = jax.random.split(key, num_directions)
    return jax.vmap(lambda k: random_direction(k, params, sampler=sampler))(keys)


def make_problem(dtype=jnp.float32):
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    model = jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model
    )
    x = jax.random.normal(jax.random.key(1), (6, 3), dtype)

    def loss(model, x):
        out = jax.vmap(model)(x)
        return jnp.mean(jnp.sin(out) ** 2).astype(jnp.float32), out

    return model, x, loss


def one_vmap(loss, model, x, tangents):
    """Reference: every direction in one `vmap` of `jax.jvp`."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def jvp(u):
        return jax.jvp(lambda p: loss(eqx.combine(p, static), x)[0], (params,), (u,))

    return jax.vmap(jvp, out_axes=(None, 0))(tangents)


def test_chunk_size():
    if jax.default_backend() != "cpu":
        pytest.skip("the chunk sizes checked here are the CPU backend's")
    assert [_chunk_size(k) for k in (1, 4, 5, 64, 65, 200)] == [4, 4, 4, 4, 5, 13]

    def recurrent(w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(w * h), None), w, None, length=3)[0]

    assert "scan" in _primitives(recurrent, jnp.ones(2))


def averaged_reference(loss, model, x, key, k):
    """The value and the average of `k` estimates along the library's directions for
    `key`, each from its own jvp in one `vmap`."""
    params = eqx.filter(model, eqx.is_inexact_array)
    tangents = random_directions(key, params, k, "rademacher")
    value, derivatives = one_vmap(loss, model, x, tangents)
    expected = jax.tree.map(
        lambda u: jnp.tensordot(derivatives / k, u, axes=1), tangents
    )
    return value, expected


@pytest.mark.parametrize("k", [5, 33])
def test_average_matches_one_vmap(k):
    model, x, loss = make_problem()

    # The estimate and its reference in one program (eagerly, every operation of
    # the reference would compile on its own).
    @eqx.filter_jit
    def estimate_and_reference(model, x, key):
        value, expected = averaged_reference(loss, model, x, key, k)
        estimate_fn = eqx_dodge.filter_value_and_dodge(
            loss, key=key, num_directions=k, has_aux=True
        )
        return estimate_fn(model, x), value, jax.vmap(model)(x), expected

    got, value, out, expected = estimate_and_reference(model, x, jax.random.key(3))
    (got_value, aux), estimate = got
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    np.testing.assert_allclose(aux, out, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The chunked estimate is deterministic: the same program run again gives the
    # same bits.
    (_, again), *_ = estimate_and_reference(model, x, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [6, 23])
def test_partition_matches_one_vmap(k):
    model, x, loss = make_problem()

    @eqx.filter_jit
    def estimate_and_reference(model, x, key):
        params = eqx.filter(model, eqx.is_inexact_array)
        parts = partition_direction(random_direction(key, params), k)
        _, derivatives = one_vmap(loss, model, x, parts)
        expected = jax.tree.map(lambda u: jnp.tensordot(derivatives, u, axes=1), parts)
        estimate = eqx_dodge.filter_dodge(
            loss, key=key, num_directions=k, mode="partition", has_aux=True
        )(model, x)[0]
        return estimate, expected

    estimate, expected = estimate_and_reference(model, x, jax.random.key(4))
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_partition_with_every_coordinate_is_the_gradient():
    model, x, loss = make_problem()
    p = num_coordinates(model)  # 26 coordinates: 7 chunks of at most 4 parts

    @eqx.filter_jit
    def estimate_and_gradient(model, x):
        estimate = eqx_dodge.filter_dodge(
            loss,
            key=jax.random.key(5),
            num_directions=p,
            mode="partition",
            has_aux=True,
        )(model, x)[0]
        return estimate, eqx.filter_grad(lambda m, x: loss(m, x)[0])(model, x)

    estimate, gradient = estimate_and_gradient(model, x)
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(gradient)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_chunked_estimate_keeps_dtypes(dtype):
    model, x, loss = make_problem(dtype)

    @eqx.filter_jit
    def estimates(model, x):
        return [
            eqx_dodge.filter_dodge(
                loss, key=jax.random.key(6), num_directions=9, mode=mode, has_aux=True
            )(model, x)[0]
            for mode in ("average", "partition")
        ]

    for leaf in jax.tree.leaves(estimates(model, x)):
        assert leaf.dtype == dtype
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_convolutions_take_the_unrolled_path():
    conv = eqx.nn.Conv1d(2, 3, 3, key=jax.random.key(8))
    x = jax.random.normal(jax.random.key(9), (2, 7))
    params = eqx.filter(conv, eqx.is_inexact_array)
    assert "conv_general_dilated" in _primitives(lambda p: jnp.sum(p(x) ** 2), params)
    model, _, _ = make_problem()
    mlp_params, static = eqx.partition(model, eqx.is_inexact_array)
    assert "conv_general_dilated" not in _primitives(
        lambda p: jnp.sum(eqx.combine(p, static)(x[0, :3])), mlp_params
    )

    def loss(conv, x):
        return jnp.mean(jnp.tanh(conv(x)) ** 2), None

    k = 8  # one chunk after the first: no loop either

    @eqx.filter_jit
    def estimate_and_reference(conv, x, key):
        _, expected = averaged_reference(loss, conv, x, key, k)
        estimate = eqx_dodge.filter_dodge(
            loss, key=key, num_directions=k, has_aux=True
        )(conv, x)[0]
        return estimate, expected

    estimate, expected = estimate_and_reference(conv, x, jax.random.key(10))
    for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# The models of the memory test have no biases: every leaf costs a Threefry hash of
# its own in each chunk's draw, which dominates the compilation time here.


class _Conv(eqx.Module):
    """A digits-sized conv net (its activations about 10x its parameters, as in
    real conv nets; on a smaller one, activations 3x the parameters, XLA overlaps
    unrolled chunks by about one forward pass: 1.23x k = 4's at k = 6)."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=keys[0])
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=keys[1])
        self.linear = eqx.nn.Linear(32 * 4 * 4, 10, key=keys[2])

    def __call__(self, x):
        hidden = jnp.tanh(self.conv2(jnp.tanh(self.conv1(x))))
        return self.linear(hidden.reshape(-1))


class _Recurrent(eqx.Module):
    cell: eqx.nn.GRUCell

    def __call__(self, xs):
        step = lambda h, x: (self.cell(x, h), None)  # noqa: E731
        return jax.lax.scan(step, jnp.zeros(self.cell.hidden_size), xs)[0]


def _temporary_bytes(loss, model, x, num_directions, key):
    """XLA's compiled temporary memory of `filter_dodge(loss)(model, x)`."""
    estimate = eqx_dodge.filter_dodge(loss, key=key, num_directions=num_directions)
    compiled = eqx.filter_jit(estimate).lower(model, x).compile()
    return compiled.compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["mlp", "conv", "scan"])
def test_peak_memory_is_flat_in_k(name):
    """XLA's compiled temporary memory for k = 5, 8, 12 and 32 directions is at
    most k = 4's (one chunk) plus one parameter-sized buffer: the chunks run one
    after the other and each draws its tangents where it uses them. Catches chunks
    that XLA overlaps: a loop it knows runs once is inlined (k = 5 to 8: 1.9x
    k = 4's on the MLP), a chunk's tangents hoisted out of the loop, unrolled
    chunks that run side by side (the conv net's chunks are unrolled, as a
    convolution in a loop is slow on XLA:CPU; 1.9x at k = 12 before `_after`) or
    that share one forward pass (its activations then stay alive across the
    chunks: 1.05x here, and the whole of backpropagation's activations on a deep
    net), and a looped loss with all k directions in one `vmap` (7x at k = 32)."""
    if jax.default_backend() != "cpu":
        pytest.skip("chunks of CPU_CHUNK directions are the CPU backend's rule")
    key = jax.random.key(0)
    model, x = {
        "mlp": lambda: (
            eqx.nn.MLP(64, 10, 64, 2, use_bias=False, use_final_bias=False, key=key),
            jnp.ones((32, 64)),
        ),
        "conv": lambda: (_Conv(key), jnp.ones((64, 1, 8, 8))),
        "scan": lambda: (
            _Recurrent(eqx.nn.GRUCell(4, 32, use_bias=False, key=key)),
            jnp.ones((32, 20, 4)),
        ),
    }[name]()

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    def temporary_bytes(k):
        return _temporary_bytes(loss, model, x, k, key)

    bound = temporary_bytes(4) + parameter_bytes(model)
    for k in (5, 8, 12) if name == "conv" else (5, 8, 12, 32):
        assert temporary_bytes(k) <= bound, k


def test_unrolled_chunks_do_not_hold_the_data():
    """On a conv net whose batch outweighs its parameters, XLA's compiled temporary
    memory for 8, 12 and 32 directions is at most k = 4's plus the estimate (one
    parameter-sized buffer) and a quarter of the batch. Catches the batch the loss
    closes over shared by the unrolled chunks: XLA then makes one copy of it in the
    layout the convolution wants and keeps it alive from the first chunk to the
    last (here the whole batch, 4 parameter buffers, more: 65 536 bytes over k =
    4's estimate; `_derivatives._depending_on`)."""
    if jax.default_backend() != "cpu":
        pytest.skip("convolutions take the unrolled path on the CPU backend only")
    keys = jax.random.split(jax.random.key(0), 2)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(1, 8, 3, stride=2, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(8 * 7 * 7, 10, key=keys[1]),
        ]
    )
    x = jnp.ones((64, 1, 16, 16))

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    def temporary_bytes(k):
        return _temporary_bytes(loss, model, x, k, keys[1])

    bound = temporary_bytes(4) + parameter_bytes(model) + x.nbytes // 4
    for k in (8, 12, 32):
        assert temporary_bytes(k) <= bound, k


class _Readout(eqx.Module):
    """A GRU read out at every step: one logit vector per step."""

    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __call__(self, xs):
        def step(h, x):
            h = self.cell(x, h)
            return h, self.readout(h)

        return jax.lax.scan(step, jnp.zeros(self.cell.hidden_size), xs)[1]


def test_looped_chunks_do_not_hold_what_the_labels_give():
    """On a recurrent net with a label at every step, XLA's compiled temporary
    memory for 8, 12 and 32 directions is at most k = 4's plus one parameter-sized
    buffer. Catches the labels shared by the chunks of the loop: XLA then builds
    the loss's gather indices from them once, ahead of the first chunk, and holds
    them through the loop (here 3 times the labels, 38 KiB: k = 8 needed 11.6
    parameter buffers more than k = 4, and `step_cost`'s LSTM 0.13 more than one;
    `_derivatives.After`)."""
    if jax.default_backend() != "cpu":
        pytest.skip("chunks of CPU_CHUNK directions are the CPU backend's rule")
    keys = jax.random.split(jax.random.key(0), 3)
    model = _Readout(
        eqx.nn.GRUCell(2, 16, use_bias=False, key=keys[0]),
        eqx.nn.Linear(16, 3, use_bias=False, key=keys[1]),
    )
    inputs = jnp.ones((64, 50, 2))
    labels = jax.random.randint(keys[2], (64, 50), 0, 3)

    def loss(model, data):
        inputs, labels = data
        logits = jax.nn.log_softmax(jax.vmap(model)(inputs))
        return -jnp.mean(jnp.take_along_axis(logits, labels[..., None], axis=-1))

    def temporary_bytes(k):
        return _temporary_bytes(loss, model, (inputs, labels), k, keys[1])

    bound = temporary_bytes(4) + parameter_bytes(model)
    for k in (8, 12, 32):
        assert temporary_bytes(k) <= bound, (k, temporary_bytes(k) - bound)


def test_looped_chunks_share_what_a_closed_over_key_gives():
    """A dropout mask drawn from a legacy (uint32) key the loss closes over: XLA's
    compiled temporary memory for 8 and 12 directions is at most k = 4's plus half
    a parameter-sized buffer. Catches the key's data made to depend on the loop
    like the labels: every chunk then draws the mask's random bits again and the
    loop holds them (here 1.2 parameter buffers over k = 4's instead of 0.38; 0.6
    more on a 784-256-256-10 MLP)."""
    if jax.default_backend() != "cpu":
        pytest.skip("chunks of CPU_CHUNK directions are the CPU backend's rule")
    keys = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.MLP(32, 4, 256, 2, key=keys[0])
    x = jax.random.normal(keys[1], (64, 32))
    labels = jax.random.randint(keys[2], (64,), 0, 4)
    dropout_key = jax.random.PRNGKey(1)

    def loss(model, x):
        h = jax.nn.relu(jax.vmap(model.layers[0])(x))
        h = jnp.where(jax.random.bernoulli(dropout_key, 0.7, h.shape), h / 0.7, 0)
        h = jax.nn.relu(jax.vmap(model.layers[1])(h))
        logits = jax.nn.log_softmax(jax.vmap(model.layers[2])(h))
        return -jnp.mean(jnp.take_along_axis(logits, labels[:, None], axis=1))

    def temporary_bytes(k):
        return _temporary_bytes(loss, model, x, k, keys[1])

    bound = temporary_bytes(4) + parameter_bytes(model) // 2
    for k in (8, 12):
        assert temporary_bytes(k) <= bound, (k, temporary_bytes(k) - bound)


@pytest.mark.parametrize("path", ["loop", "unrolled"])
def test_checks_in_the_loss_see_the_data_as_given(path):
    """With a NaN loss and 8 directions (two chunks), checks inside the loss on its
    batch and labels pass, and the estimate is NaN. Catches the chunks after a NaN
    reading the data changed (labels + 1, the batch doubled, as the chunks' order
    once made them): the checks then raised an error about the data instead."""
    keys = jax.random.split(jax.random.key(0), 2)
    layers = [eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(16, 3, key=keys[1])]
    if path == "unrolled":
        layers.insert(0, eqx.nn.Conv2d(1, 1, 3, padding=1, key=keys[0]))
    model = eqx.nn.Sequential(layers)
    x = jnp.ones((6, 1, 4, 4))
    y = jnp.arange(6) % 3

    def loss(model, x, y):
        x = eqx.error_if(x, jnp.abs(x) > 1, "batch changed")
        y = eqx.error_if(y, y > 2, "labels changed")
        logits = jax.vmap(model)(x)
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)
        return jnp.mean(picked) * jnp.nan

    estimate = eqx.filter_jit(eqx_dodge.filter_dodge(loss, key=0, num_directions=8))
    params, static = eqx.partition(model, eqx.is_array)
    primitives = _primitives(lambda p: loss(eqx.combine(p, static), x, y), params)
    assert (path == "unrolled") == ("conv_general_dilated" in primitives)
    leaves = jax.tree.leaves(eqx.filter(estimate(model, x, y), eqx.is_array))
    assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in leaves)


class _DeepConv(eqx.Module):
    """`depth` 3×3 convolutions of 8 channels at 16×16."""

    convs: tuple[eqx.nn.Conv2d, ...]

    def __init__(self, depth, key):
        keys = jax.random.split(key, depth)
        self.convs = tuple(
            eqx.nn.Conv2d(1 if i == 0 else 8, 8, 3, padding=1, key=k)
            for i, k in enumerate(keys)
        )

    def __call__(self, x):
        for conv in self.convs:
            x = jnp.tanh(conv(x))
        return x


@pytest.mark.parametrize("num_directions", [1, 4, 8])
def test_conv_memory_does_not_grow_with_depth(num_directions):
    """From 3 to 12 layers, XLA's compiled temporary memory of `filter_dodge` on a
    conv net grows by less than 4 activations (backprop's by 18; k = 1 and 4 by
    less than 2, k = 8 by 3.5, and no more at 24 layers): a forward-mode pass holds
    one layer's activations and tangents at a time. Catches XLA:CPU's default
    scheduler running the forward pass ahead of the tangents, which keeps every
    layer's activations alive (10 activations more at k = 4 and 8 when the first
    chunk evaluated at the bare parameters), and chunks that share one forward
    pass."""
    if jax.default_backend() != "cpu":
        pytest.skip("the first chunk's primal is moved for XLA:CPU's scheduler")
    x = jnp.ones((16, 1, 16, 16))
    activation = x.nbytes * 8

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    def temporary_bytes(depth):
        model = _DeepConv(depth, jax.random.key(0))
        return _temporary_bytes(loss, model, x, num_directions, jax.random.key(1))

    assert temporary_bytes(12) - temporary_bytes(3) < 4 * activation


@pytest.mark.parametrize("num_directions", [2, 4, 8])
def test_chunk_holds_its_tangents_once(num_directions):
    """On an MLP whose parameters outweigh its activations, XLA's compiled temporary
    memory with k directions is at most min(k, 4) + 1 parameter-sized buffers: one
    per tangent of a chunk, and one to spare. Catches a chunk's tangents
    materialised twice at once, for the jvp and for the weighted sum (what XLA:CPU's
    default scheduler did before the sum drew them again after the jvp: 3.4, 8.0
    and 8.1 buffers at k = 2, 4, 8)."""
    if jax.default_backend() != "cpu":
        pytest.skip("chunks of CPU_CHUNK directions are the CPU backend's rule")
    model, x = eqx.nn.MLP(256, 10, 512, 2, key=jax.random.key(0)), jnp.ones((8, 256))

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    temporary = _temporary_bytes(loss, model, x, num_directions, jax.random.key(1))
    assert temporary <= (min(num_directions, 4) + 1) * parameter_bytes(model)
