"""Search run directories (written by ``releq-tvm search``), read for the report.

A run directory holds (see :mod:`releq_tvm.search.run_files`):

* ``config.json``: ``{"command", "config": {network, reward, ppo_clip_range, seed, measure,
  action_set, ...}, "full_precision_val_accuracy", ...}``;
* ``episodes.csv``: one row per episode: ``episode, phase`` (``train`` / ``greedy``),
  ``w_bits, a_bits``, val ``accuracy`` (%), ``sa``, ``sq``, ``cost_ratio``, ``reward``, the
  policy's argmax ``greedy_bits`` and its mean probability ``greedy_prob``, ``seconds``, ...;
* ``action_probs.csv``: one row per step: ``episode, phase, step, layer, kind`` (``w`` weights,
  ``a`` activations), the bits picked, and ``p_<bits>`` per bitwidth (empty when not allowed);
* ``best.json``: ``solution`` (the deterministic episodes' best: ``w_bits``, ``a_bits``, ``sa``,
  ``cost_ratio``, ...), ``best`` (best reward seen), ``converged_episode`` (the search's own
  convergence test), ``long_finetune`` (test accuracies after the long fine-tune);
* ``ppo/progress*.csv``: PPO's own statistics per update (SB3's CSV logger: ``train/clip_fraction``,
  ``train/approx_kl``, ...; one file per start of the run, resumes included), read by :func:`read_ppo_stats`
  into :attr:`SearchRun.ppo`.

Everything is read once into a :class:`SearchRun`; a missing or malformed file is a one-line
:class:`ReleqError` naming it. Rows cut short by a kill (the episode in flight) are skipped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from releq_tvm.config import DEFAULT_ACTION_SET, DEFAULTS
from releq_tvm.errors import ReleqError
from releq_tvm.report.choices import BitChoice


def _bits(value) -> tuple[int, ...] | None:
    """Bits from ``"8,2,2"`` or ``[8, 2, 2]`` (None / empty: None)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return tuple(int(t) for t in value.split(",") if t.strip())
    return tuple(int(t) for t in value)


@dataclass(frozen=True)
class Episode:
    """One episode: the bits it ended at and its scores (SA and cost ratio are dimensionless)."""

    episode: int
    phase: str  # "train" or "greedy" (deterministic read-off)
    bits: tuple[int, ...]
    a_bits: tuple[int, ...] | None
    accuracy: float | None  # val top-1 %, None when the run scored no accuracy
    sa: float
    cost: float  # the cost ratio the reward saw (SQ for --measure none)
    reward: float
    greedy_bits: tuple[int, ...] | None  # the policy's most likely bits at this episode


