"""Tests of the diffusion family: U-Net, losses, samplers, DP training and the interface."""

from __future__ import annotations

import logging
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from ppds_jax import clipping, dp_sgd
from ppds_jax.generators import PrivacySpec, diffusion, get_family
from ppds_jax.generators.unet import UNet

# The smallest U-Net the family builds: one level, so the compiled training steps stay cheap.
TINY = {
    "channels": 4,
    "channel_mults": (1,),
    "num_timesteps": 50,
    "num_sampling_steps": 5,
    "batch_size": 32,
    "sampling_batch_size": 64,
}


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as (1797, 8, 8, 1) float32 in [-1, 1] and (1797,) int32 labels."""
    data = load_digits()
    images = (data.images[..., None] / 8.0 - 1.0).astype(np.float32)
    return images, data.target.astype(np.int32)


@pytest.fixture(scope="module")
def tiny_state():
    """A tiny digits U-Net whose weights are perturbed away from the zero-output init."""
    state = diffusion.init(jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=TINY)

    @jax.jit
    def perturb(params, key):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            leaf + 0.3 * jax.random.normal(k, leaf.shape)
            for leaf, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, noisy)

    return {**state, "params": perturb(state["params"], jax.random.key(1))}


@pytest.mark.parametrize(
    "image_shape, channel_mults",
    [
        ((8, 8, 1), (1, 2)),
        ((28, 28, 1), (1, 2, 2)),
        ((32, 32, 3), (1, 2)),
        ((30, 26, 1), (1, 2, 2)),
    ],
)
def test_unet_output_shape_matches_input(image_shape, channel_mults):
    # eval_shape traces the network without compiling it, which keeps this test fast.
    model = UNet(num_classes=10, channels=8, channel_mults=channel_mults)
    images = jnp.ones((2, *image_shape))
    timesteps = jnp.array([0, 999])
    labels = jnp.array([3, 10])  # 10 is the null class
    variables = jax.eval_shape(model.init, jax.random.key(0), images, timesteps, labels)

    output = jax.eval_shape(model.apply, variables, images, timesteps, labels)

    assert output.shape == (2, *image_shape)
    assert output.dtype == jnp.float32


def test_unet_output_depends_on_label_and_timestep(tiny_state):
    # GroupNorm over one-channel groups would erase an embedding added before it, so this
    # fails for a U-Net whose conditioning does not survive normalisation.
    model = UNet(num_classes=10, channels=4, channel_mults=(1,))
    image = jax.random.normal(jax.random.key(0), (8, 8, 1))
    images = jnp.stack([image, image, image])
    timesteps = jnp.array([10, 10, 40])
    labels = jnp.array([1, 2, 1])

    output = jax.jit(model.apply)({"params": tiny_state["params"]}, images, timesteps, labels)

    assert float(jnp.abs(output[0] - output[1]).mean()) > 1e-3
    assert float(jnp.abs(output[0] - output[2]).mean()) > 1e-3


def test_init_state_has_null_class_and_shapes(tiny_state):
    state = diffusion.init(jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=TINY)

    assert state["image_shape"] == (8, 8, 1)
    assert state["num_classes"] == 10
    embeddings = state["params"]["Embed_0"]["embedding"]
    assert embeddings.shape == (11, 4 * 4)  # 10 classes plus the null class, 4 * channels wide
    assert state["params"]["Conv_0"]["kernel"].shape == (3, 3, 1, 4)
    chex.assert_trees_all_equal_shapes(state["params"], tiny_state["params"])


def test_samples_have_shape_and_range(tiny_state):
    labels = np.arange(10)

    images = diffusion.sample(jax.random.key(2), tiny_state, labels, config=TINY)

    assert images.shape == (10, 8, 8, 1)
    assert images.dtype == np.float32
    assert images.min() >= -1.0
    assert images.max() <= 1.0
    assert images.std() > 0.01  # the perturbed U-Net does not just return a constant


def test_samples_depend_only_on_key(tiny_state):
    labels = np.arange(10)

    first = diffusion.sample(jax.random.key(3), tiny_state, labels, config=TINY)
    again = diffusion.sample(jax.random.key(3), tiny_state, labels, config=TINY)
    other = diffusion.sample(jax.random.key(4), tiny_state, labels, config=TINY)

    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 0.01


def test_sample_chunks_share_one_program(tiny_state):
    labels = np.arange(10)
    config = {**TINY, "sampling_batch_size": 4}  # chunks of 4, 4 and a padded 2

    images = diffusion.sample(jax.random.key(5), tiny_state, labels, config=config)
    first_chunk = diffusion.sample(jax.random.key(5), tiny_state, labels[:4], config=config)

    assert images.shape == (10, 8, 8, 1)
    np.testing.assert_allclose(images[:4], first_chunk, atol=1e-6)


def test_sample_splits_labels_into_equal_chunks(tiny_state):
    # 8 labels with batches of at most 5 run as two chunks of 4, not 5 plus 3 padded to 5.
    labels = np.arange(8) % 3
    config = {**TINY, "sampling_batch_size": 5}

    images = diffusion.sample(jax.random.key(6), tiny_state, labels, config=config)
    first_chunk = diffusion.sample(jax.random.key(6), tiny_state, labels[:4], config=config)

    assert images.shape == (8, 8, 8, 1)
    np.testing.assert_allclose(images[:4], first_chunk, atol=1e-6)


def _tanh_eps(num_timesteps):
    """An arbitrary nonlinear noise predictor, for comparing sampler algebra."""
    return lambda x, t: jnp.tanh(2.0 * x + t / num_timesteps)


@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_with_eta_one_equals_ddpm(clip_denoised):
    # With sigma_t^2 = beta_tilde_t, DDIM's update over all T steps is the DDPM posterior mean
    # plus the same noise, so equal keys give equal images up to float32 rounding.
    schedule = diffusion.make_schedule("cosine", 100)
    eps_fn = _tanh_eps(100)
    shape = (32, 4, 4, 1)

    ddpm = jax.jit(
        lambda key: diffusion.ddpm_sample(key, eps_fn, shape, schedule, clip_denoised=clip_denoised)
    )(jax.random.key(0))
    ddim = jax.jit(
        lambda key: diffusion.ddim_sample(
            key, eps_fn, shape, schedule, num_steps=100, eta=1.0, clip_denoised=clip_denoised
        )
    )(jax.random.key(0))

    np.testing.assert_allclose(ddim, ddpm, atol=1e-3)
    assert float(jnp.abs(ddpm).mean()) > 0.1


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("num_steps, eta", [(1, 0.0), (7, 0.0), (7, 0.5)])
def test_ddim_recovers_point_mass(kind, num_steps, eta):
    # For data that is one image c, E[eps | x_t] = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t),
    # so every x_0 estimate is c and the last DDIM step (to abar = 1) returns c exactly.
    # T = 200 keeps sqrt(alpha_bar_{T-1}) above 1e-4 for both schedules, so dividing by it
    # in the x_0 estimate stays accurate in float32.
    schedule = diffusion.make_schedule(kind, 200)
    target = jax.random.uniform(jax.random.key(1), (1, 4, 4, 1), minval=-0.9, maxval=0.9)

    def eps_fn(x, t):
        alpha_bar = schedule.alpha_bars[t]
        return (x - jnp.sqrt(alpha_bar) * target) / jnp.sqrt(1.0 - alpha_bar)

    images = jax.jit(
        lambda key: diffusion.ddim_sample(
            key, eps_fn, (8, 4, 4, 1), schedule, num_steps=num_steps, eta=eta, clip_denoised=False
        )
    )(jax.random.key(2))

    np.testing.assert_allclose(images, jnp.broadcast_to(target, images.shape), atol=1e-3)


def test_ddim_matches_gaussian_data_moments():
    # For data N(mu, s^2) per pixel, x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) and
    # E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). Deterministic
    # DDIM over all T steps then maps N(0, 1) to N(mu, s^2) up to discretisation error,
    # which at T = 1000 is far below the tolerances. Standard errors with n = 20,000:
    # 0.0014 for the mean and 0.001 for the standard deviation; tolerances are 5 of them.
    mu, s = 0.3, 0.2
    schedule = diffusion.make_schedule("cosine", 1000)

    def eps_fn(x, t):
        alpha_bar = schedule.alpha_bars[t]
        variance = alpha_bar * s**2 + 1.0 - alpha_bar
        return jnp.sqrt(1.0 - alpha_bar) * (x - jnp.sqrt(alpha_bar) * mu) / variance

    samples = jax.jit(
        lambda key: diffusion.ddim_sample(
            key, eps_fn, (20_000, 1, 1, 1), schedule, num_steps=1000, clip_denoised=False
        )
    )(jax.random.key(0))

    assert abs(float(samples.mean()) - mu) < 5 * s / math.sqrt(20_000)
    assert abs(float(samples.std()) - s) < 5 * s / math.sqrt(2 * 20_000)


def test_schedules_are_valid_and_decreasing():
    for kind in ("cosine", "linear"):
        schedule = diffusion.make_schedule(kind, 1000)
        alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
        expected = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))

        assert np.all(np.diff(alpha_bars) < 0)
        assert 0.99 < alpha_bars[0] < 1.0
        assert alpha_bars[-1] < 1e-3
        np.testing.assert_allclose(alpha_bars, expected, rtol=1e-4)


def test_noise_multiplicity_averages_draws(tiny_state, digits):
    # k draws in one example's loss equal the mean of k single-draw losses computed with the
    # same timesteps, noise and label dropout, each one built here from its definition.
    images, labels = digits
    image, label = images[7], labels[7]
    config = {**TINY, "noise_multiplicity": 4, "label_dropout": 0.5}
    loss = diffusion.make_family_loss(tiny_state, config)
    key = jax.random.key(11)

    timesteps, noise, drop_label = diffusion.draw_training_noise(
        key, 4, image_shape=(8, 8, 1), num_timesteps=50, label_dropout=0.5
    )
    schedule = diffusion.make_schedule("cosine", 50)
    apply = jax.jit(UNet(num_classes=10, channels=4, channel_mults=(1,)).apply)
    single_losses = []
    for t, eps, dropped in zip(timesteps, noise, drop_label, strict=True):
        alpha_bar = float(schedule.alpha_bars[t])
        noisy = math.sqrt(alpha_bar) * image + math.sqrt(1.0 - alpha_bar) * np.asarray(eps)
        draw_label = 10 if dropped else label
        predicted = apply(
            {"params": tiny_state["params"]}, noisy[None], t[None], jnp.array([draw_label])
        )
        single_losses.append(float(jnp.mean((predicted[0] - eps) ** 2)))

    assert 0 < int(drop_label.sum()) < 4  # both labelled and null-class draws are covered
    np.testing.assert_allclose(
        jax.jit(loss)(tiny_state["params"], (image, label), key), np.mean(single_losses), rtol=1e-5
    )


def _mean_eval_loss(loss, params, images, labels):
    keys = jax.random.split(jax.random.key(123), len(images))
    losses = jax.jit(jax.vmap(loss, in_axes=(None, 0, 0)))(params, (images, labels), keys)
    return float(jnp.mean(losses))


def test_training_lowers_denoising_loss(digits):
    images, labels = digits
    config = {**TINY, "num_epochs": 1.0, "learning_rate": 3e-3}
    state = diffusion.init(jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=config)
    loss = diffusion.make_family_loss(state, config)
    before = _mean_eval_loss(loss, state["params"], images[:256], labels[:256])

    result = diffusion.FAMILY.fit(
        jax.random.key(1), state, images, labels, config=config, privacy=None
    )
    after = _mean_eval_loss(loss, result.state["params"], images[:256], labels[:256])

    assert result.ledger is None
    assert len(result.history["loss"]) == round(len(images) / 32)
    assert after < 0.8 * before


def test_dp_gradients_match_explicit_clipped_loop(tiny_state, digits):
    images, labels = digits
    batch = (jnp.asarray(images[:4]), jnp.asarray(labels[:4]))
    mask = jnp.array([True, True, True, False])
    config = {**TINY, "noise_multiplicity": 2}
    loss = diffusion.make_family_loss(tiny_state, config)
    l2_norm_clip = 1e-3  # far below the gradient norms, so every row is clipped
    key = jax.random.key(5)

    clipped_sum, stats = jax.jit(clipping.clipped_grad_sum(loss, l2_norm_clip=l2_norm_clip))(
        tiny_state["params"], batch, mask, key
    )

    # clipped_grad_sum gives row i the key split(key, B)[i]; each gradient is computed alone.
    row_keys = jax.random.split(key, 4)
    grad_fn = jax.jit(jax.grad(loss))
    expected = jax.tree.map(jnp.zeros_like, tiny_state["params"])
    for i in range(3):
        grads = grad_fn(tiny_state["params"], (batch[0][i], batch[1][i]), row_keys[i])
        norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
        assert norm > l2_norm_clip
        np.testing.assert_allclose(stats.norms[i], norm, rtol=1e-4)
        scale = l2_norm_clip / norm
        expected = jax.tree.map(lambda total, g, scale=scale: total + g * scale, expected, grads)

    chex.assert_trees_all_close(clipped_sum, expected, atol=1e-7, rtol=1e-4)
    total_norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(clipped_sum)))
    assert total_norm <= 3 * l2_norm_clip * (1 + 1e-5)
    assert int(stats.num_clipped) == 3


def test_dp_fit_records_calibrated_ledger(digits):
    images, labels = digits
    # RDP calibrates in about a second here; PLD at this small noise takes several.
    privacy = PrivacySpec(target_epsilon=8.0, target_delta=1e-4, dataset_size=400, accountant="rdp")
    config = {**TINY, "num_epochs": 0.16, "noise_multiplicity": 2}  # 2 steps of 32 of 400

    result = diffusion.FAMILY.fit(
        jax.random.key(0),
        diffusion.init(jax.random.key(1), image_shape=(8, 8, 1), num_classes=10, config=TINY),
        images[:400],
        labels[:400],
        config=config,
        privacy=privacy,
    )

    dp_config = diffusion.make_dp_config(privacy, config)
    assert dp_config.num_steps == 2
    assert dp_config.sampling_prob == pytest.approx(32 / 400)
    (stage,) = result.ledger.stages
    assert stage.name == "diffusion_dp_sgd"
    assert stage.event == dp_sgd.dp_sgd_event(dp_config)
    assert stage.parameters["noise_multiplicity"] == 2
    assert result.ledger.epsilon(1e-4, accountant="rdp") <= 8.0
    assert len(result.history["loss"]) == 2


def test_member_scores_are_minus_denoising_loss(tiny_state, digits):
    images, labels = digits
    config = {**TINY, "member_timestep_fractions": (0.1, 0.5), "member_draws_per_timestep": 2}

    scores = diffusion.member_scores(
        jax.random.key(0), tiny_state, images[:5], labels[:5], config=config
    )
    other_key = diffusion.member_scores(
        jax.random.key(9), tiny_state, images[:5], labels[:5], config=config
    )

    timesteps = np.array([5, 5, 25, 25])  # int(fraction * 50), two draws each
    noise = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))  # member_noise_seed = 0
    schedule = diffusion.make_schedule("cosine", 50)
    apply = jax.jit(UNet(num_classes=10, channels=4, channel_mults=(1,)).apply)
    alpha_bars = np.asarray(schedule.alpha_bars)[timesteps][:, None, None, None]
    for i in range(5):
        noisy = np.sqrt(alpha_bars) * images[i] + np.sqrt(1.0 - alpha_bars) * noise
        predicted = apply(
            {"params": tiny_state["params"]}, noisy, timesteps, jnp.full((4,), labels[i])
        )
        np.testing.assert_allclose(scores[i], -jnp.mean((predicted - noise) ** 2), rtol=1e-5)
    np.testing.assert_array_equal(scores, other_key)
    assert scores.shape == (5,)
    assert scores.dtype == np.float32


def test_unknown_option_is_error_naming_it(tiny_state):
    with pytest.raises(ValueError, match="num_sampling_stepz"):
        diffusion.sample(jax.random.key(0), tiny_state, [1], config={"num_sampling_stepz": 3})
    with pytest.raises(ValueError, match="chanels"):
        get_family("diffusion").init(
            jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config={"chanels": 3}
        )


@pytest.mark.parametrize(
    "option, value",
    [
        ("sampler", "euler"),
        ("beta_schedule", "quadratic"),
        ("eta", 1.5),
        ("num_sampling_steps", 51),
        ("label_dropout", 1.0),
        ("noise_multiplicity", 0),
        ("guidance_scale", -1.0),
        ("channel_mults", (1, 2, 2, 2)),
        ("member_timestep_fractions", (1.0,)),
    ],
)
def test_invalid_option_value_is_error_naming_it(tiny_state, option, value):
    with pytest.raises(ValueError, match=option):
        diffusion.sample(jax.random.key(0), tiny_state, [1], config={**TINY, option: value})


@pytest.mark.parametrize("labels", [[0, 10], [-1], [[1, 2]]])
def test_sampling_invalid_label_is_error(tiny_state, labels):
    with pytest.raises(ValueError, match="labels"):
        diffusion.sample(jax.random.key(0), tiny_state, labels, config=TINY)


def test_family_is_registered():
    family = get_family("diffusion")

    assert family is diffusion.FAMILY
    for name in ("num_epochs", "batch_size", "learning_rate", "noise_multiplicity"):
        assert name in family.default_config


def test_repeat_fit_and_score_compile_once(tiny_state, digits, caplog):
    images, labels = digits[0][:48], digits[1][:48]
    # A learning rate no other test uses, so nothing compiled these programs before.
    config = {**TINY, "num_epochs": 1, "batch_size": 16, "learning_rate": 1.234e-3}
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for seed in (0, 1):
            fitted = diffusion.FAMILY.fit(
                jax.random.key(seed), tiny_state, images, labels, config=config
            )
            diffusion.FAMILY.member_scores(
                jax.random.key(seed), fitted.state, images[:8], labels[:8], config=config
            )
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "Compiling jit(step)" in m]) == 1
    assert len([m for m in messages if "Compiling jit(score_chunk)" in m]) == 1
