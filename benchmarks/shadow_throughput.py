"""Shadow training throughput: models per hour for K models with each strategy, side by side.

Command: `python -m benchmarks.shadow_throughput [--quick] [--dp] [--repeats R]`

Each timed call trains K classifiers of an experiment preset for a fixed number of steps, each
on its own membership mask of one pool, and includes compilation, because every experiment
stage pays it once per call. Strategies:

- fit_loop: K calls of `training.fit` with one loss and optimizer object, what a loop over
  `classifier.train_classifier` runs. `fit` reuses its compiled steps for data sets that pad
  to the same row count, so the call compiles once or a few times.
- sequential: `shadow_training.train_many(strategy="sequential")`.
- vmap: `shadow_training.train_many(strategy="vmap")`.

Repeats run round-robin over every (K, strategy) pair, so background load hits all of them
alike, and the table reports medians. The default workload is the CPU preset's classifier on
Fashion-MNIST (pool 10,000, batch 128). `--quick` uses the quick preset's classifier on digits
(pool 1,000, batch 64). The table and benchmarks/results/shadow_throughput*.json record the
machine they ran on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppds_jax import classifier, datasets, dp_sgd, membership, networks, shadow_training, training

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STRATEGIES = ("fit_loop", "sequential", "vmap")


def machine_info() -> dict:
    """Return the backend, devices, CPU count and versions of the machine."""
    return {
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _workload(quick: bool):
    if quick:
        return {
            "dataset": "digits",
            "pool_size": 1000,
            "classifier": {"features": (16, 32), "hidden": 64, "batch_size": 64},
            "num_steps": 20,
        }
    return {
        "dataset": "fashion_mnist",
        "pool_size": 10_000,
        "classifier": {"features": (16, 32), "hidden": 64, "batch_size": 128},
        "num_steps": 40,
    }


def _pool(dataset: str, pool_size: int):
    data = datasets.load_dataset(dataset)
    index = datasets.stratified_indices(data.train_labels, size=pool_size, seed=0)
    return data.train_images[index], data.train_labels[index], data.num_classes


class _Task:
    """K classifiers on K masks of one pool, trainable with each strategy."""

    def __init__(self, images, labels, num_classes, config, num_steps, dp_enabled):
        self.images, self.labels = images, labels
        self.num_classes = num_classes
        self.config = classifier.resolve_config(config)
        self.num_steps = num_steps
        self.batch_size = self.config["batch_size"]
        self.dp = None
        if dp_enabled:
            public_size = membership.expected_member_count(len(images), 0.5)
            sampling_prob = self.batch_size / public_size
            self.dp = dp_sgd.DpSgdConfig(
                l2_norm_clip=1.0,
                noise_multiplier=1.0,
                sampling_prob=sampling_prob,
                num_steps=num_steps,
                dataset_size=public_size,
                physical_batch_size=dp_sgd.default_physical_batch_size(
                    self.batch_size, sampling_prob
                ),
            )

    def _functions(self):
        """Build fresh (init, loss, optimizer) objects, so that every timed call compiles."""
        model = networks.CNN(
            self.num_classes, features=self.config["features"], hidden=self.config["hidden"]
        )
        sample_input = jnp.zeros((1, *self.images.shape[1:]), jnp.float32)

        def init(key):
            return model.init(key, sample_input)["params"]

        loss = classifier.make_per_example_loss(self.config, self.num_classes)
        return init, loss, optax.adamw(self.config["learning_rate"])

    def masks(self, num_models: int) -> np.ndarray:
        _, shadow_masks = membership.membership_masks(
            seed=0, pool_size=len(self.images), num_shadows=max(2, num_models)
        )
        return shadow_masks[:num_models]

    def run(self, strategy: str, num_models: int) -> float:
        """Train num_models classifiers with `strategy`; return the wall-clock seconds."""
        keys = jax.random.split(jax.random.key(num_models), num_models)
        masks = self.masks(num_models)
        init, loss, optimizer = self._functions()
        started = time.perf_counter()
        if strategy == "fit_loop":
            for k in range(num_models):
                init_key, fit_key = jax.random.split(keys[k])
                params, _ = training.fit(
                    fit_key,
                    init(init_key),
                    per_example_loss=loss,
                    data=(self.images[masks[k]], self.labels[masks[k]]),
                    optimizer=optimizer,
                    num_steps=self.num_steps,
                    batch_size=self.batch_size,
                    dp=self.dp,
                )
        else:
            params, _ = shadow_training.train_many(
                keys,
                init,
                per_example_loss=loss,
                data=(self.images, self.labels),
                masks=masks,
                optimizer=optimizer,
                num_steps=self.num_steps,
                batch_size=self.batch_size,
                strategy=strategy,
                dp=self.dp,
            )
        jax.block_until_ready(params)
        return time.perf_counter() - started


def measure(task: _Task, pairs, repeats: int, on_round=None) -> list[dict]:
    """Time every (K, strategy) pair `repeats` times, round-robin; return one row per pair.

    `on_round(rows)` is called after each round with the medians so far, so that a run stopped
    early still leaves its results.
    """
    task.run("sequential", 1)  # Warm-up: backend start-up and data transfer, not timed.
    seconds = {pair: [] for pair in pairs}
    rows = []
    for _ in range(repeats):
        for num_models, strategy in pairs:
            seconds[num_models, strategy].append(task.run(strategy, num_models))
        rows = _rows(seconds)
        if on_round is not None:
            on_round(rows)
    return rows


def _rows(seconds: dict) -> list[dict]:
    rows = []
    for (num_models, strategy), values in seconds.items():
        median = statistics.median(values)
        rows.append(
            {
                "num_models": num_models,
                "strategy": strategy,
                "seconds_median": median,
                "seconds": values,
                "models_per_hour": 3600 * num_models / median,
            }
        )
    by_pair = {(row["num_models"], row["strategy"]): row for row in rows}
    for row in rows:
        single = by_pair[1, row["strategy"]]
        row["per_model_vs_k1_same_strategy"] = row["models_per_hour"] / single["models_per_hour"]
        baseline = by_pair[1, "fit_loop"]
        row["per_model_vs_fit_loop_k1"] = row["models_per_hour"] / baseline["models_per_hour"]
    return rows


def format_table(rows: list[dict]) -> str:
    """Format the rows as a Markdown table."""
    lines = [
        "| K | strategy | median s | models/hour | per model vs K=1 (same strategy) "
        "| per model vs fit_loop K=1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["num_models"], STRATEGIES.index(r["strategy"]))):
        lines.append(
            f"| {row['num_models']} | {row['strategy']} | {row['seconds_median']:.1f} "
            f"| {row['models_per_hour']:.0f} | {row['per_model_vs_k1_same_strategy']:.2f}x "
            f"| {row['per_model_vs_fit_loop_k1']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 20 steps per model")
    parser.add_argument("--dp", action="store_true", help="DP-SGD steps (noise multiplier 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per (K, strategy)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    parser.add_argument(
        "--models", default="1,4,16", help="comma-separated model counts K (must include 1)"
    )
    parser.add_argument(
        "--fit-loop-max-models",
        type=int,
        default=None,
        help="run the fit_loop baseline only up to this K (default: every K)",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated subset of {','.join(STRATEGIES)}; fit_loop is the baseline",
    )
    args = parser.parse_args(argv)
    workload = _workload(args.quick)
    if args.steps is not None:
        workload["num_steps"] = args.steps
    model_counts = [int(k) for k in args.models.split(",")]
    strategies = args.strategies.split(",")
    if 1 not in model_counts or "fit_loop" not in strategies:
        parser.error("--models must include 1 and --strategies must include fit_loop")

    pairs = [
        (num_models, strategy)
        for num_models in model_counts
        for strategy in strategies
        if not (
            strategy == "fit_loop"
            and args.fit_loop_max_models is not None
            and num_models > max(1, args.fit_loop_max_models)
        )
    ]

    images, labels, num_classes = _pool(workload["dataset"], workload["pool_size"])
    task = _Task(
        images, labels, num_classes, workload["classifier"], workload["num_steps"], args.dp
    )
    machine = machine_info()
    title = (
        f"Shadow training on {workload['dataset']}, {workload['num_steps']} "
        f"{'DP-SGD' if args.dp else 'non-private'} steps per model, batch "
        f"{workload['classifier']['batch_size']}, medians of {args.repeats} "
        f"({machine['backend']}: {machine['device_kind']}, {machine['cpu_count']} CPUs)"
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = "shadow_throughput"
    if args.quick:
        name += "_quick"
    if args.dp:
        name += "_dp"
    path = RESULTS_DIR / f"{name}.json"

    def write(rows):
        record = {
            "title": title,
            "command": "python -m benchmarks.shadow_throughput "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine,
            "workload": {**workload, "dp": args.dp, "repeats": args.repeats},
            "auto_strategy": shadow_training.choose_strategy(),
            "rounds_done": len(rows[0]["seconds"]),
            "rows": rows,
        }
        path.write_text(json.dumps(record, indent=2, default=str))

    rows = measure(task, pairs, args.repeats, on_round=write)
    print(title)
    print(format_table(rows))
    print(f"auto picks: {shadow_training.choose_strategy()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
