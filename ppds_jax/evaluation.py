"""Membership inference on every release of an experiment, from the recorded signals.

For each pipeline variant the experiment stores, per membership mask (0 = target, 1.. = shadows),
the signals an attacker observes (`pipeline.collect_signals`). Here each release kind is matched
with the attacks that `ppds_jax.attacks.registry` lists for it, each attack is scored from the
target's and the shadows' signals, and the scores are measured against the target's membership
mask. Only `metrics.attack_metrics` and `metrics.epsilon_lower_bound_from_scores` read that
mask. The shadows are the reference pipelines of every calibrated attack.

Attacks on the "generator" release reuse the released synthetic set's signals: an attacker with
the generator can sample such a set itself, and the pipeline already sampled one from it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ppds_jax import metrics
from ppds_jax.attacks import registry, signals
from ppds_jax.pipeline import PipelineSpec

# RMIA's offline interpolation between the OUT mean and 1; fixed in advance rather than tuned
# on the target, since tuning it needs membership labels the attacker does not have.
RMIA_OFFLINE_A = 0.3

# Confidence of the Clopper-Pearson intervals behind each empirical epsilon lower bound.
EPSILON_BOUND_CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """Inputs an attack may read: stacked signals, public labels and the shadows' masks only."""

    saved: Mapping[str, np.ndarray]
    labels: np.ndarray
    population_labels: np.ndarray
    shadow_masks: np.ndarray


def _confidence(inputs: _Inputs, name: str = "logits") -> np.ndarray:
    """LiRA's logit confidence (M, N) of every mask's classifier logits `saved[name]`."""
    return np.stack([signals.logit_confidence(x, inputs.labels) for x in inputs.saved[name]])


def _calibrated(name: str, values: np.ndarray, inputs: _Inputs) -> np.ndarray:
    """Registry score function of `name` on a target signal and its shadows' signals."""
    return registry.ATTACKS[name].score_fn(values[0], values[1:], inputs.shadow_masks)


def _loss_threshold(inputs: _Inputs) -> np.ndarray:
    loss = signals.per_example_loss(inputs.saved["logits"][0], inputs.labels)
    return registry.ATTACKS["loss_threshold"].score_fn(loss)


def _rmia(name: str, inputs: _Inputs, **options) -> np.ndarray:
    probabilities = np.stack(
        [signals.true_class_probability(x, inputs.labels) for x in inputs.saved["logits"]]
    )
    population = np.stack(
        [
            signals.true_class_probability(x, inputs.population_labels)
            for x in inputs.saved["population_logits"]
        ]
    )
    return registry.ATTACKS[name].score_fn(
        probabilities[0],
        probabilities[1:],
        inputs.shadow_masks,
        population_target_probs=population[0],
        population_reference_probs=population[1:],
        **options,
    )


@dataclasses.dataclass(frozen=True)
class _Scorer:
    """The signals an attack reads from `saved` and how it turns them into scores (N,)."""

    signals: tuple[str, ...]
    score: Callable[[_Inputs], np.ndarray]


def _lira_scorer(name: str) -> _Scorer:
    return _Scorer(("logits",), lambda inputs: _calibrated(name, _confidence(inputs), inputs))


def _distance_scorer(name: str, signal: str) -> _Scorer:
    # A smaller distance means a member, and `distance.gan_leaks` negates it.
    return _Scorer((signal,), lambda inputs: _calibrated(name, inputs.saved[signal], inputs))


