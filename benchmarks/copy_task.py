"""The copy task (Graves et al. 2014; DODGE paper §5.3–5.4, Figures 2 and 4).

Each sequence shows `l` random 8-bit vectors (`l` uniform in `1..L`), then a delimiter
(a ninth input channel), then `l` blank steps during which the network must output the
vectors again. Outputs are sigmoids trained with binary cross-entropy on the recall
steps; the metric is bit errors per sequence (thresholded outputs against targets,
summed over the recall steps).

An LSTM, a linear readout, Adam, one batch of fresh sequences per step, from a zero
state. Methods:

- `bptt`: the exact gradient (`eqx.filter_value_and_grad` through the sequence);
- `tbptt`: the truncated gradient, truncation uniform in `1..max_truncation`
    (`eqx_dodge.recurrent.tbptt_candidate`);
- `dodge_k1`, `dodge_k8`, `dodge_k64`: `eqx_dodge.OnlineDodge` with random directions;
- `dodge_tbptt`: `OnlineDodge` along the TBPTT candidate, `(g·ĉ)ĉ`;
- `synthetic`: synthetic gradients
    (`eqx_dodge.recurrent.synthetic_gradient_candidate`, a quadratic critic per
    example, truncation 5, scale 0.5; the critic trained with
    `eqx_dodge.recurrent.critic_loss` and Adam alongside the model);
- `dodge_synthetic`: `OnlineDodge` along that candidate.

The default configuration is sized for a 2-core CPU (about 6 minutes); `--full` is the
paper's model and sequence length (LSTM-128, length 25) on a reduced grid (`FULL`),
resumable over several sittings; `--quick` is a smoke test.
"""

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_dodge
from eqx_dodge._online import scan_window


BITS = 8
METHODS = (
    "bptt",
    "tbptt",
    "dodge_k1",
    "dodge_k8",
    "dodge_k64",
    "dodge_tbptt",
    "synthetic",
    "dodge_synthetic",
)
CRITIC_METHODS = ("synthetic", "dodge_synthetic")


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 64
    max_length: int = 5
    batch: int = 32
    steps: int = 3000
    learning_rates: tuple[float, ...] = (1e-3,)
    # Rates beyond the grid's ends, tried in turn for a method whose best rate so far
    # is the end next to one: a best at an edge of the grid may not be its best.
    edge_learning_rates: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)
    max_truncation: int = 3
    critic_truncation: int = 5
    critic_scale: float = 0.5
    critic_learning_rate: float = 1e-3
    eval_every: int = 50
    eval_batch: int = 256


DEFAULT = Config()
QUICK = Config(
    hidden=16,
    max_length=3,
    steps=40,
    eval_every=20,
    eval_batch=64,
    critic_truncation=2,
)
# The paper's model and sequences (LSTM-128, length 25, batch 32, Adam). Its grid,
# six learning rates and five seeds, is tens of CPU hours here: three learning rates
# around the default scale's (1e-3), up to two more beyond either end for a method
# whose best is there, three seeds, and as many steps as a few sittings allow. Resumable
# (`_common.RunLog`): every finished run is appended to
# `results/copy_task_full_runs.json`, and a rerun skips it.
FULL = Config(
    hidden=128,
    max_length=25,
    steps=5_000,
    learning_rates=(3e-3, 1e-3, 3e-4),
    edge_learning_rates=(1e-2, 1e-4, 3e-2, 3e-5),
    seeds=(0, 1, 2),
    eval_every=250,
)


def copy_batch(key, batch: int, max_length: int):
    """A batch of copy-task sequences, time-major, all padded to `2·L + 1` steps.

    Returns `(inputs, targets, mask)` of shapes `(T, batch, 9)`, `(T, batch, 8)`,
    `(T, batch)`; `mask` marks the recall steps.
    """
    length_key, bits_key = jax.random.split(key)
    total = 2 * max_length + 1
    lengths = jax.random.randint(length_key, (batch,), 1, max_length + 1)
    bits = jax.random.bernoulli(bits_key, 0.5, (batch, max_length, BITS))
    bits = bits.astype(jnp.float32)
    t = jnp.arange(total)[:, None]
    length = lengths[None, :]
    show = t < length
    recall = (t > length) & (t <= 2 * length)
    shown_index = jnp.minimum(jnp.arange(total), max_length - 1)
    shown = jnp.where(show[..., None], bits[:, shown_index].transpose(1, 0, 2), 0.0)
    recall_index = jnp.clip(t - length - 1, 0, max_length - 1)
    recalled = jnp.take_along_axis(
        bits.transpose(1, 0, 2), recall_index[..., None], axis=0
    )
    delimiter = (t == length).astype(jnp.float32)[..., None]
    inputs = jnp.concatenate([shown, delimiter], axis=-1)
    targets = jnp.where(recall[..., None], recalled, 0.0)
    return inputs, targets, recall.astype(jnp.float32)


