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
("global") and with `separate_layers=True`, the latter also with k = 2, 4, 8 and 16
tangents per example (`num_directions`): a curve of accuracy against the cost of a
step. The goals: a forward-only method within 1 point of backprop, at a step costing
at most 3 backprop steps (`methods_meeting_both_goals` in the JSON).

Local losses (`eqx_dodge.LocalLosses`, Ren et al.): the same MLP, same initial
weights, as two blocks — the hidden layer with a local linear head 64-10 of its own
(one extra layer, 650 parameters), then the output layer as the last block's head —
with `stop_gradient` between them, trained on the sum of the two local losses: by
backprop within the blocks (LG-BP, Ren's control) or by activity perturbation with
separate layers (LG-FG-A). "Global target, local guess" (Fournier et al.,
`eqx_dodge.local_guess_dodge`): the global loss's gradient projected on the
local-loss gradient (exact by LG-BP, or its LG-FG-A estimate), `(g·ĉ)ĉ`; the local
head follows its local gradient. "8 group-wise local losses" (Ren et al.'s
group-wise losses, `_local_models.py`): the hidden layer's units in 8 groups of 8,
each a Linear layer with a local loss of its own (the local head on the features with
the other groups stopped). Every model predicts with its last head, and the training
loss that selects the step size is the global one.

Every method gets the same step-size grid; for each, the step size with the lowest
final training loss (mean over seeds) is kept, and we report its TEST accuracy,
mean ± standard deviation over seeds. Seeds and step sizes are `vmap`ped: one jitted
`lax.scan` per method.

Variance: the relative squared error `E‖ĝ − g‖²/‖g‖²` of every estimator at
initialisation on one minibatch (256 keys; not in `--quick`), against the gradient
that the method estimates (`target` in the JSON: the global loss's, or the sum of
the local losses' for LG-BP and LG-FG-A).

Cost: seconds per training step (estimate + SGD update, batch 64, one model) of
every method relative to backprop, timed interleaved (`_common.time_interleaved`).
"""

import functools as ft
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import _common
import _local_models
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_dodge


HIDDEN = 64
BATCH = 64
LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# The goals: a forward-gradient method within this many points of backprop,
# at a step costing at most this many backprop steps.
GOAL_POINTS = 1.0
COST_GOAL = 3.0


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


def make_local_model(key: jax.Array) -> eqx_dodge.LocalLosses:
    """`make_model(key)`'s MLP, the same weights, as two blocks with local losses."""
    return _local_models.local_model(make_model(key), key)


def make_grouped_model(key: jax.Array) -> eqx_dodge.LocalLosses:
    """The same with `GROUPS` group-wise local losses on the hidden layer."""
    return _local_models.grouped_model(make_model(key), key)


output_loss = _local_models.output_loss


def example_loss(model: Callable, x: jax.Array, y: jax.Array) -> jax.Array:
    return output_loss(model(x), y)


local_example_loss = eqx_dodge.local_loss(output_loss)


def batch_mean(loss: Callable) -> Callable:
    def mean(model, x, y):
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(model, x, y))

    return mean


batch_loss = batch_mean(example_loss)
local_batch_loss = batch_mean(local_example_loss)


def accuracy(model: Callable, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


Estimator = Callable[[Any, jax.Array, jax.Array, jax.Array], Any]


class Method(NamedTuple):
    make_model: Callable[[jax.Array], Any]
    estimator: Estimator
    # The batch loss whose gradient the estimator targets, and whether it trains
    # without backpropagation through any layer (the "forward-only").
    target: Callable
    forward_only: bool


def backprop(loss: Callable) -> Estimator:
    return lambda model, x, y, key: eqx.filter_grad(loss)(model, x, y)


def weight_dodge(num_directions: int) -> Estimator:
    return lambda model, x, y, key: eqx_dodge.filter_dodge(
        batch_loss, key=key, num_directions=num_directions
    )(model, x, y)


def activity(
    loss: Callable, separate_layers: bool, num_directions: int = 1
) -> Estimator:
    return lambda model, x, y, key: eqx_dodge.activity_dodge(
        loss, key=key, separate_layers=separate_layers, num_directions=num_directions
    )(model, x, y)


def local_guess(activity_candidate: bool) -> Estimator:
    return lambda model, x, y, key: eqx_dodge.local_guess_dodge(
        output_loss, key=key if activity_candidate else None
    )(model, x, y)


MLP, LOCAL, GROUPED = make_model, make_local_model, make_grouped_model
# The numbers of directions k > 1 of activity perturbation with separate layers: a
# curve of accuracy against the cost of a step.
CURVE_DIRECTIONS = (2, 4, 8, 16)


def curve_name(num_directions: int) -> str:
    if num_directions == 1:
        return "activity, separate layers"
    return f"activity, separate layers k={num_directions}"


GROUPS = _local_models.GROUPS
METHODS: dict[str, Method] = {
    "backprop": Method(MLP, backprop(batch_loss), batch_loss, False),
    "weight DODGE k=1": Method(MLP, weight_dodge(1), batch_loss, True),
    "weight DODGE k=16": Method(MLP, weight_dodge(16), batch_loss, True),
    "activity, global": Method(MLP, activity(example_loss, False), batch_loss, True),
    "activity, separate layers": Method(
        MLP, activity(example_loss, True), batch_loss, True
    ),
    # Accuracy against cost: k tangents per example, averaged.
    **{
        curve_name(k): Method(MLP, activity(example_loss, True, k), batch_loss, True)
        for k in CURVE_DIRECTIONS
    },
    "local losses, backprop (LG-BP)": Method(
        LOCAL, backprop(local_batch_loss), local_batch_loss, False
    ),
    "local losses, activity (LG-FG-A)": Method(
        LOCAL, activity(local_example_loss, True), local_batch_loss, True
    ),
    "global target, LG-BP guess": Method(LOCAL, local_guess(False), batch_loss, False),
    "global target, LG-FG-A guess": Method(LOCAL, local_guess(True), batch_loss, True),
    f"{GROUPS} group-wise local losses, backprop": Method(
        GROUPED, backprop(local_batch_loss), local_batch_loss, False
    ),
    f"{GROUPS} group-wise local losses, activity": Method(
        GROUPED, activity(local_example_loss, True), local_batch_loss, True
    ),
}


# `--quick` trains one method of each kind (each costs a compilation): the others
# differ from one of these by a flag or a guess only. Weight DODGE is one call of
# `filter_dodge`, trained by digits_directions.py's smoke run; the group-wise models
# train as LG-FG-A does, on a model whose stacking the tests check against the plain
# one, at ten times its cost: neither is in the smoke run.
QUICK_METHODS = (
    "backprop",
    "activity, separate layers",
    "local losses, activity (LG-FG-A)",
    "global target, LG-FG-A guess",
)


def sgd_step(estimator: Estimator, model, x, y, key, learning_rate):
    grads = estimator(model, x, y, key)
    return eqx.apply_updates(model, jax.tree.map(lambda g: -learning_rate * g, grads))


def static_part(make: Callable) -> Any:
    return eqx.filter(make(jax.random.key(0)), eqx.is_inexact_array, inverse=True)


@ft.partial(jax.jit, static_argnums=(1, 2, 3))
def draws(keys: jax.Array, make: Callable, num_train: int, num_updates: int):
    """Per seed: the initial parameters, the minibatch indices, the estimate keys.
    Every method sees the same data and keys; models built from the MLP start from
    its weights."""

    def one(key):
        init_key, batch_key, estimate_key = jax.random.split(key, 3)
        params = eqx.filter(make(init_key), eqx.is_inexact_array)
        indices = jax.random.randint(batch_key, (num_updates, BATCH), 0, num_train)
        return params, indices, jax.random.split(estimate_key, num_updates)

    return jax.vmap(one)(keys)


@ft.partial(jax.jit, static_argnums=2)
def evaluate(params, data, make: Callable):
    """Final training loss, training and test accuracy of stacked runs."""
    x_train, y_train, x_test, y_test = data
    static = static_part(make)

    def one(params):
        model = eqx.combine(params, static)
        return {
            "train_loss": batch_loss(model, x_train, y_train),
            "train_accuracy": accuracy(model, x_train, y_train),
            "test_accuracy": accuracy(model, x_test, y_test),
        }

    return jax.vmap(jax.vmap(one))(params)


def _map_runs(train: Callable, params, indices, keys, rates, x_train, y_train):
    """`train` for every step size × seed by `lax.map`, one run at a time, stacked
    as the vmapped runs are: leading axes (step size, seed)."""
    num_rates, num_seeds = rates.shape[0], indices.shape[0]

    def one(grid_point):
        rate, seed = grid_point
        seed_params = jax.tree.map(lambda leaf: leaf[seed], params)
        return train(seed_params, indices[seed], keys[seed], rate, x_train, y_train)

    grid = (jnp.repeat(rates, num_seeds), jnp.tile(jnp.arange(num_seeds), num_rates))
    final = jax.lax.map(one, grid)
    return jax.tree.map(
        lambda leaf: leaf.reshape(num_rates, num_seeds, *leaf.shape[1:]), final
    )


def run_method(
    method: Method,
    seeds: Sequence[int],
    learning_rates: Sequence[float],
    data: tuple[jax.Array, ...],
    num_updates: int,
    optimizer: Callable[[jax.Array], optax.GradientTransformation] = optax.sgd,
    sequential: bool = False,
) -> dict[str, np.ndarray]:
    """Every step size × seed in one jitted `lax.scan`: arrays of shape
    `(len(learning_rates), len(seeds))`. `optimizer` makes the optax optimizer of a
    step size (plain SGD by default). The runs are vmapped, or with `sequential`
    run one after the other by `lax.map`: vmapped over seeds, a convolution's kernel
    gets a batch axis and becomes a grouped convolution, slow on XLA:CPU."""
    estimator = method.estimator
    static = static_part(method.make_model)

    def train(params, indices, keys, learning_rate, x_train, y_train):
        transform = optimizer(learning_rate)

        def body(carry, inputs):
            params, state = carry
            index, key = inputs
            model = eqx.combine(params, static)
            grads = estimator(model, x_train[index], y_train[index], key)
            grads = eqx.filter(grads, eqx.is_inexact_array)
            updates, state = transform.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(
            body, (params, transform.init(params)), (indices, keys)
        )
        return params

    # The data are arguments, not constants: XLA would fold the constants at length.
    @jax.jit
    def all_runs(params, indices, keys, rates, x_train, y_train):
        if sequential:
            return _map_runs(train, params, indices, keys, rates, x_train, y_train)
        per_seed = jax.vmap(train, in_axes=(0, 0, 0, None, None, None))
        return jax.vmap(per_seed, in_axes=(None, None, None, 0, None, None))(
            params, indices, keys, rates, x_train, y_train
        )

    keys = jnp.stack([jax.random.key(seed) for seed in seeds])
    params, indices, estimate_keys = draws(
        keys, method.make_model, data[0].shape[0], num_updates
    )
    rates = jnp.asarray(learning_rates, jnp.float32)
    final = all_runs(params, indices, estimate_keys, rates, data[0], data[1])
    evaluated = evaluate(final, data, method.make_model)
    return {name: np.asarray(v) for name, v in evaluated.items()}


def step_times(
    data: tuple[jax.Array, ...], names: Sequence[str], repeats: int, min_time: float
):
    """Seconds per training step of the methods `names` (backprop among them), and
    the ratios to backprop."""
    x_train, y_train = data[0][:BATCH], data[1][:BATCH]
    key = jax.random.key(1)
    funs = {}
    for name in names:
        method = METHODS[name]
        model = method.make_model(jax.random.key(0))
        step = eqx.filter_jit(ft.partial(sgd_step, method.estimator))
        funs[name] = lambda step=step, model=model: step(
            model, x_train, y_train, key, 0.1
        )
    times = _common.time_interleaved(funs, repeats=repeats, min_time=min_time)
    return {
        name: {
            "seconds": _common.summarize(times[name]),
            "ratio_to_backprop": _common.summarize(
                _common.ratio_samples(times[name], times["backprop"])
            ),
        }
        for name in names
    }


def relative_errors(data: tuple[jax.Array, ...], num_keys: int) -> dict[str, float]:
    """`E‖ĝ − g‖² / ‖g‖²` of every method at initialisation, on one minibatch of 64,
    over `num_keys` keys, `g` the gradient of the method's target: the variance
    that the step size must absorb."""
    x, y = data[0][:BATCH], data[1][:BATCH]
    keys = jax.random.split(jax.random.key(1), num_keys)
    errors = {}
    for name, (make, estimator, target, _) in METHODS.items():
        model = make(jax.random.key(0))
        gradient = jnp.concatenate(
            [g.ravel() for g in jax.tree.leaves(eqx.filter_grad(target)(model, x, y))]
        )

        @jax.jit
        def squared_errors(keys, estimator=estimator, model=model, gradient=gradient):
            def one(key):
                leaves = jax.tree.leaves(estimator(model, x, y, key))
                flat = jnp.concatenate([leaf.ravel() for leaf in leaves])
                return jnp.sum((flat - gradient) ** 2)

            return jax.vmap(one)(keys)

        errors[name] = float(jnp.mean(squared_errors(keys)) / jnp.sum(gradient**2))
    return errors


def plot_accuracies(
    axis, results: dict[str, Any], title: str, color: str
) -> tuple[list[str], list[float], list[float]]:
    """Each method's test accuracy as a bar (mean ± std over seeds, backprop first),
    with the goal line under backprop's; returns the names, means and stds (%)."""
    names = list(results["methods"])
    means = [100 * results["methods"][n]["test_accuracy_mean"] for n in names]
    stds = [100 * results["methods"][n]["test_accuracy_std"] for n in names]
    positions = np.arange(len(names))
    axis.bar(positions, means, yerr=stds, capsize=4, color=color)
    for x, mean in zip(positions, means):
        axis.text(x, mean + 1, f"{mean:.1f}", ha="center", fontsize=8)
    axis.axhline(means[0] - GOAL_POINTS, color="k", ls=":", lw=1)
    axis.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(min(means) - 10, 100)
    axis.set_title(title, fontsize=9)
    return names, means, stds


def plot_curve(axis, results: dict[str, Any], backprop: float) -> None:
    """Activity perturbation with separate layers: test accuracy (mean ± std) against
    the time of a step for each timed k, joined in the order of k, with the goals."""
    points = [
        (point["num_directions"], point["method"])
        for point in results.get("curve", [])
        if point["method"] in results["step_time"]
    ]
    ratios = [results["step_time"][m]["ratio_to_backprop"]["median"] for _, m in points]
    means = [100 * results["methods"][m]["test_accuracy_mean"] for _, m in points]
    stds = [100 * results["methods"][m]["test_accuracy_std"] for _, m in points]
    axis.errorbar(ratios, means, yerr=stds, fmt="o-", capsize=3, color="tab:green")
    for (k, _), ratio, mean in zip(points, ratios, means):
        axis.annotate(
            f"k={k}", (ratio, mean), xytext=(4, -10), textcoords="offset points"
        )
    axis.axhline(backprop, color="tab:blue", lw=1, label="backprop")
    axis.axhline(backprop - GOAL_POINTS, color="k", ls=":", lw=1, label="goal")
    axis.axvline(COST_GOAL, color="k", ls=":", lw=1)
    axis.set_xlabel("time per SGD step / backprop's (batch 64)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("activity, separate layers: k tangents per example", fontsize=9)
    axis.legend(fontsize=7, loc="lower right")


def plot(results: dict[str, Any], out_dir) -> None:
    fig, (left, right, curve) = _common.new_figure(1, 3, figsize=(16, 4))
    title = (
        f"digits, MLP 64-{HIDDEN}-10, {results['num_updates']} SGD updates, "
        f"{len(results['seeds'])} seeds"
    )
    names, means, stds = plot_accuracies(left, results, title, "tab:blue")
    backprop = means[0]
    # Accuracy against cost: one point per timed method, forward-only ones filled.
    for name, mean, std in zip(names, means, stds):
        if name not in results["step_time"]:
            continue
        ratio = results["step_time"][name]["ratio_to_backprop"]["median"]
        forward_only = results["methods"][name]["forward_only"]
        right.errorbar(
            ratio,
            mean,
            yerr=std,
            fmt="o" if forward_only else "s",
            capsize=3,
            mfc=None if forward_only else "none",
        )
        right.annotate(
            name, (ratio, mean), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    plot_curve(curve, results, backprop)
    right.axhline(backprop - GOAL_POINTS, color="k", ls=":", lw=1)
    right.set_xlabel("time per SGD step / backprop's (batch 64)")
    right.set_ylabel("test accuracy (%)")
    right.set_ylim(min(means) - 5, 100)
    right.set_title("accuracy against cost (squares: use backprop)", fontsize=9)
    _common.save_figure(fig, out_dir, "activity")


def method_record(
    method: Method, runs: dict[str, np.ndarray], rates: Sequence[float]
) -> dict[str, Any]:
    """A method's record: its best step size (lowest mean final training loss; a
    diverged run, NaN, never wins), test accuracy there, and every step size's runs."""
    losses = np.nan_to_num(runs["train_loss"].astype(np.float64), nan=np.inf)
    best = int(np.argmin(losses.mean(axis=1)))
    test = runs["test_accuracy"][best]
    return {
        "best_learning_rate": rates[best],
        "forward_only": method.forward_only,
        "target": "local losses" if method.target is local_batch_loss else "global",
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


def compare_with_backprop(
    records: dict[str, dict[str, Any]], num_seeds: int, goal_points: float
) -> None:
    """Adds to every method's record its gap to backprop in accuracy points, the
    gap's standard error, and whether the gap is within `goal_points`."""
    backprop = records["backprop"]
    for record in records.values():
        gap = 100 * (backprop["test_accuracy_mean"] - record["test_accuracy_mean"])
        record["points_below_backprop"] = gap
        # The standard error of the difference of two independent means.
        record["gap_standard_error"] = 100 * float(
            np.hypot(backprop["test_accuracy_std"], record["test_accuracy_std"])
            / np.sqrt(num_seeds)
        )
        record["within_goal"] = bool(gap <= goal_points)


def both_goals(
    methods: dict[str, dict[str, Any]], step_time: dict[str, dict[str, Any]]
) -> list[str]:
    """The forward-only methods within their accuracy goal of backprop
    (`compare_with_backprop`'s `within_goal`) whose timed step costs at most
    `COST_GOAL` backprop steps."""
    return [
        name
        for name, record in methods.items()
        if record["forward_only"]
        and record["within_goal"]
        and name in step_time
        and step_time[name]["ratio_to_backprop"]["median"] <= COST_GOAL
    ]


def train_methods(
    data: tuple[jax.Array, ...],
    names: Sequence[str],
    seeds: Sequence[int],
    rates: Sequence[float],
    num_updates: int,
) -> dict[str, Any]:
    """The record (`method_record`) of every method in `names`, trained on `data`
    with every step size of `rates` and seed of `seeds`."""
    methods = {}
    for name in names:
        method = METHODS[name]
        start = time.perf_counter()
        runs = run_method(method, seeds, rates, data, num_updates)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        methods[name] = method_record(method, runs, rates)
        best = rates.index(methods[name]["best_learning_rate"])
        test = runs["test_accuracy"][best]
        print(
            f"{name:32s} lr={rates[best]:<6} test "
            f"{100 * test.mean():.2f} ± {100 * test.std(ddof=1):.2f} %",
            file=sys.stderr,
        )
    return methods


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv)
    if args.quick:
        seeds, rates, num_updates = (0, 1), (0.01, 0.1, 0.3, 3.0), 100
        repeats, min_time = 5, 0.01
        # Every timed method compiles its step once more: --quick times two.
        timed = ("backprop", "activity, separate layers")
    else:
        seeds, rates, num_updates = (0, 1, 2, 3, 4), LEARNING_RATES, 1000
        repeats, min_time = 7, 0.1
        timed = tuple(METHODS)
    data = load_data()

    def untimed():
        names = QUICK_METHODS if args.quick else tuple(METHODS)
        return {
            "methods": train_methods(data, names, seeds, rates, num_updates),
            # Skipped in --quick, whose budget is compile time.
            "relative_errors": None if args.quick else relative_errors(data, 256),
        }

    trained = _common.untimed_part(args.out, "activity", args.stage, untimed)
    if trained is None:
        return {}
    methods = trained["methods"]
    compare_with_backprop(methods, len(seeds), GOAL_POINTS)
    forward_only = [n for n, r in methods.items() if r["forward_only"]]
    best_forward_only = max(
        forward_only, key=lambda n: methods[n]["test_accuracy_mean"]
    )
    step_time = step_times(data, timed, repeats, min_time)
    results = {
        "quick": args.quick,
        "methods_run": "all" if not args.quick else list(QUICK_METHODS),
        "seeds": list(seeds),
        "learning_rates": list(rates),
        "num_updates": num_updates,
        "batch_size": BATCH,
        "hidden": HIDDEN,
        "selection": "step size with the lowest final training loss, mean over seeds",
        "goal_points": GOAL_POINTS,
        "best_forward_only": best_forward_only,
        "goal_met": methods[best_forward_only]["within_goal"],
        "cost_goal": COST_GOAL,
        "methods_meeting_both_goals": both_goals(methods, step_time),
        "curve": [
            {"num_directions": k, "method": curve_name(k)}
            for k in (1, *CURVE_DIRECTIONS)
            if curve_name(k) in methods
        ],
        "methods": methods,
        "step_time": step_time,
        "relative_squared_error_at_init": trained["relative_errors"],
    }
    for name, record in results["step_time"].items():
        print(
            f"{name:32s} step time / backprop "
            f"{record['ratio_to_backprop']['median']:.2f}",
            file=sys.stderr,
        )
    _common.write_json(args.out, "activity", results)
    plot(results, args.out)
    return results


if __name__ == "__main__":
    main()
