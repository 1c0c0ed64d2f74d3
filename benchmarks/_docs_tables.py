"""The docs pages' tables of benchmark results, written by `report.py`.

A table lives in its page between `<!-- results:NAME:start -->` and
`<!-- results:NAME:end -->`, where `NAME` is the result file
(`benchmarks/results/NAME.json`) it is made from; nothing in it is typed by hand.
"""

import json
import pathlib
from typing import Any


def _ratio(entry: dict[str, Any] | None) -> str:
    return "–" if entry is None else f"{entry:.1f}"


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
            gap = (
                "—"
                if method == "backprop"
                else f"{entry['points_below_backprop']:.2f} ± "
                f"{entry['gap_standard_error']:.2f}"
            )
            lines.append(
                f"| {name if index == 0 else ''} | {method} "
                f"| {'yes' if entry['forward_only'] else 'no'} "
                f"| {entry['best_learning_rate']} "
                f"| {100 * entry['test_accuracy_mean']:.2f} ± "
                f"{100 * entry['test_accuracy_std']:.2f} | {gap} "
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
    return [
        *lines,
        "",
        f"{record['num_updates']} SGD updates, batch {record['batch_size']}, seeds "
        f"{record['seeds']}, step sizes {record['learning_rates']}; mean ± standard "
        "deviation over seeds, the gap with the standard error of a difference of "
        "means. " + "; ".join(captions) + ".",
    ]


TABLES = {
    "activity_models_full": ("docs/concepts/local_losses.md", activity_models_table),
}


def updated_pages(results: pathlib.Path, root: pathlib.Path) -> dict[pathlib.Path, str]:
    """Every docs page with a results table, its text with the tables rewritten
    from the result files found in `results`."""
    pages: dict[pathlib.Path, str] = {}
    for name, (page, table) in TABLES.items():
        path = results / f"{name}.json"
        if not path.exists():
            continue
        page_path = root / page
        text = pages.get(page_path, page_path.read_text())
        start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"{page} has no `{start}` … `{end}` markers.")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        body = "\n".join(table(json.loads(path.read_text())))
        pages[page_path] = f"{head}{start}\n\n{body}\n\n{end}{tail}"
    return pages
