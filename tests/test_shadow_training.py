"""Tests for ppds_jax.shadow_training: each model equals its own training.fit run."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppds_jax import classifier, dp_sgd, shadow_training, sharding, training
from ppds_jax.generators.base import PrivacySpec

NUM_ROWS, DIM, NUM_CLASSES = 48, 5, 3
# Shared optimizer objects let tests reuse the steps that train_many compiled for earlier ones.
SGD = optax.sgd(0.3)
ADAM = optax.adam(0.05)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(NUM_ROWS, DIM)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, NUM_ROWS).astype(np.int32)
    return features, labels


def _init(key):
    return {
        "w": 0.1 * jax.random.normal(key, (DIM, NUM_CLASSES)),
        "b": jnp.zeros(NUM_CLASSES),
    }


def _loss(params, example, key):
    # The input noise uses the example's own key, so a wrong key assignment changes the result.
    features, label = example
    features = features + 0.3 * jax.random.normal(key, features.shape)
    logits = features @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def _masks(num_models, seed=1, prob=0.5):
    return np.random.default_rng(seed).random((num_models, NUM_ROWS)) < prob


def _keys(num_models, seed=2):
    return jax.random.split(jax.random.key(seed), num_models)


def _fit_one(key, masks_row, data, **kwargs):
    init_key, fit_key = jax.random.split(key)
    return training.fit(
        fit_key,
        _init(init_key),
        per_example_loss=_loss,
        data=tuple(array[masks_row] for array in data),
        **kwargs,
    )


def _model(params, k):
    return jax.tree.map(lambda leaf: leaf[k], params)


DP = dp_sgd.DpSgdConfig(
    l2_norm_clip=0.5,
    noise_multiplier=0.8,
    sampling_prob=0.4,
    num_steps=5,
    dataset_size=24,
    # Smaller than most Poisson batches here, so many steps take two or three chunks.
    physical_batch_size=6,
)


def test_sequential_matches_fit_for_each_model():
    data = _problem()
    keys, masks = _keys(3), _masks(3)
    num_steps = [7, 4, 9]
    optimizer = ADAM

    params, stats = shadow_training.train_many(
        keys,
        _init,
        per_example_loss=_loss,
        data=data,
        masks=masks,
        optimizer=optimizer,
        num_steps=num_steps,
        batch_size=8,
        strategy="sequential",
    )

    for k in range(3):
        expected, expected_stats = _fit_one(
            keys[k], masks[k], data, optimizer=optimizer, num_steps=num_steps[k], batch_size=8
        )
        chex.assert_trees_all_close(_model(params, k), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats[k].loss, expected_stats.loss, rtol=1e-6)


def test_sequential_matches_fit_under_dp():
    data = _problem()
    keys, masks = _keys(2), _masks(2)
    optimizer = SGD

    params, stats = shadow_training.train_many(
        keys,
        _init,
        per_example_loss=_loss,
        data=data,
        masks=masks,
        optimizer=optimizer,
        num_steps=DP.num_steps,
        batch_size=8,
        strategy="sequential",
        dp=DP,
    )

    for k in range(2):
        expected, expected_stats = _fit_one(
            keys[k],
            masks[k],
            data,
            optimizer=optimizer,
            num_steps=DP.num_steps,
            batch_size=1,
            dp=DP,
        )
        assert np.max(expected_stats.batch_sizes) > DP.physical_batch_size
        chex.assert_trees_all_close(_model(params, k), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(stats[k].batch_sizes, expected_stats.batch_sizes)
        np.testing.assert_allclose(stats[k].clip_fraction, expected_stats.clip_fraction)
        np.testing.assert_allclose(stats[k].loss, expected_stats.loss, rtol=1e-6)


@pytest.mark.parametrize("dp", [None, DP], ids=["non_private", "dp_sgd"])
def test_vmap_matches_sequential(dp):
    # SGD keeps float rounding small. Adam divides by the root of the second moment, so it can
    # turn a rounding difference in a gradient that should be zero into a full learning-rate step.
    data = _problem()
    keys, masks = _keys(3), _masks(3)
    num_steps = DP.num_steps if dp else [6, 3, 8]
    kwargs = dict(
        per_example_loss=_loss,
        data=data,
        masks=masks,
        optimizer=SGD,
        num_steps=num_steps,
        batch_size=8,
        dp=dp,
    )

    sequential, sequential_stats = shadow_training.train_many(
        keys, _init, strategy="sequential", **kwargs
    )
    vmapped, vmapped_stats = shadow_training.train_many(keys, _init, strategy="vmap", **kwargs)

    chex.assert_trees_all_close(vmapped, sequential, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(vmapped_stats, sequential_stats, strict=True):
        np.testing.assert_allclose(ours.loss, theirs.loss, rtol=1e-5)
        assert len(ours.loss) == len(theirs.loss)


def test_model_groups_match_one_program():
    data = _problem()
    keys, masks = _keys(3), _masks(3)
    kwargs = dict(
        per_example_loss=_loss,
        data=data,
        masks=masks,
        optimizer=SGD,
        num_steps=[6, 3, 8],
        batch_size=8,
    )

    sequential, _ = shadow_training.train_many(keys, _init, strategy="sequential", **kwargs)
    grouped, _ = shadow_training.train_many(
        keys, _init, strategy="vmap", models_per_program=2, **kwargs
    )

    chex.assert_trees_all_close(grouped, sequential, rtol=1e-5, atol=1e-6)


def test_dp_noise_std_is_multiplier_times_clip():
    # One SGD step with learning rate 1 moves the parameters by the noisy gradient
    # (clipped sum + N(0, (sigma C)^2)) / (q N). With a huge sigma the clipped sum is
    # negligible, so the moves have standard deviation sigma C / (q N), once per model.
    dim = 400
    dp = dp_sgd.DpSgdConfig(
        l2_norm_clip=1.0,
        noise_multiplier=1000.0,
        sampling_prob=0.5,
        num_steps=1,
        dataset_size=20,
        physical_batch_size=24,
    )
    rows = np.zeros((40, dim), np.float32)

    def loss(params, example, key):
        del key
        return jnp.sum(params * example[0])

    moved, _ = shadow_training.train_many(
        _keys(2),
        lambda key: jnp.zeros(dim),
        per_example_loss=loss,
        data=(rows,),
        masks=np.ones((2, 40), bool),
        optimizer=optax.sgd(1.0),
        num_steps=1,
        batch_size=1,
        strategy="vmap",
        dp=dp,
    )

    expected_std = dp.noise_multiplier * dp.l2_norm_clip / dp.expected_batch_size
    # The sample std of 400 normal draws has relative standard deviation 1 / sqrt(800).
    tolerance = 5 / np.sqrt(2 * dim)
    for k in range(2):
        assert abs(np.std(moved[k]) / expected_std - 1) < tolerance
    assert abs(np.corrcoef(moved[0], moved[1])[0, 1]) < 5 / np.sqrt(dim)


def test_train_classifiers_matches_train_classifier():
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 40).astype(np.int32)
    masks = _masks(2, prob=0.5)[:, :40]
    keys = _keys(2)
    config = {"features": (4,), "hidden": 8, "num_epochs": 2, "batch_size": 8}

    results = shadow_training.train_classifiers(
        keys, images, labels, masks, num_classes=4, config=config, strategy="sequential"
    )

    for k in range(2):
        expected = classifier.train_classifier(
            keys[k], images[masks[k]], labels[masks[k]], num_classes=4, config=config
        )
        chex.assert_trees_all_close(results[k].params, expected.params, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(results[k].history["loss"], expected.history["loss"], rtol=1e-6)
        assert results[k].config == expected.config
        assert results[k].selected_epoch == expected.selected_epoch


def test_train_classifiers_matches_under_dp():
    # A Flax CNN under DP-SGD runs ghost clipping, the default of training.fit, here vmapped
    # over models. RDP calibrates the noise much faster than PLD.
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, (40, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 40).astype(np.int32)
    masks = _masks(2, seed=5)[:, :40]
    keys = _keys(2, seed=6)
    config = {"features": (4,), "hidden": 8, "num_epochs": 1, "batch_size": 8}
    privacy = PrivacySpec(target_epsilon=8.0, target_delta=1e-4, dataset_size=200, accountant="rdp")

    results = shadow_training.train_classifiers(
        keys,
        images,
        labels,
        masks,
        num_classes=4,
        config=config,
        privacy=privacy,
        strategy="vmap",
    )

    expected = classifier.train_classifier(
        keys[1],
        images[masks[1]],
        labels[masks[1]],
        num_classes=4,
        config=config,
        privacy=privacy,
    )
    chex.assert_trees_all_close(results[1].params, expected.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1].history["loss"], expected.history["loss"], rtol=1e-5)
    assert len(results[1].history["loss"]) == 25
    assert results[1].ledger.stages == expected.ledger.stages
    assert results[0].ledger is not results[1].ledger


def test_choose_strategy_rule():
    assert shadow_training.choose_strategy("cpu") == "sequential"
    assert shadow_training.choose_strategy("gpu") == "vmap"
    assert shadow_training.choose_strategy("tpu") == "vmap"
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    assert shadow_training.choose_strategy("cpu", mesh=mesh) == "vmap"


def _train(**overrides):
    data = _problem()
    kwargs = dict(
        per_example_loss=_loss,
        data=data,
        masks=_masks(3),
        optimizer=SGD,
        num_steps=2,
        batch_size=8,
    )
    kwargs.update(overrides)
    keys = _keys(len(kwargs["masks"]))
    return shadow_training.train_many(keys, _init, **kwargs)


def test_mask_without_rows_is_rejected():
    masks = _masks(3)
    masks[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] of masks select none of the 48 data rows"):
        _train(masks=masks)


def test_masks_must_be_bool_k_by_n():
    with pytest.raises(ValueError, match=r"\(K, N\) = \(3, 48\).*int64 with shape \(3, 48\)"):
        _train(masks=_masks(3).astype(np.int64))
    with pytest.raises(ValueError, match=r"shape \(3, 47\)"):
        _train(masks=_masks(3)[:, :47])


def test_batch_larger_than_a_model_is_rejected():
    masks = _masks(3)
    masks[0] = False
    masks[0, :5] = True
    with pytest.raises(ValueError, match=r"batch_size=6 must be in \[1, 5\]: masks\[0\]"):
        _train(masks=masks, batch_size=6)


def test_dp_step_count_must_match_config():
    with pytest.raises(ValueError, match=r"num_steps=\[3\] must equal dp.num_steps=5"):
        _train(dp=DP, num_steps=3)


def test_unknown_strategy_and_misplaced_options_are_rejected():
    with pytest.raises(ValueError, match="strategy='parallel' is not one of"):
        _train(strategy="parallel")
    with pytest.raises(ValueError, match="models_per_program=2 applies to strategy='vmap'"):
        _train(strategy="sequential", models_per_program=2)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="'sequential' cannot use a mesh"):
        _train(strategy="sequential", mesh=mesh)


def test_vmap_over_more_models_than_memory_holds_is_rejected():
    with pytest.raises(ValueError, match=r"over 3 models needs about \d+ bytes.*the 64 bytes"):
        _train(strategy="vmap", device_memory_bytes=64)


def test_early_stopping_is_rejected_by_train_classifiers():
    images = np.zeros((8, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="early_stopping_patience=2 needs a validation set"):
        shadow_training.train_classifiers(
            _keys(1),
            images,
            np.zeros(8, np.int32),
            np.ones((1, 8), bool),
            num_classes=2,
            config={"early_stopping_patience": 2},
        )


def test_step_counts_need_one_per_model():
    with pytest.raises(ValueError, match=r"num_steps has shape \(2,\); expected one int or \(3,\)"):
        _train(num_steps=[2, 2])
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1 for every model"):
        _train(num_steps=[2, 0, 2])
