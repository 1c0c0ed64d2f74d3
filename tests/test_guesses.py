import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jax.flatten_util import ravel_pytree

import eqx_dodge


BATCH = 6


def _mlp(key, activation=jax.nn.relu):
    return eqx.nn.MLP(40, 4, 32, 2, activation=activation, key=key)


def _loss(model, x, y):
    logits = jax.vmap(model)(x)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def _batch(key):
    xkey, ykey = jax.random.split(key)
    return jax.random.normal(xkey, (BATCH, 40)), jax.random.randint(
        ykey, (BATCH,), 0, 4
    )


def _layer_inputs(model, x):
    """The inputs of each Linear layer of an MLP, recomputed independently."""
    inputs = [x]
    h = x
    for layer in model.layers[:-1]:
        h = jax.nn.relu(jax.vmap(layer)(h))
        inputs.append(h)
    return inputs


def _span_residual(vectors, basis):
    """Relative norm of the part of `vectors` (rows) outside the row span of
    `basis`."""
    coefficients, *_ = jnp.linalg.lstsq(basis.T, vectors.T)
    residual = vectors.T - basis.T @ coefficients
    return jnp.linalg.norm(residual) / jnp.linalg.norm(vectors)


GUESSES = [eqx_dodge.activation_guess, eqx_dodge.transpose_guess]


@pytest.mark.parametrize("guess", GUESSES)
def test_structure_shapes_dtypes(guess, getkey):
    model = _mlp(getkey())
    x, _ = _batch(getkey())
    expected = eqx.filter(model, eqx.is_inexact_array)
    for sampler in ("rademacher", "gaussian"):
        direction = guess(getkey(), model, x, sampler=sampler)
        assert jax.tree.structure(direction) == jax.tree.structure(expected)
        for leaf, target in zip(jax.tree.leaves(direction), jax.tree.leaves(expected)):
            assert leaf.shape == target.shape and leaf.dtype == target.dtype
            assert jnp.all(jnp.isfinite(leaf)) and jnp.any(leaf != 0)


@pytest.mark.parametrize("guess", GUESSES)
def test_weights_in_span_of_activations(guess, getkey):
    model = _mlp(getkey())
    x, _ = _batch(getkey())
    direction = guess(getkey(), model, x)
    for layer, inputs in zip(direction.layers, _layer_inputs(model, x)):
        # The inputs span BATCH = 6 of 40 or 32 dimensions: a non-trivial subspace.
        assert _span_residual(layer.weight, inputs) < 1e-4
    # The check can fail: a random direction lies far outside that span.
    random = eqx_dodge.random_direction(getkey(), model)
    for layer, inputs in zip(random.layers, _layer_inputs(model, x)):
        assert _span_residual(layer.weight, inputs) > 0.3


def test_activation_guess_formula(getkey):
    # For one layer the weight guess is εᵀx and the bias guess Σ_b ε_b, where ε is the
    # direction `random_direction` draws for the layer's outputs.
    layer = eqx.nn.Linear(5, 3, key=getkey())
    x = jax.random.normal(getkey(), (BATCH, 5))
    key = getkey()
    direction = eqx_dodge.activation_guess(key, layer, x)
    [noise] = eqx_dodge.random_direction(key, [jnp.zeros((BATCH, 3))])
    assert jnp.allclose(direction.weight, noise.T @ x, atol=1e-5)
    assert jnp.allclose(direction.bias, noise.sum(0), atol=1e-6)
    # With one Linear layer and no activation both guesses coincide.
    same = eqx_dodge.transpose_guess(key, layer, x)
    assert jnp.allclose(same.weight, direction.weight, atol=1e-6)


def test_transpose_guess_columns_in_span_of_next_weights(getkey):
    # With identity activations, column j of the guess of layer i is
    # W_{i+1}ᵀ Σ_b ε_b x_bj: in the (4-dimensional) span of the rows of W_{i+1}.
    model = _mlp(getkey(), activation=lambda z: z)
    x, _ = _batch(getkey())
    direction = eqx_dodge.transpose_guess(getkey(), model, x)
    hidden = direction.layers[1].weight
    following = model.layers[2].weight
    assert _span_residual(hidden.T, following) < 1e-4
    activation = eqx_dodge.activation_guess(getkey(), model, x)
    assert _span_residual(activation.layers[1].weight.T, following) > 0.3


