"""The bit vector: one weight bitwidth per weight layer, parsed and checked in one place."""

from __future__ import annotations

from collections.abc import Sequence

from releq_tvm.config import DEFAULT_ACTION_SET
from releq_tvm.errors import ReleqError

BitVector = tuple[int, ...]


def parse_bits(
    text: str | Sequence[int],
    n_layers: int,
    network: str,
    action_set: Sequence[int] = DEFAULT_ACTION_SET,
    what: str = "--bits",
) -> BitVector:
    """Parse ``"8,2,2,3,2"`` (or a sequence of ints) into a checked bit vector.

    A single value (``"4"``) is broadcast to every layer. Raises :class:`ReleqError` with one
    line saying what is wrong when the length or a value does not fit the network.
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ReleqError(f"{what} is empty; pass one bitwidth per weight layer such as 8,2,2,3,2, or one value for all")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ReleqError(
                f"{what} must be a comma list of integers such as 8,2,2,3,2; got {text!r}"
            ) from None
    else:
        values = [int(v) for v in text]
    if len(values) == 1 and n_layers > 1:
        values = values * n_layers
    if len(values) != n_layers:
        raise ReleqError(
            f"{what} has {len(values)} values but {network} has {n_layers} weight layers; "
            f"pass {n_layers} comma-separated bitwidths (see `releq-tvm networks`)"
        )
    allowed = sorted(set(int(b) for b in action_set))
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ReleqError(
            f"{what} value {bad[0]} is outside the action set {','.join(map(str, allowed))}; "
            "use bitwidths from that set"
        )
    return tuple(values)


def parse_action_set(text: str) -> tuple[int, ...]:
    """Parse ``"1-8"`` or ``"2,4,8"`` into a sorted tuple of bitwidths within 1..8."""
    text = text.strip()
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(t) for t in text.split("-"))
            values = list(range(lo, hi + 1))
        else:
            values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ReleqError(f"action set must look like 1-8 or 2,4,8; got {text!r}") from None
    if not values or any(v < 1 or v > 8 for v in values):
        raise ReleqError(f"action set values must lie in 1..8; got {text!r}")
    return tuple(sorted(set(values)))


def format_bits(bits: Sequence[int]) -> str:
    return ",".join(str(int(b)) for b in bits)
