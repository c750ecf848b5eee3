"""Tests of the class-conditional VAE family."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from ppds_jax import clipping, generators
from ppds_jax.generators import vae
from ppds_jax.generators.base import PrivacySpec

CONFIG = generators.resolve_config(vae.FAMILY, {"hidden": 32, "latent_dim": 4, "batch_size": 32})


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (data.images[..., None] / 8.0 - 1.0).astype(np.float32)
    return images[:256], data.target[:256].astype(np.int32)


def initial_state():
    return vae.init(jax.random.key(0), image_shape=(8, 8, 1), num_classes=10, config=CONFIG)


def mean_loss(params, images, labels):
    loss = vae.make_per_example_loss(image_shape=(8, 8, 1), num_classes=10, config=CONFIG)
    keys = jax.random.split(jax.random.key(42), len(images))
    return float(jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(params, (images, labels), keys)))


def test_parameter_and_sample_shapes():
    state = initial_state()
    params = state["params"]
    assert params["encoder"]["Dense_0"]["kernel"].shape == (64 + 10, 32)
    assert params["decoder"]["Dense_1"]["kernel"].shape == (32, 64)
    labels = jnp.arange(7) % 10
    images = vae.sample(jax.random.key(1), state, labels, config=CONFIG)
    assert images.shape == (7, 8, 8, 1)
    assert float(images.min()) >= -1.0
    assert float(images.max()) <= 1.0


def test_same_key_same_samples():
    state = initial_state()
    labels = jnp.arange(10)
    first = vae.sample(jax.random.key(3), state, labels, config=CONFIG)
    second = vae.sample(jax.random.key(3), state, labels, config=CONFIG)
    other = vae.sample(jax.random.key(4), state, labels, config=CONFIG)
    chex.assert_trees_all_equal(first, second)
    assert not np.allclose(first, other)


def test_training_lowers_loss(digits):
    images, labels = digits
    state = initial_state()
    before = mean_loss(state["params"], images, labels)
    fitted = vae.fit(jax.random.key(5), state, images, labels, config={**CONFIG, "num_epochs": 10})
    after = mean_loss(fitted.state["params"], images, labels)
    assert fitted.ledger is None
    assert after < 0.85 * before


def test_negative_elbo_matches_closed_form_parts():
    state = initial_state()
    loss = vae.make_per_example_loss(image_shape=(8, 8, 1), num_classes=10, config=CONFIG)
    image = jnp.zeros((8, 8, 1))
    params = state["params"]
    # With a zero decoder kernel and bias the logits are 0, so each of the 64 pixels (target
    # 0.5) costs log 2 nats; with a zero encoder the posterior is N(0, I) and the KL is 0.
    zero = jax.tree.map(jnp.zeros_like, params)
    value = loss(zero, (image, jnp.int32(3)), jax.random.key(0))
    np.testing.assert_allclose(value, 64 * np.log(2.0), rtol=1e-6)


def test_dp_clipped_sum_matches_explicit_loop(digits):
    images, labels = digits
    params = initial_state()["params"]
    loss = vae.make_per_example_loss(image_shape=(8, 8, 1), num_classes=10, config=CONFIG)
    clip = 0.5
    batch = (images[:4], labels[:4])
    mask = jnp.array([True, True, True, False])
    key = jax.random.key(9)
    clipped_sum, _ = clipping.clipped_grad_sum(loss, l2_norm_clip=clip)(params, batch, mask, key)

    keys = jax.random.split(key, 4)
    expected = jax.tree.map(jnp.zeros_like, params)
    for i in range(3):  # The fourth row is padding and must contribute nothing.
        grad = jax.grad(loss)(params, (images[i], labels[i]), keys[i])
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
        scale = jnp.minimum(1.0, clip / norm)
        expected = jax.tree.map(lambda e, g, s=scale: e + s * g, expected, grad)
    chex.assert_trees_all_close(clipped_sum, expected, rtol=1e-5, atol=1e-6)


def test_dp_fit_ledger_meets_target(digits):
    images, labels = digits
    privacy = PrivacySpec(target_epsilon=4.0, target_delta=1e-5, dataset_size=256)
    fitted = vae.fit(
        jax.random.key(6),
        initial_state(),
        images,
        labels,
        config={**CONFIG, "num_epochs": 1},
        privacy=privacy,
    )
    summary = fitted.ledger.to_dict(1e-5)
    assert [stage["name"] for stage in summary["stages"]] == ["vae_dp_sgd"]
    assert summary["epsilon_pld"] <= 4.0 * 1.0001
    assert summary["epsilon_pld"] > 3.9
    assert summary["epsilon_rdp"] >= summary["epsilon_pld"]


def test_white_box_scores_order_invariant(digits):
    images, labels = digits
    state = initial_state()
    scores = vae.member_scores(jax.random.key(2), state, images[:20], labels[:20], config=CONFIG)
    order = np.random.default_rng(0).permutation(20)
    shuffled = vae.member_scores(
        jax.random.key(2), state, images[:20][order], labels[:20][order], config=CONFIG
    )
    np.testing.assert_allclose(shuffled, scores[order], rtol=1e-6)


def test_label_outside_classes_rejected():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        vae.sample(jax.random.key(0), initial_state(), jnp.array([10]), config=CONFIG)


def test_unknown_option_rejected():
    with pytest.raises(ValueError, match="does not accept option.*'depth'"):
        generators.resolve_config(vae.FAMILY, {"depth": 3})
