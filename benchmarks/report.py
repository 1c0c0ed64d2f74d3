"""Writes the README's "Performance" section from `benchmarks/results/*.json`, and
the docs pages' result tables (`_docs_tables.py`).

Every number in the section comes from a result file; nothing is typed by hand. The
section is the text between `<!-- performance:start -->` and
`<!-- performance:end -->` in README.md. `--check` only says whether the README is up
to date with the results.
"""

import argparse
import json
import math
import pathlib
import re
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import _docs_tables


ROOT = pathlib.Path(__file__).resolve().parent.parent
START = "<!-- performance:start -->"
END = "<!-- performance:end -->"


def _ms(entry: dict[str, Any]) -> str:
    return (
        f"{entry['median'] * 1e3:.2f} ({entry['q1'] * 1e3:.2f}–{entry['q3'] * 1e3:.2f})"
    )


def _ratio(entry: dict[str, Any], goal: float | None = None) -> str:
    text = f"{entry['median']:.2f} ({entry['q1']:.2f}–{entry['q3']:.2f})"
    if goal is not None:
        text += " ✓" if entry["median"] <= goal else " ✗"
    return text


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _machine(record: dict[str, Any]) -> str:
    m = record["machine"]
    load = m.get("load_average_1_5_15min")
    parts = [m.get("cpu", m.get("processor", "CPU")), f"{m['cpu_count']} cores"]
    parts += [f"jax {m['jax']}"] + [m[key] for key in ("date_utc",) if key in m]
    if m.get("backend", "cpu") != "cpu":
        parts.insert(0, m["device_kind"])
    return ", ".join(parts) + (f", load average {load[0]}" if load else "")


def run_all_lines(record: dict[str, Any]) -> list[str]:
    """How long the last full `make bench` took, script by script."""
    scripts = ", ".join(
        f"{name} {seconds / 60:.1f}" for name, seconds in record["seconds"].items()
    )
    config = record.get("config", {})
    timed = config.get("timed")
    staged = config.get("staged", [])
    how = (
        "one at a time"
        if timed is None
        else f"(the {len(timed)} that time or measure one at a time, the others "
        f"{config.get('untimed_jobs', 2)} at a time first"
        + (
            f", with the training runs of {len(staged)} of the timed ones "
            f"({', '.join(staged)})"
            if staged
            else ""
        )
        + ")"
    )
    return [
        f"The last `make bench` ran {len(record['seconds'])} benchmarks {how} in "
        f"{record['total_seconds'] / 60:.1f} min ({_machine(record)}); "
        f"minutes per script: {scripts}.",
        "",
    ]


