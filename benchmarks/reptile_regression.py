"""Meta-learned initialisations for image regression: DODGE along the Reptile direction.

DODGE (Silver et al., ICLR 2022, §5.4) takes the Reptile update as its candidate
direction on the image regression task of Tancik et al. (2021, "Learned
initializations for optimizing coordinate-based neural representations"): an MLP
maps a pixel's coordinates (x, y), encoded by random Fourier features, to its RGB
colour; its initial parameters θ are meta-learned so that a few inner SGD steps on a
new image fit it. The outer loss is the image's mean squared error after the inner
steps. Methods, one meta-gradient estimate each per outer step:

- **Reptile**: θ − φ, the initial minus the adapted parameters (no derivative through
  the inner loop).
- **DODGE along Reptile**: `eqx_dodge.filter_dodge(outer_loss, direction=θ − φ)`, the
  meta-gradient's projection (∇L·ĉ)ĉ on the unit Reptile direction, from one
  forward-mode pass through the whole inner loop (`lax.scan`).
- **DODGE, k random directions** (Rademacher, `mode="average"`), k = 1 and 16.
- **MAML**: the meta-gradient itself, by backprop through the inner loop (the
  oracle).

A second study (`WHILE_LOOP`) makes the inner loop data-dependent, as the paper
suggests forward mode allows: SGD until the crop's PSNR reaches 22 dB, at most 6
steps (`lax.while_loop`). Reverse mode cannot differentiate it (the record keeps
JAX's error), so MAML does not run; Reptile, DODGE along Reptile and DODGE k=1 do.

Images: only what ships offline. scikit-image is not installed here, so the two
photographs of `sklearn.datasets.load_sample_images()` (640 × 427) are used,
downsampled 4 times by averaging: square crops of `china.jpg` are the meta-training
images, crops of `flower.jpg` the held-out ones (the split is by source image; no
crop of the held-out photograph is seen in training). Each outer step draws a
meta-batch of training crops; every method updates θ with Adam (one learning rate,
the same for all: Adam removes the scale of the estimate), seeds vmapped. Metric:
PSNR on the held-out crops after the inner steps from the meta-learned θ, mean over
crops, mean ± std over seeds; the untrained initialisation's PSNR after the same
inner steps is the floor.
"""

import functools as ft
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import _common
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

import eqx_dodge
from eqx_dodge._directions import num_coordinates


METHODS = ("Reptile", "DODGE along Reptile", "DODGE k=1", "DODGE k=16", "MAML")
# The smoke run compiles one program holding every method it runs: k = 16 is k = 1's
# code with a larger (chunked) tangent batch, and the costliest branch to compile.
QUICK_METHODS = ("Reptile", "DODGE along Reptile", "DODGE k=1", "MAML")


class Config(NamedTuple):
    crop: int  # side of a square crop, in pixels of the downsampled photograph
    fourier_features: int  # number of frequencies (the encoding has twice as many)
    fourier_scale: float  # standard deviation of the frequencies, cycles per image
    width: int
    depth: int
    inner_steps: int
    inner_learning_rate: float
    outer_learning_rate: float
    outer_steps: int
    meta_batch: int
    num_evals: int
    seeds: int
    held_out_crops: int
    # With a tolerance, the inner loop stops early once the image's loss falls below
    # it (`lax.while_loop`, up to `inner_steps` steps): the number of steps depends
    # on the data, and reverse mode cannot differentiate through it.
    inner_tolerance: float = 0.0


DEFAULT = Config(
    crop=16,
    fourier_features=32,
    fourier_scale=4.0,
    width=64,
    depth=2,
    inner_steps=2,
    inner_learning_rate=1.0,
    outer_learning_rate=1e-3,
    outer_steps=160,
    meta_batch=4,
    num_evals=8,
    seeds=3,
    held_out_crops=16,
)
QUICK = DEFAULT._replace(
    crop=8,
    width=32,
    outer_learning_rate=3e-3,
    outer_steps=24,
    num_evals=2,
    seeds=2,
    held_out_crops=4,
)
# The data-dependent inner loop: SGD until the crop's PSNR reaches 22 dB, at most 6
# steps. MAML (backprop through the loop) cannot run; the forward-only methods can.
WHILE_LOOP = DEFAULT._replace(inner_steps=6, inner_tolerance=10**-2.2)
QUICK_WHILE_LOOP = QUICK._replace(inner_steps=3, inner_tolerance=10**-2.2)
WHILE_LOOP_METHODS = ("Reptile", "DODGE along Reptile", "DODGE k=1")
DOWNSAMPLE = 4


