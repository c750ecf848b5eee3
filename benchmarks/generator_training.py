"""Training seconds per epoch of every generator family, private and not, side by side.

Command: `python -m benchmarks.generator_training [--quick] [--families a,b] [--repeats R]`

Each family trains on a stratified subset of the Fashion-MNIST training split: 5,000 images,
the expected member count of the default experiment. It uses its default options, which the
CPU experiment preset also uses apart from the number of epochs. Seconds per epoch
come from the difference of a 2-epoch and a 1-epoch fit, timed after an untimed fit of each
length. Noise calibrations are then cached, and compilation costs both timed fits the same
(nothing for families whose steps are cached, a full compile for the others), so the difference
is the training time of one epoch. "first epoch" is the untimed 1-epoch fit of the first
repeat, compilation and calibration included. The private variant
targets epsilon 10 at delta 1e-5 with the subset size as the public dataset size. Repeats run
round-robin over the variants and the table reports medians. "preset fit" estimates one fit
of the CPU preset (10 epochs): the first epoch plus 9 more.

`--quick` uses 500 digits images. The table and benchmarks/results/generator_training.json
record the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks.shadow_throughput import RESULTS_DIR, machine_info
from ppds_jax import datasets, generators
from ppds_jax.generators.base import PrivacySpec

PRESET_EPOCHS = 10
TARGET_EPSILON = 10.0
TARGET_DELTA = 1e-5


def _data(quick: bool, num_images: int | None) -> tuple[np.ndarray, np.ndarray, int, str]:
    name, size = ("digits", 500) if quick else ("fashion_mnist", 5000)
    size = num_images or size
    data = datasets.load_dataset(name)
    index = datasets.stratified_indices(data.train_labels, size=size, seed=0)
    return data.train_images[index], data.train_labels[index], data.num_classes, name


def _fit_seconds(family, images, labels, num_classes, num_epochs: int, private: bool) -> float:
    config = generators.resolve_config(family, {"num_epochs": num_epochs})
    state = family.init(
        jax.random.key(0), image_shape=images.shape[1:], num_classes=num_classes, config=config
    )
    privacy = None
    if private:
        privacy = PrivacySpec(
            target_epsilon=TARGET_EPSILON, target_delta=TARGET_DELTA, dataset_size=len(labels)
        )
    started = time.perf_counter()
    result = family.fit(jax.random.key(1), state, images, labels, config=config, privacy=privacy)
    jax.block_until_ready(result.state["params"])
    return time.perf_counter() - started


def measure(families, images, labels, num_classes, repeats: int) -> list[dict]:
    """Time every (family, private) variant `repeats` times, round-robin, and return a row each."""
    variants = [(name, private) for name in families for private in (False, True)]
    cold, differences = {}, {variant: [] for variant in variants}
    for repeat in range(repeats):
        for name, private in variants:
            family = generators.get_family(name)
            if repeat == 0:
                cold[name, private] = _fit_seconds(family, images, labels, num_classes, 1, private)
                # Warm-up: the 2-epoch noise calibration is cached for the timed fits.
                _fit_seconds(family, images, labels, num_classes, 2, private)
            one = _fit_seconds(family, images, labels, num_classes, 1, private)
            two = _fit_seconds(family, images, labels, num_classes, 2, private)
            differences[name, private].append(two - one)
    rows = []
    for name, private in variants:
        per_epoch = max(statistics.median(differences[name, private]), 0.0)
        rows.append(
            {
                "family": name,
                "private": private,
                "seconds_per_epoch": per_epoch,
                "first_epoch_seconds": cold[name, private],
                "preset_fit_seconds_estimate": cold[name, private]
                + (PRESET_EPOCHS - 1) * per_epoch,
                "epoch_differences": differences[name, private],
            }
        )
    return rows


def _print_table(rows, dataset: str, num_images: int) -> None:
    print(f"{dataset}, {num_images} images; medians; private: epsilon {TARGET_EPSILON:g}")
    print("family | private | s/epoch | first epoch (s, with compile) | preset fit (s, estimate)")
    print("--- | --- | --- | --- | ---")
    for row in rows:
        print(
            f"{row['family']} | {'yes' if row['private'] else 'no'} | "
            f"{row['seconds_per_epoch']:.1f} | {row['first_epoch_seconds']:.1f} | "
            f"{row['preset_fit_seconds_estimate']:.0f}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generator_training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="500 digits images")
    parser.add_argument(
        "--families",
        default=",".join(generators.GENERATORS),
        help=f"comma-separated families (default: all of {','.join(generators.GENERATORS)})",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed fits per variant")
    parser.add_argument(
        "--num-images", type=int, help="training images (default: 5,000, or 500 with --quick)"
    )
    args = parser.parse_args(argv)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    for name in families:
        generators.get_family(name)  # raises ValueError with the known names for an unknown one
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")

    if args.num_images is not None and args.num_images < 2:
        parser.error(f"--num-images={args.num_images} must be >= 2")
    images, labels, num_classes, dataset = _data(args.quick, args.num_images)
    rows = measure(families, images, labels, num_classes, args.repeats)
    _print_table(rows, dataset, len(labels))
    result = {
        "command": " ".join(["python -m benchmarks.generator_training", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "dataset": dataset,
        "num_images": len(labels),
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / (
        "generator_training_quick.json" if args.quick else "generator_training.json"
    )
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
