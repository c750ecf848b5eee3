"""Tests of per-example clipping against explicit loops over examples."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppds_jax import clipping
from ppds_jax.networks import CNN

BATCH = 6
# Below every gradient norm of both test models at initialisation, so every row is clipped.
SMALL_CLIP = 0.05


def _tree_norm(tree) -> float:
    return math.sqrt(sum(float(jnp.sum(leaf**2)) for leaf in jax.tree.leaves(tree)))


@functools.cache
def _cnn_setup():
    model = CNN(num_classes=3, features=(4, 8), hidden=16)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (BATCH, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32)
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss(params, example, key):
        del key
        image, label = example
        logits = model.apply({"params": params}, image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return loss, params, (images, labels)


@functools.cache
def _vae_setup():
    """A two-layer encoder/decoder with a reparameterised latent drawn from the example's key."""
    rng = np.random.default_rng(1)
    params = {
        "encoder": jnp.asarray(rng.normal(0, 0.5, (16, 4)), jnp.float32),
        "decoder": jnp.asarray(rng.normal(0, 0.5, (2, 16)), jnp.float32),
    }
    images = jnp.asarray(rng.uniform(-1, 1, (BATCH, 16)), jnp.float32)

    def loss(params, example, key):
        (x,) = example
        mean, log_var = jnp.split(jnp.tanh(x @ params["encoder"]), 2)
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
        reconstruction = jnp.tanh(z @ params["decoder"])
        kl = 0.5 * jnp.sum(jnp.exp(log_var) + mean**2 - 1 - log_var)
        return jnp.sum((reconstruction - x) ** 2) + kl

    return loss, params, (images,)


@functools.cache
def _jitted(setup, l2_norm_clip, per_layer=False, microbatch_size=None):
    """One compiled clipped_grad_sum per setting, shared by the tests."""
    loss = setup()[0]
    return jax.jit(
        clipping.clipped_grad_sum(
            loss, l2_norm_clip=l2_norm_clip, per_layer=per_layer, microbatch_size=microbatch_size
        )
    )


def _loop_clipped_sum(loss, params, batch, mask, key, clip, per_layer=False):
    """Clip and sum per-example gradients one example at a time, in plain Python."""
    keys = jax.random.split(key, mask.shape[0])
    grad_fn = jax.jit(jax.grad(loss))
    leaves, treedef = jax.tree.flatten(params)
    total = [np.zeros(leaf.shape, np.float64) for leaf in leaves]
    for i in range(mask.shape[0]):
        if not mask[i]:
            continue
        example = tuple(array[i] for array in batch)
        grads = [
            np.asarray(g, np.float64) for g in jax.tree.leaves(grad_fn(params, example, keys[i]))
        ]
        if per_layer:
            leaf_clip = clip / math.sqrt(len(grads))
            grads = [g * min(1.0, leaf_clip / np.linalg.norm(g)) for g in grads]
        else:
            norm = math.sqrt(sum(np.sum(g**2) for g in grads))
            grads = [g * min(1.0, clip / norm) for g in grads]
        total = [t + g for t, g in zip(total, grads, strict=True)]
    return jax.tree.unflatten(treedef, [t.astype(np.float32) for t in total])


