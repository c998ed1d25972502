"""``fidelity.csv``: each network measured whole against the sum of its kernels (issue 12, item 2).

One row per :class:`releq_tvm.compile.measure.NetworkComparison`, under the project's provenance
header (:class:`releq_tvm.report.provenance.Provenance`); every row also carries its machine,
TVM version, repeats and date, because rows of several runs (one per network) share the file.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from releq_tvm.report.provenance import Provenance
from releq_tvm.report.tables import csv_text, format_value, read_csv

if TYPE_CHECKING:
    from releq_tvm.compile.measure import NetworkComparison

#: Columns of :func:`write_fidelity_csv`, in order.
FIDELITY_COLUMNS = (
    "network", "w_bits", "a_bits", "batch", "layers_bits_ms", "network_bits_ms", "layers_8bit_ms", "network_8bit_ms",
    "fixed_ms", "sum_over_network_bits", "sum_over_network_8bit", "cost_ratio_predicted", "cost_ratio_measured",
    "cost_ratio_error_pct", "speedup_vs_8bit", "network_int8_ms", "network_fp32_ms", "cpu_model", "target", "tvm",
    "threads", "repeats", "where", "date",
)
#: The command that (re)makes one row of a fidelity CSV, written in its ``# command:`` header.
FIDELITY_COMMAND = "releq-tvm compile NET --no-baselines --repeats 7 --fidelity-csv {path}  (one run per network row)"
FIDELITY_NOTE = (
    "per network, the sum of per-layer kernel latencies (standalone builds) against the measured whole network, at "
    "the chosen bits and at all 8 bits; fixed_ms = network_8bit_ms - layers_8bit_ms; cost_ratio_predicted = "
    "(layers_bits + fixed) / (layers_8bit + fixed) against cost_ratio_measured = network_bits / network_8bit; "
    "network_fp32_ms: TVM untuned (default pipeline)"
)


def fidelity_row(result: NetworkComparison) -> dict:
    """One CSV row of a :func:`releq_tvm.compile.measure_network` result."""
    from releq_tvm.bits import format_bits

    m = result.machine
    return {
        "network": result.network, "w_bits": format_bits(result.w_bits), "a_bits": format_bits(result.a_bits),
        "batch": result.batch,
        "layers_bits_ms": result.sum_of_layers_ms["bits"], "network_bits_ms": result.network_ms["bits"],
        "layers_8bit_ms": result.sum_of_layers_ms["bitserial8"], "network_8bit_ms": result.network_ms["bitserial8"],
        "fixed_ms": result.fixed_ms, "sum_over_network_bits": result.sum_over_network("bits"),
        "sum_over_network_8bit": result.sum_over_network("bitserial8"),
        "cost_ratio_predicted": result.cost_ratio_predicted, "cost_ratio_measured": result.cost_ratio_measured,
        "cost_ratio_error_pct": result.cost_ratio_error_pct, "speedup_vs_8bit": result.speedup("bitserial8"),
        "network_int8_ms": result.network_ms.get("int8"), "network_fp32_ms": result.network_ms.get("fp32"),
        "cpu_model": m["cpu_model"], "target": json.dumps(m["target"], sort_keys=True), "tvm": m["tvm"],
        "threads": m.get("threads"), "repeats": result.timing.repeats, "where": result.where,
        "date": _dt.date.today().isoformat(),
    }


def write_fidelity_csv(results: Sequence[NetworkComparison], path, update: bool = False, command: str | None = None) -> None:
    """Write one row per result (columns :data:`FIDELITY_COLUMNS`) atomically, under a provenance header.

    Read it with ``pandas.read_csv(path, comment="#")``. With ``update`` the rows already in
    ``path`` are kept, except those of the same network, bits and batch, which the new results
    replace.
    """
    from releq_tvm.io import atomic_write_text

    def ident(row) -> tuple:
        return (row["network"], row["w_bits"], row["a_bits"], str(row["batch"]))

    new_rows = [{k: format_value(v) for k, v in fidelity_row(result).items()} for result in results]
    kept = []
    if update and Path(path).is_file():
        replaced = {ident(r) for r in new_rows}
        kept = [r for r in read_csv(path)[1] if ident(r) not in replaced]
    header = Provenance(command=command or FIDELITY_COMMAND.format(path=path)).header_lines([FIDELITY_NOTE])
    atomic_write_text(path, csv_text(FIDELITY_COLUMNS, kept + new_rows, header))
