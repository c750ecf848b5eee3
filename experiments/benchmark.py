"""Run the benchmark grid, resumably, and write the report that answers its four questions.

Examples:
  python -m experiments.benchmark --preset smoke --out runs/smoke
  python -m experiments.benchmark --out runs/cpu                  # the cpu preset
  python -m experiments.benchmark --preset cpu --out runs/cpu --list
  python -m experiments.benchmark --preset cpu --out runs/cpu --cell NAME

Output folder:
  benchmark.json               the grid configuration and its fingerprint
  cells/NAME/runs/M/           checkpoint of the run on mask M (0 = target, 1.. = shadows):
                               orbax checkpoints of the generator and the classifier, the
                               attack signals and test accuracy, the privacy ledger and, for
                               the target, the synthetic set
  cells/NAME/metrics/          checkpoint of the cell's evaluation: metrics.json, ROC curves,
                               sample grid
  report.md, report.html       the report on the four questions, with figures/*.png

Every checkpoint is written under a temporary name and renamed into place when complete, and
records the fingerprint of the configuration it was computed for. A rerun skips what is done,
so a run killed at any moment (even by SIGKILL) loses at most the run in progress. A checkpoint
whose configuration changed is recomputed, and a corrupt or truncated one is reported by path
and recomputed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import compilation_cache
from experiments import grid as grid_module
from experiments.experiment import FIDELITY_REFERENCE_SIZE, FidelityExtractor, split_pool
from ppds_jax import (
    answers,
    checkpoint,
    classifier,
    datasets,
    evaluation,
    fidelity,
    membership,
    plots,
    report,
)
from ppds_jax.pipeline import StageCache, collect_signals, run_pipeline

log = logging.getLogger("ppds_jax.benchmark")

BENCHMARK_FILE = "benchmark.json"
LOCK_FILE = ".lock"
CELLS_FOLDER = "cells"
# Entries that `--start-over` deletes: everything this module writes into the output folder.
_OWNED_ENTRIES = (BENCHMARK_FILE, CELLS_FOLDER, answers.FIGURES_FOLDER, "report.md", "report.html")


class BenchmarkFolderError(ValueError):
    """The output folder cannot be used for this grid as requested."""


@dataclasses.dataclass
class RunSummary:
    """Record of the work one call of `run` did.

    Attributes:
      computed_runs: (cell name, mask index) of every pipeline run computed.
      evaluated_cells: cells whose metrics were computed.
      finished_cells: cells of the selection whose metrics are on disk and current.
      recomputed: (checkpoint path, reason) of every checkpoint found corrupt or stale.
      report: path of report.md, or None when no report was written.
      seconds: wall time of the call.
    """

    computed_runs: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    evaluated_cells: list[str] = dataclasses.field(default_factory=list)
    finished_cells: list[str] = dataclasses.field(default_factory=list)
    recomputed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0


def cell_folder(out, cell: grid_module.Cell) -> Path:
    """Folder of `cell`'s checkpoints inside the output folder `out`."""
    return Path(out) / CELLS_FOLDER / cell.name


