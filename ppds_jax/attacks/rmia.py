"""Robust membership inference attack, RMIA (Zarifzadeh, Liu, Mahloujifar and Shokri, "Low-Cost
High-Power Membership Inference Attacks", ICML 2024).

RMIA compares the target model's likelihood of a query x with its likelihood of population
samples z, which are known non-members. With Pr(x | theta) the target's
true-class probability (`signals.true_class_probability`) and Pr(x) its average over reference
models,

.. math::
  LR(x, z) = \\frac{\\Pr(x \\mid \\theta) / \\Pr(x)}{\\Pr(z \\mid \\theta) / \\Pr(z)}, \\qquad
  score(x) = \\frac{1}{M} \\left|\\{z : LR(x, z) \\ge \\gamma\\}\\right|

How Pr(.) is estimated:

- online (`rmia`): ``Pr(x) = (mean_IN(x) + mean_OUT(x)) / 2`` over reference models that
  contain x and those that do not, which equals the plain mean when x is in exactly half of
  them. The population samples are assumed OUT of every reference model, so ``Pr(z)`` is their
  mean over the reference models.
- offline (`rmia_offline`), with OUT references only: Pr_IN is approximated by a linear function
  of Pr_OUT, giving ``Pr(x) = (1 + a) / 2 * mean_OUT(x) + (1 - a) / 2``, and the same formula
  for ``Pr(z)``. The paper tunes ``a`` in [0, 1] per dataset by attacking one reference model
  with the others. A smaller ``a`` assumes that training raises the true-class probability
  more.

Both variants work from K = 1 reference model (offline) or K = 2 (online, one IN and one OUT
per query) upwards.

NOTE: every query is compared with the same population samples, so ``score(x)`` is the
empirical CDF of the population ratios evaluated at ``ratio(x) / gamma``. It therefore ranks
queries exactly as ``Pr(x | theta) / Pr(x)`` does, except that queries falling between the same
two population ratios tie. The score moves in steps of 1 / M, so TPR at an FPR well below 1 / M
needs a larger population set. The choice of ``Pr(z)`` and of ``gamma`` changes which queries
tie, not their order.
"""

from __future__ import annotations

import numpy as np

# Floor for probabilities before taking logs, because a float32 softmax can underflow to 0.
_PROB_FLOOR = 1e-30


def _check_probs(name: str, probs, ndim: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != ndim:
        expected = "(N,)" if ndim == 1 else "(K, N)"
        raise ValueError(f"{name} must have shape {expected}; got {probs.shape}")
    num_nan = int(np.isnan(probs).sum())
    if num_nan:
        raise ValueError(f"{name} contains {num_nan} NaN value(s) out of {probs.size}")
    if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
        raise ValueError(
            f"{name} must be probabilities in [0, 1]; got range [{probs.min()}, {probs.max()}]"
        )
    return probs


def _check_shapes(
    target_probs, reference_probs, population_target_probs, population_reference_probs
):
    """Return the four arrays as float64 after checking ranges and that K, N and M agree."""
    target_probs = _check_probs("target_probs", target_probs, 1)
    reference_probs = _check_probs("reference_probs", reference_probs, 2)
    population_target_probs = _check_probs("population_target_probs", population_target_probs, 1)
    population_reference_probs = _check_probs(
        "population_reference_probs", population_reference_probs, 2
    )
    num_models = reference_probs.shape[0]
    if num_models == 0:
        raise ValueError("reference_probs has K = 0 reference models; RMIA needs at least one")
    if reference_probs.shape[1] != target_probs.shape[0]:
        raise ValueError(
            f"reference_probs must have shape (K, N) = (K, {target_probs.shape[0]});"
            f" got {reference_probs.shape}"
        )
    if population_target_probs.shape[0] == 0:
        raise ValueError("population_target_probs is empty; RMIA needs population samples")
    expected = (num_models, population_target_probs.shape[0])
    if population_reference_probs.shape != expected:
        raise ValueError(
            f"population_reference_probs must have shape (K, M) = {expected};"
            f" got {population_reference_probs.shape}"
        )
    return target_probs, reference_probs, population_target_probs, population_reference_probs


def _as_mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"reference_masks must have shape {shape}; got {mask.shape}")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("reference_masks must be bool or contain only 0 and 1")
        mask = mask.astype(bool)
    return mask


def _masked_mean(probs: np.ndarray, selected: np.ndarray, group: str, minimum: int, method: str):
    """Per-query mean of the selected reference probabilities, with at least `minimum` each."""
    counts = selected.sum(axis=0)
    short = np.flatnonzero(counts < minimum)
    if short.size:
        first = int(short[0])
        raise ValueError(
            f"{method} needs >= {minimum} {group} reference model(s) per query, but"
            f" {short.size} quer(ies) have fewer, for example index {first} with"
            f" {int(counts[first])}; train more reference models"
        )
    return np.where(selected, probs, 0.0).sum(axis=0) / counts


def _check_gamma(gamma: float) -> None:
    if not gamma > 0:
        raise ValueError(f"gamma={gamma} must be > 0")


