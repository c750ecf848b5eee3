"""Tests for ppds_jax.sharding: a sharded run equals the single-device run.

The multi-device checks run in one subprocess with four forced host CPU devices, because
XLA_FLAGS must be set before JAX starts and the rest of the test suite runs on one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ppds_jax import sharding

NUM_FORCED_DEVICES = 4

# Trains the same models on one device and on (model, data) meshes of 2 x 2 and 4 x 1 (without
# DP) or 2 x 2 and 1 x 4 (with DP), and prints the largest differences and what each invalid
# configuration raised.
SHARDED_RUN = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from ppds_jax import dp_sgd, shadow_training, sharding

    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 64).astype(np.int32)
    masks = rng.random((4, 64)) < 0.5
    keys = jax.random.split(jax.random.key(7), 4)

    def init(key):
        return {"w": 0.1 * jax.random.normal(key, (6, 3)), "b": jnp.zeros(3)}

    def loss(params, example, key):
        x, y = example
        x = x + 0.3 * jax.random.normal(key, x.shape)
        logits = x @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    # Steps of 4 physical rows: most Poisson batches here need two or three chunks per step.
    dp = dp_sgd.DpSgdConfig(l2_norm_clip=0.5, noise_multiplier=1.2, sampling_prob=0.4,
                            num_steps=3, dataset_size=32, physical_batch_size=4)
    runs = {
        "non_private": (dict(optimizer=optax.adam(0.05), num_steps=3, batch_size=8, dp=None),
                        [(2, 2), (4, 1)]),
        "dp_sgd": (dict(optimizer=optax.sgd(0.5), num_steps=3, batch_size=8, dp=dp),
                   [(2, 2), (1, 4)]),
    }
    report = {"num_devices": jax.device_count(), "differences": {}}
    for name, (run, shapes) in runs.items():
        single, single_stats = shadow_training.train_many(
            keys, init, per_example_loss=loss, data=(features, labels), masks=masks,
            strategy="vmap", **run)
        for shape in shapes:
            mesh = sharding.make_mesh(*shape)
            sharded, sharded_stats = shadow_training.train_many(
                keys, init, per_example_loss=loss, data=(features, labels), masks=masks,
                mesh=mesh, **run)
            difference = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))
            )
            loss_difference = max(
                float(np.nanmax(np.abs(a.loss - b.loss)))
                for a, b in zip(sharded_stats, single_stats)
            )
            same_batches = all(
                a.batch_sizes is None or np.array_equal(a.batch_sizes, b.batch_sizes)
                for a, b in zip(sharded_stats, single_stats)
            )
            leaf = jax.tree.leaves(sharded)[0]
            report["differences"][f"{name}_{shape[0]}x{shape[1]}"] = {
                "params": difference,
                "loss": loss_difference,
                "same_batches": same_batches,
                "spec": str(leaf.sharding.spec),
                "num_devices_used": len(leaf.sharding.device_set),
                "param_scale": max(float(np.max(np.abs(np.asarray(a))))
                                   for a in jax.tree.leaves(single)),
            }

    def error_of(call):
        try:
            call()
        except ValueError as error:
            return str(error)
        return None

    mesh = sharding.make_mesh(2, 2)
    train = lambda **overrides: shadow_training.train_many(
        **{**dict(keys=keys[:3], params_init_fn=init, per_example_loss=loss,
                  data=(features, labels), masks=masks[:3], optimizer=optax.sgd(0.1),
                  num_steps=1, batch_size=8, mesh=mesh), **overrides})
    report["errors"] = {
        "model_axis_not_dividing_devices": error_of(lambda: sharding.make_mesh(3)),
        "mesh_shape_not_matching_devices": error_of(lambda: sharding.make_mesh(2, 3)),
        "models_not_dividing_model_axis": error_of(train),
        "batch_not_dividing_data_axis": error_of(
            lambda: train(keys=keys, masks=masks, batch_size=7)),
        "physical_batch_not_dividing_data_axis": error_of(lambda: train(
            keys=keys, masks=masks, dp=dp_sgd.DpSgdConfig(
                l2_norm_clip=1.0, noise_multiplier=1.0, sampling_prob=0.2, num_steps=1,
                dataset_size=32, physical_batch_size=7))),
    }
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def sharded_report():
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={NUM_FORCED_DEVICES}",
        "JAX_PLATFORMS": "cpu",
    }
    completed = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line.removeprefix("REPORT"))


def test_subprocess_sees_forced_devices(sharded_report):
    assert sharded_report["num_devices"] == NUM_FORCED_DEVICES


@pytest.mark.parametrize(
    "run_and_shape", ["non_private_2x2", "non_private_4x1", "dp_sgd_2x2", "dp_sgd_1x4"]
)
def test_sharded_run_equals_single_device(sharded_report, run_and_shape):
    result = sharded_report["differences"][run_and_shape]

    # Float tolerance: the batch sum is reduced across devices in another order.
    assert result["params"] <= 1e-5 * max(1.0, result["param_scale"])
    assert result["loss"] <= 1e-5
    assert result["same_batches"]
    assert result["num_devices_used"] == NUM_FORCED_DEVICES
    assert result["spec"] == "P('model',)"


def test_invalid_mesh_and_shapes_name_the_numbers(sharded_report):
    errors = sharded_report["errors"]

    assert (
        "model_axis_size=3 does not divide the 4 devices"
        in errors["model_axis_not_dividing_devices"]
    )
    assert (
        "mesh shape (2, 3) needs 6 devices, but 4 were given"
        in errors["mesh_shape_not_matching_devices"]
    )
    assert (
        "3 models cannot be split evenly over the model axis of size 2"
        in errors["models_not_dividing_model_axis"]
    )
    assert (
        "batch of 7 rows cannot be split evenly over the data axis of size 2"
        in errors["batch_not_dividing_data_axis"]
    )
    assert (
        "batch of 7 rows cannot be split evenly over the data axis of size 2"
        in errors["physical_batch_not_dividing_data_axis"]
    )


def test_axis_sizes_must_be_positive_integers():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match="model_axis_size=0 must be an integer >= 1"):
        sharding.make_mesh(0, devices=devices)
    with pytest.raises(ValueError, match="data_axis_size=0 must be an integer >= 1"):
        sharding.make_mesh(1, 0, devices=devices)


def test_one_device_mesh_places_models_and_batches():
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    stacked = {"w": np.arange(6.0).reshape(2, 3)}
    batch = np.arange(8).reshape(2, 4)

    placed_models = sharding.put_models(stacked, mesh)
    placed_batch = sharding.put_batch(batch, mesh)
    keys = sharding.put_models(jax.random.split(jax.random.key(0), 2), mesh)

    assert mesh.axis_names == (sharding.MODEL_AXIS, sharding.DATA_AXIS)
    np.testing.assert_array_equal(sharding.to_host(placed_models)["w"], stacked["w"])
    np.testing.assert_array_equal(sharding.to_host(placed_batch), batch)
    np.testing.assert_array_equal(
        jax.random.key_data(keys), jax.random.key_data(jax.random.split(jax.random.key(0), 2))
    )
