"""Tests for ppds_jax.datasets and the local Fashion-MNIST TFDS builder."""

import io
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import sklearn.datasets
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from ppds_jax import datasets, fashion_mnist_local
from ppds_jax.datasets import Dataset, load_dataset, stratified_indices
from ppds_jax.fashion_mnist_local import FashionMnistLocal, prepare_fashion_mnist, read_split
from ppds_jax.idx import IdxFormatError, read_idx, write_idx

REAL_FASHION_MNIST_DIR = Path(fashion_mnist_local.DEFAULT_SOURCE_DIR)
NUM_TRAIN, NUM_TEST = 30, 12


def _write_small_fashion_mnist(folder: Path, seed: int = 0) -> dict[str, tuple]:
    """Write random IDX files in the Fashion-MNIST layout, train raw and test gzip-compressed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, suffix in (("train", NUM_TRAIN, ""), ("test", NUM_TEST, ".gz")):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        images_stem, labels_stem = fashion_mnist_local.IDX_FILES[split]
        write_idx(folder / f"{images_stem}{suffix}", images)
        write_idx(folder / f"{labels_stem}{suffix}", labels)
        arrays[split] = (images, labels)
    return arrays


def _sorted_rows(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return rows (label, pixels...) in lexicographic order, to compare examples as multisets."""
    rows = np.column_stack([labels, images.reshape(len(images), -1)])
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture
def small_source(tmp_path):
    """A folder with small random Fashion-MNIST IDX files, and the arrays written."""
    folder = tmp_path / "idx"
    return folder, _write_small_fashion_mnist(folder)


class TestFashionMnistLocal:
    def test_builder_reads_back_idx_arrays(self, small_source, tmp_path):
        folder, arrays = small_source
        builder = prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")

        assert builder.is_prepared()
        for split, (images, labels) in arrays.items():
            read_images, read_labels = read_split(builder, split)
            assert read_images.shape == (len(images), 28, 28, 1)
            assert read_images.dtype == np.uint8
            np.testing.assert_array_equal(read_images[..., 0], images)
            np.testing.assert_array_equal(read_labels, labels)

    def test_bulk_read_matches_tfds_decoding(self, small_source, tmp_path):
        folder, _ = small_source
        builder = prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")

        for split in ("train", "test"):
            source = builder.as_data_source(split)
            decoded = [source[index] for index in range(len(source))]
            images, labels = read_split(builder, split)
            np.testing.assert_array_equal(images, np.stack([ex["image"] for ex in decoded]))
            np.testing.assert_array_equal(labels, [ex["label"] for ex in decoded])

    def test_builder_features_and_splits(self, small_source, tmp_path):
        folder, _ = small_source
        builder = prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")
        features = builder.info.features

        assert features["image"].shape == (28, 28, 1)
        assert features["image"].np_dtype == np.uint8
        assert features["label"].names == list(fashion_mnist_local.CLASS_NAMES)
        assert builder.info.splits["train"].num_examples == NUM_TRAIN
        assert builder.info.splits["test"].num_examples == NUM_TEST

    def test_prepared_copy_is_reused(self, small_source, tmp_path):
        folder, arrays = small_source
        prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")
        for path in folder.iterdir():
            path.unlink()

        builder = prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")
        images, _ = read_split(builder, "train")

        np.testing.assert_array_equal(images[..., 0], arrays["train"][0])

    def test_preparation_prints_nothing(self, small_source, tmp_path, capfd):
        folder, _ = small_source
        prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")

        captured = capfd.readouterr()
        assert captured.out == ""
        assert "Generating" not in captured.err

    def test_env_vars_set_default_folders(self, small_source, tmp_path, monkeypatch):
        folder, _ = small_source
        monkeypatch.setenv(fashion_mnist_local.SOURCE_DIR_ENV, str(folder))
        monkeypatch.setenv(fashion_mnist_local.TFDS_DATA_DIR_ENV, str(tmp_path / "env_tfds"))

        builder = FashionMnistLocal()

        assert builder.source_dir == folder
        assert Path(builder.data_dir).is_relative_to(tmp_path / "env_tfds")


