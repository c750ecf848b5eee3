"""Markdown report of one experiment: results table, ledgers, ROC curves and sample grids."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ppds_jax import plots


def _format(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if np.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def strongest_attack(record: Mapping) -> str | None:
    """Name of the attack with the highest TPR at 0.1% FPR (ties broken by AUC)."""
    attacks = record.get("mia") or {}
    if not attacks:
        return None
    return max(attacks, key=lambda name: (attacks[name]["tpr_at_fpr_0.001"], attacks[name]["auc"]))


def _epsilon_cell(record: Mapping) -> str:
    """Accounted epsilon, or the reason a release has none although its generator was private."""
    if record.get("dp_guarantee_void_by"):
        return f"void ({record['dp_guarantee_void_by']})"
    return _format(record["epsilon"], 2)


def results_table(records: Sequence[Mapping]) -> str:
    """Markdown table with one row per released artefact and its strongest attack."""
    lines = [
        "| pipeline | release | generator | epsilon | delta | test accuracy | strongest attack "
        "| AUC | TPR@0.1%FPR | TPR@1%FPR | empirical epsilon lower bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        name = strongest_attack(record)
        attack = record["mia"][name] if name else {}
        lines.append(
            "| "
            + " | ".join(
                [
                    record["pipeline"],
                    record["release"],
                    record["generator"] or "-",
                    _epsilon_cell(record),
                    _format(record["delta"], 8) if record["delta"] else "-",
                    _format(record["test_accuracy"]),
                    name or "-",
                    _format(attack.get("auc")),
                    _format(attack.get("tpr_at_fpr_0.001"), 4),
                    _format(attack.get("tpr_at_fpr_0.01"), 4),
                    _format(record.get("epsilon_lower_bound")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def attacks_table(records: Sequence[Mapping]) -> str:
    """Markdown table with every attack on every release."""
    lines = [
        "| pipeline | release | attack | AUC | balanced accuracy | TPR@0.1%FPR | TPR@1%FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        for name, attack in (record.get("mia") or {}).items():
            lines.append(
                f"| {record['pipeline']} | {record['release']} | {name} | "
                f"{_format(attack['auc'])} | {_format(attack['balanced_accuracy'])} | "
                f"{_format(attack['tpr_at_fpr_0.001'], 4)} | "
                f"{_format(attack['tpr_at_fpr_0.01'], 4)} |"
            )
    return "\n".join(lines)


def fidelity_table(records: Sequence[Mapping]) -> str | None:
    """Build the table of each generator variant's fidelity proxy, or None if no record has one."""
    rows = [r for r in records if r.get("fidelity") and r["release"] == "synthetic_classifier"]
    if not rows:
        return None
    lines = [
        "| pipeline | generator | epsilon | synthetic-classifier accuracy | Frechet distance "
        "(proxy) | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in rows:
        scores = record["fidelity"]
        lines.append(
            f"| {record['pipeline']} | {record['generator']} | {_epsilon_cell(record)} | "
            f"{_format(record['test_accuracy'])} | "
            f"{_format(scores['frechet_distance_proxy'], 2)} | {_format(scores['precision'])} | "
            f"{_format(scores['recall'])} |"
        )
    return "\n".join(lines)


def ledger_lines(record: Mapping, releases: Sequence[str] | None = None) -> list[str]:
    """Build the Markdown lines of one private pipeline's ledger: the epsilons and every stage.

    Args:
      record: a metrics record of the pipeline, with its "ledger".
      releases: the releases that share this ledger; by default the record's own release.
    """
    ledger = record.get("ledger") or {}
    releases = releases or [record["release"]]
    lines = [
        f"- {record['pipeline']} ({', '.join(releases)}): epsilon "
        f"{_format(ledger.get('epsilon_pld'))} (PLD), {_format(ledger.get('epsilon_rdp'))} "
        f"(RDP) at delta {record['delta']:g}; ledger: `ledgers/{record['pipeline']}.json`"
    ]
    for stage in ledger.get("stages", []):
        parameters = ", ".join(
            f"{key} {_format(value, 4) if isinstance(value, float) else value}"
            for key, value in stage.get("parameters", {}).items()
        )
        lines.append(f"  - stage `{stage['name']}`: {parameters}")
        lines.append(f"    event: `{stage['event']}`")
    return lines


def write_report(
    workdir,
    *,
    config: Mapping,
    records: Sequence[Mapping],
    facts: Mapping,
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]] | None = None,
) -> Path:
    """Write `report.md` (and its ROC figures) into `workdir` and return its path.

    Args:
      config: the experiment configuration, as written to config.json.
      records: the metrics records, as written to metrics.json.
      facts: run facts to state (dataset, sizes, timings).
      curves: release label -> attack name -> (fpr, tpr), plotted one figure per release.
    """
    workdir = Path(workdir)
    sections = [
        "# ppds_jax experiment report",
        "",
        config.get("description") or "",
        "",
        "## Set-up",
        "",
        "\n".join(f"- {key}: {json.dumps(value)}" for key, value in facts.items()),
        "",
        "Membership: each pool example joins the target and each shadow pipeline with "
        f"probability {config.get('inclusion_prob')}. Attacks see only released artefacts and "
        "the shadow pipelines; test accuracy is measured on the real test split, which no "
        "choice in the pipeline reads.",
        "",
        "## Results",
        "",
        "Strongest attack per release, chosen by TPR at 0.1% FPR. TPR at a target FPR is the "
        "TPR of the last ROC point whose FPR does not exceed the target.",
        "",
        results_table(records),
        "",
        "The empirical epsilon lower bound is the largest bound over attacks and thresholds "
        "from Clopper-Pearson intervals on TPR and FPR; it is an estimate, because examples of "
        "one model are not independent trials. A release marked void passed through a filter "
        "that read private data, so no DP guarantee holds for it.",
        "",
        "## Every attack",
        "",
        attacks_table(records),
        "",
    ]
    private = [r for r in records if r["epsilon"] is not None]
    if private:
        sections += [
            "## Privacy ledgers",
            "",
            "Each private release's mechanism as dp-accounting composes it: every stage that "
            "touched the private data, with its DP-SGD or Gaussian-mechanism parameters.",
            "",
        ]
        # Releases of one pipeline usually share a ledger, which is then listed once. A privacy
        # filter adds a stage to the synthetic releases only, so their ledger is listed apart.
        by_ledger: dict[tuple[str, str], list[Mapping]] = {}
        for record in private:
            key = (record["pipeline"], json.dumps(record.get("ledger"), sort_keys=True))
            by_ledger.setdefault(key, []).append(record)
        for pipeline_records in by_ledger.values():
            releases = [record["release"] for record in pipeline_records]
            sections += ledger_lines(pipeline_records[0], releases)
        sections.append("")
    table = fidelity_table(records)
    if table:
        sections += [
            "## Fidelity (proxy, not FID)",
            "",
            "Squared Frechet distance, and k-NN precision and recall (k = 5), between each "
            "target synthetic set and up to 5,000 real test images, in the hidden layer of a "
            "small CNN trained on the real training pool. Inception weights cannot be "
            "downloaded here, so these figures rank generators within this report but are not "
            "comparable with FID values elsewhere.",
            "",
            table,
            "",
        ]
    if curves:
        sections += ["## ROC curves", ""]
        for label, attack_curves in curves.items():
            path = plots.roc_curves(
                attack_curves, path=workdir / f"roc_{label}.png", title=f"ROC: {label}"
            )
            sections.append(f"![ROC {label}]({path.name})")
        sections.append("")
    grids = sorted(workdir.glob("samples_*.png"))
    if grids:
        sections += ["## Synthetic samples", ""]
        sections += [f"![{path.stem}]({path.name})" for path in grids]
        sections.append("")
    path = workdir / "report.md"
    path.write_text("\n".join(sections))
    return path
