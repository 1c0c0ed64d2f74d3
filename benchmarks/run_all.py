"""Runs every benchmark script, then `report.py`: what `make bench` does.

- A full run goes one script at a time for the benchmarks that time or measure
    (`TIMED`), so that no benchmark's timings share the CPU with another's; the
    others, whose results are accuracies, losses and bit errors from fixed seeds that
    the machine's load cannot change, run first, one per core, and with them the
    training runs of the timed benchmarks that have them (`STAGED`, run in two
    stages: `_common.parse_args`'s `--stage`). Results go to
    `benchmarks/results/`, the wall time of each script and of the whole run to
    `results/run_all.json` (the README quotes it), and `report.py` rewrites the
    README's Performance section and the docs' result tables.
- `--quick` runs are smoke tests whose numbers mean nothing. Their time goes mostly
    to XLA compilation, which is single-threaded, so they run `--jobs` scripts at once
    (default: one per core); they write to `benchmarks/results/quick/` (ignored by git)
    so that the committed results stay as they are, and skip the report.

Run: `python benchmarks/run_all.py [--quick] [--jobs N] [--only NAME ...] [--out DIR]`.
"""

import argparse
import concurrent.futures
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import _common


HERE = pathlib.Path(__file__).resolve().parent
NOT_BENCHMARKS = ("report.py", "run_all.py")
# The benchmarks whose results include times or memory: a full run gives each the
# machine to itself. Every other script's results do not depend on the load.
TIMED = (
    "activity",
    "activity_models",
    "chunk_memory",
    "cpu_flags",
    "guess_quality",
    "k_formulations",
    "long_sequence",
    "online_stream",
    "scaling",
    "step_cost",
    "vs_pytorch",
)
# Timed benchmarks most of whose time goes to training runs: their runs go with the
# untimed scripts (`--stage untimed`), only their timing alone (`--stage timed`).
STAGED = ("activity", "activity_models", "guess_quality")


def benchmark_scripts() -> list[pathlib.Path]:
    """Every benchmark script: the `.py` files here except helpers (`_*.py`), the
    report and this runner."""
    return sorted(
        path
        for path in HERE.glob("*.py")
        if not path.name.startswith("_") and path.name not in NOT_BENCHMARKS
    )


def run_script(
    script: pathlib.Path, flags: Sequence[str], capture: bool
) -> tuple[float, subprocess.CompletedProcess]:
    """Runs one script in a fresh interpreter; returns its wall time in seconds and
    the finished process (with its output when `capture`)."""
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, str(script), *flags],
        capture_output=capture,
        text=True,
        check=False,
    )
    return time.perf_counter() - start, process


Run = tuple[pathlib.Path, list[str]]  # a script and its flags


Step = tuple[str, str | None]  # a script's name and the stage it runs, if one


def step(script: pathlib.Path, flags: Sequence[str]) -> Step:
    """The script's name and its stage where it runs one (`--stage` comes last)."""
    return script.stem, flags[-1] if "--stage" in flags else None


def label(name: str, stage: str | None) -> str:
    """How a step is printed and keyed in `run_all.json`."""
    return name + (f" ({stage} stage)" if stage else "")


def longest_first(runs: Sequence[Run], out: pathlib.Path) -> list[Run]:
    """`runs` by decreasing wall time in the last run recorded in `out` (those it
    lacks first; a stage by its own time): started longest first, parallel scripts
    end close together."""
    path = out / "run_all.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    last = record.get("seconds", {}) | record.get("stage_seconds", {})
    return sorted(runs, key=lambda run: -last.get(label(*step(*run)), math.inf))


