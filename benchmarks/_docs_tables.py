"""The docs pages' tables of benchmark results, written by `report.py`.

A table lives in its page between `<!-- results:NAME:start -->` and
`<!-- results:NAME:end -->`; `TABLES` says which result file
(`benchmarks/results/FILE.json`) and function make table `NAME`. Nothing in it is
typed by hand.
"""

import json
import pathlib
from collections.abc import Callable
from typing import Any


def _ratio(entry: dict[str, Any] | None) -> str:
    return "–" if entry is None else f"{entry:.1f}"


def _accuracy_and_gap(method: str, entry: dict[str, Any]) -> str:
    """A method's test accuracy (mean ± std, %) and gap to backprop cells."""
    gap = (
        "—"
        if method == "backprop"
        else f"{entry['points_below_backprop']:.2f} ± {entry['gap_standard_error']:.2f}"
    )
    return (
        f"{100 * entry['test_accuracy_mean']:.2f} ± "
        f"{100 * entry['test_accuracy_std']:.2f} | {gap}"
    )


def _protocol(record: dict[str, Any], optimizer: str = "SGD") -> str:
    """The sentence under an accuracy table: what was run, what the cells are."""
    return (
        f"{record['num_updates']} {optimizer} updates, batch {record['batch_size']}, "
        f"seeds {record['seeds']}, step sizes {record['learning_rates']}; mean ± "
        "standard deviation over seeds, the gap with the standard error of a "
        "difference of means"
    )


