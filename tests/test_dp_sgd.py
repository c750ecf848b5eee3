"""Tests of the DP-SGD layer: config checks, calibration, event, and the private gradient."""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppds_jax import accounting, dp_sgd


def _config(**overrides):
    settings = dict(
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        sampling_prob=0.01,
        num_steps=10,
        dataset_size=1000,
        physical_batch_size=16,
    )
    settings.update(overrides)
    return dp_sgd.DpSgdConfig(**settings)


def _linear_loss(params, example, key):
    del key
    x, y = example
    return (x @ params["w"] + params["b"] - y) ** 2


def _linear_batch(batch_size, num_features=3):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch_size, num_features)), jnp.float32)
    y = jnp.asarray(rng.normal(size=batch_size), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=num_features), jnp.float32), "b": jnp.zeros(())}
    return params, (x, y)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"l2_norm_clip": 0.0}, "l2_norm_clip"),
        ({"l2_norm_clip": -1.0}, "l2_norm_clip"),
        ({"l2_norm_clip": math.inf}, "l2_norm_clip=inf needs noise_multiplier=0"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sampling_prob": 0.0}, "sampling_prob"),
        ({"sampling_prob": 1.01}, "sampling_prob"),
        ({"num_steps": 0}, "num_steps"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"physical_batch_size": 0}, "physical_batch_size"),
    ],
)
def test_config_rejects_values_out_of_range(overrides, name):
    with pytest.raises(ValueError, match=name):
        _config(**overrides)


def test_zero_noise_config_has_infinite_epsilon():
    event = dp_sgd.dp_sgd_event(_config(noise_multiplier=0.0))
    assert accounting.compute_epsilon(event, target_delta=1e-5, accountant="rdp") == math.inf


def test_event_is_self_composed_poisson_gaussian():
    expected = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 10
    )
    assert dp_sgd.dp_sgd_event(_config()) == expected


def test_ledger_has_one_stage_with_config_fields():
    ledger = dp_sgd.make_ledger("vae_dp_sgd", _config(), noise_multiplicity=4)
    (stage,) = ledger.stages
    assert stage.name == "vae_dp_sgd"
    assert stage.event == dp_sgd.dp_sgd_event(_config())
    assert stage.parameters["noise_multiplier"] == 1.0
    assert stage.parameters["num_steps"] == 10
    assert stage.parameters["noise_multiplicity"] == 4


def test_make_config_meets_target_epsilon():
    config = dp_sgd.make_dp_sgd_config(
        target_epsilon=3.0,
        target_delta=1e-5,
        dataset_size=10_000,
        batch_size=200,
        num_steps=300,
        l2_norm_clip=0.5,
        accountant="rdp",
    )
    epsilon = accounting.compute_epsilon(
        dp_sgd.dp_sgd_event(config), target_delta=1e-5, accountant="rdp"
    )
    assert 0.99 * 3.0 <= epsilon <= 3.0
    assert config.sampling_prob == 200 / 10_000
    assert config.l2_norm_clip == 0.5
    assert config.num_steps == 300
    # Expected batch 200 plus three standard deviations of sqrt(200 * 0.98) = 14 each.
    assert config.physical_batch_size == 242


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -2.0}, "target_epsilon"),
        ({"target_delta": 1e-3}, "target_delta"),
        ({"batch_size": 20_000}, "batch_size"),
        ({"target_epsilon": 1e-4}, "unreachable"),
    ],
)
def test_make_config_rejects_bad_targets(overrides, match):
    settings = dict(
        target_epsilon=3.0,
        target_delta=1e-5,
        dataset_size=10_000,
        batch_size=200,
        num_steps=300,
        accountant="rdp",
    )
    settings.update(overrides)
    with pytest.raises(ValueError, match=match):
        dp_sgd.make_dp_sgd_config(**settings)


def test_no_noise_no_clipping_equals_mean_gradient():
    batch_size = 8
    params, batch = _linear_batch(batch_size)
    # q * N = 8 = the batch size, so dividing by the expected batch size gives the mean.
    config = _config(
        l2_norm_clip=math.inf, noise_multiplier=0.0, sampling_prob=0.008, dataset_size=1000
    )
    fn = jax.jit(dp_sgd.private_gradient(_linear_loss, config))
    gradient, _ = fn(params, batch, jnp.ones(batch_size, bool), jax.random.key(0))

    def mean_loss(params):
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    chex.assert_trees_all_close(gradient, jax.grad(mean_loss)(params), rtol=1e-5, atol=1e-6)


def test_noise_std_is_multiplier_times_clip():
    sigma, clip, q, n = 2.0, 0.5, 0.1, 100
    config = _config(l2_norm_clip=clip, noise_multiplier=sigma, sampling_prob=q, dataset_size=n)

    def zero_loss(params, example, key):
        del example, key
        return 0.0 * jnp.sum(params["w"])

    params = {"w": jnp.zeros(40_000)}
    batch = (jnp.zeros((4, 1)),)
    fn = jax.jit(dp_sgd.private_gradient(zero_loss, config))
    gradient, _ = fn(params, batch, jnp.ones(4, bool), jax.random.key(1))
    noise = np.asarray(gradient["w"], np.float64) * (q * n)
    # The clipped sum is zero, so gradient * q * N is pure noise of std sigma * C = 1.
    std_error = sigma * clip / math.sqrt(2 * noise.size)
    assert abs(noise.std() - sigma * clip) < 5 * std_error
    assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(noise.size)


def test_neighbour_changes_gradient_within_sensitivity():
    batch_size = 8
    params, batch = _linear_batch(batch_size)
    config = _config(l2_norm_clip=0.3, noise_multiplier=1.0)
    fn = jax.jit(dp_sgd.private_gradient(_linear_loss, config))
    key = jax.random.key(2)
    full, _ = fn(params, batch, jnp.ones(batch_size, bool), key)
    bound = 0.3 / config.expected_batch_size
    for i in range(batch_size):
        neighbour, _ = fn(params, batch, jnp.arange(batch_size) != i, key)
        difference = jax.tree.map(jnp.subtract, full, neighbour)
        norm = math.sqrt(sum(float(jnp.sum(d**2)) for d in jax.tree.leaves(difference)))
        assert norm <= bound * (1 + 1e-4)


def test_noisy_gradient_divides_by_expected_not_realised_size():
    config = _config(noise_multiplier=0.0, sampling_prob=0.05, dataset_size=200)
    clipped_sum = {"w": jnp.full((3,), 2.0)}
    gradient = dp_sgd.noisy_gradient(jax.random.key(0), clipped_sum, config)
    np.testing.assert_allclose(np.asarray(gradient["w"]), 2.0 / 10.0, rtol=1e-6)


def test_clip_fn_rejects_unsupported_options():
    with pytest.raises(ValueError, match="'exact' is unknown"):
        dp_sgd.make_clip_fn(_linear_loss, l2_norm_clip=1.0, clipping_method="exact")
    with pytest.raises(ValueError, match="neither per_layer nor microbatch_size"):
        dp_sgd.make_clip_fn(_linear_loss, l2_norm_clip=1.0, clipping_method="ghost", per_layer=True)
    with pytest.raises(ValueError, match="neither per_layer nor microbatch_size"):
        dp_sgd.make_clip_fn(
            _linear_loss, l2_norm_clip=1.0, clipping_method="ghost", microbatch_size=2
        )
