"""The files of a search run: what each holds, how it is written, and how a run is reopened.

A run directory (``--run-dir``; the report reads it with :mod:`releq_tvm.report.runs`) holds:

* ``config.json``: the command, the :class:`SearchConfig` in force, what the run was built from
  and the machine; ``resumes`` lists each ``--resume`` (:func:`write_config`, :func:`record_resume`);
* ``episodes.csv``: one row per episode (:data:`EPISODE_COLUMNS`, :func:`episode_row`);
* ``action_probs.csv``: one row per step, the policy's probability of every bitwidth (:func:`step_rows`);
* ``best.json``: the chosen configuration, the best one seen, convergence, cache and time (:func:`write_best`);
* ``checkpoint.pt``: agent + :class:`RunState` + every env's state + RNG state (:func:`checkpoint_bytes`);
* ``finetuned.pt``: the long fine-tune's model of the chosen configuration, with its bits and learned
  activation clipping levels (:func:`save_finetuned_model`; best.json's ``long_finetune.model_file``
  names it), so ``releq-tvm compile NET --checkpoint RUN/finetuned.pt`` builds what was fine-tuned;
* ``ppo/progress*.csv``: PPO's own statistics per update (SB3's logger).

Rows are appended with flush + fsync and every other file is replaced atomically, so a kill at
any moment leaves files a resume continues from.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from releq_tvm.bits import format_bits
from releq_tvm.errors import ReleqError
from releq_tvm.io import atomic_write_bytes, atomic_write_text
from releq_tvm.search.config import RESUME_SETTINGS, SearchConfig

EPISODE_COLUMNS = (
    "episode", "phase", "w_bits", "a_bits", "proposed_w_bits", "proposed_a_bits", "corrections",
    "accuracy", "sa", "sq", "cost_ratio", "reward", "return", "cache_hits", "lookups",
    "greedy_bits", "greedy_prob", "seconds",
)
#: action_probs.csv's columns before the ``p_<bits>`` ones.
STEP_COLUMNS = ("episode", "phase", "step", "layer", "kind", "bits")
#: The files a run writes; ``overwrite`` deletes exactly these (never the whole folder).
RUN_FILES = ("config.json", "episodes.csv", "action_probs.csv", "best.json", "checkpoint.pt", "finetuned.pt")
#: The long fine-tune's model (:func:`save_finetuned_model`).
FINETUNED_MODEL = "finetuned.pt"
#: PPO's own statistics per update (SB3 logger): ``<run>/ppo/progress*.csv``.
PPO_LOG_DIR = "ppo"


# ----------------------------------------------------------------------------------------------
# Where a run stands
# ----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Every counter and result of a run, checkpointed as ``dataclasses.asdict`` and restored on resume.

    The field names are checkpoint.pt's keys, so checkpoints written before this class existed
    (the same keys, one by one) load with :meth:`from_dict` as they are.
    """

    episodes_done: int = 0  # training episodes whose policy update is done
    episode: int = 0  # last episode number written (training + greedy)
    training_finished: bool = False
    greedy_done: int = 0  # deterministic read-off episodes written
    greedy_results: list[dict] = field(default_factory=list)  # their points (see episode_point)
    best: dict | None = None  # the highest-reward point of any episode
    converged_episode: int | None = None
    streak: int = 0  # training episodes in a row whose greedy bits were last_greedy
    last_greedy: str | None = None
    lookups: int = 0  # accuracy lookups, and the cache hits among them
    hits: int = 0
    elapsed: float = 0.0  # wall-clock seconds of the episodes
    cpu_seconds: float = 0.0  # process CPU time: what the run costs, whatever else shares the machine
    long_result: dict | None = None  # the long fine-tune of the solution (test accuracies)

    @classmethod
    def from_dict(cls, saved: Mapping) -> RunState:
        """The state in a checkpoint's ``state`` dict (other keys, such as ``env``, are not ours)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


# ----------------------------------------------------------------------------------------------
# The run folder and config.json
# ----------------------------------------------------------------------------------------------
def prepare_run_dir(
    config: SearchConfig, resume: bool, episodes: int | None = None, overwrite: bool = False,
    settings: Mapping | None = None,
) -> tuple[Path, SearchConfig]:
    """Create (or, with ``resume``, reopen) the run directory; returns it and the config to use.

    On resume every setting comes from the run's config.json except ``episodes``, which (when
    given) replaces the training budget, e.g. to extend a run, and the :data:`~releq_tvm.search.config.RESUME_SETTINGS`
    in ``settings``. ``overwrite`` starts afresh in a folder that already holds a run.
    """
    if resume and overwrite:
        raise ReleqError("--resume continues a run and --overwrite replaces it; pass one of them")
    run_dir = Path(config.run_dir or config.default_run_dir())
    cfg_path = run_dir / "config.json"
    if resume:
        stored = saved_config(run_dir)
        if episodes is not None:
            stored.episodes = int(episodes)
        unknown = set(settings or {}) - set(RESUME_SETTINGS)
        if unknown:
            raise ValueError(f"a resumed run keeps its {', '.join(sorted(unknown))}")
        for name, value in (settings or {}).items():
            setattr(stored, name, value)
        stored.validate()
        return run_dir, stored
    if cfg_path.exists():
        if not overwrite:
            raise ReleqError(
                f"{run_dir} already holds a search; pass --resume to continue it, --overwrite to replace it, or --run-dir NEW"
            )
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / PPO_LOG_DIR, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.run_dir = str(run_dir)
    return run_dir, config


def saved_config(run_dir: Path) -> SearchConfig:
    """The :class:`SearchConfig` a run in ``run_dir`` was made with (its config.json), to resume it."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.exists():
        raise ReleqError(f"--resume: {run_dir} holds no config.json; start the run without --resume")
    stored = SearchConfig.from_dict(json.loads(cfg_path.read_text())["config"])
    stored.run_dir = str(run_dir)
    return stored


