"""Cost of one DODGE gradient estimate against its limits and against backprop.

For each model of `_models.py` (MLP, conv net, LSTM), all in one process:

- `forward`: the loss alone;
- `grad`: `eqx.filter_grad` (reverse mode);
- `grad_remat`: `eqx.filter_grad` of the same loss rematerialised, as users short of
    memory write it for backprop (`_models`: every layer under
    `eqx.filter_checkpoint` for the MLP and conv net, √T checkpointed segments of
    the scan for the LSTM);
- `listing1`: the paper's Listing 1 written by hand — `jax.jvp` of the loss along
    `eqx_dodge.random_direction(key, params)`, times the direction;
- `listing1_rademacher`: the same with `jax.random.rademacher` leaf by leaf (what a
    user would write first);
- `jvp_fixed_direction`: the jvp and the product alone, along a direction passed in
    (drawn outside the timed function): forward mode's own cost, without a sampler;
- `dodge_k1`: `eqx_dodge.filter_dodge(loss, key=key)`;
- `central_k1`: `filter_dodge(loss, key=key, derivative="central")`, the
    zeroth-order peer (SPSA / MeZO style): the derivative along the same direction
    by central differences, two forward passes and no tangent; reported with its
    relative distance to the forward-mode estimate;
- `average_k`, `partition_k`: `filter_dodge` with `num_directions=k`.

Ratios (each the median of repeat-by-repeat ratios of interleaved repeats):
`dodge_k1 / listing1` (goal ≤ 1.05), `dodge_k1 / forward` (goal ≤ 2.0),
`dodge_k1 / grad`, `dodge_k1 / grad_remat`, `grad_remat / grad`,
`jvp_fixed_direction / forward` (forward mode without sampling;
not a strict floor, as XLA may lay out a direction drawn inside the step better than
one passed in) and `time(k) / (k · time(1))` per mode (goal ≤ 1.0). Peak memory comes
from XLA's compiled memory analysis.
"""

import functools as ft
import sys
from collections.abc import Sequence
from typing import Any

import _common
import _models
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_dodge


GOALS = {
    "dodge_k1_over_listing1": 1.05,
    "dodge_k1_over_forward": 2.0,
    "scaling": 1.0,
}
# `--large`: the wide MLP where the sampler and each extra direction's tangent weigh
# most. The goals. By arithmetic a tangent costs 1.72 forward passes of FLOPs
# here, so with the forward pass shared and every FLOP at the same rate
# time(8)/(8·time(1)) ≥ (1 + 8·1.72)/(8·2.72) = 0.68: 0.6 needs the k tangents of
# one vectorised jvp to run faster per FLOP than one (the report prints the same
# bound from the measured parts). DODGE over the jvp along a given direction: the
# issue estimated about 1.06 from writing 23 MB of signs; measured, 1.04.
LARGE_GOALS = {
    "dodge_k1_over_jvp_fixed_direction": 1.08,
    "scaling_k8": 0.6,
}


def step_functions(problem: _models.Problem, ks: Sequence[int]) -> dict[str, Any]:
    """Jitted functions `(model, key) -> output` for every variant timed, except
    `jvp_fixed_direction`, whose second argument is the direction."""
    loss, x, y = problem.loss, problem.x, problem.y

    def forward(model, key):
        del key
        return loss(model, x, y)

    def grad(model, key):
        del key
        return eqx.filter_grad(loss)(model, x, y)

    def grad_remat(model, key):
        del key
        return eqx.filter_grad(problem.remat_loss)(model, x, y)

    def jvp_fixed_direction(model, direction):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_of_params(p):
            return loss(eqx.combine(p, static), x, y)

        value, derivative = jax.jvp(loss_of_params, (params,), (direction,))
        return value, jax.tree.map(lambda u: derivative * u, direction)

    def listing1(model, key):
        return jvp_fixed_direction(model, eqx_dodge.random_direction(key, model))

    def listing1_rademacher(model, key):
        params = eqx.filter(model, eqx.is_inexact_array)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        direction = jax.tree.unflatten(
            treedef,
            [
                jax.random.rademacher(k, leaf.shape, leaf.dtype)
                for k, leaf in zip(keys, leaves)
            ],
        )
        return jvp_fixed_direction(model, direction)

    def dodge(model, key, num_directions, mode, derivative="jvp"):
        return eqx_dodge.filter_dodge(
            loss,
            key=key,
            num_directions=num_directions,
            mode=mode,
            derivative=derivative,
        )(model, x, y)

    funs: dict[str, Any] = {
        "forward": forward,
        "grad": grad,
        "grad_remat": grad_remat,
        "listing1": listing1,
        "listing1_rademacher": listing1_rademacher,
        "jvp_fixed_direction": jvp_fixed_direction,
        "dodge_k1": ft.partial(dodge, num_directions=1, mode="average"),
        "central_k1": ft.partial(
            dodge, num_directions=1, mode="average", derivative="central"
        ),
    }
    for mode in ("average", "partition"):
        for k in ks:
            if k > 1:
                funs[f"{mode}_k{k}"] = ft.partial(dodge, num_directions=k, mode=mode)
    return {name: eqx.filter_jit(fun) for name, fun in funs.items()}


