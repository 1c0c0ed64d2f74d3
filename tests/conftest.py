import jax
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function that hands out a fresh PRNG key at every call."""
    keys = iter(jax.random.split(jax.random.key(5678), 10_000))
    return lambda: next(keys)
