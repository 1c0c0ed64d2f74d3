#!/usr/bin/env bash
# The checks to run where a GPU is lent (issue "Memory and cost of k directions"):
# correctness on the device first, then the cost and memory studies, each written to
# $OUT as it finishes so that a run cut short still returns what it finished.
#
#   OUT=/tmp/gpu EQX_DODGE_GIT_COMMIT=$(git rev-parse --short HEAD) \
#       bash benchmarks/device_check.sh [all | studies | memory | chunks]
#
# `studies` (after the checks): step_cost, k_formulations --full (chunks of 4) and
# step_cost --large; `memory`: chunk_memory (the compiled peak against k, by default
# and with `chunk_size=4`); `chunks`: k_formulations with chunks of 16 and 32 at
# k = 64, 256. The device tool brings back at most 8 files a call: run them in
# separate calls. The
# results go to benchmarks/results/gpu/, which the README's section is made from.
#
# It uses the machine's own python3 and its JAX, Equinox and Optax (nothing is
# installed): the versions are printed and stored in every result file.
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv
python3 - <<'EOF' || exit 1
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_dodge

print("jax", jax.__version__, "equinox", eqx.__version__, "optax", optax.__version__)
print("devices", jax.devices(), jax.devices()[0].device_kind)
assert jax.default_backend() == "gpu", jax.default_backend()
model = eqx.nn.MLP(16, 4, 32, 2, key=jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (64, 16))
y = jax.random.normal(jax.random.key(2), (64, 4))


def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def flat(tree):
    return jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])


exact = flat(eqx.filter_jit(eqx.filter_grad(loss))(model, x, y))
p = exact.size
# With k = p parts of one direction the estimate is the gradient: only rounding
# (tf32 matmuls where JAX picks them) separates the two.
parts = eqx.filter_jit(
    eqx_dodge.filter_dodge(loss, key=0, num_directions=p, mode="partition")
)(model, x, y)
error = float(jnp.linalg.norm(flat(parts) - exact) / jnp.linalg.norm(exact))
print(f"partition k=p relative error {error:.2e}")
assert error < 1e-2, error


# Unbiased: the mean of N estimates with k = 8 has squared noise about
# (p - 1)/(8 N) of the squared gradient: cosine about 0.975 for N = 4096.
@jax.jit
def mean_estimate(keys):
    one = lambda k: flat(
        eqx_dodge.filter_dodge(loss, key=k, num_directions=8)(model, x, y)
    )
    return jnp.mean(jax.vmap(one)(keys), axis=0)


mean = mean_estimate(jax.random.split(jax.random.key(3), 4096))
cosine = float(mean @ exact / (jnp.linalg.norm(mean) * jnp.linalg.norm(exact)))
print(f"mean of 4096 estimates (k = 8): cosine with the gradient {cosine:.3f}")
assert cosine > 0.9, cosine
# Chunks of 2 directions give the estimate of one `vmap` over all 8 (to rounding).
whole, chunked = (
    flat(
        eqx.filter_jit(
            eqx_dodge.filter_dodge(loss, key=4, num_directions=8, chunk_size=size)
        )(model, x, y)
    )
    for size in (None, 2)
)
error = float(jnp.linalg.norm(chunked - whole) / jnp.linalg.norm(whole))
print(f"chunk_size=2 against one vmap: relative difference {error:.2e}")
assert error < 1e-2, error
optimiser = eqx_dodge.adam_dodge(1e-2, key=0, num_directions=8)
params, static = eqx.partition(model, eqx.is_array)
state = optimiser.init(params)


@jax.jit
def step(params, state):
    value_fn = lambda p: loss(eqx.combine(p, static), x, y)
    updates, state = optimiser.update(
        None, state, params, value=value_fn(params), value_fn=value_fn
    )
    return optax.apply_updates(params, updates), state


first = float(loss(model, x, y))
for _ in range(300):
    params, state = step(params, state)
last = float(loss(eqx.combine(params, static), x, y))
print(f"adam_dodge 300 steps: loss {first:.4f} -> {last:.4f}")
assert last < 0.7 * first, (first, last)
print("device checks passed")
EOF
part=${1:-all}
if [[ $part == all || $part == studies ]]; then
    timeout 240 python3 benchmarks/step_cost.py --out "$OUT"
    timeout 200 python3 benchmarks/k_formulations.py --full --out "$OUT"
    timeout 90 python3 benchmarks/step_cost.py --large --out "$OUT"
fi
if [[ $part == all || $part == memory ]]; then
    timeout 150 python3 benchmarks/chunk_memory.py --out "$OUT"
fi
if [[ $part == all || $part == chunks ]]; then
    for chunk in 16 32; do
        timeout 160 python3 benchmarks/k_formulations.py --chunk $chunk \
            --num-directions 64 256 --out "$OUT"
    done
fi
