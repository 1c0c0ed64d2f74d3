"""Smoke run of `examples/adam_digits.py --quick`."""

import importlib.util
import pathlib

import jax


def test_adam_digits_quick():
    path = pathlib.Path(__file__).parents[1] / "examples" / "adam_digits.py"
    spec = importlib.util.spec_from_file_location("adam_digits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The example compares with `optax.adam`, which computes `decay**count` with an
    # int32 count: not clean under the strict promotion of the test suite.
    with jax.numpy_dtype_promotion("standard"):
        results = module.main(["--quick", "--steps", "30"])
    assert len(results) == 5
    for result in results.values():
        assert 0 <= result["test_accuracy"] <= 1
    # Thirty Adam steps on backpropagated gradients are far above chance (0.1).
    assert results["optax.adam (backprop)"]["test_accuracy"] > 0.5
