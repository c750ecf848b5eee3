"""End-to-end seconds of the default experiment for one pipeline variant, broken down by stage.

Command: `python -m benchmarks.end_to_end [--quick] [--num-shadows K] [--pipeline NAME]`

Runs `experiments.experiment.run` on one variant of a preset. By default that is the generator
variant of the CPU preset on Fashion-MNIST (pool 10,000, 8 shadows, VAE), and `--quick` uses the
quick preset on digits (pool 1,000, 4 shadows). The variant runs on the target mask and every shadow
mask, then the attacks run. Each stage is timed where the experiment calls it:

| stage | timed call |
|---|---|
| generator training | `family.fit` of the generator family |
| sampling | `family.sample` |
| classifier training | `classifier.train_classifier` and `shadow_training.train_classifiers` |
| signal collection | `collect_signals` as the experiment calls it |
| attack evaluation | `evaluation.evaluate_experiment` |

The timers wrap these functions for the duration of the run and wait for their results on the
device. A call made inside another timed call counts for the outer stage, so the classifier
that signal collection trains for the attacker counts as signal collection. "other" is the rest
of the wall-clock time: loading data, writing signals, the report. The table gives the total
per stage and the median per pipeline run (one per mask), and
benchmarks/results/end_to_end*.json records them with the machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.shadow_throughput import RESULTS_DIR, machine_info
from experiments import experiment
from experiments.configs import PRESETS
from ppds_jax import classifier, evaluation, generators, shadow_training

STAGES = (
    "generator training",
    "sampling",
    "classifier training",
    "signal collection",
    "attack evaluation",
)


class StageTimer:
    """Wall-clock seconds per stage, counting only the outermost timed call."""

    def __init__(self):
        self.seconds = collections.defaultdict(list)
        self._active = None

    def wrap(self, stage: str, function):
        """Return `function` timed as `stage`, waiting for its device results before stopping."""

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self._active is not None:
                return function(*args, **kwargs)
            self._active = stage
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
                _wait_for_device(result)
                return result
            finally:
                self.seconds[stage].append(time.perf_counter() - started)
                self._active = None

        return timed


def _wait_for_device(result) -> None:
    arrays = [leaf for leaf in jax.tree.leaves(result) if isinstance(leaf, jax.Array)]
    jax.block_until_ready(arrays)


@contextlib.contextmanager
def _patched(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _timed_get_family(timer: StageTimer, get_family):
    """Wrap `generators.get_family` so that the families it returns time `fit` and `sample`."""

    @functools.wraps(get_family)
    def timed_get_family(name):
        family = get_family(name)
        return dataclasses.replace(
            family,
            fit=timer.wrap("generator training", family.fit),
            sample=timer.wrap("sampling", family.sample),
        )

    return timed_get_family


def run_timed(config, workdir) -> tuple[dict, float]:
    """Run the experiment with stage timers; return (seconds per stage call, total seconds)."""
    timer = StageTimer()
    patches = [
        (generators, "get_family", _timed_get_family(timer, generators.get_family)),
        (
            classifier,
            "train_classifier",
            timer.wrap("classifier training", classifier.train_classifier),
        ),
        (
            shadow_training,
            "train_classifiers",
            timer.wrap("classifier training", shadow_training.train_classifiers),
        ),
        (
            experiment,
            "collect_signals",
            timer.wrap("signal collection", experiment.collect_signals),
        ),
        (
            evaluation,
            "evaluate_experiment",
            timer.wrap("attack evaluation", evaluation.evaluate_experiment),
        ),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in patches:
            stack.enter_context(_patched(owner, name, replacement))
        started = time.perf_counter()
        experiment.run(config, workdir, progress=False)
        total = time.perf_counter() - started
    return dict(timer.seconds), total


def _config(quick: bool, pipeline: str | None, num_shadows: int | None):
    config = PRESETS["quick"]() if quick else PRESETS["cpu"]("fashion_mnist")
    specs = {spec.name: spec for spec in config.pipelines}
    if pipeline is None:
        pipeline = next(spec.name for spec in config.pipelines if spec.generator is not None)
    if pipeline not in specs:
        raise SystemExit(f"--pipeline {pipeline!r} is not in the preset; choose from {list(specs)}")
    changes = {"pipelines": (specs[pipeline],)}
    if num_shadows is not None:
        changes["num_shadows"] = num_shadows
    return dataclasses.replace(config, **changes)


def format_table(seconds: dict, total: float, num_masks: int) -> tuple[str, list[dict]]:
    """Format the stage timings as a Markdown table and JSON rows."""
    rows = []
    for stage in STAGES:
        values = seconds.get(stage, [])
        per_pipeline = statistics.median(values) if len(values) >= num_masks else None
        rows.append(
            {
                "stage": stage,
                "seconds_total": sum(values),
                "calls": len(values),
                "seconds_median_per_call": statistics.median(values) if values else None,
                "seconds_per_pipeline_median": per_pipeline,
            }
        )
    other = total - sum(row["seconds_total"] for row in rows)
    rows.append({"stage": "other", "seconds_total": other, "calls": None})
    rows.append({"stage": "total", "seconds_total": total, "calls": None})
    lines = ["| stage | total s | calls | median s per call |", "|---|---|---|---|"]
    for row in rows:
        median = row.get("seconds_median_per_call")
        lines.append(
            f"| {row['stage']} | {row['seconds_total']:.1f} | {row['calls'] or ''} "
            f"| {'' if median is None else f'{median:.1f}'} |"
        )
    return "\n".join(lines), rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick preset on digits")
    parser.add_argument("--pipeline", default=None, help="variant name; default: the generator")
    parser.add_argument("--num-shadows", type=int, default=None, help="override the preset's")
    parser.add_argument("--out", default=None, help="run folder to keep; default: a temporary one")
    args = parser.parse_args(argv)
    config = _config(args.quick, args.pipeline, args.num_shadows)
    num_masks = config.num_shadows + 1

    with contextlib.ExitStack() as stack:
        workdir = args.out or stack.enter_context(tempfile.TemporaryDirectory())
        seconds, total = run_timed(config, Path(workdir) / "run")
    table, rows = format_table(seconds, total, num_masks)
    machine = machine_info()
    title = (
        f"End to end: pipeline {config.pipelines[0].name!r} of the "
        f"{'quick' if args.quick else 'cpu'} preset on {config.dataset}, pool "
        f"{config.pool_size}, target + {config.num_shadows} shadows "
        f"({machine['backend']}: {machine['device_kind']}, {machine['cpu_count']} CPUs)"
    )
    print(title)
    print(table)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / ("end_to_end_quick.json" if args.quick else "end_to_end.json")
    record = {
        "title": title,
        "command": "python -m benchmarks.end_to_end "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "config": config.to_dict(),
        "rows": rows,
        "seconds_per_call": seconds,
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
