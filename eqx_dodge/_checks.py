"""Argument checks shared by every public function, written once.

One convention throughout, as in Equinox's `nn/_conv.py`: options are plain strings
checked at run time, and a bad value raises a `ValueError` (a bad type a `TypeError`)
that names the argument and says what it should be.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, PRNGKeyArray, UInt32


# Every form of key the public functions accept (see `as_key`).
# A 0-d integer seed, signed or unsigned (`Int` alone is signed).
KeyLike = (
    PRNGKeyArray
    | int
    | Integer[Array, ""]
    | np.integer
    | Integer[np.ndarray, ""]
    | UInt32[np.ndarray, "2"]
)
# A float hyperparameter; an array when `optax.inject_hyperparams` passes it.
ScalarLike = float | Float[Array, ""]
SAMPLERS: tuple[str, ...] = ("rademacher", "gaussian", "orthogonal")
MODES: tuple[str, ...] = ("average", "partition")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
DERIVATIVES: tuple[str, ...] = ("jvp", "central")
# The default step `h` of `derivative="central"` (each Rademacher entry of a random
# direction moves by `h`): MeZO's and torchzero's, below float32's balance point
# `(3ε)^(1/3) ≈ 7e-3` of truncation and rounding errors for a loss whose third
# derivative is about its size. See the docs' troubleshooting page.
FINITE_DIFFERENCE_STEP = 1e-3


def _static_hint(name: str, value: Any) -> str:
    # `optax.inject_hyperparams` turns every numeric argument into an array; the
    # structural ones must stay Python values.
    if isinstance(value, jax.Array):
        return (
            f" `{name}` decides the shapes of the computation, so it cannot be an "
            "array; with `optax.inject_hyperparams`, list it in "
            f"`static_args=({name!r},)`."
        )
    return ""


def check_option(name: str, value: Any, options: Sequence[str]) -> None:
    """`value` must be one of the strings `options`."""
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be one of the strings {tuple(options)}, got {value!r}."
            + _static_hint(name, value)
        )
    if value not in options:
        raise ValueError(
            f"`{name}` must be one of {tuple(options)}, got {value!r}."
            + _static_hint(name, value)
        )


def check_int(name: str, value: Any, minimum: int) -> None:
    """`value` must be a Python int (not a bool, not an array) `≥ minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be a Python int, got {value!r}." + _static_hint(name, value)
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}, got {value}.")


def check_decay(name: str, value: Any, *, allow_one: bool = False) -> None:
    """A decay rate: a float in `[0, 1)` (`[0, 1]` with `allow_one`), or an array
    (a traced hyperparameter, as `optax.inject_hyperparams` passes it)."""
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, int | float | jax.Array):
        raise TypeError(f"`{name}` must be a float in {interval}, got {value!r}.")
    if isinstance(value, int | float) and not (
        0 <= value <= 1 if allow_one else 0 <= value < 1
    ):
        raise ValueError(f"`{name}` must lie in {interval}, got {value}.")


def check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | jax.Array):
        raise TypeError(f"`{name}` must be a non-negative float, got {value!r}.")
    if isinstance(value, int | float) and value < 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}.")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be a Python bool, got {value!r}."
            + _static_hint(name, value)
        )


def check_record_options(has_aux: Any, aux_init: Any, skip_nonfinite: Any) -> None:
    """The options of what an optax transform records in its state. `aux_init`
    fixes the structure of the `aux` the state keeps: required with
    `has_aux=True`, rejected otherwise."""
    check_bool("skip_nonfinite", skip_nonfinite)
    check_bool("has_aux", has_aux)
    if has_aux and aux_init is None:
        raise ValueError(
            "`has_aux=True` needs `aux_init`: the initial `aux` kept in the state, "
            "with the structure, shapes and dtypes `value_fn` returns (the state's "
            "structure is fixed at `init`), e.g. the model's initial `eqx.nn.State`."
        )
    if not has_aux and aux_init is not None:
        raise ValueError(
            "`aux_init` is the initial auxiliary output of `value_fn`; pass "
            "`has_aux=True` too, with a `value_fn` returning `(loss, aux)`."
        )


def check_derivative_options(derivative: Any, finite_difference_step: Any) -> None:
    """`derivative` is `"jvp"` or `"central"`; the step is a positive float (or an
    array) and applies to central differences only. An array step is not compared
    with the default: `optax.inject_hyperparams` turns the default into one."""
    check_option("derivative", derivative, DERIVATIVES)
    step, name = finite_difference_step, "finite_difference_step"
    if isinstance(step, bool) or not isinstance(step, int | float | jax.Array):
        raise TypeError(f"`{name}` must be a positive float, got {step!r}.")
    if isinstance(step, int | float) and not step > 0:
        raise ValueError(f"`{name}` must be positive, got {step}.")
    if derivative == "jvp" and (
        isinstance(step, int | float) and step != FINITE_DIFFERENCE_STEP
    ):
        raise ValueError(
            f"`{name}` applies to `derivative='central'` only; with the default "
            "`derivative='jvp'` leave it unset."
        )


class DerivativeOptions(NamedTuple):
    """How an optax transform takes its directional derivatives: the keywords
    `derivative`, `finite_difference_step` and `chunk_size` of `value_and_estimate`
    and `run_tangents` (pass them as `**options._asdict()`)."""

    derivative: str
    finite_difference_step: ScalarLike
    chunk_size: int | None = None


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)


def derivative_options(
    derivative: Any, finite_difference_step: Any, chunk_size: Any = None
) -> DerivativeOptions:
    check_derivative_options(derivative, finite_difference_step)
    check_chunk_size(chunk_size)
    return DerivativeOptions(derivative, finite_difference_step, chunk_size)


def check_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {type(value).__name__}.")


def check_keywords(function: str, options: Mapping[str, Any], accepted: Any) -> None:
    """`options`, passed to `function` as `**options: Unpack[accepted]` (a
    `TypedDict`), holds its required keys and no other: at run time, what Python
    checks for an explicit signature (type checkers check the `TypedDict` itself)."""
    known = list(accepted.__annotations__)
    for name in options:
        if name not in known:
            raise TypeError(
                f"{function}() got an unexpected keyword argument {name!r}; besides "
                f"those named in its signature, it takes {', '.join(known)}."
            )
    for name in sorted(accepted.__required_keys__ - options.keys()):
        raise TypeError(f"{function}() missing required keyword argument {name!r}.")


def check_random_options(num_directions: Any, sampler: Any, mode: Any) -> None:
    check_int("num_directions", num_directions, 1)
    check_option("sampler", sampler, SAMPLERS)
    check_option("mode", mode, MODES)
    if sampler == "orthogonal" and mode == "partition":
        raise ValueError(
            "`sampler='orthogonal'` draws `num_directions` dense orthogonal directions "
            "and applies to `mode='average'`. `mode='partition'` already splits one "
            "direction into parts with disjoint supports, which are orthogonal (and "
            "sparse): use it with `sampler='rademacher'`, or keep "
            "`sampler='orthogonal'` with `mode='average'`."
        )


def legacy_key_shape() -> tuple[int, ...]:
    """The shape of a legacy key (`jax.random.PRNGKey`) of the default PRNG
    implementation: `(2,)` for threefry, `(4,)` for `"rbg"` (read when called: the
    default may be set after import)."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def as_key(key: Any, name: str = "key") -> PRNGKeyArray:
    """A typed PRNG key from any of the forms every eqx_dodge function accepts: a
    typed key (`jax.random.key`), a legacy `uint32[2]` key (`jax.random.PRNGKey`), a
    Python int seed, or a 0-d integer array seed (as `optax.inject_hyperparams` turns
    an int into), NumPy's included. Works on traced values."""
    if isinstance(key, bool):
        raise TypeError(f"`{name}` must be a PRNG key or an int seed, got {key!r}.")
    if isinstance(key, int):
        return jax.random.key(key)
    if isinstance(key, np.ndarray | np.generic):
        # `np.int64(7)`, a seed from `np.random`, a legacy key saved as NumPy: as
        # `jax.random.key` takes them.
        key = jnp.asarray(key)
    if not isinstance(key, jax.Array):
        raise TypeError(
            f"`{name}` must be a PRNG key (`jax.random.key(seed)`) or an int seed, "
            f"got {type(key).__name__}."
        )
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    elif key.dtype == jnp.uint32 and key.shape[-1:] == legacy_key_shape():
        # A legacy `jax.random.PRNGKey`: raw data of the default implementation.
        typed = jax.random.wrap_key_data(key)
    elif jnp.issubdtype(key.dtype, jnp.integer) and key.shape == ():
        typed = jax.random.key(key)
    else:
        raise TypeError(
            f"`{name}` must be a PRNG key (`jax.random.key(seed)`), a legacy "
            "`jax.random.PRNGKey`, or an int seed (a Python int or a 0-d integer "
            f"array); got an array of shape {key.shape} and dtype {key.dtype}."
        )
    if typed.shape != ():
        raise ValueError(
            f"`{name}` must be a single PRNG key, got a key array of shape "
            f"{typed.shape}."
        )
    return typed


def check_one_source(key: Any, direction: Any) -> None:
    """Exactly one of a PRNG `key` (random directions) or a candidate `direction`."""
    if (key is None) == (direction is None):
        raise ValueError(
            "Pass exactly one of `key` (a PRNG key, for random directions) or "
            "`direction` (a candidate direction PyTree); got "
            + ("neither." if key is None else "both.")
        )


def shapes_random_directions(mode: str, sampler: str) -> bool:
    """Whether `mode` or `sampler`, options only random directions use, is set to
    something other than its default."""
    return mode != "average" or sampler != "rademacher"


def check_candidate_options(
    num_directions: int, mode: str, sampler: str = "rademacher"
) -> None:
    """A candidate `direction` is one direction: `num_directions`, `mode` and
    `sampler` (which shape random directions) must stay at their defaults."""
    if num_directions != 1 or shapes_random_directions(mode, sampler):
        raise ValueError(
            "`num_directions`, `mode` and `sampler` apply to random directions only; "
            "a candidate `direction` is one direction: leave them at their defaults "
            "(1, 'average' and 'rademacher'). To add random exploration directions "
            "to a candidate, use `eqx_dodge.dodge(source='updates', "
            "num_directions=...)`."
        )


