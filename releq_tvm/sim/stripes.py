"""Stripes cycle-level simulator: a stepped tile schedule and the closed-form count it must match.

How a layer maps onto the chip (the one rule both counters use, :func:`map_layer`):

* conv: 16 windows (output positions) x 256 filters (16 tiles x 16 filter lanes) per pass, each
  SIP taking a 16-channel brick of one window and one filter; the schedule is
  window groups x filter groups x kernel positions x channel groups x bit steps, one cycle per
  bit step, so ``cycles = ceil(Ox*Oy/16) * ceil(F/256) * Kx*Ky * ceil(C/16) * p`` when nothing
  stalls (STRIPES.md). ``p`` is the serial operand's bits: the weight bits in ``weights`` mode,
  the activation bits in ``activations`` mode.
* depthwise (and any grouped) conv: each filter sees ``C/groups`` input channels (1 for
  depthwise), so a SIP uses 1 of its 16 channel lanes and there is ceil(1/16) = 1 channel group
  per filter; filters are still grouped 256 per pass. Filters no longer share their input brick,
  so each filter lane reads its own channel: the activation traffic is counted per filter.
* fully connected, ``weights`` mode with ``fc_weights_serial`` (default): one window, so the
  window dimension of the SIP array takes filters too: 4096 filters per pass (16 tiles x 16 x 16
  SIPs), the activation brick broadcast, ``cycles = ceil(F/4096) * ceil(C/16) * p_w``.
* fully connected otherwise (``activations`` mode, or ``fc_weights_serial=False``): bit-parallel
  at the DaDN rate, ``cycles = ceil(F/256) * ceil(C/16)`` whatever the bits.

Stalls (stepped only): at every bit step each per-tile buffer must deliver that step's bits;
a step takes ``max(1, ceil(bits / width))`` cycles over SB, NBin and NBout. The serial operand
is read one bit per lane every step; the parallel operand's brick is read whole at the first
bit step of its block and held in the SIP registers (no prefetch into the previous block, which
makes the stall count an upper bound); outputs are written to NBout at the last step of the last
kernel position and channel group of a (window group, filter group). Tiles run in lock step, so
a tile's demand is that of the busiest tile (``ceil(filters / tiles)`` filters).

Energy per layer (pJ) = compute + on-chip + off-chip, the same counts from both counters:
compute = active SIPs x steps x :meth:`StripesConfig.sip_cycle_pj` (stall cycles are clock
gated), or a full 8-bit multiplier per MAC on the bit-parallel path; on-chip = every bit read
from SB and NBin (a brick broadcast to several tiles counted once) and written to NBout, as the
schedule re-reads them, x the SRAM energy per bit; off-chip = weight bits that do not fit in the
SB capacity x the DRAM energy per bit. Weights stay resident across inferences (DaDN's premise),
placed in forward layer order; the bits past the capacity are fetched once per inference. A
layer's outputs are written at the next layer's activation bits (the last layer at 8 bits).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from releq_tvm.config import BITS_MAX, DEFAULT_ACT_BITS
from releq_tvm.errors import ReleqError
from releq_tvm.sim.config import StripesConfig

if TYPE_CHECKING:
    from releq_tvm.networks import LayerSpec

#: Largest step grid materialised at once; bigger layers are stepped in window-group chunks.
_MAX_GRID_STEPS = 1 << 21

WEIGHTS_SERIAL = "weights-serial"
ACTIVATIONS_SERIAL = "activations-serial"
BIT_PARALLEL = "bit-parallel"


@dataclass(frozen=True)
class LayerMapping:
    """How one layer runs on the chip: the schedule dimensions and the operand precisions."""

    dataflow: str  # WEIGHTS_SERIAL | ACTIVATIONS_SERIAL | BIT_PARALLEL
    n_windows: int  # output positions Ox*Oy (1 for a dense layer)
    window_lanes: int  # windows processed together
    n_filters: int
    filters_per_pass: int  # filters processed together across all tiles
    tiles: int
    kernel_positions: int  # Kx*Ky
    channels_per_filter: int  # C / groups
    channel_lanes: int
    shared_inputs: bool  # all filters of a pass read the same input brick (groups == 1)
    steps: int  # bit steps per block: the serial operand's bits, 1 when bit-parallel
    w_bits: int
    a_bits: int
    out_bits: int

    @property
    def window_groups(self) -> int:
        return -(-self.n_windows // self.window_lanes)

    @property
    def filter_groups(self) -> int:
        return -(-self.n_filters // self.filters_per_pass)

    @property
    def channel_groups(self) -> int:
        return -(-self.channels_per_filter // self.channel_lanes)

    @property
    def parallel_bits(self) -> int:
        """Width of the bit-parallel operand inside a SIP (sets the adder-tree energy)."""
        return self.a_bits if self.dataflow == WEIGHTS_SERIAL else self.w_bits


def map_layer(layer: LayerSpec, w_bits: int, a_bits: int, out_bits: int, config: StripesConfig) -> LayerMapping:
    """Map one layer onto the chip (the rule shared by the stepped and closed-form counters)."""
    dense = layer.kind == "dense"
    if config.mode == "weights" and (not dense or config.fc_weights_serial):
        dataflow, steps = WEIGHTS_SERIAL, w_bits
    elif config.mode == "activations" and not dense:
        dataflow, steps = ACTIVATIONS_SERIAL, a_bits
    else:
        dataflow, steps = BIT_PARALLEL, 1
    if dense:
        window_lanes = 1
        # One window: in the weights-serial dataflow the window dimension of the SIP array takes
        # filters instead, the activation brick broadcast to all of them.
        per_tile = config.filter_lanes * (config.windows_per_sip_group if dataflow == WEIGHTS_SERIAL else 1)
    else:
        window_lanes = config.windows_per_sip_group
        per_tile = config.filter_lanes
    groups = max(1, int(layer.groups))
    return LayerMapping(
        dataflow=dataflow,
        n_windows=int(layer.out_size[0] * layer.out_size[1]),
        window_lanes=window_lanes,
        n_filters=int(layer.out_channels),
        filters_per_pass=config.tiles * per_tile,
        tiles=config.tiles,
        kernel_positions=int(layer.kernel[0] * layer.kernel[1]),
        channels_per_filter=int(layer.in_channels) // groups,
        channel_lanes=config.channel_lanes,
        shared_inputs=groups == 1,
        steps=int(steps),
        w_bits=int(w_bits),
        a_bits=int(a_bits),
        out_bits=int(out_bits),
    )


@dataclass(frozen=True)
class LayerCounts:
    """What a counter finds for one layer: cycles and the traffic the energy model prices."""

    cycles: int
    stall_cycles: int
    sb_bits: int  # weight bits read from the synapse buffers
    nbin_bits: int  # activation bits read from NBin
    nbout_bits: int  # output bits written to NBout
    sip_steps: int  # active SIPs x non-stalled bit steps
    parallel_macs: int  # MACs done by bit-parallel multipliers


def closed_form_counts(m: LayerMapping) -> LayerCounts:
    """Closed-form cycles (no stalls) and traffic of one mapped layer."""
    wg, fg, cg, k, s = m.window_groups, m.filter_groups, m.channel_groups, m.kernel_positions, m.steps
    W, F, Cf = m.n_windows, m.n_filters, m.channels_per_filter
    # Weights are re-read for every window group and kernel position; activations for every
    # filter group unless each filter reads its own channels (grouped conv), then once per filter.
    nbin = (fg * W * Cf if m.shared_inputs else W * F * Cf) * k * m.a_bits
    serial = m.dataflow != BIT_PARALLEL
    return LayerCounts(
        cycles=wg * fg * k * cg * s,
        stall_cycles=0,
        sb_bits=wg * k * F * Cf * m.w_bits,
        nbin_bits=nbin,
        nbout_bits=W * F * m.out_bits,
        sip_steps=W * F * k * cg * s if serial else 0,
        parallel_macs=0 if serial else W * F * k * Cf,
    )


def _group_sizes(total: int, lanes: int) -> np.ndarray:
    """Occupied lanes of each group when ``total`` items are dealt ``lanes`` at a time."""
    starts = np.arange(0, total, lanes, dtype=np.int64)
    return np.minimum(lanes, total - starts)


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def stepped_counts(m: LayerMapping, config: StripesConfig) -> LayerCounts:
    """Step the tile schedule of one mapped layer and count cycles, stalls and traffic.

    The grid has axes (window group, filter group, kernel position, channel group, bit step);
    every element is one bit step whose cycles are ``max(1, ceil(bits/width))`` over the three
    per-tile buffers. It is vectorised with numpy and chunked over window groups.
    """
    win_all = _group_sizes(m.n_windows, m.window_lanes)
    fil = _group_sizes(m.n_filters, m.filters_per_pass)
    ch = _group_sizes(m.channels_per_filter, m.channel_lanes)
    nk, ns = m.kernel_positions, m.steps

    # Shapes broadcast over (wg, fg, k, cg, s).
    F = fil[None, :, None, None, None]
    Ft = _ceil_div(F, m.tiles)  # filters on the busiest tile
    C = ch[None, None, None, :, None]
    s = np.arange(ns)[None, None, None, None, :]
    first = (s == 0).astype(np.int64)
    out_event = (
        (np.arange(nk) == nk - 1)[None, None, :, None, None]
        & (np.arange(len(ch)) == len(ch) - 1)[None, None, None, :, None]
        & (s == ns - 1)
    ).astype(np.int64)
    in_ch_tile = C if m.shared_inputs else Ft * C
    in_ch_chip = C if m.shared_inputs else F * C

    # Bits each step asks of each buffer: per busiest tile (for stalls) and chip-wide (for energy).
    if m.dataflow == WEIGHTS_SERIAL:
        sb_tile, sb_chip = Ft * C, F * C
        nb_per_window_tile, nb_per_window_chip = in_ch_tile * m.a_bits * first, in_ch_chip * m.a_bits * first
    elif m.dataflow == ACTIVATIONS_SERIAL:
        sb_tile, sb_chip = Ft * C * m.w_bits * first, F * C * m.w_bits * first
        nb_per_window_tile, nb_per_window_chip = in_ch_tile, in_ch_chip
    else:
        sb_tile, sb_chip = Ft * C * m.w_bits, F * C * m.w_bits
        nb_per_window_tile, nb_per_window_chip = in_ch_tile * m.a_bits, in_ch_chip * m.a_bits
    sb_cycles = _ceil_div(sb_tile, config.sb_width_bits)

    chunk = max(1, _MAX_GRID_STEPS // max(1, len(fil) * nk * len(ch) * ns))
    totals = np.zeros(6, dtype=np.int64)  # cycles, stalls, sb, nbin, nbout, active
    for start in range(0, len(win_all), chunk):
        W = win_all[start : start + chunk][:, None, None, None, None]
        grid = (W.shape[0], len(fil), nk, len(ch), ns)
        nbin_tile = W * nb_per_window_tile
        nbout_tile = W * Ft * m.out_bits * out_event
        step_cycles = np.maximum(
            np.maximum(1, sb_cycles),
            np.maximum(_ceil_div(nbin_tile, config.nbin_width_bits), _ceil_div(nbout_tile, config.nbout_width_bits)),
        )
        step_cycles = np.broadcast_to(step_cycles, grid)
        cycles = int(step_cycles.sum(dtype=np.int64))
        n_steps = int(np.prod(grid))
        active = W * F * C if m.dataflow == BIT_PARALLEL else W * F  # MACs or SIPs busy in a step
        totals += (
            cycles,
            cycles - n_steps,
            np.broadcast_to(sb_chip, grid).sum(dtype=np.int64),
            np.broadcast_to(W * nb_per_window_chip, grid).sum(dtype=np.int64),
            np.broadcast_to(W * F * m.out_bits * out_event, grid).sum(dtype=np.int64),
            np.broadcast_to(active, grid).sum(dtype=np.int64),
        )
    cycles, stalls, sb, nbin, nbout, active = (int(v) for v in totals)
    parallel = m.dataflow == BIT_PARALLEL
    return LayerCounts(
        cycles=cycles,
        stall_cycles=stalls,
        sb_bits=sb,
        nbin_bits=nbin,
        nbout_bits=nbout,
        sip_steps=0 if parallel else active,
        parallel_macs=active if parallel else 0,
    )


@dataclass(frozen=True)
class LayerCost:
    """A layer's mapping, counts and on-chip energies (pJ); off-chip needs the whole network."""

    mapping: LayerMapping
    counts: LayerCounts
    compute_pj: float
    onchip_pj: float


