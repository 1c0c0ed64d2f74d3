import json

import equinox as eqx
import jax

from .helpers import load_script


def test_quick_run_writes_results(tmp_path):
    """Every method lowers the loss below the untrained model's, no estimate points
    uphill, and the activation guess aligns with the gradient better than a random
    direction. Catches an estimator with the wrong sign or along another direction
    than the one differentiated, and a guess no better than noise: the old check,
    accuracies in [0, 1], held for any output."""
    benchmark = load_script("benchmarks/guess_quality.py")
    # A subset of the methods keeps the smoke test short; `--quick` runs them all.
    methods = ("rademacher-k1", "activation", "oracle", "activation curvature")
    output = benchmark.main(quick=True, out_dir=tmp_path, methods=methods)
    saved = json.loads((tmp_path / "guess_quality.json").read_text())
    assert (tmp_path / "guess_quality.png").stat().st_size > 0
    assert saved["config"]["quick"] is True
    assert saved["results"]["width_sweep"] == output["results"]["width_sweep"]
    # The untrained model, built as `main` builds it: full-data loss 2.3237.
    x, y = benchmark.load_data()
    _, key = jax.random.split(jax.random.key(0))
    model_key, _ = jax.random.split(key)
    [(name, (width, depth))] = benchmark.QUICK["models"].items()
    untrained = eqx.nn.MLP(64, 10, width, depth, key=model_key)
    initial_loss = float(benchmark.loss_fn(untrained, x, y))
    entry = saved["results"]["models"][name]
    assert set(entry["methods"]) == set(methods)
    rows = entry["methods"]
    curvature = rows.pop("activation curvature")
    assert abs(rows["oracle"]["cosine_at_init"]["median_abs_cosine"] - 1) < 1e-4
    for row in rows.values():
        # (g·u)u has cosine |g·u|/(‖g‖‖u‖) ≥ 0 with the gradient, for every key.
        assert row["cosine_at_init"]["min_cosine"] > 0
    # Measured: median |cos| 0.10 for the guess, 0.019 for one random direction.
    activation = rows["activation"]["cosine_at_init"]["median_abs_cosine"]
    assert activation > 2 * rows["rademacher-k1"]["cosine_at_init"]["median_abs_cosine"]
    # Ten SGD steps. Measured decreases: 0.0015 (one random direction, whose step
    # is scaled by k/p), 0.0027 (activation guess), 0.14 (oracle).
    assert rows["rademacher-k1"]["final_loss_median"] < initial_loss - 5e-4
    assert rows["activation"]["final_loss_median"] < initial_loss - 1e-3
    assert rows["oracle"]["final_loss_median"] < initial_loss - 0.05
    # The curvature-aware step along the same guesses, on the same minibatches, with
    # the guess's best learning rate as fallback: it lowers the loss too, and its
    # update is timed against `dodge_random`'s.
    assert curvature["best_learning_rate"] == rows["activation"]["best_learning_rate"]
    assert curvature["final_loss_median"] < initial_loss - 1e-3
    assert all(0 < f <= 1 for f in curvature["accepted_fraction_per_seed"])
    cost = entry["curvature_cost"]
    assert cost["curvature_aware_over_dodge_random"]["median"] > 0
