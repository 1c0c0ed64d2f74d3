"""`chunk_size`: how many of the k directions one vectorised jvp carries. Any chunk
size gives the same estimate; a small one bounds the memory of many directions on
every backend (the default on GPUs keeps all k in one `vmap`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge

from .helpers import assert_tree_allclose, parameter_bytes, without_runtime_type_checks


def make_problem():
    model = eqx.nn.MLP(5, 3, 16, 2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (12, 5))

    def loss(model, x):
        return jnp.mean(jnp.tanh(jax.vmap(model)(x)) ** 2)

    return model, x, loss


@pytest.mark.parametrize("mode", ["average", "partition"])
def test_every_chunk_size_gives_the_same_estimate(mode):
    """k = 7 in chunks of 1, 3 (a remainder chunk of 1), 7 and more than k: the
    directions of each chunk are those of the same seeds, so the estimates agree to
    rounding. Catches a chunk that skips, repeats or re-draws directions."""
    model, x, loss = make_problem()
    key = jax.random.key(2)
    sizes = (None, 1, 3, 7, 100)

    @eqx.filter_jit
    def estimates(model, x):
        return [
            eqx_dodge.filter_value_and_dodge(
                loss, key=key, num_directions=7, mode=mode, chunk_size=size
            )(model, x)
            for size in sizes
        ]

    (value, reference), *others = estimates(model, x)
    assert float(jnp.abs(jax.tree.leaves(reference)[0]).max()) > 0
    for other_value, other in others:
        np.testing.assert_allclose(other_value, value, rtol=1e-6)
        assert_tree_allclose(other, reference, atol=1e-7)


def _temporary_bytes(kind, loss, model, x, num_directions, chunk_size):
    """XLA's compiled temporary memory of one estimate by `filter_dodge` or one
    update of an optax transform, with `num_directions` in chunks of `chunk_size`."""
    options = dict(num_directions=num_directions, chunk_size=chunk_size)
    if kind == "filter_dodge":
        estimate = eqx_dodge.filter_dodge(loss, key=0, **options)
        compiled = eqx.filter_jit(estimate).lower(model, x).compile().compiled
    else:
        optimiser = {
            "dodge": lambda: eqx_dodge.dodge(key=0, **options),
            "adam_dodge": lambda: eqx_dodge.adam_dodge(1e-3, key=0, **options),
            "dodge updates": lambda: eqx_dodge.dodge(
                source="updates", key=0, **options
            ),
            "dodge ema": lambda: eqx_dodge.dodge(source="ema", key=0, **options),
        }[kind]()
        params, static = eqx.partition(model, eqx.is_inexact_array)
        state = optimiser.init(params)
        # The candidate sources explore around the incoming updates; the random
        # source takes None (optax annotates `updates` as a tree).
        candidate = jax.tree.map(jnp.ones_like, params) if " " in kind else None

        def update(params, state, x):
            value_fn = lambda p: loss(eqx.combine(p, static), x)  # noqa: E731
            return optimiser.update(
                candidate,  # pyright: ignore[reportArgumentType]
                state,
                params,
                value_fn=value_fn,
            )

        compiled = jax.jit(update).lower(params, state, x).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    return analysis.temp_size_in_bytes


@pytest.mark.parametrize(
    "kind", ["filter_dodge", "dodge", "adam_dodge", "dodge updates", "dodge ema"]
)
def test_chunk_size_bounds_the_memory_of_many_directions(kind):
    """On any backend: 32 directions in chunks of 2 need no more temporary memory
    than 2 directions plus one parameter-sized buffer (the running sum), while all
    32 in one `vmap` need several times that. Catches a `chunk_size` that is
    ignored or not passed on (the CPU default, chunks of 4, fails the bound; a
    GPU's one `vmap`, both), and a candidate's exploration directions drawn all at
    once (31 parameter buffers more). A candidate source may hold one buffer more:
    the unit candidate, which every chunk reads."""
    model = eqx.nn.MLP(64, 10, 64, 2, use_bias=False, key=jax.random.key(0))
    x = jnp.ones((32, 64))

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    parameters = parameter_bytes(model)
    two = _temporary_bytes(kind, loss, model, x, 2, 2)
    chunked = _temporary_bytes(kind, loss, model, x, 32, 2)
    whole = _temporary_bytes(kind, loss, model, x, 32, 32)
    held = 2 if " " in kind else 1
    assert chunked <= two + held * parameters
    assert whole > 3 * chunked


def test_transforms_take_the_chunk_size():
    """`dodge` (random and candidate sources) and `adam_dodge` give the same update
    in chunks as by default."""
    model, x, loss = make_problem()
    params = eqx.filter(model, eqx.is_inexact_array)
    candidate = jax.tree.map(jnp.ones_like, params)
    builders = {
        "random": lambda size: eqx_dodge.dodge(
            key=1, num_directions=6, chunk_size=size
        ),
        "updates": lambda size: eqx_dodge.dodge(
            source="updates", key=1, num_directions=6, chunk_size=size
        ),
        "adam": lambda size: eqx_dodge.adam_dodge(
            1e-2, key=1, num_directions=6, chunk_size=size
        ),
    }

    @jax.jit
    def updates(params, x):
        value_fn = lambda p: loss(eqx.combine(p, model), x)  # noqa: E731
        out = {}
        for name, build in builders.items():
            incoming = candidate if name.endswith("updates") else None
            for size in (None, 2):
                optimiser = build(size)
                state = optimiser.init(params)
                out[f"{name} {size}"] = optimiser.update(
                    incoming,  # pyright: ignore[reportArgumentType]
                    state,
                    params,
                    value_fn=value_fn,
                )[0]
        return out

    out = updates(params, x)
    for name in builders:
        assert_tree_allclose(out[f"{name} 2"], out[f"{name} None"], atol=1e-7)


def test_sharded_takes_the_chunk_size():
    model, x, loss = make_problem()
    mesh = jax.make_mesh((1,), ("data",))

    def estimate(size):
        return eqx_dodge.sharded_value_and_dodge(
            loss, mesh=mesh, key=3, num_directions=5, chunk_size=size
        )(model, x)

    (value, reference), (chunked_value, chunked) = estimate(None), estimate(2)
    np.testing.assert_allclose(chunked_value, value, rtol=1e-6)
    assert_tree_allclose(chunked, reference, atol=1e-7)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-2, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        (jnp.array(2), TypeError),
    ],
)
def test_bad_chunk_size(value, error):
    _, _, loss = make_problem()
    mesh = jax.make_mesh((1,), ("data",))
    makers = [
        lambda: eqx_dodge.filter_dodge(loss, key=0, chunk_size=value),
        lambda: eqx_dodge.filter_value_and_dodge(loss, key=0, chunk_size=value),
        lambda: eqx_dodge.sharded_value_and_dodge(
            loss, mesh=mesh, key=0, chunk_size=value
        ),
        lambda: eqx_dodge.dodge(key=0, chunk_size=value),
        lambda: eqx_dodge.dodge_updates(chunk_size=value),
        lambda: eqx_dodge.adam_dodge(1e-3, key=0, chunk_size=value),
        lambda: eqx_dodge.scale_by_adam_dodge(key=0, chunk_size=value),
    ]
    with without_runtime_type_checks():
        for make in makers:
            with pytest.raises(error, match="`chunk_size`"):
                make()


def test_large_finite_derivatives_do_not_shift_the_chunks():
    """float64 derivatives beyond float32's range (finite): every chunk size gives
    the one-chunk estimate. Catches a NaN check that summed in float32, where
    `inf − inf` raised it for finite values and the chunks after it drew other
    directions (an error of several times the gradient)."""
    with jax.enable_x64(True):
        w = {"a": jnp.ones(20), "b": jnp.ones(20)}

        def loss(w, scale):
            return scale * (jnp.sum(w["a"]) - jnp.sum(w["b"]))

        def estimate(size):
            return eqx_dodge.filter_dodge(
                loss, key=0, num_directions=8, chunk_size=size
            )(w, 1e40)

        whole = estimate(8)
        for size in (4, 2):
            chunked = estimate(size)
            for name in whole:
                np.testing.assert_allclose(
                    chunked[name] / 1e40, whole[name] / 1e40, rtol=1e-12, atol=1e-12
                )
