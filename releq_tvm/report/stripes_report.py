"""Figure 9: speedup and energy reduction on Stripes over the same accelerator at 8 bits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from releq_tvm.bits import format_bits
from releq_tvm.report.choices import BitChoice
from releq_tvm.report.tables import geometric_mean

FIG9_COLUMNS = (
    "network",
    "bits_source",
    "w_bits",
    "a_bits",
    "avg_bits",
    "cycles",
    "cycles_8bit",
    "speedup",
    "energy_uj",
    "energy_8bit_uj",
    "energy_reduction",
    "compute_reduction",
    "onchip_reduction",
    "offchip_reduction",
    "speedup_fc_bitparallel",
    "energy_reduction_fc_bitparallel",
)

#: The label of the summary row; its ratio columns are geometric means over the networks.
MEAN_LABEL = "GEOMEAN"


def stripes_row(choice: BitChoice) -> tuple[dict, tuple[str, ...]]:
    """One fig9 row for ``choice``: weights serial, fc layers weights-serial (and the other setting).

    Cycles are stepped (stalls counted); energies in microjoules. Returns the row and the
    simulator's notes (e.g. the MobileNet list mapping).
    """
    from releq_tvm.sim.export import totals_row
    from releq_tvm.sim.run import simulate_network

    a_text = format_bits(choice.a_bits) if choice.a_bits is not None else None
    run = simulate_network(choice.network, format_bits(choice.w_bits), a_text, mode="weights", fc_serial=True)
    r, alt = run.result, run.alternative
    row = {
        "network": choice.network,
        "bits_source": choice.source,
        "w_bits": format_bits(r.w_bits),
        "a_bits": format_bits(r.a_bits),
        "avg_bits": sum(r.w_bits) / len(r.w_bits),
        **totals_row(r),
        # Without dense layers the switch changes nothing: the same numbers.
        "speedup_fc_bitparallel": (alt or r).speedup,
        "energy_reduction_fc_bitparallel": (alt or r).energy_reduction,
    }
    notes = tuple(n for n in run.notes if not n.startswith("weight bits:")) + choice.notes
    e, e8 = r.energy, r.energy_8bit
    if e8.offchip_pj > 0:
        # Off-chip weight traffic dwarfs the rest, so a network that crosses the on-chip
        # capacity shows an energy reduction far beyond its speedup; say so next to the number.
        notes += (
            f"{choice.network}: off-chip weight traffic is {e8.offchip_pj / e8.total_pj:.0%} of the energy at 8 bits "
            f"and {e.offchip_pj / e.total_pj:.0%} at the chosen bits (weights beyond the on-chip synapse buffers); "
            "its energy_reduction is dominated by that, compare compute_reduction and onchip_reduction",
        )
    return row, notes


def mean_row(rows: Sequence[Mapping], ratio_columns: Sequence[str], label: str = MEAN_LABEL) -> dict:
    """A summary row: the geometric mean of each ratio column over ``rows`` (other cells empty)."""
    out: dict = {"network": label}
    for col in ratio_columns:
        out[col] = geometric_mean(row.get(col) for row in rows)
    return out


FIG9_RATIO_COLUMNS = (
    "speedup",
    "energy_reduction",
    "compute_reduction",
    "onchip_reduction",
    "speedup_fc_bitparallel",
    "energy_reduction_fc_bitparallel",
)


def fig9_rows(choices: Mapping[str, BitChoice]) -> tuple[list[dict], list[str]]:
    """Rows per network plus the geometric-mean row, and the notes to print above them."""
    rows, notes = [], []
    for choice in choices.values():
        row, row_notes = stripes_row(choice)
        rows.append(row)
        notes += [n for n in row_notes if n not in notes]
    return rows + [mean_row(rows, FIG9_RATIO_COLUMNS)], notes


def fig9_png(rows: Sequence[Mapping]) -> bytes:
    """Two bar panels: speedup and energy reduction per network, the geometric mean last."""
    from releq_tvm.report.plots import MEAN_COLOUR, PALETTE, bars, figure, log_axis, png_bytes

    labels = [r["network"] for r in rows]
    colours = [MEAN_COLOUR if r["network"] == MEAN_LABEL else PALETTE[0] for r in rows]
    fig, (ax1, ax2) = figure(10.0, 4.8, 1, 2)
    bars(ax1, labels, [r.get("speedup") for r in rows], colours)
    ax1.set_ylabel("speedup over Stripes at 8-bit weights (x)")
    ax1.set_title("Cycles: 8-bit / chosen bits")
    energy_colours = [MEAN_COLOUR if r["network"] == MEAN_LABEL else PALETTE[2] for r in rows]
    bars(ax2, labels, [r.get("energy_reduction") for r in rows], energy_colours)
    ax2.set_ylabel("energy reduction over 8-bit (x)")
    ax2.set_title("Energy: 8-bit / chosen bits")
    log_axis(ax2, max(float(r.get("energy_reduction") or 1) for r in rows), bottom=0.8)
    fig.suptitle("Stripes (weights serial, activations at a_bits), per network; dashed: 1x; grey: geometric mean")
    return png_bytes(fig)
