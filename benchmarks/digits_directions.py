"""The paper's Figure 1 (a, b) on scikit-learn's real 8×8 digits.

DODGE (Silver et al., ICLR 2022, Fig. 1) trains an MLP on MNIST with k random
directions per update. MNIST cannot be downloaded here, so we use the 1797 real
digits of `sklearn.datasets.load_digits` (64 pixels, 10 classes), inputs scaled to
[0, 1], an MLP 64-32-32-10 (ReLU, p = 3 466 parameters), plain SGD on the DODGE
estimate of `eqx_dodge.filter_dodge`, minibatches drawn with replacement.

a) Training accuracy (on all 1797 digits) against the number of updates for
   k ∈ {1, 2, 5, 10, 20, 50, 100} random Rademacher directions (`mode="average"`) and
   for the oracle direction (the exact gradient as candidate, which gives the
   gradient itself), same number of updates, batch 100, 3 seeds.
b) Batch-size study: 100, 300 or 1000 samples per directional derivative, for
   k ∈ {1, 10}, with the same number of samples seen (so 10×, 3.3× and 1× the
   updates of the batch-1000 run).

c) Network size (`--full` only): training accuracy against the width of the two hidden
   layers, 8 to 256 units, after 1000, 2000, 3000 and 4000 updates, for k ∈ {1, 10},
   batch 100, 3 seeds. A study of tens of minutes on 2 cores: each finished
   (width, k) run is appended to `results/digits_widths_runs.json`
   (`_common.RunLog`), a rerun skips the runs already there, and the summary
   `results/digits_widths.json` and its figure are rewritten from that log after
   every run. `--widths-only` runs panel c) alone (at the `--full` scale, or a tiny
   one with `--quick`).

Step sizes: for every setting we try the SGD step sizes {0.003, 0.01, 0.03, 0.1, 0.3}
and keep the one with the best final training accuracy averaged over seeds (the
paper also picks the best step size per method). Seeds and step sizes
are `vmap`ped: one jitted `lax.scan` per setting.
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
from eqx_dodge._directions import num_coordinates


LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3)
HIDDEN = 32
# Panel c), the paper's Fig. 1c: widths of the two hidden layers, directions per
# update, and the updates after which the accuracy is read (its snapshots).
WIDTHS_STUDY = {
    "full": {
        "widths": [8, 16, 32, 64, 128, 256],
        "num_directions": [1, 10],
        "num_updates": 4000,
        "num_snapshots": 4,
        "seeds": 3,
    },
    # Each (width, k) run is a compilation: the smoke run has two, with one
    # direction (k = 10's program chunks its directions and compiles longer).
    "quick": {
        "widths": [8, 16],
        "num_directions": [1],
        "num_updates": 40,
        "num_snapshots": 2,
        "seeds": 2,
    },
}


def load_data() -> tuple[jax.Array, jax.Array]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, dtype=jnp.float32)  # pyright: ignore
    y = jnp.asarray(digits.target, dtype=jnp.int32)  # pyright: ignore
    return x, y


def make_model(key: jax.Array, width: int = HIDDEN) -> eqx.nn.MLP:
    return eqx.nn.MLP(64, 10, width, 2, activation=jax.nn.relu, key=key)


def loss_fn(model: eqx.nn.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model: eqx.nn.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


def train(
    key: jax.Array,
    lr: jax.Array,
    x: jax.Array,
    y: jax.Array,
    *,
    num_directions: int | None,
    batch_size: int,
    num_updates: int,
    num_evals: int,
    width: int = HIDDEN,
) -> jax.Array:
    """Training accuracy at `num_evals + 1` evenly spaced points of one run.

    `num_directions=None` is the oracle.
    """
    init_key, data_key = jax.random.split(key)
    model = make_model(init_key, width)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    updates_per_eval = num_updates // num_evals

    def step(params, step_keys):
        batch_key, dodge_key = step_keys
        index = jax.random.randint(batch_key, (batch_size,), 0, x.shape[0])
        model = eqx.combine(params, static)
        if num_directions is None:
            gradient = eqx.filter_grad(loss_fn)(model, x[index], y[index])
            estimate = eqx_dodge.filter_dodge(loss_fn, direction=gradient)(
                model, x[index], y[index]
            )
        else:
            estimate = eqx_dodge.filter_dodge(
                loss_fn, key=dodge_key, num_directions=num_directions
            )(model, x[index], y[index])
        return jax.tree.map(lambda w, g: w - lr * g, params, estimate), None

    def evaluation_period(params, period_key):
        keys = jax.random.split(period_key, (updates_per_eval, 2))
        params, _ = jax.lax.scan(step, params, keys)
        return params, accuracy(eqx.combine(params, static), x, y)

    period_keys = jax.random.split(data_key, num_evals)
    _, accuracies = jax.lax.scan(evaluation_period, params, period_keys)
    start = accuracy(model, x, y)
    return jnp.concatenate([start[None], accuracies])


@ft.cache
def setting_grid(
    num_directions: int | None,
    batch_size: int,
    num_updates: int,
    num_evals: int,
    width: int,
) -> Callable:
    """Every step size × seed of one setting, vmapped and jitted: one compilation
    per setting however often it runs (a resumed study reruns some)."""
    run = ft.partial(
        train,
        num_directions=num_directions,
        batch_size=batch_size,
        num_updates=num_updates,
        num_evals=num_evals,
        width=width,
    )
    return jax.jit(
        jax.vmap(jax.vmap(run, (0, None, None, None)), (None, 0, None, None))
    )


def run_setting(
    x: jax.Array,
    y: jax.Array,
    seeds: int,
    num_directions: int | None,
    batch_size: int,
    num_updates: int,
    num_evals: int,
    width: int = HIDDEN,
) -> dict[str, Any]:
    k = num_directions
    lrs = jnp.asarray(LEARNING_RATES, jnp.float32)
    keys = jax.random.split(jax.random.key(0), seeds)
    grid = setting_grid(k, batch_size, num_updates, num_evals, width)
    # accuracies[lr, seed, eval]
    accuracies = np.asarray(grid(keys, lrs, x, y))
    final = accuracies[:, :, -1].mean(axis=1)
    best = int(np.argmax(final))
    return {
        "num_directions": "oracle" if k is None else k,
        "batch_size": batch_size,
        "num_updates": num_updates,
        "learning_rates": [float(v) for v in lrs],
        "best_learning_rate": float(lrs[best]),
        "updates": [i * (num_updates // num_evals) for i in range(num_evals + 1)],
        "accuracy_per_seed": accuracies[best].tolist(),
        "accuracy_mean": accuracies[best].mean(axis=0).tolist(),
        # Every step size's curves, for claims judged per step size (stability).
        "accuracy_per_learning_rate_and_seed": accuracies.tolist(),
        "final_accuracy_per_learning_rate": final.tolist(),
        "final_accuracy_mean": float(final[best]),
        "final_accuracy_std": float(accuracies[best, :, -1].std()),
        "finite": bool(np.all(np.isfinite(accuracies[best]))),
    }


def is_stable(per_seed: np.ndarray) -> bool:
    """Stable: every seed (a row of accuracies over evaluations) improves on its
    start and never falls far below the best accuracy it had reached (no collapse).
    Speed is the other claim's."""
    return bool(
        np.all(np.isfinite(per_seed))
        and np.all(per_seed[:, -1] > per_seed[:, 0] + 0.05)
        and np.all(np.maximum.accumulate(per_seed, axis=1) - per_seed < 0.15)
    )


