"""Throughput of the DP-SGD step against the non-private step, and against Opacus.

Usage:
  python -m benchmarks.dpsgd_throughput [--quick] [--repeats N]

For each model and batch size, every method trains the same model on the same batch. The JAX
methods are `fit`'s jitted non-private step and its DP-SGD step with ghost (book-keeping) and
with vmap clipping. When torch and opacus import, the same architecture also runs in PyTorch
without DP and under Opacus, with per-example gradients from hooks and with ghost clipping.
Each step is compiled and warmed up first. Then the methods run in turn within each repeat, so
that load on the machine hits all of them alike, and the table shows medians over the repeats.

Writes benchmarks/results/dpsgd_throughput.json. --quick measures the CNN at batch 256 and
WRN-16-4 at batch 8 (ghost clipping only) with 3 repeats; most of its time is compilation.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppds_jax import dp_sgd, training

# The PyTorch models below must use the same GroupNorm group counts as the Flax ones.
from ppds_jax.networks import CNN, WideResNet, _groups

RESULTS_PATH = Path(__file__).parent / "results" / "dpsgd_throughput.json"
NUM_CLASSES = 10
LEARNING_RATE = 0.1
NOISE_MULTIPLIER = 1.0
L2_NORM_CLIP = 1.0

BOTH = ("ghost", "vmap")
# (batch size, JAX clipping methods) per model. vmap clipping forms every per-example gradient
# at once, so it is left out where that takes gigabytes (the CNN's dense layer has 401k
# weights) or a minute of compilation (WRN-16-4 on a 2-core CPU).
MODELS = {
    "cnn": {
        "image_shape": (28, 28, 1),
        "full": ((64, BOTH), (256, BOTH), (1024, ("ghost",))),
        "quick": ((256, BOTH),),
    },
    "wrn16_4": {
        "image_shape": (32, 32, 3),
        "full": ((16, BOTH), (64, ("ghost",))),
        "quick": ((8, ("ghost",)),),
    },
}


def _flax_model(name: str):
    if name == "cnn":
        return CNN(num_classes=NUM_CLASSES)
    return WideResNet(num_classes=NUM_CLASSES, depth=16, width_factor=4)


def _jax_steps(
    name: str, images: np.ndarray, labels: np.ndarray, methods: tuple[str, ...]
) -> dict[str, Callable]:
    """Zero-argument callables that each run one compiled step of `fit` and block on it."""
    model = _flax_model(name)
    batch_size = images.shape[0]
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(images[:1]))["params"]
    optimizer = optax.sgd(LEARNING_RATE)
    opt_state = optimizer.init(params)
    data = (jnp.asarray(images), jnp.asarray(labels))
    indices = jnp.arange(batch_size)
    mask = jnp.ones(batch_size, bool)
    key, loss_key, noise_key = jax.random.split(jax.random.key(1), 3)

    def loss(params, example, key):
        del key
        image, label = example
        logits = model.apply({"params": params}, image[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    non_private = training.make_non_private_step(loss, optimizer, batch_size=batch_size)
    # The expected batch equals the physical batch, so every row is a sampled example.
    config = dp_sgd.DpSgdConfig(
        l2_norm_clip=L2_NORM_CLIP,
        noise_multiplier=NOISE_MULTIPLIER,
        sampling_prob=batch_size / 60_000,
        num_steps=1,
        dataset_size=60_000,
        physical_batch_size=batch_size,
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    steps = {"jax": lambda: non_private(params, opt_state, data, indices, key)}
    for method in methods:
        clip_fn = dp_sgd.make_clip_fn(loss, l2_norm_clip=L2_NORM_CLIP, clipping_method=method)
        _, private = training.make_private_steps(clip_fn, optimizer, config)
        steps[f"jax_dp_{method}"] = functools.partial(
            private, params, opt_state, zeros, data, indices, mask, loss_key, noise_key
        )
    return {name: _blocking(step) for name, step in steps.items()}


def _blocking(step: Callable) -> Callable[[], None]:
    return lambda: jax.block_until_ready(step())


def _torch_modules():
    """PyTorch versions of the CNN and WRN-16-4 in networks.py, with the same GroupNorm groups."""
    import torch.nn as tnn

    class TorchCNN(tnn.Module):
        def __init__(self, in_channels: int, features=(32, 64), hidden=128):
            super().__init__()
            layers, channels = [], in_channels
            for width in features:
                layers += [
                    tnn.Conv2d(channels, width, 3, padding=1),
                    tnn.GroupNorm(_groups(width), width),
                    tnn.ReLU(),
                    tnn.AvgPool2d(2),
                ]
                channels = width
            self.features = tnn.Sequential(*layers)
            self.head = tnn.Sequential(
                tnn.Flatten(),
                tnn.Linear(channels * 7 * 7, hidden),
                tnn.ReLU(),
                tnn.Linear(hidden, NUM_CLASSES),
            )

        def forward(self, x):
            return self.head(self.features(x))

    class TorchWideBlock(tnn.Module):
        def __init__(self, in_channels: int, width: int, stride: int):
            super().__init__()
            self.norm1 = tnn.GroupNorm(_groups(in_channels, 16), in_channels)
            self.shortcut = None
            if in_channels != width or stride != 1:
                self.shortcut = tnn.Conv2d(in_channels, width, 1, stride=stride, bias=False)
            self.conv1 = tnn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
            self.norm2 = tnn.GroupNorm(_groups(width, 16), width)
            self.conv2 = tnn.Conv2d(width, width, 3, padding=1, bias=False)
            self.relu = tnn.ReLU()

        def forward(self, x):
            y = self.relu(self.norm1(x))
            shortcut = x if self.shortcut is None else self.shortcut(y)
            y = self.conv2(self.relu(self.norm2(self.conv1(y))))
            return shortcut + y

    class TorchWideResNet(tnn.Module):
        def __init__(self, depth=16, width_factor=4):
            super().__init__()
            blocks, channels = [tnn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
            for stage, base_width in enumerate((16, 32, 64)):
                for block in range((depth - 4) // 6):
                    stride = 2 if stage > 0 and block == 0 else 1
                    blocks.append(TorchWideBlock(channels, base_width * width_factor, stride))
                    channels = base_width * width_factor
            self.blocks = tnn.Sequential(*blocks)
            self.norm = tnn.GroupNorm(_groups(channels, 16), channels)
            self.relu = tnn.ReLU()
            self.head = tnn.Linear(channels, NUM_CLASSES)

        def forward(self, x):
            x = self.relu(self.norm(self.blocks(x)))
            return self.head(x.mean(dim=(2, 3)))

    return {"cnn": lambda: TorchCNN(1), "wrn16_4": TorchWideResNet}


def _torch_steps(name: str, images: np.ndarray, labels: np.ndarray) -> dict[str, Callable]:
    """Build one training step each for PyTorch without DP, Opacus hooks and Opacus ghost."""
    import torch
    from opacus import PrivacyEngine

    # Opacus's hooks fire on module outputs because the images do not require gradients,
    # which is intended here; PyTorch warns about it on every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    inputs = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    targets = torch.from_numpy(labels.astype(np.int64))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=len(labels)
    )
    make_module = _torch_modules()[name]
    steps = {}

    module = make_module()
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
    criterion = torch.nn.CrossEntropyLoss()

    def plain_step():
        optimizer.zero_grad()
        criterion(module(inputs), targets).backward()
        optimizer.step()

    steps["torch"] = plain_step

    for mode in ("hooks", "ghost"):
        engine = PrivacyEngine()
        module = make_module()
        optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
        private = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=L2_NORM_CLIP,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        steps[f"opacus_{mode}"] = _opacus_step(mode, private, inputs, targets)
    return steps


def _opacus_step(mode, private, inputs, targets) -> Callable[[], None]:
    import torch

    if mode == "ghost":
        # Ghost clipping needs Opacus's loss wrapper, which runs both backward passes.
        module, optimizer, criterion, _ = private
    else:
        module, optimizer, _ = private
        criterion = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad()
        criterion(module(inputs), targets).backward()
        optimizer.step()

    return step


def _torch_available() -> str | None:
    """Return None if torch and opacus import, else the reason they do not."""
    try:
        import opacus  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def _measure(steps: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per step of each method, the methods taking turns within each repeat."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(*, quick: bool, repeats: int) -> dict:
    """Measure every model and batch size; return the results as a JSON-ready dict."""
    torch_missing = _torch_available()
    torch_threads = None
    if torch_missing is None:
        import torch

        torch.manual_seed(0)
        torch_threads = torch.get_num_threads()
    rows = []
    for name, spec in MODELS.items():
        for batch_size, methods in spec["quick" if quick else "full"]:
            print(f"measuring {name} at batch {batch_size}", file=sys.stderr, flush=True)
            rng = np.random.default_rng(0)
            images = rng.uniform(-1, 1, (batch_size, *spec["image_shape"])).astype(np.float32)
            labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
            steps = _jax_steps(name, images, labels, methods)
            if torch_missing is None:
                steps.update(_torch_steps(name, images, labels))
            seconds = _measure(steps, repeats)
            throughput = {method: batch_size / value for method, value in seconds.items()}
            rows.append(
                {"model": name, "batch_size": batch_size, "examples_per_second": throughput}
            )
    return {
        "command": "python -m benchmarks.dpsgd_throughput" + (" --quick" if quick else ""),
        "repeats": repeats,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_version": jax.__version__,
        },
        "torch_threads": torch_threads,
        "opacus": "measured" if torch_missing is None else f"not measured: {torch_missing}",
        "rows": rows,
    }


def _print_table(results: dict) -> None:
    columns = ["jax", "jax_dp_ghost", "jax_dp_vmap", "torch", "opacus_hooks", "opacus_ghost"]
    print(f"examples/second, median of {results['repeats']} steps; Opacus: {results['opacus']}")
    header = ["model", "batch"] + columns + ["dp/non-dp", "ours/opacus_ghost"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in results["rows"]:
        throughput = row["examples_per_second"]
        values = [_format(throughput.get(column), ".0f") for column in columns]
        dp_ratio = _ratio(throughput.get("jax_dp_ghost"), throughput.get("jax"))
        opacus_ratio = _ratio(throughput.get("jax_dp_ghost"), throughput.get("opacus_ghost"))
        cells = [row["model"], str(row["batch_size"]), *values]
        cells += [_format(dp_ratio, ".2f"), _format(opacus_ratio, ".2f")]
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller batches")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    if repeats < 1:
        parser.error(f"--repeats={repeats} must be >= 1")
    results = run(quick=args.quick, repeats=repeats)
    _print_table(results)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
