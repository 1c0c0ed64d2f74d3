import importlib
import json

import pytest


long_sequence = importlib.import_module("long_sequence")


def test_quick_run(tmp_path):
    # In-process: five subprocesses would each import JAX again (the subprocess
    # path has a test of its own below).
    argv = ["--quick", "--in-process", "--lengths", "200", "--out", str(tmp_path)]
    long_sequence.main(argv)
    record = json.loads((tmp_path / "long_sequence.json").read_text())
    assert (tmp_path / "long_sequence.png").stat().st_size > 0
    points = record["points"]["200"]
    assert set(points) == set(long_sequence.METHODS)
    assert "bptt_remat" in points
    for point in points.values():
        assert "error" not in point, point.get("error")
        assert point["xla_memory"]["peak_bytes"] > 0
        assert point["seconds"]["median"] > 0
    # BPTT stores every step; online DODGE with one direction holds one extra
    # parameter-sized direction and estimate, not the trajectory.
    ratios = record["ratios"]["200"]
    assert ratios["bptt_over_forward"]["xla_peak_bytes"] > 10
    assert ratios["dodge_k1_over_forward"]["xla_peak_bytes"] < 3
    # Remat stores one state per segment of 10 steps and recomputes one segment:
    # measured 4.1 MiB against BPTT's 42.0 MiB at T = 200.
    bptt = points["bptt"]["xla_memory"]["peak_bytes"]
    remat = points["bptt_remat"]["xla_memory"]["peak_bytes"]
    assert remat < 0.25 * bptt
    assert record["config"]["remat_segments"] == {"200": 10}
    # The remat gradient is BPTT's (computed in-process at T = 200, 20 segments of
    # 10 steps): a wrong segmentation (segments transposed, steps dropped, the state
    # not carried across segments) changes it; rematerialisation alone does not.
    quality = record["quality"]
    assert quality["length"] == 200
    assert quality["bptt_remat_max_relative_difference"] <= 1e-5
    cosines = quality["cosine_with_bptt"]
    assert set(cosines) == set(long_sequence.DODGE_METHODS)
    assert all(-1 <= c <= 1 for c in cosines.values())


def test_point_in_a_subprocess():
    """The subprocess that measures one point reports what it measured: a broken
    command line or output parsing gives an `error` record instead."""
    record = long_sequence.run_point("dodge_k1", 100, 2, 2**30)
    assert "error" not in record, record.get("error")
    assert (record["method"], record["length"]) == ("dodge_k1", 100)
    assert record["xla_memory"]["peak_bytes"] > 0
    assert record["seconds"]["repeats"] == 2
    assert record["peak_rss_bytes"] >= record["rss_after_setup_bytes"] > 0


@pytest.mark.parametrize(
    "length, segment", [(7, 1), (60, 6), (200, 10), (1_000, 25), (50_000, 200)]
)
def test_segment_length(length, segment):
    assert long_sequence.segment_length(length) == segment
