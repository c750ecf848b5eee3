"""Privacy accounting with dp-accounting, and the ledger every DP release carries.

Everything here runs on the host in float64 Python; nothing is traced by jit. Two accountants
are offered under one name each:

| name | class | bound |
|---|---|---|
| "rdp" | `dp_accounting.rdp.RdpAccountant` | Renyi DP, converted to (epsilon, delta); looser |
| "pld" | `dp_accounting.pld.PLDAccountant` | numerical privacy loss distribution; tight |

Both use the add-or-remove-one neighbouring relation, which matches DP-SGD with Poisson sampling
and a clipped sum of sensitivity `l2_norm_clip`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp
from scipy import optimize

ACCOUNTANTS: dict[str, Callable[[], dp_accounting.PrivacyAccountant]] = {
    "rdp": rdp.RdpAccountant,
    "pld": pld.PLDAccountant,
}

# Noise multipliers searched by `calibrate_noise_multiplier` unless the caller widens the range.
MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1000.0


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"{accountant=} is unknown; expected one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[accountant]()


def _check_delta_range(target_delta: float) -> None:
    if not 0 < target_delta < 1:
        raise ValueError(f"{target_delta=} must be in (0, 1)")


def check_delta(target_delta: float, dataset_size: int) -> None:
    """Reject a delta too large for the dataset.

    A delta of about 1 / dataset_size allows releasing one example in the clear, so the
    project requires `0 < target_delta <= 0.1 / dataset_size`.

    Raises:
      ValueError: `dataset_size < 1` or `target_delta` outside (0, 0.1 / dataset_size].
    """
    if dataset_size < 1:
        raise ValueError(f"{dataset_size=} must be >= 1")
    limit = 0.1 / dataset_size
    if not 0 < target_delta <= limit:
        raise ValueError(
            f"{target_delta=} must be in (0, 0.1 / dataset_size] = (0, {limit:.3g}] "
            f"for {dataset_size=}"
        )


def compute_epsilon(
    event: dp_accounting.DpEvent, *, target_delta: float, accountant: str = "pld"
) -> float:
    """Epsilon of `event` at `target_delta`.

    Args:
      event: the whole mechanism, for example `dp_sgd.dp_sgd_event(config)`.
      target_delta: delta in (0, 1).
      accountant: "pld" (tight) or "rdp" (looser upper bound).

    Returns:
      epsilon >= 0; `math.inf` for a mechanism without noise (noise multiplier 0).

    Raises:
      ValueError: unknown accountant, delta outside (0, 1), or an event the accountant does not
        support.
    """
    _check_delta_range(target_delta)
    # A PLD composition takes seconds, and an experiment computes the same event many times
    # (every shadow pipeline, every ledger summary). The text form of an event names its type
    # and every parameter, so it identifies the mechanism.
    cache_key = (repr(event), float(target_delta), accountant)
    if cache_key in _EPSILON_CACHE:
        return _EPSILON_CACHE[cache_key]
    acct = _make_accountant(accountant)
    if not acct.supports(event):
        raise ValueError(f"accountant {accountant!r} does not support the event {event}")
    epsilon = float(acct.compose(event).get_epsilon(target_delta))
    if len(_EPSILON_CACHE) >= _EPSILON_CACHE_SIZE:
        _EPSILON_CACHE.pop(next(iter(_EPSILON_CACHE)))
    _EPSILON_CACHE[cache_key] = epsilon
    return epsilon


_EPSILON_CACHE: dict[tuple[str, float, str], float] = {}
_EPSILON_CACHE_SIZE = 4096


def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_accounting.DpEvent],
    *,
    target_epsilon: float,
    target_delta: float,
    accountant: str = "pld",
    min_noise_multiplier: float = MIN_NOISE_MULTIPLIER,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier in a range whose epsilon does not exceed the target.

    Wraps `dp_accounting.calibrate_dp_mechanism`. The search interval is narrowed first with
    the RDP accountant, which is fast and never below the PLD epsilon in practice, so the PLD
    accountant (about a second per evaluation for hundreds of steps) runs only a few times.
    The result's epsilon is <= target_epsilon; its noise multiplier is within 0.1% of the
    one that meets the target exactly, unless the search interval's lower end already meets it.

    Args:
      make_event: `noise_multiplier -> DpEvent`, epsilon decreasing in the noise multiplier.
      target_epsilon: > 0.
      target_delta: in (0, 1).
      accountant: "pld" or "rdp".
      min_noise_multiplier, max_noise_multiplier: the search interval, 0 < min < max < inf.

    Returns:
      The noise multiplier, a float in [min_noise_multiplier, max_noise_multiplier]. If even
      `min_noise_multiplier` meets the target, that value is returned (its epsilon may then
      be well below the target).

    Raises:
      ValueError: target_epsilon <= 0, a bad interval, or a target that the largest noise
        multiplier searched does not reach; the message names the epsilon reached there.
    """
    if not target_epsilon > 0:
        raise ValueError(f"{target_epsilon=} must be > 0")
    _check_delta_range(target_delta)
    _make_accountant(accountant)
    if not 0 < min_noise_multiplier < max_noise_multiplier < math.inf:
        raise ValueError(f"need 0 < {min_noise_multiplier=} < {max_noise_multiplier=} < inf")

    def gap(noise_multiplier: float, name: str) -> float:
        epsilon = compute_epsilon(
            make_event(noise_multiplier), target_delta=target_delta, accountant=name
        )
        return epsilon - target_epsilon

    gap_at_max = gap(max_noise_multiplier, accountant)
    if gap_at_max > 0:
        raise ValueError(
            f"{target_epsilon=} is unreachable at {target_delta=} with accountant "
            f"{accountant!r}: the largest noise multiplier searched, {max_noise_multiplier}, "
            f"still gives epsilon={gap_at_max + target_epsilon:.4g}; sample fewer examples per "
            "step, run fewer steps, or raise max_noise_multiplier"
        )
    lower, upper = _bracket(
        lambda sigma: gap(sigma, accountant),
        lambda sigma: gap(sigma, "rdp"),
        min_noise_multiplier,
        max_noise_multiplier,
    )
    if lower is None:
        return float(min_noise_multiplier)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant),
            make_event,
            target_epsilon,
            target_delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
            tol=1e-4 * lower,
        )
    )


