"""End-to-end tests of the experiment runner on scikit-learn's digits."""

import json

import numpy as np
import pytest

from experiments import run as run_cli
from experiments.config import ExperimentConfig, with_epsilons
from experiments.experiment import RunFolderError, run
from ppds_jax.pipeline import PipelineSpec

CLASSIFIER = {"num_epochs": 10, "batch_size": 32, "features": (8, 16), "hidden": 32}


def tiny_config(**overrides) -> ExperimentConfig:
    config = ExperimentConfig(
        dataset="digits",
        pool_size=600,
        num_shadows=4,
        population_size=200,
        pipelines=(
            PipelineSpec(name="real", classifier_config=CLASSIFIER),
            PipelineSpec(
                name="vae",
                generator="vae",
                generator_config={"num_epochs": 30, "batch_size": 32, "hidden": 128},
                classifier_config=CLASSIFIER,
            ),
        ),
    )
    return ExperimentConfig(**{**config.__dict__, **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    records = run(tiny_config(), workdir, progress=False)
    return workdir, records


def test_metrics_file_has_one_record_per_release(finished_run):
    workdir, records = finished_run
    saved = json.loads((workdir / "metrics.json").read_text())
    releases = [(r["pipeline"], r["release"]) for r in saved]
    assert releases == [
        ("real", "real_classifier"),
        ("vae", "synthetic_classifier"),
        ("vae", "synthetic_data"),
        ("vae", "generator"),
    ]
    assert saved == json.loads(json.dumps(records))


def test_accuracy_well_above_chance(finished_run):
    _, records = finished_run
    by_release = {r["release"]: r for r in records}
    # Ten balanced classes give 10% by chance; tiny models on 300 members reach far more.
    assert by_release["real_classifier"]["test_accuracy"] > 0.6
    assert by_release["synthetic_classifier"]["test_accuracy"] > 0.3


def test_every_metric_in_range(finished_run):
    _, records = finished_run
    for record in records:
        assert record["epsilon"] is None
        assert record["delta"] is None
        assert record["mia"], record["release"]
        for name, attack in record["mia"].items():
            assert 0.0 <= attack["auc"] <= 1.0, name
            assert 0.5 <= attack["balanced_accuracy"] <= 1.0, name
            for target in ("0.001", "0.01"):
                tpr = attack[f"tpr_at_fpr_{target}"]
                low, high = attack[f"tpr_at_fpr_{target}_ci"]
                assert 0.0 <= low <= tpr <= high <= 1.0, name


def test_report_and_figures_written(finished_run):
    workdir, records = finished_run
    report = (workdir / "report.md").read_text()
    for record in records:
        assert f"| {record['pipeline']} | {record['release']} |" in report
    assert (workdir / "samples_vae.png").stat().st_size > 0
    assert (workdir / "roc_real_real_classifier.png").stat().st_size > 0
    assert json.loads((workdir / "config.json").read_text())["config"]["dataset"] == "digits"


def test_fidelity_proxy_recorded_for_generator_releases(finished_run):
    workdir, records = finished_run
    for record in records:
        if record["generator"] is None:
            assert "fidelity" not in record
            continue
        scores = record["fidelity"]
        assert scores["frechet_distance_proxy"] > 0.0
        assert 0.0 <= scores["precision"] <= 1.0
        assert 0.0 <= scores["recall"] <= 1.0
    report = (workdir / "report.md").read_text()
    assert "## Fidelity (proxy, not FID)" in report
    distance = records[1]["fidelity"]["frechet_distance_proxy"]
    assert f"| vae | vae | - | {records[1]['test_accuracy']:.3f} | {distance:.2f} |" in report


def test_private_releases_carry_epsilon_and_ledger(tmp_path):
    config = tiny_config()
    config = tiny_config(num_shadows=4, pipelines=with_epsilons(config.pipelines, (10.0,)))
    records = run(config, tmp_path, progress=False)
    private = [r for r in records if r["epsilon"] is not None]
    assert {(r["pipeline"], r["release"]) for r in private} == {
        ("real_eps10", "dp_real_classifier"),
        ("vae_eps10", "synthetic_classifier"),
        ("vae_eps10", "synthetic_data"),
        ("vae_eps10", "generator"),
    }
    report = (tmp_path / "report.md").read_text()
    for record in private:
        assert 9.0 < record["epsilon"] <= 10.0
        assert record["delta"] == config.target_delta
        ledger = json.loads((tmp_path / "ledgers" / f"{record['pipeline']}.json").read_text())
        assert ledger["epsilon_pld"] == pytest.approx(record["epsilon"])
        assert ledger["epsilon_pld"] <= ledger["epsilon_rdp"]
        for stage in ledger["stages"]:
            assert f"  - stage `{stage['name']}`: " in report
    assert "## Privacy ledgers" in report


def test_same_seed_gives_same_metrics(finished_run, tmp_path):
    _, records = finished_run
    again = run(tiny_config(), tmp_path / "again", progress=False)
    assert again == records


def test_shadow_strategies_agree(finished_run, tmp_path):
    # The module fixture ran with "auto" (sequential on a CPU): the real-data classifiers of
    # all masks in one train_classifiers call. One run_pipeline call per mask must match it.
    _, records = finished_run
    real_only = tiny_config(pipelines=tiny_config().pipelines[:1])
    separate = run(real_only, tmp_path / "separate", progress=False, shadow_strategy="separate")
    assert separate == records[:1]
    with pytest.raises(ValueError, match="shadow_strategy='together'"):
        run(tiny_config(), tmp_path / "x", progress=False, shadow_strategy="together")


def test_existing_run_is_not_overwritten(finished_run):
    workdir, _ = finished_run
    before = (workdir / "metrics.json").read_bytes()
    with pytest.raises(RunFolderError, match="--resume"):
        run(tiny_config(), workdir, progress=False)
    with pytest.raises(RunFolderError, match="another configuration"):
        run(tiny_config(seed=1), workdir, resume=True, progress=False)
    assert (workdir / "metrics.json").read_bytes() == before


def test_resume_reuses_finished_pipelines(finished_run):
    workdir, records = finished_run
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "signals").rglob("*.npz")}
    resumed = run(tiny_config(), workdir, resume=True, progress=False)
    assert resumed == records
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # The resumed report still states the run times of the pipelines computed before.
    timings = json.loads((workdir / "timings.json").read_text())
    assert sorted(timings) == ["real", "vae"]
    assert all(sorted(t) == ["0", "1", "2", "3", "4"] for t in timings.values())
    assert '- seconds_per_pipeline: {"real": ' in (workdir / "report.md").read_text()