class TestLoadFashionMnist:
    def test_small_files_load_scaled(self, small_source, tmp_path):
        folder, arrays = small_source
        data = load_dataset("fashion_mnist", data_dir=folder, tfds_data_dir=tmp_path / "tfds")

        assert data.name == "fashion_mnist"
        assert data.image_shape == (28, 28, 1)
        assert data.num_classes == 10
        assert data.class_names == fashion_mnist_local.CLASS_NAMES
        for split in ("train", "test"):
            images, labels = arrays[split]
            expected = images[..., None].astype(np.float64) / 127.5 - 1.0
            np.testing.assert_allclose(getattr(data, f"{split}_images"), expected, atol=1e-6)
            np.testing.assert_array_equal(getattr(data, f"{split}_labels"), labels)
            assert getattr(data, f"{split}_images").dtype == np.float32
            assert getattr(data, f"{split}_labels").dtype == np.int32

    def test_missing_folder_names_remedies(self, tmp_path):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset(
                "fashion_mnist", data_dir=tmp_path / "absent", tfds_data_dir=tmp_path / "tfds"
            )

        message = str(info.value)
        assert str(tmp_path / "absent") in message
        assert "dataset-fashion-mnist" in message
        assert "--data-dir" in message
        assert "PPDS_FASHION_MNIST_DIR" in message

    def test_missing_file_is_named(self, small_source, tmp_path):
        folder, _ = small_source
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()

        with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
            load_dataset("fashion_mnist", data_dir=folder, tfds_data_dir=tmp_path / "tfds")

    def test_truncated_file_raises_idx_error(self, small_source, tmp_path):
        folder, _ = small_source
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])

        with pytest.raises(IdxFormatError) as info:
            load_dataset("fashion_mnist", data_dir=folder, tfds_data_dir=tmp_path / "tfds")

        assert str(path) in str(info.value)
        assert "truncated" in str(info.value)

    def test_corrupt_gzip_raises_idx_error(self, small_source, tmp_path):
        folder, _ = small_source
        path = folder / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:-20])

        with pytest.raises(IdxFormatError, match="corrupt gzip") as info:
            load_dataset("fashion_mnist", data_dir=folder, tfds_data_dir=tmp_path / "tfds")

        assert str(path) in str(info.value)

    def test_label_count_mismatch_raises(self, small_source, tmp_path):
        folder, _ = small_source
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros(NUM_TRAIN - 1, np.uint8))

        with pytest.raises(ValueError, match=f"{NUM_TRAIN - 1} labels"):
            load_dataset("fashion_mnist", data_dir=folder, tfds_data_dir=tmp_path / "tfds")

    def test_failed_preparation_can_be_retried(self, small_source, tmp_path):
        folder, _ = small_source
        good = (folder / "train-images-idx3-ubyte").read_bytes()
        (folder / "train-images-idx3-ubyte").write_bytes(good[:-1])
        with pytest.raises(IdxFormatError):
            prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")
        assert not FashionMnistLocal(source_dir=folder, data_dir=tmp_path / "tfds").is_prepared()

        (folder / "train-images-idx3-ubyte").write_bytes(good)
        builder = prepare_fashion_mnist(source_dir=folder, tfds_data_dir=tmp_path / "tfds")

        assert len(read_split(builder, "train")[0]) == NUM_TRAIN


class TestDigits:
    def test_shapes_dtypes_and_range(self):
        data = load_dataset("digits")

        # 1797 digits: a fifth (359) for test, the rest (1438) for training.
        assert data.train_images.shape == (1438, 8, 8, 1)
        assert data.test_images.shape == (359, 8, 8, 1)
        assert data.train_labels.shape == (1438,)
        assert data.image_shape == (8, 8, 1)
        assert data.train_images.dtype == np.float32
        assert data.train_labels.dtype == np.int32
        assert data.num_classes == 10
        assert data.class_names == tuple(str(digit) for digit in range(10))
        # Raw values 0..16 map to -1..1, and both ends occur in the data.
        for images in (data.train_images, data.test_images):
            assert images.min() == -1.0
            assert images.max() == 1.0

    def test_split_partitions_bundled_set(self):
        data = load_dataset("digits")
        bundled = sklearn.datasets.load_digits()
        expected_images = bundled.images.astype(np.float32) / 8.0 - 1.0

        combined = np.concatenate([data.train_images, data.test_images])[..., 0]
        combined_labels = np.concatenate([data.train_labels, data.test_labels])

        np.testing.assert_array_equal(
            _sorted_rows(combined, combined_labels),
            _sorted_rows(expected_images, bundled.target),
        )

    def test_split_is_stratified(self):
        data = load_dataset("digits")
        all_counts = np.bincount(sklearn.datasets.load_digits().target, minlength=10)
        test_counts = np.bincount(data.test_labels, minlength=10)

        expected = len(data.test_labels) * all_counts / all_counts.sum()
        assert np.all(np.abs(test_counts - expected) < 1)

    def test_split_ignores_seed(self):
        first = load_dataset("digits", seed=0)
        second = load_dataset("digits", seed=5)

        np.testing.assert_array_equal(first.test_labels, second.test_labels)
        np.testing.assert_array_equal(first.test_images, second.test_images)

    def test_subsets_have_requested_sizes(self):
        data = load_dataset("digits", train_size=100, test_size=50, seed=3)

        assert data.train_images.shape == (100, 8, 8, 1)
        assert data.train_labels.shape == (100,)
        assert data.test_images.shape == (50, 8, 8, 1)
        assert data.test_labels.shape == (50,)

    def test_subsets_depend_on_seed(self):
        first = load_dataset("digits", train_size=100, seed=3)
        again = load_dataset("digits", train_size=100, seed=3)
        other = load_dataset("digits", train_size=100, seed=4)

        np.testing.assert_array_equal(first.train_images, again.train_images)
        assert not np.array_equal(first.train_images, other.train_images)

    @pytest.mark.parametrize(
        ("kwargs", "fragments"),
        [
            ({"train_size": 0}, ("train_size=0", ">= 1")),
            ({"test_size": -5}, ("test_size=-5", ">= 1")),
            ({"train_size": 1439}, ("train_size=1439", "1438")),
            ({"test_size": 360}, ("test_size=360", "359")),
            ({"train_size": 10.5}, ("train_size=10.5", "integer")),
            ({"seed": -1}, ("seed=-1",)),
        ],
    )
    def test_invalid_sizes_name_value_and_limit(self, kwargs, fragments):
        with pytest.raises(ValueError) as info:
            load_dataset("digits", **kwargs)

        for fragment in fragments:
            assert fragment in str(info.value)