def step_cost_section(record: dict[str, Any], results_path: str) -> list[str]:
    results, goals = record["results"], record["goals"]
    ks = [k for k in record["config"]["num_directions"] if k > 1]
    shown = [k for k in ks if k in (16, 64)] or ks[-1:]
    lines = [
        "### Cost of one gradient estimate (`benchmarks/step_cost.py`)",
        "",
        f"Machine: {_machine(record)}. Milliseconds per estimate, median "
        "(interquartile range) over "
        f"{record['config']['repeats']} interleaved repeats; ratios are medians of "
        "repeat-by-repeat ratios. ✓/✗: goal met or not. *jvp / forward* is "
        "`jax.jvp` along a direction passed in, drawn outside the timed function: "
        "forward mode without sampling (for the conv net a direction drawn inside "
        "the step is cheaper still, because XLA chooses its memory layout). "
        "*remat*: backprop of the same loss rematerialised (every layer under "
        "`eqx.filter_checkpoint`; √T checkpointed segments for the LSTM), what users "
        "short of memory run first.",
        "",
        "| model | forward | `filter_grad` | `filter_grad`, remat | Listing 1 "
        "| `filter_dodge` k=1 "
        f"| k=1 / Listing 1 (≤ {goals['dodge_k1_over_listing1']}) "
        f"| k=1 / forward (≤ {goals['dodge_k1_over_forward']}) | jvp / forward "
        "| k=1 / grad | k=1 / grad, remat |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s, q = r["seconds"], r["ratios"]
        # Files from before the rematerialised baseline have no `grad_remat`.
        remat = _ms(s["grad_remat"]) if "grad_remat" in s else "–"
        remat_ratio = q.get("dodge_k1_over_grad_remat")
        lines.append(
            f"| {r['description']} | {_ms(s['forward'])} | {_ms(s['grad'])} "
            f"| {remat} | {_ms(s['listing1'])} | {_ms(s['dodge_k1'])} "
            f"| {_ratio(q['dodge_k1_over_listing1'], goals['dodge_k1_over_listing1'])} "
            f"| {_ratio(q['dodge_k1_over_forward'], goals['dodge_k1_over_forward'])} "
            f"| {_ratio(q['jvp_fixed_direction_over_forward'])} "
            f"| {_ratio(q['dodge_k1_over_grad'])} "
            f"| {'–' if remat_ratio is None else _ratio(remat_ratio)} |"
        )
    lines += [
        "",
        f"Scaling in the number of directions, time(k) / (k · time(1)) "
        f"(goal ≤ {goals['scaling']}), and XLA's compiled peak memory (MiB):",
        "",
        "| model | "
        + " | ".join(
            f"{mode} k={k}" for mode in ("average", "partition") for k in shown
        )
        + " | peak MiB: grad | grad, remat | k=1 | "
        + " | ".join(f"average k={k}" for k in shown)
        + " |",
        "|---|" + "---|" * (2 * len(shown) + 3 + len(shown)),
    ]
    for name, r in results.items():
        memory = r["memory_bytes"]

        def peak(key: str) -> str:
            return _mib(memory[key]["peak_bytes"] if memory.get(key) else None)

        lines.append(
            f"| {name} | "
            + " | ".join(
                _ratio(r["scaling"][mode][str(k)], goals["scaling"])
                for mode in ("average", "partition")
                for k in shown
            )
            + f" | {peak('grad')} | {peak('grad_remat')} | {peak('dodge_k1')} | "
            + " | ".join(peak(f"average_k{k}") for k in shown)
            + " |"
        )
    lines += _central_lines(results)
    lines += ["", f"![step cost]({results_path}/step_cost.png)", ""]
    return lines


def _tangent_over_forward(description: str) -> float:
    """The multiply-adds of an MLP's tangent over its forward pass's, from the widths
    in `description` ("MLP 784-2048-2048-10, ..."): each layer's `dW·x + W·dx`,
    with no `dx` for the first layer's input."""
    match = re.search(r"MLP ([\d-]+)", description)
    assert match is not None, description
    widths = [int(w) for w in match.group(1).split("-")]
    layers = [a * b for a, b in zip(widths, widths[1:])]
    return (layers[0] + 2 * sum(layers[1:])) / sum(layers)


def _parts_price_line(result: dict[str, Any]) -> str:
    """What k = 8 would cost at one direction's prices: the forward pass shared,
    and each direction's tangent and draw costing what they cost alone."""
    forward = result["seconds"]["forward"]["median"]
    one = result["seconds"]["dodge_k1"]["median"]
    tangent = _tangent_over_forward(result["description"])
    return (
        "Priced at one direction's parts (one forward pass shared, each direction's "
        "tangent and draw at what they cost for k=1: `8 · time(1) − 7 · forward`), "
        f"k=8 would give time(8) / (8 · time(1)) = {1 - 7 * forward / (8 * one):.2f}. "
        "Lower needs the eight tangents of one vectorised jvp to cost less than "
        f"eight single ones. By arithmetic a tangent is {tangent:.2f} forward passes "
        "here (the first layer's input has none), which gives the same bound at "
        f"equal speed per operation: {(1 + 8 * tangent) / (8 * (1 + tangent)):.2f}."
    )


def step_cost_large_section(record: dict[str, Any], results_path: str) -> list[str]:
    """`step_cost.py --large`: the p = 5.8 M MLP, k = 1 and 8."""
    goals = record["goals"]
    (r,) = record["results"].values()
    s, q, memory = r["seconds"], r["ratios"], r["memory_bytes"]
    scaling = goals["scaling_k8"]
    names = ("forward", "grad", "grad_remat", "jvp_fixed_direction", "dodge_k1")
    labels = ("forward", "`filter_grad`", "`filter_grad`, remat", "jvp alone", "k=1")
    return [
        "### Cost at p = 5.8 M (`benchmarks/step_cost.py --large`)",
        "",
        f"Machine: {_machine(record)}. {r['description']} "
        f"({r['num_parameters']:,} parameters); milliseconds per estimate as above, "
        "*jvp alone* along a direction passed in (no sampler).",
        "",
        "| " + " | ".join(labels) + " | average k=8 | partition k=8 "
        f"| k=1 / jvp alone (≤ {goals['dodge_k1_over_jvp_fixed_direction']}) "
        f"| average k=8 scaling (≤ {scaling}) | partition k=8 scaling |",
        "|" + "---|" * (len(labels) + 5),
        "| "
        + " | ".join(_ms(s[name]) for name in names)
        + f" | {_ms(s['average_k8'])} | {_ms(s['partition_k8'])} | "
        + _ratio(
            q["dodge_k1_over_jvp_fixed_direction"],
            goals["dodge_k1_over_jvp_fixed_direction"],
        )
        + f" | {_ratio(r['scaling']['average']['8'], scaling)} "
        f"| {_ratio(r['scaling']['partition']['8'], scaling)} |",
        "",
        "XLA's compiled peak (MiB): "
        + ", ".join(
            f"{label} {_mib(memory[name]['peak_bytes'])}"
            for label, name in (
                ("`filter_grad`", "grad"),
                ("remat", "grad_remat"),
                ("k=1", "dodge_k1"),
                ("average k=8", "average_k8"),
            )
        )
        + ".",
        "",
        _parts_price_line(r),
        "",
        f"![step cost, p = 5.8 M]({results_path}/step_cost_large.png)",
        "",
    ]


def chunk_memory_section(record: dict[str, Any], results_path: str) -> list[str]:
    """`chunk_memory.py`: the compiled peak against k, by default and in chunks."""
    ks = record["config"]["num_directions"]
    chunk = record["config"]["chunk"]
    settings = ("default", f"chunk_size_{chunk}")
    labels = {"default": "default", settings[1]: f"`chunk_size={chunk}`"}
    lines = [
        "### Memory against k (`benchmarks/chunk_memory.py`)",
        "",
        f"Machine: {_machine(record)}. XLA's compiled peak (MiB) of `filter_dodge` "
        f"with k directions, by the backend's default and with `chunk_size={chunk}`, "
        "next to `filter_grad` plain and rematerialised; *growth*: how far the peak "
        f"rises above k = {chunk}'s for larger k, in parameter-sized buffers (the "
        "goal: at most 1 ✓).",
        "",
        "| model | `filter_grad` | remat | "
        + " | ".join(f"{labels[s]} k={k}" for s in settings for k in ks)
        + " | "
        + " | ".join(f"growth, {labels[s]}" for s in settings)
        + " |",
        "|---|---|---|" + "---|" * (len(settings) * (len(ks) + 1)),
    ]
    for name, r in record["results"].items():
        growth = r["growth_in_parameter_buffers"]
        lines.append(
            f"| {name} | {_mib(r['grad_peak_bytes'])} "
            f"| {_mib(r['grad_remat_peak_bytes'])} | "
            + " | ".join(_mib(r["peak_bytes"][s][str(k)]) for s in settings for k in ks)
            + " | "
            + " | ".join(
                "–"
                if growth[s] is None
                else f"{growth[s]:.2f}" + (" ✓" if growth[s] <= 1 else " ✗")
                for s in settings
            )
            + " |"
        )
    lines += ["", f"![memory against k]({results_path}/chunk_memory.png)", ""]
    return lines


def _central_lines(results: dict[str, Any]) -> list[str]:
    """The zeroth-order peer of `step_cost`: central differences along the same
    direction (absent from files written before it was measured)."""
    if not all("central_k1" in r["seconds"] for r in results.values()):
        return []
    lines = [
        "",
        "The zeroth-order peer (SPSA / MeZO style): `filter_dodge(..., "
        'derivative="central")`, the derivative along the same direction by central '
        "differences (two forward passes, no tangent), against forward mode's:",
        "",
        "| model | time / `filter_dodge` k=1 | peak MiB: central | k=1 "
        "| distance to the jvp estimate (relative) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        memory = r["memory_bytes"]
        lines.append(
            f"| {name} | {_ratio(r['ratios']['central_k1_over_dodge_k1'])} "
            f"| {_mib(memory['central_k1']['peak_bytes'])} "
            f"| {_mib(memory['dodge_k1']['peak_bytes'])} "
            f"| {r['central_k1_relative_error']:.1e} |"
        )
    return lines


def k_formulations_section(record: dict[str, Any], results_path: str) -> list[str]:
    results = record["results"]
    first = next(iter(results.values()))
    variants = list(next(iter(first.values()))["over_vmap_jvp"])
    lines = [
        "### Formulations of k directions (`benchmarks/k_formulations.py`)",
        "",
        f"Machine: {_machine(record)}. Time relative to `vmap` of `jax.jvp` over "
        "stacked tangents, median (interquartile range); below 1 is faster.",
        "",
        "| model | k | " + " | ".join(f"`{v}`" for v in variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for name, data in results.items():
        for k, entry in data.items():
            lines.append(
                f"| {name} | {k} | "
                + " | ".join(_ratio(entry["over_vmap_jvp"][v]) for v in variants)
                + " |"
            )
    lines += ["", f"![formulations]({results_path}/k_formulations.png)", ""]
    return lines


def cpu_flags_section(record: dict[str, Any], results_path: str) -> list[str]:
    """`cpu_flags.py`: XLA:CPU's YNNPACK fusions and concurrency-optimised
    scheduler, on and off: time and memory."""
    full = record["config"]["scale"] == "full"
    script = "cpu_flags.py" + " --full" * full
    return [
        f"### XLA:CPU's flags (`benchmarks/{script}`)",
        "",
        f"Machine: {_machine(record)}.",
        "",
        *_docs_tables.cpu_flags_table(record),
        "",
        *_docs_tables.cpu_flags_memory_table(record),
        "",
        f"![cpu flags]({results_path}/{record['benchmark']}.png)",
        "",
    ]


def vs_pytorch_section(record: dict[str, Any], results_path: str) -> list[str]:
    config, seconds = record["config"], record["seconds"]
    goal = record["goal_eqx_dodge_over_pytorch_forward_gradient"]
    lines = [
        "### Against PyTorch (`benchmarks/vs_pytorch.py`)",
        "",
        f"Machine: {_machine(record)}; {config['threads']} threads for both"
        + (
            f", torch {config['torch']}, torchzero {config['torchzero']}"
            if "torch" in config
            else ""
        )
        + f". {config['model']}, one {config['step']}.",
        "",
        "| step | ms (median, IQR) |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_ms(value)} |" for name, value in seconds.items()]
    lines += ["", "| ratio | median (IQR) |", "|---|---|"]
    for name, value in record["ratios"].items():
        target = goal if "forward_gradient" in name or "func_jvp" in name else None
        lines.append(f"| `{name}` | {_ratio(value, target)} |")
    lines += ["", f"![vs pytorch]({results_path}/vs_pytorch.png)", ""]
    return lines


def _accuracy_table(
    heading: str, labels: list[str], rows: list[dict[str, Any]]
) -> list[str]:
    """A one-row table of final training accuracies (mean ± std), a column a row."""
    return [
        f"| {heading} | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(rows),
        "| final training accuracy | "
        + " | ".join(
            f"{r['final_accuracy_mean']:.3f} ± {r['final_accuracy_std']:.3f}"
            for r in rows
        )
        + " |",
    ]


def adam_problems_section(record: dict[str, Any], results_path: str) -> list[str]:
    config = record["config"]
    problems = list(record["results"])
    lines = [
        "### `adam_dodge` on optax's optimizer tests (`benchmarks/adam_problems.py`)",
        "",
        f"Final parameters after {config['steps']:,} steps from optax's starting "
        "points, and whether they meet optax's tolerance "
        f"(rtol = atol = {config['tolerance']:g}); the largest update coordinate "
        "over the run, in learning rates (Adam's bound for any input sequence is "
        f"{config['adam_bound']:.2f}).",
        "",
        "| method | " + " | ".join(problems) + " |",
        "|---|" + "---|" * len(problems),
    ]
    for name in record["results"][problems[0]]["methods"]:
        cells = []
        for problem in problems:
            entry = record["results"][problem]["methods"][name]
            final = ", ".join(f"{x:.3g}" for x in entry["final"])
            verdict = "meets" if entry["converged"] else "misses"
            largest = entry["largest_step_over_lr"]
            step = f"step ≤ {largest:.2f} lr" if math.isfinite(largest) else "diverged"
            cells.append(f"({final}) {verdict}, {step}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "One random direction, "
        f"{len(config['seeds'])} seeds: the largest learning rate of "
        f"{config['learning_rates']} at which every seed meets the tolerance: "
        + "; ".join(
            f"{problem} {result['largest_converging_learning_rate']}"
            for problem, result in record["results"].items()
        )
        + " (optax's own tests use 0.1).",
        "",
        f"![adam problems]({results_path}/adam_problems.png)",
        "",
    ]
    return lines


def digits_section(record: dict[str, Any], results_path: str) -> list[str]:
    config = record["config"]
    lines = [
        "### The paper's Figure 1 on real digits (`benchmarks/digits_directions.py`)",
        "",
        f"{config['dataset']}, {config['model']} (p = {config['num_parameters']}), "
        f"{config['optimizer']}, {config['num_updates']} updates, "
        f"{config['seeds']} seeds, best SGD step size of "
        f"{config['learning_rates']} per setting.",
        "",
        *_accuracy_table(
            "directions",
            [str(r["num_directions"]) for r in record["directions"]],
            record["directions"],
        ),
        "",
        *_accuracy_table(
            "batch study (same samples seen)",
            [
                f"k={r['num_directions']}, batch {r['batch_size']}"
                for r in record["batch_study"]
            ],
            record["batch_study"],
        ),
        "",
        "| the paper's claim | holds here? |",
        "|---|---|",
    ]
    names = {
        "more_directions_help": "more directions help",
        "one_direction_is_stable": "learning with one direction is stable",
        "batch_300_beats_100": "batch 300 beats 100",
        "batch_1000_worse_than_300": "batch 1000 is worse than 300",
    }
    for key, text in names.items():
        verdict = "yes" if record["claims"][key]["holds"] else "no"
        if key == "one_direction_is_stable":
            verdict = _one_direction_stability(record)
        lines.append(f"| {text} | {verdict} |")
    lines += ["", f"![digits]({results_path}/digits_directions.png)", ""]
    return lines


def digits_widths_section(record: dict[str, Any], results_path: str) -> list[str]:
    """The paper's Fig. 1c, from `digits_directions.py --full`'s summary (written
    from its run log, so possibly from a study that has not finished)."""
    config = record["config"]
    snapshots = [
        config["num_updates"] * (i + 1) // config["num_snapshots"]
        for i in range(config["num_snapshots"])
    ]
    lines = [
        "### The paper's Figure 1c, network size "
        "(`benchmarks/digits_directions.py --full`)",
        "",
        f"{config['dataset']}, {config['model']} for W in {config['widths']}, "
        f"{config['optimizer']}, batch {config['batch_size']}, "
        f"{config['num_updates']} updates, {config['seeds']} seeds, best SGD step "
        f"size of {config['learning_rates']} per (W, k) by the final accuracy. "
        f"Training accuracy, mean over seeds (min–max). Runs finished: "
        f"{len(record['runs_finished'])} of "
        f"{len(record['runs_finished']) + len(record['runs_missing'])}"
        + (
            f" (missing: {', '.join(record['runs_missing'])})."
            if record["runs_missing"]
            else "."
        ),
        "",
        "| k | W | p | step size | "
        + " | ".join(f"after {u} updates" for u in snapshots)
        + " |",
        "|---|---|---|---|" + "---|" * len(snapshots),
    ]
    for k, rows in record["by_num_directions"].items():
        for row in rows:
            cells = [
                f"{mean:.3f} ({low:.2f}–{high:.2f})"
                for mean, low, high in zip(
                    row["accuracy_mean"], row["accuracy_min"], row["accuracy_max"]
                )
            ]
            lines.append(
                f"| {k} | {row['width']} | {row['num_parameters']} "
                f"| {row['best_learning_rate']:g} | " + " | ".join(cells) + " |"
            )
    summaries, fallen = [], []
    for k, rows in record["by_num_directions"].items():
        for row in rows:
            # As in the stability claim: no better than untrained + 0.05.
            chance = row["start_accuracy_mean"] + 0.05
            if max(row["final_accuracy_per_learning_rate"]) <= chance:
                peak = max(row["accuracy_mean"])
                fallen.append(
                    f"k = {k}, W = {row['width']} (at step size "
                    f"{row['best_learning_rate']:g} it reaches {peak:.2f} after "
                    f"{row['updates'][row['accuracy_mean'].index(peak)]} updates, "
                    f"then falls to {row['accuracy_mean'][-1]:.2f})"
                )
        if len(rows) < 2:
            continue
        best = max(rows, key=lambda row: row["accuracy_mean"][-1])
        summaries.append(
            f"k = {k}: after {snapshots[-1]} updates from "
            f"{rows[0]['accuracy_mean'][-1]:.3f} at W = {rows[0]['width']} to "
            f"{rows[-1]['accuracy_mean'][-1]:.3f} at W = {rows[-1]['width']}, "
            f"best {best['accuracy_mean'][-1]:.3f} at W = {best['width']}"
        )
    lines += [
        "",
        "The paper's text does not describe its Fig. 1c beyond the axes (accuracy "
        "against the units of the two hidden layers, snapshots after 1000–4000 "
        "updates), so there is no number of it to compare with. Here: "
        + ("; ".join(summaries) or "too few widths finished")
        + "."
        + (
            " Every step size of the grid ends at chance for "
            + "; ".join(fallen)
            + ": the grid's smallest step size is too large there."
            if fallen
            else ""
        ),
        "",
        f"![digits widths]({results_path}/digits_widths.png)",
        "",
    ]
    return lines


def _step_sizes(rates: list[float], grid: list[float]) -> str:
    """`≥ 0.01` where `rates` are the top of `grid`, else the list."""
    if len(rates) > 1 and rates == grid[len(grid) - len(rates) :]:
        return f"≥ {rates[0]:g}"
    return ", ".join(f"{rate:g}" for rate in rates)


def _one_direction_stability(record: dict[str, Any]) -> str:
    """Per step size, whether the k = 1 run is stable (`claims` in
    digits_directions.py). Result files written before it recorded every step
    size's curves only know the best step size's verdict, and that a run ending no
    better than its start (at chance) is not stable."""
    claim = record["claims"]["one_direction_is_stable"]
    one = next(r for r in record["directions"] if r["num_directions"] == 1)
    grid = one["learning_rates"]
    finals = one["final_accuracy_per_learning_rate"]
    start = float(one["accuracy_mean"][0])
    at_chance = [final <= start + 0.05 for final in finals]
    stable = claim.get("stable_per_learning_rate")
    if stable is None:
        stable = [
            claim["holds"]
            if rate == one["best_learning_rate"]
            else (False if low else None)
            for rate, low in zip(grid, at_chance)
        ]
    grid_text = "{" + ", ".join(f"{rate:g}" for rate in grid) + "}"
    stable_rates = [rate for rate, ok in zip(grid, stable) if ok]
    if len(stable_rates) == len(grid):
        return f"yes, at every step size of {grid_text}"
    text = (
        f"only at step size{'s' if len(stable_rates) > 1 else ''} "
        f"{_step_sizes(stable_rates, grid)} of {grid_text}"
        if stable_rates
        else f"no, at no step size of {grid_text}"
    )
    fallen = [rate for rate, low in zip(grid, at_chance) if low]
    if fallen:
        final = max(f for f, low in zip(finals, at_chance) if low)
        text += (
            f"; falls to chance (final accuracy {final:.2f}, untrained "
            f"{start:.2f}) at {_step_sizes(fallen, grid)}"
        )
    other = [
        rate
        for rate, ok, low in zip(grid, stable, at_chance)
        if ok is False and not low
    ]
    if other:
        text += f"; unstable at {_step_sizes(other, grid)}"
    unknown = [rate for rate, ok in zip(grid, stable) if ok is None]
    if unknown:
        text += f"; not recorded at {_step_sizes(unknown, grid)}"
    return text


# The paper's Table 1 (Silver et al. 2022), final loss on influence balancing: quoted
# from the paper, not measured here. Methods it does not report are left out.
PAPER_TABLE_1 = {"TBPTT K=100": 0.93, "RTRL": 1.11e-12, "DODGE": 1.11e-12}

# The copy task's vectors have this many bits (`BITS` in benchmarks/copy_task.py).
COPY_TASK_BITS = 8


def influence_balancing_section(record: dict[str, Any], results_path: str) -> list[str]:
    config, table = record["config"], record["table"]
    lines = [
        "### Influence balancing, the paper's Table 1 "
        "(`benchmarks/influence_balancing.py`)",
        "",
        f"Machine: {_machine(record)}. Setup of google-research `persistent_es`: "
        f"{config['num_units']} units ({config['num_positive']} positive), "
        f"θ₀ = {config['theta_init']}, SGD {config['learning_rate']:g}, "
        f"{config['iterations']} iterations; final loss of a "
        f"{config['eval_steps']}-step unroll. The paper's column is quoted from its "
        "Table 1 (a constant in `benchmarks/report.py`), not measured.",
        "",
        "| method | paper (Table 1) | ours, float32 | ours, float64 |",
        "|---|---|---|---|",
    ]
    for name, row in table.items():
        paper = PAPER_TABLE_1.get(name)
        lines.append(
            f"| {name} | {'—' if paper is None else f'{paper:.3g}'} "
            f"| {row['ours_float32']:.3g} | {row['ours_float64']:.3g} |"
        )
    runs = record["runs"]
    thetas = ", ".join(
        f"{name} θ = {runs['float64'][name]['final_theta']:.6f}"
        for name in ("RTRL", "DODGE")
        if name in runs.get("float64", {})
    )
    lines += [
        "",
        f"Final θ in float64: {thetas} (optimum {config['optimum_theta']:.6f}).",
        "",
        f"![influence balancing]({results_path}/influence_balancing.png)",
        "",
    ]
    return lines


def _method_label(key: str) -> str:
    name = key.removesuffix("_over_forward")
    if name.startswith("dodge_k"):
        return f"DODGE k={name.removeprefix('dodge_k')}"
    if name == "bptt_remat":
        return "BPTT + remat"
    return name.upper()


def long_sequence_section(record: dict[str, Any], results_path: str) -> list[str]:
    config, ratios, points = record["config"], record["ratios"], record["points"]
    methods = list(next(iter(ratios.values())))
    lines = [
        "### Memory against sequence length (`benchmarks/long_sequence.py`)",
        "",
        f"Machine: {_machine(record)}. LSTM-{config['hidden']}, "
        f"{config['input']} inputs, batch {config['batch']}, one subprocess per "
        "point. XLA's compiled peak memory relative to the forward pass (the input "
        "sequence is an argument and counts for every method); goal: "
        f"{record['goal']}.",
        "",
        "| T | " + " | ".join(f"{_method_label(m)} / forward" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for length, row in ratios.items():
        cells = []
        for m in methods:
            text = f"{row[m]['xla_peak_bytes']:.3g}"
            point = points[length][m.removesuffix("_over_forward")]
            if "skipped_run" in point:
                gib = point["xla_memory"]["peak_bytes"] / 2**30
                text += f" ({gib:.0f} GiB, compiled only)"
            cells.append(text)
        lines.append(f"| {int(length):,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Memory beyond the forward pass's (MiB):",
        "",
        "| T | " + " | ".join(_method_label(m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for length, row in ratios.items():
        lines.append(
            f"| {int(length):,} | "
            + " | ".join(f"{row[m]['xla_extra_mib']:.1f}" for m in methods)
            + " |"
        )
    lines += [
        "",
        "Seconds of one computation relative to the forward pass (median of 3 runs, "
        "1 at the largest T; a shared machine, so noisy):",
        "",
        "| T | " + " | ".join(f"{_method_label(m)} / forward" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for length, row in ratios.items():
        cells = [
            "compiled only" if row[m]["seconds"] is None else f"{row[m]['seconds']:.3g}"
            for m in methods
        ]
        lines.append(f"| {int(length):,} | " + " | ".join(cells) + " |")
    segments = config.get("remat_segments")
    if segments:
        lines += [
            "",
            "BPTT + remat: BPTT with `jax.checkpoint` on segments of the divisor "
            "of T nearest √T ("
            + ", ".join(
                f"{segment} steps at T = {int(length):,}"
                for length, segment in segments.items()
            )
            + "), the baseline to beat when BPTT does not fit.",
        ]
    quality = record.get("quality")
    if quality:
        cosines = ", ".join(
            f"{_method_label(method)} {cosine:.3f}"
            for method, cosine in quality["cosine_with_bptt"].items()
        )
        lines += [
            "",
            f"Quality at T = {quality['length']:,}: cosine of the summed DODGE "
            f"estimate (one key) with the exact BPTT gradient: {cosines}; "
            "BPTT + remat is exact (largest difference "
            f"{quality['bptt_remat_max_relative_difference']:.1e} of a leaf's "
            "largest entry).",
        ]
    lines += [
        "",
        f"![long sequence]({results_path}/long_sequence.png)",
        "",
    ]
    return lines


def online_stream_section(record: dict[str, Any], results_path: str) -> list[str]:
    name = record["benchmark"]
    study = "`--full`" if record["config"]["full"] else "`make bench`'s short run"
    goal = record["goal"]["dodge_k1_rss_growth_mib"]
    growth = record["summary"]["dodge_k1"]["rss_growth_mib"]
    return [
        f"### Training on a stream (`benchmarks/online_stream.py`, {study})",
        "",
        f"Machine: {_machine(record)}. Goal: online DODGE's peak RSS grows by at "
        f"most {goal:g} MiB from the shortest stream to the longest; measured: "
        + ("not run" if growth is None else f"{growth:+.1f} MiB")
        + ".",
        "",
        *_docs_tables.online_stream_table(record),
        "",
        f"![online stream]({results_path}/{name}.png)",
        "",
    ]


def _copy_label(key: str, config: dict[str, Any]) -> str:
    if key.startswith("dodge_k"):
        k = int(key.removeprefix("dodge_k"))
        return f"DODGE, {k} random direction{'s' if k > 1 else ''}"
    labels = {
        "bptt": "BPTT",
        "tbptt": f"TBPTT, truncation uniform in 1..{config['max_truncation']}",
        "dodge_tbptt": "DODGE along the TBPTT candidate",
        "synthetic": "synthetic gradients (quadratic critic, truncation "
        f"{config['critic_truncation']}, scale {config['critic_scale']})",
        "dodge_synthetic": "DODGE along the synthetic-gradient candidate",
    }
    return labels.get(key, f"`{key}`")


def copy_task_section(record: dict[str, Any], results_path: str) -> list[str]:
    config, results = record["config"], record["results"]
    rates, seeds = config["learning_rates"], config["seeds"]
    target_bits = COPY_TASK_BITS * (config["max_length"] + 1) / 2
    several = len(rates) > 1
    lines = [
        "### Copy task (`benchmarks/copy_task.py`)",
        "",
        f"Machine: {_machine(record)}. Configuration `{config['scale']}`: "
        f"LSTM-{config['hidden']}, lengths 1..{config['max_length']}, batch "
        f"{config['batch']}, Adam {', '.join(f'{r:g}' for r in rates)}, "
        f"{config['steps']} steps, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}. "
        f"Bit errors per sequence after {config['steps']} steps ("
        f"a sequence has {target_bits:g} target bits on average, chance is "
        f"{target_bits / 2:g}):",
        "",
        "| method | bit errors |" + (" best learning rate |" if several else ""),
        "|---|---|" + ("---|" if several else ""),
    ]
    for key, entry in results.items():
        lines.append(
            f"| {_copy_label(key, config)} | {entry['final_bit_errors']:.2f} |"
            + (f" {entry['best_learning_rate']:g} |" if several else "")
        )
    lines += ["", f"![copy task]({results_path}/copy_task.png)", ""]
    return lines


# The paper's copy-task grid (Silver et al. 2022, §5.4.1 and Fig. 4).
PAPER_COPY_GRID = "learning rates 3e-3 to 1e-5 (six) and 5 seeds"


def _copy_cell(
    entry: dict[str, Any] | None, seeds: int, best: bool, planned: bool
) -> str:
    if entry is None:
        return "not run yet" if planned else "–"
    value = f"{entry['median_final_bit_errors']:.1f}"
    value = f"**{value}**" if best else value
    finished = entry["seeds_finished"]
    return value if finished == seeds else f"{value} ({finished} of {seeds} seeds)"


def _copy_rows(record: dict[str, Any], rates: list[float]) -> list[str]:
    """One row per planned method of the paper-scale copy task: the median final
    bit errors at each of `rates`."""
    config, progress, results = record["config"], record["progress"], record["results"]
    seeds, rows = len(config["seeds"]), []
    for method in progress["methods_planned"]:
        entries = progress["per_learning_rate"].get(method, {})
        planned = progress["learning_rates_planned"][method]
        best = results.get(method, {}).get("best_learning_rate")
        cells = [
            _copy_cell(entries.get(f"{rate:g}"), seeds, rate == best, rate in planned)
            for rate in rates
        ]
        rows.append(f"| {_copy_label(method, config)} | " + " | ".join(cells) + " |")
    return rows


def _edge_rates_sentence(record: dict[str, Any]) -> str:
    """The grid's extension rule, and the finished methods whose best learning
    rate is still the smallest or largest they ran."""
    edges = record["config"]["edge_learning_rates"]
    if not edges:
        return ""
    grid = record["config"]["learning_rates"]
    above = sorted(r for r in edges if r > max(grid))
    below = sorted((r for r in edges if r < min(grid)), reverse=True)
    sides = [
        f"{side}: {', '.join(f'{r:g}' for r in rates)}"
        for side, rates in (("above", above), ("below", below))
        if rates
    ]
    text = (
        " A method whose best rate is at an end of the rates it has run also runs "
        f"the next rate beyond it ({'; '.join(sides)}; –: not planned, its best "
        "lies inside or is not known yet)."
    )
    at_edge = [
        _copy_label(method, record["config"])
        for method, result in record["results"].items()
        if result["best_learning_rate"]
        in (min(map(float, result["runs"])), max(map(float, result["runs"])))
    ]
    if at_edge:
        text += (
            " Best at the end of the rates run, so a better rate may lie beyond: "
            + "; ".join(at_edge)
            + "."
        )
    return text


def copy_task_full_section(record: dict[str, Any], results_path: str) -> list[str]:
    """The paper-scale copy task, as far as its resumable study has run."""
    config, progress = record["config"], record["progress"]
    grid, seeds = config["learning_rates"], len(config["seeds"])
    rates = sorted({*grid, *config["edge_learning_rates"]}, reverse=True)
    chance = COPY_TASK_BITS * (config["max_length"] + 1) / 4
    finished = progress["runs_finished"] == progress["runs_planned"]
    status = (
        f"**All {progress['runs_planned']} planned runs are finished.**"
        if finished
        else f"**{progress['runs_finished']} of the {progress['runs_planned']} runs "
        "planned so far are finished**; the study resumes where it stopped."
    )
    lines = [
        "### Copy task at the paper's scale (`benchmarks/copy_task.py --full`"
        + ("" if finished else ", in progress")
        + ")",
        "",
        f"Machine: {_machine(record)}. LSTM-{config['hidden']}, lengths 1.."
        f"{config['max_length']}, batch {config['batch']}, Adam, "
        f"{config['steps']} steps; a reduced grid of learning rates "
        f"{', '.join(f'{r:g}' for r in grid)} and {seeds} seeds (the paper: "
        f"{PAPER_COPY_GRID}).{_edge_rates_sentence(record)} {status} Median "
        f"final bit errors per sequence over the finished seeds (chance is about "
        f"{chance:g}; bold: the best learning rate of a finished method):",
        "",
        "| method | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |",
        "|---|" + "---|" * len(rates),
        *_copy_rows(record, rates),
    ]
    lines += ["", *_copy_task_comparison(record), ""]
    lines += [f"![copy task, paper's scale]({results_path}/copy_task_full.png)", ""]
    return lines


def _seeds(record: dict[str, Any], method: str) -> list[float]:
    """A finished method's final bit errors per seed at its best learning rate."""
    result = record["results"][method]
    return result["runs"][str(result["best_learning_rate"])]["final_per_seed"]


def _versus(record: dict[str, Any], method: str, baseline: str, name: str) -> str:
    """`baseline`'s median final bit errors (called `name`), and whether every seed
    of `method` ends below, or above, every seed of `baseline`."""
    ours, theirs = _seeds(record, method), _seeds(record, baseline)
    verdict = (
        "lower in every seed"
        if max(ours) < min(theirs)
        else "higher in every seed"
        if min(ours) > max(theirs)
        else "the seeds' ranges overlap"
    )
    return f"{name} {record['final_bit_errors'][baseline]:.1f} ({verdict})"


def _ends_at(record: dict[str, Any], method: str, *against: tuple[str, str]) -> str:
    """`method`'s median final bit errors against those of the `(baseline, name)`
    pairs in `against`."""
    versus = [_versus(record, method, baseline, name) for baseline, name in against]
    return f"{record['final_bit_errors'][method]:.1f} against " + " and ".join(versus)


def _copy_task_comparison(record: dict[str, Any]) -> list[str]:
    """Where the finished methods agree with the paper's copy-task figures (Fig. 2:
    DODGE along TBPTT with truncations up to 3; Fig. 4b: random directions; Fig. 4c:
    DODGE along synthetic gradients), by final bit errors rather than the paper's
    cross-entropy curves."""
    finals = record["final_bit_errors"]
    if "bptt" not in finals:
        return []
    text = [f"BPTT reaches {finals['bptt']:.1f} bit errors."]
    random = {k: v for k, v in finals.items() if k.startswith("dodge_k")}
    if random:
        listed = ", ".join(
            f"{v:.1f} with {k.removeprefix('dodge_k')}" for k, v in random.items()
        )
        baselines = [("bptt", "BPTT's"), ("tbptt", "TBPTT's")]
        baselines = [pair for pair in baselines if pair[0] in finals]
        text.append(
            f"Random directions end at {listed}: the paper's Fig. 4b has them reach "
            "a low loss only with 64 directions; "
            + (
                f"here 64 end at {_ends_at(record, 'dodge_k64', *baselines)}."
                if "dodge_k64" in finals
                else "our 64-direction runs are not all finished yet."
            )
        )
    for method, baseline, claim, name in _PAPER_CANDIDATE_CLAIMS:
        if method in finals and baseline in finals:
            ends = _ends_at(record, method, (baseline, name))
            text.append(f"{claim}; here it ends at {ends}.")
    return [" ".join(text)]


# The paper's claims for DODGE along a candidate, against the candidate's method:
# (method, baseline, the claim, how the sentence names the baseline).
_PAPER_CANDIDATE_CLAIMS = (
    (
        "dodge_tbptt",
        "tbptt",
        "Fig. 2 has DODGE along TBPTT's direction (truncations up to 3) learn faster "
        "than TBPTT",
        "TBPTT's",
    ),
    (
        "dodge_synthetic",
        "synthetic",
        "Fig. 4c has DODGE along the critic's synthetic gradient optimise faster "
        "than synthetic gradients",
        "their",
    ),
)


def _cosine(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    q1, q3 = entry["iqr_abs_cosine"]
    return f"{entry['median_abs_cosine']:.4f} ({q1:.4f}–{q3:.4f})"


def _curvature_lines(
    rows: dict[str, Any], curvature: dict[str, Any], cost: dict[str, Any] | None
) -> list[str]:
    """The curvature-aware rows of `guess_quality`: each against its plain method."""
    lines = [
        "`curvature_aware_dodge` (CARS's Newton step with its safeguard) along the "
        "same directions and minibatches, the Newton step damped by the best factor "
        "of a grid, falling back to the plain step at the plain method's best "
        "learning rate (median over seeds):",
        "",
        "| method | training accuracy | plain step's | damping "
        "| Newton steps accepted | curvature along the unit direction |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in curvature.items():
        base = rows.get(row["base_method"])
        plain = "–" if base is None else f"{base['train_accuracy_median']:.3f}"
        curvatures = [c for c in row["median_unit_curvature_per_seed"] if c is not None]
        lines.append(
            f"| `{name}` | {row['train_accuracy_median']:.3f} | {plain} "
            f"| {row['best_newton_damping']:g} "
            f"| {statistics.median(row['accepted_fraction_per_seed']):.0%} "
            f"| {statistics.median(curvatures) if curvatures else float('nan'):.2g} |"
        )
    lines.append("")
    if cost is not None:
        lines += [
            "Update time against `dodge_random`'s (one jvp), median of the "
            "interleaved repeats: `curvature_aware_dodge` "
            f"{cost['curvature_aware_over_dodge_random']['median']:.2f}×, its "
            "nested jvp alone (`trial=False`) "
            f"{cost['curvature_aware_no_trial_over_dodge_random']['median']:.2f}×.",
            "",
        ]
    return lines


def guess_quality_section(record: dict[str, Any], results_path: str) -> list[str]:
    config, results = record["config"], record["results"]
    lines = [
        "### Directions against the gradient (`benchmarks/guess_quality.py`)",
        "",
        f"Machine: {_machine(record)}. Digits MLPs; |cosine| between the estimate "
        f"and the gradient of one batch of {config['batch_size']}, median "
        f"(interquartile range) over {config['cosine_keys']} keys, at initialisation "
        f"and after {config['backprop_steps']} backpropagation steps; training "
        f"accuracy after {config['num_steps']} plain SGD updates with the best "
        f"learning rate of a grid (median over {config['num_seeds']} seeds).",
        "",
    ]
    for model, entry in results["models"].items():
        lines += [
            f"{model}: p = {entry['num_parameters']}, "
            f"1/√p = {entry['one_over_sqrt_p']:.4f}.",
            "",
            "| method | \\|cos\\| at init | \\|cos\\| after training "
            "| training accuracy | best learning rate |",
            "|---|---|---|---|---|",
        ]
        rows = entry["methods"]
        curvature = {n: r for n, r in rows.items() if "base_method" in r}
        for name, row in rows.items():
            if name in curvature:
                continue
            lines.append(
                f"| `{name}` | {_cosine(row['cosine_at_init'])} "
                f"| {_cosine(row['cosine_after_backprop_training'])} "
                f"| {row['train_accuracy_median']:.3f} "
                f"| {row['best_learning_rate']:.2g} |"
            )
        lines.append("")
        if curvature:
            lines += _curvature_lines(rows, curvature, entry.get("curvature_cost"))
    sweep = results["width_sweep"]
    methods = [m for m in next(iter(sweep.values())) if m != "num_parameters"]
    lines += [
        f"Median \\|cos\\| at initialisation against the width "
        f"(depth {config['width_depth']}, {config['width_keys']} keys):",
        "",
        "| width | p | 1/√p | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for width, row in sweep.items():
        p = row["num_parameters"]
        lines.append(
            f"| {width} | {p:,} | {p**-0.5:.4f} | "
            + " | ".join(f"{row[m]['median_abs_cosine']:.4f}" for m in methods)
            + " |"
        )
    lines += _sources_lines(results["models"])
    lines += ["", f"![guess quality]({results_path}/guess_quality.png)", ""]
    return lines


def _compared(a: float, b: float) -> str:
    """`a` against `b` in words: within 3 points of training accuracy is level."""
    return "level with" if abs(a - b) < 0.03 else "above" if a > b else "below"


def _sources_lines(models: dict[str, Any]) -> list[str]:
    """Where the measurements agree with the methods' sources: stochastic subspace
    descent (Kozak et al.) and CARS (Kim et al.), when their rows are present."""

    def accuracy(model: dict[str, Any], method: str) -> float:
        return model["methods"][method]["train_accuracy_median"]

    lines = []
    names = list(models)
    if all("orthogonal-k16" in m["methods"] for m in models.values()):
        pairs = [
            f"{accuracy(m, 'orthogonal-k16'):.2f} on {name}, "
            f"{_compared(accuracy(m, 'orthogonal-k16'), accuracy(m, 'rademacher-k16'))}"
            f" independent directions' {accuracy(m, 'rademacher-k16'):.2f}"
            for name, m in models.items()
        ]
        lines += [
            "",
            "Orthogonal directions (stochastic subspace descent, Kozak et al.): "
            + "; ".join(pairs)
            + ". With k = 16 far below p, exact orthogonality removes only the "
            "fraction (k − 1)/(p − 1) of the variance of independent directions, so "
            "no gain is expected at this size, and the advantage Kozak et al. report "
            "over Gaussian smoothing is not one we can see here.",
        ]
    curvature = "rademacher-k1 curvature"
    if all(curvature in m["methods"] for m in models.values()):
        random = [
            f"{accuracy(m, curvature):.2f} against the plain step's "
            f"{accuracy(m, 'rademacher-k1'):.2f} on {name}"
            for name, m in models.items()
        ]
        gains = [
            accuracy(m, curvature) - accuracy(m, "rademacher-k1")
            for m in models.values()
        ]
        guesses = [
            f"{guess} {accuracy(models[name], f'{guess} curvature'):.2f} against "
            f"{accuracy(models[name], guess):.2f}"
            for name in names
            for guess in ("activation", "transpose")
            if f"{guess} curvature" in models[name]["methods"]
        ]
        verdict = (
            "as CARS (Kim et al.) reports, curvature-aware steps speed up search "
            "along random directions"
            if min(gains) >= 0.03
            else "unlike CARS's (Kim et al.) report, curvature-aware steps do not "
            "clearly speed up search along random directions here"
        )
        lines += [
            "",
            f"Curvature-aware steps along one random direction: "
            f"{'; '.join(random)}: {verdict}. Along the guesses, in the same order "
            f"of models: {'; '.join(guesses)}.",
        ]
    return lines


def _shapes(shapes: list[str]) -> str:
    scalars = [s for s in shapes if s.endswith("[]")]
    if len(shapes) <= 2:
        return ", ".join(f"`{s}`" for s in shapes)
    rest = len(shapes) - len(scalars)
    return " + ".join(
        [f"`{s}`" for s in scalars] + [f"{rest} parameter arrays"] * (rest > 0)
    )


def scaling_section(record: dict[str, Any], results_path: str) -> list[str]:
    config = record["config"]

    def step(entry: dict[str, Any]) -> str:
        return _ms(entry["step_seconds"]) if entry.get("step_seconds") else "–"

    lines = [
        "### Communication in data parallelism (`benchmarks/scaling.py`)",
        "",
        f"Machine: {_machine(record)}. {config['model']}, "
        f"{config['num_devices']} devices, batch {config['per_device_batch']} per "
        f"device, k = {config['num_directions']}, {config['optimizer']}. All-reduces "
        "read from the compiled HLO; step times up to "
        f"p = {config['timed_up_to_parameters']:,} ({config['note']}), in ms, "
        "median (interquartile range).",
        "",
        "| p | DODGE all-reduce | DODGE bytes | gradient all-reduce | gradient bytes "
        "| DODGE step | gradient step |",
        "|---:|---|---:|---|---:|---|---|",
    ]
    for row in record["rows"]:
        dodge, grad = row["dodge"], row["gradient"]
        lines.append(
            f"| {row['num_parameters']:,} | {_shapes(dodge['all_reduce_shapes'])} "
            f"| {dodge['all_reduce_bytes']:,} | {_shapes(grad['all_reduce_shapes'])} "
            f"| {grad['all_reduce_bytes']:,} | {step(dodge)} | {step(grad)} |"
        )
    lines += ["", f"![scaling]({results_path}/scaling.png)", ""]
    return lines


def _reptile_cosine_lines(record: dict[str, Any]) -> list[str]:
    """How much of the meta-gradient the Reptile direction sees (absent from files
    written before it was measured)."""
    cosine = record.get("reptile_meta_gradient_cosine_at_initialisation")
    if cosine is None:
        return []
    values = [c for row in cosine["per_seed_and_meta_batch"] for c in row]
    return [
        "",
        "At the untrained initialisations the cosine between the Reptile direction "
        f"and the meta-gradient is {cosine['mean']:.3f} on average over seeds and "
        f"meta-batches ({cosine['min']:.3f} to {cosine['max']:.3f}): DODGE along "
        "Reptile keeps the meta-gradient's component on it, "
        f"{statistics.mean(c * c for c in values):.0%} of its squared norm on "
        "average.",
    ]


def _reptile_while_loop_lines(record: dict[str, Any], outer_steps: int) -> list[str]:
    """The forward-only methods with the data-dependent inner loop (absent from
    files written before it was run)."""
    study = record.get("while_loop")
    if study is None:
        return []
    results = ", ".join(
        f"{name} {result['final_psnr_mean']:.2f} ± {result['final_psnr_std']:.2f}"
        for name, result in study["methods"].items()
    )
    return [
        "",
        "With a data-dependent inner loop (`lax.while_loop`: SGD until the crop "
        f"reaches {study['inner_tolerance_psnr']:.0f} dB, at most "
        f"{study['inner_steps_at_most']} steps), held-out PSNR after "
        f"{outer_steps} outer steps: {results} dB (untrained initialisation "
        f"{study['initialisation_psnr_mean']:.2f} ± "
        f"{study['initialisation_psnr_std']:.2f}). MAML cannot run there (`jax.grad` "
        f"raises `{study['maml']}`); forward mode differentiates through the loop.",
    ]


def reptile_regression_section(record: dict[str, Any], results_path: str) -> list[str]:
    config, methods = record["config"], record["methods"]
    steps = record["outer_steps"]
    early = 1  # the first evaluation after the start: how fast each method learns
    lines = [
        "### Meta-learned initialisations for image regression, the paper's §5.4 "
        "(`benchmarks/reptile_regression.py`)",
        "",
        f"Machine: {_machine(record)}. {config['model']} (p = "
        f"{config['num_parameters']:,}), {config['inner_steps']} inner SGD steps "
        f"(step {config['inner_learning_rate']:g}) on one {config['crop']}×"
        f"{config['crop']} crop; {config['outer_optimizer']} "
        f"{config['outer_learning_rate']:g} on the meta-gradient estimate, meta-batch "
        f"{config['meta_batch']}, {config['outer_steps']} outer steps, "
        f"{config['seeds']} seeds. Images: {config['images']} (split by source "
        "image). PSNR on the held-out crops after the inner steps, mean ± std over "
        "seeds:",
        "",
        f"| method | after {steps[early]} outer steps (dB) "
        f"| after {steps[-1]} (dB) | gain over the initialisation (dB) |",
        "|---|---|---|---|",
        f"| untrained initialisation | – | {record['initialisation_psnr_mean']:.2f} "
        f"± {record['initialisation_psnr_std']:.2f} | – |",
    ]
    floor = record["initialisation_psnr_mean"]
    for name, result in methods.items():
        curves = [run[early] for run in result["psnr_per_seed"]]
        mean, std = statistics.mean(curves), statistics.pstdev(curves)
        lines.append(
            f"| {name} | {mean:.2f} ± {std:.2f} "
            f"| {result['final_psnr_mean']:.2f} ± {result['final_psnr_std']:.2f} "
            f"| {result['final_psnr_mean'] - floor:+.2f} |"
        )
    reptile, dodge = methods["Reptile"], methods["DODGE along Reptile"]

    def at(result: dict[str, Any], index: int) -> tuple[float, float]:
        values = [run[index] for run in result["psnr_per_seed"]]
        return statistics.mean(values), statistics.pstdev(values)

    def compare(index: int) -> str:
        # Level when the means differ by no more than the larger spread over seeds.
        (ours, ours_std), (theirs, theirs_std) = at(dodge, index), at(reptile, index)
        relation = (
            "level with"
            if abs(ours - theirs) <= max(ours_std, theirs_std)
            else "ahead of"
            if ours > theirs
            else "behind"
        )
        return (
            f"{relation} it after {steps[index]} outer steps ({ours:.2f} ± "
            f"{ours_std:.2f} against {theirs:.2f} ± {theirs_std:.2f} dB)"
        )

    early_text, final_text = compare(early), compare(len(steps) - 1)
    reproduced = early_text.startswith("ahead")
    lines += [
        "",
        "The paper (§5.4, Fig. 3, CelebA faces) finds that DODGE along the Reptile "
        "direction learns faster than Reptile, especially with two inner steps; "
        f"here it is {early_text} and {final_text}: "
        f"{'we agree' if reproduced else 'we do not reproduce the claim'} "
        f"(MAML, the exact meta-gradient: {methods['MAML']['final_psnr_mean']:.2f} "
        "dB at the end).",
        *_reptile_cosine_lines(record),
        *_reptile_while_loop_lines(record, steps[-1]),
        "",
        f"![reptile regression]({results_path}/reptile_regression.png)",
        "",
    ]
    return lines


def activity_section(record: dict[str, Any], results_path: str) -> list[str]:
    """`activity.py`: every method against backprop, and the curve of activity
    perturbation's accuracy against the cost of a step."""
    return [
        "### Activity perturbation and local losses against backprop "
        "(`benchmarks/activity.py`)",
        "",
        f"Digits, MLP 64-{record['hidden']}-10; the methods are described on the "
        "docs' activity and local-loss pages.",
        "",
        *_docs_tables.activity_methods_table(record),
        "",
        "Activity perturbation with separate layers and k tangents per example:",
        "",
        *_docs_tables.activity_curve(record),
        "",
        f"![activity]({results_path}/activity.png)",
        "",
    ]


SECTIONS = {
    "activity": activity_section,
    "step_cost": step_cost_section,
    "step_cost_large": step_cost_large_section,
    "cpu_flags": cpu_flags_section,
    "cpu_flags_full": cpu_flags_section,
    "k_formulations": k_formulations_section,
    "chunk_memory": chunk_memory_section,
    "vs_pytorch": vs_pytorch_section,
    "digits_directions": digits_section,
    "digits_widths": digits_widths_section,
    "influence_balancing": influence_balancing_section,
    "long_sequence": long_sequence_section,
    "online_stream": online_stream_section,
    "online_stream_full": online_stream_section,
    "copy_task": copy_task_section,
    "copy_task_full": copy_task_full_section,
    "guess_quality": guess_quality_section,
    "scaling": scaling_section,
    "adam_problems": adam_problems_section,
    "reptile_regression": reptile_regression_section,
}


# The device checks' results (`benchmarks/device_check.sh` on a lent GPU), in a
# folder of their own under the results: `k_formulations_chunkC.json` is
# `k_formulations.py --chunk C`.
GPU_RESULTS = "gpu"


def _gpu_formulation_records(gpu_dir: pathlib.Path) -> dict[int, dict[str, Any]]:
    """`k_formulations` on the GPU by chunk size."""
    records = {}
    for path in [gpu_dir / "k_formulations.json", *gpu_dir.glob("k_formulations_*")]:
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            records[record["config"]["chunk"]] = record
    return dict(sorted(records.items()))


def gpu_chunks_lines(
    records: dict[int, dict[str, Any]], results_path: str
) -> list[str]:
    """One `vmap` over all k against chunks of c directions run one after the other
    (`jvp_scan_c`, the CPU's formulation), on the GPU: time ratio and peak memory."""
    rows: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for chunk, record in records.items():
        for model, data in record["results"].items():
            for k, entry in data.items():
                rows.setdefault((model, k), {})[chunk] = entry
    chunks = list(records)
    lines = [
        "One `vmap` of `jax.jvp` over all k against the same k directions in chunks "
        "of c, one chunk after the other (`jvp_scan_c` of "
        "`benchmarks/k_formulations.py`, the formulation the library uses on CPU): "
        "time over one `vmap`'s, median (interquartile range), and XLA's compiled "
        "peak (MiB).",
        "",
        "| model | k | `vmap` ms | `vmap` MiB | "
        + " | ".join(f"c={c}: time / `vmap` | c={c}: MiB" for c in chunks)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(chunks),
    ]
    ratios: dict[int, list[float]] = {c: [] for c in chunks}
    unrolled, peaks = [], {"vmap_jvp": [], "chunked": []}
    for (model, k), entries in sorted(
        rows.items(), key=lambda i: (i[0][0], int(i[0][1]))
    ):
        first = next(iter(entries.values()))
        peaks["vmap_jvp"].append(first["peak_bytes"]["vmap_jvp"])
        cells = []
        for c in chunks:
            entry = entries.get(c)
            if entry is None or int(k) <= c:
                cells += ["–", "–"]
                continue
            name = f"jvp_scan_{c}"
            ratios[c].append(entry["over_vmap_jvp"][name]["median"])
            unrolled.append(entry["over_vmap_jvp"][f"jvp_unrolled_{c}"]["median"])
            peaks["chunked"].append((c, entry["peak_bytes"][name]))
            cells += [
                _ratio(entry["over_vmap_jvp"][name]),
                _mib(entry["peak_bytes"][name]),
            ]
        lines.append(
            f"| {model} | {k} | {_ms(first['seconds']['vmap_jvp'])} "
            f"| {_mib(first['peak_bytes']['vmap_jvp'])} | " + " | ".join(cells) + " |"
        )
    spans = [f"{min(r):.1f}–{max(r):.1f}× with c = {c}" for c, r in ratios.items() if r]
    smallest = min(c for c, _ in peaks["chunked"])
    smallest_peak = max(b for c, b in peaks["chunked"] if c == smallest)
    verdict = (
        "so on GPUs the library keeps one `vmap` over all k by default, and its "
        "peak memory grows with k unless `chunk_size` is set"
        if all(min(r) > 1 for r in ratios.values() if r)
        else "some chunkings are not slower than one `vmap`"
    )
    lines += [
        "",
        "On this GPU one `vmap` is the fastest: chunks take "
        + ", ".join(spans)
        + f" of its time (unrolled, `jvp_unrolled_c`, {min(unrolled):.1f}–"
        f"{max(unrolled):.1f}×): {verdict}, to "
        f"{_mib(max(peaks['vmap_jvp']))} MiB here, where chunks of {smallest} stay "
        f"under {_mib(smallest_peak)} MiB at every k.",
        "",
        f"![formulations on the GPU]({results_path}/k_formulations.png)",
        "",
    ]
    return lines


def gpu_lines(gpu_dir: pathlib.Path, results_path: str) -> list[str]:
    """The device checks' section: step cost, the large MLP and the chunk study."""
    lines = [
        "### On a GPU (`benchmarks/device_check.sh`)",
        "",
        "The same studies on a lent GPU, each table as its CPU counterpart above "
        f"(results in `{results_path}`).",
        "",
    ]
    for name, section in (
        ("step_cost", step_cost_section),
        ("step_cost_large", step_cost_large_section),
        ("chunk_memory", chunk_memory_section),
    ):
        path = gpu_dir / f"{name}.json"
        if path.exists():
            heading, *body = section(json.loads(path.read_text()), results_path)
            lines += ["#" + heading + ", GPU", *body]
    records = _gpu_formulation_records(gpu_dir)
    if records:
        lines += ["#### Chunks of directions, GPU", ""]
        lines += gpu_chunks_lines(records, results_path)
    return lines


def render(results_dir: pathlib.Path, readme_dir: pathlib.Path) -> str:
    """The Markdown between the markers, from the result files found."""
    try:
        relative = results_dir.resolve().relative_to(readme_dir.resolve()).as_posix()
    except ValueError:
        relative = results_dir.resolve().as_posix()
    lines = [
        "",
        "<!-- Generated by benchmarks/report.py from benchmarks/results/*.json; "
        "do not edit by hand. -->",
        "",
        "Measured on a shared machine whose cores other processes also used: "
        "timings are noisy, so we report medians with interquartile ranges, and "
        "ratios from interleaved repeats. Rerun with `make bench`.",
        "",
    ]
    run_all = results_dir / "run_all.json"
    if run_all.exists():
        lines += run_all_lines(json.loads(run_all.read_text()))
    for name, section in SECTIONS.items():
        path = results_dir / f"{name}.json"
        if path.exists():
            lines += section(json.loads(path.read_text()), relative)
    if (results_dir / GPU_RESULTS).is_dir():
        lines += gpu_lines(results_dir / GPU_RESULTS, f"{relative}/{GPU_RESULTS}")
    return "\n".join(lines)


def update_readme(readme: pathlib.Path, body: str) -> str:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no `{START}` … `{END}` markers.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + "\n" + body + "\n" + END + tail


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--results", type=pathlib.Path, default=ROOT / "benchmarks" / "results"
    )
    parser.add_argument("--readme", type=pathlib.Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    pages = {
        args.readme: update_readme(
            args.readme, render(args.results, args.readme.parent)
        ),
        # The docs pages of the checkout whose README this is (none for a README
        # elsewhere, as in the tests).
        **_docs_tables.updated_pages(args.results, args.readme.parent),
    }
    stale = [path for path, text in pages.items() if text != path.read_text()]
    if args.check:
        if stale:
            names = ", ".join(map(str, stale))
            print(f"{names}: out of date with the results; run benchmarks/report.py.")
            raise SystemExit(1)
        return
    for path in stale:
        path.write_text(pages[path])
        print(f"wrote the results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
