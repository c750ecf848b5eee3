"""Tests of PipelineSpec validation and of how run_pipeline wires sampling, filters and training.

A fake generator family and a recording stand-in for `classifier.train_classifier` keep these
tests free of training; tests/test_mitigations.py runs the same paths with real components.
"""

import dataclasses

import dp_accounting
import jax
import numpy as np
import pytest

from ppds_jax import accounting, classifier, generators, pipeline
from ppds_jax.generators.base import FitResult, GeneratorFamily
from ppds_jax.pipeline import PipelineSpec, run_pipeline

IMAGE_SHAPE = (4, 4, 1)
NUM_CLASSES = 2


def _fake_fit(key, state, images, labels, *, config, privacy, progress):
    del key, state, labels, config, progress
    ledger = None
    if privacy is not None:
        ledger = accounting.PrivacyLedger()
        ledger.add_stage("fake_dp", dp_accounting.GaussianDpEvent(1.0))
    return FitResult(state={"members": np.asarray(images)}, ledger=ledger, history={})


def _fake_sample(key, state, labels, *, config):
    """Even positions copy a member, odd positions are uniform noise."""
    del config
    members = state["members"]
    noise = np.asarray(jax.random.uniform(key, (len(labels), *IMAGE_SHAPE), minval=-1.0))
    copies = members[np.arange(len(labels)) % len(members)]
    return np.where((np.arange(len(labels)) % 2 == 0)[:, None, None, None], copies, noise)


FAKE_FAMILY = GeneratorFamily(
    name="fake",
    description="copies members at even positions",
    default_config={},
    init=lambda key, *, image_shape, num_classes, config: {},
    fit=_fake_fit,
    sample=_fake_sample,
)


@pytest.fixture
def trained_on(monkeypatch):
    """Replace the generator registry and classifier training; return the training calls."""
    calls = []

    def record(key, images, labels, *, num_classes, config=None, privacy=None, **options):
        calls.append({"images": images, "labels": labels, "privacy": privacy, **options})
        return classifier.ClassifierResult(
            params=None,
            config=classifier.resolve_config(config),
            num_classes=num_classes,
            ledger=None,
            history={},
            selected_epoch=1,
        )

    monkeypatch.setattr(generators, "get_family", lambda name: FAKE_FAMILY)
    monkeypatch.setattr(classifier, "train_classifier", record)
    return calls


def _members(count=40, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (count, *IMAGE_SHAPE)).astype(np.float32)
    return images, (np.arange(count) % NUM_CLASSES).astype(np.int32)


def _run(spec, images, labels, public_dataset_size=40):
    return run_pipeline(
        jax.random.key(0),
        images,
        labels,
        spec=spec,
        num_classes=NUM_CLASSES,
        public_dataset_size=public_dataset_size,
        target_delta=1e-5,
    )


class TestPipelineSpec:
    @pytest.mark.parametrize(
        "options, message",
        [
            ({"quality_filter": True}, "no generator"),
            ({"privacy_filter_threshold": 1.0}, "no generator"),
            ({"generator": "vae", "privacy_filter_threshold": -1.0}, "finite number >= 0"),
            ({"generator": "vae", "filter_oversample": 0.5}, "must be >= 1"),
            ({"generator": "vae", "quality_filter": True, "filter_oversample": 1.0}, "> 1"),
            ({"validation_fraction": 1.0}, "in \\(0, 1\\)"),
            ({"synthetic_multiplier": 0.0}, "must be > 0"),
            ({"classifier_config": {"dropout": 0.1}}, "does not accept"),
            (
                {"epsilon": 1.0, "classifier_config": {"early_stopping_patience": 2}},
                "select the model on private data",
            ),
        ],
    )
    def test_invalid_options_raise(self, options, message):
        with pytest.raises(ValueError, match=message):
            PipelineSpec(name="bad", **options)

    def test_privacy_filter_voids_synthetic_releases(self):
        spec = PipelineSpec(
            name="vae_eps1", generator="vae", epsilon=1.0, privacy_filter_threshold=1.0
        )
        assert spec.dp_guarantee_void_by("synthetic_data") == "privacy_filter"
        assert spec.dp_guarantee_void_by("synthetic_classifier") == "privacy_filter"
        assert spec.dp_guarantee_void_by("generator") is None

    def test_no_void_without_privacy_filter_or_dp(self):
        quality_only = PipelineSpec(name="q", generator="vae", epsilon=1.0, quality_filter=True)
        non_private = PipelineSpec(name="p", generator="vae", privacy_filter_threshold=1.0)
        for release in quality_only.releases:
            assert quality_only.dp_guarantee_void_by(release) is None
            assert non_private.dp_guarantee_void_by(release) is None

    def test_releases_are_unchanged_by_mitigations(self):
        spec = PipelineSpec(name="v", generator="vae", quality_filter=True)
        assert spec.releases == ("synthetic_classifier", "synthetic_data", "generator")


