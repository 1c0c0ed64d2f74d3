"""Smoke tests of the benchmark scripts (their `--quick` configurations) and checks
that the alternative formulations they time compute the library's estimate."""

import functools as ft
import importlib
import json
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_dodge


ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
# What `_common.machine_info` records, as far as the docs' captions read it.
FAKE_MACHINE = {
    "cpu_count": 2,
    "cpu": "x",
    "load_average_1_5_15min": [1.0],
    "git_commit": "abc",
}
# The benchmark scripts are not a package; pytest puts their folder on the path.
_common = importlib.import_module("_common")
_docs_tables = importlib.import_module("_docs_tables")
_local_models = importlib.import_module("_local_models")
activity = importlib.import_module("activity")
activity_adam = importlib.import_module("activity_adam")
k_formulations = importlib.import_module("k_formulations")
report = importlib.import_module("report")
run_all = importlib.import_module("run_all")


def run_script(name: str, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """Runs `benchmarks/<name>` in a fresh interpreter, this checkout first on the
    path, optionally after executing `prelude`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(BENCHMARKS)]))
    code = (
        f"{prelude}\nimport runpy, sys\n"
        f"sys.argv = [{str(BENCHMARKS / name)!r}, *{list(args)!r}]\n"
        f"runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_main(name: str, *args: str) -> None:
    """Runs `benchmarks/<name>.py`'s `main(args)` in this process (a fresh interpreter
    would import JAX again: seconds per script), under JAX's default promotion rules:
    the scripts are user code, not held to the suite's strict ones."""
    module = importlib.import_module(name)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        module.main(list(args))


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def check_summary(entry: dict) -> None:
    assert entry["repeats"] >= 5
    assert 0 < entry["min"] <= entry["q1"] <= entry["median"] <= entry["q3"]
    assert entry["q3"] <= entry["max"]


def check_ratio(ratio: dict, numerator: dict, denominator: dict) -> None:
    """A summary of repeat-by-repeat ratios lies within what the two timings'
    extremes allow: its median between `min(num)/max(den)` and `max(num)/min(den)`."""
    check_summary(ratio)
    slack = 1 + 1e-9
    low = numerator["min"] / denominator["max"]
    high = numerator["max"] / denominator["min"]
    assert low / slack <= ratio["median"] <= high * slack, (ratio, low, high)


def test_step_cost_quick(tmp_path):
    """Catches ratios that are not the timings' (a swapped numerator and denominator
    whose spreads do not overlap, a ratio against the wrong timing): the old check
    only read the keys."""
    run_main("step_cost", "--quick", "--out", str(tmp_path))
    record = json.loads((tmp_path / "step_cost.json").read_text())
    assert (tmp_path / "step_cost.png").stat().st_size > 0
    assert record["machine"]["jax"] == jax.__version__
    assert set(record["results"]) == {"mlp"}  # the conv net and LSTM: full runs
    for result in record["results"].values():
        seconds, ratios = result["seconds"], result["ratios"]
        for entry in seconds.values():
            check_summary(entry)
        for name in ("listing1", "forward", "grad", "grad_remat"):
            check_ratio(
                ratios[f"dodge_k1_over_{name}"], seconds["dodge_k1"], seconds[name]
            )
        check_ratio(
            ratios["grad_remat_over_grad"], seconds["grad_remat"], seconds["grad"]
        )
        check_ratio(
            ratios["central_k1_over_dodge_k1"],
            seconds["central_k1"],
            seconds["dodge_k1"],
        )
        # Central differences along the same direction: near forward mode's
        # estimate, not a sign or a scale away (distance 2 or 1). Measured: 0.12 on
        # the ReLU MLP, whose step of 1e-3 on each of 200 000 weights crosses ReLU
        # kinks; 0.007 on the conv net, 0.002 on the LSTM.
        assert 0 < result["central_k1_relative_error"] < 0.5
        for mode in ("average", "partition"):
            assert set(result["scaling"][mode]) == {"1", "2"}
        grad, dodge = result["memory_bytes"]["grad"], result["memory_bytes"]["dodge_k1"]
        assert grad["peak_bytes"] > 0 and dodge["peak_bytes"] > 0


def test_cpu_flags_quick(tmp_path):
    """Each setting runs in its own process with its own XLA_FLAGS (a point that
    finds other flags refuses to run), every computation is timed and compiled
    under each, and the ratio is the two medians'. Catches a setting that never
    reaches XLA: the concurrency-optimised scheduler's is seen in the memory
    (forward mode holds every layer's activations under it), so equal memory under
    the two settings means the flag was lost."""
    cpu_flags = importlib.import_module("cpu_flags")
    results = cpu_flags.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "cpu_flags.json").read_text())
    assert (tmp_path / "cpu_flags.png").stat().st_size > 0
    assert record["config"]["settings"] == cpu_flags.SETTINGS
    assert set(results) == {"mlp"}
    ms, mib = results["mlp"]["milliseconds"], results["mlp"]["temp_mib"]
    for computation in cpu_flags.COMPUTATIONS:
        for setting in cpu_flags.CHANGED:
            default, changed = ms["default"][computation], ms[setting][computation]
            assert 0 < default < 1e4 and 0 < changed < 1e4
            ratio = results["mlp"]["over_default"][setting][computation]
            assert ratio == pytest.approx(changed / default)
        assert all(0 < mib[s][computation] < 1e3 for s in cpu_flags.SETTINGS)
    assert mib["scheduler_off"]["dodge_k"] < 0.9 * mib["default"]["dodge_k"]
    wrong = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "cpu_flags.py"),
            "--point",
            "quick",
            "ynn_off",
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"XLA_FLAGS": ""},
    )
    assert wrong.returncode != 0 and "XLA_FLAGS" in wrong.stderr


def test_step_cost_large_times_the_wide_mlp_at_k_1_and_8(tmp_path, monkeypatch):
    """`--large` times the p = 5.8 M MLP alone, k = 1 and 8, into its own file (the
    timing itself is `test_step_cost_quick`'s; five seconds a call would not fit
    the suite)."""
    step_cost = importlib.import_module("step_cost")
    seen = {}

    def run_problem(problem, ks, repeats, min_time):
        seen.update(problem=problem, ks=ks)
        printed = ("listing1", "forward", "grad")
        ratios = {f"dodge_k1_over_{name}": {"median": 1.0} for name in printed}
        ratios["jvp_fixed_direction_over_forward"] = {"median": 1.0}
        return {"ratios": ratios, "scaling": {}}

    monkeypatch.setattr(step_cost, "run_problem", run_problem)
    monkeypatch.setattr(step_cost, "plot", lambda *args: None)
    step_cost.main(["--large", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "step_cost_large.json").read_text())
    assert record["goals"] == step_cost.LARGE_GOALS
    assert record["config"]["large"] and record["config"]["num_directions"] == [1, 8]
    assert seen["ks"] == [1, 8]
    problem = seen["problem"]
    assert problem.name == "mlp_large"
    arrays = jax.tree.leaves(eqx.filter(problem.model, eqx.is_array))
    num_parameters = sum(x.size for x in arrays)
    assert num_parameters == 784 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 10 + 10
    assert problem.x.shape == (256, 784) and problem.y.shape == (256,)
    assert not (tmp_path / "step_cost.json").exists()


def test_k_formulations_quick(tmp_path):
    """Every formulation is timed, and its ratio to `vmap_jvp` is the one its timings
    give. Catches a ratio against the wrong denominator (the old check, `vmap_jvp`
    over itself equal to 1, held whatever the ratios were). A chunk given on the
    command line is the one timed, in a file of its own (the GPU study's)."""
    args = ("--quick", "--chunk", "2", "--num-directions", "6", "--out", str(tmp_path))
    run_main("k_formulations", *args)
    assert not (tmp_path / "k_formulations.json").exists()
    record = json.loads((tmp_path / "k_formulations_chunk2.json").read_text())
    assert record["config"]["num_directions"] == [6] and record["config"]["chunk"] == 2
    expected = {*k_formulations.formulations(chunk=2), "vmap_jvp_given_tangents"}
    assert record["results"] and (tmp_path / "k_formulations_chunk2.png").exists()
    for data in record["results"].values():
        for entry in data.values():
            seconds = entry["seconds"]
            assert set(seconds) == set(entry["over_vmap_jvp"]) == expected
            for name, value in seconds.items():
                check_summary(value)
                check_ratio(entry["over_vmap_jvp"][name], value, seconds["vmap_jvp"])


