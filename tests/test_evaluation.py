"""Tests of the attacks on each release, from recorded signals to metrics.json records."""

import jax
import numpy as np
import pytest

from ppds_jax import datasets, evaluation, features, membership, metrics
from ppds_jax.attacks import registry
from ppds_jax.pipeline import PipelineSpec, collect_signals, run_pipeline, synthetic_set_signals

NUM_CLASSES = 3


def _masks(pool_size=60, num_shadows=4, seed=0):
    target, shadows = membership.membership_masks(
        seed=seed, pool_size=pool_size, num_shadows=num_shadows
    )
    return np.concatenate([target[None], shadows])


def _fake_signals(masks, *, seed=0, with_generator_score=True):
    """Random signals of every kind for M masks and N pool examples (P = 20 population)."""
    rng = np.random.default_rng(seed)
    num_masks, pool_size = masks.shape
    saved = {
        "logits": rng.normal(size=(num_masks, pool_size, NUM_CLASSES)),
        "population_logits": rng.normal(size=(num_masks, 20, NUM_CLASSES)),
        "attacker_logits": rng.normal(size=(num_masks, pool_size, NUM_CLASSES)),
        "synthetic_distance": rng.uniform(1, 2, size=(num_masks, pool_size)),
        "synthetic_feature_distance": rng.uniform(1, 2, size=(num_masks, pool_size)),
        "density_ratio": rng.normal(size=(num_masks, pool_size)),
        "test_accuracy": rng.uniform(size=num_masks),
    }
    if with_generator_score:
        saved["generator_score"] = rng.normal(size=(num_masks, pool_size))
    return saved


def _labels(pool_size=60):
    return np.arange(pool_size) % NUM_CLASSES, np.arange(20) % NUM_CLASSES


def test_scorers_cover_the_registry():
    assert set(evaluation.SCORERS) == set(registry.ATTACKS)


@pytest.mark.parametrize("release", registry.RELEASES)
def test_default_attacks_are_the_registry_attacks(release):
    masks = _masks()
    labels, population_labels = _labels()
    scores = evaluation.release_scores(
        release, _fake_signals(masks), labels, population_labels, masks
    )
    assert tuple(scores) == registry.attacks_for_release(release)
    for values in scores.values():
        assert values.shape == (masks.shape[1],)
        assert np.isfinite(values).all()


def test_attack_on_wrong_release_names_fitting_ones():
    masks = _masks()
    labels, population_labels = _labels()
    with pytest.raises(ValueError, match="does not fit release 'real_classifier'") as error:
        evaluation.release_scores(
            "real_classifier",
            _fake_signals(masks),
            labels,
            population_labels,
            masks,
            attacks=["gan_leaks_pixel"],
        )
    for name in registry.attacks_for_release("real_classifier"):
        assert name in str(error.value)


def test_named_attack_with_too_few_shadows_raises():
    masks = _masks(num_shadows=2)
    labels, population_labels = _labels()
    with pytest.raises(ValueError, match="needs >= 4 reference model"):
        evaluation.release_scores(
            "real_classifier",
            _fake_signals(masks),
            labels,
            population_labels,
            masks,
            attacks=["lira_online"],
        )


def test_default_plan_records_skipped_attacks():
    masks = _masks(num_shadows=2)
    saved = _fake_signals(masks, with_generator_score=False)
    names, skipped = evaluation.plan_attacks("generator", saved, num_reference_models=2)
    assert "gan_leaks_pixel" in names
    assert "synthetic_lira" not in names
    assert skipped["synthetic_lira"] == "needs >= 4 reference models; got 2"
    assert "white_box_loss" in skipped


def test_default_plan_skips_non_finite_signals():
    masks = _masks()
    saved = _fake_signals(masks)
    saved["density_ratio"][2, :5] = np.nan
    names, skipped = evaluation.plan_attacks("synthetic_data", saved, num_reference_models=4)
    assert "domias" not in names
    assert skipped["domias"].endswith("{'density_ratio': 5}")
    assert "gan_leaks_pixel" in names


def test_missing_signal_of_named_attack_raises():
    masks = _masks()
    labels, population_labels = _labels()
    with pytest.raises(ValueError, match="generator_score"):
        evaluation.release_scores(
            "generator",
            _fake_signals(masks, with_generator_score=False),
            labels,
            population_labels,
            masks,
            attacks=["white_box_loss"],
        )


