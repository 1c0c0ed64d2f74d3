import dataclasses
import importlib
import json

import jax
import numpy as np


copy_task = importlib.import_module("copy_task")


def test_copy_batch():
    max_length = 4
    batch = copy_task.copy_batch(jax.random.key(0), 16, max_length)
    # NumPy from here: eager indexing of JAX arrays compiles a program per index.
    inputs, targets, mask = map(np.asarray, batch)
    total = 2 * max_length + 1
    assert inputs.shape == (total, 16, copy_task.BITS + 1)
    assert targets.shape == (total, 16, copy_task.BITS)
    assert mask.shape == (total, 16)
    lengths = np.argmax(inputs[:, :, -1], axis=0)  # the delimiter's position
    assert np.all(np.sum(inputs[:, :, -1], axis=0) == 1)
    assert np.all((lengths >= 1) & (lengths <= max_length))
    assert np.all(np.sum(mask, axis=0) == lengths)
    for b, length in enumerate(lengths):
        shown = inputs[:length, b, :-1]
        recalled = targets[length + 1 : 2 * length + 1, b]
        assert np.all(shown == recalled)
        assert np.all(inputs[length:, b, :-1] == 0)
        assert np.all(mask[length + 1 : 2 * length + 1, b] == 1)


def test_quick_run(tmp_path):
    """Forty Adam steps of DODGE with random directions and along the synthetic
    gradient lower the evaluation loss (one fixed evaluation batch, so the decrease
    is training's alone). Catches an estimate with the wrong sign (the loss rises)
    or a zero estimate (it stays put): bit errors do not move in so few steps."""
    methods = ["dodge_k8", "dodge_synthetic"]
    # `optax.adam`'s bias correction raises `decay ** count` (a float to an int32
    # count), which the suite's strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        copy_task.main(["--quick", "--out", str(tmp_path), "--methods", *methods])
    record = json.loads((tmp_path / "copy_task.json").read_text())
    assert (tmp_path / "copy_task.png").stat().st_size > 0
    assert set(record["final_bit_errors"]) == set(methods)
    for method, result in record["results"].items():
        [run] = result["runs"].values()
        losses = run["median_loss_curve"]
        assert len(losses) == len(record["eval_steps"]) == len(run["median_curve"])
        # Measured: 0.17572 -> 0.17548 (8 directions), -> 0.17514 (synthetic).
        assert losses[-1] < losses[0] - 1e-4, (method, losses)


def test_full_study_resumes(tmp_path, monkeypatch):
    """`--full` keeps every finished run and a new sitting trains only the missing
    ones; a sitting out of time starts none and still writes the summary of what is
    complete. (At a tiny scale: the paper's would take hours.)"""
    tiny = dataclasses.replace(copy_task.QUICK, steps=20, eval_every=10)
    monkeypatch.setattr(copy_task, "FULL", tiny)
    arguments = ["--full", "--out", str(tmp_path), "--methods", "dodge_k1"]
    with jax.numpy_dtype_promotion("standard"):
        copy_task.main([*arguments, "--stop-after-minutes", "0"])
        assert (
            json.loads((tmp_path / "copy_task_full.json").read_text())["results"] == {}
        )
        first = copy_task.main(arguments)
        log = json.loads((tmp_path / "copy_task_full_runs.json").read_text())
        assert set(log["runs"]) == {"dodge_k1 / 0.001 / 0"}
        final = log["runs"]["dodge_k1 / 0.001 / 0"]["bit_errors"][-1]
        # The progress covers the whole study, not only this sitting's methods.
        assert first["progress"] == {
            "runs_finished": 1,
            "runs_planned": len(copy_task.METHODS),
            "methods_planned": list(copy_task.METHODS),
            "learning_rates_planned": {method: [0.001] for method in copy_task.METHODS},
            "per_learning_rate": {
                method: {
                    "0.001": {"seeds_finished": 1, "median_final_bit_errors": final}
                }
                if method == "dodge_k1"
                else {}
                for method in copy_task.METHODS
            },
        }

        def no_training(*args):
            raise AssertionError("a finished run was trained again")

        monkeypatch.setattr(copy_task, "train", no_training)
        again = copy_task.main(arguments)
        # A method left unfinished does not hide a finished one after it.
        out_of_time = copy_task.main(
            [*arguments[:-1], "bptt", "dodge_k1", "--stop-after-minutes", "0"]
        )
        # A sitting on another method keeps the finished one in the summary.
        other = copy_task.main([*arguments[:-1], "bptt", "--stop-after-minutes", "0"])
    assert again["results"] == first["results"]
    assert out_of_time["results"] == first["results"]
    assert other["results"] == first["results"]


