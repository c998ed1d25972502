"""Search efficiency: PPO vs random search vs exhaustive enumeration, at the same budget of configurations.

Every method scores configurations the same way (the accuracy oracle, cost backend and reward
of a :class:`SearchConfig`, sharing one accuracy cache) and may *evaluate* at most ``budget``
distinct configurations; a method's result is the best-reward configuration it evaluated.

- ``ppo``: the ReLeQ agent (RecurrentPPO, one update per episode) until it has evaluated
  ``budget`` distinct configurations (revisits are free: the cache answers them);
- ``random``: ``budget`` distinct configurations drawn uniformly from the action set;
- ``exhaustive``: every configuration over a smaller bit set (default {2, 4, 8}), which
  fixes the budget at |set|^L (243 for LeNet-5); only for networks where that is small.

:func:`releq_tvm.report.search_efficiency.write_efficiency_csv` writes the rows to
``results/search_efficiency.csv`` (with provenance lines) and ``efficiency_png`` draws them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from releq_tvm.bits import format_bits
from releq_tvm.errors import ReleqError
from releq_tvm.search.config import SearchConfig

METHODS: tuple[str, ...] = ("ppo", "random", "exhaustive")
#: Exhaustive enumeration is offered while |set|^L stays at or below this many configurations.
EXHAUSTIVE_LIMIT = 4096


class _Scorer:
    """Score configurations with the search's oracle, cost and reward; remember what was evaluated."""

    def __init__(self, parts):
        self.env = parts.env
        self.oracle, self.cost = parts.oracle, parts.cost
        self.seen: dict[tuple, dict] = {}

    def score(self, w_bits: Sequence[int]) -> dict:
        key = tuple(int(b) for b in w_bits)
        if key not in self.seen:
            acc = float(self.oracle.accuracy(key, None))
            sa = acc / float(self.oracle.full_precision)
            cost = float(self.cost.ratio(key, None))
            reward = float(self.env.reward_fn(sa, cost, float(self.oracle.full_precision) / 100.0))
            self.seen[key] = {"w_bits": key, "accuracy": acc, "sa": sa, "cost_ratio": cost, "reward": reward}
        return self.seen[key]

    def record(self, out) -> dict:
        """Remember an episode the env has already scored (an :class:`EpisodeOutcome`), without asking
        the oracle again: a second lookup would count as a cache hit the method never needed."""
        key = tuple(int(b) for b in out.w_bits)
        if key not in self.seen:
            self.seen[key] = {
                "w_bits": key, "accuracy": float(out.accuracy), "sa": float(out.sa),
                "cost_ratio": float(out.cost), "reward": float(out.reward),
            }
        return self.seen[key]

    def best(self) -> dict:
        return max(self.seen.values(), key=lambda p: p["reward"])


def _run_random(parts, budget: int, seed: int) -> tuple[_Scorer, int]:
    scorer = _Scorer(parts)
    rng = np.random.default_rng(seed)
    values = np.asarray(parts.env.action_set)
    space = len(values) ** parts.env.n_layers
    target = min(budget, space)
    while len(scorer.seen) < target:
        scorer.score(tuple(int(v) for v in rng.choice(values, size=parts.env.n_layers)))
    return scorer, len(scorer.seen)


def _run_exhaustive(parts, bit_set: Sequence[int]) -> tuple[_Scorer, int]:
    scorer = _Scorer(parts)
    for bits in itertools.product(sorted(bit_set), repeat=parts.env.n_layers):
        scorer.score(bits)
    return scorer, len(scorer.seen)


def _run_ppo(parts, config: SearchConfig, budget: int, max_episodes: int) -> tuple[_Scorer, int]:
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    from releq_tvm.search.run import make_agent

    scorer = _Scorer(parts)
    env = parts.env
    vec_env = DummyVecEnv([lambda: env])
    agent = make_agent(config, vec_env)
    episodes = [0]

    class StopAtBudget(BaseCallback):
        def _on_step(self) -> bool:
            if not self.locals["dones"][0]:
                return True
            episodes[0] += 1
            scorer.record(env.last_episode)
            return len(scorer.seen) < budget

    agent.learn(total_timesteps=max_episodes * env.episode_length, callback=StopAtBudget())
    return scorer, episodes[0]


