"""Smoke run of `examples/adam_digits.py --quick`."""

import jax

from .helpers import load_script


def test_adam_digits_quick():
    module = load_script("examples/adam_digits.py")
    # The example compares with `optax.adam`, which computes `decay**count` with an
    # int32 count: not clean under the strict promotion of the test suite.
    with jax.numpy_dtype_promotion("standard"):
        results = module.main(["--quick", "--steps", "30"])
    assert len(results) == 5
    for result in results.values():
        assert 0 <= result["test_accuracy"] <= 1
    # Thirty Adam steps on backpropagated gradients are far above chance (0.1).
    assert results["optax.adam (backprop)"]["test_accuracy"] > 0.5
