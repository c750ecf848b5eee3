"""Image classification datasets as NumPy arrays, and the registry of their loaders.

Every dataset comes out the same way: images float32 NHWC in [-1, 1], labels int32. Loaders
return integer pixels (`RawSplits`), and `load_dataset` takes the optional stratified subsets and
scales the pixels.

| name | source | works offline |
|---|---|---|
| ``fashion_mnist`` | local IDX files through `FashionMnistLocal` | yes |
| ``digits`` | scikit-learn's bundled 8x8 digits, 80/20 split | yes |
| ``mnist``, ``cifar10`` | the TFDS catalogue, through ``tfds.data_source`` | only if prepared |
"""

from __future__ import annotations

import dataclasses
import importlib.util
import numbers
import os
from collections.abc import Callable, Sequence

import numpy as np
import sklearn.datasets
import tensorflow_datasets as tfds

from ppds_jax import fashion_mnist_local

# Examples decoded per data-source request, which bounds the list of decoded dicts in memory.
_READ_CHUNK_SIZE = 10_000
# Fixed seed of the digits train/test split, so the test set never depends on `seed`.
_DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset in memory.

    Attributes:
      name: registry name, for example "fashion_mnist".
      train_images: shape (N_train, H, W, C), float32 in [-1, 1].
      train_labels: shape (N_train,), int32 in [0, num_classes).
      test_images: shape (N_test, H, W, C), float32 in [-1, 1].
      test_labels: shape (N_test,), int32 in [0, num_classes).
      num_classes: number of classes.
      class_names: one name per class, indexed by label.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"len(class_names)={len(self.class_names)} must equal "
                f"num_classes={self.num_classes}"
            )
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            _check_split(split, images, labels, self.num_classes)
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train_images.shape={self.train_images.shape} and "
                f"test_images.shape={self.test_images.shape} differ in image shape"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (H, W, C)."""
        return tuple(self.train_images.shape[1:])


def _check_split(split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """Raise ValueError unless the split has the dtypes, shapes and ranges `Dataset` documents."""
    if images.dtype != np.float32 or images.ndim != 4:
        raise ValueError(
            f"{split}_images has shape {images.shape} and dtype {images.dtype}, "
            f"expected (N, H, W, C) float32"
        )
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{split}_labels has shape {labels.shape} and dtype {labels.dtype}, "
            f"expected ({len(images)},) int32"
        )
    # `not (a <= b)` also catches NaN.
    if images.size and not (-1.0 <= images.min() and images.max() <= 1.0):
        raise ValueError(
            f"{split}_images has values in [{images.min()}, {images.max()}], expected [-1, 1]"
        )
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise ValueError(
            f"{split}_labels has values in [{labels.min()}, {labels.max()}], "
            f"expected [0, {num_classes})"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class RawSplits:
    """A dataset as a loader returns it, before subsetting and scaling.

    Attributes:
      train_images: shape (N_train, H, W, C), integers in [0, pixel_max].
      train_labels: shape (N_train,), integers in [0, len(class_names)).
      test_images: shape (N_test, H, W, C), integers in [0, pixel_max].
      test_labels: shape (N_test,), integers in [0, len(class_names)).
      class_names: one name per class, indexed by label.
      pixel_max: the white level (255 for 8-bit images, 16 for scikit-learn's digits).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    pixel_max: int


def read_data_source(source: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole TFDS data source with ``image`` and ``label`` features into NumPy.

    Args:
      source: a TFDS data source of one split, for example ``builder.as_data_source("train")``.

    Returns:
      ``(images, labels)``: images shape (N, H, W, C) in the feature's dtype, and labels
      shape (N,) int64, in the data source's order.
    """
    num_examples = len(source)
    image_spec = source.dataset_info.features["image"]
    images = np.empty((num_examples, *image_spec.shape), image_spec.np_dtype)
    labels = np.empty(num_examples, np.int64)
    for start in range(0, num_examples, _READ_CHUNK_SIZE):
        stop = min(start + _READ_CHUNK_SIZE, num_examples)
        # __getitems__ reads the records of a chunk in one array_record request.
        examples = source.__getitems__(range(start, stop))
        for offset, example in enumerate(examples):
            images[start + offset] = example["image"]
            labels[start + offset] = example["label"]
    return images, labels


def _load_fashion_mnist(*, data_dir, tfds_data_dir) -> RawSplits:
    builder = fashion_mnist_local.prepare_fashion_mnist(
        source_dir=data_dir, tfds_data_dir=tfds_data_dir
    )
    train_images, train_labels = fashion_mnist_local.read_split(builder, "train")
    test_images, test_labels = fashion_mnist_local.read_split(builder, "test")
    return RawSplits(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(builder.info.features["label"].names),
        pixel_max=255,
    )


def _load_digits(*, data_dir, tfds_data_dir) -> RawSplits:
    del data_dir, tfds_data_dir  # bundled with scikit-learn
    digits = sklearn.datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), values 0..16
    labels = digits.target.astype(np.int64)

    test_indices = stratified_indices(labels, size=len(labels) // 5, seed=_DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), bool)
    is_test[test_indices] = True
    return RawSplits(
        train_images=images[~is_test],
        train_labels=labels[~is_test],
        test_images=images[is_test],
        test_labels=labels[is_test],
        class_names=tuple(str(digit) for digit in range(10)),
        pixel_max=16,
    )


def _missing_preparation_packages() -> list[str]:
    """List the packages that TFDS needs to prepare a catalogue image dataset but are absent."""
    # tensorflow-datasets 4.9.10 encodes images with TensorFlow and imports importlib_resources
    # to find a builder's checksums, but installs neither on Python >= 3.9.
    required = ("tensorflow", "importlib_resources")
    return [package for package in required if importlib.util.find_spec(package) is None]


def _catalogue_unavailable(name: str, data_dir: os.PathLike, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Dataset {name!r} is not prepared in {data_dir} and needs a download, but {reason}. "
        f"Offline options: 'fashion_mnist' from local IDX files (Debian package "
        f"dataset-fashion-mnist), 'digits' (bundled with scikit-learn), or a copy of {name!r} "
        f"prepared by TFDS in array_record format, placed in {data_dir} (set with "
        f"tfds_data_dir or the environment variable {fashion_mnist_local.TFDS_DATA_DIR_ENV})."
    )


def _make_catalogue_loader(name: str) -> Callable[..., RawSplits]:
    """Build the loader of a TFDS catalogue dataset with ``image`` and ``label`` features."""

    def load(*, data_dir, tfds_data_dir) -> RawSplits:
        del data_dir  # the TFDS catalogue downloads its own files
        if tfds_data_dir is None:
            tfds_data_dir = fashion_mnist_local.default_tfds_data_dir()
        builder = tfds.builder(name, data_dir=os.fspath(tfds_data_dir), file_format="array_record")

        if not builder.is_prepared():
            missing = _missing_preparation_packages()
            if missing:
                raise _catalogue_unavailable(
                    name,
                    tfds_data_dir,
                    f"preparing it needs the Python packages {' and '.join(missing)}, which are "
                    f"not installed",
                )
            # NOTE: the tests never run this download path, because it needs TensorFlow and a
            # network.
            try:
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
            except OSError as err:
                raise _catalogue_unavailable(
                    name, tfds_data_dir, f"downloading it failed ({err})"
                ) from err

        sources = tfds.data_source(
            name,
            data_dir=os.fspath(tfds_data_dir),
            download=False,
            builder_kwargs={"file_format": "array_record"},
        )
        train_images, train_labels = read_data_source(sources["train"])
        test_images, test_labels = read_data_source(sources["test"])
        return RawSplits(
            train_images=train_images,
            train_labels=train_labels,
            test_images=test_images,
            test_labels=test_labels,
            class_names=tuple(builder.info.features["label"].names),
            pixel_max=255,
        )

    return load


# name -> loader(*, data_dir, tfds_data_dir) -> RawSplits.
DATASETS: dict[str, Callable[..., RawSplits]] = {
    "fashion_mnist": _load_fashion_mnist,
    "digits": _load_digits,
    "mnist": _make_catalogue_loader("mnist"),
    "cifar10": _make_catalogue_loader("cifar10"),
}


def stratified_indices(labels: np.ndarray, *, size: int, seed: int) -> np.ndarray:
    """Choose `size` indices whose class proportions match those of `labels`.

    Class c gets ``floor(size * n_c / N)`` indices, where n_c of the N labels are c. The
    remaining indices go one each to the classes with the largest remainders of
    ``size * n_c / N``, ties broken at random. Within each class the indices are a uniformly
    random subset. The result depends only on `labels`, `size` and `seed`.

    Args:
      labels: shape (N,), non-negative integers.
      size: number of indices, in [1, N].
      seed: seed of the random choice, a non-negative integer or a sequence of them (anything
        `np.random.default_rng` accepts).

    Returns:
      Sorted distinct indices into `labels`, shape (size,), int64.

    Raises:
      ValueError: `size` is not an integer in [1, N].
    """
    labels = np.asarray(labels)
    _check_size("size", size, len(labels))
    rng = np.random.default_rng(seed)

    counts = np.bincount(labels)
    quotas, remainders = np.divmod(size * counts, len(labels))
    num_left = size - quotas.sum()
    # Sort by remainder, largest first, with a random permutation breaking ties.
    order = np.lexsort((rng.permutation(len(counts)), -remainders))
    quotas[order[:num_left]] += 1

    chosen = [
        rng.choice(np.flatnonzero(labels == label), quota, replace=False)
        for label, quota in enumerate(quotas)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_size(name: str, size: object, limit: int | None) -> None:
    """Raise ValueError unless `size` is an integer in [1, limit] (no upper limit if None)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(f"{name}={size!r} must be an integer")
    if size < 1:
        raise ValueError(f"{name}={size} must be >= 1")
    if limit is not None and size > limit:
        raise ValueError(f"{name}={size} exceeds the {limit} examples available")


def _scale_pixels(images: np.ndarray, pixel_max: int) -> np.ndarray:
    """Map integer pixels in [0, pixel_max] linearly to float32 in [-1, 1]."""
    half = np.float32(pixel_max / 2)
    return images.astype(np.float32) / half - np.float32(1.0)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by registry name, optionally as stratified subsets.

    The subsets are a public choice: they depend only on `seed` and the labels, so they may be
    drawn before any private computation.

    Args:
      name: a key of `DATASETS`.
      data_dir: folder with the raw files, used by "fashion_mnist" only; defaults to
        $PPDS_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist.
      tfds_data_dir: TFDS data_dir with prepared copies, used by "fashion_mnist", "mnist" and
        "cifar10"; defaults to $PPDS_TFDS_DIR, else ~/tensorflow_datasets.
      train_size: if set, keep a stratified subset of this many training examples.
      test_size: if set, keep a stratified subset of this many test examples.
      seed: non-negative integer seed of the subsets. The train and test subsets use
        independent streams.

    Returns:
      A `Dataset` with images float32 NHWC in [-1, 1] and labels int32. Its examples keep the
      order of the source, with the subsets sorted by index.

    Raises:
      ValueError: unknown name (the message lists the known ones), or a size that is not an
        integer in [1, split size].
      FileNotFoundError: the source files are missing, or a catalogue dataset is neither
        prepared nor downloadable. The message names the offline options.
      ppds_jax.idx.IdxFormatError: a Fashion-MNIST IDX file is corrupt or truncated.

    Example:
      >>> data = load_dataset("digits", train_size=100, seed=1)
      >>> data.train_images.shape, data.image_shape, data.num_classes
      ((100, 8, 8, 1), (8, 8, 1), 10)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    for size_name, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None:
            _check_size(size_name, size, None)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")

    raw = DATASETS[name](data_dir=data_dir, tfds_data_dir=tfds_data_dir)

    split_arrays = {}
    for stream, (split, size) in enumerate((("train", train_size), ("test", test_size))):
        images = getattr(raw, f"{split}_images")
        labels = getattr(raw, f"{split}_labels")
        if size is not None:
            _check_size(f"{split}_size", size, len(labels))
            indices = stratified_indices(labels, size=size, seed=[seed, stream])
            images, labels = images[indices], labels[indices]
        split_arrays[split] = (_scale_pixels(images, raw.pixel_max), labels.astype(np.int32))

    return Dataset(
        name=name,
        train_images=split_arrays["train"][0],
        train_labels=split_arrays["train"][1],
        test_images=split_arrays["test"][0],
        test_labels=split_arrays["test"][1],
        num_classes=len(raw.class_names),
        class_names=raw.class_names,
    )
