"""Stripes architecture and energy constants, each with its unit and source, in one table.

:data:`STRIPES_CONSTANTS` is the single source of every default of :class:`StripesConfig`;
:data:`ENERGY_CONSTANTS` is its energy rows. Override any of them per run with
``dataclasses.replace(StripesConfig(), dram_access_64b_pj=2600.0)`` (or ``--set`` on the CLI).

Energies are 45 nm figures (Horowitz, "Computing's energy problem", ISSCC 2014). The
architecture is DaDianNao's (Chen et al., MICRO 2014) as re-used by Stripes (Judd et al.,
MICRO 2016). Buffer widths are per tile, in bits delivered per cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from releq_tvm.config import E_MEM_OVER_E_MAC
from releq_tvm.errors import ReleqError

#: The serial operand: ``weights`` (the ReLeQ use, the default) or ``activations`` (Stripes as published).
MODES: tuple[str, ...] = ("weights", "activations")


@dataclass(frozen=True)
class Constant:
    """One model constant: its value, its unit and where the number comes from."""

    value: float
    unit: str
    source: str
    kind: str  # "arch" | "energy" | "area" | "reference"


_HOROWITZ = "Horowitz, ISSCC 2014, 45 nm"
_DADN = "DaDianNao (Chen et al., MICRO 2014)"
_STRIPES = "Stripes (Judd et al., MICRO 2016)"

STRIPES_CONSTANTS: dict[str, Constant] = {
    "tiles": Constant(16, "tiles", f"{_DADN}; {_STRIPES} keeps them", "arch"),
    "filter_lanes": Constant(16, "filters per tile", f"{_DADN}: 16 filters per tile per cycle", "arch"),
    "channel_lanes": Constant(16, "input channels per SIP", f"{_DADN}: 16-channel input brick", "arch"),
    "windows_per_sip_group": Constant(16, "windows per tile", f"{_STRIPES}: 16 x 16 SIPs = 16 windows x 16 filters", "arch"),
    "sb_width_bits": Constant(
        4096, "bits/cycle/tile", f"{_DADN}: SB feeds 16 filters x 16 synapses x 16 bits per cycle", "arch"
    ),
    "nbin_width_bits": Constant(
        4096,
        "bits/cycle/tile",
        "model assumption: weights-serial Stripes swaps operand roles, so NBin must load a 16-window x "
        "16-channel x 16-bit brick in one cycle (as wide as the DaDN SB); Stripes as published reads "
        "16 x 16 one-bit lanes = 256 bits/cycle (set 256 to model it; weights-serial mode then stalls)",
        "arch",
    ),
    "nbout_width_bits": Constant(
        4096, "bits/cycle/tile", "model assumption: one write of 16 windows x 16 filters x 16 bits per cycle", "arch"
    ),
    "sb_capacity_bits": Constant(
        16 * 2 * 2**20 * 8, "bits", f"{_DADN}: 2 MB eDRAM SB per tile, 32 MB per chip", "arch"
    ),
    "mult_8b_pj": Constant(0.2, "pJ per 8-bit integer multiply", _HOROWITZ, "energy"),
    "add_8b_pj": Constant(0.03, "pJ per 8-bit integer add", _HOROWITZ, "energy"),
    "add_32b_pj": Constant(0.1, "pJ per 32-bit integer add", _HOROWITZ, "energy"),
    "sram_read_64b_pj": Constant(
        10.0,
        "pJ per 64-bit read",
        f"{_HOROWITZ} (8 KB SRAM); used for SB, NBin and NBout, which are read as wide rows of small banks",
        "energy",
    ),
    "dram_access_64b_pj": Constant(
        1300.0, "pJ per 64-bit access", f"{_HOROWITZ}: 1.3-2.6 nJ; the low end is the default", "energy"
    ),
    "sip_area_overhead": Constant(
        0.32, "fraction of DaDN area", f"{_STRIPES}: 32% more area than DaDN; reported, never used in results", "area"
    ),
    "releq_mem_over_mac": Constant(
        E_MEM_OVER_E_MAC,
        "ratio",
        "ReLeQ (Elthakeb et al.) cost model: memory access / MAC energy; used by the proxy SQ, "
        "listed here for comparison with the ratio the rows above imply",
        "reference",
    ),
}

#: The energy rows of :data:`STRIPES_CONSTANTS`.
ENERGY_CONSTANTS: dict[str, Constant] = {k: c for k, c in STRIPES_CONSTANTS.items() if c.kind == "energy"}


def _default(name: str):
    value = STRIPES_CONSTANTS[name].value
    return int(value) if STRIPES_CONSTANTS[name].kind == "arch" else float(value)


@dataclass(frozen=True)
class StripesConfig:
    """One Stripes accelerator: lane counts, buffer widths (bits/cycle/tile), capacity (bits), energies (pJ).

    ``mode`` picks the serial operand: ``"weights"`` (the ReLeQ use; default) or ``"activations"``
    (Stripes as published, where a fully connected layer runs at the bit-parallel DaDN rate).
    ``fc_weights_serial`` (weights mode only; default True): fully connected layers run the
    weights-serial dataflow with the single activation vector broadcast, each of the
    ``tiles x filter_lanes x windows_per_sip_group`` SIPs taking one filter, so their cycles scale
    with the weight bits. The SB then supplies 256 filters x 16 one-bit lanes = 4096 bits/cycle per
    tile, no more than DaDN's SB, which is why it is the default. False charges them at the
    bit-parallel DaDN rate whatever the bits, as the activations mode does.
    """

    tiles: int = _default("tiles")
    filter_lanes: int = _default("filter_lanes")
    channel_lanes: int = _default("channel_lanes")
    windows_per_sip_group: int = _default("windows_per_sip_group")
    sb_width_bits: int = _default("sb_width_bits")
    nbin_width_bits: int = _default("nbin_width_bits")
    nbout_width_bits: int = _default("nbout_width_bits")
    sb_capacity_bits: int = _default("sb_capacity_bits")
    mult_8b_pj: float = _default("mult_8b_pj")
    add_8b_pj: float = _default("add_8b_pj")
    add_32b_pj: float = _default("add_32b_pj")
    sram_read_64b_pj: float = _default("sram_read_64b_pj")
    dram_access_64b_pj: float = _default("dram_access_64b_pj")
    sip_area_overhead: float = _default("sip_area_overhead")
    mode: str = "weights"
    fc_weights_serial: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ReleqError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for f in fields(self):
            if f.name in ("mode", "fc_weights_serial", "sip_area_overhead"):
                continue
            value = getattr(self, f.name)
            # Energies may be 0 (to switch a part off); counts, widths and capacity must be positive.
            if value < 0 or (value == 0 and f.name in _POSITIVE):
                raise ReleqError(f"Stripes setting {f.name} must be positive; got {value}")

    @property
    def filters_per_pass(self) -> int:
        """Filters the chip processes at once in a conv layer (256 by default)."""
        return self.tiles * self.filter_lanes

    @property
    def sram_pj_per_bit(self) -> float:
        return self.sram_read_64b_pj / 64.0

    @property
    def dram_pj_per_bit(self) -> float:
        return self.dram_access_64b_pj / 64.0

    def sip_cycle_pj(self, parallel_bits: int) -> float:
        """Energy of one SIP in one cycle (pJ): a (channel_lanes)-input adder tree of
        ``parallel_bits``-wide operands (adder energy taken linear in width from the 8-bit add)
        plus the 32-bit shift-and-accumulate. The AND gates are negligible beside the adders."""
        return (self.channel_lanes - 1) * self.add_8b_pj * parallel_bits / 8.0 + self.add_32b_pj

    @property
    def parallel_mac_pj(self) -> float:
        """Energy of one bit-parallel MAC (pJ): a full 8-bit multiplier whatever the bits, plus its add."""
        return self.mult_8b_pj + self.add_8b_pj

    def with_overrides(self, overrides: dict[str, str | float | int]) -> StripesConfig:
        """A copy with named fields replaced; values given as text are cast to the field's type."""
        known = {f.name: f for f in fields(self) if f.name not in ("mode", "fc_weights_serial")}
        changes = {}
        for key, raw in overrides.items():
            if key not in known:
                raise ReleqError(
                    f"unknown Stripes setting {key!r}; choose one of: {', '.join(sorted(known))}"
                )
            cast = int if isinstance(getattr(self, key), int) else float
            try:
                changes[key] = cast(raw)
            except (TypeError, ValueError):
                raise ReleqError(f"Stripes setting {key} needs a {cast.__name__}; got {raw!r}") from None
        return replace(self, **changes)


_POSITIVE = {
    "tiles",
    "filter_lanes",
    "channel_lanes",
    "windows_per_sip_group",
    "sb_width_bits",
    "nbin_width_bits",
    "nbout_width_bits",
}

