"""State of Quantization and the rewards of METHOD.md sections 3-4, as pure functions.

Every function here takes plain numbers (or a layer table and a bit vector) and returns a
float; nothing reads a model, a file or a clock, so each is tested against hand-computed
values in ``tests/test_reward.py``.

Units: ``sa`` (State of Relative Accuracy) is a ratio, acc_current / acc_full_precision, so
1.0 means no loss. ``sq`` is a cost ratio in (0, 1] against the all-``bits_max`` network; the
hardware backends pass their measured cost ratio in its place (see
:mod:`releq_tvm.search.cost`). Accuracies of the hardware-aware reward are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

from releq_tvm.config import BITS_MAX, DEFAULTS, E_MEM_OVER_E_MAC

#: The two forms of State of Quantization (METHOD.md section 3).
SqForm = Literal["cost", "plain"]
SQ_FORMS: tuple[str, ...] = get_args(SqForm)


def layer_cost_weights(table, e_mem_over_e_mac: float = E_MEM_OVER_E_MAC) -> list[float]:
    """Per-layer weight of the cost-weighted SQ: ``n_w * E_mem/E_mac + n_mac`` (MAC-energy units)."""
    return [row.n_weights * e_mem_over_e_mac + row.macs for row in table]


def state_of_quantization(
    table,
    bits: Sequence[int],
    bits_max: int = BITS_MAX,
    form: str = "cost",
    e_mem_over_e_mac: float = E_MEM_OVER_E_MAC,
) -> float:
    """State of Quantization of ``bits`` on the layers of ``table`` (1.0 = every layer at ``bits_max``).

    ``form="cost"``: sum_l (n_w[l] * E_mem/E_mac + n_mac[l]) * bits[l]
    / sum_l (n_w[l] * E_mem/E_mac + n_mac[l]) * bits_max, so a layer counts by the energy of
    reading its weights plus computing its MACs. ``form="plain"``: sum(bits) / (bits_max * L).
    """
    if len(bits) != len(table):
        raise ValueError(f"{len(bits)} bitwidths for {len(table)} layers")
    if form == "plain":
        return float(sum(bits)) / (bits_max * len(bits))
    if form != "cost":
        raise ValueError(f"unknown SQ form {form!r}; use one of {SQ_FORMS}")
    weights = layer_cost_weights(table, e_mem_over_e_mac)
    return sum(w * b for w, b in zip(weights, bits)) / (sum(weights) * bits_max)


def asymmetric_reward(
    sa: float,
    sq: float,
    a: float = DEFAULTS.reward.a,
    b: float = DEFAULTS.reward.b,
    th: float = DEFAULTS.reward.th,
) -> float:
    """ReLeQ's asymmetric reward: accuracy loss costs more than the same cost saving earns.

    r = 1 - sq^a; r = -1 when sa < th (the loss is not recoverable), else
    r * max(sa, th)^(b / max(sa, th)).
    """
    if sa < th:
        return -1.0
    r = 1.0 - max(sq, 0.0) ** a
    acc = max(sa, th)
    return r * acc ** (b / acc)


def sa_over_sq(sa: float, sq: float) -> float:
    """The ratio reward the paper compares against: r = sa / sq."""
    return sa / max(sq, 1e-12)


def sa_minus_sq(sa: float, sq: float) -> float:
    """The difference reward the paper compares against: r = sa - sq."""
    return sa - sq


def hardware_reward(acc_q: float, acc_o: float, cost_ratio: float, acc_limit: float | None = None) -> float:
    """The hardware-aware reward of METHOD.md section 4 (accuracies as fractions in [0, 1]).

    With ``acc_limit``: 1/|acc_limit - acc_o| + 1/cost_ratio while acc_q > acc_limit (accuracy
    above the limit earns a fixed bonus, so only cost moves the reward), else
    1/(|acc_q - acc_o| + 1e-4) + 1/cost_ratio. Without it: 10 * acc_q + 1/cost_ratio.
    """
    inv_cost = 1.0 / max(cost_ratio, 1e-12)
    if acc_limit is None:
        return 10.0 * acc_q + inv_cost
    if acc_q > acc_limit:
        # acc_limit == acc_o would divide by zero: the same 1e-4 floor as the other branch.
        return 1.0 / max(abs(acc_limit - acc_o), 1e-4) + inv_cost
    return 1.0 / (abs(acc_q - acc_o) + 1e-4) + inv_cost


#: Reward names accepted by ``--reward``.
RewardName = Literal["asymmetric", "sa_over_sq", "sa_minus_sq", "hardware"]
REWARDS: tuple[str, ...] = get_args(RewardName)


def make_reward(
    name: str,
    a: float = DEFAULTS.reward.a,
    b: float = DEFAULTS.reward.b,
    th: float = DEFAULTS.reward.th,
    acc_limit: float | None = None,
) -> Callable[[float, float, float], float]:
    """A reward ``f(sa, cost, acc_full_precision_fraction) -> float`` by name.

    ``cost`` is SQ for ``--measure none`` and the backend's cost ratio otherwise. The hardware
    reward needs absolute accuracies: acc_q = sa * acc_o, with acc_o the full-precision
    accuracy as a fraction; ``acc_limit`` is a fraction too.
    """
    if name == "asymmetric":
        return lambda sa, cost, acc_o: asymmetric_reward(sa, cost, a=a, b=b, th=th)
    if name == "sa_over_sq":
        return lambda sa, cost, acc_o: sa_over_sq(sa, cost)
    if name == "sa_minus_sq":
        return lambda sa, cost, acc_o: sa_minus_sq(sa, cost)
    if name == "hardware":
        return lambda sa, cost, acc_o: hardware_reward(sa * acc_o, acc_o, cost, acc_limit)
    raise ValueError(f"unknown reward {name!r}; use one of {', '.join(REWARDS)}")
