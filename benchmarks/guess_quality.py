"""How good are DODGE's directions? Cosine similarity with the true gradient and
training accuracy, for random directions, gradient guesses and the oracle.

Models: MLPs with ReLU on scikit-learn's `load_digits` (1797 real 8×8 digits, 64
inputs, 10 classes): the "digits" MLP 64-64-10 and a wider, deeper 64-128-128-10.

Methods (all through `eqx_dodge.filter_value_and_dodge`):

- `rademacher-k1`, `rademacher-k16`, `gaussian-k1`, `gaussian-k16`: random directions,
    k averaged (DODGE eq 9);
- `partition-k16`: one Rademacher direction split into 16 parts (DODGE eq 10);
- `orthogonal-k16`: 16 exactly orthogonal ±1 directions (`sampler="orthogonal"`,
    stochastic subspace descent), averaged;
- `activation`: `eqx_dodge.activation_guess` as the candidate direction;
- `transpose`: `eqx_dodge.transpose_guess` (the W-transpose guess);
- `oracle`: the true gradient as the candidate, which is exactly backpropagation;
- `rademacher-k1 curvature`, `activation curvature`, `transpose curvature`:
    `eqx_dodge.curvature_aware_dodge` (CARS's Newton step along the direction, from
    one nested jvp, with its safeguard) along the directions of the method named
    first, on the same minibatches, damped by a factor (`optax.scale` after it) from
    a small grid; its fallback is that method's plain step at its best learning
    rate.

Measured:

1. cosine similarity between each estimate and the true minibatch gradient, over many
    keys, at initialisation and after training with backpropagation;
2. cosine similarity against the hidden width of a one-hidden-layer MLP (the claim of
    Singhal et al. 2023: random directions fall like 1/√p, guesses much less);
3. training-set accuracy after a fixed number of plain SGD updates, with the best
    learning rate of a grid per method (curvature-aware rows: the fraction of
    accepted Newton steps and the median curvature along the unit direction too);
4. the cost of a `curvature_aware_dodge` update against a `dodge_random` update
    (one jvp), with and without the safeguard's trial forward pass.

Learning rates: the estimate from random directions has E‖ĝ‖² ≈ (p/k)‖g‖², while a
unit candidate direction û gives ‖ĝ‖ = |g·û| ≤ ‖g‖; so the grid is `base × k/p` for
random directions and `base` for candidates, with the same `base` values for all.

Run: `python benchmarks/guess_quality.py [--quick] [--out DIR]`.
"""

import functools as ft
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PRNGKeyArray

import eqx_dodge


METHODS: dict[str, dict] = {
    "rademacher-k1": dict(kind="random", sampler="rademacher", k=1, mode="average"),
    "rademacher-k16": dict(kind="random", sampler="rademacher", k=16, mode="average"),
    "gaussian-k1": dict(kind="random", sampler="gaussian", k=1, mode="average"),
    "gaussian-k16": dict(kind="random", sampler="gaussian", k=16, mode="average"),
    "partition-k16": dict(kind="random", sampler="rademacher", k=16, mode="partition"),
    "orthogonal-k16": dict(kind="random", sampler="orthogonal", k=16, mode="average"),
    "activation": dict(kind="guess", guess=eqx_dodge.activation_guess),
    "transpose": dict(kind="guess", guess=eqx_dodge.transpose_guess),
    "oracle": dict(kind="oracle"),
}
# Curvature-aware rows, each along the directions of the plain method it names.
CURVATURE_METHODS: dict[str, str] = {
    "rademacher-k1 curvature": "rademacher-k1",
    "activation curvature": "activation",
    "transpose curvature": "transpose",
}

FULL: dict[str, Any] = dict(
    models={"digits 64-64-10": (64, 1), "wide 64-128-128-10": (128, 2)},
    batch_size=64,
    cosine_keys=256,
    widths=[16, 64, 256, 1024],
    width_depth=2,
    width_keys=64,
    num_steps=400,
    backprop_steps=200,
    base_learning_rates=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
    newton_dampings=[0.1, 0.3, 1.0],
    num_seeds=2,
)
QUICK: dict[str, Any] = dict(
    models={"digits 64-16-10": (16, 1)},
    batch_size=32,
    cosine_keys=16,
    widths=[8],
    width_depth=2,
    width_keys=8,
    num_steps=10,
    backprop_steps=0,
    base_learning_rates=[0.3, 3.0],
    newton_dampings=[0.3, 1.0],
    num_seeds=2,
)
WIDTH_METHODS = ("rademacher-k1", "activation", "transpose")


