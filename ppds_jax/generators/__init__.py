"""Generator families behind one interface, selected by name.

The registry maps each name to a function that imports its module, so importing this package
(for `base`) stays cheap and a family's dependencies load only when it is used.
"""

from collections.abc import Callable

from ppds_jax.generators.base import FitResult, GeneratorFamily, PrivacySpec, resolve_config


def _vae() -> GeneratorFamily:
    from ppds_jax.generators import vae

    return vae.FAMILY


def _gan() -> GeneratorFamily:
    from ppds_jax.generators import gan

    return gan.FAMILY


def _diffusion() -> GeneratorFamily:
    from ppds_jax.generators import diffusion

    return diffusion.FAMILY


def _dp_merf() -> GeneratorFamily:
    from ppds_jax.generators import dp_merf

    return dp_merf.FAMILY


_LOADERS: dict[str, Callable[[], GeneratorFamily]] = {
    "vae": _vae,
    "gan": _gan,
    "diffusion": _diffusion,
    "dp_merf": _dp_merf,
}
GENERATORS: tuple[str, ...] = tuple(_LOADERS)


def get_family(name: str) -> GeneratorFamily:
    """Look up a generator family by registry name.

    Raises:
      ValueError: unknown name, listing the known ones.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown generator {name!r}; known generators: {sorted(_LOADERS)}")
    return _LOADERS[name]()


__all__ = [
    "GENERATORS",
    "FitResult",
    "GeneratorFamily",
    "PrivacySpec",
    "get_family",
    "resolve_config",
]
