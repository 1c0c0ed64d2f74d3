import os

import jax
import pytest


# The multi-device tests (`test_sharded_devices.py`) run in this process on 8 CPU
# devices; JAX fixes the count when it first uses a device, so it is set here, before
# any test module is imported. Other tests use the first device only.
jax.config.update("jax_num_cpu_devices", 8)
# Eight device threads share the cores with the rest of the suite: XLA:CPU's default
# 40 s before it aborts a collective that waits for its peers is too short for that.
# The suite is compile-bound (hundreds of small programs, each run a few times, XLA's
# backend compilation about 60 % of its CPU time): XLA:CPU's older elementwise
# emitters compile its fusions in about two thirds of the time of the fusion
# emitters (measured on test_transform.py and test_activity.py: 70 → 44 CPU-s).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
# XLA's optimisation passes cost more than they save here too. Results do not depend
# on them; speed and memory are measured by `benchmarks/`, which keeps them on. Set
# in the environment too, for the scripts the tests run in subprocesses.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function that hands out a fresh PRNG key at every call."""
    keys = iter(jax.random.split(jax.random.key(5678), 10_000))
    return lambda: next(keys)


# The files whose tests take longest (benchmark smoke runs, docs pages, examples) run
# first. Work stealing hands the remaining tests to whichever worker is free, so the
# workers then end together on short tests, instead of one idling while the other
# finishes a long test that happened to come last.
LONG_FIRST = (
    "test_benchmarks.py",
    "test_docs.py",
    "test_guess_quality_benchmark.py",
    "test_long_sequence.py",
    "test_online_stream.py",
    "test_adam_digits_example.py",
    "test_copy_task.py",
    "test_reptile_regression.py",
    "test_training.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))