class Model(eqx.Module):
    cell: eqx.nn.LSTMCell
    readout: eqx.nn.Linear

    def __init__(self, hidden: int, key):
        cell_key, readout_key = jax.random.split(key)
        self.cell = eqx.nn.LSTMCell(BITS + 1, hidden, key=cell_key)
        self.readout = eqx.nn.Linear(hidden, BITS, key=readout_key)


def step(model, state, inputs_t):
    """One time step on the batch; the loss is the step's share of the mean
    per-sequence cross-entropy (so the window loss is a `"sum"` over steps)."""
    x, y, mask = inputs_t
    state = jax.vmap(model.cell)(x, state)
    logits = jax.vmap(model.readout)(state[0])
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits, y)
    loss = jnp.sum(mask[:, None] * cross_entropy) / x.shape[0]
    wrong = ((logits > 0) != (y > 0.5)).astype(mask.dtype)
    errors = jnp.sum(mask[:, None] * wrong)
    return state, (loss, errors)


def zero_state(hidden: int, batch: int):
    return (jnp.zeros((batch, hidden)), jnp.zeros((batch, hidden)))


def evaluate(model, key, config: Config):
    inputs = copy_batch(key, config.eval_batch, config.max_length)
    value, (_, errors) = scan_window(
        step,
        model,
        zero_state(model.cell.hidden_size, config.eval_batch),
        inputs,
        reduction="sum",
        has_aux=True,
    )
    return value, jnp.sum(errors) / config.eval_batch


def gradient_estimate(method: str, model, critic, key, inputs, config: Config):
    state = zero_state(model.cell.hidden_size, config.batch)
    candidate_key, direction_key = jax.random.split(key)
    if method in CRITIC_METHODS:
        candidate = eqx_dodge.recurrent.synthetic_gradient_candidate(
            step,
            model,
            critic,
            state,
            inputs,
            truncation=config.critic_truncation,
            scale=config.critic_scale,
            bootstrap_end=False,  # a sequence is a whole episode
            batched=True,
            has_aux=True,
        )
        if method == "synthetic":
            return candidate
        online = eqx_dodge.OnlineDodge(step, reduction="sum", has_aux=True)
        carry = online.init(model, state, direction=candidate)
        _, estimate, _ = online(model, carry, inputs)
        return estimate
    if method == "bptt":

        def loss(_model):
            value, _ = scan_window(
                step, _model, state, inputs, reduction="sum", has_aux=True
            )
            return value

        return eqx.filter_grad(loss)(model)
    if method in ("tbptt", "dodge_tbptt"):
        candidate = eqx_dodge.recurrent.tbptt_candidate(
            step,
            model,
            state,
            inputs,
            key=candidate_key,
            max_truncation=config.max_truncation,
            reduction="sum",
            has_aux=True,
        )
        if method == "tbptt":
            return candidate
        online = eqx_dodge.OnlineDodge(step, reduction="sum", has_aux=True)
        carry = online.init(model, state, direction=candidate)
    else:
        num_directions = int(method.removeprefix("dodge_k"))
        online = eqx_dodge.OnlineDodge(
            step, num_directions=num_directions, reduction="sum", has_aux=True
        )
        carry = online.init(model, state, key=direction_key)
    _, estimate, _ = online(model, carry, inputs)
    return estimate


