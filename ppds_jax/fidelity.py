"""Offline fidelity proxy: Frechet distance, precision and recall in a small classifier's features.

FID (Heusel et al., 2017) measures the Frechet distance between Gaussians fitted to Inception-v3
features of real and synthetic images. Inception weights need a download, so this module trains a
small `networks.CNN` on the real training split instead and measures distances in its hidden
layer. The numbers are a proxy: they rank generators on one dataset, but they are not FID and
are not comparable with FID figures in papers.

The extractor must be trained on the real training split only, never on the test split, so that
test-set figures stay unbiased. A generator trained on private data must not be selected by
this proxy computed against the private data either, because that selection leaks the data
outside the privacy accounting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppds_jax import networks, training

# Pairwise distances are computed in row blocks of this many queries to bound host memory.
_DISTANCE_BLOCK_ROWS = 1024


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Compute the Frechet distance between Gaussians fitted to two feature sets.

    .. math::
        d^2 = \\lVert \\mu_a - \\mu_b \\rVert^2
              + \\operatorname{tr}\\bigl(\\Sigma_a + \\Sigma_b
              - 2 (\\Sigma_a^{1/2} \\Sigma_b \\Sigma_a^{1/2})^{1/2}\\bigr)

    The trace of the matrix square root equals tr((Sigma_a Sigma_b)^{1/2}), the form usually
    written for FID. It is computed here from two symmetric eigendecompositions in float64,
    clipping the tiny negative eigenvalues that rounding produces, so the result is real and
    needs no complex `sqrtm` output.

    Args:
      features_a: shape (n_a, d), n_a >= 2.
      features_b: shape (n_b, d), n_b >= 2.

    Returns:
      The squared Frechet distance d^2 >= 0 as a Python float (FID reports this squared form).

    Raises:
      ValueError: either input is not 2-D, has fewer than 2 rows, or the feature widths differ.
    """
    features_a = _check_features("features_a", features_a, min_rows=2)
    features_b = _check_features("features_b", features_b, min_rows=2)
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"features_a has width {features_a.shape[1]} but features_b has width"
            f" {features_b.shape[1]}; both must come from the same extractor"
        )

    mean_a, cov_a = features_a.mean(axis=0), np.cov(features_a, rowvar=False)
    mean_b, cov_b = features_b.mean(axis=0), np.cov(features_b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)

    sqrt_cov_a = _psd_sqrt(cov_a)
    cross = sqrt_cov_a @ cov_b @ sqrt_cov_a
    cross_eigenvalues = np.linalg.eigvalsh((cross + cross.T) / 2)
    trace_sqrt_cross = np.sqrt(np.clip(cross_eigenvalues, 0.0, None)).sum()

    distance = (
        np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_cross
    )
    # Rounding can leave a tiny negative value when the two Gaussians coincide.
    return float(max(distance, 0.0))


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, *, k: int = 5
) -> tuple[float, float]:
    """Compute improved precision and recall with k-nearest-neighbour manifolds.

    Each set's manifold is the union of balls centred on its points, with radius the distance to
    the point's k-th nearest neighbour in the same set (itself excluded). Precision is the
    fraction of fake points inside the real manifold, recall the fraction of real points inside
    the fake manifold (Kynkaanniemi et al., 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models"). Distances are Euclidean, computed in float64.

    Args:
      real_features: shape (n_real, d), n_real > k.
      fake_features: shape (n_fake, d), n_fake > k.
      k: neighbour rank that sets the ball radii, >= 1. The paper uses k = 3.

    Returns:
      (precision, recall), each in [0, 1].

    Raises:
      ValueError: k < 1, a set with k or fewer rows, or mismatched feature widths.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    real_features = _check_features("real_features", real_features, min_rows=k + 1)
    fake_features = _check_features("fake_features", fake_features, min_rows=k + 1)
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"real_features has width {real_features.shape[1]} but fake_features has width"
            f" {fake_features.shape[1]}"
        )

    real_radii = _kth_neighbour_distance(real_features, k)
    fake_radii = _kth_neighbour_distance(fake_features, k)
    precision = _fraction_inside(fake_features, real_features, real_radii)
    recall = _fraction_inside(real_features, fake_features, fake_radii)
    return precision, recall


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A trained `networks.CNN` whose hidden layer serves as the feature space.

    Attributes:
      module: the CNN definition.
      params: its trained parameters.
    """

    module: networks.CNN
    params: Any


