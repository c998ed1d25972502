"""Stripes results as a readable table, a JSON-ready dict and CSV rows (energies in uJ)."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict

from releq_tvm.bits import format_bits
from releq_tvm.machine import cpu_model
from releq_tvm.sim.stripes import EnergyParts, SimResult

PJ_PER_UJ = 1e6

CSV_COLUMNS = (
    "network",
    "mode",
    "fc_weights_serial",
    "method",
    "layer_index",
    "layer",
    "kind",
    "dataflow",
    "w_bits",
    "a_bits",
    "cycles",
    "cycles_8bit",
    "stall_cycles",
    "speedup",
    "energy_compute_uj",
    "energy_onchip_uj",
    "energy_offchip_uj",
    "energy_total_uj",
    "energy_8bit_compute_uj",
    "energy_8bit_onchip_uj",
    "energy_8bit_offchip_uj",
    "energy_8bit_total_uj",
    "energy_reduction",
)


def _uj(pj: float) -> float:
    return pj / PJ_PER_UJ


def _energy_fields(prefix: str, e: EnergyParts) -> dict[str, float]:
    return {
        f"{prefix}_compute_uj": _uj(e.compute_pj),
        f"{prefix}_onchip_uj": _uj(e.onchip_pj),
        f"{prefix}_offchip_uj": _uj(e.offchip_pj),
        f"{prefix}_total_uj": _uj(e.total_pj),
    }


def result_rows(result: SimResult) -> list[dict]:
    """One dict per layer plus a ``TOTAL`` row, keyed by :data:`CSV_COLUMNS`."""
    common = {
        "network": result.network,
        "mode": result.config.mode,
        "fc_weights_serial": int(result.config.fc_weights_serial),
        "method": result.method,
    }
    rows = []
    for r in result.layers:
        rows.append(
            {
                **common,
                "layer_index": r.index,
                "layer": r.name,
                "kind": r.kind,
                "dataflow": r.dataflow,
                "w_bits": r.w_bits,
                "a_bits": r.a_bits,
                "cycles": r.cycles,
                "cycles_8bit": r.cycles_8bit,
                "stall_cycles": r.stall_cycles,
                "speedup": r.speedup,
                **_energy_fields("energy", r.energy),
                **_energy_fields("energy_8bit", r.energy_8bit),
                "energy_reduction": r.energy_reduction,
            }
        )
    rows.append(
        {
            **common,
            "layer_index": "",
            "layer": "TOTAL",
            "kind": "",
            "dataflow": "",
            "w_bits": format_bits(result.w_bits),
            "a_bits": format_bits(result.a_bits),
            "cycles": result.cycles,
            "cycles_8bit": result.cycles_8bit,
            "stall_cycles": result.stall_cycles,
            "speedup": result.speedup,
            **_energy_fields("energy", result.energy),
            **_energy_fields("energy_8bit", result.energy_8bit),
            "energy_reduction": result.energy_reduction,
        }
    )
    return rows


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.9g}"
    return v


def provenance_lines(command: str, notes: Sequence[str] = ()) -> list[str]:
    """``# key: value`` lines: the command that made a file, the machine, versions, time, notes."""
    import numpy

    from releq_tvm import __version__

    return [
        f"# command: {command}",
        f"# machine: {platform.platform()}; cpu: {cpu_model()}; cores: {os.cpu_count()}",
        f"# versions: releq-tvm {__version__}; python {sys.version.split()[0]}; numpy {numpy.__version__}",
        f"# made: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}; seed: none (deterministic)",
        *(f"# note: {n}" for n in notes),
    ]


def results_csv_text(results: Sequence[SimResult], header_lines: Sequence[str] = ()) -> str:
    """CSV text of several results (e.g. both fc switch settings), after ``#`` header lines."""
    buf = io.StringIO()
    for line in header_lines:
        buf.write(line.rstrip("\n") + "\n")
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        for row in result_rows(result):
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buf.getvalue()


def totals_row(result: SimResult) -> dict:
    """Flat network totals for summary tables: cycles and speedup, energy (uJ) and its reductions by part."""
    parts = result.part_reductions()
    return {
        "cycles": result.cycles,
        "cycles_8bit": result.cycles_8bit,
        "speedup": result.speedup,
        "energy_uj": _uj(result.energy.total_pj),
        "energy_8bit_uj": _uj(result.energy_8bit.total_pj),
        "energy_reduction": result.energy_reduction,
        "compute_reduction": parts["compute"],
        "onchip_reduction": parts["onchip"],
        "offchip_reduction": parts["offchip"],
    }


