"""A generic fit loop over a per-example loss, non-private or DP-SGD.

Data stay on the device for the whole fit. Each step passes only row indices (and, under DP,
a mask) to jitted step functions. The step functions are cached per loss function, optimizer
and settings, and the data are padded to a coarse row count (`padded_num_rows`), so the fits of
one experiment on different membership masks (a few rows more or fewer each) reuse one
compilation as long as the caller passes the same loss and optimizer objects.
docs/design.md states the contract shared with the generator families and the classifier.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ppds_jax import batch_selection, clipping, dp_sgd


@dataclasses.dataclass(frozen=True)
class FitStats:
    """Per-step diagnostics of one fit. They describe the private data and are not privatised.

    Attributes:
      loss: (num_steps,) float64, mean per-example loss of the step's batch. Under DP it is the
        mean over sampled rows whose loss is finite, NaN for a batch without any.
      clip_fraction: (num_steps,) float64, fraction of sampled rows whose gradient was clipped
        (0 for an empty batch); None without DP.
      num_nonfinite: (num_steps,) int64, sampled rows whose gradient was not finite and
        contributed zero; None without DP.
      batch_sizes: (num_steps,) int64, realised Poisson batch sizes; None without DP.
    """

    loss: np.ndarray
    clip_fraction: np.ndarray | None = None
    num_nonfinite: np.ndarray | None = None
    batch_sizes: np.ndarray | None = None


def check_no_batch_norm_params(params: Any) -> None:
    """Reject parameter pytrees that show a BatchNorm layer or a batch_stats collection."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, _ in paths:
        names = [str(getattr(entry, "key", getattr(entry, "name", ""))) for entry in path]
        if any(name == "batch_stats" or name.startswith("BatchNorm") for name in names):
            raise ValueError(
                f"params contain {'/'.join(names)!r}: a BatchNorm layer mixes the examples of a "
                "batch, which per-example losses and DP-SGD clipping cannot handle; use "
                "GroupNorm or LayerNorm"
            )


def _check_data(data: tuple) -> int:
    if not isinstance(data, tuple | list) or not data:
        raise ValueError("data must be a non-empty tuple of arrays with a shared leading axis")
    sizes = [np.shape(array)[0] if np.ndim(array) else None for array in data]
    if None in sizes or len(set(sizes)) != 1:
        shapes = [np.shape(array) for array in data]
        raise ValueError(f"data arrays must share a leading axis, got shapes {shapes}")
    if sizes[0] < 1:
        raise ValueError("data has no rows")
    return sizes[0]


