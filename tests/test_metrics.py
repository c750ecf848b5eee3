"""Tests for ppds_jax.metrics against hand-computed ROC points, intervals and epsilon bounds."""

import itertools
import json
import math

import numpy as np
import pytest
import scipy.stats

from ppds_jax import metrics

# Eight queries with two ties that cross the classes: 0.8 (member, non-member) and 0.6
# (member, non-member). Four members and four non-members.
SCORES = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.5, 0.3])
IS_MEMBER = np.array([1, 1, 0, 1, 1, 0, 0, 0], dtype=bool)

# A query is flagged when score >= threshold. (TP, FP) out of (4, 4) at each threshold:
#   +inf: (0, 0) -> (FPR, TPR) = (0, 0)
#   0.9:  (1, 0) -> (0, 0.25)
#   0.8:  (2, 1) -> (0.25, 0.5)    both tied 0.8 scores enter together
#   0.7:  (3, 1) -> (0.25, 0.75)
#   0.6:  (4, 2) -> (0.5, 1)       both tied 0.6 scores enter together
#   0.5:  (4, 3) -> (0.75, 1)
#   0.3:  (4, 4) -> (1, 1)
EXPECTED_FPR = [0.0, 0.0, 0.25, 0.25, 0.5, 0.75, 1.0]
EXPECTED_TPR = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
# Trapezoids between consecutive points: 0 + 0.25 * 0.375 + 0 + 0.25 * 0.875 + 0.25 + 0.25
# = 0.8125. Pair count: member 0.9 beats 4 non-members, 0.8 beats 3 and ties 1 (3.5),
# 0.7 beats 3, 0.6 beats 2 and ties 1 (2.5): 13 / 16 = 0.8125.
EXPECTED_AUC = 0.8125
# (1 + TPR - FPR) / 2 at each point: 0.5, 0.625, 0.625, 0.75, 0.75, 0.625, 0.5.
EXPECTED_BALANCED_ACCURACY = 0.75


def test_roc_points_with_ties():
    fpr, tpr, thresholds = metrics.roc_curve(SCORES, IS_MEMBER)

    np.testing.assert_allclose(fpr, EXPECTED_FPR)
    np.testing.assert_allclose(tpr, EXPECTED_TPR)
    assert thresholds[0] == np.inf
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.8, 0.7, 0.6, 0.5, 0.3])


def test_roc_never_splits_tied_scores():
    fpr, tpr, _ = metrics.roc_curve(SCORES, IS_MEMBER)
    points = set(zip(fpr.tolist(), tpr.tolist(), strict=True))

    # Splitting the 0.8 tie would give (0, 0.5) or (0.25, 0.25). Splitting 0.6 gives (0.25, 1).
    for split_point in [(0.0, 0.5), (0.25, 0.25), (0.25, 1.0)]:
        assert split_point not in points


def test_auc_matches_pair_count():
    result = metrics.attack_metrics(SCORES, IS_MEMBER)
    pair_wins = 0.0
    for member, non_member in itertools.product(SCORES[IS_MEMBER], SCORES[~IS_MEMBER]):
        if member > non_member:
            pair_wins += 1.0
        elif member == non_member:
            pair_wins += 0.5

    assert result["auc"] == pytest.approx(EXPECTED_AUC)
    assert result["auc"] == pytest.approx(pair_wins / 16)


def test_balanced_accuracy_is_best_threshold():
    result = metrics.attack_metrics(SCORES, IS_MEMBER)
    best = 0.5
    for threshold in np.unique(SCORES):
        flagged = SCORES >= threshold
        tpr = flagged[IS_MEMBER].mean()
        fpr = flagged[~IS_MEMBER].mean()
        best = max(best, 1.0 - (fpr + (1.0 - tpr)) / 2.0)

    assert result["balanced_accuracy"] == pytest.approx(EXPECTED_BALANCED_ACCURACY)
    assert result["balanced_accuracy"] == pytest.approx(best)


