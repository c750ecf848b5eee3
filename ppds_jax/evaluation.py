"""Membership inference on every release of an experiment, from the recorded signals.

For each pipeline variant the experiment stores, per membership mask (0 = target, 1.. = shadows),
the signals an attacker observes (`pipeline.collect_signals`). Here each release kind is matched
with the attacks that fit its threat model, scored from the target's and the shadows' signals,
and measured against the target's membership mask. Only `metrics.attack_metrics` reads that mask.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ppds_jax import metrics
from ppds_jax.attacks import distance, lira, loss_threshold, rmia, signals
from ppds_jax.pipeline import PipelineSpec

# A calibrated attack turns (target signal (N,), shadow signals (K, N), shadow masks (K, N))
# into membership scores (N,), higher meaning more likely a member.
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

CALIBRATED_ATTACKS: dict[str, ScoreFn] = {
    "lira_online": lambda t, s, m: lira.lira_online(t, s, m),
    "lira_offline": lambda t, s, m: lira.lira_offline(t, s, m),
    "lira_online_fixed_variance": lambda t, s, m: lira.lira_online(t, s, m, fixed_variance=True),
    "lira_offline_fixed_variance": lambda t, s, m: lira.lira_offline(t, s, m, fixed_variance=True),
}

# RMIA's offline interpolation between the OUT mean and 1; fixed in advance rather than tuned
# on the target, since tuning it needs membership labels the attacker does not have.
RMIA_OFFLINE_A = 0.3


def load_signals(workdir, spec: PipelineSpec, num_masks: int) -> dict[str, np.ndarray]:
    """Stack the saved signals of one variant over masks: each array gets a leading (M,) axis."""
    stacked: dict[str, list[np.ndarray]] = {}
    for mask_index in range(num_masks):
        with np.load(Path(workdir) / "signals" / spec.name / f"{mask_index}.npz") as saved:
            for name in saved.files:
                stacked.setdefault(name, []).append(saved[name])
    return {name: np.stack(values) for name, values in stacked.items()}


def classifier_attack_scores(
    saved: dict[str, np.ndarray], labels: np.ndarray, population_labels: np.ndarray, masks
) -> dict[str, np.ndarray]:
    """Scores of every attack on a released classifier.

    Args:
      saved: stacked signals with "logits" (M, N, C) on the pool and "population_logits"
        (M, P, C) on the attacker's population data, target at index 0, shadows after it.
      labels: (N,) true labels of the pool.
      population_labels: (P,) true labels of the population data.
      masks: (M, N) bool membership masks; only the shadows' (1..) are read.
    """
    logits, population_logits = saved["logits"], saved["population_logits"]
    shadow_masks = masks[1:]
    confidence = np.stack([signals.logit_confidence(x, labels) for x in logits])
    scores = {
        "loss_threshold": loss_threshold.loss_threshold(signals.per_example_loss(logits[0], labels))
    }
    for name, attack in CALIBRATED_ATTACKS.items():
        scores[name] = attack(confidence[0], confidence[1:], shadow_masks)
    probabilities = np.stack([signals.true_class_probability(x, labels) for x in logits])
    population = np.stack(
        [signals.true_class_probability(x, population_labels) for x in population_logits]
    )
    common = {
        "population_target_probs": population[0],
        "population_reference_probs": population[1:],
    }
    scores["rmia"] = rmia.rmia(probabilities[0], probabilities[1:], shadow_masks, **common)
    scores["rmia_offline"] = rmia.rmia_offline(
        probabilities[0], probabilities[1:], shadow_masks, offline_a=RMIA_OFFLINE_A, **common
    )
    return scores


def signal_attack_scores(
    signal: np.ndarray, masks: np.ndarray, prefix: str
) -> dict[str, np.ndarray]:
    """Scores from a scalar signal (M, N) where larger means "fits the example better".

    The uncalibrated score is the target's signal itself; the calibrated ones are LiRA on the
    same signal against the shadows, which turns any signal into a per-example test.
    """
    target, shadows, shadow_masks = signal[0], signal[1:], masks[1:]
    return {
        f"{prefix}_threshold": target.astype(np.float64),
        f"{prefix}_lira_online": lira.lira_online(target, shadows, shadow_masks),
        f"{prefix}_lira_offline": lira.lira_offline(target, shadows, shadow_masks),
    }


def release_scores(
    release: str, saved: dict[str, np.ndarray], labels, population_labels, masks
) -> dict[str, np.ndarray]:
    """Attack scores for one release kind from the stacked signals of its variant."""
    if release in ("real_classifier", "dp_real_classifier", "synthetic_classifier"):
        return classifier_attack_scores(saved, labels, population_labels, masks)
    if release == "synthetic_data":
        distances = saved["synthetic_distance"]
        scores = {
            "gan_leaks": distance.gan_leaks(distances[0]),
            "gan_leaks_calibrated": distance.gan_leaks(distances[0], distances[1:], masks[1:]),
            "domias": saved["density_ratio"][0].astype(np.float64),
        }
        scores.update(signal_attack_scores(-distances, masks, "distance"))
        return scores
    if release == "generator":
        if "generator_score" not in saved:
            return {}
        return signal_attack_scores(saved["generator_score"], masks, "white_box")
    raise ValueError(f"unknown release {release!r}")


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
      (records, curves): records as written to metrics.json, one per released artefact;
      curves maps "pipeline/release" to attack name -> (fpr, tpr) for plotting.
    """
    records, curves = [], {}
    is_member = masks[0]
    for spec in pipelines:
        saved = load_signals(workdir, spec, len(masks))
        ledger = None
        ledger_path = Path(workdir) / "ledgers" / f"{spec.name}.json"
        if spec.epsilon is not None:
            ledger = json.loads(ledger_path.read_text())
        for release in spec.releases:
            scores = release_scores(release, saved, pool_labels, population_labels, masks)
            attack_metrics, release_curves = {}, {}
            for name, values in scores.items():
                attack_metrics[name] = metrics.attack_metrics(values, is_member)
                fpr, tpr, _ = metrics.roc_curve(values, is_member)
                release_curves[name] = (fpr, tpr)
            curves[f"{spec.name}_{release}"] = release_curves
            records.append(
                {
                    "pipeline": spec.name,
                    "release": release,
                    "generator": spec.generator,
                    "test_accuracy": float(saved["test_accuracy"][0]),
                    "shadow_test_accuracy_mean": float(np.mean(saved["test_accuracy"][1:])),
                    "epsilon": None if ledger is None else ledger["epsilon_pld"],
                    "epsilon_rdp": None if ledger is None else ledger["epsilon_rdp"],
                    "delta": None if ledger is None else float(target_delta),
                    "ledger": ledger,
                    "mia": attack_metrics,
                }
            )
    return records, curves