def check_scalar_loss(value: Any, name: str, has_aux: bool = False) -> jax.Array:
    """`value` as a floating-point 0-d array, or a `TypeError` naming `name`."""
    if (
        not isinstance(value, jax.Array | float)
        or jnp.shape(value) != ()
        or not jnp.issubdtype(jnp.result_type(value), jnp.floating)
    ):
        where = " as the first element of its `(value, aux)` pair" if has_aux else ""
        got = type(value).__name__
        if isinstance(value, jax.Array | float | int | np.ndarray | np.generic):
            got += f" of shape {jnp.shape(value)} and dtype {jnp.result_type(value)}"
        hint = (
            " If it returns `(loss, aux)`, pass `has_aux=True`."
            if not has_aux and isinstance(value, tuple | list) and len(value) == 2
            else " A NumPy value is a constant to JAX: compute the loss with "
            "`jax.numpy`."
            if isinstance(value, np.ndarray | np.generic)
            else ""
        )
        raise TypeError(
            f"`{name}` must return the loss as a floating-point scalar (a float or a "
            f"0-d floating array){where}, got {got}.{hint}"
        )
    return jnp.asarray(value)


def described(value: Any) -> str:
    """What `value` is, for an error message: an array's shape, a tuple's length."""
    if isinstance(value, jax.Array):
        return f"an array of shape {jnp.shape(value)}"
    if isinstance(value, tuple):
        return f"a tuple of length {len(value)}"
    return f"a {type(value).__name__}"


