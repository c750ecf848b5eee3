"""Likelihood ratio attack, LiRA (Carlini et al., "Membership Inference Attacks From First
Principles", IEEE S&P 2022).

Shadow models are trained on random subsets of the data pool, so each example is IN some of them
and OUT of the others. For each example, LiRA fits a Gaussian to the shadow models' signals
(usually `signals.logit_confidence`) when the example was IN and one when it was OUT, and scores
the target model's signal on the example:

- online: ``log N(phi; mu_in, sigma_in^2) - log N(phi; mu_out, sigma_out^2)``;
- offline, with OUT shadows only: ``-log Pr[Z > phi]`` for ``Z ~ N(mu_out, sigma_out^2)``, a
  one-sided test that grows as phi moves above the OUT distribution.

Means are sample means and per-example variances are unbiased sample variances (ddof = 1).
With few shadow models the per-example variance is noisy, and Carlini et al. use one global
variance instead (`fixed_variance=True`). Here the global variance is the pooled
within-example variance: squared deviations from each example's own IN or OUT mean, summed over
examples and divided by the pooled degrees of freedom.

Each query has one signal. NOTE: Carlini et al. also query augmented copies of each example
(flips, shifts) and fit multivariate Gaussians. This module does not model augmentations, so
it matches their single-query variant.

Minimum shadow signals per example:

===============  ===============  ================
method           fixed variance   per-example
===============  ===============  ================
`lira_online`    >= 1 IN, 1 OUT   >= 2 IN, 2 OUT
`lira_offline`   >= 1 OUT         >= 2 OUT
===============  ===============  ================

An example below the minimum raises ValueError; nothing falls back silently. With too few
shadows for per-example variances, pass ``fixed_variance=True`` or train more shadow models.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

# Keeps Gaussian log densities finite when every shadow signal of an example is identical,
# which would otherwise give a zero variance.
_STD_FLOOR = 1e-6


def _as_mask(name: str, mask, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape} like shadow_signals; got {mask.shape}")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must be bool or contain only 0 and 1")
        mask = mask.astype(bool)
    return mask


def _check_signals(target_signal, shadow_signals) -> tuple[np.ndarray, np.ndarray]:
    """Return (target (N,), shadows (K, N)) as float64 after checking shapes and finiteness."""
    target_signal = np.asarray(target_signal, dtype=np.float64)
    shadow_signals = np.asarray(shadow_signals, dtype=np.float64)
    if target_signal.ndim != 1:
        raise ValueError(f"target_signal must have shape (N,); got {target_signal.shape}")
    if shadow_signals.ndim != 2 or shadow_signals.shape[1] != target_signal.shape[0]:
        raise ValueError(
            f"shadow_signals must have shape (K, N) = (K, {target_signal.shape[0]});"
            f" got {shadow_signals.shape}"
        )
    if shadow_signals.shape[0] == 0:
        raise ValueError("shadow_signals has K = 0 shadow models; LiRA needs at least one")
    for name, values in (("target_signal", target_signal), ("shadow_signals", shadow_signals)):
        num_nan = int(np.isnan(values).sum())
        num_inf = int(np.isinf(values).sum())
        if num_nan or num_inf:
            raise ValueError(
                f"{name} contains {num_nan} NaN and {num_inf} infinite value(s) out of"
                f" {values.size}; signals must be finite"
            )
    return target_signal, shadow_signals


def _check_min_count(counts: np.ndarray, minimum: int, group: str, method: str, hint: str):
    short = np.flatnonzero(counts < minimum)
    if short.size:
        first = int(short[0])
        raise ValueError(
            f"{method} needs >= {minimum} {group} shadow signal(s) per example, but"
            f" {short.size} example(s) have fewer, for example index {first} with"
            f" {int(counts[first])}; {hint}"
        )


def _group_moments(signals: np.ndarray, selected: np.ndarray):
    """Per-example count, mean and sum of squared deviations of the selected signals."""
    counts = selected.sum(axis=0)
    totals = np.where(selected, signals, 0.0).sum(axis=0)
    means = totals / np.maximum(counts, 1)
    squared_deviations = np.where(selected, (signals - means) ** 2, 0.0).sum(axis=0)
    return counts, means, squared_deviations


def _per_example_std(counts: np.ndarray, squared_deviations: np.ndarray) -> np.ndarray:
    variance = squared_deviations / np.maximum(counts - 1, 1)
    return np.maximum(np.sqrt(variance), _STD_FLOOR)


def _pooled_std(signals: np.ndarray, groups) -> float:
    """Pooled within-example std over the groups, each a tuple (selected, counts, sq. deviations).

    When no group has two signals for any example (for example K = 2 balanced shadows online),
    the within-example variance is not identifiable and the std of all selected signals about
    their overall mean is used. A single std shared by every example scales all scores alike,
    so this choice changes the scores' scale but not their ranking.
    """
    degrees_of_freedom = sum(float(np.maximum(counts - 1, 0).sum()) for _, counts, _ in groups)
    if degrees_of_freedom > 0:
        total = sum(float(squared_deviations.sum()) for _, _, squared_deviations in groups)
        return max(float(np.sqrt(total / degrees_of_freedom)), _STD_FLOOR)
    selected = np.zeros(signals.shape, dtype=bool)
    for group_selected, _, _ in groups:
        selected |= group_selected
    return max(float(np.std(signals[selected])), _STD_FLOOR)


def lira_online(
    target_signal, shadow_signals, shadow_masks, *, fixed_variance: bool = False
) -> np.ndarray:
    """Score queries with online LiRA, fitting IN and OUT Gaussians per example.

    .. math::
      s(x) = \\log \\mathcal{N}(\\phi_x; \\mu_{in}(x), \\sigma_{in}^2(x))
           - \\log \\mathcal{N}(\\phi_x; \\mu_{out}(x), \\sigma_{out}^2(x))

    With ``fixed_variance=True``, sigma_in and sigma_out are one pooled within-example std
    shared by every example and by both groups.

    Args:
      target_signal: shape (N,), the target model's signal on each query, for example
        `signals.logit_confidence`.
      shadow_signals: shape (K, N), the same signal from K shadow models.
      shadow_masks: shape (K, N), bool, True where the query was in that shadow's training set.
      fixed_variance: use one global std instead of per-example stds.

    Returns:
      float64 scores of shape (N,), higher means "more likely a member".

    Raises:
      ValueError: shapes disagree, a signal is NaN or infinite (with the counts), or an example
        has fewer IN or OUT shadow signals than the method needs: >= 2 each with per-example
        variances, >= 1 each with a fixed variance. The message names the first such example.
    """
    target_signal, shadow_signals = _check_signals(target_signal, shadow_signals)
    shadow_masks = _as_mask("shadow_masks", shadow_masks, shadow_signals.shape)

    in_counts, in_means, in_deviations = _group_moments(shadow_signals, shadow_masks)
    out_counts, out_means, out_deviations = _group_moments(shadow_signals, ~shadow_masks)
    if fixed_variance:
        hint = "train more shadow models, each with a random half of the pool"
        _check_min_count(in_counts, 1, "IN", "lira_online with a fixed variance", hint)
        _check_min_count(out_counts, 1, "OUT", "lira_online with a fixed variance", hint)
        std = _pooled_std(
            shadow_signals,
            [
                (shadow_masks, in_counts, in_deviations),
                (~shadow_masks, out_counts, out_deviations),
            ],
        )
        in_std = out_std = std
    else:
        hint = "pass fixed_variance=True, which needs >= 1, or train more shadow models"
        _check_min_count(in_counts, 2, "IN", "lira_online with per-example variances", hint)
        _check_min_count(out_counts, 2, "OUT", "lira_online with per-example variances", hint)
        in_std = _per_example_std(in_counts, in_deviations)
        out_std = _per_example_std(out_counts, out_deviations)

    log_in = scipy.stats.norm.logpdf(target_signal, loc=in_means, scale=in_std)
    log_out = scipy.stats.norm.logpdf(target_signal, loc=out_means, scale=out_std)
    return log_in - log_out


def lira_offline(
    target_signal, shadow_signals, shadow_masks=None, *, fixed_variance: bool = False
) -> np.ndarray:
    """Score queries with offline LiRA, which uses only the shadows each query was OUT of.

    .. math::
      s(x) = -\\log \\Pr[Z > \\phi_x], \\quad Z \\sim \\mathcal{N}(\\mu_{out}(x),
      \\sigma_{out}^2(x))

    This is a monotone transform of Carlini et al.'s one-sided test ``Pr[Z <= phi_x]``, which
    keeps resolution in the upper tail where that probability rounds to 1.

    Args:
      target_signal: shape (N,), the target model's signal on each query.
      shadow_signals: shape (K, N), the same signal from K shadow models.
      shadow_masks: shape (K, N), bool, True where the query was in that shadow's training
        set. Those entries are ignored. None means every query is OUT of every shadow.
      fixed_variance: use one pooled within-example std for every example.

    Returns:
      float64 scores of shape (N,), higher means "more likely a member".

    Raises:
      ValueError: shapes disagree, a signal is NaN or infinite (with the counts), or an example
        has fewer OUT shadow signals than the method needs: >= 2 with per-example variances,
        >= 1 with a fixed variance. The message names the first such example.
    """
    target_signal, shadow_signals = _check_signals(target_signal, shadow_signals)
    if shadow_masks is None:
        shadow_masks = np.zeros(shadow_signals.shape, dtype=bool)
    shadow_masks = _as_mask("shadow_masks", shadow_masks, shadow_signals.shape)

    out_counts, out_means, out_deviations = _group_moments(shadow_signals, ~shadow_masks)
    if fixed_variance:
        hint = "train more shadow models that exclude each example"
        _check_min_count(out_counts, 1, "OUT", "lira_offline with a fixed variance", hint)
        out_std = _pooled_std(shadow_signals, [(~shadow_masks, out_counts, out_deviations)])
    else:
        hint = "pass fixed_variance=True, which needs >= 1, or train more shadow models"
        _check_min_count(out_counts, 2, "OUT", "lira_offline with per-example variances", hint)
        out_std = _per_example_std(out_counts, out_deviations)

    return -scipy.stats.norm.logsf(target_signal, loc=out_means, scale=out_std)