def layer_energy(m: LayerMapping, c: LayerCounts, config: StripesConfig) -> tuple[float, float]:
    """(compute, on-chip) energy of one layer in pJ from its counts."""
    compute = c.sip_steps * config.sip_cycle_pj(m.parallel_bits) + c.parallel_macs * config.parallel_mac_pj
    onchip = (c.sb_bits + c.nbin_bits + c.nbout_bits) * config.sram_pj_per_bit
    return compute, onchip


@functools.lru_cache(maxsize=1 << 16)
def _layer_cost(layer, w_bits: int, a_bits: int, out_bits: int, config: StripesConfig, method: str) -> LayerCost:
    # Pure in its arguments; the search asks for the same (layer, bits) pairs again and again.
    m = map_layer(layer, w_bits, a_bits, out_bits, config)
    c = stepped_counts(m, config) if method == "stepped" else closed_form_counts(m)
    return LayerCost(m, c, *layer_energy(m, c, config))


def clear_cache() -> None:
    """Forget cached per-layer results (the benchmark calls this so it times real stepping)."""
    _layer_cost.cache_clear()


@dataclass(frozen=True)
class EnergyParts:
    """Energy of a layer or network in pJ, split as STRIPES.md asks."""

    compute_pj: float
    onchip_pj: float
    offchip_pj: float

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.onchip_pj + self.offchip_pj

    def __add__(self, other: EnergyParts) -> EnergyParts:
        return EnergyParts(
            self.compute_pj + other.compute_pj, self.onchip_pj + other.onchip_pj, self.offchip_pj + other.offchip_pj
        )


