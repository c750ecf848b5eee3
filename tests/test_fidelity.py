"""Tests for the offline fidelity proxy (Frechet distance, precision and recall)."""

import jax
import numpy as np
import pytest
import scipy.linalg
from sklearn.datasets import load_digits

from ppds_jax import fidelity


def _digits_split():
    """Digits as (N, 8, 8, 1) float32 in [-1, 1], split 1,500 train / rest test."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1500], order[1500:]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def digits_and_extractor():
    """Digits train and test images, and an extractor trained on the train split only."""
    train_images, train_labels, test_images, _ = _digits_split()
    extractor = fidelity.train_feature_extractor(
        jax.random.key(0),
        train_images,
        train_labels,
        num_classes=10,
        num_steps=150,
        batch_size=64,
        features=(8, 16),
        hidden=32,
    )
    return train_images, test_images, extractor


class TestFrechetDistance:
    def test_identical_sets_give_zero(self):
        features = np.random.default_rng(0).normal(size=(500, 6))
        assert fidelity.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)

    def test_matches_closed_form_for_known_gaussians(self):
        # Whitened samples have exactly the target mean and covariance, so the closed form
        # with scipy.linalg.sqrtm applies without sampling error.
        rng = np.random.default_rng(1)
        dim, n = 4, 400
        mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
        factor_a, factor_b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        cov_a, cov_b = (
            factor_a @ factor_a.T + np.eye(dim),
            factor_b @ factor_b.T + 0.1 * np.eye(dim),
        )

        def with_moments(mean, cov, seed):
            raw = np.random.default_rng(seed).normal(size=(n, dim))
            raw -= raw.mean(axis=0)
            whitened = raw @ np.linalg.inv(np.linalg.cholesky(np.cov(raw, rowvar=False)).T)
            return whitened @ np.linalg.cholesky(cov).T + mean

        features_a, features_b = with_moments(mean_a, cov_a, 2), with_moments(mean_b, cov_b, 3)
        expected = np.sum((mean_a - mean_b) ** 2) + np.trace(
            cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
        )
        assert fidelity.frechet_distance(features_a, features_b) == pytest.approx(
            expected, rel=1e-6
        )

    def test_shifted_mean_adds_squared_shift(self):
        features = np.random.default_rng(4).normal(size=(300, 3))
        shift = np.array([1.0, -2.0, 0.5])
        expected = float(np.sum(shift**2))
        assert fidelity.frechet_distance(features, features + shift) == pytest.approx(expected)

    def test_rejects_mismatched_widths(self):
        with pytest.raises(ValueError, match="width"):
            fidelity.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


class TestPrecisionRecall:
    def test_identical_sets_give_one(self):
        features = np.random.default_rng(0).normal(size=(200, 5))
        precision, recall = fidelity.precision_recall(features, features, k=3)
        assert precision == 1.0
        assert recall == 1.0

    def test_same_distribution_gives_high_values(self):
        rng = np.random.default_rng(1)
        real, fake = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
        precision, recall = fidelity.precision_recall(real, fake, k=5)
        assert precision > 0.85
        assert recall > 0.85

    def test_disjoint_sets_give_zero(self):
        rng = np.random.default_rng(2)
        real = rng.normal(size=(200, 4))
        fake = rng.normal(size=(200, 4)) + 100.0
        precision, recall = fidelity.precision_recall(real, fake, k=5)
        assert precision == 0.0
        assert recall == 0.0

    def test_collapsed_fakes_have_precision_but_no_recall(self):
        # All fakes near one real point: on the real manifold, but covering almost none of it.
        rng = np.random.default_rng(3)
        real = rng.normal(size=(300, 2))
        fake = real[0] + 1e-3 * rng.normal(size=(300, 2))
        precision, recall = fidelity.precision_recall(real, fake, k=5)
        assert precision == 1.0
        assert recall < 0.05

    def test_rejects_k_not_below_set_size(self):
        with pytest.raises(ValueError, match="n >= 6"):
            fidelity.precision_recall(np.zeros((5, 2)), np.zeros((10, 2)), k=5)


class TestFidelityProxy:
    def test_embed_shape_and_batching(self, digits_and_extractor):
        train_images, _, extractor = digits_and_extractor
        whole = fidelity.embed(extractor, train_images[:50], batch_size=512)
        batched = fidelity.embed(extractor, train_images[:50], batch_size=16)
        assert whole.shape == (50, 32)
        np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)

    def test_real_test_split_is_closer_than_noise(self, digits_and_extractor):
        train_images, test_images, extractor = digits_and_extractor
        noise = np.random.default_rng(0).uniform(-1, 1, size=test_images.shape).astype(np.float32)
        real_vs_real = fidelity.fidelity_proxy(extractor, train_images, test_images)
        real_vs_noise = fidelity.fidelity_proxy(extractor, train_images, noise)
        assert set(real_vs_real) == {"frechet_distance_proxy", "precision", "recall"}
        assert real_vs_real["frechet_distance_proxy"] * 5 < real_vs_noise["frechet_distance_proxy"]
        assert real_vs_real["precision"] > real_vs_noise["precision"]
        assert real_vs_real["recall"] > real_vs_noise["recall"]

    def test_rejects_label_out_of_range(self):
        images = np.zeros((4, 8, 8, 1), np.float32)
        labels = np.array([0, 1, 2, 10])
        with pytest.raises(ValueError, match="labels must be in"):
            fidelity.train_feature_extractor(
                jax.random.key(0), images, labels, num_classes=10, num_steps=1
            )
