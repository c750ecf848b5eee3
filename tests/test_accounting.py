"""Tests of accounting against an independent RDP bound, calibration and the ledger."""

import json
import math

import dp_accounting
import numpy as np
import pytest
from scipy.special import logsumexp

from ppds_jax import accounting


def _dp_sgd_event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def _independent_rdp_epsilon(q, sigma, steps, delta):
    """Epsilon of DP-SGD from the integer-order RDP of the Poisson-subsampled Gaussian.

    For integer alpha >= 2 the RDP of one step is log(A_alpha) / (alpha - 1), with
    A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))
    (Mironov, Talwar and Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
    Mechanism", arXiv:1908.10530). RDP adds up over steps. The conversion to (epsilon, delta)
    is the one in dp-accounting 0.6's `rdp_privacy_accountant.compute_epsilon`:
    epsilon = rdp + log(1 - 1 / alpha) - log(delta * alpha) / (alpha - 1), minimised over alpha.
    """
    best = math.inf
    for alpha in list(range(2, 257)) + [512, 1024]:
        k = np.arange(alpha + 1)
        log_binomial = np.array(
            [math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1) for i in k]
        )
        log_terms = (
            log_binomial
            + (alpha - k) * math.log1p(-q)
            + k * math.log(q)
            + (k * k - k) / (2 * sigma**2)
        )
        rdp = steps * logsumexp(log_terms) / (alpha - 1)
        epsilon = rdp + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)
        best = min(best, epsilon)
    return best


SETTINGS = [
    # (sampling_prob, noise_multiplier, num_steps, target_delta)
    (0.01, 1.0, 1000, 1e-5),
    (0.1, 2.0, 100, 1e-5),
    (0.004, 1.1, 10_000, 1e-6),
    (0.05, 0.8, 200, 1e-5),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), SETTINGS)
def test_rdp_epsilon_matches_independent_bound(q, sigma, steps, delta):
    event = _dp_sgd_event(q, sigma, steps)
    epsilon = accounting.compute_epsilon(event, target_delta=delta, accountant="rdp")
    expected = _independent_rdp_epsilon(q, sigma, steps, delta)
    assert epsilon == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), SETTINGS[:2])
def test_pld_epsilon_at_most_rdp(q, sigma, steps, delta):
    event = _dp_sgd_event(q, sigma, steps)
    pld = accounting.compute_epsilon(event, target_delta=delta, accountant="pld")
    rdp = accounting.compute_epsilon(event, target_delta=delta, accountant="rdp")
    assert 0 < pld <= rdp


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_zero_noise_gives_infinite_epsilon(accountant):
    event = _dp_sgd_event(0.1, 0.0, 10)
    assert accounting.compute_epsilon(event, target_delta=1e-5, accountant=accountant) == math.inf


@pytest.mark.parametrize(
    ("accountant", "target_epsilon", "steps"),
    [("rdp", 1.0, 500), ("rdp", 4.0, 500), ("pld", 2.0, 20)],
)
def test_calibration_meets_target_within_one_percent(accountant, target_epsilon, steps):
    q, delta = 0.05, 1e-5

    def make_event(sigma):
        return _dp_sgd_event(q, sigma, steps)

    sigma = accounting.calibrate_noise_multiplier(
        make_event, target_epsilon=target_epsilon, target_delta=delta, accountant=accountant
    )
    epsilon = accounting.compute_epsilon(
        make_event(sigma), target_delta=delta, accountant=accountant
    )
    assert epsilon <= target_epsilon
    assert epsilon >= 0.99 * target_epsilon


def test_unreachable_epsilon_raises_with_figures():
    def make_event(sigma):
        return _dp_sgd_event(1.0, sigma, 1000)

    with pytest.raises(ValueError, match=r"target_epsilon=0\.01 is unreachable.*epsilon="):
        accounting.calibrate_noise_multiplier(
            make_event,
            target_epsilon=0.01,
            target_delta=1e-5,
            accountant="rdp",
            max_noise_multiplier=10.0,
        )