def run(
    grid: grid_module.Grid,
    out,
    *,
    cell_names: Sequence[str] | None = None,
    update: bool = False,
    start_over: bool = False,
    report_only: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Run the cells of `grid` that are not finished in `out`, then write the report.

    Args:
      grid: the benchmark grid.
      out: output folder; created if missing.
      cell_names: run only these cells; None runs every cell.
      update: accept a folder used by another configuration of the grid: cells whose
        configuration is unchanged are kept and changed ones are recomputed.
      start_over: delete the folder's previous benchmark results first.
      report_only: run nothing; write the report from the finished cells.
      progress: show progress bars for the grid and for every training loop.

    Returns:
      RunSummary.

    Raises:
      BenchmarkFolderError: `out` is in use by another process, contains a benchmark of
        another configuration (without `update` or `start_over`), or contains files that are
        not a benchmark's.
      ValueError: an unknown cell name.
    """
    started = time.perf_counter()
    out = Path(out)
    selected = grid.cells() if cell_names is None else [grid.cell(n) for n in cell_names]
    summary = RunSummary()
    with _locked(out):
        _prepare_folder(grid, out, update=update, start_over=start_over)
        pending = {} if report_only else _pending_runs(out, selected, summary)
        _run_pending(out, selected, pending, summary, progress=progress)
        finished = _finished_cell_results(out, grid.cells())
        summary.finished_cells = [c.name for c in selected if c.name in finished]
        if finished:
            summary.report = _write_report(grid, out, finished)
    summary.seconds = time.perf_counter() - started
    return summary


@contextlib.contextmanager
def _locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchmarkFolderError(
                f"another benchmark process is writing into {out}; wait for it to finish or"
                " choose another --out"
            ) from None
        yield


def _prepare_folder(grid: grid_module.Grid, out: Path, *, update: bool, start_over: bool):
    path = out / BENCHMARK_FILE
    fingerprint = grid.fingerprint()
    if not path.exists():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if foreign:
            raise BenchmarkFolderError(
                f"{out} is not empty and contains no benchmark ({', '.join(foreign[:5])});"
                " choose another --out"
            )
    elif start_over:
        for name in _OWNED_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    else:
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise BenchmarkFolderError(
                f"{path} is not valid JSON ({error}); pass --start-over to delete the"
                " folder's results, or choose another --out"
            ) from None
        if saved.get("fingerprint") != fingerprint and not update:
            raise BenchmarkFolderError(
                f"{out} contains a benchmark of another configuration (grid"
                f" {saved.get('grid', {}).get('name')!r}, fingerprint"
                f" {str(saved.get('fingerprint'))[:12]}; this grid {grid.name!r} has"
                f" {fingerprint[:12]}). Pass --update to keep its unchanged cells and"
                " recompute the changed ones, --start-over to delete its results, or choose"
                " another --out"
            )
    checkpoint.write_json_atomically(
        path,
        {
            "fingerprint": fingerprint,
            "grid": grid.to_dict(),
            "cells": [cell.name for cell in grid.cells()],
        },
    )


def _pending_runs(out: Path, cells, summary: RunSummary) -> dict[str, list[int]]:
    """Cell name -> mask indices still to compute, for every cell whose metrics are not current.

    Corrupt and stale checkpoints are logged, recorded in `summary` and deleted.
    """
    pending = {}
    for cell in cells:
        folder = cell_folder(out, cell)
        for leftover in checkpoint.remove_leftovers(folder) + checkpoint.remove_leftovers(
            folder / "runs"
        ):
            log.info("removed %s, left by an interrupted write", leftover)
        runs = [
            index for index in range(cell.num_masks) if not _usable_run(cell, out, index, summary)
        ]
        metrics_ok = _usable(folder / "metrics", cell.fingerprint(), summary)
        if runs or not metrics_ok:
            pending[cell.name] = runs
    return pending


def _usable_run(cell, out: Path, mask_index: int, summary: RunSummary) -> bool:
    path = cell_folder(out, cell) / "runs" / str(mask_index)
    return _usable(path, cell.run_fingerprint(mask_index), summary)


def _usable(path: Path, fingerprint: str, summary: RunSummary) -> bool:
    """Return True if the checkpoint at `path` is whole and current, else delete it."""
    try:
        checkpoint.verify_checkpoint(path, fingerprint=fingerprint)
        return True
    except checkpoint.MissingCheckpointError:
        return False
    except checkpoint.StaleCheckpointError as error:
        log.info("%s; recomputing it", error)
        summary.recomputed.append((str(path), error.reason))
    except checkpoint.CorruptCheckpointError as error:
        log.warning("%s; recomputing it", error)
        summary.recomputed.append((str(path), error.reason))
    shutil.rmtree(path, ignore_errors=True)
    return False


@dataclasses.dataclass(frozen=True)
class _GroupData:
    """The data that every cell of one dataset and seed shares."""

    data: datasets.Dataset
    pool: tuple[np.ndarray, np.ndarray]
    population: tuple[np.ndarray, np.ndarray]
    masks: np.ndarray
    public_size: int
    extractor: FidelityExtractor


def _load_group(cell: grid_module.Cell) -> _GroupData:
    config = cell.experiment
    data = datasets.load_dataset(
        config.dataset, data_dir=config.data_dir, test_size=config.test_size, seed=config.seed
    )
    pool, population = split_pool(data, config)
    target_mask, shadow_masks = membership.membership_masks(
        seed=config.seed,
        pool_size=len(pool[1]),
        num_shadows=config.num_shadows,
        inclusion_prob=config.inclusion_prob,
    )
    masks = np.concatenate([target_mask[None], shadow_masks])
    public_size = membership.expected_member_count(len(pool[1]), config.inclusion_prob)
    extractor = FidelityExtractor(config.seed, *pool, data.num_classes)
    return _GroupData(data, pool, population, masks, public_size, extractor)


def _group_key(cell: grid_module.Cell) -> str:
    # Everything that `_load_group` reads, so cells with equal keys share one load.
    config = cell.experiment.to_dict()
    config.pop("pipelines")
    config.pop("description")
    return json.dumps(config, sort_keys=True)


def _run_pending(out: Path, cells, pending, summary: RunSummary, *, progress: bool) -> None:
    total = sum(len(runs) for runs in pending.values())
    if not pending:
        return
    log.info("%d cells to finish, %d pipeline runs to compute", len(pending), total)
    bar = tqdm(total=total, desc="grid", unit="run", disable=not progress, position=0)
    groups: dict[str, list[grid_module.Cell]] = {}
    for cell in cells:
        if cell.name in pending:
            groups.setdefault(_group_key(cell), []).append(cell)
    # Cells sharing a generator (same family, epsilon and options) are adjacent in the grid's
    # order, so the cache needs room for one generator per mask of one cell.
    cache = StageCache(max_entries=max(cell.num_masks for cell in cells))
    for group_cells in groups.values():
        group = _load_group(group_cells[0])
        for cell in group_cells:
            started = time.perf_counter()
            for mask_index in pending[cell.name]:
                bar.set_postfix_str(f"{cell.name} mask {mask_index}")
                try:
                    _compute_run(out, cell, mask_index, group, cache=cache, progress=progress)
                except Exception:
                    log.error("run of cell %s on mask %d failed", cell.name, mask_index)
                    raise
                summary.computed_runs.append((cell.name, mask_index))
                bar.update()
            _evaluate_cell(out, cell, group)
            summary.evaluated_cells.append(cell.name)
            log.info("cell %s finished in %.0f s", cell.name, time.perf_counter() - started)
    bar.close()
    log.info(
        "stage results reused: %s; computed: %s",
        dict(cache.hits) or "no",
        dict(cache.misses) or "no",
    )


def _compute_run(
    out: Path, cell, mask_index: int, group: _GroupData, *, cache: StageCache, progress: bool
):
    """Run one (cell, mask) pipeline and save it as one checkpoint.

    The cache hands over the generator and synthetic set of an earlier cell that computed the
    same stage (see `StageCache`), so the run's wall time in its manifest excludes them.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    hits_before = cache.hits.copy()
    config = cell.experiment
    pipeline_key, signal_key = jax.random.split(cell.run_key(mask_index))
    mask = group.masks[mask_index]
    pool_images, pool_labels = group.pool
    output = run_pipeline(
        pipeline_key,
        pool_images[mask],
        pool_labels[mask],
        spec=cell.spec,
        num_classes=group.data.num_classes,
        public_dataset_size=group.public_size,
        target_delta=config.target_delta,
        l2_norm_clip=config.l2_norm_clip,
        progress=progress,
        cache=cache,
    )

    signals = collect_signals(
        signal_key,
        output,
        pool_images,
        pool_labels,
        group.population[0],
        releases=cell.releases,
    )
    result = output.classifier
    accuracy = classifier.accuracy_of(
        result.params,
        result.config,
        group.data.num_classes,
        group.data.test_images,
        group.data.test_labels,
    )

    arrays = {"signals": {**signals, "test_accuracy": np.float32(accuracy)}}
    if mask_index == 0 and output.synthetic_images is not None:
        arrays["synthetic"] = {
            "images": output.synthetic_images,
            "labels": output.synthetic_labels,
        }
    pytrees = {"classifier": result.params}
    if output.generator_state is not None:
        pytrees["generator"] = output.generator_state
    documents = {}
    if output.ledger is not None:
        documents["ledger"] = output.ledger.to_dict(config.target_delta)
    checkpoint.write_checkpoint(
        cell_folder(out, cell) / "runs" / str(mask_index),
        fingerprint=cell.run_fingerprint(mask_index),
        arrays=arrays,
        pytrees=pytrees,
        documents=documents,
        metadata={
            "cell": cell.name,
            "mask_index": mask_index,
            "test_accuracy": accuracy,
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "reused_stages": sorted(cache.hits - hits_before),
        },
    )


def _evaluate_cell(out: Path, cell, group: _GroupData) -> None:
    """Attack the cell's releases from its runs' signals and save the metrics checkpoint."""
    folder = cell_folder(out, cell)
    runs = [folder / "runs" / str(index) for index in range(cell.num_masks)]
    saved = evaluation.stack_signals([checkpoint.load_arrays(path, "signals") for path in runs])
    ledger = None
    if (runs[0] / "ledger.json").exists():
        ledger = checkpoint.load_document(runs[0], "ledger")

    records, curves = [], {}
    for release in cell.releases:
        record, release_curves = evaluation.release_record(
            cell.spec,
            release,
            saved,
            masks=group.masks,
            pool_labels=group.pool[1],
            population_labels=group.population[1],
            target_delta=cell.experiment.target_delta,
            ledger=ledger,
        )
        records.append(record)
        curves[release] = release_curves

    manifests = [checkpoint.read_manifest(path)["metadata"] for path in runs]
    result = {
        **cell.to_dict(),
        "records": records,
        "run_seconds": [m["seconds"] for m in manifests],
        "run_cpu_seconds": [m["cpu_seconds"] for m in manifests],
        "run_reused_stages": [m.get("reused_stages", []) for m in manifests],
        "pool_size": len(group.pool[1]),
        "public_dataset_size": group.public_size,
        "test_size": len(group.data.test_labels),
    }

    files = {}
    for release, release_curves in curves.items():
        files[f"roc_{release}.png"] = _roc_writer(release_curves, f"{cell.name}: {release}")
    arrays = {"roc": _strongest_curves(records, curves)}
    if (runs[0] / "synthetic.npz").exists():
        synthetic = checkpoint.load_arrays(runs[0], "synthetic")
        files["samples.png"] = _samples_writer(synthetic, group.data.class_names, cell.name)
        # Without the "synthetic_data" release, the cell changes only classifier options, so
        # its set and fidelity equal those of the cell without them.
        if "synthetic_data" in cell.releases:
            result["fidelity"] = fidelity.fidelity_proxy(
                group.extractor.get(),
                group.data.test_images[:FIDELITY_REFERENCE_SIZE],
                synthetic["images"],
            )
    checkpoint.write_checkpoint(
        folder / "metrics",
        fingerprint=cell.fingerprint(),
        documents={"metrics": result},
        arrays=arrays,
        files=files,
        metadata={"cell": cell.name},
    )


def _strongest_curves(records, curves) -> dict[str, np.ndarray]:
    arrays = {}
    for record in records:
        name = report.strongest_attack(record)
        if name is None:
            continue
        fpr, tpr = curves[record["release"]][name]
        arrays[f"{record['release']}/fpr"] = np.asarray(fpr, np.float32)
        arrays[f"{record['release']}/tpr"] = np.asarray(tpr, np.float32)
    return arrays


def _roc_writer(release_curves, title):
    return lambda path: plots.roc_curves(release_curves, path=path, title=title)


def _samples_writer(synthetic, class_names, title):
    return lambda path: plots.sample_grid(
        synthetic["images"],
        synthetic["labels"],
        class_names=class_names,
        path=path,
        title=f"{title}: synthetic samples",
    )


def _finished_cell_results(out: Path, cells) -> dict[str, answers.CellResult]:
    """Results of the cells whose metrics checkpoint is whole and current."""
    finished = {}
    for cell in cells:
        path = cell_folder(out, cell) / "metrics"
        try:
            checkpoint.verify_checkpoint(path, fingerprint=cell.fingerprint())
        except checkpoint.CheckpointError:
            continue
        roc = checkpoint.load_arrays(path, "roc")
        curves = {}
        for key, values in roc.items():
            release, axis = key.split("/")
            curves.setdefault(release, {})[axis] = values
        figures = {
            file.stem: file.relative_to(out).as_posix() for file in sorted(path.glob("*.png"))
        }
        finished[cell.name] = answers.CellResult(
            metrics=checkpoint.load_document(path, "metrics"),
            roc={r: (c["fpr"], c["tpr"]) for r, c in curves.items()},
            figures=figures,
        )
    return finished


def _write_report(grid: grid_module.Grid, out: Path, finished) -> Path:
    cells = grid.cells()
    full = grid.full_grid().cells()
    description = {
        "name": grid.name,
        "description": grid.description,
        "axes": {
            axis: ["inf" if value == math.inf else value for value in values]
            for axis, values in grid.axes().items()
        },
        "blocks": [
            {**block.to_dict(), "num_cells": len(grid.block_cells(block))} for block in grid.blocks
        ],
        "settings": grid.to_dict()["settings"],
        "num_cells": len(cells),
        "num_evaluations": sum(len(cell.releases) for cell in cells),
        "full_num_cells": len(full),
        "full_num_evaluations": sum(len(cell.releases) for cell in full),
        "samplings": {k: v.description for k, v in grid_module.SAMPLINGS.items()},
        "mitigations": {k: v.description for k, v in grid_module.MITIGATIONS.items()},
    }
    return answers.write_report(
        out,
        grid=description,
        cells=[finished[c.name] for c in cells if c.name in finished],
        missing=[c.name for c in cells if c.name not in finished],
    )


# --- command line -----------------------------------------------------------------------------


def load_config_file(path) -> grid_module.Grid:
    """Load a grid from a Python file that defines `get_grid()`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file defines no `get_grid`, or it returns no `Grid`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"benchmark_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_grid = getattr(module, "get_grid", None)
    if get_grid is None:
        raise ValueError(f"config file {path} defines no get_grid() function")
    grid = get_grid()
    if not isinstance(grid, grid_module.Grid):
        raise ValueError(
            f"get_grid() of {path} returned {type(grid).__name__}, not experiments.grid.Grid"
        )
    return grid


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser, whose --help describes every option."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=sorted(grid_module.PRESETS),
        default="cpu",
        help="grid to run: smoke (digits, a few cells, minutes on a 2-core CPU), cpu (default;"
        " Fashion-MNIST subset of the grid sized for an hour on a 2-core CPU), paper (the full"
        " grid at full scale, for GPUs)",
    )
    source.add_argument(
        "--config",
        metavar="FILE",
        help="Python file defining get_grid() -> experiments.grid.Grid, used instead of a preset",
    )
    parser.add_argument(
        "--out", help="output folder: created if missing, resumed if it contains this grid"
    )
    parser.add_argument(
        "--cell",
        action="append",
        metavar="NAME",
        help="run only this cell (repeat for several); names come from --list",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the grid's cells, with their status in --out when given, and exit",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="accept an --out folder that contains another configuration of the grid: keep the"
        " cells whose configuration is unchanged and recompute the others",
    )
    parser.add_argument(
        "--start-over",
        action="store_true",
        help="delete the benchmark results in --out (cells, report, benchmark.json) first",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing; rewrite the report from the cells already finished in --out",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (logs remain)"
    )
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not keep compiled XLA programs on disk (default: keep them in "
        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/ppds_jax/xla, so that shadow runs, other "
        "cells and resumed runs load them instead of compiling again; results are the same)",
    )
    return parser


def _list_cells(grid: grid_module.Grid, out) -> None:
    cells = grid.cells()
    print(f"grid {grid.name!r}: {len(cells)} cells")
    for cell in cells:
        line = f"{cell.name}  releases={','.join(cell.releases)}"
        if out is not None and (Path(out) / BENCHMARK_FILE).exists():
            line += f"  [{_cell_status(cell, Path(out))}]"
        print(line)


def _cell_status(cell: grid_module.Cell, out: Path) -> str:
    folder = cell_folder(out, cell)
    try:
        checkpoint.verify_checkpoint(folder / "metrics", fingerprint=cell.fingerprint())
        return "done"
    except checkpoint.CheckpointError:
        pass
    done = 0
    for index in range(cell.num_masks):
        try:
            checkpoint.verify_checkpoint(
                folder / "runs" / str(index), fingerprint=cell.run_fingerprint(index)
            )
            done += 1
        except checkpoint.CheckpointError:
            pass
    return f"{done}/{cell.num_masks} runs" if done else "pending"


def main(argv: Iterable[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    # force: absl, imported by the dependencies, has already given the root logger a handler.
    # Only this project's loggers report at INFO; orbax logs every file it writes at INFO.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    logging.getLogger("ppds_jax").setLevel(logging.INFO)
    try:
        if args.config:
            grid = load_config_file(args.config)
        else:
            grid = grid_module.PRESETS[args.preset]()
        if args.list:
            _list_cells(grid, args.out)
            return 0
        if args.out is None:
            raise ValueError("--out is required to run the grid")
        if not args.no_compilation_cache:
            compilation_cache.enable()
        summary = run(
            grid,
            args.out,
            cell_names=args.cell,
            update=args.update,
            start_over=args.start_over,
            report_only=args.report_only,
            progress=not args.no_progress,
        )
    except (BenchmarkFolderError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info(
        "computed %d runs and evaluated %d cells in %.0f s",
        len(summary.computed_runs),
        len(summary.evaluated_cells),
        summary.seconds,
    )
    if summary.report is None:
        print(f"no cell of {args.out} is finished, so no report was written")
    else:
        print(f"report: {summary.report} (HTML: {summary.report.with_suffix('.html')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
