"""Influence balancing (Tallec & Ollivier 2017; DODGE paper §5.2, Table 1).

A linear recurrence with one scalar parameter θ whose truncated gradient has the wrong
sign for short truncations. Setup as in google-research `persistent_es`:

- state `s ∈ R^23`, `s_0 = 1`, never reset; `A = 0.5·I + 0.5·(superdiagonal ones)`;
- `s_{t+1} = A s_t + θ·σ` with `σ = +1` on the first 10 units and `−1` on the other 13;
- one iteration unrolls `K` steps from the carried state; its loss is
    `½(s[0] − 1)²` at the end of the unroll; SGD with learning rate 1e-4, θ_0 = 0.5,
    3000 iterations;
- the reported loss is `½(s_500[0] − 1)²` after 500 steps from `s = 1`; the optimum is
    θ* = −1/6.

Methods: TBPTT with K = 1, 10, 40, 41, 100 (`jax.grad` through the K-step unroll, the
state entering it held constant); RTRL (K = 1; the full Jacobian `ds/dθ` propagated by
hand with `jax.jacfwd` of the step, independent of eqx_dodge); DODGE with one random
direction (K = 1; `eqx_dodge.OnlineDodge`, the state tangent carried forever). Every
run is one jitted `lax.scan` over the iterations. `--x64` runs in float64.
"""

import argparse
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np

import eqx_dodge
from eqx_dodge._online import scan_window


NUM_UNITS = 23
NUM_POSITIVE = 10
THETA_INIT = 0.5
LEARNING_RATE = 1e-4
ITERATIONS = 3000
EVAL_STEPS = 500
TBPTT_LENGTHS = (1, 10, 40, 41, 100)
OPTIMUM = -1 / 6
PAPER_TABLE_1 = {"TBPTT K=100": 0.93, "RTRL": 1.11e-12, "DODGE": 1.11e-12}


def make_step(dtype: Any):
    """`step(theta, state, is_last) -> (state, loss)`: one step of the recurrence;
    the loss counts only at the last step of an unroll."""
    half = jnp.asarray(0.5, dtype)
    transition = half * (
        jnp.eye(NUM_UNITS, dtype=dtype) + jnp.eye(NUM_UNITS, k=1, dtype=dtype)
    )
    signs = jnp.where(jnp.arange(NUM_UNITS) < NUM_POSITIVE, 1, -1).astype(dtype)

    def step(theta, state, is_last):
        state = transition @ state + theta[0] * signs
        return state, is_last * half * jnp.square(state[0] - 1)

    return step


def unroll_inputs(length: int, dtype: Any):
    return (jnp.arange(length) == length - 1).astype(dtype)


def eval_loss(step, theta):
    """The reported loss: ½(s[0] − 1)² after `EVAL_STEPS` steps from ones."""
    state = jnp.ones(NUM_UNITS, theta.dtype)
    value, _ = scan_window(
        step, theta, state, unroll_inputs(EVAL_STEPS, theta.dtype), reduction="sum"
    )
    return value


def train(method: str, length: int, iterations: int, dtype: Any, seed: int = 0):
    """Runs one method; returns the reported loss and θ after every iteration."""
    step = make_step(dtype)
    theta = jnp.full((1,), THETA_INIT, dtype)
    state = jnp.ones(NUM_UNITS, dtype)
    inputs = unroll_inputs(length, dtype)
    lr = jnp.asarray(LEARNING_RATE, dtype)

    def record(theta):
        return eval_loss(step, theta), theta[0]

    if method == "tbptt":

        def tbptt_iteration(carry, _):
            theta, state = carry

            def unroll(_theta):
                value, (final, _) = scan_window(
                    step, _theta, state, inputs, reduction="sum"
                )
                return value, final

            grad, final = jax.grad(unroll, has_aux=True)(theta)
            theta = theta - lr * grad
            return (theta, final), record(theta)

        iteration, carry = tbptt_iteration, (theta, state)

    elif method == "rtrl":
        # RTRL written out: J = ds/dθ (23 × 1) follows J ← ∂f/∂s·J + ∂f/∂θ.
        def transition(_state, _theta, is_last):
            return step(_theta, _state, is_last)[0]

        def loss_of_state(_state):
            return 0.5 * jnp.square(_state[0] - 1)

        def rtrl_iteration(carry, _):
            theta, state, jacobian = carry
            for is_last in inputs:  # K = 1 here; a short static loop otherwise
                d_state, d_theta = jax.jacfwd(transition, argnums=(0, 1))(
                    state, theta, is_last
                )
                jacobian = d_state @ jacobian + d_theta
                state = transition(state, theta, is_last)
            grad = jax.grad(loss_of_state)(state) @ jacobian
            theta = theta - lr * grad
            return (theta, state, jacobian), record(theta)

        iteration = rtrl_iteration
        carry = (theta, state, jnp.zeros((NUM_UNITS, 1), dtype))

    elif method == "dodge":
        online = eqx_dodge.OnlineDodge(step, reduction="sum")
        dodge_carry = online.init(theta, state, key=jax.random.key(seed))

        def dodge_iteration(carry, _):
            theta, dodge_carry = carry
            _, estimate, dodge_carry = online(theta, dodge_carry, inputs)
            theta = theta - lr * estimate
            return (theta, dodge_carry), record(theta)

        iteration, carry = dodge_iteration, (theta, dodge_carry)

    else:
        raise ValueError(f"unknown method {method!r}")

    @jax.jit
    def run(carry):
        _, (losses, thetas) = jax.lax.scan(iteration, carry, None, length=iterations)
        return losses, thetas

    return run(carry)