class TestRunPipeline:
    def test_unfiltered_set_has_requested_size_and_weights(self, trained_on):
        images, labels = _members()
        spec = PipelineSpec(
            name="v", generator="fake", synthetic_multiplier=0.5, class_weights=(3, 1)
        )
        output = _run(spec, images, labels)
        # 0.5 * 40 = 20 samples in proportions 3:1.
        assert np.bincount(output.synthetic_labels).tolist() == [15, 5]
        assert output.filter_summary is None
        assert len(trained_on) == 1
        assert trained_on[0]["validation"] is None
        np.testing.assert_array_equal(trained_on[0]["images"], output.synthetic_images)

    def test_privacy_filter_removes_copies_and_marks_ledger(self, trained_on):
        images, labels = _members()
        spec = PipelineSpec(
            name="v_eps1", generator="fake", epsilon=1.0, privacy_filter_threshold=0.5
        )
        output = _run(spec, images, labels)

        assert np.bincount(output.synthetic_labels).tolist() == [20, 20]
        flat_synthetic = output.synthetic_images.reshape(len(output.synthetic_images), -1)
        for sample in flat_synthetic:
            nearest = min(np.linalg.norm(sample - member) for member in images.reshape(40, -1))
            assert nearest > 0.5
        # Candidates at even positions were exact copies: half of 80.
        assert output.filter_summary["privacy_filter_removed"] == 40
        assert output.ledger.to_dict(1e-5)["epsilon_pld"] is not None
        synthetic_ledger = output.synthetic_ledger.to_dict(1e-5)
        assert synthetic_ledger["epsilon_pld"] is None
        assert synthetic_ledger["epsilon_rdp"] is None
        assert [stage["name"] for stage in synthetic_ledger["stages"]] == [
            "fake_dp",
            "privacy_filter",
        ]

    def test_filter_that_keeps_too_few_raises(self, trained_on):
        images, labels = _members()
        # Every candidate is within distance 100 of some member.
        spec = PipelineSpec(name="v", generator="fake", privacy_filter_threshold=100.0)
        with pytest.raises(ValueError, match="kept 0 of 80 candidates"):
            _run(spec, images, labels)

    def test_early_stopping_holds_out_part_of_synthetic_set(self, trained_on):
        images, labels = _members()
        spec = PipelineSpec(
            name="v",
            generator="fake",
            classifier_config={"early_stopping_patience": 2},
            validation_fraction=0.25,
        )
        output = _run(spec, images, labels)
        call = trained_on[0]
        validation_images, _ = call["validation"]
        # 25% of the 40 synthetic samples validate, the other 30 train.
        assert len(validation_images) == 10
        assert len(call["images"]) == 30
        together = np.concatenate([call["images"], validation_images])
        assert sorted(map(bytes, together)) == sorted(map(bytes, output.synthetic_images))

    def test_real_variant_early_stopping_holds_out_members(self, trained_on):
        images, labels = _members()
        spec = PipelineSpec(name="real", classifier_config={"early_stopping_patience": 1})
        _run(spec, images, labels)
        call = trained_on[0]
        validation_images, validation_labels = call["validation"]
        assert len(validation_images) == 4
        together = np.concatenate([call["images"], validation_images])
        assert sorted(map(bytes, together)) == sorted(map(bytes, images))
        assert call["privacy"] is None


def test_collapsed_synthetic_set_gets_nan_density_ratio():
    rng = np.random.default_rng(0)
    pool = rng.uniform(-1, 1, (30, 8, 8, 1)).astype(np.float32)
    # Identical samples, as from a collapsed generator: no density can be fitted to them.
    collapsed = np.repeat(pool[:1], 40, axis=0)
    signals = pipeline.synthetic_set_signals(
        jax.random.key(0),
        collapsed,
        np.zeros(40, np.int32),
        pool,
        pool,
        num_classes=NUM_CLASSES,
        attacker_classifier_config=None,
    )
    assert np.isnan(signals["density_ratio"]).all()
    assert np.isfinite(signals["synthetic_distance"]).all()
    assert np.isfinite(signals["synthetic_feature_distance"]).all()
    assert signals["synthetic_distance"][0] == 0


@pytest.fixture
def counted(trained_on, monkeypatch):
    """Count the fake family's fit and sample calls; return the counter."""
    calls = {"fit": 0, "sample": 0}

    def fit(*args, **kwargs):
        calls["fit"] += 1
        return _fake_fit(*args, **kwargs)

    def sample(*args, **kwargs):
        calls["sample"] += 1
        return _fake_sample(*args, **kwargs)

    family = dataclasses.replace(FAKE_FAMILY, fit=fit, sample=sample)
    monkeypatch.setattr(generators, "get_family", lambda name: family)
    return calls