def train(method: str, learning_rate: float, seed: int, config: Config):
    """One run; returns the evaluation steps, and the bit errors and the summed loss
    per sequence there."""
    model_key, data_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    model = Model(config.hidden, model_key)
    optimizer = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    # One quadratic critic applied to each example's (h, c).
    critic = eqx_dodge.recurrent.QuadraticCritic(2 * config.hidden)
    critic_optimizer = optax.adam(config.critic_learning_rate)
    critic_opt_state = critic_optimizer.init(eqx.filter(critic, eqx.is_array))

    def train_step(carry, key):
        params, opt_state, critic, critic_opt_state = carry
        model = eqx.combine(params, static)
        batch_key, estimate_key = jax.random.split(key)
        inputs = copy_batch(batch_key, config.batch, config.max_length)
        grads = gradient_estimate(method, model, critic, estimate_key, inputs, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if method in CRITIC_METHODS:
            critic_grads = eqx.filter_grad(
                lambda _critic: eqx_dodge.recurrent.critic_loss(
                    step,
                    model,
                    _critic,
                    zero_state(config.hidden, config.batch),
                    inputs,
                    truncation=config.critic_truncation,
                    bootstrap_end=False,
                    batched=True,
                    has_aux=True,
                )
            )(critic)
            critic_updates, critic_opt_state = critic_optimizer.update(
                critic_grads, critic_opt_state
            )
            critic = eqx.apply_updates(critic, critic_updates)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, critic, critic_opt_state), None

    def block(carry, keys):
        carry, _ = jax.lax.scan(train_step, carry, keys)
        value, errors = evaluate(eqx.combine(carry[0], static), eval_key, config)
        return carry, (errors, value / config.eval_batch)

    num_blocks = config.steps // config.eval_every
    keys = jax.random.split(data_key, num_blocks * config.eval_every).reshape(
        num_blocks, config.eval_every
    )

    @jax.jit
    def run(params, opt_state, critic, critic_opt_state):
        value, initial = evaluate(eqx.combine(params, static), eval_key, config)
        carry = (params, opt_state, critic, critic_opt_state)
        _, (errors, losses) = jax.lax.scan(block, carry, keys)
        return (
            jnp.concatenate([initial[None], errors]),
            jnp.concatenate([value[None] / config.eval_batch, losses]),
        )

    errors, losses = run(params, opt_state, critic, critic_opt_state)
    steps = np.arange(num_blocks + 1) * config.eval_every
    return steps, np.asarray(errors), np.asarray(losses)


class StudyPaused(Exception):
    """The `--full` study's time for this sitting is up; its finished runs are in
    its log."""


def run_key(method: str, learning_rate: float, seed: int) -> str:
    """A run's key in the `--full` study's log."""
    return f"{method} / {learning_rate:g} / {seed}"


def seed_run(
    method: str,
    learning_rate: float,
    seed: int,
    config: Config,
    log: Any,
    deadline: float | None,
) -> dict[str, Any]:
    """One training run's evaluation curves: trained here, or read from the `--full`
    study's `log` where an earlier sitting finished it. No run starts after
    `deadline` (a `time.time()`)."""
    key = run_key(method, learning_rate, seed)
    if log is not None and key in log:
        return log.runs[key]
    if deadline is not None and time.time() > deadline:
        raise StudyPaused(key)
    start = time.perf_counter()
    _, errors, losses = train(method, learning_rate, seed, config)
    run = {
        "bit_errors": errors.tolist(),
        "loss": losses.tolist(),
        "seconds": time.perf_counter() - start,
    }
    if log is not None:
        log.add(key, run)
    return run


def planned_learning_rates(config: Config, medians: dict[float, float]) -> list[float]:
    """The learning rates of a method's runs: the grid, then each of
    `config.edge_learning_rates` in turn that lies past the end of the rates so far
    where their best (lowest median final bit errors) is. `medians` holds the
    rates whose seeds are all finished; the list stops at a decision that needs one
    that is not."""
    rates = list(config.learning_rates)
    for edge in config.edge_learning_rates:
        if any(rate not in medians for rate in rates):
            break
        best = min(rates, key=medians.__getitem__)
        if (edge > best and best == max(rates)) or (edge < best and best == min(rates)):
            rates.append(edge)
    return rates


def rate_result(
    method: str, learning_rate: float, config: Config, log: Any, deadline: float | None
) -> dict[str, Any]:
    """One learning rate's median curves over seeds."""
    seeds = [
        seed_run(method, learning_rate, seed, config, log, deadline)
        for seed in config.seeds
    ]
    curves = np.asarray([run["bit_errors"] for run in seeds])
    result = {
        "median_curve": np.median(curves, axis=0).tolist(),
        "median_loss_curve": np.median([run["loss"] for run in seeds], axis=0).tolist(),
        "final_per_seed": curves[:, -1].tolist(),
        "seconds": sum(run["seconds"] for run in seeds),
    }
    print(
        f"{method:>12} lr={learning_rate:g}: final bit errors "
        f"{np.median(curves[:, -1]):.2f} ({result['seconds']:.0f} s)",
        file=sys.stderr,
    )
    return result


def method_result(
    method: str, config: Config, log: Any, deadline: float | None = None
) -> dict[str, Any]:
    """Every learning rate's median curves over seeds (`planned_learning_rates`),
    and the best learning rate (the lowest median final bit errors)."""
    runs, medians = {}, {}
    while todo := [r for r in planned_learning_rates(config, medians) if r not in runs]:
        runs[todo[0]] = rate_result(method, todo[0], config, log, deadline)
        medians[todo[0]] = float(np.median(runs[todo[0]]["final_per_seed"]))
    best = min(medians, key=medians.__getitem__)
    return {
        "best_learning_rate": best,
        "final_bit_errors": medians[best],
        "runs": {str(lr): run for lr, run in runs.items()},
    }


