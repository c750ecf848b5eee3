"""Diffusion sampling and training speed, measured side by side in one run.

Command: `python -m benchmarks.diffusion_sampling [--quick] [--num-images N] [--repeats R]
[--grid]`

Sampling: DDIM with the default config (50 steps, guidance on) for 28x28x1 images, two ways:

- scan: `diffusion.make_sampler`, the whole reverse process of a chunk as one compiled program
  (the path `FAMILY.sample` takes).
- loop: a Python loop over the 50 steps that calls a jitted `diffusion.ddim_step` per step,
  with the same keys, so both return the same images up to rounding. This is the strongest
  Python loop, and the one the speedup column compares with.
- eager: the same loop without `jax.jit`, so every operation of the U-Net is dispatched on its
  own, as in a line-by-line port of a PyTorch sampler. Its column shows what compiling at all
  gains; it is not the baseline of the speedup column.

Both process the images in chunks of `sampling_batch_size`. Repeats run round-robin, so
background load hits both alike, and the table reports medians without compilation (each
program is compiled and run once before timing). Speedup is the ratio of wall-clock medians.
The ratio of process CPU-time medians is reported too, because on a shared CPU it varies less
with other programs' load. A second row samples 8x8 images from a tiny
U-Net, where the per-step work is small and the loop's per-call overhead shows.

Training: seconds per epoch of `FAMILY.fit` at the default config on 5,000 Fashion-MNIST
images, from the difference of a short and a twice-as-long fit (each call compiles its own
step). `--grid` also trains the default config in full and writes a 10x10 grid of samples.

The default runs 10,000 images and fits of 1 and 2 epochs; `--quick` runs 32 images and fits
of 0.2 and 0.4 epochs. Results go to benchmarks/results/diffusion_sampling.json (and
diffusion_samples.png with `--grid`), together with the machine they ran on.

NOTE: the default 10,000 images suit an accelerator. An idle 2-core CPU sampled 6.4 images per
second with the default U-Net (measured with `--quick`), so each timed run there would take
about 26 minutes; pass `--quick` or a smaller `--num-images` on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ppds_jax import datasets
from ppds_jax.generators import diffusion, resolve_config
from ppds_jax.generators.unet import UNet

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TINY_CONFIG = {"channels": 4, "channel_mults": (1,), "num_res_blocks": 1}


def machine_info() -> dict:
    """Describe the machine: backend, devices, CPU count, load and versions."""
    return {
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def make_loop_sampler(
    config: dict, *, image_shape: tuple[int, ...], num_classes: int, jit_step: bool = True
):
    """Build `run(params, key, labels)`: a Python loop calling a DDIM step per step.

    It draws the same initial noise and step keys as `diffusion.ddim_sample`. With `jit_step`
    False the step runs eagerly, one dispatched operation at a time.
    """
    config = resolve_config(diffusion.FAMILY, config)
    model = UNet(
        num_classes=num_classes,
        channels=config["channels"],
        channel_mults=tuple(config["channel_mults"]),
        num_res_blocks=config["num_res_blocks"],
    )
    schedule = diffusion.make_schedule(config["beta_schedule"], config["num_timesteps"])
    timesteps = diffusion.ddim_timesteps(config["num_timesteps"], config["num_sampling_steps"])
    previous = np.append(timesteps[1:], -1).astype(np.int32)

    def step(params, x, labels, t, s, key):
        eps_fn = diffusion.guided_eps_fn(
            model, params, labels, num_classes=num_classes, guidance_scale=config["guidance_scale"]
        )
        return diffusion.ddim_step(
            eps_fn, schedule, x, t, s, key, eta=config["eta"], clip_denoised=config["clip_denoised"]
        )

    if jit_step:
        step = jax.jit(step)

    def run(params, key, labels):
        init_key, loop_key = jax.random.split(key)
        x = jax.random.normal(init_key, (labels.shape[0], *image_shape))
        step_keys = jax.random.split(loop_key, len(timesteps))
        for index, (t, s) in enumerate(zip(timesteps, previous, strict=True)):
            x = step(params, x, labels, t, s, step_keys[index])
        return jnp.clip(x, -1.0, 1.0)

    return run


def _sample_chunks(run, params, key, labels: np.ndarray, chunk_size: int) -> np.ndarray:
    images = [
        run(params, jax.random.fold_in(key, index), jnp.asarray(labels[start : start + chunk_size]))
        for index, start in enumerate(range(0, len(labels), chunk_size))
    ]
    return np.asarray(jax.block_until_ready(jnp.concatenate(images)))


def bench_sampling(
    name: str, config: dict, image_shape: tuple[int, ...], num_images: int, repeats: int
) -> dict:
    """Time the scan and loop samplers on `num_images` images, round-robin, and compare them."""
    config = resolve_config(diffusion.FAMILY, config)
    state = diffusion.init(
        jax.random.key(0), image_shape=image_shape, num_classes=10, config=config
    )
    labels = np.arange(num_images, dtype=np.int32) % 10
    chunk_size = min(config["sampling_batch_size"], num_images)
    samplers = {
        "scan": diffusion.make_sampler(config, image_shape=image_shape, num_classes=10),
        "loop": make_loop_sampler(config, image_shape=image_shape, num_classes=10),
        "eager": make_loop_sampler(config, image_shape=image_shape, num_classes=10, jit_step=False),
    }
    key = jax.random.key(1)

    outputs, compile_seconds = {}, {}
    for method, run in samplers.items():
        start = time.perf_counter()
        outputs[method] = _sample_chunks(run, state["params"], key, labels[:chunk_size], chunk_size)
        compile_seconds[method] = time.perf_counter() - start

    seconds = {method: [] for method in samplers}
    cpu_seconds = {method: [] for method in samplers}
    for _ in range(repeats):
        for method, run in samplers.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            _sample_chunks(run, state["params"], key, labels, chunk_size)
            seconds[method].append(time.perf_counter() - start)
            cpu_seconds[method].append(time.process_time() - cpu_start)

    medians = {method: statistics.median(values) for method, values in seconds.items()}
    cpu_medians = {method: statistics.median(values) for method, values in cpu_seconds.items()}
    return {
        "name": name,
        "image_shape": list(image_shape),
        "num_images": num_images,
        "chunk_size": chunk_size,
        "num_sampling_steps": config["num_sampling_steps"],
        "guidance_scale": config["guidance_scale"],
        "repeats": repeats,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "first_call_seconds": compile_seconds,
        "scan_images_per_second": num_images / medians["scan"],
        "loop_images_per_second": num_images / medians["loop"],
        "eager_images_per_second": num_images / medians["eager"],
        "speedup": medians["loop"] / medians["scan"],
        "speedup_over_eager": medians["eager"] / medians["scan"],
        "cpu_time_ratio": cpu_medians["loop"] / cpu_medians["scan"],
        "max_abs_difference": float(
            max(np.max(np.abs(outputs["scan"] - outputs[m])) for m in ("loop", "eager"))
        ),
    }


def bench_training(num_epochs: float, data: datasets.Dataset) -> dict:
    """Measure seconds per epoch of `FAMILY.fit` at the default config from two fit lengths."""
    state = diffusion.init(
        jax.random.key(0), image_shape=data.image_shape, num_classes=data.num_classes, config={}
    )
    seconds, cpu_seconds = {}, {}
    for epochs in (num_epochs, 2 * num_epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = diffusion.FAMILY.fit(
            jax.random.key(1),
            state,
            data.train_images,
            data.train_labels,
            config={"num_epochs": epochs},
        )
        jax.block_until_ready(result.state["params"])
        seconds[epochs] = time.perf_counter() - start
        cpu_seconds[epochs] = time.process_time() - cpu_start
    per_epoch = (seconds[2 * num_epochs] - seconds[num_epochs]) / num_epochs
    cpu_per_epoch = (cpu_seconds[2 * num_epochs] - cpu_seconds[num_epochs]) / num_epochs
    return {
        "num_images": len(data.train_labels),
        "config": dict(diffusion.DEFAULT_CONFIG),
        "fit_seconds": {str(epochs): value for epochs, value in seconds.items()},
        "seconds_per_epoch": per_epoch,
        "cpu_seconds_per_epoch": cpu_per_epoch,
        "compile_seconds_estimate": seconds[num_epochs] - num_epochs * per_epoch,
    }


def train_and_draw_grid(data: datasets.Dataset, path: Path) -> dict:
    """Train the default config in full, then save 10 samples per class as a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = diffusion.init(
        jax.random.key(0), image_shape=data.image_shape, num_classes=data.num_classes, config={}
    )
    start = time.perf_counter()
    result = diffusion.FAMILY.fit(
        jax.random.key(1), state, data.train_images, data.train_labels, config={}
    )
    jax.block_until_ready(result.state["params"])
    fit_seconds = time.perf_counter() - start

    labels = np.repeat(np.arange(data.num_classes), 10)
    start = time.perf_counter()
    images = diffusion.FAMILY.sample(jax.random.key(2), result.state, labels, config={})
    sample_seconds = time.perf_counter() - start

    figure, axes = plt.subplots(data.num_classes, 10, figsize=(10, data.num_classes))
    for axis, image in zip(axes.ravel(), images, strict=True):
        axis.imshow((image[..., 0] + 1.0) / 2.0, cmap="gray", vmin=0.0, vmax=1.0)
        axis.axis("off")
    figure.savefig(path, dpi=60, bbox_inches="tight")
    plt.close(figure)
    losses = result.history["loss"]
    return {
        "fit_seconds": fit_seconds,
        "sample_seconds_100_images": sample_seconds,
        "first_loss": losses[0],
        "last_loss_mean_of_10": float(np.mean(losses[-10:])),
        "grid": str(path),
    }


