"""Tests of the fit loop: closed-form agreement, DP contract, chunks, edge cases, inputs."""

import logging
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppds_jax import dp_sgd, training
from ppds_jax.networks import CNN

NUM_ROWS = 12
LEARNING_RATE = 0.1


def _regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_ROWS, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=NUM_ROWS)).astype(np.float32)
    return x, y


def _squared_error(params, example, key):
    del key
    x, y = example
    return (x @ params["w"] - y) ** 2


def _initial_params():
    return {"w": jnp.zeros(3, jnp.float32)}


def _closed_form_gradient_descent(x, y, num_steps):
    """Full-batch gradient descent on the mean squared error, in float64 NumPy."""
    w = np.zeros(3)
    for _ in range(num_steps):
        w = w - LEARNING_RATE * 2 * x.T @ (x @ w - y) / len(y)
    return w


def _dp_config(**overrides):
    settings = dict(
        l2_norm_clip=math.inf,
        noise_multiplier=0.0,
        sampling_prob=1.0,
        num_steps=5,
        dataset_size=NUM_ROWS,
        physical_batch_size=NUM_ROWS,
    )
    settings.update(overrides)
    return dp_sgd.DpSgdConfig(**settings)


def _fit(
    data,
    *,
    num_steps=5,
    batch_size=NUM_ROWS,
    dp=None,
    params=None,
    loss=_squared_error,
    optimizer=None,
):
    return training.fit(
        jax.random.key(0),
        _initial_params() if params is None else params,
        per_example_loss=loss,
        data=data,
        optimizer=optax.sgd(LEARNING_RATE) if optimizer is None else optimizer,
        num_steps=num_steps,
        batch_size=batch_size,
        dp=dp,
    )


def test_full_batch_fit_matches_gradient_descent():
    x, y = _regression_data()
    params, stats = _fit((x, y), num_steps=5)
    expected = _closed_form_gradient_descent(x.astype(np.float64), y.astype(np.float64), 5)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-4)
    assert stats.loss.shape == (5,)
    assert stats.loss[-1] < stats.loss[0]
    assert stats.batch_sizes is None


def test_dp_without_noise_or_clipping_matches_non_private():
    x, y = _regression_data()
    params, stats = _fit((x, y), dp=_dp_config())
    expected = _closed_form_gradient_descent(x.astype(np.float64), y.astype(np.float64), 5)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-4)
    np.testing.assert_array_equal(stats.batch_sizes, NUM_ROWS)
    np.testing.assert_array_equal(stats.clip_fraction, 0.0)


def test_chunked_batches_match_one_chunk():
    x, y = _regression_data()
    one_chunk, _ = _fit((x, y), dp=_dp_config(l2_norm_clip=0.5))
    # 12 rows in physical batches of 5: three chunks, the last one padded.
    chunked, stats = _fit((x, y), dp=_dp_config(l2_norm_clip=0.5, physical_batch_size=5))
    np.testing.assert_allclose(np.asarray(chunked["w"]), np.asarray(one_chunk["w"]), rtol=1e-5)
    assert np.all(stats.clip_fraction > 0)


def test_chunked_batch_gets_noise_once():
    sigma, clip, num_params = 1.5, 2.0, 20_000

    def zero_loss(params, example, key):
        del example, key
        return 0.0 * jnp.sum(params["w"])

    params = {"w": jnp.zeros(num_params, jnp.float32)}
    data = (np.zeros((4, 1), np.float32),)
    config = _dp_config(
        l2_norm_clip=clip,
        noise_multiplier=sigma,
        num_steps=1,
        dataset_size=4,
        physical_batch_size=1,
    )
    trained, _ = _fit(data, num_steps=1, dp=config, params=params, loss=zero_loss)
    # One SGD step on pure noise: w = -lr * N(0, (sigma C)^2) / (q N), with q N = 4. Noise added
    # in each of the four chunks would double this standard deviation.
    update = np.asarray(trained["w"], np.float64)
    expected_std = LEARNING_RATE * sigma * clip / 4
    assert abs(update.std() - expected_std) < 5 * expected_std / math.sqrt(2 * num_params)


def test_nan_example_gives_finite_update():
    x, y = _regression_data()
    x[3] = np.nan
    config = _dp_config(l2_norm_clip=1.0, noise_multiplier=0.5)
    params, stats = _fit((x, y), dp=config)
    assert np.all(np.isfinite(np.asarray(params["w"])))
    np.testing.assert_array_equal(stats.num_nonfinite, 1)
    assert np.all(np.isfinite(stats.loss))


