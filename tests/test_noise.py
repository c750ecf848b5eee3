"""Tests of Gaussian noise on pytrees: its moments, independence across leaves, edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppds_jax import noise


def _tree():
    return {"weights": jnp.zeros((200, 100), jnp.float32), "bias": jnp.zeros((20_000,))}


def test_noise_std_matches_stddev():
    stddev = 1.7
    noisy = jax.jit(lambda key, tree: noise.add_gaussian_noise(key, tree, stddev=stddev))(
        jax.random.key(0), _tree()
    )
    for name, leaf in noisy.items():
        values = np.asarray(leaf, np.float64).ravel()
        n = values.size
        # Standard errors of the sample mean and sample standard deviation of n normal draws.
        mean_error = stddev / math.sqrt(n)
        std_error = stddev / math.sqrt(2 * n)
        assert abs(values.mean()) < 5 * mean_error, name
        assert abs(values.std() - stddev) < 5 * std_error, name


def test_leaves_get_independent_noise():
    tree = {"a": jnp.zeros((10_000,)), "b": jnp.zeros((10_000,))}
    noisy = noise.add_gaussian_noise(jax.random.key(1), tree, stddev=1.0)
    correlation = np.corrcoef(np.asarray(noisy["a"]), np.asarray(noisy["b"]))[0, 1]
    # The sample correlation of independent draws has standard error about 1 / sqrt(n).
    assert abs(correlation) < 5 / math.sqrt(10_000)


def test_noise_is_added_to_values():
    tree = {"x": jnp.full((50_000,), 3.0)}
    noisy = noise.add_gaussian_noise(jax.random.key(2), tree, stddev=0.5)
    assert abs(float(jnp.mean(noisy["x"])) - 3.0) < 5 * 0.5 / math.sqrt(50_000)


def test_zero_stddev_returns_tree():
    tree = {"x": jnp.arange(5.0), "y": jnp.ones((2, 3))}
    noisy = noise.add_gaussian_noise(jax.random.key(3), tree, stddev=0.0)
    for name in tree:
        np.testing.assert_array_equal(np.asarray(noisy[name]), np.asarray(tree[name]))


def test_shapes_and_dtypes_kept():
    tree = {"x": jnp.zeros((3, 4), jnp.float32), "y": jnp.zeros((2,), jnp.bfloat16)}
    noisy = noise.add_gaussian_noise(jax.random.key(4), tree, stddev=1.0)
    for name in tree:
        assert noisy[name].shape == tree[name].shape
        assert noisy[name].dtype == tree[name].dtype


def test_same_key_same_noise_different_key_different():
    tree = _tree()
    first = noise.add_gaussian_noise(jax.random.key(5), tree, stddev=1.0)
    again = noise.add_gaussian_noise(jax.random.key(5), tree, stddev=1.0)
    other = noise.add_gaussian_noise(jax.random.key(6), tree, stddev=1.0)
    np.testing.assert_array_equal(np.asarray(first["bias"]), np.asarray(again["bias"]))
    assert not np.allclose(np.asarray(first["bias"]), np.asarray(other["bias"]))


@pytest.mark.parametrize("stddev", [-0.1, math.nan, math.inf])
def test_invalid_stddev_raises(stddev):
    with pytest.raises(ValueError, match="stddev"):
        noise.add_gaussian_noise(jax.random.key(0), _tree(), stddev=stddev)
