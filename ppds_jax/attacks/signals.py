"""Per-example attack signals computed from a classifier's logits.

All three functions take logits of shape (..., N, C) and integer labels of shape (N,), or of any
shape that broadcasts against the logits without the class axis. One call thus handles a target
model (N, C) or a stack of K shadow models (K, N, C). They compute in float64 with
log-sum-exp, so confident predictions neither overflow nor round to probability 1.
"""

from __future__ import annotations

import numpy as np
import scipy.special


def _true_class_logits(logits, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return logits float64 (..., N, C), labels (..., N) and true-class logits (..., N)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (..., N, C); got {logits.shape}")
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"logits have {num_classes} class(es); need at least 2")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
    try:
        labels = np.broadcast_to(labels, logits.shape[:-1])
    except ValueError:
        raise ValueError(
            f"labels of shape {labels.shape} do not broadcast to logits {logits.shape} without"
            " the class axis"
        ) from None
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]"
        )
    true_logits = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return logits, labels, true_logits


def logit_confidence(logits, labels) -> np.ndarray:
    """Logit-scaled confidence of the true class, LiRA's signal.

    .. math::
      \\phi = \\log \\frac{p_y}{1 - p_y}
            = z_y - \\log \\sum_{j \\ne y} e^{z_j}

    where p = softmax(z). The right-hand form stays exact when p_y rounds to 1 in floating point
    (Carlini et al., "Membership Inference Attacks From First Principles", 2022).

    Args:
      logits: shape (..., N, C), C >= 2.
      labels: int, shape (N,) or broadcastable to (..., N), values in [0, C).

    Returns:
      float64 array of shape (..., N).

    Raises:
      ValueError: fewer than 2 classes, non-integer labels, labels out of range, or shapes
        that do not broadcast.

    Example:
      >>> float(logit_confidence([[2.0, 0.0]], [0])[0])
      2.0
    """
    logits, labels, true_logits = _true_class_logits(logits, labels)
    # Mask the true class by its index, not its value, so a tie with another class stays in.
    is_true_class = np.arange(logits.shape[-1]) == labels[..., None]
    other_logits = np.where(is_true_class, -np.inf, logits)
    return true_logits - scipy.special.logsumexp(other_logits, axis=-1)


def true_class_probability(logits, labels) -> np.ndarray:
    """Softmax probability of the true class, ``p_y = exp(z_y - logsumexp(z))``, RMIA's signal.

    Args:
      logits: shape (..., N, C), C >= 2.
      labels: int, shape (N,) or broadcastable to (..., N), values in [0, C).

    Returns:
      float64 array of shape (..., N) in [0, 1].

    Raises:
      ValueError: as in `logit_confidence`.
    """
    logits, _, true_logits = _true_class_logits(logits, labels)
    return np.exp(true_logits - scipy.special.logsumexp(logits, axis=-1))


def per_example_loss(logits, labels) -> np.ndarray:
    """Cross-entropy of each example, ``logsumexp(z) - z_y`` (natural log).

    This is the attack signal computed from released logits. It is unrelated to the
    `per_example_loss(params, example, key)` callables that the training loop differentiates.

    Args:
      logits: shape (..., N, C), C >= 2.
      labels: int, shape (N,) or broadcastable to (..., N), values in [0, C).

    Returns:
      float64 array of shape (..., N), >= 0.

    Raises:
      ValueError: as in `logit_confidence`.
    """
    logits, _, true_logits = _true_class_logits(logits, labels)
    return scipy.special.logsumexp(logits, axis=-1) - true_logits
