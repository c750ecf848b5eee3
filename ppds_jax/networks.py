"""Flax image classifiers that are safe for per-example gradients.

Every normalisation here is GroupNorm, which normalises within one example. BatchNorm mixes the
examples of a batch, so a per-example gradient would depend on other examples and the DP-SGD
sensitivity analysis would no longer hold; `check_no_batch_norm` rejects such models.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of `channels` that is at most `max_groups`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class CNN(nn.Module):
    """Small convolutional classifier: conv blocks with GroupNorm, then a dense head.

    Input (B, H, W, C) float32 in [-1, 1]; output logits (B, num_classes). Works for any
    H, W >= 2 ** len(features) (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR-10).
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, images: jax.Array, return_features: bool = False):
        """Return logits (B, num_classes), or (logits, features (B, hidden)) if asked."""
        x = images
        for width in self.features:
            x = nn.Conv(width, (3, 3))(x)
            x = nn.GroupNorm(num_groups=_groups(width))(x)
            x = nn.relu(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        features = nn.relu(nn.Dense(self.hidden)(x))
        logits = nn.Dense(self.num_classes)(features)
        return (logits, features) if return_features else logits


class _WideBlock(nn.Module):
    width: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(nn.GroupNorm(num_groups=_groups(x.shape[-1], 16))(x))
        shortcut = x
        if x.shape[-1] != self.width or self.strides != 1:
            shortcut = nn.Conv(self.width, (1, 1), strides=self.strides, use_bias=False)(y)
        y = nn.Conv(self.width, (3, 3), strides=self.strides, use_bias=False)(y)
        y = nn.relu(nn.GroupNorm(num_groups=_groups(self.width, 16))(y))
        y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
        return shortcut + y


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-width with GroupNorm (Zagoruyko and Komodakis, 2016).

    depth = 6 * blocks_per_stage + 4; WRN-16-4 has 2 blocks per stage and widths 64/128/256.
    Input (B, H, W, C); output logits (B, num_classes).
    """

    num_classes: int
    depth: int = 16
    width_factor: int = 4

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"depth={self.depth} must be 6 * n + 4, for example 16 or 28")
        blocks_per_stage = (self.depth - 4) // 6
        x = nn.Conv(16, (3, 3), use_bias=False)(images)
        for stage, base_width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _WideBlock(base_width * self.width_factor, strides)(x)
        x = nn.relu(nn.GroupNorm(num_groups=_groups(x.shape[-1], 16))(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def check_no_batch_norm(module: nn.Module, sample_input: jax.Array) -> None:
    """Raise if `module` carries batch statistics, which DP-SGD cannot use.

    Raises:
      ValueError: the module creates a `batch_stats` collection (BatchNorm or similar), whose
        output for one example depends on the other examples in the batch, so per-example
        clipping would not bound its sensitivity. Use GroupNorm or LayerNorm instead.
    """
    variables = jax.eval_shape(module.init, jax.random.key(0), sample_input)
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise ValueError(
            f"{type(module).__name__} has variable collections {extra} besides 'params'; "
            "a cross-example layer such as BatchNorm breaks per-example clipping in DP-SGD, "
            "so replace it with GroupNorm or LayerNorm"
        )
