"""Tests of the benchmark report: sections, numbers parsed back, computed sentences, HTML."""

import math
import re

import numpy as np
import pytest

from ppds_jax import answers

SEEDS = (0, 1, 2)
# (generator, epsilon, sampling, mitigation) -> per-seed accuracy, per-seed attack TPR at 0.1%
# FPR, and the accountant's epsilon. `_releases` gives the releases each cell evaluates.
CELLS = {
    ("real", None, None, "none"): ([0.90, 0.92, 0.91], [0.030, 0.020, 0.025], None),
    ("real", 10.0, None, "none"): ([0.70, 0.72, 0.74], [0.004, 0.002, 0.003], 9.81),
    ("real", None, None, "weight_decay"): ([0.89, 0.90, 0.91], [0.009, 0.011, 0.007], None),
    ("vae", None, "balanced", "none"): ([0.80, 0.82, 0.78], [0.015, 0.010, 0.020], None),
    ("vae", 10.0, "balanced", "none"): ([0.60, 0.62, 0.64], [0.002, 0.001, 0.003], 9.95),
    ("dp_merf", 10.0, "balanced", "none"): ([0.65, 0.66, 0.70], [0.001, 0.001, 0.002], 9.99),
    ("vae", None, "balanced", "weight_decay"): ([0.81, 0.83, 0.79], [0.012, 0.008, 0.010], None),
    ("vae", 10.0, "balanced", "privacy_filter"): ([0.58, 0.60, 0.61], [0.001, 0.001, 0.001], 9.95),
    ("vae", None, "balanced_4x", "none"): ([0.84, 0.85, 0.86], [0.020, 0.025, 0.030], None),
}


def _releases(generator, epsilon, sampling, mitigation):
    if generator == "real":
        return ("real_classifier",) if epsilon is None else ("dp_real_classifier",)
    if mitigation == "weight_decay":
        return ("synthetic_classifier",)
    if mitigation == "privacy_filter" or sampling != "balanced":
        return ("synthetic_classifier", "synthetic_data")
    return ("synthetic_classifier", "synthetic_data", "generator")


# The synthetic set and generator releases get a fixed offset on the classifier's TPR, so each
# release has its own numbers.
RELEASE_TPR_OFFSET = {"synthetic_data": 0.0005, "generator": 0.001}


def _record(release, accuracy, tpr, accounted, void_by):
    tpr = tpr + RELEASE_TPR_OFFSET.get(release, 0.0)
    return {
        "release": release,
        "test_accuracy": accuracy,
        "epsilon": None if void_by else accounted,
        "dp_guarantee_void_by": void_by,
        "mia": {
            "strong": {"tpr_at_fpr_0.001": tpr, "auc": 0.6},
            "weak": {"tpr_at_fpr_0.001": tpr / 2, "auc": 0.7},
        },
        **({"epsilon_lower_bound": 0.5} if accounted else {}),
    }


def _results(cells=CELLS):
    results = []
    for (generator, epsilon, sampling, mitigation), (accuracies, tprs, accounted) in cells.items():
        releases = _releases(generator, epsilon, sampling, mitigation)
        for seed, accuracy, tpr in zip(SEEDS, accuracies, tprs, strict=True):
            void = (
                "privacy_filter" if mitigation == "privacy_filter" and epsilon is not None else None
            )
            name = f"digits-{generator}-{epsilon}-{sampling}-{mitigation}-seed{seed}"
            metrics = {
                "name": name,
                "dataset": "digits",
                "seed": seed,
                "generator": None if generator == "real" else generator,
                "epsilon": epsilon,
                "sampling": sampling,
                "mitigation": mitigation,
                "records": [_record(r, accuracy, tpr, accounted, void) for r in releases],
                "run_seconds": [1.0, 2.0, 3.0],
                "run_cpu_seconds": [0.5, 1.0, 1.5],
            }
            if generator != "real":
                metrics["fidelity"] = _fidelity(accuracy)
            if mitigation == "weight_decay" and generator != "real":
                # A classifier-only mitigation reuses the generator and the synthetic set.
                metrics["run_seconds"] = [0.25, 0.5, 0.75]
                metrics["run_reused_stages"] = [["generator", "synthetic_set"]] * 3
            fpr = np.array([0.0, 0.001, 0.5, 1.0])
            roc = {r: (fpr, np.array([0.0, tpr, 0.6, 1.0])) for r in releases}
            results.append(answers.CellResult(metrics=metrics, roc=roc))
    return results


