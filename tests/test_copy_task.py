import importlib
import json

import jax
import jax.numpy as jnp


copy_task = importlib.import_module("copy_task")


def test_copy_batch():
    max_length = 4
    inputs, targets, mask = copy_task.copy_batch(jax.random.key(0), 16, max_length)
    total = 2 * max_length + 1
    assert inputs.shape == (total, 16, copy_task.BITS + 1)
    assert targets.shape == (total, 16, copy_task.BITS)
    assert mask.shape == (total, 16)
    lengths = jnp.argmax(inputs[:, :, -1], axis=0)  # the delimiter's position
    assert jnp.all(jnp.sum(inputs[:, :, -1], axis=0) == 1)
    assert jnp.all((lengths >= 1) & (lengths <= max_length))
    assert jnp.all(jnp.sum(mask, axis=0) == lengths.astype(mask.dtype))
    for b in range(16):
        length = int(lengths[b])
        shown = inputs[:length, b, :-1]
        recalled = targets[length + 1 : 2 * length + 1, b]
        assert jnp.all(shown == recalled)
        assert jnp.all(inputs[length:, b, :-1] == 0)
        assert jnp.all(mask[length + 1 : 2 * length + 1, b] == 1)


def test_quick_run(tmp_path):
    methods = ["dodge_k8", "dodge_synthetic"]
    # `optax.adam`'s bias correction raises `decay ** count` (a float to an int32
    # count), which the suite's strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        copy_task.main(["--quick", "--out", str(tmp_path), "--methods", *methods])
    record = json.loads((tmp_path / "copy_task.json").read_text())
    assert (tmp_path / "copy_task.png").stat().st_size > 0
    assert set(record["final_bit_errors"]) == set(methods)
    for errors in record["final_bit_errors"].values():
        # At most every recalled bit wrong: 8 bits × the longest sequence.
        assert 0 <= errors <= copy_task.BITS * copy_task.QUICK.max_length
