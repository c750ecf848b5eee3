"""One run of a release pipeline on one membership mask.

A pipeline variant trains either a classifier on the real members (the baseline, optionally
with DP-SGD) or a generator on the members, samples a synthetic set from it, and trains a
classifier on that set. Target and shadow pipelines call the same function with different
member sets, so the attacks calibrate on exactly the code that produced the target.

`collect_signals` then records what an attacker observes of each release on every pool example:
the released classifier's logits, the nearest-neighbour distance and density ratio of the
released synthetic set, and the released generator's white-box score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ppds_jax import classifier, generators, sampling
from ppds_jax.attacks import density, distance
from ppds_jax.generators.base import PrivacySpec


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """One pipeline variant.

    Attributes:
      name: unique label used in file names and reports, for example "vae_eps10".
      generator: registry name of the generator family, or None for a classifier trained on the
        real members.
      epsilon: target epsilon of the private stage (the generator's training when `generator` is
        set, else the classifier's), or None for a non-private variant.
      generator_config: options overriding the family's defaults.
      classifier_config: options overriding `classifier.DEFAULT_CONFIG`.
      synthetic_multiplier: synthetic set size as a multiple of the public expected member
        count.
      class_weights: class proportions of the synthetic set; None means balanced.
    """

    name: str
    generator: str | None = None
    epsilon: float | None = None
    generator_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    classifier_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    synthetic_multiplier: float = 1.0
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon={self.epsilon} of pipeline {self.name!r} must be > 0")
        if not self.synthetic_multiplier > 0:
            raise ValueError(
                f"synthetic_multiplier={self.synthetic_multiplier} of pipeline {self.name!r}"
                " must be > 0"
            )
        if self.generator is not None:
            generators.get_family(self.generator)

    @property
    def releases(self) -> tuple[str, ...]:
        """Release kinds this variant produces, as used in metrics.json."""
        if self.generator is None:
            return ("real_classifier",) if self.epsilon is None else ("dp_real_classifier",)
        return ("synthetic_classifier", "synthetic_data", "generator")


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
    """What one pipeline run produced.

    Attributes:
      spec: the variant that ran.
      classifier: the released classifier.
      ledger: `PrivacyLedger` of the private stage, or None.
      generator_state: trained generator state, or None for a real-data variant.
      generator_config: the generator's resolved options, or None.
      synthetic_images: (M, H, W, C) float32 in [-1, 1], or None.
      synthetic_labels: (M,) int32, or None.
    """

    spec: PipelineSpec
    classifier: classifier.ClassifierResult
    ledger: Any | None
    generator_state: Any | None = None
    generator_config: dict[str, Any] | None = None
    synthetic_images: np.ndarray | None = None
    synthetic_labels: np.ndarray | None = None


def run_pipeline(
    key,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    spec: PipelineSpec,
    num_classes: int,
    public_dataset_size: int,
    target_delta: float,
    l2_norm_clip: float = 1.0,
    progress: bool = False,
) -> PipelineOutput:
    """Run one pipeline variant on the member set (images, labels).

    Args:
      key: PRNG key for every random choice of the run.
      images: (N, H, W, C) float32 in [-1, 1], the members.
      labels: (N,) int32.
      spec: the variant.
      num_classes: number of classes of the dataset.
      public_dataset_size: the expected number of members, a public constant used for DP
        sampling rates, accounting and the synthetic set size; never the realised N.
      target_delta: delta of every private release.
      l2_norm_clip: per-example clip norm of DP-SGD stages.
      progress: show tqdm bars for each training loop.

    Returns:
      PipelineOutput.
    """
    generator_key, sample_key, classifier_key = jax.random.split(key, 3)
    privacy = None
    if spec.epsilon is not None:
        privacy = PrivacySpec(
            target_epsilon=spec.epsilon,
            target_delta=target_delta,
            dataset_size=public_dataset_size,
            l2_norm_clip=l2_norm_clip,
        )

    if spec.generator is None:
        result = classifier.train_classifier(
            classifier_key,
            images,
            labels,
            num_classes=num_classes,
            config=dict(spec.classifier_config),
            privacy=privacy,
            progress=progress,
            progress_desc=f"{spec.name}: classifier",
        )
        return PipelineOutput(spec=spec, classifier=result, ledger=result.ledger)

    family = generators.get_family(spec.generator)
    generator_config = generators.resolve_config(family, spec.generator_config)
    init_key, fit_key = jax.random.split(generator_key)
    state = family.init(
        init_key, image_shape=images.shape[1:], num_classes=num_classes, config=generator_config
    )
    fitted = family.fit(
        fit_key, state, images, labels, config=generator_config, privacy=privacy, progress=progress
    )
    num_samples = max(1, round(spec.synthetic_multiplier * public_dataset_size))
    synthetic_images, synthetic_labels = sampling.sample_synthetic_set(
        sample_key,
        family,
        fitted.state,
        config=generator_config,
        num_samples=num_samples,
        num_classes=num_classes,
        class_weights=spec.class_weights,
    )
    # The classifier reads only the synthetic set, so it is post-processing of the generator
    # and adds nothing to the ledger.
    result = classifier.train_classifier(
        classifier_key,
        synthetic_images,
        synthetic_labels,
        num_classes=num_classes,
        config=dict(spec.classifier_config),
        progress=progress,
        progress_desc=f"{spec.name}: classifier",
    )
    return PipelineOutput(
        spec=spec,
        classifier=result,
        ledger=fitted.ledger,
        generator_state=fitted.state,
        generator_config=generator_config,
        synthetic_images=synthetic_images,
        synthetic_labels=synthetic_labels,
    )


def collect_signals(
    key,
    output: PipelineOutput,
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    population_images: np.ndarray,
) -> dict[str, np.ndarray]:
    """Record what an attacker observes of each release, for every pool example.

    Args:
      key: PRNG key of the white-box signal.
      output: the pipeline run.
      pool_images, pool_labels: the queries, (N, H, W, C) and (N,).
      population_images: (P, H, W, C) real images outside the pool that the attacker holds;
        never a member of any pipeline.

    Returns:
      dict with "logits" (N, num_classes) and "population_logits" (P, num_classes) of the
      released classifier; for synthetic variants also "synthetic_distance" (N,), the
      pixel-space distance to the nearest synthetic image, "density_ratio" (N,), the DOMIAS
      log density ratio of the synthetic set over the population, and "generator_score" (N,),
      the family's white-box score when it has one.
    """
    result = output.classifier

    def logits_of(images):
        return classifier.predict_logits(
            result.params, images, config=result.config, num_classes=result.num_classes
        )

    signals = {"logits": logits_of(pool_images), "population_logits": logits_of(population_images)}
    if output.synthetic_images is None:
        return signals
    signals["synthetic_distance"] = distance.nearest_neighbor_distances(
        pool_images, output.synthetic_images
    ).astype(np.float32)
    signals["density_ratio"] = density.domias(
        pool_images, output.synthetic_images, population_images
    ).astype(np.float32)
    family = generators.get_family(output.spec.generator)
    if family.member_scores is not None:
        signals["generator_score"] = np.asarray(
            family.member_scores(
                key,
                output.generator_state,
                pool_images,
                pool_labels,
                config=output.generator_config,
            ),
            np.float32,
        )
    return signals
