import importlib
import json
import math

import pytest


online_stream = importlib.import_module("online_stream")
_docs_tables = importlib.import_module("_docs_tables")
report = importlib.import_module("report")


def test_quick_run(tmp_path):
    # In-process: ten subprocesses would each import JAX again (`test_long_sequence.py`
    # tests the subprocess path).
    record = online_stream.main(["--quick", "--in-process", "--out", str(tmp_path)])
    assert (tmp_path / "online_stream.png").stat().st_size > 0
    points = record["points"]
    short, long = (str(length) for length in online_stream.QUICK_LENGTHS)
    assert int(long) == 2 * int(short)
    for length in (short, long):
        assert set(points[length]) == set(online_stream.METHODS)
        for point in points[length].values():
            assert "error" not in point, point.get("error")
            assert point["seconds"]["median"] > 0

    def peak(method, length):
        return points[length][method]["xla_memory"]["peak_bytes"]

    # The stream is generated window by window: twice the stream, the same program
    # memory for the forward pass, truncated BPTT and DODGE (a version that built
    # the whole input sequence would grow by 200 × 32 × 8 floats); full BPTT stores
    # every step and grows.
    for method in ("forward", "tbptt", "dodge_k1"):
        assert peak(method, long) == peak(method, short), method
    assert peak("bptt", long) > 1.5 * peak("bptt", short)
    # DODGE holds a tangent of the state and parameters, not a window's steps.
    assert peak("dodge_k1", long) < 0.25 * peak("tbptt", long)
    summary = record["summary"]
    for method in online_stream.TRAINING_METHODS:
        loss = summary[method]["lengths"][long]["final_loss"]
        assert math.isfinite(loss) and 0 < loss < 2, (method, loss)
    assert summary["forward"]["lengths"][long]["final_loss"] is None
    assert isinstance(summary["dodge_k1"]["rss_growth_mib"], float)
    # The resident set sampled while running: at least the runtime's, at most the
    # process's high-water mark (which includes the compiler's). The kernel updates
    # that mark lazily, from per-thread counters that can each lag by 64 pages, so
    # a sample may pass it by a few MiB; pages counted as bytes, or bytes
    # multiplied by the page size twice, would be off by thousands.
    for method in online_stream.METHODS:
        row = summary[method]["lengths"][long]
        assert 100 < row["run_peak_rss_mib"] <= row["peak_rss_mib"] + 16, method


def test_full_study_resumes(tmp_path, monkeypatch):
    """`--full` keeps every finished point in its run log; a rerun measures none of
    them again and writes the same summary."""
    monkeypatch.setattr(online_stream, "FULL_LENGTHS", (200, 400))
    measured = []

    def measure(method, length, max_run_bytes):
        measured.append((method, length))
        seconds = {"median": 1e-3 * length, "repeats": 1}
        return {
            "method": method,
            "length": length,
            "xla_memory": {"peak_bytes": 2**20 * len(measured)},
            "seconds": seconds,
            "run_peak_rss_bytes": 2**28 + 2**20 * len(measured),
            "peak_rss_bytes": 2**29,
        }

    monkeypatch.setattr(online_stream, "measure_point", measure)
    argv = ["--full", "--in-process", "--out", str(tmp_path)]
    first = online_stream.main(argv)
    assert len(measured) == 2 * len(online_stream.METHODS)
    # dodge_k1 was the 3rd point at 200 steps and the 8th at 400: 5 MiB more.
    assert first["summary"]["dodge_k1"]["rss_growth_mib"] == 5.0

    def refuse(*args):
        raise AssertionError(f"measured {args} again")

    monkeypatch.setattr(online_stream, "measure_point", refuse)
    again = online_stream.main(argv)
    log = json.loads((tmp_path / "online_stream_full_runs.json").read_text())
    assert len(log["runs"]) == 2 * len(online_stream.METHODS)
    assert again["summary"] == first["summary"]


def test_tables_from_a_record():
    """The docs table and README section: one row per method, `not run` where a
    point was only compiled, the RSS growth signed."""
    rows = {
        "microseconds_per_step": 250.0,
        "xla_peak_mib": 1.5,
        "run_peak_rss_mib": 400.0,
        "peak_rss_mib": 500.0,
        "final_loss": None,
        "ran": True,
    }
    skipped = {
        **rows,
        "microseconds_per_step": None,
        "run_peak_rss_mib": None,
        "peak_rss_mib": None,
    }
    trained = {**rows, "final_loss": 0.98765}
    summary = {
        method: {
            "lengths": {
                "10000": trained if method == "dodge_k1" else rows,
                "1000000": skipped if method == "bptt" else rows,
            },
            "rss_growth_mib": None if method == "bptt" else 1.5,
        }
        for method in online_stream.METHODS
    }
    record = {
        "benchmark": "online_stream_full",
        "machine": {
            "cpu": "CPU",
            "cpu_count": 2,
            "jax": "0",
            "load_average_1_5_15min": [1.0, 1.0, 1.0],
            "git_commit": "abc",
        },
        "config": {
            "hidden": 128,
            "batch": 32,
            "window": 100,
            "learning_rate": 0.01,
            "max_run_bytes": 2**31,
            "full": True,
        },
        "goal": {"dodge_k1_rss_growth_mib": 5.0},
        "summary": summary,
        "points": {"10000": {}, "1000000": {}},
    }
    table = _docs_tables.online_stream_table(record)
    body = [line for line in table if line.startswith("| ") and "---" not in line]
    assert len(body) == 1 + len(online_stream.METHODS)
    assert "$10^{4}$ / $10^{6}$ steps" in body[0]
    assert (
        "| BPTT through the whole stream | 250 / not run | 1.5 / 1.5 | 400 / not run "
        "| — | — / — |"
    ) in body
    dodge = "| online DODGE, $k = 1$ | 250 / 250 | 1.5 / 1.5 | 400 / 400 | +1.5 |"
    assert f"{dodge} 0.988 / — |" in body
    section = report.online_stream_section(record, "results")
    assert section[0].startswith("### Training on a stream")
    assert "measured: +1.5 MiB" in section[2]
    assert "results/online_stream_full.png" in section[-2]


@pytest.mark.parametrize("length, text", [("10000", "$10^{4}$"), ("20000", "20,000")])
def test_steps(length, text):
    assert _docs_tables._steps(length) == text
