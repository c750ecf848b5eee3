"""Registry of membership-inference attacks and the releases each one fits.

Release kinds, as `ppds_jax.pipeline.PipelineSpec.releases` names them:

- "real_classifier": a classifier trained on the real members without DP;
- "dp_real_classifier": a classifier trained on the real members with DP-SGD;
- "synthetic_classifier": a classifier trained on a synthetic set, released alone;
- "synthetic_data": the synthetic set itself;
- "generator": the trained generator. An attacker with the generator can also sample a
  synthetic set, so every synthetic-data attack fits it too.

`min_reference_models` is the minimum number of reference (shadow) pipelines with which the
attack runs at all, assuming that each query is IN exactly half of them where the attack needs
IN models. More are better. Per-example variances are noisy with few models, so the
fixed-variance LiRA variants suit small numbers of reference pipelines.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from ppds_jax.attacks import density, distance, lira, loss_threshold, rmia

RELEASES = (
    "real_classifier",
    "dp_real_classifier",
    "synthetic_classifier",
    "synthetic_data",
    "generator",
)
_CLASSIFIER_RELEASES = ("real_classifier", "dp_real_classifier", "synthetic_classifier")
_SYNTHETIC_RELEASES = ("synthetic_data", "generator")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack and what it needs.

    Attributes:
      name: registry key.
      releases: release kinds the attack fits, a subset of `RELEASES`.
      min_reference_models: minimum number of reference pipelines it runs with (0 = none).
      description: one line for reports, naming the paper.
      score_fn: the function from signals to scores (N,), higher meaning "more likely a
        member"; see its docstring for the arguments.
      signal: what the attacker measures on each query and feeds to `score_fn`.
    """

    name: str
    releases: tuple[str, ...]
    min_reference_models: int
    description: str
    score_fn: Callable
    signal: str


_LOGIT_CONFIDENCE = "signals.logit_confidence of the released classifier's logits"
_TRUE_CLASS_PROBABILITY = "signals.true_class_probability of the released classifier's logits"

ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec(
            name="loss_threshold",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=0,
            description="Global threshold on the per-example loss (Yeom et al., 2018)",
            score_fn=loss_threshold.loss_threshold,
            signal="signals.per_example_loss of the released classifier's logits",
        ),
        AttackSpec(
            name="lira_online",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=4,
            description="LiRA online, per-example IN and OUT Gaussians (Carlini et al., 2022)",
            score_fn=lira.lira_online,
            signal=_LOGIT_CONFIDENCE,
        ),
        AttackSpec(
            name="lira_offline",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=2,
            description="LiRA offline, per-example OUT Gaussian (Carlini et al., 2022)",
            score_fn=lira.lira_offline,
            signal=_LOGIT_CONFIDENCE,
        ),
        AttackSpec(
            name="lira_online_fixed_variance",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=2,
            description="LiRA online with one global variance (Carlini et al., 2022)",
            score_fn=functools.partial(lira.lira_online, fixed_variance=True),
            signal=_LOGIT_CONFIDENCE,
        ),
        AttackSpec(
            name="lira_offline_fixed_variance",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=1,
            description="LiRA offline with one global variance (Carlini et al., 2022)",
            score_fn=functools.partial(lira.lira_offline, fixed_variance=True),
            signal=_LOGIT_CONFIDENCE,
        ),
        AttackSpec(
            name="rmia",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=2,
            description="RMIA online, likelihood ratio against population samples"
            " (Zarifzadeh et al., 2024)",
            score_fn=rmia.rmia,
            signal=_TRUE_CLASS_PROBABILITY,
        ),
        AttackSpec(
            name="rmia_offline",
            releases=_CLASSIFIER_RELEASES,
            min_reference_models=1,
            description="RMIA offline with the linear approximation of Pr(x)"
            " (Zarifzadeh et al., 2024)",
            score_fn=rmia.rmia_offline,
            signal=_TRUE_CLASS_PROBABILITY,
        ),
        AttackSpec(
            name="gan_leaks_pixel",
            releases=_SYNTHETIC_RELEASES,
            min_reference_models=0,
            description="Nearest-neighbour L2 distance in pixel space, calibrated when"
            " reference sets exist (GAN-Leaks full black-box, Chen et al., 2020)",
            score_fn=distance.gan_leaks,
            signal="distance.nearest_neighbor_distances of flattened pixels to the synthetic set",
        ),
        AttackSpec(
            name="gan_leaks_feature",
            releases=_SYNTHETIC_RELEASES,
            min_reference_models=0,
            description="Nearest-neighbour L2 distance in an embedding space, calibrated when"
            " reference sets exist (GAN-Leaks full black-box, Chen et al., 2020)",
            score_fn=distance.gan_leaks,
            signal="distance.nearest_neighbor_distances of fixed-network embeddings to the"
            " synthetic set",
        ),
        AttackSpec(
            name="domias",
            releases=_SYNTHETIC_RELEASES,
            min_reference_models=0,
            description="Log ratio of synthetic to reference kernel density estimates after"
            " PCA (DOMIAS, van Breugel et al., 2023)",
            score_fn=density.domias,
            signal="features of the queries, the synthetic set and real non-members",
        ),
        AttackSpec(
            name="synthetic_lira",
            releases=_SYNTHETIC_RELEASES,
            min_reference_models=4,
            description="LiRA online on a classifier that the attacker trains on the released"
            " synthetic set",
            score_fn=lira.lira_online,
            signal="signals.logit_confidence of a classifier trained by the attacker on each"
            " pipeline's synthetic set",
        ),
        AttackSpec(
            name="white_box_loss",
            releases=("generator",),
            min_reference_models=4,
            description="The generator's own member score (for example its training loss),"
            " calibrated per example with LiRA online",
            score_fn=lira.lira_online,
            signal="GeneratorFamily.member_scores of the released generator",
        ),
    )
}


def attacks_for_release(release: str) -> tuple[str, ...]:
    """Names of the attacks that fit `release`, in registry order.

    Raises:
      ValueError: `release` is not one of `RELEASES`.
    """
    _check_release(release)
    return tuple(name for name, spec in ATTACKS.items() if release in spec.releases)


def check_attack(name: str, release: str, num_reference_models: int) -> AttackSpec:
    """Return the spec of attack `name` after checking that it can run on `release`.

    Raises:
      ValueError: the attack or the release is unknown, and the message lists the known ones.
        The attack does not fit the release, and the message lists those that do. Or there
        are fewer reference models than the attack's minimum, which the message states.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known attacks: {sorted(ATTACKS)}")
    _check_release(release)
    spec = ATTACKS[name]
    if release not in spec.releases:
        raise ValueError(
            f"attack {name!r} does not fit release {release!r}; attacks that fit it:"
            f" {list(attacks_for_release(release))}"
        )
    if num_reference_models < spec.min_reference_models:
        raise ValueError(
            f"attack {name!r} needs >= {spec.min_reference_models} reference model(s); got"
            f" num_reference_models={num_reference_models}"
        )
    return spec


def _check_release(release: str) -> None:
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; known releases: {list(RELEASES)}")