@pytest.mark.parametrize("setup", [_cnn_setup, _vae_setup], ids=["cnn", "vae"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_clipped_sum_matches_explicit_loop(setup, per_layer):
    loss, params, batch = setup()
    mask = jnp.array([True, True, False, True, True, True])
    key = jax.random.key(7)
    # A clip norm below the median gradient norm, so some rows are clipped and some are not.
    norms = _jitted(setup, math.inf)(params, batch, mask, key)[1].norms
    clip = float(np.median(np.asarray(norms)[np.asarray(mask)]))

    fn = jax.jit(clipping.clipped_grad_sum(loss, l2_norm_clip=clip, per_layer=per_layer))
    clipped_sum, stats = fn(params, batch, mask, key)

    expected = _loop_clipped_sum(loss, params, batch, np.asarray(mask), key, clip, per_layer)
    chex.assert_trees_all_close(clipped_sum, expected, rtol=1e-5, atol=1e-6)
    assert int(stats.num_nonfinite) == 0
    if not per_layer:
        assert int(stats.num_clipped) == int(np.sum(np.asarray(norms) > clip))


def test_vae_per_example_keys_are_used():
    loss, params, batch = _vae_setup()
    mask = jnp.ones(BATCH, bool)
    fn = _jitted(_vae_setup, SMALL_CLIP)
    first, _ = fn(params, batch, mask, jax.random.key(0))
    second, _ = fn(params, batch, mask, jax.random.key(1))
    assert _tree_norm(jax.tree.map(jnp.subtract, first, second)) > 1e-3


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_each_clipped_gradient_within_clip_norm(per_layer):
    loss, params, batch = _cnn_setup()
    clip = SMALL_CLIP
    fn = _jitted(_cnn_setup, clip, per_layer)
    for i in range(BATCH):
        one_hot = jnp.arange(BATCH) == i
        single, stats = fn(params, batch, one_hot, jax.random.key(0))
        assert _tree_norm(single) <= clip * (1 + 1e-5)
        assert float(stats.norms[i]) > clip, "test needs every row to be clipped"


def test_padded_rows_change_nothing():
    loss, params, (images, labels) = _cnn_setup()
    fn = _jitted(_cnn_setup, SMALL_CLIP)
    unpadded, unpadded_stats = fn(
        params, (images, labels), jnp.ones(BATCH, bool), jax.random.key(0)
    )

    garbage = jnp.full((4, 8, 8, 1), jnp.nan, jnp.float32).at[0].set(50.0)
    padded_images = jnp.concatenate([images, garbage])
    padded_labels = jnp.concatenate([labels, jnp.zeros(4, jnp.int32)])
    mask = jnp.arange(BATCH + 4) < BATCH
    padded, padded_stats = fn(params, (padded_images, padded_labels), mask, jax.random.key(0))

    chex.assert_trees_all_close(padded, unpadded, rtol=1e-6, atol=1e-7)
    assert int(padded_stats.num_clipped) == int(unpadded_stats.num_clipped)
    assert int(padded_stats.num_nonfinite) == 0
    np.testing.assert_array_equal(np.asarray(padded_stats.norms[BATCH:]), 0.0)


def test_all_rows_masked_gives_zeros():
    loss, params, batch = _cnn_setup()
    fn = _jitted(_cnn_setup, SMALL_CLIP)
    clipped_sum, stats = fn(params, batch, jnp.zeros(BATCH, bool), jax.random.key(0))
    for leaf in jax.tree.leaves(clipped_sum):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert int(stats.num_clipped) == 0


def test_neighbouring_batches_differ_by_at_most_clip():
    loss, params, batch = _cnn_setup()
    clip = SMALL_CLIP
    fn = _jitted(_cnn_setup, clip)
    full, _ = fn(params, batch, jnp.ones(BATCH, bool), jax.random.key(0))
    for i in range(BATCH):
        removed, _ = fn(params, batch, jnp.arange(BATCH) != i, jax.random.key(0))
        difference = jax.tree.map(jnp.subtract, full, removed)
        assert _tree_norm(difference) <= clip * (1 + 1e-5)


def test_nan_loss_row_contributes_zero():
    loss, params, (images, labels) = _cnn_setup()
    poisoned = images.at[2].set(jnp.nan)
    mask = jnp.ones(BATCH, bool)
    fn = _jitted(_cnn_setup, SMALL_CLIP)
    clipped_sum, stats = fn(params, (poisoned, labels), mask, jax.random.key(0))

    without_row, _ = fn(params, (images, labels), mask.at[2].set(False), jax.random.key(0))
    chex.assert_tree_all_finite(clipped_sum)
    chex.assert_trees_all_close(clipped_sum, without_row, rtol=1e-6, atol=1e-7)
    assert int(stats.num_nonfinite) == 1
    assert float(stats.norms[2]) == math.inf


def test_infinite_clip_is_plain_gradient_sum():
    loss, params, batch = _cnn_setup()
    mask = jnp.ones(BATCH, bool)
    fn = _jitted(_cnn_setup, math.inf)
    clipped_sum, stats = fn(params, batch, mask, jax.random.key(0))

    def total_loss(params):
        keys = jax.random.split(jax.random.key(0), BATCH)
        return jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(params, batch, keys))

    expected = jax.jit(jax.grad(total_loss))(params)
    chex.assert_trees_all_close(clipped_sum, expected, rtol=1e-5, atol=1e-6)
    assert int(stats.num_clipped) == 0


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_microbatches_match_one_batch(per_layer):
    loss, params, batch = _vae_setup()
    mask = jnp.array([True, False, True, True, True, False])
    key = jax.random.key(3)
    whole = _jitted(_vae_setup, SMALL_CLIP, per_layer)
    split = _jitted(_vae_setup, SMALL_CLIP, per_layer, microbatch_size=2)
    whole_sum, whole_stats = whole(params, batch, mask, key)
    split_sum, split_stats = split(params, batch, mask, key)
    chex.assert_trees_all_close(split_sum, whole_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split_stats.norms, whole_stats.norms, rtol=1e-6)
    assert int(split_stats.num_clipped) == int(whole_stats.num_clipped)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan])
