"""Activity perturbation against weight perturbation and backprop on real digits.

Issue 15 asks how close forward gradients come to backprop. Weight-perturbed DODGE
(`eqx_dodge.filter_dodge`) spreads one directional derivative over every weight;
activity perturbation (`eqx_dodge.activity_dodge`, Ren et al., ICLR 2023) perturbs
each layer's outputs with tangents of their own for every example, and forms the
weight estimates from the layer inputs.

Setup: the 1797 digits of `sklearn.datasets.load_digits` (64 pixels scaled to
[0, 1]), a stratified 25 % test split (`random_state=0`), an MLP 64-64-10 (ReLU),
1000 plain SGD updates on minibatches of 64 drawn with replacement from the training
set. Methods: backprop (`eqx.filter_grad`), weight-perturbed DODGE with k = 1 and
k = 16 random directions, activity perturbation with one tangent pass for all layers
("global") and with `separate_layers=True`. Every method gets the same step-size
grid; for each, the step size with the lowest final training loss (mean over seeds)
is kept, and we report its TEST accuracy, mean ± standard deviation over seeds.
Seeds and step sizes are `vmap`ped: one jitted `lax.scan` per method.

Variance: the relative squared error `E‖ĝ − g‖²/‖g‖²` of every estimator at
initialisation on one minibatch (256 keys; not in `--quick`).

Cost: seconds per training step (estimate + SGD update, batch 64, one model) of
every method relative to backprop, timed interleaved (`_common.time_interleaved`).
"""

import functools as ft
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_dodge


HIDDEN = 64
BATCH = 64
LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# The goal: a forward-gradient method within this many points of backprop.
GOAL_POINTS = 1.0


def load_data(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.asarray(digits.data, np.float32) / 16.0  # pyright: ignore
    y = np.asarray(digits.target, np.int32)  # pyright: ignore
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=seed
    )
    return tuple(map(jnp.asarray, (x_train, y_train, x_test, y_test)))  # pyright: ignore


def make_model(key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(64, 10, HIDDEN, 1, activation=jax.nn.relu, key=key)


def example_loss(model: eqx.nn.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def batch_loss(model: eqx.nn.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, 0))(model, x, y))


