"""adam_dodge next to optax.adam on optax's own optimizer test problems.

The parabola from (−1, 10, 1) and Rosenbrock from (0, 0), 10 000 steps, the tolerance
of optax's `alias_test.py` (`rtol = atol = 3e-2` on the final parameters):

- `optax.adam(1e-1)` with the exact gradient, the reference;
- `adam_dodge` with exact estimates (`mode="partition"`, `num_directions = p`);
- `adam_dodge(source="updates")` fed the exact gradient as the candidate, and the
    same with the appendix-A step unclipped (0.1's form), to show what the clip does;
- `adam_dodge` with one random direction over a learning-rate grid and three seeds:
    the largest rate at which every seed meets the tolerance is the measured rule the
    docs quote.

Every run is one jitted `lax.scan`; also recorded: the largest step per coordinate
relative to the learning rate (Adam's bound for any input sequence is
(1 − b1)/√(1 − b2)/√(1 − b1²/b2) ≈ 7.27).

Run: `python benchmarks/adam_problems.py [--quick] [--out DIR]`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_dodge
from eqx_dodge._adam import _adam_step


TOLERANCE = 3e-2
LEARNING_RATES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
SEEDS = (0, 1, 2)
ADAM_BOUND = (1 - 0.9) / (1 - 0.999) ** 0.5 / (1 - 0.9**2 / 0.999) ** 0.5


def parabola(params):
    return jnp.sum(jnp.square(params["w"] - jnp.array([1.0, -1.0, 2.0])))


def rosenbrock(params):
    x, y = params["w"][0], params["w"][1]
    return jnp.square(1 - x) + 100 * jnp.square(y - x**2)


PROBLEMS = {
    "parabola": (parabola, [-1.0, 10.0, 1.0], [1.0, -1.0, 2.0]),
    "rosenbrock": (rosenbrock, [0.0, 0.0], [1.0, 1.0]),
}


def unclipped_updates_source(
    learning_rate: float,
) -> optax.GradientTransformationExtraArgs:
    """0.1's appendix-A step, `s·a` with `s = (g·a)/(m̂·a)` not clipped; exact
    gradients stand for the jvp (they give the same `g·a`)."""

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        count = jnp.zeros((), jnp.int32)
        # No key; the record of the last step is not kept here.
        return eqx_dodge.ScaleByAdamDodgeState(
            count, zeros, zeros, None, jnp.array(jnp.inf), None, count, count
        )

    def update_fn(updates, state, params=None, **extra):
        value_fn = extra["value_fn"]
        step, mu, nu, mu_hat, count = _adam_step(updates, state, 0.9, 0.999, 1e-8, 0.0)
        gradient = jax.grad(value_fn)(params)
        ratio = optax.tree.vdot(gradient, step) / optax.tree.vdot(mu_hat, step)
        scaled = jax.tree.map(lambda a: -learning_rate * ratio * a, step)
        return scaled, state._replace(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def run(
    optimizer: optax.GradientTransformationExtraArgs,
    loss: Callable,
    initial: Sequence[float],
    steps: int,
    exact_gradient: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Final parameters, the distance to the optimum every `steps/100` steps, and the
    largest update coordinate."""
    params = {"w": jnp.asarray(initial)}

    def step(carry, _):
        params, state = carry
        updates = jax.grad(loss)(params) if exact_gradient else None
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimizer.update(
                updates,  # pyright: ignore[reportArgumentType]
                state,
                params,
                value_fn=loss,
            )
        params = optax.apply_updates(params, updates)
        largest = jnp.max(jnp.abs(updates["w"]))  # pyright: ignore
        return (params, state), (params["w"], largest)  # pyright: ignore[reportIndexIssue]

    @jax.jit
    def scan():
        with jax.numpy_dtype_promotion("standard"):
            state = optimizer.init(params)
        return jax.lax.scan(step, (params, state), length=steps)

    (final, _), (trajectory, largest) = scan()
    every = max(steps // 100, 1)
    return np.asarray(final["w"]), np.asarray(trajectory[::every]), float(largest.max())


def converged(final: np.ndarray, optimum: Sequence[float]) -> bool:
    optimum_array = np.asarray(optimum)
    return bool(
        np.all(np.abs(final - optimum_array) <= TOLERANCE * (1 + np.abs(optimum_array)))
    )


def methods(p: int, steps: int) -> dict[str, tuple[Any, bool, float]]:
    """name -> (optimizer, exact gradient fed as updates, learning rate)."""
    del steps
    return {
        "optax.adam": (optax.adam(1e-1), True, 1e-1),
        "adam_dodge exact (partition, k = p)": (
            eqx_dodge.adam_dodge(1e-1, key=0, num_directions=p, mode="partition"),
            False,
            1e-1,
        ),
        "adam_dodge updates (exact candidate)": (
            eqx_dodge.adam_dodge(1e-1, source="updates"),
            True,
            1e-1,
        ),
        "appendix A unclipped (0.1)": (unclipped_updates_source(1e-1), True, 1e-1),
    }


def study(problem: str, steps: int, learning_rates, seeds) -> dict[str, Any]:
    loss, initial, optimum = PROBLEMS[problem]
    p = len(initial)
    record: dict[str, Any] = {"optimum": optimum, "methods": {}, "one_direction": []}
    for name, (optimizer, exact, lr) in methods(p, steps).items():
        final, trajectory, largest = run(optimizer, loss, initial, steps, exact)
        record["methods"][name] = {
            "final": final.tolist(),
            "converged": converged(final, optimum),
            "largest_step_over_lr": largest / lr,
            "distance": np.linalg.norm(
                trajectory - np.asarray(optimum), axis=1
            ).tolist(),
        }
    for lr in learning_rates:
        for seed in seeds:
            optimizer = eqx_dodge.adam_dodge(lr, key=seed)
            final, _, largest = run(optimizer, loss, initial, steps, False)
            record["one_direction"].append(
                {
                    "learning_rate": lr,
                    "seed": seed,
                    "final": final.tolist(),
                    "converged": converged(final, optimum),
                    "largest_step_over_lr": largest / lr,
                }
            )
    passing = [
        lr
        for lr in learning_rates
        if all(
            r["converged"] for r in record["one_direction"] if r["learning_rate"] == lr
        )
    ]
    record["largest_converging_learning_rate"] = max(passing) if passing else None
    return record


def plot(results: dict[str, Any], out_dir, steps: int) -> None:
    fig, axes = _common.new_figure(1, len(results), figsize=(10, 3.6))
    for ax, (problem, record) in zip(np.atleast_1d(axes), results.items()):
        for name, entry in record["methods"].items():
            distance = np.asarray(entry["distance"])
            ax.semilogy(
                np.linspace(0, steps, len(distance)), distance + 1e-12, label=name
            )
        ax.set_title(problem)
        ax.set_xlabel("step")
        ax.set_ylabel("distance to the optimum")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    _common.save_figure(fig, out_dir, "adam_problems")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv)
    steps = 500 if args.quick else 10_000
    learning_rates = (1e-1, 1e-2) if args.quick else LEARNING_RATES
    seeds = (0,) if args.quick else SEEDS
    results = {
        problem: study(problem, steps, learning_rates, seeds) for problem in PROBLEMS
    }
    payload = {
        "config": {
            "steps": steps,
            "tolerance": TOLERANCE,
            "learning_rates": list(learning_rates),
            "seeds": list(seeds),
            "adam_bound": ADAM_BOUND,
        },
        "results": results,
    }
    _common.write_json(args.out, "adam_problems", payload)
    plot(results, args.out, steps)
    return payload


if __name__ == "__main__":
    main()