def load_photographs() -> dict[str, np.ndarray]:
    """The two photographs of `load_sample_images`, downsampled `DOWNSAMPLE` times by
    averaging, RGB in [0, 1]."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images()
    out = {}
    for name, image in zip(images.filenames, images.images):  # pyright: ignore
        h = image.shape[0] // DOWNSAMPLE * DOWNSAMPLE
        w = image.shape[1] // DOWNSAMPLE * DOWNSAMPLE
        blocks = image[:h, :w].reshape(
            h // DOWNSAMPLE, DOWNSAMPLE, w // DOWNSAMPLE, DOWNSAMPLE, 3
        )
        out[name.rsplit("/", 1)[-1]] = blocks.mean(axis=(1, 3)) / 255.0
    return out


def random_crops(image: np.ndarray, size: int, count: int, seed: int) -> np.ndarray:
    """`count` square crops of side `size`, flattened to `(count, size², 3)`."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, image.shape[0] - size + 1, count)
    cols = rng.integers(0, image.shape[1] - size + 1, count)
    crops = [image[r : r + size, c : c + size] for r, c in zip(rows, cols)]
    return np.stack(crops).reshape(count, size * size, 3).astype(np.float32)


def pixel_grid(size: int) -> Float[Array, "pixels 2"]:
    """Pixel centres in [0, 1)², in the row-major order of `random_crops`."""
    axis = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    rows, cols = jnp.meshgrid(axis, axis, indexing="ij")
    return jnp.stack([rows.ravel(), cols.ravel()], axis=-1)


class FourierMLP(eqx.Module):
    """An MLP on random Fourier features `[cos 2πBv, sin 2πBv]` of the coordinates
    `v` (Tancik et al. 2020); `B` is fixed, not trained."""

    frequencies: Float[Array, "features 2"]
    mlp: eqx.nn.MLP

    def __init__(self, config: Config, key: PRNGKeyArray):
        frequency_key, mlp_key = jax.random.split(key)
        self.frequencies = config.fourier_scale * jax.random.normal(
            frequency_key, (config.fourier_features, 2)
        )
        self.mlp = eqx.nn.MLP(
            2 * config.fourier_features,
            3,
            config.width,
            config.depth,
            activation=jax.nn.relu,
            key=mlp_key,
        )

    def __call__(self, coordinates: Float[Array, "2"]) -> Float[Array, "3"]:
        angles = 2 * jnp.pi * (self.frequencies @ coordinates)
        return self.mlp(jnp.concatenate([jnp.cos(angles), jnp.sin(angles)]))


def split(model: FourierMLP) -> tuple[PyTree, PyTree]:
    """The trained parameters (the MLP's arrays) and the rest (the fixed Fourier
    frequencies among it), as `eqx.partition` returns them."""
    trained = jax.tree.map(eqx.is_inexact_array, model)
    trained = eqx.tree_at(lambda m: m.frequencies, trained, replace=False)
    return eqx.partition(model, trained)


def image_loss(
    params: PyTree, static: PyTree, coordinates: Array, pixels: Array
) -> Array:
    """Mean squared error of the model's image."""
    model = eqx.combine(params, static)
    return jnp.mean((jax.vmap(model)(coordinates) - pixels) ** 2)


def adapt(
    params: PyTree,
    static: PyTree,
    coordinates: Array,
    pixels: Array,
    *,
    inner_steps: int,
    inner_learning_rate: float,
    inner_tolerance: float = 0.0,
) -> PyTree:
    """The inner loop: `inner_steps` SGD steps on one image from `params`, or with
    an `inner_tolerance`, steps until the image's loss is below it (at most
    `inner_steps`)."""

    def sgd(current):
        grads = jax.grad(image_loss)(current, static, coordinates, pixels)
        return jax.tree.map(lambda w, g: w - inner_learning_rate * g, current, grads)

    if not inner_tolerance:
        adapted, _ = jax.lax.scan(
            lambda c, _: (sgd(c), None), params, None, inner_steps
        )
        return adapted

    def unfinished(carry):
        step, _, loss = carry
        return (step < inner_steps) & (loss > inner_tolerance)

    def body(carry):
        step, current, _ = carry
        current = sgd(current)
        return step + 1, current, image_loss(current, static, coordinates, pixels)

    start = (0, params, image_loss(params, static, coordinates, pixels))
    return jax.lax.while_loop(unfinished, body, start)[1]