def _cached_run(spec, images, labels, cache, key=0):
    return run_pipeline(
        jax.random.key(key),
        images,
        labels,
        spec=spec,
        num_classes=NUM_CLASSES,
        public_dataset_size=40,
        target_delta=1e-5,
        cache=cache,
    )


class TestStageCache:
    def test_classifier_option_reuses_generator_and_set(self, counted):
        images, labels = _members()
        cache = pipeline.StageCache()
        plain = PipelineSpec(name="plain", generator="fake")
        decayed = PipelineSpec(
            name="decayed", generator="fake", classifier_config={"weight_decay": 0.1}
        )
        first = _cached_run(plain, images, labels, cache)
        second = _cached_run(decayed, images, labels, cache)
        assert counted == {"fit": 1, "sample": 1}
        assert cache.hits == {"generator": 1, "synthetic_set": 1}
        # What the cache hands over equals what an uncached run computes.
        fresh = _cached_run(decayed, images, labels, None)
        np.testing.assert_array_equal(second.synthetic_images, fresh.synthetic_images)
        np.testing.assert_array_equal(second.synthetic_labels, fresh.synthetic_labels)
        assert second.synthetic_images is first.synthetic_images
        assert not second.synthetic_images.flags.writeable

    def test_sampling_option_reuses_only_the_generator(self, counted):
        images, labels = _members()
        cache = pipeline.StageCache()
        _cached_run(PipelineSpec(name="1x", generator="fake"), images, labels, cache)
        half = _cached_run(
            PipelineSpec(name="half", generator="fake", synthetic_multiplier=0.5),
            images,
            labels,
            cache,
        )
        assert counted == {"fit": 1, "sample": 2}
        assert len(half.synthetic_labels) == 20

    @pytest.mark.parametrize("change", ["members", "key", "epsilon"])
    def test_other_inputs_compute_again(self, counted, change):
        images, labels = _members()
        cache = pipeline.StageCache()
        spec = PipelineSpec(name="v", generator="fake")
        _cached_run(spec, images, labels, cache)
        key = 0
        if change == "members":
            images = images.copy()
            images[3, 0, 0, 0] += 0.5
        elif change == "key":
            key = 1
        else:
            spec = PipelineSpec(name="v", generator="fake", epsilon=1.0)
        _cached_run(spec, images, labels, cache, key=key)
        assert counted == {"fit": 2, "sample": 2}
        assert not cache.hits

    def test_oldest_entry_is_dropped(self, counted):
        images, labels = _members()
        other_images, other_labels = _members(seed=1)
        cache = pipeline.StageCache(max_entries=1)
        spec = PipelineSpec(name="v", generator="fake")
        _cached_run(spec, images, labels, cache)
        _cached_run(spec, other_images, other_labels, cache)
        _cached_run(spec, images, labels, cache)
        assert counted["fit"] == 3

    def test_max_entries_below_one_raises(self):
        with pytest.raises(ValueError, match="max_entries=0"):
            pipeline.StageCache(max_entries=0)


class TestCollectSignalsReleases:
    @pytest.fixture
    def output(self, trained_on, monkeypatch):
        def scores(key, state, images, labels, *, config):
            return np.zeros(len(labels), np.float32)

        family = dataclasses.replace(FAKE_FAMILY, member_scores=scores)
        monkeypatch.setattr(generators, "get_family", lambda name: family)
        monkeypatch.setattr(
            pipeline,
            "classifier_signals",
            lambda result, pool, population: {
                "logits": np.zeros((len(pool), NUM_CLASSES), np.float32),
                "population_logits": np.zeros((len(population), NUM_CLASSES), np.float32),
            },
        )
        images, labels = _members()
        return _run(PipelineSpec(name="v", generator="fake"), images, labels)

    def _signals(self, output, releases):
        images, labels = _members(seed=2)
        return pipeline.collect_signals(
            jax.random.key(0),
            output,
            images,
            labels,
            images[:20],
            attacker_classifier_config=None,
            releases=releases,
        )

    def test_classifier_release_skips_set_signals(self, output):
        signals = self._signals(output, ("synthetic_classifier",))
        assert set(signals) == {"logits", "population_logits", "synthetic_set_size"}

    def test_data_release_skips_white_box_score(self, output):
        signals = self._signals(output, ("synthetic_data",))
        assert {"synthetic_distance", "synthetic_feature_distance", "density_ratio"} <= set(signals)
        assert "generator_score" not in signals

    def test_all_releases_by_default(self, output):
        assert "generator_score" in self._signals(output, None)

    def test_release_of_another_variant_raises(self, output):
        with pytest.raises(ValueError, match="not releases of pipeline 'v'"):
            self._signals(output, ("real_classifier",))