@pytest.mark.parametrize(
    "target_fpr, expected_tpr",
    [
        (0.0, 0.25),  # (0, 0.25) is the last point with FPR 0
        (0.1, 0.25),  # the next point has FPR 0.25 > 0.1
        (0.25, 0.75),  # last of the two FPR = 0.25 points
        (0.3, 0.75),
        (0.5, 1.0),
        (1.0, 1.0),
    ],
)
def test_tpr_at_fpr_convention(target_fpr, expected_tpr):
    fpr, tpr, _ = metrics.roc_curve(SCORES, IS_MEMBER)

    assert metrics.tpr_at_fpr(fpr, tpr, target_fpr) == expected_tpr


def test_tpr_at_fpr_exact_target():
    # 300 non-members and 100 members: the 3 highest non-members outrank 50 members, so the
    # point with 3 false positives has FPR 3 / 300 = 0.01 exactly and TPR 50 / 100.
    non_members = np.arange(300, dtype=np.float64)
    members = np.concatenate([np.full(50, 296.5), np.full(50, -1.0)])
    scores = np.concatenate([non_members, members])
    is_member = np.arange(400) >= 300
    fpr, tpr, _ = metrics.roc_curve(scores, is_member)

    assert metrics.tpr_at_fpr(fpr, tpr, 0.01) == 0.5
    assert metrics.tpr_at_fpr(fpr, tpr, 0.0099) == 0.0


def test_attack_metrics_counts_and_json():
    result = metrics.attack_metrics(SCORES, IS_MEMBER, target_fprs=(0.001, 0.25))

    # FPR 0.001 < 1/4 allows no false positive: point (0, 0.25), TP = 1. FPR 0.25: (0.25, 0.75).
    assert result["tpr_at_fpr_0.001"] == 0.25
    assert result["true_positives_at_fpr_0.001"] == 1
    assert result["false_positives_at_fpr_0.001"] == 0
    assert result["tpr_at_fpr_0.25"] == 0.75
    assert result["true_positives_at_fpr_0.25"] == 3
    assert result["false_positives_at_fpr_0.25"] == 1
    assert result["num_members"] == 4
    assert result["num_non_members"] == 4
    assert json.loads(json.dumps(result)) == result


