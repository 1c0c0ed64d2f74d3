"""Scaling out: bytes all-reduced per data-parallel step, DODGE vs backpropagation.

For models of p = 10⁴ … 10⁸ parameters (a one-hidden-layer MLP whose width sets p),
we compile one data-parallel training step on 8 devices (simulated on the CPU with
`--xla_force_host_platform_device_count=8`) and read every all-reduce in the compiled
HLO:

- DODGE (`eqx_dodge.sharded_value_and_dodge`, k directions): the loss and the k
  directional derivatives, k + 1 floats whatever p is;
- gradient data parallelism (`eqx.filter_value_and_grad` under `jax.jit` with the
  batch sharded over the data axis): the loss and the p-float gradient.

The models are abstract (`eqx.filter_eval_shape` and `jax.ShapeDtypeStruct`), so even
p = 10⁸ is compiled without being materialised. For the sizes that fit in memory we
also time the two steps (SGD update included) on the simulated devices. All 8
"devices" share the host's CPU cores, so those times measure compute, not
communication; they are no guide to a real cluster's step time.

Run: `python benchmarks/scaling.py [--quick] [--out DIR]`.
"""

import os


# The simulated devices must be requested before JAX starts. Eight device threads
# share the cores with whatever else runs (`make bench --quick` runs two scripts at
# once), so an all-reduce may wait longer than XLA:CPU's default 40 s before it aborts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8"
        + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    ).strip()

import functools as ft
import math
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import _common  # imports JAX, so it too must come after XLA_FLAGS is set
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import eqx_dodge  # noqa: E402  (after XLA_FLAGS)


NUM_DEVICES = 8
IN_FEATURES = 1000
OUT_FEATURES = 10
PER_DEVICE_BATCH = 4
NUM_DIRECTIONS = 8

