"""Search diagnostics from run directories: convergence per network, reward and clip ablations.

* ``convergence_<net>.csv/.png``: SA, cost and reward per episode with a trailing moving
  average, and per layer the probability of each bitwidth over episodes (heat maps);
* ``reward_ablation.csv/.png``: runs that differ only in the reward form (asymmetric,
  SA/SQ, SA-SQ) at the default clip;
* ``clip_sensitivity.csv/.png``: runs of the asymmetric reward that differ in PPO clip.

Two convergence episodes are reported: the search's own test (``converged_episode`` in
best.json: the same greedy bits over a window of episodes with high probability) and
``choice_fixed_episode``, the first training episode from which the policy's most likely bits
never change again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from releq_tvm.bits import format_bits
from releq_tvm.report.runs import (
    SearchRun,
    choice_fixed_episode,
    moving_average,
    search_converged_episode,
)

#: Trailing window of every moving average, in episodes.
MOVING_AVERAGE_EPISODES = 10


def convergence_columns(n_layers: int) -> tuple[str, ...]:
    base = ("episode", "phase", "w_bits", "accuracy_val_pct", "sa", "sa_ma", "cost", "cost_ma", "reward", "reward_ma",
            "greedy_bits")
    per_layer = tuple(c for l in range(n_layers) for c in (f"layer{l}_likely_bits", f"layer{l}_p"))
    return base + per_layer


def convergence_rows(run: SearchRun, window: int = MOVING_AVERAGE_EPISODES) -> list[dict]:
    """Per-episode rows: scores, their moving averages (over training episodes; the greedy
    read-off episodes carry none) and each layer's most likely bits with its probability."""
    train = run.train_episodes
    ma = {k: moving_average([getattr(e, k) for e in train], window) for k in ("sa", "cost", "reward")}
    prob_index = {e: i for i, e in enumerate(run.prob_episodes)}
    rows = []
    t = 0
    for e in run.episodes:
        row = {
            "episode": e.episode,
            "phase": e.phase,
            "w_bits": format_bits(e.bits),
            "accuracy_val_pct": e.accuracy,
            "sa": e.sa,
            "cost": e.cost,
            "reward": e.reward,
            "greedy_bits": format_bits(e.greedy_bits) if e.greedy_bits else None,
        }
        if e.phase == "train":
            row.update(sa_ma=float(ma["sa"][t]), cost_ma=float(ma["cost"][t]), reward_ma=float(ma["reward"][t]))
            t += 1
        if run.probs is not None and e.episode in prob_index:
            for l, p in enumerate(run.probs[prob_index[e.episode]]):
                k = int(np.nanargmax(p))
                row[f"layer{l}_likely_bits"] = run.action_set[k]
                row[f"layer{l}_p"] = float(p[k])
        rows.append(row)
    return rows


