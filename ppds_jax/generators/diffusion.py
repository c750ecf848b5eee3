"""Class-conditional denoising diffusion (DDPM) with DDPM and DDIM samplers.

Training follows Ho et al. (2020), "Denoising Diffusion Probabilistic Models": draw a timestep t
uniformly from {0, ..., T-1} and Gaussian noise eps, form

.. math::
    x_t = \\sqrt{\\bar\\alpha_t} \\, x_0 + \\sqrt{1 - \\bar\\alpha_t} \\, \\epsilon

and regress the U-Net's output on eps with a mean squared error. Under DP-SGD, one example's
loss averages `noise_multiplicity` independent draws of (t, eps) before its gradient is clipped
(DPDM, Dockhorn et al., 2022). The draws only ever touch that one example, so the sensitivity
stays `l2_norm_clip` and the run is accounted as the same DP-SGD steps, while the gradient's
variance drops. With probability `label_dropout` a draw uses the null class instead of its label,
which trains the unconditional model that classifier-free guidance needs (Ho and Salimans, 2022).

Sampling runs the whole reverse process inside one `lax.scan` under `jax.jit`:

- `ddpm_sample`: ancestral sampling over all T steps with the posterior variance
  beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t).
- `ddim_sample`: Song et al. (2021), "Denoising Diffusion Implicit Models", over a subsequence
  of timesteps; eta = 0 is deterministic, and eta = 1 over all T steps is the DDPM sampler.

Classifier-free guidance combines the conditional and null-class predictions as
eps = (1 + w) eps(x, t, y) - w eps(x, t, null), so w = 0 is the plain conditional model.

The family state is a dict with "params" (the U-Net's Flax "params" collection), the static
"image_shape" (H, W, C) and "num_classes" as plain Python values.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppds_jax import dp_sgd, training
from ppds_jax.generators.base import FitResult, GeneratorFamily, PrivacySpec, resolve_config
from ppds_jax.generators.unet import UNet

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLERS = ("ddim", "ddpm")
BETA_SCHEDULES = ("cosine", "linear")

DEFAULT_CONFIG: dict[str, Any] = {
    "num_epochs": 4,
    "batch_size": 128,
    "learning_rate": 2e-3,
    # U-Net
    "channels": 16,
    # Three levels take 28x28 down to 7x7 for little extra compute over two.
    "channel_mults": (1, 2, 2),
    "num_res_blocks": 1,
    # Forward process and loss
    "beta_schedule": "cosine",
    "num_timesteps": 1000,
    # DP-SGD runs gain from k > 1 draws per example at k times the compute, at no privacy cost.
    "noise_multiplicity": 1,
    "label_dropout": 0.1,
    # Sampling
    "sampler": "ddim",
    "num_sampling_steps": 50,
    "eta": 0.0,
    "guidance_scale": 1.0,
    "clip_denoised": True,
    "sampling_batch_size": 1000,
    # White-box membership signal
    "member_timestep_fractions": (0.05, 0.1, 0.2),
    "member_draws_per_timestep": 2,
    "member_noise_seed": 0,
}


class NoiseSchedule(NamedTuple):
    """Variances of the forward process q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I).

    Attributes:
      betas: shape (T,) float32, beta_t in (0, 1).
      alphas: shape (T,) float32, alpha_t = 1 - beta_t.
      alpha_bars: shape (T,) float32, alpha_bar_t = prod_{s <= t} alpha_s, decreasing.
    """

    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]


def make_schedule(kind: str, num_timesteps: int) -> NoiseSchedule:
    """Build a linear or cosine variance schedule of `num_timesteps` steps.

    - "linear" (Ho et al., 2020): beta_t linear from 1e-4 to 0.02 when T = 1000, both ends
      scaled by 1000 / T for other T so the total noise stays about the same.
    - "cosine" (Nichol and Dhariwal, 2021): alpha_bar_t = f(t + 1) / f(0) with
      f(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2).

    Betas are capped at 0.999, which avoids a singular last step.

    Raises:
      ValueError: unknown `kind`, or `num_timesteps` < 1.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={kind!r} must be one of {BETA_SCHEDULES}")
    if (
        isinstance(num_timesteps, bool)
        or not isinstance(num_timesteps, numbers.Integral)
        or num_timesteps < 1
    ):
        raise ValueError(f"num_timesteps={num_timesteps!r} must be an integer >= 1")
    if kind == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    else:
        offset = 0.008
        fractions = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((fractions + offset) / (1 + offset) * np.pi / 2) ** 2
        betas = 1.0 - f[1:] / f[:-1]
    betas = np.minimum(betas, 0.999)
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas=jnp.asarray(alphas, jnp.float32),
        alpha_bars=jnp.asarray(alpha_bars, jnp.float32),
    )


