"""Filters applied to synthetic candidates before a synthetic set is released.

A filter receives more candidates than the requested set size (`sampling.oversampled_labels`).
It keeps, per class, the requested number of those that pass it, so a filtered set has the same
size and class counts as an unfiltered one unless too few candidates pass.

- The quality filter keeps the candidates that a classifier trained on synthetic data labels
  most confidently with their conditioning label. It reads only synthetic data, so it is
  post-processing of the generator and keeps the generator's DP guarantee.
- The privacy filter drops every candidate whose pixel-space L2 distance to the nearest private
  training image is at most a threshold. It reads the private images, so it is NOT
  differentially private: no accounted epsilon holds for a set or a classifier that passed
  through it, whatever the generator's ledger says. Which candidates it drops, and how many,
  depends on each private image. Passing it shows only that no released sample is a near copy
  in pixel space; the membership-inference attacks measure what leaks otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ppds_jax import classifier
from ppds_jax.attacks import distance


def privacy_filter(
    synthetic_images, private_images, *, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Flag the synthetic images farther than `threshold` from every private image.

    NOTE: this filter reads the private images and is not differentially private. A release
    that depends on its output has no DP guarantee.

    Args:
      synthetic_images: (M, H, W, C) float32 in [-1, 1], the candidates.
      private_images: (N, H, W, C) float32 in [-1, 1], the generator's training images.
      threshold: L2 distance over the flattened pixels, >= 0. A candidate at distance <=
        threshold from some private image is dropped, so 0 drops exact copies only. For scale,
        two images in [-1, 1] with D pixels are at most 2 * sqrt(D) apart (16 for 8x8 digits).

    Returns:
      (keep, distances): keep (M,) bool, True where the candidate passes; distances (M,)
      float64, each candidate's distance to its nearest private image.

    Raises:
      ValueError: threshold < 0 or not finite, or the inputs are rejected by
        `distance.nearest_neighbor_distances` (empty, mismatched sizes, NaN).
    """
    if not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold={threshold} must be a finite number >= 0")
    distances = distance.nearest_neighbor_distances(synthetic_images, private_images)
    return distances > threshold, distances