def test_nan_signal_is_rejected_with_count():
    masks = _masks()
    labels, population_labels = _labels()
    saved = _fake_signals(masks)
    saved["generator_score"][0, :3] = np.nan
    with pytest.raises(ValueError, match="3 NaN"):
        evaluation.release_scores(
            "generator", saved, labels, population_labels, masks, attacks=["white_box_loss"]
        )


@pytest.mark.parametrize("release", registry.RELEASES)
def test_scores_do_not_read_target_mask(release):
    masks = _masks()
    flipped = masks.copy()
    flipped[0] = ~flipped[0]
    labels, population_labels = _labels()
    saved = _fake_signals(masks)
    scores = evaluation.release_scores(release, saved, labels, population_labels, masks)
    scores_flipped = evaluation.release_scores(release, saved, labels, population_labels, flipped)
    for name, values in scores.items():
        np.testing.assert_array_equal(values, scores_flipped[name])


class TestReleaseRecord:
    LEDGER = {"epsilon_pld": 2.0, "epsilon_rdp": 2.5, "target_delta": 1e-5, "stages": []}

    def _record(self, spec, release):
        masks = _masks()
        labels, population_labels = _labels()
        record, curves = evaluation.release_record(
            spec,
            release,
            _fake_signals(masks),
            masks=masks,
            pool_labels=labels,
            population_labels=population_labels,
            target_delta=1e-5,
            ledger=self.LEDGER,
        )
        return record, curves

    def test_dp_release_reports_accounted_and_empirical_epsilon(self):
        spec = PipelineSpec(name="vae_eps2", generator="vae", epsilon=2.0)
        record, curves = self._record(spec, "generator")
        assert record["epsilon"] == 2.0
        assert record["delta"] == 1e-5
        assert record["dp_guarantee_void_by"] is None
        bounds = {name: values["epsilon_lower_bound"] for name, values in record["mia"].items()}
        assert record["epsilon_lower_bound"] == max(bounds.values())
        assert record["epsilon_lower_bound_attack"] in bounds
        assert set(curves) == set(record["mia"])

    def test_privacy_filter_voids_synthetic_releases_only(self):
        spec = PipelineSpec(
            name="vae_eps2_filtered", generator="vae", epsilon=2.0, privacy_filter_threshold=1.0
        )
        for release in ("synthetic_data", "synthetic_classifier"):
            record, _ = self._record(spec, release)
            assert record["dp_guarantee_void_by"] == "privacy_filter"
            assert record["epsilon"] is None
            assert record["epsilon_rdp"] is None
            assert record["delta"] is None
            assert record["ledger"] is None
            assert record["generator_ledger"] == self.LEDGER
        record, _ = self._record(spec, "generator")
        assert record["dp_guarantee_void_by"] is None
        assert record["epsilon"] == 2.0

    def test_non_private_release_has_no_epsilon_bound(self):
        record, _ = self._record(PipelineSpec(name="real"), "real_classifier")
        assert record["epsilon"] is None
        assert "epsilon_lower_bound" not in record
        assert all("epsilon_lower_bound" not in values for values in record["mia"].values())

    def test_release_of_other_variant_raises(self):
        with pytest.raises(ValueError, match="releases \\['real_classifier'\\]"):
            self._record(PipelineSpec(name="real"), "generator")


def test_nearest_neighbour_attack_finds_exact_copies():
    rng = np.random.default_rng(0)
    pool_size = 120
    pool = rng.uniform(-1, 1, (pool_size, 8, 8, 1)).astype(np.float32)
    population = rng.uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)
    labels = (np.arange(pool_size) % NUM_CLASSES).astype(np.int32)
    masks = _masks(pool_size=pool_size)
    # Each pipeline "releases" exact copies of its members.
    per_mask = [
        synthetic_set_signals(
            jax.random.key(0),
            pool[mask],
            labels[mask],
            pool,
            population,
            num_classes=NUM_CLASSES,
            attacker_classifier_config=None,
        )
        for mask in masks
    ]
    saved = evaluation.stack_signals(per_mask)
    assert np.all(saved["synthetic_distance"][0][masks[0]] == 0)

    scores = evaluation.release_scores(
        "synthetic_data",
        saved,
        labels,
        labels[:0],
        masks,
        attacks=["gan_leaks_pixel", "gan_leaks_feature"],
    )
    for name, values in scores.items():
        assert metrics.attack_metrics(values, masks[0])["auc"] == 1.0, name


