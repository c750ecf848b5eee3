"""JAX's persistent compilation cache for the experiment commands.

An experiment compiles the same programs for the target and every shadow pipeline, and a
resumed or repeated run compiles them again in a new process. JAX can keep compiled XLA
programs on disk, keyed by the program text, the compile options and the JAX version, so a
program compiled once is loaded from disk afterwards. This changes speed only, never results.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def default_dir() -> Path:
    """Return `$XDG_CACHE_HOME/ppds_jax/xla`, or `~/.cache/ppds_jax/xla` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ppds_jax" / "xla"


def enable(directory: str | os.PathLike | None = None) -> Path:
    """Turn on the persistent cache in `directory` and return it.

    Without `directory`, JAX_COMPILATION_CACHE_DIR is used when it is set, else `default_dir()`.
    Programs that compile in under 0.2 s are not stored: loading them saves nothing.
    """
    if directory is None:
        directory = os.environ.get(ENV_VAR) or default_dir()
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return directory
