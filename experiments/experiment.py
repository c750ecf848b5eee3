"""Run one experiment: every pipeline variant on the target and shadow masks, then the attacks.

`run(config, workdir)` is what the command line and the tests call. The run folder gets:
  config.json            the configuration and its fingerprint
  signals/NAME/M.npz     what an attacker observes of pipeline NAME on mask M (0 = target)
  ledgers/NAME.json      the privacy ledger of each private target release
  fidelity/NAME.json     the fidelity proxy of the target's synthetic set (generator variants)
  timings.json           wall-clock seconds of each (variant, mask) run, kept across resumes
  metrics.json           one record per released artefact
  report.md, *.png       the results table, ROC curves and sample grids
A finished (variant, mask) pair is never recomputed when resuming.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments.config import ExperimentConfig
from ppds_jax import (
    classifier,
    datasets,
    evaluation,
    fidelity,
    membership,
    plots,
    report,
    shadow_training,
)
from ppds_jax.generators.base import PrivacySpec
from ppds_jax.pipeline import PipelineOutput, PipelineSpec, collect_signals, run_pipeline

log = logging.getLogger("ppds_jax.experiment")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run as requested."""


def prepare_workdir(config: ExperimentConfig, workdir: Path, *, resume: bool) -> None:
    """Create the run folder, or check that an existing one may be reused.

    Raises:
      RunFolderError: the folder contains a run with another config, or a finished run and
        `resume` is False. Nothing in the folder is changed in either case.
    """
    config_path = workdir / "config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved.get("fingerprint") != config.fingerprint():
            raise RunFolderError(
                f"{workdir} contains a run with another configuration (fingerprint "
                f"{saved.get('fingerprint')} != {config.fingerprint()}); choose another --out"
            )
        if not resume:
            raise RunFolderError(
                f"{workdir} already contains a run of this configuration; pass --resume to "
                "finish or reuse it, or choose another --out"
            )
    elif workdir.exists() and any(workdir.iterdir()):
        raise RunFolderError(
            f"{workdir} is not empty and contains no ppds_jax run; choose another --out"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": config.fingerprint(), "config": config.to_dict()}
    _write_json_atomically(config_path, record)


def _write_json_atomically(path: Path, value) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(temporary, path)


def _save_npz_atomically(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def split_pool(data: datasets.Dataset, config: ExperimentConfig):
    """Split the training split into the membership pool and the attacker's population data.

    The pool is a stratified subset of `config.pool_size` training examples chosen by the seed.
    The population is up to `config.population_size` of the remaining training examples, which
    no pipeline trains on. When the pool is the whole training split, the population comes
    from the test split instead; the attacker only queries it, so no choice reads it.

    Returns:
      ((pool_images, pool_labels), (population_images, population_labels)).
    """
    train_size = len(data.train_labels)
    pool_size = config.pool_size or train_size
    if pool_size > train_size:
        raise ValueError(
            f"pool_size={pool_size} exceeds the {train_size} training examples of {data.name}"
        )
    rng = np.random.default_rng([config.seed, 1])
    if pool_size < train_size:
        pool_index = datasets.stratified_indices(
            data.train_labels, size=pool_size, seed=config.seed
        )
        rest = np.setdiff1d(np.arange(train_size), pool_index)
        population_source = (data.train_images[rest], data.train_labels[rest])
    else:
        pool_index = np.arange(train_size)
        population_source = (data.test_images, data.test_labels)
    count = min(config.population_size, len(population_source[1]))
    chosen = np.sort(rng.choice(len(population_source[1]), size=count, replace=False))
    pool = (data.train_images[pool_index], data.train_labels[pool_index])
    return pool, (population_source[0][chosen], population_source[1][chosen])


def _signals_path(workdir: Path, spec: PipelineSpec, mask_index: int) -> Path:
    return workdir / "signals" / spec.name / f"{mask_index}.npz"


def _trains_classifiers_together(spec: PipelineSpec, shadow_strategy: str) -> bool:
    if shadow_strategy == "separate" or spec.generator is not None:
        return False
    return classifier.resolve_config(dict(spec.classifier_config))["early_stopping_patience"] == 0


def _real_classifier_outputs(
    config, spec, masks, pending, pool, num_classes, public_size, shadow_strategy
) -> dict[int, PipelineOutput]:
    """Train the real-data classifiers of `pending` masks in one `train_classifiers` call.

    Each classifier gets the key that `run_pipeline` gives its classifier stage, so with the
    "sequential" strategy the outputs equal those of one `run_pipeline` call per mask.
    """
    keys = []
    for mask_index in pending:
        pipeline_key, _ = jax.random.split(_pipeline_key(config.seed, spec, mask_index))
        keys.append(jax.random.split(pipeline_key, 3)[2])
    privacy = None
    if spec.epsilon is not None:
        privacy = PrivacySpec(
            target_epsilon=spec.epsilon,
            target_delta=config.target_delta,
            dataset_size=public_size,
            l2_norm_clip=config.l2_norm_clip,
        )
    results = shadow_training.train_classifiers(
        jax.numpy.stack(keys),
        pool[0],
        pool[1],
        masks[pending],
        num_classes=num_classes,
        config=dict(spec.classifier_config),
        privacy=privacy,
        strategy=shadow_strategy,
    )
    return {
        mask_index: PipelineOutput(spec=spec, classifier=result, ledger=result.ledger)
        for mask_index, result in zip(pending, results, strict=True)
    }


def _pipeline_key(seed: int, spec: PipelineSpec, mask_index: int):
    # Keys depend on the variant's name, not its position, so adding a variant to a config
    # leaves the others' results unchanged.
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(spec.name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, mask_index)


SHADOW_STRATEGIES = ("auto", "sequential", "vmap", "separate")


def run(
    config: ExperimentConfig,
    workdir,
    *,
    resume: bool = False,
    progress: bool = True,
    shadow_strategy: str = "auto",
):
    """Run the experiment into `workdir` and return the metrics records.

    Args:
      config: the experiment.
      workdir: the run folder.
      resume: reuse a run folder of the same configuration, computing only what is missing.
      progress: show progress bars.
      shadow_strategy: how the classifiers of real-data variants (without early stopping) are
        trained on the target and shadow masks. "separate" runs `run_pipeline` per mask, and the
        others train them in one `shadow_training.train_classifiers` call with that strategy
        ("auto" picks "sequential" on a CPU and "vmap" on an accelerator). "sequential" gives
        exactly the results of "separate"; "vmap" agrees up to float rounding. Generator
        variants always run one pipeline per mask.

    Raises:
      RunFolderError: see `prepare_workdir`.
      ValueError: an unknown `shadow_strategy`.
    """
    if shadow_strategy not in SHADOW_STRATEGIES:
        raise ValueError(f"{shadow_strategy=} is unknown; expected one of {SHADOW_STRATEGIES}")
    workdir = Path(workdir)
    started = time.perf_counter()
    # Data problems (a missing folder, a corrupt file) surface before the run folder exists.
    data = datasets.load_dataset(
        config.dataset, data_dir=config.data_dir, test_size=config.test_size, seed=config.seed
    )
    prepare_workdir(config, workdir, resume=resume)
    log.info("experiment %s into %s on %s", config.fingerprint(), workdir, jax.devices())
    pool, population = split_pool(data, config)
    pool_images, pool_labels = pool
    population_images, population_labels = population
    target_mask, shadow_masks = membership.membership_masks(
        seed=config.seed,
        pool_size=len(pool_images),
        num_shadows=config.num_shadows,
        inclusion_prob=config.inclusion_prob,
    )
    masks = np.concatenate([target_mask[None], shadow_masks])
    public_size = membership.expected_member_count(len(pool_images), config.inclusion_prob)
    log.info(
        "%s: pool %d, test %d, %d shadows, public dataset size %d",
        data.name,
        len(pool_images),
        len(data.test_images),
        config.num_shadows,
        public_size,
    )

    extractor = FidelityExtractor(config.seed, pool_images, pool_labels, data.num_classes)
    timings_path = workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    bar = tqdm(
        total=len(config.pipelines) * len(masks),
        desc="pipelines",
        disable=not progress,
        unit="run",
    )
    for spec in config.pipelines:
        pending = [m for m in range(len(masks)) if not _signals_path(workdir, spec, m).exists()]
        bar.update(len(masks) - len(pending))
        batched = {}
        if len(pending) >= 2 and _trains_classifiers_together(spec, shadow_strategy):
            bar.set_postfix_str(f"{spec.name} masks {pending[0]}-{pending[-1]} together")
            tic = time.perf_counter()
            batched = _real_classifier_outputs(
                config, spec, masks, pending, pool, data.num_classes, public_size, shadow_strategy
            )
            seconds_each = (time.perf_counter() - tic) / len(pending)
        for mask_index in pending:
            bar.set_postfix_str(f"{spec.name} mask {mask_index}")
            tic = time.perf_counter()
            pipeline_key, signal_key = jax.random.split(
                _pipeline_key(config.seed, spec, mask_index)
            )
            mask = masks[mask_index]
            output = batched.get(mask_index) or run_pipeline(
                pipeline_key,
                pool_images[mask],
                pool_labels[mask],
                spec=spec,
                num_classes=data.num_classes,
                public_dataset_size=public_size,
                target_delta=config.target_delta,
                l2_norm_clip=config.l2_norm_clip,
                progress=False,
            )
            signals = collect_signals(
                signal_key, output, pool_images, pool_labels, population_images
            )
            result = output.classifier
            accuracy = classifier.accuracy_of(
                result.params, result.config, data.num_classes, data.test_images, data.test_labels
            )
            if mask_index == 0:
                _save_target_artefacts(workdir, spec, output, config.target_delta, data.class_names)
                if output.synthetic_images is not None:
                    scores = fidelity.fidelity_proxy(
                        extractor.get(),
                        data.test_images[:FIDELITY_REFERENCE_SIZE],
                        output.synthetic_images,
                    )
                    (workdir / "fidelity").mkdir(exist_ok=True)
                    _write_json_atomically(workdir / "fidelity" / f"{spec.name}.json", scores)
            _save_npz_atomically(
                _signals_path(workdir, spec, mask_index),
                test_accuracy=np.float32(accuracy),
                **signals,
            )
            seconds = time.perf_counter() - tic + (seconds_each if batched else 0.0)
            timings.setdefault(spec.name, {})[str(mask_index)] = round(seconds, 2)
            _write_json_atomically(timings_path, timings)
            bar.update()
    bar.close()

    records, curves = evaluation.evaluate_experiment(
        workdir=workdir,
        pipelines=config.pipelines,
        masks=masks,
        pool_labels=pool_labels,
        population_labels=population_labels,
        target_delta=config.target_delta,
    )
    for record in records:
        path = workdir / "fidelity" / f"{record['pipeline']}.json"
        if record["generator"] is not None and path.exists():
            record["fidelity"] = json.loads(path.read_text())
    _write_json_atomically(workdir / "metrics.json", records)
    seconds = time.perf_counter() - started
    report_path = report.write_report(
        workdir,
        config=config.to_dict(),
        records=records,
        curves=curves,
        facts={
            "dataset": data.name,
            "pool_size": len(pool_images),
            "test_size": len(data.test_images),
            "public_dataset_size": public_size,
            "num_shadows": config.num_shadows,
            "wall_seconds_this_invocation": round(seconds, 1),
            "pipeline_seconds_total": round(sum(sum(t.values()) for t in timings.values()), 1),
            "seconds_per_pipeline": {
                name: round(float(np.median(list(t.values()))), 1) for name, t in timings.items()
            },
        },
    )
    log.info("finished in %.0f s; report: %s", seconds, report_path)
    return records


# Real test images that the fidelity proxy compares each synthetic set with. The cost of the
# k-NN precision and recall grows with the square of this number.
FIDELITY_REFERENCE_SIZE = 5000


class FidelityExtractor:
    """The fidelity proxy's feature extractor, trained on the pool at first use.

    The pool is real training data, never the test split (see `ppds_jax.fidelity`). The
    extractor only measures samples. Nothing is selected by it, and it is never released.
    """

    def __init__(self, seed, images, labels, num_classes):
        self._arguments = (seed, images, labels, num_classes)
        self._extractor = None

    def get(self) -> fidelity.FeatureExtractor:
        if self._extractor is None:
            seed, images, labels, num_classes = self._arguments
            batch_size = min(128, len(images))
            self._extractor = fidelity.train_feature_extractor(
                jax.random.fold_in(jax.random.key(seed), zlib.crc32(b"fidelity")),
                images,
                labels,
                num_classes=num_classes,
                num_steps=2 * max(1, len(images) // batch_size),
                batch_size=batch_size,
            )
        return self._extractor


def _save_target_artefacts(workdir: Path, spec, output, target_delta, class_names) -> None:
    if output.ledger is not None:
        (workdir / "ledgers").mkdir(exist_ok=True)
        _write_json_atomically(
            workdir / "ledgers" / f"{spec.name}.json", output.ledger.to_dict(target_delta)
        )
    if output.synthetic_images is not None:
        plots.sample_grid(
            output.synthetic_images,
            output.synthetic_labels,
            class_names=class_names,
            path=workdir / f"samples_{spec.name}.png",
            title=f"{spec.name}: synthetic samples per class",
        )
