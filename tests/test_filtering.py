"""Tests of the synthetic-set filters: privacy filter, per-class selection, quality filter."""

import jax
import numpy as np
import pytest

from ppds_jax import datasets, filtering

QUALITY_CLASSIFIER = {"num_epochs": 40, "batch_size": 32}


def _explicit_min_distances(queries, references):
    """Nearest-reference L2 distance of each query, by a plain double loop."""
    result = []
    for query in queries:
        best = np.inf
        for reference in references:
            best = min(best, float(np.sqrt(np.sum((query - reference) ** 2, dtype=np.float64))))
        result.append(best)
    return np.array(result)


class TestPrivacyFilter:
    def test_removes_exactly_the_samples_within_threshold(self):
        rng = np.random.default_rng(0)
        private = rng.uniform(-1, 1, (30, 4, 4, 1)).astype(np.float32)
        near = private[:10] + rng.normal(0, 0.05, (10, 4, 4, 1)).astype(np.float32)
        synthetic = np.concatenate(
            [near, private[10:15], rng.uniform(-1, 1, (25, 4, 4, 1)).astype(np.float32)]
        )
        threshold = 0.5
        keep, distances = filtering.privacy_filter(synthetic, private, threshold=threshold)

        expected_distances = _explicit_min_distances(synthetic, private)
        np.testing.assert_allclose(distances, expected_distances, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(keep, expected_distances > threshold)
        # The 10 perturbed copies and the 5 exact copies are all within 0.5.
        assert not keep[:15].any()

    def test_zero_threshold_removes_only_exact_copies(self):
        private = np.linspace(-1, 1, 3 * 4).reshape(3, 2, 2, 1).astype(np.float32)
        synthetic = np.concatenate([private[:1], private[1:2] + 1e-3])
        keep, _ = filtering.privacy_filter(synthetic, private, threshold=0.0)
        assert keep.tolist() == [False, True]

    def test_negative_threshold_raises(self):
        images = np.zeros((2, 2, 2, 1), np.float32)
        with pytest.raises(ValueError, match="threshold=-1.0"):
            filtering.privacy_filter(images, images, threshold=-1.0)


class TestSelectPerClass:
    def test_keeps_top_scores_of_each_class(self):
        scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8])
        labels = np.array([0, 0, 0, 1, 1, 1])
        kept = filtering.select_per_class(scores, labels, counts=[2, 1])
        # Class 0 keeps indices 1 (0.9) and 2 (0.5); class 1 keeps index 5 (0.8).
        assert kept.tolist() == [1, 2, 5]

    def test_ties_keep_lower_index(self):
        kept = filtering.select_per_class(np.zeros(4), np.zeros(4, int), counts=[2])
        assert kept.tolist() == [0, 1]

    def test_ineligible_are_skipped_and_shortfall_allowed(self):
        kept = filtering.select_per_class(
            np.array([3.0, 2.0, 1.0]),
            np.array([0, 0, 0]),
            counts=[3],
            eligible=np.array([False, True, True]),
        )
        assert kept.tolist() == [1, 2]

    def test_label_out_of_range_raises(self):
        with pytest.raises(ValueError, match="labels must be in \\[0, 1\\)"):
            filtering.select_per_class(np.zeros(2), np.array([0, 1]), counts=[1])


class TestFilterCandidates:
    def test_privacy_filter_keeps_requested_counts_of_far_candidates(self):
        rng = np.random.default_rng(1)
        private = rng.uniform(-1, 1, (20, 4, 4, 1)).astype(np.float32)
        candidates = np.concatenate(
            [private[:6], rng.uniform(-1, 1, (14, 4, 4, 1)).astype(np.float32)]
        )
        labels = np.repeat([0, 1], 10).astype(np.int32)
        result = filtering.filter_candidates(
            jax.random.key(0),
            candidates,
            labels,
            counts=[3, 4],
            num_classes=2,
            private_images=private,
            privacy_threshold=0.1,
        )
        assert np.bincount(result.labels, minlength=2).tolist() == [3, 4]
        assert _explicit_min_distances(result.images, private).min() > 0.1
        # Candidates 0-5 copy private images; class 0's first far candidates are 6, 7, 8.
        assert result.kept.tolist() == [6, 7, 8, 10, 11, 12, 13]
        assert result.summary["privacy_filter_removed"] == 6
        assert result.summary["shortfall"] == 0

    def test_privacy_filter_needs_private_images(self):
        with pytest.raises(ValueError, match="needs private_images"):
            filtering.filter_candidates(
                jax.random.key(0),
                np.zeros((2, 2, 2, 1), np.float32),
                np.array([0, 0]),
                counts=[1],
                num_classes=1,
                privacy_threshold=0.1,
            )

    def test_quality_filter_keeps_confident_samples_at_requested_size(self):
        data = datasets.load_dataset("digits", train_size=300, seed=0)
        rng = np.random.default_rng(0)
        # A quarter of the candidates are failed samples: uniform noise with a class label.
        noise = rng.uniform(-1, 1, (100, 8, 8, 1)).astype(np.float32)
        images = np.concatenate([data.train_images, noise])
        labels = np.concatenate([data.train_labels, np.arange(100) % 10]).astype(np.int32)
        is_noise = np.arange(len(labels)) >= len(data.train_labels)
        counts = np.bincount(data.train_labels, minlength=10)

        result = filtering.filter_candidates(
            jax.random.key(0),
            images,
            labels,
            counts=counts,
            num_classes=10,
            quality=True,
            classifier_config=QUALITY_CLASSIFIER,
        )

        assert np.bincount(result.labels, minlength=10).tolist() == counts.tolist()
        assert result.summary["shortfall"] == 0
        dropped = np.setdiff1d(np.arange(len(labels)), result.kept)
        for label in range(10):
            kept_scores = result.confidence[result.kept][result.labels == label]
            dropped_scores = result.confidence[dropped][labels[dropped] == label]
            assert kept_scores.min() >= dropped_scores.max()
        # 75% of the candidates are digits; the kept ones are digits far more often.
        assert np.mean(~is_noise[result.kept]) >= 0.9