def test_chunk_memory_quick(tmp_path):
    """With `chunk_size=4` the compiled peak stays within one parameter buffer of
    k = 4's up to k = 8 (the growth the JSON reports is the one its peaks give), and
    on CPU the default is that same chunking. Catches a `chunk_size` the wrappers
    drop and a growth computed against the wrong reference."""
    run_main("chunk_memory", "--quick", "--out", str(tmp_path))
    record = json.loads((tmp_path / "chunk_memory.json").read_text())
    (result,) = record["results"].values()
    peaks = result["peak_bytes"]["chunk_size_4"]
    assert set(peaks) == {"1", "4", "8"} and peaks["1"] < peaks["4"]
    growth = (peaks["8"] - peaks["4"]) / result["parameter_bytes"]
    assert result["growth_in_parameter_buffers"]["chunk_size_4"] == max(growth, 0.0)
    assert growth <= 1.0
    assert result["grad_peak_bytes"] > 0 and result["grad_remat_peak_bytes"] > 0
    assert (tmp_path / "chunk_memory.png").exists()
    if jax.default_backend() == "cpu":
        assert result["peak_bytes"]["default"] == peaks


def test_k_formulations_refuses_a_k_the_chunk_does_not_divide():
    with pytest.raises(ValueError, match="multiple of the chunk, 4"):
        k_formulations.main(["--chunk", "4", "--num-directions", "6", "--out", "x"])


