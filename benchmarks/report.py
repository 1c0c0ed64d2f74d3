"""Writes the README's "Performance" section from `benchmarks/results/*.json`.

Every number in the section comes from a result file; nothing is typed by hand. The
section is the text between `<!-- performance:start -->` and
`<!-- performance:end -->` in README.md. `--check` only says whether the README is up
to date with the results.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any


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
    return f"{m['cpu']}, {m['cpu_count']} cores, jax {m['jax']}, {m['date_utc']}" + (
        f", load average {load[0]}" if load else ""
    )


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
        "repeat-by-repeat ratios. ✓/✗: goal met or not.",
        "",
        "| model | forward | `filter_grad` | Listing 1 | `filter_dodge` k=1 "
        f"| k=1 / Listing 1 (≤ {goals['dodge_k1_over_listing1']}) "
        f"| k=1 / forward (≤ {goals['dodge_k1_over_forward']}) | k=1 / grad |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s, q = r["seconds"], r["ratios"]
        lines.append(
            f"| {r['description']} | {_ms(s['forward'])} | {_ms(s['grad'])} "
            f"| {_ms(s['listing1'])} | {_ms(s['dodge_k1'])} "
            f"| {_ratio(q['dodge_k1_over_listing1'], goals['dodge_k1_over_listing1'])} "
            f"| {_ratio(q['dodge_k1_over_forward'], goals['dodge_k1_over_forward'])} "
            f"| {_ratio(q['dodge_k1_over_grad'])} |"
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
        + " | peak MiB: grad | k=1 | "
        + " | ".join(f"average k={k}" for k in shown)
        + " |",
        "|---|" + "---|" * (2 * len(shown) + 2 + len(shown)),
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
            + f" | {peak('grad')} | {peak('dodge_k1')} | "
            + " | ".join(peak(f"average_k{k}") for k in shown)
            + " |"
        )
    lines += ["", f"![step cost]({results_path}/step_cost.png)", ""]
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
        "| directions | "
        + " | ".join(str(r["num_directions"]) for r in record["directions"])
        + " |",
        "|---|" + "---|" * len(record["directions"]),
        "| final training accuracy | "
        + " | ".join(
            f"{r['final_accuracy_mean']:.3f} ± {r['final_accuracy_std']:.3f}"
            for r in record["directions"]
        )
        + " |",
        "",
        "| batch study (same samples seen) | "
        + " | ".join(
            f"k={r['num_directions']}, batch {r['batch_size']}"
            for r in record["batch_study"]
        )
        + " |",
        "|---|" + "---|" * len(record["batch_study"]),
        "| final training accuracy | "
        + " | ".join(
            f"{r['final_accuracy_mean']:.3f} ± {r['final_accuracy_std']:.3f}"
            for r in record["batch_study"]
        )
        + " |",
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
        lines.append(
            f"| {text} | {'yes' if record['claims'][key]['holds'] else 'no'} |"
        )
    lines += ["", f"![digits]({results_path}/digits_directions.png)", ""]
    return lines


SECTIONS = {
    "step_cost": step_cost_section,
    "k_formulations": k_formulations_section,
    "vs_pytorch": vs_pytorch_section,
    "digits_directions": digits_section,
}


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
    for name, section in SECTIONS.items():
        path = results_dir / f"{name}.json"
        if path.exists():
            lines += section(json.loads(path.read_text()), relative)
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
    new = update_readme(args.readme, render(args.results, args.readme.parent))
    if args.check:
        if new != args.readme.read_text():
            print(f"{args.readme} is out of date; run benchmarks/report.py.")
            raise SystemExit(1)
        return
    args.readme.write_text(new)
    print(f"wrote the Performance section of {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
