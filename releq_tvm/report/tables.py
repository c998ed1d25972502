"""CSV text with a provenance header, the mean the summary rows use, and a reader for such files."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def geometric_mean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive values (None and non-positive entries are skipped).

    Speedups and reductions are ratios, so their mean is geometric: the mean of a 2x speedup
    and a 0.5x slowdown is 1x, not 1.25x. None when no value is left.
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if not kept:
        return None
    return math.exp(sum(math.log(v) for v in kept) / len(kept))


def format_value(value) -> str:
    """A CSV cell: empty for None, 6 significant digits for floats, the value otherwise."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def csv_text(columns: Sequence[str], rows: Iterable[Mapping], header_lines: Sequence[str] = ()) -> str:
    """CSV text: ``#`` header lines, the column row, then one line per row (missing cells empty)."""
    buf = io.StringIO()
    for line in header_lines:
        buf.write(line.rstrip("\n") + "\n")
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: format_value(row.get(c)) for c in columns})
    return buf.getvalue()


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(``#`` header lines without the ``#``, rows as dicts of strings) of a CSV this package wrote."""
    header: list[str] = []
    body: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not body and line.startswith("#"):
                header.append(line[1:].strip())
            else:
                body.append(line)
    return header, list(csv.DictReader(body))
