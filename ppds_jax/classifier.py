"""Training and evaluating the image classifier that a pipeline releases.

The classifier is `networks.CNN` trained with optax, privately (DP-SGD) or not. Mitigations
that act at this stage are options here: weight decay, label smoothing, and early stopping on a
validation set that the caller provides. The caller must never pass the test split as the
validation set: model selection on the test split both inflates accuracy and, for private
releases, breaks the privacy guarantee.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppds_jax import accounting, dp_sgd, networks, training
from ppds_jax.generators.base import PrivacySpec

DEFAULT_CONFIG = {
    "features": (16, 32),
    "hidden": 64,
    "num_epochs": 5,
    "batch_size": 128,
    "learning_rate": 2e-3,
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    "early_stopping_patience": 0,
}


@dataclasses.dataclass(frozen=True)
class ClassifierResult:
    """A trained classifier.

    Attributes:
      params: the CNN's parameter pytree.
      config: the resolved options it was trained with.
      num_classes: size of the output layer.
      ledger: `accounting.PrivacyLedger` for a DP-SGD run, else None.
      history: "loss" per step; "validation_accuracy" per epoch when a validation set was given.
      selected_epoch: the epoch whose parameters were kept (the last one without early
        stopping), counted from 1.
    """

    params: Any
    config: dict[str, Any]
    num_classes: int
    ledger: Any | None
    history: dict[str, list[float]]
    selected_epoch: int


def resolve_config(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Merge options into DEFAULT_CONFIG; an unknown option raises ValueError naming it."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"classifier does not accept option(s) {unknown}; accepted: {sorted(DEFAULT_CONFIG)}"
        )
    config = {**DEFAULT_CONFIG, **overrides}
    config["features"] = tuple(config["features"])
    for name in ("num_epochs", "batch_size"):
        if int(config[name]) < 1:
            raise ValueError(f"classifier {name}={config[name]} must be >= 1")
    if not 0 <= config["label_smoothing"] < 1:
        raise ValueError(f"label_smoothing={config['label_smoothing']} must be in [0, 1)")
    if config["weight_decay"] < 0:
        raise ValueError(f"weight_decay={config['weight_decay']} must be >= 0")
    return config


def _model(config, num_classes) -> networks.CNN:
    return networks.CNN(num_classes, features=config["features"], hidden=config["hidden"])


def make_per_example_loss(config, num_classes):
    """Cross-entropy of one example with optional label smoothing, `loss(params, (x, y), key)`."""
    model = _model(config, num_classes)
    smoothing = config["label_smoothing"]

    def loss(params, example, key):
        del key  # The CNN has no dropout, so the loss is deterministic.
        image, label = example
        logits = model.apply({"params": params}, image[None])[0]
        targets = optax.smooth_labels(jax.nn.one_hot(label, num_classes), smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    return loss


def training_functions(config: dict[str, Any], num_classes: int):
    """Return the (per-example loss, optax optimizer) of a resolved config.

    The same config returns the same two objects, so `training.fit` and
    `shadow_training.train_many` reuse their compiled steps across the many classifiers of an
    experiment (target and shadows, real and synthetic data).
    """
    return _training_functions(tuple(sorted(config.items())), num_classes)


@functools.lru_cache(maxsize=16)
def _training_functions(frozen_config: tuple, num_classes: int):
    config = dict(frozen_config)
    optimizer = optax.adamw(config["learning_rate"], weight_decay=config["weight_decay"])
    return make_per_example_loss(config, num_classes), optimizer


def make_dp_config(config: dict[str, Any], privacy: PrivacySpec) -> dp_sgd.DpSgdConfig:
    """Return the DP-SGD settings of a resolved config under `privacy`.

    The run has `num_epochs` epochs of round(N / batch_size) steps for the public dataset size
    N, so the step count, and with it the noise, never depends on the realised member count.
    """
    batch_size = int(config["batch_size"])
    steps_per_epoch = max(1, round(privacy.dataset_size / batch_size))
    return dp_sgd.make_dp_sgd_config(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        dataset_size=privacy.dataset_size,
        batch_size=batch_size,
        num_steps=steps_per_epoch * int(config["num_epochs"]),
        l2_norm_clip=privacy.l2_norm_clip,
        accountant=privacy.accountant,
    )


def make_ledger(dp_config: dp_sgd.DpSgdConfig) -> accounting.PrivacyLedger:
    """Return the one-stage ledger ("classifier_dp_sgd") of a DP-SGD classifier."""
    return dp_sgd.make_ledger("classifier_dp_sgd", dp_config)


def train_classifier(
    key,
    images,
    labels,
    *,
    num_classes: int,
    config: dict[str, Any] | None = None,
    privacy: PrivacySpec | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
    progress_desc: str = "classifier",
) -> ClassifierResult:
    """Train the CNN on (images, labels), with DP-SGD when `privacy` is given.

    Args:
      key: PRNG key for initialisation and batching.
      images: (N, H, W, C) float32 in [-1, 1].
      labels: (N,) int32 in [0, num_classes).
      config: options overriding DEFAULT_CONFIG.
      privacy: DP-SGD target; the number of steps uses the public `privacy.dataset_size`.
      validation: (images, labels) used for early stopping when `early_stopping_patience` > 0.
        For a private release it must not be private data (use synthetic or public data).
      progress: show a tqdm bar.

    Returns:
      ClassifierResult.

    Raises:
      ValueError: early stopping without a validation set, or invalid options.
    """
    config = resolve_config(config)
    patience = int(config["early_stopping_patience"])
    if patience > 0 and validation is None:
        raise ValueError("early_stopping_patience > 0 needs a validation set")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    model = _model(config, num_classes)
    init_key, train_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, *images.shape[1:])))["params"]

    batch_size = config["batch_size"]
    dataset_size = len(images) if privacy is None else privacy.dataset_size
    steps_per_epoch = max(1, round(dataset_size / batch_size))
    num_epochs = int(config["num_epochs"])
    dp_config, ledger = None, None
    if privacy is not None:
        dp_config = make_dp_config(config, privacy)
        ledger = make_ledger(dp_config)

    loss, optimizer = training_functions(config, num_classes)
    fit = functools.partial(
        training.fit,
        per_example_loss=loss,
        data=(images, labels),
        optimizer=optimizer,
        batch_size=batch_size,
        dp=dp_config,
        progress=progress,
        progress_desc=progress_desc,
    )
    if patience == 0:
        params, stats = fit(train_key, params, num_steps=steps_per_epoch * num_epochs)
        history = {"loss": [float(v) for v in np.asarray(stats.loss)]}
        return ClassifierResult(params, config, num_classes, ledger, history, num_epochs)
    return _train_with_early_stopping(
        fit, train_key, params, config, num_classes, validation, steps_per_epoch, ledger
    )


def _train_with_early_stopping(
    fit, key, params, config, num_classes, validation, steps_per_epoch, ledger
):
    # NOTE: each epoch restarts the optimiser state, because training.fit returns parameters
    # only. Adam's moments re-warm within a few steps; a DP run accounts every epoch's steps
    # because the ledger was built for all num_epochs epochs before training started.
    history = {"loss": [], "validation_accuracy": []}
    best_accuracy, best_params, best_epoch, waited = -1.0, params, 0, 0
    for epoch in range(1, int(config["num_epochs"]) + 1):
        params, stats = fit(jax.random.fold_in(key, epoch), params, num_steps=steps_per_epoch)
        history["loss"].extend(float(v) for v in np.asarray(stats.loss))
        accuracy = accuracy_of(params, config, num_classes, *validation)
        history["validation_accuracy"].append(accuracy)
        if accuracy > best_accuracy:
            best_accuracy, best_params, best_epoch, waited = accuracy, params, epoch, 0
        else:
            waited += 1
            if waited >= config["early_stopping_patience"]:
                break
    return ClassifierResult(best_params, config, num_classes, ledger, history, best_epoch)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model, params, images):
    return model.apply({"params": params}, images)


def predict_logits(params, images, *, config, num_classes, chunk_size: int = 2048) -> np.ndarray:
    """Logits (N, num_classes) float32 for images (N, H, W, C), computed in chunks."""
    model = _model(resolve_config(config), num_classes)
    images = np.asarray(images, np.float32)
    outputs = [
        np.asarray(_apply(model, params, images[i : i + chunk_size]))
        for i in range(0, len(images), chunk_size)
    ]
    if not outputs:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(outputs).astype(np.float32)


def accuracy_of(params, config, num_classes, images, labels) -> float:
    """Top-1 accuracy in [0, 1] of the classifier on (images, labels)."""
    logits = predict_logits(params, images, config=config, num_classes=num_classes)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))