def loss_and_aux(out: Any, name: str, has_aux: bool) -> tuple[jax.Array, Any]:
    """`(loss, aux)` from what `name` returned (`aux` is `None` unless `has_aux`),
    the loss checked by `check_scalar_loss`."""
    if not has_aux:
        return check_scalar_loss(out, name), None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"With `has_aux=True`, `{name}` must return a pair `(loss, aux)`, got "
            f"{described(out)}; pass `has_aux=False` if it returns the loss alone."
        )
    return check_scalar_loss(out[0], name, has_aux), out[1]


def first_argument(args: tuple, kwargs: dict, names: str) -> None:
    """The differentiated argument must come by position, as in `eqx.filter_grad`."""
    if len(args) == 0:
        raise TypeError(
            f"Functions wrapped with `eqx_dodge.{names}` must be given their first "
            "argument by position, not by keyword "
            + (f"(got only keywords {sorted(kwargs)}). " if kwargs else ". ")
            + "This first argument is the one that is differentiated."
        )


def stored_key(key: Any, needed: bool, why: str) -> tuple[jax.Array | None, Any]:
    """`(raw key data, key implementation)` for an optax transform's state, or
    `(None, None)` when no random direction is drawn. Raw data rather than a typed
    key, so that `eqx.tree_serialise_leaves` can save the state."""
    if not needed:
        if key is not None:
            raise ValueError(
                f"`key` is unused {why}; pass `key=None`, or ask for random "
                "directions with `num_directions`."
            )
        return None, None
    if key is None:
        raise ValueError(
            f"`key` is required {why}: pass a PRNG key, e.g. `key=jax.random.key(0)`, "
            "or an int seed."
        )
    typed = as_key(key)
    return jax.random.key_data(typed), jax.random.key_impl(typed)


def split_stored_key(data: jax.Array, impl: Any) -> tuple[jax.Array, PRNGKeyArray]:
    """Splits a stored key: `(raw data of the next state's key, key for this step)`."""
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(data, impl=impl))
    return jax.random.key_data(next_key), step_key
