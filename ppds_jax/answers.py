"""The benchmark report: tables, sentences and figures that answer the benchmark's four questions.

1. Can synthetic data replace real data?
2. Which release strategy balances utility and privacy?
3. Do mitigations improve the trade-off?
4. Which generative models do best in which settings?

Each section has the table that answers its question, a sentence that states the answer as
measured (computed from the table's numbers by the functions below, never written by hand), and
a figure. Every number is a mean over seeds, with the sample standard deviation after "±" when
there are two or more seeds. Every private result carries the epsilon that the accountant
(PLD) computed for it, or the stage that voids its guarantee.

Terms:
- utility: test accuracy of the classifier the release gives. For the synthetic set and the
  generator, that is the classifier the pipeline trains on the synthetic set.
- attack TPR: TPR at 0.1% FPR of the strongest attack on the release, chosen per seed as the
  attack with the highest TPR at 0.1% FPR (ties broken by AUC). Choosing with the target's
  membership labels is the evaluator's worst case, not an attack an adversary could run.

`write_report` writes report.md and report.html from one list of blocks, so both hold the same
text, tables and figures. The module reads no files; the caller passes the cell results.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ppds_jax import checkpoint, plots
from ppds_jax.report import strongest_attack

FIGURES_FOLDER = "figures"
TPR_KEY = "tpr_at_fpr_0.001"
# A synthetic classifier "matches" the real one when its mean accuracy is at most this much
# lower than the real classifier's at the same epsilon.
MATCH_TOLERANCE = 0.02
# The balanced release of question 2 is the most accurate release whose attack TPR at 0.1% FPR
# is at most this, ten times the TPR of an attack that guesses.
ATTACK_TPR_LIMIT = 0.01
REAL = "real"
DEFAULT_SAMPLING = "balanced"
DEFAULT_MITIGATION = "none"
QUESTIONS = (
    "Can synthetic data replace real data?",
    "Which release strategy balances utility and privacy?",
    "Do mitigations improve the trade-off?",
    "Which generative models do best in which settings?",
)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """The data of one finished cell that the report reads.

    Attributes:
      metrics: the cell's metrics document: its axes ("name", "dataset", "seed", "generator",
        "epsilon" (None when non-private), "sampling", "mitigation"), "records" (one
        `evaluation.release_record` per release), "run_seconds" (one per mask) and, for a
        generator cell, "fidelity" (`fidelity.fidelity_proxy` of the target's synthetic set).
      roc: release -> (fpr, tpr) of the strongest attack on the release.
      figures: figure name ("samples", "roc_RELEASE") -> path relative to the report's folder.
    """

    metrics: Mapping[str, Any]
    roc: Mapping[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    figures: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    """One release of one cell (one seed)."""

    cell: str
    dataset: str
    seed: int
    generator: str
    epsilon: float
    sampling: str
    mitigation: str
    release: str
    accuracy: float
    attack: str | None
    tpr: float
    auc: float
    accounted_epsilon: float | None
    void_by: str | None
    epsilon_lower_bound: float | None


@dataclasses.dataclass(frozen=True)
class Setting:
    """The rows of one setting (all axes but the seed), summarised over seeds."""

    dataset: str
    generator: str
    epsilon: float
    sampling: str
    mitigation: str
    release: str
    seeds: tuple[int, ...]
    accuracy: tuple[float, float | None]
    tpr: tuple[float, float | None]
    attack: str
    accounted_epsilon: float | None
    void_by: str | None
    epsilon_lower_bound: float | None

    @property
    def is_private(self) -> bool:
        """True when the setting asked for a finite epsilon."""
        return math.isfinite(self.epsilon)


# --- from cell results to rows and settings ---------------------------------------------------


def cell_rows(result: CellResult) -> list[Row]:
    """Build one `Row` per release record of a cell."""
    cell = result.metrics
    rows = []
    for record in cell["records"]:
        name = strongest_attack(record)
        attack = record["mia"][name] if name else {}
        rows.append(
            Row(
                cell=cell["name"],
                dataset=cell["dataset"],
                seed=int(cell["seed"]),
                generator=cell["generator"] or REAL,
                epsilon=math.inf if cell["epsilon"] is None else float(cell["epsilon"]),
                sampling=cell["sampling"] or "-",
                mitigation=cell["mitigation"],
                release=record["release"],
                accuracy=float(record["test_accuracy"]),
                attack=name,
                tpr=float(attack.get(TPR_KEY, math.nan)),
                auc=float(attack.get("auc", math.nan)),
                accounted_epsilon=record.get("epsilon"),
                void_by=record.get("dp_guarantee_void_by"),
                epsilon_lower_bound=record.get("epsilon_lower_bound"),
            )
        )
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); the deviation is None for one value."""
    values = np.asarray(values, float)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def summarise(rows: Sequence[Row]) -> list[Setting]:
    """Group rows that differ only in their seed and summarise each group."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        key = (row.dataset, row.generator, row.epsilon, row.sampling, row.mitigation, row.release)
        groups.setdefault(key, []).append(row)
    settings = []
    for key, members in groups.items():
        members = sorted(members, key=lambda r: r.seed)
        attacks = Counter(r.attack for r in members if r.attack)
        epsilons = [r.accounted_epsilon for r in members if r.accounted_epsilon is not None]
        bounds = [r.epsilon_lower_bound for r in members if r.epsilon_lower_bound is not None]
        settings.append(
            Setting(
                *key,
                seeds=tuple(r.seed for r in members),
                accuracy=mean_std([r.accuracy for r in members]),
                tpr=mean_std([r.tpr for r in members]),
                attack=attacks.most_common(1)[0][0] if attacks else "-",
                accounted_epsilon=max(epsilons) if epsilons else None,
                void_by=next((r.void_by for r in members if r.void_by), None),
                epsilon_lower_bound=max(bounds) if bounds else None,
            )
        )
    return sorted(settings, key=_setting_order)


def _setting_order(setting: Setting):
    return (
        setting.dataset,
        setting.generator != REAL,
        setting.generator,
        setting.epsilon,
        setting.sampling,
        setting.mitigation,
        setting.release,
    )


# --- the four questions -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A synthetic classifier's setting next to the real classifier's at the same epsilon."""

    synthetic: Setting
    real: Setting | None

    @property
    def gap(self) -> float | None:
        """Synthetic minus real mean accuracy; None without a real baseline."""
        if self.real is None:
            return None
        return self.synthetic.accuracy[0] - self.real.accuracy[0]


def replacement_comparisons(settings: Sequence[Setting]) -> list[Comparison]:
    """Question 1: every synthetic classifier without mitigation, with its real baseline."""
    real = {
        (s.dataset, s.epsilon): s
        for s in settings
        if s.generator == REAL and s.mitigation == DEFAULT_MITIGATION
    }
    return [
        Comparison(s, real.get((s.dataset, s.epsilon)))
        for s in settings
        if s.release == "synthetic_classifier" and s.mitigation == DEFAULT_MITIGATION
    ]


def replacement_sentence(comparisons: Sequence[Comparison]) -> str:
    """Compose the sentence that answers question 1 from the comparisons."""
    paired = [c for c in comparisons if c.real is not None]
    if not paired:
        return (
            "No synthetic classifier has a real-data classifier at the same epsilon in this"
            " grid, so the question has no measured answer yet."
        )
    matches = [c for c in paired if c.gap >= -MATCH_TOLERANCE]
    best = max(paired, key=lambda c: c.gap)
    worst = min(paired, key=lambda c: c.gap)
    if len(matches) == len(paired):
        answer = "Yes"
    elif matches:
        answer = "Partly"
    else:
        answer = "No"
    text = (
        f"{answer}: the classifier trained on synthetic data reached at least the accuracy of"
        f" the classifier trained on real data at the same epsilon, less {MATCH_TOLERANCE:.2f},"
        f" in {len(matches)} of {len(paired)} settings"
    )
    if matches:
        text += " (" + "; ".join(_comparison_label(c) for c in matches) + ")"
    text += f". Best case: {_gap_phrase(best)}."
    if worst is not best:
        text += f" Worst case: {_gap_phrase(worst)}."
    unpaired = len(comparisons) - len(paired)
    if unpaired:
        text += f" {unpaired} synthetic settings have no real baseline at their epsilon."
    return text


def _gap_phrase(comparison: Comparison) -> str:
    return (
        f"{_comparison_label(comparison)}, synthetic {_number(comparison.synthetic.accuracy[0])}"
        f" against real {_number(comparison.real.accuracy[0])} (gap {_signed(comparison.gap)})"
    )


def _comparison_label(comparison: Comparison) -> str:
    s = comparison.synthetic
    label = f"{s.generator} at epsilon {_epsilon(s.epsilon)} on {s.dataset}"
    if s.sampling != DEFAULT_SAMPLING:
        label += f" with {s.sampling} sampling"
    return label


def pareto_front(settings: Sequence[Setting]) -> list[Setting]:
    """Settings that no other setting beats on both mean accuracy and mean attack TPR.

    A setting is dominated when another has accuracy >= and TPR <= with one strict.
    """
    front = []
    for s in settings:
        dominated = any(
            o.accuracy[0] >= s.accuracy[0]
            and o.tpr[0] <= s.tpr[0]
            and (o.accuracy[0] > s.accuracy[0] or o.tpr[0] < s.tpr[0])
            for o in settings
        )
        if not dominated:
            front.append(s)
    return sorted(front, key=lambda s: (s.tpr[0], -s.accuracy[0]))


def balance_sentence(dataset: str, settings: Sequence[Setting]) -> str:
    """Compose the sentence that answers question 2 on one dataset."""
    front = pareto_front(settings)
    text = (
        f"On {dataset}, {len(front)} of {len(settings)} releases lie on the Pareto front of"
        " accuracy against attack TPR at 0.1% FPR: "
        + "; ".join(
            f"{_setting_label(s)} (accuracy {_number(s.accuracy[0])}, TPR {_rate(s.tpr[0])})"
            for s in front
        )
        + "."
    )
    allowed = [s for s in settings if s.tpr[0] <= ATTACK_TPR_LIMIT]
    if allowed:
        best = max(allowed, key=lambda s: (s.accuracy[0], -s.tpr[0]))
        text += (
            f" Among releases whose attack TPR at 0.1% FPR is at most {_rate(ATTACK_TPR_LIMIT)},"
            f" the most accurate is {_setting_label(best)} (accuracy {_number(best.accuracy[0])},"
            f" TPR {_rate(best.tpr[0])}), which balances utility and privacy best by that rule."
        )
    else:
        text += (
            f" No release keeps the attack TPR at 0.1% FPR at or below {_rate(ATTACK_TPR_LIMIT)}."
        )
    return text


@dataclasses.dataclass(frozen=True)
class Change:
    """A mitigation or sampling strategy next to the same setting without it."""

    kind: str  # "mitigation" or "sampling"
    name: str
    baseline: Setting
    changed: Setting

    @property
    def accuracy_delta(self) -> float:
        """Change of mean accuracy (positive is better)."""
        return self.changed.accuracy[0] - self.baseline.accuracy[0]

    @property
    def tpr_delta(self) -> float:
        """Change of mean attack TPR at 0.1% FPR (negative is better)."""
        return self.changed.tpr[0] - self.baseline.tpr[0]

    @property
    def verdict(self) -> str:
        """ "improves", "worsens", "no change", or which of the two it trades for the other."""
        accuracy, tpr = self.accuracy_delta, self.tpr_delta
        if accuracy == 0 and tpr == 0:
            return "no change"
        if accuracy >= 0 and tpr <= 0:
            return "improves"
        if accuracy <= 0 and tpr >= 0:
            return "worsens"
        return "trades accuracy for privacy" if tpr < 0 else "trades privacy for accuracy"


def mitigation_changes(settings: Sequence[Setting]) -> list[Change]:
    """Question 3: every mitigation against no mitigation, every sampling strategy against
    the default one, for the same dataset, generator, epsilon and release."""
    index = {
        (s.dataset, s.generator, s.epsilon, s.sampling, s.mitigation, s.release): s
        for s in settings
    }
    changes = []
    for s in settings:
        if s.mitigation != DEFAULT_MITIGATION:
            key = (s.dataset, s.generator, s.epsilon, s.sampling, DEFAULT_MITIGATION, s.release)
            if key in index:
                changes.append(Change("mitigation", s.mitigation, index[key], s))
        elif s.sampling not in (DEFAULT_SAMPLING, "-"):
            key = (s.dataset, s.generator, s.epsilon, DEFAULT_SAMPLING, s.mitigation, s.release)
            if key in index:
                changes.append(Change("sampling", s.sampling, index[key], s))
    return changes


def mitigation_sentence(changes: Sequence[Change]) -> str:
    """Compose the sentence that answers question 3 from the changes."""
    if not changes:
        return (
            "The grid has no mitigation or sampling strategy next to its baseline, so the"
            " question has no measured answer yet."
        )
    counts = Counter(c.verdict for c in changes)
    improves = counts["improves"]
    if improves == len(changes):
        answer = "Yes"
    elif improves:
        answer = "Sometimes"
    else:
        answer = "No"
    text = (
        f"{answer}: {improves} of {len(changes)} comparisons improve the trade-off (accuracy"
        f" not lower and attack TPR at 0.1% FPR not higher, on the mean over seeds),"
        f" {counts['worsens']} worsen it, and"
        f" {counts['trades accuracy for privacy'] + counts['trades privacy for accuracy']}"
        " trade one for the other."
    )
    by_name: dict[tuple[str, str], list[Change]] = {}
    for change in changes:
        by_name.setdefault((change.kind, change.name), []).append(change)
    parts = []
    for (kind, name), group in by_name.items():
        improved = sum(c.verdict == "improves" for c in group)
        parts.append(
            f"{name} ({kind}) improves {improved} of {len(group)}, with mean changes of"
            f" {_signed(float(np.mean([c.accuracy_delta for c in group])))} accuracy and"
            f" {_signed(float(np.mean([c.tpr_delta for c in group])), 4)} TPR"
        )
    return text + " Per change: " + "; ".join(parts) + "."


def generator_ranking(settings: Sequence[Setting]) -> dict[tuple[str, float], list[dict]]:
    """Question 4: per (dataset, epsilon), generators ranked by synthetic classifier accuracy.

    Only the default sampling strategy without mitigation is ranked. Each entry contains the
    generator, its synthetic classifier setting and the highest mean attack TPR over its
    releases. Ties in accuracy go to the lower TPR.
    """
    base = [
        s
        for s in settings
        if s.generator != REAL
        and s.sampling == DEFAULT_SAMPLING
        and s.mitigation == DEFAULT_MITIGATION
    ]
    worst_tpr: dict[tuple, float] = {}
    for s in base:
        key = (s.dataset, s.epsilon, s.generator)
        worst_tpr[key] = max(worst_tpr.get(key, -math.inf), s.tpr[0])
    ranking: dict[tuple[str, float], list[dict]] = {}
    for s in base:
        if s.release == "synthetic_classifier":
            entry = {
                "generator": s.generator,
                "setting": s,
                "worst_tpr": worst_tpr[(s.dataset, s.epsilon, s.generator)],
            }
            ranking.setdefault((s.dataset, s.epsilon), []).append(entry)
    for entries in ranking.values():
        entries.sort(key=lambda e: (-e["setting"].accuracy[0], e["worst_tpr"]))
    return dict(sorted(ranking.items()))


def ranking_sentence(ranking: Mapping[tuple[str, float], list[dict]]) -> str:
    """Compose the sentence that answers question 4 from the ranking."""
    if not ranking:
        return "The grid has no synthetic classifier without mitigation, so nothing is ranked."
    parts = []
    wins = Counter()
    for (dataset, epsilon), entries in ranking.items():
        first = entries[0]
        wins[first["generator"]] += 1
        part = (
            f"on {dataset} at epsilon {_epsilon(epsilon)}, {first['generator']} ranks first"
            f" ({_number(first['setting'].accuracy[0])})"
        )
        if len(entries) > 1:
            second = entries[1]
            part += f" ahead of {second['generator']} ({_number(second['setting'].accuracy[0])})"
        parts.append(part)
    leader, count = wins.most_common(1)[0]
    text = "By synthetic classifier accuracy: " + "; ".join(parts) + "."
    return text + f" {leader} ranks first in {count} of {len(ranking)} settings."


# --- formatting -------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}"


def _rate(value: float) -> str:
    return f"{value:.4f}"


def _epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def format_mean_std(pair: tuple[float, float | None], digits: int = 3) -> str:
    """ "mean ± std", or "mean" when the deviation is None (one seed)."""
    mean, std = pair
    if std is None:
        return _number(mean, digits)
    return f"{_number(mean, digits)} ± {_number(std, digits)}"


def format_accounted(setting: Setting) -> str:
    """Format the accountant's epsilon of a setting: a number, "-" if non-private, or the void."""
    if setting.void_by is not None:
        return f"none ({setting.void_by})"
    if not setting.is_private:
        return "-"
    if setting.accounted_epsilon is None:
        return "inf"
    return f"{setting.accounted_epsilon:.2f}"


def _setting_label(s: Setting) -> str:
    label = s.release if s.generator == REAL else f"{s.release} of {s.generator}"
    label += f" at epsilon {_epsilon(s.epsilon)}"
    if s.sampling not in (DEFAULT_SAMPLING, "-"):
        label += f", {s.sampling} sampling"
    if s.mitigation != DEFAULT_MITIGATION:
        label += f", {s.mitigation}"
    return label


def _figure_epsilon(s: Setting) -> str:
    """Epsilon label for a figure: target and accountant's, or the void."""
    if s.void_by is not None:
        return f"eps {_epsilon(s.epsilon)} (void: {s.void_by})"
    if not s.is_private:
        return "eps inf"
    return f"eps {_epsilon(s.epsilon)} (accountant {format_accounted(s)})"


# --- the document -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclasses.dataclass(frozen=True)
class Paragraph:
    text: str


@dataclasses.dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Image:
    path: str
    caption: str


def to_markdown(blocks: Sequence) -> str:
    """Render the blocks as Markdown."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            lines.append(block.text)
        elif isinstance(block, Bullets):
            lines.extend(f"- {item}" for item in block.items)
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines.extend("| " + " | ".join(row) + " |" for row in block.rows)
        elif isinstance(block, Image):
            lines.append(f"![{block.caption}]({block.path})")
        lines.append("")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def to_html(blocks: Sequence, title: str) -> str:
    """Render the blocks as a self-contained static HTML page (figures linked by path)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_inline_html(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            header = "".join(f"<th>{_inline_html(cell)}</th>" for cell in block.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(cell)}</td>" for cell in row) + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Image):
            caption = _inline_html(block.caption)
            body.append(
                f'<figure><img src="{html.escape(block.path)}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:2px 6px;font-size:90%}"
        "img{max-width:100%}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --- the report -------------------------------------------------------------------------------


def write_report(
    out,
    *,
    grid: Mapping[str, Any],
    cells: Sequence[CellResult],
    missing: Sequence[str] = (),
) -> Path:
    """Write report.md, report.html and their figures into `out`.

    Args:
      out: the benchmark's output folder; figures go to `out/figures/`.
      grid: description of the grid: "name", "description", "axes", "blocks" (each with
        "num_cells"), "settings" (per dataset), "num_cells", "full_product", "samplings" and
        "mitigations" (name -> description).
      cells: results of the finished cells.
      missing: names of the grid's cells that are not finished.

    Returns:
      Path of report.md.
    """
    out = Path(out)
    (out / FIGURES_FOLDER).mkdir(parents=True, exist_ok=True)
    rows = [row for result in cells for row in cell_rows(result)]
    settings = summarise(rows)
    datasets = sorted({s.dataset for s in settings})
    blocks: list = [Heading(1, f"ppds_jax benchmark: {grid['name']}")]
    blocks += _setup_blocks(grid, cells, missing, rows)
    blocks += _replacement_blocks(out, settings, datasets)
    blocks += _balance_blocks(out, settings, datasets)
    blocks += _mitigation_blocks(out, settings, datasets)
    blocks += _ranking_blocks(out, settings, datasets)
    blocks += _fidelity_blocks(cells)
    blocks += _sample_blocks(cells, settings)
    blocks += _roc_blocks(out, cells, settings)
    blocks += _runtime_blocks(cells)
    path = checkpoint.write_text_atomically(out / "report.md", to_markdown(blocks))
    title = f"ppds_jax benchmark: {grid['name']}"
    checkpoint.write_text_atomically(out / "report.html", to_html(blocks, title))
    return path


def _setup_blocks(grid, cells, missing, rows) -> list:
    seeds = sorted({row.seed for row in rows})
    axes = grid["axes"]
    blocks = [
        Heading(2, "Set-up"),
        Paragraph(grid["description"]),
        Paragraph(
            f"This preset runs {grid['num_cells']} cells (pipeline variants per seed) that"
            f" evaluate {grid['num_evaluations']} releases, a subset of the"
            f" {grid['full_num_cells']} cells and {grid['full_num_evaluations']} release"
            " evaluations of the full product of the axis values below. Each block in the"
            " table is one product of axis values, and a cell evaluates only the releases that"
            f" its sampling strategy and mitigation can change. {len(cells)} cells are finished"
            f" and {len(missing)} are not. Results are means"
            f" over seeds {', '.join(map(str, seeds))} with the sample standard deviation after"
            " ±. Accuracy is on the real test split, which no choice in any pipeline reads."
        ),
        Bullets(tuple(f"{axis}: {', '.join(map(str, values))}" for axis, values in axes.items())),
        Table(
            (
                "question",
                "datasets",
                "generators",
                "epsilons",
                "samplings",
                "releases",
                "mitigations",
                "seeds",
                "cells",
            ),
            tuple(
                (
                    block["question"],
                    ", ".join(block["datasets"]),
                    ", ".join(block["generators"]) or "-",
                    ", ".join("inf" if e is None else f"{e:g}" for e in block["epsilons"]),
                    ", ".join(block["samplings"]),
                    ", ".join(block["releases"]),
                    ", ".join(block["mitigations"]),
                    ", ".join(map(str, block["seeds"])),
                    str(block["num_cells"]),
                )
                for block in grid["blocks"]
            ),
        ),
        Paragraph(
            "Settings per dataset (pool, shadow masks, delta, models); the expected member"
            " count is the public dataset size used for accounting."
        ),
        Table(
            ("dataset", "settings"),
            tuple(
                (name, "; ".join(f"{k}={v}" for k, v in sorted(values.items())))
                for name, values in grid["settings"].items()
            ),
        ),
        Paragraph(
            "Sampling strategies: "
            + "; ".join(f"{k}: {v}" for k, v in grid["samplings"].items())
            + ". Mitigations: "
            + "; ".join(f"{k}: {v}" for k, v in grid["mitigations"].items())
            + "."
        ),
        Paragraph(
            "Attack TPR is the TPR at 0.1% FPR of the strongest attack on each release, chosen"
            " per seed with the target's membership labels: the evaluator's worst case, not an"
            " attack an adversary could run. Utility of a synthetic set or generator release is"
            " the accuracy of the classifier the pipeline trains on the synthetic set. The"
            " accountant's epsilon is the PLD accountant's, at the dataset's delta."
        ),
    ]
    if missing:
        blocks.append(Paragraph("Cells not finished: " + ", ".join(missing) + "."))
    return blocks


def _replacement_blocks(out, settings, datasets) -> list:
    comparisons = replacement_comparisons(settings)
    rows = []
    for c in comparisons:
        s = c.synthetic
        rows.append(
            (
                s.dataset,
                _epsilon(s.epsilon),
                s.generator,
                s.sampling,
                format_mean_std(s.accuracy),
                "-" if c.real is None else format_mean_std(c.real.accuracy),
                "-" if c.gap is None else _signed(c.gap),
                format_accounted(s),
                "-" if c.real is None else format_accounted(c.real),
            )
        )
    blocks = [
        Heading(2, f"1. {QUESTIONS[0]}"),
        Paragraph("Answer: " + replacement_sentence(comparisons)),
        Table(
            (
                "dataset",
                "epsilon",
                "generator",
                "sampling",
                "synthetic accuracy",
                "real accuracy",
                "gap",
                "generator accountant epsilon",
                "real accountant epsilon",
            ),
            tuple(rows),
        ),
    ]
    for dataset in datasets:
        chosen = [c for c in comparisons if c.synthetic.dataset == dataset]
        if chosen:
            path = _accuracy_figure(out, dataset, chosen, settings)
            blocks.append(Image(path, f"Accuracy of synthetic and real classifiers on {dataset}"))
    return blocks


def _balance_blocks(out, settings, datasets) -> list:
    blocks = [Heading(2, f"2. {QUESTIONS[1]}")]
    sentences, rows = [], []
    for dataset in datasets:
        chosen = [s for s in settings if s.dataset == dataset and not math.isnan(s.tpr[0])]
        if not chosen:
            continue
        sentences.append(balance_sentence(dataset, chosen))
        front = pareto_front(chosen)
        for s in sorted(chosen, key=lambda s: (s.tpr[0], -s.accuracy[0])):
            rows.append(
                (
                    dataset,
                    s.release,
                    s.generator,
                    _epsilon(s.epsilon),
                    s.sampling,
                    s.mitigation,
                    format_mean_std(s.accuracy),
                    format_mean_std(s.tpr, 4),
                    s.attack,
                    format_accounted(s),
                    _number(s.epsilon_lower_bound, 2),
                    "yes" if s in front else "no",
                )
            )
    blocks.append(Paragraph("Answer: " + " ".join(sentences)))
    blocks.append(
        Table(
            (
                "dataset",
                "release",
                "generator",
                "epsilon",
                "sampling",
                "mitigation",
                "accuracy",
                "attack TPR@0.1%FPR",
                "strongest attack",
                "accountant epsilon",
                "empirical epsilon lower bound",
                "Pareto",
            ),
            tuple(rows),
        )
    )
    for dataset in datasets:
        chosen = [s for s in settings if s.dataset == dataset and not math.isnan(s.tpr[0])]
        if chosen:
            path = _tradeoff_figure(out, dataset, chosen)
            blocks.append(
                Image(path, f"Accuracy against attack TPR at 0.1% FPR on {dataset}, Pareto front")
            )
    return blocks


def _mitigation_blocks(out, settings, datasets) -> list:
    changes = mitigation_changes(settings)
    rows = tuple(
        (
            c.changed.dataset,
            c.changed.release,
            c.changed.generator,
            _epsilon(c.changed.epsilon),
            f"{c.kind}: {c.name}",
            format_mean_std(c.baseline.accuracy),
            format_mean_std(c.changed.accuracy),
            format_mean_std(c.baseline.tpr, 4),
            format_mean_std(c.changed.tpr, 4),
            _signed(c.accuracy_delta),
            _signed(c.tpr_delta, 4),
            format_accounted(c.changed),
            c.verdict,
        )
        for c in changes
    )
    blocks = [
        Heading(2, f"3. {QUESTIONS[2]}"),
        Paragraph("Answer: " + mitigation_sentence(changes)),
        Table(
            (
                "dataset",
                "release",
                "generator",
                "epsilon",
                "change",
                "accuracy before",
                "accuracy after",
                "TPR before",
                "TPR after",
                "accuracy change",
                "TPR change",
                "accountant epsilon after",
                "verdict",
            ),
            rows,
        ),
    ]
    for dataset in datasets:
        chosen = [c for c in changes if c.changed.dataset == dataset]
        if chosen:
            path = _change_figure(out, dataset, chosen)
            blocks.append(Image(path, f"Effect of each mitigation on {dataset}"))
    return blocks


def _ranking_blocks(out, settings, datasets) -> list:
    ranking = generator_ranking(settings)
    rows = []
    for (dataset, epsilon), entries in ranking.items():
        for rank, entry in enumerate(entries, start=1):
            s = entry["setting"]
            rows.append(
                (
                    dataset,
                    _epsilon(epsilon),
                    str(rank),
                    entry["generator"],
                    format_mean_std(s.accuracy),
                    _rate(entry["worst_tpr"]),
                    format_accounted(s),
                )
            )
    blocks = [
        Heading(2, f"4. {QUESTIONS[3]}"),
        Paragraph("Answer: " + ranking_sentence(ranking)),
        Table(
            (
                "dataset",
                "epsilon",
                "rank",
                "generator",
                "synthetic accuracy",
                "highest attack TPR@0.1%FPR over its releases",
                "accountant epsilon",
            ),
            tuple(rows),
        ),
    ]
    for dataset in datasets:
        entries = {k: v for k, v in ranking.items() if k[0] == dataset}
        if entries:
            path = _ranking_figure(out, dataset, entries)
            blocks.append(Image(path, f"Synthetic classifier accuracy per generator on {dataset}"))
    return blocks


def _first_seed_results(cells: Sequence[CellResult]) -> list[CellResult]:
    """Cells of the smallest seed of each dataset, default sampling and no mitigation."""
    first_seed: dict[str, int] = {}
    for result in cells:
        dataset, seed = result.metrics["dataset"], int(result.metrics["seed"])
        first_seed[dataset] = min(first_seed.get(dataset, seed), seed)
    return [
        r
        for r in cells
        if int(r.metrics["seed"]) == first_seed[r.metrics["dataset"]]
        and r.metrics["mitigation"] == DEFAULT_MITIGATION
        and (r.metrics["sampling"] or DEFAULT_SAMPLING) == DEFAULT_SAMPLING
    ]


def _setting_of(settings, result: CellResult, release: str) -> Setting | None:
    m = result.metrics
    epsilon = math.inf if m["epsilon"] is None else float(m["epsilon"])
    for s in settings:
        if (
            s.dataset == m["dataset"]
            and s.generator == (m["generator"] or REAL)
            and s.epsilon == epsilon
            and s.sampling == (m["sampling"] or "-")
            and s.mitigation == m["mitigation"]
            and s.release == release
        ):
            return s
    return None


def _fidelity_blocks(cells) -> list:
    # Cells with a classifier-only mitigation share the synthetic set of their "none" cell
    # and evaluate no "synthetic_data" release, so each distinct set is listed once.
    groups: dict[tuple, list[tuple[float, ...]]] = {}
    for result in cells:
        m = result.metrics
        records = {r["release"]: r for r in m["records"]}
        scores = m.get("fidelity")
        if not scores or "synthetic_data" not in records:
            continue
        key = (
            m["dataset"],
            m["generator"],
            math.inf if m["epsilon"] is None else float(m["epsilon"]),
            m["sampling"] or DEFAULT_SAMPLING,
            m["mitigation"],
        )
        groups.setdefault(key, []).append(
            (
                float(records["synthetic_data"]["test_accuracy"]),
                scores["frechet_distance_proxy"],
                scores["precision"],
                scores["recall"],
            )
        )
    if not groups:
        return []
    rows = []
    for (dataset, generator, epsilon, sampling, mitigation), values in sorted(groups.items()):
        columns = [mean_std([v[i] for v in values]) for i in range(4)]
        rows.append(
            (
                dataset,
                generator,
                _epsilon(epsilon),
                sampling,
                mitigation,
                str(len(values)),
                format_mean_std(columns[0]),
                format_mean_std(columns[1], 2),
                format_mean_std(columns[2]),
                format_mean_std(columns[3]),
            )
        )
    return [
        Heading(2, "Fidelity of the synthetic sets (proxy, not FID)"),
        Paragraph(
            "FID needs Inception weights, which this benchmark cannot download. The proxy is"
            " the squared Frechet distance between the target's synthetic set and real test"
            " images in the feature space of a classifier trained on the seed's pool of real"
            " training images (never the test split), with k-nearest-neighbour precision and"
            " recall (k = 5) in the same space. Its values are comparable within a dataset"
            " and seed, not with published FIDs. Lower distance and higher precision and recall"
            " are better."
        ),
        Table(
            (
                "dataset",
                "generator",
                "epsilon",
                "sampling",
                "mitigation",
                "seeds",
                "synthetic-classifier accuracy",
                "Frechet distance (proxy)",
                "precision",
                "recall",
            ),
            tuple(rows),
        ),
    ]


def _sample_blocks(cells, settings) -> list:
    blocks = [Heading(2, "Synthetic samples per generator")]
    images = []
    for result in _first_seed_results(cells):
        path = result.figures.get("samples")
        if path is None:
            continue
        m = result.metrics
        setting = _setting_of(settings, result, "synthetic_data") or _setting_of(
            settings, result, "synthetic_classifier"
        )
        label = _figure_epsilon(setting) if setting else ""
        images.append(Image(path, f"{m['generator']} on {m['dataset']}, {label}, seed {m['seed']}"))
    if not images:
        return []
    return blocks + images


def _roc_blocks(out, cells, settings) -> list:
    curves: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for result in _first_seed_results(cells):
        m = result.metrics
        for release, (fpr, tpr) in result.roc.items():
            setting = _setting_of(settings, result, release)
            attack = next(
                (strongest_attack(r) for r in m["records"] if r["release"] == release), None
            )
            label = f"{m['generator'] or REAL}, {_figure_epsilon(setting)}, {attack}"
            curves.setdefault((m["dataset"], release), {})[label] = (fpr, tpr)
    if not curves:
        return []
    blocks = [
        Heading(2, "ROC curves per release"),
        Paragraph(
            "Strongest attack on each release of the first seed, default sampling, no"
            " mitigation; log-log axes show the low-FPR regime."
        ),
    ]
    for (dataset, release), release_curves in sorted(curves.items()):
        path = out / FIGURES_FOLDER / f"roc_{dataset}_{release}.png"
        plots.roc_curves(release_curves, path=path, title=f"{dataset}: {release}")
        blocks.append(Image(_relative(out, path), f"ROC curves of {release} on {dataset}"))
    return blocks


def _runtime_blocks(cells) -> list:
    if not cells:
        return []
    # (wall, cpu, reused a stage) per run, per (dataset, generator, epsilon).
    groups: dict[tuple, list[tuple[float, float, bool]]] = {}
    for result in cells:
        m = result.metrics
        epsilon = "inf" if m["epsilon"] is None else f"{m['epsilon']:g}"
        wall = m.get("run_seconds", [])
        cpu = m.get("run_cpu_seconds") or [math.nan] * len(wall)
        reused = m.get("run_reused_stages") or [[]] * len(wall)
        runs = [(w, c, bool(r)) for w, c, r in zip(wall, cpu, reused, strict=True)]
        groups.setdefault((m["dataset"], m["generator"] or REAL, epsilon), []).extend(runs)
    wall = sum(w for runs in groups.values() for w, _, _ in runs)
    cpu = sum(c for runs in groups.values() for _, c, _ in runs)

    def median(values) -> str:
        return f"{np.median(values):.1f}" if values else "-"

    rows = []
    for (dataset, generator, epsilon), runs in sorted(groups.items()):
        whole = [(w, c) for w, c, reused in runs if not reused]
        reusing = [w for w, _, reused in runs if reused]
        rows.append(
            (
                dataset,
                generator,
                epsilon,
                str(len(whole)),
                median([w for w, _ in whole]),
                median([c for _, c in whole]),
                str(len(reusing)),
                median(reusing),
            )
        )
    return [
        Heading(2, "Runtime"),
        Paragraph(
            f"Pipeline runs took {wall / 60:.1f} minutes of wall time and {cpu / 60:.1f} minutes"
            " of CPU time (all threads of the process) in all. Each run trains its models,"
            " samples, and records the attack signals; the first run of each kind in a process"
            " also compiles its programs. A run whose trained generator or synthetic set"
            " equals that of an earlier run of the same process (same members, key and"
            " options; cells that differ only in a classifier-stage option) reuses it, so its"
            " time excludes that stage; such runs are counted apart."
        ),
        Table(
            (
                "dataset",
                "generator",
                "epsilon",
                "runs computing every stage",
                "median wall seconds per run",
                "median CPU seconds per run",
                "runs reusing a stage",
                "median wall seconds per reusing run",
            ),
            tuple(rows),
        ),
    ]


# --- figures ----------------------------------------------------------------------------------


def _relative(out: Path, path: Path) -> str:
    return Path(path).relative_to(out).as_posix()


def _epsilon_order(values) -> list[float]:
    return sorted(set(values))


def _accuracy_figure(out, dataset, comparisons, settings) -> str:
    import matplotlib.pyplot as plt

    epsilons = _epsilon_order(c.synthetic.epsilon for c in comparisons)
    series: dict[str, dict[float, Setting]] = {}
    for c in comparisons:
        label = c.synthetic.generator
        if c.synthetic.sampling != DEFAULT_SAMPLING:
            label += f" ({c.synthetic.sampling})"
        series.setdefault(label, {})[c.synthetic.epsilon] = c.synthetic
        if c.real is not None:
            series.setdefault(REAL, {})[c.real.epsilon] = c.real
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(epsilons) * len(series) / 2), 4.2))
    width = 0.8 / max(1, len(series))
    for index, (label, points) in enumerate(sorted(series.items(), key=lambda kv: kv[0] != REAL)):
        for position, epsilon in enumerate(epsilons):
            s = points.get(epsilon)
            if s is None:
                continue
            x = position + (index - (len(series) - 1) / 2) * width
            axis.bar(
                x,
                s.accuracy[0],
                width,
                yerr=s.accuracy[1] or 0,
                capsize=2,
                color=f"C{index}",
                label=label if position == _first(points, epsilons) else None,
            )
            if s.is_private:
                axis.annotate(
                    format_accounted(s),
                    (x, s.accuracy[0]),
                    fontsize=6,
                    ha="center",
                    va="bottom",
                    rotation=90,
                    xytext=(0, 3),
                    textcoords="offset points",
                )
    axis.set_xticks(range(len(epsilons)), [f"eps {_epsilon(e)}" for e in epsilons])
    axis.set(
        ylabel="test accuracy",
        ylim=(0, 1.1),
        title=f"{dataset}: synthetic vs real classifiers (labels: accountant epsilon)",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(out, figure, f"accuracy_{dataset}.png")


def _first(points, epsilons) -> int:
    return min(i for i, e in enumerate(epsilons) if e in points)


def _tradeoff_figure(out, dataset, settings) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    releases = sorted({s.release for s in settings})
    for index, release in enumerate(releases):
        chosen = [s for s in settings if s.release == release]
        axis.errorbar(
            [s.tpr[0] for s in chosen],
            [s.accuracy[0] for s in chosen],
            xerr=[s.tpr[1] or 0 for s in chosen],
            yerr=[s.accuracy[1] or 0 for s in chosen],
            fmt="o",
            markersize=4,
            capsize=2,
            color=f"C{index}",
            label=release,
        )
        for s in chosen:
            axis.annotate(
                f"{s.generator} {_figure_epsilon(s)}",
                (s.tpr[0], s.accuracy[0]),
                fontsize=5,
                xytext=(3, 3),
                textcoords="offset points",
            )
    front = pareto_front(settings)
    axis.step(
        [s.tpr[0] for s in front],
        [s.accuracy[0] for s in front],
        where="post",
        color="k",
        linewidth=1,
        label="Pareto front",
    )
    axis.axvline(
        ATTACK_TPR_LIMIT,
        color="gray",
        linestyle=":",
        linewidth=1,
        label=f"TPR limit {_rate(ATTACK_TPR_LIMIT)}",
    )
    axis.set(
        xlabel="attack TPR at 0.1% FPR (lower is more private)",
        ylabel="test accuracy",
        title=f"{dataset}: utility against membership inference",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(out, figure, f"tradeoff_{dataset}.png")


def _change_figure(out, dataset, changes) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    names = sorted({f"{c.kind}: {c.name}" for c in changes})
    for c in changes:
        color = f"C{names.index(f'{c.kind}: {c.name}')}"
        axis.annotate(
            "",
            xy=(c.changed.tpr[0], c.changed.accuracy[0]),
            xytext=(c.baseline.tpr[0], c.baseline.accuracy[0]),
            arrowprops={"arrowstyle": "->", "color": color},
        )
        axis.plot([c.baseline.tpr[0]], [c.baseline.accuracy[0]], "o", color="gray", markersize=3)
        axis.annotate(
            f"{c.changed.generator} {c.changed.release} {_figure_epsilon(c.changed)}",
            (c.changed.tpr[0], c.changed.accuracy[0]),
            fontsize=5,
            xytext=(3, -6),
            textcoords="offset points",
        )
    for index, name in enumerate(names):
        axis.plot([], [], color=f"C{index}", label=name)
    axis.set(
        xlabel="attack TPR at 0.1% FPR",
        ylabel="test accuracy",
        title=f"{dataset}: each arrow goes from the baseline to the changed setting",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(out, figure, f"mitigations_{dataset}.png")


def _ranking_figure(out, dataset, ranking) -> str:
    import matplotlib.pyplot as plt

    epsilons = _epsilon_order(epsilon for _, epsilon in ranking)
    generators = sorted({e["generator"] for entries in ranking.values() for e in entries})
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for index, generator in enumerate(generators):
        xs, ys, errors, labels = [], [], [], []
        for position, epsilon in enumerate(epsilons):
            entry = next(
                (e for e in ranking.get((dataset, epsilon), []) if e["generator"] == generator),
                None,
            )
            if entry is not None:
                s = entry["setting"]
                xs.append(position)
                ys.append(s.accuracy[0])
                errors.append(s.accuracy[1] or 0)
                labels.append(format_accounted(s))
        axis.errorbar(
            xs, ys, yerr=errors, marker="o", capsize=2, color=f"C{index}", label=generator
        )
        for x, y, label in zip(xs, ys, labels, strict=True):
            if label != "-":
                axis.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axis.set_xticks(range(len(epsilons)), [f"eps {_epsilon(e)}" for e in epsilons])
    axis.set(
        ylabel="synthetic classifier accuracy",
        ylim=(0, 1.05),
        title=f"{dataset}: generators per privacy level (labels: accountant epsilon)",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(out, figure, f"generators_{dataset}.png")


def _save(out: Path, figure, name: str) -> str:
    import matplotlib.pyplot as plt

    path = Path(out) / FIGURES_FOLDER / name
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return _relative(out, path)