def _pairwise_score(
    target_probs, marginal_probs, population_target_probs, population_marginal_probs, gamma
):
    """Fraction of population samples z with LR(x, z) >= gamma, for each query x."""
    log_ratio = np.log(np.maximum(target_probs, _PROB_FLOOR)) - np.log(
        np.maximum(marginal_probs, _PROB_FLOOR)
    )
    population_log_ratio = np.log(np.maximum(population_target_probs, _PROB_FLOOR)) - np.log(
        np.maximum(population_marginal_probs, _PROB_FLOOR)
    )
    # LR(x, z) >= gamma  <=>  log ratio(z) <= log ratio(x) - log gamma, counted by bisection.
    sorted_population = np.sort(population_log_ratio)
    counts = np.searchsorted(sorted_population, log_ratio - np.log(gamma), side="right")
    return counts / sorted_population.size


def rmia(
    target_probs,
    reference_probs,
    reference_masks,
    *,
    population_target_probs,
    population_reference_probs,
    gamma: float = 1.0,
) -> np.ndarray:
    """Score queries with online RMIA, from reference models that include or exclude each query.

    Args:
      target_probs: shape (N,), the target model's true-class probability on each query.
      reference_probs: shape (K, N), the same from K reference models.
      reference_masks: shape (K, N), bool, True where the query was in that reference model's
        training set. Every query needs >= 1 IN and >= 1 OUT reference model.
      population_target_probs: shape (M,), the target's true-class probability on M >= 1
        population samples, which are non-members of the target and of every reference model.
      population_reference_probs: shape (K, M), the same from the K reference models.
      gamma: threshold on the pairwise likelihood ratio, > 0.

    Returns:
      float64 scores of shape (N,) in [0, 1], higher means "more likely a member".

    Raises:
      ValueError: shapes disagree, a probability is NaN or outside [0, 1] (with the count or
        range), gamma <= 0, or a query has no IN or no OUT reference model.
    """
    _check_gamma(gamma)
    target_probs, reference_probs, population_target_probs, population_reference_probs = (
        _check_shapes(
            target_probs, reference_probs, population_target_probs, population_reference_probs
        )
    )
    reference_masks = _as_mask(reference_masks, reference_probs.shape)

    mean_in = _masked_mean(reference_probs, reference_masks, "IN", 1, "online rmia")
    mean_out = _masked_mean(reference_probs, ~reference_masks, "OUT", 1, "online rmia")
    marginal_probs = (mean_in + mean_out) / 2.0
    population_marginal_probs = population_reference_probs.mean(axis=0)
    return _pairwise_score(
        target_probs, marginal_probs, population_target_probs, population_marginal_probs, gamma
    )


def rmia_offline(
    target_probs,
    reference_probs,
    reference_masks=None,
    *,
    population_target_probs,
    population_reference_probs,
    offline_a: float,
    gamma: float = 1.0,
) -> np.ndarray:
    """Score queries with offline RMIA, from reference models that exclude each query.

    ``Pr(x) = (1 + a) / 2 * mean_OUT(x) + (1 - a) / 2`` for queries and population samples
    alike.

    Args:
      target_probs: shape (N,), the target model's true-class probability on each query.
      reference_probs: shape (K, N), the same from K >= 1 reference models.
      reference_masks: shape (K, N), bool, True where the query was in that reference model's
        training set; those entries are ignored. None means every query is OUT of every
        reference model. Every query needs >= 1 OUT reference model.
      population_target_probs: shape (M,), the target's true-class probability on M >= 1
        population samples, which are non-members of the target and of every reference model.
      population_reference_probs: shape (K, M), the same from the K reference models.
      offline_a: the linear approximation parameter a, in [0, 1]; a = 1 uses mean_OUT alone.
      gamma: threshold on the pairwise likelihood ratio, > 0.

    Returns:
      float64 scores of shape (N,) in [0, 1], higher means "more likely a member".

    Raises:
      ValueError: shapes disagree, a probability is NaN or outside [0, 1], gamma <= 0,
        offline_a outside [0, 1], or a query has no OUT reference model.
    """
    _check_gamma(gamma)
    if not 0.0 <= offline_a <= 1.0:
        raise ValueError(f"offline_a={offline_a} must be in [0, 1]")
    target_probs, reference_probs, population_target_probs, population_reference_probs = (
        _check_shapes(
            target_probs, reference_probs, population_target_probs, population_reference_probs
        )
    )
    if reference_masks is None:
        reference_masks = np.zeros(reference_probs.shape, dtype=bool)
    reference_masks = _as_mask(reference_masks, reference_probs.shape)

    mean_out = _masked_mean(reference_probs, ~reference_masks, "OUT", 1, "rmia_offline")
    marginal_probs = (1.0 + offline_a) / 2.0 * mean_out + (1.0 - offline_a) / 2.0
    population_mean_out = population_reference_probs.mean(axis=0)
    population_marginal_probs = (1.0 + offline_a) / 2.0 * population_mean_out + (
        1.0 - offline_a
    ) / 2.0
    return _pairwise_score(
        target_probs, marginal_probs, population_target_probs, population_marginal_probs, gamma
    )