def activity_models_table(record: dict[str, Any]) -> list[str]:
    """`activity_models.py --full`: every model and method against backprop."""
    lines = [
        "| model | method | forward only | step size | test accuracy (%) "
        "| below backprop (points) | time / backprop | memory / backprop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    captions = []
    for name, model in record["models"].items():
        for index, (method, entry) in enumerate(model["methods"].items()):
            time = model["step_time"][method]["ratio_to_backprop"]["median"]
            memory = (model["memory"][method] or {}).get("ratio_to_backprop")
            lines.append(
                f"| {name if index == 0 else ''} | {method} "
                f"| {'yes' if entry['forward_only'] else 'no'} "
                f"| {entry['best_learning_rate']} "
                f"| {_accuracy_and_gap(method, entry)} "
                f"| {time:.1f} | {_ratio(memory)} |"
            )
        machine = model["timed_on"]
        backprop = model["step_time"]["backprop"]["seconds"]["median"]
        captions.append(
            f"{name}: backprop's step {1e3 * backprop:.2f} ms, timed on "
            f"{machine['cpu_count']} cores ({machine['cpu']}) at load average "
            f"{machine['load_average_1_5_15min'][0]:.1f}, commit "
            f"{machine['git_commit']}"
        )
    grids = "; ".join(
        f"{name}: seeds {model.get('seeds', record['seeds'])}, step sizes "
        f"{model.get('learning_rates', record['learning_rates'])}"
        for name, model in record["models"].items()
    )
    protocol = (
        f"{record['num_updates']} {record.get('optimizer', 'SGD')} updates, batch "
        f"{record['batch_size']} ({grids}); mean ± standard deviation over seeds, "
        "the gap with the standard error of a difference of means"
    )
    return [*lines, "", f"{protocol}. " + "; ".join(captions) + "."]


def _points(value: float) -> str:
    return f"{value:g} point" + ("" if value == 1 else "s")


def _best_forward_only(model: dict[str, Any]) -> str:
    method = model["best_forward_only"]
    entry = model["methods"][method]
    time = model["step_time"][method]["ratio_to_backprop"]["median"]
    memory = (model["memory"][method] or {}).get("ratio_to_backprop")
    cost = f"{time:.1f}× a backprop step" + (
        "" if memory is None else f" and {memory:.1f}× its peak memory"
    )
    return f"{method}, {entry['points_below_backprop']:.1f} points below, at {cost}"


def activity_models_goals(sgd: dict[str, Any], adam: dict[str, Any]) -> list[str]:
    """`activity_models.py --full` with SGD and with `--adam`: per model, the
    closest forward-only method under each optimizer against the model's goal, and
    whether the accuracy goal is reached, and with it the cost goal (a step of at
    most 3 backprop steps) by the same method."""
    rows = [
        "| model (goal) | SGD: closest forward-only | Adam: closest forward-only "
        "| accuracy goal reached | and at most 3× a backprop step |",
        "|---|---|---|---|---|",
    ]
    for name, model in sgd["models"].items():
        other = adam["models"].get(name)
        studies = [model] if other is None else [model, other]
        reached = any(study["accuracy_goal_met"] for study in studies)
        both = any(study["methods_meeting_both_goals"] for study in studies)
        rows.append(
            f"| {name} ({_points(model['goal_points'])}) | {_best_forward_only(model)} "
            f"| {'not run' if other is None else _best_forward_only(other)} "
            f"| {'yes' if reached else 'no'} | {'yes' if both else 'no'} |"
        )
    return rows


def _time_ratio(record: dict[str, Any], method: str) -> str:
    entry = record["step_time"].get(method)
    return "–" if entry is None else f"{entry['ratio_to_backprop']['median']:.1f}"


def _caption(record: dict[str, Any]) -> str:
    machine = record["machine"]
    return (
        f"{machine['cpu_count']} cores ({machine['cpu']}), load average "
        f"{machine['load_average_1_5_15min'][0]:.1f}, commit {machine['git_commit']}"
    )


def _step_size(record: dict[str, Any], entry: dict[str, Any]) -> str:
    rate, grid = entry["best_learning_rate"], record["learning_rates"]
    edge = {max(grid): " (grid's largest)", min(grid): " (grid's smallest)"}
    return f"{rate:g}{edge.get(rate, '')}"


def activity_methods_table(
    record: dict[str, Any], methods: list[str] | None = None, errors: bool = False
) -> list[str]:
    """`activity.py`: the test accuracy and step time against backprop of `methods`
    (default: all), with each estimator's relative squared error when `errors`."""
    timed = "step_time" in record
    extra = [" relative squared error |"] * errors + [
        " time per step / backprop |"
    ] * timed
    lines = [
        "| method | forward only | best step size | test accuracy (%) "
        "| below backprop (points) |" + "".join(extra),
        "|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for method in methods or list(record["methods"]):
        entry = record["methods"][method]
        cells = [_accuracy_and_gap(method, entry)]
        if errors:
            error = record["relative_squared_error_at_init"][method]
            cells.append("0" if error < 1e-6 else _significant(error))
        if timed:
            cells.append(_time_ratio(record, method))
        lines.append(
            f"| {method} | {'yes' if entry['forward_only'] else 'no'} "
            f"| {_step_size(record, entry)} | " + " | ".join(cells) + " |"
        )
    optimizer = "Adam" if "adam" in record.get("optimizer", "") else "SGD"
    caption = _protocol(record, optimizer)
    if timed:
        backprop = record["step_time"]["backprop"]["seconds"]["median"]
        caption += (
            "; step times are medians of interleaved repeats (backprop's step "
            f"{1e3 * backprop:.2f} ms) on {_caption(record)}"
        )
    return [*lines, "", caption + "."]


def activity_curve(record: dict[str, Any]) -> list[str]:
    """`activity.py`: activity perturbation with separate layers and k tangents per
    example, accuracy against the time of a step, and which methods meet both of
    the issue's goals."""
    lines = [
        "| tangents per example k | best step size | test accuracy (%) "
        "| below backprop (points) | time per step / backprop |",
        "|---|---|---|---|---|",
    ]
    for point in record["curve"]:
        entry = record["methods"][point["method"]]
        lines.append(
            f"| {point['num_directions']} | {_step_size(record, entry)} "
            f"| {_accuracy_and_gap(point['method'], entry)} "
            f"| {_time_ratio(record, point['method'])} |"
        )
    return [*lines, "", _protocol(record) + ". " + _goals_verdict(record)]


def _goals_verdict(record: dict[str, Any]) -> str:
    """`activity.py`'s `methods_meeting_both_goals` as a sentence."""
    both = record["methods_meeting_both_goals"]
    goals = (
        f"within {_points(record['goal_points'])} of backprop at a step of at most "
        f"{record['cost_goal']:g}× backprop's"
    )
    if both:
        return f"Forward-only methods {goals}: " + ", ".join(both) + "."
    return f"No forward-only method is {goals}."


def adam_against_sgd(sgd: dict[str, Any], adam: dict[str, Any]) -> list[str]:
    """`activity_adam.py` against `activity.py`: each forward-only method's gap to
    backprop with SGD and with Adam, and the closest one against the goal."""
    gaps = [
        f"{method} {sgd['methods'][method]['points_below_backprop']:.1f} → "
        f"{entry['points_below_backprop']:.1f}"
        for method, entry in adam["methods"].items()
        if entry["forward_only"] and method in sgd["methods"]
    ]
    best = adam["best_forward_only"]
    reached = "reached" if adam["goal_met"] else "not reached"
    return [
        "Points below backprop, SGD → Adam: " + "; ".join(gaps) + ". The closest "
        f"forward-only method with Adam, {best}, ends "
        f"{adam['methods'][best]['points_below_backprop']:.1f} points below backprop "
        f"(goal: {_points(adam['goal_points'])}; {reached})."
    ]


def local_losses_table(record: dict[str, Any]) -> list[str]:
    """`activity.py`'s local-loss rows against backprop and activity perturbation
    with separate layers, with each estimator's relative squared error."""
    methods = [
        name
        for name in record["methods"]
        if name in ("backprop", "activity, separate layers")
        or "local" in name
        or "guess" in name
    ]
    return activity_methods_table(record, methods, errors=True)


def local_losses_verdict(record: dict[str, Any]) -> list[str]:
    """`activity.py`: whether a forward-only local-loss method meets the goal
    (within `goal_points` of backprop at most `cost_goal` backprop steps), which
    forward-only method does, and the closest local-loss one."""
    methods, times = record["methods"], record["step_time"]

    def gap(name: str) -> str:
        method = methods[name]
        text = (
            f"{method['points_below_backprop']:.1f} ± "
            f"{method['gap_standard_error']:.1f} points below backprop"
        )
        if name in times:
            text += (
                f" at {times[name]['ratio_to_backprop']['median']:.1f} backprop steps"
            )
        return text

    local = [
        name
        for name, method in methods.items()
        if method["forward_only"] and method["target"] == "local losses"
    ]
    meeting = record["methods_meeting_both_goals"]
    goal = (
        f"within {record['goal_points']:g} point of backprop at most "
        f"{record['cost_goal']:g} backprop steps"
    )
    local_meeting = [name for name in meeting if name in local]
    verdict = (
        f"On this model {_names(local_meeting)} meet the goal ({goal})"
        if local_meeting
        else f"On this model no forward-only local-loss method meets the goal ({goal})"
    )
    best = record["best_forward_only"]
    best_text = (
        f"{_names([best])} does, without them"
        if best in meeting
        else f"the closest forward-only method is {_names([best])}"
    )
    closest = min(local, key=lambda name: methods[name]["points_below_backprop"])
    backprop_inside = [
        name
        for name, method in methods.items()
        if not method["forward_only"]
        and name != "backprop"
        and method["points_below_backprop"] <= record["goal_points"]
    ]
    return [
        f"**{verdict}; {best_text}** ({gap(best)}: the [curve on the activity "
        "page](activity.md#accuracy-against-cost-k-tangents-per-example)). Within "
        f"{record['goal_points']:g} point of backprop but backpropagating inside "
        f"the blocks: {_names(backprop_inside)}. The closest forward-only local-loss "
        f"method is {_names([closest])}, {gap(closest)}."
    ]


def _names(names: list[str]) -> str:
    """Method names, which hold commas themselves, in italics and apart by `;`."""
    return "; ".join(f"*{name}*" for name in names)


def activity_errors_table(record: dict[str, Any]) -> list[str]:
    """`activity.py`: each estimator's relative squared error at initialisation."""
    lines = ["| estimator | relative squared error |", "|---|---|"]
    for method, error in record["relative_squared_error_at_init"].items():
        if record["methods"][method]["forward_only"]:
            lines.append(f"| {method} | {_significant(error)} |")
    return lines


STEP_COST_MODELS = {
    "mlp": "MLP 784-256-256-10, batch 256",
    "conv": "ConvNet, 28×28, batch 128",
    "lstm": "LSTM-128, $T = 100$, batch 32",
}


def _significant(value: float) -> str:
    """Three significant digits, without an exponent."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def step_cost_memory_table(record: dict[str, Any]) -> list[str]:
    """`step_cost.py`: XLA's compiled peak memory of one estimate, MiB."""
    columns = {
        "grad": "`filter_grad`",
        "grad_remat": "`filter_grad`, remat",
        "dodge_k1": "`filter_dodge` $k = 1$",
        "average_k4": "$k = 4$",
        "average_k16": "$k = 16$",
        "average_k64": "$k = 64$",
    }
    lines = [
        "| model | " + " | ".join(columns.values()) + " |",
        "|---|" + "---|" * len(columns),
    ]
    over_grad = []
    for name, label in STEP_COST_MODELS.items():
        memory = record["results"][name]["memory_bytes"]
        cells = [
            f"{memory[c]['peak_bytes'] / 2**20:.1f}" if memory.get(c) else "–"
            for c in columns
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        ratio = memory["average_k64"]["peak_bytes"] / memory["grad"]["peak_bytes"]
        over_grad.append(f"{ratio:.1f}× ({label.split(',')[0]})")
    return [
        *lines,
        "",
        "$k = 64$ over `filter_grad`: "
        + ", ".join(over_grad)
        + f"; {_caption(record)}.",
    ]


def step_cost_time_table(record: dict[str, Any]) -> list[str]:
    """`step_cost.py`: milliseconds per estimate (median), and one direction's and
    k directions' cost relative to backprop's and to k single directions."""
    columns = {
        "forward": "forward",
        "grad": "`filter_grad`",
        "grad_remat": "`filter_grad`, remat",
        "dodge_k1": "`filter_dodge` $k = 1$",
        "average_k16": "$k = 16$",
        "average_k64": "$k = 64$",
    }
    lines = [
        "| model | "
        + " | ".join(columns.values())
        + " | $k = 1$ / `filter_grad` | time($16$) / (16 · time($1$)) |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for name, label in STEP_COST_MODELS.items():
        result = record["results"][name]
        seconds = result["seconds"]
        cells = [
            _significant(1e3 * seconds[c]["median"]) if c in seconds else "–"
            for c in columns
        ]
        one = result["ratios"]["dodge_k1_over_grad"]["median"]
        scaling = result["scaling"]["average"]["16"]["median"]
        lines.append(
            f"| {label.split(',')[0]} | "
            + " | ".join(cells)
            + f" | {one:.2f} | {scaling:.2f} |"
        )
    return [*lines, "", f"Medians of interleaved repeats on {_caption(record)}."]


CPU_FLAGS_LABELS = {
    "forward": "forward",
    "grad": "`filter_grad`",
    "dodge_k1": "`filter_dodge` $k = 1$",
    "dodge_k": "`filter_dodge` $k = {k}$",
    "listing_k": "hand-written vmap of jvp, $k = {k}$",
}


CPU_FLAGS_SETTINGS = {
    "default": "XLA's defaults",
    "ynn_off": "no YNNPACK fusion",
    "scheduler_off": "no concurrency-optimised scheduler",
}


def _cpu_flags_rows(
    record: dict[str, Any], models: list[str], cell: Callable[[str, str, str], str]
) -> list[str]:
    """One row per (model, setting) of `cpu_flags.py`, `cell(model, setting, c)`
    for each computation; the model named on its first row only."""
    rows = []
    for model in models:
        for i, setting in enumerate(CPU_FLAGS_SETTINGS):
            name = record["descriptions"][model] if i == 0 else ""
            cells = [cell(model, setting, c) for c in CPU_FLAGS_LABELS]
            label = CPU_FLAGS_SETTINGS[setting]
            rows.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return rows


def _cpu_flags_header(record: dict[str, Any], extra: str = "") -> list[str]:
    k = record["config"]["k"]
    labels = [label.format(k=k) for label in CPU_FLAGS_LABELS.values()]
    columns = ["model", "`XLA_FLAGS`", *labels] + ([extra] if extra else [])
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _cpu_flags_caption(record: dict[str, Any]) -> str:
    settings = record["config"]["settings"]
    return (
        f"no YNNPACK fusion: `XLA_FLAGS={settings['ynn_off']}`; no "
        f"concurrency-optimised scheduler: `XLA_FLAGS={settings['scheduler_off']}`"
    )


def cpu_flags_table(record: dict[str, Any]) -> list[str]:
    """`cpu_flags.py`: per model and setting of `XLA_FLAGS`, each computation's
    milliseconds (with the ratio to the defaults') and `filter_dodge`'s scaling in
    k."""
    config, results = record["config"], record["results"]
    k = config["k"]
    timed = [m for m in results if "milliseconds" in results[m]]

    def cell(model: str, setting: str, computation: str) -> str:
        ms = results[model]["milliseconds"][setting][computation]
        if setting == "default":
            return f"{ms:.3g}"
        return f"{ms:.3g} ({results[model]['over_default'][setting][computation]:.2f}×)"

    lines = _cpu_flags_header(record, f"time({k}) / ({k} · time(1))")
    for row, (model, setting) in zip(
        _cpu_flags_rows(record, timed, cell),
        [(m, s) for m in timed for s in CPU_FLAGS_SETTINGS],
    ):
        ms = results[model]["milliseconds"][setting]
        lines.append(f"{row} {ms['dodge_k'] / (k * ms['dodge_k1']):.2f} |")
    rounds = config["rounds"]
    return lines + [
        "",
        "Milliseconds per call (in brackets, over the time with XLA's defaults: "
        f"below 1, faster); {_cpu_flags_caption(record)}. Medians of interleaved "
        f"repeats, {rounds} fresh process{'es' * (rounds > 1)} per setting; "
        f"{_caption(record)}.",
    ]


def cpu_flags_memory_table(record: dict[str, Any]) -> list[str]:
    """`cpu_flags.py`: per model and setting of `XLA_FLAGS`, each computation's
    compiled temporary memory."""
    results = record["results"]

    def cell(model: str, setting: str, computation: str) -> str:
        return f"{results[model]['temp_mib'][setting][computation]:.3g}"

    return [
        *_cpu_flags_header(record),
        *_cpu_flags_rows(record, list(results), cell),
        "",
        f"XLA's temporary memory (MiB) of each compiled call; "
        f"{_cpu_flags_caption(record)}; {_caption(record)}.",
    ]


def deep_conv_sentence(record: dict[str, Any]) -> list[str]:
    """`cpu_flags.py`'s eight-layer conv net under XLA's default flags: the compiled
    temporary memory of backprop and of `filter_dodge` with one and k directions."""
    memory = record["results"]["conv_deep"]["temp_mib"]["default"]
    return [
        "On an eight-layer conv net (16 channels at 28×28, batch 64; `cpu_flags.py`'s "
        "memory table in [Troubleshooting](troubleshooting.md#memory-on-cpu-xlas-"
        f"concurrency-optimised-scheduler)) `filter_grad` needs {memory['grad']:.0f} "
        f"MiB, `filter_dodge` {memory['dodge_k1']:.0f} with one direction and "
        f"{memory['dodge_k']:.0f} with {record['config']['k']} (XLA's compiled "
        f"temporaries, commit {record['machine']['git_commit']})."
    ]


def scaling_step_sentence(record: dict[str, Any]) -> list[str]:
    """`scaling.py`: the sharded DODGE step over the sharded gradient step at the
    largest model timed."""
    timed = [row for row in record["rows"] if "step_seconds" in row["dodge"]]
    row = max(timed, key=lambda row: row["num_parameters"])
    ratio = (
        row["dodge"]["step_seconds"]["median"]
        / row["gradient"]["step_seconds"]["median"]
    )
    devices = record["config"]["num_devices"]
    return [
        f"At p = {row['num_parameters']:,} the measured DODGE step with "
        f"k = {record['config']['num_directions']} is {ratio:.1f} times the "
        f"gradient step (all {devices} simulated devices on {_caption(record)})."
    ]


def step_cost_large_table(record: dict[str, Any]) -> list[str]:
    """`step_cost.py --large`: the p = 5.8 M MLP's times and the two ratios."""
    (result,) = record["results"].values()
    seconds, ratios = result["seconds"], result["ratios"]
    names = ("forward", "grad", "grad_remat", "jvp_fixed_direction", "dodge_k1")
    labels = ("forward", "`filter_grad`", "remat", "jvp alone", "$k = 1$")
    return [
        "| " + " | ".join(labels) + " | $k = 8$ | $k = 1$ / jvp alone "
        "| time(8) / (8 · time(1)) |",
        "|" + "---|" * (len(labels) + 3),
        "| "
        + " | ".join(f"{1e3 * seconds[name]['median']:.1f}" for name in names)
        + f" | {1e3 * seconds['average_k8']['median']:.0f} "
        f"| {ratios['dodge_k1_over_jvp_fixed_direction']['median']:.2f} "
        f"| {result['scaling']['average']['8']['median']:.2f} |",
        "",
        f"{result['description']} ({result['num_parameters']:,} parameters), "
        f"milliseconds per estimate; {_caption(record)}.",
    ]


def digits_directions_table(record: dict[str, Any]) -> list[str]:
    """`digits_directions.py`: final training accuracy against the number of
    directions, the exact gradient last."""
    runs = record["directions"]
    labels = [
        "exact gradient"
        if run["num_directions"] == "oracle"
        else str(run["num_directions"])
        for run in runs
    ]
    updates = runs[0]["num_updates"]
    return [
        "| directions $k$ | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(runs),
        f"| accuracy after {updates} updates | "
        + " | ".join(f"{run['final_accuracy_mean']:.2f}" for run in runs)
        + " |",
    ]


LONG_SEQUENCE_METHODS = {
    "bptt": "BPTT",
    "bptt_remat": "BPTT with `jax.checkpoint` on √T segments",
    "dodge_k1": "DODGE, $k = 1$",
    "dodge_k8": "DODGE, $k = 8$",
}


def _length(t: str) -> str:
    """A sequence length as the pages write it in MathJax: $T = 50\\,000$."""
    return "$T = " + f"{int(t):,}".replace(",", r"\,") + "$"


def long_sequence_table(record: dict[str, Any]) -> list[str]:
    """`long_sequence.py`: each gradient's peak memory and time against the forward
    pass's, at every sequence length $T$."""
    lengths = sorted(record["ratios"], key=int)
    headers = [f"peak / forward, {_length(lengths[-1])}"]
    headers += [f"MiB beyond forward, {_length(t)}" for t in lengths]
    headers += [f"time / forward, {_length(t)}" for t in lengths]
    lines = [
        "| method | " + " | ".join(headers) + " |",
        "|---|" + "---|" * len(headers),
    ]
    for method, label in LONG_SEQUENCE_METHODS.items():
        rows = [record["ratios"][t][f"{method}_over_forward"] for t in lengths]
        cells = [f"{rows[-1]['xla_peak_bytes']:.2f}×"]
        cells += [f"{row['xla_extra_mib']:.1f}" for row in rows]
        cells += [
            "not run" if row["seconds"] is None else f"{row['seconds']:.1f}×"
            for row in rows
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    forward = [record["points"][t]["forward"]["seconds"]["median"] for t in lengths]
    quality = record["quality"]
    cosines = ", ".join(
        f"{value:.3f} ($k = {name.removeprefix('dodge_k')}$)"
        for name, value in quality["cosine_with_bptt"].items()
    )
    limit = record["config"]["max_run_bytes"] / 2**30
    return [
        *lines,
        "",
        f"XLA's compiled peak memory; a gradient that needs over {limit:g} GiB is "
        "compiled but not run. The forward pass took "
        + ", ".join(f"{seconds:.2f} s" for seconds in forward)
        + f" at these lengths. At {_length(str(quality['length']))} (one key) "
        f"DODGE's estimate had cosine {cosines} with the exact gradient, and remat "
        "BPTT's gradient differed from BPTT's by at most "
        f"{quality['bptt_remat_max_relative_difference']:.1e} (relative); "
        f"{_caption(record)}.",
    ]


ONLINE_STREAM_METHODS = {
    "forward": "forward pass only (no training)",
    "tbptt": "truncated BPTT, one window",
    "dodge_k1": "online DODGE, $k = 1$",
    "bptt": "BPTT through the whole stream",
    "bptt_remat": "BPTT with `jax.checkpoint`, √W segments of windows",
}


def _steps(t: str) -> str:
    return "$10^{" + str(len(t) - 1) + "}$" if t.strip("0") == "1" else f"{int(t):,}"


def online_stream_table(record: dict[str, Any]) -> list[str]:
    """`online_stream.py`: time per stream step and peak memory (XLA's and the
    process's) of each method, at every stream length."""
    summary, config = record["summary"], record["config"]
    lengths = sorted(record["points"], key=int)
    at = " / ".join(_steps(t) for t in lengths) + " steps"
    lines = [
        f"| method | µs per step, {at} | XLA peak, MiB | RSS while running, MiB "
        "| RSS growth, MiB | loss over the last tenth |",
        "|---|---|---|---|---|---|",
    ]

    def joined(
        rows: list[dict[str, Any]], field: str, fmt: str, missing: str = "not run"
    ) -> str:
        return " / ".join(
            missing if row[field] is None else format(row[field], fmt) for row in rows
        )

    for method, label in ONLINE_STREAM_METHODS.items():
        if method not in summary:
            continue  # `make bench`'s run leaves the BPTT rows to `--full`
        rows = [summary[method]["lengths"][t] for t in lengths]
        growth = summary[method]["rss_growth_mib"]
        cells = [
            joined(rows, "microseconds_per_step", ".0f"),
            joined(rows, "xla_peak_mib", ".1f"),
            joined(rows, "run_peak_rss_mib", ".0f"),
            "—" if growth is None else f"{growth:+.1f}",
            joined(rows, "final_loss", ".3f", missing="—"),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [
        *lines,
        "",
        f"LSTM-{config['hidden']}, batch {config['batch']}, windows of "
        f"{config['window']} steps generated inside the compiled loop; one subprocess "
        "per point. RSS while running: the largest resident set sampled during the "
        "timed calls (the Python and XLA runtime included); its growth from the "
        "shortest stream to the longest is the RSS growth column. A "
        f"computation XLA predicts to need over {config['max_run_bytes'] / 2**30:g} "
        "GiB is compiled but not run. Truncated BPTT and DODGE take one SGD step per "
        f"window (step size {config['learning_rate']:g} for both, not tuned; the "
        "last column, the mean window loss over the stream's last tenth, shows "
        "whether they learned, starting from about 1); the two BPTT rows compute one "
        f"exact gradient of the whole stream (one update per stream); "
        f"{_caption(record)}.",
    ]


def which_activity_table(record: dict[str, Any]) -> list[str]:
    """`activity.py`'s main rows for the guide page."""
    methods = [
        "backprop",
        "weight DODGE k=1",
        "weight DODGE k=16",
        "activity, global",
        "activity, separate layers",
        "activity, separate layers k=16",
        "local losses, activity (LG-FG-A)",
        "local losses, backprop (LG-BP)",
    ]
    table = activity_methods_table(
        record, [name for name in methods if name in record["methods"]]
    )
    if "methods_meeting_both_goals" not in record:  # written before the goals were
        return table
    return [*table, "", _goals_verdict(record)]


# Table name: (result file or files, docs page, function of their records).
TABLES: dict[str, tuple[str | tuple[str, ...], str, Callable[..., list[str]]]] = {
    "activity_models_full": (
        "activity_models_full",
        "docs/concepts/local_losses.md",
        activity_models_table,
    ),
    "activity_models_adam_full": (
        "activity_models_adam_full",
        "docs/concepts/local_losses.md",
        activity_models_table,
    ),
    "activity_models_goals": (
        ("activity_models_full", "activity_models_adam_full"),
        "docs/concepts/local_losses.md",
        activity_models_goals,
    ),
    "activity": ("activity", "docs/concepts/activity.md", activity_methods_table),
    "activity_curve": ("activity", "docs/concepts/activity.md", activity_curve),
    "activity_adam": (
        "activity_adam",
        "docs/concepts/activity.md",
        activity_methods_table,
    ),
    "activity_adam_against_sgd": (
        ("activity", "activity_adam"),
        "docs/concepts/activity.md",
        adam_against_sgd,
    ),
    "activity_errors": (
        "activity",
        "docs/concepts/activity.md",
        activity_errors_table,
    ),
    "activity_local_losses": (
        "activity",
        "docs/concepts/local_losses.md",
        local_losses_table,
    ),
    "activity_local_verdict": (
        "activity",
        "docs/concepts/local_losses.md",
        local_losses_verdict,
    ),
    "long_sequence": ("long_sequence", "docs/which.md", long_sequence_table),
    "online_stream_full": ("online_stream_full", "docs/which.md", online_stream_table),
    "step_cost_memory": ("step_cost", "docs/which.md", step_cost_memory_table),
    "step_cost_time": ("step_cost", "docs/which.md", step_cost_time_table),
    "step_cost_large": ("step_cost_large", "docs/which.md", step_cost_large_table),
    "cpu_flags": ("cpu_flags", "docs/troubleshooting.md", cpu_flags_table),
    "cpu_flags_memory": (
        "cpu_flags",
        "docs/troubleshooting.md",
        cpu_flags_memory_table,
    ),
    "scaling_step": ("scaling", "docs/scaling.md", scaling_step_sentence),
    "cpu_flags_deep_conv": ("cpu_flags", "docs/which.md", deep_conv_sentence),
    "digits_directions": (
        "digits_directions",
        "docs/which.md",
        digits_directions_table,
    ),
    "activity_which": ("activity", "docs/which.md", which_activity_table),
}


def updated_pages(results: pathlib.Path, root: pathlib.Path) -> dict[pathlib.Path, str]:
    """Every docs page under `root` with a results table, its text with the tables
    rewritten from the result files found in `results`."""
    pages: dict[pathlib.Path, str] = {}
    for name, (result, page, table) in TABLES.items():
        names = (result,) if isinstance(result, str) else result
        paths, page_path = [results / f"{n}.json" for n in names], root / page
        if not all(path.exists() for path in paths) or not page_path.exists():
            continue
        text = pages.get(page_path, page_path.read_text())
        start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"{page} has no `{start}` … `{end}` markers.")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        body = "\n".join(table(*(json.loads(path.read_text()) for path in paths)))
        pages[page_path] = f"{head}{start}\n\n{body}\n\n{end}{tail}"
    return pages