def methods() -> list[tuple[str, str, int]]:
    """(label, method, unroll length)."""
    return [(f"TBPTT K={k}", "tbptt", k) for k in TBPTT_LENGTHS] + [
        ("RTRL", "rtrl", 1),
        ("DODGE", "dodge", 1),
    ]


def run_all(iterations: int, dtype: Any) -> dict[str, dict[str, Any]]:
    results = {}
    for label, method, length in methods():
        start = time.perf_counter()
        losses, thetas = jax.block_until_ready(train(method, length, iterations, dtype))
        seconds = time.perf_counter() - start
        losses, thetas = np.asarray(losses), np.asarray(thetas)
        results[label] = {
            "method": method,
            "unroll_length": length,
            "final_loss": float(losses[-1]),
            "final_theta": float(thetas[-1]),
            "loss_curve": losses.tolist(),
            "seconds_with_compilation": seconds,
        }
        print(
            f"{label:>12}: loss {losses[-1]:.3e}  θ {thetas[-1]: .6f}  "
            f"({seconds:.1f} s)",
            file=sys.stderr,
        )
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Influence balancing (Table 1).")
    parser.add_argument(
        "--quick", action="store_true", help="200 iterations, float32 only"
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=_common.RESULTS, help="output directory"
    )
    args = parser.parse_args(argv)
    iterations = 200 if args.quick else ITERATIONS

    runs = {}
    for precision in ("float32",) if args.quick else ("float32", "float64"):
        with jax.enable_x64(precision == "float64"):
            runs[precision] = run_all(iterations, jnp.dtype(precision))

    table = {
        label: {
            "paper": PAPER_TABLE_1.get(label),
            **{
                f"ours_{precision}": results[label]["final_loss"]
                for precision, results in runs.items()
            },
        }
        for label, _, _ in methods()
    }
    payload = {
        "config": {
            "num_units": NUM_UNITS,
            "num_positive": NUM_POSITIVE,
            "theta_init": THETA_INIT,
            "learning_rate": LEARNING_RATE,
            "iterations": iterations,
            "eval_steps": EVAL_STEPS,
            "optimum_theta": OPTIMUM,
            "quick": args.quick,
        },
        "table": table,
        "runs": {
            precision: {
                label: {key: value for key, value in run.items() if key != "loss_curve"}
                for label, run in results.items()
            }
            for precision, results in runs.items()
        },
    }
    _common.write_json(args.out, "influence_balancing", payload)

    fig, axes = _common.new_figure(
        1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True, squeeze=False
    )
    axes = axes[0]
    for ax, (precision, results) in zip(axes, runs.items()):
        for label, run in results.items():
            curve = np.maximum(np.asarray(run["loss_curve"]), 1e-30)
            style = "--" if label == "DODGE" else "-"
            ax.plot(np.arange(1, len(curve) + 1), curve, style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"influence balancing, {precision}")
    axes[0].set_ylabel("loss of a 500-step unroll")
    axes[-1].legend(fontsize=8)
    _common.save_figure(fig, args.out, "influence_balancing")

    print(
        "| method | paper (Table 1) | " + " | ".join(f"ours, {p}" for p in runs) + " |"
    )
    print("|---" * (2 + len(runs)) + "|")
    for label, row in table.items():
        paper = "—" if row["paper"] is None else f"{row['paper']:.3g}"
        cells = [
            f"{row[f'ours_{p}']:.3g}" if math.isfinite(row[f"ours_{p}"]) else "inf"
            for p in runs
        ]
        print(f"| {label} | {paper} | " + " | ".join(cells) + " |")
    return payload


if __name__ == "__main__":
    main()
