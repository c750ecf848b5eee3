"""One run of a release pipeline on one membership mask.

A pipeline variant trains either a classifier on the real members (the baseline, optionally
with DP-SGD) or a generator on the members, samples a synthetic set from it, optionally filters
it, and trains a classifier on that set. Target and shadow pipelines call the same function
with different member sets, so the attacks calibrate on exactly the code that produced the
target.

Mitigations are fields of `PipelineSpec`. At the sampling stage they are the synthetic set's
size and class proportions, a quality filter and a privacy filter (`ppds_jax.filtering`). At the
classification stage they are weight decay, label smoothing, early stopping on held-out
synthetic data, and DP-SGD.

`collect_signals` then records what an attacker observes of each release on every pool example:
the released classifier's logits, the nearest-neighbour distances of the released synthetic set
in pixel and feature space, its density ratio, the logits of a classifier that the attacker
trains on it, and the released generator's white-box score.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import dp_accounting
import jax
import numpy as np

from ppds_jax import (
    accounting,
    checkpoint,
    classifier,
    features,
    filtering,
    generators,
    sampling,
)
from ppds_jax.attacks import density, distance
from ppds_jax.generators.base import PrivacySpec

# Releases that are computed from the synthetic set, and so from the privacy filter's output.
_SYNTHETIC_SET_RELEASES = ("synthetic_classifier", "synthetic_data")

# The classifier the attacker trains on a released synthetic set for `synthetic_lira`. It
# differs from the released classifier's recipe on purpose: no regularisation and no early
# stopping, so it fits the synthetic set, and any member it copies, as closely as it can. The
# attacker who reuses the pipeline's own recipe is already covered, because the
# "synthetic_classifier" release is exactly that classifier.
ATTACKER_CLASSIFIER_CONFIG = {
    "features": (16, 32),
    "hidden": 64,
    "num_epochs": 10,
    "batch_size": 64,
    "learning_rate": 2e-3,
}


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
      classifier_config: options overriding `classifier.DEFAULT_CONFIG`. With
        `early_stopping_patience` > 0 the classifier stops on a held-out part of its training
        data (see `validation_fraction`).
      synthetic_multiplier: synthetic set size as a multiple of the public expected member
        count.
      class_weights: class proportions of the synthetic set; None means balanced.
      quality_filter: keep only the synthetic samples that a classifier trained on other
        synthetic samples labels most confidently (`filtering.quality_confidence`). Reads only
        synthetic data, so a DP guarantee still holds.
      privacy_filter_threshold: drop synthetic samples within this pixel-space L2 distance of
        any private training image, or None for no privacy filter. The filter reads the private
        images and is NOT differentially private: the synthetic set and the classifier trained
        on it lose any DP guarantee (see `dp_guarantee_void_by`).
      filter_oversample: candidates drawn per requested sample when a filter is on, >= 1; the
        filters keep the requested class counts from them. Must be > 1 with the quality filter,
        which would otherwise keep every candidate.
      validation_fraction: share of the classifier's training data held out for early
        stopping, in (0, 1); used only when `early_stopping_patience` > 0. For a synthetic
        variant it is a part of the synthetic set, so the selection reads no private data. For
        a non-private real-data variant it is a part of the members.
    """

    name: str
    generator: str | None = None
    epsilon: float | None = None
    generator_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    classifier_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    synthetic_multiplier: float = 1.0
    class_weights: tuple[float, ...] | None = None
    quality_filter: bool = False
    privacy_filter_threshold: float | None = None
    filter_oversample: float = 2.0
    validation_fraction: float = 0.1

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
        classifier_config = classifier.resolve_config(dict(self.classifier_config))
        self._check_filters()
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} of pipeline {self.name!r}"
                " must be in (0, 1)"
            )
        if (
            classifier_config["early_stopping_patience"] > 0
            and self.generator is None
            and self.epsilon is not None
        ):
            raise ValueError(
                f"pipeline {self.name!r} trains a DP-SGD classifier on real data with early"
                " stopping, which would select the model on private data outside the"
                " accounting; set early_stopping_patience=0 or use a synthetic variant"
            )

    def _check_filters(self) -> None:
        if self.generator is None and (
            self.quality_filter or self.privacy_filter_threshold is not None
        ):
            raise ValueError(
                f"pipeline {self.name!r} has no generator, so there is no synthetic set to"
                " filter; set quality_filter=False and privacy_filter_threshold=None"
            )
        threshold = self.privacy_filter_threshold
        if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(
                f"privacy_filter_threshold={threshold} of pipeline {self.name!r} must be a"
                " finite number >= 0, or None"
            )
        if not self.filter_oversample >= 1:
            raise ValueError(
                f"filter_oversample={self.filter_oversample} of pipeline {self.name!r} must be >= 1"
            )
        if self.quality_filter and not self.filter_oversample > 1:
            raise ValueError(
                f"filter_oversample={self.filter_oversample} of pipeline {self.name!r} must be"
                " > 1 with the quality filter, which otherwise keeps every candidate"
            )

    @property
    def releases(self) -> tuple[str, ...]:
        """Release kinds this variant produces, as used in metrics.json."""
        if self.generator is None:
            return ("real_classifier",) if self.epsilon is None else ("dp_real_classifier",)
        return ("synthetic_classifier", "synthetic_data", "generator")

    @property
    def filters_enabled(self) -> bool:
        """True when the synthetic set passes through the quality or the privacy filter."""
        return self.quality_filter or self.privacy_filter_threshold is not None

    def dp_guarantee_void_by(self, release: str) -> str | None:
        """Name of the stage that voids the DP guarantee of `release`, or None.

        Returns "privacy_filter" for the synthetic set and the classifier trained on it when
        this private variant uses the privacy filter. The generator release keeps its
        guarantee, because the filter runs after the generator's training and the generator
        does not depend on it.
        """
        if (
            self.epsilon is not None
            and self.privacy_filter_threshold is not None
            and release in _SYNTHETIC_SET_RELEASES
        ):
            return "privacy_filter"
        return None


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
    """What one pipeline run produced.

    Attributes:
      spec: the variant that ran.
      classifier: the released classifier.
      ledger: `PrivacyLedger` of the private stage (the generator's training for a synthetic
        variant), or None.
      generator_state: trained generator state, or None for a real-data variant.
      generator_config: the generator's resolved options, or None.
      synthetic_images: (M, H, W, C) float32 in [-1, 1], or None.
      synthetic_labels: (M,) int32, or None.
      synthetic_ledger: ledger of the synthetic set and the classifier trained on it. It is
        `ledger` with an added "privacy_filter" stage of `dp_accounting.NonPrivateDpEvent`
        (epsilon infinite) when the privacy filter ran, else `ledger` itself.
      filter_summary: `filtering.filter_candidates` summary, or None without filters.
    """

    spec: PipelineSpec
    classifier: classifier.ClassifierResult
    ledger: Any | None
    generator_state: Any | None = None
    generator_config: dict[str, Any] | None = None
    synthetic_images: np.ndarray | None = None
    synthetic_labels: np.ndarray | None = None
    synthetic_ledger: Any | None = None
    filter_summary: dict[str, Any] | None = None


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
    cache: StageCache | None = None,
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
      cache: trained generators and synthetic sets of earlier calls to reuse when this call
        would compute them again (see `StageCache`), or None to compute every stage.

    Returns:
      PipelineOutput.

    Raises:
      ValueError: the privacy filter left fewer than 2 synthetic samples, or a stage rejects
        its inputs.
    """
    generator_key, sample_key, classifier_key = jax.random.split(key, 3)
    # Keys of the optional stages derive from the sample key, so variants without them draw
    # exactly what they drew before the stages existed.
    filter_key = jax.random.fold_in(sample_key, 1)
    validation_key = jax.random.fold_in(sample_key, 2)
    privacy = None
    if spec.epsilon is not None:
        privacy = PrivacySpec(
            target_epsilon=spec.epsilon,
            target_delta=target_delta,
            dataset_size=public_dataset_size,
            l2_norm_clip=l2_norm_clip,
        )

    if spec.generator is None:
        result = _train_released_classifier(
            classifier_key, validation_key, images, labels, spec, num_classes, privacy, progress
        )
        return PipelineOutput(spec=spec, classifier=result, ledger=result.ledger)

    family = generators.get_family(spec.generator)
    generator_config = generators.resolve_config(family, spec.generator_config)

    def train_generator():
        init_key, fit_key = jax.random.split(generator_key)
        state = family.init(
            init_key, image_shape=images.shape[1:], num_classes=num_classes, config=generator_config
        )
        return family.fit(
            fit_key,
            state,
            images,
            labels,
            config=generator_config,
            privacy=privacy,
            progress=progress,
        )

    generation_digest = _digest(
        generator_key,
        images,
        labels,
        {
            "generator": spec.generator,
            "generator_config": generator_config,
            "privacy": None if privacy is None else dataclasses.asdict(privacy),
            "num_classes": num_classes,
        },
    )
    fitted = _cached(cache, "generator", generation_digest, train_generator)
    num_samples = max(1, round(spec.synthetic_multiplier * public_dataset_size))

    def draw_synthetic_set():
        if not spec.filters_enabled:
            drawn = sampling.sample_synthetic_set(
                sample_key,
                family,
                fitted.state,
                config=generator_config,
                num_samples=num_samples,
                num_classes=num_classes,
                class_weights=spec.class_weights,
            )
            return (*drawn, None)
        return _sample_filtered(
            sample_key,
            filter_key,
            family,
            fitted.state,
            generator_config,
            private_images=images,
            spec=spec,
            num_samples=num_samples,
            num_classes=num_classes,
        )

    synthetic_digest = _digest(
        sample_key,
        {
            "generation": generation_digest,
            "num_samples": num_samples,
            "class_weights": spec.class_weights,
            "quality_filter": spec.quality_filter,
            "privacy_filter_threshold": spec.privacy_filter_threshold,
            "filter_oversample": spec.filter_oversample if spec.filters_enabled else None,
            # The quality filter trains its judge with the released classifier's options.
            "classifier_config": (
                classifier.resolve_config(dict(spec.classifier_config))
                if spec.quality_filter
                else None
            ),
        },
    )
    synthetic_images, synthetic_labels, filter_summary = _cached(
        cache, "synthetic_set", synthetic_digest, draw_synthetic_set
    )
    # The classifier reads only the synthetic set, so it is post-processing of the generator
    # and adds nothing to the ledger. Early stopping selects on held-out synthetic samples.
    result = _train_released_classifier(
        classifier_key,
        validation_key,
        synthetic_images,
        synthetic_labels,
        spec,
        num_classes,
        None,
        progress,
    )
    return PipelineOutput(
        spec=spec,
        classifier=result,
        ledger=fitted.ledger,
        generator_state=fitted.state,
        generator_config=generator_config,
        synthetic_images=synthetic_images,
        synthetic_labels=synthetic_labels,
        synthetic_ledger=_synthetic_ledger(fitted.ledger, spec),
        filter_summary=filter_summary,
    )


class StageCache:
    """Trained generators and synthetic sets of earlier pipeline runs, for later runs to reuse.

    Runs that differ only in a classifier-stage option (a benchmark grid's weight decay, label
    smoothing or early stopping cells) train the same generator on the same members with the
    same key, and draw the same synthetic set. `run_pipeline` looks each stage up by a SHA-256
    digest of its PRNG key, its input arrays and every option the stage reads. A hit therefore
    returns what the stage would compute again, and a run with any other input computes afresh.

    Entries live in memory, and each stage keeps its `max_entries` most recently used ones.
    Cached synthetic arrays are made read-only, because every run that hits shares them.

    Attributes:
      hits, misses: stage name -> count of lookups that were reused or computed.
    """

    def __init__(self, max_entries: int = 32):
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries} must be >= 1")
        self.max_entries = max_entries
        self._entries: dict[str, collections.OrderedDict[str, Any]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.misses: collections.Counter[str] = collections.Counter()

    def get_or_compute(self, stage: str, digest: str, compute: Callable[[], Any]) -> Any:
        """Return the entry of `stage` under `digest`, computing and storing it when absent."""
        entries = self._entries.setdefault(stage, collections.OrderedDict())
        if digest in entries:
            entries.move_to_end(digest)
            self.hits[stage] += 1
            return entries[digest]
        self.misses[stage] += 1
        value = jax.tree_util.tree_map(_read_only, compute())
        entries[digest] = value
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
        return value


def _read_only(leaf):
    if isinstance(leaf, np.ndarray):
        leaf.setflags(write=False)
    return leaf


def _cached(cache: StageCache | None, stage: str, digest: str, compute: Callable[[], Any]):
    return compute() if cache is None else cache.get_or_compute(stage, digest, compute)


def _digest(key, *parts) -> str:
    """Hash a PRNG key's data, the bytes, dtype and shape of arrays, and options with SHA-256.

    Options enter through `checkpoint.fingerprint`, their canonical JSON form.
    """
    hasher = hashlib.sha256(np.asarray(jax.random.key_data(key)).tobytes())
    for part in parts:
        if isinstance(part, np.ndarray | jax.Array):
            array = np.ascontiguousarray(part)
            hasher.update(f"{array.dtype}{array.shape}".encode())
            hasher.update(array.tobytes())
        else:
            hasher.update(checkpoint.fingerprint(part).encode())
    return hasher.hexdigest()


def _sample_filtered(
    sample_key,
    filter_key,
    family,
    state,
    generator_config,
    *,
    private_images,
    spec: PipelineSpec,
    num_samples: int,
    num_classes: int,
):
    """Draw oversampled candidates and keep the requested class counts that pass the filters."""
    requested = sampling.balanced_labels(
        num_samples=num_samples, num_classes=num_classes, class_weights=spec.class_weights
    )
    candidate_labels = sampling.oversampled_labels(requested, factor=spec.filter_oversample)
    candidates = sampling.sample_images(
        sample_key, family, state, candidate_labels, config=generator_config
    )
    uses_privacy_filter = spec.privacy_filter_threshold is not None
    filtered = filtering.filter_candidates(
        filter_key,
        candidates,
        candidate_labels,
        counts=np.bincount(requested, minlength=num_classes),
        num_classes=num_classes,
        quality=spec.quality_filter,
        classifier_config=spec.classifier_config,
        private_images=private_images if uses_privacy_filter else None,
        privacy_threshold=spec.privacy_filter_threshold,
    )
    if len(filtered.labels) < 2:
        raise ValueError(
            f"the privacy filter of pipeline {spec.name!r} kept {len(filtered.labels)} of"
            f" {len(candidate_labels)} candidates; lower privacy_filter_threshold="
            f"{spec.privacy_filter_threshold} or raise filter_oversample"
        )
    return filtered.images, filtered.labels, filtered.summary


def _synthetic_ledger(ledger, spec: PipelineSpec):
    """Copy the generator's ledger and add a non-private stage when the privacy filter ran."""
    if ledger is None or spec.privacy_filter_threshold is None:
        return ledger
    combined = accounting.PrivacyLedger()
    for stage in ledger.stages:
        combined.add_stage(stage.name, stage.event, stage.parameters)
    combined.add_stage(
        "privacy_filter",
        dp_accounting.NonPrivateDpEvent(),
        {
            "threshold": float(spec.privacy_filter_threshold),
            "reads": "private training images",
        },
    )
    return combined


