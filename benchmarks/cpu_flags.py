"""XLA:CPU's flags and the cost and memory of k directions.

Two XLA:CPU defaults of jaxlib 0.10 move the numbers of forward mode:

- YNNPACK fusions (`--xla_cpu_experimental_ynn_fusion_type`): some dots,
  element-wise and reduce fusions run in the YNNPACK library. Single large matmuls
  get faster, the batched work of k directions may not.
- the concurrency-optimised scheduler
  (`--xla_cpu_enable_concurrency_optimized_scheduler`): XLA orders the operations to
  run independent ones side by side. For a jvp that can mean the forward pass run
  ahead of the tangents, with several layers' activations alive at once where the
  plain memory-minimising scheduler would interleave them.

For each model of `_models.py` this times `forward`, `eqx.filter_grad`,
`eqx_dodge.filter_dodge` with one and with k directions, and the k-direction listing
a user writes by hand (`jax.vmap` of `jax.jvp` over k stacked directions passed in,
then the mean of the k products), and records each one's compiled temporary memory
(XLA's estimate; plus `conv_deep`, an eight-layer conv net compiled but not timed),
under three settings of `XLA_FLAGS`:

- `default`: none;
- `ynn_off`: `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusion);
- `scheduler_off`: `--xla_cpu_enable_concurrency_optimized_scheduler=false`.

XLA reads its flags once per process, so every (round, setting) runs in a fresh
interpreter (`--point`), the settings' order rotating each round; within a process
the computations are timed interleaved (`_common.time_interleaved`). Reported: per
model and setting, the median over rounds of each process's median milliseconds,
each setting's time over the default's per computation (below 1: faster than the
default), and the memory (the same in every round: compilation is deterministic).

Run: `python benchmarks/cpu_flags.py [--quick | --full] [--out DIR]` (`--full` adds
the 784-2048-2048-10 MLP and a third round).
"""

import functools as ft
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import _common
import _models
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_dodge


SETTINGS = {
    "default": "",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "scheduler_off": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}
CHANGED = tuple(setting for setting in SETTINGS if setting != "default")
COMPUTATIONS = ("forward", "grad", "dodge_k1", "dodge_k", "listing_k")
CONFIGS: dict[str, dict[str, Any]] = {
    "quick": dict(
        models=("mlp",), memory_only=(), k=2, rounds=1, repeats=5, min_time=0.01
    ),
    "default": dict(
        models=("mlp", "conv", "lstm"),
        memory_only=("conv_deep",),
        k=8,
        rounds=1,
        repeats=5,
    ),
    "full": dict(
        models=("mlp", "conv", "lstm", "mlp_large"),
        memory_only=("conv_deep",),
        k=8,
        rounds=3,
        repeats=5,
    ),
}


def problems(names: Sequence[str], quick: bool) -> dict[str, _models.Problem]:
    """The problems of `_models.py` named in `names`, built once each."""
    found = {p.name: p for p in _models.make_problems(jax.random.key(0), quick=quick)}
    if "mlp_large" in names:
        found["mlp_large"] = _models.large_mlp_problem(jax.random.key(0))
    if "conv_deep" in names:
        found["conv_deep"] = _models.deep_conv_problem(jax.random.key(0))
    return {name: found[name] for name in names}


def step_functions(problem: _models.Problem, k: int) -> dict[str, Any]:
    """The compiled `COMPUTATIONS` on `problem`, each as `(call, temp_bytes)`: a
    zero-argument call and XLA's temporary memory for it."""
    loss, model, x, y = problem.loss, problem.model, problem.x, problem.y
    params, static = eqx.partition(model, eqx.is_inexact_array)
    key = jax.random.key(1)
    directions = jax.vmap(lambda kk: eqx_dodge.random_direction(kk, params))(
        jax.random.split(key, k)
    )

    def loss_of_params(p):
        return loss(eqx.combine(p, static), x, y)

    def listing(p, directions):
        def one(u):
            value, derivative = jax.jvp(loss_of_params, (p,), (u,))
            return value, jax.tree.map(lambda leaf: derivative * leaf, u)

        values, products = jax.vmap(one)(directions)
        return values[0], jax.tree.map(lambda e: jnp.mean(e, axis=0), products)

    def dodge(num_directions, model, key):
        estimator = eqx_dodge.filter_dodge(loss, key=key, num_directions=num_directions)
        return estimator(model, x, y)

    # Every array an argument, none closed over, so that XLA cannot fold them away.
    calls = {
        "forward": (loss_of_params, (params,)),
        "grad": (jax.grad(loss_of_params), (params,)),
        "dodge_k1": (ft.partial(dodge, 1), (model, key)),
        "dodge_k": (ft.partial(dodge, k), (model, key)),
        "listing_k": (listing, (params, directions)),
    }
    compiled = {}
    for name, (fun, arguments) in calls.items():
        executable = eqx.filter_jit(fun).lower(*arguments).compile()
        memory = (_common.memory_analysis(executable) or {}).get("temp_size", 0)
        compiled[name] = (ft.partial(executable, *arguments), memory)
    return compiled


