"""Tests of the single-experiment Markdown report: ledgers and fidelity sections."""

import copy

from ppds_jax import report

ATTACK = {"auc": 0.5, "balanced_accuracy": 0.5, "tpr_at_fpr_0.001": 0.001, "tpr_at_fpr_0.01": 0.01}
LEDGER = {
    "target_delta": 1e-5,
    "epsilon_pld": 9.99,
    "epsilon_rdp": 11.5,
    "stages": [
        {
            "name": "vae_dp_sgd",
            "event": "SelfComposedDpEvent(count=10)",
            "parameters": {"noise_multiplier": 0.631, "num_steps": 10},
        }
    ],
}


def _record(release, ledger=LEDGER, fidelity=None):
    record = {
        "pipeline": "vae_eps10",
        "release": release,
        "generator": "vae",
        "epsilon": 9.99,
        "delta": 1e-5,
        "test_accuracy": 0.25,
        "mia": {"loss_threshold": ATTACK},
        "ledger": ledger,
    }
    if fidelity is not None:
        record["fidelity"] = fidelity
    return record


def _ledger_section(text):
    return text[text.index("## Privacy ledgers") : text.index("## Fidelity")]


def test_shared_ledger_listed_once_with_its_releases(tmp_path):
    fidelity = {"frechet_distance_proxy": 12.345, "precision": 0.5, "recall": 0.25}
    records = [
        _record("synthetic_classifier", fidelity=fidelity),
        _record("synthetic_data"),
        _record("generator"),
    ]
    text = report.write_report(tmp_path, config={}, records=records, facts={}).read_text()
    section = _ledger_section(text)
    assert section.count("- vae_eps10 (") == 1
    assert "- vae_eps10 (synthetic_classifier, synthetic_data, generator): epsilon 9.990" in section
    assert "  - stage `vae_dp_sgd`: noise_multiplier 0.6310, num_steps 10" in section
    assert "    event: `SelfComposedDpEvent(count=10)`" in section
    assert "| vae_eps10 | vae | 9.99 | 0.250 | 12.35 | 0.500 | 0.250 |" in text


def test_filtered_synthetic_ledger_listed_apart(tmp_path):
    filtered = copy.deepcopy(LEDGER)
    filtered["stages"].append({"name": "privacy_filter", "event": "NonPrivate", "parameters": {}})
    records = [
        _record(
            "synthetic_classifier",
            ledger=filtered,
            fidelity={"frechet_distance_proxy": 1.0, "precision": 1.0, "recall": 1.0},
        ),
        _record("synthetic_data", ledger=filtered),
        _record("generator"),
    ]
    section = _ledger_section(
        report.write_report(tmp_path, config={}, records=records, facts={}).read_text()
    )
    assert "- vae_eps10 (synthetic_classifier, synthetic_data): epsilon" in section
    assert "- vae_eps10 (generator): epsilon" in section
    assert section.count("  - stage `privacy_filter`: ") == 1