def ratio_or_none(reference: float, value: float) -> float | None:
    """``reference / value``, or None when ``value`` is 0 (the part vanished or was never there)."""
    return reference / value if value > 0 else None


@dataclass(frozen=True)
class LayerResult:
    """One layer at the chosen bits and at 8 bits on the same accelerator (cycles, pJ)."""

    index: int
    name: str
    kind: str
    dataflow: str
    w_bits: int
    a_bits: int
    cycles: int
    cycles_8bit: int
    stall_cycles: int
    energy: EnergyParts
    energy_8bit: EnergyParts

    @property
    def speedup(self) -> float:
        return self.cycles_8bit / self.cycles

    @property
    def energy_reduction(self) -> float | None:
        return ratio_or_none(self.energy_8bit.total_pj, self.energy.total_pj)


@dataclass(frozen=True)
class SimResult:
    """A network simulated at the chosen bits, with its all-8-bit reference on the same accelerator."""

    network: str
    config: StripesConfig
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    method: str
    layers: tuple[LayerResult, ...] = field(repr=False)

    @property
    def cycles(self) -> int:
        return sum(r.cycles for r in self.layers)

    @property
    def cycles_8bit(self) -> int:
        return sum(r.cycles_8bit for r in self.layers)

    @property
    def stall_cycles(self) -> int:
        return sum(r.stall_cycles for r in self.layers)

    @property
    def speedup(self) -> float:
        """Network speedup over the same accelerator at 8 bits: sum of 8-bit cycles / sum of cycles."""
        return self.cycles_8bit / self.cycles

    @property
    def energy(self) -> EnergyParts:
        return functools.reduce(EnergyParts.__add__, (r.energy for r in self.layers))

    @property
    def energy_8bit(self) -> EnergyParts:
        return functools.reduce(EnergyParts.__add__, (r.energy_8bit for r in self.layers))

    @property
    def energy_reduction(self) -> float:
        """Total energy at 8 bits / total energy at the chosen bits."""
        return self.energy_8bit.total_pj / self.energy.total_pj

    def part_reductions(self) -> dict[str, float | None]:
        """8-bit energy / energy for each part; None where the part is 0 at the chosen bits."""
        e, e8 = self.energy, self.energy_8bit
        return {
            "compute": ratio_or_none(e8.compute_pj, e.compute_pj),
            "onchip": ratio_or_none(e8.onchip_pj, e.onchip_pj),
            "offchip": ratio_or_none(e8.offchip_pj, e.offchip_pj),
        }