def outer_loss(
    params: PyTree, static: PyTree, coordinates: Array, images: Array, **inner: Any
) -> Array:
    """The meta-batch's mean loss after the inner loop, each image adapted alone."""

    def one(pixels):
        adapted = adapt(params, static, coordinates, pixels, **inner)
        return image_loss(adapted, static, coordinates, pixels)

    return jnp.mean(jax.vmap(one)(images))


def reptile_direction(
    params: PyTree, static: PyTree, coordinates: Array, images: Array, **inner: Any
) -> PyTree:
    """Reptile's update θ − φ, averaged over the meta-batch (φ: adapted parameters)."""

    def one(pixels):
        adapted = adapt(params, static, coordinates, pixels, **inner)
        return jax.tree.map(jnp.subtract, params, adapted)

    return jax.tree.map(lambda d: jnp.mean(d, axis=0), jax.vmap(one)(images))


def psnr(mse: Array) -> Array:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return -10.0 * jnp.log10(mse)


def held_out_psnr(
    params: PyTree, static: PyTree, coordinates: Array, images: Array, **inner: Any
) -> Array:
    """Mean over the images of the PSNR after the inner loop."""

    def one(pixels):
        adapted = adapt(params, static, coordinates, pixels, **inner)
        return psnr(image_loss(adapted, static, coordinates, pixels))

    return jnp.mean(jax.vmap(one)(images))


MetaGradient = Callable[[PyTree, PRNGKeyArray, Array], PyTree]


def inner_options(config: Config) -> dict[str, Any]:
    return {
        "inner_steps": config.inner_steps,
        "inner_learning_rate": config.inner_learning_rate,
        "inner_tolerance": config.inner_tolerance,
    }


def meta_gradients(
    static: PyTree, coordinates: Array, config: Config
) -> dict[str, MetaGradient]:
    """Each method's meta-gradient estimate `(params, key, images) -> estimate`."""
    inner = inner_options(config)

    def loss(params, images):
        return outer_loss(params, static, coordinates, images, **inner)

    def reptile(params, key, images):
        del key
        return reptile_direction(params, static, coordinates, images, **inner)

    def dodge_reptile(params, key, images):
        del key
        candidate = reptile(params, None, images)
        return eqx_dodge.filter_dodge(loss, direction=candidate)(params, images)

    def dodge_random(num_directions):
        def estimate(params, key, images):
            return eqx_dodge.filter_dodge(loss, key=key, num_directions=num_directions)(
                params, images
            )

        return estimate

    def maml(params, key, images):
        del key
        return jax.grad(loss)(params, images)

    return {
        "Reptile": reptile,
        "DODGE along Reptile": dodge_reptile,
        "DODGE k=1": dodge_random(1),
        "DODGE k=16": dodge_random(16),
        "MAML": maml,
    }


