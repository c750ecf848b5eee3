"""Training K models of one architecture at once, one per membership mask of a shared data pool.

A membership-inference experiment runs the same pipeline on a target mask and K shadow masks of
one data pool, so each training stage trains K copies of one model on K subsets. `train_many`
trains them together. Model k trains on the rows where `masks[k]` is True, with its own key,
and its batches are selected on the host exactly as `training.fit` selects them on
`data[masks[k]]`, so each model gets `training.fit`'s result for the same key. The data array
is shared: it is put on the device once and each step passes only row indices.

Two strategies run the same per-model computation:

- "sequential": one compiled step, reused for every model and every step, with the models
  trained one after another. Fastest on CPUs.
- "vmap": the step vmapped over the stacked models, one program per step for all K models (or
  for groups of `models_per_program`), spread over the devices of a `mesh` when one is given.
  Usually fastest on GPUs.

Both compile each step function once per call, while K calls of `training.fit` compile K times.
On a CPU that compilation is a large share of a small model's training time. "auto" picks by
backend (`choose_strategy`), and `benchmarks/shadow_throughput.py` measures the strategies side
by side.

Under DP-SGD each model runs `training.fit`'s mechanism unchanged. It draws its own Poisson
batches over its own member rows, clips per-example gradients, adds Gaussian noise once per step
from that step's noise key, divides by the public expected batch size, and runs exactly
`dp.num_steps` steps.
When models of one vmapped step need different numbers of physical chunks, a model's extra
chunks are fully masked, and masked rows contribute exactly zero (`clipping.clipped_grad_sum`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from ppds_jax import (
    batch_selection,
    classifier,
    clipping,
    dp_sgd,
    networks,
    sharding,
    training,
)
from ppds_jax.generators.base import PrivacySpec

STRATEGIES = ("auto", "vmap", "sequential")


def choose_strategy(backend: str | None = None, *, mesh: jax.sharding.Mesh | None = None) -> str:
    """Return the strategy "auto" stands for: "sequential" on CPU, "vmap" elsewhere or on a mesh.

    The rule is measured per backend, not probed per model. On a 2-core CPU, training a small
    CNN vmapped over 8 models took about 3 times as long as training them one after another
    (XLA's CPU convolutions gain nothing from the extra batch axis), while on GPUs vmapping
    usually fills the device better. A mesh needs "vmap", because only stacked models can be
    split over its model axis.

    Args:
      backend: "cpu", "gpu", "tpu" or another JAX platform name; by default
        `jax.default_backend()`.
      mesh: the device mesh `train_many` will use, or None.
    """
    if mesh is not None:
        return "vmap"
    backend = jax.default_backend() if backend is None else backend
    return "sequential" if backend == "cpu" else "vmap"


def train_many(
    keys: jax.Array,
    params_init_fn: Callable[[jax.Array], Any],
    *,
    per_example_loss: clipping.PerExampleLoss,
    data: tuple,
    masks: np.ndarray,
    optimizer: optax.GradientTransformation,
    num_steps: int | Sequence[int],
    batch_size: int,
    strategy: str = "auto",
    dp: dp_sgd.DpSgdConfig | None = None,
    clipping_method: str = "ghost",
    mesh: jax.sharding.Mesh | None = None,
    models_per_program: int | None = None,
    device_memory_bytes: int | None = None,
    progress: bool = False,
) -> tuple[Any, list[training.FitStats]]:
    """Train one model per membership mask on a shared data array.

    For model k, `init_key, fit_key = jax.random.split(keys[k])`, and the result equals

        training.fit(fit_key, params_init_fn(init_key), data=tuple(a[masks[k]] for a in data),
                     num_steps=num_steps[k], ...)

    with the other arguments passed through (the convention of `classifier.train_classifier`
    and the generator families, which split their key the same way). "sequential" runs the
    same XLA computation per step as `training.fit`. "vmap" batches it over models, which
    changes results by float rounding. Adam can amplify that rounding: a parameter whose true
    gradient is zero (a convolution bias followed by GroupNorm) gets a rounding-sized gradient,
    and Adam's normalisation turns its sign into a full learning-rate step.

    Args:
      keys: (K,) PRNG keys, one per model.
      params_init_fn: `init(key) -> params`, the initial parameter pytree of one model.
      per_example_loss: `loss(params, example, key) -> scalar`, as in `training.fit`.
      data: tuple of arrays with a shared leading axis N, for example
        (images (N, 28, 28, 1) float32, labels (N,) int32). Every model reads its rows from it.
      masks: (K, N) bool; model k trains on the rows where `masks[k]` is True.
      optimizer: an optax transformation.
      num_steps: optimizer steps, one int for every model or K ints; must equal `dp.num_steps`
        under DP.
      batch_size: rows per step without DP, at most each model's member count.
      strategy: "auto", "vmap" or "sequential"; "auto" means `choose_strategy(mesh=mesh)`.
      dp: DP-SGD settings shared by all models, or None.
      clipping_method: under DP, "ghost" or "vmap", as in `training.fit` (whose default is
        also "ghost").
      mesh: a `sharding.make_mesh` mesh: models split over its "model" axis, each step's batch
        over its "data" axis. Needs the "vmap" strategy.
      models_per_program: with "vmap", the most models in one program; groups of this many run
        one after another. None puts all K in one program.
      device_memory_bytes: with "vmap", the memory per device that one program may use. None
        reads the device's `bytes_limit` where it reports one (GPUs and TPUs) and skips the
        check where it does not (CPUs).
      progress: show a tqdm bar over model-steps.

    Returns:
      (params, stats). `params` is the parameter pytree with a leading (K,) axis on every leaf,
      model k at index k, and `stats` is a list of K `training.FitStats`.

    Raises:
      ValueError: masks that are not (K, N) bool, a mask that selects no rows, a batch size
        larger than a model's member count, a step count that differs from `dp.num_steps`, an
        unknown strategy or clipping method, "sequential" with a mesh, a model count or batch
        that the mesh axes do not divide, one vmapped program that needs more memory than a
        device has, or a BatchNorm layer in the parameters.
    """
    if clipping_method not in dp_sgd.CLIPPING_METHODS:
        raise ValueError(
            f"{clipping_method=} is unknown; expected one of {dp_sgd.CLIPPING_METHODS}"
        )
    members = _member_rows(keys, data, masks)
    num_models = len(members)
    steps = _steps_per_model(num_steps, num_models, dp)
    if dp is None:
        _check_batch_size(batch_size, members)
    strategy = _resolve_strategy(strategy, mesh)
    group_size = _group_size(models_per_program, num_models, strategy)
    if mesh is not None:
        sharding.check_num_models(group_size, mesh)
        if num_models % group_size:
            sharding.check_num_models(num_models % group_size, mesh)
        sharding.check_batch_size(batch_size if dp is None else dp.physical_batch_size, mesh)

    split_keys = [jax.random.split(keys[k]) for k in range(num_models)]
    init_keys = [pair[0] for pair in split_keys]
    fit_keys = [pair[1] for pair in split_keys]
    training.check_no_batch_norm_params(jax.eval_shape(params_init_fn, init_keys[0]))

    batched = strategy == "vmap"
    functions = _step_functions(
        params_init_fn, per_example_loss, optimizer, batch_size, dp, clipping_method, mesh, batched
    )
    runner = _Runner(
        functions,
        batch_size=batch_size,
        dp=dp,
        mesh=mesh,
        batched=batched,
        memory_limit_bytes=_device_memory_limit(device_memory_bytes) if batched else None,
    )
    if mesh is None:
        data = tuple(jnp.asarray(array) for array in data)
    else:
        data = sharding.put_replicated(tuple(np.asarray(array) for array in data), mesh)
    if not batched:
        group_size = 1
    groups = [
        list(range(start, min(start + group_size, num_models)))
        for start in range(0, num_models, group_size)
    ]
    bar = tqdm.tqdm(total=int(steps.sum()), desc="models x steps", disable=not progress)
    params, stats = [], []
    for group in groups:
        group_params, group_stats = runner.run(
            data,
            init_keys=[init_keys[k] for k in group],
            fit_keys=[fit_keys[k] for k in group],
            members=[members[k] for k in group],
            num_steps=steps[group],
            progress_bar=bar,
        )
        params.append(group_params)
        stats.extend(group_stats)
    bar.close()
    if len(params) == 1:
        return params[0], stats
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *params), stats


def train_classifiers(
    keys: jax.Array,
    images: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    *,
    num_classes: int,
    config: dict[str, Any] | None = None,
    privacy: PrivacySpec | None = None,
    strategy: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    models_per_program: int | None = None,
    progress: bool = False,
) -> list[classifier.ClassifierResult]:
    """Train one classifier per membership mask, each as `classifier.train_classifier` would.

    Result k equals `classifier.train_classifier(keys[k], images[masks[k]], labels[masks[k]],
    num_classes=num_classes, config=config, privacy=privacy)`, exactly with "sequential" and
    up to float rounding with "vmap" (see `train_many`). Without DP each model runs
    `num_epochs * max(1, round(n_k / batch_size))` steps for its own member count n_k, as
    `train_classifier` does. Under DP every model runs the steps of the public
    `privacy.dataset_size` and gets its own copy of the same ledger.

    Args:
      keys: (K,) PRNG keys, one per classifier.
      images: (N, H, W, C) float32 in [-1, 1], the whole pool.
      labels: (N,) int32 in [0, num_classes).
      masks: (K, N) bool; classifier k trains on the rows where `masks[k]` is True.
      num_classes: size of the output layer.
      config: options overriding `classifier.DEFAULT_CONFIG`; early stopping is not supported.
      privacy: DP-SGD target shared by every classifier, or None.
      strategy, mesh, models_per_program, progress: as in `train_many`.

    Returns:
      A list of K `classifier.ClassifierResult`, in the order of `keys`.

    Raises:
      ValueError: `early_stopping_patience` > 0, invalid options, or any input that
        `train_many` rejects.
    """
    config = classifier.resolve_config(config)
    if config["early_stopping_patience"] > 0:
        raise ValueError(
            f"early_stopping_patience={config['early_stopping_patience']} needs a validation set"
            " per model, which train_classifiers does not take; call"
            " classifier.train_classifier for each model instead"
        )
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    masks = np.asarray(masks)
    init, loss, optimizer = _classifier_functions(
        tuple(sorted(config.items())), num_classes, images.shape[1:]
    )
    batch_size = int(config["batch_size"])
    num_epochs = int(config["num_epochs"])
    dp_config = None
    if privacy is None:
        member_counts = masks.sum(axis=1) if masks.ndim == 2 else np.zeros(1)
        num_steps = [max(1, round(int(n) / batch_size)) * num_epochs for n in member_counts]
    else:
        dp_config = classifier.make_dp_config(config, privacy)
        num_steps = dp_config.num_steps

    params, stats = train_many(
        keys,
        init,
        per_example_loss=loss,
        data=(images, labels),
        masks=masks,
        optimizer=optimizer,
        num_steps=num_steps,
        batch_size=batch_size,
        strategy=strategy,
        dp=dp_config,
        mesh=mesh,
        models_per_program=models_per_program,
        progress=progress,
    )
    results = []
    for k, model_stats in enumerate(stats):
        ledger = None if dp_config is None else classifier.make_ledger(dp_config)
        history = {"loss": [float(value) for value in model_stats.loss]}
        model_params = jax.tree.map(lambda leaf, k=k: leaf[k], params)
        results.append(
            classifier.ClassifierResult(
                model_params, config, num_classes, ledger, history, num_epochs
            )
        )
    return results


@functools.lru_cache(maxsize=16)
def _classifier_functions(config_items: tuple, num_classes: int, image_shape: tuple):
    """Build the (init, per-example loss, optimizer) of `classifier.train_classifier`.

    Cached per config, so that calls with the same config reuse `train_many`'s compiled steps.
    """
    config = dict(config_items)
    model = networks.CNN(num_classes, features=config["features"], hidden=config["hidden"])
    sample_input = jnp.zeros((1, *image_shape), jnp.float32)

    def init(key):
        return model.init(key, sample_input)["params"]

    loss, optimizer = classifier.training_functions(config, num_classes)
    return init, loss, optimizer


def _member_rows(keys, data, masks) -> list[np.ndarray]:
    """Validate keys, data and masks; return each model's member row indices into `data`."""
    if not isinstance(data, tuple | list) or not data:
        raise ValueError("data must be a non-empty tuple of arrays with a shared leading axis")
    sizes = {np.shape(array)[0] if np.ndim(array) else None for array in data}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"data arrays must share a leading axis, got shapes {[np.shape(a) for a in data]}"
        )
    num_rows = sizes.pop()
    masks = np.asarray(masks)
    num_keys = np.shape(keys)[0] if np.ndim(keys) else 0
    if masks.dtype != bool or masks.shape != (num_keys, num_rows):
        raise ValueError(
            f"masks must be bool with shape (K, N) = ({num_keys}, {num_rows}) for {num_keys} "
            f"keys and {num_rows} data rows; got {masks.dtype} with shape {masks.shape}"
        )
    if num_keys < 1:
        raise ValueError("keys must hold at least one PRNG key")
    counts = masks.sum(axis=1)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"rows {empty.tolist()} of masks select none of the {num_rows} data rows; every model "
            "needs at least one member"
        )
    return [np.flatnonzero(mask) for mask in masks]