def test_attack_metrics_default_keys():
    result = metrics.attack_metrics(SCORES, IS_MEMBER)

    for key in ["auc", "balanced_accuracy", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"]:
        assert isinstance(result[key], float)
    for key in ["tpr_at_fpr_0.001_ci", "tpr_at_fpr_0.01_ci"]:
        assert len(result[key]) == 2


def test_tpr_interval_matches_beta_quantiles():
    result = metrics.attack_metrics(SCORES, IS_MEMBER, target_fprs=(0.25,))
    # TP = 3 of 4 members; Clopper-Pearson at 95%: Beta(3, 2) 2.5% quantile and Beta(4, 1)
    # 97.5% quantile. Beta(4, 1) has CDF x^4, so the upper end is 0.975 ** 0.25 = 0.99369.
    low, high = result["tpr_at_fpr_0.25_ci"]

    assert low == pytest.approx(scipy.stats.beta.ppf(0.025, 3, 2), rel=1e-9)
    assert high == pytest.approx(0.975**0.25, rel=1e-9)


@pytest.mark.parametrize("successes, trials", [(0, 10), (1, 10), (5, 10), (9, 10), (10, 10)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_clopper_pearson_matches_beta_quantiles(successes, trials, confidence):
    alpha = 1.0 - confidence
    if successes == 0:
        expected_low = 0.0
    else:
        expected_low = scipy.stats.beta.ppf(alpha / 2, successes, trials - successes + 1)
    if successes == trials:
        expected_high = 1.0
    else:
        expected_high = scipy.stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)

    low, high = metrics.clopper_pearson_interval(successes, trials, confidence=confidence)

    assert low == pytest.approx(expected_low, rel=1e-9, abs=1e-12)
    assert high == pytest.approx(expected_high, rel=1e-9)


def test_clopper_pearson_zero_successes():
    # With k = 0 the upper end solves (1 - p)^n = alpha / 2: p = 1 - 0.025 ** (1 / 20).
    _, high = metrics.clopper_pearson_interval(0, 20, confidence=0.95)

    assert high == pytest.approx(1.0 - 0.025 ** (1 / 20), rel=1e-9)


def test_epsilon_bound_perfect_attack():
    # TP = P = 100, FP = 0 of N = 100, delta = 0, confidence 0.95 split as 0.025 per side.
    # Beta(100, 1) has CDF x^100, so TPR_lo = 0.025 ** (1 / 100) = 0.963783 and
    # FPR_hi = 1 - 0.025 ** (1 / 100) = 0.036217 (the k = 0 upper bound).
    # log(TPR_lo / FPR_hi) = log(26.611) = 3.2814, and the second inequality gives the same.
    tpr_low = 0.025 ** (1 / 100)
    fpr_high = 1.0 - 0.025 ** (1 / 100)
    expected = math.log(tpr_low / fpr_high)

    bound = metrics.epsilon_lower_bound(
        true_positives=100, positives=100, false_positives=0, negatives=100, delta=0.0
    )

    assert bound == pytest.approx(expected, rel=1e-9)
    assert bound == pytest.approx(3.2814, abs=1e-4)


def test_epsilon_bound_hand_computation():
    # TP = 900 of 1000, FP = 10 of 1000, delta = 1e-5, 95% joint confidence.
    # TPR_lo = Beta(900, 101) 2.5% quantile ~ 0.8797; FPR_hi = Beta(11, 990) 97.5% quantile
    # ~ 0.01831. First inequality: log((0.8797 - 1e-5) / 0.01831) ~ 3.872. Second:
    # log((1 - 0.01831 - 1e-5) / (1 - 0.8797)) ~ 2.10. The bound is the larger, ~ 3.87.
    tpr_low = scipy.stats.beta.ppf(0.025, 900, 101)
    fpr_high = scipy.stats.beta.ppf(0.975, 11, 990)
    expected = max(
        math.log((tpr_low - 1e-5) / fpr_high), math.log((1 - fpr_high - 1e-5) / (1 - tpr_low))
    )

    bound = metrics.epsilon_lower_bound(
        true_positives=900, positives=1000, false_positives=10, negatives=1000, delta=1e-5
    )

    assert bound == pytest.approx(expected, rel=1e-9)
    assert bound == pytest.approx(3.87, abs=0.01)


def test_epsilon_bound_second_inequality():
    # TP = 1000 of 1000 and FP = 500 of 1000: the first inequality gives only
    # log(TPR_lo / FPR_hi) ~ log(0.9963 / 0.5315) ~ 0.63, the second
    # log((1 - 0.5315) / (1 - 0.9963)) ~ 4.85.
    tpr_low = 0.025 ** (1 / 1000)
    fpr_high = scipy.stats.beta.ppf(0.975, 501, 500)
    expected = math.log((1 - fpr_high) / (1 - tpr_low))

    bound = metrics.epsilon_lower_bound(
        true_positives=1000, positives=1000, false_positives=500, negatives=1000, delta=0.0
    )

    assert bound == pytest.approx(expected, rel=1e-9)
    assert bound > math.log(tpr_low / fpr_high) + 1.0


def test_epsilon_lower_bound_is_zero_without_signal():
    bound = metrics.epsilon_lower_bound(
        true_positives=50, positives=100, false_positives=50, negatives=100, delta=1e-5
    )

    assert bound == 0.0


def test_epsilon_lower_bound_decreases_with_delta():
    counts = dict(true_positives=900, positives=1000, false_positives=10, negatives=1000)

    loose = metrics.epsilon_lower_bound(**counts, delta=0.0)
    tight = metrics.epsilon_lower_bound(**counts, delta=0.5)

    assert tight < loose


def test_epsilon_from_scores_max_threshold():
    rng = np.random.default_rng(0)
    is_member = np.arange(200) < 100
    scores = np.round(rng.normal(size=200) + 1.5 * is_member, 1)  # rounding makes ties
    expected = 0.0
    for threshold in np.unique(scores):
        flagged = scores >= threshold
        expected = max(
            expected,
            metrics.epsilon_lower_bound(
                true_positives=int(flagged[is_member].sum()),
                positives=100,
                false_positives=int(flagged[~is_member].sum()),
                negatives=100,
                delta=1e-5,
            ),
        )

    bound = metrics.epsilon_lower_bound_from_scores(scores, is_member, delta=1e-5)

    assert expected > 0.5
    assert bound == pytest.approx(expected, rel=1e-9)


def test_random_scores_give_chance_metrics():
    rng = np.random.default_rng(1)
    num_members = num_non_members = 5000
    is_member = np.arange(10000) < num_members
    scores = rng.normal(size=10000)
    # Under no signal, AUC has standard error sqrt((n1 + n0 + 1) / (12 n1 n0)) = 0.0041, and
    # TPR at 1% FPR about sqrt(2 * 0.01 * 0.99 / 5000) = 0.0020.
    auc_se = math.sqrt((num_members + num_non_members + 1) / (12 * num_members * num_non_members))
    tpr_se = math.sqrt(2 * 0.01 * 0.99 / num_members)

    result = metrics.attack_metrics(scores, is_member)

    assert abs(result["auc"] - 0.5) < 4 * auc_se
    assert abs(result["tpr_at_fpr_0.01"] - 0.01) < 4 * tpr_se
    assert result["balanced_accuracy"] < 0.5 + 4 * 0.5 * math.sqrt(2 / num_members)


def test_nan_scores_rejected_with_count():
    scores = SCORES.copy()
    scores[[1, 4]] = np.nan

    with pytest.raises(ValueError, match="2 NaN"):
        metrics.attack_metrics(scores, IS_MEMBER)


def test_infinite_scores_rejected_with_count():
    scores = SCORES.copy()
    scores[0] = np.inf

    with pytest.raises(ValueError, match="1 infinite"):
        metrics.roc_curve(scores, IS_MEMBER)


def test_mismatched_shapes_rejected():
    with pytest.raises(ValueError, match=r"\(8,\).*\(7,\)"):
        metrics.attack_metrics(SCORES, IS_MEMBER[:7])


@pytest.mark.parametrize("labels", [np.ones(8, bool), np.zeros(8, bool)])
def test_one_class_labels_rejected(labels):
    with pytest.raises(ValueError, match="at least one of each"):
        metrics.attack_metrics(SCORES, labels)


def test_non_binary_labels_rejected():
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.roc_curve(SCORES, np.array([0, 1, 2, 0, 1, 0, 1, 0]))


def test_out_of_range_arguments_rejected():
    fpr, tpr, _ = metrics.roc_curve(SCORES, IS_MEMBER)
    with pytest.raises(ValueError, match="target_fpr=1.5"):
        metrics.tpr_at_fpr(fpr, tpr, 1.5)
    with pytest.raises(ValueError, match="true_positives=11"):
        metrics.epsilon_lower_bound(
            true_positives=11, positives=10, false_positives=0, negatives=10, delta=0.0
        )
    with pytest.raises(ValueError, match="delta=1.0"):
        metrics.epsilon_lower_bound(
            true_positives=1, positives=10, false_positives=0, negatives=10, delta=1.0
        )
    with pytest.raises(ValueError, match="confidence=1.0"):
        metrics.clopper_pearson_interval(1, 10, confidence=1.0)
