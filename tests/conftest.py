import os

import jax
import pytest


# The multi-device tests (`test_sharded_devices.py`) run in this process on 8 CPU
# devices; JAX fixes the count when it first uses a device, so it is set here, before
# any test module is imported. Other tests use the first device only.
jax.config.update("jax_num_cpu_devices", 8)
# Eight device threads share the cores with the rest of the suite: XLA:CPU's default
# 40 s before it aborts a collective that waits for its peers is too short for that.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
# The suite is compile-bound (hundreds of small programs, each run a few times):
# XLA's optimisation passes cost more than they save here. Results do not depend on
# them; speed and memory are measured by `benchmarks/`, which keeps them on. Set in
# the environment too, for the scripts the tests run in subprocesses.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function that hands out a fresh PRNG key at every call."""
    keys = iter(jax.random.split(jax.random.key(5678), 10_000))
    return lambda: next(keys)