class TestFeatureExtractors:
    def test_random_extractor_depends_only_on_seed(self):
        images = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
        first = features.embed(features.random_extractor((8, 8, 1), seed=0), images)
        again = features.embed(features.random_extractor((8, 8, 1), seed=0), images)
        other = features.embed(features.random_extractor((8, 8, 1), seed=1), images)
        assert first.shape == (5, 128)
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other)

    def test_population_extractor_embeds_to_hidden_width(self):
        (images, labels), _ = _pool_and_population(40, 0)
        extractor = features.population_extractor(
            jax.random.key(0), images, labels, num_classes=10, num_steps=2, batch_size=8
        )
        assert features.embed(extractor, images[:3]).shape == (3, 128)


def _pool_and_population(pool_size, population_size):
    data = datasets.load_dataset("digits", train_size=pool_size + population_size, seed=0)
    images, labels = data.train_images, data.train_labels
    return (images[:pool_size], labels[:pool_size]), (images[pool_size:], labels[pool_size:])


def _run_on_masks(spec, pool, population, masks, *, target_delta=1e-5):
    """Run `spec` on every mask; return the stacked signals and the target's output."""
    (pool_images, pool_labels), (population_images, _) = pool, population
    public_size = membership.expected_member_count(len(pool_labels), 0.5)
    per_mask, outputs = [], []
    for index, mask in enumerate(masks):
        output = run_pipeline(
            jax.random.key(index),
            pool_images[mask],
            pool_labels[mask],
            spec=spec,
            num_classes=10,
            public_dataset_size=public_size,
            target_delta=target_delta,
        )
        per_mask.append(
            collect_signals(
                jax.random.key(100 + index), output, pool_images, pool_labels, population_images
            )
        )
        outputs.append(output)
    return evaluation.stack_signals(per_mask), outputs[0]


def test_lira_beats_loss_threshold_on_overfit_classifier():
    # 150 members and 60 epochs: the classifier memorises its training set.
    pool, population = _pool_and_population(300, 50)
    masks = _masks(pool_size=300, num_shadows=4)
    spec = PipelineSpec(
        name="overfit",
        classifier_config={"num_epochs": 60, "batch_size": 16, "hidden": 128},
    )
    saved, _ = _run_on_masks(spec, pool, population, masks)

    # With 4 shadows each example has 2 IN and 2 OUT signals, too few for per-example
    # variances; LiRA online with one global variance is the variant meant for few shadows.
    scores = evaluation.classifier_attack_scores(
        saved,
        pool[1],
        population[1],
        masks,
        attacks=["loss_threshold", "lira_online_fixed_variance"],
    )
    lira = metrics.attack_metrics(scores["lira_online_fixed_variance"], masks[0])
    loss = metrics.attack_metrics(scores["loss_threshold"], masks[0])
    assert lira["tpr_at_fpr_0.01"] >= 3 * loss["tpr_at_fpr_0.01"]
    assert lira["tpr_at_fpr_0.01"] - loss["tpr_at_fpr_0.01"] >= 0.03
    assert lira["auc"] > loss["auc"]


def test_empirical_epsilon_of_dp_release_is_below_accounted():
    pool, population = _pool_and_population(200, 50)
    masks = _masks(pool_size=200, num_shadows=4)
    spec = PipelineSpec(
        name="dp_real_eps1",
        epsilon=1.0,
        classifier_config={"num_epochs": 2, "batch_size": 32, "features": (8, 16), "hidden": 32},
    )
    saved, target_output = _run_on_masks(spec, pool, population, masks)
    ledger = target_output.ledger.to_dict(1e-5)

    record, _ = evaluation.release_record(
        spec,
        "dp_real_classifier",
        saved,
        masks=masks,
        pool_labels=pool[1],
        population_labels=population[1],
        target_delta=1e-5,
        ledger=ledger,
    )
    assert record["epsilon"] == ledger["epsilon_pld"]
    assert record["epsilon"] <= 1.0 + 1e-6
    assert set(record["mia"]) == set(registry.attacks_for_release("dp_real_classifier"))
    for name, values in record["mia"].items():
        assert 0.0 <= values["epsilon_lower_bound"] <= record["epsilon"], name
    assert record["epsilon_lower_bound"] <= record["epsilon"]


def test_stack_signals_rejects_masks_with_different_signals():
    with pytest.raises(ValueError, match="mask 1 recorded"):
        evaluation.stack_signals([{"a": np.zeros(2)}, {"b": np.zeros(2)}])
