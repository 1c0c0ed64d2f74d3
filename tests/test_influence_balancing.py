import importlib
import json

import jax.numpy as jnp
import numpy as np


influence_balancing = importlib.import_module("influence_balancing")


def test_dodge_matches_rtrl_and_tbptt_diverges():
    iterations = influence_balancing.ITERATIONS
    train = influence_balancing.train
    dodge_loss, dodge_theta = train("dodge", 1, iterations, jnp.float32, seed=1)
    rtrl_loss, rtrl_theta = train("rtrl", 1, iterations, jnp.float32)
    tbptt_loss, _ = train("tbptt", 10, iterations, jnp.float32)
    # The paper's Table 1: RTRL and DODGE reach ~1e-12 (float32 is enough here).
    assert dodge_loss[-1] <= 1e-10
    assert rtrl_loss[-1] <= 1e-10
    # With one parameter, (g·u)u = g for u = ±1: DODGE is RTRL, iteration by iteration.
    np.testing.assert_allclose(dodge_theta, rtrl_theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dodge_theta[-1], -1 / 6, atol=1e-5)
    # Truncation 10 has the wrong gradient sign: the loss grows without bound.
    assert tbptt_loss[-1] > 1e6 * tbptt_loss[0]
    assert jnp.all(jnp.diff(tbptt_loss[iterations // 10 :]) > 0)


def test_quick_run(tmp_path):
    payload = influence_balancing.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "influence_balancing.json").read_text())
    assert (tmp_path / "influence_balancing.png").stat().st_size > 0
    assert record["config"]["iterations"] == 200
    assert set(record["table"]) == set(payload["table"])
    assert (
        record["table"]["RTRL"]["ours_float32"]
        < record["table"]["TBPTT K=10"]["ours_float32"]
    )
