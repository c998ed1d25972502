"""Search runs side by side (seeds, ablations): how each ended, and the front of what they saw.

``<out>.csv``        one row per run: its variant (the settings that differ from the
                     defaults), seed, the search's own convergence episode or "not converged",
                     training episodes, wall and CPU minutes, cache hits, the chosen (w, a) bits
                     with their val accuracy, cost ratio and reward, and the long fine-tune's
                     test accuracy against full precision;
``<out>_front.csv``  every distinct configuration any seed evaluated during training, with its
                     val accuracy after the short fine-tune and its cost ratio, the Pareto front
                     over them (higher accuracy, lower cost) marked, and the long fine-tune's test
                     accuracy where one was run (the seeds' chosen bits, plus ``--long-front``);
``<out>.png``        left: episodes per seed (to convergence, or the budget); right: every
                     evaluated configuration, the front and the 1.0 line (with ``--cpu-kernels
                     auto`` that line is the int8 build: left of it is faster than int8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from releq_tvm.bits import format_bits
from releq_tvm.io import atomic_write_bytes, atomic_write_text
from releq_tvm.report.pareto import pareto_front
from releq_tvm.report.plots import PALETTE, figure, png_bytes
from releq_tvm.report.provenance import Provenance
from releq_tvm.report.runs import SearchRun
from releq_tvm.report.tables import csv_text

SEED_COLUMNS = (
    "run", "variant", "network", "seed", "measure", "cpu_kernels", "reward", "converged_episode", "training_episodes", "episode_budget",
    "wall_min", "cpu_min", "cache_hit_rate", "w_bits", "a_bits", "accuracy_val_pct", "cost_ratio", "reward_value",
    "solution_source", "test_acc_long_finetune_pct", "test_acc_full_precision_pct", "loss_pp",
)
FRONT_COLUMNS = (
    "w_bits", "a_bits", "accuracy_val_pct", "cost_ratio", "faster_than_reference", "on_front", "seen_by_seeds",
    "first_seen", "test_acc_long_finetune_pct", "loss_pp",
)

Config = tuple[tuple[int, ...], tuple[int, ...] | None]


def _bits_text(bits) -> str:
    return "" if not bits else format_bits(bits)


#: Settings a variant is named by when they differ from :class:`SearchConfig`'s defaults.
VARIANT_SETTINGS = ("reward", "weight_std_in_state", "cpu_kernels", "action_set", "act_action_set", "max_loss",
                    "latency_target", "ppo_clip_range", "ppo_learning_rate", "ppo_n_epochs", "ppo_ent_coef",
                    "ppo_normalize_advantage", "short_steps", "episodes", "envs", "workers")


def variant_of(run: SearchRun) -> str:
    """``reward=hardware; weight_std_in_state=False`` (the settings of :data:`VARIANT_SETTINGS` that
    differ from the defaults), or ``defaults``."""
    from dataclasses import fields

    from releq_tvm.search.config import SearchConfig

    defaults = {f.name: f.default for f in fields(SearchConfig)}
    changed = []
    for name in VARIANT_SETTINGS:
        value = run.config.get(name, defaults[name])
        default = defaults[name]
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if value != default:
            changed.append(f"{name}={format_bits(value) if isinstance(value, tuple) else value}")
    return "; ".join(changed) or "defaults"


def seed_rows(runs: Sequence[SearchRun]) -> list[dict]:
    """One row per run, in the order given."""
    rows = []
    for run in runs:
        sol, best, long = run.solution, run.best, run.best.get("long_finetune") or {}
        cache = best.get("cache") or {}
        rows.append({
            "run": str(run.path),
            "variant": variant_of(run),
            "network": run.network,
            "seed": run.seed,
            "measure": run.measure,
            "cpu_kernels": run.config.get("cpu_kernels", ""),
            "reward": run.reward_label,
            "converged_episode": best.get("converged_episode") or "not converged",
            "training_episodes": best.get("training_episodes"),
            "episode_budget": run.config.get("episodes"),
            "wall_min": round(float(best.get("elapsed_seconds", 0.0)) / 60, 2),
            "cpu_min": round(float(best.get("cpu_seconds", 0.0)) / 60, 2),
            "cache_hit_rate": cache.get("hit_rate"),
            "w_bits": _bits_text(sol.get("w_bits")),
            "a_bits": _bits_text(sol.get("a_bits")),
            "accuracy_val_pct": sol.get("accuracy_val"),
            "cost_ratio": sol.get("cost_ratio"),
            "reward_value": sol.get("reward"),
            "solution_source": sol.get("source", "best training episode (run unfinished)"),
            "test_acc_long_finetune_pct": long.get("test_accuracy_quantized"),
            "test_acc_full_precision_pct": long.get("test_accuracy_full_precision"),
            "loss_pp": long.get("loss_pp"),
        })
    return rows


@dataclass(frozen=True)
class SeenConfiguration:
    """A configuration evaluated during training by at least one seed."""

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...] | None
    accuracy: float  # val %, after the short fine-tune
    cost: float  # the cost ratio the reward saw
    seeds: tuple[str, ...]
    first_seen: str  # "seed<N> episode <E>"


def seen_configurations(runs: Sequence[SearchRun]) -> list[SeenConfiguration]:
    """Every distinct (w, a) the runs' training episodes ended at, in order of first sight."""
    found: dict[Config, dict] = {}
    for run in runs:
        for e in run.train_episodes:
            if e.accuracy is None:
                continue
            key = (tuple(e.bits), None if e.a_bits is None else tuple(e.a_bits))
            entry = found.setdefault(key, {"accuracy": e.accuracy, "cost": e.cost, "seeds": [],
                                           "first": f"seed{run.seed} episode {e.episode}"})
            if run.seed not in entry["seeds"]:
                entry["seeds"].append(run.seed)
    return [SeenConfiguration(w, a, v["accuracy"], v["cost"], tuple(v["seeds"]), v["first"])
            for (w, a), v in found.items()]