def _alpha_bar_at(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """alpha_bar_t, with alpha_bar_{-1} = 1 for the step that ends at the clean image."""
    safe = jnp.maximum(timesteps, 0)
    return jnp.where(timesteps >= 0, schedule.alpha_bars[safe], 1.0)


def add_noise(
    schedule: NoiseSchedule, images: jax.Array, timesteps: jax.Array, noise: jax.Array
) -> jax.Array:
    """Sample q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.

    Args:
      images: clean images x_0, shape (B, H, W, C) float32 in [-1, 1].
      timesteps: shape (B,) int32 in [0, T).
      noise: standard normal noise, shape (B, H, W, C).

    Returns:
      x_t, shape (B, H, W, C) float32.
    """
    alpha_bars = schedule.alpha_bars[timesteps][:, None, None, None]
    return jnp.sqrt(alpha_bars) * images + jnp.sqrt(1.0 - alpha_bars) * noise


def draw_training_noise(
    key: jax.Array,
    num_draws: int,
    *,
    image_shape: Sequence[int],
    num_timesteps: int,
    label_dropout: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw the random inputs of `num_draws` denoising problems for one example.

    The key is split into one key for the timesteps, one for the noise and one for label
    dropout, in that order.

    Returns:
      (timesteps, noise, drop_label): shapes (k,) int32 uniform in [0, T), (k, H, W, C)
      float32 standard normal, and (k,) bool, True with probability `label_dropout`.
    """
    timestep_key, noise_key, dropout_key = jax.random.split(key, 3)
    timesteps = jax.random.randint(timestep_key, (num_draws,), 0, num_timesteps)
    noise = jax.random.normal(noise_key, (num_draws, *image_shape))
    drop_label = jax.random.bernoulli(dropout_key, label_dropout, (num_draws,))
    return timesteps, noise, drop_label


def denoising_losses(
    model: UNet,
    params: Any,
    schedule: NoiseSchedule,
    images: jax.Array,
    labels: jax.Array,
    timesteps: jax.Array,
    noise: jax.Array,
) -> jax.Array:
    """Mean squared error of the predicted noise, one value per row.

    .. math::
        L_i = \\operatorname{mean}_{pixels} (\\epsilon_\\theta(x_{t_i}, t_i, y_i) - \\epsilon_i)^2

    Rows do not interact: the U-Net normalises with GroupNorm, within one row.

    Args:
      model: the U-Net module.
      params: its parameters (the "params" collection).
      images: clean images, shape (B, H, W, C) float32 in [-1, 1].
      labels: shape (B,) int32 in [0, num_classes]; `num_classes` is the null class.
      timesteps: shape (B,) int32 in [0, T).
      noise: shape (B, H, W, C) float32.

    Returns:
      Shape (B,) float32.
    """
    noisy = add_noise(schedule, images, timesteps, noise)
    predicted = model.apply({"params": params}, noisy, timesteps, labels)
    return jnp.mean((predicted - noise) ** 2, axis=(1, 2, 3))


def make_per_example_loss(
    model: UNet,
    schedule: NoiseSchedule,
    *,
    num_classes: int,
    noise_multiplicity: int,
    label_dropout: float,
) -> Callable[[Any, tuple[jax.Array, jax.Array], jax.Array], jax.Array]:
    """Build `loss(params, (image, label), key) -> scalar`, the denoising loss of one example.

    The loss averages `noise_multiplicity` denoising problems drawn by `draw_training_noise`
    from `key`, and a draw whose `drop_label` is True uses the null class `num_classes`. Only
    `image` and `label` enter the loss, so under DP-SGD the clipped gradient is that one
    example's, and the k draws cost no extra privacy.

    Args:
      image: shape (H, W, C) float32 in [-1, 1].
      label: int32 scalar in [0, num_classes).
      key: this example's PRNG key.
    """

    def loss(params, example, key):
        image, label = example
        timesteps, noise, drop_label = draw_training_noise(
            key,
            noise_multiplicity,
            image_shape=image.shape,
            num_timesteps=schedule.num_timesteps,
            label_dropout=label_dropout,
        )
        labels = jnp.where(drop_label, num_classes, jnp.asarray(label, jnp.int32))
        images = jnp.broadcast_to(image, noise.shape)
        losses = denoising_losses(model, params, schedule, images, labels, timesteps, noise)
        return jnp.mean(losses)

    return loss


def _predict_clean_image(
    eps_fn: EpsFn, x: jax.Array, t: jax.Array, alpha_bar: jax.Array, clip_denoised: bool
) -> tuple[jax.Array, jax.Array]:
    """Estimate x_0 from x_t, and the noise that is consistent with that estimate.

    When x_0 is clipped to [-1, 1], the noise is recomputed from the clipped x_0, so DDPM and
    DDIM steps see the same pair and stay equal at eta = 1.
    """
    eps = eps_fn(x, t)
    clean = (x - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
    if clip_denoised:
        clean = jnp.clip(clean, -1.0, 1.0)
        eps = (x - jnp.sqrt(alpha_bar) * clean) / jnp.sqrt(1.0 - alpha_bar)
    return clean, eps


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T - 1 down to 0, shape (num_steps,) int32, all distinct.

    Raises:
      ValueError: `num_steps` outside [1, num_timesteps].
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_sampling_steps={num_steps} must be in [1, {num_timesteps}]")
    return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def ddim_step(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x: jax.Array,
    t: jax.Array,
    s: jax.Array,
    key: jax.Array,
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> jax.Array:
    """Take one DDIM step (Song et al., 2021) from timestep t down to timestep s < t.

    With x_0 and eps estimated from x_t by `eps_fn`, and alpha_bar_{-1} = 1:

    .. math::
        \\sigma = \\eta \\sqrt{(1 - \\bar\\alpha_s) / (1 - \\bar\\alpha_t)}
                  \\sqrt{1 - \\bar\\alpha_t / \\bar\\alpha_s}, \\quad
        x_s = \\sqrt{\\bar\\alpha_s} x_0 + \\sqrt{1 - \\bar\\alpha_s - \\sigma^2} \\epsilon
              + \\sigma z

    Args:
      eps_fn: `eps_fn(x, t) -> eps`, t an int32 scalar.
      x: x_t, shape (B, H, W, C) float32.
      t: int32 scalar in [0, T).
      s: int32 scalar in [-1, t); -1 ends at the clean image.
      key: PRNG key of z.
      eta: 0 for the deterministic sampler, 1 for DDPM's variance; in [0, 1].
      clip_denoised: clip the x_0 estimate to [-1, 1].

    Returns:
      x_s, shape (B, H, W, C) float32.
    """
    alpha_bar = schedule.alpha_bars[t]
    alpha_bar_prev = _alpha_bar_at(schedule, s)
    clean, eps = _predict_clean_image(eps_fn, x, t, alpha_bar, clip_denoised)
    sigma = (
        eta
        * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    )
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
    z = jax.random.normal(key, x.shape)
    return jnp.sqrt(alpha_bar_prev) * clean + direction + sigma * z


def ddim_sample(
    key: jax.Array,
    eps_fn: EpsFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    num_steps: int,
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> jax.Array:
    """Run the DDIM sampler from pure noise, all steps in one `lax.scan`.

    Steps `ddim_step` through consecutive timesteps t > s of `ddim_timesteps(T, num_steps)`,
    and from the last one to s = -1.

    Args:
      key: split into the initial-noise key and one key per step,
        `init_key, loop_key = split(key)` and `step_keys = split(loop_key, num_steps)`.
      eps_fn: `eps_fn(x, t) -> eps`, x of `shape`, t an int32 scalar.
      shape: (B, H, W, C).
      num_steps: number of denoising steps, in [1, T].
      eta: 0 for the deterministic sampler, 1 for DDPM's variance; in [0, 1].
      clip_denoised: clip each x_0 estimate to [-1, 1].

    Returns:
      Images of `shape`, float32 clipped to [-1, 1]. Call it under `jax.jit`.

    Raises:
      ValueError: `eta` outside [0, 1] or `num_steps` outside [1, T].
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1]")
    timesteps = ddim_timesteps(schedule.num_timesteps, num_steps)
    previous = np.append(timesteps[1:], -1).astype(np.int32)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, tuple(shape))

    def step(x, inputs):
        t, s, step_key = inputs
        x = ddim_step(eps_fn, schedule, x, t, s, step_key, eta=eta, clip_denoised=clip_denoised)
        return x, None

    step_keys = jax.random.split(loop_key, num_steps)
    x, _ = jax.lax.scan(step, x, (jnp.asarray(timesteps), jnp.asarray(previous), step_keys))
    return jnp.clip(x, -1.0, 1.0)