def test_formulations_agree_with_the_library():
    # k > 1: with one direction the library draws it from `key` itself, not from
    # `jax.random.split(key, 1)[0]`. k = 6 is two of the library's chunks on CPU (4
    # and 2) and three of the formulations' (chunk 2).
    k = 6
    model = eqx.nn.MLP(5, 3, 8, 2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (7, 5))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        return jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)

    key = jax.random.key(2)
    expected = eqx_dodge.filter_value_and_dodge(loss, key=key, num_directions=k)(params)
    for formulation in k_formulations.formulations(chunk=2).values():
        value, estimate = jax.jit(ft.partial(formulation, loss, k=k))(params, key)
        np.testing.assert_allclose(value, expected[0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(expected[1])):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_digits_directions_quick(tmp_path):
    """DODGE with 1 and 4 directions beats the untrained model (its accuracy at
    update 0) by a margin. Catches an estimator that does not descend (a wrong sign,
    a zero or random update): the old check, accuracies in [0, 1], held for any
    output."""
    run_main("digits_directions", "--quick", "--out", str(tmp_path))
    record = json.loads((tmp_path / "digits_directions.json").read_text())
    assert (tmp_path / "digits_directions.png").stat().st_size > 0
    assert [r["num_directions"] for r in record["directions"]] == [1, 4, "oracle"]
    for run in [*record["directions"], *record["batch_study"]]:
        accuracy = np.asarray(run["accuracy_per_seed"])
        assert accuracy.shape == (record["config"]["seeds"], len(run["updates"]))
        assert run["updates"][0] == 0
    # Measured (60 updates, 2 seeds): from 0.095 at update 0 to 0.19 (k = 1) and
    # 0.33 (k = 4).
    for run, margin in zip(record["directions"][:2], (0.05, 0.08)):
        accuracy = np.mean(run["accuracy_per_seed"], axis=0)
        assert accuracy[-1] > accuracy[0] + margin, run["num_directions"]
    oracle = record["directions"][-1]
    # The oracle is plain SGD: a hundred steps already learn the digits well.
    assert oracle["final_accuracy_mean"] > 0.5
    stability = record["claims"]["one_direction_is_stable"]
    rates = record["directions"][0]["learning_rates"]
    assert len(stability["stable_per_learning_rate"]) == len(rates)
    best = rates.index(record["directions"][0]["best_learning_rate"])
    assert stability["stable_per_learning_rate"][best] == stability["holds"]
    assert set(record["claims"]) == {
        "more_directions_help",
        "one_direction_is_stable",
        "batch_300_beats_100",
        "batch_1000_worse_than_300",
    }


def test_activity_quick(tmp_path):
    """Each kind of method of the activity benchmark learns the digits (chance is
    0.10). Measured (100 updates, 2 seeds, step sizes 0.01 to 3): backprop 0.93,
    activity with separate layers 0.78, LG-FG-A 0.61 and the LG-FG-A guess 0.17."""
    run_main("activity", "--quick", "--out", str(tmp_path))
    record = json.loads((tmp_path / "activity.json").read_text())
    assert (tmp_path / "activity.png").stat().st_size > 0
    methods = record["methods"]
    assert set(methods) == set(activity.QUICK_METHODS) == set(record["methods_run"])
    # --quick times two methods' steps (each is one more compilation).
    timed = {"backprop", "activity, separate layers"}
    assert set(record["step_time"]) == timed
    backprop = record["step_time"]["backprop"]["seconds"]
    for name in timed:
        times = record["step_time"][name]
        check_ratio(times["ratio_to_backprop"], times["seconds"], backprop)
    minimums = {
        "activity, separate layers": 0.5,
        "local losses, activity (LG-FG-A)": 0.5,
    }
    for name, method in methods.items():
        minimum = minimums.get(name, 0.14 if method["forward_only"] else 0.85)
        assert method["test_accuracy_mean"] > minimum, name
    assert not methods["backprop"]["forward_only"]
    assert methods["local losses, activity (LG-FG-A)"]["target"] == "local losses"
    assert methods[record["best_forward_only"]]["forward_only"]
    assert record["goal_met"] == methods[record["best_forward_only"]]["within_goal"]


def test_activity_adam_quick(tmp_path):
    """The Adam comparison trains through `optax.adam`: at step sizes 1e-3 and 1e-2,
    100 updates take backprop to 0.95 and activity perturbation to 0.88 (measured;
    plain SGD at those step sizes stays far lower), and the gaps to backprop are
    the differences of the recorded means."""
    run_main("activity_adam", "--quick", "--out", str(tmp_path))
    record = json.loads((tmp_path / "activity_adam.json").read_text())
    assert (tmp_path / "activity_adam.png").stat().st_size > 0
    assert record["optimizer"].startswith("optax.adam")
    methods = record["methods"]
    assert list(methods) == list(activity_adam.QUICK_METHODS)
    assert methods["backprop"]["test_accuracy_mean"] > 0.9
    assert methods["activity, separate layers"]["test_accuracy_mean"] > 0.8
    assert methods["weight DODGE k=1"]["test_accuracy_mean"] > 0.14
    for method in methods.values():
        gap = methods["backprop"]["test_accuracy_mean"] - method["test_accuracy_mean"]
        assert method["points_below_backprop"] == pytest.approx(100 * gap)
    assert methods[record["best_forward_only"]]["forward_only"]


def test_activity_methods_table():
    """The full run's fifteen methods (four of them the points k > 1 of the
    accuracy-against-cost curve); --quick trains one of each kind. A method that
    uses backprop anywhere is not forward-only."""
    assert len(activity.METHODS) == 15
    curve = [activity.curve_name(k) for k in activity.CURVE_DIRECTIONS]
    assert set(curve) < set(activity.METHODS)
    assert set(activity.QUICK_METHODS) < set(activity.METHODS)
    uses_backprop = {
        "backprop",
        "local losses, backprop (LG-BP)",
        "global target, LG-BP guess",
        "8 group-wise local losses, backprop",
    }
    for name, method in activity.METHODS.items():
        assert method.forward_only == (name not in uses_backprop), name


def test_sequential_runs_match_vmapped_runs():
    """`run_method(sequential=True)` (`lax.map`, how the conv net is trained) gives
    the runs the vmapped form gives, each in its (step size, seed) place: catches a
    seed's data or a step size paired with another run."""
    x, y, *_ = activity.load_data()
    data = (x[:256], y[:256], x[:64], y[:64])
    args = (activity.METHODS["backprop"], [0, 1], [0.1, 1.0], data, 20)
    vmapped = activity.run_method(*args)
    mapped = activity.run_method(*args, sequential=True)
    losses = vmapped["train_loss"]
    # The four runs differ, so a swapped layout cannot match by accident.
    assert len(set(np.round(losses.ravel(), 4))) == 4
    for name, values in vmapped.items():
        np.testing.assert_allclose(mapped[name], values, rtol=1e-4, err_msg=name)


def test_docs_tables_from_activity_results(tmp_path):
    """The docs pages' activity tables come from the result file: every method's
    row in the activity page, the local-loss page's subset with the estimators'
    errors, the accuracy-against-cost curve with the methods meeting both goals,
    the grid's edges marked, and a page without its markers refused."""

    def method(forward_only, accuracy, rate, gap, target="global"):
        return {
            "forward_only": forward_only,
            "target": target,
            "best_learning_rate": rate,
            "test_accuracy_mean": accuracy,
            "test_accuracy_std": 0.01,
            "points_below_backprop": gap,
            "gap_standard_error": 0.5,
        }

    def timing(ratio):
        return {"seconds": {"median": 5e-4}, "ratio_to_backprop": {"median": ratio}}

    k16 = "activity, separate layers k=16"
    record = {
        "methods": {
            "backprop": method(False, 0.98, 1.0, 0.0),
            "weight DODGE k=1": method(True, 0.76, 0.01, 22.0),
            "activity, separate layers": method(True, 0.94, 0.1, 3.5),
            k16: method(True, 0.975, 1.0, 0.3),
            "local losses, activity (LG-FG-A)": method(
                True, 0.93, 3.0, 5.0, "local losses"
            ),
            "local losses, backprop (LG-BP)": method(
                False, 0.975, 1.0, 0.5, "local losses"
            ),
        },
        "relative_squared_error_at_init": {
            "backprop": 1e-14,
            "weight DODGE k=1": 4859.3,
            "activity, separate layers": 17.8,
            k16: 1.1,
            "local losses, activity (LG-FG-A)": 15.33,
            "local losses, backprop (LG-BP)": 0.0,
        },
        "step_time": {
            "backprop": timing(1.0),
            "activity, separate layers": timing(1.2),
            k16: timing(2.04),
        },
        "curve": [
            {"num_directions": 1, "method": "activity, separate layers"},
            {"num_directions": 16, "method": k16},
        ],
        "goal_points": 1.0,
        "cost_goal": 3.0,
        "methods_meeting_both_goals": [k16],
        "best_forward_only": k16,
        "learning_rates": [0.01, 1.0, 3.0],
        "num_updates": 10,
        "batch_size": 8,
        "seeds": [0],
        "machine": FAKE_MACHINE,
    }
    _common.write_json(tmp_path / "results", "activity", record)
    pages = {}
    for name, (result, page, _) in _docs_tables.TABLES.items():
        if result == "activity":
            path = tmp_path / page
            path.parent.mkdir(parents=True, exist_ok=True)
            old = pages.get(path, "# page\n")
            start, end = (
                f"<!-- results:{name}:start -->",
                f"<!-- results:{name}:end -->",
            )
            pages[path] = f"{old}{start}\nold\n{end}\n"
    for path, text in pages.items():
        path.write_text(text)
    updated = _docs_tables.updated_pages(tmp_path / "results", tmp_path)
    activity_page = updated[tmp_path / "docs/concepts/activity.md"]
    local_page = updated[tmp_path / "docs/concepts/local_losses.md"]
    assert "old" not in activity_page + local_page
    assert "| weight DODGE k=1 | yes | 0.01 (grid's smallest) | 76.00 ± 1.00 |" in (
        activity_page
    )
    assert "| weight DODGE k=1 | 4859 |" in activity_page  # the errors table
    assert "| backprop |" not in activity_page.split("estimator")[1].split("<!--")[0]
    row = "| local losses, activity (LG-FG-A) | yes | 3 (grid's largest) | 93.00 ± 1.00"
    assert f"{row} | 5.00 ± 0.50 | 15.3 | – |" in local_page
    assert "| backprop | no | 1 | 98.00 ± 1.00 | — | 0 | 1.0 |" in local_page
    assert "weight DODGE" not in local_page.split("results:activity_local_losses")[1]
    # The verdict: no local-loss method meets the goal, k = 16 does without them.
    verdict = local_page.split("results:activity_local_verdict:start")[1]
    assert verdict.startswith(
        " -->\n\n**On this model no forward-only local-loss method meets the goal "
        "(within 1 point of backprop at most 3 backprop steps); "
        f"*{k16}* does, without them** (0.3 ± 0.5 points below backprop at 2.0 "
        "backprop steps"
    )
    assert "inside the blocks: *local losses, backprop (LG-BP)*." in verdict
    # An untimed method's gap without a cost.
    assert (
        "is *local losses, activity (LG-FG-A)*, 5.0 ± 0.5 points below backprop.\n"
        in (verdict)
    )
    # The curve: one row per k, and the methods meeting both goals named.
    curve = activity_page.split("results:activity_curve:start")[1]
    assert "| 16 | 1 | 97.50 ± 1.00 | 0.30 ± 0.50 | 2.0 |" in curve
    assert "| 1 | 0.1 | 94.00 ± 1.00 | 3.50 ± 0.50 | 1.2 |" in curve
    assert f"within 1 point of backprop at a step of at most 3× backprop's: {k16}." in (
        curve
    )
    (tmp_path / "docs/concepts/local_losses.md").write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        _docs_tables.updated_pages(tmp_path / "results", tmp_path)


def test_docs_sentence_from_two_result_files(tmp_path, monkeypatch):
    """A docs entry written from two result files (the Adam study against the SGD
    one) is rewritten only when both exist, from both: each forward-only method's
    gap under both optimizers, and the best one against the goal."""

    def method(forward_only, gap):
        return {"forward_only": forward_only, "points_below_backprop": gap}

    sgd = {"methods": {"backprop": method(False, 0), "k16": method(True, 4.04)}}
    adam = {
        "methods": {"backprop": method(False, 0), "k16": method(True, 2.61)},
        "best_forward_only": "k16",
        "goal_points": 1.0,
        "goal_met": False,
    }
    page = tmp_path / "docs/concepts/activity.md"
    page.parent.mkdir(parents=True)
    name = "activity_adam_against_sgd"
    monkeypatch.setattr(_docs_tables, "TABLES", {name: _docs_tables.TABLES[name]})
    page.write_text(f"<!-- results:{name}:start -->\nold\n<!-- results:{name}:end -->")
    results = tmp_path / "results"
    _common.write_json(results, "activity_adam", adam)
    assert _docs_tables.updated_pages(results, tmp_path) == {}  # SGD's missing
    _common.write_json(results, "activity", sgd)
    text = _docs_tables.updated_pages(results, tmp_path)[page]
    assert "SGD → Adam: k16 4.0 → 2.6." in text and "old" not in text
    assert "k16, ends 2.6 points below backprop (goal: 1 point; not reached)" in text


def test_docs_goals_table_of_the_deeper_models():
    """Per model, the closest forward-only method of each optimizer's study with
    its gap and costs, `not run` for a model the Adam study lacks, the accuracy goal
    reached if either optimizer reached it, and both goals only if one method is
    within the accuracy goal at a step of at most 3 backprop steps (the verdict
    `activity_models.run_model` stores, from `activity.both_goals`)."""

    def entry(gap):
        record = {"forward_only": True, "points_below_backprop": gap}
        return record | {"within_goal": gap <= 1.0}

    def model(best, gap, met, ratio=3.25, cheap=None):
        methods = {best: entry(gap)}
        step_time = {best: {"ratio_to_backprop": {"median": ratio}}}
        if cheap is not None:  # another forward-only method: its gap and ratio
            methods["d"] = entry(cheap[0])
            step_time["d"] = {"ratio_to_backprop": {"median": cheap[1]}}
        return {
            "goal_points": 1.0,
            "best_forward_only": best,
            "accuracy_goal_met": met,
            "methods": methods,
            "step_time": step_time,
            "memory": {best: {"ratio_to_backprop": 1.5}},
            "methods_meeting_both_goals": activity.both_goals(methods, step_time),
        }

    sgd = {
        "models": {
            "mlp": model("a", 2.66, False),
            "conv": model("b", 5.7, False),
            "cnn": model("e", 0.2, True, 4.0, cheap=(0.9, 2.5)),
        }
    }
    adam = {"models": {"mlp": model("c", 0.5, True), "cnn": model("f", 1.5, False)}}
    rows = _docs_tables.activity_models_goals(sgd, adam)
    assert rows[2] == (
        "| mlp (1 point) | a, 2.7 points below, at 3.2× a backprop step and 1.5× its "
        "peak memory | c, 0.5 points below, at 3.2× a backprop step and 1.5× its peak "
        "memory | yes | no |"
    )
    assert rows[3].endswith("| not run | no | no |")
    # The closest method costs 4 steps, another within the goal 2.5: both met.
    assert rows[4].endswith("| yes | yes |")


def test_docs_step_cost_large_table():
    """The wide MLP's row: milliseconds of each computation in order, k = 8, and
    the two ratios the issue sets goals for, read from their own entries."""
    seconds = {
        name: {"median": value}
        for name, value in (
            ("forward", 0.02),
            ("grad", 0.04),
            ("grad_remat", 0.05),
            ("jvp_fixed_direction", 0.039),
            ("dodge_k1", 0.046),
            ("average_k8", 0.339),
        )
    }
    record = {
        "machine": FAKE_MACHINE,
        "results": {
            "mlp_large": {
                "description": "MLP",
                "num_parameters": 5824522,
                "seconds": seconds,
                "ratios": {"dodge_k1_over_jvp_fixed_direction": {"median": 1.16}},
                "scaling": {"average": {"8": {"median": 0.93}}},
            }
        },
    }
    table = _docs_tables.step_cost_large_table(record)
    assert table[2] == "| 20.0 | 40.0 | 50.0 | 39.0 | 46.0 | 339 | 1.16 | 0.93 |"
    assert table[4].startswith("MLP (5,824,522 parameters)")


def _cpu_flags_record() -> dict:
    """A `cpu_flags.py` record: one timed model, one compiled only."""
    ms = {
        "default": {
            "forward": 1.0,
            "grad": 2.0,
            "dodge_k1": 2.5,
            "dodge_k": 10.0,
            "listing_k": 40.0,
        },
        "ynn_off": {
            "forward": 1.5,
            "grad": 2.0,
            "dodge_k1": 2.5,
            "dodge_k": 8.0,
            "listing_k": 10.0,
        },
        "scheduler_off": {
            "forward": 1.0,
            "grad": 3.0,
            "dodge_k1": 2.0,
            "dodge_k": 12.0,
            "listing_k": 40.0,
        },
    }
    over = {
        s: {c: ms[s][c] / ms["default"][c] for c in ms["default"]}
        for s in ("ynn_off", "scheduler_off")
    }
    mib = {s: {c: 2.0 * (i + 1) for c in ms["default"]} for i, s in enumerate(ms)}
    return {
        "machine": FAKE_MACHINE,
        "config": {
            "k": 8,
            "rounds": 3,
            "settings": {"ynn_off": "--flag=", "scheduler_off": "--other=false"},
        },
        "descriptions": {"mlp": "MLP", "deep": "Deep"},
        "results": {
            "mlp": {"milliseconds": ms, "over_default": over, "temp_mib": mib},
            "deep": {"temp_mib": mib},
        },
    }


def test_docs_cpu_flags_table():
    """One row per setting, the model named on the first; the defaults' times bare,
    the others' with their ratio to the defaults', in the columns' order; the last
    column is `filter_dodge`'s time(k) / (k · time(1)) under each setting; a model
    compiled but not timed gets no row."""
    table = _docs_tables.cpu_flags_table(_cpu_flags_record())
    assert table[0].endswith(
        "| hand-written vmap of jvp, $k = 8$ | time(8) / (8 · time(1)) |"
    )
    assert table[2:5] == [
        "| MLP | XLA's defaults | 1 | 2 | 2.5 | 10 | 40 | 0.50 |",
        "|  | no YNNPACK fusion | 1.5 (1.50×) | 2 (1.00×) | 2.5 (1.00×) "
        "| 8 (0.80×) | 10 (0.25×) | 0.40 |",
        "|  | no concurrency-optimised scheduler | 1 (1.00×) | 3 (1.50×) "
        "| 2 (0.80×) | 12 (1.20×) | 40 (1.00×) | 0.75 |",
    ]
    assert table[5] == ""
    assert "`XLA_FLAGS=--flag=`" in table[6] and "`XLA_FLAGS=--other=false`" in table[6]
    assert "3 fresh processes" in table[6]


def test_docs_cpu_flags_memory_table():
    """Every model compiled, the timed and the memory-only, one row per setting."""
    table = _docs_tables.cpu_flags_memory_table(_cpu_flags_record())
    assert table[2] == "| MLP | XLA's defaults | 2 | 2 | 2 | 2 | 2 |"
    assert table[4] == "|  | no concurrency-optimised scheduler | 6 | 6 | 6 | 6 | 6 |"
    assert table[5] == "| Deep | XLA's defaults | 2 | 2 | 2 | 2 | 2 |"
    assert len(table) == 2 + 6 + 2


def test_docs_deep_conv_sentence():
    """The guide's sentence on depth: the eight-layer conv net's memory under XLA's
    defaults (not another setting's), for backprop, one direction and k."""
    record = _cpu_flags_record()
    record["results"]["conv_deep"] = {
        "temp_mib": {
            "default": {"grad": 52.1, "dodge_k1": 21.5, "dodge_k": 45.6},
            "scheduler_off": {"grad": 52.0, "dodge_k1": 12.3, "dodge_k": 83.3},
        }
    }
    (sentence,) = _docs_tables.deep_conv_sentence(record)
    assert "`filter_grad` needs 52 MiB, `filter_dodge` 22 with one direction and " in (
        sentence
    )
    assert (
        f"46 with 8 (XLA's compiled temporaries, commit {FAKE_MACHINE['git_commit']})"
        in sentence
    )


def test_docs_scaling_step_sentence():
    """The sharded step's cost over the gradient's at the largest model timed (rows
    beyond `timed_up_to_parameters` have no step time)."""

    def row(p, dodge, gradient):
        seconds = {"step_seconds": {"median": dodge}} if dodge else {}
        return {
            "num_parameters": p,
            "dodge": seconds,
            "gradient": {"step_seconds": {"median": gradient}} if gradient else {},
        }

    record = {
        "machine": FAKE_MACHINE,
        "config": {"num_devices": 8, "num_directions": 8},
        "rows": [row(10_000, 0.2, 0.2), row(1_000_000, 0.3, 0.04), row(10**7, 0, 0)],
    }
    (sentence,) = _docs_tables.scaling_step_sentence(record)
    assert sentence.startswith(
        "At p = 1,000,000 the measured DODGE step with k = 8 is 7.5 times the "
        "gradient step (all 8 simulated devices on 2 cores"
    )


def test_docs_long_sequence_table():
    """The long-sequence table orders the lengths as numbers (50 000 after 1000,
    not as strings), takes the peak ratio at the longest, and writes a gradient
    that was compiled but not run as such, not as 0× or None."""

    def ratios(peak, seconds):
        row = {"xla_peak_bytes": peak, "xla_extra_mib": 2 * peak, "seconds": seconds}
        return {f"{m}_over_forward": row for m in _docs_tables.LONG_SEQUENCE_METHODS}

    record = {
        "ratios": {"50000": ratios(9.0, None), "1000": ratios(3.0, 2.5)},
        "points": {
            t: {"forward": {"seconds": {"median": 0.5}}} for t in ("1000", "50000")
        },
        "quality": {
            "length": 1000,
            "cosine_with_bptt": {"dodge_k1": 0.01},
            "bptt_remat_max_relative_difference": 1e-6,
        },
        "config": {"max_run_bytes": 2**32},
        "machine": FAKE_MACHINE,
    }
    lines = _docs_tables.long_sequence_table(record)
    assert r"$T = 1\,000$ | time / forward, $T = 50\,000$ |" in lines[0]
    assert lines[2] == "| BPTT | 9.00× | 6.0 | 18.0 | 2.5× | not run |"
    assert "cosine 0.010 ($k = 1$)" in lines[-1]


def test_vs_pytorch_without_torch(tmp_path):
    result = run_script(
        "vs_pytorch.py",
        "--quick",
        "--out",
        str(tmp_path),
        prelude="import sys; sys.modules['torch'] = None",
    )
    assert result.returncode == 1
    assert "needs PyTorch and torchzero" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "vs_pytorch.json").exists()