def _steps_per_model(num_steps, num_models: int, dp) -> np.ndarray:
    if np.ndim(num_steps) and np.shape(num_steps) != (num_models,):
        raise ValueError(
            f"num_steps has shape {np.shape(num_steps)}; expected one int or ({num_models},)"
        )
    steps = np.broadcast_to(np.asarray(num_steps, dtype=np.int64), (num_models,)).copy()
    if steps.min() < 1:
        raise ValueError(f"num_steps={steps.min()} must be >= 1 for every model")
    if dp is not None and np.any(steps != dp.num_steps):
        raise ValueError(
            f"num_steps={sorted(set(steps.tolist()))} must equal dp.num_steps={dp.num_steps}, "
            "the steps the accountant assumes"
        )
    return steps


def _check_batch_size(batch_size: int, members: list[np.ndarray]) -> None:
    counts = np.array([len(rows) for rows in members])
    if batch_size < 1 or batch_size > counts.min():
        smallest = int(np.argmin(counts))
        raise ValueError(
            f"{batch_size=} must be in [1, {counts.min()}]: masks[{smallest}] selects only "
            f"{counts.min()} rows"
        )


def _resolve_strategy(strategy: str, mesh) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"{strategy=} is not one of {STRATEGIES}")
    if strategy == "auto":
        return choose_strategy(mesh=mesh)
    if strategy == "sequential" and mesh is not None:
        raise ValueError("strategy='sequential' cannot use a mesh; use 'vmap' or 'auto'")
    return strategy


