"""Peak memory against the number of directions: the backend's default chunks and
`chunk_size=4`, next to backprop with and without rematerialisation.

For each model of `_models.py` (MLP, conv net, LSTM), XLA's compiled peak
(`peak_bytes` = arguments + outputs + temporaries − aliased; compiled, not run) of

- `filter_dodge(loss, key=key, num_directions=k)`, the backend's default: chunks of
    at least 4 directions on CPU, all k in one `vmap` on other backends;
- the same with `chunk_size=4`: four directions' tangents alive at a time on any
    backend;
- `eqx.filter_grad` of the loss, plain and rematerialised (`_models`' `remat_loss`).

The goal (the memory issue's): peak(k) ≤ peak(4) + one parameter-sized buffer for
every k ≥ 4, on every backend, when the chunks are bounded.
`growth_in_parameter_buffers` is max over k ≥ 4 of peak(k) − peak(4), in units of
the parameters' bytes, per model and setting (≤ 1 meets the goal). Nothing is
timed: the compiled peak does not depend on the load, and
`benchmarks/k_formulations.py` times the chunks.

Run: `python benchmarks/chunk_memory.py [--quick] [--out DIR]`.
"""

import sys
from collections.abc import Sequence
from typing import Any

import _common
import _models
import equinox as eqx
import jax

import eqx_dodge


CHUNK = 4


def compiled_peak(fun: Any, *args: Any) -> int | None:
    analysis = _common.memory_analysis(eqx.filter_jit(fun).lower(*args).compile())
    return None if analysis is None else analysis["peak_bytes"]


def run_problem(problem: _models.Problem, ks: Sequence[int]) -> dict[str, Any]:
    model, x, y = problem.model, problem.x, problem.y
    print(f"[{problem.name}] compiling", file=sys.stderr)

    def dodge(num_directions: int, chunk_size: int | None):
        return eqx_dodge.filter_dodge(
            problem.loss, key=0, num_directions=num_directions, chunk_size=chunk_size
        )

    peaks = {
        setting: {str(k): compiled_peak(dodge(k, size), model, x, y) for k in ks}
        for setting, size in (("default", None), (f"chunk_size_{CHUNK}", CHUNK))
    }
    parameters = sum(
        leaf.nbytes for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    reference = str(min(k for k in ks if k >= CHUNK))

    def growth(by_k: dict[str, int | None]) -> float | None:
        """How far the peak rises above peak(4) for k ≥ 4, in parameter buffers."""
        above = [p for k, p in by_k.items() if int(k) >= CHUNK]
        base = by_k[reference]
        if base is None or any(p is None for p in above):
            return None
        return (max(p for p in above if p is not None) - base) / parameters

    growths = {setting: growth(by_k) for setting, by_k in peaks.items()}
    return {
        "description": problem.description,
        "parameter_bytes": parameters,
        "peak_bytes": peaks,
        "growth_in_parameter_buffers": growths,
        "grad_peak_bytes": compiled_peak(eqx.filter_grad(problem.loss), model, x, y),
        "grad_remat_peak_bytes": compiled_peak(
            eqx.filter_grad(problem.remat_loss), model, x, y
        ),
    }


def plot(results: dict[str, Any], out_dir: Any) -> None:
    fig, axes = _common.new_figure(
        1, len(results), figsize=(5 * len(results), 4), squeeze=False
    )
    for ax, (model, result) in zip(axes[0], results.items()):
        for setting, by_k in result["peak_bytes"].items():
            ks = [int(k) for k, peak in by_k.items() if peak is not None]
            mib = [peak / 2**20 for peak in by_k.values() if peak is not None]
            ax.plot(ks, mib, marker="o", label=f"filter_dodge, {setting}")
        for name, style in (("grad", "--"), ("grad_remat", ":")):
            peak = result[f"{name}_peak_bytes"]
            if peak is not None:
                ax.axhline(peak / 2**20, color="grey", ls=style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of directions k")
        ax.set_ylabel("XLA compiled peak (MiB)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    _common.save_figure(fig, out_dir, "chunk_memory")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv)
    ks = [1, 4, 8] if args.quick else [1, 4, 16, 64]
    problems = _models.make_problems(jax.random.key(0), quick=args.quick)
    if args.quick:
        problems = problems[:1]
    results = {p.name: run_problem(p, ks) for p in problems}
    _common.write_json(
        args.out,
        "chunk_memory",
        {
            "config": {"quick": args.quick, "num_directions": ks, "chunk": CHUNK},
            "results": results,
        },
    )
    plot(results, args.out)
    for name, result in results.items():
        print(
            f"{name:5s} "
            + "  ".join(
                f"{setting}: "
                + " ".join(f"{p / 2**20:.1f}" for p in by_k.values() if p is not None)
                + f" MiB (growth {result['growth_in_parameter_buffers'][setting]})"
                for setting, by_k in result["peak_bytes"].items()
            )
        )
    return results


if __name__ == "__main__":
    main()
