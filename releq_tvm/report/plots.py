"""Matplotlib on the Agg backend (no display needed), and the few drawing habits every figure shares."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # reports run headless (CI, ssh); must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402

#: One colour per series, the same everywhere (colour-blind safe Okabe-Ito palette).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MEAN_COLOUR = "#555555"


def figure(width: float = 8.0, height: float = 4.5, nrows: int = 1, ncols: int = 1, **kwargs):
    """A new figure and its axes (sizes in inches; 100 dpi on save keeps PNGs small and legible)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), **kwargs)
    return fig, axes


def png_bytes(fig, rect: tuple[float, float, float, float] | None = None) -> bytes:
    """The figure as PNG bytes (tight layout within ``rect``, figure fractions), figure closed after."""
    buf = io.BytesIO()
    try:
        if fig.get_layout_engine() is None:  # figures that chose constrained layout keep it
            fig.tight_layout(rect=rect)
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def bars(
    ax,
    labels: Sequence[str],
    values: Sequence[float | None],
    colours: Sequence[str] | None = None,
    fmt: str = "{:.2f}x",
    reference: float | None = 1.0,
) -> None:
    """One bar per label with its value written above it; missing values leave a gap marked n/a.

    ``reference`` draws a dashed line (1.0: "as fast as the 8-bit build").
    """
    xs = range(len(labels))
    heights = [0.0 if v is None else float(v) for v in values]
    colours = list(colours or [PALETTE[0]] * len(labels))
    ax.bar(xs, heights, color=colours, edgecolor="black", linewidth=0.5)
    top = max(heights + [reference or 0.0, 1e-9])
    for x, v in zip(xs, values):
        text = "n/a" if v is None else fmt.format(v)
        ax.text(x, (0 if v is None else float(v)) + top * 0.01, text, ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylim(0, top * 1.15)
    ax.grid(axis="y", alpha=0.3)


def grouped_bars(
    ax,
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    fmt: str | None = "{:.2f}x",
    reference: float | None = 1.0,
    log: bool = False,
) -> None:
    """Bars grouped per label, one colour per series (legend by series name)."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(labels))]
        heights = [float("nan") if v is None else float(v) for v in values]
        ax.bar(xs, heights, width=width, label=name, color=PALETTE[i % len(PALETTE)], edgecolor="black", linewidth=0.4)
        if fmt is not None:
            for x, v in zip(xs, values):
                if v is not None:
                    ax.text(x, float(v), fmt.format(v), ha="center", va="bottom", fontsize=7, rotation=90 if n > 2 else 0)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=0.8)
    if log:
        present = [float(v) for vs in series.values() for v in vs if v is not None and float(v) > 0]
        if present:
            log_axis(ax, max(present), bottom=min(present) / 1.5)
    ax.set_xticks(list(range(len(labels))))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def log_axis(ax, top: float, bottom: float = 0.8) -> None:
    """Log y axis from ``bottom`` to a bit above ``top`` with plain-number ticks (..., 1, 2, 5, 10, ...)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    top = max(top, bottom) * 1.6
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ticks = [m * 10.0**e for e in range(-4, 6) for m in (1, 2, 5) if bottom <= m * 10.0**e <= top]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
