"""Training on a stream that is never stored: memory and time per step as the stream
grows to 10^6 steps, online DODGE against truncated BPTT (and full BPTT where it fits).

The LSTM of `long_sequence.py` (128 units, input 8, a linear readout, squared error
of predicting the input at every step), batch 32. The stream is generated window by
window inside the compiled loop (window `w` is drawn from the stream key folded with
`w`), so no computation holds more of it than one window. Methods:

- `forward`: the stream's mean loss, window by window, no training (the reference);
- `tbptt`: every window, the gradient of the window's loss by backprop through that
    window only (the state carried across windows, its gradient cut), one SGD step;
- `dodge_k1`: every window, `eqx_dodge.OnlineDodge` with one random direction (the
    state's tangent carried across windows), one SGD step;
- `bptt`, `bptt_remat`: one exact gradient of the whole stream's loss, through every
    window (an offline method: one update per stream); `bptt_remat` checkpoints
    segments of about √W of the W windows and regenerates their inputs on the way
    back. They are compiled and analysed at every length but run only where XLA's
    predicted peak fits `--max-run-bytes`.

Each (method, length) runs in its own subprocess. Memory: XLA's compiled peak and
the largest resident set sampled while the computation runs (the process's
`ru_maxrss` is kept too, but the compiler's peak dominates it). Times are per stream
step. The training methods also report the mean loss over the stream's last
tenth (one SGD step size for both, not tuned), a check that they learn, not a
comparison of what they learn.

`make bench` runs the first three methods at 10^3 and 10^4 steps; `--full` runs all
five at 10^4, 10^5 and 10^6 (about 20 minutes on 2 cores with `--max-run-bytes
2147483648`, which compiles but does not run the 10^6-step remat BPTT; resumable: a
rerun skips the points kept in `online_stream_full_runs.json`).
Run: `python benchmarks/online_stream.py [--quick | --full] [--out DIR]`.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _models import segment_length
from long_sequence import BATCH, HIDDEN, INPUT, Model, step, WINDOW

import eqx_dodge


LENGTHS = (1_000, 10_000)
FULL_LENGTHS = (10_000, 100_000, 1_000_000)
QUICK_LENGTHS = (200, 400)
METHODS = ("forward", "tbptt", "dodge_k1", "bptt", "bptt_remat")
TRAINING_METHODS = ("tbptt", "dodge_k1")
# `make bench`'s run leaves the BPTT rows to `--full`: `long_sequence.py` measures
# them on the same LSTM at 10^3 and 10^4 steps, and each costs `make bench` 20 s.
DEFAULT_METHODS = ("forward", *TRAINING_METHODS)
LEARNING_RATE = 1e-2
# The goal of the issue that asked for this study: DODGE's peak RSS grows by at most
# this much from 10^4 to 10^6 steps.
RSS_GROWTH_GOAL_MIB = 5.0


def window_inputs(stream_key, index):
    """Window `index` of the stream: generated where it is used, never stored."""
    shape = (WINDOW, BATCH, INPUT)
    return jax.random.normal(jax.random.fold_in(stream_key, index), shape)


def window_loss(model, state, window):
    def body(s, x):
        return step(model, s, x)

    state, losses = jax.lax.scan(body, state, window)
    return jnp.mean(losses), state


def sgd(model, gradient):
    return eqx.apply_updates(
        model, jax.tree.map(lambda g: -LEARNING_RATE * g, gradient)
    )


def _stream(num_windows: int, update: Callable, carry0: Callable) -> Callable:
    """Trains over the stream, one `update(model, carry, window) -> (model, carry,
    loss)` per window in a `lax.scan`; returns the final model and the mean loss over
    the last tenth of the windows."""
    tail = max(1, num_windows // 10)

    def run(model, state, stream_key):
        def body(model_and_carry, index):
            model, carry = model_and_carry
            window = window_inputs(stream_key, index)
            model, carry, loss = update(model, carry, window)
            return (model, carry), loss

        carry = carry0(model, state)
        (model, _), losses = jax.lax.scan(body, (model, carry), jnp.arange(num_windows))
        return model, jnp.mean(losses[-tail:])

    return run


def tbptt(num_windows: int) -> Callable:
    def update(model, state, window):
        grad_fn = eqx.filter_value_and_grad(window_loss, has_aux=True)
        (loss, state), gradient = grad_fn(model, state, window)
        return sgd(model, gradient), jax.lax.stop_gradient(state), loss

    return _stream(num_windows, update, lambda model, state: state)


def dodge(num_windows: int, num_directions: int) -> Callable:
    online = eqx_dodge.OnlineDodge(step, num_directions=num_directions)

    def update(model, carry, window):
        loss, estimate, carry = online(model, carry, window)
        return sgd(model, estimate), carry, loss

    def carry0(model, state):
        return online.init(model, state, key=jax.random.key(0))

    return _stream(num_windows, update, carry0)


def stream_loss(num_windows: int, remat: bool) -> Callable:
    """The whole stream's mean loss, window by window; with `remat`, in checkpointed
    segments of windows."""

    def windows_loss(model, state, stream_key, indices):
        def body(s, index):
            loss, s = window_loss(model, s, window_inputs(stream_key, index))
            return s, loss

        return jax.lax.scan(body, state, indices)

    def loss(model, state, stream_key):
        indices = jnp.arange(num_windows)
        if not remat:
            return jnp.mean(windows_loss(model, state, stream_key, indices)[1])
        segment = segment_length(num_windows)
        segments = indices.reshape(num_windows // segment, segment)
        body = jax.checkpoint(lambda s, i: windows_loss(model, s, stream_key, i))
        return jnp.mean(jax.lax.scan(body, state, segments)[1])

    return loss


def make_computation(method: str, length: int) -> Callable:
    num_windows = length // WINDOW
    if method == "forward":
        return stream_loss(num_windows, remat=False)
    if method == "tbptt":
        return tbptt(num_windows)
    if method.startswith("dodge_k"):
        return dodge(num_windows, int(method.removeprefix("dodge_k")))
    return eqx.filter_grad(stream_loss(num_windows, remat=method == "bptt_remat"))


def measure_point(method: str, length: int, max_run_bytes: int) -> dict[str, Any]:
    """Runs in a fresh subprocess: compile, analyse, run, and report."""
    model = Model(jax.random.key(0))
    state = (jnp.zeros((BATCH, HIDDEN)), jnp.zeros((BATCH, HIDDEN)))
    fun = eqx.filter_jit(make_computation(method, length))
    args = (model, state, jax.random.key(1))
    record, _, output = _common.measure_compiled(
        fun, args, repeats=3, max_run_bytes=max_run_bytes, timed_seconds=5.0
    )
    if method in TRAINING_METHODS and output is not None:
        record["final_loss"] = float(output[1])
    return {"method": method, "length": length, **record}


def _mib(record: dict[str, Any], field: str) -> float | None:
    value = record.get(field) if "seconds" in record else None
    return None if value is None else value / 2**20


def rss_growth_mib(points: dict[int, dict[str, Any]], method: str) -> float | None:
    """How much `method`'s resident set while running grew from the shortest stream
    to the longest."""
    first = _mib(points[min(points)][method], "run_peak_rss_bytes")
    last = _mib(points[max(points)][method], "run_peak_rss_bytes")
    return None if first is None or last is None else last - first


def summarize_points(points: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per method and length: microseconds per step, MiB of XLA's peak, of the
    largest resident set sampled while running and of the process's peak RSS
    (compilation included); and the growth of the running RSS from the shortest
    stream to the longest."""
    summary: dict[str, Any] = {}
    for method in points[min(points)]:
        rows = {}
        for length, records in points.items():
            record = records[method]
            seconds = (record.get("seconds") or {}).get("median")
            peak = (record.get("xla_memory") or {}).get("peak_bytes")
            rows[str(length)] = {
                "microseconds_per_step": None
                if seconds is None
                else 1e6 * seconds / length,
                "xla_peak_mib": None if peak is None else peak / 2**20,
                "run_peak_rss_mib": _mib(record, "run_peak_rss_bytes"),
                "peak_rss_mib": _mib(record, "peak_rss_bytes"),
                "final_loss": record.get("final_loss"),
                "ran": "seconds" in record,
            }
        summary[method] = {
            "lengths": rows,
            "rss_growth_mib": rss_growth_mib(points, method),
        }
    return summary