def run_batch(
    scripts: Sequence[Run], jobs: int, seconds: dict[Step, float], failed: list[str]
) -> None:
    """Runs `scripts`, each with its flags, `jobs` at a time; records each one's
    wall time in `seconds` under its `step`, and the names of those that fail in
    `failed`."""
    # One script at a time streams its output live; parallel ones print it whole.
    capture = jobs > 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            pool.submit(run_script, script, flags, capture): (script, flags)
            for script, flags in scripts
        }
        for future in concurrent.futures.as_completed(futures):
            script, flags = futures[future]
            elapsed, process = future.result()
            seconds[step(script, flags)] = elapsed
            if capture:
                print(process.stdout + process.stderr, end="")
            status = "ok" if process.returncode == 0 else "FAILED"
            name = label(*step(script, flags))
            print(f"== {name}: {status} in {elapsed:.0f} s", flush=True)
            if process.returncode != 0:
                failed.append(script.name)


def full_run_batches(
    scripts: Sequence[pathlib.Path], flags: Sequence[str], jobs: int, out: pathlib.Path
) -> list[tuple[list[Run], int]]:
    """A full run's two batches of runs, each with its number of scripts at once:
    the untimed scripts and the training stages of the `STAGED` ones, one per core,
    longest first; then the `TIMED` ones (the timing stages of the `STAGED`), `jobs`
    at a time."""
    first = [
        (script, list(flags)) for script in scripts if script.stem not in TIMED
    ] + [
        (script, [*flags, "--stage", "untimed"])
        for script in scripts
        if script.stem in STAGED
    ]
    second = [
        (script, [*flags, *(["--stage", "timed"] if script.stem in STAGED else [])])
        for script in scripts
        if script.stem in TIMED
    ]
    return [(longest_first(first, out), os.cpu_count() or 1), (second, jobs)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-test configs")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="scripts run at once (default: 1, or one per core with --quick)",
    )
    parser.add_argument("--only", nargs="*", help="script names to run (no `.py`)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="results directory (default: benchmarks/results, or its quick/ folder)",
    )
    args = parser.parse_args(argv)
    out = args.out or (_common.RESULTS / "quick" if args.quick else _common.RESULTS)
    jobs = args.jobs or ((os.cpu_count() or 1) if args.quick else 1)
    scripts = benchmark_scripts()
    if args.only:
        unknown = set(args.only) - {script.stem for script in scripts}
        if unknown:
            raise SystemExit(f"Unknown benchmarks: {sorted(unknown)}.")
        scripts = [script for script in scripts if script.stem in args.only]
    flags = ["--out", str(out)] + (["--quick"] if args.quick else [])

    start = time.perf_counter()
    seconds: dict[Step, float] = {}  # a staged script's stages apart
    failed: list[str] = []
    if args.quick:
        batches = [([(script, list(flags)) for script in scripts], jobs)]
    else:
        batches = full_run_batches(scripts, flags, jobs, out)
    for batch, batch_jobs in batches:
        # A script whose untimed stage failed does not time: it would read an older
        # run's results.
        batch = [(script, f) for script, f in batch if script.name not in failed]
        run_batch(batch, batch_jobs, seconds, failed)
    total = time.perf_counter() - start
    print(f"== {len(scripts)} benchmarks in {total / 60:.1f} min", flush=True)
    if failed:
        raise SystemExit(f"Failed: {', '.join(failed)}")

    per_script = {script.stem: 0.0 for script in scripts}
    for (name, _), elapsed in seconds.items():
        per_script[name] += elapsed
    stages = {label(*key): elapsed for key, elapsed in seconds.items() if key[1]}
    record = {
        "config": {
            "quick": args.quick,
            "jobs": jobs,
            **(
                {}
                if args.quick
                else {
                    "timed": [name for name in TIMED if name in per_script],
                    "staged": [name for name in STAGED if name in per_script],
                    "untimed_jobs": os.cpu_count() or 1,
                }
            ),
        },
        "seconds": dict(sorted(per_script.items())),
        "stage_seconds": dict(sorted(stages.items())),
        "total_seconds": total,
    }
    _common.write_json(out, "run_all", record)
    if not args.quick and not args.only:
        report = HERE / "report.py"
        subprocess.run([sys.executable, str(report)], check=True)
    return record


if __name__ == "__main__":
    main()
