"""Tests of the benchmark grid and runner: resuming after SIGKILL, invalidation, corruption."""

import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import benchmark, grid
from ppds_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]

# A grid small enough for tests: the real-data classifier and a VAE on a digits pool of 200
# images with 4 shadow masks, one seed. `vae_epochs` is the option the invalidation test
# changes.
TINY_CONFIG = """
import math
from experiments import grid

def get_grid():
    settings = grid.Settings(
        pool_size=200,
        num_shadows=4,
        target_delta=1e-5,
        population_size=50,
        classifier_config={{"num_epochs": 2, "batch_size": 16, "features": (4, 8), "hidden": 16}},
        generator_configs={{
            "vae": {{"num_epochs": {vae_epochs}, "batch_size": 16, "hidden": 32, "latent_dim": 4}}
        }},
    )
    block = grid.Block(
        question="tiny", datasets=("digits",), generators=("vae",), epsilons=(math.inf,),
        seeds=(0,),
    )
    return grid.Grid(
        name="tiny", description="tiny test grid", settings={{"digits": settings}},
        blocks=(block,),
    )
"""
REAL_CELL = "digits-real-epsinf-none-seed0"
VAE_CELL = "digits-vae-epsinf-balanced-none-seed0"


def _config_file(folder, vae_epochs=2):
    path = Path(folder) / f"tiny_{vae_epochs}.py"
    path.write_text(TINY_CONFIG.format(vae_epochs=vae_epochs))
    return path


def _metrics(out):
    """Cell name -> metrics document without the timings, which differ between runs."""
    found = {}
    for path in sorted((Path(out) / benchmark.CELLS_FOLDER).glob("*/metrics/metrics.json")):
        document = json.loads(path.read_text())
        for key in ("run_seconds", "run_cpu_seconds"):
            document.pop(key)
        found[path.parent.parent.name] = document
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return benchmark.load_config_file(_config_file(tmp_path_factory.mktemp("config")))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = benchmark.run(tiny, out, progress=False)
    return out, summary