def host_seed(key: jax.Array) -> int:
    """Return a NumPy seed in [0, 2**31 - 1) drawn from `key`, for host-side batch selection."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def padded_num_rows(num_rows: int) -> int:
    """Return the row count `fit` pads `num_rows` rows to: the next multiple of 2**(b - 3).

    `b` is the bit length of `num_rows`, so the padding adds less than a quarter of the rows,
    and every size in (4096, 5120] maps to 5120. Padded rows are never indexed.
    """
    granularity = 2 ** max(0, int(num_rows).bit_length() - 3)
    return -(-int(num_rows) // granularity) * granularity


def _pad_rows(data: tuple, num_rows: int) -> tuple:
    padded = []
    for array in data:
        array = np.asarray(array)
        extra = np.zeros((num_rows - array.shape[0], *array.shape[1:]), array.dtype)
        padded.append(jnp.asarray(np.concatenate([array, extra])))
    return tuple(padded)


def fit(
    key: jax.Array,
    params: Any,
    *,
    per_example_loss: clipping.PerExampleLoss,
    data: tuple,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: int,
    dp: dp_sgd.DpSgdConfig | None = None,
    progress: bool = False,
    progress_desc: str = "",
    clipping_method: str = "ghost",
) -> tuple[Any, FitStats]:
    """Train `params` for `num_steps` optimizer steps on `data`.

    Without DP, each epoch shuffles the rows with a seeded permutation and takes
    `len(data) // batch_size` batches of exactly `batch_size` rows, dropping the remainder of
    the epoch. The update uses the gradient of the batch mean of the per-example loss.

    With `dp`, each step Poisson-samples rows of `data` with probability `dp.sampling_prob`
    (`batch_selection.poisson_batches`), processes the batch in chunks of
    `dp.physical_batch_size`, adds the clipped chunk sums, adds Gaussian noise once and divides
    by `dp.sampling_prob * dp.dataset_size` (`dp_sgd.noisy_gradient`). Exactly `dp.num_steps`
    steps run, so `dp_sgd.dp_sgd_event(dp)` is the mechanism; `batch_size` is not used.

    BatchNorm check: `params` is rejected if it contains a `batch_stats` entry or a submodule
    whose name starts with "BatchNorm" (Flax's default name). A loss that normalises across
    examples by other means cannot be detected here; check Flax modules with
    `networks.check_no_batch_norm` before building the loss.

    Args:
      key: PRNG key for shuffling or sampling, per-example loss keys and DP noise.
      params: initial parameter pytree.
      per_example_loss: `loss(params, example, key) -> scalar`; `example` is one row of each
        array in `data`, `key` that example's own PRNG key.
      data: tuple of host or device arrays with a shared leading axis N, for example
        (images (N, 28, 28, 1) float32, labels (N,) int32).
      optimizer: an optax transformation.
      num_steps: optimizer steps, >= 1; must equal `dp.num_steps` under DP.
      batch_size: rows per step without DP, in [1, N].
      dp: DP-SGD settings, or None for non-private training.
      progress: show a tqdm bar.
      progress_desc: the bar's label.
      clipping_method: under DP, "ghost" (`clipping.ghost_clipped_grad_sum`, fast for Flax
        Dense and Conv layers, vmap for the rest) or "vmap" (`clipping.clipped_grad_sum`).
        Both give the same clipped sum up to float rounding.

    Returns:
      (trained params, FitStats).

    Raises:
      ValueError: mismatched data shapes, a step count or batch size outside its range, a
        step count that differs from `dp.num_steps`, or a BatchNorm layer in `params`.
    """
    dataset_size = _check_data(data)
    if clipping_method not in dp_sgd.CLIPPING_METHODS:
        raise ValueError(
            f"{clipping_method=} is unknown; expected one of {dp_sgd.CLIPPING_METHODS}"
        )
    if num_steps < 1:
        raise ValueError(f"{num_steps=} must be >= 1")
    check_no_batch_norm_params(params)
    data = _pad_rows(data, padded_num_rows(dataset_size))
    if dp is None:
        if not 1 <= batch_size <= dataset_size:
            raise ValueError(f"{batch_size=} must be in [1, {dataset_size}] (the data size)")
        return _fit_non_private(
            key,
            params,
            per_example_loss=per_example_loss,
            data=data,
            dataset_size=dataset_size,
            optimizer=optimizer,
            num_steps=num_steps,
            batch_size=batch_size,
            progress=progress,
            progress_desc=progress_desc,
        )
    if num_steps != dp.num_steps:
        raise ValueError(
            f"{num_steps=} must equal dp.num_steps={dp.num_steps}, the steps the accountant assumes"
        )
    clip_fn = _cached_clip_fn(per_example_loss, dp.l2_norm_clip, clipping_method)
    return _fit_private(
        key,
        params,
        clip_fn=clip_fn,
        data=data,
        dataset_size=dataset_size,
        optimizer=optimizer,
        dp=dp,
        progress=progress,
        progress_desc=progress_desc,
    )


def make_non_private_step(
    per_example_loss: clipping.PerExampleLoss,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
):
    """Build `fit`'s jitted non-private step.

    Returns:
      `step(params, opt_state, data, indices, key) -> (params, opt_state, loss)`, where `data`
      is the tuple of device arrays, `indices` (batch_size,) int rows of this step, `key` the
      step's key (split into one key per example) and `loss` the batch mean.
    """
    batched_loss = jax.vmap(per_example_loss, in_axes=(None, 0, 0))

    def mean_loss(params, batch, key):
        keys = jax.random.split(key, batch_size)
        return jnp.mean(batched_loss(params, batch, keys))

    @jax.jit
    def step(params, opt_state, data, indices, key):
        batch = tuple(array[indices] for array in data)
        loss, grads = jax.value_and_grad(mean_loss)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_private_steps(clip_fn, optimizer: optax.GradientTransformation, dp: dp_sgd.DpSgdConfig):
    """Build `fit`'s jitted DP-SGD functions for one physical chunk of a Poisson batch.

    Args:
      clip_fn: `fn(params, batch, mask, key) -> (clipped_sum, ClipStats)`, from
        `dp_sgd.make_clip_fn`.
      optimizer: an optax transformation.
      dp: the run's settings.

    Returns:
      `(accumulate, step)`. `accumulate(params, total, data, indices, mask, key) -> (total,
      summary)` adds one chunk's clipped sum to `total`. `step(params, opt_state, total, data,
      indices, mask, key, noise_key) -> (params, opt_state, summary)` adds the last chunk, adds
      noise once and applies the update. `summary` is (sum of finite losses, their count,
      clipped count, non-finite count) of the chunk.
    """

    def chunk_sum(params, data, indices, mask, key):
        batch = tuple(array[indices] for array in data)
        clipped_sum, stats = clip_fn(params, batch, mask, key)
        finite_loss = mask & jnp.isfinite(stats.losses)
        summary = (
            jnp.sum(jnp.where(finite_loss, stats.losses, 0.0)),
            jnp.sum(finite_loss, dtype=jnp.int32),
            stats.num_clipped,
            stats.num_nonfinite,
        )
        return clipped_sum, summary

    @jax.jit
    def accumulate(params, total, data, indices, mask, key):
        clipped_sum, summary = chunk_sum(params, data, indices, mask, key)
        return jax.tree.map(jnp.add, total, clipped_sum), summary

    @jax.jit
    def step(params, opt_state, total, data, indices, mask, key, noise_key):
        total, summary = accumulate(params, total, data, indices, mask, key)
        grads = dp_sgd.noisy_gradient(noise_key, total, dp)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, summary

    return accumulate, step


# jax.jit caches compilations per function object, so `fit` keeps the step functions it built
# for a (loss, optimizer, settings) combination and hands them to later fits with the same one.
@functools.lru_cache(maxsize=32)
def _cached_clip_fn(per_example_loss, l2_norm_clip, clipping_method):
    return dp_sgd.make_clip_fn(
        per_example_loss, l2_norm_clip=l2_norm_clip, clipping_method=clipping_method
    )


@functools.lru_cache(maxsize=32)
def _cached_non_private_step(per_example_loss, optimizer, batch_size):
    return make_non_private_step(per_example_loss, optimizer, batch_size=batch_size)


@functools.lru_cache(maxsize=32)
def _cached_private_steps(clip_fn, optimizer, dp):
    return make_private_steps(clip_fn, optimizer, dp)


def _fit_non_private(
    key,
    params,
    *,
    per_example_loss,
    data,
    dataset_size,
    optimizer,
    num_steps,
    batch_size,
    progress,
    progress_desc,
):
    shuffle_key, loop_key = jax.random.split(key)
    rng = np.random.default_rng(host_seed(shuffle_key))
    step = _cached_non_private_step(per_example_loss, optimizer, batch_size)
    opt_state = optimizer.init(params)
    batches_per_epoch = dataset_size // batch_size
    losses = []
    order = None
    for step_index in tqdm.trange(num_steps, desc=progress_desc, disable=not progress):
        position = step_index % batches_per_epoch
        if position == 0:
            order = rng.permutation(dataset_size)
        indices = order[position * batch_size : (position + 1) * batch_size]
        params, opt_state, loss = step(
            params, opt_state, data, indices, jax.random.fold_in(loop_key, step_index)
        )
        losses.append(loss)
    return params, FitStats(loss=np.asarray(jax.device_get(losses), dtype=np.float64))


def _fit_private(
    key, params, *, clip_fn, data, dataset_size, optimizer, dp, progress, progress_desc
):
    sampling_key, loop_key = jax.random.split(key)
    accumulate, step = _cached_private_steps(clip_fn, optimizer, dp)
    batches = batch_selection.poisson_batches(
        seed=host_seed(sampling_key),
        dataset_size=dataset_size,
        sampling_prob=dp.sampling_prob,
        num_steps=dp.num_steps,
        physical_batch_size=dp.physical_batch_size,
    )
    opt_state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    summaries, batch_sizes = [], []
    progress_bar = tqdm.tqdm(total=dp.num_steps, desc=progress_desc, disable=not progress)
    for step_index, batch in enumerate(batches):
        loss_key, noise_key = jax.random.split(jax.random.fold_in(loop_key, step_index))
        chunk_rows = dp.physical_batch_size
        total = zeros
        step_summaries = []
        for chunk in range(batch.num_chunks - 1):
            rows = slice(chunk * chunk_rows, (chunk + 1) * chunk_rows)
            total, summary = accumulate(
                params,
                total,
                data,
                batch.indices[rows],
                batch.mask[rows],
                jax.random.fold_in(loss_key, chunk),
            )
            step_summaries.append(summary)
        last = batch.num_chunks - 1
        rows = slice(last * chunk_rows, (last + 1) * chunk_rows)
        params, opt_state, summary = step(
            params,
            opt_state,
            total,
            data,
            batch.indices[rows],
            batch.mask[rows],
            jax.random.fold_in(loss_key, last),
            noise_key,
        )
        step_summaries.append(summary)
        summaries.append(step_summaries)
        batch_sizes.append(batch.size)
        progress_bar.update()
    progress_bar.close()
    return params, _private_stats(jax.device_get(summaries), batch_sizes)


def _private_stats(summaries, batch_sizes) -> FitStats:
    totals = np.array([np.sum(np.asarray(step, dtype=np.float64), axis=0) for step in summaries])
    loss_sum, num_finite, num_clipped, num_nonfinite = totals.T
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(num_finite > 0, loss_sum / num_finite, np.nan)
        clip_fraction = np.where(sizes > 0, num_clipped / np.maximum(sizes, 1), 0.0)
    return FitStats(
        loss=loss,
        clip_fraction=clip_fraction,
        num_nonfinite=num_nonfinite.astype(np.int64),
        batch_sizes=sizes,
    )