def _group_size(models_per_program, num_models: int, strategy: str) -> int:
    if models_per_program is None:
        return num_models
    if strategy != "vmap":
        raise ValueError(f"{models_per_program=} applies to strategy='vmap' only, not {strategy!r}")
    if isinstance(models_per_program, bool) or models_per_program < 1:
        raise ValueError(f"{models_per_program=} must be an integer >= 1")
    return min(models_per_program, num_models)


def _non_private_step(per_example_loss, optimizer, batch_size):
    """Build one model's non-private step: `training.fit`'s step, with its key derivation."""
    fit_step = training.make_non_private_step(per_example_loss, optimizer, batch_size=batch_size)

    def step(params, opt_state, data, indices, loop_key, step_index):
        key = jax.random.fold_in(loop_key, step_index)
        return fit_step(params, opt_state, data, indices, key)

    return step


def _private_steps(per_example_loss, optimizer, dp, clipping_method):
    """Build one model's DP-SGD chunk accumulation and final step from `training.fit`'s."""
    clip_fn = dp_sgd.make_clip_fn(
        per_example_loss, l2_norm_clip=dp.l2_norm_clip, clipping_method=clipping_method
    )
    fit_accumulate, fit_step = training.make_private_steps(clip_fn, optimizer, dp)

    def step_keys(loop_key, step_index, chunk_index):
        loss_key, noise_key = jax.random.split(jax.random.fold_in(loop_key, step_index))
        return jax.random.fold_in(loss_key, chunk_index), noise_key

    def accumulate(params, total, data, indices, mask, loop_key, step_index, chunk_index):
        chunk_key, _ = step_keys(loop_key, step_index, chunk_index)
        return fit_accumulate(params, total, data, indices, mask, chunk_key)

    def step(params, opt_state, total, data, indices, mask, loop_key, step_index, chunk_index):
        # `fit_step` adds the noise once, to the sum over every chunk of the Poisson batch.
        chunk_key, noise_key = step_keys(loop_key, step_index, chunk_index)
        return fit_step(params, opt_state, total, data, indices, mask, chunk_key, noise_key)

    return accumulate, step


