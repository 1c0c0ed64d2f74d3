"""Leaves frozen inside the loss (behind `jax.lax.stop_gradient`, or unused) are dead:
no direction is drawn for them, they do not count in `p`, and their estimate is exactly
zero, in every estimator: what `eqx.filter_grad` gives, and what `eqx.partition`
freezing does."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_dodge
from eqx_dodge._directions import part_of
from eqx_dodge._live import live_mask

from .helpers import assert_tree_allclose, assert_unbiased, dodge_variance, flat


class Frozen(eqx.Module):
    """An MLP whose first layer is frozen behind `stop_gradient`, and an unused leaf:
    both dead. Only the head (12 coordinates of 36) is live."""

    body: eqx.nn.Linear
    head: eqx.nn.Linear
    unused: jax.Array

    def __init__(self, key):
        body_key, head_key = jax.random.split(key)
        self.body = eqx.nn.Linear(3, 5, key=body_key)
        self.head = eqx.nn.Linear(5, 2, key=head_key)
        self.unused = jnp.ones(4)

    def __call__(self, x):
        return self.head(jnp.tanh(jax.lax.stop_gradient(self.body)(x)))


NUM_LIVE = 12


def loss(model, x):
    return jnp.mean(jnp.square(jax.vmap(model)(x) - 0.5))


# Jitted: eagerly, each of their operations would compile on its own.
loss_grad = eqx.filter_jit(eqx.filter_grad(loss))


def online_step(model, state, x):
    state = jnp.tanh(jax.lax.stop_gradient(model.body)(x) + 0.5 * state)
    return state, jnp.mean(jnp.square(model.head(state) - 0.5))


def is_head(model):
    """The filter spec of `eqx.partition` freezing: train the head only."""
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(
        lambda m: m.head, spec, replace=jax.tree.map(lambda _: True, model.head)
    )


def with_dead_noise(tree):
    """`tree` (shaped like the estimate) plus ones on the dead leaves."""
    return eqx.tree_at(
        lambda t: (t.body.weight, t.body.bias, t.unused),
        tree,
        replace_fn=jnp.ones_like,
    )


@pytest.fixture(scope="module")
def problem():
    return Frozen(jax.random.key(0)), jax.random.normal(jax.random.key(1), (8, 3))


def test_live_mask():
    """Catches a mask that misses a stop_gradient or an unused leaf, or drops a leaf
    used in part: a leaf is live if any of its entries reaches the output."""
    tree = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2), "d": jnp.ones(2)}

    def fun(t):
        partly = jax.lax.stop_gradient(t["c"][1]) + t["c"][0]
        return jnp.sum(jax.lax.stop_gradient(t["a"]) * t["b"]) + partly

    assert live_mask(fun, tree) == (False, True, True, False)


def test_loss_the_analysis_cannot_trace_counts_every_leaf_live():
    """A `pure_callback` has no jvp: the analysis falls back to today's behaviour
    (every leaf live) instead of raising; the estimator reports the error itself. A
    `custom_vjp`, which forward mode cannot evaluate, can still be analysed."""

    def callback(t):
        shape = jax.ShapeDtypeStruct((2,), jnp.float32)
        return jnp.sum(jax.pure_callback(np.sin, shape, t["a"]))

    @jax.custom_vjp
    def total(w):
        return jnp.sum(w)

    total.defvjp(lambda w: (total(w), w), lambda w, g: (g * jnp.ones_like(w),))
    tree = {"a": jnp.ones(2), "b": jnp.ones(2)}
    frozen_b = lambda t: jnp.sum(jax.lax.stop_gradient(t["b"]))  # noqa: E731
    assert live_mask(lambda t: callback(t) + frozen_b(t), tree) == (True, True)
    assert live_mask(lambda t: total(t["a"]) + frozen_b(t), tree) == (True, False)


@jax.custom_jvp
def zero_slope(v):
    return jnp.sum(jnp.sin(v))


@zero_slope.defjvp
def _zero_slope_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return zero_slope(v), 0.0 * jnp.sum(t)  # uses the tangent, times zero


def test_leaf_dead_code_elimination_cannot_decide_keeps_todays_behaviour():
    """A custom rule that multiplies the tangent by zero leaves the leaf live: it
    gets a random direction, as before, although its gradient is zero."""
    tree = {"v": jnp.ones(2), "w": jnp.array([0.5, -1.0, 2.0])}

    def fun(t):
        return jnp.sum(t["w"] ** 2) + zero_slope(t["v"])

    assert live_mask(fun, tree) == (True, True)
    key = jax.random.key(7)
    estimate = eqx_dodge.filter_dodge(fun, key=key)(tree)
    gradient = eqx.filter_jit(eqx.filter_grad(fun))(tree)
    np.testing.assert_array_equal(gradient["v"], 0.0)
    direction = eqx.filter_jit(eqx_dodge.random_direction)(key, tree)
    along = optax.tree.vdot(gradient, direction)
    assert_tree_allclose(estimate, jax.tree.map(lambda u: along * u, direction))
    assert np.all(np.asarray(estimate["v"]) != 0)


# Training: the frozen layer stays bit-identical through every estimator.


def _batch(step):
    return jax.random.normal(jax.random.fold_in(jax.random.key(2), step), (8, 3))


def _key(step):
    return jax.random.fold_in(jax.random.key(3), step)


def _noisy_gradient(model, x):
    """A candidate with a large dead part: the gradient plus ones on dead leaves."""
    return with_dead_noise(eqx.filter_grad(loss)(model, x))


def _sgd(estimate):
    return jax.tree.map(lambda e: -0.1 * e, estimate)


def _filter(**options):
    def step(model, state, i):
        estimate = eqx_dodge.filter_dodge(loss, key=_key(i), **options)(
            model, _batch(i)
        )
        return _sgd(estimate), state

    return (lambda model: None), step


def _filter_candidate():
    def step(model, state, i):
        candidate = _noisy_gradient(model, _batch(i))
        estimate = eqx_dodge.filter_dodge(loss, direction=candidate)(model, _batch(i))
        return _sgd(estimate), state

    return (lambda model: None), step


def _optax(optimizer, candidate=False):
    def init(model):
        return optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    def step(model, state, i):
        x = _batch(i)
        updates = _noisy_gradient(model, x) if candidate else None
        return optimizer.update(updates, state, model, value_fn=lambda m: loss(m, x))

    return init, step


def _online(**options):
    online = eqx_dodge.OnlineDodge(online_step, **options)

    def init(model):
        return online.init(model, jnp.zeros(5), key=jax.random.key(4))

    def step(model, carry, i):
        window = jax.random.normal(jax.random.fold_in(jax.random.key(5), i), (6, 3))
        _, estimate, carry = online(model, carry, window)
        return _sgd(estimate), carry

    return init, step


def _sharded(**options):
    num_devices = min(2, jax.device_count())
    mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])

    def step(model, state, i):
        estimate = eqx_dodge.sharded_dodge(loss, mesh=mesh, key=_key(i), **options)(
            model, _batch(i)
        )
        return _sgd(estimate), state

    return (lambda model: None), step


TRAINING = {
    "filter_dodge": lambda: _filter(),
    "filter_dodge partition": lambda: _filter(num_directions=4, mode="partition"),
    "filter_dodge candidate": _filter_candidate,
    "dodge baseline": lambda: _optax(
        optax.chain(eqx_dodge.dodge(key=0, baseline_decay=0.99), optax.sgd(0.1))
    ),
    "dodge updates": lambda: _optax(
        optax.chain(
            eqx_dodge.dodge(source="updates", key=0, num_directions=3), optax.sgd(0.1)
        ),
        candidate=True,
    ),
    "dodge ema": lambda: _optax(
        optax.chain(
            eqx_dodge.dodge(source="ema", key=0, num_directions=3), optax.sgd(0.1)
        )
    ),
    "adam_dodge": lambda: _optax(eqx_dodge.adam_dodge(0.01, key=0, num_directions=2)),
    "adam_dodge updates": lambda: _optax(
        eqx_dodge.adam_dodge(0.01, source="updates"), candidate=True
    ),
    "OnlineDodge": lambda: _online(num_directions=3),
    "sharded_dodge partition": lambda: _sharded(num_directions=4, mode="partition"),
}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_frozen_layer_stays_bit_identical(problem, name):
    """Catches any estimator that draws directions for a dead leaf (random or
    exploration directions, partition parts) or keeps a candidate's dead part: the
    frozen layer would drift, as it did by 0.7 in 500 steps before."""
    model, _ = problem
    init, step = TRAINING[name]()
    state, step = eqx.filter_jit(init)(model), eqx.filter_jit(step)
    trained = model
    for i in range(4):
        updates, state = step(trained, state, jnp.int32(i))
        trained = eqx.apply_updates(trained, updates)
    for before, after in zip(
        jax.tree.leaves((model.body, model.unused)),
        jax.tree.leaves((trained.body, trained.unused)),
    ):
        np.testing.assert_array_equal(after, before)
    assert not np.allclose(trained.head.weight, model.head.weight)


# The estimate of the live leaves: as if the dead leaves were not there.


@pytest.mark.parametrize(
    "options",
    [
        dict(num_directions=1),
        dict(num_directions=8),
        dict(num_directions=4, mode="partition"),
    ],
)
def test_same_estimate_as_eqx_partition_freezing(problem, options):
    """The same key draws the same directions for the live leaves as when the frozen
    layer is split off with `eqx.partition`: catches directions, parts or chunks
    drawn over all the leaves."""
    model, x = problem
    key = jax.random.key(8)
    estimate = eqx_dodge.filter_dodge(loss, key=key, **options)(model, x)
    trained, frozen = eqx.partition(model, is_head(model))
    expected = eqx_dodge.filter_dodge(
        lambda t, f, x: loss(eqx.combine(t, f), x), key=key, **options
    )(trained, frozen, x)
    assert_tree_allclose(estimate.head, expected.head, rtol=1e-6, atol=0)
    for leaf in jax.tree.leaves((estimate.body, estimate.unused)):
        np.testing.assert_array_equal(leaf, 0.0)


def test_partition_with_one_part_per_live_coordinate_is_exact(problem):
    """k = p_live parts give the exact gradient: catches blocks laid over the dead
    coordinates too (then 12 parts of 36 coordinates are not exact)."""
    model, x = problem
    estimate = eqx_dodge.filter_dodge(
        loss, key=jax.random.key(9), num_directions=NUM_LIVE, mode="partition"
    )(model, x)
    assert_tree_allclose(estimate, loss_grad(model, x), atol=1e-7)
    with pytest.raises(ValueError, match="stop_gradient"):
        eqx_dodge.filter_dodge(
            loss, key=0, num_directions=NUM_LIVE + 1, mode="partition"
        )(model, x)


def test_candidate_is_projected_onto_live_leaves(problem):
    """The gradient with noise on the dead leaves is an oracle candidate: catches a
    candidate normalised over (or keeping) its dead part."""
    model, x = problem
    gradient = loss_grad(model, x)
    candidate = with_dead_noise(gradient)
    estimate = eqx_dodge.filter_dodge(loss, direction=candidate)(model, x)
    assert_tree_allclose(estimate, gradient, atol=1e-7)


@pytest.mark.parametrize("mode, num_directions", [("average", 1), ("partition", 3)])
def test_unbiased_on_live_leaves_with_p_live(problem, mode, num_directions):
    """Unbiased on the live leaves, exactly zero on the dead ones, with the variance
    of the live leaves alone (partition blocks of the 12 live coordinates)."""
    model, x = problem
    gradient = loss_grad(model, x)
    live = np.concatenate(
        [
            np.full(g.size, keep)
            for g, keep in zip(
                jax.tree.leaves(gradient), jax.tree.leaves(is_head(model)), strict=True
            )
        ]
    )

    @jax.jit
    def samples(keys):
        def one(key):
            return flat(
                eqx_dodge.filter_dodge(
                    loss, key=key, num_directions=num_directions, mode=mode
                )(model, x)
            )

        return jax.vmap(one)(keys)

    drawn = samples(jax.random.split(jax.random.key(10), 2000))
    np.testing.assert_array_equal(drawn[:, ~live], 0.0)
    live_gradient = flat(gradient)[live]
    parts = None
    if mode == "partition":
        parts = part_of(jnp.arange(NUM_LIVE), NUM_LIVE, num_directions)
    variance = dodge_variance(live_gradient, parts=parts)
    assert_unbiased(drawn[:, live], live_gradient, variance)
    np.testing.assert_allclose(jnp.var(drawn[:, live], axis=0), variance, rtol=0.2)


def test_every_leaf_dead(problem):
    """The estimate is all zeros, shaped like `eqx.filter_grad`'s, and the value is
    the loss; a partition has no coordinate to split."""
    model, x = problem

    def frozen_loss(model, x):
        return loss(jax.lax.stop_gradient(model), x)

    value, estimate = eqx_dodge.filter_value_and_dodge(
        frozen_loss, key=0, num_directions=8
    )(model, x)
    np.testing.assert_allclose(value, eqx.filter_jit(loss)(model, x), rtol=1e-6)
    zeros = eqx.filter_jit(eqx.filter_grad(frozen_loss))(model, x)
    assert_tree_allclose(estimate, zeros, atol=0)
    with pytest.raises(ValueError, match="p=0"):
        eqx_dodge.filter_dodge(frozen_loss, key=0, num_directions=2, mode="partition")(
            model, x
        )


@pytest.mark.parametrize(
    "options", [{"key": 0}, {"direction": jnp.ones(3)}], ids=["random", "candidate"]
)
def test_one_array_the_loss_does_not_use(options):
    """A model that is one array, frozen inside the loss: zeros like
    `eqx.filter_grad`'s, as for a dict holding it. Catches the candidate of a
    one-array tree restricted to its live leaves (`None`) being read as no
    candidate at all (a bare `AssertionError`)."""
    w = jnp.arange(3.0)

    def frozen_loss(w, x):
        return jnp.sum(jax.lax.stop_gradient(w) * x)

    estimate = eqx_dodge.filter_dodge(frozen_loss, **options)(w, jnp.ones(3))
    zeros = eqx.filter_grad(frozen_loss)(w, jnp.ones(3))
    np.testing.assert_array_equal(estimate, zeros)


@pytest.mark.parametrize("source", ["updates", "ema"])
def test_exploration_with_every_leaf_dead(problem, source):
    """A candidate with random exploration directions, when the loss uses none of
    the parameters (an `optax.partition` group idle this phase): zeros, as with one
    direction and as `eqx.filter_grad`. Catches the exploration directions drawn
    over an empty tree (JAX's bare "vmap wrapped function must be passed at least
    one argument" error)."""
    model, x = problem
    params = eqx.filter(model, eqx.is_inexact_array)

    def frozen_loss(params, x):
        return loss(jax.lax.stop_gradient(params), x)

    transform = eqx_dodge.dodge(source=source, key=0, num_directions=3)
    candidate = jax.tree.map(jnp.ones_like, params)
    incoming = candidate if source == "updates" else None
    estimate, _ = transform.update(
        incoming,  # pyright: ignore[reportArgumentType]
        transform.init(params),
        params,
        value_fn=frozen_loss,
        x=x,
    )
    zeros = eqx.filter_grad(frozen_loss)(params, x)
    assert_tree_allclose(estimate, zeros, atol=0)


def test_online_partition_over_live_coordinates_is_rtrl(problem):
    """`OnlineDodge` draws its directions at `init`, before it sees the loss; its
    parts are formed again over the live coordinates, so k = p_live is RTRL."""
    model, _ = problem
    window = jax.random.normal(jax.random.key(11), (3, 3))
    online = eqx_dodge.OnlineDodge(
        online_step, num_directions=NUM_LIVE, mode="partition", reduction="sum"
    )

    def window_loss(model):
        steps = lambda s, x: online_step(model, s, x)  # noqa: E731
        return jnp.sum(jax.lax.scan(steps, jnp.zeros(5), window)[1])

    # One program (eagerly, drawing the parts compiles operation by operation).
    @eqx.filter_jit
    def estimate_and_rtrl(model, key):
        carry = online.init(model, jnp.zeros(5), key=key)
        _, estimate, _ = online(model, carry, window)
        return estimate, eqx.filter_grad(window_loss)(model)

    estimate, rtrl = estimate_and_rtrl(model, jax.random.key(12))
    assert_tree_allclose(estimate, rtrl, atol=1e-7)


def test_model_parallel_partition_over_live_coordinates_is_exact():
    """Sharded over a model axis, the dead `w1` leaves the layout too: k = p_live
    global parts are exact, and `w1`'s shards get zeros."""
    side = 2 if jax.device_count() >= 4 else 1
    mesh = jax.make_mesh(
        (side, side), ("data", "model"), devices=jax.devices()[: side * side]
    )
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P()}
    # NumPy's generator: eager jax.random calls compile one program per shape.
    rng = np.random.default_rng(13)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    params = {
        "w1": normal(3, 4),
        "b1": normal(4),
        "w2": normal(4, 2),
        "b2": np.zeros(2, np.float32),
    }
    x, y = normal(8, 3), np.ones((8, 2), np.float32)

    def megatron_loss(reduce):
        def loss(p, x, y):
            hidden = jnp.tanh(x @ jax.lax.stop_gradient(p["w1"]) + p["b1"][None])
            return jnp.mean((reduce(hidden @ p["w2"]) + p["b2"][None] - y) ** 2)

        return loss

    sharded = eqx_dodge.sharded_dodge(
        megatron_loss(lambda z: jax.lax.psum(z, "model")),
        mesh=mesh,
        param_specs=specs,
        key=jax.random.key(14),
        num_directions=14,
        mode="partition",
    )
    placed = jax.tree.map(
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs
    )
    estimate = eqx.filter_jit(sharded)(placed, x, y)
    expected = jax.jit(jax.grad(megatron_loss(lambda z: z)))(params, x, y)
    assert_tree_allclose(estimate, expected, atol=1e-6)
    np.testing.assert_array_equal(estimate["w1"], 0.0)