def train(
    keys: PRNGKeyArray,
    method: Array,
    train_images: Array,
    test_images: Array,
    *,
    config: Config,
    names: Sequence[str] = METHODS,
) -> Array:
    """Held-out PSNR `[seed, eval]` at `num_evals + 1` evenly spaced outer steps of
    the runs of `names[method]`, one per key.

    The method is an index (`lax.switch`), not a Python value, so that one
    compilation serves every method: compiling dominates the quick run. The seeds
    are vmapped inside each outer step (the scans carry them batched), not around
    the whole run: the quick configuration's steps ran 2.6 times as fast so.
    """
    seed_keys = jax.vmap(jax.random.split)(keys)
    models = eqx.filter_vmap(lambda key: FourierMLP(config, key))(seed_keys[:, 0])
    params, static = split(models)
    coordinates = pixel_grid(config.crop)
    optimizer = optax.adam(config.outer_learning_rate)
    inner = inner_options(config)

    @eqx.filter_vmap
    def evaluate(params, static):
        return held_out_psnr(params, static, coordinates, test_images, **inner)

    @eqx.filter_vmap
    def update(params, static, opt_state, step_key):
        estimates = meta_gradients(static, coordinates, config)
        branches = [estimates[name] for name in names]
        batch_key, direction_key = jax.random.split(step_key)
        index = jax.random.randint(
            batch_key, (config.meta_batch,), 0, train_images.shape[0]
        )
        estimate = jax.lax.switch(
            method, branches, params, direction_key, train_images[index]
        )
        updates, opt_state = optimizer.update(estimate, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(carry, step_keys):
        return update(*carry[:1], static, *carry[1:], step_keys), None

    def period(carry, step_keys):
        carry, _ = jax.lax.scan(step, carry, step_keys)
        return carry, evaluate(carry[0], static)

    # Each seed's keys: its outer steps' keys split from its evaluation periods'.
    steps_per_eval = config.outer_steps // config.num_evals

    def run_keys(run_key):
        period_keys = jax.random.split(run_key, config.num_evals)
        return jax.vmap(lambda key: jax.random.split(key, steps_per_eval))(period_keys)

    step_keys = jax.random.key_data(jax.vmap(run_keys)(seed_keys[:, 1]))
    # [seed, period, step, ...] -> [period, step, seed, ...] for the scans.
    step_keys = jax.random.wrap_key_data(jnp.moveaxis(step_keys, 0, 2))
    _, curve = jax.lax.scan(
        period, (params, eqx.filter_vmap(optimizer.init)(params)), step_keys
    )
    return jnp.concatenate([evaluate(params, static)[None], curve]).T


def run_methods(
    names: Sequence[str], train_images: Array, test_images: Array, config: Config
) -> dict[str, np.ndarray]:
    """PSNR curves `[seed, eval]` of each method, one compilation."""
    run = jax.jit(ft.partial(train, config=config, names=tuple(names)))
    keys = jax.random.split(jax.random.key(0), config.seeds)
    curves = {}
    for name in names:
        print(f"[reptile_regression] {name}", file=sys.stderr)
        method = jnp.asarray(names.index(name), jnp.int32)
        curves[name] = np.asarray(run(keys, method, train_images, test_images))
    return curves


def summarize_runs(curves_by_name: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each method's PSNR curves `[seed, eval]` and final PSNR over seeds."""
    return {
        name: {
            "psnr_per_seed": curves.tolist(),
            "final_psnr_mean": float(curves[:, -1].mean()),
            "final_psnr_std": float(curves[:, -1].std()),
            "finite": bool(np.all(np.isfinite(curves))),
        }
        for name, curves in curves_by_name.items()
    }


def maml_error(train_images: Array, config: Config) -> str:
    """What reverse mode says when asked for the meta-gradient through the inner
    `lax.while_loop` (the study's MAML row cannot run)."""
    params, static = split(FourierMLP(config, jax.random.key(0)))
    maml = meta_gradients(static, pixel_grid(config.crop), config)["MAML"]
    images = train_images[: config.meta_batch]
    try:
        jax.eval_shape(maml, params, jax.random.key(0), images)
    except Exception as error:  # reported as it is, whatever JAX raises
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    raise AssertionError("reverse mode differentiated through lax.while_loop")


def while_loop_study(
    train_images: Array, test_images: Array, config: Config
) -> dict[str, Any]:
    """The forward-only methods with the data-dependent inner loop: SGD until the
    crop's loss is below `config.inner_tolerance` (at most `inner_steps`)."""
    curves = run_methods(WHILE_LOOP_METHODS, train_images, test_images, config)
    methods = summarize_runs(curves)
    initial = np.asarray(next(iter(curves.values())))[:, 0]
    return {
        "inner_steps_at_most": config.inner_steps,
        "inner_tolerance_psnr": float(psnr(jnp.asarray(config.inner_tolerance))),
        "initialisation_psnr_mean": float(initial.mean()),
        "initialisation_psnr_std": float(initial.std()),
        "maml": maml_error(train_images, config),
        "methods": methods,
    }


def reptile_cosines(train_images: Array, config: Config) -> np.ndarray:
    """Cosine between the Reptile direction and the meta-gradient (MAML's) at each
    seed's untrained initialisation, `[seed, meta-batch]`, over consecutive
    meta-batches of the training crops: how much of the meta-gradient DODGE along
    Reptile can see."""
    num_batches = train_images.shape[0] // config.meta_batch
    batches = train_images[: num_batches * config.meta_batch].reshape(
        num_batches, config.meta_batch, *train_images.shape[1:]
    )

    def one_seed(key):
        params, static = split(FourierMLP(config, jax.random.split(key)[0]))
        estimates = meta_gradients(static, pixel_grid(config.crop), config)

        def cosine(images):
            meta_gradient = estimates["MAML"](params, key, images)
            candidate = estimates["Reptile"](params, key, images)
            a = jax.flatten_util.ravel_pytree(meta_gradient)[0]
            b = jax.flatten_util.ravel_pytree(candidate)[0]
            return a @ b / jnp.sqrt((a @ a) * (b @ b))

        return jax.lax.map(cosine, batches)

    keys = jax.random.split(jax.random.key(0), config.seeds)
    return np.asarray(jax.jit(jax.vmap(one_seed))(keys))


def plot(record: dict[str, Any], out) -> None:
    fig, ax = _common.new_figure(figsize=(7, 4.5))
    steps = record["outer_steps"]
    for name, result in record["methods"].items():
        curves = np.asarray(result["psnr_per_seed"])
        (line,) = ax.plot(steps, curves.mean(0), marker="o", ms=3, label=name)
        ax.fill_between(
            steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15
        )
    ax.axhline(
        record["initialisation_psnr_mean"],
        color="grey",
        ls="--",
        label="untrained initialisation",
    )
    config = record["config"]
    ax.set_xlabel("outer steps")
    ax.set_ylabel(f"held-out PSNR (dB) after {config['inner_steps']} inner steps")
    ax.set_title(
        f"Meta-learned initialisation, {config['crop']}×{config['crop']} crops "
        f"(mean, min–max of {config['seeds']} seeds)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    _common.save_figure(fig, out, "reptile_regression")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv)
    config = QUICK if args.quick else DEFAULT
    photographs = load_photographs()
    train_images = jnp.asarray(
        random_crops(photographs["china.jpg"], config.crop, 64, seed=0)
    )
    test_images = jnp.asarray(
        random_crops(photographs["flower.jpg"], config.crop, config.held_out_crops, 1)
    )
    p = num_coordinates(split(FourierMLP(config, jax.random.key(0)))[0])
    names = QUICK_METHODS if args.quick else METHODS
    methods = summarize_runs(run_methods(names, train_images, test_images, config))
    cosines = reptile_cosines(train_images, config)
    # Every method starts from the same initialisations (same seeds).
    initial = np.asarray(next(iter(methods.values()))["psnr_per_seed"])[:, 0]
    steps_per_eval = config.outer_steps // config.num_evals
    record = {
        "config": {
            "quick": args.quick,
            **config._asdict(),
            "images": "sklearn load_sample_images, downsampled "
            f"{DOWNSAMPLE}× by averaging; training crops of china.jpg (64), "
            f"held-out crops of flower.jpg ({config.held_out_crops})",
            "model": f"Fourier features ({2 * config.fourier_features}) → MLP "
            f"{config.depth}×{config.width} ReLU → RGB",
            "num_parameters": p,
            "inner_optimizer": "SGD, full image",
            "outer_optimizer": "Adam",
            "methods": list(methods),
        },
        "outer_steps": [i * steps_per_eval for i in range(config.num_evals + 1)],
        "initialisation_psnr_mean": float(initial.mean()),
        "reptile_meta_gradient_cosine_at_initialisation": {
            "per_seed_and_meta_batch": cosines.tolist(),
            "mean": float(cosines.mean()),
            "min": float(cosines.min()),
            "max": float(cosines.max()),
        },
        "initialisation_psnr_std": float(initial.std()),
        "methods": methods,
        "while_loop": while_loop_study(
            train_images, test_images, QUICK_WHILE_LOOP if args.quick else WHILE_LOOP
        ),
    }
    _common.write_json(args.out, "reptile_regression", record)
    plot(record, args.out)
    for name, result in methods.items():
        print(
            f"{name}: {result['final_psnr_mean']:.2f} ± {result['final_psnr_std']:.2f}"
            f" dB (initialisation {record['initialisation_psnr_mean']:.2f})"
        )
    return record


if __name__ == "__main__":
    main()