def claims(
    directions: list[dict[str, Any]], batches: list[dict[str, Any]]
) -> dict[str, Any]:
    """The paper's four claims, checked on the results."""
    random_runs = [r for r in directions if r["num_directions"] != "oracle"]
    finals = [r["final_accuracy_mean"] for r in random_runs]
    ks = [r["num_directions"] for r in random_runs]
    rank = float(
        np.corrcoef(np.argsort(np.argsort(ks)), np.argsort(np.argsort(finals)))[0, 1]
    )
    one = random_runs[0]
    curve = np.asarray(one["accuracy_mean"])
    per_seed = np.asarray(one["accuracy_per_seed"])
    by = {
        (r["num_directions"], r["batch_size"]): r["final_accuracy_mean"]
        for r in batches
    }
    batch_ks = sorted({k for k, _ in by})
    return {
        "more_directions_help": {
            "holds": rank > 0.8 and finals[-1] > finals[0],
            "spearman_k_vs_final_accuracy": rank,
            "final_accuracy_by_k": dict(zip(map(str, ks), finals)),
        },
        "one_direction_is_stable": {
            # At the best step size; the paper's "stable with a single direction"
            # holds only at some step sizes, so each one is judged too.
            "holds": one["finite"] and is_stable(per_seed),
            "best_learning_rate": one["best_learning_rate"],
            "learning_rates": one["learning_rates"],
            "stable_per_learning_rate": [
                is_stable(np.asarray(curves))
                for curves in one["accuracy_per_learning_rate_and_seed"]
            ],
            "start_accuracy_mean": float(curve[0]),
            "final_accuracy_per_learning_rate": one["final_accuracy_per_learning_rate"],
            "final_accuracy_per_seed": per_seed[:, -1].tolist(),
            "largest_drop_below_running_best": float(
                np.max(np.maximum.accumulate(per_seed, axis=1) - per_seed)
            ),
            "final_accuracy_mean": float(curve[-1]),
        },
        "batch_300_beats_100": {
            "holds": all(by[(k, 300)] > by[(k, 100)] for k in batch_ks),
            **{f"k{k}": [by[(k, 100)], by[(k, 300)]] for k in batch_ks},
        },
        "batch_1000_worse_than_300": {
            "holds": all(by[(k, 1000)] < by[(k, 300)] for k in batch_ks),
            **{f"k{k}": [by[(k, 300)], by[(k, 1000)]] for k in batch_ks},
        },
    }


