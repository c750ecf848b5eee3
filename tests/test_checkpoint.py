"""Tests of atomic checkpoint folders: round trips, corruption, staleness, interrupted writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from ppds_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]


def _write_example(path, fingerprint="abc"):
    return checkpoint.write_checkpoint(
        path,
        fingerprint=fingerprint,
        arrays={"signals": {"logits": np.arange(12, dtype=np.float32).reshape(4, 3)}},
        pytrees={"classifier": {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}},
        documents={"ledger": {"epsilon_pld": 9.5}},
        files={"note.txt": lambda p: p.write_text("hello")},
        metadata={"seconds": 1.5},
    )


class TestFingerprint:
    def test_key_order_and_tuples_do_not_matter(self):
        first = checkpoint.fingerprint({"a": 1, "b": (1, 2), "c": {"x": 1.0, "y": None}})
        second = checkpoint.fingerprint({"c": {"y": None, "x": 1.0}, "b": [1, 2], "a": 1})
        assert first == second

    def test_every_value_changes_it(self):
        base = {"a": 1, "b": [1, 2], "c": {"x": 1.0}}
        changed = [
            {"a": 2, "b": [1, 2], "c": {"x": 1.0}},
            {"a": 1, "b": [2, 1], "c": {"x": 1.0}},
            {"a": 1, "b": [1, 2], "c": {"x": 1.5}},
            {"a": 1, "b": [1, 2], "c": {"x": 1.0}, "d": None},
        ]
        fingerprints = {checkpoint.fingerprint(v) for v in [base, *changed]}
        assert len(fingerprints) == 5

    def test_unserialisable_value_raises(self):
        with pytest.raises(TypeError, match="object"):
            checkpoint.fingerprint({"a": object()})


class TestWriteAndVerify:
    def test_round_trip(self, tmp_path):
        path = _write_example(tmp_path / "run")
        manifest = checkpoint.verify_checkpoint(path, fingerprint="abc")
        assert manifest["metadata"] == {"seconds": 1.5}
        np.testing.assert_array_equal(
            checkpoint.load_arrays(path, "signals")["logits"],
            np.arange(12, dtype=np.float32).reshape(4, 3),
        )
        assert checkpoint.load_document(path, "ledger") == {"epsilon_pld": 9.5}
        assert (path / "note.txt").read_text() == "hello"
        restored = checkpoint.restore_pytree(path / "classifier")
        chex.assert_trees_all_close(
            restored, {"dense": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}}
        )

    def test_pytree_target_keeps_tuples(self, tmp_path):
        tree = {"params": (jnp.arange(3.0), jnp.ones(2)), "num_classes": 10}
        checkpoint.save_pytree(tmp_path / "tree", tree)
        restored = checkpoint.restore_pytree(tmp_path / "tree", tree)
        assert isinstance(restored["params"], tuple)
        chex.assert_trees_all_close(restored, tree)

    def test_manifest_lists_every_file(self, tmp_path):
        path = _write_example(tmp_path / "run")
        manifest = checkpoint.read_manifest(path)
        on_disk = {
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and p.name != checkpoint.MANIFEST
        }
        assert set(manifest["files"]) == on_disk
        assert {"signals.npz", "ledger.json", "note.txt"} <= on_disk

    def test_rewrite_replaces_previous_checkpoint(self, tmp_path):
        _write_example(tmp_path / "run", fingerprint="old")
        checkpoint.write_checkpoint(tmp_path / "run", fingerprint="new", documents={"only": [1]})
        manifest = checkpoint.verify_checkpoint(tmp_path / "run", fingerprint="new")
        assert set(manifest["files"]) == {"only.json"}
        assert not (tmp_path / "run" / "signals.npz").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["run"]

    def test_failed_write_leaves_nothing(self, tmp_path):
        def fail(path):
            raise RuntimeError("figure failed")

        with pytest.raises(RuntimeError, match="figure failed"):
            checkpoint.write_checkpoint(tmp_path / "run", fingerprint="x", files={"a.png": fail})
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize("name", ["", "a/b", ".hidden", "manifest.json"])
    def test_invalid_entry_name_raises(self, tmp_path, name):
        with pytest.raises(ValueError, match="entry name"):
            checkpoint.write_checkpoint(tmp_path / "run", fingerprint="x", files={name: print})

    def test_duplicate_entry_raises(self, tmp_path):
        with pytest.raises(ValueError, match="more than once"):
            checkpoint.write_checkpoint(
                tmp_path / "run",
                fingerprint="x",
                documents={"a": 1},
                files={"a.json": lambda p: p.write_text("1")},
            )


class TestDetection:
    def test_missing_checkpoint(self, tmp_path):
        with pytest.raises(checkpoint.MissingCheckpointError):
            checkpoint.verify_checkpoint(tmp_path / "absent", fingerprint="abc")

    def test_stale_fingerprint(self, tmp_path):
        path = _write_example(tmp_path / "run", fingerprint="abc")
        with pytest.raises(
            checkpoint.StaleCheckpointError, match="computed for configuration abc, not for def"
        ):
            checkpoint.verify_checkpoint(path, fingerprint="def")

    def test_truncated_file_named(self, tmp_path):
        path = _write_example(tmp_path / "run")
        target = path / "signals.npz"
        target.write_bytes(target.read_bytes()[:-10])
        with pytest.raises(checkpoint.CorruptCheckpointError, match="signals.npz.*truncated"):
            checkpoint.verify_checkpoint(path, fingerprint="abc")

    def test_altered_byte_detected(self, tmp_path):
        path = _write_example(tmp_path / "run")
        data = bytearray((path / "ledger.json").read_bytes())
        data[5] ^= 0x01
        (path / "ledger.json").write_bytes(bytes(data))
        with pytest.raises(checkpoint.CorruptCheckpointError, match="ledger.json.*SHA-256"):
            checkpoint.verify_checkpoint(path, fingerprint="abc")

    def test_altered_orbax_file_detected(self, tmp_path):
        path = _write_example(tmp_path / "run")
        orbax_files = sorted(p for p in (path / "classifier").rglob("*") if p.is_file())
        largest = max(orbax_files, key=lambda p: p.stat().st_size)
        data = bytearray(largest.read_bytes())
        data[-1] ^= 0xFF
        largest.write_bytes(bytes(data))
        with pytest.raises(checkpoint.CorruptCheckpointError, match="classifier/"):
            checkpoint.verify_checkpoint(path, fingerprint="abc")

    def test_deleted_file_detected(self, tmp_path):
        path = _write_example(tmp_path / "run")
        (path / "note.txt").unlink()
        with pytest.raises(checkpoint.CorruptCheckpointError, match="note.txt is missing"):
            checkpoint.verify_checkpoint(path, fingerprint="abc")

    def test_missing_manifest_is_corrupt(self, tmp_path):
        path = _write_example(tmp_path / "run")
        (path / checkpoint.MANIFEST).unlink()
        with pytest.raises(checkpoint.CorruptCheckpointError, match="manifest.json is missing"):
            checkpoint.verify_checkpoint(path, fingerprint="abc")

    def test_garbled_manifest_is_corrupt(self, tmp_path):
        path = _write_example(tmp_path / "run")
        (path / checkpoint.MANIFEST).write_text('{"fingerprint": "abc", "fi')
        with pytest.raises(checkpoint.CorruptCheckpointError, match="not valid JSON"):
            checkpoint.verify_checkpoint(path, fingerprint="abc")


class TestInterruptedWrite:
    def test_sigkill_during_write_leaves_no_checkpoint(self, tmp_path):
        # The child writes a checkpoint whose last file takes a minute to produce, and it is
        # killed while that file is being written.
        script = textwrap.dedent(
            f"""
            import time
            import numpy as np
            from ppds_jax import checkpoint

            def slow(path):
                path.write_text("started")
                time.sleep(60)

            checkpoint.write_checkpoint(
                {str(tmp_path / "run")!r}, fingerprint="x",
                arrays={{"a": {{"x": np.ones(3)}}}}, files={{"slow.txt": slow}})
            """
        )
        child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob(".run.partial-*/slow.txt")):
                assert child.poll() is None, "the writer exited before it was killed"
                assert time.monotonic() < deadline, "the writer never started"
                time.sleep(0.1)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait()
        assert not (tmp_path / "run").exists()
        leftovers = checkpoint.remove_leftovers(tmp_path)
        assert [p.name.split("-")[0] for p in leftovers] == [".run.partial"]
        assert list(tmp_path.iterdir()) == []

    def test_remove_leftovers_keeps_other_files(self, tmp_path):
        (tmp_path / "run").mkdir()
        (tmp_path / ".lock").write_text("")
        (tmp_path / ".run.replaced-123").mkdir()
        (tmp_path / ".x.json.partial-9").write_text("{")
        removed = checkpoint.remove_leftovers(tmp_path)
        assert sorted(p.name for p in removed) == [".run.replaced-123", ".x.json.partial-9"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "run"]


class TestAtomicFiles:
    def test_json_round_trip_and_no_temporary(self, tmp_path):
        checkpoint.write_json_atomically(tmp_path / "a.json", {"b": [1, 2], "a": None})
        assert json.loads((tmp_path / "a.json").read_text()) == {"a": None, "b": [1, 2]}
        assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

    def test_text_overwrites(self, tmp_path):
        checkpoint.write_text_atomically(tmp_path / "r.md", "old")
        checkpoint.write_text_atomically(tmp_path / "r.md", "new")
        assert (tmp_path / "r.md").read_text() == "new"