# One entry per attack of the registry, under the same name.
SCORERS: dict[str, _Scorer] = {
    "loss_threshold": _Scorer(("logits",), _loss_threshold),
    "lira_online": _lira_scorer("lira_online"),
    "lira_offline": _lira_scorer("lira_offline"),
    "lira_online_fixed_variance": _lira_scorer("lira_online_fixed_variance"),
    "lira_offline_fixed_variance": _lira_scorer("lira_offline_fixed_variance"),
    "rmia": _Scorer(("logits", "population_logits"), lambda inputs: _rmia("rmia", inputs)),
    "rmia_offline": _Scorer(
        ("logits", "population_logits"),
        lambda inputs: _rmia("rmia_offline", inputs, offline_a=RMIA_OFFLINE_A),
    ),
    "gan_leaks_pixel": _distance_scorer("gan_leaks_pixel", "synthetic_distance"),
    "gan_leaks_feature": _distance_scorer("gan_leaks_feature", "synthetic_feature_distance"),
    # `pipeline.synthetic_set_signals` already evaluated `density.domias` per mask, because it
    # needs the images; the target's log density ratio is the score.
    "domias": _Scorer(
        ("density_ratio",),
        lambda inputs: inputs.saved["density_ratio"][0].astype(np.float64),
    ),
    "synthetic_lira": _Scorer(
        ("attacker_logits",),
        lambda inputs: _calibrated(
            "synthetic_lira", _confidence(inputs, "attacker_logits"), inputs
        ),
    ),
    "white_box_loss": _Scorer(
        ("generator_score",),
        lambda inputs: _calibrated("white_box_loss", inputs.saved["generator_score"], inputs),
    ),
}