def _train_released_classifier(
    key, validation_key, images, labels, spec: PipelineSpec, num_classes, privacy, progress
) -> classifier.ClassifierResult:
    """Train the released classifier, holding out validation data when early stopping is on."""
    config = dict(spec.classifier_config)
    validation = None
    if classifier.resolve_config(config)["early_stopping_patience"] > 0:
        images, labels, validation = _hold_out(
            validation_key, images, labels, spec.validation_fraction
        )
    return classifier.train_classifier(
        key,
        images,
        labels,
        num_classes=num_classes,
        config=config,
        privacy=privacy,
        validation=validation,
        progress=progress,
        progress_desc=f"{spec.name}: classifier",
    )


def _hold_out(key, images, labels, fraction: float):
    """Split off a random `fraction` (at least 1, at most N - 1) of the rows for validation."""
    if len(labels) < 2:
        raise ValueError(f"early stopping needs >= 2 training examples; got {len(labels)}")
    num_validation = min(max(1, round(fraction * len(labels))), len(labels) - 1)
    order = np.asarray(jax.random.permutation(key, len(labels)))
    held_out, kept = np.sort(order[:num_validation]), np.sort(order[num_validation:])
    return images[kept], labels[kept], (images[held_out], labels[held_out])


def collect_signals(
    key,
    output: PipelineOutput,
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    population_images: np.ndarray,
    *,
    feature_extractor: features.FeatureExtractor | None = None,
    attacker_classifier_config: Mapping[str, Any] | None = ATTACKER_CLASSIFIER_CONFIG,
    releases: tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Record what an attacker observes of each release, for every pool example.

    Args:
      key: PRNG key of the white-box signal and of the attacker's classifier.
      output: the pipeline run.
      pool_images, pool_labels: the queries, (N, H, W, C) and (N,).
      population_images: (P, H, W, C) real images outside the pool that the attacker holds;
        never a member of any pipeline.
      feature_extractor: the attacker's feature space for the feature-space distance; it must
        be the same for every pipeline of an experiment. None uses
        `features.random_extractor` with seed 0.
      attacker_classifier_config: recipe of the classifier that the attacker trains on the
        synthetic set for `synthetic_lira`, or None to skip that signal.
      releases: the releases that will be attacked, or None for all of the variant's. Without
        "synthetic_data" and "generator" the synthetic set's signals are skipped, and without
        "generator" the white-box score is.

    Returns:
      dict with "logits" (N, num_classes) and "population_logits" (P, num_classes) of the
      released classifier. Synthetic variants add the entries of `synthetic_set_signals`,
      "synthetic_set_size" (a scalar, smaller than requested only when the privacy filter
      left too few candidates), "privacy_filter_removed" (a scalar, with the privacy filter)
      and, when the family has one, "generator_score" (N,), its white-box score.

    Raises:
      ValueError: `releases` names a release that the variant does not produce.
    """
    white_box_key, attacker_key = jax.random.split(key)
    releases = output.spec.releases if releases is None else tuple(releases)
    unknown = sorted(set(releases) - set(output.spec.releases))
    if unknown:
        raise ValueError(
            f"releases {unknown} are not releases of pipeline {output.spec.name!r}, whose"
            f" releases are {list(output.spec.releases)}"
        )
    signals = classifier_signals(output.classifier, pool_images, population_images)
    if output.synthetic_images is None:
        return signals
    signals["synthetic_set_size"] = np.float32(len(output.synthetic_labels))
    if output.filter_summary is not None and "privacy_filter_removed" in output.filter_summary:
        signals["privacy_filter_removed"] = np.float32(
            output.filter_summary["privacy_filter_removed"]
        )
    # The attacker who holds the generator can sample from it, so the generator release is
    # attacked with the synthetic set's signals too (see `ppds_jax.evaluation`).
    if not {"synthetic_data", "generator"} & set(releases):
        return signals
    signals.update(
        synthetic_set_signals(
            attacker_key,
            output.synthetic_images,
            output.synthetic_labels,
            pool_images,
            population_images,
            num_classes=output.classifier.num_classes,
            feature_extractor=feature_extractor,
            attacker_classifier_config=attacker_classifier_config,
        )
    )
    family = generators.get_family(output.spec.generator)
    if "generator" in releases and family.member_scores is not None:
        signals["generator_score"] = np.asarray(
            family.member_scores(
                white_box_key,
                output.generator_state,
                pool_images,
                pool_labels,
                config=output.generator_config,
            ),
            np.float32,
        )
    return signals


def classifier_signals(
    result: classifier.ClassifierResult, pool_images, population_images
) -> dict[str, np.ndarray]:
    """Logits of a released classifier: "logits" (N, C) on the pool, "population_logits" (P, C)."""

    def logits_of(images):
        return classifier.predict_logits(
            result.params, images, config=result.config, num_classes=result.num_classes
        )

    return {"logits": logits_of(pool_images), "population_logits": logits_of(population_images)}


def synthetic_set_signals(
    key,
    synthetic_images,
    synthetic_labels,
    pool_images,
    population_images,
    *,
    num_classes: int,
    feature_extractor: features.FeatureExtractor | None = None,
    attacker_classifier_config: Mapping[str, Any] | None = ATTACKER_CLASSIFIER_CONFIG,
) -> dict[str, np.ndarray]:
    """Signals of a released synthetic set on every pool example.

    Args:
      key: PRNG key of the attacker's classifier.
      synthetic_images: (M, H, W, C) float32 in [-1, 1], the released set.
      synthetic_labels: (M,) int32.
      pool_images: (N, H, W, C), the queries.
      population_images: (P, H, W, C), real non-members that the attacker holds; DOMIAS's
        reference set.
      num_classes: number of classes.
      feature_extractor: the attacker's feature space; None uses `features.random_extractor`
        with seed 0.
      attacker_classifier_config: options of the attacker's classifier (overriding
        `classifier.DEFAULT_CONFIG`), or None to skip "attacker_logits".

    Returns:
      dict of float32 arrays:

      - "synthetic_distance" (N,): pixel-space L2 distance to the nearest synthetic image;
      - "synthetic_feature_distance" (N,): the same in the extractor's feature space;
      - "density_ratio" (N,): DOMIAS log density ratio of the synthetic set over the
        population, NaN everywhere when the density estimate fails (see `_density_ratio`);
      - "attacker_logits" (N, num_classes): logits of a classifier trained on the synthetic
        set with `attacker_classifier_config`.
    """
    if feature_extractor is None:
        feature_extractor = features.random_extractor(np.shape(pool_images)[1:])
    pool_features = features.embed(feature_extractor, pool_images)
    synthetic_features = features.embed(feature_extractor, synthetic_images)
    signals = {
        "synthetic_distance": distance.nearest_neighbor_distances(pool_images, synthetic_images),
        "synthetic_feature_distance": distance.nearest_neighbor_distances(
            pool_features, synthetic_features
        ),
        "density_ratio": _density_ratio(pool_images, synthetic_images, population_images),
    }
    if attacker_classifier_config is not None:
        attacker = classifier.train_classifier(
            key,
            synthetic_images,
            synthetic_labels,
            num_classes=num_classes,
            config=dict(attacker_classifier_config),
        )
        signals["attacker_logits"] = classifier.predict_logits(
            attacker.params, pool_images, config=attacker.config, num_classes=num_classes
        )
    return {name: np.asarray(value, np.float32) for name, value in signals.items()}


def _density_ratio(pool_images, synthetic_images, population_images) -> np.ndarray:
    """Score the pool with DOMIAS, or return NaN for every query when the density fit fails."""
    try:
        return density.domias(pool_images, synthetic_images, population_images)
    except ValueError:
        # NOTE: a collapsed generator (near-duplicate samples) or a set of at most 20 samples
        # has no invertible covariance in DOMIAS's PCA space. The NaN row lets the other
        # signals of the run be kept; `evaluation.plan_attacks` then skips "domias" and
        # records the count of non-finite values.
        return np.full(len(pool_images), np.nan)
