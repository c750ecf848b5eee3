"""Conditional DCGAN-style GAN, and DP-GAN with DP-SGD on the discriminator.

Generator: (latent, one-hot label) -> dense layer to an (H/4, W/4) grid -> two blocks of
nearest-neighbour upsampling and 3x3 convolution with GroupNorm -> 3x3 convolution -> tanh.
It supports any H and W divisible by 4, so 8x8x1 digits, 28x28x1 Fashion-MNIST and 32x32x3
CIFAR-10. The generator never reads private data, so its normalisation is free to choose.

Discriminator: two stride-2 3x3 convolutions with leaky ReLU and no normalisation, then a
projection head (Miyato and Koyama, 2018): logit = w^T h + e_y^T h for the flattened features h
and a learned class embedding e_y. Without BatchNorm each example's logit depends on that
example alone, which per-example clipping requires.

Loss: the non-saturating GAN loss (Goodfellow et al., 2014) on logits. Row i of a batch pairs
real example i with one fake sample, and its discriminator loss is
softplus(-D(x_i, y_i)) + softplus(D(G(z_i, c_i), c_i)). The generator loss is
softplus(-D(G(z, c), c)). It was chosen over WGAN-GP because it needs no extra critic steps,
which matters when every discriminator step costs privacy. A WGAN-GP penalty would also fit
the per-row scheme below, because it differentiates D at an interpolate of one real and one
fake image and so is itself a per-example term.

DP-GAN: only the discriminator reads private data, so only its steps run DP-SGD. Each step
Poisson-samples real examples, clips each row's gradient of the loss above to `l2_norm_clip`,
adds Gaussian noise once and divides by the expected batch size. Why this row loss is sound:

- The fake latent z_i and label c_i are drawn independently of the data (c_i uniform over
  classes), so the fake term of row i is a function of public parameters and public randomness.
  Row i's gradient thus depends on private data only through (x_i, y_i).
- The whole row is clipped, so whatever the fake term contributes, row i changes the clipped
  sum by at most `l2_norm_clip`. Adding or removing example i adds or removes exactly one row
  (padded rows, fake term included, contribute zero), so the sensitivity is `l2_norm_clip`,
  which is what `dp_sgd.dp_sgd_event` assumes.

The generator step uses only the (already privatised) discriminator's output on fresh fakes
with uniform labels, so it is post-processing and costs no privacy. The ledger therefore has
one stage, "dp_sgd", covering the discriminator's steps.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ppds_jax import batch_selection, clipping, dp_sgd
from ppds_jax.generators.base import FitResult, GeneratorFamily, PrivacySpec

DEFAULT_CONFIG = {
    "num_epochs": 5,
    "batch_size": 64,
    # 1e-3 gave better DP-GAN samples than 2e-4 or 5e-4 in 5-epoch Fashion-MNIST trials.
    "learning_rate": 1e-3,
    # Adam's first-moment decay; 0.5 is the usual DCGAN setting and damps oscillations.
    "adam_b1": 0.5,
    "latent_dim": 32,
    # Channels of the generator's first upsampling block. The dense layer before it has twice
    # as many and the last block half as many, which keeps the full-resolution conv cheap.
    "generator_width": 32,
    # Channels of the discriminator's second convolution; the first has half as many.
    "discriminator_width": 32,
}

_LEAKY_SLOPE = 0.2


def _groups(channels: int, max_groups: int = 8) -> int:
    """Return the largest divisor of `channels` that is at most `max_groups`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class Generator(nn.Module):
    """Conditional generator: latents (B, latent_dim) and one-hot labels (B, K) to images.

    The output has shape (B, H, W, C), values in [-1, 1].
    """

    image_shape: tuple[int, int, int]
    width: int

    @nn.compact
    def __call__(self, latents: jax.Array, one_hot: jax.Array) -> jax.Array:
        height, width, channels = self.image_shape
        base_channels = 2 * self.width
        h = jnp.concatenate([latents, one_hot], axis=-1)
        h = nn.Dense((height // 4) * (width // 4) * base_channels)(h)
        h = h.reshape((latents.shape[0], height // 4, width // 4, base_channels))
        h = nn.relu(nn.GroupNorm(num_groups=_groups(base_channels))(h))
        for block_channels in (self.width, max(self.width // 2, 1)):
            batch, block_height, block_width, depth = h.shape
            h = jax.image.resize(h, (batch, 2 * block_height, 2 * block_width, depth), "nearest")
            h = nn.Conv(block_channels, (3, 3))(h)
            h = nn.relu(nn.GroupNorm(num_groups=_groups(block_channels))(h))
        return nn.tanh(nn.Conv(channels, (3, 3))(h))


class Discriminator(nn.Module):
    """Conditional projection discriminator: (images (B, H, W, C), labels (B,)) -> logits (B,).

    No normalisation layer, so each logit depends on its own example only.
    """

    num_classes: int
    width: int

    @nn.compact
    def __call__(self, images: jax.Array, labels: jax.Array) -> jax.Array:
        h = images
        for channels in (self.width // 2, self.width):
            h = nn.Conv(max(channels, 1), (3, 3), strides=(2, 2))(h)
            h = nn.leaky_relu(h, _LEAKY_SLOPE)
        h = h.reshape((h.shape[0], -1))
        class_embedding = nn.Embed(self.num_classes, h.shape[-1])(labels)
        return nn.Dense(1)(h)[:, 0] + jnp.sum(class_embedding * h, axis=-1)


def discriminator_row_loss(
    discriminator_params: Any,
    example: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    key: jax.Array | None = None,
    *,
    discriminator: Discriminator,
) -> jax.Array:
    """Compute one row's non-saturating discriminator loss: real example paired with a fake.

    Args:
      discriminator_params: the discriminator's parameters.
      example: (real image (H, W, C), real label (), fake image (H, W, C), fake label ()). The
        fake image and label are public: fresh generator output with a data-independent label.
      key: unused, accepted for the `per_example_loss(params, example, key)` contract.
      discriminator: the module.

    Returns:
      softplus(-D(x, y)) + softplus(D(fake, c)), a scalar.
    """
    del key
    real_image, real_label, fake_image, fake_label = example
    images = jnp.stack([real_image, fake_image])
    labels = jnp.stack([real_label, fake_label])
    real_logit, fake_logit = discriminator.apply({"params": discriminator_params}, images, labels)
    return jax.nn.softplus(-real_logit) + jax.nn.softplus(fake_logit)


def generator_loss(
    generator_params: Any,
    discriminator_params: Any,
    key: jax.Array,
    *,
    generator: Generator,
    discriminator: Discriminator,
    num_samples: int,
    latent_dim: int,
    num_classes: int,
) -> jax.Array:
    """Compute the non-saturating generator loss mean softplus(-D(G(z, c), c)), c uniform.

    It reads only the discriminator's parameters, never the data.
    """
    fake_images, fake_labels = generate_fakes(
        generator_params,
        key,
        generator=generator,
        num_samples=num_samples,
        latent_dim=latent_dim,
        num_classes=num_classes,
    )
    logits = discriminator.apply({"params": discriminator_params}, fake_images, fake_labels)
    return jnp.mean(jax.nn.softplus(-logits))


def generate_fakes(
    generator_params: Any,
    key: jax.Array,
    *,
    generator: Generator,
    num_samples: int,
    latent_dim: int,
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
    """Draw fake images whose labels are uniform over classes, independent of any data.

    Returns:
      (images (num_samples, H, W, C) in [-1, 1], labels (num_samples,) int32).
    """
    label_key, latent_key = jax.random.split(key)
    labels = jax.random.randint(label_key, (num_samples,), 0, num_classes)
    latents = jax.random.normal(latent_key, (num_samples, latent_dim))
    one_hot = jax.nn.one_hot(labels, num_classes)
    images = generator.apply({"params": generator_params}, latents, one_hot)
    return images, labels


def discriminator_clipped_grad_sum(
    params: Any,
    key: jax.Array,
    real_images: jax.Array,
    real_labels: jax.Array,
    mask: jax.Array,
    *,
    generator: Generator,
    discriminator: Discriminator,
    latent_dim: int,
    num_classes: int,
    l2_norm_clip: float,
) -> tuple[Any, clipping.ClipStats]:
    """Sum the clipped per-row discriminator gradients of one chunk of a Poisson batch.

    Row i pairs real example i with fake i, drawn by `generate_fakes` from the first half of
    `jax.random.split(key)`; the second half keys the per-row losses. Each row's gradient
    (real and fake term together) is clipped to `l2_norm_clip`, so the sum changes by at most
    `l2_norm_clip` when one real example is added or removed, and masked rows contribute zero.

    Args:
      params: {"generator", "discriminator"} parameters.
      key: PRNG key for the fakes and the per-row keys.
      real_images: shape (B, H, W, C), float32 in [-1, 1].
      real_labels: shape (B,), int32.
      mask: shape (B,), bool; False marks padding rows.
      generator, discriminator, latent_dim, num_classes: the models and their sizes.
      l2_norm_clip: clip norm C > 0.

    Returns:
      (clipped gradient sum with the structure of params["discriminator"], `ClipStats`).
    """
    fake_key, loss_key = jax.random.split(key)
    fake_images, fake_labels = generate_fakes(
        params["generator"],
        fake_key,
        generator=generator,
        num_samples=mask.shape[0],
        latent_dim=latent_dim,
        num_classes=num_classes,
    )
    row_loss = functools.partial(discriminator_row_loss, discriminator=discriminator)
    clipped_sum_fn = clipping.clipped_grad_sum(row_loss, l2_norm_clip=l2_norm_clip)
    batch = (real_images, real_labels, fake_images, fake_labels)
    return clipped_sum_fn(params["discriminator"], batch, mask, loss_key)


def _modules(state, config) -> tuple[Generator, Discriminator]:
    return (
        Generator(image_shape=state["image_shape"], width=int(config["generator_width"])),
        Discriminator(num_classes=state["num_classes"], width=int(config["discriminator_width"])),
    )


def _check_config(config) -> None:
    for name in ("num_epochs", "batch_size", "latent_dim", "generator_width"):
        if int(config[name]) < 1:
            raise ValueError(f"{name}={config[name]} must be >= 1")
    if int(config["discriminator_width"]) < 2:
        raise ValueError(f"discriminator_width={config['discriminator_width']} must be >= 2")
    if not config["learning_rate"] > 0:
        raise ValueError(f"learning_rate={config['learning_rate']} must be > 0")
    if not 0 <= config["adam_b1"] < 1:
        raise ValueError(f"adam_b1={config['adam_b1']} must be in [0, 1)")


def init(key, *, image_shape, num_classes, config) -> dict[str, Any]:
    """Create generator and discriminator parameters.

    Returns:
      State dict: "params" ({"generator", "discriminator"}), and the static "image_shape" and
      "num_classes" as plain Python values.

    Raises:
      ValueError: H or W not divisible by 4, or an option outside its range.
    """
    _check_config(config)
    image_shape = tuple(int(size) for size in image_shape)
    if len(image_shape) != 3 or image_shape[0] % 4 or image_shape[1] % 4:
        raise ValueError(f"image_shape={image_shape} must be (H, W, C) with H and W divisible by 4")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    state = {"image_shape": image_shape, "num_classes": int(num_classes)}
    generator, discriminator = _modules(state, config)
    generator_key, discriminator_key = jax.random.split(key)
    latents = jnp.zeros((1, int(config["latent_dim"])))
    # Jitted inits compile once, instead of dispatching every initialiser op by op.
    generator_params = jax.jit(generator.init)(generator_key, latents, jnp.zeros((1, num_classes)))
    discriminator_params = jax.jit(discriminator.init)(
        discriminator_key, jnp.zeros((1, *image_shape)), jnp.zeros((1,), jnp.int32)
    )
    params = {
        "generator": generator_params["params"],
        "discriminator": discriminator_params["params"],
    }
    return {**state, "params": params}


def _optimizer(config) -> optax.GradientTransformation:
    return optax.adam(float(config["learning_rate"]), b1=float(config["adam_b1"]))


# The options that the jitted steps close over.
_STEP_OPTIONS = ("generator_width", "discriminator_width", "latent_dim", "learning_rate", "adam_b1")


@functools.lru_cache(maxsize=16)
def _step_functions(image_shape, num_classes, step_options, batch_size, l2_norm_clip):
    """Build the jitted steps once per configuration, so shadow GANs reuse their compilations.

    `l2_norm_clip` is None for non-private training, which needs no clipped-gradient step.
    """
    config = dict(step_options)
    generator, discriminator = _modules(
        {"image_shape": image_shape, "num_classes": num_classes}, config
    )
    optimizer = _optimizer(config)
    models = dict(
        generator=generator,
        discriminator=discriminator,
        latent_dim=int(config["latent_dim"]),
        num_classes=num_classes,
    )
    steps = {
        "optimizer": optimizer,
        "generator_update": jax.jit(
            functools.partial(generator_step, optimizer=optimizer, num_samples=batch_size, **models)
        ),
    }
    if l2_norm_clip is None:
        steps["discriminator_update"] = jax.jit(
            functools.partial(discriminator_step, optimizer=optimizer, **models)
        )
    else:
        steps["chunk_clipped_sum"] = jax.jit(
            functools.partial(discriminator_clipped_grad_sum, l2_norm_clip=l2_norm_clip, **models)
        )
    return steps


def fit(
    key, state, images, labels, *, config, privacy: PrivacySpec | None = None, progress=False
) -> FitResult:
    """Train the GAN; under `privacy`, the discriminator's steps run DP-SGD.

    Each step is one discriminator update on a batch of real examples paired with fakes, then
    one generator update. Without privacy the real batches come from a shuffle per epoch and
    the discriminator gradient is the batch mean. With privacy the batches are Poisson samples
    with probability batch_size / dataset_size (the public size), and there are
    num_epochs * ceil(dataset_size / batch_size) steps in both cases.

    Args:
      key: PRNG key for batches, fakes and noise.
      state: from `init`.
      images: shape (n, H, W, C), float32 in [-1, 1].
      labels: shape (n,), int in [0, num_classes).
      config: the family's options.
      privacy: None, or the target, the public dataset size and the clip norm.
      progress: show a tqdm bar over steps.

    Returns:
      `FitResult` with the trained state, the one-stage ledger ("dp_sgd", None without privacy)
      and history {"discriminator_loss", "generator_loss"}, one value per step. Under privacy
      the discriminator loss is the mean over the realised batch, a diagnostic that is not
      privatised.
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

    dataset_size = privacy.dataset_size if privacy is not None else images.shape[0]
    batch_size = int(config["batch_size"])
    if batch_size > dataset_size:
        raise ValueError(f"batch_size={batch_size} must be <= dataset_size={dataset_size}")
    num_steps = int(config["num_epochs"]) * math.ceil(dataset_size / batch_size)
    steps = _step_functions(
        tuple(state["image_shape"]),
        state["num_classes"],
        tuple(sorted((k, config[k]) for k in _STEP_OPTIONS)),
        batch_size,
        None if privacy is None else float(privacy.l2_norm_clip),
    )
    optimizer, generator_update = steps["optimizer"], steps["generator_update"]

    if privacy is None:
        params, history = _fit_non_private(
            key,
            state["params"],
            images,
            labels,
            optimizer=optimizer,
            discriminator_update=steps["discriminator_update"],
            generator_update=generator_update,
            num_steps=num_steps,
            batch_size=batch_size,
            progress=progress,
        )
        return _fit_result(state, params, None, history)

    dp_config = dp_sgd.make_dp_sgd_config(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        dataset_size=privacy.dataset_size,
        batch_size=batch_size,
        num_steps=num_steps,
        l2_norm_clip=privacy.l2_norm_clip,
        accountant=privacy.accountant,
    )
    params, history = _fit_private(
        key,
        state["params"],
        images,
        labels,
        optimizer=optimizer,
        chunk_clipped_sum=steps["chunk_clipped_sum"],
        generator_update=generator_update,
        dp_config=dp_config,
        progress=progress,
    )
    return _fit_result(state, params, dp_sgd.make_ledger("dp_sgd", dp_config), history)


def discriminator_loss(
    params: Any,
    key: jax.Array,
    real_images: jax.Array,
    real_labels: jax.Array,
    *,
    generator: Generator,
    discriminator: Discriminator,
    latent_dim: int,
    num_classes: int,
) -> jax.Array:
    """Compute the mean row loss of a real batch, each row paired with a fresh fake.

    Args:
      params: {"generator", "discriminator"} parameters.
      key: PRNG key for the fakes (`generate_fakes`).
      real_images: shape (B, H, W, C), float32 in [-1, 1].
      real_labels: shape (B,), int32.
      generator, discriminator, latent_dim, num_classes: the models and their sizes.

    Returns:
      Mean over rows of `discriminator_row_loss`, a scalar; it is differentiable in
      params["discriminator"] and treats the fakes as constants.
    """
    fake_images, fake_labels = generate_fakes(
        jax.lax.stop_gradient(params["generator"]),
        key,
        generator=generator,
        num_samples=real_images.shape[0],
        latent_dim=latent_dim,
        num_classes=num_classes,
    )
    batch = (real_images, real_labels, fake_images, fake_labels)
    row_loss = functools.partial(discriminator_row_loss, discriminator=discriminator)
    return jnp.mean(jax.vmap(row_loss, in_axes=(None, 0))(params["discriminator"], batch))


def discriminator_step(
    params: Any,
    opt_state: Any,
    key: jax.Array,
    real_images: jax.Array,
    real_labels: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    generator: Generator,
    discriminator: Discriminator,
    latent_dim: int,
    num_classes: int,
) -> tuple[Any, Any, jax.Array]:
    """Take one non-private optimizer step on `discriminator_loss`.

    Returns:
      (params with the discriminator updated, its new optimizer state, the loss before the step).
    """

    def loss_fn(discriminator_params):
        return discriminator_loss(
            {**params, "discriminator": discriminator_params},
            key,
            real_images,
            real_labels,
            generator=generator,
            discriminator=discriminator,
            latent_dim=latent_dim,
            num_classes=num_classes,
        )

    loss, grads = jax.value_and_grad(loss_fn)(params["discriminator"])
    updates, opt_state = optimizer.update(grads, opt_state, params["discriminator"])
    discriminator_params = optax.apply_updates(params["discriminator"], updates)
    return {**params, "discriminator": discriminator_params}, opt_state, loss


def generator_step(
    params: Any,
    opt_state: Any,
    key: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    generator: Generator,
    discriminator: Discriminator,
    num_samples: int,
    latent_dim: int,
    num_classes: int,
) -> tuple[Any, Any, jax.Array]:
    """Take one optimizer step on `generator_loss`; it reads no data, only the discriminator.

    Returns:
      (params with the generator updated, its new optimizer state, the loss before the step).
    """
    loss_fn = functools.partial(
        generator_loss,
        generator=generator,
        discriminator=discriminator,
        num_samples=num_samples,
        latent_dim=latent_dim,
        num_classes=num_classes,
    )
    loss, grads = jax.value_and_grad(loss_fn)(params["generator"], params["discriminator"], key)
    updates, opt_state = optimizer.update(grads, opt_state, params["generator"])
    generator_params = optax.apply_updates(params["generator"], updates)
    return {**params, "generator": generator_params}, opt_state, loss


def _fit_non_private(
    key,
    params,
    images,
    labels,
    *,
    optimizer,
    discriminator_update,
    generator_update,
    num_steps,
    batch_size,
    progress,
):
    """Alternate mean-gradient discriminator steps on shuffled batches and generator steps."""
    d_opt_state = optimizer.init(params["discriminator"])
    g_opt_state = optimizer.init(params["generator"])
    order_key, step_key = jax.random.split(key)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(order_key)).ravel())
    order = np.empty(0, dtype=np.int64)
    history = {"discriminator_loss": [], "generator_loss": []}
    for step in tqdm.trange(num_steps, disable=not progress, desc="gan"):
        if order.size < batch_size:
            order = np.concatenate([order, rng.permutation(images.shape[0])])
        batch, order = order[:batch_size], order[batch_size:]
        fake_key, generator_key = jax.random.split(jax.random.fold_in(step_key, step))
        params, d_opt_state, d_loss = discriminator_update(
            params, d_opt_state, fake_key, images[batch], labels[batch]
        )
        params, g_opt_state, g_loss = generator_update(params, g_opt_state, generator_key)
        history["discriminator_loss"].append(d_loss)
        history["generator_loss"].append(g_loss)
    return params, history


def _fit_private(
    key,
    params,
    images,
    labels,
    *,
    optimizer,
    chunk_clipped_sum,
    generator_update,
    dp_config,
    progress,
):
    """Alternate DP-SGD discriminator steps and (post-processing) generator steps."""

    @jax.jit
    def discriminator_update(params, opt_state, noise_key, clipped_sum):
        grads = dp_sgd.noisy_gradient(noise_key, clipped_sum, dp_config)
        updates, opt_state = optimizer.update(grads, opt_state, params["discriminator"])
        discriminator_params = optax.apply_updates(params["discriminator"], updates)
        return {**params, "discriminator": discriminator_params}, opt_state

    d_opt_state = optimizer.init(params["discriminator"])
    g_opt_state = optimizer.init(params["generator"])
    sampler_key, step_key = jax.random.split(key)
    batches = batch_selection.poisson_batches(
        seed=int(jax.random.randint(sampler_key, (), 0, np.iinfo(np.int32).max)),
        dataset_size=images.shape[0],
        sampling_prob=dp_config.sampling_prob,
        num_steps=dp_config.num_steps,
        physical_batch_size=dp_config.physical_batch_size,
    )
    rows = dp_config.physical_batch_size
    history = {"discriminator_loss": [], "generator_loss": []}
    progress_bar = tqdm.tqdm(batches, total=dp_config.num_steps, disable=not progress, desc="gan")
    for step, poisson_batch in enumerate(progress_bar):
        chunk_key, noise_key, generator_key = jax.random.split(
            jax.random.fold_in(step_key, step), 3
        )
        # The clipped sums of all chunks are added first and noised once, as accounted.
        clipped_sum, loss_sum = None, 0.0
        for chunk in range(poisson_batch.num_chunks):
            chunk_rows = slice(chunk * rows, (chunk + 1) * rows)
            indices = poisson_batch.indices[chunk_rows]
            chunk_sum, stats = chunk_clipped_sum(
                params,
                jax.random.fold_in(chunk_key, chunk),
                images[indices],
                labels[indices],
                poisson_batch.mask[chunk_rows],
            )
            if clipped_sum is None:
                clipped_sum = chunk_sum
            else:
                clipped_sum = jax.tree.map(jnp.add, clipped_sum, chunk_sum)
            loss_sum += stats.losses.sum()
        params, d_opt_state = discriminator_update(params, d_opt_state, noise_key, clipped_sum)
        params, g_opt_state, g_loss = generator_update(params, g_opt_state, generator_key)
        history["discriminator_loss"].append(loss_sum / max(poisson_batch.size, 1))
        history["generator_loss"].append(g_loss)
    return params, history


def _fit_result(state, params, ledger, history) -> FitResult:
    """Package the trained parameters, with the history moved to Python floats."""
    history = {name: [float(value) for value in values] for name, values in history.items()}
    return FitResult(state={**state, "params": params}, ledger=ledger, history=history)


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
      config: the family's options (widths and latent size).

    Returns:
      Images, shape (n, H, W, C), float32 in [-1, 1].

    Raises:
      ValueError: a label outside [0, num_classes).
    """
    labels = _check_labels(labels, state["num_classes"])
    generator, _ = _modules(state, config)
    return _generate(
        state["params"]["generator"],
        key,
        jnp.asarray(labels),
        generator=generator,
        latent_dim=int(config["latent_dim"]),
        num_classes=state["num_classes"],
    )


@functools.partial(jax.jit, static_argnames="discriminator")
def _discriminator_logits(params, images, labels, *, discriminator):
    return discriminator.apply({"params": params}, images, labels)


def member_scores(key, state, images, labels, *, config, batch_size: int = 1024) -> np.ndarray:
    """White-box signal: the discriminator's logit D(x, y) on each query.

    The discriminator was trained to score training members as real, so a higher logit means
    more likely a member. This assumes the released state includes the discriminator's
    parameters (it does here: `state["params"]["discriminator"]`). If only the generator were
    released, this signal would not exist and a black-box attack on samples would be needed.

    Args:
      key: unused; the score is deterministic.
      state: a fitted state.
      images: shape (n, H, W, C), float32 in [-1, 1].
      labels: shape (n,), int in [0, num_classes).
      config: the family's options.
      batch_size: queries per forward pass; it bounds memory only.

    Returns:
      Scores, shape (n,), float32.
    """
    del key
    labels = _check_labels(labels, state["num_classes"])
    _, discriminator = _modules(state, config)
    images = np.asarray(images, np.float32)
    scores = [
        _discriminator_logits(
            state["params"]["discriminator"],
            images[start : start + batch_size],
            labels[start : start + batch_size],
            discriminator=discriminator,
        )
        for start in range(0, images.shape[0], batch_size)
    ]
    if not scores:
        return np.zeros((0,), np.float32)
    return np.asarray(jnp.concatenate(scores), dtype=np.float32)


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
    name="gan",
    description="Conditional DCGAN-style GAN; DP-GAN runs DP-SGD on the discriminator",
    default_config=DEFAULT_CONFIG,
    init=init,
    fit=fit,
    sample=sample,
    member_scores=member_scores,
)
