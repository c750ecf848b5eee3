"""Global loss threshold attack (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting", CSF 2018).

Members tend to have a lower loss than non-members, so the score is the negated loss. Yeom et al.
threshold at the average training loss; sweeping every threshold, as `ppds_jax.metrics` does,
covers that choice. The threshold is the same for every example, which is why the attack
mistakes easy non-members for members and is weak at low FPR.
"""

from __future__ import annotations

import numpy as np


def loss_threshold(target_loss) -> np.ndarray:
    """Score each query by its negated loss on the target model, ``score = -loss``.

    Args:
      target_loss: shape (N,), the target model's per-example loss on each query, for example
        `signals.per_example_loss` of its logits.

    Returns:
      float64 scores of shape (N,), higher means "more likely a member".

    Raises:
      ValueError: target_loss is not 1-D or contains NaN or infinite values (the message
        gives the count).
    """
    target_loss = np.asarray(target_loss, dtype=np.float64)
    if target_loss.ndim != 1:
        raise ValueError(f"target_loss must have shape (N,); got {target_loss.shape}")
    num_bad = int((~np.isfinite(target_loss)).sum())
    if num_bad:
        raise ValueError(
            f"target_loss contains {num_bad} NaN or infinite value(s) out of {target_loss.size}"
        )
    return -target_loss
