"""Settings shared by every test module."""

import os

import pytest

from experiments import compilation_cache


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache_in_temporary_folder(tmp_path_factory):
    # The command-line entry points turn on JAX's persistent compilation cache; under test it
    # must live in a temporary folder, never in the user's home.
    os.environ[compilation_cache.ENV_VAR] = str(tmp_path_factory.mktemp("xla_cache"))