def test_folder_with_other_files_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not empty"):
        run(tiny_config(), tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_shadows": 3}, "num_shadows=3"),
        ({"pipelines": ()}, "at least one pipeline"),
        ({"inclusion_prob": 1.0}, "inclusion_prob=1.0"),
    ],
)
def test_invalid_config_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_cli_rejects_unknown_dataset(tmp_path, capsys):
    status = run_cli.main(["--dataset", "nope", "--quick", "--out", str(tmp_path / "x")])
    assert status == 2
    error = capsys.readouterr().err
    assert "unknown dataset 'nope'" in error or "nope" in error
    assert "digits" in error
    assert not (tmp_path / "x").exists()


def test_cli_rejects_non_positive_epsilon(tmp_path):
    with pytest.raises(SystemExit):
        run_cli.main(["--quick", "--epsilon", "0", "--out", str(tmp_path / "x")])


def test_cli_adds_private_variants():
    args = run_cli.build_parser().parse_args(
        ["--dataset", "digits", "--quick", "--epsilon", "10", "--out", "unused"]
    )
    config = run_cli.config_from_args(args)
    names = {spec.name: spec for spec in config.pipelines}
    assert names["real_eps10"].releases == ("dp_real_classifier",)
    assert names["vae_eps10"].epsilon == 10
    assert np.isclose(config.target_delta, 1e-5)