@pytest.mark.parametrize("target_epsilon", [0.0, -1.0])
def test_nonpositive_epsilon_raises(target_epsilon):
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate_noise_multiplier(
            lambda sigma: _dp_sgd_event(0.1, sigma, 10),
            target_epsilon=target_epsilon,
            target_delta=1e-5,
        )


def test_unknown_accountant_raises():
    with pytest.raises(ValueError, match="'prv' is unknown"):
        accounting.compute_epsilon(_dp_sgd_event(0.1, 1.0, 10), target_delta=1e-5, accountant="prv")


def test_check_delta_bounds():
    accounting.check_delta(1e-5, 10_000)
    with pytest.raises(ValueError, match="target_delta=2e-05"):
        accounting.check_delta(2e-5, 10_000)
    with pytest.raises(ValueError, match="target_delta=0"):
        accounting.check_delta(0, 10_000)
    with pytest.raises(ValueError, match="dataset_size=0"):
        accounting.check_delta(1e-5, 0)


def test_ledger_composes_its_stages():
    histogram = dp_accounting.GaussianDpEvent(20.0)
    training = _dp_sgd_event(0.01, 1.0, 300)
    ledger = accounting.PrivacyLedger()
    ledger.add_stage("histogram", histogram, {"noise_multiplier": 20.0})
    ledger.add_stage("dp_sgd", training, {"sampling_prob": 0.01, "num_steps": 300})

    assert [stage.name for stage in ledger.stages] == ["histogram", "dp_sgd"]
    composed = dp_accounting.ComposedDpEvent([histogram, training])
    for accountant in ("rdp", "pld"):
        expected = accounting.compute_epsilon(composed, target_delta=1e-5, accountant=accountant)
        assert ledger.epsilon(1e-5, accountant) == pytest.approx(expected, rel=1e-9)
    only_training = accounting.compute_epsilon(training, target_delta=1e-5, accountant="pld")
    assert ledger.epsilon(1e-5, "pld") > only_training


def test_ledger_to_dict_is_strict_json():
    ledger = accounting.PrivacyLedger()
    ledger.add_stage("dp_sgd", _dp_sgd_event(0.01, 1.0, 100), {"l2_norm_clip": 1.0})
    summary = json.loads(json.dumps(ledger.to_dict(1e-5), allow_nan=False))

    assert summary["target_delta"] == 1e-5
    assert 0 < summary["epsilon_pld"] <= summary["epsilon_rdp"]
    assert summary["stages"][0]["name"] == "dp_sgd"
    assert summary["stages"][0]["parameters"] == {"l2_norm_clip": 1.0}
    assert "PoissonSampledDpEvent" in summary["stages"][0]["event"]


def test_ledger_without_noise_reports_no_epsilon():
    ledger = accounting.PrivacyLedger()
    ledger.add_stage("dp_sgd", _dp_sgd_event(0.01, 0.0, 10))
    summary = ledger.to_dict(1e-5)
    assert summary["epsilon_rdp"] is None
    assert summary["epsilon_pld"] is None


def test_empty_ledger_has_zero_epsilon():
    assert accounting.PrivacyLedger().epsilon(1e-5, "rdp") == 0


def test_ledger_rejects_bad_stages():
    ledger = accounting.PrivacyLedger()
    ledger.add_stage("dp_sgd", _dp_sgd_event(0.01, 1.0, 10))
    with pytest.raises(ValueError, match="already in the ledger"):
        ledger.add_stage("dp_sgd", _dp_sgd_event(0.01, 1.0, 10))
    with pytest.raises(ValueError, match="non-empty"):
        ledger.add_stage("", _dp_sgd_event(0.01, 1.0, 10))
    with pytest.raises(ValueError, match="JSON"):
        ledger.add_stage("other", _dp_sgd_event(0.01, 1.0, 10), {"array": np.zeros(2)})
    with pytest.raises(TypeError, match="DpEvent"):
        ledger.add_stage("other", "not an event")
