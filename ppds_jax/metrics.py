"""Membership-inference attack metrics: ROC, TPR at low FPR, confidence intervals, epsilon bounds.

An attack assigns each query a score, higher meaning "more likely a member", and flags a query as
a member when its score is at least a threshold. Every threshold gives one ROC point. Tied scores
are flagged together, so a threshold never separates two queries with the same score.

The figures follow Carlini et al., "Membership Inference Attacks From First Principles" (IEEE S&P
2022): AUC, balanced accuracy and, above all, TPR at a low FPR. The epsilon lower bounds follow
the hypothesis-testing view of differential privacy (Kairouz, Oh and Viswanath, "The Composition
Theorem for Differential Privacy", ICML 2015) with Clopper-Pearson intervals, as in Jagielski,
Ullman and Oprea, "Auditing Differentially Private Machine Learning" (NeurIPS 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats
import sklearn.metrics


def _validate_scores(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float64 (N,), is_member bool (N,)) after checking both."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member)
    if scores.ndim != 1 or is_member.shape != scores.shape:
        raise ValueError(
            f"scores and is_member must both have shape (N,); got scores {scores.shape}"
            f" and is_member {is_member.shape}"
        )
    num_nan = int(np.isnan(scores).sum())
    num_inf = int(np.isinf(scores).sum())
    if num_nan or num_inf:
        raise ValueError(
            f"scores contain {num_nan} NaN and {num_inf} infinite value(s) out of"
            f" {scores.size}; attack scores must be finite"
        )
    if is_member.dtype != np.bool_:
        if not np.isin(is_member, (0, 1)).all():
            raise ValueError(
                f"is_member must be bool or contain only 0 and 1; got values"
                f" {np.unique(is_member)[:10].tolist()}"
            )
        is_member = is_member.astype(bool)
    num_members = int(is_member.sum())
    if num_members == 0 or num_members == is_member.size:
        raise ValueError(
            f"is_member has {num_members} member(s) and {is_member.size - num_members}"
            " non-member(s); the metrics need at least one of each"
        )
    return scores, is_member


def roc_curve(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the ROC curve of an attack, one point per distinct score.

    A query is flagged as a member when ``score >= threshold``. Tied scores always fall on the
    same side of a threshold, so the curve jumps diagonally across a tie.

    Args:
      scores: shape (N,), finite floats, higher means "more likely a member".
      is_member: shape (N,), bool (or 0/1), the ground truth. Needs at least one member and one
        non-member.

    Returns:
      (fpr, tpr, thresholds), each of shape (P,) with P = number of distinct scores + 1. The
      first point is (0, 0) with threshold +inf (nothing flagged); fpr and tpr are
      non-decreasing and end at (1, 1).

    Raises:
      ValueError: shapes differ or are not 1-D, a score is NaN or infinite (the message gives the
        counts), is_member is not boolean, or it contains no member or no non-member.

    Example:
      >>> fpr, tpr, _ = roc_curve([0.9, 0.5, 0.5, 0.1], [True, True, False, False])
      >>> fpr.tolist(), tpr.tolist()
      ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    scores, is_member = _validate_scores(scores, is_member)
    # drop_intermediate=False keeps every distinct threshold, so TPR at a target FPR and the
    # counts read off the curve are those of real thresholds.
    fpr, tpr, thresholds = sklearn.metrics.roc_curve(is_member, scores, drop_intermediate=False)
    return fpr, tpr, thresholds


def tpr_at_fpr(fpr, tpr, target_fpr: float) -> float:
    """Return the TPR at the last ROC point whose FPR does not exceed `target_fpr`.

    Convention: the attack may not exceed the target FPR, so the result is
    ``max{tpr[i] : fpr[i] <= target_fpr}``. Because the ROC is non-decreasing in both
    coordinates, that is the TPR of the last such point. There is no interpolation between
    points. With ``n`` non-members the FPR moves in steps of ``1 / n``, so a target below
    ``1 / n`` can only be met with zero false positives. The comparison is exact, and
    ``k / n`` computed in floating point equals the literal ``target_fpr`` whenever the two are
    equal as real numbers, because IEEE division rounds correctly.

    Args:
      fpr: shape (P,), non-decreasing, starting at 0, as returned by `roc_curve`.
      tpr: shape (P,), non-decreasing.
      target_fpr: in [0, 1].

    Returns:
      The TPR as a float in [0, 1].

    Raises:
      ValueError: target_fpr outside [0, 1], fpr and tpr of different shapes, or fpr not
        starting at 0 or decreasing somewhere.

    Example:
      >>> tpr_at_fpr([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], 0.25)
      0.5
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr={target_fpr} must be in [0, 1]")
    if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size == 0:
        raise ValueError(
            f"fpr and tpr must be non-empty with the same shape (P,); got {fpr.shape} and"
            f" {tpr.shape}"
        )
    if fpr[0] != 0.0 or np.any(np.diff(fpr) < 0):
        raise ValueError("fpr must start at 0 and be non-decreasing, as roc_curve returns it")
    last = np.searchsorted(fpr, target_fpr, side="right") - 1
    return float(tpr[last])


