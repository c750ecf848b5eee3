"""Tests of synthetic-set sampling: label counts, oversampling and the chunked sampler."""

import dataclasses

import jax
import numpy as np
import pytest

from ppds_jax import sampling
from ppds_jax.generators.base import GeneratorFamily


def _label_image_sample(key, state, labels, *, config):
    """Image whose every pixel is label - 1 plus a per-call offset drawn from `key`."""
    del state, config
    offset = jax.random.uniform(key, (), minval=0.0, maxval=0.1)
    return (labels[:, None, None, None] - 1.0 + offset) * np.ones((1, 2, 2, 1), np.float32)


FAKE_FAMILY = GeneratorFamily(
    name="fake",
    description="returns images that encode their labels",
    default_config={},
    init=None,
    fit=None,
    sample=_label_image_sample,
)


class TestBalancedLabels:
    def test_counts_follow_weights_and_sum(self):
        labels = sampling.balanced_labels(num_samples=10, num_classes=3, class_weights=(1, 2, 2))
        # 10 * (0.2, 0.4, 0.4) = (2, 4, 4) exactly.
        assert np.bincount(labels).tolist() == [2, 4, 4]

    def test_balanced_counts_differ_by_at_most_one(self):
        counts = np.bincount(sampling.balanced_labels(num_samples=17, num_classes=5))
        assert counts.sum() == 17
        assert counts.max() - counts.min() <= 1

    def test_wrong_weight_length_raises(self):
        with pytest.raises(ValueError, match="expected \\(3,\\)"):
            sampling.balanced_labels(num_samples=4, num_classes=3, class_weights=(1, 1))


class TestOversampledLabels:
    def test_each_class_count_is_rounded_up(self):
        labels = np.array([0, 0, 0, 1, 2, 2])
        candidates = sampling.oversampled_labels(labels, factor=1.5)
        # ceil(1.5 * (3, 1, 2)) = (5, 2, 3).
        assert np.bincount(candidates).tolist() == [5, 2, 3]

    def test_exact_products_are_not_rounded_up(self):
        candidates = sampling.oversampled_labels(np.array([0, 0, 1, 1]), factor=1.5)
        assert np.bincount(candidates).tolist() == [3, 3]

    def test_factor_below_one_raises(self):
        with pytest.raises(ValueError, match="factor=0.5 must be >= 1"):
            sampling.oversampled_labels(np.array([0]), factor=0.5)


class TestSampleImages:
    def test_one_image_per_label_across_padded_chunks(self):
        labels = np.array([0, 1, 2, 1, 0], np.int32)
        images = sampling.sample_images(
            jax.random.key(0), FAKE_FAMILY, None, labels, config={}, chunk_size=2
        )
        assert images.shape == (5, 2, 2, 1)
        assert images.dtype == np.float32
        np.testing.assert_allclose(images[:, 0, 0, 0], labels - 1.0, atol=0.1)

    def test_small_request_is_not_padded_to_chunk_size(self):
        calls = []

        def recording_sample(key, state, labels, *, config):
            calls.append(len(labels))
            return _label_image_sample(key, state, labels, config=config)

        family = dataclasses.replace(FAKE_FAMILY, sample=recording_sample)
        images = sampling.sample_images(
            jax.random.key(0), family, None, np.arange(3), config={}, chunk_size=1024
        )
        assert images.shape == (3, 2, 2, 1)
        assert calls == [3]

    def test_images_are_clipped_to_unit_range(self):
        images = sampling.sample_images(
            jax.random.key(0), FAKE_FAMILY, None, np.array([5, 0]), config={}
        )
        assert images.max() == 1.0
        assert images.min() >= -1.0

    def test_synthetic_set_equals_images_of_balanced_labels(self):
        key = jax.random.key(3)
        images, labels = sampling.sample_synthetic_set(
            key, FAKE_FAMILY, None, config={}, num_samples=7, num_classes=3, chunk_size=4
        )
        expected_labels = sampling.balanced_labels(num_samples=7, num_classes=3)
        expected = sampling.sample_images(
            key, FAKE_FAMILY, None, expected_labels, config={}, chunk_size=4
        )
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_array_equal(images, expected)

    def test_empty_labels_raise(self):
        with pytest.raises(ValueError, match="n >= 1"):
            sampling.sample_images(jax.random.key(0), FAKE_FAMILY, None, [], config={})