def _invocation(command: str | None) -> dict:
    """The command line (``command``, or this process's own) and the time it started."""
    return {
        "command": command if command is not None else " ".join(["releq-tvm"] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_config(run_dir: Path, config: SearchConfig, about: dict, command: str | None) -> None:
    """config.json of a new run: the command, ``config``, ``about`` (what the run is built from:
    episode length, cost, accuracy, notes, ...) and :func:`environment_info`."""
    data = {**_invocation(command), "config": config.as_dict(), **about, **environment_info()}
    atomic_write_text(run_dir / "config.json", json.dumps(data, indent=2) + "\n")


def record_resume(run_dir: Path, config: SearchConfig, command: str | None) -> None:
    """Keep config.json describing the run: the config in force now (``--episodes`` may have
    changed the budget) and, in ``resumes``, each resume's command and time."""
    path = run_dir / "config.json"
    data = json.loads(path.read_text())
    data["config"] = config.as_dict()
    data.setdefault("resumes", []).append({**_invocation(command), "episodes": config.episodes})
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def environment_info() -> dict:
    """Versions and machine, for config.json (no user names, paths or credentials)."""
    from importlib import metadata

    versions = {}
    for dist in ("releq-tvm", "torch", "numpy", "stable-baselines3", "sb3-contrib", "gymnasium"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "versions": versions,
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }


# ----------------------------------------------------------------------------------------------
# episodes.csv and action_probs.csv
# ----------------------------------------------------------------------------------------------
class AppendOnlyCsv:
    """A CSV whose rows are appended with flush + fsync, so a kill leaves at most one partial row."""

    def __init__(self, path: Path, columns):
        self.path, self.columns = Path(path), list(columns)
        if not self.path.exists():
            self._write_rows([], mode="w")

    def _write_rows(self, rows, mode="a") -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if mode == "w":
                writer.writeheader()
            for row in rows:
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def append(self, rows) -> None:
        self._write_rows(rows)

    def rows(self) -> list[dict]:
        """Complete rows only (a row cut short by a kill has too few fields and is dropped)."""
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return [r for r in reader if None not in r.values() and len(r) == len(self.columns)]

    def keep(self, predicate) -> list[dict]:
        """Rewrite the file atomically with the rows for which ``predicate(row)`` holds."""
        rows = [r for r in self.rows() if predicate(r)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())
        return rows


class EpisodeLog:
    """episodes.csv (a row per episode) and action_probs.csv (a row per step) of one run."""

    def __init__(self, run_dir: Path, value_columns):
        self.episodes = AppendOnlyCsv(Path(run_dir) / "episodes.csv", EPISODE_COLUMNS)
        self.steps = AppendOnlyCsv(Path(run_dir) / "action_probs.csv", [*STEP_COLUMNS, *(f"p_{v}" for v in value_columns)])

    def append(self, episode: dict, steps: list[dict]) -> None:
        self.steps.append(steps)
        self.episodes.append([episode])

    def keep_through(self, episode: int) -> list[dict]:
        """Drop the rows of the episodes after ``episode``; returns the episodes.csv rows kept."""
        keep = lambda r: int(r["episode"]) <= episode  # noqa: E731
        self.steps.keep(keep)
        return self.episodes.keep(keep)


def _fmt(value, digits=4):
    return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else value)


def episode_row(episode: int, phase: str, out, greedy_bits: str, greedy_prob: float, seconds: float) -> dict:
    """The episodes.csv row of the episode ``out`` (the env's ``last_episode``)."""
    return {
        "episode": episode,
        "phase": phase,
        "w_bits": format_bits(out.w_bits),
        "a_bits": format_bits(out.a_bits) if out.a_bits else "",
        "proposed_w_bits": format_bits(out.proposed_w_bits),
        "proposed_a_bits": format_bits(out.proposed_a_bits) if out.proposed_a_bits else "",
        "corrections": out.corrections,
        "accuracy": _fmt(out.accuracy, 3),
        "sa": _fmt(out.sa, 5),
        "sq": _fmt(out.sq, 5),
        "cost_ratio": _fmt(out.cost, 5),
        "reward": _fmt(out.reward, 5),
        "return": _fmt(out.episode_return, 5),
        "cache_hits": out.hits,
        "lookups": out.lookups,
        "greedy_bits": greedy_bits,
        "greedy_prob": _fmt(greedy_prob, 4),
        "seconds": _fmt(seconds, 2),
    }


def step_rows(env, episode: int, phase: str, step_probs, chosen: list[int], value_columns) -> list[dict]:
    """The action_probs.csv rows of one episode: per step, the probability of every bitwidth
    (summed over the actions that map to it; empty where the step's kind does not allow it)."""
    rows = []
    for step, (probs, bits) in enumerate(zip(step_probs, chosen)):
        layer, kind = env.schedule[step]
        row = {"episode": episode, "phase": phase, "step": step, "layer": layer, "kind": kind, "bits": bits}
        per_value = {v: 0.0 for v in env.values_for(kind)}
        for index, p in enumerate(probs):
            per_value[env.action_to_bits(index, kind)] += float(p)
        for v in value_columns:
            row[f"p_{v}"] = f"{per_value[v]:.5f}" if v in per_value else ""
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# best.json and its points
# ----------------------------------------------------------------------------------------------
def episode_point(out, episode: int, phase: str) -> dict:
    """An episode as best.json (and :class:`RunState`) records it."""
    return {
        "episode": episode,
        "phase": phase,
        "w_bits": list(out.w_bits),
        "a_bits": None if out.a_bits is None else list(out.a_bits),
        "accuracy_val": round(out.accuracy, 4),
        "sa": round(out.sa, 6),
        "sq": round(out.sq, 6),
        "cost_ratio": round(out.cost, 6),
        "reward": round(out.reward, 6),
    }


def best_point(rows: list[dict]) -> dict | None:
    """The highest-reward episode among episodes.csv ``rows`` (ties: the earlier), as a point."""
    best = None
    for r in rows:
        point = {
            "episode": int(r["episode"]),
            "phase": r["phase"],
            "w_bits": [int(b) for b in r["w_bits"].split(",")],
            "a_bits": [int(b) for b in r["a_bits"].split(",")] if r["a_bits"] else None,
            "accuracy_val": float(r["accuracy"]),
            "sa": float(r["sa"]),
            "sq": float(r["sq"]),
            "cost_ratio": float(r["cost_ratio"]),
            "reward": float(r["reward"]),
        }
        if best is None or point["reward"] > best["reward"]:
            best = point
    return best


def write_best(run_dir: Path, config: SearchConfig, oracle, state: RunState, solution: dict | None) -> None:
    """best.json: the ``solution``, the best configuration seen, convergence, cache, time, long fine-tune."""
    data = {
        "network": config.network,
        "measure": config.measure,
        "reward": config.reward,
        "accuracy_scored": bool(oracle.scores_accuracy),
        "full_precision_val_accuracy": oracle.full_precision if oracle.scores_accuracy else None,
        "training_episodes": state.episodes_done if state.training_finished else state.episode,
        "converged_episode": state.converged_episode,
        "best": state.best,
        "solution": solution,
        "cache": {"lookups": state.lookups, "hits": state.hits, "hit_rate": round(state.hits / max(state.lookups, 1), 4)},
        "elapsed_seconds": round(state.elapsed, 1),
        "cpu_seconds": round(state.cpu_seconds, 1),
        "long_finetune": state.long_result,
    }
    if not oracle.scores_accuracy:
        data["note"] = "--accuracy none: SA = 1 for every configuration; the bits optimise cost only"
    atomic_write_text(run_dir / "best.json", json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# finetuned.pt
# ----------------------------------------------------------------------------------------------
def save_finetuned_model(run_dir: Path, model, network: str, input_shape, long_result: dict) -> str:
    """Write the long fine-tune's ``model`` to ``run_dir/finetuned.pt`` (the format of
    :func:`releq_tvm.train.save_finetuned`: float weights, learned clipping levels, bits) and
    return the file's name relative to the run, for best.json."""
    from releq_tvm.train import save_finetuned

    about = {"made_by": f"the long fine-tune of the search run {run_dir} (best.json: long_finetune)",
             **{k: long_result[k] for k in ("steps", "learning_rate", "test_accuracy_full_precision",
                                             "test_accuracy_quantized") if k in long_result}}
    save_finetuned(Path(run_dir) / FINETUNED_MODEL, model, network, tuple(input_shape), about)
    return FINETUNED_MODEL


# ----------------------------------------------------------------------------------------------
# checkpoint.pt
# ----------------------------------------------------------------------------------------------
def checkpoint_bytes(agent, state: RunState, env_states: list[dict]) -> bytes:
    """agent + run state + the state of every environment + RNG state, as checkpoint.pt's bytes.

    ``env`` keeps the first environment's state (the key runs with one environment always had);
    ``envs`` holds all of them (parallel episodes)."""
    buf = io.BytesIO()
    agent.save(buf)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    out = io.BytesIO()
    blob = {"agent": buf.getvalue(), "state": {**asdict(state), "env": env_states[0], "envs": env_states}, "rng": rng}
    torch.save(blob, out)
    return out.getvalue()


def write_checkpoint(run_dir: Path, blob: bytes) -> None:
    """Replace checkpoint.pt atomically with :func:`checkpoint_bytes`' ``blob``."""
    atomic_write_bytes(run_dir / "checkpoint.pt", blob)


@dataclass
class Checkpoint:
    """checkpoint.pt as read back."""

    state: RunState
    env_states: list[dict]  # ReleqEnv.state_dict() of each environment (one for runs before parallel episodes)
    agent: bytes  # RecurrentPPO.save's file: RecurrentPPO.load(io.BytesIO(agent), env=...)
    rng: dict  # torch, numpy and random states

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng["torch"])
        np.random.set_state(self.rng["numpy"])
        random.setstate(self.rng["random"])


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Read checkpoint.pt (None: no checkpoint written yet)."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=False)
    saved = blob["state"]
    return Checkpoint(RunState.from_dict(saved), saved.get("envs") or [saved["env"]], blob["agent"], blob["rng"])