def quality_confidence(
    key, images, labels, *, num_classes: int, classifier_config=None, num_folds: int = 2
) -> np.ndarray:
    """Estimate each synthetic image's label probability with a classifier that never saw it.

    The candidates are split into `num_folds` random folds. For each fold a classifier
    (`classifier.train_classifier`, non-private) is trained on the other folds and scores the
    held-out fold, so a candidate's confidence is not inflated by having been trained on.

    Args:
      key: PRNG key of the fold split and of each classifier.
      images: (M, H, W, C) float32 in [-1, 1], synthetic candidates only. Passing private
        images here would make the filter read private data.
      labels: (M,) int32, each candidate's conditioning label.
      num_classes: number of classes.
      classifier_config: options overriding `classifier.DEFAULT_CONFIG`;
        `early_stopping_patience` is set to 0, because the folds leave no validation set.
      num_folds: >= 2, and at most M.

    Returns:
      (M,) float64 in [0, 1].

    Raises:
      ValueError: num_folds out of range, mismatched shapes, or invalid classifier options.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"images must have shape (M, H, W, C) and labels (M,); got {images.shape} and"
            f" {labels.shape}"
        )
    if not 2 <= num_folds <= len(labels):
        raise ValueError(f"num_folds={num_folds} must be in [2, {len(labels)}]")
    config = {**dict(classifier_config or {}), "early_stopping_patience": 0}
    split_key, train_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(split_key, len(labels)))
    fold_of = np.empty(len(labels), np.int64)
    fold_of[order] = np.arange(len(labels)) % num_folds

    confidence = np.empty(len(labels), np.float64)
    for fold in range(num_folds):
        held_out = fold_of == fold
        result = classifier.train_classifier(
            jax.random.fold_in(train_key, fold),
            images[~held_out],
            labels[~held_out],
            num_classes=num_classes,
            config=config,
        )
        logits = classifier.predict_logits(
            result.params, images[held_out], config=result.config, num_classes=num_classes
        )
        probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float64), axis=-1))
        confidence[held_out] = probabilities[np.arange(len(logits)), labels[held_out]]
    return confidence


def select_per_class(scores, labels, *, counts, eligible=None) -> np.ndarray:
    """Select the `counts[c]` highest-scoring eligible candidates of each class c.

    Ties keep the lower index, so equal scores select candidates in their given order. A class
    with fewer eligible candidates than requested contributes all of them.

    Args:
      scores: (M,) float, higher is better.
      labels: (M,) int in [0, len(counts)).
      counts: (num_classes,) int >= 0, the number to keep per class.
      eligible: (M,) bool, or None for all candidates.

    Returns:
      (k,) int64 indices in increasing order, k <= sum(counts).

    Raises:
      ValueError: mismatched shapes, negative counts or labels out of range.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    counts = np.asarray(counts, np.int64)
    eligible = np.ones(len(labels), bool) if eligible is None else np.asarray(eligible, bool)
    if scores.shape != labels.shape or eligible.shape != labels.shape or labels.ndim != 1:
        raise ValueError(
            f"scores, labels and eligible must share a shape (M,); got {scores.shape},"
            f" {labels.shape} and {eligible.shape}"
        )
    if counts.ndim != 1 or np.any(counts < 0):
        raise ValueError(f"counts={counts.tolist()} must be a 1-D array of integers >= 0")
    if labels.size and (labels.min() < 0 or labels.max() >= len(counts)):
        raise ValueError(
            f"labels must be in [0, {len(counts)}); got range [{labels.min()}, {labels.max()}]"
        )
    chosen = []
    for label, count in enumerate(counts):
        candidates = np.flatnonzero((labels == label) & eligible)
        ranked = candidates[np.argsort(-scores[candidates], kind="stable")]
        chosen.append(ranked[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True)
class FilterResult:
    """The filtered synthetic set and how it was chosen.

    Attributes:
      images: (k, H, W, C) float32, the kept candidates, sorted by class.
      labels: (k,) int32.
      kept: (k,) int64 indices of the kept candidates, increasing.
      confidence: (M,) float64 quality confidence of every candidate, or None without the
        quality filter.
      summary: JSON-ready dict with "num_candidates", "num_kept", "shortfall" (requested minus
        kept), and per filter "privacy_filter_threshold" and "privacy_filter_removed", or
        "quality_min_kept_confidence" and "quality_mean_kept_confidence".
    """

    images: np.ndarray
    labels: np.ndarray
    kept: np.ndarray
    confidence: np.ndarray | None
    summary: dict[str, Any]


def filter_candidates(
    key,
    candidate_images,
    candidate_labels,
    *,
    counts,
    num_classes: int,
    quality: bool = False,
    classifier_config=None,
    private_images=None,
    privacy_threshold: float | None = None,
) -> FilterResult:
    """Apply the requested filters to synthetic candidates and keep `counts[c]` of class c.

    The privacy filter, when `privacy_threshold` is set, first removes the candidates near a
    private image. Among the rest, the quality filter keeps the most confidently labelled
    candidates of each class, and without it the first ones in the given order, which is a
    random subset when the candidates are independent draws.

    Args:
      key: PRNG key of the quality filter.
      candidate_images: (M, H, W, C) float32 in [-1, 1].
      candidate_labels: (M,) int32.
      counts: (num_classes,) int, the requested class counts of the filtered set.
      num_classes: number of classes.
      quality: apply the quality filter.
      classifier_config: options of the quality filter's classifiers.
      private_images: (N, H, W, C), the generator's training images; needed by the privacy
        filter only.
      privacy_threshold: the privacy filter's L2 distance, or None for no privacy filter.

    Returns:
      FilterResult.

    Raises:
      ValueError: the privacy filter without private images, counts of the wrong shape, or
        invalid inputs.
    """
    candidate_labels = np.asarray(candidate_labels, np.int32)
    counts = np.asarray(counts, np.int64)
    if counts.shape != (num_classes,):
        raise ValueError(f"counts has shape {counts.shape}; expected ({num_classes},)")
    summary: dict[str, Any] = {"num_candidates": int(len(candidate_labels))}
    eligible = np.ones(len(candidate_labels), bool)
    if privacy_threshold is not None:
        if private_images is None:
            raise ValueError("the privacy filter needs private_images")
        eligible, _ = privacy_filter(candidate_images, private_images, threshold=privacy_threshold)
        summary["privacy_filter_threshold"] = float(privacy_threshold)
        summary["privacy_filter_removed"] = int((~eligible).sum())

    confidence = None
    if quality:
        confidence = quality_confidence(
            key,
            candidate_images,
            candidate_labels,
            num_classes=num_classes,
            classifier_config=classifier_config,
        )
    scores = np.zeros(len(candidate_labels)) if confidence is None else confidence
    kept = select_per_class(scores, candidate_labels, counts=counts, eligible=eligible)
    if confidence is not None and kept.size:
        summary["quality_min_kept_confidence"] = float(confidence[kept].min())
        summary["quality_mean_kept_confidence"] = float(confidence[kept].mean())
    summary["num_kept"] = int(kept.size)
    summary["shortfall"] = int(counts.sum() - kept.size)
    return FilterResult(
        images=np.asarray(candidate_images, np.float32)[kept],
        labels=candidate_labels[kept],
        kept=kept,
        confidence=confidence,
        summary=summary,
    )