def summary_dict(result: SimResult) -> dict:
    """Network totals: cycles, speedup and the energy split (uJ) with its reductions."""
    return {
        "fc_weights_serial": result.config.fc_weights_serial,
        "cycles": result.cycles,
        "cycles_8bit": result.cycles_8bit,
        "stall_cycles": result.stall_cycles,
        "speedup": result.speedup,
        **_energy_fields("energy", result.energy),
        **_energy_fields("energy_8bit", result.energy_8bit),
        "energy_reduction": result.energy_reduction,
        "energy_reduction_by_part": result.part_reductions(),
    }


def result_to_dict(result: SimResult, alternative: SimResult | None = None, notes: Sequence[str] = ()) -> dict:
    """JSON-ready dict: the configuration, per-layer rows, totals and the other fc setting's totals."""
    out = {
        "network": result.network,
        "mode": result.config.mode,
        "method": result.method,
        "w_bits": list(result.w_bits),
        "a_bits": list(result.a_bits),
        "config": asdict(result.config),
        "layers": [{k: v for k, v in row.items() if k not in ("network", "mode", "method")} for row in result_rows(result)[:-1]],
        "totals": summary_dict(result),
        "notes": list(notes),
    }
    if alternative is not None:
        out["fc_switch_alternative"] = summary_dict(alternative)
    return out


def _x(v: float | None, reference_pj: float) -> str:
    if v is not None:
        return f"{v:.2f}x"
    # None: the part is 0 at the chosen bits; say whether it vanished or was never there.
    return "all removed" if reference_pj > 0 else "none"


def format_result_table(result: SimResult, alternative: SimResult | None = None, notes: Sequence[str] = ()) -> str:
    """The per-layer table and totals the CLI prints (energies in uJ)."""
    cfg = result.config
    fc = "weights-serial" if cfg.fc_weights_serial else "bit-parallel (DaDN rate)"
    head = f"{result.network or 'network'}: Stripes, {cfg.mode}-serial"
    if cfg.mode == "weights":
        head += f"; fc layers {fc}"
    head += f"; SIP array area +{cfg.sip_area_overhead:.0%} over DaDN (a parameter, not a result)"
    lines = [head, *(f"note: {n}" for n in notes)]
    cols = f"{'#':>3} {'layer':<22} {'kind':<6} {'w':>2} {'a':>2} {'cycles':>10} {'8-bit cyc':>10} {'speedup':>8} {'stalls':>8}"
    cols += f" {'E comp uJ':>10} {'E on uJ':>10} {'E off uJ':>10}"
    lines += [cols, "-" * len(cols)]
    for r in result.layers:
        e = r.energy
        lines.append(
            f"{r.index:>3} {r.name[:22]:<22} {r.kind:<6} {r.w_bits:>2} {r.a_bits:>2} {r.cycles:>10} {r.cycles_8bit:>10}"
            f" {r.speedup:>7.2f}x {r.stall_cycles:>8} {_uj(e.compute_pj):>10.4f} {_uj(e.onchip_pj):>10.4f}"
            f" {_uj(e.offchip_pj):>10.4f}"
        )
    e, e8 = result.energy, result.energy_8bit
    lines.append("-" * len(cols))
    lines.append(
        f"{'':>3} {'TOTAL':<22} {'':<6} {'':>2} {'':>2} {result.cycles:>10} {result.cycles_8bit:>10}"
        f" {result.speedup:>7.2f}x {result.stall_cycles:>8} {_uj(e.compute_pj):>10.4f} {_uj(e.onchip_pj):>10.4f}"
        f" {_uj(e.offchip_pj):>10.4f}"
    )
    parts = result.part_reductions()
    lines.append(f"speedup over the same Stripes at 8 bits: {result.speedup:.3f}x")
    lines.append(
        f"energy: {_uj(e.total_pj):.4f} uJ vs {_uj(e8.total_pj):.4f} uJ at 8 bits -> reduction "
        f"{result.energy_reduction:.3f}x (compute {_x(parts['compute'], e8.compute_pj)} of {_uj(e8.compute_pj):.4f} uJ, "
        f"on-chip {_x(parts['onchip'], e8.onchip_pj)} of {_uj(e8.onchip_pj):.4f} uJ, "
        f"off-chip {_x(parts['offchip'], e8.offchip_pj)} of {_uj(e8.offchip_pj):.4f} uJ)"
    )
    if alternative is not None:
        flag = "--fc-serial" if alternative.config.fc_weights_serial else "--no-fc-serial"
        lines.append(
            f"with {flag}: speedup {alternative.speedup:.3f}x, energy reduction "
            f"{alternative.energy_reduction:.3f}x"
        )
    return "\n".join(lines)


__all__ = [
    "CSV_COLUMNS",
    "format_result_table",
    "provenance_lines",
    "result_rows",
    "result_to_dict",
    "results_csv_text",
    "summary_dict",
]
