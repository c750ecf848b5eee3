"""Generator families behind one interface, selected by name."""

from ppds_jax.generators.base import FitResult, GeneratorFamily, PrivacySpec, resolve_config

GENERATORS: dict[str, GeneratorFamily] = {}


def get_family(name: str) -> GeneratorFamily:
    """Look up a generator family by registry name.

    Raises:
      ValueError: unknown name, listing the known ones.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; known generators: {sorted(GENERATORS)}")
    return GENERATORS[name]


__all__ = [
    "GENERATORS",
    "FitResult",
    "GeneratorFamily",
    "PrivacySpec",
    "get_family",
    "resolve_config",
]