def _check_bits(bits: Sequence[int], n_layers: int, what: str) -> tuple[int, ...]:
    values = tuple(int(b) for b in bits)
    if any(v != b for v, b in zip(values, bits)):
        raise ReleqError(f"{what} must be whole numbers of bits; got {list(bits)}")
    if len(values) != n_layers:
        raise ReleqError(f"{what} has {len(values)} values for {n_layers} layers; pass one per weight layer")
    if any(b < 1 for b in values):
        raise ReleqError(f"{what} must be positive bitwidths; got {','.join(map(str, values))}")
    return values


def _out_bits(a_bits: tuple[int, ...]) -> tuple[int, ...]:
    # A layer writes what the next layer reads; the logits leave the chip at 8 bits.
    return a_bits[1:] + (BITS_MAX,)


def offchip_weight_bits(table: Sequence[LayerSpec], w_bits: Sequence[int], capacity_bits: int) -> np.ndarray:
    """Weight bits of each layer that do not fit on chip (resident in forward layer order)."""
    weight_bits = np.array([layer.n_weights * int(b) for layer, b in zip(table, w_bits)], dtype=np.int64)
    resident_before = np.concatenate(([0], np.cumsum(weight_bits)[:-1]))
    on_chip = np.clip(capacity_bits - resident_before, 0, weight_bits)
    return weight_bits - on_chip


