"""Gaussian noise on a pytree, the noise step of the Gaussian mechanism."""

from __future__ import annotations

import math
from typing import Any

import jax


def add_gaussian_noise(key: jax.Array, tree: Any, *, stddev: float | jax.Array) -> Any:
    """Add independent N(0, stddev^2) noise to every entry of every leaf.

    Each leaf gets its own key from `jax.random.split(key, num_leaves)`, so no two leaves share
    noise. The noise is drawn in each leaf's dtype (float32 for float32 parameters).

    Args:
      key: PRNG key, used once.
      tree: pytree of float arrays, for example a clipped gradient sum.
      stddev: noise standard deviation, >= 0 (for DP-SGD, noise_multiplier * l2_norm_clip).
        A Python number is checked here; a traced value is used as given.

    Returns:
      A pytree with the structure, shapes and dtypes of `tree`. With `stddev = 0` it equals
      `tree`.

    Raises:
      ValueError: `stddev` is a Python number that is negative, NaN or inf.
    """
    if isinstance(stddev, int | float) and not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"{stddev=} must be finite and >= 0")
    leaves, treedef = jax.tree.flatten(tree)
    leaf_keys = jax.random.split(key, len(leaves))
    noisy = [
        leaf + stddev * _standard_normal(leaf_key, leaf)
        for leaf, leaf_key in zip(leaves, leaf_keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def _standard_normal(key: jax.Array, leaf: jax.Array) -> jax.Array:
    """N(0, 1) noise shaped like `leaf`.

    Drawn as a flat vector and reshaped: the same distribution, but XLA on CPU compiles
    multi-dimensional `jax.random.normal` calls several times slower (jax 0.10).
    """
    return jax.random.normal(key, (leaf.size,), leaf.dtype).reshape(leaf.shape)
