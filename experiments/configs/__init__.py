"""Experiment presets, one module each, selected by name."""

from experiments.configs import cpu, full, quick

PRESETS = {"quick": quick.get_config, "cpu": cpu.get_config, "full": full.get_config}
