"""Membership-inference attacks: pure functions from attack signals to scores.

Every attack returns scores of shape (N,), one per query, where higher means "more likely a
member". Attacks never read the target's membership mask; `ppds_jax.metrics` does.
`ATTACKS` lists every attack with its score function, the releases it fits and its minimum
number of reference models. The submodules are exported as modules, not their functions,
because `loss_threshold` and `rmia` name both a module and its main function.
"""

from ppds_jax.attacks import density, distance, lira, loss_threshold, rmia, signals
from ppds_jax.attacks.registry import (
    ATTACKS,
    RELEASES,
    AttackSpec,
    attacks_for_release,
    check_attack,
)

__all__ = [
    "ATTACKS",
    "RELEASES",
    "AttackSpec",
    "attacks_for_release",
    "check_attack",
    "density",
    "distance",
    "lira",
    "loss_threshold",
    "rmia",
    "signals",
]
