"""Device meshes for training many models at once: a model axis and a data axis.

A `Mesh` here has two named axes. The "model" axis splits the stacked models of
`shadow_training.train_many` (one shadow pipeline per row of the stack), and the "data" axis
splits the rows of one training step's batch. Parameters and optimizer states are stacked with a
leading model axis and placed with `NamedSharding(mesh, P("model"))`. Each step's row indices and
masks have shape (num_models, batch) and are placed with `P("model", "data")`. The shared
training data are replicated. Under `jax.jit`, XLA partitions the one program over all devices
of the mesh, so the step computes the same function as on one device, with the per-example work
split over the data axis and the batch sums reduced across it.

DP-SGD under this sharding: each example's gradient is computed and clipped on the device that
holds its row, with the key that `jax.random.split` gives that row on one device
(`jax_threefry_partitionable`, the default since JAX 0.5, makes random bits independent of the
sharding). The clipped sum over the batch is reduced across the data axis before the noise is
added, and the noise is drawn once per model and step from that step's noise key. Every data
shard then holds the same noisy sum, so the noise enters once, exactly as on one device.

Multi-host use (one process per host, not tested here because this project's CI has one host):

1. Call `jax.distributed.initialize()` in every process before any other JAX call. On Cloud TPU
   and under SLURM or Open MPI it finds the coordinator itself; elsewhere pass
   `coordinator_address="host0:1234", num_processes=P, process_id=i`.
2. Build the mesh over `jax.devices()`, which then lists the devices of every host:
   `make_mesh(model_axis_size=M)` uses all of them. Keep the data axis within one host where
   possible (`data_axis_size` <= local device count), so that batch sums stay on the fast
   intra-host links.
3. Run the same program in every process with the same seeds and data. Host-side batch
   selection is seeded by the PRNG keys, so every process computes the same indices, and
   `put_*` below place on each host only the shards that its own devices hold.
4. Use `to_host` for results: arrays sharded over several hosts cannot be read with
   `np.asarray` in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODEL_AXIS = "model"
DATA_AXIS = "data"


def make_mesh(
    model_axis_size: int,
    data_axis_size: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Build a ("model", "data") mesh over `devices`.

    Args:
      model_axis_size: devices along the model axis, >= 1.
      data_axis_size: devices along the data axis, >= 1; by default
        `len(devices) // model_axis_size`.
      devices: the devices to use, by default `jax.devices()` (every device of every host after
        `jax.distributed.initialize`).

    Returns:
      A `Mesh` of shape (model_axis_size, data_axis_size) with both axes in
      `AxisType.Auto` mode, so `jax.jit` propagates shardings without explicit annotations.

    Raises:
      ValueError: an axis size below 1, or a mesh shape whose product is not the number of
        devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    _check_axis_size("model_axis_size", model_axis_size)
    if data_axis_size is None:
        if len(devices) % model_axis_size:
            raise ValueError(
                f"{model_axis_size=} does not divide the {len(devices)} devices; choose a model "
                f"axis size among the divisors of {len(devices)}"
            )
        data_axis_size = len(devices) // model_axis_size
    _check_axis_size("data_axis_size", data_axis_size)
    if model_axis_size * data_axis_size != len(devices):
        raise ValueError(
            f"mesh shape ({model_axis_size}, {data_axis_size}) needs "
            f"{model_axis_size * data_axis_size} devices, but {len(devices)} were given; the "
            "product of the axis sizes must equal the number of devices"
        )
    return jax.make_mesh(
        (model_axis_size, data_axis_size),
        (MODEL_AXIS, DATA_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def _check_axis_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def check_num_models(num_models: int, mesh: Mesh) -> None:
    """Raise ValueError unless the model axis divides `num_models` stacked models."""
    size = mesh.shape[MODEL_AXIS]
    if num_models % size:
        raise ValueError(
            f"{num_models} models cannot be split evenly over the model axis of size {size}; "
            f"use a multiple of {size} models (or models_per_program), or a smaller model axis"
        )


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raise ValueError unless the data axis divides the rows of one step's batch."""
    size = mesh.shape[DATA_AXIS]
    if batch_size % size:
        raise ValueError(
            f"batch of {batch_size} rows cannot be split evenly over the data axis of size "
            f"{size}; use a batch size (physical_batch_size under DP) that is a multiple of {size}"
        )


def model_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays with a leading model axis: parameters, optimizer states, keys."""
    return NamedSharding(mesh, P(MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of (num_models, batch, ...) arrays: each step's row indices and masks."""
    return NamedSharding(mesh, P(MODEL_AXIS, DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays every device holds whole: the shared training data."""
    return NamedSharding(mesh, P())


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """Place host or device arrays with `sharding`, also across hosts.

    `make_array_from_callback` asks each process only for the shards its own devices hold, so
    every process may pass the same full host array. Typed PRNG key arrays travel as their raw
    key data and are wrapped again on the devices.
    """

    def place_array(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def place(leaf):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            key_data = place_array(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(leaf))
        return place_array(leaf)

    return jax.tree.map(place, tree)


def put_models(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree whose leaves have a leading model axis with `model_sharding(mesh)`."""
    return _put(tree, model_sharding(mesh))


def put_batch(tree: Any, mesh: Mesh) -> Any:
    """Place (num_models, batch, ...) arrays with `batch_sharding(mesh)`."""
    return _put(tree, batch_sharding(mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree so that every device of `mesh` holds all of it."""
    return _put(tree, replicated_sharding(mesh))


def to_host(tree: Any) -> Any:
    """Copy a pytree of (possibly multi-host) arrays to NumPy arrays in every process."""

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)
