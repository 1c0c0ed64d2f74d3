"""Shared helpers of the benchmark scripts: timing, machine description, JSON output.

Timings are taken the same way everywhere:

- every function is jitted and compiled, then called once more (warm-up) before any
  clock is read;
- the number of calls per repeat is calibrated so that one repeat lasts at least
  `min_time` seconds, and every repeat ends with `jax.block_until_ready`;
- the repeats of all the functions being compared are *interleaved* (in a fresh random
  order each round), so that load from other processes on a shared machine hits every
  function alike, and a ratio is taken repeat by repeat before its median is;
- we report the median and the spread (min, quartiles, max) over the repeats.
"""

import argparse
import datetime
import json
import os
import pathlib
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# The two halves of a benchmark whose results include both timings and numbers the
# load cannot change (`parse_args`'s `--stage`).
STAGES = ("untimed", "timed")


def parse_args(
    doc: str | None,
    argv: Sequence[str] | None = None,
    flags: Sequence[tuple[str, str]] = (),
    options: Sequence[tuple[str, dict[str, Any]]] = (),
) -> argparse.Namespace:
    """The command line every benchmark accepts: `--quick` and `--out DIR`, plus the
    boolean `flags` given as `(name, help)` pairs and the `options` given as
    `(name, keyword arguments of add_argument)`. `doc` is the script's docstring."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small configuration that runs in about a minute (for smoke tests)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=RESULTS,
        help="directory for the JSON and PNG results (default: benchmarks/results)",
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default=None,
        help="only the part of the run that does not time or measure (`untimed`, kept "
        "under OUT/.staged/), or only the timing, after it (`timed`); `run_all.py` "
        "runs the first side by side with other scripts and the second alone",
    )
    for name, help in flags:
        parser.add_argument(name, action="store_true", help=help)
    for name, kwargs in options:
        parser.add_argument(name, **kwargs)
    return parser.parse_args(argv)


def untimed_part(
    out_dir: pathlib.Path, name: str, stage: str | None, compute: Callable[[], Any]
) -> Any:
    """The results of `compute()`, the part of benchmark `name` whose numbers the
    machine's load cannot change, by `stage`: `None` computes them; `"untimed"`
    computes and keeps them under `out_dir/.staged/` and returns `None` (the script
    then stops); `"timed"` reads back what an `"untimed"` run kept."""
    path = out_dir / ".staged" / f"{name}.pickle"
    if stage == "timed":
        if not path.exists():
            raise SystemExit(f"{path} is missing: run with `--stage untimed` first.")
        return pickle.loads(path.read_bytes())
    value = compute()
    if stage == "untimed":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(value))
        return None
    return value


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_commit() -> str | None:
    # A copy of the tree without `.git` (a lent device machine) is told its commit.
    if os.environ.get("EQX_DODGE_GIT_COMMIT"):
        return os.environ["EQX_DODGE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=pathlib.Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


# The commit checked out when this process started, which is the code it runs: a
# long study's later records would otherwise name whatever was checked out when
# each run finished.
STARTED_AT_COMMIT = _git_commit()


def machine_info() -> dict[str, Any]:
    """Where and with what the benchmark ran (stored in every result file)."""
    import importlib.metadata

    import equinox
    import optax

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": _load_average(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": STARTED_AT_COMMIT,
    }


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of a list of per-call times (or of ratios)."""
    values = sorted(float(s) for s in samples)
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {
        "median": statistics.median(values),
        "min": values[0],
        "q1": q1,
        "q3": q3,
        "max": values[-1],
        "repeats": len(values),
    }


