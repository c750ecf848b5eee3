"""Density-ratio attack on a released synthetic set, DOMIAS (van Breugel, Sun, Qian and van der
Schaar, "Membership Inference Attacks against Synthetic Data through Overfitting Detection",
AISTATS 2023).

A generator that overfits puts more density near its members than the data distribution has
there. DOMIAS therefore compares the synthetic density with the density of reference data that
the attacker holds (real non-members from the same distribution):

.. math::
  score(x) = \\log \\hat p_{synthetic}(x) - \\log \\hat p_{reference}(x)

Both densities are Gaussian kernel density estimates (`scipy.stats.gaussian_kde`) in a
low-dimensional space. Kernel density estimation fails in pixel space, so features are first
projected by PCA to `num_components` dimensions. The PCA is fitted on the reference set alone,
so the projection does not depend on the synthetic set. Each kernel's covariance is the data
covariance times ``factor^2``, and Scott's rule, the default, sets
``factor = n^(-1 / (d + 4))`` for n points in d dimensions.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import sklearn.decomposition


def _flatten(name: str, features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim < 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 1; got {features.shape}")
    features = features.reshape(features.shape[0], -1)
    num_bad = int((~np.isfinite(features)).sum())
    if num_bad:
        raise ValueError(f"{name} contains {num_bad} NaN or infinite value(s)")
    return features


def domias(
    queries,
    synthetic_set,
    reference_set,
    *,
    num_components: int = 20,
    bandwidth: str | float = "scott",
) -> np.ndarray:
    """Score queries by the log ratio of synthetic to reference kernel density estimates.

    Args:
      queries: shape (N, ...), features of each query (flattened pixels or embeddings).
      synthetic_set: shape (M, ...), the released synthetic set in the same feature space.
      reference_set: shape (R, ...), real non-members of the target in the same feature space.
      num_components: PCA dimension d, in [1, min(R, D)] for D features. Both sets need more
        than d points so that their covariances can be inverted.
      bandwidth: "scott", "silverman" or a positive float, passed to `gaussian_kde` as
        `bw_method` (a float is the factor itself).

    Returns:
      float64 scores of shape (N,), higher means "more likely a member".

    Raises:
      ValueError: feature sizes differ, NaN or infinite features, num_components out of range,
        too few points for the dimension, an unknown bandwidth, or a singular covariance (for
        example a synthetic set of near-duplicates).
    """
    queries = _flatten("queries", queries)
    synthetic_set = _flatten("synthetic_set", synthetic_set)
    reference_set = _flatten("reference_set", reference_set)
    num_features = queries.shape[1]
    for name, features in (("synthetic_set", synthetic_set), ("reference_set", reference_set)):
        if features.shape[1] != num_features:
            raise ValueError(
                f"queries have {num_features} features per example but {name} has"
                f" {features.shape[1]}"
            )
    max_components = min(reference_set.shape[0], num_features)
    if not 1 <= num_components <= max_components:
        raise ValueError(
            f"num_components={num_components} must be in [1, {max_components}] for"
            f" {reference_set.shape[0]} reference points with {num_features} features"
        )
    for name, features in (("synthetic_set", synthetic_set), ("reference_set", reference_set)):
        if features.shape[0] <= num_components:
            raise ValueError(
                f"{name} has {features.shape[0]} points; a density estimate in"
                f" {num_components} dimensions needs more than {num_components}"
            )
    if isinstance(bandwidth, str):
        if bandwidth not in ("scott", "silverman"):
            raise ValueError(f"bandwidth={bandwidth!r} must be 'scott', 'silverman' or a float")
    elif not bandwidth > 0:
        raise ValueError(f"bandwidth={bandwidth} must be > 0")

    pca = sklearn.decomposition.PCA(n_components=num_components).fit(reference_set)
    projected = {
        "queries": pca.transform(queries),
        "synthetic_set": pca.transform(synthetic_set),
        "reference_set": pca.transform(reference_set),
    }
    log_densities = {}
    for name in ("synthetic_set", "reference_set"):
        try:
            kde = scipy.stats.gaussian_kde(projected[name].T, bw_method=bandwidth)
        except np.linalg.LinAlgError as error:
            raise ValueError(
                f"the covariance of {name} in {num_components} PCA dimensions is singular;"
                " lower num_components or check the set for duplicates"
            ) from error
        log_densities[name] = kde.logpdf(projected["queries"].T)
    return log_densities["synthetic_set"] - log_densities["reference_set"]