def convergence_png(run: SearchRun, window: int = MOVING_AVERAGE_EPISODES) -> bytes:
    """Top: SA, cost, reward per training episode (dots), moving average (line), greedy read-off
    episodes (crosses). Below: one heat map per layer, bitwidth (rows) by episode (columns),
    colour = the policy's probability of that bitwidth."""
    from releq_tvm.report.plots import PALETTE, plt, png_bytes

    train, greedy = run.train_episodes, [e for e in run.episodes if e.phase != "train"]
    x = np.array([e.episode for e in train])
    probs = run.probs
    n_layers = 0 if probs is None else probs.shape[1]
    ncols = 4
    map_rows = (n_layers + ncols - 1) // ncols
    # Constrained layout with two sub-figures keeps titles, legends and the shared colour bar apart.
    fig = plt.figure(figsize=(13.0, 4.2 + 2.0 * map_rows), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, 2.0 * max(map_rows, 1)]) if map_rows else (fig, None)
    top_axes = top.subplots(1, 3)
    cost_label = "SQ" if run.measure == "none" else f"cost ratio ({run.measure})"
    series = (("sa", "SA = val acc / full precision"), ("cost", cost_label), ("reward", f"reward ({run.reward_name})"))
    fixed = choice_fixed_episode(run)
    converged = search_converged_episode(run)
    for k, (attr, label) in enumerate(series):
        ax = top_axes[k]
        y = np.array([getattr(e, attr) for e in train])
        ax.plot(x, y, ".", ms=3, alpha=0.35, color=PALETTE[k], label="training episode")
        ax.plot(x, moving_average(y, window), color=PALETTE[k], linewidth=2, label=f"moving average ({window})")
        if greedy:
            ax.plot([e.episode for e in greedy], [getattr(e, attr) for e in greedy], "x", color="black", ms=6,
                    label="deterministic read-off")
        if converged is not None:
            ax.axvline(converged, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("episode")
        ax.set_ylabel(label)
        ax.set_title(label.split(" =")[0].split(" (")[0] + " per episode")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    image = None
    pe = np.array(run.prob_episodes)
    map_axes = bottom.subplots(map_rows, ncols, squeeze=False).ravel() if map_rows else []
    for l, ax in enumerate(map_axes):
        if l >= n_layers:
            ax.axis("off")
            continue
        image = ax.imshow(
            probs[:, l, :].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
            extent=(pe[0] - 0.5, pe[-1] + 0.5, -0.5, len(run.action_set) - 0.5),
        )
        ax.set_yticks(range(len(run.action_set)))
        ax.set_yticklabels(run.action_set, fontsize=6)
        ax.set_title(f"layer {l}: P(weight bits), chosen {run.choice().w_bits[l]}", fontsize=8)
        ax.set_ylabel("bits", fontsize=7)
        ax.set_xlabel("episode", fontsize=7)
        ax.tick_params(labelsize=6)
        if fixed is not None:
            ax.axvline(fixed, color="white", linestyle=":", linewidth=0.9)
    if image is not None:
        bottom.colorbar(image, ax=list(map_axes), shrink=0.8, label="probability")
    title = (f"Search on {run.network}: reward {run.reward_label}, clip {run.clip_range:g}, cost {run.measure}, "
             f"seed {run.seed} ({run.name}); chosen {format_bits(run.choice().w_bits)}")
    marks = []
    if converged is not None:
        marks.append(f"converged (search's test) at episode {converged}: dashed")
    if fixed is not None:
        marks.append(f"most likely bits fixed from episode {fixed}: dotted")
    top.suptitle(title + ("\n" + "; ".join(marks) if marks else ""), fontsize=11)
    return png_bytes(fig)


# ---------------------------------------------------------------------------- ablations

ABLATION_COLUMNS = (
    "network",
    "reward",
    "clip_range",
    "seed",
    "run",
    "training_episodes",
    "converged_episode",
    "choice_fixed_episode",
    "w_bits",
    "mean_bits",
    "final_sa",
    "final_cost",
    "final_reward_ma",
    "test_acc_quant_pct",
    "test_acc_fp32_pct",
    "ppo_updates",
    "clipped_updates",
    "max_clip_fraction",
    "max_approx_kl",
)


def ablation_row(run: SearchRun, window: int = MOVING_AVERAGE_EPISODES) -> dict:
    """One run's outcome: convergence episodes, chosen bits, their SA and cost, final test accuracy."""
    bits = run.choice().w_bits
    sol = run.solution
    long = run.best.get("long_finetune") or {}
    rewards = [e.reward for e in run.train_episodes] or [e.reward for e in run.episodes]
    ppo = run.ppo
    return {
        "network": run.network,
        "reward": run.reward_label,
        "clip_range": run.clip_range,
        "seed": run.seed,
        "run": str(run.path),
        "training_episodes": len(run.train_episodes),
        "converged_episode": search_converged_episode(run),
        "choice_fixed_episode": choice_fixed_episode(run),
        "w_bits": format_bits(bits),
        "mean_bits": sum(bits) / len(bits),
        "final_sa": sol.get("sa"),
        "final_cost": sol.get("cost_ratio"),
        "final_reward_ma": float(moving_average(rewards, window)[-1]),
        "test_acc_quant_pct": long.get("test_accuracy_quantized"),
        "test_acc_fp32_pct": long.get("test_accuracy_full_precision"),
        "ppo_updates": None if ppo is None else ppo.updates,
        "clipped_updates": None if ppo is None else ppo.clipped_updates,
        "max_clip_fraction": None if ppo is None else ppo.max_clip_fraction,
        "max_approx_kl": None if ppo is None else ppo.max_approx_kl,
    }


def ablation_groups(runs: Sequence[SearchRun], vary: str) -> dict[str, list[SearchRun]]:
    """Per network, the runs of an ablation: ``vary="reward"`` (default clip) or ``"clip"`` (asymmetric).

    A network appears only when its runs cover at least two values of the varied setting.
    """
    from releq_tvm.config import DEFAULTS

    by_net: dict[str, list[SearchRun]] = defaultdict(list)
    for run in runs:
        if vary == "reward" and abs(run.clip_range - DEFAULTS.ppo.clip_range) < 1e-9:
            by_net[run.network].append(run)
        elif vary == "clip" and run.reward_label == "asymmetric":
            by_net[run.network].append(run)
    key = (lambda r: r.reward_label) if vary == "reward" else (lambda r: r.clip_range)
    return {
        net: sorted(group, key=lambda r: (str(key(r)), r.seed, r.name))
        for net, group in by_net.items()
        if len({key(r) for r in group}) >= 2
    }


def identical_trajectories(group: Sequence[SearchRun]) -> bool:
    """True when every run of ``group`` chose the same bits and earned the same rewards, episode by episode.

    For a clip-range ablation this means the clip never bound: every update kept the policy
    ratio inside the smallest 1 +- clip, so the runs' gradients, and hence their episodes, agree.
    """
    def trace(run: SearchRun):
        return [(e.phase, e.bits, e.a_bits, round(e.reward, 9)) for e in run.episodes]

    return len(group) > 1 and all(trace(r) == trace(group[0]) for r in group[1:])


def clip_note(net: str, group: Sequence[SearchRun]) -> str | None:
    """What a clip-range ablation of ``net`` shows about the clip: measured from PPO's own logger when
    every run has it (:attr:`SearchRun.ppo`: the clip fraction per update at the smallest clip), else
    inferred from identical trajectories (older runs); None when neither says anything."""
    identical = identical_trajectories(group)
    tightest = min(group, key=lambda r: r.clip_range)
    stats = tightest.ppo
    if any(r.ppo is None for r in group):
        if not identical:
            return None
        return (f"{net}: the runs made identical choices and earned identical rewards in every episode: the clip "
                "never bound (inferred: the runs have no ppo/progress.csv), so at this learning rate and batch the "
                "clip range changes nothing")
    note = (f"{net}: measured by PPO's logger (ppo/progress.csv): at clip {tightest.clip_range:g} the clip bound in "
            f"{stats.clipped_updates} of {stats.updates} updates (largest clip fraction {stats.max_clip_fraction:.3g}, "
            f"largest approx KL {stats.max_approx_kl:.2g})")
    if identical and stats.clipped_updates == 0:
        return note + ("; the runs made identical choices and earned identical rewards in every episode: the clip "
                       "never bound, so at this learning rate and batch the clip range changes nothing")
    if identical:
        return note + "; the runs still made identical choices and earned identical rewards in every episode"
    return note


def ablation_png(groups: dict[str, list[SearchRun]], vary: str, window: int = MOVING_AVERAGE_EPISODES) -> bytes:
    """Per network (rows): moving averages of SA, cost and reward per episode, one line per run."""
    from releq_tvm.report.plots import PALETTE, figure, png_bytes

    nets = list(groups)
    fig, axes = figure(13.0, 3.4 * len(nets), len(nets), 3, squeeze=False)
    for r, net in enumerate(nets):
        for k, (attr, label) in enumerate((("sa", "SA (moving average)"), ("cost", "cost ratio (moving average)"),
                                           ("reward", "reward (moving average)"))):
            ax = axes[r][k]
            for i, run in enumerate(groups[net]):
                name = run.reward_label if vary == "reward" else f"clip {run.clip_range:g}"
                if len(groups[net]) > len({(g.reward_label, g.clip_range) for g in groups[net]}):
                    name += f" (seed {run.seed})"
                train = run.train_episodes
                ax.plot([e.episode for e in train], moving_average([getattr(e, attr) for e in train], window),
                        color=PALETTE[i % len(PALETTE)], label=name, linewidth=1.6)
                conv = search_converged_episode(run)
                if conv is not None:
                    ax.axvline(conv, color=PALETTE[i % len(PALETTE)], linestyle=":", linewidth=0.9)
            if attr == "reward":
                spans = [max(abs(e.reward) for e in run.train_episodes or run.episodes) for run in groups[net]]
                if max(spans) > 20 * max(min(spans), 1e-9):
                    # reward forms live on different scales (hardware ~ 1/|loss|): keep all readable
                    ax.set_yscale("symlog", linthresh=1.0)
                    label = "reward (moving average, symlog)"
            ax.set_xlabel("episode")
            ax.set_ylabel(label)
            same = " (runs identical: the lines overlap)" if identical_trajectories(groups[net]) else ""
            ax.set_title(f"{net}: {label.split(' (')[0]}{same}", fontsize=10 if same else None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    what = "reward form (clip 0.1)" if vary == "reward" else "PPO clip range (asymmetric reward)"
    fig.suptitle(f"Ablation over the {what}; moving average over {window} training episodes; dotted: converged (search's test)")
    return png_bytes(fig)
