"""CPU preset: the default experiment of `make run`.

Command: `python -m experiments.run --dataset fashion_mnist --out runs/fashion_mnist`
Runtime: about 10-15 minutes on a 2-core CPU (pool 10,000 training images, 8 shadows, VAE).
Expected result: the real-data classifier near 85% test accuracy, the synthetic-data
classifier lower; LiRA on the real-data classifier clearly above chance at low FPR, on the
synthetic-data classifier closer to chance.
"""

from experiments.config import ExperimentConfig
from ppds_jax.pipeline import PipelineSpec

CLASSIFIER = {"num_epochs": 5, "batch_size": 128, "features": (16, 32), "hidden": 64}


def get_config(dataset: str = "fashion_mnist", generator: str = "vae") -> ExperimentConfig:
    """Return the CPU preset for `dataset` and one generator family."""
    return ExperimentConfig(
        dataset=dataset,
        pool_size=10_000,
        test_size=None,
        num_shadows=8,
        target_delta=1e-5,
        pipelines=(
            PipelineSpec(name="real", classifier_config=CLASSIFIER),
            PipelineSpec(
                name=generator,
                generator=generator,
                generator_config={"num_epochs": 10},
                classifier_config=CLASSIFIER,
            ),
        ),
        description=f"CPU preset on {dataset}: real data against {generator}",
    )
