"""The DODGE estimator: directional derivatives along the tangents, a chunk at a time.

Everything here works on `primal`, the PyTree of trainable (inexact-array) leaves, and
on `fun(primal) -> (value, aux)`, a function of those leaves alone.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from ._checks import (
    DerivativeOptions,
    FINITE_DIFFERENCE_STEP,
    loss_and_aux,
    ScalarLike,
)
from ._derivatives import After, directional_derivatives
from ._directions import accumulation_dtype
from ._live import LiveSplit
from ._tangents import Layout, SINGLE_DEVICE, Tangents, weighted_sum


def value_and_aux_of(
    fun: Callable[[PyTree], Any], has_aux: bool, name: str = "fun"
) -> Callable[[PyTree], tuple[Array, Any]]:
    """`fun` as a function returning `(scalar value, aux)`, checking the value."""

    def value_and_aux(primal):
        return loss_and_aux(fun(primal), name, has_aux)

    return value_and_aux


def _primitives(fun: Callable[[PyTree], Any], primal: PyTree) -> set[str]:
    """The names of the primitives in `fun`, nested ones included."""
    names: set[str] = set()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub)

    # The aux may hold non-array leaves (a string, the model): only arrays out.
    walk(jax.make_jaxpr(lambda p: eqx.filter(fun(p), eqx.is_array))(primal).jaxpr)
    return names


def _chunks(seeds: PyTree, num: int, chunk: int) -> tuple[PyTree, PyTree]:
    """The first chunk (holding the remainder, so every later chunk is full) and the
    later chunks stacked along a new leading axis."""
    first = num - chunk * ((num - 1) // chunk)
    rest = (num - first) // chunk
    head = jax.tree.map(lambda s: s[:first], seeds)
    tail = jax.tree.map(lambda s: s[first:].reshape((rest, chunk) + s.shape[1:]), seeds)
    return head, tail


def _nan_flag(previous: PyTree) -> Array:
    """1 if anything in `previous` is NaN, else 0: a value XLA cannot fold away.
    Checked element by element in each leaf's own dtype: a float32 sum of large
    finite values (or of float64 ones beyond float32's range) overflows, and
    `inf − inf` would raise the flag for finite inputs, which then shifts the
    seeds of the chunks after it."""
    flags = [jnp.any(jnp.isnan(x)) for x in jax.tree.leaves(previous)]
    return jnp.any(jnp.stack(flags)).astype(jnp.uint32)


def _shifted(seeds: PyTree, flag: Array) -> PyTree:
    """`seeds` with the integer `flag` mixed in (a key through its raw data): the
    same seeds where `flag` is 0, and seeds that depend on `flag` for XLA."""

    def shift(seed):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(seed) ^ flag.astype(jnp.uint32)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(seed))
        return seed + flag.astype(seed.dtype)

    return jax.tree.map(shift, seeds)


def _moved(primal: PyTree, flag: Array) -> PyTree:
    """`primal` scaled by `1 + flag`: itself, exactly, where `flag` is 0, and a
    value XLA cannot take for a constant."""
    scale = 1 + flag.astype(jnp.float32)
    return jax.tree.map(lambda p: p * scale.astype(p.dtype), primal)


def _first_primal(primal: PyTree, seeds: PyTree) -> PyTree:
    """The primal the first unrolled chunk evaluates at: `primal` itself, made to
    depend on the chunk's `seeds`. XLA:CPU's default (concurrency-optimised)
    scheduler runs a forward pass on bare arguments ahead of its tangents and keeps
    every layer's activations alive; on one that depends on the seeds it does not
    (an 8-layer conv net at k = 4: 47 MiB against 93; backprop 52). The order it
    loses is the faster one: with one direction, whose tangent holds little, the
    move would cost 30 % more time on `step_cost`'s conv net to save a tenth of
    the memory, so one direction keeps the bare primal."""
    data = [
        jax.random.key_data(s) if jnp.issubdtype(s.dtype, jax.dtypes.prng_key) else s
        for s in jax.tree.leaves(seeds)
    ]
    return _moved(primal, _nan_flag([d.astype(jnp.float32) for d in data]))


def _after(
    seeds: PyTree, primal: PyTree, previous: PyTree
) -> tuple[PyTree, PyTree, After]:
    """`seeds` and `primal`, made to depend on what the chunks before computed
    (`previous`: their derivatives and sum), so that XLA runs unrolled chunks one
    after the other and never holds two chunks' tangents at once
    (`optimization_barrier` does not keep them apart), and a false that depends
    on it too, for the arrays the loss closes over (`_derivatives.After`). The
    seeds change only if something before is NaN, and then the estimate is NaN
    anyway; the primal and the data never do, so the loss sees them as given.

    The primal depends on it too so that XLA does not merge the chunks' forward
    passes into one: a merged forward pass keeps every layer's activations alive
    until the last chunk, as backpropagation does (k = 8 on an 8-layer conv net:
    139 MiB against 93 for k = 4). Each chunk recomputes its forward pass, as the
    chunks of a loop do: 13 % more time at k = 64 on a 2-layer conv net."""
    flag = _nan_flag(previous)
    zero = flag > 1  # the flag is 0 or 1: a false that depends on it
    return _shifted(seeds, flag), _moved(primal, zero), After(zero)


def _loop_over_chunks(
    body: Callable, total: PyTree, tail: PyTree, previous: PyTree
) -> tuple[PyTree, Array]:
    """`jax.lax.scan(body, total, tail)` as a `while_loop` whose trip count XLA
    cannot know: the number of chunks, plus one if something in `previous` is NaN
    (the estimate is NaN then anyway). XLA inlines a loop it knows runs once, and
    the inlined chunk then shares the first chunk's forward pass and overlaps it in
    memory (5 to 8 directions in chunks of 4 needed one more chunk's memory than 12).
    """
    rest = jax.tree.leaves(tail)[0].shape[0]
    count = rest + _nan_flag(previous).astype(jnp.int32)

    def seeds_at(i):
        # The seeds depend on the loop counter itself, not only through the clamped
        # index, so that XLA cannot hoist one chunk's tangents out of the loop (it
        # does when there is one chunk to index).
        index = jnp.minimum(i, rest - 1)
        return _shifted(jax.tree.map(lambda s: s[index], tail), i >= rest)

    out_shape = jax.eval_shape(body, total, seeds_at(jnp.int32(0)))[1]
    derivatives = jnp.zeros((rest, *out_shape.shape), out_shape.dtype)

    def step(state):
        i, total, derivatives = state
        # The loss's integer data (its labels) depend on the counter too, for the
        # same reason (`_derivatives.After`); `i ≤ rest` in the loop, so `i > rest`
        # is false.
        after = After(i > rest, floats=False)
        total, chunk_derivatives = body(total, seeds_at(i), after=after)
        index = jnp.minimum(i, rest - 1)
        return i + 1, total, derivatives.at[index].set(chunk_derivatives)

    _, total, derivatives = jax.lax.while_loop(
        lambda state: state[0] < count, step, (jnp.int32(0), total, derivatives)
    )
    return total, derivatives


def run_tangents(
    value_and_aux: Callable[[PyTree], tuple[Array, Any]],
    primal: PyTree,
    tangents: Tangents,
    layout: Layout = SINGLE_DEVICE,
    *,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> tuple[Scalar, Array, Any, PyTree]:
    """The value, the derivatives along every tangent, the aux, and the estimate.

    The tangents are drawn and differentiated a chunk at a time (`chunk_size` of
    them, by default `Layout.chunk_size`'s rule for the backend);
    the seeds are split once and scanned over, so no key is used twice. The
    derivatives come from `jax.jvp` or, with `derivative="central"`, from central
    differences with step `finite_difference_step` (`_derivatives.py`).
    """
    num = tangents.num
    if not jax.tree.leaves(primal):
        # Nothing to differentiate (e.g. a method whose instance holds no arrays):
        # the estimate is the empty tree, as `eqx.filter_grad` returns.
        value, aux = value_and_aux(primal)
        return value, jnp.zeros((num,), value.dtype), aux, primal
    chunk = layout.chunk_size(num) if chunk_size is None else min(chunk_size, num)
    # XLA:CPU runs convolutions inside a loop several times slower, so a loss with
    # one gets its chunks unrolled by hand (`lax.scan(unroll=True)` still emits a
    # loop), each at a primal of its own.
    unrolled = (
        num > 1
        and jax.default_backend() == "cpu"
        and "conv_general_dilated" in _primitives(value_and_aux, primal)
    )
    accumulate = tangents.accumulates

    def run(seeds, at=primal, after=None):
        chunk_tangents = tangents.draw(seeds)
        value, derivatives, aux = directional_derivatives(
            value_and_aux, at, chunk_tangents, derivative, finite_difference_step, after
        )
        # In at least float32, and in float64 for float64 losses (`jax_enable_x64`).
        wide = accumulation_dtype(derivatives)
        coefficients = tangents.weights(seeds).astype(wide) * derivatives.astype(wide)
        total = None
        if accumulate and num > 1:
            # The sum draws the tangents again (XLA fuses the sampler into each use
            # anyway), from seeds that depend on the derivatives: otherwise XLA:CPU's
            # default scheduler materialises both uses' copies before the jvp, twice
            # the chunk's memory (784-2048-2048-10 MLP, k = 4: 186 MiB, now 97). One
            # tangent's copies gain nothing from it.
            again = tangents.draw(_shifted(seeds, _nan_flag(derivatives)))
            total = weighted_sum(again, coefficients)
        elif accumulate:
            total = weighted_sum(chunk_tangents, coefficients)
        return value, derivatives, aux, total

    head, tail = _chunks(tangents.seeds, num, chunk)
    first = _first_primal(primal, head) if unrolled else primal
    value, derivatives, aux, total = run(head, first)
    if num > chunk:

        def body(total, seeds, at=primal, after=None):
            _, derivatives, _, part = run(seeds, at, after)
            return jax.tree.map(jnp.add, total, part), derivatives

        if unrolled:
            more = [derivatives]
            for i in range(jax.tree.leaves(tail)[0].shape[0]):
                seeds, at, after = _after(
                    jax.tree.map(lambda s: s[i], tail), primal, (more[-1], total)
                )
                total, chunk_derivatives = body(total, seeds, at, after)
                more.append(chunk_derivatives)
            rest = jnp.stack(more[1:])
        else:
            total, rest = _loop_over_chunks(body, total, tail, (derivatives, total))
        derivatives = jnp.concatenate([derivatives, rest.reshape(-1)])
    if value is None:
        # Central differences: the value and aux of one unperturbed forward pass.
        value, aux = value_and_aux(primal)
    estimate = tangents.gather(derivatives) if total is None else total
    estimate = jax.tree.map(lambda e, p: e.astype(p.dtype), estimate, primal)
    return value, derivatives, aux, estimate


def value_and_estimate(
    fun: Callable[[PyTree], Any],
    primal: PyTree,
    tangents: Tangents,
    *,
    has_aux: bool,
    layout: Layout = SINGLE_DEVICE,
    derivative: str = "jvp",
    finite_difference_step: ScalarLike = FINITE_DIFFERENCE_STEP,
    chunk_size: int | None = None,
) -> tuple[Scalar, PyTree, Any]:
    """Evaluates `fun(primal)` and its DODGE estimate along `tangents` in one forward
    pass (`derivative="jvp"`) or `2k + 1` of them (`"central"`). Returns
    `(value, estimate, aux)`; the estimate is shaped like `primal`."""
    value, _, aux, estimate = run_tangents(
        value_and_aux_of(fun, has_aux),
        primal,
        tangents,
        layout,
        derivative=derivative,
        finite_difference_step=finite_difference_step,
        chunk_size=chunk_size,
    )
    return value, estimate, aux


def live_estimate(
    fun, split: LiveSplit, tangents: Tangents, derivatives: DerivativeOptions
) -> tuple[Array, PyTree, Any]:
    """`(value, estimate, aux)` of `fun(primal) = (value, aux)`: the estimate along
    `tangents` of the live leaves, zero at the dead ones."""
    value, estimate, aux = value_and_estimate(
        split.of(fun), split.live, tangents, has_aux=True, **derivatives._asdict()
    )
    return value, split.widen(estimate), aux