def _timed(fun: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fun()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def time_interleaved(
    funs: dict[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    min_time: float = 0.1,
) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, one list entry per repeat.

    Each function must already be jitted (or call jitted code); it is called once to
    compile and once to warm up before timing. The repeats of the functions are
    interleaved so that they see the same machine load.
    """
    if repeats < 5:
        raise ValueError(f"Use at least 5 repeats, got {repeats}.")
    calls = {}
    for name, fun in funs.items():
        jax.block_until_ready(fun())  # compile
        jax.block_until_ready(fun())  # warm up
        once = _timed(fun, 1)
        calls[name] = max(1, int(np.ceil(min_time / max(once, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in funs}
    order = list(funs)
    shuffle = np.random.default_rng(0).permutation
    for _ in range(repeats):
        # A fresh order every repeat, so no function always runs right after another.
        for name in [order[i] for i in shuffle(len(order))]:
            times[name].append(_timed(funs[name], calls[name]))
    return times


def ratio_samples(
    numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0
) -> list[float]:
    """Repeat-by-repeat ratios `numerator / (scale · denominator)`."""
    return [n / (scale * d) for n, d in zip(numerator, denominator)]


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled function, in bytes.

    `compiled` is the output of `jax.jit(f).lower(...).compile()` or of its
    `eqx.filter_jit` counterpart. `peak_bytes` is arguments + outputs + temporaries −
    aliased buffers: the most memory the compiled program holds at once.
    """
    compiled = getattr(compiled, "compiled", compiled)  # unwrap equinox's wrapper
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = {
        name: int(getattr(analysis, name + "_in_bytes", 0))
        for name in (
            "argument_size",
            "output_size",
            "temp_size",
            "alias_size",
            "generated_code_size",
        )
    }
    fields["peak_bytes"] = (
        fields["argument_size"]
        + fields["output_size"]
        + fields["temp_size"]
        - fields["alias_size"]
    )
    return fields


def resident_bytes() -> int | None:
    """The process's resident set now (Linux's `/proc/self/statm`), or None."""
    try:
        pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class ResidentPeak:
    """The largest resident set seen while the `with` block runs, sampled every
    `interval` seconds by a thread (XLA releases the GIL while it computes).
    `ru_maxrss` cannot tell a computation's peak from the compiler's, which is
    higher for short runs and varies by tens of MiB from one process to the next."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _observe(self) -> None:
        now = resident_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._observe()

    def __enter__(self) -> "ResidentPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._observe()


def measure_compiled(
    fun: Callable,
    args: Sequence[Any],
    *,
    repeats: int,
    max_run_bytes: int,
    timed_seconds: float = 10.0,
    warm_up_below_seconds: float = 1.0,
) -> tuple[dict[str, Any], Any, Any]:
    """Compiles `fun` (an `eqx.filter_jit` function) for `args`, analyses its memory
    and, unless XLA predicts more than `max_run_bytes`, times calls of it.

    Meant for a fresh process per measurement (see `run_point`), so that the peak
    resident set reported (`ru_maxrss`, compilation included) is this computation's;
    `run_peak_rss_bytes` is the largest resident set sampled while the compiled
    function ran (`ResidentPeak`). Timed calls stop at
    `repeats` or once they add up to `timed_seconds`; the first call is a dropped
    warm-up only when it is shorter than `warm_up_below_seconds` (a minute-long call
    is timed as it is). Returns the record, the compiled function and the output of
    its last call (None when it did not run).
    """
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    compiled = fun.lower(*args).compile()
    record: dict[str, Any] = {
        "xla_memory": memory_analysis(compiled),
        "compile_seconds": time.perf_counter() - start,
        "rss_after_setup_bytes": rss_setup,
    }
    peak = (record["xla_memory"] or {}).get("peak_bytes", 0)
    output = None
    if peak > max_run_bytes:
        record["skipped_run"] = (
            f"predicted peak {peak / 2**30:.1f} GiB exceeds "
            f"--max-run-bytes={max_run_bytes / 2**30:.1f} GiB"
        )
    else:
        with ResidentPeak() as resident:
            start = time.perf_counter()
            output = jax.block_until_ready(compiled(*args))
            first = time.perf_counter() - start
            times = [] if first < warm_up_below_seconds else [first]
            while len(times) < repeats and sum(times) < timed_seconds:
                start = time.perf_counter()
                output = jax.block_until_ready(compiled(*args))
                times.append(time.perf_counter() - start)
        record["seconds"] = (
            summarize(times) if len(times) > 1 else {"median": times[0], "repeats": 1}
        )
        record["run_peak_rss_bytes"] = resident.peak
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return record, compiled, output


def run_point(
    script: str, *point: Any, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs `script --point *point` in a fresh interpreter (with the environment
    variables `env` added to this process's) and returns the JSON record it prints
    last, or an `error` record with the end of its stderr."""
    command = [sys.executable, script, "--point", *map(str, point)]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else os.environ | env,
    )
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def point_line(record: dict[str, Any]) -> str:
    """One line of progress for a `measure_compiled` record of `method` at
    `length`: XLA's peak, the process's peak RSS, the median time, any error."""
    peak = (record.get("xla_memory") or {}).get("peak_bytes")
    seconds = (record.get("seconds") or {}).get("median", float("nan"))
    return (
        f"T={record['length']:>8} {record['method']:>10}: xla peak "
        f"{'?' if peak is None else f'{peak / 2**20:.1f} MiB'}, "
        f"rss {record.get('peak_rss_bytes', 0) / 2**20:.0f} MiB, {seconds:.2f} s"
        + (f"  ERROR {record['error'][-300:]}" if "error" in record else "")
    )


def write_json(
    out_dir: pathlib.Path, name: str, payload: dict[str, Any]
) -> pathlib.Path:
    """Writes `out_dir/<name>.json` with the machine description added."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {"benchmark": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def new_figure(*args: Any, **kwargs: Any) -> Any:
    """A matplotlib figure on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def log_log_axes(axes: Sequence[Any], xlabel: str, ylabels: Sequence[str]) -> None:
    """Both scales logarithmic, one x label and each axis's y label."""
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)


def save_figure(fig: Any, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
    return path


class RunLog:
    """The finished runs of a resumable study (a script's `--full`), kept in
    `out_dir/<name>.json`.

    Paper-scale studies take longer than one sitting, and a process left running is
    killed when the session ends. Each run is written to the file as soon as it
    finishes, with the machine and commit it ran on; a rerun loads the file and
    skips the runs already in it, so a study accumulates over several sittings.
    Runs are identified by a string key. A file written with another configuration
    is refused (move it away to start again): runs of two configurations must not
    be mixed in one table.
    """

    def __init__(self, out_dir: pathlib.Path, name: str, config: dict[str, Any]):
        self.out_dir, self.name = out_dir, name
        self.config = json.loads(json.dumps(config))  # as it reads back from JSON
        self.path = out_dir / f"{name}.json"
        self.runs: dict[str, Any] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved["config"] != self.config:
                raise SystemExit(
                    f"{self.path} holds runs of another configuration "
                    f"({saved['config']}); move it away to start a new study."
                )
            self.runs = saved["runs"]

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def add(self, key: str, record: dict[str, Any]) -> None:
        """Appends one finished run and rewrites the file at once."""
        self.runs[key] = {**record, "machine": machine_info()}
        write_json(self.out_dir, self.name, {"config": self.config, "runs": self.runs})