def _keep_inactive(active, new_tree, old_tree):
    """Per model, the new leaves where `active` (K,) is True and the old ones elsewhere."""

    def select(new, old):
        return jnp.where(jnp.reshape(active, (-1,) + (1,) * (new.ndim - 1)), new, old)

    return jax.tree.map(select, new_tree, old_tree)


def _step_functions(
    params_init_fn, per_example_loss, optimizer, batch_size, dp, clipping_method, mesh, batched
):
    """Return the init and jitted step functions, shared by every call with the same objects.

    jax.jit caches compiled programs per function object, so reusing these objects lets a later
    call with the same loss, optimizer and shapes skip compilation. Unhashable arguments get
    fresh functions.
    """
    arguments = (
        params_init_fn,
        per_example_loss,
        optimizer,
        batch_size,
        dp,
        clipping_method,
        mesh,
        batched,
    )
    try:
        return _cached_step_functions(*arguments)
    except TypeError:
        return _build_step_functions(*arguments)


def _build_step_functions(
    params_init_fn, per_example_loss, optimizer, batch_size, dp, clipping_method, mesh, batched
):
    if not batched:
        # Initialisation runs eagerly, as in `training.fit` and `classifier.train_classifier`:
        # its primitives compile once per process, where a jitted init compiles once per call.
        functions = {"init_params": params_init_fn, "init_state": optimizer.init}
        if dp is None:
            step = _non_private_step(per_example_loss, optimizer, batch_size)
            return {**functions, "step": jax.jit(step)}
        accumulate, step = _private_steps(per_example_loss, optimizer, dp, clipping_method)
        return {**functions, "accumulate": jax.jit(accumulate), "step": jax.jit(step)}

    out = None if mesh is None else sharding.model_sharding(mesh)
    functions = {
        "init_params": jax.jit(jax.vmap(params_init_fn), out_shardings=out),
        "init_state": jax.jit(jax.vmap(optimizer.init), out_shardings=out),
    }
    if dp is None:
        step = jax.vmap(
            _non_private_step(per_example_loss, optimizer, batch_size),
            in_axes=(0, 0, None, 0, 0, None),
        )

        def masked_step(params, opt_state, data, indices, loop_keys, step_index, active):
            new_params, new_state, loss = step(
                params, opt_state, data, indices, loop_keys, step_index
            )
            new_params = _keep_inactive(active, new_params, params)
            return new_params, _keep_inactive(active, new_state, opt_state), loss

        return {**functions, "step": jax.jit(masked_step, out_shardings=out)}
    accumulate, step = _private_steps(per_example_loss, optimizer, dp, clipping_method)
    accumulate = jax.vmap(accumulate, in_axes=(0, 0, None, 0, 0, 0, None, None))
    step = jax.vmap(step, in_axes=(0, 0, 0, None, 0, 0, 0, None, None))
    return {
        **functions,
        "accumulate": jax.jit(accumulate, out_shardings=out),
        "step": jax.jit(step, out_shardings=out),
    }


