"""Tests for ppds_jax.idx: round trips and every kind of malformed file."""

import gzip
import struct

import numpy as np
import pytest

from ppds_jax.idx import IdxFormatError, read_idx, write_idx


def _idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """Build an IDX file by hand, independently of write_idx."""
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip_keeps_values_shape_dtype(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 5, 4)) * 100).astype(dtype)
    path = tmp_path / f"array-idx3{suffix}"

    write_idx(path, array)
    result = read_idx(path)

    assert result.dtype == np.dtype(dtype)
    assert result.shape == (3, 5, 4)
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


def test_big_endian_input_round_trips(tmp_path):
    array = np.arange(6, dtype=">i4").reshape(2, 3)
    write_idx(tmp_path / "a", array)

    result = read_idx(tmp_path / "a")

    assert result.dtype == np.dtype(np.int32)
    np.testing.assert_array_equal(result, np.arange(6).reshape(2, 3))


def test_read_matches_hand_built_file(tmp_path):
    # int16 values 1, -2, 258 big-endian: 00 01, FF FE, 01 02.
    path = tmp_path / "hand"
    path.write_bytes(_idx_bytes(0x0B, (3,), b"\x00\x01\xff\xfe\x01\x02"))

    np.testing.assert_array_equal(read_idx(path), np.array([1, -2, 258], np.int16))


def test_write_matches_hand_built_file(tmp_path):
    write_idx(tmp_path / "w", np.array([[1, 2], [3, 4]], np.uint8))

    assert (tmp_path / "w").read_bytes() == _idx_bytes(0x08, (2, 2), bytes([1, 2, 3, 4]))


def test_gz_file_is_gzip_compressed(tmp_path):
    array = np.zeros((10, 10), np.uint8)
    write_idx(tmp_path / "z.gz", array)

    raw = gzip.decompress((tmp_path / "z.gz").read_bytes())

    assert raw == _idx_bytes(0x08, (10, 10), bytes(100))


def _assert_idx_error(path, *fragments):
    with pytest.raises(IdxFormatError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_truncated_data_raises_with_sizes(tmp_path):
    path = tmp_path / "short-idx1-ubyte"
    path.write_bytes(_idx_bytes(0x08, (10,), bytes(7)))

    error = _assert_idx_error(path, "truncated", "10 bytes", "got 7")

    assert error.path == str(path)


def test_truncated_header_raises(tmp_path):
    path = tmp_path / "header"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x02")

    _assert_idx_error(path, "truncated header", "16 bytes", "got 8")


def test_trailing_bytes_raise(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(_idx_bytes(0x08, (4,), bytes(6)))

    _assert_idx_error(path, "2 trailing bytes")


def test_bad_magic_raises(tmp_path):
    path = tmp_path / "magic"
    path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")

    _assert_idx_error(path, "bad magic number", "0x01020801")


def test_unnamed_gzip_file_gets_hint(tmp_path):
    path = tmp_path / "compressed-but-raw-name"
    path.write_bytes(gzip.compress(_idx_bytes(0x08, (1,), b"\x00")))

    _assert_idx_error(path, "bad magic number", ".gz")


def test_unknown_dtype_code_raises(tmp_path):
    path = tmp_path / "code"
    path.write_bytes(_idx_bytes(0x0A, (1,), b"\x00"))

    _assert_idx_error(path, "unknown dtype code 0x0A")


def test_zero_dimensions_raise(tmp_path):
    path = tmp_path / "scalar"
    path.write_bytes(bytes([0, 0, 0x08, 0, 7]))

    _assert_idx_error(path, "dimension count is 0")


def test_corrupt_gzip_raises(tmp_path):
    compressed = bytearray(gzip.compress(_idx_bytes(0x08, (100,), bytes(range(100)))))
    compressed[-6] ^= 0xFF  # flips a CRC-32 byte
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(compressed))

    _assert_idx_error(path, "corrupt gzip")


def test_cut_gzip_stream_raises(tmp_path):
    compressed = gzip.compress(_idx_bytes(0x08, (1000,), bytes(1000)))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])

    _assert_idx_error(path, "corrupt gzip")


def test_non_gzip_content_with_gz_name_raises(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(_idx_bytes(0x08, (1,), b"\x00"))

    _assert_idx_error(path, "corrupt gzip")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))


def test_write_rejects_zero_dimensions(tmp_path):
    with pytest.raises(ValueError, match="ndim=0"):
        write_idx(tmp_path / "x", np.uint8(3))
