"""Membership masks: which pool examples the target and each shadow pipeline train on.

A membership-inference experiment draws every pipeline's training set from one data pool. The
target's mask is what the attack tries to recover, and the shadow masks are the labelled runs the
attack calibrates on, so the two are drawn from independent random streams.
"""

from __future__ import annotations

import numbers

import numpy as np


def _check_pool(pool_size: int, inclusion_prob: float) -> None:
    if isinstance(pool_size, bool) or not isinstance(pool_size, numbers.Integral):
        raise ValueError(f"pool_size={pool_size!r} must be an integer >= 2")
    if pool_size < 2:
        raise ValueError(f"pool_size={pool_size} must be >= 2")
    if not 0.0 < inclusion_prob < 1.0:
        raise ValueError(f"inclusion_prob={inclusion_prob} must be in (0, 1)")


def expected_member_count(pool_size: int, inclusion_prob: float) -> int:
    """Return the expected number of members, the public dataset size for DP accounting.

    The count is ``round(inclusion_prob * pool_size)`` (Python's round, ties to even), and at
    least 1. It depends only on public settings. The realised count of a mask differs from run
    to run and would reveal membership if the accountant used it.

    Args:
      pool_size: number of examples in the pool, >= 2.
      inclusion_prob: probability that each example is a member, in (0, 1).

    Returns:
      The expected member count, an int in [1, pool_size].

    Raises:
      ValueError: pool_size is not an integer >= 2, or inclusion_prob is outside (0, 1).

    Example:
      >>> expected_member_count(60000, 0.5)
      30000
    """
    _check_pool(pool_size, inclusion_prob)
    return max(1, round(inclusion_prob * pool_size))


def membership_masks(
    *, seed: int, pool_size: int, num_shadows: int, inclusion_prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the target's membership mask and the shadow pipelines' masks.

    The target includes each example independently with probability ``inclusion_prob``.
    With an even number K of shadows and ``inclusion_prob == 0.5``, the shadows are balanced as
    in LiRA (Carlini et al., "Membership Inference Attacks From First Principles", 2022). For
    each example, a uniformly random half of the K shadows include it. So every example is a
    member of exactly K / 2 shadows, and LiRA has as many "in" as "out" models to fit per
    example. Otherwise each shadow includes each example independently with probability
    ``inclusion_prob``. The shadow masks are drawn from a stream independent of the target's.

    Args:
      seed: non-negative integer seed. Equal seeds give equal masks.
      pool_size: number of examples N in the pool, >= 2.
      num_shadows: number of shadow pipelines K, >= 0.
      inclusion_prob: probability that a pipeline trains on a given example, in (0, 1).

    Returns:
      ``(target_mask, shadow_masks)``: bool arrays of shape (N,) and (K, N). Row k of
      ``shadow_masks`` is shadow k's training set.

    Raises:
      ValueError: a value is outside the ranges above.
    """
    _check_pool(pool_size, inclusion_prob)
    if isinstance(num_shadows, bool) or not isinstance(num_shadows, numbers.Integral):
        raise ValueError(f"num_shadows={num_shadows!r} must be an integer >= 0")
    if num_shadows < 0:
        raise ValueError(f"num_shadows={num_shadows} must be >= 0")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")

    target_seq, shadow_seq = np.random.SeedSequence(seed).spawn(2)
    target_rng = np.random.default_rng(target_seq)
    shadow_rng = np.random.default_rng(shadow_seq)

    target_mask = target_rng.random(pool_size) < inclusion_prob
    if num_shadows % 2 == 0 and inclusion_prob == 0.5:
        # Each column's argsort of K i.i.d. uniforms is a uniformly random permutation of
        # 0..K-1, so the entries below K / 2 mark a uniformly random half of the shadows.
        permutations = shadow_rng.random((num_shadows, pool_size)).argsort(axis=0)
        shadow_masks = permutations < num_shadows // 2
    else:
        shadow_masks = shadow_rng.random((num_shadows, pool_size)) < inclusion_prob
    return target_mask, shadow_masks
