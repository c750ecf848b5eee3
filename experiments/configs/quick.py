"""Quick preset: a small run that checks the whole pipeline end to end.

Command: `python -m experiments.run --dataset digits --quick --out runs/quick`
Runtime: about a minute on a 2-core CPU for digits (pool 1,000, 4 shadows, VAE).
Expected result: both classifiers well above the 10% chance accuracy; attack AUCs near 0.5-0.7.
"""

from experiments.config import ExperimentConfig
from ppds_jax.pipeline import PipelineSpec

CLASSIFIER = {"num_epochs": 8, "batch_size": 64, "features": (16, 32), "hidden": 64}


def get_config(dataset: str = "digits", generator: str = "vae") -> ExperimentConfig:
    """Return the quick preset for `dataset` and one generator family."""
    return ExperimentConfig(
        dataset=dataset,
        pool_size=1000,
        test_size=None if dataset == "digits" else 2000,
        num_shadows=4,
        target_delta=1e-5,
        pipelines=(
            PipelineSpec(name="real", classifier_config=CLASSIFIER),
            PipelineSpec(
                name=generator,
                generator=generator,
                generator_config={"num_epochs": 20, "batch_size": 64},
                classifier_config=CLASSIFIER,
            ),
        ),
        description=f"quick check on {dataset}: real data against {generator}",
    )
