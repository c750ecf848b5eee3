"""Tests for ppds_jax.membership: mask statistics, balance, determinism and validation."""

import itertools
import math

import numpy as np
import pytest

from ppds_jax.membership import expected_member_count, membership_masks

POOL_SIZE = 20_000


def _binomial_tolerance(prob: float, count: int, num_std: float = 4.0) -> float:
    """Return num_std standard deviations of a fraction of `count` Bernoulli(prob) draws."""
    return num_std * math.sqrt(prob * (1 - prob) / count)


def test_target_fraction_near_inclusion_prob():
    for prob in (0.5, 0.3):
        target, _ = membership_masks(
            seed=1, pool_size=POOL_SIZE, num_shadows=0, inclusion_prob=prob
        )

        assert target.shape == (POOL_SIZE,)
        assert target.dtype == np.bool_
        assert abs(target.mean() - prob) < _binomial_tolerance(prob, POOL_SIZE)


def test_even_shadows_are_exactly_balanced():
    num_shadows = 8
    _, shadows = membership_masks(seed=2, pool_size=POOL_SIZE, num_shadows=num_shadows)

    assert shadows.shape == (num_shadows, POOL_SIZE)
    assert shadows.dtype == np.bool_
    np.testing.assert_array_equal(shadows.sum(axis=0), num_shadows // 2)
    for row in shadows:
        assert abs(row.mean() - 0.5) < _binomial_tolerance(0.5, POOL_SIZE)


def test_balanced_halves_are_uniformly_random():
    # If each example's K/2 shadows are a uniform random half of K, two given shadows both
    # include it with probability (K/2) * (K/2 - 1) / (K * (K - 1)), which is 1/6 for K = 4.
    num_shadows = 4
    _, shadows = membership_masks(seed=3, pool_size=POOL_SIZE, num_shadows=num_shadows)
    half = num_shadows // 2
    both_prob = half * (half - 1) / (num_shadows * (num_shadows - 1))

    for i, j in itertools.combinations(range(num_shadows), 2):
        both = np.mean(shadows[i] & shadows[j])
        assert abs(both - both_prob) < _binomial_tolerance(both_prob, POOL_SIZE)


def test_odd_shadows_are_independent_bernoulli():
    _, shadows = membership_masks(seed=4, pool_size=POOL_SIZE, num_shadows=3)
    counts = shadows.sum(axis=0)

    # Binomial(3, 1/2) gives counts 0, 1, 2, 3 with probabilities 1/8, 3/8, 3/8, 1/8.
    for count, prob in zip(range(4), (1 / 8, 3 / 8, 3 / 8, 1 / 8), strict=True):
        assert abs(np.mean(counts == count) - prob) < _binomial_tolerance(prob, POOL_SIZE)


def test_unbalanced_prob_gives_bernoulli_shadows():
    prob = 0.25
    _, shadows = membership_masks(seed=5, pool_size=POOL_SIZE, num_shadows=4, inclusion_prob=prob)

    assert abs(shadows.mean() - prob) < _binomial_tolerance(prob, 4 * POOL_SIZE)
    # Exact balance would make every count equal to 1; Bernoulli draws give counts 0 to 4.
    assert set(np.unique(shadows.sum(axis=0))) == {0, 1, 2, 3, 4}


def test_target_uncorrelated_with_shadows():
    # Under independence the sample Pearson correlation of two N-vectors has standard
    # deviation about 1 / sqrt(N), so 4 / sqrt(N) is a 4-sigma tolerance.
    target, shadows = membership_masks(seed=6, pool_size=POOL_SIZE, num_shadows=8)
    tolerance = 4 / math.sqrt(POOL_SIZE)

    for row in shadows:
        correlation = np.corrcoef(target.astype(float), row.astype(float))[0, 1]
        assert abs(correlation) < tolerance


def test_equal_seeds_give_equal_masks():
    first = membership_masks(seed=7, pool_size=1000, num_shadows=6)
    second = membership_masks(seed=7, pool_size=1000, num_shadows=6)

    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_different_seeds_give_different_masks():
    first = membership_masks(seed=8, pool_size=1000, num_shadows=6)
    second = membership_masks(seed=9, pool_size=1000, num_shadows=6)

    assert not np.array_equal(first[0], second[0])
    assert not np.array_equal(first[1], second[1])


def test_target_mask_ignores_num_shadows():
    # Separate streams: adding shadows must not change the target's draw.
    target_alone, _ = membership_masks(seed=10, pool_size=1000, num_shadows=0)
    target_with_shadows, _ = membership_masks(seed=10, pool_size=1000, num_shadows=16)

    np.testing.assert_array_equal(target_alone, target_with_shadows)


def test_zero_shadows_give_empty_matrix():
    _, shadows = membership_masks(seed=0, pool_size=5, num_shadows=0)

    assert shadows.shape == (0, 5)
    assert shadows.dtype == np.bool_


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"pool_size": 1}, "pool_size=1"),
        ({"pool_size": 10.0}, "pool_size=10.0"),
        ({"num_shadows": -1}, "num_shadows=-1"),
        ({"inclusion_prob": 0.0}, "inclusion_prob=0.0"),
        ({"inclusion_prob": 1.0}, "inclusion_prob=1.0"),
        ({"inclusion_prob": float("nan")}, "inclusion_prob=nan"),
        ({"seed": -3}, "seed=-3"),
    ],
)
def test_invalid_arguments_raise(kwargs, fragment):
    arguments = {"seed": 0, "pool_size": 10, "num_shadows": 2, "inclusion_prob": 0.5} | kwargs

    with pytest.raises(ValueError, match=fragment):
        membership_masks(**arguments)


def test_expected_member_count_rounds_product():
    assert expected_member_count(60_000, 0.5) == 30_000
    assert expected_member_count(10, 0.26) == 3  # 2.6 rounds to 3
    assert expected_member_count(5, 0.5) == 2  # 2.5 rounds to even
    assert expected_member_count(2, 0.1) == 1  # 0.2 is raised to the minimum of 1


def test_expected_member_count_validates():
    with pytest.raises(ValueError, match="pool_size=1"):
        expected_member_count(1, 0.5)
    with pytest.raises(ValueError, match="inclusion_prob=1.5"):
        expected_member_count(10, 1.5)
