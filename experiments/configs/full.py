"""Full-scale preset for GPUs.

Command: `python -m experiments.run --preset full --dataset fashion_mnist --out runs/full`
Runtime: an estimate of one to a few GPU-hours (whole training split as the pool, 64 shadows);
not measured on a GPU yet.
Expected result: sharper attack figures at low FPR than the CPU preset, because 64 shadows give
each example about 32 IN and 32 OUT models.
"""

from experiments.config import ExperimentConfig
from ppds_jax.pipeline import PipelineSpec

CLASSIFIER = {"num_epochs": 20, "batch_size": 256, "features": (32, 64), "hidden": 128}


def get_config(dataset: str = "fashion_mnist", generator: str = "vae") -> ExperimentConfig:
    """Return the full-scale preset for `dataset` and one generator family."""
    return ExperimentConfig(
        dataset=dataset,
        pool_size=None,
        num_shadows=64,
        # The whole Fashion-MNIST training split gives 30,000 expected members, and delta must
        # be at most 0.1 / 30,000.
        target_delta=3e-6,
        pipelines=(
            PipelineSpec(name="real", classifier_config=CLASSIFIER),
            PipelineSpec(
                name=generator,
                generator=generator,
                generator_config={"num_epochs": 100, "batch_size": 256},
                classifier_config=CLASSIFIER,
            ),
        ),
        description=f"full-scale preset on {dataset}: real data against {generator}",
    )