def test_nonpositive_clip_raises(clip):
    loss, _, _ = _cnn_setup()
    with pytest.raises(ValueError, match="l2_norm_clip"):
        clipping.clipped_grad_sum(loss, l2_norm_clip=clip)


def test_microbatch_not_dividing_batch_raises():
    loss, params, batch = _cnn_setup()
    fn = clipping.clipped_grad_sum(loss, l2_norm_clip=1.0, microbatch_size=4)
    with pytest.raises(ValueError, match="multiple of microbatch_size=4"):
        fn(params, batch, jnp.ones(BATCH, bool), jax.random.key(0))


class _MixedLayers(nn.Module):
    """Strided, dilated and explicitly padded convolutions, and Dense layers on feature maps."""

    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="VALID")(images))
        x = nn.relu(nn.Conv(6, (3, 3), kernel_dilation=2, padding=1)(x))
        x = nn.Conv(5, (2, 2), padding="SAME", use_bias=False)(x)
        # Dense layers on every position: 4 positions, 5 -> 7 features (explicit product) and
        # 7 -> 40 features (Gram-matrix identity, cheaper when positions are few).
        x = nn.tanh(nn.Dense(7)(x))
        x = nn.tanh(nn.Dense(40)(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@functools.cache
def _mixed_setup():
    model = _MixedLayers()
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.uniform(-1, 1, (BATCH, 9, 9, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32)
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss(params, example, key):
        image, label = example
        # Input noise from the example's key, so the keys of both methods must agree.
        image = image + 0.1 * jax.random.normal(key, image.shape)
        logits = model.apply({"params": params}, image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return loss, params, (images, labels)


@functools.cache
def _weight_decay_setup():
    """The CNN loss plus a penalty that reads one Dense kernel outside its layer call."""
    loss, params, batch = _cnn_setup()

    def penalised_loss(params, example, key):
        return loss(params, example, key) + 0.1 * jnp.sum(params["Dense_0"]["kernel"] ** 2)

    return penalised_loss, params, batch


def _with_nan_and_padding(batch):
    images, *rest = batch
    return (images.at[2].set(jnp.nan), *rest), jnp.arange(BATCH) != 4


@pytest.mark.parametrize(
    ("setup", "clip"),
    [
        (_cnn_setup, SMALL_CLIP),
        (_cnn_setup, math.inf),
        (_mixed_setup, SMALL_CLIP),
        (_weight_decay_setup, SMALL_CLIP),
        (_vae_setup, SMALL_CLIP),
    ],
    ids=["cnn", "cnn_unclipped", "mixed_layers", "weight_decay", "no_flax_layers"],
)
def test_ghost_matches_vmap(setup, clip):
    loss, params, batch = setup()
    batch, mask = _with_nan_and_padding(batch)
    key = jax.random.key(11)
    vmap_sum, vmap_stats = _jitted(setup, clip)(params, batch, mask, key)
    ghost = jax.jit(clipping.ghost_clipped_grad_sum(loss, l2_norm_clip=clip))
    ghost_sum, ghost_stats = ghost(params, batch, mask, key)

    chex.assert_trees_all_close(ghost_sum, vmap_sum, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ghost_stats.norms, vmap_stats.norms, rtol=1e-4)
    np.testing.assert_allclose(ghost_stats.losses, vmap_stats.losses, rtol=1e-5)
    assert int(ghost_stats.num_nonfinite) == int(vmap_stats.num_nonfinite) == 1
    assert int(ghost_stats.num_clipped) == int(vmap_stats.num_clipped)


def test_ghost_intercepts_only_layers_without_other_uses():
    loss, params, (images, labels) = _weight_decay_setup()
    keys = jax.random.split(jax.random.key(0), BATCH)
    example = (images[0], labels[0])
    found = clipping._find_layers(loss, params, example, keys[0])
    kept = clipping._drop_layers_used_elsewhere(loss, found, params, example, keys[0])
    # CNN calls: Conv_0, Conv_1, Dense_0, Dense_1; the penalty reads Dense_0's kernel.
    assert [layer is not None for layer in found] == [True, True, True, True]
    assert [layer is not None for layer in kept] == [True, True, False, True]


def test_ghost_intercepts_every_supported_layer():
    loss, params, (images, labels) = _mixed_setup()
    key = jax.random.key(0)
    example = (images[0], labels[0])
    found = clipping._find_layers(loss, params, example, key)
    kept = clipping._drop_layers_used_elsewhere(loss, found, params, example, key)
    assert len(kept) == 6
    assert all(layer is not None for layer in kept)