def ddpm_sample(
    key: jax.Array,
    eps_fn: EpsFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    clip_denoised: bool = True,
) -> jax.Array:
    """Run DDPM ancestral sampling (Ho et al., 2020) over all T steps, in one `lax.scan`.

    Each step draws x_{t-1} from the Gaussian posterior q(x_{t-1} | x_t, x_0) at the estimated
    x_0:

    .. math::
        \\mu = \\frac{\\sqrt{\\bar\\alpha_{t-1}} \\beta_t}{1 - \\bar\\alpha_t} x_0
             + \\frac{\\sqrt{\\alpha_t} (1 - \\bar\\alpha_{t-1})}{1 - \\bar\\alpha_t} x_t, \\quad
        \\tilde\\beta_t = \\frac{1 - \\bar\\alpha_{t-1}}{1 - \\bar\\alpha_t} \\beta_t

    Keys are split as in `ddim_sample`, so `ddim_sample(..., num_steps=T, eta=1)` with the same
    key returns the same images up to rounding.

    Args:
      key: split into the initial-noise key and one key per step.
      eps_fn: `eps_fn(x, t) -> eps`, x of `shape`, t an int32 scalar.
      shape: (B, H, W, C).
      clip_denoised: clip each x_0 estimate to [-1, 1].

    Returns:
      Images of `shape`, float32 clipped to [-1, 1]. Call it under `jax.jit`.
    """
    num_timesteps = schedule.num_timesteps
    timesteps = np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, tuple(shape))

    def step(x, inputs):
        t, step_key = inputs
        beta, alpha, alpha_bar = schedule.betas[t], schedule.alphas[t], schedule.alpha_bars[t]
        alpha_bar_prev = _alpha_bar_at(schedule, t - 1)
        clean, _ = _predict_clean_image(eps_fn, x, t, alpha_bar, clip_denoised)
        mean = (
            jnp.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar) * clean
            + jnp.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * x
        )
        variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        z = jax.random.normal(step_key, x.shape)
        return mean + jnp.sqrt(variance) * z, None

    step_keys = jax.random.split(loop_key, num_timesteps)
    x, _ = jax.lax.scan(step, x, (jnp.asarray(timesteps), step_keys))
    return jnp.clip(x, -1.0, 1.0)


