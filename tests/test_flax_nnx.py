import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state
from jax.flatten_util import ravel_pytree

import eqx_dodge

from .helpers import load_script


example = load_script("examples/flax_nnx.py")


def test_dodge_on_nnx_state_matches_grad_structure_and_descends():
    x, y = example.load_data()
    x, y = x[:64], y[:64]
    model = example.MLP(64, 16, 10, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss_fn = example.make_loss(graphdef)
    gradient = jax.grad(loss_fn)(params, x, y)

    @jax.jit
    def estimates(params, gradient):
        random = eqx_dodge.filter_dodge(loss_fn, key=jax.random.key(1))(params, x, y)
        oracle = eqx_dodge.filter_dodge(loss_fn, direction=gradient)(params, x, y)
        return random, oracle

    estimate, oracle = estimates(params, gradient)
    assert jax.tree.structure(estimate) == jax.tree.structure(gradient)
    assert isinstance(estimate, nnx.State)

    # The true gradient as the candidate direction gives it back exactly.
    for a, b in zip(jax.tree.leaves(oracle), jax.tree.leaves(gradient)):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6)

    # Random directions: always a descent direction, g·ĝ = (g·u)² ≥ 0.
    flat_gradient = ravel_pytree(gradient)[0]

    @jax.jit
    @jax.vmap
    def inner(key):
        estimate = eqx_dodge.filter_dodge(loss_fn, key=key)(params, x, y)
        return ravel_pytree(estimate)[0] @ flat_gradient

    assert jnp.all(inner(jax.random.split(jax.random.key(2), 64)) >= 0)


def test_training_nnx_model_with_dodge_reduces_loss():
    x, y = example.load_data()
    model = example.MLP(64, 32, 10, rngs=nnx.Rngs(0))
    graphdef, initial = nnx.split(model, nnx.Param)
    loss_fn = example.make_loss(graphdef)
    params, _ = example.train(
        model,
        x,
        y,
        key=jax.random.key(0),
        num_steps=150,
        learning_rate=example.LEARNING_RATE,
        num_directions=example.NUM_DIRECTIONS,
    )
    before = loss_fn(initial, x, y)
    after = loss_fn(params, x, y)
    assert jnp.isfinite(after) and after < 0.7 * before


class _NormedMLP(nnx.Module):
    """An NNX model with non-parameter state (BatchNorm's statistics), which
    `value_fn` must merge back in."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
        self.output = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.output(jax.nn.relu(self.norm(self.hidden(x))))


def _nnx_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _regression_data():
    x = jax.random.normal(jax.random.key(1), (64, 2))
    return x, jnp.sin(x[:, :1]) + x[:, 1:]


def test_nnx_optimizer_with_adam_dodge_trains_through_value_fn():
    # The docs' recipe (docs/flax.md): nnx.Optimizer hands value_fn the nnx.State of
    # the `wrt` parameters; value_fn merges it with the graph definition and the
    # rest of the state.
    x, y = _regression_data()
    model = _NormedMLP(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, eqx_dodge.adam_dodge(1e-2, key=0, num_directions=8), wrt=nnx.Param
    )
    received = []

    @nnx.jit
    def step(model, optimizer, x, y):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def value_fn(params, x, y):
            received.append(type(params))
            return _nnx_loss(nnx.merge(graphdef, params, rest), x, y)

        return optimizer.update(model, None, value_fn=value_fn, x=x, y=y)

    before = _nnx_loss(model, x, y)
    statistics = nnx.state(model, nnx.BatchStat)
    gradient = nnx.grad(_nnx_loss)(model, x, y)
    for _ in range(150):
        updates = step(model, optimizer, x, y)
    assert set(received) == {nnx.State}
    # The updates and nnx.grad's gradient have the same structure; the module was
    # updated in place; the batch statistics were read, never trained.
    assert jax.tree.structure(updates) == jax.tree.structure(nnx.as_pure(gradient))
    assert _nnx_loss(model, x, y) < 0.3 * before
    for a, b in zip(
        jax.tree.leaves(statistics), jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    ):
        assert jnp.array_equal(a, b)


NO_UPDATES = {
    "dodge + sgd": lambda: optax.chain(eqx_dodge.dodge(key=0), optax.sgd(1e-2)),
    "curvature_aware_dodge": lambda: eqx_dodge.curvature_aware_dodge(1e-2, key=0),
}


@pytest.mark.parametrize("name", sorted(NO_UPDATES))
def test_nnx_optimizer_without_updates(name):
    """`nnx.Optimizer.update(model, None, ...)` hands the transform an empty
    `nnx.State` for `None`. Transforms that draw their own directions read it as no
    updates (they refused it, checked against the parameters' structure) and take
    the step plain optax takes with `updates=None`; the candidate source says that
    it got none."""
    x, y = _regression_data()
    model = _NormedMLP(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def value_fn(params, x, y):
        return _nnx_loss(nnx.merge(graphdef, params, rest), x, y)

    transform = NO_UPDATES[name]()
    expected, _ = transform.update(
        None,  # pyright: ignore[reportArgumentType]  (optax types it as a tree)
        transform.init(params),
        params,
        value_fn=value_fn,
        x=x,
        y=y,
    )
    # Copies: the split state shares its variables with the model updated in place.
    initial = [np.array(leaf) for leaf in jax.tree.leaves(params)]
    optimizer = nnx.Optimizer(model, transform, wrt=nnx.Param)
    optimizer.update(model, None, value_fn=value_fn, x=x, y=y)
    after = nnx.state(model, nnx.Param)
    for before, update, now in zip(
        initial, jax.tree.leaves(expected), jax.tree.leaves(after), strict=True
    ):
        np.testing.assert_allclose(now, before + update, rtol=1e-6, atol=1e-7)
    assert any(jnp.any(u != 0) for u in jax.tree.leaves(expected))

    candidate = nnx.Optimizer(model, eqx_dodge.dodge(source="updates"), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"got none \(`updates=None` or a tree"):
        candidate.update(model, None, value_fn=value_fn, x=x, y=y)


def test_nnx_optimizer_value_fn_written_for_the_module_gets_a_note():
    """A `value_fn` written for the module, as for `nnx.grad`, fails on the
    `nnx.State` the transform hands it; the error says so and how to rebuild the
    module (it was a bare "'State' object is not callable")."""
    x, y = _regression_data()
    model = _NormedMLP(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, eqx_dodge.adam_dodge(1e-2, key=0), wrt=nnx.Param)
    with pytest.raises(TypeError, match="not callable") as caught:
        optimizer.update(model, None, value_fn=_nnx_loss, x=x, y=y)
    assert any("nnx.merge(graphdef, state" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("num_directions", [1, 8])
def test_nnx_batchnorm_in_training_mode_with_split_states(num_directions):
    """BatchNorm in training mode updates its statistics inside the loss. With the
    states of `nnx.split` (Variables) passed to `filter_value_and_dodge`, each of
    the estimator's traces of the loss must get Variables of its own: NNX refuses
    to mutate a Variable from another trace (`TraceContextError`, raised before
    this was handled, for every `num_directions`). The statistics returned as aux
    are the ones one training-mode forward pass gives."""
    x, y = _regression_data()
    model = _NormedMLP(rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def loss(params, stats, x, y):
        model = nnx.merge(graphdef, params, stats, rest)
        return _nnx_loss(model, x, y), nnx.state(model, nnx.BatchStat)

    initial = [jnp.array(leaf) for leaf in jax.tree.leaves(stats)]
    estimator = eqx_dodge.filter_value_and_dodge(
        loss, key=0, num_directions=num_directions, has_aux=True
    )
    (value, new_stats), estimate = jax.jit(estimator.__call__)(params, stats, x, y)
    # Outside a trace, the loss mutates `stats` in place, as NNX does.
    expected_value, expected_stats = loss(params, stats, x, y)
    assert jnp.allclose(value, expected_value)
    assert jax.tree.structure(estimate) == jax.tree.structure(params)
    for new, expected, old in zip(
        jax.tree.leaves(new_stats),
        jax.tree.leaves(expected_stats),
        initial,
    ):
        assert jnp.allclose(new, expected) and not jnp.allclose(new, old)


def test_closed_over_batch_statistics_get_an_error_that_says_what_to_do():
    """The same loss closing over the statistics' Variables (made in `nnx.jit`'s
    trace, mutated in the transform's): NNX's own error, with a note saying to pass
    them as an argument."""
    x, y = _regression_data()
    model = _NormedMLP(rngs=nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, eqx_dodge.adam_dodge(1e-2, key=0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        graphdef, _, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

        def value_fn(params, x, y):
            return _nnx_loss(nnx.merge(graphdef, params, stats, rest), x, y)

        optimizer.update(model, None, value_fn=value_fn, x=x, y=y)

    with pytest.raises(flax.errors.TraceContextError) as raised:
        step(model, optimizer, x, y)
    assert "as an argument of the loss" in "".join(raised.value.__notes__)


def _mutates_a_foreign_variable(params, x, y):
    # What NNX raises when a loss mutates a Variable made in another trace.
    raise flax.errors.TraceContextError(
        "Cannot mutate BatchStat from a different trace"
    )


def _through_dodge_transform(params, x, y):
    transform = eqx_dodge.dodge(key=0)
    state = transform.init(params)
    # `dodge(key=...)` reads the loss, not the updates: any of their shape will do.
    return transform.update(
        params, state, params, value_fn=_mutates_a_foreign_variable, x=x, y=y
    )


CALLS_OF_THE_LOSS = {
    "filter_dodge": lambda p, x, y: eqx_dodge.filter_dodge(
        _mutates_a_foreign_variable, key=0
    )(p, x, y),
    "sharded_dodge": lambda p, x, y: eqx_dodge.sharded_dodge(
        _mutates_a_foreign_variable, mesh=jax.make_mesh((1,), ("data",)), key=0
    )(p, x, y),
    "activity_dodge": lambda p, x, y: eqx_dodge.activity_dodge(
        _mutates_a_foreign_variable, key=0
    )(p, x, y),
    "dodge": _through_dodge_transform,
}


@pytest.mark.parametrize("name", list(CALLS_OF_THE_LOSS))
def test_every_estimator_notes_a_closed_over_variable(name):
    """Every estimator that calls the user's loss with its other arguments closed
    over adds the note to NNX's error (catches an entry point that calls the loss
    its own way)."""
    params = {"w": jnp.ones(3)}
    x, y = jnp.ones((4, 3)), jnp.ones(4)
    with pytest.raises(flax.errors.TraceContextError) as raised:
        CALLS_OF_THE_LOSS[name](params, x, y)
    assert "as an argument of the loss" in "".join(raised.value.__notes__)


def test_nnx_parameter_state_estimate_has_nnx_grad_structure():
    x, y = _regression_data()
    model = _NormedMLP(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def params_loss(params, x, y):
        return _nnx_loss(nnx.merge(graphdef, params, rest), x, y)

    gradient = nnx.grad(_nnx_loss)(model, x, y)
    value, estimate = eqx_dodge.filter_value_and_dodge(
        params_loss, key=jax.random.key(0), num_directions=4
    )(params, x, y)
    assert isinstance(estimate, nnx.State)
    assert jax.tree.structure(estimate) == jax.tree.structure(gradient)
    assert jnp.allclose(value, _nnx_loss(model, x, y))
    # Partition with k = p is the exact gradient: the merge loses nothing.
    exact = eqx_dodge.filter_dodge(
        params_loss,
        key=jax.random.key(0),
        num_directions=ravel_pytree(params)[0].size,
        mode="partition",
    )(params, x, y)
    for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(gradient)):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6)


class _LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(1)(jax.nn.relu(linen.Dense(16)(x)))


def _linen_loss(params, apply_fn, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


def _linen_state(tx):
    x, _ = _regression_data()
    model = _LinenMLP()
    return train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=tx
    )


def test_linen_train_state_apply_gradients_takes_the_estimate():
    x, y = _regression_data()
    state = _linen_state(optax.adam(1e-2))
    gradient = jax.grad(_linen_loss)(state.params, state.apply_fn, x, y)

    @jax.jit
    def train_step(state, key):
        value, estimate = eqx_dodge.filter_value_and_dodge(
            _linen_loss, key=key, num_directions=8
        )(state.params, state.apply_fn, x, y)
        return state.apply_gradients(grads=estimate), estimate

    before = _linen_loss(state.params, state.apply_fn, x, y)
    # optax.adam is not clean under the suite's strict dtype promotion.
    with jax.numpy_dtype_promotion("standard"):
        for key in jax.random.split(jax.random.key(1), 150):
            state, estimate = train_step(state, key)
    assert jax.tree.structure(estimate) == jax.tree.structure(gradient)
    assert int(state.step) == 150
    assert _linen_loss(state.params, state.apply_fn, x, y) < 0.3 * before


def test_linen_train_state_with_adam_dodge_by_hand():
    x, y = _regression_data()
    state = _linen_state(eqx_dodge.adam_dodge(1e-2, key=0, num_directions=8))

    @jax.jit
    def dodge_step(state):
        updates, opt_state = state.tx.update(
            None,
            state.opt_state,
            state.params,
            value_fn=_linen_loss,
            apply_fn=state.apply_fn,
            x=x,
            y=y,
        )
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new_state, updates

    before = _linen_loss(state.params, state.apply_fn, x, y)
    for _ in range(150):
        state, updates = dodge_step(state)
    gradient = jax.grad(_linen_loss)(state.params, state.apply_fn, x, y)
    assert jax.tree.structure(updates) == jax.tree.structure(gradient)
    # The state records the loss of the last update's parameters.
    last = optax.tree.get(state.opt_state, "value")
    assert jnp.isfinite(last) and last < 0.3 * before
    assert _linen_loss(state.params, state.apply_fn, x, y) < 0.3 * before
