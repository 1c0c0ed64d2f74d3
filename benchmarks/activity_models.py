"""`activity.py`'s comparison on the issue's other models: a deeper digits MLP, a
digits conv net and an MLP on mnist1d.

Issue 15 asks for a forward-only method within 1 point of backprop on the digits
64-256-256-10 MLP and within 2 points on the mnist1d MLP and the digits conv net, at
a step cost of at most 3× backprop's.

Models (ReLU everywhere; the digits data and split are `activity.py`'s):

- digits MLP 64-256-256-10 (`eqx.nn.MLP`);
- digits conv net: the 8×8 image, a 3×3 conv to 16 channels (padding 1), a 3×3 conv
    to 32 channels with stride 2 (padding 1, 4×4), a linear layer 512-10 (its runs
    one after the other: see `Model.sequential`);
- mnist1d MLP 40-128-128-10 on the `mnist1d` package's default data set, generated
    offline (`mnist1d.data.make_dataset(get_dataset_args())`: 4000 training and 1000
    test sequences of 40 values, its own split and seed).

Methods, as in `activity.py`: backprop; weight-perturbed DODGE with k = 16;
activity perturbation with `separate_layers=True`, with one tangent per example and
with k = 16 (`num_directions=16`, `--full` only: the far end of `activity.py`'s
accuracy-against-cost curve); local losses (one block per
hidden layer, each with a local linear head on its flattened features, the output
layer as the last block's head) trained by backprop within the blocks (LG-BP) and by
activity perturbation with separate layers (LG-FG-A); and the group-wise local
losses, activity-perturbed (every hidden layer's units, or channels, in 8 groups with
a local loss each). Models are built by `_local_models.stack_local_model` from the
plain model's weights.

Protocol: `activity.py`'s — the same SGD updates, minibatches of 64, one step-size
grid, the step size with the lowest final training loss (mean over seeds) per
method, TEST accuracy mean ± std over seeds, the gap to backprop with the standard
error of a difference of means; seconds per step relative to backprop, timed
interleaved (`_common.time_interleaved`), and XLA's peak memory of one compiled
step relative to backprop's (`_common.memory_analysis`).

Scales (`SCALES`): `make bench` runs the digits MLP without the group-wise model
and without k = 16 (about 4 minutes on 2 cores; `results/activity_models.json`);
`--full` runs every model and method, one run at a time into
`results/activity_models_full_runs.json`, and resumes where an interrupted study
stopped (`_common.RunLog`); its summary is `results/activity_models_full.json`
(committed). `--quick` is the smoke test.

`--adam` feeds every estimate to `optax.adam` (default betas) instead of plain SGD,
with Adam's step sizes (`ADAM_LEARNING_RATES`), as the issue's protocol asks for
both optimizers; its results go to `activity_models_adam*.json`. The step costs are
still those of an SGD step: Adam's update adds the same elementwise work to every
method's.
"""

import functools as ft
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import _common
import _local_models
import activity as base
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_dodge


GROUPS = 8


class DigitsConvNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        key1, key2, key3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=key1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=key2)
        self.linear = eqx.nn.Linear(32 * 4 * 4, 10, key=key3)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.relu(self.conv1(to_image(x)))
        hidden = jax.nn.relu(self.conv2(hidden))
        return self.linear(hidden.reshape(-1))


def to_image(x: jax.Array) -> jax.Array:
    return x.reshape(1, 8, 8)


def load_mnist1d() -> tuple[jax.Array, ...]:
    import mnist1d.data

    data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    return (
        jnp.asarray(data["x"], jnp.float32),
        jnp.asarray(data["y"], jnp.int32),
        jnp.asarray(data["x_test"], jnp.float32),
        jnp.asarray(data["y_test"], jnp.int32),
    )