def test_vs_pytorch_jax_side(tmp_path):
    run_main("vs_pytorch", "--quick", "--jax-only", "--out", str(tmp_path))
    record = json.loads((tmp_path / "vs_pytorch.json").read_text())
    assert record["config"]["jax_only"]
    assert set(record["seconds"]) == {
        "jax_forward",
        "jax_backprop_sgd",
        "eqx_dodge_sgd",
    }


def test_adam_problems_quick(tmp_path):
    """The bounded `adam_dodge` of 0.2 against 0.1's step: with exact estimates it is
    `optax.adam`, its steps stay within Adam's bound, and 0.1's unclipped step goes
    past it on Rosenbrock's valley. Catches a bound lost in a refactor, and a study
    that no longer tells the two apart."""
    adam_problems = importlib.import_module("adam_problems")
    record = adam_problems.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "adam_problems.png").stat().st_size > 0
    bound = record["config"]["adam_bound"]
    for name, result in record["results"].items():
        methods = result["methods"]
        adam, exact = (
            methods["optax.adam"],
            methods["adam_dodge exact (partition, k = p)"],
        )
        assert adam["converged"] and exact["converged"], name
        for method, entry in methods.items():
            if method != "appendix A unclipped (0.1)":
                assert entry["largest_step_over_lr"] <= bound, (name, method)
        for run in result["one_direction"]:
            assert run["largest_step_over_lr"] <= bound, (name, run)
    parabola = record["results"]["parabola"]["methods"]
    np.testing.assert_allclose(
        parabola["adam_dodge exact (partition, k = p)"]["final"],
        parabola["optax.adam"]["final"],
        rtol=1e-6,
    )
    # Measured: 15.9 times the learning rate.
    unclipped = record["results"]["rosenbrock"]["methods"]["appendix A unclipped (0.1)"]
    assert unclipped["largest_step_over_lr"] > 2 * bound


