"""Atomic, verifiable checkpoint folders and atomic file writes.

A checkpoint is a folder written under a hidden temporary name and renamed into place once every
file in it is complete and flushed. On a local POSIX file system the rename is atomic, so a
reader finds either no checkpoint or a whole one, even when the writer is killed (SIGKILL) at
any moment. Leftover temporary folders of a killed writer are removed by `remove_leftovers`.

Every checkpoint folder contains `manifest.json`: the fingerprint of the configuration it was
computed for, free-form metadata, and the size and SHA-256 digest of every other file.
`verify_checkpoint` checks all of them, so a truncated, corrupted or missing file, or a
checkpoint computed for another configuration, is reported instead of being read.

Model parameters are stored with orbax (`save_pytree`), arrays as `.npz`, documents as JSON.

Example:
  >>> write_checkpoint(path, fingerprint=fingerprint({"lr": 1e-3}),
  ...                  arrays={"signals": {"logits": logits}}, pytrees={"classifier": params})
  >>> verify_checkpoint(path, fingerprint=fingerprint({"lr": 1e-3}))
  >>> load_arrays(path, "signals")["logits"]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

MANIFEST = "manifest.json"
# Markers in the names of the hidden temporary files and folders that the writers create. A
# name carrying one belongs to an unfinished or interrupted write.
_PARTIAL_PREFIX = ".partial-"
_REPLACED_PREFIX = ".replaced-"
_HASH_CHUNK_BYTES = 1 << 20


class CheckpointError(Exception):
    """A checkpoint cannot be used; `path` is the checkpoint folder."""

    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class MissingCheckpointError(CheckpointError):
    """No checkpoint exists at the path."""


class CorruptCheckpointError(CheckpointError):
    """The manifest or a file of the checkpoint is missing, truncated or altered."""


class StaleCheckpointError(CheckpointError):
    """The checkpoint was computed for another configuration fingerprint."""


def fingerprint(value: Any) -> str:
    """Return the SHA-256 hex digest of `value`'s canonical JSON form.

    Keys are sorted and tuples become lists, so equal configurations give equal fingerprints
    whatever their key order. Infinite floats are written as JSON's `Infinity` extension.

    Raises:
      TypeError: `value` contains something JSON cannot represent.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(value):
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def write_bytes_atomically(path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one.

    The bytes go to a temporary file in the same folder, which is flushed to disk and then
    renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{_PARTIAL_PREFIX}{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def write_json_atomically(path, value: Any) -> Path:
    """Write `value` as indented JSON with `write_bytes_atomically`."""
    text = json.dumps(value, indent=2, sort_keys=True, default=_json_default)
    return write_bytes_atomically(path, (text + "\n").encode())


def write_text_atomically(path, text: str) -> Path:
    """Write UTF-8 `text` with `write_bytes_atomically`."""
    return write_bytes_atomically(path, text.encode())


def save_pytree(directory, tree: Any) -> Path:
    """Save a pytree of arrays and Python scalars as an orbax checkpoint at `directory`.

    The call returns after orbax has finished writing. `directory` must not exist yet.
    """
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, tree)
        checkpointer.wait_until_finished()
    return directory


def restore_pytree(directory, target: Any = None) -> Any:
    """Restore a pytree saved by `save_pytree`.

    Args:
      directory: the orbax checkpoint folder.
      target: a pytree of the same structure (concrete or `jax.ShapeDtypeStruct` leaves) that
        fixes container types such as tuples; None restores nested dicts and lists.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(directory).absolute(), target)


def write_checkpoint(
    directory,
    *,
    fingerprint: str,
    arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    pytrees: Mapping[str, Any] | None = None,
    documents: Mapping[str, Any] | None = None,
    files: Mapping[str, Callable[[Path], Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically, replacing any checkpoint already at `directory`.

    Args:
      directory: the checkpoint folder to create.
      fingerprint: fingerprint of the configuration the contents were computed for.
      arrays: name -> arrays, each saved as `NAME.npz`.
      pytrees: name -> pytree, each saved as an orbax checkpoint in the folder `NAME`.
      documents: name -> JSON-serialisable value, each saved as `NAME.json`.
      files: file name -> function that writes that file at the path it is given (a figure,
        for example).
      metadata: JSON-serialisable facts stored in the manifest.

    Returns:
      The checkpoint folder.

    Raises:
      ValueError: a name that is empty, contains a path separator, or is used twice.
    """
    directory = Path(directory)
    names = _entry_names(arrays, pytrees, documents, files)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.with_name(f".{directory.name}{_PARTIAL_PREFIX}{uuid.uuid4().hex}")
    temporary.mkdir()
    try:
        for name, values in (arrays or {}).items():
            np.savez(temporary / f"{name}.npz", **{k: np.asarray(v) for k, v in values.items()})
        for name, tree in (pytrees or {}).items():
            save_pytree(temporary / name, tree)
        for name, value in (documents or {}).items():
            text = json.dumps(value, indent=2, sort_keys=True, default=_json_default)
            (temporary / f"{name}.json").write_text(text + "\n")
        for name, write in (files or {}).items():
            write(temporary / name)
        manifest = {
            "fingerprint": fingerprint,
            "entries": names,
            "metadata": dict(metadata or {}),
            "files": _describe_files(temporary),
        }
        (temporary / MANIFEST).write_text(
            json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
        )
        _fsync_tree(temporary)
        _move_into_place(temporary, directory)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return directory


def _entry_names(arrays, pytrees, documents, files) -> list[str]:
    names = []
    for kind, entries, suffix in [
        ("arrays", arrays, ".npz"),
        ("pytrees", pytrees, ""),
        ("documents", documents, ".json"),
        ("files", files, ""),
    ]:
        for name in entries or {}:
            if not name or "/" in name or name.startswith(".") or name == MANIFEST:
                raise ValueError(
                    f"{kind} entry name {name!r} must be non-empty, must not start with '.',"
                    f" contain '/' or be {MANIFEST!r}"
                )
            names.append(name + suffix)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"checkpoint entries {duplicates} are given more than once")
    return sorted(names)