def point(scale: str, setting: str) -> dict[str, dict[str, dict[str, float]]]:
    """One process's medians (seconds) of every computation on every model, and
    their temporary memory (bytes; also for the memory-only models)."""
    if os.environ.get("XLA_FLAGS", "") != SETTINGS[setting]:
        raise SystemExit(f"--point {setting} runs with XLA_FLAGS={SETTINGS[setting]!r}")
    config = CONFIGS[scale]
    names = (*config["models"], *config["memory_only"])
    medians, temp_bytes = {}, {}
    for name, problem in problems(names, scale == "quick").items():
        compiled = step_functions(problem, config["k"])
        temp_bytes[name] = {c: memory for c, (_, memory) in compiled.items()}
        if name in config["memory_only"]:
            continue
        times = _common.time_interleaved(
            {c: call for c, (call, _) in compiled.items()},
            repeats=config["repeats"],
            min_time=config.get("min_time", 0.05),
        )
        medians[name] = {c: statistics.median(t) for c, t in times.items()}
    return {"seconds": medians, "temp_bytes": temp_bytes}


def run_point(scale: str, setting: str) -> dict[str, Any]:
    """`point` in a fresh interpreter with the setting's `XLA_FLAGS`."""
    env = {"XLA_FLAGS": SETTINGS[setting]}
    record = _common.run_point(__file__, scale, setting, env=env)
    if "error" in record:
        raise SystemExit(f"{setting} point failed:\n{record['error']}")
    return record


def summarise(rounds: list[dict[str, dict]], config: dict[str, Any]) -> dict:
    """Per model: each setting's median over rounds of each computation (ms), each
    changed setting's time over the default's, and each setting's temporary memory
    (MiB, from the first round; the memory-only models have only that)."""
    results = {}
    for model in (*config["models"], *config["memory_only"]):
        mib = {
            setting: {
                c: rounds[0][setting]["temp_bytes"][model][c] / 2**20
                for c in COMPUTATIONS
            }
            for setting in SETTINGS
        }
        if model in config["memory_only"]:
            results[model] = {"temp_mib": mib}
            continue
        ms = {
            setting: {
                c: 1e3
                * statistics.median(r[setting]["seconds"][model][c] for r in rounds)
                for c in COMPUTATIONS
            }
            for setting in SETTINGS
        }
        over_default = {
            setting: {c: ms[setting][c] / ms["default"][c] for c in COMPUTATIONS}
            for setting in CHANGED
        }
        results[model] = {
            "milliseconds": ms,
            "over_default": over_default,
            "temp_mib": mib,
        }
    return results


def plot(results: dict, out_dir: Any, name: str) -> None:
    """Left: each changed setting's time over the default's, per model and
    computation. Right: `filter_dodge` with k directions' temporary memory under each
    setting, next to backprop's under the default."""
    figure, (time_axis, memory_axis) = _common.new_figure(1, 2, figsize=(13, 4.5))
    timed = [m for m in results if "over_default" in results[m]]
    groups = [(m, s) for m in timed for s in CHANGED]
    width = 0.8 / len(COMPUTATIONS)
    for i, computation in enumerate(COMPUTATIONS):
        values = [results[m]["over_default"][s][computation] for m, s in groups]
        positions = np.arange(len(groups)) + (i - (len(COMPUTATIONS) - 1) / 2) * width
        time_axis.bar(positions, values, width, label=computation)
    time_axis.axhline(1.0, color="grey", lw=1, ls=":")
    time_axis.set_xticks(range(len(groups)), [f"{m}\n{s}" for m, s in groups])
    time_axis.tick_params(axis="x", labelsize=7)
    time_axis.set_yscale("log")
    time_axis.set_ylabel("time / time with XLA's defaults")
    time_axis.set_title("time (below 1: faster than the defaults)")
    time_axis.legend(fontsize=7)

    models = list(results)
    width = 0.8 / len(SETTINGS)
    for i, setting in enumerate(SETTINGS):
        values = [results[m]["temp_mib"][setting]["dodge_k"] for m in models]
        positions = np.arange(len(models)) + (i - (len(SETTINGS) - 1) / 2) * width
        memory_axis.bar(positions, values, width, label=f"filter_dodge k, {setting}")
    memory_axis.scatter(
        range(len(models)),
        [results[m]["temp_mib"]["default"]["grad"] for m in models],
        color="black",
        marker="_",
        s=400,
        label="filter_grad, default",
        zorder=3,
    )
    memory_axis.set_xticks(range(len(models)), models)
    memory_axis.set_yscale("log")
    memory_axis.set_ylabel("XLA temporary memory (MiB)")
    memory_axis.set_title("memory")
    memory_axis.legend(fontsize=7)
    _common.save_figure(figure, out_dir, name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--point"]:
        print(json.dumps(point(*argv[1:3])))
        return {}
    args = _common.parse_args(__doc__, argv, flags=[("--full", "every model")])
    scale = "quick" if args.quick else "full" if args.full else "default"
    config = CONFIGS[scale]
    order = list(SETTINGS)
    rounds = []
    for i in range(config["rounds"]):
        settings = order[i % len(order) :] + order[: i % len(order)]
        rounds.append({s: run_point(scale, s) for s in settings})
        print(f"round {i + 1} of {config['rounds']} done", file=sys.stderr)
    results = summarise(rounds, config)
    output = "cpu_flags" + "_full" * args.full
    _common.write_json(
        args.out,
        output,
        {
            "config": {"scale": scale, **config, "settings": SETTINGS},
            "descriptions": {
                name: problem.description
                for name, problem in problems(
                    (*config["models"], *config["memory_only"]), args.quick
                ).items()
            },
            "results": results,
        },
    )
    plot(results, args.out, output)
    for model, result in results.items():
        for setting, ratios in result.get("over_default", {}).items():
            print(
                model, setting, " ".join(f"{c} {ratios[c]:.2f}" for c in COMPUTATIONS)
            )
        mib = result["temp_mib"]
        print(model, "MiB", {s: round(mib[s]["dodge_k"], 2) for s in SETTINGS})
    return results


if __name__ == "__main__":
    main()
