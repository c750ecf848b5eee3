"""A small class-conditional U-Net that predicts the noise of a diffusion model.

The network maps a noisy image x_t, its integer timestep t and a class label to a prediction of
the Gaussian noise that was added (Ho et al., 2020, "Denoising Diffusion Probabilistic Models").
Label `num_classes` is the extra "null" class that stands for "no label", which classifier-free
guidance needs (Ho and Salimans, 2022).

Every normalisation is GroupNorm, which normalises within one example, so per-example gradients
stay per-example under DP-SGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of `channels` that is at most `max_groups`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def sinusoidal_embedding(timesteps: jax.Array, dim: int, max_period: float = 10_000.0):
    """Embed timesteps with sines and cosines of geometrically spaced frequencies.

    Follows the positional encoding of Vaswani et al. (2017), as DDPM does for timesteps.

    Args:
      timesteps: shape (B,), int or float timesteps.
      dim: embedding width, an even number >= 2.
      max_period: the longest period, in timesteps.

    Returns:
      Shape (B, dim) float32: cos(t * f_i) in the first half, sin(t * f_i) in the second,
      with f_i = max_period ** (-i / (dim / 2)).

    Raises:
      ValueError: `dim` is odd or below 2.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim={dim} must be an even number >= 2")
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(timesteps, jnp.float32)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ResidualBlock(nn.Module):
    """Two GroupNorm-SiLU-conv stages, the second normalisation scaled and shifted by the embedding.

    The embedding sets a per-channel scale and shift after the GroupNorm ("scale-shift norm",
    Dhariwal and Nichol, 2021). Adding it before the GroupNorm instead, as the original DDPM
    does, loses most of it in narrow networks, because GroupNorm subtracts each group's mean and
    a group of this small U-Net holds only one or two channels.

    Input (B, H, W, C_in) and embedding (B, E); output (B, H, W, channels).
    """

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        h = nn.silu(nn.GroupNorm(num_groups=_num_groups(x.shape[-1]))(x))
        h = nn.Conv(self.channels, (3, 3))(h)
        scale, shift = jnp.split(nn.Dense(2 * self.channels)(nn.silu(embedding)), 2, axis=-1)
        h = nn.GroupNorm(num_groups=_num_groups(self.channels))(h)
        h = nn.silu(h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :])
        # A zero-initialised last convolution starts each block as the identity, which keeps
        # the early training of a deep residual stack stable.
        h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1))(x)
        return x + h


class UNet(nn.Module):
    """Class-conditional U-Net for epsilon prediction.

    Level i runs `num_res_blocks` residual blocks at `channels * channel_mults[i]` channels.
    Every level but the last halves the height and width with a stride-2 convolution on the
    way down. The up path mirrors it with nearest-neighbour upsampling and skip connections.

    Images whose height or width is not a multiple of 2 ** (len(channel_mults) - 1) are
    zero-padded at the bottom and right to the next multiple, and the output is cropped back.
    With the default two levels (one downsampling), 8x8, 28x28 and 32x32 need no padding; with
    three levels, 28x28 goes 28 -> 14 -> 7 and still needs none.

    Attributes:
      num_classes: number of real classes; label `num_classes` is the null class.
      channels: width of the first level.
      channel_mults: width multiplier per resolution level, 1 to 3 levels.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      embedding_dim: width of the time and class embeddings; defaults to 4 * channels.
    """

    num_classes: int
    channels: int = 32
    channel_mults: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    embedding_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, labels: jax.Array) -> jax.Array:
        """Predict the noise in `x`.

        Args:
          x: noisy images, shape (B, H, W, C), float32.
          timesteps: shape (B,), int32 in [0, num_timesteps).
          labels: shape (B,), int32 in [0, num_classes]; `num_classes` is the null class.

        Returns:
          Predicted noise, shape (B, H, W, C), float32.
        """
        if not 1 <= len(self.channel_mults) <= 3:
            raise ValueError(f"channel_mults={self.channel_mults} must have 1 to 3 levels")
        _, height, width, image_channels = x.shape
        embedding_dim = self.embedding_dim or 4 * self.channels

        time_embedding = sinusoidal_embedding(timesteps, 2 * self.channels)
        time_embedding = nn.Dense(embedding_dim)(time_embedding)
        time_embedding = nn.Dense(embedding_dim)(nn.silu(time_embedding))
        class_embedding = nn.Embed(self.num_classes + 1, embedding_dim)(labels)
        embedding = time_embedding + class_embedding

        multiple = 2 ** (len(self.channel_mults) - 1)
        pad_height, pad_width = -height % multiple, -width % multiple
        h = jnp.pad(x, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)))

        h = nn.Conv(self.channels, (3, 3))(h)
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = ResidualBlock(self.channels * mult)(h, embedding)
                skips.append(h)
            if level < len(self.channel_mults) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)

        h = ResidualBlock(h.shape[-1])(h, embedding)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResidualBlock(self.channels * mult)(h, embedding)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(h.shape[-1], (3, 3))(h)

        h = nn.silu(nn.GroupNorm(num_groups=_num_groups(h.shape[-1]))(h))
        h = nn.Conv(image_channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
        return h[:, :height, :width, :]