def _move_into_place(temporary: Path, directory: Path) -> None:
    # A folder cannot be renamed over a non-empty one, so an existing checkpoint is first moved
    # aside. A kill between the two renames leaves no checkpoint at `directory`, which readers
    # treat as missing and recompute. The old one was being replaced anyway.
    replaced = None
    if directory.exists():
        replaced = directory.with_name(f".{directory.name}{_REPLACED_PREFIX}{uuid.uuid4().hex}")
        os.rename(directory, replaced)
    os.rename(temporary, directory)
    _fsync_directory(directory.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    described = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST:
            described[relative] = {"size": path.stat().st_size, "sha256": _sha256_of(path)}
    return described


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_directory(path)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_manifest(directory) -> dict[str, Any]:
    """Return the manifest of the checkpoint at `directory` without checking its files.

    Raises:
      MissingCheckpointError: no folder at `directory`.
      CorruptCheckpointError: the folder has no readable manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingCheckpointError(directory, "not found")
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(directory, f"{MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(directory, f"{MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptCheckpointError(directory, f"{MANIFEST} has no 'files' table")
    return manifest


def verify_checkpoint(directory, *, fingerprint: str) -> dict[str, Any]:
    """Check that the checkpoint at `directory` is whole and was computed for `fingerprint`.

    Every file listed in the manifest must exist with the recorded size and SHA-256 digest.
    Files not listed in the manifest are ignored.

    Returns:
      The manifest: {"fingerprint", "entries", "metadata", "files"}.

    Raises:
      MissingCheckpointError: no folder at `directory`.
      StaleCheckpointError: the manifest's fingerprint differs from `fingerprint`.
      CorruptCheckpointError: the manifest is missing or unreadable, or a file is missing,
        has another size (truncated) or another digest (altered).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("fingerprint") != fingerprint:
        raise StaleCheckpointError(
            directory,
            f"computed for configuration {str(manifest.get('fingerprint'))[:12]}, not for"
            f" {fingerprint[:12]}",
        )
    for relative, expected in sorted(manifest["files"].items()):
        path = directory / relative
        if not path.is_file():
            raise CorruptCheckpointError(directory, f"file {relative} is missing")
        size = path.stat().st_size
        if size != expected.get("size"):
            raise CorruptCheckpointError(
                directory,
                f"file {relative} has {size} bytes, the manifest records {expected.get('size')}"
                " (truncated or overwritten)",
            )
        if _sha256_of(path) != expected.get("sha256"):
            raise CorruptCheckpointError(
                directory, f"file {relative} does not match its SHA-256 digest (corrupted)"
            )
    return manifest


def load_arrays(directory, name: str) -> dict[str, np.ndarray]:
    """Load the arrays saved under `name` in the checkpoint at `directory`."""
    with np.load(Path(directory) / f"{name}.npz", allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def load_document(directory, name: str) -> Any:
    """Load the JSON document saved under `name` in the checkpoint at `directory`."""
    return json.loads((Path(directory) / f"{name}.json").read_text())


def remove_leftovers(folder) -> list[Path]:
    """Delete the temporary files and folders that interrupted writes left in `folder`.

    Only names that `write_checkpoint` and `write_bytes_atomically` create (hidden, with a
    `.partial-` or `.replaced-` marker) are touched. Call it only when no other process is
    writing into `folder`.

    Returns:
      The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") and (_PARTIAL_PREFIX in name or _REPLACED_PREFIX in name):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed
