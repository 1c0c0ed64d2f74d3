"""`dodge_activity`: the activity estimator as an optax transformation. The
estimator's statistics are tested in test_activity.py; these tests check the
transform around it: the key it uses, how the batch reaches the per-example loss,
the record in its state, and training in a jitted loop."""

# optax types `updates`, `params` and states as array trees; these tests pass `None`
# updates and whole models and read the state's fields, as users of the transforms do.
# pyright: reportArgumentType=false, reportAttributeAccessIssue=false
# pyright: reportIndexIssue=false

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_dodge


def example_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def problem(num_examples=32):
    model = eqx.nn.MLP(4, 3, 16, 1, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (num_examples, 4))
    y = jnp.argmax(x[:, :3], axis=1)  # learnable: the largest of three inputs
    return model, x, y


def test_update_is_the_estimator_with_the_steps_key():
    """Catches a key reused across steps or not split as the state says, and a
    batch argument given to the wrong parameter of `value_fn` (passed here in
    another order than `value_fn` names them)."""
    model, x, y = problem()
    optim = eqx_dodge.dodge_activity(key=3, num_directions=2, separate_layers=True)
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    updates, new_state = optim.update(
        None, state, model, value_fn=example_loss, y=y, x=x
    )
    next_key, step_key = jax.random.split(jax.random.key(3))
    value, expected = eqx_dodge.activity_value_and_dodge(
        example_loss, key=step_key, num_directions=2, separate_layers=True
    )(model, x, y)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    assert new_state.value == value
    np.testing.assert_array_equal(new_state.key, jax.random.key_data(next_key))
    assert int(new_state.count) == 1
    _, second = optim.update(None, new_state, model, value_fn=example_loss, x=x, y=y)
    assert not np.array_equal(second.key, new_state.key)


def test_trains_in_a_jitted_scan_chained_with_adam():
    """Catches a transform that does not jit, scan or chain, or whose estimate
    does not descend: 300 Adam steps take the training loss well below chance."""
    model, x, y = problem(128)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.chain(eqx_dodge.dodge_activity(key=0), optax.adam(1e-2))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            model = eqx.combine(params, static)
            updates, state = optim.update(
                None, state, model, value_fn=example_loss, x=x, y=y
            )
            return (optax.apply_updates(params, updates), state), state[0].value

        (params, _), values = jax.lax.scan(
            step, (params, optim.init(params)), length=300
        )
        return values

    with jax.numpy_dtype_promotion("standard"):  # optax.scale_by_adam needs it
        values = train(params)
    assert float(values[0]) > 0.9  # about log 3 at initialisation
    assert float(jnp.mean(values[-20:])) < 0.5


def test_aux_is_stacked_and_non_finite_steps_are_skipped():
    """Catches the examples' `aux` not stacked as `aux_init` declares, and a
    non-finite loss passed on instead of skipped and counted."""
    model, x, y = problem(8)

    def with_logits(model, x, y):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits

    optim = eqx_dodge.dodge_activity(
        key=0, has_aux=True, aux_init=jnp.zeros((8, 3), jnp.float32)
    )
    state = optim.init(model)
    _, state = optim.update(None, state, model, value_fn=with_logits, x=x, y=y)
    np.testing.assert_allclose(state.aux, jax.vmap(model)(x), rtol=1e-6)
    bad = x.at[0, 0].set(jnp.nan)
    updates, skipped = optim.update(
        None, state, model, value_fn=with_logits, x=bad, y=y
    )
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(updates))
    assert int(skipped.notfinite_count) == 1 and int(skipped.total_notfinite) == 1


def test_errors_say_what_to_pass():
    model, x, y = problem(4)
    optim = eqx_dodge.dodge_activity(key=0)
    state = optim.init(model)
    with pytest.raises(TypeError, match="got no batch"):
        optim.update(None, state, model, value_fn=lambda m: example_loss(m, x, y))
    with pytest.raises(ValueError, match="ONE example"):
        optim.update(None, state, model, x=x, y=y)
    with pytest.raises(ValueError, match="num_directions"):
        eqx_dodge.dodge_activity(key=0, num_directions=0)
    with pytest.raises(TypeError, match="separate_layers"):
        eqx_dodge.dodge_activity(key=0, separate_layers=1)  # pyright: ignore


def test_filtered_mlp_as_params_is_pointed_to_the_model():
    """`eqx.nn.MLP` filtered to its arrays has no activation to call, and its wrapped
    layers cannot be combined back into it: the error's note says to pass the model
    itself (from which the estimate is then taken), not to `eqx.combine`."""
    model, x, y = problem(4)
    params = eqx.filter(model, eqx.is_inexact_array)
    optim = eqx_dodge.dodge_activity(key=0)
    state = optim.init(params)

    def combining_loss(p, x, y):
        return example_loss(eqx.combine(p, model), x, y)

    for value_fn in (example_loss, combining_loss):
        with pytest.raises(Exception) as caught:
            optim.update(None, state, params, value_fn=value_fn, x=x, y=y)
        notes = "\n".join(getattr(caught.value, "__notes__", []))
        assert "Pass the model itself as `params`" in notes
        assert "eqx.combine(p, model)" not in notes
    estimate, _ = optim.update(None, state, model, value_fn=example_loss, x=x, y=y)
    assert jax.tree.structure(estimate) == jax.tree.structure(params)
