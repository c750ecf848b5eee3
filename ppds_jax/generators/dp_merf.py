"""DP-MERF: a generator trained to match a noisy random-feature mean embedding.

DP-MERF (Harder et al., 2021, "DP-MERF: Differentially Private Mean Embeddings with Random
Features for Practical Privacy-Preserving Data Generation") touches the private data once. It
maps every image x to random Fourier features phi(x) of a Gaussian kernel and sums
phi(x_i) outer onehot(y_i) over the data. That class-conditional mean embedding is released
once through the Gaussian mechanism. A generator is then trained, without further access to the
data, to minimise the squared distance between the released embedding and the embedding of its
samples. That distance is the random-feature approximation of the squared MMD between the two
class-conditional distributions.

Feature vector. With m = num_features / 2 frequencies w_j ~ N(0, I / bandwidth^2),

.. math::
    \\phi(x) = m^{-1/2} [\\cos(w_1^T x), \\dots, \\cos(w_m^T x),
                        \\sin(w_1^T x), \\dots, \\sin(w_m^T x)],

so phi(x)^T phi(x') = (1/m) sum_j cos(w_j^T (x - x')), an unbiased estimate of the Gaussian
kernel exp(-||x - x'||^2 / (2 bandwidth^2)), and ||phi(x)|| = 1 exactly. The released feature
vector appends one constant entry, psi(x) = [sqrt(1 - c^2) phi(x), c] with
c = `count_feature_weight`, which still has norm exactly 1. The last row of the embedding then
contains c * n_k / N, so the class counts come out of the same single release instead of a
second release with its own privacy cost. The generator's labels are drawn from them.

Sensitivity. The released embedding is

.. math::
    M = \\frac{1}{N} \\sum_i \\psi(x_i) \\, \\mathrm{onehot}(y_i)^T
    \\in \\mathbb{R}^{(D + 1) \\times K},

with N the PUBLIC dataset size (the same constant for neighbouring datasets). Adding or removing
one example (x, y) changes M by psi(x) onehot(y)^T / N, whose Frobenius norm is
||psi(x)|| * ||onehot(y)|| / N = 1 / N. So the L2 sensitivity under add/remove-one is 1 / N.
Under replace-one the change is (psi(x) onehot(y)^T - psi(x') onehot(y')^T) / N, of norm up to
2 / N, which would double the noise. Releasing M + N(0, sigma^2 I) with
sigma = noise_multiplier / N is the Gaussian mechanism `GaussianDpEvent(noise_multiplier)`,
and `noise_multiplier` is calibrated so that this single release meets
(target_epsilon, target_delta). Everything after the release, including the generator's
training, is post-processing.

Post-processing of the noisy embedding. The class proportions are the clipped and normalised
last row. The feature rows are divided by sqrt(1 - c^2) and by the noisy total mass
sum_k n_k / N. Each column k then estimates (n_k / n) times the mean feature of class k. The
generator's embedding estimates the same quantity when its labels follow the class proportions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ppds_jax import accounting, noise
from ppds_jax.generators.base import FitResult, GeneratorFamily, PrivacySpec

DEFAULT_CONFIG = {
    "num_epochs": 10,
    # Generated samples per generator step; an "epoch" is ceil(dataset_size / batch_size) steps,
    # although the generator never reads the data after the release.
    "batch_size": 100,
    "learning_rate": 1e-3,
    # D, the number of random features (an even number: D / 2 frequencies, cos and sin each).
    "num_features": 4_000,
    # Kernel bandwidth divided by sqrt(H * W * C). Distances between images in [-1, 1] grow
    # like sqrt(H * W * C), so one value suits 8x8, 28x28 and 32x32x3 images. The bandwidth is
    # a public constant: a median heuristic would read the private data outside the ledger.
    # NOTE: 0.5 was picked from {0.25, 0.5, 1.0} by non-private trials on Fashion-MNIST.
    "relative_bandwidth": 0.5,
    # c, the weight of the constant feature that carries the class counts; in (0, 1).
    "count_feature_weight": 0.3,
    "latent_dim": 32,
    "hidden_sizes": (256, 512),
    # Examples per chunk when computing the embedding; it bounds memory and not the result.
    "embedding_chunk_size": 500,
}

# The noisy total mass n / N is floored here before dividing, so extreme noise cannot flip
# the sign of the target or divide by zero.
_MIN_TOTAL_MASS = 1e-3


class _Generator(nn.Module):
    """MLP from (latent, one-hot label) to an image in [-1, 1]."""

    image_shape: tuple[int, ...]
    hidden_sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, latents: jax.Array, one_hot: jax.Array) -> jax.Array:
        h = jnp.concatenate([latents, one_hot], axis=-1)
        for width in self.hidden_sizes:
            h = nn.relu(nn.LayerNorm()(nn.Dense(width)(h)))
        h = nn.tanh(nn.Dense(math.prod(self.image_shape))(h))
        return h.reshape((latents.shape[0], *self.image_shape))


def rff_frequencies(
    key: jax.Array, *, num_pixels: int, num_features: int, bandwidth: float
) -> jax.Array:
    """Draw the random Fourier frequencies of a Gaussian kernel.

    Args:
      key: PRNG key, independent of the data (the frequencies are public).
      num_pixels: input dimension d = H * W * C.
      num_features: D, even and >= 2; D / 2 frequencies are drawn.
      bandwidth: kernel bandwidth > 0, in the units of the flattened images.

    Returns:
      Frequencies, shape (num_pixels, num_features // 2), float32, entries N(0, 1 / bandwidth^2).
    """
    if num_features < 2 or num_features % 2:
        raise ValueError(f"num_features={num_features} must be an even integer >= 2")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth={bandwidth} must be > 0")
    return jax.random.normal(key, (num_pixels, num_features // 2), jnp.float32) / bandwidth


def random_fourier_features(flat_images: jax.Array, frequencies: jax.Array) -> jax.Array:
    """Map flattened images to unit-norm random Fourier features.

    Args:
      flat_images: shape (n, d), float32.
      frequencies: shape (d, m) from `rff_frequencies`.

    Returns:
      phi, shape (n, 2 m): cos then sin of the projections, divided by sqrt(m), so every row
      has L2 norm exactly 1 and phi(x)^T phi(x') estimates the Gaussian kernel.
    """
    projections = flat_images @ frequencies
    scale = 1.0 / math.sqrt(frequencies.shape[1])
    return scale * jnp.concatenate([jnp.cos(projections), jnp.sin(projections)], axis=-1)


def mean_embedding(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    frequencies: jax.Array,
    num_classes: int,
    dataset_size: int,
    count_feature_weight: float,
    chunk_size: int = 500,
) -> jax.Array:
    """Compute the exact class-conditional embedding M = (1 / N) sum_i psi(x_i) onehot(y_i)^T.

    Args:
      images: shape (n, H, W, C), float32 in [-1, 1].
      labels: shape (n,), int in [0, num_classes).
      frequencies: shape (H * W * C, D / 2).
      num_classes: K.
      dataset_size: N, the divisor. Under DP this is the public dataset size, not n.
      count_feature_weight: c in (0, 1), the weight of the constant count feature.
      chunk_size: examples per compiled chunk; it bounds memory and does not change the result.

    Returns:
      M, shape (D + 1, K), float32. Row D contains c * n_k / N.
    """
    num_examples = images.shape[0]
    flat_images = np.asarray(images, np.float32).reshape((num_examples, -1))
    labels = np.asarray(labels, np.int32)
    chunk_size = max(1, min(chunk_size, num_examples))
    embedding = jnp.zeros((2 * frequencies.shape[1] + 1, num_classes), jnp.float32)
    for start in range(0, num_examples, chunk_size):
        chunk = flat_images[start : start + chunk_size]
        chunk_labels = labels[start : start + chunk_size]
        # Padding rows get label -1, whose one-hot row is all zeros, so they add nothing.
        padding = chunk_size - chunk.shape[0]
        if padding:
            chunk = np.concatenate([chunk, np.zeros((padding, chunk.shape[1]), np.float32)])
            chunk_labels = np.concatenate([chunk_labels, np.full(padding, -1, np.int32)])
        embedding += _embedding_sum(
            chunk, chunk_labels, frequencies, num_classes, float(count_feature_weight)
        )
    return embedding / dataset_size


@functools.partial(jax.jit, static_argnums=(3, 4))
def _embedding_sum(flat_images, labels, frequencies, num_classes, count_feature_weight):
    """Compute sum_i psi(x_i) onehot(y_i)^T over one chunk, shape (D + 1, K)."""
    features = _count_augmented_features(flat_images, frequencies, count_feature_weight)
    return features.T @ jax.nn.one_hot(labels, num_classes)


def _count_augmented_features(flat_images, frequencies, count_feature_weight):
    """Compute psi(x) = [sqrt(1 - c^2) phi(x), c], shape (n, D + 1), unit norm per row."""
    phi = random_fourier_features(flat_images, frequencies)
    count_column = jnp.full((phi.shape[0], 1), count_feature_weight, phi.dtype)
    return jnp.concatenate([math.sqrt(1 - count_feature_weight**2) * phi, count_column], -1)


def embedding_sensitivity(dataset_size: int) -> float:
    """Return the L2 sensitivity 1 / N of the embedding under add/remove-one (see module doc)."""
    return 1.0 / dataset_size


def embedding_noise_multiplier(privacy: PrivacySpec) -> float:
    """Calibrate the Gaussian mechanism for one release of the embedding.

    Returns:
      The smallest noise multiplier z (noise std over sensitivity) whose epsilon under
      `privacy.accountant` is at most `privacy.target_epsilon` at `privacy.target_delta`.
      The embedding's noise std is z / dataset_size.
    """
    return accounting.calibrate_noise_multiplier(
        dp_accounting.GaussianDpEvent,
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        accountant=privacy.accountant,
    )


def private_embedding(
    key: jax.Array,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    frequencies: jax.Array,
    num_classes: int,
    privacy: PrivacySpec,
    count_feature_weight: float,
    chunk_size: int = 500,
) -> tuple[jax.Array, accounting.PrivacyLedger]:
    """Release the class-conditional embedding once through the Gaussian mechanism.

    Formal guarantee: the output is (target_epsilon, target_delta)-DP under add/remove-one
    neighbours, because M has sensitivity 1 / N with N = privacy.dataset_size and the noise is
    N(0, (z / N)^2) per entry with z from `embedding_noise_multiplier`.

    Args:
      key: PRNG key used for the noise only.
      images, labels, frequencies, num_classes, count_feature_weight, chunk_size: as in
        `mean_embedding`.
      privacy: the target and the public dataset size N.

    Returns:
      (noisy embedding of shape (D + 1, K), ledger with the one stage "mean_embedding").
    """
    noise_multiplier = embedding_noise_multiplier(privacy)
    exact = mean_embedding(
        images,
        labels,
        frequencies=frequencies,
        num_classes=num_classes,
        dataset_size=privacy.dataset_size,
        count_feature_weight=count_feature_weight,
        chunk_size=chunk_size,
    )
    noise_std = noise_multiplier * embedding_sensitivity(privacy.dataset_size)
    noisy = noise.add_gaussian_noise(key, exact, stddev=noise_std)

    ledger = accounting.PrivacyLedger()
    ledger.add_stage(
        "mean_embedding",
        dp_accounting.GaussianDpEvent(noise_multiplier),
        {
            "noise_multiplier": float(noise_multiplier),
            "noise_std": float(noise_std),
            "l2_sensitivity": embedding_sensitivity(privacy.dataset_size),
            "dataset_size": int(privacy.dataset_size),
            "num_features": int(exact.shape[0] - 1),
        },
    )
    return noisy, ledger


def decode_embedding(
    embedding: jax.Array, *, count_feature_weight: float
) -> tuple[jax.Array, jax.Array]:
    """Split a (noisy) embedding into the generator's target and the class proportions.

    Args:
      embedding: shape (D + 1, K), from `mean_embedding` or `private_embedding`.
      count_feature_weight: the c it was built with.

    Returns:
      (target, class_proportions): target of shape (D, K), whose column k estimates
      (n_k / n) * mean phi(x) over class k; class_proportions of shape (K,), non-negative and
      summing to 1 (uniform if every noisy count is <= 0).
    """
    counts = embedding[-1] / count_feature_weight
    clipped_counts = jnp.clip(counts, 0.0, None)
    num_classes = counts.shape[0]
    class_proportions = jnp.where(
        clipped_counts.sum() > 0,
        clipped_counts / jnp.maximum(clipped_counts.sum(), 1e-12),
        jnp.full((num_classes,), 1.0 / num_classes),
    )
    total_mass = jnp.maximum(counts.sum(), _MIN_TOTAL_MASS)
    target = embedding[:-1] / (math.sqrt(1 - count_feature_weight**2) * total_mass)
    return target, class_proportions


def generated_embedding(
    params: Any,
    key: jax.Array,
    *,
    generator: nn.Module,
    frequencies: jax.Array,
    class_proportions: jax.Array,
    num_samples: int,
    latent_dim: int,
) -> jax.Array:
    """Embed `num_samples` generated images with labels drawn from `class_proportions`.

    Returns:
      (1 / num_samples) sum_j phi(g_j) onehot(y_j)^T, shape (D, K), differentiable in `params`.
    """
    label_key, latent_key = jax.random.split(key)
    num_classes = class_proportions.shape[0]
    labels = jax.random.categorical(label_key, jnp.log(class_proportions), shape=(num_samples,))
    latents = jax.random.normal(latent_key, (num_samples, latent_dim))
    one_hot = jax.nn.one_hot(labels, num_classes)
    images = generator.apply({"params": params}, latents, one_hot)
    phi = random_fourier_features(images.reshape((num_samples, -1)), frequencies)
    return phi.T @ one_hot / num_samples


def mmd_loss(
    params: Any,
    key: jax.Array,
    target: jax.Array,
    *,
    generator: nn.Module,
    frequencies: jax.Array,
    class_proportions: jax.Array,
    num_samples: int,
    latent_dim: int,
) -> jax.Array:
    """Compute ||target - generated embedding||_F^2, the random-feature squared MMD objective.

    Args:
      params: generator parameters.
      key: PRNG key for the generated labels and latents.
      target: shape (D, K), from `decode_embedding`.
      generator, frequencies, class_proportions, num_samples, latent_dim: as in
        `generated_embedding`.

    Returns:
      Scalar float32 loss.
    """
    generated = generated_embedding(
        params,
        key,
        generator=generator,
        frequencies=frequencies,
        class_proportions=class_proportions,
        num_samples=num_samples,
        latent_dim=latent_dim,
    )
    return jnp.sum((target - generated) ** 2)


def _generator_module(image_shape: Sequence[int], config) -> _Generator:
    return _Generator(
        image_shape=tuple(int(size) for size in image_shape),
        hidden_sizes=tuple(int(width) for width in config["hidden_sizes"]),
    )


def _frequencies(state, config) -> jax.Array:
    num_pixels = math.prod(state["image_shape"])
    return rff_frequencies(
        jax.random.wrap_key_data(state["feature_key"]),
        num_pixels=num_pixels,
        num_features=int(config["num_features"]),
        bandwidth=float(config["relative_bandwidth"]) * math.sqrt(num_pixels),
    )


def _check_config(config) -> None:
    for name in ("num_epochs", "batch_size", "num_features", "latent_dim", "embedding_chunk_size"):
        if int(config[name]) < 1:
            raise ValueError(f"{name}={config[name]} must be >= 1")
    if not config["learning_rate"] > 0:
        raise ValueError(f"learning_rate={config['learning_rate']} must be > 0")
    if not config["relative_bandwidth"] > 0:
        raise ValueError(f"relative_bandwidth={config['relative_bandwidth']} must be > 0")
    if not 0 < config["count_feature_weight"] < 1:
        raise ValueError(f"count_feature_weight={config['count_feature_weight']} must be in (0, 1)")


def init(key, *, image_shape, num_classes, config) -> dict[str, Any]:
    """Create the generator and the random-feature key.

    Returns:
      State dict: "params" (generator parameters), "feature_key" (uint32 key data of the public
      random frequencies), "class_proportions" ((K,), uniform until `fit`), and the static
      "image_shape" and "num_classes" as plain Python values.
    """
    _check_config(config)
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    params_key, feature_key = jax.random.split(key)
    generator = _generator_module(image_shape, config)
    # A jitted init compiles once, instead of dispatching every initialiser op by op.
    params = jax.jit(generator.init)(
        params_key,
        jnp.zeros((1, int(config["latent_dim"]))),
        jnp.zeros((1, num_classes)),
    )["params"]
    return {
        "params": params,
        "feature_key": jax.random.key_data(feature_key),
        "class_proportions": jnp.full((num_classes,), 1.0 / num_classes),
        "image_shape": tuple(int(size) for size in image_shape),
        "num_classes": int(num_classes),
    }


def fit(
    key, state, images, labels, *, config, privacy: PrivacySpec | None = None, progress=False
) -> FitResult:
    """Release the embedding (noisy under `privacy`) and train the generator to match it.

    Args:
      key: PRNG key for the release noise and the generator's training.
      state: from `init`.
      images: shape (n, H, W, C), float32 in [-1, 1], H, W, C as in `state`.
      labels: shape (n,), int in [0, num_classes).
      config: the family's options.
      privacy: None for the exact embedding, or the target and public dataset size.
      progress: show a tqdm bar over generator steps.

    Returns:
      `FitResult` with the trained state, the one-stage ledger (None without privacy) and
      history {"loss": squared MMD per generator step}.
    """
    _check_config(config)
    images = np.asarray(images, np.float32)
    if images.shape[1:] != state["image_shape"]:
        raise ValueError(f"images have shape {images.shape}; expected (n, *{state['image_shape']})")
    labels = _check_labels(labels, state["num_classes"])
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} rows but images has {images.shape[0]}; they must match"
        )
    release_key, train_key = jax.random.split(key)
    frequencies = _frequencies(state, config)
    weight = float(config["count_feature_weight"])

    if privacy is None:
        dataset_size = images.shape[0]
        embedding = mean_embedding(
            images,
            labels,
            frequencies=frequencies,
            num_classes=state["num_classes"],
            dataset_size=dataset_size,
            count_feature_weight=weight,
            chunk_size=int(config["embedding_chunk_size"]),
        )
        ledger = None
    else:
        dataset_size = privacy.dataset_size
        embedding, ledger = private_embedding(
            release_key,
            images,
            labels,
            frequencies=frequencies,
            num_classes=state["num_classes"],
            privacy=privacy,
            count_feature_weight=weight,
            chunk_size=int(config["embedding_chunk_size"]),
        )
    target, class_proportions = decode_embedding(embedding, count_feature_weight=weight)

    params, losses = _train_generator(
        train_key,
        state["params"],
        target,
        frequencies=frequencies,
        class_proportions=class_proportions,
        generator=_generator_module(state["image_shape"], config),
        config=config,
        num_steps=int(config["num_epochs"]) * math.ceil(dataset_size / int(config["batch_size"])),
        progress=progress,
    )
    fitted = {**state, "params": params, "class_proportions": class_proportions}
    return FitResult(state=fitted, ledger=ledger, history={"loss": losses})


def _train_generator(
    key, params, target, *, frequencies, class_proportions, generator, config, num_steps, progress
):
    """Run `num_steps` Adam steps on `mmd_loss`; return (params, loss per step)."""
    optimizer = optax.adam(float(config["learning_rate"]))
    loss_fn = functools.partial(
        mmd_loss,
        generator=generator,
        num_samples=int(config["batch_size"]),
        latent_dim=int(config["latent_dim"]),
    )

    # Target and frequencies are arguments, not closure constants, so XLA does not embed
    # megabytes of constants in the compiled step.
    @jax.jit
    def train_step(params, opt_state, step_key, target, frequencies, class_proportions):
        loss, grads = jax.value_and_grad(loss_fn)(
            params,
            step_key,
            target,
            frequencies=frequencies,
            class_proportions=class_proportions,
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for step in tqdm.trange(num_steps, disable=not progress, desc="dp_merf generator"):
        step_key = jax.random.fold_in(key, step)
        params, opt_state, loss = train_step(
            params, opt_state, step_key, target, frequencies, class_proportions
        )
        losses.append(loss)
    return params, [float(loss) for loss in losses]


@functools.partial(jax.jit, static_argnames=("generator", "latent_dim", "num_classes"))
def _generate(params, key, labels, *, generator, latent_dim, num_classes):
    latents = jax.random.normal(key, (labels.shape[0], latent_dim))
    return generator.apply({"params": params}, latents, jax.nn.one_hot(labels, num_classes))


def sample(key, state, labels, *, config) -> jax.Array:
    """Generate one image per label: latents from N(0, I) through the generator.

    Args:
      key: PRNG key; the same key, state and labels give the same images.
      state: a fitted state.
      labels: shape (n,), int in [0, num_classes).
      config: the family's options (the generator's widths and latent size).

    Returns:
      Images, shape (n, H, W, C), float32 in [-1, 1].

    Raises:
      ValueError: a label outside [0, num_classes).
    """
    labels = _check_labels(labels, state["num_classes"])
    return _generate(
        state["params"],
        key,
        jnp.asarray(labels),
        generator=_generator_module(state["image_shape"], config),
        latent_dim=int(config["latent_dim"]),
        num_classes=state["num_classes"],
    )


def _check_labels(labels, num_classes: int) -> np.ndarray:
    """Return labels as int32 after checking they are 1-D and in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (n,); got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}) for this generator; got values in"
            f" [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int32)


FAMILY = GeneratorFamily(
    name="dp_merf",
    description="DP-MERF: generator matched to a noisy random-feature mean embedding",
    default_config=DEFAULT_CONFIG,
    init=init,
    fit=fit,
    sample=sample,
    # The released state is the generator alone, which never saw an individual example: it was
    # fitted to an aggregate embedding, so there is no per-example white-box signal like a loss.
    member_scores=None,
)