def accuracy(model: eqx.nn.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


Estimator = Callable[[eqx.nn.MLP, jax.Array, jax.Array, jax.Array], Any]

METHODS: dict[str, Estimator] = {
    "backprop": lambda model, x, y, key: eqx.filter_grad(batch_loss)(model, x, y),
    "weight DODGE k=1": lambda model, x, y, key: eqx_dodge.filter_dodge(
        batch_loss, key=key
    )(model, x, y),
    "weight DODGE k=16": lambda model, x, y, key: eqx_dodge.filter_dodge(
        batch_loss, key=key, num_directions=16
    )(model, x, y),
    "activity, global": lambda model, x, y, key: eqx_dodge.activity_dodge(
        example_loss, key=key
    )(model, x, y),
    "activity, separate layers": lambda model, x, y, key: eqx_dodge.activity_dodge(
        example_loss, key=key, separate_layers=True
    )(model, x, y),
}


def sgd_step(estimator: Estimator, model, x, y, key, learning_rate):
    grads = estimator(model, x, y, key)
    return eqx.apply_updates(model, jax.tree.map(lambda g: -learning_rate * g, grads))


def static_part() -> eqx.nn.MLP:
    return eqx.filter(make_model(jax.random.key(0)), eqx.is_inexact_array, inverse=True)


@ft.partial(jax.jit, static_argnums=(1, 2))
def draws(keys: jax.Array, num_train: int, num_updates: int):
    """Per seed: the initial parameters, the minibatch indices, the estimate keys.
    Shared by all methods (and compiled once): every method sees the same data."""

    def one(key):
        init_key, batch_key, estimate_key = jax.random.split(key, 3)
        params = eqx.filter(make_model(init_key), eqx.is_inexact_array)
        indices = jax.random.randint(batch_key, (num_updates, BATCH), 0, num_train)
        return params, indices, jax.random.split(estimate_key, num_updates)

    return jax.vmap(one)(keys)


@jax.jit
def evaluate(params, data):
    """Final training loss, training and test accuracy of stacked runs."""
    x_train, y_train, x_test, y_test = data
    static = static_part()

    def one(params):
        model = eqx.combine(params, static)
        return {
            "train_loss": batch_loss(model, x_train, y_train),
            "train_accuracy": accuracy(model, x_train, y_train),
            "test_accuracy": accuracy(model, x_test, y_test),
        }

    return jax.vmap(jax.vmap(one))(params)


def run_method(
    estimator: Estimator,
    seeds: Sequence[int],
    learning_rates: Sequence[float],
    data: tuple[jax.Array, ...],
    num_updates: int,
) -> dict[str, np.ndarray]:
    """Every step size × seed in one jitted `lax.scan`: arrays of shape
    `(len(learning_rates), len(seeds))`."""
    static = static_part()

    def train(params, indices, keys, learning_rate, x_train, y_train):
        def body(params, inputs):
            index, key = inputs
            model = eqx.combine(params, static)
            model = sgd_step(
                estimator, model, x_train[index], y_train[index], key, learning_rate
            )
            return eqx.filter(model, eqx.is_inexact_array), None

        params, _ = jax.lax.scan(body, params, (indices, keys))
        return params

    # The data are arguments, not constants: XLA would fold the constants at length.
    @jax.jit
    def all_runs(params, indices, keys, rates, x_train, y_train):
        per_seed = jax.vmap(train, in_axes=(0, 0, 0, None, None, None))
        return jax.vmap(per_seed, in_axes=(None, None, None, 0, None, None))(
            params, indices, keys, rates, x_train, y_train
        )

    keys = jnp.stack([jax.random.key(seed) for seed in seeds])
    params, indices, estimate_keys = draws(keys, data[0].shape[0], num_updates)
    rates = jnp.asarray(learning_rates, jnp.float32)
    final = all_runs(params, indices, estimate_keys, rates, data[0], data[1])
    return {name: np.asarray(v) for name, v in evaluate(final, data).items()}


def step_times(data: tuple[jax.Array, ...], repeats: int, min_time: float):
    """Seconds per training step of every method, and the ratios to backprop."""
    x_train, y_train = data[0][:BATCH], data[1][:BATCH]
    model = make_model(jax.random.key(0))
    key = jax.random.key(1)
    funs = {}
    for name, estimator in METHODS.items():
        step = eqx.filter_jit(ft.partial(sgd_step, estimator))
        funs[name] = lambda step=step: step(model, x_train, y_train, key, 0.1)
    times = _common.time_interleaved(funs, repeats=repeats, min_time=min_time)
    return {
        name: {
            "seconds": _common.summarize(times[name]),
            "ratio_to_backprop": _common.summarize(
                _common.ratio_samples(times[name], times["backprop"])
            ),
        }
        for name in METHODS
    }


def relative_errors(data: tuple[jax.Array, ...], num_keys: int) -> dict[str, float]:
    """`E‖ĝ − g‖² / ‖g‖²` of every method at initialisation, on one minibatch of 64,
    over `num_keys` keys: the variance that the step size must absorb."""
    x, y = data[0][:BATCH], data[1][:BATCH]
    model = make_model(jax.random.key(0))
    gradient = jnp.concatenate(
        [g.ravel() for g in jax.tree.leaves(eqx.filter_grad(batch_loss)(model, x, y))]
    )
    keys = jax.random.split(jax.random.key(1), num_keys)
    errors = {}
    for name, estimator in METHODS.items():

        @jax.jit
        def squared_errors(keys, estimator=estimator):
            def one(key):
                leaves = jax.tree.leaves(estimator(model, x, y, key))
                flat = jnp.concatenate([leaf.ravel() for leaf in leaves])
                return jnp.sum((flat - gradient) ** 2)

            return jax.vmap(one)(keys)

        errors[name] = float(jnp.mean(squared_errors(keys)) / jnp.sum(gradient**2))
    return errors


def plot(results: dict[str, Any], out_dir) -> None:
    fig, (left, right) = _common.new_figure(1, 2, figsize=(11, 4))
    names = list(results["methods"])
    means = [100 * results["methods"][n]["test_accuracy_mean"] for n in names]
    stds = [100 * results["methods"][n]["test_accuracy_std"] for n in names]
    positions = np.arange(len(names))
    left.bar(positions, means, yerr=stds, capsize=4, color="tab:blue")
    for x, mean in zip(positions, means):
        left.text(x, mean + 1, f"{mean:.1f}", ha="center", fontsize=8)
    backprop = means[0]
    left.axhline(backprop - GOAL_POINTS, color="k", ls=":", lw=1)
    left.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(min(means) - 10, 100)
    left.set_title(
        f"digits, MLP 64-{HIDDEN}-10, {results['num_updates']} SGD updates, "
        f"{len(results['seeds'])} seeds",
        fontsize=9,
    )
    ratios = [results["step_time"][n]["ratio_to_backprop"]["median"] for n in names]
    right.bar(positions, ratios, color="tab:orange")
    right.axhline(1, color="k", lw=1)
    right.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("time per step / backprop's")
    right.set_title("cost of one SGD step (batch 64)", fontsize=9)
    _common.save_figure(fig, out_dir, "activity")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv)
    if args.quick:
        seeds, rates, num_updates = (0, 1), (0.1, 0.3), 100
        repeats, min_time = 5, 0.01
    else:
        seeds, rates, num_updates = (0, 1, 2, 3, 4), LEARNING_RATES, 1000
        repeats, min_time = 7, 0.1
    data = load_data()
    methods = {}
    for name, estimator in METHODS.items():
        start = time.perf_counter()
        runs = run_method(estimator, seeds, rates, data, num_updates)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        # A diverged run (NaN loss) never wins.
        losses = np.nan_to_num(runs["train_loss"].astype(np.float64), nan=np.inf)
        losses = losses.mean(axis=1)
        best = int(np.argmin(losses))
        test = runs["test_accuracy"][best]
        methods[name] = {
            "best_learning_rate": rates[best],
            "test_accuracy_mean": float(test.mean()),
            "test_accuracy_std": float(test.std(ddof=1)),
            "train_accuracy_mean": float(runs["train_accuracy"][best].mean()),
            "per_learning_rate": {
                str(rate): {
                    key: [float(v) for v in runs[key][i]]
                    for key in ("train_loss", "train_accuracy", "test_accuracy")
                }
                for i, rate in enumerate(rates)
            },
        }
        print(
            f"{name:28s} lr={rates[best]:<6} test "
            f"{100 * test.mean():.2f} ± {100 * test.std(ddof=1):.2f} %",
            file=sys.stderr,
        )
    backprop = methods["backprop"]["test_accuracy_mean"]
    for record in methods.values():
        gap = 100 * (backprop - record["test_accuracy_mean"])
        record["points_below_backprop"] = gap
        record["within_goal"] = bool(gap <= GOAL_POINTS)
    results = {
        "quick": args.quick,
        "seeds": list(seeds),
        "learning_rates": list(rates),
        "num_updates": num_updates,
        "batch_size": BATCH,
        "hidden": HIDDEN,
        "selection": "step size with the lowest final training loss, mean over seeds",
        "goal_points": GOAL_POINTS,
        "methods": methods,
        "step_time": step_times(data, repeats, min_time),
        # Skipped in --quick, whose budget is compile time.
        "relative_squared_error_at_init": (
            None if args.quick else relative_errors(data, 256)
        ),
    }
    for name, record in results["step_time"].items():
        print(
            f"{name:28s} step time / backprop "
            f"{record['ratio_to_backprop']['median']:.2f}",
            file=sys.stderr,
        )
    _common.write_json(args.out, "activity", results)
    plot(results, args.out)
    return results


if __name__ == "__main__":
    main()
