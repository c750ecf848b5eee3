"""Poisson sampling of DP-SGD batches, padded to a fixed physical batch size.

Runs on the host with NumPy. Each step includes every example independently with probability
`sampling_prob`, which is the sampling that `PoissonSampledDpEvent` accounts for. The realised
batch size varies, so each batch is padded to a multiple of `physical_batch_size` and carries a
mask; jitted code gets a fixed shape and does not recompile, and padded rows contribute zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class PoissonBatch(NamedTuple):
    """One step's batch.

    Attributes:
      indices: (num_chunks * physical_batch_size,) int64 row indices into the dataset; the
        sampled rows first in increasing order, then padding rows that point at row 0.
      mask: (num_chunks * physical_batch_size,) bool, True for the sampled rows.
      size: the realised batch size, `mask.sum()`.
      num_chunks: number of physical batches the step is split into, at least 1.
    """

    indices: np.ndarray
    mask: np.ndarray
    size: int
    num_chunks: int


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def poisson_batches(
    *,
    seed: int,
    dataset_size: int,
    sampling_prob: float,
    num_steps: int,
    physical_batch_size: int,
) -> Iterator[PoissonBatch]:
    """Yield `num_steps` Poisson-sampled batches, padded to multiples of the physical size.

    Step t includes each index in range(dataset_size) independently with probability
    `sampling_prob`. A realised batch of n examples is padded to
    `max(1, ceil(n / physical_batch_size)) * physical_batch_size` rows: a batch larger than the
    physical size is never truncated but split into several chunks, whose clipped sums the
    caller adds up before adding noise once. An empty batch is a normal step (one chunk, all
    rows masked): skipping it would change the mechanism that the accountant assumes.

    Args:
      seed: seed of the NumPy generator; the same seed gives the same batches.
      dataset_size: number of rows to sample from, >= 1.
      sampling_prob: inclusion probability q, in (0, 1].
      num_steps: number of batches to yield, >= 1.
      physical_batch_size: rows per chunk, >= 1.

    Yields:
      `PoissonBatch(indices, mask, size, num_chunks)` per step.

    Raises:
      ValueError: an argument is outside its range (raised at the call, not at the first step).
    """
    _check_positive_int("dataset_size", dataset_size)
    _check_positive_int("num_steps", num_steps)
    _check_positive_int("physical_batch_size", physical_batch_size)
    if not 0 < sampling_prob <= 1:
        raise ValueError(f"{sampling_prob=} must be in (0, 1]")
    return _generate(seed, dataset_size, sampling_prob, num_steps, physical_batch_size)


def _generate(
    seed: int, dataset_size: int, sampling_prob: float, num_steps: int, physical_batch_size: int
) -> Iterator[PoissonBatch]:
    rng = np.random.default_rng(seed)
    for _ in range(num_steps):
        sampled = np.flatnonzero(rng.random(dataset_size) < sampling_prob)
        size = sampled.shape[0]
        num_chunks = max(1, math.ceil(size / physical_batch_size))
        padded_size = num_chunks * physical_batch_size
        indices = np.zeros(padded_size, dtype=np.int64)
        indices[:size] = sampled
        mask = np.zeros(padded_size, dtype=bool)
        mask[:size] = True
        yield PoissonBatch(indices=indices, mask=mask, size=size, num_chunks=num_chunks)