def guided_eps_fn(
    model: UNet, params: Any, labels: jax.Array, *, num_classes: int, guidance_scale: float
) -> EpsFn:
    """Build the classifier-free guided noise predictor for a batch of `labels`.

    eps = (1 + w) eps(x, t, y) - w eps(x, t, null) with w = `guidance_scale`; for w = 0 the
    null-class pass is skipped. Otherwise both passes share one U-Net call on 2B rows.

    Args:
      labels: shape (B,) int32 in [0, num_classes).

    Returns:
      `eps_fn(x, t)`, x shape (B, H, W, C) and t an int32 scalar.
    """

    def eps_fn(x, t):
        timesteps = jnp.full((x.shape[0],), t, jnp.int32)
        if guidance_scale == 0:
            return model.apply({"params": params}, x, timesteps, labels)
        null_labels = jnp.full_like(labels, num_classes)
        both = model.apply(
            {"params": params},
            jnp.concatenate([x, x]),
            jnp.concatenate([timesteps, timesteps]),
            jnp.concatenate([labels, null_labels]),
        )
        conditional, unconditional = jnp.split(both, 2)
        return (1.0 + guidance_scale) * conditional - guidance_scale * unconditional

    return eps_fn


def _check_int(config: dict[str, Any], name: str, minimum: int) -> None:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_config(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Merge `overrides` into the defaults and validate every value.

    Raises:
      ValueError: an unknown option (named, from `resolve_config`) or a value out of range.
    """
    config = resolve_config(FAMILY, overrides)
    for name in (
        "batch_size",
        "channels",
        "num_res_blocks",
        "noise_multiplicity",
        "num_sampling_steps",
        "sampling_batch_size",
        "member_draws_per_timestep",
    ):
        _check_int(config, name, 1)
    _check_int(config, "num_timesteps", 2)
    _check_int(config, "member_noise_seed", 0)
    if not config["num_epochs"] > 0:
        raise ValueError(f"num_epochs={config['num_epochs']!r} must be > 0")
    if not config["learning_rate"] > 0:
        raise ValueError(f"learning_rate={config['learning_rate']!r} must be > 0")
    mults = tuple(config["channel_mults"])
    if not 1 <= len(mults) <= 3 or not all(isinstance(m, int) and m >= 1 for m in mults):
        raise ValueError(f"channel_mults={mults!r} must be 1 to 3 integers >= 1")
    if config["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={config['beta_schedule']!r} must be in {BETA_SCHEDULES}")
    if not 0.0 <= config["label_dropout"] < 1.0:
        raise ValueError(f"label_dropout={config['label_dropout']!r} must be in [0, 1)")
    if config["sampler"] not in SAMPLERS:
        raise ValueError(f"sampler={config['sampler']!r} must be one of {SAMPLERS}")
    if config["num_sampling_steps"] > config["num_timesteps"]:
        raise ValueError(
            f"num_sampling_steps={config['num_sampling_steps']} must be in "
            f"[1, num_timesteps={config['num_timesteps']}]"
        )
    if not 0.0 <= config["eta"] <= 1.0:
        raise ValueError(f"eta={config['eta']!r} must be in [0, 1]")
    if not config["guidance_scale"] >= 0.0:
        raise ValueError(f"guidance_scale={config['guidance_scale']!r} must be >= 0")
    if not isinstance(config["clip_denoised"], bool):
        raise ValueError(f"clip_denoised={config['clip_denoised']!r} must be True or False")
    fractions = tuple(config["member_timestep_fractions"])
    if not fractions or not all(0.0 <= f < 1.0 for f in fractions):
        raise ValueError(
            f"member_timestep_fractions={fractions!r} must be a non-empty sequence in [0, 1)"
        )
    return {**config, "channel_mults": mults, "member_timestep_fractions": fractions}


def _unet(config: dict[str, Any], num_classes: int) -> UNet:
    return UNet(
        num_classes=num_classes,
        channels=config["channels"],
        channel_mults=config["channel_mults"],
        num_res_blocks=config["num_res_blocks"],
    )


def _check_labels(labels: Any, num_classes: int) -> np.ndarray:
    """Labels as an (n,) int32 array.

    Raises:
      ValueError: not one-dimensional, or a value outside [0, num_classes).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (n,), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}) for this generator (num_classes="
            f"{num_classes}); got values in [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int32)


def _check_images(images: Any, labels: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.shape[1:] != image_shape or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images must have shape (n, {', '.join(map(str, image_shape))}) with n = "
            f"len(labels) = {labels.shape[0]}, got {images.shape}"
        )
    return images


def init(
    key: jax.Array, *, image_shape: Sequence[int], num_classes: int, config: dict[str, Any]
) -> dict[str, Any]:
    """Create U-Net parameters for images of `image_shape` (H, W, C) and `num_classes` labels.

    Returns:
      {"params": U-Net parameters, "image_shape": (H, W, C), "num_classes": int}.

    Raises:
      ValueError: an invalid option, an image shape that is not (H, W, C), or num_classes < 1.
    """
    config = _check_config(config)
    image_shape = tuple(int(size) for size in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape={image_shape} must be (H, W, C) with positive sizes")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    params = _init_params(key, _unet(config, num_classes), image_shape)
    return {"params": params, "image_shape": image_shape, "num_classes": num_classes}


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def _init_params(key: jax.Array, model: UNet, image_shape: tuple[int, ...]) -> Any:
    # Under jit, XLA drops the traced forward pass because only the parameters are returned.
    # Eager init would instead compile each of its operations one by one, which is slower.
    images = jnp.zeros((1, *image_shape), jnp.float32)
    zeros = jnp.zeros((1,), jnp.int32)
    return model.init(key, images, zeros, zeros)["params"]


def make_family_loss(state: dict[str, Any], config: dict[str, Any]):
    """Build the per-example training loss of `state`'s U-Net under `config`.

    Equal options give the same loss object, so that `training.fit` reuses its compiled steps
    across the target and shadow fits of an experiment.
    """
    config = _check_config(config)
    return _training_functions(state["num_classes"], _frozen(config))[0]


def _frozen(config: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


@functools.lru_cache(maxsize=16)
def _training_functions(num_classes: int, frozen_config: tuple):
    # One loss and optimizer object per configuration. Building them afresh for every fit
    # compiled the U-Net's steps again each time, and `training.fit`'s step cache kept up to
    # 32 of those compilations alive.
    config = dict(frozen_config)
    loss = make_per_example_loss(
        _unet(config, num_classes),
        make_schedule(config["beta_schedule"], config["num_timesteps"]),
        num_classes=num_classes,
        noise_multiplicity=config["noise_multiplicity"],
        label_dropout=config["label_dropout"],
    )
    return loss, optax.adam(config["learning_rate"])


def make_dp_config(privacy: PrivacySpec, config: dict[str, Any]) -> dp_sgd.DpSgdConfig:
    """Calibrate DP-SGD for `privacy` over num_epochs * dataset_size / batch_size steps.

    Only public numbers enter: `privacy.dataset_size` (never the realised count), the
    expected batch size and the number of epochs.
    """
    config = _check_config(config)
    num_steps = max(1, round(config["num_epochs"] * privacy.dataset_size / config["batch_size"]))
    return dp_sgd.make_dp_sgd_config(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        dataset_size=privacy.dataset_size,
        batch_size=config["batch_size"],
        num_steps=num_steps,
        l2_norm_clip=privacy.l2_norm_clip,
        accountant=privacy.accountant,
    )


def fit(
    key: jax.Array,
    state: dict[str, Any],
    images: Any,
    labels: Any,
    *,
    config: dict[str, Any],
    privacy: PrivacySpec | None = None,
    progress: bool = False,
) -> FitResult:
    """Train the denoiser with Adam, with DP-SGD when `privacy` is given.

    Without privacy, it runs round(num_epochs * N / batch_size) steps on shuffled batches. With
    privacy, it runs round(num_epochs * privacy.dataset_size / batch_size) DP-SGD steps with
    Poisson sampling at rate batch_size / privacy.dataset_size, and the noise multiplier
    calibrated to (target_epsilon, target_delta) for that many steps. `noise_multiplicity`
    does not change the accounting, because its draws stay inside one example's loss.

    Args:
      key: PRNG key for batches, noise draws and DP noise.
      state: from `init`.
      images: (N, H, W, C) float32 in [-1, 1].
      labels: (N,) int32 in [0, num_classes).
      config: options, merged into `DEFAULT_CONFIG`.
      privacy: None for non-private training.
      progress: show a tqdm bar.

    Returns:
      FitResult with the trained state, a ledger with one stage "diffusion_dp_sgd" (or None
      without privacy) and history {"loss": per-step mean training loss}.

    NOTE: the state holds the last parameters, not an exponential moving average of them as
    DDPM samples from, because `training.fit` returns only the final parameters.

    Raises:
      ValueError: an invalid option, or images and labels that do not match the state.
    """
    config = _check_config(config)
    labels = _check_labels(labels, state["num_classes"])
    images = _check_images(images, labels, state["image_shape"])
    loss, optimizer = _training_functions(state["num_classes"], _frozen(config))

    dp_config, ledger = None, None
    if privacy is None:
        num_steps = max(1, round(config["num_epochs"] * len(images) / config["batch_size"]))
    else:
        dp_config = make_dp_config(privacy, config)
        num_steps = dp_config.num_steps
        ledger = dp_sgd.make_ledger(
            "diffusion_dp_sgd", dp_config, noise_multiplicity=config["noise_multiplicity"]
        )

    params, stats = training.fit(
        key,
        state["params"],
        per_example_loss=loss,
        data=(images, labels),
        optimizer=optimizer,
        num_steps=num_steps,
        batch_size=min(config["batch_size"], len(images)),
        dp=dp_config,
        progress=progress,
        progress_desc="diffusion" if privacy is None else "dp-diffusion",
    )
    history = {"loss": [float(value) for value in np.asarray(stats.loss)]}
    return FitResult(state={**state, "params": params}, ledger=ledger, history=history)


def make_sampler(
    config: dict[str, Any], *, image_shape: Sequence[int], num_classes: int
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """Build the jit-compiled sampler `run(params, key, labels) -> images` of `config`.

    The whole reverse process of one batch, guidance included, is one compiled program. The
    result is cached per setting, so repeated calls reuse its compilations.

    Args:
      config: options, merged into `DEFAULT_CONFIG`.
      image_shape: (H, W, C).
      num_classes: number of real classes of the U-Net.

    Returns:
      `run(params, key, labels)`, labels (B,) int32 in [0, num_classes) and images
      (B, H, W, C) float32 in [-1, 1]. Labels are not range-checked inside the program.
    """
    config = _check_config(config)
    return _compiled_sampler(
        _unet(config, num_classes),
        tuple(image_shape),
        config["beta_schedule"],
        config["num_timesteps"],
        config["sampler"],
        config["num_sampling_steps"],
        float(config["eta"]),
        float(config["guidance_scale"]),
        config["clip_denoised"],
    )


@functools.lru_cache(maxsize=16)
def _compiled_sampler(
    model: UNet,
    image_shape: tuple[int, ...],
    beta_schedule: str,
    num_timesteps: int,
    sampler: str,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    clip_denoised: bool,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    schedule = make_schedule(beta_schedule, num_timesteps)

    def run(params, key, labels):
        eps_fn = guided_eps_fn(
            model, params, labels, num_classes=model.num_classes, guidance_scale=guidance_scale
        )
        shape = (labels.shape[0], *image_shape)
        if sampler == "ddpm":
            return ddpm_sample(key, eps_fn, shape, schedule, clip_denoised=clip_denoised)
        return ddim_sample(
            key, eps_fn, shape, schedule, num_steps=num_steps, eta=eta, clip_denoised=clip_denoised
        )

    return jax.jit(run)


def sample(
    key: jax.Array, state: dict[str, Any], labels: Any, *, config: dict[str, Any]
) -> np.ndarray:
    """Draw one image per label with the configured sampler and guidance scale.

    `sampler` "ddim" runs `num_sampling_steps` DDIM steps with `eta`; "ddpm" runs all
    `num_timesteps` ancestral steps. Labels are processed in the fewest equal chunks of at most
    `sampling_batch_size`, each chunk with key `fold_in(key, chunk_index)`; the last chunk is
    padded so that one compiled program serves every chunk. The same key, labels and
    `sampling_batch_size` give the same images.

    Args:
      key: PRNG key.
      state: from `init` or `fit`.
      labels: (n,) int32 in [0, num_classes).
      config: options, merged into `DEFAULT_CONFIG`.

    Returns:
      (n, H, W, C) float32 in [-1, 1].

    Raises:
      ValueError: an invalid option, or a label outside [0, num_classes).
    """
    config = _check_config(config)
    labels = _check_labels(labels, state["num_classes"])
    image_shape = state["image_shape"]
    if labels.size == 0:
        return np.zeros((0, *image_shape), np.float32)
    run = make_sampler(config, image_shape=image_shape, num_classes=state["num_classes"])
    # Equal chunks of at most sampling_batch_size: 1,024 labels run as two chunks of 512, not
    # as 1,000 plus 24 padded to 1,000, which would sample nearly twice the images asked for.
    num_chunks = -(-labels.size // config["sampling_batch_size"])
    chunk_size = -(-labels.size // num_chunks)
    chunks = []
    for chunk_index, start in enumerate(range(0, labels.size, chunk_size)):
        chunk_labels = labels[start : start + chunk_size]
        padded = np.pad(chunk_labels, (0, chunk_size - chunk_labels.size))
        images = run(state["params"], jax.random.fold_in(key, chunk_index), jnp.asarray(padded))
        chunks.append(np.asarray(images)[: chunk_labels.size])
    return np.concatenate(chunks)


def member_timesteps(config: dict[str, Any]) -> np.ndarray:
    """Timesteps of the membership signal, each fraction times T repeated per draw, (k,) int32."""
    config = _check_config(config)
    timesteps = [int(f * config["num_timesteps"]) for f in config["member_timestep_fractions"]]
    return np.repeat(np.asarray(timesteps, np.int32), config["member_draws_per_timestep"])


def member_scores(
    key: jax.Array,
    state: dict[str, Any],
    images: Any,
    labels: Any,
    *,
    config: dict[str, Any],
) -> np.ndarray:
    """White-box membership signal: minus the conditional denoising loss, averaged over draws.

    Each example is noised at the timesteps of `member_timesteps(config)` with noise drawn from
    `member_noise_seed`. Every example and every model gets the same noise at the same draw, so
    scores from a target and its shadow models are comparable. `key` is not used, because
    the noise must not depend on the caller's key. Training members tend to have a lower loss
    (Carlini et al., 2023, "Extracting Training Data from Diffusion Models"), so a higher
    score means more likely a member.

    Args:
      images: (n, H, W, C) float32 in [-1, 1].
      labels: (n,) int32 in [0, num_classes).

    Returns:
      (n,) float32.
    """
    del key
    config = _check_config(config)
    labels = _check_labels(labels, state["num_classes"])
    images = _check_images(images, labels, state["image_shape"])
    num_timesteps = len(member_timesteps(config))
    score_chunk = _member_score_function(
        state["num_classes"], tuple(state["image_shape"]), _frozen(config)
    )
    chunk_size = max(1, min(config["sampling_batch_size"] // num_timesteps, len(labels)))
    scores = []
    for start in range(0, len(labels), chunk_size):
        chunk_labels = labels[start : start + chunk_size]
        padding = chunk_size - chunk_labels.size
        chunk_images = np.pad(images[start : start + chunk_size], ((0, padding),) + ((0, 0),) * 3)
        chunk_scores = score_chunk(
            state["params"], chunk_images, np.pad(chunk_labels, (0, padding))
        )
        scores.append(np.asarray(chunk_scores)[: chunk_labels.size])
    return np.concatenate(scores).astype(np.float32) if scores else np.zeros((0,), np.float32)


@functools.lru_cache(maxsize=16)
def _member_score_function(num_classes: int, image_shape: tuple[int, ...], frozen_config: tuple):
    # Cached per configuration, so the target and shadow generators share one compilation.
    config = dict(frozen_config)
    timesteps = jnp.asarray(member_timesteps(config))
    noise = jax.random.normal(
        jax.random.key(config["member_noise_seed"]), (timesteps.shape[0], *image_shape)
    )
    model = _unet(config, num_classes)
    schedule = make_schedule(config["beta_schedule"], config["num_timesteps"])

    @jax.jit
    def score_chunk(params, chunk_images, chunk_labels):
        def score_one(image, label):
            repeated = jnp.broadcast_to(image, noise.shape)
            labels = jnp.full(timesteps.shape, label, jnp.int32)
            losses = denoising_losses(model, params, schedule, repeated, labels, timesteps, noise)
            return -jnp.mean(losses)

        return jax.vmap(score_one)(chunk_images, chunk_labels)

    return score_chunk


FAMILY = GeneratorFamily(
    name="diffusion",
    description="class-conditional DDPM (small U-Net), DDIM/DDPM samplers, DPDM-style DP-SGD",
    default_config=DEFAULT_CONFIG,
    init=init,
    fit=fit,
    sample=sample,
    member_scores=member_scores,
)