class TestStratifiedIndices:
    def test_proportions_within_one(self):
        labels = np.repeat(np.arange(4), [50, 30, 15, 5])  # 100 labels
        for size in (1, 7, 33, 64, 99, 100):
            indices = stratified_indices(labels, size=size, seed=0)
            counts = np.bincount(labels[indices], minlength=4)
            expected = size * np.array([50, 30, 15, 5]) / 100

            assert len(indices) == size
            assert counts.sum() == size
            assert np.all(np.abs(counts - expected) < 1)

    def test_indices_sorted_and_distinct(self):
        labels = np.arange(500) % 7
        indices = stratified_indices(labels, size=123, seed=1)

        assert indices.dtype == np.int64
        assert np.all(np.diff(indices) > 0)
        assert indices.min() >= 0
        assert indices.max() < 500

    def test_full_size_returns_every_index(self):
        labels = np.arange(20) % 3

        np.testing.assert_array_equal(stratified_indices(labels, size=20, seed=2), np.arange(20))

    def test_seed_determines_choice(self):
        labels = np.arange(1000) % 10
        first = stratified_indices(labels, size=100, seed=5)

        np.testing.assert_array_equal(first, stratified_indices(labels, size=100, seed=5))
        assert not np.array_equal(first, stratified_indices(labels, size=100, seed=6))

    def test_within_class_choice_is_uniform(self):
        # Each of the 20 examples of a class is chosen with probability 5/20 per draw. Over 400
        # seeds, the count per example is Binomial(400, 1/4) with mean 100 and std about 8.7.
        labels = np.repeat([0, 1], 20)
        hits = np.zeros(40)
        for seed in range(400):
            hits[stratified_indices(labels, size=10, seed=seed)] += 1

        assert np.all(np.abs(hits - 100) < 4 * np.sqrt(400 * 0.25 * 0.75))

    @pytest.mark.parametrize("size", [0, -1, 11])
    def test_invalid_size_raises(self, size):
        with pytest.raises(ValueError, match=f"size={size}"):
            stratified_indices(np.arange(10) % 2, size=size, seed=0)


class TestRegistry:
    def test_unknown_name_lists_known_names(self):
        with pytest.raises(ValueError) as info:
            load_dataset("imagenet")

        message = str(info.value)
        assert "'imagenet'" in message
        for name in ("fashion_mnist", "digits", "mnist", "cifar10"):
            assert name in message

    def test_registry_names(self):
        assert set(datasets.DATASETS) == {"fashion_mnist", "digits", "mnist", "cifar10"}

    @pytest.mark.parametrize("name", ["mnist", "cifar10"])
    def test_unprepared_catalogue_dataset_fails_offline(self, name, tmp_path, monkeypatch):
        # Pretend TensorFlow is absent whatever is installed, so nothing tries to download.
        monkeypatch.setattr(datasets, "_missing_preparation_packages", lambda: ["tensorflow"])

        with pytest.raises(FileNotFoundError) as info:
            load_dataset(name, tfds_data_dir=tmp_path)

        message = str(info.value)
        assert "needs a download" in message
        assert "tensorflow" in message
        assert "'fashion_mnist'" in message
        assert "'digits'" in message
        assert str(tmp_path) in message

    def test_prepared_mnist_copy_is_read(self, tmp_path):
        _FakeMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

        data = load_dataset("mnist", tfds_data_dir=tmp_path)

        assert data.class_names == tuple(str(digit) for digit in range(10))
        for split in ("train", "test"):
            images = _fake_mnist_images(split)
            got = getattr(data, f"{split}_images")
            labels = getattr(data, f"{split}_labels")
            assert got.shape == (len(images), 28, 28, 1)
            # The catalogue builder shuffles on write, so compare as multisets of rows.
            np.testing.assert_allclose(
                _sorted_rows(got[..., 0], labels),
                _sorted_rows(images / 127.5 - 1.0, np.arange(len(images)) % 10),
                atol=1e-6,
            )


