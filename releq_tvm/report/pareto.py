"""Pareto frontiers of the small networks: every combination of a bit set, scored for cost and accuracy.

For a network of L weight layers and a bit set B (default {2, 4, 8}), all |B|^L weight bit
vectors are enumerated (activations at 8 bits). Each is scored for

* cost: Stripes cycles over Stripes cycles at 8 bits (the simulator's stepped count), and the
  CPU latency-table ratio when a CPU backend is given. Both costs are sums of per-layer terms
  (a layer's cycles and latency depend only on its own bits), so each layer is costed once
  per bit value and the combinations are sums; ``tests/test_report.py`` checks the sums against
  :func:`releq_tvm.sim.stripes_cost_ratio`;
* accuracy: the quantized model on a fixed val subset, without fine-tuning unless asked
  (:class:`releq_tvm.report.accuracy.ParetoScorer`). Without data or a trained model the
  score is the mean weight bitwidth instead, and every label says so.

A point is on the front when no other point is at most as costly and at least as accurate with
one of the two strictly better. The search's choice (and the published / ADMM bits) are placed
on the same axes, scored the same way, and checked against the front.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from releq_tvm.bits import format_bits
from releq_tvm.config import BITS_MAX, DEFAULT_ACT_BITS
from releq_tvm.progress import progress_bar
from releq_tvm.report.choices import BitChoice

#: Bit set of the enumeration unless --pareto-bits says otherwise.
DEFAULT_PARETO_BITS: tuple[int, ...] = (2, 4, 8)
#: Networks of the paper's Pareto figures (METHOD.md section 6) plus the 4-layer LeNet.
PARETO_NETWORKS: tuple[str, ...] = ("lenet", "lenet4", "simplenet", "svhn10", "vgg11")

PARETO_COLUMNS = (
    "point",
    "w_bits",
    "mean_bits",
    "stripes_cycles_ratio",
    "cpu_latency_ratio",
    "accuracy_val_pct",
    "on_front",
    "on_front_cpu",
    "front_accuracy_at_cost",
    "acc_long_finetune_test_pct",
)


def pareto_front(cost: Sequence[float], score: Sequence[float]) -> np.ndarray:
    """Boolean mask of the non-dominated points (minimise ``cost``, maximise ``score``).

    Point i is dominated when some j has cost_j <= cost_i and score_j >= score_i with at least one
    strict; identical points are all on the front or all off it. O(n log n).
    """
    c = np.asarray(cost, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    n = c.size
    on = np.zeros(n, dtype=bool)
    order = np.lexsort((-s, c))  # cost ascending, score descending within a cost
    best_before = -np.inf  # best score among strictly cheaper points
    i = 0
    while i < n:
        j = i
        while j < n and c[order[j]] == c[order[i]]:
            j += 1
        group = order[i:j]
        top = s[group[0]]
        if top > best_before:
            on[group[s[group] == top]] = True
        best_before = max(best_before, top)
        i = j
    return on


def dominated_by(cost: float, score: float, front_cost: np.ndarray, front_score: np.ndarray) -> bool:
    """True when a front point is at most as costly and at least as good, one strictly."""
    better_or_equal = (front_cost <= cost) & (front_score >= score)
    strictly = (front_cost < cost) | (front_score > score)
    return bool(np.any(better_or_equal & strictly))


def enumerate_bits(n_layers: int, bit_set: Sequence[int]) -> np.ndarray:
    """Every bit vector over ``bit_set`` (|B|^L rows, L columns), first layer varying slowest."""
    return np.array(list(itertools.product(sorted(bit_set), repeat=n_layers)), dtype=np.int64).reshape(-1, n_layers)


@dataclass(frozen=True)
class SeparableCost:
    """A network cost that is a sum of per-layer terms: ``fixed + sum_l layer[l, bits_l]``.

    ``layer`` has one row per layer and one column per value of ``bit_set``; the reference is
    every layer at 8 bits. Units cancel in :meth:`ratio`.
    """

    name: str
    bit_set: tuple[int, ...]
    layer: np.ndarray
    reference: float
    fixed: float = 0.0

    def ratio(self, combos: np.ndarray) -> np.ndarray:
        """Cost over the 8-bit cost for each row of ``combos`` (bit values from ``bit_set``)."""
        lookup = np.full(max(self.bit_set) + 1, -1, dtype=np.int64)
        lookup[list(self.bit_set)] = np.arange(len(self.bit_set))
        idx = lookup[combos]
        if np.any(idx < 0):
            raise ValueError(f"bit values outside {self.bit_set} in the combinations")
        rows = np.arange(combos.shape[1])[None, :]
        return (self.layer[rows, idx].sum(axis=1) + self.fixed) / (self.reference + self.fixed)


def stripes_separable_cost(network: str, bit_set: Sequence[int]) -> SeparableCost:
    """Per-layer Stripes cycles (stepped, weights serial, 8-bit activations) for each bit value."""
    from releq_tvm.networks import layer_table
    from releq_tvm.sim import StripesSimulator

    table = layer_table(network)
    sim = StripesSimulator()
    values = tuple(sorted(set(bit_set) | {BITS_MAX}))
    n = len(table)
    acts = (DEFAULT_ACT_BITS,) * n
    layer = np.zeros((n, len(values)))
    for j, b in enumerate(values):
        costs, _ = sim.layer_costs(table, (b,) * n, acts)
        layer[:, j] = [c.counts.cycles for c in costs]
    reference = float(layer[:, values.index(BITS_MAX)].sum())
    return SeparableCost("stripes_cycles", values, layer, reference)


@dataclass
class ParetoResult:
    """The scored grid, the front mask and the placed points of one network."""

    network: str
    bit_set: tuple[int, ...]
    combos: np.ndarray
    stripes: np.ndarray
    cpu: np.ndarray | None
    score: np.ndarray
    score_is_accuracy: bool
    on_front: np.ndarray
    on_front_cpu: np.ndarray | None  # the front over the CPU cost instead of Stripes
    placed: list[dict]  # one dict per placed point (label, bits, costs, score, on_front, ...)
    protocol: str | None  # how accuracy was measured (None: cost-only)

    @property
    def score_label(self) -> str:
        if self.score_is_accuracy:
            return f"val accuracy (%): {self.protocol}"
        return "mean weight bits (no accuracy: cost-only)"


def pareto_result(
    network: str,
    bit_set: Sequence[int],
    placed: Mapping[str, BitChoice],
    scorer: Callable[[Sequence[int]], float] | None = None,
    cpu_cost: SeparableCost | None = None,
    progress: Callable[[str], None] | None = None,
    long_accuracy: Callable[[Sequence[int]], float | None] | None = None,
) -> ParetoResult:
    """Score every combination of ``bit_set`` for ``network`` and place the ``placed`` choices.

    ``scorer(bits) -> accuracy %`` (None: cost-only, scored by mean bits). ``placed`` maps a
    label ("choice (published)", "ADMM", ...) to bits scored and checked against the front;
    ``long_accuracy(bits)`` adds their test accuracy after the long fine-tune (for context:
    another protocol than the grid's, so it is not used for the front).
    """
    from releq_tvm.networks import layer_table

    bit_set = tuple(sorted(set(int(b) for b in bit_set)))
    n = len(layer_table(network))
    combos = enumerate_bits(n, bit_set)
    stripes = stripes_separable_cost(network, set(bit_set).union(*(c.w_bits for c in placed.values())))
    stripes_ratio = stripes.ratio(combos)
    cpu_ratio = cpu_cost.ratio(combos) if cpu_cost is not None else None
    if scorer is not None:
        if progress is not None:
            progress(f"pareto: scoring {len(combos)} bit vectors of {network} for accuracy")
        rows = progress_bar(combos, f"pareto: {network}", unit="bit vector")
        score = np.array([scorer(tuple(int(b) for b in row)) for row in rows])
    else:
        score = combos.mean(axis=1).astype(np.float64)
    on_front = pareto_front(stripes_ratio, score)
    on_front_cpu = pareto_front(cpu_ratio, score) if cpu_ratio is not None else None
    front_c, front_s = stripes_ratio[on_front], score[on_front]
    points = []
    for label, choice in placed.items():
        bits = np.array([choice.w_bits], dtype=np.int64)
        c = float(stripes.ratio(bits)[0])
        s = float(scorer(choice.w_bits)) if scorer is not None else float(np.mean(choice.w_bits))
        cheaper = front_s[front_c <= c]
        cpu_value = cpu_front = None
        if cpu_cost is not None and set(choice.w_bits) <= set(cpu_cost.bit_set):
            cpu_value = float(cpu_cost.ratio(bits)[0])
            cpu_front = int(not dominated_by(cpu_value, s, cpu_ratio[on_front_cpu], score[on_front_cpu]))
        points.append(
            {
                "point": label,
                "w_bits": format_bits(choice.w_bits),
                "mean_bits": float(np.mean(choice.w_bits)),
                "stripes_cycles_ratio": c,
                "cpu_latency_ratio": cpu_value,
                "accuracy_val_pct": s if scorer is not None else None,
                "on_front": int(not dominated_by(c, s, front_c, front_s)),
                "on_front_cpu": cpu_front,
                "front_accuracy_at_cost": float(cheaper.max()) if cheaper.size and scorer is not None else None,
                "acc_long_finetune_test_pct": long_accuracy(choice.w_bits) if long_accuracy is not None else None,
                "_score": s,
            }
        )
    if scorer is not None and hasattr(scorer, "flush"):
        scorer.flush()
    return ParetoResult(
        network, bit_set, combos, stripes_ratio, cpu_ratio, score, scorer is not None, on_front, on_front_cpu, points,
        getattr(scorer, "protocol", "accuracy") if scorer is not None else None,
    )


def pareto_rows(result: ParetoResult) -> list[dict]:
    """CSV rows: the placed points first, then every grid point (cost ascending)."""
    rows = [{k: v for k, v in p.items() if not k.startswith("_")} for p in result.placed]
    order = np.lexsort((-result.score, result.stripes))
    for i in order:
        bits = result.combos[i]
        rows.append(
            {
                "point": "grid",
                "w_bits": format_bits(bits),
                "mean_bits": float(bits.mean()),
                "stripes_cycles_ratio": float(result.stripes[i]),
                "cpu_latency_ratio": None if result.cpu is None else float(result.cpu[i]),
                "accuracy_val_pct": float(result.score[i]) if result.score_is_accuracy else None,
                "on_front": int(result.on_front[i]),
                "on_front_cpu": None if result.on_front_cpu is None else int(result.on_front_cpu[i]),
            }
        )
    return rows


_MARKERS = ("*", "D", "P", "X", "s")


def pareto_png(result: ParetoResult) -> bytes:
    """Grid points (grey), the front (red steps), the placed points (large markers, labelled);
    against Stripes cost, and against CPU cost in a second panel when it was measured."""
    from releq_tvm.report.plots import figure, png_bytes

    panels = [("stripes_cycles_ratio", result.stripes, result.on_front,
               "Stripes cycles / cycles at 8-bit weights (lower is faster)")]
    if result.cpu is not None:
        panels.append(("cpu_latency_ratio", result.cpu, result.on_front_cpu,
                       "TVM CPU latency / latency at 8-bit weights (lower is faster)"))
    fig, axes = figure(8.5 * len(panels), 6.8, 1, len(panels), squeeze=False)
    for ax, (column, cost, front, xlabel) in zip(axes[0], panels):
        _pareto_panel(ax, result, column, cost, front, xlabel)
    axes[0][0].set_ylabel(result.score_label)
    kind = "accuracy vs cost" if result.score_is_accuracy else "cost-only (no accuracy)"
    title = f"{result.network}: every weight bit vector over {{{','.join(map(str, result.bit_set))}}}, {kind}"
    if result.score_is_accuracy and "no fine-tune" in (result.protocol or ""):
        title += "\nwithout fine-tuning, very low bits fall to chance; the legend gives the long fine-tune's test accuracy"
    fig.suptitle(title, fontsize=11)
    return png_bytes(fig)


def _pareto_panel(ax, result: ParetoResult, column: str, cost: np.ndarray, front: np.ndarray, xlabel: str) -> None:
    from releq_tvm.report.plots import PALETTE

    grid_size = 4 if len(result.combos) > 2000 else 14
    ax.scatter(cost, result.score, s=grid_size, c="#999999", alpha=0.6, linewidths=0,
               label=f"all {len(result.combos)} vectors over {{{','.join(map(str, result.bit_set))}}}", rasterized=True)
    fc, fs = cost[front], result.score[front]
    order = np.argsort(fc)
    ax.step(fc[order], fs[order], where="post", color=PALETTE[3], linewidth=1.2)
    ax.scatter(fc, fs, s=22, c=PALETTE[3], label=f"Pareto front ({int(front.sum())} points)", zorder=3)
    flag = "on_front" if column == "stripes_cycles_ratio" else "on_front_cpu"
    for k, p in enumerate(result.placed):
        if p.get(column) is None:
            continue
        ax.scatter([p[column]], [p["_score"]], s=180, marker=_MARKERS[k % len(_MARKERS)],
                   c=PALETTE[(k * 2) % len(PALETTE)], edgecolors="black", zorder=4, label=_placed_label(p, flag))
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    # Below the axes: inside, the legend would hide points.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, frameon=False)


def _placed_label(p: dict, flag: str = "on_front") -> str:
    label = f"{p['point']}: {p['w_bits']}{' (on front)' if p.get(flag) else ''}"
    if p.get("acc_long_finetune_test_pct") is not None:
        label += f"; {p['acc_long_finetune_test_pct']:.2f}% test after long fine-tune"
    return label
