"""Stripes simulator benchmark and the published-bits result files.

    python -m releq_tvm.sim.bench speed --out results/sim_speed.csv
    python -m releq_tvm.sim.bench published --out-dir results/stripes

``speed`` times a whole-network simulation (chosen bits + the 8-bit reference, per-layer cache
cleared so every layer is really stepped) for every registered network; ResNet-20 must stay well
under a second because it sits inside the search's reward loop. ``published`` writes one CSV per
network at its published bits with both fc switch settings, each headed by the command that
reproduces it, and ``summary.csv`` with the totals and the means over networks.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path

import click

from releq_tvm.io import atomic_write_text
from releq_tvm.sim.config import StripesConfig
from releq_tvm.sim.export import provenance_lines, results_csv_text, totals_row
from releq_tvm.sim.run import command_line, simulate_network
from releq_tvm.sim.stripes import StripesSimulator, clear_cache, closed_form_cycles, stripes_cost_ratio

SPEED_COLUMNS = (
    "network",
    "layers",
    "stepped_bit_steps",
    "stepped_ms",
    "closed_form_ms",
    "cost_ratio_cached_ms",
    "repeats",
)


def _median_ms(fn, repeats: int, cold: bool) -> float:
    times = []
    for _ in range(repeats):
        if cold:
            clear_cache()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_simulator(out_path="results/sim_speed.csv", repeats: int = 5, networks=None) -> list[dict]:
    """Time the stepped simulator on every network (or ``networks``) and write ``out_path``.

    Columns: bit steps stepped (chosen bits + 8-bit reference), median wall time in ms of a cold
    stepped simulation, of a cold closed-form one, and of a warm ``stripes_cost_ratio`` call.
    """
    from releq_tvm.networks import get_network_spec, layer_table, list_networks

    names = list(networks or list_networks())
    rows = []
    sim = StripesSimulator()
    for name in names:
        table = layer_table(name)
        bits = get_network_spec(name).published_bits or (8,) * len(table)
        n = len(table)
        steps = sum(closed_form_cycles(table, bits)) + sum(closed_form_cycles(table, (8,) * n))
        stripes_cost_ratio(table, bits)  # warm the cache for the warm-path timing
        rows.append(
            {
                "network": name,
                "layers": n,
                "stepped_bit_steps": steps,
                "stepped_ms": _median_ms(lambda: sim.simulate(table, bits), repeats, cold=True),
                "closed_form_ms": _median_ms(lambda: sim.simulate(table, bits, method="closed"), repeats, cold=True),
                "cost_ratio_cached_ms": _median_ms(lambda: stripes_cost_ratio(table, bits), repeats, cold=False),
                "repeats": repeats,
            }
        )
    buf = io.StringIO()
    cmd = f"python -m releq_tvm.sim.bench speed --out {out_path} --repeats {repeats}"
    if networks:
        cmd += "".join(f" --network {n}" for n in names)
    for line in provenance_lines(cmd, ["times in ms, median of repeats; stepped and closed-form runs start with an empty cache"]):
        buf.write(line + "\n")
    writer = csv.DictWriter(buf, fieldnames=SPEED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out_path, buf.getvalue())
    return rows


SUMMARY_COLUMNS = (
    "network",
    "fc_weights_serial",
    "w_bits",
    "cycles",
    "cycles_8bit",
    "speedup",
    "energy_uj",
    "energy_8bit_uj",
    "energy_reduction",
    "compute_reduction",
    "onchip_reduction",
    "offchip_reduction",
)


def write_published_csvs(out_dir="results/stripes") -> list[Path]:
    """Write ``<out_dir>/<network>.csv`` for every registered network at its published bits, and
    ``<out_dir>/summary.csv`` with the network totals and their arithmetic means over networks.

    Weights-serial mode, 8-bit activations, stepped; rows for both ``fc_weights_serial`` settings
    (the ``fc_weights_serial`` column). Each network file is headed by the ``releq-tvm simulate``
    command that writes the same file; the summary by the command that writes them all.
    """
    from releq_tvm.networks import get_network_spec, list_networks

    out_dir = Path(out_dir)
    written = []
    defaults = StripesConfig()
    summary: list[dict] = []
    notes: list[str] = []
    for name in list_networks():
        if get_network_spec(name).published_bits is None:
            continue
        run = simulate_network(name, fc_serial=defaults.fc_weights_serial)
        path = out_dir / f"{name}.csv"
        r = run.result
        cmd = command_line(name, r.w_bits, r.a_bits, defaults.mode, defaults.fc_weights_serial, csv_path=str(path))
        results = [r] if run.alternative is None else [r, run.alternative]
        atomic_write_text(path, results_csv_text(results, provenance_lines(cmd, run.notes)))
        written.append(path)
        notes += [n for n in run.notes if not n.startswith("weight bits:")]
        for res in results:
            summary.append(
                {
                    "network": name,
                    "fc_weights_serial": int(res.config.fc_weights_serial),
                    "w_bits": ",".join(map(str, res.w_bits)),
                    **totals_row(res),
                }
            )
    for fc in (1, 0):
        rows = [row for row in summary if row["fc_weights_serial"] == fc]
        if rows:
            summary.append(
                {
                    "network": "MEAN",
                    "fc_weights_serial": fc,
                    "speedup": statistics.fmean(row["speedup"] for row in rows),
                    "energy_reduction": statistics.fmean(row["energy_reduction"] for row in rows),
                }
            )
    buf = io.StringIO()
    cmd = f"python -m releq_tvm.sim.bench published --out-dir {out_dir}"
    notes.append("published bits, weights-serial, 8-bit activations; MEAN = arithmetic mean over networks; "
                 "an empty part reduction means that part is 0 at the published bits")
    for line in provenance_lines(cmd, notes):
        buf.write(line + "\n")
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in summary:
        writer.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in SUMMARY_COLUMNS})
    summary_path = out_dir / "summary.csv"
    atomic_write_text(summary_path, buf.getvalue())
    written.append(summary_path)
    return written


@click.group()
def bench_cli():
    """Stripes simulator benchmark and published-bits CSVs."""


@bench_cli.command("speed")
@click.option("--out", "out_path", default="results/sim_speed.csv", show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--network", "networks", multiple=True, help="Only these networks (default: all).")
def _speed(out_path, repeats, networks):
    """Time the stepped and closed-form simulators on every network -> results/sim_speed.csv."""
    for row in bench_simulator(out_path, repeats, networks or None):
        click.echo(f"{row['network']:<14} stepped {row['stepped_ms']:8.2f} ms  closed {row['closed_form_ms']:7.2f} ms"
                   f"  cost_ratio (warm) {row['cost_ratio_cached_ms']:6.3f} ms  ({row['stepped_bit_steps']} steps)")
    click.echo(f"wrote {out_path}")


@bench_cli.command("published")
@click.option("--out-dir", default="results/stripes", show_default=True)
def _published(out_dir):
    """Per-network Stripes CSVs at the published bitwidths -> results/stripes/."""
    for path in write_published_csvs(out_dir):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    bench_cli()
