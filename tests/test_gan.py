"""Tests for the conditional GAN and DP-GAN (DP-SGD on the discriminator)."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from ppds_jax.generators import base, gan

SMALL_CONFIG = {
    "num_epochs": 1,
    "batch_size": 64,
    "learning_rate": 2e-3,
    "latent_dim": 8,
    "generator_width": 8,
    "discriminator_width": 8,
}


def _config(**overrides):
    return base.resolve_config(gan.FAMILY, {**SMALL_CONFIG, **overrides})


@pytest.fixture(scope="module")
def digits():
    """Digits as (N, 8, 8, 1) float32 in [-1, 1] and int32 labels."""
    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return images, data.target.astype(np.int32)


@pytest.fixture(scope="module")
def state_8x8():
    """An initialised GAN state for 8x8x1 images and 10 classes, with SMALL_CONFIG."""
    return gan.init(jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=_config())


def _real_minus_fake_logit(params, config, images, labels, key):
    """Mean discriminator logit on real rows minus that on fakes drawn with `key`."""
    generator, discriminator = gan._modules({"image_shape": (8, 8, 1), "num_classes": 10}, config)
    fakes, fake_labels = gan.generate_fakes(
        params["generator"],
        key,
        generator=generator,
        num_samples=len(labels),
        latent_dim=config["latent_dim"],
        num_classes=10,
    )
    apply = functools.partial(discriminator.apply, {"params": params["discriminator"]})
    return float(jnp.mean(apply(images, labels)) - jnp.mean(apply(fakes, fake_labels)))


class TestModels:
    @pytest.mark.parametrize("image_shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
    def test_parameter_and_sample_shapes(self, image_shape):
        # eval_shape traces init and sample without compiling them, which keeps this cheap;
        # the other tests run both for real on 8x8 images. The static entries of the state
        # stay plain Python values.
        config = _config()
        static = {"image_shape": image_shape, "num_classes": 10}
        arrays = jax.eval_shape(
            lambda: gan.init(
                jax.random.key(0), image_shape=image_shape, num_classes=10, config=config
            )
        )
        state = {**arrays, **static}

        height, width, channels = image_shape
        generator_params = state["params"]["generator"]
        assert generator_params["Dense_0"]["kernel"].shape == (
            8 + 10,
            (height // 4) * (width // 4) * 16,
        )
        assert generator_params["Conv_2"]["kernel"].shape == (3, 3, 4, channels)
        assert state["params"]["discriminator"]["Embed_0"]["embedding"].shape == (
            10,
            (height // 4) * (width // 4) * 8,
        )

        images = jax.eval_shape(
            lambda arrays: gan.sample(
                jax.random.key(1), {**arrays, **static}, np.arange(5), config=config
            ),
            {name: value for name, value in arrays.items() if name not in static},
        )
        assert images.shape == (5, *image_shape)
        assert images.dtype == jnp.float32

    def test_image_size_not_divisible_by_four_rejected(self):
        with pytest.raises(ValueError, match="divisible by 4"):
            gan.init(jax.random.key(0), image_shape=(10, 10, 1), num_classes=10, config=_config())

    def test_discriminator_logit_depends_on_own_example_only(self):
        # No cross-example layer (BatchNorm): changing other rows leaves row 0's logit alone.
        discriminator = gan.Discriminator(num_classes=3, width=8)
        images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
        labels = jnp.array([0, 1, 2, 1])
        variables = jax.jit(discriminator.init)(jax.random.key(1), images, labels)
        assert set(variables) == {"params"}
        apply = jax.jit(discriminator.apply)
        logits = apply(variables, images, labels)
        changed = images.at[1:].set(5.0)
        changed_logits = apply(variables, changed, labels)
        assert logits.shape == (4,)
        np.testing.assert_allclose(changed_logits[0], logits[0], rtol=1e-6)


class TestSampling:
    def test_same_key_same_samples(self, state_8x8):
        config = _config()
        state = state_8x8
        labels = np.array([1, 4, 4, 9])
        first = gan.sample(jax.random.key(5), state, labels, config=config)
        assert first.shape == (4, 8, 8, 1)
        assert float(jnp.max(jnp.abs(first))) <= 1.0
        again = gan.sample(jax.random.key(5), state, labels, config=config)
        other = gan.sample(jax.random.key(6), state, labels, config=config)
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other)

    def test_label_out_of_range_rejected(self, state_8x8):
        config = _config()
        state = state_8x8
        with pytest.raises(ValueError, match="labels must be in"):
            gan.sample(jax.random.key(0), state, np.array([2, 10]), config=config)
        with pytest.raises(ValueError, match="labels must be in"):
            gan.member_scores(
                None, state, np.zeros((1, 8, 8, 1), np.float32), np.array([-1]), config=config
            )


class TestPrivateDiscriminator:
    def test_clipped_sum_matches_explicit_loop(self, state_8x8, digits):
        config = _config()
        state = state_8x8
        generator, discriminator = gan._modules(state, config)
        images, labels = jnp.asarray(digits[0][:5]), jnp.asarray(digits[1][:5])
        mask = jnp.array([True, True, False, True, True])
        key, l2_norm_clip = jax.random.key(3), 0.05

        clipped_sum, stats = gan.discriminator_clipped_grad_sum(
            state["params"],
            key,
            images,
            labels,
            mask,
            generator=generator,
            discriminator=discriminator,
            latent_dim=config["latent_dim"],
            num_classes=10,
            l2_norm_clip=l2_norm_clip,
        )

        # The function draws its fakes from the first half of split(key).
        fakes, fake_labels = gan.generate_fakes(
            state["params"]["generator"],
            jax.random.split(key)[0],
            generator=generator,
            num_samples=5,
            latent_dim=config["latent_dim"],
            num_classes=10,
        )

        @jax.jit
        @jax.grad
        def row_grad(params, image, label, fake, fake_label):
            def logit(image, label):
                return discriminator.apply({"params": params}, image[None], label[None])[0]

            return jax.nn.softplus(-logit(image, label)) + jax.nn.softplus(logit(fake, fake_label))

        discriminator_params = state["params"]["discriminator"]
        expected = jax.tree.map(np.zeros_like, discriminator_params)
        norms = []
        for row in range(5):
            grads = row_grad(
                discriminator_params, images[row], labels[row], fakes[row], fake_labels[row]
            )
            norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
            norms.append(norm)
            if not mask[row]:
                continue
            scale = min(1.0, l2_norm_clip / norm)
            expected = jax.tree.map(lambda total, g, s=scale: total + s * g, expected, grads)

        leaf_pairs = zip(jax.tree.leaves(clipped_sum), jax.tree.leaves(expected), strict=True)
        for actual, wanted in leaf_pairs:
            np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-7)
        assert int(stats.num_clipped) == sum(
            norm > l2_norm_clip for norm, kept in zip(norms, mask, strict=True) if kept
        )
        assert int(stats.num_clipped) >= 1  # the clip norm is small enough to bite


class TestTraining:
    def test_steps_move_losses_in_known_directions(self, state_8x8, digits):
        # Discriminator steps on one fixed batch (same fakes every step) lower its loss and make
        # it score real rows above fakes. Generator steps against that frozen discriminator
        # then lower the generator loss. A sign error in either loss breaks one of the checks.
        config = _config()
        generator, discriminator = gan._modules(state_8x8, config)
        models = dict(
            generator=generator, discriminator=discriminator, latent_dim=8, num_classes=10
        )
        optimizer = optax.adam(2e-3, b1=0.5)
        discriminator_update = jax.jit(
            functools.partial(gan.discriminator_step, optimizer=optimizer, **models)
        )
        generator_update = jax.jit(
            functools.partial(gan.generator_step, optimizer=optimizer, num_samples=128, **models)
        )
        images, labels = jnp.asarray(digits[0][:128]), jnp.asarray(digits[1][:128])
        params = state_8x8["params"]

        opt_state = optimizer.init(params["discriminator"])
        d_losses = []
        for _ in range(30):
            params, opt_state, loss = discriminator_update(
                params, opt_state, jax.random.key(7), images, labels
            )
            d_losses.append(float(loss))
        assert d_losses[-1] < d_losses[0] - 0.3
        gap = _real_minus_fake_logit(params, config, images, labels, jax.random.key(7))
        assert gap > 1.0

        opt_state = optimizer.init(params["generator"])
        g_losses = []
        for _ in range(30):
            params, opt_state, loss = generator_update(params, opt_state, jax.random.key(8))
            g_losses.append(float(loss))
        assert g_losses[-1] < g_losses[0] - 0.3

    def test_fit_records_history_and_scores(self, state_8x8, digits):
        images, labels = digits
        config = _config(num_epochs=1)
        result = gan.fit(jax.random.key(1), state_8x8, images, labels, config=config)
        assert result.ledger is None
        num_steps = int(np.ceil(len(labels) / config["batch_size"]))
        for name in ("discriminator_loss", "generator_loss"):
            assert len(result.history[name]) == num_steps
            assert np.all(np.isfinite(result.history[name]))
        # After one epoch the discriminator still ranks real digits above current fakes.
        gap = _real_minus_fake_logit(
            result.state["params"], config, images[:256], labels[:256], jax.random.key(7)
        )
        assert gap > 0.0

        scores = gan.member_scores(None, result.state, images[:256], labels[:256], config=config)
        _, discriminator = gan._modules(result.state, config)
        logits = discriminator.apply(
            {"params": result.state["params"]["discriminator"]}, images[:256], labels[:256]
        )
        assert scores.shape == (256,)
        np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-6)

    def test_private_fit_ledger_meets_target(self, state_8x8, digits):
        images, labels = digits
        config = _config(num_epochs=1, batch_size=90)
        # A public dataset size different from the realised 1,797 rows: the sampling
        # probability and step count must follow the public number.
        privacy = base.PrivacySpec(
            target_epsilon=3.0, target_delta=1e-5, dataset_size=1800, accountant="rdp"
        )
        result = gan.fit(
            jax.random.key(1), state_8x8, images, labels, config=config, privacy=privacy
        )

        assert [stage.name for stage in result.ledger.stages] == ["dp_sgd"]
        parameters = result.ledger.stages[0].parameters
        assert parameters["sampling_prob"] == pytest.approx(90 / 1800)
        assert parameters["num_steps"] == 20
        assert parameters["dataset_size"] == 1800
        assert parameters["l2_norm_clip"] == privacy.l2_norm_clip
        assert result.ledger.epsilon(1e-5, accountant="rdp") <= 3.0
        assert len(result.history["discriminator_loss"]) == 20
        assert np.all(np.isfinite(result.history["generator_loss"]))


@pytest.mark.parametrize("private", [False, True])
def test_repeat_fit_compiles_nothing(state_8x8, digits, private, caplog):
    images, labels = digits[0][:200], digits[1][:200]
    # A learning rate no other test uses, so nothing compiled these steps before.
    config = _config(batch_size=50, learning_rate=1.234e-3)
    privacy = None
    if private:
        privacy = base.PrivacySpec(target_epsilon=5.0, target_delta=1e-5, dataset_size=200)

    def compilations():
        return [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("Compiling jit(")
            and any(
                name in r.getMessage()
                for name in ("generator_step", "discriminator_step", "discriminator_clipped")
            )
        ]

    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        gan.fit(jax.random.key(1), state_8x8, images, labels, config=config, privacy=privacy)
        first = compilations()
        gan.fit(jax.random.key(2), state_8x8, images, labels, config=config, privacy=privacy)
        assert first
        assert compilations() == first