class StripesSimulator:
    """Stripes simulator for one accelerator configuration (the model is in the module docstring).

    ``simulate`` steps the schedule (``method="stepped"``, the default) or uses the closed form
    (``method="closed"``); both give the same traffic and energy, and the same cycles unless a
    buffer stalls.
    """

    def __init__(self, config: StripesConfig | None = None):
        self.config = config or StripesConfig()

    def layer_costs(
        self,
        table: Sequence[LayerSpec],
        w_bits: Sequence[int],
        a_bits: Sequence[int] | None = None,
        method: str = "stepped",
    ) -> tuple[list[LayerCost], np.ndarray]:
        """Per-layer costs and per-layer off-chip energy (pJ) at the given bits."""
        if method not in ("stepped", "closed"):
            raise ReleqError(f"method must be 'stepped' or 'closed'; got {method!r}")
        n = len(table)
        if n == 0:
            raise ReleqError("the layer table is empty; a network needs at least one conv or dense layer")
        w = _check_bits(w_bits, n, "weight bits")
        a = _check_bits(a_bits if a_bits is not None else (DEFAULT_ACT_BITS,) * n, n, "activation bits")
        out = _out_bits(a)
        cfg = self.config
        costs = [_layer_cost(layer, w[i], a[i], out[i], cfg, method) for i, layer in enumerate(table)]
        offchip = offchip_weight_bits(table, w, cfg.sb_capacity_bits) * cfg.dram_pj_per_bit
        return costs, offchip

    def simulate(
        self,
        table: Sequence[LayerSpec],
        w_bits: Sequence[int],
        a_bits: Sequence[int] | None = None,
        method: str = "stepped",
        network: str = "",
    ) -> SimResult:
        """Simulate ``table`` at ``w_bits`` / ``a_bits`` (default 8) and at all 8 bits, per layer."""
        n = len(table)
        a = a_bits if a_bits is not None else (DEFAULT_ACT_BITS,) * n
        costs, offchip = self.layer_costs(table, w_bits, a, method)
        ref, ref_offchip = self.layer_costs(table, (BITS_MAX,) * n, (BITS_MAX,) * n, method)
        rows = []
        for i, layer in enumerate(table):
            c, r = costs[i], ref[i]
            rows.append(
                LayerResult(
                    index=i,
                    name=str(layer.name),
                    kind=str(layer.kind),
                    dataflow=c.mapping.dataflow,
                    w_bits=c.mapping.w_bits,
                    a_bits=c.mapping.a_bits,
                    cycles=c.counts.cycles,
                    cycles_8bit=r.counts.cycles,
                    stall_cycles=c.counts.stall_cycles,
                    energy=EnergyParts(c.compute_pj, c.onchip_pj, float(offchip[i])),
                    energy_8bit=EnergyParts(r.compute_pj, r.onchip_pj, float(ref_offchip[i])),
                )
            )
        return SimResult(
            network=network,
            config=self.config,
            w_bits=tuple(int(b) for b in w_bits),
            a_bits=tuple(int(b) for b in a),
            method=method,
            layers=tuple(rows),
        )

    def totals(
        self,
        table: Sequence[LayerSpec],
        w_bits: Sequence[int],
        a_bits: Sequence[int] | None = None,
        method: str = "stepped",
    ) -> tuple[int, float]:
        """(network cycles, network energy in pJ): the lean path of the reward loop."""
        costs, offchip = self.layer_costs(table, w_bits, a_bits, method)
        cycles = sum(c.counts.cycles for c in costs)
        energy = sum(c.compute_pj + c.onchip_pj for c in costs) + float(offchip.sum())
        return cycles, energy


