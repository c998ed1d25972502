"""Facts about this machine that every result file records (stdlib only: cheap to import)."""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model string of this machine (``/proc/cpuinfo`` model name), e.g. ``AMD EPYC 7B13``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