def _bracket(
    gap: Callable[[float], float],
    rdp_gap: Callable[[float], float],
    low: float,
    high: float,
) -> tuple[float | None, float]:
    """[lower, upper] within [low, high] with gap(lower) > 0 >= gap(upper); lower None if none.

    The RDP root is an upper end for any tighter accountant; the lower end steps down from it.
    """
    upper = high
    if rdp_gap(low) > 0:
        upper = float(optimize.brentq(rdp_gap, low, high, xtol=1e-6, rtol=1e-4))
        # brentq returns a point near the root; step up until RDP (and so the tighter
        # accountant) meets the target there.
        while upper < high and rdp_gap(upper) > 0:
            upper = min(high, upper * 1.0001)
    if gap(upper) > 0:
        upper = high
    lower = upper
    factors = itertools.chain((0.9, 0.75), itertools.repeat(0.5))
    while lower > low:
        lower = max(low, lower * next(factors))
        if gap(lower) > 0:
            return lower, upper
    return None, upper


@dataclasses.dataclass(frozen=True)
class LedgerStage:
    """One stage of a release that touched the private data.

    Attributes:
      name: unique within its ledger, for example "dp_sgd" or "label_histogram".
      event: the stage's `DpEvent`.
      parameters: JSON-serialisable settings of the stage (noise multiplier, sampling
        probability, steps, clip norm and so on).
    """

    name: str
    event: dp_accounting.DpEvent
    parameters: Mapping[str, Any]


class PrivacyLedger:
    """Ordered stages of one DP release; their composition is the release's guarantee.

    Example:
      >>> ledger = PrivacyLedger()
      >>> ledger.add_stage("dp_sgd", dp_sgd.dp_sgd_event(config), dataclasses.asdict(config))
      >>> ledger.epsilon(1e-5, accountant="pld")
    """

    def __init__(self) -> None:
        self._stages: list[LedgerStage] = []

    @property
    def stages(self) -> tuple[LedgerStage, ...]:
        """The stages in the order they were added."""
        return tuple(self._stages)

    def add_stage(
        self,
        name: str,
        event: dp_accounting.DpEvent,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        """Append a stage.

        Raises:
          ValueError: empty or duplicate name, or parameters that `json.dumps` rejects.
          TypeError: `event` is not a `dp_accounting.DpEvent`.
        """
        if not name:
            raise ValueError("stage name must be non-empty")
        if any(stage.name == name for stage in self._stages):
            raise ValueError(f"stage name {name!r} is already in the ledger")
        if not isinstance(event, dp_accounting.DpEvent):
            raise TypeError(f"event must be a dp_accounting.DpEvent, got {type(event).__name__}")
        parameters = dict(parameters or {})
        try:
            json.dumps(parameters)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"parameters of stage {name!r} are not JSON-serialisable: {error}"
            ) from error
        self._stages.append(LedgerStage(name=name, event=event, parameters=parameters))

    def composed_event(self) -> dp_accounting.DpEvent:
        """`ComposedDpEvent` of every stage, in order (an empty composition for no stages)."""
        return dp_accounting.ComposedDpEvent([stage.event for stage in self._stages])

    def epsilon(self, target_delta: float, accountant: str = "pld") -> float:
        """Epsilon of all stages composed, at `target_delta`; 0 for an empty ledger."""
        return compute_epsilon(
            self.composed_event(), target_delta=target_delta, accountant=accountant
        )

    def to_dict(self, target_delta: float) -> dict[str, Any]:
        """JSON-serialisable summary, written as ledger.json.

        Returns:
          {"target_delta", "epsilon_rdp", "epsilon_pld", "stages": [{"name", "event",
          "parameters"}]}, where "event" is the event's text form. An infinite epsilon (a
          stage without noise) is written as None, because strict JSON has no infinity.
        """

        def finite_or_none(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "target_delta": target_delta,
            "epsilon_rdp": finite_or_none(self.epsilon(target_delta, accountant="rdp")),
            "epsilon_pld": finite_or_none(self.epsilon(target_delta, accountant="pld")),
            "stages": [
                {"name": stage.name, "event": str(stage.event), "parameters": stage.parameters}
                for stage in self._stages
            ],
        }