def run_problem(
    problem: _models.Problem, ks: Sequence[int], repeats: int, min_time: float
) -> dict[str, Any]:
    key = jax.random.key(1)
    model = problem.model
    # An argument, not a closed-over constant, so that XLA cannot fold it away.
    direction = eqx_dodge.random_direction(key, model)
    print(f"[{problem.name}] compiling", file=sys.stderr)
    calls, compiled = {}, {}
    for name, fun in step_functions(problem, ks).items():
        second = direction if name == "jvp_fixed_direction" else key
        compiled[name] = fun.lower(model, second).compile()
        calls[name] = ft.partial(compiled[name], model, second)
    print(f"[{problem.name}] timing {len(calls)} variants", file=sys.stderr)

    base_names = [
        "forward",
        "grad",
        "grad_remat",
        "listing1",
        "listing1_rademacher",
        "jvp_fixed_direction",
        "dodge_k1",
        "central_k1",
    ]
    times = _common.time_interleaved(
        {name: calls[name] for name in base_names},
        repeats=repeats,
        min_time=min_time,
    )
    scaling_names = ["dodge_k1"] + [n for n in calls if n not in base_names]
    scaling_times = _common.time_interleaved(
        {name: calls[name] for name in scaling_names},
        repeats=repeats,
        min_time=min_time,
    )
    # The k = 1 step of the scaling group is the reference of that group's ratios.
    one = scaling_times.pop("dodge_k1")
    times.update(scaling_times)

    ratios = {
        "dodge_k1_over_listing1": _common.ratio_samples(
            times["dodge_k1"], times["listing1"]
        ),
        "dodge_k1_over_forward": _common.ratio_samples(
            times["dodge_k1"], times["forward"]
        ),
        "dodge_k1_over_grad": _common.ratio_samples(times["dodge_k1"], times["grad"]),
        "dodge_k1_over_grad_remat": _common.ratio_samples(
            times["dodge_k1"], times["grad_remat"]
        ),
        "grad_remat_over_grad": _common.ratio_samples(
            times["grad_remat"], times["grad"]
        ),
        "central_k1_over_dodge_k1": _common.ratio_samples(
            times["central_k1"], times["dodge_k1"]
        ),
        "jvp_fixed_direction_over_forward": _common.ratio_samples(
            times["jvp_fixed_direction"], times["forward"]
        ),
        "dodge_k1_over_jvp_fixed_direction": _common.ratio_samples(
            times["dodge_k1"], times["jvp_fixed_direction"]
        ),
        "listing1_rademacher_over_listing1": _common.ratio_samples(
            times["listing1_rademacher"], times["listing1"]
        ),
    }
    scaling: dict[str, dict[str, Any]] = {"average": {}, "partition": {}}
    for mode in scaling:
        scaling[mode]["1"] = _common.summarize([1.0] * len(one))
        for k in ks:
            if k > 1:
                samples = _common.ratio_samples(times[f"{mode}_k{k}"], one, scale=k)
                scaling[mode][str(k)] = _common.summarize(samples)

    memory = {name: _common.memory_analysis(fun) for name, fun in compiled.items()}
    # The same direction (same key), the derivative by forward mode or by central
    # differences: how far apart the two estimates are.
    exact, central = calls["dodge_k1"](), calls["central_k1"]()
    difference = jax.tree.map(lambda a, b: a - b, central, exact)
    central_error = float(optax.tree.norm(difference) / optax.tree.norm(exact))
    return {
        "central_k1_relative_error": central_error,
        "description": problem.description,
        "num_parameters": sum(
            x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        ),
        "seconds": {name: _common.summarize(t) for name, t in times.items()},
        "seconds_dodge_k1_scaling_group": _common.summarize(one),
        "ratios": {name: _common.summarize(r) for name, r in ratios.items()},
        "scaling": scaling,
        "memory_bytes": memory,
    }


