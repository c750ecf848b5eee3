"""Nearest-neighbour distance attack on a released synthetic set, GAN-Leaks full black-box
(Chen, Yu, Zhang and Fritz, "GAN-Leaks: A Taxonomy of Membership Inference Attacks against
Generative Models", CCS 2020).

A generator that memorised its training set places samples close to its members, so a query's
L2 distance to the nearest synthetic sample is smaller for members. The distance is measured in
whatever feature space the caller passes: flattened pixels, or embeddings from a fixed
network. The calibrated score subtracts the same distance to reference pipelines' synthetic
sets, which removes how typical the query is of the data distribution:

.. math::
  score(x) = -\\left(d(x, S_{target}) - \\bar d(x, S_{reference})\\right)

where the reference term is the mean over the reference pipelines that did not train on x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _nearest_in_chunks(queries, synthetic_chunks, synthetic_sq_norms):
    """Index and squared distance of each query's nearest synthetic point.

    queries (B, D); synthetic_chunks (S, C, D); synthetic_sq_norms (S, C), +inf on padding rows
    so that they are never chosen. Peak memory is one (B, C) block.
    """
    chunk_size = synthetic_chunks.shape[1]
    query_sq_norms = jnp.sum(queries**2, axis=1)

    def step(carry, inputs):
        best_sq, best_index = carry
        chunk_index, points, sq_norms = inputs
        # HIGHEST keeps float32 products on GPUs and TPUs, where the default may use TF32 or
        # bfloat16 and pick the wrong neighbour.
        cross = jnp.dot(queries, points.T, precision=jax.lax.Precision.HIGHEST)
        sq = query_sq_norms[:, None] + sq_norms[None, :] - 2.0 * cross
        local = jnp.argmin(sq, axis=1)
        local_sq = jnp.take_along_axis(sq, local[:, None], axis=1)[:, 0]
        better = local_sq < best_sq
        best_sq = jnp.where(better, local_sq, best_sq)
        best_index = jnp.where(better, chunk_index * chunk_size + local, best_index)
        return (best_sq, best_index), None

    init = (
        jnp.full(queries.shape[0], jnp.inf, dtype=queries.dtype),
        jnp.zeros(queries.shape[0], dtype=jnp.int32),
    )
    chunk_indices = jnp.arange(synthetic_chunks.shape[0], dtype=jnp.int32)
    (best_sq, best_index), _ = jax.lax.scan(
        step, init, (chunk_indices, synthetic_chunks, synthetic_sq_norms)
    )
    return best_sq, best_index


def _flatten(name: str, features) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim < 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 1; got {features.shape}")
    features = features.reshape(features.shape[0], -1).astype(np.float32)
    num_bad = int((~np.isfinite(features)).sum())
    if num_bad:
        raise ValueError(f"{name} contains {num_bad} NaN or infinite value(s)")
    return features


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    padding = (-array.shape[0]) % multiple
    return np.pad(array, ((0, padding), (0, 0)))


def nearest_neighbor_distances(queries, synthetic_set, *, chunk_size: int = 2048) -> np.ndarray:
    """L2 distance of each query to its nearest point of `synthetic_set`.

    The search uses ``||q||^2 + ||s||^2 - 2 q.s`` in float32 blocks of ``chunk_size`` queries by
    ``chunk_size`` synthetic points, so 10k x 10k Fashion-MNIST images need about 16 MiB per
    block at the default. The distance to the chosen neighbour is then recomputed directly in
    float64, so an exact copy gives exactly 0. The expansion can lose precision when two
    synthetic points are almost equally close. The neighbour found may then differ from the
    exact one, and its distance exceeds the true minimum by at most that rounding error.

    Args:
      queries: shape (N, ...), features of each query; trailing axes are flattened.
      synthetic_set: shape (M, ...), same feature layout as `queries`.
      chunk_size: block size along both sets, >= 1.

    Returns:
      float64 distances of shape (N,), >= 0.

    Raises:
      ValueError: empty inputs, different feature sizes, NaN or infinite features, or
        chunk_size < 1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    queries = _flatten("queries", queries)
    synthetic_set = _flatten("synthetic_set", synthetic_set)
    if queries.shape[1] != synthetic_set.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} features per example but synthetic_set has"
            f" {synthetic_set.shape[1]}"
        )

    synthetic_chunk = min(chunk_size, synthetic_set.shape[0])
    padded = _pad_rows(synthetic_set, synthetic_chunk)
    sq_norms = np.sum(padded.astype(np.float64) ** 2, axis=1).astype(np.float32)
    sq_norms[synthetic_set.shape[0] :] = np.inf
    num_chunks = padded.shape[0] // synthetic_chunk
    synthetic_chunks = jnp.asarray(padded.reshape(num_chunks, synthetic_chunk, -1))
    synthetic_sq_norms = jnp.asarray(sq_norms.reshape(num_chunks, synthetic_chunk))

    query_chunk = min(chunk_size, queries.shape[0])
    padded_queries = _pad_rows(queries, query_chunk)
    nearest = np.empty(padded_queries.shape[0], dtype=np.int64)
    for start in range(0, padded_queries.shape[0], query_chunk):
        block = jnp.asarray(padded_queries[start : start + query_chunk])
        _, index = _nearest_in_chunks(block, synthetic_chunks, synthetic_sq_norms)
        nearest[start : start + query_chunk] = np.asarray(index)
    nearest = nearest[: queries.shape[0]]

    differences = queries.astype(np.float64) - synthetic_set[nearest].astype(np.float64)
    return np.sqrt(np.sum(differences**2, axis=1))


