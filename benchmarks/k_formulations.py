"""Which formulation of k directional derivatives is fastest on this machine?

All formulations compute the same `average`-mode estimate `(1/k) Σ_j (g·u_j) u_j` with
direction `j` drawn from `jax.random.split(key, k)[j]`, as the library does:

- `vmap_jvp`: `jax.vmap` of `jax.jvp` over k stacked tangents (the primal is not
    batched, so XLA computes it once and folds the k tangents into the matmuls' free
    dimensions);
- `linearize_vmap`: `jax.linearize` once, then `vmap` of the linear map over all k
    tangents (the residuals of the forward pass are stored, as in reverse mode);
- `linearize_scan_c`: `jax.linearize` once, then a `lax.scan` over k/c chunks of c
    directions, drawing each chunk's tangents inside the loop and accumulating the
    estimate, so only c tangents are alive at a time;
- `jvp_scan_c`: the same chunks without `linearize`: each chunk re-runs the forward
    pass (memory stays that of a forward pass);
- `jvp_unrolled_c`: `jvp_scan_c` fully unrolled (`lax.scan(..., unroll=True)`), a
    straight-line program without a loop: XLA:CPU runs convolutions inside a
    while loop several times slower than outside one;
- `vmap_jvp_given_tangents`: `vmap_jvp` with the tangents passed in, i.e. without the
    cost of drawing them (a lower bound on what any sampler can reach).

The output is the time per estimate and its ratio to `vmap_jvp`, per model and k.
What the library does with k > 4 on CPU follows from it: `jvp_scan_4` (chunks of
`CPU_CHUNK` directions, at most `MAX_CHUNKS` of them: `Layout.chunk_size` in
`eqx_dodge/_tangents.py`), unrolled by hand when the loss contains a convolution
(`run_tangents` in `eqx_dodge/_estimator.py`).

Run: `python benchmarks/k_formulations.py [--quick | --full] [--out DIR]` (`--full`
adds k = 64 to the default k = 16; `--chunk C` and `--num-directions K ...` change the
chunk and the k of either, and `--chunk C` writes `k_formulations_chunkC.json`).
"""

import functools as ft
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import _common
import _models
import equinox as eqx
import jax
import jax.numpy as jnp

from eqx_dodge._directions import sample_direction


def random_directions(key, params, k):
    """k Rademacher directions stacked along a new leading axis, direction `j` from
    `jax.random.split(key, k)[j]`, as the library draws them."""
    keys = jax.random.split(key, k)
    return jax.vmap(lambda kk: sample_direction(kk, params, "rademacher"))(keys)


def _tensordot(weights, tangents):
    return jax.tree.map(lambda u: jnp.tensordot(weights, u, axes=1), tangents)


def vmap_jvp(loss, params, key, k):
    tangents = random_directions(key, params, k)
    value, derivatives = jax.vmap(
        lambda u: jax.jvp(loss, (params,), (u,)), out_axes=(None, 0)
    )(tangents)
    return value, _tensordot(derivatives / k, tangents)


def vmap_jvp_given_tangents(loss, params, tangents, k):
    value, derivatives = jax.vmap(
        lambda u: jax.jvp(loss, (params,), (u,)), out_axes=(None, 0)
    )(tangents)
    return value, _tensordot(derivatives / k, tangents)


def linearize_vmap(loss, params, key, k):
    tangents = random_directions(key, params, k)
    value, linear = jax.linearize(loss, params)
    return value, _tensordot(jax.vmap(linear)(tangents) / k, tangents)