def _print_tables(results: dict) -> None:
    print(
        "| workload | images | scan img/s | loop img/s | eager img/s | scan speedup "
        "| CPU-time ratio | scan over eager | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["sampling"]:
        shape = "x".join(map(str, row["image_shape"]))
        print(
            f"| {row['name']} ({shape}, {row['num_sampling_steps']} DDIM steps) "
            f"| {row['num_images']} | {row['scan_images_per_second']:.1f} "
            f"| {row['loop_images_per_second']:.1f} | {row['eager_images_per_second']:.1f} "
            f"| {row['speedup']:.2f}x | {row['cpu_time_ratio']:.2f}x "
            f"| {row['speedup_over_eager']:.2f}x | {row['max_abs_difference']:.1e} |"
        )
    training = results["training"]
    print()
    print(
        f"training, default config, {training['num_images']} Fashion-MNIST images: "
        f"{training['seconds_per_epoch']:.1f} s per epoch, "
        f"{training['cpu_seconds_per_epoch']:.1f} CPU-seconds per epoch "
        f"(compilation about {training['compile_seconds_estimate']:.1f} s per fit call)"
    )
    if "grid" in results:
        grid = results["grid"]
        print(
            f"full default fit: {grid['fit_seconds']:.1f} s, loss {grid['first_loss']:.3f} -> "
            f"{grid['last_loss_mean_of_10']:.3f}; samples in {grid['grid']}"
        )
    machine = results["machine"]
    print(
        f"\nmachine: {machine['backend']}, {machine['cpu_count']} CPUs, "
        f"1-minute load average {machine['load_average_1min']:.1f} at start"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="32 images and fits of 0.2 and 0.4 epochs"
    )
    parser.add_argument("--num-images", type=int, help="images per sampling run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="also train the default config and save a grid of samples",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "diffusion_sampling.json")
    args = parser.parse_args(argv)
    num_images = args.num_images or (32 if args.quick else 10_000)
    if num_images < 1 or args.repeats < 1:
        parser.error("--num-images and --repeats must be >= 1")

    results = {"machine": machine_info(), "quick": args.quick}
    results["sampling"] = [
        bench_sampling("default U-Net", {}, (28, 28, 1), num_images, args.repeats),
        bench_sampling("tiny U-Net", TINY_CONFIG, (8, 8, 1), num_images, args.repeats),
    ]
    data = datasets.load_dataset("fashion_mnist", train_size=5000, seed=0)
    results["training"] = bench_training(0.2 if args.quick else 1.0, data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid:
        results["grid"] = train_and_draw_grid(data, args.out.with_name("diffusion_samples.png"))
    args.out.write_text(json.dumps(results, indent=2))
    _print_tables(results)
    return results


if __name__ == "__main__":
    main()