def front_of(seen: Sequence[SeenConfiguration]) -> list[SeenConfiguration]:
    """The Pareto front (lower cost, higher val accuracy), cheapest first."""
    if not seen:
        return []
    mask = pareto_front([s.cost for s in seen], [s.accuracy for s in seen])
    return sorted((s for s, on in zip(seen, mask) if on), key=lambda s: (s.cost, -s.accuracy))


def long_results(runs: Sequence[SearchRun]) -> dict[Config, dict]:
    """The long fine-tunes the runs themselves did (of their chosen bits), by configuration."""
    out: dict[Config, dict] = {}
    for run in runs:
        long, sol = run.best.get("long_finetune"), run.solution
        if long and sol.get("w_bits"):
            a = sol.get("a_bits")
            out[(tuple(sol["w_bits"]), None if a is None else tuple(a))] = long
    return out


def front_rows(seen: Sequence[SeenConfiguration], long: Mapping[Config, dict]) -> list[dict]:
    """Rows of ``<out>_front.csv``: every seen configuration, cheapest first, the front marked."""
    on_front = {(s.w_bits, s.a_bits) for s in front_of(seen)}
    rows = []
    for s in sorted(seen, key=lambda s: (s.cost, -s.accuracy)):
        result = long.get((s.w_bits, s.a_bits)) or {}
        rows.append({
            "w_bits": _bits_text(s.w_bits),
            "a_bits": _bits_text(s.a_bits),
            "accuracy_val_pct": s.accuracy,
            "cost_ratio": round(s.cost, 6),
            "faster_than_reference": s.cost < 1.0,
            "on_front": (s.w_bits, s.a_bits) in on_front,
            "seen_by_seeds": " ".join(s.seeds),
            "first_seen": s.first_seen,
            "test_acc_long_finetune_pct": result.get("test_accuracy_quantized"),
            "loss_pp": result.get("loss_pp"),
        })
    return rows


def _write_csv(path, rows: Sequence[dict], columns: Sequence[str], command: str, notes: Sequence[str]) -> None:
    seed = "per row" if "seed" in columns else "see the seeds file"
    atomic_write_text(path, csv_text(columns, rows, Provenance(command=command, seed=seed).header_lines(notes)))


def write_seed_files(runs: Sequence[SearchRun], out, command: str, long: Mapping[Config, dict],
                     notes: Sequence[str] = ()) -> tuple[str, str, str]:
    """Write ``out`` (per seed), ``<out stem>_front.csv`` and ``<out stem>.png``; returns the three paths."""
    out = Path(out)
    front_path, png_path = out.with_name(out.stem + "_front.csv"), out.with_suffix(".png")
    seen = seen_configurations(runs)
    reference = _reference_name(runs)
    seeds = seed_rows(runs)
    common = [f"reference of the cost ratio (1.0): {reference}",
              "wall_min: the run's own episodes only (resumed runs add up); runs that ran side by side on this "
              "machine's cores, or that found configurations in the shared accuracy cache, took less or more time "
              "than a lone fresh run would", *notes]
    _write_csv(out, seeds, SEED_COLUMNS, command, common)
    front_notes = [*common, "accuracy_val_pct: val subset after the short fine-tune (what the reward saw); "
                            "test_acc_long_finetune_pct: after the long fine-tune, where one was run"]
    _write_csv(front_path, front_rows(seen, long), FRONT_COLUMNS, command, front_notes)
    atomic_write_bytes(png_path, seeds_png(runs, seeds, seen, long, reference))
    return str(out), str(front_path), str(png_path)


