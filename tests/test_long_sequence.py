import importlib
import json


long_sequence = importlib.import_module("long_sequence")


def test_quick_run(tmp_path):
    long_sequence.main(["--quick", "--lengths", "200", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "long_sequence.json").read_text())
    assert (tmp_path / "long_sequence.png").stat().st_size > 0
    points = record["points"]["200"]
    assert set(points) == set(long_sequence.METHODS)
    for point in points.values():
        assert "error" not in point, point.get("error")
        assert point["xla_memory"]["peak_bytes"] > 0
        assert point["seconds"]["median"] > 0
    # BPTT stores every step; online DODGE with one direction holds one extra
    # parameter-sized direction and estimate, not the trajectory.
    ratios = record["ratios"]["200"]
    assert ratios["bptt_over_forward"]["xla_peak_bytes"] > 10
    assert ratios["dodge_k1_over_forward"]["xla_peak_bytes"] < 3
