"""eqx_dodge against PyTorch on the same MLP, batch and thread count.

The MLP 784-256-256-10 (ReLU, cross-entropy) on a batch of 256, one SGD training step
(gradient estimate + parameter update), timed side by side in one process:

- JAX: `eqx.filter_grad` + SGD, and `eqx_dodge.filter_dodge` (k = 1, Rademacher) +
    SGD, each one jitted step; and the forward pass alone;
- PyTorch (eager, `torch.set_num_threads` = the cores XLA uses): `loss.backward()` +
    `torch.optim.SGD`; a forward gradient with `torch.func.jvp` (Rademacher direction,
    `torch.func.functional_call`) + in-place SGD; `torchzero`'s `ForwardGradient`
    module chained with `LR` (the forward-gradient optimizer a PyTorch user would pick);
    and the forward pass alone under `torch.no_grad`.

Goal: the eqx_dodge step at most 0.5× the time of the PyTorch forward-gradient steps.
PyTorch and torchzero are optional (`pip install "eqx_dodge[bench]"`); without them
this script stops with a message saying so, unless `--jax-only` is given.
"""

import os


# PyTorch's OpenMP threads busy-wait after each parallel region by default, which
# steals the cores from XLA's threads when both libraries run in one process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools as ft  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence
from typing import Any

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_dodge


MISSING_TORCH = (
    "vs_pytorch.py needs PyTorch and torchzero, which are not installed. Install the "
    'optional benchmark dependencies with `pip install -e ".[bench]"` '
    "(torch==2.13.0, torchzero), or pass --jax-only to time the JAX side alone."
)
GOAL = 0.5
WIDTH, DEPTH, INPUTS, CLASSES, BATCH = 256, 2, 784, 10, 256
LEARNING_RATE = 1e-3


