"""`activity.py`'s comparison with Adam instead of plain SGD.

Issue 15's protocol asks for both optimizers: the same digits split, MLP 64-64-10,
1000 updates on minibatches of 64, 5 seeds and per-seed data and keys as
`activity.py`, each method's estimate fed to `optax.adam` (default betas), with the
step-size grid {1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1} for every method and the
step size of lowest mean final training loss kept. Methods: backprop and the
forward-only ones (weight DODGE k = 1 and k = 16, activity perturbation global and
with separate layers, LG-FG-A and its 8 group-wise form); `activity.py` has the
backprop-within-blocks controls. Reported: test accuracy, mean ± standard deviation
over seeds, and the gap to backprop with its standard error.

No timings: an Adam step costs what `activity.py` measures for an SGD step plus an
elementwise update, so `run_all.py` runs this script beside the other untimed ones.

Run: `python benchmarks/activity_adam.py [--quick] [--out DIR]`.
"""

import sys
import time
from collections.abc import Sequence
from typing import Any

import _common
import activity
import optax


LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1)
METHODS = (
    "backprop",
    "weight DODGE k=1",
    "weight DODGE k=16",
    "activity, global",
    "activity, separate layers",
    "activity, separate layers k=16",
    "local losses, activity (LG-FG-A)",
    "8 group-wise local losses, activity",
)
# The smoke run: one weight-space and one activity method beside backprop, the
# cheapest to compile.
QUICK_METHODS = ("backprop", "weight DODGE k=1", "activity, separate layers")


def plot(results: dict[str, Any], out_dir) -> None:
    figure, axis = _common.new_figure(1, 1, figsize=(7, 4))
    title = (
        f"digits, MLP 64-{activity.HIDDEN}-10, {results['num_updates']} Adam "
        f"updates, {len(results['seeds'])} seeds (dotted: backprop − "
        f"{results['goal_points']:g} point)"
    )
    activity.plot_accuracies(axis, results, title, "tab:orange")
    _common.save_figure(figure, out_dir, "activity_adam")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv)
    if args.quick:
        seeds, rates, num_updates, names = (0, 1), (1e-3, 1e-2), 100, QUICK_METHODS
    else:
        seeds, rates, num_updates, names = (
            (0, 1, 2, 3, 4),
            LEARNING_RATES,
            1000,
            METHODS,
        )
    data = activity.load_data()
    methods = {}
    for name in names:
        method = activity.METHODS[name]
        start = time.perf_counter()
        runs = activity.run_method(
            method, seeds, rates, data, num_updates, optimizer=optax.adam
        )
        methods[name] = activity.method_record(method, runs, rates)
        print(
            f"{name:36s} lr={methods[name]['best_learning_rate']:<7} test "
            f"{100 * methods[name]['test_accuracy_mean']:.2f} ± "
            f"{100 * methods[name]['test_accuracy_std']:.2f} % "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    activity.compare_with_backprop(methods, len(seeds), activity.GOAL_POINTS)
    forward_only = [n for n, r in methods.items() if r["forward_only"]]
    best = max(forward_only, key=lambda n: methods[n]["test_accuracy_mean"])
    results = {
        "quick": args.quick,
        "optimizer": "optax.adam (b1 = 0.9, b2 = 0.999, eps = 1e-8)",
        "seeds": list(seeds),
        "learning_rates": list(rates),
        "num_updates": num_updates,
        "batch_size": activity.BATCH,
        "hidden": activity.HIDDEN,
        "selection": "step size with the lowest final training loss, mean over seeds",
        "goal_points": activity.GOAL_POINTS,
        "best_forward_only": best,
        "goal_met": methods[best]["within_goal"],
        "methods": methods,
    }
    _common.write_json(args.out, "activity_adam", results)
    plot(results, args.out)
    return results


if __name__ == "__main__":
    main()