def _scan_chunks(params, key, k, chunk, derivatives_of, unroll=1):
    keys = jax.random.split(key, k).reshape(k // chunk, chunk)

    def body(estimate, chunk_keys):
        tangents = jax.vmap(lambda kk: sample_direction(kk, params, "rademacher"))(
            chunk_keys
        )
        value, derivatives = derivatives_of(tangents)
        update = _tensordot(derivatives / k, tangents)
        return jax.tree.map(jnp.add, estimate, update), value

    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(body, zeros, keys, unroll=unroll)


def linearize_scan(loss, params, key, k, chunk):
    value, linear = jax.linearize(loss, params)
    estimate, _ = _scan_chunks(
        params, key, k, chunk, lambda t: (value, jax.vmap(linear)(t))
    )
    return value, estimate


def jvp_scan(loss, params, key, k, chunk, unroll=1):
    def derivatives_of(tangents):
        return jax.vmap(lambda u: jax.jvp(loss, (params,), (u,)), out_axes=(None, 0))(
            tangents
        )

    estimate, values = _scan_chunks(params, key, k, chunk, derivatives_of, unroll)
    return values[0], estimate


def formulations(chunk: int) -> dict[str, Callable]:
    return {
        "vmap_jvp": vmap_jvp,
        "linearize_vmap": linearize_vmap,
        f"linearize_scan_{chunk}": ft.partial(linearize_scan, chunk=chunk),
        f"jvp_scan_{chunk}": ft.partial(jvp_scan, chunk=chunk),
        f"jvp_unrolled_{chunk}": ft.partial(jvp_scan, chunk=chunk, unroll=True),
    }


def run_problem(
    problem: _models.Problem,
    ks: Sequence[int],
    chunk: int,
    repeats: int,
    min_time: float,
) -> dict[str, Any]:
    params, static = eqx.partition(problem.model, eqx.is_inexact_array)

    def loss(p):
        return problem.loss(eqx.combine(p, static), problem.x, problem.y)

    key = jax.random.key(2)
    out: dict[str, Any] = {}
    for k in ks:
        print(f"[{problem.name}] k={k}", file=sys.stderr)
        calls, memory = {}, {}
        for name, formulation in formulations(min(chunk, k)).items():
            fun = jax.jit(ft.partial(formulation, loss, k=k))
            compiled = fun.lower(params, key).compile()
            calls[name] = ft.partial(compiled, params, key)
            memory[name] = _common.memory_analysis(compiled)
        # Compiled: eagerly, the sampler's hash would compile op by op.
        tangents = jax.jit(random_directions, static_argnums=2)(key, params, k)
        fun = jax.jit(ft.partial(vmap_jvp_given_tangents, loss, k=k))
        compiled = fun.lower(params, tangents).compile()
        calls["vmap_jvp_given_tangents"] = ft.partial(compiled, params, tangents)
        memory["vmap_jvp_given_tangents"] = _common.memory_analysis(compiled)
        times = _common.time_interleaved(calls, repeats=repeats, min_time=min_time)
        out[str(k)] = {
            "seconds": {n: _common.summarize(t) for n, t in times.items()},
            "over_vmap_jvp": {
                n: _common.summarize(_common.ratio_samples(t, times["vmap_jvp"]))
                for n, t in times.items()
            },
            "peak_bytes": {n: m and m["peak_bytes"] for n, m in memory.items()},
        }
    return out


def plot(results: dict[str, Any], out_dir: Any, name: str) -> None:
    fig, axes = _common.new_figure(
        1, len(results), figsize=(5 * len(results), 4), squeeze=False
    )
    for ax, (model, data) in zip(axes[0], results.items()):
        ks = [int(k) for k in data]
        for variant in data[str(ks[0])]["over_vmap_jvp"]:
            ax.plot(
                ks,
                [data[str(k)]["over_vmap_jvp"][variant]["median"] for k in ks],
                marker="o",
                label=re.sub(r"_\d+$", "_c", variant),
            )
        ax.axhline(1.0, color="grey", lw=1, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of directions k")
        ax.set_ylabel("time / time(vmap_jvp)  (median)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    _common.save_figure(fig, out_dir, name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    chunk_help = "directions per chunk of the chunked formulations (default: 4)"
    ks_help = "the numbers of directions to time (instead of --quick/--full's)"
    args = _common.parse_args(
        __doc__,
        argv,
        flags=[("--full", "k = 16 and 64 (default: k = 16 only)")],
        options=[
            ("--chunk", {"type": int, "default": None, "help": chunk_help}),
            ("--num-directions", {"type": int, "nargs": "+", "help": ks_help}),
        ],
    )
    if args.quick:
        ks, chunk, repeats, min_time = [4], 2, 5, 0.02
    else:
        # k = 64 ranked the formulations as k = 16 does (every ratio within 0.5 of
        # k = 16's, measured 2026-11-28) at more than twice the time: `--full` only.
        ks, chunk, repeats, min_time = [16, 64] if args.full else [16], 4, 7, 0.05
    ks, chunk = args.num_directions or ks, args.chunk or chunk
    # A chunk of one's own gets a file of its own, beside the default study's.
    output = "k_formulations" if args.chunk is None else f"k_formulations_chunk{chunk}"
    if any(k % min(chunk, k) for k in ks):
        raise ValueError(f"Every k of {ks} must be a multiple of the chunk, {chunk}.")
    problems = _models.make_problems(jax.random.key(0), quick=args.quick)
    if args.quick:
        problems = problems[:1]
    results = {p.name: run_problem(p, ks, chunk, repeats, min_time) for p in problems}
    _common.write_json(
        args.out,
        output,
        {
            "config": {
                "quick": args.quick,
                "full": args.full,
                "num_directions": ks,
                "chunk": chunk,
                "repeats": repeats,
                "min_seconds_per_repeat": min_time,
            },
            "results": results,
        },
    )
    plot(results, args.out, output)
    for name, data in results.items():
        for k, entry in data.items():
            print(
                f"{name:5s} k={k:>3s} "
                + " ".join(
                    f"{n}:{v['median']:.2f}" for n, v in entry["over_vmap_jvp"].items()
                )
            )
    return results


if __name__ == "__main__":
    main()
