"""The search-efficiency comparison written out: ``results/search_efficiency.csv`` and its figure.

The rows come from :func:`releq_tvm.search.efficiency.compare_search_methods` (one per method,
each with the ``trace`` of every configuration it evaluated).
"""

from __future__ import annotations

import numpy as np

from releq_tvm.io import atomic_write_text
from releq_tvm.report.plots import PALETTE, figure, png_bytes
from releq_tvm.report.provenance import Provenance, package_version
from releq_tvm.report.tables import csv_text
from releq_tvm.search.config import SearchConfig


#: Columns of :func:`write_efficiency_csv`, in order (a row's ``trace`` is for the figure only).
EFFICIENCY_COLUMNS = (
    "network", "method", "bit_set", "budget", "configurations", "episodes", "best_bits", "accuracy_val", "sa",
    "cost_ratio", "reward", "winner", "dominated_by", "cache_hits", "seconds",
)


def write_efficiency_csv(rows: list[dict], path, command: str, config: SearchConfig) -> None:
    """CSV headed by the ``#`` provenance lines every results file carries (command, machine, versions)."""
    agent = ", ".join(f"{d} {package_version(d)}" for d in ("stable-baselines3", "sb3-contrib", "gymnasium"))
    notes = [
        f"agent: {agent}",
        f"reward {config.reward}, measure {config.measure}, accuracy {config.accuracy} ({config.short_steps} short "
        f"fine-tune steps, first {config.val_images} val images), max loss {config.max_loss} pp",
        "budget = distinct configurations each method may evaluate; best = highest reward among them; seconds: wall "
        "time in this invocation, where configurations already in the accuracy cache (from earlier methods or runs) "
        "cost no fine-tune, so compare configurations, not seconds",
    ]
    header = Provenance(command=command, seed=str(config.seed)).header_lines(notes)
    atomic_write_text(path, csv_text(EFFICIENCY_COLUMNS, rows, header))


def efficiency_png(rows: list[dict]) -> bytes:
    """Left: best reward so far against configurations evaluated, per method. Right: every evaluated
    point's val accuracy against cost ratio, each method's best marked."""
    fig, (left, right) = figure(12.0, 4.6, 1, 2)
    for colour, row in zip(PALETTE, rows):
        trace = row["trace"]
        label = f"{row['method']} ({{{row['bit_set']}}})"
        best = np.maximum.accumulate([r for _, _, r in trace])
        left.plot(np.arange(1, len(best) + 1), best, color=colour, label=label)
        right.scatter([c for _, c, _ in trace], [a for a, _, _ in trace], s=9, color=colour, alpha=0.45, label=label)
        right.scatter([row["cost_ratio"]], [row["accuracy_val"]], s=140, marker="*", color=colour, edgecolor="black",
                      zorder=3, label=f"{row['method']} best: {row['best_bits']}")
    left.set_xlabel("configurations evaluated (short fine-tune each)")
    left.set_ylabel("best reward so far")
    left.set_title("best reward found against configurations evaluated")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel(f"cost ratio to 8 bits ({rows[0].get('measure', 'cost')})")
    right.set_ylabel("val accuracy (%) after the short fine-tune")
    right.set_title("every evaluated configuration; stars: each method's best")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    net = rows[0]["network"]
    fig.suptitle(f"Search efficiency on {net}: the same budget of {rows[0]['budget']} configurations per method")
    return png_bytes(fig, rect=(0, 0, 1, 0.95))
