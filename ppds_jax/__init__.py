"""ppds_jax: can synthetic images replace real data, and at what privacy risk?

Submodules are the public surface, one concept each; see docs/design.md for the map.
"""

__version__ = "0.1.0"
