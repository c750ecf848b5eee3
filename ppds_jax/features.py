"""The attacker's feature space for nearest-neighbour attacks on a synthetic set.

GAN-Leaks measures distances in pixel space or in the features of a fixed network. Whatever
network the attacker uses must be the same for the target and every reference pipeline, and
must not depend on any pipeline's members. Two extractors satisfy this:

- `random_extractor`: a `networks.CNN` with random weights drawn from a fixed seed. It reads no
  data at all. This is the default of `pipeline.collect_signals`.
- `population_extractor`: a `networks.CNN` classifier trained on the attacker's population
  data, real images outside the membership pool. Its hidden layer groups images by class
  content rather than by pixels.

Both return a `fidelity.FeatureExtractor`, so `embed` works for either.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppds_jax import fidelity, networks

FeatureExtractor = fidelity.FeatureExtractor


def random_extractor(
    image_shape: Sequence[int],
    *,
    seed: int = 0,
    features: Sequence[int] = (32, 64),
    hidden: int = 128,
) -> FeatureExtractor:
    """Build a CNN feature extractor with random weights from `seed`.

    Args:
      image_shape: (H, W, C) of the images to embed, H and W >= 2 ** len(features).
      seed: seed of the weights; equal seeds give equal extractors.
      features: widths of the CNN's conv blocks.
      hidden: feature dimension.

    Returns:
      A `FeatureExtractor` whose `embed` output has shape (N, hidden).

    Raises:
      ValueError: image_shape is not (H, W, C).
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape={tuple(image_shape)} must be (H, W, C)")
    # The classification head is never used, so its width is arbitrary.
    module = networks.CNN(num_classes=2, features=tuple(features), hidden=hidden)
    params = module.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32))
    return FeatureExtractor(module=module, params=params["params"])


def population_extractor(
    key,
    population_images,
    population_labels,
    *,
    num_classes: int,
    num_steps: int = 500,
    batch_size: int = 128,
) -> FeatureExtractor:
    """Train a CNN classifier on the attacker's population data and use its hidden layer.

    Pass real images that no pipeline of the experiment trains on (the attacker's population
    data). An extractor trained on pool images would see members of some pipelines, and the
    distances it produces would then depend on those members.

    Args:
      key: PRNG key of the initialisation and batch order.
      population_images: (P, H, W, C) float32 in [-1, 1].
      population_labels: (P,) int32.
      num_classes: number of classes, >= 2.
      num_steps: Adam steps, >= 1.
      batch_size: examples per step, >= 1.

    Returns:
      A `FeatureExtractor` whose `embed` output has shape (N, 128).

    Raises:
      ValueError: as in `fidelity.train_feature_extractor`.
    """
    return fidelity.train_feature_extractor(
        key,
        np.asarray(population_images, np.float32),
        np.asarray(population_labels),
        num_classes=num_classes,
        num_steps=num_steps,
        batch_size=batch_size,
    )


def embed(extractor: FeatureExtractor, images) -> np.ndarray:
    """Embed images (N, H, W, C) in [-1, 1] as features (N, hidden) float32."""
    return fidelity.embed(extractor, np.asarray(images, np.float32))