def train_feature_extractor(
    key: jax.Array,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    num_steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    features: Sequence[int] = (32, 64),
    hidden: int = 128,
) -> FeatureExtractor:
    """Train a `networks.CNN` classifier whose hidden layer becomes the feature space.

    Pass the REAL TRAINING split only. Training on the test split would let the features fit
    the very images the proxy is later computed on, and would leak test data into the figures.
    Training is non-private, so the extractor itself must not be released as part of a
    private pipeline.

    Args:
      key: PRNG key for initialisation and batch order.
      images: shape (N, H, W, C), float32 in [-1, 1]; H and W at least 2 ** len(features).
      labels: shape (N,), int in [0, num_classes).
      num_classes: number of classes, >= 2.
      num_steps: number of Adam steps, >= 1.
      batch_size: examples per step, >= 1 (capped at N); batches come from a shuffle per epoch.
      learning_rate: Adam step size, > 0.
      features: widths of the CNN's conv blocks.
      hidden: width of the hidden layer, which is the feature dimension.

    Returns:
      The trained `FeatureExtractor`.

    Raises:
      ValueError: mismatched shapes, a label outside [0, num_classes), or a non-positive size.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"images must have shape (N, H, W, C) and labels (N,); got {images.shape} and"
            f" {labels.shape}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]"
        )
    if num_steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            f"num_steps={num_steps} and batch_size={batch_size} must be >= 1 and"
            f" learning_rate={learning_rate} must be > 0"
        )

    module = networks.CNN(num_classes=num_classes, features=tuple(features), hidden=hidden)
    init_key, fit_key = jax.random.split(key)
    params = module.init(init_key, jnp.zeros((1, *images.shape[1:]), jnp.float32))["params"]

    def per_example_loss(params, example, key):
        del key
        image, label = example
        logits = module.apply({"params": params}, image[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, label[None])[0]

    params, _ = training.fit(
        fit_key,
        params,
        per_example_loss=per_example_loss,
        data=(images, labels.astype(np.int32)),
        optimizer=optax.adam(learning_rate),
        num_steps=num_steps,
        batch_size=min(batch_size, images.shape[0]),
    )
    return FeatureExtractor(module=module, params=params)


def embed(extractor: FeatureExtractor, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Map images to the extractor's hidden-layer features.

    Args:
      extractor: a trained `FeatureExtractor`.
      images: shape (N, H, W, C), float32 in [-1, 1], the shape the extractor was trained on.
      batch_size: images per forward pass, >= 1; it bounds memory and does not change results.

    Returns:
      Features, shape (N, hidden), float32, as a NumPy array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    images = np.asarray(images, dtype=np.float32)
    num_images = images.shape[0]
    batch_size = min(batch_size, max(num_images, 1))
    chunks = []
    for start in range(0, num_images, batch_size):
        chunk = images[start : start + batch_size]
        # Padding the last chunk to the full batch keeps one compiled shape.
        padding = batch_size - chunk.shape[0]
        if padding:
            chunk = np.concatenate([chunk, np.zeros((padding, *chunk.shape[1:]), np.float32)])
        features = _hidden_features(extractor.module, extractor.params, chunk)
        chunks.append(np.asarray(features)[: batch_size - padding])
    if not chunks:
        return np.zeros((0, extractor.module.hidden), np.float32)
    return np.concatenate(chunks)


@functools.partial(jax.jit, static_argnums=0)
def _hidden_features(module: networks.CNN, params: Any, images: jax.Array) -> jax.Array:
    """Compute the CNN's hidden-layer features, shape (B, hidden)."""
    _, features = module.apply({"params": params}, images, return_features=True)
    return features


def fidelity_proxy(
    extractor: FeatureExtractor,
    real_images: np.ndarray,
    synthetic_images: np.ndarray,
    *,
    k: int = 5,
) -> dict[str, float]:
    """Compare synthetic with real images in the extractor's feature space.

    Args:
      extractor: a `FeatureExtractor` trained on the real training split.
      real_images: shape (n_real, H, W, C), float32 in [-1, 1]; a held-out real split.
      synthetic_images: shape (n_synthetic, H, W, C), float32 in [-1, 1].
      k: neighbour rank for precision and recall.

    Returns:
      {"frechet_distance_proxy": squared Frechet distance (lower is better),
       "precision": fraction of synthetic images on the real manifold,
       "recall": fraction of real images on the synthetic manifold}.
    """
    real_features = embed(extractor, real_images)
    synthetic_features = embed(extractor, synthetic_images)
    precision, recall = precision_recall(real_features, synthetic_features, k=k)
    return {
        "frechet_distance_proxy": frechet_distance(real_features, synthetic_features),
        "precision": precision,
        "recall": recall,
    }


def _check_features(name: str, features: np.ndarray, *, min_rows: int) -> np.ndarray:
    """Return `features` as float64 after checking it is 2-D with at least `min_rows` rows."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < min_rows:
        raise ValueError(
            f"{name} must have shape (n, d) with n >= {min_rows}; got {features.shape}"
        )
    return features


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix, negative eigenvalues clipped."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _pairwise_distances(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Euclidean distances, shape (n_queries, n_points), via the expanded square."""
    squared = (
        np.sum(queries**2, axis=1)[:, None]
        + np.sum(points**2, axis=1)[None, :]
        - 2.0 * queries @ points.T
    )
    return np.sqrt(np.clip(squared, 0.0, None))


def _kth_neighbour_distance(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point, shape (n,)."""
    radii = np.empty(points.shape[0])
    for start in range(0, points.shape[0], _DISTANCE_BLOCK_ROWS):
        block = _pairwise_distances(points[start : start + _DISTANCE_BLOCK_ROWS], points)
        # The point itself is the nearest (distance 0), so the k-th other point is at index k.
        # Duplicated points give several zeros, which is the correct k-th distance for them.
        radii[start : start + block.shape[0]] = np.partition(block, k, axis=1)[:, k]
    return radii


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of queries within radii[j] of some centre j."""
    inside = 0
    for start in range(0, queries.shape[0], _DISTANCE_BLOCK_ROWS):
        block = _pairwise_distances(queries[start : start + _DISTANCE_BLOCK_ROWS], centres)
        inside += int(np.sum(np.any(block <= radii[None, :], axis=1)))
    return inside / queries.shape[0]
