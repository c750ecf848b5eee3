"""Tests of Poisson batch selection: distribution, padding, chunks, empty batches, inputs."""

import math

import numpy as np
import pytest

from ppds_jax.batch_selection import poisson_batches


def _batches(**overrides):
    settings = dict(
        seed=0, dataset_size=100, sampling_prob=0.2, num_steps=400, physical_batch_size=32
    )
    settings.update(overrides)
    return list(poisson_batches(**settings))


def test_batches_are_padded_with_masks():
    physical = 32
    for batch in _batches(physical_batch_size=physical):
        assert batch.indices.shape == batch.mask.shape
        assert batch.mask.shape[0] == batch.num_chunks * physical
        assert batch.num_chunks == max(1, math.ceil(batch.size / physical))
        assert int(batch.mask.sum()) == batch.size
        assert np.all(batch.mask[: batch.size])
        assert not np.any(batch.mask[batch.size :])
        sampled = batch.indices[: batch.size]
        assert np.all(np.diff(sampled) > 0), "sampled indices are unique and sorted"
        assert np.all((sampled >= 0) & (sampled < 100))


def test_batch_size_has_binomial_moments():
    n, q, steps = 100, 0.2, 400
    sizes = np.array([batch.size for batch in _batches(num_steps=steps)])
    mean, variance = n * q, n * q * (1 - q)
    # Standard error of the mean of `steps` draws; the variance check allows 25% (about
    # 3.5 standard errors of a sample variance from 400 draws).
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(variance / steps)
    assert abs(sizes.var() - variance) < 0.25 * variance


def test_each_example_included_with_sampling_prob():
    n, q, steps = 50, 0.3, 2000
    counts = np.zeros(n)
    for batch in _batches(dataset_size=n, sampling_prob=q, num_steps=steps):
        counts[batch.indices[batch.mask]] += 1
    # Each count is Binomial(steps, q); allow 5 standard deviations for every example.
    assert np.all(np.abs(counts - steps * q) < 5 * math.sqrt(steps * q * (1 - q)))


def test_large_batch_split_into_chunks_not_truncated():
    physical = 3
    batches = _batches(dataset_size=40, sampling_prob=0.5, num_steps=5, physical_batch_size=3)
    for batch in batches:
        assert batch.size > physical
        assert batch.num_chunks == math.ceil(batch.size / physical)
        assert int(batch.mask.sum()) == batch.size


def test_full_sampling_takes_every_example():
    for batch in _batches(dataset_size=10, sampling_prob=1.0, num_steps=3):
        np.testing.assert_array_equal(batch.indices[batch.mask], np.arange(10))


def test_empty_batches_are_steps():
    batches = _batches(dataset_size=5, sampling_prob=0.01, num_steps=50, physical_batch_size=4)
    assert len(batches) == 50
    empty = [batch for batch in batches if batch.size == 0]
    assert empty, "q = 0.01 on 5 examples should give empty batches"
    for batch in empty:
        assert batch.num_chunks == 1
        assert batch.mask.shape == (4,)
        assert not batch.mask.any()


def test_same_seed_same_batches():
    first = _batches(seed=3, num_steps=5)
    again = _batches(seed=3, num_steps=5)
    other = _batches(seed=4, num_steps=5)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
    assert any(
        a.size != b.size or not np.array_equal(a.indices, b.indices)
        for a, b in zip(first, other, strict=True)
    )


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"sampling_prob": 0.0}, "sampling_prob"),
        ({"sampling_prob": 1.5}, "sampling_prob"),
        ({"sampling_prob": -0.1}, "sampling_prob"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"num_steps": 0}, "num_steps"),
        ({"physical_batch_size": 0}, "physical_batch_size"),
        ({"physical_batch_size": 2.5}, "physical_batch_size"),
    ],
)
def test_invalid_arguments_raise_at_call(overrides, name):
    settings = dict(seed=0, dataset_size=10, sampling_prob=0.5, num_steps=3, physical_batch_size=4)
    settings.update(overrides)
    with pytest.raises(ValueError, match=name):
        poisson_batches(**settings)