def jax_steps(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    model = eqx.nn.MLP(
        INPUTS, CLASSES, WIDTH, DEPTH, activation=jax.nn.relu, key=jax.random.key(0)
    )
    x_j, y_j = jnp.asarray(x), jnp.asarray(y)

    def loss(model, x, y):
        log_probs = jax.nn.log_softmax(jax.vmap(model)(x))
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

    def sgd(model, grads):
        return eqx.apply_updates(
            model, jax.tree.map(lambda g: -LEARNING_RATE * g, grads)
        )

    @eqx.filter_jit
    def forward(model, key):
        del key
        return loss(model, x_j, y_j)

    @eqx.filter_jit
    def backprop_step(model, key):
        del key
        return sgd(model, eqx.filter_grad(loss)(model, x_j, y_j))

    @eqx.filter_jit
    def dodge_step(model, key):
        return sgd(model, eqx_dodge.filter_dodge(loss, key=key)(model, x_j, y_j))

    key = jax.random.key(1)
    funs = {
        "jax_forward": forward,
        "jax_backprop_sgd": backprop_step,
        "eqx_dodge_sgd": dodge_step,
    }
    # The same model and key at every call: the cost of a step does not depend on
    # them, and no call waits on the previous one's output.
    return {
        name: ft.partial(fun.lower(model, key).compile(), model, key)
        for name, fun in funs.items()
    }


def torch_steps(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    # The optional `bench` extra: pyright in `make test` runs without it.
    import torch  # pyright: ignore[reportMissingImports]
    import torchzero as tz  # pyright: ignore[reportMissingImports]

    torch.manual_seed(0)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y).long()

    def make_model():
        layers: list[torch.nn.Module] = [
            torch.nn.Linear(INPUTS, WIDTH),
            torch.nn.ReLU(),
        ]
        for _ in range(DEPTH - 1):
            layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(WIDTH, CLASSES))
        return torch.nn.Sequential(*layers)

    cross_entropy = torch.nn.functional.cross_entropy

    @torch.no_grad()
    def forward():
        return cross_entropy(model(x_t), y_t)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def backprop_step():
        optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(model(x_t), y_t)
        loss.backward()
        optimizer.step()
        return loss

    jvp_model = make_model()
    names = [name for name, _ in jvp_model.named_parameters()]

    def loss_of(*values):
        params = dict(zip(names, values))
        return cross_entropy(torch.func.functional_call(jvp_model, params, (x_t,)), y_t)

    def func_jvp_step():
        params = [p.detach() for p in jvp_model.parameters()]
        direction = [
            torch.randint(0, 2, p.shape, dtype=p.dtype).mul_(2).sub_(1) for p in params
        ]
        loss, derivative = torch.func.jvp(loss_of, tuple(params), tuple(direction))[:2]
        with torch.no_grad():
            for p, u in zip(jvp_model.parameters(), direction):
                p.sub_(LEARNING_RATE * derivative * u)
        return loss

    tz_model = make_model()
    tz_optimizer = tz.Optimizer(
        tz_model.parameters(),
        tz.m.ForwardGradient(distribution="rademacher"),
        tz.m.LR(LEARNING_RATE),
    )

    def closure(backward=True):
        loss = cross_entropy(tz_model(x_t), y_t)
        if backward:
            tz_optimizer.zero_grad()
            loss.backward()
        return loss

    def torchzero_step():
        return tz_optimizer.step(closure)

    return {
        "torch_forward": forward,
        "torch_backprop_sgd": backprop_step,
        "torch_func_jvp_sgd": func_jvp_step,
        "torchzero_forward_gradient": torchzero_step,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(
        __doc__,
        argv,
        flags=[("--jax-only", "time the JAX side alone (no PyTorch needed)")],
    )
    jax_only = args.jax_only
    threads = os.cpu_count() or 1
    versions: dict[str, str] = {}
    if not jax_only:
        try:
            import torch  # pyright: ignore[reportMissingImports]
            import torchzero  # noqa: F401  # pyright: ignore[reportMissingImports]
        except ImportError:
            print(MISSING_TORCH, file=sys.stderr)
            raise SystemExit(1)
        torch.set_num_threads(threads)
        versions = {
            "torch": torch.__version__,
            "torchzero": _version("torchzero"),
            "torch_threads": str(torch.get_num_threads()),
        }
    repeats, min_time = (5, 0.02) if args.quick else (15, 0.2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, INPUTS), dtype=np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int32)
    funs = jax_steps(x, y)
    if not jax_only:
        funs.update(torch_steps(x, y))
    times = _common.time_interleaved(funs, repeats=repeats, min_time=min_time)
    ratios = {}
    if not jax_only:
        for reference in (
            "torch_func_jvp_sgd",
            "torchzero_forward_gradient",
            "torch_backprop_sgd",
        ):
            ratios[f"eqx_dodge_sgd_over_{reference}"] = _common.summarize(
                _common.ratio_samples(times["eqx_dodge_sgd"], times[reference])
            )
        ratios["jax_forward_over_torch_forward"] = _common.summarize(
            _common.ratio_samples(times["jax_forward"], times["torch_forward"])
        )
    ratios["eqx_dodge_sgd_over_jax_backprop_sgd"] = _common.summarize(
        _common.ratio_samples(times["eqx_dodge_sgd"], times["jax_backprop_sgd"])
    )
    seconds = {name: _common.summarize(t) for name, t in times.items()}
    _common.write_json(
        args.out,
        "vs_pytorch",
        {
            "config": {
                "quick": args.quick,
                "jax_only": jax_only,
                "model": f"MLP {INPUTS}-{WIDTH}-{WIDTH}-{CLASSES} ReLU, batch {BATCH}",
                "step": "gradient estimate + SGD update",
                "threads": threads,
                "repeats": repeats,
                "min_seconds_per_repeat": min_time,
                **versions,
            },
            "goal_eqx_dodge_over_pytorch_forward_gradient": GOAL,
            "seconds": seconds,
            "ratios": ratios,
        },
    )
    plot(seconds, args.out)
    for name, value in seconds.items():
        print(
            f"{name:28s} {value['median'] * 1e3:8.3f} ms (min {value['min'] * 1e3:.3f})"
        )
    for name, value in ratios.items():
        print(f"{name:50s} {value['median']:.3f}")
    return {"seconds": seconds, "ratios": ratios}


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def plot(seconds: dict[str, Any], out_dir: Any) -> None:
    fig, ax = _common.new_figure(figsize=(8, 4))
    names = list(seconds)
    medians = [seconds[n]["median"] * 1e3 for n in names]
    errors = [
        [m - seconds[n]["q1"] * 1e3 for m, n in zip(medians, names)],
        [seconds[n]["q3"] * 1e3 - m for m, n in zip(medians, names)],
    ]
    colors = [
        "tab:blue" if n.startswith(("jax", "eqx")) else "tab:orange" for n in names
    ]
    ax.barh(names, medians, xerr=errors, color=colors)
    ax.set_xlabel("ms per step (median, IQR)")
    ax.set_title("MLP 784-256-256-10, batch 256: JAX (blue) vs PyTorch (orange)")
    _common.save_figure(fig, out_dir, "vs_pytorch")


if __name__ == "__main__":
    main()