def test_empty_poisson_batches_run():
    x, y = _regression_data()
    config = _dp_config(
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        sampling_prob=0.01,
        num_steps=20,
        physical_batch_size=4,
    )
    params, stats = _fit((x, y), num_steps=20, dp=config)
    assert np.any(stats.batch_sizes == 0)
    empty = stats.batch_sizes == 0
    assert np.all(np.isnan(stats.loss[empty]))
    np.testing.assert_array_equal(stats.clip_fraction[empty], 0.0)
    assert np.all(np.isfinite(np.asarray(params["w"])))
    assert np.any(np.asarray(params["w"]) != 0), "noise is added on empty steps too"


def test_step_compiled_once(caplog):
    x, y = _regression_data()
    config = _dp_config(l2_norm_clip=1.0, noise_multiplier=1.0, sampling_prob=0.5, num_steps=8)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        _fit((x, y), num_steps=8, dp=config)
        _fit((x, y), num_steps=8, batch_size=4)
    step_compiles = [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert len(step_compiles) == 2, [r.getMessage()[:80] for r in step_compiles]


@pytest.mark.parametrize(
    ("num_rows", "expected"),
    [(1, 1), (7, 7), (13, 14), (100, 112), (4096, 4096), (4097, 5120), (5000, 5120)],
)
def test_padded_num_rows(num_rows, expected):
    assert training.padded_num_rows(num_rows) == expected


def test_padding_rows_are_never_trained_on():
    # fit pads 13 rows to 14 with a zero row. If the padding leaked into the row count, the
    # shuffled batches of 13 would include that row and pull w towards 0.
    x, y = _regression_data()
    x13 = np.concatenate([x, x[:1] + 1.0])
    y13 = np.concatenate([y, y[:1] + 3.0])
    params, _ = _fit((x13, y13), num_steps=5, batch_size=13)
    expected = _closed_form_gradient_descent(x13.astype(np.float64), y13.astype(np.float64), 5)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-4)
    dp_params, stats = _fit((x13, y13), dp=_dp_config(dataset_size=13, physical_batch_size=13))
    np.testing.assert_allclose(np.asarray(dp_params["w"]), expected, rtol=1e-4)
    np.testing.assert_array_equal(stats.batch_sizes, 13)


def test_nearby_data_sizes_share_one_compilation(caplog):
    def loss(params, example, key):  # a new function object, so no earlier test compiled it
        return _squared_error(params, example, key)

    optimizer = optax.sgd(LEARNING_RATE)  # fit caches its steps per loss and optimizer object
    rng = np.random.default_rng(1)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for num_rows in (13, 14, 13):
            data = (
                rng.normal(size=(num_rows, 3)).astype(np.float32),
                np.zeros(num_rows, np.float32),
            )
            _fit(data, num_steps=2, batch_size=4, loss=loss, optimizer=optimizer)
    step_compiles = [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert len(step_compiles) == 1, [r.getMessage()[:80] for r in step_compiles]


class _BatchNormModel(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))


def test_batch_norm_model_rejected():
    x, y = _regression_data()
    params = _BatchNormModel().init(jax.random.key(0), x[:2])["params"]
    with pytest.raises(ValueError, match="BatchNorm"):
        _fit((x, y), params=params)
    with pytest.raises(ValueError, match="BatchNorm"):
        _fit((x, y), params=params, dp=_dp_config())


def test_invalid_arguments_raise():
    x, y = _regression_data()
    with pytest.raises(ValueError, match="must equal dp.num_steps=5"):
        _fit((x, y), num_steps=4, dp=_dp_config())
    with pytest.raises(ValueError, match="batch_size=13"):
        _fit((x, y), batch_size=13)
    with pytest.raises(ValueError, match="num_steps=0"):
        _fit((x, y), num_steps=0)
    with pytest.raises(ValueError, match="share a leading axis"):
        _fit((x, y[:5]))
    with pytest.raises(ValueError, match="clipping_method='exact' is unknown"):
        training.fit(
            jax.random.key(0),
            _initial_params(),
            per_example_loss=_squared_error,
            data=(x, y),
            optimizer=optax.sgd(LEARNING_RATE),
            num_steps=1,
            batch_size=4,
            clipping_method="exact",
        )


def test_ghost_and_vmap_fits_agree():
    model = CNN(num_classes=3, features=(4,), hidden=8)
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (NUM_ROWS, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 3, NUM_ROWS).astype(np.int32)
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss(params, example, key):
        del key
        image, label = example
        logits = model.apply({"params": params}, image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    config = _dp_config(l2_norm_clip=0.1, noise_multiplier=1.0, sampling_prob=0.5, num_steps=2)
    fitted = {}
    for method in ("ghost", "vmap"):
        fitted[method], _ = training.fit(
            jax.random.key(5),
            params,
            per_example_loss=loss,
            data=(images, labels),
            optimizer=optax.sgd(LEARNING_RATE),
            num_steps=2,
            batch_size=NUM_ROWS,
            dp=config,
            clipping_method=method,
        )
    chex.assert_trees_all_close(fitted["ghost"], fitted["vmap"], rtol=1e-4, atol=1e-6)
