"""`releq-tvm bench search NET --workers 1,2`: how many new configurations a search evaluates per
wall-clock minute with N Ray workers (issue 15's target: 1.6x at 2 workers against 1).

Each N runs the same search (same seed and settings, ``--envs`` = N) from an empty accuracy
cache of its own, so every configuration it reaches is new to it. Counted over the training
episodes of ``episodes.csv``: new configurations = lookups less cache hits (a configuration two
environments reach at once is trained once and counted once), minutes = the episodes' own wall
seconds (Ray's start and the run's set-up are left out, and reported beside as ``wall_minutes``).
The searches run one after another on this machine, so read the ratio, not the absolute rates.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from releq_tvm.search.config import SearchConfig

COLUMNS = ("workers", "envs", "training_episodes", "new_configurations", "train_minutes", "new_per_minute",
           "speedup", "wall_minutes", "cache_hit_pct")


def bench_workers(base: SearchConfig, workers: Sequence[int], root: Path,
                  echo: Callable[[str], None] = print) -> list[dict]:
    """One search per entry of ``workers`` (``base`` with ``workers``/``envs`` set, its run and
    cache under ``root/workers<N>``); returns one row per N (``speedup`` against the first N)."""
    from releq_tvm.search.run import run_search

    rows: list[dict] = []
    for n in workers:
        run_dir = Path(root) / f"workers{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        config = dataclasses.replace(
            base, workers=n, envs=None, run_dir=str(run_dir), cache_path=str(run_dir / "accuracy.sqlite"),
            stop_on_convergence=False, long_finetune=False, long_steps=0, final_episodes=1,
        )
        echo(f"--workers {n}: {config.episodes} training episodes into {run_dir}")
        start = time.perf_counter()
        run_search(config, echo=lambda line: None)
        rows.append(_row(n, run_dir, time.perf_counter() - start))
        echo(f"--workers {n}: {rows[-1]['new_configurations']} new configurations in "
             f"{rows[-1]['train_minutes']:.2f} min of training episodes: {rows[-1]['new_per_minute']:.1f} per minute")
    reference = rows[0]["new_per_minute"]
    for row in rows:
        row["speedup"] = round(row["new_per_minute"] / reference, 3) if reference and row["new_per_minute"] else None
    return rows


def _row(workers: int, run_dir: Path, wall_seconds: float) -> dict:
    with open(run_dir / "episodes.csv", newline="") as f:
        train = [r for r in csv.DictReader(f) if r["phase"] == "train"]
    lookups = sum(int(r["lookups"]) for r in train)
    new = lookups - sum(int(r["cache_hits"]) for r in train)
    minutes = sum(float(r["seconds"]) for r in train) / 60.0
    return {
        "workers": workers,
        "envs": workers,
        "training_episodes": len(train),
        "new_configurations": new,
        "train_minutes": round(minutes, 3),
        "new_per_minute": round(new / minutes, 2) if minutes > 0 else None,
        "wall_minutes": round(wall_seconds / 60.0, 3),
        "cache_hit_pct": round(100.0 * (lookups - new) / max(lookups, 1), 1),
    }