def _copy(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    return out


class TestGrid:
    def test_tiny_grid_cells(self, tiny):
        cells = {cell.name: cell for cell in tiny.cells()}
        assert sorted(cells) == sorted([REAL_CELL, VAE_CELL])
        assert cells[REAL_CELL].releases == ("real_classifier",)
        assert cells[VAE_CELL].releases == ("synthetic_classifier", "synthetic_data", "generator")

    def test_smoke_preset_size(self):
        cells = grid.smoke().cells()
        assert len(cells) == 12
        assert {c.dataset for c in cells} == {"digits"}
        assert {c.seed for c in cells} == {0, 1}
        assert {c.epsilon for c in cells} == {10.0, math.inf}

    def test_presets_are_subsets_of_their_full_grid(self):
        for preset in (grid.smoke, grid.cpu, grid.mitigations):
            chosen = preset()
            full = {cell.name: cell for cell in chosen.full_grid().cells()}
            for cell in chosen.cells():
                assert cell.name in full
                assert set(cell.releases) <= set(full[cell.name].releases)

    def test_cpu_preset_covers_every_release_and_three_epsilons(self):
        cells = grid.cpu().cells()
        assert len(cells) == 32
        assert {c.dataset for c in cells} == {"fashion_mnist"}
        assert {r for c in cells for r in c.releases} == set(grid.RELEASES)
        assert {c.epsilon for c in cells} == {1.0, 10.0, math.inf}
        assert len({c.seed for c in cells}) >= 2

    def test_mitigations_preset_coverage(self):
        cells = grid.mitigations().cells()
        for family in ("vae", "gan", "diffusion"):
            for epsilon in (1.0, 10.0, math.inf):
                mine = [c for c in cells if c.generator == family and c.epsilon == epsilon]
                assert {c.sampling for c in mine} == set(grid.SAMPLINGS)
                assert {c.mitigation for c in mine} == set(grid.MITIGATIONS)
                assert {r for c in mine for r in c.releases} == set(grid.GENERATOR_RELEASES)
        real = [c for c in cells if c.generator is None]
        assert {r for c in real for r in c.releases} == set(grid.REAL_RELEASES)
        assert {c.mitigation for c in real} == {
            "none",
            "weight_decay",
            "label_smoothing",
            "early_stopping",
        }

    def test_set_reusing_cells_run_first(self):
        # `StageCache` keeps one entry per mask, so every cell that reuses the balanced set
        # must run before the privacy filter's cell draws sets of its own.
        names = [c.name for c in grid.mitigations().cells() if c.generator == "vae"]
        position = {name.split("-", 3)[3]: index for index, name in enumerate(names[:5])}
        assert (
            max(
                position[f"balanced-{m}-seed0"] for m in ("none", "weight_decay", "label_smoothing")
            )
            < position["balanced-privacy_filter-seed0"]
        )

    def test_paper_preset_is_the_full_grid(self):
        paper = grid.paper()
        axes = paper.axes()
        assert set(axes["generators"]) == set(grid.generators.GENERATORS)
        assert set(axes["mitigations"]) == set(grid.MITIGATIONS)
        assert set(axes["samplings"]) == set(grid.SAMPLINGS)
        assert len(paper.blocks) == 1

    def test_classifier_mitigation_keeps_only_classifier_release(self):
        cells = {c.name: c for c in grid.cpu().cells()}
        assert cells["fashion_mnist-vae-epsinf-balanced-weight_decay-seed0"].releases == (
            "synthetic_classifier",
        )
        assert cells["fashion_mnist-real-epsinf-weight_decay-seed0"].releases == (
            "real_classifier",
        )
        assert cells["fashion_mnist-vae-epsinf-balanced-privacy_filter-seed0"].releases == (
            "synthetic_classifier",
            "synthetic_data",
        )
        assert "fashion_mnist-real-epsinf-privacy_filter-seed0" not in cells

    def test_cells_of_one_family_share_keys(self):
        cells = {c.name: c for c in grid.cpu().cells()}
        base = cells["fashion_mnist-vae-epsinf-balanced-none-seed0"]
        mitigated = cells["fashion_mnist-vae-epsinf-balanced-weight_decay-seed0"]
        other = cells["fashion_mnist-gan-epsinf-balanced-none-seed0"]
        assert (base.run_key(1) == mitigated.run_key(1)).all()
        assert not (base.run_key(1) == other.run_key(1)).all()
        assert not (base.run_key(1) == base.run_key(2)).all()

    def test_run_fingerprint_tracks_options_not_name(self, tiny):
        cell = tiny.cell(VAE_CELL)
        renamed = grid.dataclasses.replace(cell, mitigation="renamed")
        assert renamed.run_fingerprint(0) == cell.run_fingerprint(0)
        assert cell.run_fingerprint(0) != cell.run_fingerprint(1)
        spec = grid.dataclasses.replace(cell.spec, generator_config={"num_epochs": 3})
        experiment = grid.dataclasses.replace(cell.experiment, pipelines=(spec,))
        changed = grid.dataclasses.replace(cell, experiment=experiment)
        assert changed.run_fingerprint(0) != cell.run_fingerprint(0)

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("datasets", ("imagenet",), "unknown dataset 'imagenet'; known: .*digits"),
            ("generators", ("flow",), "unknown generator 'flow'; known: .*vae"),
            ("releases", ("weights",), "unknown release 'weights'; known: .*synthetic_data"),
            ("samplings", ("greedy",), "unknown sampling strategy 'greedy'"),
            ("mitigations", ("dropout",), "unknown mitigation 'dropout'; known: .*weight_decay"),
            ("epsilons", (0.0,), r"epsilon=0.0 must be > 0"),
            ("epsilons", (-1.0,), r"epsilon=-1.0 must be > 0"),
            ("epsilons", (math.nan,), r"epsilon=nan must be > 0"),
            ("seeds", (0, 0), "distinct"),
        ],
    )
    def test_invalid_block_raises(self, field, value, message):
        arguments = {
            "question": "q",
            "datasets": ("digits",),
            "generators": ("vae",),
            "epsilons": (1.0,),
            field: value,
        }
        with pytest.raises(ValueError, match=message):
            grid.Block(**arguments)

    def test_dataset_without_settings_raises(self, tiny):
        block = grid.Block(
            question="q",
            datasets=("mnist",),
            generators=(),
            epsilons=(1.0,),
            releases=("dp_real_classifier",),
        )
        with pytest.raises(ValueError, match="no settings for dataset 'mnist'"):
            grid.Grid(name="g", description="", settings=tiny.settings, blocks=(block,))

    def test_delta_above_limit_raises(self):
        with pytest.raises(ValueError, match="delta"):
            grid.Settings(pool_size=100, num_shadows=4, target_delta=0.01)

    def test_unknown_cell_raises(self, tiny):
        with pytest.raises(ValueError, match="has no cell 'nope'.*--list"):
            tiny.cell("nope")