_cached_step_functions = functools.lru_cache(maxsize=16)(_build_step_functions)


class _MemoryCheckedStep:
    """A jitted step that, before its first call, checks XLA's memory estimate against a limit."""

    def __init__(self, jitted, *, limit_bytes: int, num_models: int):
        self._jitted = jitted
        self._limit_bytes = limit_bytes
        self._num_models = num_models
        self._checked = False

    def __call__(self, *args):
        if not self._checked:
            # jax.jit reuses this compilation for the calls that follow.
            analysis = self._jitted.lower(*args).compile().memory_analysis()
            _check_memory(analysis, self._limit_bytes, self._num_models)
            self._checked = True
        return self._jitted(*args)


def _check_memory(analysis, limit_bytes: int, num_models: int) -> None:
    needed = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    if needed > limit_bytes:
        # Linear in the model count: an estimate, because the shared data do not grow with it.
        fitting = max(1, int(num_models * limit_bytes / needed))
        raise ValueError(
            f"one vmapped step over {num_models} models needs about {needed} bytes per device "
            f"(XLA's estimate), more than the {limit_bytes} bytes available; pass "
            f"models_per_program <= {fitting} or use strategy='sequential'"
        )


def _device_memory_limit(device_memory_bytes: int | None) -> int | None:
    """Return the given limit, else the first device's `bytes_limit`, else None (as on CPUs)."""
    if device_memory_bytes is not None:
        return int(device_memory_bytes)
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


