"""Progress bars for long work: latency-table builds, long fine-tunes, Pareto scoring.

A bar is drawn on stderr only when stderr is a terminal. Piped or redirected output, CI logs and
pytest's captured output get nothing at all, so no log or result file ever holds bar frames.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Yield every item of ``items``, drawing a bar on stderr while they are consumed when it is a terminal.

    ``total`` defaults to ``len(items)`` when it has one. The bar is erased when the loop ends:
    it only says how far along the work is, and the caller prints what the work produced.
    """
    stream = sys.stderr  # looked up at each call: pytest and click's CliRunner swap sys.stderr
    isatty = getattr(stream, "isatty", None)  # sys.stderr may be None (pythonw) or a bare writer
    on_terminal = isatty is not None and isatty()
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=stream, disable=not on_terminal, leave=False,
                     dynamic_ncols=True))
