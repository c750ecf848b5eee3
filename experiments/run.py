"""Run the generation -> sampling -> classification pipeline and attack every release.

Examples:
  python -m experiments.run --dataset digits --quick --out runs/digits
  python -m experiments.run --dataset fashion_mnist --out runs/fmnist --epsilon 10
  python -m experiments.run --dataset digits --quick --generator gan --epsilon 1 --epsilon 10 \
      --out runs/gan

The run folder receives config.json, metrics.json, report.md, ROC curves, sample grids and, for
private releases, the accountant's ledgers. An existing run folder is never overwritten: pass
--resume to finish or reuse a run of the same configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from experiments import compilation_cache
from experiments.config import with_epsilons
from experiments.configs import PRESETS
from experiments.experiment import SHADOW_STRATEGIES, RunFolderError, run
from ppds_jax import datasets, generators


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        default="fashion_mnist",
        help=f"dataset name, one of {sorted(datasets.DATASETS)} (default: fashion_mnist)",
    )
    parser.add_argument("--out", required=True, help="run folder to create (or resume)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="experiment size: quick (minutes on a CPU), cpu (default, sized for a 2-core CPU),"
        " full (GPU scale)",
    )
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument(
        "--generator",
        action="append",
        choices=list(generators.GENERATORS),
        help="generator family; repeat to compare several (default: vae)",
    )
    parser.add_argument(
        "--epsilon",
        action="append",
        type=_positive_float,
        default=[],
        help="target epsilon of the private releases (DP-trained generator and DP-SGD "
        "classifier on real data); repeat for several; default: no private release",
    )
    parser.add_argument("--delta", type=_positive_float, help="target delta (default: preset's)")
    parser.add_argument("--seed", type=int, help="seed of pool, masks and keys (default: 0)")
    parser.add_argument("--num-shadows", type=_positive_int, help="shadow pipelines per variant")
    parser.add_argument("--pool-size", type=_positive_int, help="training examples in the pool")
    parser.add_argument(
        "--data-dir",
        help="folder with the dataset's local files (Fashion-MNIST default: "
        "/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist)",
    )
    parser.add_argument("--resume", action="store_true", help="reuse a run folder of this config")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--shadow-strategy",
        choices=SHADOW_STRATEGIES,
        default="auto",
        help="how the real-data classifiers of the target and shadow masks are trained: in one "
        "call, one model after another (sequential, the CPU choice of auto), or stacked with "
        "vmap (the accelerator choice of auto); or separate, one pipeline call per mask. "
        "sequential and separate give identical results, vmap agrees up to float rounding "
        "(default: auto)",
    )
    parser.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not keep compiled XLA programs on disk (default: keep them in "
        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/ppds_jax/xla, so that shadow pipelines and "
        "later runs load them instead of compiling again; results are the same either way)",
    )
    return parser


def config_from_args(args: argparse.Namespace):
    """Build the ExperimentConfig that the command-line arguments request."""
    preset = PRESETS["quick" if args.quick else args.preset]
    names = args.generator or ["vae"]
    base = preset(dataset=args.dataset, generator=names[0])
    specs = list(base.pipelines)
    template = next(spec for spec in specs if spec.generator is not None)
    for name in names[1:]:
        specs.append(dataclasses.replace(template, name=name, generator=name))
    overrides = {
        "pipelines": with_epsilons(tuple(specs), tuple(args.epsilon)),
        "data_dir": args.data_dir,
    }
    for flag, field in [
        ("delta", "target_delta"),
        ("seed", "seed"),
        ("num_shadows", "num_shadows"),
        ("pool_size", "pool_size"),
    ]:
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    return dataclasses.replace(base, **overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.no_compilation_cache:
        compilation_cache.enable()
    try:
        config = config_from_args(args)
        run(
            config,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            shadow_strategy=args.shadow_strategy,
        )
    except (RunFolderError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