class _Runner:
    """Trains groups of models of one `train_many` call with shared jitted functions."""

    def __init__(self, functions, *, batch_size, dp, mesh, batched, memory_limit_bytes):
        self.functions = functions
        self.batch_size = batch_size
        self.dp = dp
        self.placement = _Placement(mesh, batched)
        self.memory_limit_bytes = memory_limit_bytes

    def run(self, data, *, init_keys, fit_keys, members, num_steps, progress_bar):
        """Train one group of models; return (params with a leading group axis, FitStats list)."""
        place = self.placement
        functions = self.functions
        if place.batched and self.memory_limit_bytes is not None:
            step = _MemoryCheckedStep(
                functions["step"], limit_bytes=self.memory_limit_bytes, num_models=len(members)
            )
            functions = {**functions, "step": step}
        params = functions["init_params"](place.models(place.stack(init_keys)))
        opt_state = functions["init_state"](params)

        loop_keys, seeds = [], []
        for fit_key in fit_keys:
            seed_key, loop_key = jax.random.split(fit_key)
            seeds.append(training.host_seed(seed_key))
            loop_keys.append(loop_key)
        loop_keys = place.models(place.stack(loop_keys))

        if self.dp is None:
            schedules = [
                _ShuffledBatches(seed, rows, self.batch_size)
                for seed, rows in zip(seeds, members, strict=True)
            ]
            params, stats = _fit_non_private(
                functions,
                params,
                opt_state,
                data,
                schedules,
                loop_keys,
                num_steps,
                place,
                progress_bar,
            )
        else:
            schedules = [
                _PoissonRows(seed, rows, self.dp) for seed, rows in zip(seeds, members, strict=True)
            ]
            params, stats = _fit_private(
                functions,
                params,
                opt_state,
                data,
                schedules,
                loop_keys,
                self.dp,
                place,
                progress_bar,
            )
        if not place.batched:
            params = jax.tree.map(lambda leaf: leaf[None], params)
        return params, stats


class _Placement:
    """Placement of a step's host inputs: stacked over models or not, on a mesh or not."""

    def __init__(self, mesh, batched):
        self.mesh = mesh
        self.batched = batched
        self.model_sharding = None if mesh is None else sharding.model_sharding(mesh)

    def stack(self, per_model):
        """Stack per-model arrays or keys on a leading axis; pass a single model's through."""
        if not self.batched:
            return per_model[0]
        if isinstance(per_model[0], jax.Array):
            return jnp.stack(per_model)
        return np.stack(per_model)

    def models(self, tree):
        return tree if self.mesh is None else sharding.put_models(tree, self.mesh)

    def batch(self, tree):
        return tree if self.mesh is None else sharding.put_batch(tree, self.mesh)


class _ShuffledBatches:
    """One model's non-private batches as pool rows, drawn exactly as `training.fit` draws them."""

    def __init__(self, seed: int, rows: np.ndarray, batch_size: int):
        self._rng = np.random.default_rng(seed)
        self._rows = rows
        self._batch_size = batch_size
        self._batches_per_epoch = len(rows) // batch_size
        self._order = None
        self._step = 0

    def next(self) -> np.ndarray:
        """(batch_size,) int32 pool rows of the next step."""
        position = self._step % self._batches_per_epoch
        if position == 0:
            self._order = self._rng.permutation(len(self._rows))
        self._step += 1
        chosen = self._order[position * self._batch_size : (position + 1) * self._batch_size]
        return self._rows[chosen].astype(np.int32)