def plot(directions: list[dict[str, Any]], batches: list[dict[str, Any]], out) -> None:
    import matplotlib

    fig, (ax_a, ax_b) = _common.new_figure(1, 2, figsize=(12, 4.5))
    cmap = matplotlib.colormaps["plasma_r"]
    random_runs = [r for r in directions if r["num_directions"] != "oracle"]
    for i, run in enumerate(random_runs):
        per_seed = np.asarray(run["accuracy_per_seed"])
        color = cmap(0.15 + 0.8 * i / max(1, len(random_runs) - 1))
        ax_a.plot(
            run["updates"],
            per_seed.mean(0),
            color=color,
            label=f"k={run['num_directions']}",
        )
        ax_a.fill_between(
            run["updates"], per_seed.min(0), per_seed.max(0), color=color, alpha=0.15
        )
    for run in directions:
        if run["num_directions"] == "oracle":
            ax_a.plot(
                run["updates"], run["accuracy_mean"], color="grey", lw=2, label="oracle"
            )
    ax_a.set_xlabel("updates")
    ax_a.set_ylabel("training accuracy (mean, min–max of 3 seeds)")
    ax_a.set_title("a) DODGE with k random directions, batch 100")
    ax_a.legend(fontsize=8)

    for k in sorted({r["num_directions"] for r in batches}):
        runs = sorted(
            (r for r in batches if r["num_directions"] == k),
            key=lambda r: r["batch_size"],
        )
        ax_b.errorbar(
            [r["batch_size"] for r in runs],
            [r["final_accuracy_mean"] for r in runs],
            yerr=[r["final_accuracy_std"] for r in runs],
            marker="o",
            capsize=3,
            label=f"k={k}",
        )
    ax_b.set_xscale("log")
    ax_b.set_xlabel("samples per directional derivative (batch size)")
    ax_b.set_ylabel("final training accuracy")
    samples = batches[0]["batch_size"] * batches[0]["num_updates"]
    ax_b.set_title(f"b) same number of samples seen ({samples})")
    ax_b.legend(fontsize=8)
    _common.save_figure(fig, out, "digits_directions")