def closed_form_cycles(
    table: Sequence[LayerSpec],
    w_bits: Sequence[int],
    a_bits: Sequence[int] | None = None,
    config: StripesConfig | None = None,
) -> list[int]:
    """Per-layer cycles by the closed form (no stalls), e.g. ceil(OxOy/16)*ceil(F/256)*KxKy*ceil(C/16)*p."""
    costs, _ = StripesSimulator(config).layer_costs(table, w_bits, a_bits, method="closed")
    return [c.counts.cycles for c in costs]


def stripes_cost_ratio(
    table: Sequence[LayerSpec],
    w_bits: Sequence[int],
    a_bits: Sequence[int] | None = None,
    metric: str = "cycles",
    config: StripesConfig | None = None,
) -> float:
    """Cost of ``w_bits`` / cost of the same network at all 8 bits on the same Stripes (stepped).

    ``metric`` is ``"cycles"`` (1 / speedup) or ``"energy"`` (1 / energy reduction). Pure and
    cached per (layer, bits, config), so the 8-bit reference is computed once per table.
    """
    if metric not in ("cycles", "energy"):
        raise ReleqError(f"metric must be 'cycles' or 'energy'; got {metric!r}")
    sim = StripesSimulator(config)
    n = len(table)
    cycles, energy = sim.totals(table, w_bits, a_bits)
    ref_cycles, ref_energy = sim.totals(table, (BITS_MAX,) * n, (BITS_MAX,) * n)
    return cycles / ref_cycles if metric == "cycles" else energy / ref_energy
