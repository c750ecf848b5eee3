"""The experiment configuration shared by the presets in `experiments/configs/`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ppds_jax import datasets
from ppds_jax.pipeline import PipelineSpec


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines an experiment's results.

    Attributes:
      dataset: registry name in `ppds_jax.datasets.DATASETS`.
      pool_size: number of training-split examples that can be members (a seeded subset of the
        training split); None uses the whole split.
      test_size: number of test-split examples used for accuracy; None uses the whole split.
      population_size: real non-member examples the attacker holds (RMIA's population samples,
        DOMIAS's reference set), taken from outside the pool.
      num_shadows: shadow pipelines per variant, even and >= 4.
      seed: seed of the pool subset, membership masks and every PRNG key.
      target_delta: delta of every private release.
      l2_norm_clip: per-example clip norm of every DP-SGD stage.
      inclusion_prob: probability that a pool example is a member of a given pipeline.
      pipelines: the variants to run; each runs on the target mask and on every shadow mask.
      data_dir: folder with the dataset's local files, or None for the default.
      description: one line for the report.
    """

    dataset: str
    pipelines: tuple[PipelineSpec, ...]
    pool_size: int | None = None
    test_size: int | None = None
    population_size: int = 1000
    num_shadows: int = 4
    seed: int = 0
    target_delta: float = 1e-5
    l2_norm_clip: float = 1.0
    inclusion_prob: float = 0.5
    data_dir: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.dataset not in datasets.DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; known datasets: {sorted(datasets.DATASETS)}"
            )
        if not self.pipelines:
            raise ValueError("an experiment needs at least one pipeline")
        names = [spec.name for spec in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline names must be unique; got {names}")
        if self.num_shadows < 4 or self.num_shadows % 2:
            raise ValueError(
                f"num_shadows={self.num_shadows} must be even and >= 4: LiRA with per-example"
                " variances needs every example in at least 2 shadows and out of 2, which the"
                " balanced masks of an even number of shadows guarantee"
            )
        if self.pool_size is not None and self.pool_size < 4:
            raise ValueError(f"pool_size={self.pool_size} must be >= 4")
        if not 0 < self.inclusion_prob < 1:
            raise ValueError(f"inclusion_prob={self.inclusion_prob} must be in (0, 1)")
        if not self.l2_norm_clip > 0:
            raise ValueError(f"l2_norm_clip={self.l2_norm_clip} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, written as config.json."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def fingerprint(self) -> str:
        """Short hash of everything that affects results, to detect a changed config."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_epsilons(
    specs: tuple[PipelineSpec, ...], epsilons: tuple[float, ...]
) -> tuple[PipelineSpec, ...]:
    """Add a private copy of every variant for each epsilon, named `{name}_eps{epsilon:g}`."""
    private = tuple(
        dataclasses.replace(spec, name=f"{spec.name}_eps{epsilon:g}", epsilon=epsilon)
        for epsilon in epsilons
        for spec in specs
        if spec.epsilon is None
    )
    return specs + private