def widths_key(width: int, k: int) -> str:
    return f"width {width} / k {k}"


def widths_study(x: jax.Array, y: jax.Array, log: _common.RunLog) -> dict[str, Any]:
    """Panel c): trains every (width, k) run of `log.config` that `log` does not
    hold yet, appending each to it as soon as it finishes, and rewrites the summary
    and figure from the log after each (a killed study leaves them up to date).
    Fewest directions first, then narrowest first: the cheap runs finish before a
    sitting ends. Returns the summary."""
    config = log.config
    for k in config["num_directions"]:
        for width in config["widths"]:
            key = widths_key(width, k)
            if key in log:
                continue
            print(f"[digits widths] {key}", file=sys.stderr)
            start = time.perf_counter()
            record = run_setting(
                x,
                y,
                config["seeds"],
                k,
                config["batch_size"],
                config["num_updates"],
                num_evals=config["num_snapshots"],
                width=width,
            )
            record["width"] = width
            record["num_parameters"] = num_coordinates(
                make_model(jax.random.key(0), width)
            )
            record["seconds"] = time.perf_counter() - start
            log.add(key, record)
            write_widths_summary(log)
    return write_widths_summary(log)


def write_widths_summary(log: _common.RunLog) -> dict[str, Any]:
    summary = widths_summary(log.config, log.runs)
    _common.write_json(log.out_dir, "digits_widths", summary)
    plot_widths(summary, log.out_dir)
    return summary


def widths_summary(config: dict[str, Any], runs: dict[str, Any]) -> dict[str, Any]:
    """Panel c)'s table from the runs finished so far: per k, one entry per width
    with the accuracy (mean and spread over seeds, at the best step size) at each
    snapshot."""
    table = {}
    for k in config["num_directions"]:
        rows = []
        for width in config["widths"]:
            run = runs.get(widths_key(width, k))
            if run is None:
                continue
            per_seed = np.asarray(run["accuracy_per_seed"])
            rows.append(
                {
                    "width": width,
                    "num_parameters": run["num_parameters"],
                    "best_learning_rate": run["best_learning_rate"],
                    "start_accuracy_mean": float(per_seed[:, 0].mean()),
                    "updates": run["updates"][1:],
                    "accuracy_mean": per_seed.mean(axis=0)[1:].tolist(),
                    "accuracy_min": per_seed.min(axis=0)[1:].tolist(),
                    "accuracy_max": per_seed.max(axis=0)[1:].tolist(),
                    "final_accuracy_per_learning_rate": run[
                        "final_accuracy_per_learning_rate"
                    ],
                    "seconds": run["seconds"],
                }
            )
        table[str(k)] = rows
    expected = [
        widths_key(width, k)
        for width in config["widths"]
        for k in config["num_directions"]
    ]
    return {
        "config": config,
        "runs_finished": [key for key in expected if key in runs],
        "runs_missing": [key for key in expected if key not in runs],
        "by_num_directions": table,
    }


def plot_widths(summary: dict[str, Any], out) -> None:
    import matplotlib

    ks = list(summary["by_num_directions"])
    fig, axes = _common.new_figure(
        1, len(ks), figsize=(5.5 * len(ks), 4.2), sharey=True
    )
    axes = np.atleast_1d(axes)
    cmap = matplotlib.colormaps["viridis_r"]
    config = summary["config"]
    for ax, k in zip(axes, ks):
        rows = summary["by_num_directions"][k]
        if rows:
            widths = [row["width"] for row in rows]
            snapshots = rows[0]["updates"]
            for i, updates in enumerate(snapshots):
                color = cmap(0.15 + 0.8 * i / max(1, len(snapshots) - 1))
                ax.plot(
                    widths,
                    [row["accuracy_mean"][i] for row in rows],
                    marker="o",
                    color=color,
                    label=f"after {updates} updates",
                )
                ax.fill_between(
                    widths,
                    [row["accuracy_min"][i] for row in rows],
                    [row["accuracy_max"][i] for row in rows],
                    color=color,
                    alpha=0.12,
                )
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5, 0.5, "no run finished yet", ha="center", transform=ax.transAxes
            )
        ax.set_xscale("log", base=2)
        ax.set_xlim(config["widths"][0] / 1.3, config["widths"][-1] * 1.3)
        ax.set_ylim(0, 1)
        ax.set_xticks(config["widths"], [str(w) for w in config["widths"]])
        ax.set_xlabel("units in each of the two hidden layers")
        ax.set_ylabel(f"training accuracy (mean, min–max of {config['seeds']} seeds)")
        ax.set_title(f"c) network size, k={k}, batch {config['batch_size']}")
    _common.save_figure(fig, out, "digits_widths")