def clopper_pearson_interval(
    successes: int, trials: int, *, confidence: float = 0.95
) -> tuple[float, float]:
    """Two-sided Clopper-Pearson ("exact") confidence interval for a binomial proportion.

    .. math::
      low = B^{-1}(\\alpha/2; k, n - k + 1),\\quad high = B^{-1}(1 - \\alpha/2; k + 1, n - k)

    with ``alpha = 1 - confidence``, ``low = 0`` when ``k = 0`` and ``high = 1`` when ``k = n``.
    Computed by `scipy.stats.binomtest(...).proportion_ci(method="exact")`.

    Args:
      successes: k, an integer in [0, trials].
      trials: n, an integer >= 1.
      confidence: in (0, 1).

    Returns:
      (low, high) as floats.

    Raises:
      ValueError: counts out of range or confidence outside (0, 1).
    """
    _check_counts("successes", successes, "trials", trials)
    _check_confidence(confidence)
    interval = scipy.stats.binomtest(int(successes), int(trials)).proportion_ci(
        confidence_level=confidence, method="exact"
    )
    return float(interval.low), float(interval.high)


def attack_metrics(
    scores,
    is_member,
    *,
    target_fprs: Sequence[float] = (0.001, 0.01),
    confidence: float = 0.95,
) -> dict:
    """Summarise an attack's scores into JSON-serialisable metrics.

    Keys, with ``t`` formatted by ``f"{t:g}"`` for each target FPR (``0.001`` and ``0.01`` by
    default):

    - ``auc``: area under the ROC curve, where a tie between a member and a non-member counts
      1/2.
    - ``balanced_accuracy``: ``max over thresholds of 1 - (FPR + FNR) / 2``, at least 0.5.
    - ``tpr_at_fpr_{t}``: TPR at the last ROC point with FPR <= t (see `tpr_at_fpr`).
    - ``tpr_at_fpr_{t}_ci``: ``[low, high]``, two-sided Clopper-Pearson interval of that TPR
      at level `confidence`, over the members. It treats the threshold as fixed, so it ignores
      the noise in choosing the threshold from the non-members.
    - ``true_positives_at_fpr_{t}``, ``false_positives_at_fpr_{t}``: counts at that ROC point.
    - ``num_members``, ``num_non_members``.

    Args:
      scores: shape (N,), finite floats, higher means "more likely a member".
      is_member: shape (N,), bool (or 0/1).
      target_fprs: FPRs at which to report the TPR, each in [0, 1].
      confidence: level of the TPR intervals, in (0, 1).

    Returns:
      dict of Python floats, ints and lists, ready for `json.dump`.

    Raises:
      ValueError: as in `roc_curve`, or a target FPR or the confidence out of range.
    """
    _check_confidence(confidence)
    fpr, tpr, _ = roc_curve(scores, is_member)
    is_member = np.asarray(is_member).astype(bool)
    num_members = int(is_member.sum())
    num_non_members = int(is_member.size - num_members)

    metrics = {
        "auc": float(sklearn.metrics.roc_auc_score(is_member, np.asarray(scores, np.float64))),
        "balanced_accuracy": float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0)),
    }
    for target in target_fprs:
        rate = tpr_at_fpr(fpr, tpr, target)
        # fpr and tpr are counts divided by the class sizes, so rounding recovers the counts.
        true_positives = int(np.rint(rate * num_members))
        last = np.searchsorted(fpr, target, side="right") - 1
        false_positives = int(np.rint(fpr[last] * num_non_members))
        low, high = clopper_pearson_interval(true_positives, num_members, confidence=confidence)
        key = f"tpr_at_fpr_{target:g}"
        metrics[key] = rate
        metrics[f"{key}_ci"] = [low, high]
        metrics[f"true_positives_at_fpr_{target:g}"] = true_positives
        metrics[f"false_positives_at_fpr_{target:g}"] = false_positives
    metrics["num_members"] = num_members
    metrics["num_non_members"] = num_non_members
    return metrics


def _check_counts(successes_name: str, successes, trials_name: str, trials) -> None:
    """Raise unless 0 <= successes <= trials and trials >= 1, both integers."""
    for name, value in ((successes_name, successes), (trials_name, trials)):
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"{name}={value!r} must be an integer")
    if trials < 1:
        raise ValueError(f"{trials_name}={trials} must be >= 1")
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes_name}={successes} must be in [0, {trials_name}={trials}]")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")


