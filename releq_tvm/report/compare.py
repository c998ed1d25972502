"""ReLeQ's bitwidths against the ADMM-based method's (METHOD.md section 6) on CPU and Stripes.

Both methods' bits run on the same network, so "relative to its own 8-bit build" is the same
8-bit build for both: speedup = latency (cycles) at 8 bits / at the method's bits, energy
reduction = Stripes energy at 8 bits / at the method's bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from releq_tvm.bits import format_bits
from releq_tvm.report.choices import BitChoice, admm_choice

COMPARE_COLUMNS = (
    "network",
    "method",
    "bits_source",
    "w_bits",
    "a_bits",
    "mean_bits",
    "cpu_speedup",
    "stripes_speedup",
    "stripes_energy_reduction",
    "stripes_compute_reduction",
    "stripes_onchip_reduction",
    "acc_quant_test_pct",
)


def comparison_rows(
    choices: Mapping[str, BitChoice],
    stripes_row: Callable[[BitChoice], tuple[dict, tuple[str, ...]]],
    cpu_row: Callable[[BitChoice], dict] | None = None,
    accuracy: Callable[[BitChoice], float | None] | None = None,
) -> list[dict]:
    """Two rows (ReLeQ, ADMM) for every selected network that has ADMM bits (``accuracy``: test %);
    the ADMM weight bits are taken at the ReLeQ choice's activation bits, so only the weights differ."""
    rows = []
    for net, releq in choices.items():
        admm = admm_choice(net)
        if admm is None:
            continue
        for method, choice in (("ReLeQ", releq), ("ADMM", replace(admm, a_bits=releq.a_bits))):
            s, _ = stripes_row(choice)
            c = cpu_row(choice) if cpu_row is not None else None
            rows.append(
                {
                    "network": net,
                    "method": method,
                    "bits_source": choice.source,
                    "w_bits": format_bits(choice.w_bits),
                    "a_bits": format_bits(choice.a_bits) if choice.a_bits else "8",
                    "mean_bits": choice.mean_bits,
                    "cpu_speedup": None if c is None else c["speedup"],
                    "stripes_speedup": s["speedup"],
                    "stripes_energy_reduction": s["energy_reduction"],
                    "stripes_compute_reduction": s["compute_reduction"],
                    "stripes_onchip_reduction": s["onchip_reduction"],
                    "acc_quant_test_pct": accuracy(choice) if accuracy is not None else None,
                }
            )
    return rows


def comparison_png(rows: Sequence[Mapping]) -> bytes:
    """Three panels (CPU speedup, Stripes speedup, Stripes energy reduction), ReLeQ vs ADMM per network."""
    from releq_tvm.report.plots import figure, grouped_bars, png_bytes

    nets = list(dict.fromkeys(r["network"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["network"], r["method"]): r for r in rows}
    panels = (
        ("cpu_speedup", "CPU (TVM bit-serial) speedup over 8-bit (x)"),
        ("stripes_speedup", "Stripes speedup over 8-bit (x)"),
        ("stripes_energy_reduction", "Stripes energy reduction over 8-bit (x)"),
    )
    # Without CPU numbers (--skip-cpu) the CPU panel would be empty: leave it out.
    panels = tuple(p for p in panels if any(r.get(p[0]) is not None for r in rows))
    fig, axes = figure(4.4 * len(panels), 4.6, 1, len(panels), squeeze=False)
    axes = axes[0]
    for ax, (col, label) in zip(axes, panels):
        series = {
            f"{m} ({', '.join(value[(n, m)]['w_bits'] for n in nets if (n, m) in value)})" if len(nets) == 1 else m:
            [value.get((n, m), {}).get(col) for n in nets]
            for m in methods
        }
        grouped_bars(ax, nets, series)
        ax.set_ylabel(label)
        ax.set_title(label.split(" over")[0])
    def describe(n, m):
        row = value[(n, m)]
        acc = row.get("acc_quant_test_pct")
        return f"{n} {m}: {row['w_bits']}" + (f" ({acc:.2f}% test after long fine-tune)" if acc is not None else "")

    legend = "\n".join("; ".join(describe(n, m) for m in methods if (n, m) in value) for n in nets)
    fig.suptitle(f"ReLeQ vs ADMM bitwidths, each against the same network at 8 bits\n{legend}", fontsize=10)
    return png_bytes(fig)