class Model(NamedTuple):
    description: str
    load: Callable[[], tuple[jax.Array, ...]]
    make: Callable[[jax.Array], Any]
    # The plain model's parts: (input transform, hidden layers, output layer).
    parts: Callable[[Any], tuple[Callable, list, eqx.nn.Linear]]
    input_shape: tuple[int, ...]
    goal_points: float
    # The group-wise models are slow to train (the conv net's: about 40× a backprop
    # step, and most of the benchmark's time); these are run only where this holds.
    grouped: bool = True
    # Its runs one after the other (`activity.run_method(sequential=True)`), not
    # vmapped: vmapped over seeds and step sizes, the conv net's convolutions become
    # grouped ones, slow on XLA:CPU (backprop alone ran over 7 minutes on 2 cores
    # without finishing).
    sequential: bool = False


def mlp_parts(mlp: eqx.nn.MLP) -> tuple[Callable, list, eqx.nn.Linear]:
    *hidden, output = mlp.layers
    return (lambda x: x), list(hidden), output


def conv_parts(net: DigitsConvNet) -> tuple[Callable, list, eqx.nn.Linear]:
    return to_image, [net.conv1, net.conv2], net.linear


def digits_mlp(key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(64, 10, 256, 2, activation=jax.nn.relu, key=key)


def mnist1d_mlp(key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(40, 10, 128, 2, activation=jax.nn.relu, key=key)


MODELS = {
    "digits MLP 64-256-256-10": Model(
        "digits, MLP 64-256-256-10", base.load_data, digits_mlp, mlp_parts, (64,), 1.0
    ),
    "digits conv net": Model(
        "digits, conv 3×3 16 ch, conv 3×3/2 32 ch, linear 512-10",
        base.load_data,
        DigitsConvNet,
        conv_parts,
        (64,),
        2.0,
        grouped=False,
        sequential=True,
    ),
    "mnist1d MLP 40-128-128-10": Model(
        "mnist1d (package defaults), MLP 40-128-128-10",
        load_mnist1d,
        mnist1d_mlp,
        mlp_parts,
        (40,),
        2.0,
    ),
}


def local_maker(model: Model, groups: int | None) -> Callable:
    def make(key: jax.Array) -> eqx_dodge.LocalLosses:
        prepare, hidden, output = model.parts(model.make(key))
        return _local_models.stack_local_model(
            hidden,
            output,
            key,
            input_shape=model.input_shape,
            prepare=prepare,
            groups=groups,
        )

    return make


# One maker per model and kind, made once: `run_method` and `evaluate` are jitted
# with the maker as a static argument.
LOCAL = {name: local_maker(model, None) for name, model in MODELS.items()}
GROUPED = {name: local_maker(model, GROUPS) for name, model in MODELS.items()}


def full_table(name: str) -> dict[str, base.Method]:
    """Every method on model `name`: `activity.py`'s and the group-wise local losses
    (where the model has them)."""
    make, local, grouped = MODELS[name].make, LOCAL[name], GROUPED[name]
    batch, local_batch = base.batch_loss, base.local_batch_loss
    table = {
        "backprop": base.Method(make, base.backprop(batch), batch, False),
        "weight DODGE k=16": base.Method(make, base.weight_dodge(16), batch, True),
        "activity, separate layers": base.Method(
            make, base.activity(base.example_loss, True), batch, True
        ),
        ACTIVITY_K16: base.Method(
            make, base.activity(base.example_loss, True, 16), batch, True
        ),
        "local losses, backprop (LG-BP)": base.Method(
            local, base.backprop(local_batch), local_batch, False
        ),
        "local losses, activity (LG-FG-A)": base.Method(
            local, base.activity(base.local_example_loss, True), local_batch, True
        ),
    }
    if MODELS[name].grouped:
        table[GROUP_WISE] = base.Method(
            grouped, base.activity(base.local_example_loss, True), local_batch, True
        )
    return table


GROUP_WISE = f"{GROUPS} group-wise local losses, activity"
ACTIVITY_K16 = base.curve_name(16)
DIGITS_MLP = "digits MLP 64-256-256-10"
# What each scale trains: model -> methods. Each method costs a compilation, and the
# group-wise models and 16 activity directions are slow to train (most of a `--full`
# run), so `make bench`'s default runs the digits MLP without them and `--full`
# (resumable: see `_common.RunLog`) runs every model and method; its results are
# committed in `results/activity_models_full.json`.
SLOW = (GROUP_WISE, ACTIVITY_K16)
SCALES: dict[str, dict[str, list[str]]] = {
    # The smoke test trains the model and method kinds that `activity.py`'s does not.
    "quick": {DIGITS_MLP: ["backprop", "local losses, activity (LG-FG-A)"]},
    "default": {DIGITS_MLP: [m for m in full_table(DIGITS_MLP) if m not in SLOW]},
    "full": {name: list(full_table(name)) for name in MODELS},
}
# `make bench`'s default: three seeds and four step sizes (in a first run on
# {0.03, 0.1, 0.3}, every forward-only method's best was 0.03, weight DODGE k = 16 on
# the 256-unit MLP diverged at all three, and backprop's best was 0.3). Timing:
# (repeats, seconds per repeat at least).
_STUDY = {"seeds": [0, 1, 2], "learning_rates": [0.01, 0.03, 0.1, 0.3]}
CONFIGS: dict[str, tuple[dict[str, Any], tuple[int, float]]] = {
    "quick": (
        {"seeds": [0, 1], "learning_rates": [0.1, 0.3], "num_updates": 100},
        (5, 0.01),
    ),
    "default": (_STUDY | {"num_updates": 1000}, (7, 0.1)),
    "full": (_STUDY | {"num_updates": 1000}, (7, 0.1)),
}
MNIST1D = "mnist1d MLP 40-128-128-10"
# `--full` on the MLPs: the five seeds, and with SGD a step size of 1.0
# too, since backprop's best on both MLPs was the largest of the default grid. The
# conv net keeps three seeds and four step sizes: its runs are not vmapped (see
# `Model.sequential`), and five seeds would take it from about 45 to 75 minutes per
# optimizer on 2 cores.
FULL_MLP = {"seeds": [0, 1, 2, 3, 4]}
FULL_MLP_SGD_LEARNING_RATES = [0.01, 0.03, 0.1, 0.3, 1.0]
FULL_MODELS = (DIGITS_MLP, MNIST1D)
# With `--adam`, `optax.adam`'s step sizes replace SGD's (the seeds, the updates and
# the timing stay): on the 64-64-10 MLP (`activity_adam.py`) every method's best was
# within {0.003, 0.01, 0.03}, and a first run on the 256-unit MLP had backprop's
# best at 0.01.
ADAM_LEARNING_RATES = {"quick": [1e-3, 1e-2], "default": [3e-4, 1e-3, 3e-3, 0.01, 0.03]}


def step_costs(
    table: dict[str, base.Method],
    data: tuple[jax.Array, ...],
    repeats: int,
    min_time: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seconds per training step of every method and XLA's peak memory of that
    step, each with its ratio to backprop's."""
    x, y = data[0][: base.BATCH], data[1][: base.BATCH]
    key = jax.random.key(1)
    calls, memory = {}, {}
    for name, method in table.items():
        model = method.make_model(jax.random.key(0))
        step = eqx.filter_jit(ft.partial(base.sgd_step, method.estimator))
        compiled = step.lower(model, x, y, key, 0.1).compile()
        calls[name] = ft.partial(compiled, model, x, y, key, 0.1)
        memory[name] = _common.memory_analysis(compiled)
    times = _common.time_interleaved(calls, repeats=repeats, min_time=min_time)
    step_time = {
        name: {
            "seconds": _common.summarize(times[name]),
            "ratio_to_backprop": _common.summarize(
                _common.ratio_samples(times[name], times["backprop"])
            ),
        }
        for name in table
    }
    reference = memory["backprop"]
    for record in memory.values():
        if record is not None and reference is not None:
            record["ratio_to_backprop"] = record["peak_bytes"] / reference["peak_bytes"]
    return step_time, memory


def train_records(
    name: str,
    table: dict[str, base.Method],
    data: tuple[jax.Array, ...],
    config: dict[str, Any],
    log: _common.RunLog | None,
    optimizer: Callable[[jax.Array], optax.GradientTransformation] = optax.sgd,
) -> dict[str, dict[str, Any]]:
    """Every method's record (`activity.method_record`): trained here, or read from
    the `--full` study's `log` where an earlier sitting finished it."""
    records = {}
    for method_name, method in table.items():
        key = f"{name} / {method_name}"
        if log is not None and key in log:
            records[method_name] = without_machine(log.runs[key])
            continue
        start = time.perf_counter()
        runs = base.run_method(
            method,
            config["seeds"],
            config["learning_rates"],
            data,
            config["num_updates"],
            optimizer,
            sequential=MODELS[name].sequential,
        )
        print(
            f"[{name}] {method_name}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
        records[method_name] = base.method_record(
            method, runs, config["learning_rates"]
        )
        if log is not None:
            log.add(key, records[method_name])
    return records


def without_machine(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "machine"}


def timed_costs(
    name: str,
    table: dict[str, base.Method],
    data: tuple[jax.Array, ...],
    timing: tuple[int, float],
    log: _common.RunLog | None,
) -> dict[str, Any]:
    """`step_costs` of every method, or the `--full` study's record of them, with
    the machine they were timed on (its load, its commit)."""
    key = f"{name} / step cost"
    if log is not None and key in log:
        saved = log.runs[key]
        return without_machine(saved) | {"timed_on": saved["machine"]}
    step_time, memory = step_costs(table, data, *timing)
    costs = {"step_time": step_time, "memory": memory}
    if log is not None:
        log.add(key, costs)
    return costs | {"timed_on": _common.machine_info()}


def run_model(
    name: str,
    table: dict[str, base.Method],
    data: tuple[jax.Array, ...],
    config: dict[str, Any],
    records: dict[str, dict[str, Any]],
    timing: tuple[int, float],
    log: _common.RunLog | None = None,
) -> dict[str, Any]:
    """Model `name`'s results: the trained methods' `records` (`train_records`)
    compared with backprop, and the cost of each method's step."""
    model = MODELS[name]
    base.compare_with_backprop(records, len(config["seeds"]), model.goal_points)
    costs = timed_costs(name, table, data, timing, log)
    step_time = costs["step_time"]
    forward_only = [n for n, r in records.items() if r["forward_only"]]
    best = max(forward_only, key=lambda n: records[n]["test_accuracy_mean"])
    cost = step_time[best]["ratio_to_backprop"]["median"]
    for method_name, record in records.items():
        print(
            f"[{name}] {method_name:38s} lr={record['best_learning_rate']:<6} test "
            f"{100 * record['test_accuracy_mean']:.2f} ± "
            f"{100 * record['test_accuracy_std']:.2f} %, gap "
            f"{record['points_below_backprop']:.2f} ± "
            f"{record['gap_standard_error']:.2f}, time "
            f"{step_time[method_name]['ratio_to_backprop']['median']:.2f}x",
            file=sys.stderr,
        )
    return {
        "description": model.description,
        "num_parameters": sum(
            leaf.size
            for leaf in jax.tree.leaves(
                eqx.filter(model.make(jax.random.key(0)), eqx.is_inexact_array)
            )
        ),
        "num_train": int(data[0].shape[0]),
        "num_test": int(data[2].shape[0]),
        "seeds": config["seeds"],
        "learning_rates": config["learning_rates"],
        "goal_points": model.goal_points,
        "best_forward_only": best,
        "accuracy_goal_met": records[best]["within_goal"],
        "cost_goal_met": bool(cost <= base.COST_GOAL),
        "methods_meeting_both_goals": base.both_goals(records, step_time),
        "methods": records,
        **costs,
    }


def plot(results: dict[str, Any], out_dir, filename: str) -> None:
    fig, axes = _common.new_figure(
        1, len(results["models"]), figsize=(15, 4.5), squeeze=False
    )
    for axis, (name, record) in zip(axes[0], results["models"].items()):
        backprop = 100 * record["methods"]["backprop"]["test_accuracy_mean"]
        means = []
        for method_name, method in record["methods"].items():
            ratio = record["step_time"][method_name]["ratio_to_backprop"]["median"]
            mean = 100 * method["test_accuracy_mean"]
            means.append(mean)
            forward_only = method["forward_only"]
            axis.errorbar(
                ratio,
                mean,
                yerr=100 * method["test_accuracy_std"],
                fmt="o" if forward_only else "s",
                capsize=3,
                mfc=None if forward_only else "none",
            )
            axis.annotate(
                method_name,
                (ratio, mean),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        axis.axhline(backprop - record["goal_points"], color="k", ls=":", lw=1)
        axis.axvline(3.0, color="k", ls=":", lw=1)
        axis.set_xlabel("time per SGD step / backprop's (batch 64)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(min(means) - 5, min(100, max(means) + 3))
        seeds = len(record.get("seeds", results["seeds"]))
        axis.set_title(f"{record['description']} ({seeds} seeds)", fontsize=8)
    fig.suptitle(
        f"{results['num_updates']} {results['optimizer']} updates; "
        "dotted: the goal (accuracy, 3× cost); squares use backprop",
        fontsize=9,
    )
    _common.save_figure(fig, out_dir, filename)


def model_config(
    name: str, config: dict[str, Any], full: bool, adam: bool
) -> dict[str, Any]:
    """The seeds, step sizes and updates model `name` is trained with."""
    if not (full and name in FULL_MODELS):
        return config
    rates = {} if adam else {"learning_rates": FULL_MLP_SGD_LEARNING_RATES}
    return config | FULL_MLP | rates


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(
        __doc__,
        argv,
        flags=[
            ("--full", "every model and method, resumable"),
            ("--adam", "optax.adam and its step sizes instead of SGD"),
        ],
    )
    scale = "quick" if args.quick else "full" if args.full else "default"
    config, timing = CONFIGS[scale]
    models = SCALES[scale]
    optimizer = optax.adam if args.adam else optax.sgd
    if args.adam:
        rates = ADAM_LEARNING_RATES["quick" if args.quick else "default"]
        config = config | {"learning_rates": rates}
    configs = {
        name: model_config(name, config, args.full, args.adam) for name in models
    }
    output = "activity_models" + "_adam" * args.adam + "_full" * args.full
    log = (
        _common.RunLog(
            args.out,
            f"{output}_runs",
            config | {"models": models, "per_model": configs},
        )
        if args.full
        else None
    )
    results = {
        "scale": scale,
        "optimizer": "Adam" if args.adam else "SGD",
        **config,
        "batch_size": base.BATCH,
        "groups": GROUPS,
        "selection": "step size with the lowest final training loss, mean over seeds",
        "cost_goal": "step time at most 3x backprop's",
        "runs_in_this_scale": models,
        "models": {},
    }
    tables = {
        name: {method: full_table(name)[method] for method in method_names}
        for name, method_names in models.items()
    }
    data = {name: MODELS[name].load() for name in models}  # mnist1d's is generated
    records = _common.untimed_part(
        args.out,
        output,
        args.stage,
        lambda: {
            name: train_records(
                name, tables[name], data[name], configs[name], log, optimizer
            )
            for name in models
        },
    )
    if records is None:
        return {}
    for name in models:
        results["models"][name] = run_model(
            name, tables[name], data[name], configs[name], records[name], timing, log
        )
    _common.write_json(args.out, output, results)
    plot(results, args.out, output)
    return results


if __name__ == "__main__":
    main()