def run_widths(args: Any, x: jax.Array, y: jax.Array) -> dict[str, Any]:
    """Panel c) at the scale `args` asks for, resuming its run log."""
    config = {
        **WIDTHS_STUDY["quick" if args.quick else "full"],
        "batch_size": 100,
        "learning_rates": LEARNING_RATES,
        "dataset": "sklearn load_digits (1797 × 64, 10 classes)",
        "model": "MLP 64-W-W-10 ReLU",
        "optimizer": "SGD on the DODGE estimate",
    }
    return widths_study(x, y, _common.RunLog(args.out, "digits_widths_runs", config))


def run_panels(args: Any, x: jax.Array, y: jax.Array) -> dict[str, Any]:
    """Panels a) and b) (`make bench`'s run): writes their JSON and figure, returns
    the claims."""
    if args.quick:
        ks, updates, evals, seeds = [1, 4], 60, 3, 2
        batch_ks, samples_seen = [1], 6_000
    else:
        ks, updates, evals, seeds = [1, 2, 5, 10, 20, 50, 100], 2000, 20, 3
        batch_ks, samples_seen = [1, 10], 200_000
    p = num_coordinates(make_model(jax.random.key(0)))
    finished: dict[tuple[int | None, int, int], dict[str, Any]] = {}

    def setting(k: int | None, batch_size: int, num_updates: int) -> dict[str, Any]:
        # The batch study's batch-100 runs are settings of panel a): run once.
        key = (k, batch_size, num_updates)
        if key not in finished:
            finished[key] = run_setting(
                x, y, seeds, k, batch_size, num_updates, num_evals=evals
            )
        return finished[key]

    directions = []
    for k in [*ks, None]:
        print(f"[digits] k={k}", file=sys.stderr)
        directions.append(setting(k, 100, updates))
    batches = []
    for k in batch_ks:
        for batch_size in (100, 300, 1000):
            print(f"[digits] k={k} batch={batch_size}", file=sys.stderr)
            batches.append(setting(k, batch_size, samples_seen // batch_size))
    result_claims = claims(directions, batches)
    _common.write_json(
        args.out,
        "digits_directions",
        {
            "config": {
                "quick": args.quick,
                "dataset": "sklearn load_digits (1797 × 64, 10 classes)",
                "model": f"MLP 64-{HIDDEN}-{HIDDEN}-10 ReLU",
                "num_parameters": p,
                "optimizer": "SGD on the DODGE estimate",
                "learning_rates": LEARNING_RATES,
                "seeds": seeds,
                "num_directions": ks,
                "num_updates": updates,
                "samples_seen_batch_study": samples_seen,
            },
            "directions": directions,
            "batch_study": batches,
            "claims": result_claims,
        },
    )
    plot(directions, batches, args.out)
    for name, value in result_claims.items():
        print(f"{name}: {'holds' if value['holds'] else 'does not hold'}")
    return result_claims


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(
        __doc__,
        argv,
        flags=[
            ("--full", "panels a) and b), then panel c) (network size, resumable)"),
            ("--widths-only", "panel c) alone (resumable; tiny with --quick)"),
        ],
    )
    x, y = load_data()
    results = {}
    if not args.widths_only:
        results["claims"] = run_panels(args, x, y)
    if args.full or args.widths_only:
        results["widths"] = run_widths(args, x, y)
    return results


if __name__ == "__main__":
    main()