def load_data() -> tuple[Array, Array]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, dtype=jnp.float32)  # pyright: ignore
    y = jnp.asarray(digits.target, dtype=jnp.int32)  # pyright: ignore
    return x, y


def loss_fn(model, x: Array, y: Array) -> Array:
    logits = jax.vmap(model)(x)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def accuracy(model, x: Array, y: Array) -> Array:
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=1) == y)


def value_and_estimate(name: str, key: PRNGKeyArray, model, x: Array, y: Array):
    method = METHODS[name]
    if method["kind"] == "random":
        return eqx_dodge.filter_value_and_dodge(
            loss_fn,
            key=key,
            num_directions=method["k"],
            sampler=method["sampler"],
            mode=method["mode"],
        )(model, x, y)
    if method["kind"] == "guess":
        direction = method["guess"](key, model, x)
    else:
        direction = eqx.filter_grad(loss_fn)(model, x, y)
    return eqx_dodge.filter_value_and_dodge(loss_fn, direction=direction)(model, x, y)


def learning_rate_scale(name: str, model) -> float:
    method = METHODS[name]
    if method["kind"] != "random":
        return 1.0
    p = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    return method["k"] / p


def cosines(
    names: tuple[str, ...],
    model,
    x: Array,
    y: Array,
    keys: PRNGKeyArray,
    with_curvature: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """For each method of `names` (compiled together) and each key: the cosine
    similarity between the estimate and the true gradient and, with
    `with_curvature`, the best-step gain of the estimate.

    The best-step gain compares the loss decrease of the best step along the
    estimate's direction `e`, on the local quadratic model, `(g·e)² / (2 eᵀHe)`, with
    that of the best step along the gradient, `‖g‖⁴ / (2 gᵀHg)`; the oracle scores 1.
    A direction can have a high cosine and a low gain when the loss is strongly
    curved along it (H is the Hessian of the batch loss, from forward-over-reverse
    Hessian-vector products).
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def batch_loss(params):
        return loss_fn(eqx.combine(params, static), x, y)

    def curvature(direction):
        hvp = jax.jvp(jax.grad(batch_loss), (params,), (direction,))[1]
        return sum(
            jnp.vdot(a, b)
            for a, b in zip(jax.tree.leaves(hvp), jax.tree.leaves(direction))
        )

    def squared_norm(tree):
        return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree))

    @eqx.filter_jit
    def run(model, keys):
        gradient = eqx.filter_grad(loss_fn)(model, x, y)
        reference = squared_norm(gradient) ** 2 / curvature(gradient)

        def one(name, key):
            _, estimate = value_and_estimate(name, key, model, x, y)
            out: dict[str, Any] = {
                "cosine": eqx_dodge.diagnostics.cosine_similarity(estimate, gradient)
            }
            if with_curvature:
                inner = sum(
                    jnp.vdot(a, b)
                    for a, b in zip(
                        jax.tree.leaves(estimate), jax.tree.leaves(gradient)
                    )
                )
                out["best_step_gain"] = inner**2 / curvature(estimate) / reference
            return out

        return {name: jax.vmap(ft.partial(one, name))(keys) for name in names}

    return {
        name: {k: np.asarray(v) for k, v in values.items()}
        for name, values in run(model, keys).items()
    }


def summarise(values: dict[str, np.ndarray]) -> dict:
    cosine = values["cosine"]
    magnitudes = np.abs(cosine)
    summary = {
        "median_abs_cosine": float(np.median(magnitudes)),
        "iqr_abs_cosine": [
            float(np.quantile(magnitudes, 0.25)),
            float(np.quantile(magnitudes, 0.75)),
        ],
        "mean_squared_cosine": float(np.mean(cosine**2)),
        "min_cosine": float(np.min(cosine)),
    }
    if "best_step_gain" in values:
        gain = values["best_step_gain"]
        summary["median_best_step_gain"] = float(np.median(gain))
        summary["mean_best_step_gain"] = float(np.mean(gain))
    return summary


def train_sgd(
    estimate: Callable,
    model,
    x: Array,
    y: Array,
    learning_rates: Array,
    seeds: Array,
    num_steps: int,
    batch_size: int,
):
    """Plain SGD with `estimate(key, model, xb, yb) -> (loss, grads)`, vmapped over
    learning rates and seeds; returns the final full-data loss and accuracy."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def one_run(learning_rate, seed):
        def step(params, key):
            batch_key, direction_key = jax.random.split(key)
            index = jax.random.randint(batch_key, (batch_size,), 0, x.shape[0])
            current = eqx.combine(params, static)
            loss, grads = estimate(direction_key, current, x[index], y[index])
            params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
            return params, loss

        keys = jax.random.split(jax.random.key(seed), num_steps)
        final, _ = jax.lax.scan(step, params, keys)
        trained = eqx.combine(final, static)
        return loss_fn(trained, x, y), accuracy(trained, x, y), final

    per_seed = jax.vmap(one_run, in_axes=(None, 0))
    return eqx.filter_jit(jax.vmap(per_seed, in_axes=(0, None)))(learning_rates, seeds)


def _curvature_state(state: Any) -> eqx_dodge.CurvatureAwareDodgeState:
    """The `curvature_aware_dodge` state in the chain's state."""
    return state[0]


def train_curvature(
    base: str,
    model,
    x: Array,
    y: Array,
    learning_rate: float,
    dampings: Array,
    seeds: Array,
    num_steps: int,
    batch_size: int,
):
    """`eqx_dodge.curvature_aware_dodge` along the directions of the plain method
    `base` (k = 1), on the minibatches and guesses `train_sgd` draws from the same
    seeds, vmapped over dampings and seeds. Its update is scaled by the damping
    (`optax.scale` after it); the plain fallback step keeps learning rate
    `learning_rate`. Returns the final full-data loss and accuracy, the number of
    accepted Newton steps and the median curvature along the unit direction."""
    method = METHODS[base]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    random = method["kind"] == "random"

    def one_run(damping, seed):
        key = jax.random.key(seed)
        optimizer = optax.chain(
            eqx_dodge.curvature_aware_dodge(
                learning_rate / damping,
                key=jax.random.fold_in(key, 1) if random else None,
                sampler=method.get("sampler", "rademacher"),
            ),
            optax.scale(damping),
        )

        def step(carry, key):
            params, state = carry
            batch_key, direction_key = jax.random.split(key)
            index = jax.random.randint(batch_key, (batch_size,), 0, x.shape[0])
            current = eqx.combine(params, static)
            xb, yb = x[index], y[index]
            guess = None if random else method["guess"](direction_key, current, xb)
            updates, state = optimizer.update(
                guess,  # pyright: ignore[reportArgumentType]
                state,
                params,
                value_fn=lambda p: loss_fn(eqx.combine(p, static), xb, yb),
            )
            curvature = _curvature_state(state).curvature
            return (eqx.apply_updates(params, updates), state), curvature

        keys = jax.random.split(key, num_steps)
        carry = (params, optimizer.init(params))
        (final, state), curvatures = jax.lax.scan(step, carry, keys)
        trained = eqx.combine(final, static)
        return (
            loss_fn(trained, x, y),
            accuracy(trained, x, y),
            _curvature_state(state).accepted,
            jnp.median(curvatures),
        )

    per_seed = jax.vmap(one_run, in_axes=(None, 0))
    return eqx.filter_jit(jax.vmap(per_seed, in_axes=(0, None)))(dampings, seeds)


def curvature_cost(model, x: Array, y: Array) -> dict:
    """Seconds per update (jitted, interleaved) of `dodge_random` (one jvp) and of
    `curvature_aware_dodge` without and with the safeguard's trial forward pass
    (`trial=False`: the nested jvp alone), and their ratios to the first."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def value_fn(p):
        return loss_fn(eqx.combine(p, static), x, y)

    optimizers = {
        "dodge_random": eqx_dodge.dodge_random(0),
        "curvature_aware_no_trial": eqx_dodge.curvature_aware_dodge(
            0.0, key=0, trial=False
        ),
        "curvature_aware": eqx_dodge.curvature_aware_dodge(0.0, key=0),
    }

    def timed(optimizer):
        state = optimizer.init(params)
        update = jax.jit(lambda p, s: optimizer.update(None, s, p, value_fn=value_fn))
        return lambda: update(params, state)

    times = _common.time_interleaved(
        {name: timed(o) for name, o in optimizers.items()}, repeats=5, min_time=0.05
    )
    result: dict = {name: _common.summarize(t) for name, t in times.items()}
    for name in ("curvature_aware_no_trial", "curvature_aware"):
        ratios = _common.ratio_samples(times[name], times["dodge_random"])
        result[f"{name}_over_dodge_random"] = _common.summarize(ratios)
    return result


def finite_or_none(values):
    """Nested lists of floats with diverged (non-finite) entries as `None` (JSON has
    no infinity)."""
    array = np.asarray(values, np.float64)
    if array.ndim == 0:
        return float(array) if np.isfinite(array) else None
    return [finite_or_none(row) for row in array]


def best_of_grid(losses: Any, accuracies: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Final losses and accuracies `[grid point, seed]` as NumPy arrays, and the grid
    point with the lowest median final loss. Losses in float64, NaN as infinity, so
    that medians of diverged (huge) losses neither overflow nor win."""
    losses = np.nan_to_num(np.asarray(losses, np.float64), nan=np.inf)
    accuracies = np.asarray(accuracies)
    return losses, accuracies, int(np.argmin(np.median(losses, axis=1)))


def best_summary(losses: np.ndarray, accuracies: np.ndarray, best: int) -> dict:
    """The record's summary fields at the best grid point."""
    return {
        "train_accuracy_median": float(np.median(accuracies[best])),
        "train_accuracy_spread": [
            float(np.min(accuracies[best])),
            float(np.max(accuracies[best])),
        ],
        "final_loss_median": finite_or_none(np.median(losses[best])),
    }


def trained_by_backprop(config: dict[str, Any], model, data: tuple[Array, Array]):
    """`model` after `config["backprop_steps"]` SGD steps of backprop (to measure
    the cosines mid-training), or `None` where the config has none."""
    if not config["backprop_steps"]:
        return None
    _, _, trained_params = train_sgd(
        lambda k, m, a, b: value_and_estimate("oracle", k, m, a, b),
        model,
        *data,
        jnp.asarray([0.3], jnp.float32),
        jnp.arange(1),
        config["backprop_steps"],
        config["batch_size"],
    )
    trained_params = jax.tree.map(lambda leaf: leaf[0, 0], trained_params)
    return eqx.combine(trained_params, eqx.partition(model, eqx.is_inexact_array)[1])


def plain_rows(
    config: dict[str, Any],
    names: tuple[str, ...],
    model_name: str,
    model,
    data: tuple[Array, Array],
    batch: tuple[Array, Array],
) -> dict[str, dict]:
    """Each plain method's cosines (at initialisation and after backprop training)
    and its SGD runs over the grid of learning rates and seeds."""
    cosine_keys = jax.random.split(jax.random.key(1), config["cosine_keys"])
    learning_rates = jnp.asarray(config["base_learning_rates"], jnp.float32)
    at_init = cosines(names, model, *batch, cosine_keys, with_curvature=True)
    trained = trained_by_backprop(config, model, data)
    after = (
        None
        if trained is None
        else cosines(names, trained, *batch, cosine_keys, with_curvature=True)
    )
    rows = {}
    for name in names:
        print(f"[{model_name}] {name}", flush=True)
        scale = learning_rate_scale(name, model)
        losses, accuracies, _ = train_sgd(
            lambda k, m, a, b, name=name: value_and_estimate(name, k, m, a, b),
            model,
            *data,
            learning_rates * scale,
            jnp.arange(config["num_seeds"]),
            config["num_steps"],
            config["batch_size"],
        )
        losses, accuracies, best = best_of_grid(losses, accuracies)
        rows[name] = {
            "cosine_at_init": summarise(at_init[name]),
            "cosine_after_backprop_training": (
                None if after is None else summarise(after[name])
            ),
            "learning_rate_scale": scale,
            "best_learning_rate": float(learning_rates[best]) * scale,
            "final_loss_per_learning_rate_and_seed": finite_or_none(losses),
            "train_accuracy_per_learning_rate_and_seed": accuracies.tolist(),
            **best_summary(losses, accuracies, best),
        }
    return rows


def curvature_rows(
    config: dict[str, Any],
    names: tuple[str, ...],
    model_name: str,
    model,
    data: tuple[Array, Array],
    plain: dict[str, dict],
) -> dict[str, dict]:
    """Each curvature-aware method's runs over the grid of dampings and seeds, its
    fallback step the `plain` row of its base method's best learning rate."""
    rows = {}
    for name in names:
        print(f"[{model_name}] {name}", flush=True)
        base = CURVATURE_METHODS[name]
        scale = learning_rate_scale(base, model)
        # The fallback step is the plain method's at its best learning rate (the
        # smallest of the grid when the plain method was not run).
        smallest = float(jnp.float32(config["base_learning_rates"][0]))
        fallback = plain.get(base, {}).get("best_learning_rate", smallest * scale)
        dampings = jnp.asarray(config["newton_dampings"], jnp.float32)
        losses, accuracies, accepted, curvatures = train_curvature(
            base,
            model,
            *data,
            fallback,
            dampings,
            jnp.arange(config["num_seeds"]),
            config["num_steps"],
            config["batch_size"],
        )
        losses, accuracies, best = best_of_grid(losses, accuracies)
        rows[name] = {
            "cosine_at_init": None,
            "cosine_after_backprop_training": None,
            "base_method": base,
            "learning_rate_scale": scale,
            "best_learning_rate": fallback,
            "best_newton_damping": float(dampings[best]),
            "final_loss_per_damping_and_seed": finite_or_none(losses),
            "train_accuracy_per_damping_and_seed": accuracies.tolist(),
            **best_summary(losses, accuracies, best),
            "accepted_fraction_per_seed": (
                np.asarray(accepted[best]) / config["num_steps"]
            ).tolist(),
            "median_unit_curvature_per_seed": finite_or_none(curvatures[best]),
        }
    return rows


def width_sweep(config: dict[str, Any], batch: tuple[Array, Array]) -> dict:
    """The cosines of `WIDTH_METHODS` at initialisation, per hidden width."""
    sweep = {}
    for width in config["widths"]:
        model = eqx.nn.MLP(
            64, 10, width, config["width_depth"], key=jax.random.key(width)
        )
        p = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
        keys = jax.random.split(jax.random.key(2), config["width_keys"])
        row: dict = {"num_parameters": p}
        for name, values in cosines(WIDTH_METHODS, model, *batch, keys).items():
            row[name] = summarise(values)
        summary = ", ".join(
            f"{n}={row[n]['median_abs_cosine']:.4f}" for n in WIDTH_METHODS
        )
        print(f"[width {width}] p={p} {summary}", flush=True)
        sweep[str(width)] = row
    return sweep


def untimed_results(
    config: dict[str, Any],
    methods: tuple[str, ...],
    models: dict[str, eqx.nn.MLP],
    data: tuple[Array, Array],
    batch: tuple[Array, Array],
) -> dict:
    """Every result but the cost of the curvature-aware update: the cosines and
    training runs of `methods` on each of `models`, and the width sweep."""
    plain_methods = tuple(name for name in methods if name in METHODS)
    curvature_methods = tuple(name for name in methods if name in CURVATURE_METHODS)
    started = time.perf_counter()
    results: dict = {"models": {}}
    for model_name, model in models.items():
        p = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
        plain = plain_rows(config, plain_methods, model_name, model, data, batch)
        curvature = curvature_rows(
            config, curvature_methods, model_name, model, data, plain
        )
        results["models"][model_name] = {
            "num_parameters": p,
            "one_over_sqrt_p": 1 / math.sqrt(p),
            "methods": plain | curvature,
        }
    results["width_sweep"] = width_sweep(config, batch)
    return results | {"seconds": time.perf_counter() - started}


def main(
    quick: bool = False,
    out_dir: pathlib.Path = _common.RESULTS,
    methods: tuple[str, ...] = tuple(METHODS) + tuple(CURVATURE_METHODS),
    stage: str | None = None,
) -> dict:
    """The whole benchmark, or one of its `_common.STAGES`."""
    config = QUICK if quick else FULL
    x, y = load_data()
    key = jax.random.key(0)
    batch_key, key = jax.random.split(key)
    index = jax.random.choice(batch_key, x.shape[0], (config["batch_size"],), False)
    xb, yb = x[index], y[index]
    models = {}
    for model_name, (width, depth) in config["models"].items():
        model_key, key = jax.random.split(key)
        models[model_name] = eqx.nn.MLP(64, 10, width, depth, key=model_key)
    results = _common.untimed_part(
        out_dir,
        "guess_quality",
        stage,
        lambda: untimed_results(config, methods, models, (x, y), (xb, yb)),
    )
    if results is None:
        return {}
    started = time.perf_counter()
    if any(name in CURVATURE_METHODS for name in methods):
        for model_name, model in models.items():
            entry = results["models"][model_name]
            entry["curvature_cost"] = curvature_cost(model, xb, yb)
    wall_seconds = results.pop("seconds") + time.perf_counter() - started

    output = {
        "config": {
            **{k: v for k, v in config.items() if k != "models"},
            "models": {
                k: {"width": w, "depth": d} for k, (w, d) in config["models"].items()
            },
            "quick": quick,
            "optimizer": "plain SGD, no momentum; best base learning rate by median "
            "final full-data loss over seeds",
            "learning_rate_rule": "base × k/p for random directions, base for "
            "candidate directions (guesses, oracle); curvature-aware rows: the "
            "Newton step times the best damping of `newton_dampings`, or the plain "
            "step at the best learning rate of their base method when the "
            "safeguard rejects the undamped Newton step",
            "cosine": "against the true gradient of one fixed batch; statistics "
            "over PRNG keys",
        },
        "wall_seconds": wall_seconds,
        "results": results,
    }
    _common.write_json(out_dir, "guess_quality", output)
    plot(output, out_dir)
    print_table(output)
    return output


def plot(output: dict, out_dir: pathlib.Path) -> None:
    results = output["results"]
    figure, (left, right) = _common.new_figure(1, 2, figsize=(12, 4.5))
    sweep = results["width_sweep"]
    p = np.array([row["num_parameters"] for row in sweep.values()])
    for name, marker in (
        ("rademacher-k1", "o"),
        ("activation", "s"),
        ("transpose", "^"),
    ):
        values = [row[name]["median_abs_cosine"] for row in sweep.values()]
        left.loglog(p, values, marker=marker, label=name)
    left.loglog(p, 1 / np.sqrt(p), "k--", label="1/√p")
    depth = output["config"]["width_depth"]
    left.set_xlabel(f"parameters p (depth {depth}, widths " + ", ".join(sweep) + ")")
    left.set_ylabel("median |cos(ĝ, g)| at init")
    left.set_title("Direction quality vs width")
    left.legend()

    names = list(next(iter(results["models"].values()))["methods"])
    offsets = np.linspace(-0.2, 0.2, len(results["models"]))
    for offset, (model_name, entry) in zip(offsets, results["models"].items()):
        accuracies = [entry["methods"][n]["train_accuracy_median"] for n in names]
        right.bar(
            np.arange(len(names)) + offset, accuracies, width=0.4, label=model_name
        )
    right.set_xticks(np.arange(len(names)), names, rotation=35, ha="right")
    right.set_ylabel("training accuracy")
    right.set_title(f"After {output['config']['num_steps']} SGD updates (best lr)")
    right.legend()
    _common.save_figure(figure, out_dir, "guess_quality")


def print_table(output: dict) -> None:
    for model_name, entry in output["results"]["models"].items():
        print(
            f"\n{model_name}: p = {entry['num_parameters']}, "
            f"1/√p = {entry['one_over_sqrt_p']:.4f}"
        )
        print(
            f"{'method':24s} {'|cos| init':>10s} {'|cos| trained':>13s} "
            f"{'train acc':>9s} {'best lr':>9s}"
        )
        for name, row in entry["methods"].items():
            at_init = row["cosine_at_init"]
            at_init = float("nan") if at_init is None else at_init["median_abs_cosine"]
            after = row["cosine_after_backprop_training"]
            after = float("nan") if after is None else after["median_abs_cosine"]
            print(
                f"{name:24s} {at_init:10.4f} "
                f"{after:13.4f} "
                f"{row['train_accuracy_median']:9.3f} {row['best_learning_rate']:9.2e}"
                + (
                    f"  accepted {np.median(row['accepted_fraction_per_seed']):.2f}"
                    if "accepted_fraction_per_seed" in row
                    else ""
                )
            )
        cost = entry.get("curvature_cost")
        if cost is not None:
            print(
                "update time over dodge_random's: curvature_aware_dodge "
                f"{cost['curvature_aware_over_dodge_random']['median']:.2f} "
                "(nested jvp alone "
                f"{cost['curvature_aware_no_trial_over_dodge_random']['median']:.2f})"
            )


if __name__ == "__main__":
    arguments = _common.parse_args(__doc__)
    main(arguments.quick, arguments.out, stage=arguments.stage)
