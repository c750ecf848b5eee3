"""DP-SGD: the one layer that combines clipping, noise, Poisson sampling and accounting.

A `DpSgdConfig` fixes the mechanism, and `dp_sgd_event` turns the same config into the
`DpEvent` that the accountant composes, so the sampler that runs and the accountant cannot drift
apart. One step:

1. Poisson-sample a batch with probability `sampling_prob` per example
   (`batch_selection.poisson_batches`), padded to `physical_batch_size` with a mask.
2. Sum the per-example gradients clipped to `l2_norm_clip` (`clipping.clipped_grad_sum`);
   a realised batch larger than the physical size is summed chunk by chunk.
3. Add N(0, (noise_multiplier * l2_norm_clip)^2) noise once to the whole sum (`noise`).
4. Divide by the expected batch size `sampling_prob * dataset_size`, a public constant, never
   by the realised batch size.

Formal guarantee: with Poisson sampling, sensitivity `l2_norm_clip` under add-or-remove-one
neighbours, and Gaussian noise of standard deviation `noise_multiplier * l2_norm_clip` added
once per step, `num_steps` steps are `dp_sgd_event(config)`, which the accountants in
`ppds_jax.accounting` turn into (epsilon, delta).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import dp_accounting
import jax

from ppds_jax import accounting, clipping, noise


@dataclasses.dataclass(frozen=True)
class DpSgdConfig:
    """Settings of one DP-SGD run.

    Attributes:
      l2_norm_clip: per-example clip norm C > 0; inf (no clipping) only with noise_multiplier 0.
      noise_multiplier: sigma >= 0; the noise on the clipped sum has standard deviation
        sigma * C. Zero is only for tests: its epsilon is inf.
      sampling_prob: Poisson inclusion probability q in (0, 1].
      num_steps: number of steps, >= 1.
      dataset_size: public dataset size N >= 1 (the expected number of members, never the
        realised count); the noisy sum is divided by q * N.
      physical_batch_size: rows per compiled chunk, >= 1.
    """

    l2_norm_clip: float
    noise_multiplier: float
    sampling_prob: float
    num_steps: int
    dataset_size: int
    physical_batch_size: int

    def __post_init__(self):
        if not self.l2_norm_clip > 0:
            raise ValueError(f"l2_norm_clip={self.l2_norm_clip} must be > 0")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be finite and >= 0")
        if math.isinf(self.l2_norm_clip) and self.noise_multiplier > 0:
            raise ValueError(
                f"l2_norm_clip=inf needs noise_multiplier=0 (got {self.noise_multiplier}), "
                "because the noise standard deviation noise_multiplier * l2_norm_clip would be inf"
            )
        if not 0 < self.sampling_prob <= 1:
            raise ValueError(f"sampling_prob={self.sampling_prob} must be in (0, 1]")
        for name in ("num_steps", "dataset_size", "physical_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")

    @property
    def expected_batch_size(self) -> float:
        """q * N, the public constant the noisy sum is divided by."""
        return self.sampling_prob * self.dataset_size


def dp_sgd_event(config: DpSgdConfig) -> dp_accounting.DpEvent:
    """Build the `DpEvent` of `config`: num_steps compositions of a Poisson-sampled Gaussian."""
    return _event(config.sampling_prob, config.noise_multiplier, config.num_steps)


def _event(sampling_prob: float, noise_multiplier: float, num_steps: int):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        num_steps,
    )


def default_physical_batch_size(batch_size: int, sampling_prob: float) -> int:
    """Return the expected batch plus three standard deviations of its size, rounded up.

    Poisson batches of expected size B have standard deviation sqrt(B (1 - q)). With this
    margin about 0.1% of steps need a second chunk, instead of half of them.
    """
    return math.ceil(batch_size + 3 * math.sqrt(batch_size * (1 - sampling_prob)))


def make_dp_sgd_config(
    *,
    target_epsilon: float,
    target_delta: float,
    dataset_size: int,
    batch_size: int,
    num_steps: int,
    l2_norm_clip: float = 1.0,
    physical_batch_size: int | None = None,
    accountant: str = "pld",
) -> DpSgdConfig:
    """Build a `DpSgdConfig` whose noise multiplier meets (target_epsilon, target_delta).

    Args:
      target_epsilon: > 0.
      target_delta: in (0, 0.1 / dataset_size].
      dataset_size: public dataset size N >= 1.
      batch_size: expected batch size B, 1 <= B <= N; the sampling probability is B / N.
      num_steps: >= 1.
      l2_norm_clip: C > 0.
      physical_batch_size: rows per compiled chunk; by default
        `default_physical_batch_size(batch_size, q)`, about B + 3 sqrt(B).
      accountant: "pld" or "rdp", used for calibration.

    Raises:
      ValueError: an argument outside its range, or an unreachable target epsilon.
    """
    accounting.check_delta(target_delta, dataset_size)
    if not 1 <= batch_size <= dataset_size:
        raise ValueError(f"{batch_size=} must be in [1, {dataset_size=}]")
    if num_steps < 1:
        raise ValueError(f"{num_steps=} must be >= 1")
    sampling_prob = batch_size / dataset_size
    noise_multiplier = _calibrated_noise_multiplier(
        sampling_prob, int(num_steps), float(target_epsilon), float(target_delta), accountant
    )
    if physical_batch_size is None:
        physical_batch_size = default_physical_batch_size(batch_size, sampling_prob)
    return DpSgdConfig(
        l2_norm_clip=float(l2_norm_clip),
        noise_multiplier=noise_multiplier,
        sampling_prob=sampling_prob,
        num_steps=int(num_steps),
        dataset_size=int(dataset_size),
        physical_batch_size=int(physical_batch_size),
    )


def make_ledger(
    stage_name: str, config: DpSgdConfig, **parameters: Any
) -> accounting.PrivacyLedger:
    """Return a ledger with one DP-SGD stage: `dp_sgd_event(config)` and the config's fields.

    Args:
      stage_name: the stage's name in the ledger, for example "vae_dp_sgd".
      config: the run's settings.
      **parameters: further JSON-serialisable facts of the stage, recorded beside the fields.
    """
    ledger = accounting.PrivacyLedger()
    ledger.add_stage(stage_name, dp_sgd_event(config), {**dataclasses.asdict(config), **parameters})
    return ledger


# Every shadow pipeline of an experiment needs the same calibration, and each PLD search takes
# seconds, so the results are kept for the life of the process.
@functools.lru_cache(maxsize=256)
def _calibrated_noise_multiplier(
    sampling_prob: float, num_steps: int, target_epsilon: float, target_delta: float, accountant
) -> float:
    return accounting.calibrate_noise_multiplier(
        lambda sigma: _event(sampling_prob, sigma, num_steps),
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        accountant=accountant,
    )


def noisy_gradient(key: jax.Array, clipped_sum: Any, config: DpSgdConfig) -> Any:
    """Privatise a clipped-gradient sum: add N(0, (sigma C)^2) noise and divide by q * N.

    Use this to accumulate chunks yourself: add up the sums that `clipping.clipped_grad_sum`
    (with `l2_norm_clip=config.l2_norm_clip`) returns for every chunk of one Poisson batch,
    then call this once. Calling it once per chunk would add noise several times per step,
    which the accountant does not assume.

    Args:
      key: PRNG key used for the noise only.
      clipped_sum: pytree of float arrays, the clipped sum of one whole Poisson batch.
      config: the run's settings.

    Returns:
      The noisy gradient estimate, same structure as `clipped_sum`.
    """
    # Without noise the standard deviation is 0 even for l2_norm_clip = inf (0 * inf is NaN).
    stddev = 0.0 if config.noise_multiplier == 0 else config.noise_multiplier * config.l2_norm_clip
    noisy_sum = noise.add_gaussian_noise(key, clipped_sum, stddev=stddev)
    scale = 1.0 / config.expected_batch_size
    return jax.tree.map(lambda leaf: leaf * scale, noisy_sum)


CLIPPING_METHODS = ("vmap", "ghost")


def make_clip_fn(
    per_example_loss: clipping.PerExampleLoss,
    *,
    l2_norm_clip: float,
    clipping_method: str = "vmap",
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> Callable[[Any, tuple, jax.Array, jax.Array], tuple[Any, clipping.ClipStats]]:
    """Build the clipped-sum function of `clipping_method` ("vmap" or "ghost").

    Raises:
      ValueError: an unknown method, or per-layer clipping or micro-batches with "ghost".
    """
    if clipping_method == "vmap":
        return clipping.clipped_grad_sum(
            per_example_loss,
            l2_norm_clip=l2_norm_clip,
            per_layer=per_layer,
            microbatch_size=microbatch_size,
        )
    if clipping_method == "ghost":
        if per_layer or microbatch_size is not None:
            raise ValueError(
                "clipping_method='ghost' supports neither per_layer nor microbatch_size; "
                "use clipping_method='vmap'"
            )
        return clipping.ghost_clipped_grad_sum(per_example_loss, l2_norm_clip=l2_norm_clip)
    raise ValueError(f"{clipping_method=} is unknown; expected one of {CLIPPING_METHODS}")


def private_gradient(
    per_example_loss: clipping.PerExampleLoss,
    config: DpSgdConfig,
    *,
    clipping_method: str = "vmap",
    per_layer: bool = False,
    microbatch_size: int | None = None,
) -> Callable[[Any, tuple, jax.Array, jax.Array], tuple[Any, clipping.ClipStats]]:
    """Build the DP-SGD gradient for a Poisson batch that fits in one physical batch.

    Args:
      per_example_loss: `loss(params, example, key) -> scalar`.
      config: the run's settings.
      clipping_method: "vmap" (`clipping.clipped_grad_sum`) or "ghost"
        (`clipping.ghost_clipped_grad_sum`, faster for Flax Dense and Conv layers); both give
        the same clipped sum.
      per_layer, microbatch_size: passed to `clipping.clipped_grad_sum`; "ghost" supports
        neither.

    Returns:
      jittable `fn(params, batch, mask, key) -> (noisy_gradient, ClipStats)`, where
      `noisy_gradient = (clipped_sum + N(0, (sigma C)^2 I)) / (q N)`. The key is split into one
      key for the per-example losses and one for the noise. For a Poisson batch in several
      chunks, use `clipping.clipped_grad_sum` per chunk and `noisy_gradient` once.
    """
    clip_fn = make_clip_fn(
        per_example_loss,
        l2_norm_clip=config.l2_norm_clip,
        clipping_method=clipping_method,
        per_layer=per_layer,
        microbatch_size=microbatch_size,
    )

    def fn(params, batch, mask, key):
        loss_key, noise_key = jax.random.split(key)
        clipped_sum, stats = clip_fn(params, batch, mask, loss_key)
        return noisy_gradient(noise_key, clipped_sum, config), stats

    return fn
