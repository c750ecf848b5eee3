"""Tests of the persistent compilation cache switch of the experiment commands."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import compilation_cache


def test_default_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_dir() == tmp_path / "ppds_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.default_dir() == tmp_path / "home" / ".cache" / "ppds_jax" / "xla"


def test_enable_uses_the_environment_folder_and_stores_programs():
    folder = compilation_cache.enable()
    assert str(folder) == os.environ[compilation_cache.ENV_VAR]
    assert jax.config.jax_compilation_cache_dir == str(folder)

    # A program that takes long enough to compile is written to the folder, and the cached
    # program computes the same values.
    def long_program(x):
        for i in range(300):
            x = jnp.sin(x * (i + 1)) + jnp.cos(x)
        return x

    x = jnp.linspace(0.0, 1.0, 16)
    before = set(folder.iterdir())
    first = np.asarray(jax.jit(long_program)(x))
    assert set(folder.iterdir()) - before
    np.testing.assert_allclose(np.asarray(jax.jit(long_program)(x)), first)