def plot(points: dict[int, dict[str, Any]], out: pathlib.Path, name: str) -> None:
    lengths = sorted(points)
    fig, axes = _common.new_figure(1, 2, figsize=(11, 4))
    for method in points[lengths[0]]:
        xla = [
            (points[t][method].get("xla_memory") or {}).get("peak_bytes", np.nan)
            for t in lengths
        ]
        rss = [
            points[t][method].get("run_peak_rss_bytes", np.nan)
            if "seconds" in points[t][method]
            else np.nan
            for t in lengths
        ]
        line = axes[0].plot(
            lengths, np.asarray(xla, float) / 2**20, "o-", label=f"{method} (XLA)"
        )
        axes[0].plot(
            lengths,
            np.asarray(rss, float) / 2**20,
            "s--",
            color=line[0].get_color(),
            label=f"{method} (RSS while running)",
        )
        per_step = [
            1e6 * (points[t][method].get("seconds") or {}).get("median", np.nan) / t
            for t in lengths
        ]
        axes[1].plot(lengths, per_step, "o-", label=method)
    labels = ("peak memory (MiB)", "µs per stream step")
    _common.log_log_axes(axes, "stream length (steps)", labels)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"LSTM-{HIDDEN}, batch {BATCH}, windows of {WINDOW}")
    _common.save_figure(fig, out, name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a smoke test")
    group.add_argument("--full", action="store_true", help="up to 10^6 steps")
    parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS)
    parser.add_argument(
        "--max-run-bytes",
        type=float,
        default=4 * 2**30,
        help="compile but do not run points predicted to need more (default 4 GiB)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every point in this process (the peak RSS is then the largest "
        "so far, not the point's own)",
    )
    args = parser.parse_args(argv)
    lengths = QUICK_LENGTHS if args.quick else FULL_LENGTHS if args.full else LENGTHS
    default = not (args.quick or args.full)
    methods = DEFAULT_METHODS if default else METHODS
    config = {
        "hidden": HIDDEN,
        "input": INPUT,
        "batch": BATCH,
        "window": WINDOW,
        "learning_rate": LEARNING_RATE,
        "lengths": list(lengths),
        "methods": list(methods),
        "max_run_bytes": args.max_run_bytes,
        "quick": args.quick,
        "full": args.full,
        "in_process": args.in_process,
    }
    # The `--full` study keeps every finished point, so that it resumes.
    log = (
        _common.RunLog(args.out, "online_stream_full_runs", config)
        if args.full
        else None
    )
    measure = measure_point if args.in_process else run_point
    points: dict[int, dict[str, Any]] = {}
    for length in lengths:
        points[length] = {}
        for method in methods:
            key = f"{method} / {length}"
            if log is not None and key in log:
                points[length][method] = log.runs[key]
                continue
            record = measure(method, length, int(args.max_run_bytes))
            points[length][method] = record
            print(_common.point_line(record), file=sys.stderr)
            if log is not None and "error" not in record:
                log.add(key, record)
    payload = {
        "config": config,
        "goal": {"dodge_k1_rss_growth_mib": RSS_GROWTH_GOAL_MIB},
        "summary": summarize_points(points),
        "points": {str(length): records for length, records in points.items()},
    }
    name = "online_stream_full" if args.full else "online_stream"
    _common.write_json(args.out, name, payload)
    plot(points, args.out, name)
    return payload


def run_point(method: str, length: int, max_run_bytes: int) -> dict[str, Any]:
    record = _common.run_point(__file__, method, length, max_run_bytes)
    return {"method": method, "length": length, **record}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--point":
        method, length, max_run_bytes = sys.argv[2:5]
        print(json.dumps(measure_point(method, int(length), int(max_run_bytes))))
    else:
        main()