def test_planned_learning_rates():
    """A rate beyond the grid is planned, in turn, only where the best rate so far
    is the end of the grid next to it, and only once every rate so far is finished.
    Catches an edge run for a method whose best lies inside (wasted hours), one on
    the wrong side, and a decision taken on unfinished seeds."""
    config = dataclasses.replace(
        copy_task.QUICK,
        learning_rates=(3e-3, 1e-3, 3e-4),
        edge_learning_rates=(1e-2, 3e-2, 1e-4),
    )
    grid = [3e-3, 1e-3, 3e-4]

    def plan(*finals):
        return copy_task.planned_learning_rates(
            config, dict(zip([*grid, 1e-2, 3e-2, 1e-4], finals, strict=False))
        )

    assert plan() == grid
    assert plan(5.0, 6.0) == grid  # 3e-4 unfinished: undecided
    assert plan(6.0, 5.0, 7.0) == grid  # the best lies inside
    assert plan(5.0, 6.0, 7.0) == [*grid, 1e-2]
    assert plan(5.0, 6.0, 7.0, 4.0) == [*grid, 1e-2, 3e-2]
    # Past 1e-2 the best is back inside: neither 3e-2 nor the lower edge.
    assert plan(5.0, 6.0, 7.0, 5.5) == [*grid, 1e-2]
    assert plan(7.0, 6.0, 5.0) == [*grid, 1e-4]


def test_full_study_runs_the_edge_rates(tmp_path, monkeypatch):
    """Through `main`: a method whose best rate is at the grid's edge gets the rate
    beyond it, its best is taken over all its rates, and the progress plans the
    edge runs. (A stand-in for `train` whose final bit errors fall as the learning
    rate grows: the real runs take minutes.)"""
    tiny = dataclasses.replace(
        copy_task.QUICK,
        steps=20,
        eval_every=10,
        learning_rates=(1e-3, 3e-4),
        edge_learning_rates=(3e-3, 1e-4),
        seeds=(0, 1),
    )
    monkeypatch.setattr(copy_task, "FULL", tiny)

    def train(method, learning_rate, seed, config):
        errors = np.full(3, 10.0 - 1000 * learning_rate + seed)
        return None, errors, errors

    monkeypatch.setattr(copy_task, "train", train)
    arguments = ["--full", "--out", str(tmp_path), "--methods", "bptt"]
    record = copy_task.main(arguments)
    runs = json.loads((tmp_path / "copy_task_full_runs.json").read_text())["runs"]
    assert set(runs) == {
        f"bptt / {rate:g} / {seed}" for rate in (1e-3, 3e-4, 3e-3) for seed in (0, 1)
    }
    result = record["results"]["bptt"]
    assert result["best_learning_rate"] == 3e-3
    assert result["final_bit_errors"] == 10.0 - 3.0 + 0.5
    assert list(result["runs"]) == ["0.001", "0.0003", "0.003"]
    progress = record["progress"]
    assert progress["learning_rates_planned"]["bptt"] == [1e-3, 3e-4, 3e-3]
    assert progress["learning_rates_planned"]["tbptt"] == [1e-3, 3e-4]
    assert progress["runs_planned"] == 2 * (2 * len(copy_task.METHODS) + 1)
    assert progress["per_learning_rate"]["bptt"]["0.003"]["seeds_finished"] == 2
