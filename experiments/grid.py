"""The benchmark grid: its axes, its cells, and the presets smoke, cpu and paper.

The grid crosses dataset x generator x privacy level x sampling strategy x release strategy x
mitigation x seed. A preset is a `Grid`: per-dataset `Settings` (pool, shadows, delta, model
sizes) and one or more `Block`s, each a cartesian product over the axes that serves one of the
four questions of the benchmark report. Presets smaller than the full grid take a subset of
the product, and the report states which.

A `Cell` is one pipeline variant (`PipelineSpec`) on one dataset and seed. Its runs are the
target and every shadow membership mask, and cells of the same dataset and seed share those
masks, so they are attacked on the same members. The real-data baseline is one cell per
(dataset, seed, epsilon, mitigation) that every generator cell of the same seed is compared
with. A cell evaluates only the releases that its sampling strategy and mitigation can change:
a classifier-only mitigation leaves the synthetic set and the generator unchanged, so a cell
with that mitigation reports only its classifier release.

Every run of a generator family uses the PRNG key of (seed, family, mask), whatever its epsilon,
sampling strategy or mitigation. So cells that differ only in a classifier-stage mitigation
train the same generator and draw the same synthetic set, and their difference measures the
mitigation alone.

Presets:
  smoke: digits, a few cells, minutes on a 2-core CPU; the tests run a smaller version of it.
  cpu: the default; Fashion-MNIST on a subset of the grid sized to fit an hour on a 2-core CPU.
  mitigations: Fashion-MNIST on a small pool, with every sampling strategy and mitigation for
    the VAE, GAN and diffusion model at every privacy level; 84 minutes on a 2-core CPU.
  paper: the full grid at full scale, for GPUs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax

import ppds_jax
from experiments.config import ExperimentConfig
from ppds_jax import accounting, classifier, datasets, generators, membership
from ppds_jax.checkpoint import fingerprint as content_fingerprint
from ppds_jax.pipeline import PipelineSpec

RELEASES: tuple[str, ...] = (
    "real_classifier",
    "dp_real_classifier",
    "synthetic_classifier",
    "synthetic_data",
    "generator",
)
REAL_RELEASES = ("real_classifier", "dp_real_classifier")
GENERATOR_RELEASES = ("synthetic_classifier", "synthetic_data", "generator")
CLASSIFIER_RELEASES = ("real_classifier", "dp_real_classifier", "synthetic_classifier")
SYNTHETIC_SET_RELEASES = ("synthetic_classifier", "synthetic_data")

# Bump when a change of the code changes what a run computes for the same configuration, so
# that every checkpoint written before is recomputed rather than mixed with new results.
RUN_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A named change of a pipeline variant: a sampling strategy or a mitigation.

    Attributes:
      description: one line for the report.
      spec_overrides: `PipelineSpec` fields it sets, other than `classifier_config`.
      classifier_overrides: classifier options it sets.
      releases: the releases whose result it can change. A cell with this strategy evaluates
        only these releases, because its other releases equal those of the baseline cell.
    """

    description: str
    spec_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    classifier_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    releases: tuple[str, ...] = RELEASES


SAMPLINGS: dict[str, Strategy] = {
    "balanced": Strategy(
        "class-balanced synthetic set of the expected member count",
        releases=GENERATOR_RELEASES,
    ),
    "balanced_half": Strategy(
        "class-balanced synthetic set of half the expected member count",
        spec_overrides={"synthetic_multiplier": 0.5},
        releases=SYNTHETIC_SET_RELEASES,
    ),
    "balanced_4x": Strategy(
        "class-balanced synthetic set of 4 times the expected member count",
        spec_overrides={"synthetic_multiplier": 4.0},
        releases=SYNTHETIC_SET_RELEASES,
    ),
    "quality_filtered": Strategy(
        "twice as many candidates, keeping per class the half that a classifier trained on"
        " other synthetic samples labels most confidently",
        spec_overrides={"quality_filter": True, "filter_oversample": 2.0},
        releases=SYNTHETIC_SET_RELEASES,
    ),
}
DEFAULT_SAMPLING = "balanced"

