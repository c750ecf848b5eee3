"""Tests of classifier training, prediction and its mitigation options."""

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from ppds_jax import classifier
from ppds_jax.generators.base import PrivacySpec

CONFIG = {"num_epochs": 6, "batch_size": 32, "features": (8, 16), "hidden": 32}


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (data.images[..., None] / 8.0 - 1.0).astype(np.float32)
    labels = data.target.astype(np.int32)
    return (images[:600], labels[:600]), (images[1400:], labels[1400:])


def test_trained_classifier_beats_chance(digits):
    (images, labels), (test_images, test_labels) = digits
    result = classifier.train_classifier(
        jax.random.key(0), images, labels, num_classes=10, config=CONFIG
    )
    accuracy = classifier.accuracy_of(result.params, result.config, 10, test_images, test_labels)
    assert accuracy > 0.7
    assert result.selected_epoch == CONFIG["num_epochs"]
    assert result.ledger is None


def test_predict_logits_matches_unchunked(digits):
    (images, labels), _ = digits
    result = classifier.train_classifier(
        jax.random.key(1),
        images[:64],
        labels[:64],
        num_classes=10,
        config={**CONFIG, "num_epochs": 1},
    )
    whole = classifier.predict_logits(result.params, images[:50], config=CONFIG, num_classes=10)
    chunked = classifier.predict_logits(
        result.params, images[:50], config=CONFIG, num_classes=10, chunk_size=7
    )
    assert whole.shape == (50, 10)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_label_smoothing_changes_loss_value():
    config = classifier.resolve_config({**CONFIG, "label_smoothing": 0.2})
    loss = classifier.make_per_example_loss(config, 10)
    params = classifier._model(config, 10).init(jax.random.key(0), np.zeros((1, 8, 8, 1)))["params"]
    zero = jax.tree.map(np.zeros_like, params)
    # Zero parameters give uniform probabilities 1/10, and cross-entropy against any target
    # distribution is then log 10, smoothed or not.
    value = loss(zero, (np.zeros((8, 8, 1), np.float32), 3), None)
    np.testing.assert_allclose(value, np.log(10.0), rtol=1e-6)


def test_early_stopping_keeps_best_validation_epoch(digits):
    (images, labels), _ = digits
    validation = (images[500:], labels[500:])
    result = classifier.train_classifier(
        jax.random.key(2),
        images[:500],
        labels[:500],
        num_classes=10,
        config={**CONFIG, "early_stopping_patience": 2},
        validation=validation,
    )
    history = result.history["validation_accuracy"]
    assert result.selected_epoch == int(np.argmax(history)) + 1
    kept = classifier.accuracy_of(result.params, result.config, 10, *validation)
    assert kept == pytest.approx(max(history))


def test_dp_classifier_ledger_within_target(digits):
    (images, labels), _ = digits
    privacy = PrivacySpec(target_epsilon=8.0, target_delta=1e-5, dataset_size=600)
    result = classifier.train_classifier(
        jax.random.key(3),
        images,
        labels,
        num_classes=10,
        config={**CONFIG, "num_epochs": 2},
        privacy=privacy,
    )
    summary = result.ledger.to_dict(1e-5)
    assert summary["epsilon_pld"] <= 8.0 * 1.0001
    assert summary["stages"][0]["parameters"]["dataset_size"] == 600


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dropout": 0.1}, "does not accept option"),
        ({"num_epochs": 0}, "num_epochs=0"),
        ({"label_smoothing": 1.0}, "label_smoothing=1.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
    ],
)
def test_invalid_options_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        classifier.resolve_config(overrides)


def test_early_stopping_needs_validation(digits):
    (images, labels), _ = digits
    with pytest.raises(ValueError, match="validation"):
        classifier.train_classifier(
            jax.random.key(0),
            images,
            labels,
            num_classes=10,
            config={**CONFIG, "early_stopping_patience": 1},
        )
