"""The interface every generator family implements.

A family is a bundle of pure functions over an explicit state pytree (its parameters). The
pipeline only talks to families through this interface, so adding a family means writing one
module that builds a `GeneratorFamily` and registering it in `ppds_jax.generators`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

Config = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class PrivacySpec:
    """What a DP generator must achieve, and the public facts it may use to get there.

    Attributes:
      target_epsilon: epsilon of the whole release, all stages composed; > 0.
      target_delta: delta of the whole release; at most 0.1 / dataset_size.
      dataset_size: the public dataset size used for sampling probabilities and accounting
        (the expected number of members, never the realised count).
      l2_norm_clip: per-example clip norm C for DP-SGD stages.
      accountant: 'pld' or 'rdp', the accountant used to calibrate noise. The ledger reports
        both either way.
    """

    target_epsilon: float
    target_delta: float
    dataset_size: int
    l2_norm_clip: float = 1.0
    accountant: str = "pld"

    def __post_init__(self):
        if not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon={self.target_epsilon} must be > 0")
        if self.dataset_size < 1:
            raise ValueError(f"dataset_size={self.dataset_size} must be >= 1")
        if not 0 < self.target_delta <= 0.1 / self.dataset_size:
            raise ValueError(
                f"target_delta={self.target_delta} must be in (0, 0.1 / dataset_size] ="
                f" (0, {0.1 / self.dataset_size:.3g}] for dataset_size={self.dataset_size}"
            )
        if not self.l2_norm_clip > 0:
            raise ValueError(f"l2_norm_clip={self.l2_norm_clip} must be > 0")
        if self.accountant not in ("pld", "rdp"):
            raise ValueError(f"accountant={self.accountant!r} must be 'pld' or 'rdp'")


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Output of `GeneratorFamily.fit`.

    Attributes:
      state: pytree with everything `sample` and `member_scores` need.
      ledger: `ppds_jax.accounting.PrivacyLedger` of every stage that touched the training data,
        or None for a non-private fit.
      history: training curves, for example {"loss": [...]} with one value per step or epoch.
    """

    state: Any
    ledger: Any | None
    history: dict[str, list[float]]


@dataclasses.dataclass(frozen=True)
class GeneratorFamily:
    """A class-conditional generator family as pure functions.

    Attributes:
      name: registry name, for example "vae".
      description: one line for `--help` and reports.
      default_config: every option the family accepts, with its default. Durations carry their
        unit in the name (`num_epochs`, `num_steps`).
      init: `init(key, *, image_shape, num_classes, config) -> state`.
      fit: `fit(key, state, images, labels, *, config, privacy, progress) -> FitResult`, where
        images are (N, H, W, C) float32 in [-1, 1], labels (N,) int32, privacy a `PrivacySpec`
        or None, and progress a bool that shows a tqdm bar.
      sample: `sample(key, state, labels, *, config) -> images`, labels (n,) int32, images
        (n, H, W, C) float32 in [-1, 1]. The sampling loop is jit-compiled.
      member_scores: white-box attack signal on a released generator,
        `member_scores(key, state, images, labels, *, config) -> (n,) float32`, higher means
        more likely a member; None when the family has no white-box signal.
    """

    name: str
    description: str
    default_config: Config
    init: Callable[..., Any]
    fit: Callable[..., FitResult]
    sample: Callable[..., jax.Array | np.ndarray]
    member_scores: Callable[..., np.ndarray] | None = None


def resolve_config(family: GeneratorFamily, overrides: Config | None) -> dict[str, Any]:
    """Merge `overrides` into the family's defaults.

    Raises:
      ValueError: an option the family does not accept, naming it and the accepted ones.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(family.default_config))
    if unknown:
        raise ValueError(
            f"generator {family.name!r} does not accept option(s) {unknown}; "
            f"accepted: {sorted(family.default_config)}"
        )
    return {**family.default_config, **overrides}
