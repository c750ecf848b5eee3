"""Per-example gradient clipping for DP-SGD.

`clipped_grad_sum` turns a per-example loss into a function that returns the sum of clipped
per-example gradients of a padded batch, together with diagnostics. Noise, sampling and
accounting live in their own modules; `ppds_jax.dp_sgd` combines them.

Formal guarantee: for any parameters, key and mask, each example's contribution to the sum has
L2 norm at most `l2_norm_clip` (over the whole parameter pytree), and masked or non-finite
rows contribute exactly zero. Adding or removing one example therefore changes the sum by at
most `l2_norm_clip` in L2 norm, which is the sensitivity the Gaussian mechanism is calibrated to.

Edge cases:

| input | behaviour |
|---|---|
| `l2_norm_clip = inf` | no clipping; each valid row contributes its raw gradient |
| `l2_norm_clip <= 0` or NaN | `ValueError` when the function is built |
| gradient norm 0 | contributes zero, not counted as clipped |
| non-finite gradient (1) | contributes zero, counted in `num_nonfinite`, norm reported as inf |
| `mask[i] = False` (padding) | contributes zero, norm reported as 0, not counted anywhere |
| all rows masked | returns zeros |

(1) NaN or inf in any entry of the row's gradient, or a squared norm that overflows float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PerExampleLoss = Callable[[Any, tuple, jax.Array], jax.Array]


class ClipStats(NamedTuple):
    """Diagnostics of one clipped batch.

    Attributes:
      norms: (B,) float32, L2 norm of each example's gradient over the whole pytree before
        clipping; 0 for masked rows and inf for non-finite rows.
      num_clipped: int32 scalar, valid rows that were scaled down (any leaf, in per-layer mode).
      num_nonfinite: int32 scalar, unmasked rows whose gradient was not finite; they
        contribute zero.
      losses: (B,) float32, each example's loss as computed (possibly NaN); 0 for masked rows.
        A diagnostic of the private data, not privatised.
    """

    norms: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array
    losses: jax.Array


def _validate_clip(l2_norm_clip: float) -> None:
    if not l2_norm_clip > 0:
        raise ValueError(f"{l2_norm_clip=} must be > 0 (use inf for no clipping)")


def _scale_factor(norms: jax.Array, clip: float) -> tuple[jax.Array, jax.Array]:
    """min(1, clip / norm) without dividing by zero or forming inf / inf; also `norm > clip`."""
    clipped = norms > clip
    safe_norms = jnp.where(clipped, norms, 1.0)
    return jnp.where(clipped, clip / safe_norms, 1.0), clipped


def _weighted_row_sum(weights: jax.Array, valid: jax.Array, leaf: jax.Array) -> jax.Array:
    """sum_i weights[i] * leaf[i] over rows where valid[i]; invalid rows give exactly zero."""
    shaped_valid = jnp.reshape(valid, (-1,) + (1,) * (leaf.ndim - 1))
    leaf = jnp.where(shaped_valid, leaf, 0.0)
    return jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)


def _clip_and_sum(
    per_example_grads: Any,
    losses: jax.Array,
    mask: jax.Array,
    *,
    l2_norm_clip: float,
    per_layer: bool,
) -> tuple[Any, ClipStats]:
    """Clip stacked per-example gradients (leaves (B, ...)) and sum them over rows."""
    leaves, treedef = jax.tree.flatten(per_example_grads)
    sq_norms = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in leaves]
    norms = jnp.sqrt(sum(sq_norms))
    finite = jnp.isfinite(norms)
    valid = mask & finite

    if per_layer:
        leaf_clip = l2_norm_clip / math.sqrt(len(leaves))
        summed, any_clipped = [], jnp.zeros_like(mask)
        for g, sq in zip(leaves, sq_norms, strict=True):
            factor, clipped = _scale_factor(jnp.sqrt(sq), leaf_clip)
            any_clipped = any_clipped | clipped
            summed.append(_weighted_row_sum(factor, valid, g))
    else:
        factor, any_clipped = _scale_factor(norms, l2_norm_clip)
        summed = [_weighted_row_sum(factor, valid, g) for g in leaves]

    stats = ClipStats(
        norms=jnp.where(mask, jnp.where(finite, norms, jnp.inf), 0.0),
        num_clipped=jnp.sum(valid & any_clipped, dtype=jnp.int32),
        num_nonfinite=jnp.sum(mask & ~finite, dtype=jnp.int32),
        losses=jnp.where(mask, losses, 0.0),
    )
    return jax.tree.unflatten(treedef, summed), stats


def clipped_grad_sum(
    per_example_loss: PerExampleLoss,
    *,
    l2_norm_clip: float,
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> Callable[[Any, tuple, jax.Array, jax.Array], tuple[Any, ClipStats]]:
    """Build a function returning the sum of clipped per-example gradients.

    For examples x_i with mask m_i and gradient g_i = d loss(params, x_i, key_i) / d params,

    .. math::
        S = \\sum_i m_i \\, [g_i \\text{ finite}] \\, g_i \\min(1, C / \\lVert g_i \\rVert_2)

    where the norm runs over every leaf of the parameter pytree. With `per_layer=True` each leaf
    l is clipped on its own to C / sqrt(L) for L leaves, so the concatenated clipped gradient
    still has norm at most C and the sensitivity of S stays C.

    Args:
      per_example_loss: `loss(params, example, key) -> scalar`, where `example` is a tuple of
        single-example arrays and `key` that example's PRNG key.
      l2_norm_clip: clip norm C > 0; `math.inf` disables clipping.
      per_layer: clip leaf by leaf to C / sqrt(num_leaves) instead of globally to C.
      microbatch_size: if set, per-example gradients are computed `microbatch_size` rows at a
        time inside `lax.scan`, which bounds memory to that many gradient copies. The batch
        size must be a multiple of it.

    Returns:
      `fn(params, batch, mask, key) -> (clipped_sum, ClipStats)`, jittable. `batch` is a tuple
      of arrays with a shared leading axis B, `mask` is (B,) bool and `key` is split into one
      key per example (row i always gets the same key for a given `key`, with or without
      micro-batching). `clipped_sum` has the structure and dtypes of `params`.

    Raises:
      ValueError: `l2_norm_clip` is not > 0, `microbatch_size` is not >= 1, or (when called)
        B is not a multiple of `microbatch_size`.
    """
    _validate_clip(l2_norm_clip)
    if microbatch_size is not None and microbatch_size < 1:
        raise ValueError(f"{microbatch_size=} must be >= 1 or None")
    grad_fn = jax.vmap(jax.value_and_grad(per_example_loss), in_axes=(None, 0, 0))

    def clip_chunk(params, batch, mask, keys):
        losses, grads = grad_fn(params, batch, keys)
        return _clip_and_sum(grads, losses, mask, l2_norm_clip=l2_norm_clip, per_layer=per_layer)

    def fn(params, batch, mask, key):
        batch = tuple(batch)
        batch_size = mask.shape[0]
        keys = jax.random.split(key, batch_size)
        if microbatch_size is None or microbatch_size >= batch_size:
            return clip_chunk(params, batch, mask, keys)
        if batch_size % microbatch_size:
            raise ValueError(f"batch size {batch_size} must be a multiple of {microbatch_size=}")
        num_chunks = batch_size // microbatch_size

        def split_rows(x):
            return jnp.reshape(x, (num_chunks, microbatch_size) + x.shape[1:])

        chunks = (tuple(split_rows(x) for x in batch), split_rows(mask), split_rows(keys))

        def body(total, chunk):
            chunk_sum, stats = clip_chunk(params, *chunk)
            return jax.tree.map(jnp.add, total, chunk_sum), stats

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, stats = jax.lax.scan(body, zeros, chunks)
        return total, ClipStats(
            norms=jnp.reshape(stats.norms, (batch_size,)),
            num_clipped=jnp.sum(stats.num_clipped),
            num_nonfinite=jnp.sum(stats.num_nonfinite),
            losses=jnp.reshape(stats.losses, (batch_size,)),
        )

    return fn