@dataclass(frozen=True)
class SearchRun:
    """A search run as the report sees it."""

    path: Path
    meta: dict  # the whole config.json
    episodes: tuple[Episode, ...]
    best: dict
    #: Weight-bit probabilities per training/greedy episode: (episodes, layers, len(action_set)).
    probs: np.ndarray | None
    prob_episodes: tuple[int, ...]
    action_set: tuple[int, ...]
    #: PPO's own statistics over the run's updates (``ppo/progress*.csv``); None: the run logged none.
    ppo: PpoStats | None = None

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    @property
    def network(self) -> str:
        return str(self.config["network"])

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def reward_name(self) -> str:
        return str(self.config.get("reward", "asymmetric"))

    @property
    def clip_range(self) -> float:
        return float(self.config.get("ppo_clip_range", DEFAULTS.ppo.clip_range))

    @property
    def measure(self) -> str:
        return str(self.config.get("measure", "none"))

    @property
    def seed(self) -> str:
        return str(self.config.get("seed", ""))

    @property
    def train_episodes(self) -> tuple[Episode, ...]:
        return tuple(e for e in self.episodes if e.phase == "train")

    @property
    def solution(self) -> dict:
        """best.json's ``solution`` (greedy read-off); an unfinished run falls back to ``best``."""
        return self.best.get("solution") or self.best.get("best") or {}

    @property
    def finished(self) -> bool:
        return bool(self.best.get("solution"))

    def choice(self) -> BitChoice:
        sol = self.solution
        notes = () if self.finished else (f"{self.path}: run unfinished; bits of its best training episode",)
        reported = (self.best.get("long_finetune") or {}).get("test_accuracy_quantized")
        return BitChoice(self.network, _bits(sol.get("w_bits")), _bits(sol.get("a_bits")), str(self.path), notes,
                         None if reported is None else float(reported))

    @property
    def reward_label(self) -> str:
        """The reward's name, with its constants when they differ from the defaults (e.g. ``th=0.997``)."""
        changed = [
            f"{key}={self.config[f'reward_{key}']:g}"
            for key in ("a", "b", "th")
            if f"reward_{key}" in self.config and abs(float(self.config[f"reward_{key}"]) - getattr(DEFAULTS.reward, key)) > 1e-12
        ]
        return self.reward_name + (f" ({', '.join(changed)})" if changed else "")

    def is_default_setting(self) -> bool:
        """True when reward (with its constants) and clip are the defaults: the run that stands for the method."""
        return self.reward_label == "asymmetric" and abs(self.clip_range - DEFAULTS.ppo.clip_range) < 1e-9


@dataclass(frozen=True)
class PpoStats:
    """PPO's statistics over all updates of a run, as SB3's logger measured them."""

    updates: int
    clipped_updates: int  # updates in which the clip bound for at least one sample (clip fraction > 0)
    max_clip_fraction: float
    max_approx_kl: float