def stack_signals(per_mask: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack the signals of each mask (target first): each array gets a leading (M,) axis.

    Raises:
      ValueError: no masks, or masks that recorded different signals.
    """
    if not per_mask:
        raise ValueError("stack_signals needs the signals of at least one mask")
    names = set(per_mask[0])
    for index, saved in enumerate(per_mask):
        if set(saved) != names:
            raise ValueError(
                f"mask {index} recorded signals {sorted(saved)}, but mask 0 recorded"
                f" {sorted(names)}; rerun the pipelines of this variant"
            )
    return {name: np.stack([np.asarray(saved[name]) for saved in per_mask]) for name in names}


def load_signals(workdir, spec: PipelineSpec, num_masks: int) -> dict[str, np.ndarray]:
    """Stack the saved signals of one variant over masks: each array gets a leading (M,) axis."""
    per_mask = []
    for mask_index in range(num_masks):
        with np.load(Path(workdir) / "signals" / spec.name / f"{mask_index}.npz") as saved:
            per_mask.append({name: saved[name] for name in saved.files})
    return stack_signals(per_mask)


def plan_attacks(
    release: str, saved: Mapping[str, np.ndarray], num_reference_models: int, attacks=None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Choose the attacks to run on `release`.

    With `attacks=None`, every attack that `registry.attacks_for_release` lists for the release
    runs unless it needs more reference models than there are, a signal that `saved` lacks
    (for example "generator_score" of a family without a white-box score), or a signal with
    NaN or infinite values. Those are returned with the reason instead of raising. Named
    attacks must all run, and a non-finite signal then raises in the attack or in
    `metrics.attack_metrics` with the count.

    Args:
      release: a release kind of `registry.RELEASES`.
      saved: stacked signals of the variant.
      num_reference_models: number of shadow pipelines.
      attacks: attack names to run, or None for every attack that fits.

    Returns:
      (names, skipped): the attacks to run, in the given or registry order, and a dict from
      each skipped attack to the reason.

    Raises:
      ValueError: an unknown release or attack, a named attack that does not fit the release
        (the message lists those that do), one with too few reference models (the message
        gives the minimum), or one whose signal was not recorded.
    """
    if attacks is not None:
        for name in attacks:
            registry.check_attack(name, release, num_reference_models)
            missing = [signal for signal in SCORERS[name].signals if signal not in saved]
            if missing:
                raise ValueError(
                    f"attack {name!r} needs the signal(s) {missing}, which the saved signals"
                    f" {sorted(saved)} lack"
                )
        return tuple(attacks), {}

    names, skipped = [], {}
    for name in registry.attacks_for_release(release):
        minimum = registry.ATTACKS[name].min_reference_models
        missing = [signal for signal in SCORERS[name].signals if signal not in saved]
        non_finite = {
            signal: int((~np.isfinite(np.asarray(saved[signal], np.float64))).sum())
            for signal in SCORERS[name].signals
            if signal in saved
        }
        non_finite = {signal: count for signal, count in non_finite.items() if count}
        if num_reference_models < minimum:
            skipped[name] = f"needs >= {minimum} reference models; got {num_reference_models}"
        elif missing:
            skipped[name] = f"signal(s) {missing} not recorded"
        elif non_finite:
            skipped[name] = f"NaN or infinite values in signal(s), with counts: {non_finite}"
        else:
            names.append(name)
    return tuple(names), skipped


def release_scores(
    release: str,
    saved: Mapping[str, np.ndarray],
    labels,
    population_labels,
    masks,
    *,
    attacks: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Attack scores for one release kind from the stacked signals of its variant.

    Args:
      release: a release kind of `registry.RELEASES`.
      saved: stacked signals (M, ...) of the variant, target at index 0, shadows after it.
      labels: (N,) true labels of the pool.
      population_labels: (P,) true labels of the attacker's population data.
      masks: (M, N) bool membership masks; only the shadows' (1..) are read.
      attacks: attack names to run, or None for every one that fits and can run (see
        `plan_attacks`).

    Returns:
      dict from registry attack name to float64 scores (N,), higher meaning "more likely a
      member".

    Raises:
      ValueError: as in `plan_attacks`, or an attack that rejects its signals (for example NaN
        values, with their count).
    """
    masks = np.asarray(masks, bool)
    names, _ = plan_attacks(release, saved, len(masks) - 1, attacks)
    inputs = _Inputs(
        saved=saved,
        labels=np.asarray(labels),
        population_labels=np.asarray(population_labels),
        shadow_masks=masks[1:],
    )
    return {name: np.asarray(SCORERS[name].score(inputs), np.float64) for name in names}


def classifier_attack_scores(
    saved: Mapping[str, np.ndarray],
    labels: np.ndarray,
    population_labels: np.ndarray,
    masks,
    *,
    attacks: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Scores of every attack on a released classifier.

    Args:
      saved: stacked signals with "logits" (M, N, C) on the pool and "population_logits"
        (M, P, C) on the attacker's population data, target at index 0, shadows after it.
      labels: (N,) true labels of the pool.
      population_labels: (P,) true labels of the population data.
      masks: (M, N) bool membership masks; only the shadows' (1..) are read.
      attacks: attack names to run, or None for every classifier attack that can run.
    """
    return release_scores(
        "real_classifier", saved, labels, population_labels, masks, attacks=attacks
    )


def _mitigations(spec: PipelineSpec) -> dict:
    """Collect the variant's mitigation settings for the record."""
    return {
        "synthetic_multiplier": spec.synthetic_multiplier,
        "class_weights": None if spec.class_weights is None else list(spec.class_weights),
        "quality_filter": spec.quality_filter,
        "privacy_filter_threshold": spec.privacy_filter_threshold,
        "filter_oversample": spec.filter_oversample,
        "validation_fraction": spec.validation_fraction,
        "classifier_config": json.loads(json.dumps(dict(spec.classifier_config), default=list)),
    }


def _target_count(saved: Mapping[str, np.ndarray], name: str) -> int | None:
    """Read the target's scalar signal `name` as an int, or None when it was not recorded."""
    return int(saved[name][0]) if name in saved else None


def release_record(
    spec: PipelineSpec,
    release: str,
    saved: Mapping[str, np.ndarray],
    *,
    masks,
    pool_labels,
    population_labels,
    target_delta: float,
    ledger: Mapping | None = None,
    attacks: Sequence[str] | None = None,
) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Attack one release and summarise it as a metrics.json record.

    A private release (spec.epsilon set) gets the accounted epsilon from `ledger` and, per
    attack, "epsilon_lower_bound": `metrics.epsilon_lower_bound_from_scores` at the target
    delta, with its maximum over attacks at the top of the record. A release whose guarantee
    the privacy filter voids gets "dp_guarantee_void_by": "privacy_filter", no epsilon, delta
    or "ledger", and the generator's ledger under "generator_ledger", because it covers the
    generator only.

    NOTE: the empirical bound counts examples of one target model, which are not independent
    trials, and it takes the best threshold on the same counts. It is an estimate of a lower
    bound, not an audit at the stated confidence (see `metrics.epsilon_lower_bound`).

    Args:
      spec: the variant.
      release: one of `spec.releases`.
      saved: stacked signals (M, ...) of the variant, target first.
      masks: (M, N) bool membership masks; row 0, the target's, is read by the metrics only.
      pool_labels: (N,) true labels of the pool.
      population_labels: (P,) true labels of the population data.
      target_delta: delta of the private releases.
      ledger: the target's `PrivacyLedger.to_dict()`, needed when spec.epsilon is set.
      attacks: attack names to run, or None for every one that fits and can run.

    Returns:
      (record, curves): the JSON-ready record and attack name -> (fpr, tpr).

    Raises:
      ValueError: `release` is not a release of `spec`, a private release without a ledger, or
        as in `release_scores`.
    """
    if release not in spec.releases:
        raise ValueError(
            f"pipeline {spec.name!r} releases {list(spec.releases)}; got release {release!r}"
        )
    if spec.epsilon is not None and ledger is None:
        raise ValueError(f"private pipeline {spec.name!r} needs its ledger for the record")
    masks = np.asarray(masks, bool)
    is_member = masks[0]
    _, skipped = plan_attacks(release, saved, len(masks) - 1, attacks)
    scores = release_scores(release, saved, pool_labels, population_labels, masks, attacks=attacks)
    is_private = spec.epsilon is not None
    void_by = spec.dp_guarantee_void_by(release)
    attack_metrics, curves = {}, {}
    for name, values in scores.items():
        attack_metrics[name] = metrics.attack_metrics(values, is_member)
        if is_private:
            attack_metrics[name]["epsilon_lower_bound"] = metrics.epsilon_lower_bound_from_scores(
                values, is_member, delta=target_delta, confidence=EPSILON_BOUND_CONFIDENCE
            )
        fpr, tpr, _ = metrics.roc_curve(values, is_member)
        curves[name] = (fpr, tpr)

    holds = is_private and void_by is None
    record = {
        "pipeline": spec.name,
        "release": release,
        "generator": spec.generator,
        "test_accuracy": float(saved["test_accuracy"][0]) if "test_accuracy" in saved else None,
        "shadow_test_accuracy_mean": (
            float(np.mean(saved["test_accuracy"][1:])) if "test_accuracy" in saved else None
        ),
        "epsilon": ledger["epsilon_pld"] if holds else None,
        "epsilon_rdp": ledger["epsilon_rdp"] if holds else None,
        "delta": float(target_delta) if holds else None,
        "dp_guarantee_void_by": void_by,
        "ledger": ledger if holds else None,
        "generator_ledger": ledger if void_by is not None else None,
        "mitigations": _mitigations(spec),
        "synthetic_set_size": _target_count(saved, "synthetic_set_size"),
        "privacy_filter_removed": _target_count(saved, "privacy_filter_removed"),
        "mia": attack_metrics,
        "attacks_skipped": skipped,
    }
    if is_private and attack_metrics:
        strongest = max(
            attack_metrics, key=lambda name: attack_metrics[name]["epsilon_lower_bound"]
        )
        record["epsilon_lower_bound"] = attack_metrics[strongest]["epsilon_lower_bound"]
        record["epsilon_lower_bound_attack"] = strongest
        record["epsilon_lower_bound_confidence"] = EPSILON_BOUND_CONFIDENCE
    return record, curves


def evaluate_experiment(
    *,
    workdir,
    pipelines: Sequence[PipelineSpec],
    masks: np.ndarray,
    pool_labels: np.ndarray,
    population_labels: np.ndarray,
    target_delta: float,
):
    """Attack every release of every pipeline variant.

    Returns:
      (records, curves): records as written to metrics.json, one per released artefact (see
      `release_record`); curves maps "pipeline_release" to attack name -> (fpr, tpr) for
      plotting.
    """
    records, curves = [], {}
    for spec in pipelines:
        saved = load_signals(workdir, spec, len(masks))
        ledger = None
        if spec.epsilon is not None:
            ledger_path = Path(workdir) / "ledgers" / f"{spec.name}.json"
            ledger = json.loads(ledger_path.read_text())
        for release in spec.releases:
            record, release_curves = release_record(
                spec,
                release,
                saved,
                masks=masks,
                pool_labels=pool_labels,
                population_labels=population_labels,
                target_delta=target_delta,
                ledger=ledger,
            )
            records.append(record)
            curves[f"{spec.name}_{release}"] = release_curves
    return records, curves