MITIGATIONS: dict[str, Strategy] = {
    "none": Strategy("no mitigation"),
    "weight_decay": Strategy(
        "decoupled weight decay 0.1 in the classifier's AdamW",
        classifier_overrides={"weight_decay": 0.1},
        releases=CLASSIFIER_RELEASES,
    ),
    "label_smoothing": Strategy(
        "label smoothing 0.1 in the classifier's loss",
        classifier_overrides={"label_smoothing": 0.1},
        releases=CLASSIFIER_RELEASES,
    ),
    "early_stopping": Strategy(
        "early stopping with patience 2 on a held-out tenth of the classifier's training data"
        " (synthetic for synthetic variants); not for DP-SGD classifiers, whose selection"
        " would read private data outside the accounting",
        classifier_overrides={"early_stopping_patience": 2},
        releases=("real_classifier", "synthetic_classifier"),
    ),
    "privacy_filter": Strategy(
        "drop synthetic samples within the dataset's privacy_filter_threshold (pixel-space L2)"
        " of a private training image; not differentially private, so it voids the"
        " accounted epsilon of the synthetic set and the classifier trained on it",
        spec_overrides={"privacy_filter_threshold": None, "filter_oversample": 2.0},
        releases=SYNTHETIC_SET_RELEASES,
    ),
}
DEFAULT_MITIGATION = "none"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and models shared by every cell of one dataset.

    Attributes:
      pool_size: training examples that can be members; None uses the whole training split.
      test_size: test examples for accuracy; None uses the whole test split.
      population_size: real non-members the attacker holds, from outside the pool.
      num_shadows: shadow masks per cell, even and >= 4.
      target_delta: delta of every private release, at most 0.1 / expected member count.
      l2_norm_clip: per-example clip norm of every DP-SGD stage.
      inclusion_prob: probability that a pool example is a member of a run.
      classifier_config: options of every released classifier, before mitigations.
      generator_configs: family name -> options of that family.
      privacy_filter_threshold: pixel-space L2 distance of the privacy filter mitigation.
        Images in [-1, 1] with D pixels are at most 2 sqrt(D) apart (16 for 8x8 digits, 56
        for 28x28 images).
      data_dir: folder of the dataset's local files, or None for the default.
    """

    pool_size: int | None
    num_shadows: int
    target_delta: float
    test_size: int | None = None
    population_size: int = 1000
    l2_norm_clip: float = 1.0
    inclusion_prob: float = 0.5
    classifier_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    generator_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    privacy_filter_threshold: float = 1.0
    data_dir: str | None = None

    def __post_init__(self):
        if self.pool_size is not None and self.pool_size >= 2:
            public_size = membership.expected_member_count(self.pool_size, self.inclusion_prob)
            accounting.check_delta(self.target_delta, public_size)
        unknown = sorted(set(self.generator_configs) - set(generators.GENERATORS))
        if unknown:
            raise ValueError(
                f"generator_configs names unknown generator(s) {unknown}; known generators:"
                f" {list(generators.GENERATORS)}"
            )
        classifier.resolve_config(dict(self.classifier_config))
        for name, options in self.generator_configs.items():
            generators.resolve_config(generators.get_family(name), options)
        if not (
            math.isfinite(self.privacy_filter_threshold) and self.privacy_filter_threshold >= 0
        ):
            raise ValueError(
                f"privacy_filter_threshold={self.privacy_filter_threshold} must be a finite"
                " number >= 0"
            )


@dataclasses.dataclass(frozen=True)
class Block:
    """One cartesian product over the grid's axes.

    Attributes:
      question: which question of the report this block serves, one line.
      datasets: registry names in `ppds_jax.datasets.DATASETS`.
      generators: generator families; may be empty when `releases` has only real-data ones.
      epsilons: target epsilons, each > 0; `math.inf` is the non-private level.
      releases: release strategies, a subset of `RELEASES`. "real_classifier" adds the real-data
        baseline at epsilon inf and "dp_real_classifier" the DP-SGD one at finite epsilons.
      samplings: keys of `SAMPLINGS`.
      mitigations: keys of `MITIGATIONS`.
      seeds: seeds of the pool, masks and keys; several give a mean and standard deviation.
    """

    question: str
    datasets: tuple[str, ...]
    generators: tuple[str, ...]
    epsilons: tuple[float, ...]
    releases: tuple[str, ...] = RELEASES
    samplings: tuple[str, ...] = (DEFAULT_SAMPLING,)
    mitigations: tuple[str, ...] = (DEFAULT_MITIGATION,)
    seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self):
        _check_names("dataset", self.datasets, tuple(datasets.DATASETS))
        _check_names("generator", self.generators, generators.GENERATORS, allow_empty=True)
        _check_names("release", self.releases, RELEASES)
        _check_names("sampling strategy", self.samplings, tuple(SAMPLINGS))
        _check_names("mitigation", self.mitigations, tuple(MITIGATIONS))
        if not self.epsilons:
            raise ValueError("a block needs at least one epsilon")
        for epsilon in self.epsilons:
            if not epsilon > 0:  # Also rejects NaN.
                raise ValueError(f"epsilon={epsilon} must be > 0 (math.inf for no privacy)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty tuple of distinct ints")
        if not self.generators and not set(self.releases) <= set(REAL_RELEASES):
            raise ValueError(
                f"releases {sorted(set(self.releases) - set(REAL_RELEASES))} need a generator;"
                " the block names none"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the non-private epsilon is written as None."""
        values = dataclasses.asdict(self)
        values["epsilons"] = [None if math.isinf(e) else e for e in self.epsilons]
        return values


