"""XLA:CPU's YNNPACK fusions and the cost of k directions.

jaxlib 0.10 hands some of XLA:CPU's dots, element-wise and reduce fusions to the
YNNPACK library by default (`--xla_cpu_experimental_ynn_fusion_type`). Whether that
helps depends on the model: single large matmuls get faster, the batched work of k
directions may not. For each model of `_models.py` this times `forward`,
`eqx.filter_grad`, `eqx_dodge.filter_dodge` with one and with k directions, and the
k-direction listing a user writes by hand (`jax.vmap` of `jax.jvp` over k stacked
directions passed in, then the mean of the k products), under two settings of
`XLA_FLAGS`:

- `default`: none (YNNPACK fusions on);
- `ynn_off`: `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusion).

XLA reads its flags once per process, so every (round, setting) runs in a fresh
interpreter (`--point`), the settings alternating and their order swapped each round;
within a process the computations are timed interleaved (`_common.time_interleaved`).
Reported: per model and setting, the median over rounds of each process's median
milliseconds, and `ynn_off / default` per computation (below 1: faster without
YNNPACK).

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


SETTINGS = {"default": "", "ynn_off": "--xla_cpu_experimental_ynn_fusion_type="}
COMPUTATIONS = ("forward", "grad", "dodge_k1", "dodge_k", "listing_k")
CONFIGS: dict[str, dict[str, Any]] = {
    "quick": dict(models=("mlp",), k=2, rounds=1, repeats=5, min_time=0.01),
    "default": dict(models=("mlp", "conv", "lstm"), k=8, rounds=1, repeats=5),
    "full": dict(models=("mlp", "conv", "lstm", "mlp_large"), k=8, rounds=3, repeats=5),
}


def problems(names: Sequence[str], quick: bool) -> dict[str, _models.Problem]:
    """The problems of `_models.py` named in `names`, built once each."""
    found = {p.name: p for p in _models.make_problems(jax.random.key(0), quick=quick)}
    if "mlp_large" in names:
        found["mlp_large"] = _models.large_mlp_problem(jax.random.key(0))
    return {name: found[name] for name in names}


def step_functions(problem: _models.Problem, k: int) -> dict[str, Any]:
    """Zero-argument calls of the compiled `COMPUTATIONS` on `problem`."""
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
        compiled[name] = ft.partial(eqx.filter_jit(fun), *arguments)
    return compiled


def point(scale: str, setting: str) -> dict[str, dict[str, float]]:
    """One process's medians (seconds) of every computation on every model."""
    if os.environ.get("XLA_FLAGS", "") != SETTINGS[setting]:
        raise SystemExit(f"--point {setting} runs with XLA_FLAGS={SETTINGS[setting]!r}")
    config = CONFIGS[scale]
    medians = {}
    for name, problem in problems(config["models"], scale == "quick").items():
        calls = step_functions(problem, config["k"])
        times = _common.time_interleaved(
            calls,
            repeats=config["repeats"],
            min_time=config.get("min_time", 0.05),
        )
        medians[name] = {c: statistics.median(t) for c, t in times.items()}
    return medians


def run_point(scale: str, setting: str) -> dict[str, dict[str, float]]:
    """`point` in a fresh interpreter with the setting's `XLA_FLAGS`."""
    env = {"XLA_FLAGS": SETTINGS[setting]}
    record = _common.run_point(__file__, scale, setting, env=env)
    if "error" in record:
        raise SystemExit(f"{setting} point failed:\n{record['error']}")
    return record


def summarise(rounds: list[dict[str, dict]], models: Sequence[str]) -> dict:
    """Per model: each setting's median over rounds of each computation (ms), and
    the ratio `ynn_off / default`."""
    results = {}
    for model in models:
        ms = {
            setting: {
                c: 1e3 * statistics.median(r[setting][model][c] for r in rounds)
                for c in COMPUTATIONS
            }
            for setting in SETTINGS
        }
        ratio = {c: ms["ynn_off"][c] / ms["default"][c] for c in COMPUTATIONS}
        results[model] = {"milliseconds": ms, "ynn_off_over_default": ratio}
    return results


def plot(results: dict, out_dir: Any, name: str) -> None:
    figure, axis = _common.new_figure(1, 1, figsize=(8, 4))
    models = list(results)
    width = 0.8 / len(COMPUTATIONS)
    for i, computation in enumerate(COMPUTATIONS):
        values = [results[m]["ynn_off_over_default"][computation] for m in models]
        positions = np.arange(len(models)) + (i - (len(COMPUTATIONS) - 1) / 2) * width
        axis.bar(positions, values, width, label=computation)
    axis.axhline(1.0, color="grey", lw=1, ls=":")
    axis.set_xticks(range(len(models)), models)
    axis.set_yscale("log")
    axis.set_ylabel("time without / with YNNPACK fusions")
    axis.set_title("XLA:CPU YNNPACK fusions (below 1: faster without)")
    axis.legend(fontsize=8)
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
        settings = order if i % 2 == 0 else order[::-1]
        rounds.append({s: run_point(scale, s) for s in settings})
        print(f"round {i + 1} of {config['rounds']} done", file=sys.stderr)
    results = summarise(rounds, config["models"])
    output = "cpu_flags" + "_full" * args.full
    _common.write_json(
        args.out,
        output,
        {
            "config": {"scale": scale, **config, "settings": SETTINGS},
            "descriptions": {
                name: problem.description
                for name, problem in problems(config["models"], args.quick).items()
            },
            "results": results,
        },
    )
    plot(results, args.out, output)
    for model, result in results.items():
        ratios = result["ynn_off_over_default"]
        print(model, " ".join(f"{c} {ratios[c]:.2f}" for c in COMPUTATIONS))
    return results


if __name__ == "__main__":
    main()