def test_sequential_matches_mlp(getkey):
    mlp = _mlp(getkey())
    sequential = eqx.nn.Sequential(
        [
            mlp.layers[0],
            eqx.nn.Lambda(jax.nn.relu),
            mlp.layers[1],
            eqx.nn.Lambda(jax.nn.relu),
            mlp.layers[2],
        ]
    )
    x, _ = _batch(getkey())
    key = getkey()
    for guess in GUESSES:
        from_mlp = guess(key, mlp, x)
        from_sequential = guess(key, sequential, x)
        for a, b in zip(from_mlp.layers, from_sequential.layers[::2]):
            assert jnp.allclose(a.weight, b.weight, atol=1e-5)
            assert jnp.allclose(a.bias, b.bias, atol=1e-5)


def test_sequential_with_dropout(getkey):
    """A Dropout in training mode needs a key the guesses do not have: a ValueError
    names the layer and `eqx.nn.inference_mode`, and in inference mode the guess is
    the one without the Dropout. Catches equinox's bare "Dropout requires a key"."""
    mlp = _mlp(getkey())
    layers = [mlp.layers[0], eqx.nn.Lambda(jax.nn.relu), eqx.nn.Dropout(0.5)]
    sequential = eqx.nn.Sequential([*layers, mlp.layers[1], mlp.layers[2]])
    plain = eqx.nn.Sequential([*layers[:2], mlp.layers[1], mlp.layers[2]])
    x, _ = _batch(getkey())
    key = getkey()
    for guess in GUESSES:
        with pytest.raises(ValueError, match=r"layers\[2\]` is an `eqx.nn.Dropout`"):
            guess(key, sequential, x)
        from_inference = guess(key, eqx.nn.inference_mode(sequential), x)
        from_plain = guess(key, plain, x)
        inference_linears = [from_inference.layers[i] for i in (0, 3, 4)]
        plain_linears = [from_plain.layers[i] for i in (0, 2, 3)]
        for a, b in zip(inference_linears, plain_linears, strict=True):
            assert jnp.array_equal(a.weight, b.weight)
            assert jnp.array_equal(a.bias, b.bias)


def test_layer_activation_guess_matches(getkey):
    model = _mlp(getkey())
    x, _ = _batch(getkey())
    key = getkey()
    inputs = _layer_inputs(model, x)
    general = eqx_dodge.layer_activation_guess(
        key,
        model,
        [(lambda m, i=i: m.layers[i], inputs[i]) for i in range(3)],
    )
    direct = eqx_dodge.activation_guess(key, model, x)
    for a, b in zip(jax.tree.leaves(general), jax.tree.leaves(direct)):
        assert jnp.allclose(a, b, atol=1e-5)
    # Layers left out get a zero direction.
    partial = eqx_dodge.layer_activation_guess(
        key, model, [(lambda m: m.layers[2], inputs[2])]
    )
    assert jnp.all(partial.layers[0].weight == 0)
    assert jnp.any(partial.layers[2].weight != 0)