def _check_names(kind: str, names, known, *, allow_empty: bool = False) -> None:
    if not names and not allow_empty:
        raise ValueError(f"a block needs at least one {kind}; known: {list(known)}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r}; known: {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names {list(names)} repeat a name")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One pipeline variant on one dataset and seed, run on the target and shadow masks.

    Attributes:
      dataset: registry name.
      seed: seed of the pool, masks and keys.
      generator: family name, or None for the real-data classifier.
      epsilon: target epsilon; `math.inf` for a non-private variant.
      sampling: key of `SAMPLINGS`, or None for the real-data classifier.
      mitigation: key of `MITIGATIONS`.
      releases: the releases this cell evaluates, in `RELEASES` order.
      experiment: the experiment configuration with this cell's one pipeline.
    """

    dataset: str
    seed: int
    generator: str | None
    epsilon: float
    sampling: str | None
    mitigation: str
    releases: tuple[str, ...]
    experiment: ExperimentConfig

    @property
    def name(self) -> str:
        """Folder and command-line name, for example "digits-vae-eps10-balanced-none-seed0"."""
        parts = [self.dataset, self.generator or "real", f"eps{self.epsilon:g}"]
        if self.sampling is not None:
            parts.append(self.sampling)
        parts += [self.mitigation, f"seed{self.seed}"]
        return "-".join(parts)

    @property
    def spec(self) -> PipelineSpec:
        """The cell's pipeline variant."""
        return self.experiment.pipelines[0]

    @property
    def num_masks(self) -> int:
        """Runs of the cell: the target mask and every shadow mask."""
        return self.experiment.num_shadows + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready axes and configuration of the cell."""
        return {
            "name": self.name,
            "dataset": self.dataset,
            "seed": self.seed,
            "generator": self.generator,
            "epsilon": None if math.isinf(self.epsilon) else self.epsilon,
            "sampling": self.sampling,
            "mitigation": self.mitigation,
            "releases": list(self.releases),
            "experiment": self.experiment.to_dict(),
        }

    def run_fingerprint(self, mask_index: int) -> str:
        """Fingerprint of everything that determines the run on mask `mask_index`.

        It covers the dataset, pool, masks, population, test subset, privacy parameters and
        the pipeline variant with its options resolved against the current defaults, but not
        the cell's name. So renaming a cell keeps its runs, and a change of a family's
        default options recomputes them.
        """
        experiment = self.experiment.to_dict()
        experiment.pop("description")
        spec = dict(experiment.pop("pipelines")[0])
        spec.pop("name")
        spec["classifier_config"] = classifier.resolve_config(dict(self.spec.classifier_config))
        if self.generator is not None:
            family = generators.get_family(self.generator)
            spec["generator_config"] = generators.resolve_config(family, self.spec.generator_config)
        return content_fingerprint(
            {
                "format": RUN_FORMAT_VERSION,
                "package_version": ppds_jax.__version__,
                "experiment": experiment,
                "spec": spec,
                "mask_index": mask_index,
                # The releases decide which attack signals a run records.
                "releases": list(self.releases),
            }
        )

    def fingerprint(self) -> str:
        """Fingerprint of the cell's evaluation: its runs' fingerprints and its releases."""
        runs = [self.run_fingerprint(index) for index in range(self.num_masks)]
        return content_fingerprint({"runs": runs, "releases": list(self.releases)})

    def run_key(self, mask_index: int):
        """PRNG key of the run on mask `mask_index`, shared by cells of the same family."""
        family = (self.generator or "real").encode()
        key = jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(family) & 0x7FFFFFFF)
        return jax.random.fold_in(key, mask_index)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A benchmark preset: per-dataset settings and the blocks of cells to run.

    Attributes:
      name: preset name, for example "cpu".
      description: what the preset runs, its command, runtime and expected result, for the
        report.
      settings: dataset name -> `Settings`; every dataset of every block needs an entry.
      blocks: the products of axes whose cells the grid runs.
    """

    name: str
    description: str
    settings: Mapping[str, Settings]
    blocks: tuple[Block, ...]

    def __post_init__(self):
        if not self.blocks:
            raise ValueError(f"grid {self.name!r} has no blocks")
        for block in self.blocks:
            for dataset in block.datasets:
                if dataset not in self.settings:
                    raise ValueError(
                        f"grid {self.name!r} has no settings for dataset {dataset!r}; datasets"
                        f" with settings: {sorted(self.settings)}"
                    )
        self.cells()  # Builds every PipelineSpec, so invalid options fail here.

    def cells(self) -> tuple[Cell, ...]:
        """Return every cell of the grid once, grouped by dataset and seed."""
        merged: dict[str, Cell] = {}
        for block in self.blocks:
            for cell in _block_cells(block, self.settings):
                previous = merged.get(cell.name)
                if previous is not None:
                    releases = tuple(
                        r for r in RELEASES if r in previous.releases or r in cell.releases
                    )
                    cell = dataclasses.replace(previous, releases=releases)
                merged[cell.name] = cell
        return tuple(sorted(merged.values(), key=lambda c: (c.dataset, c.seed, _order(c))))

    def cell(self, name: str) -> Cell:
        """Look up the cell called `name`.

        Raises:
          ValueError: no such cell; the message lists a few names.
        """
        cells = {cell.name: cell for cell in self.cells()}
        if name not in cells:
            examples = ", ".join(list(cells)[:5])
            raise ValueError(
                f"grid {self.name!r} has no cell {name!r}; it has {len(cells)} cells, for"
                f" example {examples}; list them with --list"
            )
        return cells[name]

    def block_cells(self, block: Block) -> tuple[Cell, ...]:
        """Return the cells that `block` contributes, before merging with other blocks."""
        return tuple(_block_cells(block, self.settings))

    def full_grid(self) -> Grid:
        """Build the grid of one block that crosses every value of every axis used here.

        A preset's blocks cover a subset of it; the report states both sizes.
        """
        axes = self.axes()
        block = Block(
            question="the full product of the axes", **{k: tuple(v) for k, v in axes.items()}
        )
        return dataclasses.replace(self, name=f"{self.name} (full)", blocks=(block,))

    def axes(self) -> dict[str, list]:
        """Values each axis takes anywhere in the grid, in first-seen order."""
        axes: dict[str, list] = {
            "datasets": [],
            "generators": [],
            "epsilons": [],
            "samplings": [],
            "releases": [],
            "mitigations": [],
            "seeds": [],
        }
        for block in self.blocks:
            for axis, values in axes.items():
                for value in getattr(block, axis):
                    if value not in values:
                        values.append(value)
        return axes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, written to benchmark.json."""
        return {
            "name": self.name,
            "description": self.description,
            "settings": {name: dataclasses.asdict(s) for name, s in self.settings.items()},
            "blocks": [block.to_dict() for block in self.blocks],
        }

    def fingerprint(self) -> str:
        """Fingerprint of the whole grid, to detect a folder used by another configuration."""
        return content_fingerprint(
            {"grid": self.to_dict(), "cells": [cell.fingerprint() for cell in self.cells()]}
        )


def _order(cell: Cell) -> tuple:
    # Mitigations that change the synthetic set come after those that reuse it, so a run's
    # `StageCache` still keeps the set when the classifier-only cells ask for it.
    changes_set = bool(MITIGATIONS[cell.mitigation].spec_overrides)
    return (
        cell.generator is not None,
        cell.generator or "",
        cell.epsilon,
        cell.sampling or "",
        changes_set,
        cell.mitigation,
    )


def _block_cells(block: Block, settings: Mapping[str, Settings]):
    for dataset, seed, epsilon, mitigation in itertools.product(
        block.datasets, block.seeds, block.epsilons, block.mitigations
    ):
        real_release = "real_classifier" if math.isinf(epsilon) else "dp_real_classifier"
        releases = _cell_releases((real_release,), block, None, mitigation)
        if releases:
            yield _make_cell(dataset, seed, None, epsilon, None, mitigation, releases, settings)
        for generator, sampling in itertools.product(block.generators, block.samplings):
            releases = _cell_releases(GENERATOR_RELEASES, block, sampling, mitigation)
            if releases:
                yield _make_cell(
                    dataset, seed, generator, epsilon, sampling, mitigation, releases, settings
                )


def _cell_releases(candidates, block: Block, sampling, mitigation) -> tuple[str, ...]:
    releases = [r for r in candidates if r in block.releases]
    if sampling is not None and sampling != DEFAULT_SAMPLING:
        releases = [r for r in releases if r in SAMPLINGS[sampling].releases]
    if mitigation != DEFAULT_MITIGATION:
        releases = [r for r in releases if r in MITIGATIONS[mitigation].releases]
    return tuple(releases)


def _make_cell(dataset, seed, generator, epsilon, sampling, mitigation, releases, settings):
    dataset_settings = settings[dataset]
    mitigation_strategy = MITIGATIONS[mitigation]
    spec_fields: dict[str, Any] = {}
    classifier_config = dict(dataset_settings.classifier_config)
    strategies = [mitigation_strategy]
    if sampling is not None:
        strategies.insert(0, SAMPLINGS[sampling])

    for strategy in strategies:
        spec_fields.update(strategy.spec_overrides)
        classifier_config.update(strategy.classifier_overrides)
    if "privacy_filter_threshold" in spec_fields:
        spec_fields["privacy_filter_threshold"] = dataset_settings.privacy_filter_threshold

    private = not math.isinf(epsilon)
    spec = PipelineSpec(
        name=f"{generator or 'real'}-eps{epsilon:g}",
        generator=generator,
        epsilon=epsilon if private else None,
        generator_config=dict(dataset_settings.generator_configs.get(generator, {}))
        if generator
        else {},
        classifier_config=classifier_config,
        **spec_fields,
    )
    experiment = ExperimentConfig(
        dataset=dataset,
        pipelines=(spec,),
        pool_size=dataset_settings.pool_size,
        test_size=dataset_settings.test_size,
        population_size=dataset_settings.population_size,
        num_shadows=dataset_settings.num_shadows,
        seed=seed,
        target_delta=dataset_settings.target_delta,
        l2_norm_clip=dataset_settings.l2_norm_clip,
        inclusion_prob=dataset_settings.inclusion_prob,
        data_dir=dataset_settings.data_dir,
    )
    return Cell(
        dataset=dataset,
        seed=seed,
        generator=generator,
        epsilon=float(epsilon),
        sampling=sampling,
        mitigation=mitigation,
        releases=releases,
        experiment=experiment,
    )


# --- presets ----------------------------------------------------------------------------------

_QUESTION_REPLACE = "1 and 4: synthetic against real classifiers, generators per epsilon"
_QUESTION_MITIGATE = "3: mitigations against no mitigation"
_QUESTION_SAMPLE = "3: sampling strategies against class-balanced sampling"


def smoke() -> Grid:
    """Smoke preset: digits, a few small cells, every stage of the benchmark.

    Command: `python -m experiments.benchmark --preset smoke --out runs/smoke`
    Runtime: 114 s measured on an otherwise idle 2-core CPU (12 cells, 60 pipeline runs);
    the report's runtime table gives the measured time per run.
    Expected result: every section of the report filled in. Non-private classifiers are well
    above the 10% chance accuracy and private ones are near it on a pool this small. Attack
    TPRs at 0.1% FPR are a few percent at most.
    """
    digits = Settings(
        pool_size=600,
        num_shadows=4,
        target_delta=1e-5,
        population_size=300,
        classifier_config={"num_epochs": 6, "batch_size": 64, "features": (8, 16), "hidden": 32},
        generator_configs={
            "vae": {"num_epochs": 20, "batch_size": 64, "hidden": 128},
            "dp_merf": {"num_epochs": 20},
        },
        # NOTE: a guess at the distance of near-copies, not calibrated on digits.
        privacy_filter_threshold=2.0,
    )
    return Grid(
        name="smoke",
        description=(
            "Smoke preset on digits (a pool of 600 images, 4 shadow masks, two seeds): real"
            " data against the VAE at epsilon 10 and inf and DP-MERF at epsilon 10, every"
            " release strategy, and weight decay on the real-data classifier as the one"
            " mitigation. Command: python -m experiments.benchmark --preset smoke --out"
            " runs/smoke."
        ),
        settings={"digits": digits},
        blocks=(
            Block(
                question=_QUESTION_REPLACE + ", release strategies",
                datasets=("digits",),
                generators=("vae",),
                epsilons=(10.0, math.inf),
            ),
            Block(
                question=_QUESTION_REPLACE,
                datasets=("digits",),
                generators=("dp_merf",),
                epsilons=(10.0,),
                releases=GENERATOR_RELEASES,
            ),
            Block(
                question=_QUESTION_MITIGATE,
                datasets=("digits",),
                generators=(),
                epsilons=(math.inf,),
                releases=("real_classifier",),
                mitigations=("weight_decay",),
            ),
        ),
    )


def cpu() -> Grid:
    """CPU preset, the default: Fashion-MNIST on a subset of the grid.

    Command: `python -m experiments.benchmark --out runs/cpu`
    Runtime: 36.5 minutes measured on an otherwise idle 2-core CPU, for 32 cells and 160
    pipeline runs (docs/results/grid_cpu/report.md). The report's runtime table gives the
    measured time per run.
    Expected result: the real-data classifier near 80% accuracy, synthetic ones lower, and
    private ones lower still at epsilon 1. Attack TPRs at 0.1% FPR are a few percent at most.
    """
    classifier_config = {"num_epochs": 5, "batch_size": 128, "features": (16, 32), "hidden": 64}
    fashion_mnist = Settings(
        pool_size=3000,
        num_shadows=4,
        target_delta=1e-5,
        test_size=2000,
        population_size=1000,
        classifier_config=classifier_config,
        generator_configs={
            "vae": {"num_epochs": 20},
            "dp_merf": {"num_epochs": 10},
            "gan": {"num_epochs": 10},
        },
        # NOTE: a guess at the distance of near-copies, not calibrated on Fashion-MNIST.
        privacy_filter_threshold=6.0,
    )
    return Grid(
        name="cpu",
        description=(
            "CPU preset on Fashion-MNIST (a pool of 3,000 training images, 4 shadow masks, two"
            " seeds): real data against VAE, DP-MERF and GAN at epsilon 1, 10 and inf with"
            " every release strategy. Weight decay and the privacy filter as mitigations and"
            " 4x sampling are run on the VAE and the real-data classifier at epsilon inf only."
            " The diffusion model, the other mitigations and sampling strategies, and the"
            " mitigations under DP are left to the paper preset. Command: python -m"
            " experiments.benchmark --out runs/cpu."
        ),
        settings={"fashion_mnist": fashion_mnist},
        blocks=(
            Block(
                question=_QUESTION_REPLACE + ", release strategies",
                datasets=("fashion_mnist",),
                generators=("vae", "dp_merf", "gan"),
                epsilons=(1.0, 10.0, math.inf),
            ),
            Block(
                question=_QUESTION_MITIGATE,
                datasets=("fashion_mnist",),
                generators=("vae",),
                epsilons=(math.inf,),
                mitigations=("weight_decay", "privacy_filter"),
            ),
            Block(
                question=_QUESTION_SAMPLE,
                datasets=("fashion_mnist",),
                generators=("vae",),
                epsilons=(math.inf,),
                samplings=("balanced_4x",),
            ),
        ),
    )


def mitigations() -> Grid:
    """Mitigations preset: every sampling strategy and mitigation on Fashion-MNIST, CPU-sized.

    Command: `python -m experiments.benchmark --preset mitigations --out runs/mitigations`
    Runtime: 84 minutes on a 2-core CPU in two invocations, for 85 cells and 425 pipeline
    runs. The report's runtime table sums 79 minutes of runs, about three quarters of them in
    the diffusion cells.
    Expected result (docs/results/grid_mitigations/report.md): the GAN's synthetic classifier
    comes closest to the real-data one (0.60 against 0.71 at epsilon inf) and beats the DP-SGD
    one at epsilon 10; the VAE and the diffusion model, trained for a few hundred steps, trail
    far behind. With 300 members and 300 non-members, a TPR at 0.1% FPR rests on one or two
    examples, so its changes come in steps of 1/300 and most mitigation verdicts are noise.
    """
    classifier_config = {"num_epochs": 5, "batch_size": 64, "features": (16, 32), "hidden": 64}
    fashion_mnist = Settings(
        pool_size=600,
        num_shadows=4,
        target_delta=1e-5,
        test_size=2000,
        population_size=1000,
        classifier_config=classifier_config,
        generator_configs={
            "vae": {"num_epochs": 30, "batch_size": 64},
            "gan": {"num_epochs": 20, "batch_size": 64},
            "dp_merf": {"num_epochs": 10},
            # Per member set the grid samples about 9.5 times the member count, so sampling
            # dominates. Ten DDIM steps without guidance cost a tenth of the defaults.
            "diffusion": {
                "num_epochs": 40,
                "batch_size": 64,
                "num_sampling_steps": 10,
                "guidance_scale": 0.0,
                "sampling_batch_size": 500,
            },
        },
        # NOTE: a guess at the distance of near-copies, not calibrated on Fashion-MNIST.
        privacy_filter_threshold=6.0,
    )
    families = ("vae", "gan", "diffusion")
    epsilons = (1.0, 10.0, math.inf)
    return Grid(
        name="mitigations",
        description=(
            "Mitigations preset on Fashion-MNIST (a pool of 600 training images, 4 shadow"
            " masks, one seed): the VAE, GAN and diffusion model at epsilon 1, 10 and inf with"
            " every release strategy, every sampling strategy (synthetic set of 0.5, 1 and 4"
            " times the expected member count, class-balanced, quality filter) and every"
            " mitigation (weight decay, label smoothing, early stopping on synthetic"
            " validation data, privacy filter, and DP-SGD for the real-data classifier), each"
            " against the class-balanced, unmitigated cell. DP-MERF is run without"
            " mitigations so that every family has a fidelity and accuracy figure. Cells that"
            " differ only in a classifier-stage option reuse one trained generator and"
            " synthetic set. Command: python -m experiments.benchmark --preset mitigations"
            " --out runs/mitigations."
        ),
        settings={"fashion_mnist": fashion_mnist},
        blocks=(
            Block(
                question=_QUESTION_REPLACE + ", release strategies",
                datasets=("fashion_mnist",),
                generators=(*families, "dp_merf"),
                epsilons=epsilons,
                seeds=(0,),
            ),
            Block(
                question=_QUESTION_SAMPLE,
                datasets=("fashion_mnist",),
                generators=families,
                epsilons=epsilons,
                samplings=("balanced_half", "balanced_4x", "quality_filtered"),
                seeds=(0,),
            ),
            Block(
                question=_QUESTION_MITIGATE,
                datasets=("fashion_mnist",),
                generators=families,
                epsilons=epsilons,
                mitigations=("weight_decay", "label_smoothing", "early_stopping", "privacy_filter"),
                seeds=(0,),
            ),
        ),
    )


def paper() -> Grid:
    """Paper preset: the full grid at full scale, for GPUs.

    Command: `python -m experiments.benchmark --preset paper --out runs/paper`
    Runtime: an estimate of several hundred GPU-hours (3 datasets, 4 generators, 3 privacy
    levels, 3 sampling strategies, 5 mitigations, 3 seeds, 16 shadow masks each); not measured.
    Expected result: the synthetic-data accuracies of DPImageBench's small synthesizers as a
    reference (Fashion-MNIST at epsilon 10: DP-MERF near 62%, DP-GAN near 70%, DPDM near 86%),
    and sharper low-FPR attack figures than the CPU preset.
    """
    classifier_config = {"num_epochs": 20, "batch_size": 256, "features": (32, 64), "hidden": 128}
    generator_configs = {
        "vae": {"num_epochs": 100, "batch_size": 256},
        "gan": {"num_epochs": 100, "batch_size": 256},
        "dp_merf": {"num_epochs": 50},
        "diffusion": {"num_epochs": 100, "channels": 64, "channel_mults": (1, 2, 2)},
    }

    def full(threshold: float) -> Settings:
        # The whole training split is the pool: 30,000 expected members for the 60,000
        # images of Fashion-MNIST and MNIST, and delta must be at most 0.1 / 30,000.
        return Settings(
            pool_size=None,
            num_shadows=16,
            target_delta=3e-6,
            population_size=5000,
            classifier_config=classifier_config,
            generator_configs=generator_configs,
            privacy_filter_threshold=threshold,
        )

    datasets_names = ("fashion_mnist", "mnist", "cifar10")
    return Grid(
        name="paper",
        description=(
            "Paper preset: the full grid on Fashion-MNIST, MNIST and CIFAR-10 with the whole"
            " training split as the pool, 16 shadow masks and three seeds. Command: python -m"
            " experiments.benchmark --preset paper --out runs/paper."
        ),
        settings={
            "fashion_mnist": full(6.0),
            "mnist": full(6.0),
            "cifar10": full(12.0),
        },
        blocks=(
            Block(
                question="all four: the full product of the axes",
                datasets=datasets_names,
                generators=generators.GENERATORS,
                epsilons=(1.0, 10.0, math.inf),
                samplings=tuple(SAMPLINGS),
                mitigations=tuple(MITIGATIONS),
                seeds=(0, 1, 2),
            ),
        ),
    )


PRESETS = {"smoke": smoke, "cpu": cpu, "mitigations": mitigations, "paper": paper}
