"""Memory and time against sequence length: BPTT grows, online DODGE does not.

An LSTM with 128 units (input 8, a linear readout to 8 outputs, squared error at every
step), batch 32, over one sequence of length T. Four computations:

- `forward`: the loss alone, one `lax.scan` over the T steps;
- `bptt`: `jax.grad` of that loss through the whole scan (stores every step);
- `dodge_k1`, `dodge_k8`: `eqx_dodge.OnlineDodge` with 1 or 8 random directions over
    windows of `WINDOW` steps, the state and its tangent carried across windows (one
    `lax.scan` over the windows); the per-window estimates are summed.

Every point (computation, T) runs in its own subprocess, so that peak memory is its
own: we report XLA's compiled memory analysis (`peak_bytes` = arguments + outputs +
temporaries − aliased) and the process's peak resident set (`ru_maxrss`, which also
holds the Python/XLA runtime and the compiler's own peak). A point whose predicted
peak exceeds `--max-run-bytes` is compiled and analysed but not run.

The quality side: at the smallest T, the cosine of each DODGE method's summed estimate
(one fixed key) with the exact BPTT gradient. `bptt_remat` computes the exact gradient
too (to float tolerance; tests/test_long_sequence.py checks it).
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

import eqx_dodge


HIDDEN = 128
INPUT = 8
BATCH = 32
WINDOW = 100
LENGTHS = (1_000, 10_000, 50_000)
QUICK_LENGTHS = (200,)
METHODS = ("forward", "bptt", "bptt_remat", "dodge_k1", "dodge_k8")
DODGE_METHODS = tuple(m for m in METHODS if m.startswith("dodge_k"))
WARM_UP_BELOW_SECONDS = 1.0
# Timed calls stop at `repeats` or once they add up to this many seconds: a 10 s
# call's median of three would cost `make bench` 20 s more for little precision, and
# `make bench` is at its 30-minute budget (5 s rather than 10: the T = 10 000 points
# time two or three calls instead of three to five).
TIMED_SECONDS = 5.0


class Model(eqx.Module):
    cell: eqx.nn.LSTMCell
    readout: eqx.nn.Linear

    def __init__(self, key):
        cell_key, readout_key = jax.random.split(key)
        self.cell = eqx.nn.LSTMCell(INPUT, HIDDEN, key=cell_key)
        self.readout = eqx.nn.Linear(HIDDEN, INPUT, key=readout_key)


def step(model, state, x):
    """One step on the batch: predict the input itself (a fixed, cheap target)."""
    state = jax.vmap(model.cell)(x, state)
    prediction = jax.vmap(model.readout)(state[0])
    return state, jnp.mean(jnp.square(prediction - x))


def forward_loss(model, state, xs):
    def body(s, x):
        s, loss = step(model, s, x)
        return s, loss

    _, losses = jax.lax.scan(body, state, xs)
    return jnp.mean(losses)


def remat_loss(model, state, xs):
    """`forward_loss` as √T checkpointed segments: the same value, and under
    `jax.grad` the same gradient, with one stored state per segment."""
    length = xs.shape[0]
    segment = segment_length(length)
    segments = xs.reshape((length // segment, segment) + xs.shape[1:])

    @jax.checkpoint
    def segment_body(s, segment_inputs):
        def body(s, x):
            s, loss = step(model, s, x)
            return s, loss

        return jax.lax.scan(body, s, segment_inputs)

    _, losses = jax.lax.scan(segment_body, state, segments)
    return jnp.mean(losses)


def make_computation(method: str):
    if method == "forward":
        return forward_loss
    if method == "bptt":
        return eqx.filter_grad(forward_loss)
    if method == "bptt_remat":
        return eqx.filter_grad(remat_loss)
    num_directions = int(method.removeprefix("dodge_k"))
    online = eqx_dodge.OnlineDodge(step, num_directions=num_directions)

    def dodge(model, state, xs):
        windows = xs.reshape((-1, WINDOW) + xs.shape[1:])
        carry = online.init(model, state, key=jax.random.key(0))

        def body(carry_and_sum, window):
            carry, total = carry_and_sum
            _, estimate, carry = online(model, carry, window)
            return (carry, jax.tree.map(jnp.add, total, estimate)), None

        zeros = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
        (_, total), _ = jax.lax.scan(body, (carry, zeros), windows)
        return total

    return dodge


def inputs(length: int):
    """The model, initial state and sequence every point uses."""
    model = Model(jax.random.key(0))
    state = (jnp.zeros((BATCH, HIDDEN)), jnp.zeros((BATCH, HIDDEN)))
    xs = jax.random.normal(jax.random.key(1), (length, BATCH, INPUT))
    return model, state, xs


# The programs `measure_point` compiled in this process, by (method, length): with
# `--in-process`, `quality` runs them instead of compiling them again.
COMPILED: dict[tuple[str, int], Callable] = {}


def measure_point(method: str, length: int, repeats: int, max_run_bytes: int):
    """Runs in a fresh subprocess: compile, analyse, run, and report."""
    fun = eqx.filter_jit(make_computation(method))
    record, COMPILED[method, length], _ = _common.measure_compiled(
        fun,
        inputs(length),
        repeats=repeats,
        max_run_bytes=max_run_bytes,
        timed_seconds=TIMED_SECONDS,
        warm_up_below_seconds=WARM_UP_BELOW_SECONDS,
    )
    return {"method": method, "length": length, **record}


def _cosine(a, b) -> float:
    a_leaves = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    b_leaves = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    dot = sum(jnp.vdot(x, y) for x, y in zip(a_leaves, b_leaves, strict=True))
    a_norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in a_leaves))
    b_norm = jnp.sqrt(sum(jnp.vdot(y, y) for y in b_leaves))
    return float(dot / (a_norm * b_norm))


def _max_relative_difference(got, expected) -> float:
    pairs = zip(
        jax.tree.leaves(eqx.filter(got, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(expected, eqx.is_inexact_array)),
        strict=True,
    )
    return max(float(jnp.max(jnp.abs(g - e)) / jnp.max(jnp.abs(e))) for g, e in pairs)


def quality(length: int) -> dict[str, Any]:
    """Against the exact BPTT gradient: the cosine of each DODGE method's summed
    estimate, and the largest difference of the remat gradient (relative to each
    leaf's largest entry), which is zero up to float rounding unless the segmentation
    is wrong."""
    model, state, xs = inputs(length)

    def compute(method):
        fun = COMPILED.get((method, length)) or eqx.filter_jit(make_computation(method))
        return fun(model, state, xs)

    exact = compute("bptt")
    return {
        "length": length,
        "key": 0,
        "cosine_with_bptt": {
            method: _cosine(compute(method), exact) for method in DODGE_METHODS
        },
        "bptt_remat_max_relative_difference": _max_relative_difference(
            compute("bptt_remat"), exact
        ),
    }


def run_point(method: str, length: int, repeats: int, max_run_bytes: int):
    record = _common.run_point(__file__, method, length, repeats, max_run_bytes)
    return {"method": method, "length": length, **record}


def _metric(record: dict[str, Any], metric: str) -> float | None:
    if metric == "xla_peak_bytes":
        return (record.get("xla_memory") or {}).get("peak_bytes")
    if "skipped_run" in record:
        return None  # compiled only: its RSS and time say nothing about running it
    if metric == "seconds":
        return (record.get("seconds") or {}).get("median")
    return record.get(metric)


def ratio(records, metric, method, baseline="forward"):
    top, bottom = _metric(records[method], metric), _metric(records[baseline], metric)
    if top is None or bottom is None:
        return None
    return top / bottom


def summarize_ratios(points: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each method against `forward` at each T: peak-memory and time ratios, and the
    XLA peak bytes it needs beyond the forward pass."""
    summary = {}
    for length, records in points.items():
        summary[str(length)] = {}
        for method in METHODS[1:]:
            entry: dict[str, Any] = {
                metric: ratio(records, metric, method)
                for metric in ("xla_peak_bytes", "peak_rss_bytes", "seconds")
            }
            top = _metric(records[method], "xla_peak_bytes")
            bottom = _metric(records["forward"], "xla_peak_bytes")
            entry["xla_extra_mib"] = (
                None if top is None or bottom is None else (top - bottom) / 2**20
            )
            summary[str(length)][f"{method}_over_forward"] = entry
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Memory and time against length.")
    parser.add_argument("--quick", action="store_true", help="T = 200")
    parser.add_argument(
        "--out", type=pathlib.Path, default=_common.RESULTS, help="output directory"
    )
    parser.add_argument(
        "--max-run-bytes",
        type=float,
        default=4 * 2**30,
        help="compile but do not run points predicted to need more (default 4 GiB)",
    )
    parser.add_argument("--lengths", type=int, nargs="*", help="override T values")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every point in this process (faster; the peak RSS is then the "
        "largest so far, not the point's own)",
    )
    args = parser.parse_args(argv)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)

    points: dict[int, dict[str, Any]] = {}
    for length in lengths:
        points[length] = {}
        for method in METHODS:
            repeats = 3 if length <= 10_000 else 1
            measure = measure_point if args.in_process else run_point
            record = measure(method, length, repeats, int(args.max_run_bytes))
            points[length][method] = record
            print(_common.point_line(record), file=sys.stderr)

    ratios = summarize_ratios(points)
    gradient_quality = quality(min(lengths))
    print(f"cosine with BPTT: {gradient_quality}", file=sys.stderr)
    payload = {
        "config": {
            "hidden": HIDDEN,
            "input": INPUT,
            "batch": BATCH,
            "window": WINDOW,
            "remat_segments": {
                str(length): segment_length(length) for length in lengths
            },
            "lengths": list(lengths),
            "max_run_bytes": args.max_run_bytes,
            "quick": args.quick,
            "in_process": args.in_process,
        },
        "goal": "dodge / forward peak memory <= 1.2 at the largest T",
        "ratios": ratios,
        "quality": gradient_quality,
        "points": {str(length): records for length, records in points.items()},
    }
    _common.write_json(args.out, "long_sequence", payload)

    fig, axes = _common.new_figure(1, 2, figsize=(11, 4))
    for method in METHODS:
        xla = [
            (points[t][method].get("xla_memory") or {}).get("peak_bytes", np.nan)
            for t in lengths
        ]
        seconds = [
            (points[t][method].get("seconds") or {}).get("median", np.nan)
            for t in lengths
        ]
        axes[0].plot(lengths, np.asarray(xla, float) / 2**20, "o-", label=method)
        axes[1].plot(lengths, seconds, "o-", label=method)
    labels = ("XLA peak memory (MiB)", "seconds")
    _common.log_log_axes(axes, "sequence length T", labels)
    axes[0].legend()
    axes[0].set_title(f"LSTM-{HIDDEN}, batch {BATCH}")
    _common.save_figure(fig, args.out, "long_sequence")
    return payload


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--point":
        method, length, repeats, max_run_bytes = sys.argv[2:6]
        print(
            json.dumps(
                measure_point(method, int(length), int(repeats), int(max_run_bytes))
            )
        )
    else:
        main()