def test_errors(getkey):
    model = _mlp(getkey())
    x, _ = _batch(getkey())
    with pytest.raises(TypeError, match="layer_activation_guess"):
        eqx_dodge.activation_guess(getkey(), eqx.nn.LayerNorm(40), x)
    with pytest.raises(TypeError, match="Linear"):
        eqx_dodge.layer_activation_guess(getkey(), model, [(lambda m: m, x)])
    scanned = eqx.nn.MLP(40, 4, 32, 3, scan=True, key=getkey())
    with pytest.raises(ValueError, match="scan"):
        eqx_dodge.activation_guess(getkey(), scanned, x)
    # One example instead of a batch, or a batch of the wrong width.
    for guess in GUESSES:
        with pytest.raises(ValueError, match=r"`x` gives .* inputs of shape \(\) per"):
            guess(getkey(), model, x[0])
    linear = eqx.nn.Linear(40, 8, key=getkey())
    with pytest.raises(ValueError, match=r"`layer_inputs\[0\]` gives .*\(39,\) per"):
        eqx_dodge.layer_activation_guess(getkey(), linear, [(lambda m: m, x[:, 1:])])
    # A layer with parameters between (or before) the Linear layers: not an
    # elementwise activation, and its parameters would get no direction.
    for normed in (
        [eqx.nn.Linear(40, 8, key=getkey()), eqx.nn.LayerNorm(8)],
        [eqx.nn.LayerNorm(40), eqx.nn.Linear(40, 8, key=getkey())],
    ):
        index = 1 if isinstance(normed[1], eqx.nn.LayerNorm) else 0
        for guess in GUESSES:
            with pytest.raises(ValueError, match=rf"layers\[{index}\]` is a LayerNorm"):
                guess(getkey(), eqx.nn.Sequential(normed), x)
    # The same for an MLP's learnt activation (it would get a zero direction).
    learnt_models = {
        "activation": eqx.nn.MLP(40, 4, 32, 2, activation=eqx.nn.PReLU(), key=getkey()),
        "final_activation": eqx.nn.MLP(
            40, 4, 32, 2, final_activation=eqx.nn.PReLU(), key=getkey()
        ),
    }
    for name, learnt in learnt_models.items():
        for guess in GUESSES:
            with pytest.raises(ValueError, match=rf"`model.{name}` is a PReLU"):
                guess(getkey(), learnt, x)


def test_dodge_along_guesses_descends_and_beats_random(getkey):
    model = _mlp(getkey())
    x, y = _batch(getkey())
    gradient = eqx.filter_grad(_loss)(model, x, y)
    flat_gradient = ravel_pytree(gradient)[0]

    @jax.jit
    @jax.vmap
    def step(key):
        results = []
        for guess in GUESSES:
            direction = guess(key, model, x)
            estimate = eqx_dodge.filter_dodge(_loss, direction=direction)(model, x, y)
            flat_estimate = ravel_pytree(estimate)[0]
            flat_direction = ravel_pytree(direction)[0]
            # DODGE along any candidate c is (g·c/‖c‖²) c.
            expected = (flat_gradient @ flat_direction) / (
                flat_direction @ flat_direction
            )
            results.append(
                (
                    flat_gradient @ flat_estimate,
                    jnp.max(jnp.abs(flat_estimate - expected * flat_direction)),
                    eqx_dodge.diagnostics.cosine_similarity(estimate, gradient),
                )
            )
        random = eqx_dodge.filter_dodge(_loss, key=key)(model, x, y)
        return results, eqx_dodge.diagnostics.cosine_similarity(random, gradient)

    results, random_cosine = step(jax.random.split(getkey(), 256))
    scale = jnp.max(jnp.abs(flat_gradient))
    for inner, error, cosine in results:
        assert jnp.all(inner >= 0)
        assert jnp.max(error) < 1e-5 * scale
        # Guesses align with the gradient far better than a random direction. Random's
        # mean squared cosine is 1/p = 1/2500; the activation guess spreads over about
        # BATCH·(32 + 32 + 4) = 408 random dimensions, the transpose guess fewer.
        assert jnp.mean(cosine**2) > 3 * jnp.mean(random_cosine**2)


def test_scalar_features_and_sequential_prefix(getkey):
    # `in_size="scalar"` / `out_size="scalar"` layers have weights of shape (out, 1)
    # and (1, in); a Sequential may start with non-Linear layers.
    scalar = eqx.nn.MLP("scalar", "scalar", 5, 1, key=getkey())
    x = jax.random.normal(getkey(), (BATCH,))
    sequential = eqx.nn.Sequential(
        [eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(3, 2, key=getkey())]
    )
    z = jax.random.normal(getkey(), (BATCH, 3))
    for guess in GUESSES:
        direction = guess(getkey(), scalar, x)
        for leaf, target in zip(
            jax.tree.leaves(direction),
            jax.tree.leaves(eqx.filter(scalar, eqx.is_inexact_array)),
        ):
            assert leaf.shape == target.shape
        layer = guess(getkey(), sequential, z).layers[1]
        assert _span_residual(layer.weight, jnp.tanh(z)) < 1e-4