def _reference_name(runs: Sequence[SearchRun]) -> str:
    run = runs[0]
    if run.measure == "cpu":
        return ("the int8 build (auto at 8 bits)" if run.config.get("cpu_kernels", "auto") == "auto"
                else "the bit-serial build at 8 bits")
    return "the same network at 8 bits" if run.measure != "none" else "SQ of all 8 bits"


def seeds_png(runs: Sequence[SearchRun], rows: Sequence[dict], seen: Sequence[SeenConfiguration],
              long: Mapping[Config, dict], reference: str) -> bytes:
    """The figure of :func:`write_seed_files` (``rows``: :func:`seed_rows` of ``runs``)."""
    fig, (left, right) = figure(12.0, 4.6, 1, 2)
    variants = {r["variant"] for r in rows}
    labels = [f"seed {r['seed']}" if len(variants) == 1 else f"{r['variant']}\nseed {r['seed']}" for r in rows]
    episodes = [int(r["training_episodes"] or 0) for r in rows]
    converged = [r["converged_episode"] != "not converged" for r in rows]
    left.bar(range(len(rows)), episodes, color=[PALETTE[2] if c else PALETTE[3] for c in converged],
             edgecolor="black", linewidth=0.5)
    for x, r in enumerate(rows):
        text = (f"conv. {r['converged_episode']}" if converged[x] else "not conv.") + f"\n{r['wall_min']:.0f} min"
        left.text(x, episodes[x], text, ha="center", va="bottom", fontsize=8)
    budget = max(int(r["episode_budget"] or 0) for r in rows)
    left.axhline(budget, color="black", linestyle="--", linewidth=0.8)
    left.set_xticks(range(len(rows)))
    left.set_xticklabels(labels)
    left.set_ylim(0, budget * 1.2)
    left.set_ylabel("training episodes")
    left.set_title("episodes per run (green: converged; dashed: budget)")
    left.grid(axis="y", alpha=0.3)

    cost = np.array([s.cost for s in seen])
    acc = np.array([s.accuracy for s in seen])
    right.scatter(cost, acc, s=8, color=PALETTE[5], alpha=0.4, label="evaluated (short fine-tune, val)")
    front = front_of(seen)
    right.plot([s.cost for s in front], [s.accuracy for s in front], "-o", color=PALETTE[0], markersize=4,
               label="Pareto front (val)")
    done = [(s, long[(s.w_bits, s.a_bits)]) for s in seen if (s.w_bits, s.a_bits) in long]
    if done:
        right.scatter([s.cost for s, _ in done], [r["test_accuracy_quantized"] for _, r in done], marker="*", s=120,
                      color=PALETTE[1], edgecolor="black", zorder=3, label="after the long fine-tune (test)")
    for i, r in enumerate(rows):
        if r["cost_ratio"] is not None and r["accuracy_val_pct"] is not None:
            right.annotate(f"s{r['seed']}" if len(variants) == 1 else f"run {i + 1}", (float(r["cost_ratio"]), float(r["accuracy_val_pct"])), fontsize=7,
                           xytext=(3, 3 + 6 * i), textcoords="offset points")
    right.axvline(1.0, color="black", linestyle="--", linewidth=0.8, label=f"1.0 = {reference}")
    top = max([float(a) for a in acc] + [r["test_accuracy_quantized"] for _, r in done] or [100.0])
    right.set_ylim(max(float(np.percentile(acc, 5)) - 1.0 if acc.size else 0.0, 0.0), top + 0.3)
    right.set_xlabel("cost ratio")
    right.set_ylabel("accuracy (%)")
    right.set_title("every configuration the seeds evaluated")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    net = runs[0].network
    fig.suptitle(f"{net}: {len(rows)} searches ({', '.join(sorted(variants))}), --measure {runs[0].measure}"
                 + (" --search-activations" if runs[0].config.get("search_activations") else ""))
    return png_bytes(fig, rect=(0, 0, 1, 0.95))