def plot(results: dict[str, Any], ks: Sequence[int], out_dir: Any, figure: str) -> None:
    fig, axes = _common.new_figure(1, 3, figsize=(15, 4.2))
    names = list(results)
    variants = ["forward", "grad", "listing1", "dodge_k1"]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [results[n]["seconds"][variant]["median"] * 1e3 for n in names]
        lows = [
            v - results[n]["seconds"][variant]["q1"] * 1e3
            for v, n in zip(values, names)
        ]
        highs = [
            results[n]["seconds"][variant]["q3"] * 1e3 - v
            for v, n in zip(values, names)
        ]
        positions = [
            j + (i - (len(variants) - 1) / 2) * width for j in range(len(names))
        ]
        axes[0].bar(positions, values, width, yerr=[lows, highs], label=variant)
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per step (median, IQR)")
    axes[0].set_title("One gradient estimate")
    axes[0].legend(fontsize=8)

    for name in names:
        for mode, style in (("average", "-"), ("partition", "--")):
            data = results[name]["scaling"][mode]
            xs = [k for k in ks if str(k) in data]
            axes[1].plot(
                xs,
                [data[str(k)]["median"] for k in xs],
                style,
                marker="o",
                label=f"{name} {mode}",
            )
    axes[1].axhline(GOALS["scaling"], color="grey", lw=1, ls=":")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("number of directions k")
    axes[1].set_ylabel("time(k) / (k · time(1))")
    axes[1].set_title("Scaling in k (goal ≤ 1)")
    axes[1].legend(fontsize=7)

    for name in names:
        memory = results[name]["memory_bytes"]
        for mode, style in (("average", "-"), ("partition", "--")):
            xs = [k for k in ks if k == 1 or f"{mode}_k{k}" in memory]
            keys = ["dodge_k1" if k == 1 else f"{mode}_k{k}" for k in xs]
            axes[2].plot(
                xs,
                [memory[key]["peak_bytes"] / 2**20 for key in keys],
                style,
                marker="o",
                label=f"{name} {mode}",
            )
        axes[2].axhline(
            memory["grad"]["peak_bytes"] / 2**20, lw=0.8, ls=":", color="grey"
        )
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("number of directions k")
    axes[2].set_ylabel("XLA peak memory (MiB); dotted: filter_grad")
    axes[2].set_title("Compiled peak memory")
    axes[2].legend(fontsize=7)
    _common.save_figure(fig, out_dir, figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    large_help = (
        "time the 784-2048-2048-10 MLP (p = 5.8 M) with k = 1, 8 only, into "
        "step_cost_large.json"
    )
    args = _common.parse_args(__doc__, argv, flags=[("--large", large_help)])
    repeats, min_time = (5, 0.01) if args.quick else (9, 0.1)
    if args.large:
        ks, problems = [1, 8], [_models.large_mlp_problem(jax.random.key(0))]
    else:
        # Every k is two more compilations and timings per model (average and
        # partition): the powers of 4 and the k = 8 users often pick.
        ks = [1, 2] if args.quick else [1, 4, 8, 16, 64]
        problems = _models.make_problems(jax.random.key(0), quick=args.quick)
    if args.quick and not args.large:
        # The smoke run times every variant on the MLP: each variant is a
        # compilation, and the looped and conv models' losses, rematerialised ones
        # included, have tests of their own (tests/test_benchmark_models.py).
        problems = [problem for problem in problems if problem.name == "mlp"]
    results = {p.name: run_problem(p, ks, repeats, min_time) for p in problems}
    output = "step_cost_large" if args.large else "step_cost"
    _common.write_json(
        args.out,
        output,
        {
            "config": {
                "quick": args.quick,
                "large": args.large,
                "num_directions": ks,
                "repeats": repeats,
                "min_seconds_per_repeat": min_time,
                "dtype": str(jnp.result_type(float)),
            },
            "goals": LARGE_GOALS if args.large else GOALS,
            "results": results,
        },
    )
    plot(results, ks, args.out, output)
    for name, result in results.items():
        r = result["ratios"]
        print(
            f"{name:5s} k1/listing1 {r['dodge_k1_over_listing1']['median']:.3f}  "
            f"k1/forward {r['dodge_k1_over_forward']['median']:.3f}  "
            f"k1/grad {r['dodge_k1_over_grad']['median']:.3f}  "
            f"jvp/forward {r['jvp_fixed_direction_over_forward']['median']:.3f}  "
            "scaling "
            + " ".join(
                f"{mode[0]}{k}:{v['median']:.2f}"
                for mode, data in result["scaling"].items()
                for k, v in data.items()
                if k != "1"
            )
        )
    return results


if __name__ == "__main__":
    main()