def _one_sided_lower(successes, trials, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound at level 1 - alpha; 0 where successes == 0."""
    successes = np.asarray(successes, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    positive = successes > 0
    bound = scipy.stats.beta.ppf(
        alpha, np.where(positive, successes, 1.0), trials - successes + 1.0
    )
    return np.where(positive, bound, 0.0)


def _one_sided_upper(successes, trials, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound at level 1 - alpha; 1 where successes == trials."""
    successes = np.asarray(successes, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    below = successes < trials
    bound = scipy.stats.beta.ppf(
        1.0 - alpha, successes + 1.0, np.where(below, trials - successes, 1.0)
    )
    return np.where(below, bound, 1.0)


def _epsilon_from_rates(tpr_low, fpr_high, delta: float) -> np.ndarray:
    """max(0, log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR))), elementwise."""
    tpr_low = np.asarray(tpr_low, dtype=np.float64)
    fpr_high = np.asarray(fpr_high, dtype=np.float64)
    # Clopper-Pearson gives fpr_high > 0 and tpr_low < 1 for any finite count, so neither
    # denominator is zero. A numerator <= 0 means that inequality bounds nothing.
    with np.errstate(divide="ignore", invalid="ignore"):
        from_tpr = np.where(tpr_low > delta, np.log((tpr_low - delta) / fpr_high), 0.0)
        from_tnr = np.where(
            1.0 - fpr_high - delta > 0.0,
            np.log((1.0 - fpr_high - delta) / (1.0 - tpr_low)),
            0.0,
        )
    return np.maximum(np.maximum(from_tpr, from_tnr), 0.0)


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta={delta} must be in [0, 1)")


def epsilon_lower_bound(
    *,
    true_positives: int,
    positives: int,
    false_positives: int,
    negatives: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Lower-bound epsilon from one attack threshold's counts, with confidence `confidence`.

    Any test of "member" against "non-member" on an (epsilon, delta)-DP mechanism satisfies
    both inequalities of the hypothesis-testing characterisation of DP (Kairouz, Oh and
    Viswanath, 2015, Theorem 2.1):

    .. math::
      TPR \\le e^{\\varepsilon} FPR + \\delta, \\qquad
      1 - FPR \\le e^{\\varepsilon} (1 - TPR) + \\delta

    so ``epsilon >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)))``. Both
    expressions increase with TPR and decrease with FPR, so plugging in the one-sided
    Clopper-Pearson lower bound TPR_lo and upper bound FPR_hi gives a lower bound on epsilon.
    Each one-sided bound uses level ``1 - (1 - confidence) / 2``, so by the union bound both hold
    together, and hence the epsilon bound holds, with probability at least `confidence`. A
    result that is not positive is reported as 0.

    NOTE: the confidence statement assumes that the positives and negatives are independent
    trials of the DP game, for example one fresh training run per trial (Jagielski et al.,
    2020). Counts taken from many examples of a single trained model are not independent, so
    the bound is then an estimate rather than a guarantee.

    Args:
      true_positives: members flagged, an integer in [0, positives].
      positives: members tested, >= 1.
      false_positives: non-members flagged, an integer in [0, negatives].
      negatives: non-members tested, >= 1.
      delta: the DP delta, in [0, 1).
      confidence: joint confidence of both Clopper-Pearson bounds, in (0, 1).

    Returns:
      The epsilon lower bound, a float >= 0.

    Raises:
      ValueError: counts out of range, delta outside [0, 1) or confidence outside (0, 1).

    Example:
      >>> round(epsilon_lower_bound(true_positives=100, positives=100, false_positives=0,
      ...                           negatives=100, delta=0.0), 3)
      3.281
    """
    _check_counts("true_positives", true_positives, "positives", positives)
    _check_counts("false_positives", false_positives, "negatives", negatives)
    _check_delta(delta)
    _check_confidence(confidence)
    alpha = (1.0 - confidence) / 2.0
    tpr_low = _one_sided_lower(true_positives, positives, alpha)
    fpr_high = _one_sided_upper(false_positives, negatives, alpha)
    return float(_epsilon_from_rates(tpr_low, fpr_high, delta))


def epsilon_lower_bound_from_scores(
    scores, is_member, *, delta: float, confidence: float = 0.95
) -> float:
    """Return the largest `epsilon_lower_bound` over all ROC thresholds of an attack's scores.

    At each distinct threshold of `roc_curve` the counts of flagged members and non-members go
    into `epsilon_lower_bound`, and the maximum over thresholds is returned.

    NOTE: the threshold is chosen on the same counts that bound epsilon, so the stated
    confidence holds only approximately and the bound is optimistic. For an audit at an exact
    confidence level, choose the threshold on held-out trials and call `epsilon_lower_bound`
    with the counts of fresh trials at that threshold. The independence caveat of
    `epsilon_lower_bound` applies too.

    Args:
      scores: shape (N,), finite floats, higher means "more likely a member".
      is_member: shape (N,), bool (or 0/1).
      delta: the DP delta, in [0, 1).
      confidence: per-threshold joint confidence, in (0, 1).

    Returns:
      The largest epsilon lower bound, a float >= 0.

    Raises:
      ValueError: as in `roc_curve`, or delta or confidence out of range.
    """
    _check_delta(delta)
    _check_confidence(confidence)
    fpr, tpr, _ = roc_curve(scores, is_member)
    is_member = np.asarray(is_member).astype(bool)
    positives = int(is_member.sum())
    negatives = int(is_member.size - positives)
    true_positives = np.rint(tpr * positives)
    false_positives = np.rint(fpr * negatives)

    alpha = (1.0 - confidence) / 2.0
    tpr_low = _one_sided_lower(true_positives, positives, alpha)
    fpr_high = _one_sided_upper(false_positives, negatives, alpha)
    return float(np.max(_epsilon_from_rates(tpr_low, fpr_high, delta)))
