import json

from .helpers import load_script


def test_quick_run_writes_results(tmp_path):
    benchmark = load_script("benchmarks/guess_quality.py")
    # A subset of the methods keeps the smoke test short; `--quick` runs them all.
    methods = ("rademacher-k1", "activation", "oracle")
    output = benchmark.main(quick=True, out_dir=tmp_path, methods=methods)
    saved = json.loads((tmp_path / "guess_quality.json").read_text())
    assert (tmp_path / "guess_quality.png").stat().st_size > 0
    assert saved["config"]["quick"] is True
    for entry in saved["results"]["models"].values():
        assert set(entry["methods"]) == set(methods)
        oracle = entry["methods"]["oracle"]["cosine_at_init"]
        assert abs(oracle["median_abs_cosine"] - 1) < 1e-4
        for row in entry["methods"].values():
            assert 0 <= row["train_accuracy_median"] <= 1
    assert saved["results"]["width_sweep"] == output["results"]["width_sweep"]