class TestRunner:
    def test_reference_run_finishes_every_cell(self, reference):
        out, summary = reference
        assert sorted(summary.computed_runs) == sorted(
            [(REAL_CELL, m) for m in range(5)] + [(VAE_CELL, m) for m in range(5)]
        )
        assert sorted(summary.finished_cells) == sorted([REAL_CELL, VAE_CELL])
        run = out / benchmark.CELLS_FOLDER / VAE_CELL / "runs" / "0"
        assert {"generator", "classifier", "signals.npz", "synthetic.npz"} <= {
            p.name for p in run.iterdir()
        }
        assert summary.report == out / "report.md"
        assert (out / "report.html").is_file()

    def test_report_numbers_match_metrics(self, reference):
        out, _ = reference
        text = (out / "report.md").read_text()
        section = re.search(r"^## 2\..*?(?=^## )", text, re.S | re.M).group(0)
        rows = [line.strip("|").split("|") for line in section.splitlines()]
        rows = [[c.strip() for c in row] for row in rows if len(row) > 6][2:]
        metrics = _metrics(out)
        found = {}
        for cell in metrics.values():
            for record in cell["records"]:
                found[record["release"]] = record
        assert {row[1] for row in rows} == set(found)
        for row in rows:
            record = found[row[1]]
            assert float(row[6]) == pytest.approx(record["test_accuracy"], abs=5e-4)
            strongest = record["mia"][row[8]]
            best = max(a["tpr_at_fpr_0.001"] for a in record["mia"].values())
            assert strongest["tpr_at_fpr_0.001"] == best
            assert float(row[7]) == pytest.approx(best, abs=5e-5)

    def test_rerun_without_work_computes_nothing(self, reference, tmp_path, tiny):
        out = _copy(reference, tmp_path)
        summary = benchmark.run(tiny, out, progress=False)
        assert summary.computed_runs == []
        assert summary.evaluated_cells == []
        assert summary.recomputed == []
        assert _metrics(out) == _metrics(reference[0])

    def test_sigkill_mid_cell_resumes_to_same_metrics(self, reference, tmp_path, tiny):
        # The child is killed as soon as the first run of the first cell is saved, so the
        # resumed run in this process, whose programs are already compiled, does the rest.
        out = tmp_path / "out"
        command = [
            sys.executable,
            "-m",
            "experiments.benchmark",
            "--config",
            str(_config_file(tmp_path)),
            "--out",
            str(out),
            "--no-progress",
        ]
        child = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)
        first_run = out / benchmark.CELLS_FOLDER / REAL_CELL / "runs" / "0" / checkpoint.MANIFEST
        try:
            deadline = time.monotonic() + 600
            while not first_run.exists():
                assert child.poll() is None, "the benchmark exited before it was killed"
                assert time.monotonic() < deadline, "the benchmark made no progress"
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait()
        assert not (out / benchmark.CELLS_FOLDER / REAL_CELL / "metrics").exists()

        summary = benchmark.run(tiny, out, progress=False)
        real = {mask for name, mask in summary.computed_runs if name == REAL_CELL}
        assert 0 not in real
        assert real and real == set(range(5 - len(real), 5))
        assert sorted(m for n, m in summary.computed_runs if n == VAE_CELL) == list(range(5))
        assert sorted(summary.evaluated_cells) == sorted([REAL_CELL, VAE_CELL])
        assert _metrics(out) == _metrics(reference[0])

    def test_changed_config_recomputes_only_affected_cells(self, reference, tmp_path):
        out = _copy(reference, tmp_path)
        real_metrics = out / benchmark.CELLS_FOLDER / REAL_CELL / "metrics" / "metrics.json"
        before = real_metrics.stat().st_mtime_ns
        changed = benchmark.load_config_file(_config_file(tmp_path, vae_epochs=3))
        with pytest.raises(benchmark.BenchmarkFolderError, match="another configuration"):
            benchmark.run(changed, out, progress=False)

        summary = benchmark.run(changed, out, update=True, progress=False)
        assert sorted(summary.computed_runs) == [(VAE_CELL, m) for m in range(5)]
        assert summary.evaluated_cells == [VAE_CELL]
        assert summary.recomputed
        for _, reason in summary.recomputed:
            assert "computed for configuration" in reason
        assert real_metrics.stat().st_mtime_ns == before
        new, old = _metrics(out), _metrics(reference[0])
        assert new[REAL_CELL] == old[REAL_CELL]
        assert new[VAE_CELL]["experiment"] != old[VAE_CELL]["experiment"]

    def test_corrupt_run_checkpoint_is_named_and_recomputed(self, reference, tmp_path, tiny):
        out = _copy(reference, tmp_path)
        run = out / benchmark.CELLS_FOLDER / REAL_CELL / "runs" / "2"
        signals = run / "signals.npz"
        signals.write_bytes(signals.read_bytes()[:100])
        summary = benchmark.run(tiny, out, progress=False)
        assert [(Path(path), "truncated" in reason) for path, reason in summary.recomputed] == [
            (run, True)
        ]
        assert "signals.npz" in summary.recomputed[0][1]
        assert summary.computed_runs == [(REAL_CELL, 2)]
        assert summary.evaluated_cells == [REAL_CELL]
        assert _metrics(out) == _metrics(reference[0])

    def test_corrupt_metrics_checkpoint_is_recomputed(self, reference, tmp_path, tiny):
        out = _copy(reference, tmp_path)
        path = out / benchmark.CELLS_FOLDER / VAE_CELL / "metrics" / "metrics.json"
        data = bytearray(path.read_bytes())
        data[10] ^= 0x01
        path.write_bytes(bytes(data))
        summary = benchmark.run(tiny, out, progress=False)
        assert [Path(p).name for p, _ in summary.recomputed] == ["metrics"]
        assert summary.computed_runs == []
        assert summary.evaluated_cells == [VAE_CELL]
        assert _metrics(out) == _metrics(reference[0])

    def test_single_cell_runs_alone(self, reference, tmp_path, tiny):
        out = _copy(reference, tmp_path)
        shutil.rmtree(out / benchmark.CELLS_FOLDER / REAL_CELL / "metrics")
        shutil.rmtree(out / benchmark.CELLS_FOLDER / VAE_CELL / "metrics")
        summary = benchmark.run(tiny, out, cell_names=[REAL_CELL], progress=False)
        assert summary.evaluated_cells == [REAL_CELL]
        assert summary.computed_runs == []
        report = summary.report.read_text()
        assert f"Cells not finished: {VAE_CELL}." in report

    def test_weight_decay_cell_reuses_stages(self, tiny, tmp_path):
        block = grid.Block(
            question="reuse",
            datasets=("digits",),
            generators=("vae",),
            epsilons=(math.inf,),
            releases=grid.GENERATOR_RELEASES,
            mitigations=("none", "weight_decay"),
            seeds=(0,),
        )
        reuse = grid.Grid(
            name="reuse", description="reuse test grid", settings=tiny.settings, blocks=(block,)
        )
        out = tmp_path / "out"
        benchmark.run(reuse, out, progress=False)

        decayed = "digits-vae-epsinf-balanced-weight_decay-seed0"
        cells = out / benchmark.CELLS_FOLDER
        for mask in range(5):
            plain_run, decayed_run = (
                cells / name / "runs" / str(mask) for name in (VAE_CELL, decayed)
            )
            assert checkpoint.read_manifest(plain_run)["metadata"]["reused_stages"] == []
            assert checkpoint.read_manifest(decayed_run)["metadata"]["reused_stages"] == [
                "generator",
                "synthetic_set",
            ]
            # The cell evaluates only the released classifier, so it records only its signals.
            signals = checkpoint.load_arrays(decayed_run, "signals")
            assert "synthetic_distance" not in signals
            assert "synthetic_distance" in checkpoint.load_arrays(plain_run, "signals")

        plain_set = checkpoint.load_arrays(cells / VAE_CELL / "runs" / "0", "synthetic")
        decayed_set = checkpoint.load_arrays(cells / decayed / "runs" / "0", "synthetic")
        for name in ("images", "labels"):
            np.testing.assert_array_equal(plain_set[name], decayed_set[name])

        metrics = json.loads((cells / VAE_CELL / "metrics" / "metrics.json").read_text())
        scores = metrics["fidelity"]
        assert scores["frechet_distance_proxy"] > 0
        assert 0 <= scores["precision"] <= 1
        assert 0 <= scores["recall"] <= 1
        decayed_metrics = json.loads((cells / decayed / "metrics" / "metrics.json").read_text())
        assert "fidelity" not in decayed_metrics
        assert "Fidelity of the synthetic sets (proxy, not FID)" in (out / "report.md").read_text()

    def test_start_over_deletes_results(self, reference, tmp_path, tiny):
        out = _copy(reference, tmp_path)
        (out / "notes.txt").write_text("mine")
        summary = benchmark.run(tiny, out, start_over=True, report_only=True, progress=False)
        assert summary.report is None
        assert not (out / benchmark.CELLS_FOLDER).exists()
        assert (out / "notes.txt").read_text() == "mine"