_FAKE_MNIST_SIZES = {"train": 20, "test": 6}


def _fake_mnist_images(split: str) -> np.ndarray:
    seed = 0 if split == "train" else 1
    return np.random.default_rng(seed).integers(
        0, 256, (_FAKE_MNIST_SIZES[split], 28, 28), np.uint8
    )


class _FakeMnist(tfds_mnist.MNIST, skip_registration=True):
    """The catalogue's MNIST builder fed with random PNG images instead of downloaded files."""

    name = "mnist"
    code_path = None  # no checksums file, so tensorflow-datasets needs no importlib_resources

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in _FAKE_MNIST_SIZES}

    def _generate_examples(self, split):
        # PNG bytes are stored as they are, so preparing needs no TensorFlow.
        for index, image in enumerate(_fake_mnist_images(split)):
            buffer = io.BytesIO()
            PIL.Image.fromarray(image).save(buffer, format="PNG")
            yield index, {"image": buffer.getvalue(), "label": index % 10}


class TestDatasetClass:
    def _arrays(self):
        images = np.zeros((4, 8, 8, 1), np.float32)
        labels = np.array([0, 1, 0, 1], np.int32)
        return images, labels

    def test_valid_dataset_reports_image_shape(self):
        images, labels = self._arrays()
        data = Dataset("tiny", images, labels, images, labels, 2, ("a", "b"))

        assert data.image_shape == (8, 8, 1)

    def test_rejects_wrong_range(self):
        images, labels = self._arrays()
        with pytest.raises(ValueError, match="train_images"):
            Dataset("tiny", images + 255, labels, images, labels, 2, ("a", "b"))

    def test_rejects_wrong_dtypes(self):
        images, labels = self._arrays()
        with pytest.raises(ValueError, match="test_labels"):
            Dataset("tiny", images, labels, images, labels.astype(np.int64), 2, ("a", "b"))

    def test_rejects_label_out_of_range(self):
        images, labels = self._arrays()
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            Dataset("tiny", images, labels, images, labels, 1, ("a",))

    def test_rejects_class_name_count(self):
        images, labels = self._arrays()
        with pytest.raises(ValueError, match="class_names"):
            Dataset("tiny", images, labels, images, labels, 2, ("a",))


@pytest.fixture(scope="module")
def real_fashion_mnist(tmp_path_factory):
    """Prepare the real Fashion-MNIST once for this module and load it, printing the seconds."""
    if not REAL_FASHION_MNIST_DIR.is_dir():
        pytest.skip(
            f"Debian package dataset-fashion-mnist is not installed at {REAL_FASHION_MNIST_DIR}"
        )
    tfds_dir = tmp_path_factory.mktemp("fashion_tfds")
    start = time.perf_counter()
    prepare_fashion_mnist(source_dir=REAL_FASHION_MNIST_DIR, tfds_data_dir=tfds_dir)
    prepared = time.perf_counter()
    data = load_dataset("fashion_mnist", data_dir=REAL_FASHION_MNIST_DIR, tfds_data_dir=tfds_dir)
    loaded = time.perf_counter()
    print(
        f"Fashion-MNIST: prepared in {prepared - start:.1f} s, loaded in {loaded - prepared:.1f} s"
    )
    return data


class TestRealFashionMnist:
    def test_split_sizes_and_balance(self, real_fashion_mnist):
        data = real_fashion_mnist

        assert data.train_images.shape == (60_000, 28, 28, 1)
        assert data.test_images.shape == (10_000, 28, 28, 1)
        np.testing.assert_array_equal(np.bincount(data.train_labels), np.full(10, 6000))
        np.testing.assert_array_equal(np.bincount(data.test_labels), np.full(10, 1000))

    def test_values_match_idx_files(self, real_fashion_mnist):
        raw = read_idx(REAL_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")

        np.testing.assert_allclose(
            real_fashion_mnist.test_images[..., 0], raw / 127.5 - 1.0, atol=1e-6
        )
        assert real_fashion_mnist.train_images.min() == -1.0
        assert real_fashion_mnist.train_images.max() == 1.0