class _PoissonRows:
    """One model's Poisson batches over its own members, as pool rows."""

    def __init__(self, seed: int, rows: np.ndarray, dp: dp_sgd.DpSgdConfig):
        self._rows = rows
        self._batches = batch_selection.poisson_batches(
            seed=seed,
            dataset_size=len(rows),
            sampling_prob=dp.sampling_prob,
            num_steps=dp.num_steps,
            physical_batch_size=dp.physical_batch_size,
        )

    def next(self) -> batch_selection.PoissonBatch:
        batch = next(self._batches)
        return batch._replace(indices=self._rows[batch.indices].astype(np.int32))


def _fit_non_private(
    functions, params, opt_state, data, schedules, loop_keys, num_steps, place, progress_bar
):
    step = functions["step"]
    batch_size = schedules[0]._batch_size
    idle_rows = np.zeros(batch_size, np.int32)
    losses = []
    for step_index in range(int(num_steps.max())):
        active = step_index < num_steps
        rows = [
            schedule.next() if is_active else idle_rows
            for schedule, is_active in zip(schedules, active, strict=True)
        ]
        args = [params, opt_state, data, place.batch(place.stack(rows)), loop_keys]
        args.append(np.int32(step_index))
        if place.batched:
            args.append(place.models(active))
        params, opt_state, loss = step(*args)
        losses.append(loss)
        progress_bar.update(int(active.sum()))
    losses = np.asarray(sharding.to_host(losses), np.float64).reshape(len(losses), -1)
    stats = [training.FitStats(loss=losses[: num_steps[k], k]) for k in range(len(schedules))]
    return params, stats


def _fit_private(functions, params, opt_state, data, schedules, loop_keys, dp, place, progress_bar):
    accumulate, step = functions["accumulate"], functions["step"]
    chunk_rows = dp.physical_batch_size
    zeros = _zeros_like(params)
    summaries, batch_sizes = [], []
    for step_index in range(dp.num_steps):
        batches = [schedule.next() for schedule in schedules]
        num_chunks = max(batch.num_chunks for batch in batches)
        total = zeros
        step_summaries = []
        for chunk in range(num_chunks):
            # A model whose batch has fewer chunks gets fully masked rows, which add zero.
            rows = [_chunk_of(batch, chunk, chunk_rows) for batch in batches]
            args = (
                data,
                place.batch(place.stack([indices for indices, _ in rows])),
                place.batch(place.stack([mask for _, mask in rows])),
                loop_keys,
                np.int32(step_index),
                np.int32(chunk),
            )
            if chunk < num_chunks - 1:
                total, summary = accumulate(params, total, *args)
            else:
                params, opt_state, summary = step(params, opt_state, total, *args)
            step_summaries.append(summary)
        summaries.append(step_summaries)
        batch_sizes.append([batch.size for batch in batches])
        progress_bar.update(len(schedules))
    return params, _private_stats(sharding.to_host(summaries), batch_sizes, len(schedules))


@jax.jit
def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _chunk_of(batch: batch_selection.PoissonBatch, chunk: int, chunk_rows: int):
    if chunk >= batch.num_chunks:
        return np.zeros(chunk_rows, np.int32), np.zeros(chunk_rows, bool)
    rows = slice(chunk * chunk_rows, (chunk + 1) * chunk_rows)
    return batch.indices[rows], batch.mask[rows]


def _private_stats(summaries, batch_sizes, num_models: int) -> list[training.FitStats]:
    """Per-model FitStats from per-step, per-chunk (loss sum, finite, clipped, non-finite)."""
    totals = np.stack(
        [
            np.asarray(step, np.float64).reshape(len(step), 4, num_models).sum(axis=0)
            for step in summaries
        ]
    )
    sizes = np.asarray(batch_sizes, np.int64)
    stats = []
    for k in range(num_models):
        loss_sum, num_finite, num_clipped, num_nonfinite = totals[:, :, k].T
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(num_finite > 0, loss_sum / num_finite, np.nan)
            clip_fraction = np.where(sizes[:, k] > 0, num_clipped / np.maximum(sizes[:, k], 1), 0.0)
        stats.append(
            training.FitStats(
                loss=loss,
                clip_fraction=clip_fraction,
                num_nonfinite=num_nonfinite.astype(np.int64),
                batch_sizes=sizes[:, k],
            )
        )
    return stats