_OTHERS = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_ALL_REDUCE = re.compile(r"=\s*(.*?)\s+all-reduce(?:-start)?\(")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_ITEMSIZE |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def all_reduce_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(dtype, shape)` of every array all-reduced by a compiled HLO module.

    A combined all-reduce of a tuple contributes one entry per tuple element.
    """
    shapes = []
    for line in hlo_text.splitlines():
        match = _ALL_REDUCE.search(line)
        if match is None:
            continue
        for dtype, dims in _ARRAY.findall(match.group(1)):
            shapes.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return shapes


def other_collectives(hlo_text: str) -> list[str]:
    """The HLO lines holding a collective other than an all-reduce."""
    return [
        line.strip()
        for line in hlo_text.splitlines()
        if any(f" {name}(" in line or f" {name}-start(" in line for name in _OTHERS)
    ]


def all_reduce_bytes(hlo_text: str) -> int:
    """The payload of all the all-reduces of a compiled HLO module, in bytes.

    This is what each device contributes; a ring all-reduce sends about twice this
    much per device over the network.
    """
    return sum(
        math.prod(shape) * _ITEMSIZE[dtype]
        for dtype, shape in all_reduce_shapes(hlo_text)
    )


def hlo_text(compiled: jax.stages.Compiled) -> str:
    """The optimised HLO module of a compiled function, as text."""
    text = compiled.as_text()
    if text is None:
        raise RuntimeError("This backend does not expose the compiled HLO.")
    return text


def compiled_text(fun: Callable, *args: Any) -> str:
    """The optimised HLO of `fun(*args)` (args may be `jax.ShapeDtypeStruct`s)."""
    return hlo_text(jax.jit(fun).lower(*args).compile())


def width_for(num_parameters: int) -> int:
    per_unit = IN_FEATURES + 1 + OUT_FEATURES
    return max(1, round((num_parameters - OUT_FEATURES) / per_unit))


def make_model(width: int, key: jax.Array) -> eqx.nn.MLP:
    return eqx.nn.MLP(IN_FEATURES, OUT_FEATURES, width, depth=1, key=key)


def loss_fn(model: eqx.nn.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_steps(mesh, static, optimizer):
    """The two training steps, as functions of `(params, opt_state, x, y, key)`."""

    def dodge_step(params, opt_state, x, y, key):
        model = eqx.combine(params, static)
        loss, estimate = eqx_dodge.sharded_value_and_dodge(
            loss_fn, mesh=mesh, key=key, num_directions=NUM_DIRECTIONS
        )(model, x, y)
        updates, opt_state = optimizer.update(estimate, opt_state, model)
        new_params = eqx.filter(eqx.apply_updates(model, updates), eqx.is_array)
        return new_params, opt_state, loss

    def gradient_step(params, opt_state, x, y, key):
        del key
        model = eqx.combine(params, static)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        new_params = eqx.filter(eqx.apply_updates(model, updates), eqx.is_array)
        return new_params, opt_state, loss

    return {"dodge": dodge_step, "gradient": gradient_step}


def _abstract(tree, sharding):
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
    )


def measure(num_parameters: int, timed: bool, repeats: int) -> dict[str, Any]:
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    width = width_for(num_parameters)
    abstract_model = eqx.filter_eval_shape(make_model, width, jax.random.key(0))
    params, static = eqx.partition(
        abstract_model, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)
    )
    p = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    optimizer = optax.sgd(1e-3)
    opt_state = jax.eval_shape(optimizer.init, params)
    batch = NUM_DEVICES * PER_DEVICE_BATCH
    x = jax.ShapeDtypeStruct((batch, IN_FEATURES), jnp.float32, sharding=sharded)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharded)
    key = _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    steps = make_steps(mesh, static, optimizer)
    row: dict[str, Any] = {"num_parameters": p, "hidden_width": width}
    compiled = {}
    for name, step in steps.items():
        compiled[name] = (
            jax.jit(step)
            .lower(
                _abstract(params, replicated),
                _abstract(opt_state, replicated),
                x,
                y,
                key,
            )
            .compile()
        )
        text = hlo_text(compiled[name])
        row[name] = {
            "all_reduce_shapes": [
                f"{dtype}[{','.join(map(str, shape))}]"
                for dtype, shape in all_reduce_shapes(text)
            ],
            "all_reduce_bytes": all_reduce_bytes(text),
            "other_collectives": len(other_collectives(text)),
        }
    if timed:
        model = make_model(width, jax.random.key(0))
        real_params = jax.device_put(eqx.filter(model, eqx.is_array), replicated)
        real_state = jax.device_put(optimizer.init(real_params), replicated)
        data_key, label_key, step_key = jax.random.split(jax.random.key(1), 3)
        step_key = jax.device_put(step_key, replicated)
        real_x = jax.device_put(
            jax.random.normal(data_key, (batch, IN_FEATURES)), sharded
        )
        real_y = jax.device_put(
            jax.random.randint(label_key, (batch,), 0, OUT_FEATURES), sharded
        )

        # The executables compiled above for the abstract shapes run the arrays, one
        # step in flight at a time: with 8 simulated devices on 2 cores, queued steps
        # can starve XLA:CPU's all-reduce rendezvous (seen as its 40 s timeout when
        # another process loaded the cores).
        def one_step(executable):
            args = (real_params, real_state, real_x, real_y, step_key)
            return jax.block_until_ready(executable(*args))

        times = _common.time_interleaved(
            {
                name: ft.partial(one_step, executable)
                for name, executable in compiled.items()
            },
            repeats=repeats,
            min_time=0.05,
        )
        for name, samples in times.items():
            row[name]["step_seconds"] = _common.summarize(samples)
        del model, real_params, real_state
    return row


def plot(rows: list[dict[str, Any]], out_dir: pathlib.Path) -> None:
    fig, (left, right) = _common.new_figure(1, 2, figsize=(11, 4))
    ps = [row["num_parameters"] for row in rows]
    for name, marker in (("gradient", "o"), ("dodge", "s")):
        label = (
            "gradient all-reduce"
            if name == "gradient"
            else (f"DODGE, k = {NUM_DIRECTIONS}")
        )
        left.loglog(
            ps,
            [row[name]["all_reduce_bytes"] for row in rows],
            marker=marker,
            label=label,
        )
        timed = [row for row in rows if "step_seconds" in row[name]]
        if timed:
            right.loglog(
                [row["num_parameters"] for row in timed],
                [1e3 * row[name]["step_seconds"]["median"] for row in timed],
                marker=marker,
                label=label,
            )
    left.set_xlabel("parameters p")
    left.set_ylabel("bytes all-reduced per step (per device)")
    left.set_title(f"Communication, {NUM_DEVICES} devices (from compiled HLO)")
    left.legend()
    right.set_xlabel("parameters p")
    right.set_ylabel("step time (ms, median)")
    right.set_title(f"{NUM_DEVICES} simulated CPU devices (compute only)")
    right.legend()
    _common.save_figure(fig, out_dir, "scaling")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = _common.parse_args(__doc__, argv)
    if jax.device_count() < NUM_DEVICES:
        raise RuntimeError(
            f"Needs {NUM_DEVICES} devices; start Python with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={NUM_DEVICES}."
        )
    if args.quick:
        sizes, timed_up_to, repeats = [10**4, 10**5], 10**4, 5
    else:
        sizes, timed_up_to, repeats = [10**4, 10**5, 10**6, 10**7, 10**8], 10**6, 7
    rows = []
    for size in sizes:
        row = measure(size, timed=size <= timed_up_to, repeats=repeats)
        rows.append(row)
        print(_table_line(row), file=sys.stderr)
    payload = {
        "config": {
            "quick": args.quick,
            "num_devices": NUM_DEVICES,
            "model": f"MLP {IN_FEATURES}-width-{OUT_FEATURES}, one hidden layer",
            "per_device_batch": PER_DEVICE_BATCH,
            "num_directions": NUM_DIRECTIONS,
            "optimizer": "sgd",
            "timed_up_to_parameters": timed_up_to,
            "note": "step times: 8 simulated devices sharing the host's CPU cores",
        },
        "rows": rows,
    }
    _common.write_json(args.out, "scaling", payload)
    plot(rows, args.out)
    return rows


def _table_line(row: dict[str, Any]) -> str:
    def cell(name):
        entry = row[name]
        text = f"{entry['all_reduce_bytes']:>12,d} B"
        if "step_seconds" in entry:
            text += f" {1e3 * entry['step_seconds']['median']:9.2f} ms"
        return text

    p = row["num_parameters"]
    return f"p={p:>11,d}  dodge {cell('dodge')}  grad {cell('gradient')}"


if __name__ == "__main__":
    main()
