"""`benchmarks/_common.RunLog`, the record of a resumable `--full` study."""

import importlib
import json

import pytest


# The benchmark scripts are not a package; pytest puts their folder on the path.
_common = importlib.import_module("_common")


def test_runs_are_kept_across_sittings(tmp_path):
    """Each finished run is on disk as soon as it is added (a study killed after it
    keeps it), a new sitting skips it, and the configuration travels with the
    runs."""
    config = {"seeds": [0, 1], "learning_rates": (0.1,)}
    first = _common.RunLog(tmp_path, "study_runs", config)
    assert "a" not in first
    first.add("a", {"accuracy": 0.5})
    saved = json.loads((tmp_path / "study_runs.json").read_text())
    assert saved["runs"]["a"]["accuracy"] == 0.5
    assert "git_commit" in saved["runs"]["a"]["machine"]
    # Tuples come back from JSON as lists: the same configuration all the same.
    second = _common.RunLog(tmp_path, "study_runs", config)
    assert "a" in second and "b" not in second
    second.add("b", {"accuracy": 0.7})
    third = _common.RunLog(tmp_path, "study_runs", config)
    assert set(third.runs) == {"a", "b"}
    assert third.runs["a"]["accuracy"] == 0.5


def test_another_configuration_is_refused(tmp_path):
    _common.RunLog(tmp_path, "study_runs", {"seeds": [0]}).add("a", {})
    with pytest.raises(SystemExit, match="another configuration"):
        _common.RunLog(tmp_path, "study_runs", {"seeds": [0, 1]})