def _fidelity(accuracy):
    return {"frechet_distance_proxy": 100 * (1 - accuracy), "precision": accuracy, "recall": 0.5}


GRID = {
    "name": "test",
    "description": "fabricated results",
    "axes": {"datasets": ["digits"], "epsilons": [10.0, "inf"]},
    "blocks": [
        {
            "question": "all",
            "datasets": ["digits"],
            "generators": ["vae", "dp_merf"],
            "epsilons": [10.0, None],
            "samplings": ["balanced", "balanced_4x"],
            "releases": ["real_classifier"],
            "mitigations": ["none", "weight_decay", "privacy_filter"],
            "seeds": list(SEEDS),
            "num_cells": 27,
        }
    ],
    "settings": {"digits": {"pool_size": 600}},
    "num_cells": 27,
    "num_evaluations": 60,
    "full_num_cells": 40,
    "full_num_evaluations": 80,
    "samplings": {"balanced": "balanced"},
    "mitigations": {"none": "none"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = answers.write_report(out, grid=GRID, cells=_results(), missing=["digits-gan-x"])
    return out, path.read_text()


def _section(text, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"section {title!r} missing"
    return match.group(1)


def _table(section):
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def _mean_std(text):
    parts = text.split(" ± ")
    return float(parts[0]), (float(parts[1]) if len(parts) > 1 else None)


def _expected(key, release="synthetic_classifier"):
    accuracies, tprs, _ = CELLS[key]
    tprs = np.array(tprs) + RELEASE_TPR_OFFSET.get(release, 0.0)
    return (
        (np.mean(accuracies), np.std(accuracies, ddof=1)),
        (np.mean(tprs), np.std(tprs, ddof=1)),
    )


def _epsilon_key(text):
    return None if text == "inf" else float(text)


class TestSections:
    def test_every_question_has_answer_table_figure(self, report):
        out, text = report
        for number, question in enumerate(answers.QUESTIONS, start=1):
            section = _section(text, f"{number}. {question}")
            assert re.search(r"^Answer: \S", section, re.M)
            assert _table(section)
            images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
            assert images
            for image in images:
                assert (out / image).is_file()

    def test_other_sections(self, report):
        _, text = report
        for title in ("Set-up", "ROC curves per release", "Runtime"):
            _section(text, title)
        assert "digits-gan-x" in _section(text, "Set-up")

    def test_fidelity_table_lists_each_distinct_set(self, report):
        _, text = report
        section = _section(text, "Fidelity of the synthetic sets (proxy, not FID)")
        assert "never the test split" in section
        rows = _table(section)
        # The weight decay cell shares its synthetic set with the unmitigated one.
        expected = {
            key for key in CELLS if key[0] != "real" and "synthetic_data" in _releases(*key)
        }
        found = {
            (row["generator"], _epsilon_key(row["epsilon"]), row["sampling"], row["mitigation"])
            for row in rows
        }
        assert found == expected
        for row in rows:
            key = (
                row["generator"],
                _epsilon_key(row["epsilon"]),
                row["sampling"],
                row["mitigation"],
            )
            accuracies = np.array(CELLS[key][0])
            distances = 100 * (1 - accuracies)
            assert row["seeds"] == "3"
            assert _mean_std(row["Frechet distance (proxy)"]) == pytest.approx(
                (distances.mean(), distances.std(ddof=1)), abs=5e-3
            )
            assert _mean_std(row["synthetic-classifier accuracy"])[0] == pytest.approx(
                accuracies.mean(), abs=5e-4
            )

    def test_runtime_counts_reusing_runs_apart(self, report):
        _, text = report
        rows = {
            (row["generator"], row["epsilon"]): row for row in _table(_section(text, "Runtime"))
        }
        vae = rows[("vae", "inf")]
        # vae at inf: balanced/none and balanced_4x/none compute every stage (2 cells x 3 seeds
        # x 3 runs); the weight decay cell's 9 runs reuse them.
        assert vae["runs computing every stage"] == "18"
        assert vae["median wall seconds per run"] == "2.0"
        assert vae["runs reusing a stage"] == "9"
        assert vae["median wall seconds per reusing run"] == "0.5"
        assert rows[("real", "inf")]["runs reusing a stage"] == "0"
        assert rows[("real", "inf")]["median wall seconds per reusing run"] == "-"

    def test_html_holds_the_same_content(self, report):
        out, text = report
        page = (out / "report.html").read_text()
        assert page.count("<h2>") == text.count("\n## ")
        assert page.count("<table>") == len(re.findall(r"^\|---", text, re.M))
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert f'src="{image}"' in page
        for line in text.splitlines():
            if line.startswith("| ") and not line.startswith("|---"):
                for cell in line.strip("|").split("|"):
                    assert cell.strip().replace("&", "&amp;").replace("<", "&lt;") in page


class TestNumbers:
    def test_question_one_table(self, report):
        _, text = report
        rows = _table(_section(text, f"1. {answers.QUESTIONS[0]}"))
        assert len(rows) == 4  # vae inf, vae 10, dp_merf 10, vae inf 4x.
        for row in rows:
            epsilon = _epsilon_key(row["epsilon"])
            key = (row["generator"], epsilon, row["sampling"], "none")
            (accuracy, accuracy_std), _ = _expected(key)
            assert _mean_std(row["synthetic accuracy"]) == pytest.approx(
                (accuracy, accuracy_std), abs=5e-4
            )
            (real, _), _ = _expected(("real", epsilon, None, "none"))
            assert _mean_std(row["real accuracy"])[0] == pytest.approx(real, abs=5e-4)
            assert float(row["gap"]) == pytest.approx(accuracy - real, abs=1e-3)
            accounted = CELLS[key][2]
            if accounted is None:
                assert row["generator accountant epsilon"] == "-"
            else:
                assert float(row["generator accountant epsilon"]) == pytest.approx(accounted)

    def test_question_two_table(self, report):
        _, text = report
        rows = _table(_section(text, f"2. {answers.QUESTIONS[1]}"))
        assert len(rows) == sum(len(_releases(*key)) for key in CELLS)
        for row in rows:
            sampling = None if row["sampling"] == "-" else row["sampling"]
            key = (row["generator"], _epsilon_key(row["epsilon"]), sampling, row["mitigation"])
            (accuracy, _), (tpr, tpr_std) = _expected(key, row["release"])
            assert _mean_std(row["accuracy"])[0] == pytest.approx(accuracy, abs=5e-4)
            assert _mean_std(row["attack TPR@0.1%FPR"]) == pytest.approx((tpr, tpr_std), abs=5e-5)
            assert row["strongest attack"] == "strong"
            if row["epsilon"] != "inf":
                if row["mitigation"] == "privacy_filter":
                    assert row["accountant epsilon"] == "none (privacy_filter)"
                else:
                    assert float(row["accountant epsilon"]) == pytest.approx(CELLS[key][2])

    def test_pareto_column_matches_definition(self, report):
        _, text = report
        rows = _table(_section(text, f"2. {answers.QUESTIONS[1]}"))
        points = [
            (_mean_std(r["accuracy"])[0], _mean_std(r["attack TPR@0.1%FPR"])[0]) for r in rows
        ]
        for row, (accuracy, tpr) in zip(rows, points, strict=True):
            dominated = any(
                a >= accuracy and t <= tpr and (a > accuracy or t < tpr) for a, t in points
            )
            assert row["Pareto"] == ("no" if dominated else "yes")

    def test_question_three_table(self, report):
        _, text = report
        rows = _table(_section(text, f"3. {answers.QUESTIONS[2]}"))
        changes = {(r["generator"], r["release"], r["epsilon"], r["change"]): r for r in rows}
        # weight decay on the real classifier: accuracy 0.90 vs 0.91, TPR 0.009 vs 0.025.
        row = changes[("real", "real_classifier", "inf", "mitigation: weight_decay")]
        assert float(row["accuracy change"]) == pytest.approx(0.90 - 0.91, abs=1e-3)
        assert float(row["TPR change"]) == pytest.approx(0.009 - 0.025, abs=1e-4)
        assert row["verdict"] == "trades accuracy for privacy"
        row = changes[("vae", "synthetic_classifier", "inf", "mitigation: weight_decay")]
        assert row["verdict"] == "improves"
        row = changes[("vae", "synthetic_data", "inf", "sampling: balanced_4x")]
        assert row["verdict"] == "trades privacy for accuracy"
        # The privacy filter: accuracy 0.597 vs 0.620, TPR 0.0015 vs 0.0025.
        row = changes[("vae", "synthetic_data", "10", "mitigation: privacy_filter")]
        assert row["verdict"] == "trades accuracy for privacy"
        assert row["accountant epsilon after"] == "none (privacy_filter)"
        assert len(rows) == 6

    def test_question_four_ranking(self, report):
        _, text = report
        rows = _table(_section(text, f"4. {answers.QUESTIONS[3]}"))
        at_ten = [r for r in rows if r["epsilon"] == "10"]
        assert [r["generator"] for r in at_ten] == ["dp_merf", "vae"]
        assert [r["rank"] for r in at_ten] == ["1", "2"]
        # The highest TPR over the VAE's releases at epsilon 10 is the generator release's.
        _, (tpr, _) = _expected(("vae", 10.0, "balanced", "none"), "generator")
        assert float(at_ten[1]["highest attack TPR@0.1%FPR over its releases"]) == pytest.approx(
            tpr, abs=5e-5
        )

    def test_sentence_numbers_come_from_tables(self, report):
        _, text = report
        for number, question in enumerate(answers.QUESTIONS, start=1):
            section = _section(text, f"{number}. {question}")
            sentence = re.search(r"^Answer: (.*)$", section, re.M).group(1)
            table_numbers = set(
                re.findall(
                    r"[-+]?\d+\.\d+",
                    "\n".join(line for line in section.splitlines() if line.startswith("|")),
                )
            )
            table_values = {float(n) for n in table_numbers}
            for claimed in re.findall(r"[-+]?\d+\.\d{3,}", sentence):
                value = float(claimed)
                constants = {answers.MATCH_TOLERANCE, answers.ATTACK_TPR_LIMIT}
                assert (
                    value in table_values
                    or value in constants
                    or any(math.isclose(value, v, abs_tol=1.5e-3) for v in table_values)
                ), f"{claimed} in question {number}'s answer is not in its table"


class TestSentences:
    def test_replacement_answer_follows_gap(self):
        cells = {k: v for k, v in CELLS.items() if k[2] in (None, "balanced")}
        settings = answers.summarise([row for r in _results(cells) for row in answers.cell_rows(r)])
        sentence = answers.replacement_sentence(answers.replacement_comparisons(settings))
        assert sentence.startswith("No:")
        close = dict(cells)
        close[("vae", None, "balanced", "none")] = ([0.90, 0.92, 0.91], [0.0] * 3, None)
        close[("vae", 10.0, "balanced", "none")] = ([0.70, 0.72, 0.74], [0.0] * 3, 9.95)
        close[("dp_merf", 10.0, "balanced", "none")] = ([0.71, 0.72, 0.73], [0.0] * 3, 9.99)
        settings = answers.summarise([row for r in _results(close) for row in answers.cell_rows(r)])
        sentence = answers.replacement_sentence(answers.replacement_comparisons(settings))
        assert sentence.startswith("Yes:")
        assert "in 3 of 3 settings" in sentence

    def test_ranking_names_the_most_accurate_generator(self):
        swapped = dict(CELLS)
        swapped[("vae", 10.0, "balanced", "none")] = ([0.75, 0.76, 0.77], [0.0] * 3, 9.95)
        settings = answers.summarise(
            [row for r in _results(swapped) for row in answers.cell_rows(r)]
        )
        sentence = answers.ranking_sentence(answers.generator_ranking(settings))
        assert "at epsilon 10, vae ranks first (0.760) ahead of dp_merf (0.670)" in sentence

    def test_balance_picks_most_accurate_release_under_limit(self):
        settings = answers.summarise([row for r in _results() for row in answers.cell_rows(r)])
        sentence = answers.balance_sentence("digits", settings)
        # Under TPR 0.01 the most accurate release is the real classifier with weight decay
        # (accuracy 0.90, TPR 0.009). The one without it has TPR 0.025.
        assert (
            "the most accurate is real_classifier at epsilon inf, weight_decay (accuracy 0.900"
            in sentence
        )

    def test_no_baseline_is_stated(self):
        only = {k: v for k, v in CELLS.items() if k[0] != "real"}
        settings = answers.summarise([row for r in _results(only) for row in answers.cell_rows(r)])
        sentence = answers.replacement_sentence(answers.replacement_comparisons(settings))
        assert "no measured answer" in sentence


class TestHelpers:
    def test_mean_std_of_one_value_has_no_deviation(self):
        assert answers.mean_std([0.5]) == (0.5, None)
        assert answers.format_mean_std((0.5, None)) == "0.500"

    def test_mean_std_is_sample_deviation(self):
        mean, std = answers.mean_std([1.0, 2.0, 3.0])
        assert (mean, std) == (2.0, 1.0)

    @pytest.mark.parametrize(
        ("accuracy", "tpr", "verdict"),
        [
            ((0.8, 0.9), (0.02, 0.01), "improves"),
            ((0.8, 0.7), (0.02, 0.03), "worsens"),
            ((0.8, 0.7), (0.02, 0.01), "trades accuracy for privacy"),
            ((0.8, 0.9), (0.02, 0.03), "trades privacy for accuracy"),
            ((0.8, 0.8), (0.02, 0.02), "no change"),
        ],
    )
    def test_change_verdict(self, accuracy, tpr, verdict):
        def setting(a, t):
            return answers.Setting(
                "d",
                "vae",
                math.inf,
                "balanced",
                "none",
                "synthetic_classifier",
                (0,),
                (a, None),
                (t, None),
                "x",
                None,
                None,
                None,
            )

        change = answers.Change(
            "mitigation", "m", setting(accuracy[0], tpr[0]), setting(accuracy[1], tpr[1])
        )
        assert change.verdict == verdict

    def test_markdown_and_html_render_same_blocks(self):
        blocks = [
            answers.Heading(2, "Title"),
            answers.Paragraph("a < b and `code`"),
            answers.Table(("x", "y"), (("1", "2"),)),
            answers.Image("figures/a.png", "caption"),
        ]
        markdown = answers.to_markdown(blocks)
        assert "## Title" in markdown
        assert "| 1 | 2 |" in markdown
        page = answers.to_html(blocks, "t")
        assert "a &lt; b and <code>code</code>" in page
        assert "<td>1</td><td>2</td>" in page
        assert '<img src="figures/a.png" alt="caption">' in page