def progress(methods: Sequence[str], config: Config, log: Any) -> dict[str, Any]:
    """What a `--full` study has finished: its runs out of those planned so far, and
    each method's planned learning rates (`planned_learning_rates`) and those with
    finished seeds, their count and median final bit errors (the summary's
    `results` hold only the methods whose runs are all finished)."""
    partial: dict[str, Any] = {}
    planned: dict[str, list[float]] = {}
    for method in methods:
        rates, medians = {}, {}
        for learning_rate in (*config.learning_rates, *config.edge_learning_rates):
            finals = [
                log.runs[key]["bit_errors"][-1]
                for seed in config.seeds
                if (key := run_key(method, learning_rate, seed)) in log
            ]
            if finals:
                rates[f"{learning_rate:g}"] = {
                    "seeds_finished": len(finals),
                    "median_final_bit_errors": float(np.median(finals)),
                }
            if len(finals) == len(config.seeds):
                medians[learning_rate] = float(np.median(finals))
        partial[method] = rates
        planned[method] = planned_learning_rates(config, medians)
    return {
        "runs_finished": len(log.runs),
        "runs_planned": len(config.seeds) * sum(map(len, planned.values())),
        "methods_planned": list(methods),
        "learning_rates_planned": planned,
        "per_learning_rate": partial,
    }


def finished_study(results: dict[str, Any], config: Config, log: Any) -> dict[str, Any]:
    """`results` of this sitting's methods with every other method of `METHODS` whose
    runs an earlier sitting finished, in `METHODS`' order: a sitting on some methods
    (`--methods`) still writes the summary of the whole study. Nothing is trained
    here (a deadline already past stops at the first missing run)."""
    for method in METHODS:
        if method not in results:
            try:
                results[method] = method_result(method, config, log, deadline=0.0)
            except StudyPaused:
                pass
    order = [*METHODS, *results]
    return {
        method: results[method] for method in dict.fromkeys(order) if method in results
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Copy task.")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="a smoke test")
    scale.add_argument("--full", action="store_true", help="the paper's scale")
    parser.add_argument(
        "--out", type=pathlib.Path, default=_common.RESULTS, help="output directory"
    )
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        help="with --full: start no run after this many minutes (the study resumes)",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL if args.full else DEFAULT

    log = (
        _common.RunLog(args.out, "copy_task_full_runs", dataclasses.asdict(config))
        if args.full
        else None
    )
    deadline = (
        None
        if args.stop_after_minutes is None
        else time.time() + 60 * args.stop_after_minutes
    )
    results = {}
    for method in args.methods:
        try:
            results[method] = method_result(method, config, log, deadline)
        except StudyPaused as paused:
            # The methods after it still enter the summary where an earlier
            # sitting finished all their runs (no new run starts after the
            # deadline).
            print(
                f"Paused before {paused}: rerun with --full to go on. The summary "
                f"has the methods whose runs are all finished.",
                file=sys.stderr,
            )

    if log is not None:
        results = finished_study(results, config, log)
    steps = np.arange(config.steps // config.eval_every + 1) * config.eval_every
    payload = {
        "config": dataclasses.asdict(config)
        | {"scale": "quick" if args.quick else "full" if args.full else "default"},
        "eval_steps": steps.tolist(),
        "final_bit_errors": {
            method: result["final_bit_errors"] for method, result in results.items()
        },
        "results": results,
    }
    if log is not None:
        payload["progress"] = progress(list(METHODS), config, log)
    output = "copy_task_full" if args.full else "copy_task"
    _common.write_json(args.out, output, payload)

    fig, ax = _common.new_figure(figsize=(7, 4.5))
    for method, result in results.items():
        curve = result["runs"][str(result["best_learning_rate"])]["median_curve"]
        ax.plot(steps, curve, label=f"{method} (lr {result['best_learning_rate']:g})")
    ax.set_xlabel("training step")
    ax.set_ylabel("bit errors per sequence")
    ax.set_title(
        f"copy task, LSTM-{config.hidden}, lengths 1..{config.max_length}, "
        f"batch {config.batch}"
    )
    if results:  # a paused `--full` study may have none finished yet
        ax.legend(fontsize=8)
    _common.save_figure(fig, args.out, output)
    return payload


if __name__ == "__main__":
    main()