def read_ppo_stats(run_dir: Path) -> PpoStats | None:
    """Statistics of every update logged under ``RUN/ppo`` (all ``progress*.csv``: the first start and
    every resume); None for a run without them (made before the logger, or with no update yet)."""
    from releq_tvm.search.run_files import PPO_LOG_DIR

    clip, kl = [], []
    for path in sorted((run_dir / PPO_LOG_DIR).glob("progress*.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    fraction, approx_kl = float(row["train/clip_fraction"]), float(row["train/approx_kl"])
                except (KeyError, TypeError, ValueError):
                    continue  # the first row of a start (no update yet) or a row cut short by a kill
                clip.append(fraction)
                kl.append(approx_kl)
    if not clip:
        return None
    return PpoStats(len(clip), sum(c > 0 for c in clip), max(clip), max(kl))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReleqError(f"{path} is missing; is {path.parent} a run directory written by `releq-tvm search`?") from None
    except json.JSONDecodeError as exc:
        raise ReleqError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _complete_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            n = len(reader.fieldnames or [])
            return [r for r in reader if None not in r.values() and len(r) == n]
    except FileNotFoundError:
        raise ReleqError(f"{path} is missing; is {path.parent} a run directory written by `releq-tvm search`?") from None


def read_episodes(path: Path) -> tuple[Episode, ...]:
    """The complete rows of ``episodes.csv``."""
    out = []
    for i, row in enumerate(_complete_rows(path)):
        try:
            out.append(
                Episode(
                    episode=int(row["episode"]),
                    phase=row.get("phase") or "train",
                    bits=_bits(row["w_bits"]) or (),
                    a_bits=_bits(row.get("a_bits")),
                    accuracy=float(row["accuracy"]) if row.get("accuracy") else None,
                    sa=float(row["sa"]),
                    cost=float(row["cost_ratio"]),
                    reward=float(row["reward"]),
                    greedy_bits=_bits(row.get("greedy_bits")),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise ReleqError(
                f"{path} row {i + 1} lacks episode/w_bits/sa/cost_ratio/reward; columns are {', '.join(row)}"
            ) from None
    if not out:
        raise ReleqError(f"{path} has no complete episode; the run stopped before its first episode")
    return tuple(out)


def read_action_probs(path: Path, n_layers: int, action_set: Sequence[int]) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """Weight-bit probabilities (episodes x layers x actions) from ``action_probs.csv`` and the episodes.

    Activation steps (``kind == "a"``) are left out: the report plots the weight choices.
    """
    if not path.is_file():
        return None, ()
    rows = [r for r in _complete_rows(path) if r.get("kind", "w") == "w"]
    if not rows:
        return None, ()
    episodes = tuple(sorted({int(r["episode"]) for r in rows}))
    index = {e: i for i, e in enumerate(episodes)}
    probs = np.full((len(episodes), n_layers, len(action_set)), np.nan)
    for r in rows:
        probs[index[int(r["episode"])], int(r["layer"])] = [float(r.get(f"p_{b}") or "nan") for b in action_set]
    return probs, episodes


def load_run(path: str | Path) -> SearchRun:
    """Read one run directory (see the module docstring for its files)."""
    from releq_tvm.networks import get_network_spec, layer_table

    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReleqError(f"run directory {run_dir} does not exist; pass a folder written by `releq-tvm search`")
    meta = _read_json(run_dir / "config.json")
    config = meta.get("config")
    if not isinstance(config, Mapping) or "network" not in config:
        raise ReleqError(f"{run_dir / 'config.json'} has no config.network; is it a `releq-tvm search` run?")
    network = str(config["network"])
    if config.get("model"):  # a search of the user's own model: register it again, as --resume does
        from releq_tvm.search.config import SearchConfig
        from releq_tvm.search.run import register_search_model

        register_search_model(SearchConfig.from_dict(config))
    get_network_spec(network)  # one-line error for a run of an unregistered network
    n_layers = len(layer_table(network))
    episodes = read_episodes(run_dir / "episodes.csv")
    best = _read_json(run_dir / "best.json")
    run = SearchRun(run_dir, meta, episodes, best, None, (), tuple(config.get("action_set") or DEFAULT_ACTION_SET))
    bits = run.choice().w_bits
    if bits is None or len(bits) != n_layers:
        raise ReleqError(f"{run_dir / 'best.json'} has no {n_layers}-layer solution for {network}; did the run finish?")
    probs, prob_episodes = read_action_probs(run_dir / "action_probs.csv", n_layers, run.action_set)
    return SearchRun(run_dir, meta, episodes, best, probs, prob_episodes, run.action_set, read_ppo_stats(run_dir))


def discover_runs(paths: Iterable[str | Path]) -> list[SearchRun]:
    """Load every run under ``paths``: a run directory itself, or a folder whose sub-folders are runs."""
    runs: list[SearchRun] = []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise ReleqError(f"run directory {path} does not exist; pass a folder written by `releq-tvm search`")
        if (path / "config.json").is_file():
            runs.append(load_run(path))
            continue
        children = sorted(c for c in path.iterdir() if (c / "config.json").is_file())
        if not children:
            raise ReleqError(f"{path} holds no search run (no config.json in it or its sub-folders)")
        runs.extend(load_run(c) for c in children)
    return runs


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: entry i is the mean of the last ``min(window, i + 1)`` values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    csum = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def choice_fixed_episode(run: SearchRun) -> int | None:
    """First training episode from which the policy's most likely bits (``greedy_bits``) never change.

    None when they still changed at the last training episode (or the run logged none).
    """
    greedy = [(e.episode, e.greedy_bits) for e in run.train_episodes if e.greedy_bits is not None]
    if len(greedy) < 2:
        return None
    last = greedy[-1][1]
    first = len(greedy) - 1
    while first > 0 and greedy[first - 1][1] == last:
        first -= 1
    return None if first == len(greedy) - 1 else greedy[first][0]


def search_converged_episode(run: SearchRun) -> int | None:
    """The search's own convergence episode (best.json; its test: same greedy bits over a window
    of episodes with high probability), None when the test was not met."""
    value = run.best.get("converged_episode")
    return None if value is None else int(value)