def compare_search_methods(
    network: str,
    budget: int | None = None,
    methods: Sequence[str] = METHODS,
    exhaustive_set: Sequence[int] = (2, 4, 8),
    config: SearchConfig | None = None,
    echo=print,
    oracle=None,
    cost=None,
) -> list[dict]:
    """One row per method: the best configuration each found within ``budget`` evaluated configurations.

    ``budget`` defaults to |exhaustive_set|^L when exhaustive enumeration is among the methods,
    else 100. ``config`` sets reward, measure, fine-tune and PPO settings (default: the search's
    defaults for ``network``). Rows carry ``winner`` (highest reward) and ``dominated_by`` (the
    methods whose best point has at least the accuracy at no more cost, and is better in one).
    """
    from releq_tvm.search.run import build_parts

    config = replace(config or SearchConfig(network=network), network=network, search_activations=False)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ReleqError(f"unknown search method {unknown[0]!r}; use {', '.join(METHODS)}")
    parts = build_parts(config, oracle=oracle, cost=cost)
    n_layers = parts.env.n_layers
    exhaustive_size = len(set(exhaustive_set)) ** n_layers
    if "exhaustive" in methods and exhaustive_size > EXHAUSTIVE_LIMIT:
        raise ReleqError(
            f"exhaustive enumeration of {{{format_bits(sorted(set(exhaustive_set)))}}}^{n_layers} is "
            f"{exhaustive_size} configurations; drop it from --methods or pass a smaller --exhaustive-set"
        )
    if budget is None:
        budget = exhaustive_size if "exhaustive" in methods else 100

    rows = []
    for method in methods:
        start = time.perf_counter()
        hits_before = parts.oracle.hits
        if method == "ppo":
            scorer, episodes = _run_ppo(parts, config, budget, max_episodes=20 * budget)
        elif method == "random":
            scorer, episodes = _run_random(parts, budget, config.seed)
        else:
            scorer, episodes = _run_exhaustive(parts, exhaustive_set)
        best = scorer.best()
        row = {
            "network": network,
            "measure": config.measure,
            "method": method,
            "bit_set": format_bits(sorted(set(exhaustive_set))) if method == "exhaustive" else format_bits(parts.env.action_set),
            "budget": budget if method != "exhaustive" else exhaustive_size,
            "configurations": len(scorer.seen),
            "episodes": episodes if method == "ppo" else "",
            "best_bits": format_bits(best["w_bits"]),
            "accuracy_val": round(best["accuracy"], 3),
            "sa": round(best["sa"], 5),
            "cost_ratio": round(best["cost_ratio"], 5),
            "reward": round(best["reward"], 5),
            "cache_hits": parts.oracle.hits - hits_before,
            "seconds": round(time.perf_counter() - start, 1),
            # every evaluated point in evaluation order, for the plot (not a CSV column)
            "trace": [(p["accuracy"], p["cost_ratio"], p["reward"]) for p in scorer.seen.values()],
        }
        rows.append(row)
        echo(
            f"{method:>10}: best {row['best_bits']}  acc {row['accuracy_val']:.2f}%  cost {row['cost_ratio']:.4f}  "
            f"r {row['reward']:+.4f}  ({row['configurations']} configurations, {row['seconds']}s)"
        )
    top = max(r["reward"] for r in rows)
    for r in rows:
        r["winner"] = r["reward"] == top
        r["dominated_by"] = ";".join(
            o["method"]
            for o in rows
            if o is not r
            and o["accuracy_val"] >= r["accuracy_val"]
            and o["cost_ratio"] <= r["cost_ratio"]
            and (o["accuracy_val"] > r["accuracy_val"] or o["cost_ratio"] < r["cost_ratio"])
        )
    return rows
