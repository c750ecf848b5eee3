"""Tests for DP-MERF: random features, the embedding and its release, and the generator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from sklearn.datasets import load_digits

from ppds_jax.generators import base, dp_merf

SMALL_CONFIG = {
    "num_epochs": 3,
    "batch_size": 100,
    "learning_rate": 1e-3,
    "num_features": 500,
    "latent_dim": 8,
    "hidden_sizes": (64,),
    "embedding_chunk_size": 256,
}


def _config(**overrides):
    return base.resolve_config(dp_merf.FAMILY, {**SMALL_CONFIG, **overrides})


@pytest.fixture(scope="module")
def digits():
    """Digits as (N, 8, 8, 1) float32 in [-1, 1] and int32 labels."""
    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return images, data.target.astype(np.int32)


def _analytic_gaussian_noise_multiplier(epsilon, delta):
    """Smallest sigma / sensitivity meeting (epsilon, delta) for one Gaussian release.

    Balle and Wang (2018), Theorem 8: with sensitivity 1, the Gaussian mechanism is
    (epsilon, delta)-DP exactly when
    Phi(1 / (2 s) - epsilon s) - exp(epsilon) Phi(-1 / (2 s) - epsilon s) <= delta.
    """

    def delta_gap(s):
        exact_delta = scipy.stats.norm.cdf(1 / (2 * s) - epsilon * s) - np.exp(
            epsilon
        ) * scipy.stats.norm.cdf(-1 / (2 * s) - epsilon * s)
        return exact_delta - delta

    return scipy.optimize.brentq(delta_gap, 1e-3, 1e3, xtol=1e-10)


class TestRandomFeatures:
    def test_features_have_unit_norm(self):
        frequencies = dp_merf.rff_frequencies(
            jax.random.key(0), num_pixels=5, num_features=40, bandwidth=1.0
        )
        points = jax.random.normal(jax.random.key(1), (7, 5)) * 3.0
        features = dp_merf.random_fourier_features(points, frequencies)
        assert features.shape == (7, 40)
        np.testing.assert_allclose(jnp.linalg.norm(features, axis=1), 1.0, rtol=1e-5)

    def test_kernel_matches_gaussian_for_large_d(self):
        # With m = 20,000 frequencies each estimate averages m terms cos(w^T (x - x')) of
        # variance at most 1/2, so its standard deviation is at most 0.005; 0.03 is 6 of them.
        bandwidth = 2.0
        frequencies = dp_merf.rff_frequencies(
            jax.random.key(0), num_pixels=6, num_features=40_000, bandwidth=bandwidth
        )
        points = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
        features = np.asarray(dp_merf.random_fourier_features(jnp.asarray(points), frequencies))
        estimated = features @ features.T
        squared_distances = np.sum((points[:, None] - points[None]) ** 2, axis=-1)
        exact = np.exp(-squared_distances / (2 * bandwidth**2))
        np.testing.assert_allclose(estimated, exact, atol=0.03)
        assert exact.min() < 0.5  # the pairs span a range of kernel values, not only ~1

    def test_odd_num_features_rejected(self):
        with pytest.raises(ValueError, match="num_features=7"):
            dp_merf.rff_frequencies(jax.random.key(0), num_pixels=3, num_features=7, bandwidth=1.0)


class TestEmbedding:
    def _setup(self):
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, size=(10, 2, 2, 1)).astype(np.float32)
        labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2], np.int32)
        frequencies = dp_merf.rff_frequencies(
            jax.random.key(0), num_pixels=4, num_features=12, bandwidth=1.0
        )
        return images, labels, frequencies

    def test_matches_explicit_sum(self):
        images, labels, frequencies = self._setup()
        weight, dataset_size = 0.3, 16
        embedding = dp_merf.mean_embedding(
            images,
            labels,
            frequencies=frequencies,
            num_classes=3,
            dataset_size=dataset_size,
            count_feature_weight=weight,
            chunk_size=3,  # 10 rows in chunks of 3 exercises the padded last chunk
        )
        freq = np.asarray(frequencies, np.float64)
        expected = np.zeros((13, 3))
        for image, label in zip(images, labels, strict=True):
            projection = image.reshape(-1).astype(np.float64) @ freq
            phi = np.concatenate([np.cos(projection), np.sin(projection)]) / np.sqrt(6)
            psi = np.append(np.sqrt(1 - weight**2) * phi, weight)
            expected[:, label] += psi / dataset_size
        np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(embedding[-1], weight * np.array([4, 3, 3]) / dataset_size)

    def test_neighbour_changes_embedding_by_sensitivity(self):
        # Removing one example changes M by psi(x) onehot(y)^T / N, of norm exactly 1 / N.
        images, labels, frequencies = self._setup()
        kwargs = dict(
            frequencies=frequencies, num_classes=3, dataset_size=10, count_feature_weight=0.3
        )
        full = dp_merf.mean_embedding(images, labels, **kwargs)
        for removed in range(len(labels)):
            keep = np.arange(len(labels)) != removed
            neighbour = dp_merf.mean_embedding(images[keep], labels[keep], **kwargs)
            change = float(jnp.linalg.norm(full - neighbour))
            assert change == pytest.approx(dp_merf.embedding_sensitivity(10), rel=1e-4)

    def test_decode_recovers_class_proportions(self):
        images, labels, frequencies = self._setup()
        embedding = dp_merf.mean_embedding(
            images,
            labels,
            frequencies=frequencies,
            num_classes=3,
            dataset_size=20,  # public size larger than the realised 10 rows
            count_feature_weight=0.3,
        )
        target, proportions = dp_merf.decode_embedding(embedding, count_feature_weight=0.3)
        np.testing.assert_allclose(proportions, [0.4, 0.3, 0.3], rtol=1e-5)
        # Each column is (n_k / n) times the class-mean feature, whatever the public size.
        projection = images.reshape(10, -1) @ np.asarray(frequencies)
        phi = np.concatenate([np.cos(projection), np.sin(projection)], axis=1) / np.sqrt(6)
        np.testing.assert_allclose(target[:, 0], phi[labels == 0].sum(axis=0) / 10, atol=1e-5)


class TestPrivateRelease:
    def test_noise_multiplier_matches_analytic_gaussian(self):
        privacy = base.PrivacySpec(target_epsilon=1.0, target_delta=1e-5, dataset_size=1000)
        calibrated = dp_merf.embedding_noise_multiplier(privacy)
        analytic = _analytic_gaussian_noise_multiplier(1.0, 1e-5)
        # PLD is tight for one Gaussian release up to its discretisation, which errs on the
        # safe (larger) side; the calibration tolerance is 1e-4.
        assert calibrated == pytest.approx(analytic, rel=5e-3)
        assert calibrated >= analytic * (1 - 1e-4)

    def test_rdp_noise_multiplier_is_conservative(self):
        privacy = base.PrivacySpec(1.0, 1e-5, 1000, accountant="rdp")
        assert dp_merf.embedding_noise_multiplier(privacy) > _analytic_gaussian_noise_multiplier(
            1.0, 1e-5
        )

    def test_release_noise_has_calibrated_std(self, digits):
        images, labels = digits[0][:300], digits[1][:300]
        privacy = base.PrivacySpec(
            target_epsilon=2.0, target_delta=1e-5, dataset_size=300, accountant="rdp"
        )
        frequencies = dp_merf.rff_frequencies(
            jax.random.key(0), num_pixels=64, num_features=200, bandwidth=4.0
        )
        kwargs = dict(frequencies=frequencies, num_classes=10, count_feature_weight=0.3)
        exact = dp_merf.mean_embedding(images, labels, dataset_size=300, **kwargs)
        residuals = []
        num_draws = 20
        for draw in range(num_draws):
            noisy, ledger = dp_merf.private_embedding(
                jax.random.key(draw), images, labels, privacy=privacy, **kwargs
            )
            residuals.append(np.asarray(noisy - exact).ravel())
        residuals = np.concatenate(residuals)
        expected_std = dp_merf.embedding_noise_multiplier(privacy) / 300
        # For n Gaussian values the sample std has a standard error of about std / sqrt(2 n),
        # and the sample mean one of std / sqrt(n). Both checks allow 4 standard errors.
        count = residuals.size
        assert count == num_draws * 201 * 10
        assert residuals.std() == pytest.approx(expected_std, rel=4 / np.sqrt(2 * count))
        assert abs(residuals.mean()) < 4 * expected_std / np.sqrt(count)
        assert ledger.stages[0].parameters["noise_std"] == pytest.approx(expected_std)


class TestFamily:
    @pytest.mark.parametrize("image_shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
    def test_parameter_and_sample_shapes(self, image_shape):
        # eval_shape traces init and sample without compiling them, which keeps this cheap;
        # the other tests run both for real on 8x8 images. The static entries of the state
        # stay plain Python values.
        config = _config()
        static = {"image_shape": image_shape, "num_classes": 10}
        arrays = jax.eval_shape(
            lambda: dp_merf.init(
                jax.random.key(0), image_shape=image_shape, num_classes=10, config=config
            )
        )
        state = {**arrays, **static}
        kernels = [leaf.shape for leaf in jax.tree.leaves(state["params"]) if leaf.ndim == 2]
        assert kernels == [(8 + 10, 64), (64, int(np.prod(image_shape)))]
        images = jax.eval_shape(
            lambda arrays: dp_merf.sample(
                jax.random.key(1), {**arrays, **static}, np.arange(5), config=config
            ),
            {name: value for name, value in arrays.items() if name not in static},
        )
        assert images.shape == (5, *image_shape)
        assert images.dtype == jnp.float32

    def test_same_key_same_samples(self):
        config = _config()
        state = dp_merf.init(
            jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=config
        )
        labels = np.array([0, 3, 9, 3])
        first = dp_merf.sample(jax.random.key(5), state, labels, config=config)
        assert first.shape == (4, 8, 8, 1)
        assert float(jnp.max(jnp.abs(first))) <= 1.0
        again = dp_merf.sample(jax.random.key(5), state, labels, config=config)
        other = dp_merf.sample(jax.random.key(6), state, labels, config=config)
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other)

    def test_label_out_of_range_rejected(self):
        config = _config()
        state = dp_merf.init(
            jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=config
        )
        with pytest.raises(ValueError, match="labels must be in"):
            dp_merf.sample(jax.random.key(0), state, np.array([0, 10]), config=config)
        with pytest.raises(ValueError, match="labels must be in"):
            dp_merf.sample(jax.random.key(0), state, np.array([-1]), config=config)

    def test_fit_lowers_mmd_loss(self, digits):
        images, labels = digits
        config = _config(num_epochs=3, relative_bandwidth=0.5)
        state = dp_merf.init(
            jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=config
        )
        result = dp_merf.fit(jax.random.key(1), state, images, labels, config=config)
        assert result.ledger is None

        # The objective at a fixed key, against the exact embedding, before and after training.
        frequencies = dp_merf._frequencies(state, config)
        embedding = dp_merf.mean_embedding(
            images,
            labels,
            frequencies=frequencies,
            num_classes=10,
            dataset_size=len(labels),
            count_feature_weight=config["count_feature_weight"],
        )
        target, proportions = dp_merf.decode_embedding(
            embedding, count_feature_weight=config["count_feature_weight"]
        )

        def objective(params):
            return float(
                dp_merf.mmd_loss(
                    params,
                    jax.random.key(99),
                    target,
                    generator=dp_merf._generator_module((8, 8, 1), config),
                    frequencies=frequencies,
                    class_proportions=proportions,
                    num_samples=500,
                    latent_dim=config["latent_dim"],
                )
            )

        before, after = objective(state["params"]), objective(result.state["params"])
        assert after < 0.5 * before
        np.testing.assert_allclose(
            result.state["class_proportions"], np.bincount(labels) / len(labels), rtol=1e-5
        )

    def test_private_fit_ledger_meets_target(self, digits):
        images, labels = digits
        config = _config(num_epochs=1)
        privacy = base.PrivacySpec(
            target_epsilon=1.0, target_delta=1e-5, dataset_size=1800, accountant="rdp"
        )
        state = dp_merf.init(
            jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=config
        )
        result = dp_merf.fit(
            jax.random.key(1), state, images, labels, config=config, privacy=privacy
        )
        assert [stage.name for stage in result.ledger.stages] == ["mean_embedding"]
        assert result.ledger.epsilon(1e-5, accountant="rdp") <= 1.0
        proportions = np.asarray(result.state["class_proportions"])
        assert proportions.sum() == pytest.approx(1.0, rel=1e-5)
        assert proportions.min() >= 0.0

    def test_has_no_white_box_scores(self):
        assert dp_merf.FAMILY.member_scores is None
        assert dp_merf.FAMILY.name == "dp_merf"