class TestFolder:
    def test_foreign_folder_refused(self, tiny, tmp_path):
        (tmp_path / "data.csv").write_text("1,2")
        with pytest.raises(benchmark.BenchmarkFolderError, match="contains no benchmark"):
            benchmark.run(tiny, tmp_path, report_only=True, progress=False)

    def test_garbled_benchmark_file_refused(self, tiny, tmp_path):
        (tmp_path / benchmark.BENCHMARK_FILE).write_text('{"fingerprint": ')
        with pytest.raises(benchmark.BenchmarkFolderError, match="not valid JSON"):
            benchmark.run(tiny, tmp_path, report_only=True, progress=False)

    def test_locked_folder_refused(self, tiny, tmp_path):
        with open(tmp_path / benchmark.LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with pytest.raises(benchmark.BenchmarkFolderError, match="another benchmark process"):
                benchmark.run(tiny, tmp_path, report_only=True, progress=False)


class TestCommandLine:
    def test_help_describes_every_option(self, capsys):
        with pytest.raises(SystemExit):
            benchmark.main(["--help"])
        text = capsys.readouterr().out
        for option in (
            "--preset",
            "--config",
            "--out",
            "--cell",
            "--list",
            "--update",
            "--start-over",
            "--report-only",
            "--no-progress",
        ):
            assert option in text

    def test_list_names_cells(self, tmp_path, capsys):
        assert benchmark.main(["--config", str(_config_file(tmp_path)), "--list"]) == 0
        text = capsys.readouterr().out
        assert REAL_CELL in text
        assert VAE_CELL in text

    def test_config_with_unknown_generator_fails(self, tmp_path, capsys):
        path = tmp_path / "bad.py"
        path.write_text(TINY_CONFIG.format(vae_epochs=2).replace('("vae",)', '("flow",)'))
        assert benchmark.main(["--config", str(path), "--out", str(tmp_path / "o")]) == 2
        assert "unknown generator 'flow'" in capsys.readouterr().err

    def test_unknown_cell_fails(self, tmp_path, capsys):
        config = str(_config_file(tmp_path))
        assert (
            benchmark.main(["--config", config, "--out", str(tmp_path / "o"), "--cell", "x"]) == 2
        )
        assert "has no cell 'x'" in capsys.readouterr().err

    def test_missing_config_file_fails(self, tmp_path, capsys):
        assert benchmark.main(["--config", str(tmp_path / "none.py"), "--list"]) == 2
        assert "not found" in capsys.readouterr().err