def gan_leaks(target_distances, reference_distances=None, reference_masks=None) -> np.ndarray:
    """Score queries by their distance to the released synthetic set, calibrated if possible.

    Without reference distances the score is ``-d(x, S_target)``, the full black-box attack.
    With them it is ``-(d(x, S_target) - mean_k d(x, S_k))``, the mean running over the
    reference pipelines whose training set excluded x.

    Args:
      target_distances: shape (N,), `nearest_neighbor_distances` of each query to the released
        synthetic set.
      reference_distances: shape (K, N), the same distances to K reference pipelines'
        synthetic sets, or None for the uncalibrated attack.
      reference_masks: shape (K, N), bool, True where the query was in that reference
        pipeline's training set; those entries are ignored. None means every query is OUT of
        every reference pipeline. Every query needs >= 1 OUT reference pipeline.

    Returns:
      float64 scores of shape (N,), higher means "more likely a member".

    Raises:
      ValueError: shapes disagree, a distance is negative, NaN or infinite, or a query has no
        OUT reference pipeline.
    """
    target_distances = _check_distances("target_distances", target_distances, 1)
    if reference_distances is None:
        if reference_masks is not None:
            raise ValueError("reference_masks was given without reference_distances")
        return -target_distances

    reference_distances = _check_distances("reference_distances", reference_distances, 2)
    expected = (reference_distances.shape[0], target_distances.shape[0])
    if reference_distances.shape != expected or expected[0] == 0:
        raise ValueError(
            f"reference_distances must have shape (K, N) with K >= 1 and N ="
            f" {target_distances.shape[0]}; got {reference_distances.shape}"
        )
    if reference_masks is None:
        reference_masks = np.zeros(expected, dtype=bool)
    reference_masks = np.asarray(reference_masks)
    if reference_masks.shape != expected:
        raise ValueError(f"reference_masks must have shape {expected}; got {reference_masks.shape}")
    if reference_masks.dtype != np.bool_:
        if not np.isin(reference_masks, (0, 1)).all():
            raise ValueError("reference_masks must be bool or contain only 0 and 1")
        reference_masks = reference_masks.astype(bool)

    out_counts = (~reference_masks).sum(axis=0)
    short = np.flatnonzero(out_counts == 0)
    if short.size:
        raise ValueError(
            f"gan_leaks needs >= 1 OUT reference pipeline per query, but {short.size} quer(ies)"
            f" have none, for example index {int(short[0])}; train more reference pipelines"
        )
    mean_reference = np.where(reference_masks, 0.0, reference_distances).sum(axis=0) / out_counts
    return -(target_distances - mean_reference)


def _check_distances(name: str, distances, ndim: int) -> np.ndarray:
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != ndim:
        expected = "(N,)" if ndim == 1 else "(K, N)"
        raise ValueError(f"{name} must have shape {expected}; got {distances.shape}")
    num_bad = int((~np.isfinite(distances)).sum())
    if num_bad:
        raise ValueError(f"{name} contains {num_bad} NaN or infinite value(s)")
    if distances.size and distances.min() < 0:
        raise ValueError(f"{name} must be >= 0; got minimum {distances.min()}")
    return distances
