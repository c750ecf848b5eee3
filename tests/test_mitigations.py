"""End-to-end test of every mitigation in one private synthetic pipeline with real components.

One run of `run_pipeline` trains a DP VAE on 200 digits, draws twice the requested candidates,
passes them through the privacy and quality filters, and trains the released classifier with
early stopping on held-out synthetic samples.
"""

import jax
import numpy as np
import pytest

from ppds_jax import datasets
from ppds_jax.pipeline import PipelineSpec, run_pipeline

PUBLIC_DATASET_SIZE = 200
THRESHOLD = 6.0
SPEC = PipelineSpec(
    name="vae_eps4_mitigated",
    generator="vae",
    epsilon=4.0,
    generator_config={"num_epochs": 2, "batch_size": 32, "hidden": 64, "latent_dim": 8},
    classifier_config={
        "num_epochs": 3,
        "batch_size": 32,
        "weight_decay": 1e-4,
        "label_smoothing": 0.1,
        "early_stopping_patience": 1,
    },
    synthetic_multiplier=2.0,
    class_weights=(2.0,) + (1.0,) * 9,
    quality_filter=True,
    privacy_filter_threshold=THRESHOLD,
    filter_oversample=2.0,
)


@pytest.fixture(scope="module")
def members_and_output():
    data = datasets.load_dataset("digits", train_size=PUBLIC_DATASET_SIZE, seed=0)
    output = run_pipeline(
        jax.random.key(0),
        data.train_images,
        data.train_labels,
        spec=SPEC,
        num_classes=10,
        public_dataset_size=PUBLIC_DATASET_SIZE,
        target_delta=1e-5,
    )
    return data.train_images, output


def test_filtered_set_has_requested_size_and_class_weights(members_and_output):
    _, output = members_and_output
    # 2 * 200 = 400 samples; class 0 has weight 2 of 11, so 400 * 2 / 11 = 72.7 -> 73.
    counts = np.bincount(output.synthetic_labels, minlength=10)
    assert counts.sum() == 400
    assert counts[0] == 73
    assert counts[1:].min() >= 36
    assert output.filter_summary["num_candidates"] == 800
    assert output.filter_summary["shortfall"] == 0


def test_no_released_sample_is_near_a_member(members_and_output):
    members, output = members_and_output
    flat_members = members.reshape(len(members), -1).astype(np.float64)
    for sample in output.synthetic_images.reshape(len(output.synthetic_images), -1):
        nearest = np.sqrt(((flat_members - sample) ** 2).sum(axis=1)).min()
        assert nearest > THRESHOLD


def test_privacy_filter_voids_the_synthetic_ledger_only(members_and_output):
    _, output = members_and_output
    generator_ledger = output.ledger.to_dict(1e-5)
    assert 0 < generator_ledger["epsilon_pld"] <= 4.0 + 1e-6
    synthetic_ledger = output.synthetic_ledger.to_dict(1e-5)
    assert synthetic_ledger["epsilon_pld"] is None
    assert synthetic_ledger["stages"][-1]["name"] == "privacy_filter"
    assert SPEC.dp_guarantee_void_by("synthetic_data") == "privacy_filter"


def test_quality_filter_kept_its_most_confident_candidates(members_and_output):
    _, output = members_and_output
    summary = output.filter_summary
    assert 0 < summary["quality_min_kept_confidence"] <= summary["quality_mean_kept_confidence"]


def test_classifier_stopped_on_synthetic_validation(members_and_output):
    _, output = members_and_output
    history = output.classifier.history
    assert 1 <= len(history["validation_accuracy"]) <= 3
    best = int(np.argmax(history["validation_accuracy"])) + 1
    assert output.classifier.selected_epoch == best
    assert output.classifier.ledger is None
