"""The IDX file format used by MNIST and Fashion-MNIST, raw or gzip-compressed.

An IDX file is a 4-byte magic number, one big-endian uint32 size per dimension, then the array
in row-major order and big-endian byte order. The magic number is two zero bytes, a dtype code
and the number of dimensions. Files whose name ends in ``.gz`` are gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

# IDX dtype codes (the third byte of the magic number) and their element types.
_DTYPE_BY_CODE: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(np.int16),
    0x0C: np.dtype(np.int32),
    0x0D: np.dtype(np.float32),
    0x0E: np.dtype(np.float64),
}
_CODE_BY_DTYPE = {dtype: code for code, dtype in _DTYPE_BY_CODE.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """A file is not a valid IDX file. The message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"invalid IDX file {os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


def _is_gzip_name(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".gz")


def _read_bytes(path: str | os.PathLike) -> bytes:
    """Read the whole file, decompressing it when its name ends in .gz."""
    with open(path, "rb") as f:
        content = f.read()
    if not _is_gzip_name(path):
        return content
    try:
        return gzip.decompress(content)
    # EOFError: the gzip stream ends early. BadGzipFile: bad header or CRC. zlib.error: bad data.
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise IdxFormatError(path, f"corrupt gzip data ({err})") from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file into a NumPy array.

    Args:
      path: the file, gzip-compressed when the name ends in ``.gz``.

    Returns:
      The array with the shape stored in the header and a native-endian dtype: uint8, int8,
      int16, int32, float32 or float64. For Fashion-MNIST images this is (N, 28, 28) uint8.

    Raises:
      FileNotFoundError: the file does not exist.
      IdxFormatError: bad magic number, unknown dtype code, zero dimensions, a truncated header
        or payload, bytes after the payload, or corrupt gzip data. The message names the file.
    """
    content = _read_bytes(path)
    if len(content) < 4:
        raise IdxFormatError(
            path, f"truncated header: expected at least 4 bytes, got {len(content)}"
        )
    if content[:2] != b"\x00\x00":
        hint = (
            " (the file looks gzip-compressed; name it *.gz)" if content[:2] == _GZIP_MAGIC else ""
        )
        raise IdxFormatError(
            path, f"bad magic number 0x{content[:4].hex()}: must start with 0x0000{hint}"
        )

    dtype_code, num_dims = content[2], content[3]
    if dtype_code not in _DTYPE_BY_CODE:
        known = ", ".join(f"0x{code:02X}" for code in _DTYPE_BY_CODE)
        raise IdxFormatError(path, f"unknown dtype code 0x{dtype_code:02X} (known codes: {known})")
    if num_dims == 0:
        raise IdxFormatError(path, "dimension count is 0, but it must be at least 1")

    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise IdxFormatError(
            path,
            f"truncated header: {num_dims} dimensions need {header_size} bytes, got {len(content)}",
        )
    shape = tuple(int(size) for size in np.frombuffer(content, ">u4", num_dims, offset=4))

    dtype = _DTYPE_BY_CODE[dtype_code]
    expected = math.prod(shape) * dtype.itemsize
    got = len(content) - header_size
    if got < expected:
        raise IdxFormatError(
            path, f"truncated data: shape {shape} needs {expected} bytes, got {got}"
        )
    if got > expected:
        raise IdxFormatError(
            path, f"{got - expected} trailing bytes after the {expected} bytes of shape {shape}"
        )

    stored = np.frombuffer(content, dtype.newbyteorder(">"), math.prod(shape), offset=header_size)
    # astype copies, so the result is writable and native-endian.
    return stored.astype(dtype).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file, gzip-compressed when the name ends in ``.gz``.

    Args:
      path: the file to create or overwrite.
      array: at least one dimension, each of size < 2**32, and dtype uint8, int8, int16, int32,
        float32 or float64 (any byte order).

    Raises:
      ValueError: the dtype has no IDX code, or the array has no dimensions or a dimension
        of 2**32 or more.
    """
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _CODE_BY_DTYPE:
        allowed = ", ".join(str(d) for d in _CODE_BY_DTYPE)
        raise ValueError(f"array.dtype={array.dtype} has no IDX code (allowed: {allowed})")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array.ndim={array.ndim} must be in [1, 255]")
    if any(size >= 2**32 for size in array.shape):
        raise ValueError(f"array.shape={array.shape}: each dimension must be < 2**32")

    header = bytes([0, 0, _CODE_BY_DTYPE[dtype], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    content = header + array.astype(dtype.newbyteorder(">")).tobytes(order="C")
    if _is_gzip_name(path):
        # mtime=0 makes the compressed bytes depend only on the array.
        content = gzip.compress(content, mtime=0)
    with open(path, "wb") as f:
        f.write(content)