_FAKE_BENCHMARK = """
import json, pathlib, sys, time
started = time.time()
time.sleep(0.5)
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
name = pathlib.Path(__file__).stem
record = {"benchmark": name, "quick": "--quick" in sys.argv}
(out / f"{name}.json").write_text(json.dumps(record))
stage = sys.argv[sys.argv.index("--stage") + 1] if "--stage" in sys.argv else ""
(out / f"{name}{stage}.times").write_text(json.dumps([started, time.time()]))
sys.exit(1 if name == "fails" else 0)
"""


def test_every_benchmark_has_a_smoke_test():
    """Each benchmark script's `--quick` run is exercised by some test (the runner's
    own test below uses stand-in scripts), so `make bench` cannot break unseen."""
    names = {path.stem for path in run_all.benchmark_scripts()}
    assert "step_cost" in names and "copy_task" in names
    assert not names & {"report", "run_all", "_common", "_models"}
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for name in names:
        references = (
            f'"{name}.py"',
            f'benchmarks/{name}.py"',
            f'module("{name}")',
            f'run_main("{name}"',
        )
        imported = f"\nimport {name}\n" in tests
        assert imported or any(r in tests for r in references), name


def test_run_all_quick(tmp_path, monkeypatch):
    """The runner runs every script (in parallel with `--quick`), passes the flags
    on, records each one's time and fails the run when a script fails. Stand-in
    scripts: the real ones each have their own smoke test."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("alpha", "beta", "fails", "_helper"):
        (scripts / f"{name}.py").write_text(_FAKE_BENCHMARK)
    monkeypatch.setattr(run_all, "HERE", scripts)
    names = {path.stem for path in run_all.benchmark_scripts()}
    assert names == {"alpha", "beta", "fails"}
    out = tmp_path / "out"
    only = ["alpha", "beta"]
    record = run_all.main(["--quick", "--only", *only, "--out", str(out)])
    assert set(record["seconds"]) == set(only)
    assert record["config"] == {"quick": True, "jobs": os.cpu_count()}
    for name in only:
        assert json.loads((out / f"{name}.json").read_text()) == {
            "benchmark": name,
            "quick": True,
        }
    assert json.loads((out / "run_all.json").read_text())["benchmark"] == "run_all"
    with pytest.raises(SystemExit, match="Failed: fails.py"):
        run_all.main(["--quick", "--out", str(out)])
    with pytest.raises(SystemExit, match="Unknown benchmarks"):
        run_all.main(["--quick", "--only", "no_such_benchmark"])


def test_untimed_part_is_computed_once_and_read_back(tmp_path):
    """The untimed stage computes and keeps; the timed stage reads what it kept
    without computing again; a timed stage with nothing kept stops the script."""
    calls = []

    def compute():
        calls.append(1)
        return {"accuracy": len(calls)}

    assert _common.untimed_part(tmp_path, "x", None, compute) == {"accuracy": 1}
    assert _common.untimed_part(tmp_path, "x", "untimed", compute) is None
    assert _common.untimed_part(tmp_path, "x", "timed", compute) == {"accuracy": 2}
    assert len(calls) == 2
    with pytest.raises(SystemExit, match="--stage untimed"):
        _common.untimed_part(tmp_path, "y", "timed", compute)


def test_run_all_full_runs_timed_scripts_alone(tmp_path, monkeypatch):
    """A full run gives the benchmarks that time or measure the machine to
    themselves, one at a time, after the others have run side by side; each
    script's results and time are recorded as in a quick run."""
    # The real list: exactly the scripts that time or measure memory.
    real = {path.stem: path.read_text() for path in BENCHMARKS.glob("[!_]*.py")}
    measuring = {
        name
        for name, text in real.items()
        if any(
            helper in text
            for helper in ("time_interleaved", "memory_analysis", "measure_compiled")
        )
    }
    assert measuring == set(run_all.TIMED)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    names = ("alpha", "beta", "gamma", "delta")
    for name in (*names, "fails"):
        (scripts / f"{name}.py").write_text(_FAKE_BENCHMARK)
    monkeypatch.setattr(run_all, "HERE", scripts)
    monkeypatch.setattr(run_all, "TIMED", ("beta", "delta", "fails"))
    # delta's training runs go with the untimed scripts, its timing alone.
    monkeypatch.setattr(run_all, "STAGED", ("delta", "fails"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    out = tmp_path / "out"
    record = run_all.main(["--only", *names, "--out", str(out)])
    assert set(record["seconds"]) == set(names)
    assert record["config"]["timed"] == ["beta", "delta"]
    assert record["config"]["staged"] == ["delta"]
    stages = record["stage_seconds"]
    assert set(stages) == {"delta (untimed stage)", "delta (timed stage)"}
    assert record["seconds"]["delta"] == pytest.approx(sum(stages.values()))
    runs = ("alpha", "gamma", "deltauntimed", "beta", "deltatimed")
    times = {name: json.loads((out / f"{name}.times").read_text()) for name in runs}
    assert not (out / "delta.times").exists()
    # Each stage sleeps 0.5 s: the script's time is their sum.
    assert record["seconds"]["delta"] >= 1.0
    untimed_end = max(times[name][1] for name in ("alpha", "gamma", "deltauntimed"))
    # The untimed pair overlapped; the timed scripts came after, one at a time.
    assert (
        times["gamma"][0] < times["alpha"][1] and times["alpha"][0] < times["gamma"][1]
    )
    beta, delta = sorted((times["beta"], times["deltatimed"]))
    assert untimed_end <= beta[0] and beta[1] <= delta[0]
    # A script whose untimed stage fails is not timed on an older run's results.
    with pytest.raises(SystemExit, match="Failed: fails.py"):
        run_all.main(["--only", "fails", "--out", str(out)])
    assert (out / "failsuntimed.times").exists()
    assert not (out / "failstimed.times").exists()


def test_run_all_starts_the_longest_untimed_scripts_first(tmp_path):
    """Ordered by the last run's times, those without one first, a staged script's
    untimed stage by that stage's time (not the script's total); without a last
    run, as given."""
    runs = [(tmp_path / f"{name}.py", []) for name in ("a", "b", "c", "new")]
    runs.append((tmp_path / "d.py", ["--stage", "untimed"]))
    assert run_all.longest_first(runs, tmp_path) == runs
    _common.write_json(
        tmp_path,
        "run_all",
        {
            "seconds": {"a": 1.0, "b": 9.0, "c": 5.0, "d": 10.0},
            "stage_seconds": {"d (untimed stage)": 3.0, "d (timed stage)": 7.0},
        },
    )
    ordered = run_all.longest_first(runs, tmp_path)
    assert [path.stem for path, _ in ordered] == ["new", "b", "c", "d", "a"]


def test_digits_widths_resumes(tmp_path, monkeypatch):
    """Panel c) (the paper's Fig. 1c, `--widths-only`) on its tiny `--quick`
    configuration: every (width, k) run lands in the run log and the summary, in
    its own k's table; a rerun trains only the runs missing from the log (one
    deleted here, as if the study had been killed before it), then none."""
    digits = importlib.import_module("digits_directions")
    trained = []

    def run_setting(*args, **kwargs):
        trained.append((kwargs["width"], args[3]))
        return real_run_setting(*args, **kwargs)

    real_run_setting = digits.run_setting
    monkeypatch.setattr(digits, "run_setting", run_setting)
    argv = ["--quick", "--widths-only", "--out", str(tmp_path)]
    summary = digits.main(argv)["widths"]
    config = digits.WIDTHS_STUDY["quick"]
    expected = [(w, k) for k in config["num_directions"] for w in config["widths"]]
    assert trained == expected
    saved = json.loads((tmp_path / "digits_widths.json").read_text())
    assert saved["by_num_directions"] == summary["by_num_directions"]
    assert (tmp_path / "digits_widths.png").stat().st_size > 0
    assert summary["runs_missing"] == []
    assert set(summary["by_num_directions"]) == {"1"}
    snapshots = config["num_updates"] // config["num_snapshots"]
    for k, rows in summary["by_num_directions"].items():
        assert [row["width"] for row in rows] == config["widths"]
        for row in rows:
            assert row["updates"] == [snapshots, 2 * snapshots]
            assert len(row["accuracy_mean"]) == config["num_snapshots"]
            assert row["accuracy_min"] <= row["accuracy_mean"] <= row["accuracy_max"]
    # 64-8-8-10 and 64-16-16-10 with biases.
    assert [row["num_parameters"] for row in rows] == [682, 1482]
    section = "\n".join(report.digits_widths_section(saved, "results"))
    assert "Runs finished: 2 of 2." in section
    assert section.count("| 1 | ") == 2 and "| 1 | 16 | 1482 |" in section

    log = json.loads((tmp_path / "digits_widths_runs.json").read_text())
    del log["runs"]["width 16 / k 1"]
    (tmp_path / "digits_widths_runs.json").write_text(json.dumps(log))
    trained.clear()
    digits.main(argv)
    assert trained == [(16, 1)]
    trained.clear()
    again = digits.main(argv)["widths"]
    assert trained == []
    assert again["runs_finished"] == summary["runs_finished"]


def test_report_one_direction_stability():
    """The claims table says at which step sizes one direction is stable: from the
    per-step-size verdicts, or, in a result file without them, from the best step
    size's verdict and the runs that end at chance (no better than untrained)."""
    grid = [0.003, 0.01, 0.03, 0.1, 0.3]
    one = {
        "num_directions": 1,
        "learning_rates": grid,
        "best_learning_rate": 0.003,
        "final_accuracy_per_learning_rate": [0.32, 0.099, 0.099, 0.099, 0.099],
        "accuracy_mean": [0.11, 0.2, 0.32],
    }
    record = {
        "directions": [one],
        "claims": {"one_direction_is_stable": {"holds": True}},
    }
    grid_text = "{0.003, 0.01, 0.03, 0.1, 0.3}"
    assert report._one_direction_stability(record) == (
        f"only at step size 0.003 of {grid_text}; falls to chance (final accuracy "
        "0.10, untrained 0.11) at ≥ 0.01"
    )
    one["final_accuracy_per_learning_rate"][1] = 0.5  # learns: unknown if stable
    assert report._one_direction_stability(record).endswith(
        "at ≥ 0.03; not recorded at 0.01"
    )
    claim = record["claims"]["one_direction_is_stable"]
    claim["stable_per_learning_rate"] = [True, False, False, False, False]
    assert report._one_direction_stability(record).endswith(
        "at ≥ 0.03; unstable at 0.01"
    )
    claim["stable_per_learning_rate"] = [True, True, False, False, False]
    assert report._one_direction_stability(record).startswith(
        f"only at step sizes 0.003, 0.01 of {grid_text}; falls"
    )
    claim["stable_per_learning_rate"] = [True] * 5
    assert report._one_direction_stability(record) == (
        f"yes, at every step size of {grid_text}"
    )


def test_report_prices_eight_directions_at_one_directions_parts():
    """The wide MLP's bound on time(8)/(8·time(1)): a tangent's multiply-adds from
    the widths (`dW·x` alone in the first layer), and k = 8 priced as one shared
    forward pass plus eight times what one direction adds to it."""
    widths = "MLP 784-2048-2048-10, batch 256"
    forward = 784 * 2048 + 2048 * 2048 + 2048 * 10
    tangent = 784 * 2048 + 2 * (2048 * 2048 + 2048 * 10)
    assert report._tangent_over_forward(widths) == tangent / forward
    assert report._tangent_over_forward("MLP 2-3-4") == (6 + 2 * 12) / 18
    seconds = {"forward": {"median": 0.02}, "dodge_k1": {"median": 0.05}}
    line = report._parts_price_line({"seconds": seconds, "description": widths})
    # (8 · 50 − 7 · 20) / (8 · 50) = 0.65; (1 + 8 · 1.724) / (8 · 2.724) = 0.68.
    assert "time(8) / (8 · time(1)) = 0.65." in line
    assert "1.72 forward passes" in line and "operation: 0.68." in line


def test_report_copy_task_against_the_paper():
    """The copy task's sentence on the paper's figures: each comparison from the
    methods' per-seed finals at their best learning rate, with a verdict that says
    whether the seeds separate, and the 64-direction one only once it is finished."""

    def result(seeds):
        return {
            "best_learning_rate": 0.001,
            "runs": {"0.001": {"final_per_seed": seeds}},
        }

    per_seed = {
        "bptt": [19.0, 19.5, 18.5],
        "tbptt": [43.0, 44.0, 42.0],
        "dodge_k1": [50.0, 49.0, 48.0],
        "dodge_tbptt": [43.5, 42.5, 44.5],
        "synthetic": [51.0, 50.0, 52.0],
        "dodge_synthetic": [47.0, 46.0, 48.0],
    }
    record = {
        "results": {m: result(seeds) for m, seeds in per_seed.items()},
        "final_bit_errors": {m: float(np.median(s)) for m, s in per_seed.items()},
    }
    (text,) = report._copy_task_comparison(record)
    assert "Random directions end at 49.0 with 1:" in text
    assert "our 64-direction runs are not all finished yet." in text
    assert "ends at 43.5 against TBPTT's 43.0 (the seeds' ranges overlap)." in text
    assert "ends at 47.0 against their 51.0 (lower in every seed)." in text
    record["results"]["dodge_k64"] = result([44.5, 45.0, 46.0])
    record["final_bit_errors"]["dodge_k64"] = 45.0
    (text,) = report._copy_task_comparison(record)
    assert (
        "here 64 end at 45.0 against BPTT's 19.0 (higher in every seed) and TBPTT's "
        "43.0 (higher in every seed)."
    ) in text


def test_report_copy_task_edge_rates():
    """The paper-scale copy table: a planned edge rate not yet run says so, an
    unplanned one is a dash, the best is bold, and a finished method whose best is
    still the end of its rates is named as such (and one whose best is inside is
    not)."""
    config = {
        "hidden": 128,
        "max_length": 25,
        "batch": 32,
        "steps": 5000,
        "seeds": [0, 1],
        "learning_rates": [0.003, 0.001, 0.0003],
        "edge_learning_rates": [0.01],
        "max_truncation": 3,
        "critic_truncation": 5,
        "critic_scale": 0.5,
    }

    def entry(value):
        return {"seeds_finished": 2, "median_final_bit_errors": value}

    record = {
        "config": config,
        "progress": {
            "methods_planned": ["bptt", "tbptt", "dodge_k1"],
            "learning_rates_planned": {
                "bptt": [0.003, 0.001, 0.0003, 0.01],
                "tbptt": [0.003, 0.001, 0.0003, 0.01],
                "dodge_k1": [0.003, 0.001, 0.0003],
            },
            "per_learning_rate": {
                "bptt": {"0.003": entry(19.0), "0.001": entry(24.0)},
                "tbptt": {
                    "0.003": entry(44.0),
                    "0.001": entry(45.0),
                    "0.0003": entry(46.0),
                    "0.01": entry(43.0),
                },
                "dodge_k1": {
                    "0.003": entry(52.0),
                    "0.001": entry(50.0),
                    "0.0003": entry(53.0),
                },
            },
        },
        "results": {
            "tbptt": {
                "best_learning_rate": 0.01,
                "runs": dict.fromkeys(["0.003", "0.001", "0.0003", "0.01"], {}),
            },
            "dodge_k1": {
                "best_learning_rate": 0.001,
                "runs": dict.fromkeys(["0.003", "0.001", "0.0003"], {}),
            },
        },
    }
    rows = report._copy_rows(record, [0.01, 0.003, 0.001, 0.0003])
    assert rows[0] == "| BPTT | not run yet | 19.0 | 24.0 | not run yet |"
    assert rows[1].endswith("| **43.0** | 44.0 | 45.0 | 46.0 |")
    assert rows[2].endswith("| – | 52.0 | **50.0** | 53.0 |")
    sentence = report._edge_rates_sentence(record)
    assert "also runs the next rate beyond it (above: 0.01; –: not planned" in sentence
    assert sentence.endswith("may lie beyond: TBPTT, truncation uniform in 1..3.")


def test_report(tmp_path):
    results = tmp_path / "results"
    record = {
        "config": {"quick": True, "num_directions": [1, 2], "repeats": 5},
        "goals": {
            "dodge_k1_over_listing1": 1.05,
            "dodge_k1_over_forward": 2.0,
            "scaling": 1.0,
        },
    }
    entry = _common.summarize([0.001, 0.002, 0.003, 0.004, 0.005])
    ratio = _common.summarize([1.5, 1.6, 1.7, 1.8, 1.9])
    memory = {"peak_bytes": 3 * 2**20}
    record["results"] = {
        "mlp": {
            "description": "an MLP",
            "seconds": {n: entry for n in ("forward", "grad", "listing1", "dodge_k1")},
            "ratios": {
                n: ratio
                for n in (
                    "dodge_k1_over_listing1",
                    "dodge_k1_over_forward",
                    "dodge_k1_over_grad",
                    "jvp_fixed_direction_over_forward",
                )
            },
            "scaling": {m: {"1": ratio, "2": ratio} for m in ("average", "partition")},
            "memory_bytes": {"grad": memory, "dodge_k1": memory, "average_k2": memory},
        }
    }
    _common.write_json(results, "step_cost", record)
    _common.write_json(
        results,
        "run_all",
        {"seconds": {"step_cost": 150.0, "copy_task": 90.0}, "total_seconds": 240.0},
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Performance\n\n{report.START}\nold text\n{report.END}\n\n## After\n"
    )
    args = ["--results", str(results), "--readme", str(readme)]
    with pytest.raises(SystemExit):
        report.main([*args, "--check"])
    report.main(args)
    report.main([*args, "--check"])
    text = readme.read_text()
    assert "old text" not in text
    assert text.endswith(f"{report.END}\n\n## After\n")
    assert "| an MLP | 3.00 (1.50–4.50) |" in text  # median (quartiles)
    assert "1.70 (1.55–1.85) ✗" in text  # above the 1.05 goal
    assert "| 3.0 |" in text  # MiB
    assert "ran 2 benchmarks one at a time in 4.0 min" in text
    assert "| – |" in text and "zeroth-order peer" not in text  # an older file
    mlp = record["results"]["mlp"]
    mlp["seconds"] |= {"grad_remat": entry, "central_k1": entry}
    mlp["ratios"] |= {
        "dodge_k1_over_grad_remat": ratio,
        "central_k1_over_dodge_k1": ratio,
    }
    mlp["memory_bytes"] |= {"grad_remat": memory, "central_k1": memory}
    mlp["central_k1_relative_error"] = 1e-4
    record = json.loads((results / "step_cost.json").read_text()) | record
    text = "\n".join(report.step_cost_section(record, "results"))
    assert "| 3.00 (1.50–4.50) | 3.00 (1.50–4.50) | 3.00 (1.50–4.50) |" in text
    assert "| mlp | 1.70 (1.55–1.85) | 3.0 | 3.0 | 1.0e-04 |" in text


def test_report_guess_quality_curvature_rows():
    """The curvature-aware rows of `guess_quality` get their own table, beside the
    plain method they follow, with the cost line; results without them (the
    committed file before its rerun) render as before."""
    cosine = {"median_abs_cosine": 0.1, "iqr_abs_cosine": [0.05, 0.2]}
    plain = {
        "cosine_at_init": cosine,
        "cosine_after_backprop_training": None,
        "train_accuracy_median": 0.5,
        "best_learning_rate": 3.0,
    }
    curvature = {
        "cosine_at_init": None,
        "cosine_after_backprop_training": None,
        "base_method": "activation",
        "best_learning_rate": 3.0,
        "best_newton_damping": 0.3,
        "train_accuracy_median": 0.625,
        "accepted_fraction_per_seed": [0.75, 0.85],
        "median_unit_curvature_per_seed": [0.02, None],
    }
    ratio = _common.summarize([2.0, 2.5, 3.0, 3.5, 4.0])
    record = {
        "machine": {"cpu": "a CPU", "cpu_count": 2, "jax": "0.10"},
        "config": {
            "batch_size": 64,
            "cosine_keys": 8,
            "backprop_steps": 0,
            "num_steps": 10,
            "num_seeds": 2,
            "width_depth": 2,
            "width_keys": 8,
        },
        "results": {
            "models": {
                "mlp": {
                    "num_parameters": 100,
                    "one_over_sqrt_p": 0.1,
                    "methods": {
                        "activation": plain,
                        "activation curvature": curvature,
                    },
                    "curvature_cost": {
                        "curvature_aware_over_dodge_random": ratio,
                        "curvature_aware_no_trial_over_dodge_random": ratio,
                    },
                }
            },
            "width_sweep": {"8": {"num_parameters": 100, "activation": cosine}},
        },
    }
    lines = report.guess_quality_section(record, "results")
    assert "| `activation curvature` | 0.625 | 0.500 | 0.3 | 80% | 0.02 |" in lines
    assert not any(line.startswith("| `activation curvature` | –") for line in lines)
    assert any("`curvature_aware_dodge` 3.00×" in line for line in lines)
    del record["results"]["models"]["mlp"]["methods"]["activation curvature"]
    del record["results"]["models"]["mlp"]["curvature_cost"]
    assert not any(
        "curvature" in line for line in report.guess_quality_section(record, "results")
    )


def test_report_committed_results():
    """Every benchmark with a committed result file has its section in the README,
    and the README is up to date with the results."""
    results = BENCHMARKS / "results"
    body = report.render(results, ROOT)
    headings = [line for line in body.splitlines() if line.startswith("### ")]
    # Result files of another script's study (its `--full` panel).
    scripts = {
        "digits_widths": "digits_directions.py --full",
        "copy_task_full": "copy_task.py --full",
        "online_stream_full": "online_stream.py",
        "step_cost_large": "step_cost.py --large",
        "cpu_flags_full": "cpu_flags.py --full",
    }
    for name in report.SECTIONS:
        if (results / f"{name}.json").exists():
            script = scripts.get(name, f"{name}.py")
            assert any(f"`benchmarks/{script}`" in h for h in headings), name
            assert f"results/{name}.png)" in body
    assert "| TBPTT K=100 | 0.93 |" in body  # the paper's Table 1 column
    report.main(["--check"])


def test_stacked_local_models_predict_as_the_plain_models():
    """`activity_models.py`'s local-loss and group-wise models start from the plain
    model's weights: their prediction (the last head on the chain of blocks) is the
    plain model's, for the MLPs and the conv net (whose groups are channels)."""
    activity_models = importlib.import_module("activity_models")

    # Built and run in one program per model and grouping: eagerly, every
    # initialiser and layer would compile on its own.
    @ft.partial(jax.jit, static_argnums=(0, 1))
    def predictions(name, groups, key):
        model = activity_models.MODELS[name]
        plain_key, x_key, local_key = jax.random.split(key, 3)
        plain = model.make(plain_key)
        x = jax.random.uniform(x_key, (5, *model.input_shape))
        prepare, hidden, output = model.parts(plain)
        local = _local_models.stack_local_model(
            hidden,
            output,
            local_key,
            input_shape=model.input_shape,
            prepare=prepare,
            groups=groups,
        )
        assert len(local.blocks) == len(hidden) + 1
        return jax.vmap(plain)(x), jax.vmap(local)(x), jax.vmap(local.local_outputs)(x)

    # One model per way of cutting it into blocks: the mnist1d MLP is cut by the
    # same `mlp_parts` as the digits MLP.
    models = {model.parts: name for name, model in activity_models.MODELS.items()}
    assert len(models) == 2
    for name in models.values():
        for groups in (None, activity_models.GROUPS):
            expected, prediction, outputs = predictions(name, groups, jax.random.key(0))
            np.testing.assert_allclose(
                prediction, expected, rtol=1e-5, atol=1e-5, err_msg=name
            )
            np.testing.assert_allclose(outputs[-1], expected, rtol=1e-5, atol=1e-5)
            if groups is not None:
                assert outputs[0].shape == (5, groups, 10)


def test_activity_models_quick(tmp_path):
    """The quick run (the 256-unit digits MLP only), with Adam: backprop learns, and
    the forward-only LG-FG-A beats chance (0.10) by a margin that an estimator of
    zeros or of the wrong sign would not, nor plain SGD at Adam's step sizes (an
    optimizer not passed on). `activity.py`'s smoke run trains with SGD through the
    same `run_method`. Measured (100 updates, 2 seeds, step sizes 0.001 and 0.01):
    backprop 0.96, LG-FG-A 0.40 (± 0.016). Run as `make bench` runs it, in two
    stages: the training runs, then the timing, which reads them back."""
    flags = ("--quick", "--adam", "--out", str(tmp_path))
    run_main("activity_models", *flags, "--stage", "untimed")
    assert not (tmp_path / "activity_models_adam.json").exists()
    run_main("activity_models", *flags, "--stage", "timed")
    record = json.loads((tmp_path / "activity_models_adam.json").read_text())
    assert (tmp_path / "activity_models_adam.png").stat().st_size > 0
    assert set(record["models"]) == {"digits MLP 64-256-256-10"}
    assert record["scale"] == "quick"
    assert record["optimizer"] == "Adam"
    assert record["learning_rates"] == [1e-3, 1e-2]
    model = record["models"]["digits MLP 64-256-256-10"]
    methods = model["methods"]
    assert set(methods) == set(model["step_time"]) == set(model["memory"])
    minimums = {
        "backprop": 0.85,
        "local losses, activity (LG-FG-A)": 0.25,
    }
    assert set(methods) == set(minimums)
    for name, method in methods.items():
        assert method["test_accuracy_mean"] > minimums[name], name
        assert model["memory"][name]["peak_bytes"] > 0
    assert model["memory"]["backprop"]["ratio_to_backprop"] == 1.0
    assert methods[model["best_forward_only"]]["forward_only"]
    best = methods[model["best_forward_only"]]
    assert model["accuracy_goal_met"] == best["within_goal"]


def test_report_sentences_on_the_sources():
    """The sentences on orthogonal directions and curvature-aware steps follow the
    numbers: the verdict on CARS's claim flips with them, and rows missing from an
    older file leave the sentences out."""

    def model(**accuracies):
        return {
            "methods": {
                name.replace("_", "-").replace("-curvature", " curvature"): {
                    "train_accuracy_median": value
                }
                for name, value in accuracies.items()
            }
        }

    rows = dict(rademacher_k16=0.88, orthogonal_k16=0.87, rademacher_k1=0.38)
    rows |= {"rademacher_k1_curvature": 0.62, "activation": 0.19}
    rows |= {"activation_curvature": 0.16}
    text = "\n".join(report._sources_lines({"mlp": model(**rows)}))
    assert "0.87 on mlp, level with independent directions' 0.88" in text
    assert "0.62 against the plain step's 0.38 on mlp: as CARS" in text
    assert "activation 0.16 against 0.19" in text
    rows["rademacher_k1_curvature"] = 0.39
    text = "\n".join(report._sources_lines({"mlp": model(**rows)}))
    assert "unlike CARS's" in text
    assert report._sources_lines({"mlp": model(rademacher_k1=0.38)}) == []


def test_report_gpu_chunks():
    """The GPU's chunk table: each chunk size's `jvp_scan_c` against one `vmap` from
    its own `k_formulations_chunkC.json`, "–" where k is no larger than the chunk,
    and a verdict that follows the timings, not a sentence typed in."""

    def record(chunk, ks, chunked_ratio):
        names = ("vmap_jvp", f"jvp_scan_{chunk}", f"jvp_unrolled_{chunk}")
        ratios = (1.0, chunked_ratio, chunked_ratio + 0.5)

        def entry(k):
            return {
                "seconds": {n: _common.summarize([0.001]) for n in names},
                "over_vmap_jvp": {
                    n: _common.summarize([r]) for n, r in zip(names, ratios)
                },
                "peak_bytes": {
                    names[0]: k * 2**20,
                    names[1]: chunk * 2**20,
                    names[2]: k * 2**20,
                },
            }

        return {
            "config": {"chunk": chunk},
            "results": {"mlp": {str(k): entry(k) for k in ks}},
        }

    records = {4: record(4, [16, 64], 3.0), 16: record(16, [16, 256], 1.5)}
    text = "\n".join(report.gpu_chunks_lines(records, "gpu"))
    assert (
        "| mlp | 16 | 1.00 (1.00–1.00) | 16.0 | 3.00 (3.00–3.00) | 4.0 | – | – |"
        in text
    )
    assert "| mlp | 256 | 1.00 (1.00–1.00) | 256.0 | – | – | 1.50" in text
    assert "3.0–3.0× with c = 4, 1.5–1.5× with c = 16" in text
    assert "keeps one `vmap` over all k" in text and "to 256.0 MiB" in text
    assert "chunks of 4 stay under 4.0 MiB" in text
    faster = {4: record(4, [64], 0.8)}
    text = "\n".join(report.gpu_chunks_lines(faster, "gpu"))
    assert "some chunkings are not slower" in text and "keeps one" not in text


def test_report_copy_task_full_status():
    """The paper-scale copy task's heading and status follow the progress record:
    "in progress" with the count while runs remain, "All N planned runs are
    finished" once none does."""
    record = json.loads((BENCHMARKS / "results" / "copy_task_full.json").read_text())
    progress = record["progress"]
    for finished in (progress["runs_planned"], progress["runs_planned"] - 3):
        record["progress"] = {**progress, "runs_finished": finished}
        heading, _, text, *_ = report.copy_task_full_section(record, "results")
        done = finished == progress["runs_planned"]
        assert ("in progress" in heading) != done
        assert (
            f"**All {progress['runs_planned']} planned runs are finished.**" in text
        ) == done
        assert (f"**{finished} of the {progress['runs_planned']} runs" in text) != done
