"""Drawing a labelled synthetic set from a trained generator.

Which labels to draw is decided here (class-balanced by default, or any class proportions the
caller passes); the generator's own jitted sampler turns labels into images. Labels are
processed in fixed-size chunks so the sampler compiles once and memory stays bounded. A filter
(`ppds_jax.filtering`) draws more candidates than it keeps, per class, with `oversampled_labels`.
"""

from __future__ import annotations

import jax
import numpy as np

from ppds_jax.generators.base import GeneratorFamily


def balanced_labels(*, num_samples: int, num_classes: int, class_weights=None) -> np.ndarray:
    """Labels (num_samples,) int32 with counts proportional to `class_weights`.

    Counts are the largest-remainder rounding of num_samples * weight, so they sum to
    num_samples exactly; equal weights give counts that differ by at most one. Labels come out
    sorted by class.

    Raises:
      ValueError: num_samples < 0, num_classes < 1, or weights that are negative, all zero, or
        of the wrong length.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    weights = np.ones(num_classes) if class_weights is None else np.asarray(class_weights, float)
    if weights.shape != (num_classes,):
        raise ValueError(f"class_weights has shape {weights.shape}; expected ({num_classes},)")
    if np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError(f"class_weights={weights.tolist()} must be >= 0 with a positive sum")
    exact = num_samples * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    remainder = num_samples - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return np.repeat(np.arange(num_classes, dtype=np.int32), counts)


def sample_images(
    key, family: GeneratorFamily, state, labels, *, config, chunk_size: int = 1024
) -> np.ndarray:
    """Sample one image per label from a trained generator.

    Args:
      key: PRNG key; chunk i uses `fold_in(key, i)`.
      family: the generator family that produced `state`.
      state: the trained generator state.
      labels: (n,) int, the class of each image to draw, n >= 1.
      config: the family's resolved options.
      chunk_size: labels per sampler call, at most; a request for fewer labels makes one call
        of its own size. The last chunk is padded, so one compiled program serves every call.

    Returns:
      images (n, H, W, C) float32, clipped to [-1, 1].

    Raises:
      ValueError: no labels, labels that are not 1-D, or chunk_size < 1.
    """
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must have shape (n,) with n >= 1; got {labels.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    # Padding a small request up to chunk_size would sample images only to drop them.
    chunk_size = min(chunk_size, len(labels))
    chunks = []
    for index, start in enumerate(range(0, len(labels), chunk_size)):
        chunk = labels[start : start + chunk_size]
        padded = np.pad(chunk, (0, chunk_size - len(chunk)))
        images = family.sample(jax.random.fold_in(key, index), state, padded, config=config)
        chunks.append(np.asarray(images)[: len(chunk)])
    return np.clip(np.concatenate(chunks).astype(np.float32), -1.0, 1.0)


def sample_synthetic_set(
    key,
    family: GeneratorFamily,
    state,
    *,
    config,
    num_samples: int,
    num_classes: int,
    class_weights=None,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a labelled synthetic set from a trained generator.

    Args:
      key: PRNG key; chunk i uses `fold_in(key, i)`.
      family: the generator family that produced `state`.
      state: the trained generator state.
      config: the family's resolved options.
      num_samples: size of the synthetic set.
      num_classes: number of classes of the dataset.
      class_weights: class proportions, (num_classes,); None means balanced.
      chunk_size: labels per sampler call, see `sample_images`.

    Returns:
      images (num_samples, H, W, C) float32 in [-1, 1] and labels (num_samples,) int32, sorted
      by class.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    labels = balanced_labels(
        num_samples=num_samples, num_classes=num_classes, class_weights=class_weights
    )
    images = sample_images(key, family, state, labels, config=config, chunk_size=chunk_size)
    return images, labels


def oversampled_labels(labels, *, factor: float) -> np.ndarray:
    """Labels with each class's count multiplied by `factor` and rounded up, sorted by class.

    A filter that keeps `count_c` samples of class c from `ceil(factor * count_c)` candidates
    of that class can return the requested class counts whenever at least `count_c` pass it.

    Args:
      labels: (n,) int, the requested labels.
      factor: candidates per requested sample, >= 1.

    Returns:
      (m,) int32 with m >= n.

    Raises:
      ValueError: factor < 1.

    Example:
      >>> oversampled_labels(np.array([0, 0, 1]), factor=1.5).tolist()
      [0, 0, 0, 1, 1]
    """
    if not factor >= 1:
        raise ValueError(f"factor={factor} must be >= 1")
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    candidate_counts = np.ceil(counts * factor - 1e-9).astype(int)
    return np.repeat(classes.astype(np.int32), candidate_counts)
