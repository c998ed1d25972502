"""The ReLeQ search loop: build the env and the RecurrentPPO agent, train, read off the bits, long fine-tune.

Read top to bottom, :func:`run_search` does:

1. build the pieces from a :class:`SearchConfig` (layer table, float model, accuracy oracle,
   cost backend, :class:`ReleqEnv`), or reload them from ``run_dir`` with ``resume``;
2. train sb3-contrib ``RecurrentPPO`` with ``n_steps`` = episode length, so the policy is
   updated at the end of every episode; a callback logs every episode (episodes.csv), the
   policy's probability of every bitwidth at every step (action_probs.csv), the best
   configuration (best.json), checks convergence, and checkpoints agent + env + RNG state
   (checkpoint.pt, one atomic file) after every update;
3. run ``final_episodes`` deterministic (argmax) episodes and take the best of them as the
   solution;
4. LONG fine-tune the solution and report its TEST accuracy against full precision.

A run killed at any moment resumes with ``resume=True``: the rows after the last checkpoint
are dropped (at most the episode in flight) and training continues from the saved agent,
env state and random state, so a resumed run makes the same choices as an uninterrupted one.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from releq_tvm.bits import format_bits
from releq_tvm.errors import ReleqError
from releq_tvm.io import atomic_write_bytes, atomic_write_text
from releq_tvm.search.config import SearchConfig

EPISODE_COLUMNS = (
    "episode", "phase", "w_bits", "a_bits", "proposed_w_bits", "proposed_a_bits", "corrections",
    "accuracy", "sa", "sq", "cost_ratio", "reward", "return", "cache_hits", "lookups",
    "greedy_bits", "greedy_prob", "seconds",
)


# ----------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------
@dataclass
class SearchParts:
    """Everything a search needs besides the agent (tests build one with fakes)."""

    config: SearchConfig
    table: list
    env: object  # ReleqEnv
    oracle: object  # FinetunedAccuracy | NoAccuracy | a test fake
    cost: object  # CostBackend
    model: torch.nn.Module | None
    input_shape: tuple[int, int, int]
    dataset: str
    notes: list[str] = field(default_factory=list)


def validate_config(config: SearchConfig) -> None:
    """Raise a one-line :class:`ReleqError` for settings that cannot work together."""
    from releq_tvm.search.cost import MEASURES, STRIPES_METRICS
    from releq_tvm.search.reward import REWARDS, SQ_FORMS

    if config.measure not in MEASURES:
        raise ReleqError(f"--measure must be one of {', '.join(MEASURES)}; got {config.measure!r}")
    if config.metric not in STRIPES_METRICS:
        raise ReleqError(f"--metric must be one of {', '.join(STRIPES_METRICS)}; got {config.metric!r}")
    if config.reward not in REWARDS:
        raise ReleqError(f"--reward must be one of {', '.join(REWARDS)}; got {config.reward!r}")
    if config.sq_form not in SQ_FORMS:
        raise ReleqError(f"--sq-form must be one of {', '.join(SQ_FORMS)}; got {config.sq_form!r}")
    if config.accuracy not in ("finetune", "none"):
        raise ReleqError(f"--accuracy must be finetune or none; got {config.accuracy!r}")
    if config.finetune not in ("per-step", "per-episode"):
        raise ReleqError(f"--finetune must be per-step or per-episode; got {config.finetune!r}")
    if config.search_activations and config.measure == "none":
        raise ReleqError(
            "--search-activations needs a hardware cost (--measure cpu or stripes): "
            "the SQ formula of --measure none has no activation term"
        )
    if config.latency_target is not None and not 0 < config.latency_target <= 1.0:
        raise ReleqError(f"--latency-target is a cost ratio to 8 bits in (0, 1]; got {config.latency_target}")
    if config.episodes < 1 or config.final_episodes < 1:
        raise ReleqError("--episodes and --final-episodes must be at least 1")


def effective_th(config: SearchConfig, oracle) -> float:
    """The asymmetric reward's cut-off: METHOD.md's th, raised to 1 - max_loss / full precision.

    Only the asymmetric reward has a cut-off; without scored accuracy (``--accuracy none``)
    SA is always 1 and th stays as configured.
    """
    if config.reward != "asymmetric" or config.max_loss is None or not oracle.scores_accuracy:
        return config.reward_th
    return max(config.reward_th, 1.0 - config.max_loss / float(oracle.full_precision))


def _weight_std(model: torch.nn.Module, input_shape) -> list[float]:
    from releq_tvm.networks import weight_modules

    return [float(m.weight.detach().std()) for _, m in weight_modules(model, input_shape)]


def build_parts(config: SearchConfig, oracle=None, cost=None) -> SearchParts:
    """Layer table, float model, accuracy oracle, cost backend and env for ``config``.

    ``oracle`` / ``cost`` replace the real ones (tests inject fakes; no data or TVM needed).
    """
    from releq_tvm.networks import MissingCheckpointError, create_network, get_network_spec, layer_table
    from releq_tvm.search.accuracy import AccuracyCache, FinetunedAccuracy, FinetuneSettings, NoAccuracy
    from releq_tvm.search.cost import make_cost_backend
    from releq_tvm.search.env import ReleqEnv
    from releq_tvm.search.reward import make_reward
    from releq_tvm.train import model_hash

    validate_config(config)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    spec = get_network_spec(config.network)
    table = layer_table(config.network)
    notes: list[str] = []

    from releq_tvm.train import load_model

    try:
        model = load_model(config.network, config.checkpoint)
        weights_from = "trained checkpoint"
    except MissingCheckpointError:
        if config.accuracy != "none" and oracle is None:
            raise MissingCheckpointError(
                f"no trained checkpoint of {config.network} here: pass --checkpoint FILE "
                f"(see `releq-tvm train {config.network}`), or search on cost only with --accuracy none"
            ) from None
        model = create_network(config.network)
        weights_from = "seeded initialisation (no checkpoint ships)"
        notes.append(f"weight std in the state comes from the {weights_from}")

    if oracle is None:
        if config.accuracy == "none":
            oracle = NoAccuracy()
            notes.append("--accuracy none: every configuration scores SA = 1, the search optimises cost only")
        else:
            from releq_tvm.data import load_dataset

            train = load_dataset(spec.dataset, "train", config.data_dir, limit=config.train_images)
            val = load_dataset(spec.dataset, "val", config.data_dir, limit=config.val_images)
            settings = FinetuneSettings(
                network=config.network,
                model_hash=model_hash(model),
                short_steps=config.short_steps,
                learning_rate=config.finetune_lr,
                batch_size=config.finetune_batch_size,
                seed=config.seed,
                val_images=len(val),
                train_images=config.train_images,
                calibration_images=config.calibration_images,
            )
            cache = AccuracyCache(config.cache_path)  # None: the shared store, cache_dir()/cache.sqlite
            oracle = FinetunedAccuracy(model, spec.input_shape, train, val, settings, cache)
    if cost is None:
        cost = make_cost_backend(config.measure, config.network, table, sq_form=config.sq_form, metric=config.metric,
                                 cpu_kernels=config.cpu_kernels)
    acc_limit = None if config.acc_limit is None else config.acc_limit / 100.0
    th = effective_th(config, oracle)
    if th != config.reward_th:
        notes.append(
            f"reward cut-off th = {th:.4f} (= 1 - {config.max_loss:g} pp / {oracle.full_precision:.2f}%, --max-loss): "
            f"configurations losing more than {config.max_loss:g} pp of val accuracy score -1"
        )
    reward_fn = make_reward(config.reward, a=config.reward_a, b=config.reward_b, th=th, acc_limit=acc_limit)
    weight_std = _weight_std(model, spec.input_shape)
    if not config.weight_std_in_state:
        weight_std = [0.0] * len(weight_std)
        notes.append("weight std left out of the state (ablation)")
    env = ReleqEnv(
        table,
        weight_std,
        oracle,
        cost,
        reward_fn,
        action_set=config.action_set,
        act_action_set=config.act_action_set if config.search_activations else None,
        finetune=config.finetune,
        latency_target=config.latency_target,
        sq_form=config.sq_form,
    )
    return SearchParts(config, table, env, oracle, cost, model, spec.input_shape, spec.dataset, notes)


def ppo_logger(log_dir: Path | None, suffix: str = ""):
    """SB3's logger for PPO's own statistics (clip fraction, approx KL, explained variance, entropy
    and losses, one row per update) in ``log_dir/progress{suffix}.csv``, plus TensorBoard event
    files when tensorboard is installed. ``None`` logs nowhere: SB3's default would create a
    ``/tmp/SB3-<date>`` folder for every agent."""
    from stable_baselines3.common.logger import Logger, make_output_format

    if log_dir is None:
        return Logger(folder=None, output_formats=[])
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    formats = ["csv"]
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)

        formats.append("tensorboard")
    except ImportError:
        pass
    return Logger(folder=str(log_dir), output_formats=[make_output_format(f, str(log_dir), suffix) for f in formats])


def make_agent(config: SearchConfig, vec_env, log_dir: Path | None = None):
    """RecurrentPPO of METHOD.md section 3: an LSTM first in both actor and critic, one update per episode.

    PPO's statistics go to ``log_dir`` (see :func:`ppo_logger`), or nowhere when it is None.
    """
    from sb3_contrib import RecurrentPPO

    n_steps = vec_env.envs[0].unwrapped.episode_length
    agent = RecurrentPPO(
        "MlpLstmPolicy",
        vec_env,
        learning_rate=config.ppo_learning_rate,
        n_steps=n_steps,
        batch_size=n_steps,
        n_epochs=config.ppo_n_epochs,
        gamma=config.ppo_gamma,
        gae_lambda=config.ppo_gae_lambda,
        clip_range=config.ppo_clip_range,
        ent_coef=config.ppo_ent_coef,
        normalize_advantage=config.ppo_normalize_advantage,
        policy_kwargs=dict(
            net_arch=dict(pi=list(config.policy_layers), vf=list(config.value_layers)),
            lstm_hidden_size=config.lstm_hidden_size,
            n_lstm_layers=1,
            shared_lstm=False,
            enable_critic_lstm=True,
        ),
        seed=config.seed,
        device="cpu",
        verbose=0,
    )
    agent.set_logger(ppo_logger(log_dir))
    return agent


# ----------------------------------------------------------------------------------------------
# Files of a run
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


def _fmt(value, digits=4):
    return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else value)


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------
class ReleqSearch:
    """State of one run: files, counters, convergence test, checkpointing. Driven by :func:`run_search`."""

    def __init__(self, parts: SearchParts, run_dir: Path, echo=print):
        self.parts, self.config, self.env = parts, parts.config, parts.env
        self.run_dir, self.echo = Path(run_dir), echo
        self.episode_len = self.env.episode_length
        self.value_columns = sorted(set(self.env.action_set) | set(self.env.act_action_set or ()))
        self.episodes_csv = AppendOnlyCsv(self.run_dir / "episodes.csv", EPISODE_COLUMNS)
        self.probs_csv = AppendOnlyCsv(
            self.run_dir / "action_probs.csv",
            ["episode", "phase", "step", "layer", "kind", "bits"] + [f"p_{v}" for v in self.value_columns],
        )
        # Counters and results, all restored on resume.
        self.episodes_done = 0  # training episodes whose policy update is done
        self.episode = 0  # last episode number written (training + greedy)
        self.training_finished = False
        self.greedy_done = 0
        self.greedy_results: list[dict] = []
        self.best: dict | None = None
        self.converged_episode: int | None = None
        self.streak = 0
        self.last_greedy: str | None = None
        self.lookups = self.hits = 0
        self.elapsed = 0.0
        self.cpu_seconds = 0.0  # process CPU time: what the run costs, whatever else shares the machine
        self.long_result: dict | None = None
        self._clock = time.perf_counter()
        self._cpu_clock = time.process_time()
        self._step_probs: list[np.ndarray] = []

    # -- per-step and per-episode bookkeeping ------------------------------------------------------
    def record_step(self, probs: np.ndarray) -> None:
        self._step_probs.append(np.asarray(probs, dtype=np.float64))

    def _probs_rows(self, episode: int, phase: str, chosen: list[int]) -> list[dict]:
        rows = []
        for step, (probs, bits) in enumerate(zip(self._step_probs, chosen)):
            layer, kind = self.env.schedule[step]
            row = {"episode": episode, "phase": phase, "step": step, "layer": layer, "kind": kind, "bits": bits}
            per_value = {v: 0.0 for v in self.env.values_for(kind)}
            for index, p in enumerate(probs):
                per_value[self.env.action_to_bits(index, kind)] += float(p)
            for v in self.value_columns:
                row[f"p_{v}"] = f"{per_value[v]:.5f}" if v in per_value else ""
            rows.append(row)
        return rows

    def finish_episode(self, phase: str, chosen_bits: list[int]) -> bool:
        """Write the episode just finished; return False when training should stop (converged)."""
        out = self.env.last_episode
        self.episode += 1
        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        self.elapsed += seconds
        cpu_now = time.process_time()
        self.cpu_seconds, self._cpu_clock = self.cpu_seconds + cpu_now - self._cpu_clock, cpu_now
        self.lookups += out.lookups
        self.hits += out.hits
        greedy = [self.env.action_to_bits(int(np.argmax(p)), self.env.schedule[i][1]) for i, p in enumerate(self._step_probs)]
        greedy_prob = float(np.mean([p.max() for p in self._step_probs]))
        greedy_text = format_bits(greedy)
        row = {
            "episode": self.episode,
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
            "greedy_bits": greedy_text,
            "greedy_prob": _fmt(greedy_prob, 4),
            "seconds": _fmt(seconds, 2),
        }
        self.probs_csv.append(self._probs_rows(self.episode, phase, chosen_bits))
        self.episodes_csv.append([row])
        self._step_probs = []
        point = self._point(out, self.episode, phase)
        if self.best is None or point["reward"] > self.best["reward"]:
            self.best = point
        if phase == "greedy":
            self.greedy_results.append(point)
            self.greedy_done += 1
        self._progress(row, out, phase)
        if phase != "train":
            self._write_best()
            return True
        self.streak = self.streak + 1 if greedy_text == self.last_greedy else 1
        self.last_greedy = greedy_text
        converged = self.streak >= self.config.converge_window and greedy_prob >= self.config.converge_prob
        if converged and self.converged_episode is None:
            self.converged_episode = self.episode
            self.echo(
                f"converged at episode {self.episode}: greedy bits {greedy_text} for {self.streak} episodes, "
                f"mean probability {greedy_prob:.2f}"
            )
        self._write_best()
        return not (converged and self.config.stop_on_convergence)

    def _point(self, out, episode: int, phase: str) -> dict:
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

    def _progress(self, row: dict, out, phase: str) -> None:
        total = self.config.episodes if phase == "train" else self.config.final_episodes
        index = self.episode if phase == "train" else self.greedy_done
        hit_rate = self.hits / max(self.lookups, 1)
        bits = row["w_bits"] + (f" a {row['a_bits']}" if row["a_bits"] else "")
        cost_name = "SQ" if self.config.measure == "none" else "cost"
        self.echo(
            f"{phase:>6} {index:>4}/{total:<4} bits {bits}  acc {out.accuracy:6.2f}%  SA {out.sa:.4f}  "
            f"{cost_name} {out.cost:.4f}  r {out.reward:+.4f}  {'hit ' if out.hits == out.lookups else 'miss'}  "
            f"{row['seconds']}s  (cache hits {100 * hit_rate:.0f}%, greedy {row['greedy_bits']} p={row['greedy_prob']})"
        )

    def solution(self) -> dict | None:
        """The chosen configuration, with ``source`` saying where it comes from.

        A converged run: the deterministic read-off episodes' best (ties: the later one), as in
        ReLeQ. A run that stopped before converging: the better by reward of that read-off and
        the best configuration any episode evaluated, since an unconverged policy's argmax can
        be far from what the search has already found (measured: a 24-episode LeNet-5 demo
        read off 1,1,1,1,1 at reward -1 after seeing 1,1,4,3,4 at +0.33).
        """
        if not self.greedy_results:
            return None
        greedy = max(reversed(self.greedy_results), key=lambda p: p["reward"])
        if self.converged_episode is None and self.best is not None and self.best["reward"] > greedy["reward"]:
            return {**self.best, "source": "best configuration seen (the policy did not converge)"}
        return {**greedy, "source": "deterministic read-off of the policy"}

    def _write_best(self) -> None:
        oracle = self.parts.oracle
        data = {
            "network": self.config.network,
            "measure": self.config.measure,
            "reward": self.config.reward,
            "accuracy_scored": bool(oracle.scores_accuracy),
            "full_precision_val_accuracy": oracle.full_precision if oracle.scores_accuracy else None,
            "training_episodes": self.episodes_done if self.training_finished else self.episode,
            "converged_episode": self.converged_episode,
            "best": self.best,
            "solution": self.solution(),
            "cache": {"lookups": self.lookups, "hits": self.hits, "hit_rate": round(self.hits / max(self.lookups, 1), 4)},
            "elapsed_seconds": round(self.elapsed, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "long_finetune": self.long_result,
        }
        if not oracle.scores_accuracy:
            data["note"] = "--accuracy none: SA = 1 for every configuration; the bits optimise cost only"
        atomic_write_text(self.run_dir / "best.json", json.dumps(data, indent=2) + "\n")

    # -- checkpoint --------------------------------------------------------------------------------
    def save_checkpoint(self, agent) -> None:
        """agent + counters + env state + RNG state, in one atomically replaced file."""
        buf = io.BytesIO()
        agent.save(buf)
        state = {
            "episodes_done": self.episodes_done,
            "episode": self.episode,
            "training_finished": self.training_finished,
            "greedy_done": self.greedy_done,
            "greedy_results": self.greedy_results,
            "best": self.best,
            "converged_episode": self.converged_episode,
            "streak": self.streak,
            "last_greedy": self.last_greedy,
            "lookups": self.lookups,
            "hits": self.hits,
            "elapsed": self.elapsed,
            "cpu_seconds": self.cpu_seconds,
            "long_result": self.long_result,
            "env": self.env.state_dict(),
        }
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
        out = io.BytesIO()
        torch.save({"agent": buf.getvalue(), "state": state, "rng": rng}, out)
        atomic_write_bytes(self.run_dir / "checkpoint.pt", out.getvalue())

    def load_checkpoint(self, vec_env):
        """Restore counters, env and RNG from checkpoint.pt and return the agent (None: none saved)."""
        from sb3_contrib import RecurrentPPO

        path = self.run_dir / "checkpoint.pt"
        if not path.exists():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=False)
        state = blob["state"]
        for name in (
            "episodes_done", "episode", "training_finished", "greedy_done", "greedy_results", "best",
            "converged_episode", "streak", "last_greedy", "lookups", "hits", "elapsed", "cpu_seconds", "long_result",
        ):
            setattr(self, name, state[name])
        self.env.load_state_dict(state["env"])
        agent = RecurrentPPO.load(io.BytesIO(blob["agent"]), env=vec_env, device="cpu")
        # a resumed run logs PPO's statistics to a file of its own: SB3's CSV writer truncates
        agent.set_logger(ppo_logger(self.run_dir / PPO_LOG_DIR, suffix=f"-resume{self.episodes_done}"))
        torch.set_rng_state(blob["rng"]["torch"])
        np.random.set_state(blob["rng"]["numpy"])
        random.setstate(blob["rng"]["random"])
        return agent

    def drop_rows_after_checkpoint(self) -> None:
        """Keep only the rows the checkpoint accounts for (the episode in flight is lost)."""
        keep = lambda r: int(r["episode"]) <= self.episode  # noqa: E731
        self.episodes_csv.keep(keep)
        self.probs_csv.keep(keep)

    def reopen_training(self) -> None:
        """Continue training a finished run (a larger budget on resume): its greedy episodes are redone."""
        keep = lambda r: int(r["episode"]) <= self.episodes_done  # noqa: E731
        rows = self.episodes_csv.keep(keep)
        self.probs_csv.keep(keep)
        self.episode = self.episodes_done
        self.training_finished = False
        self.greedy_done, self.greedy_results, self.long_result = 0, [], None
        self.best = None
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
            if self.best is None or point["reward"] > self.best["reward"]:
                self.best = point

    def reset_clock(self) -> None:
        self._clock = time.perf_counter()
        self._cpu_clock = time.process_time()


def _make_callback(search: ReleqSearch):
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeCallback(BaseCallback):
        """Per step: the policy's probabilities; per episode: log, convergence, checkpoint."""

        def _on_rollout_start(self) -> None:
            # Rollouts are exactly one episode long, so here the previous episode's update is done.
            if search.episode > search.episodes_done:
                search.episodes_done = search.episode
                if search.episodes_done % search.config.checkpoint_every == 0:
                    search.save_checkpoint(self.model)

        def _on_step(self) -> bool:
            model = self.model
            with torch.no_grad():
                # _last_lstm_states is still the state the action was sampled from.
                dist, _ = model.policy.get_distribution(
                    self.locals["obs_tensor"], model._last_lstm_states.pi, self.locals["episode_starts"]
                )
            search.record_step(dist.distribution.probs[0].cpu().numpy())
            if not self.locals["dones"][0]:
                return True
            chosen = [int(b) for b in _episode_actions(search)]
            return search.finish_episode("train", chosen)

    return EpisodeCallback()


def _episode_actions(search: ReleqSearch) -> list[int]:
    """The bits the agent picked at each step of the episode just finished (before any correction)."""
    out = search.env.last_episode
    picked = []
    for layer, kind in search.env.schedule:
        picked.append((out.proposed_a_bits if kind == "a" else out.proposed_w_bits)[layer])
    return picked


def _greedy_episode(search: ReleqSearch, agent) -> None:
    """One deterministic episode: argmax of the policy at every step."""
    env, policy = search.env, agent.policy
    lstm = policy.lstm_actor
    state = (torch.zeros(lstm.num_layers, 1, lstm.hidden_size), torch.zeros(lstm.num_layers, 1, lstm.hidden_size))
    obs, _ = env.reset()
    chosen = []
    for t in range(env.episode_length):
        with torch.no_grad():
            dist, state = policy.get_distribution(
                torch.as_tensor(obs[None]), state, torch.tensor([1.0 if t == 0 else 0.0])
            )
        probs = dist.distribution.probs[0].cpu().numpy()
        search.record_step(probs)
        action = int(np.argmax(probs))
        chosen.append(env.action_to_bits(action, env.schedule[t][1]))
        obs, _, terminated, _, _ = env.step(action)
    assert terminated
    search.finish_episode("greedy", chosen)


#: The files a run writes; ``overwrite`` deletes exactly these (never the whole folder).
RUN_FILES = ("config.json", "episodes.csv", "action_probs.csv", "best.json", "checkpoint.pt")
#: PPO's own statistics per update (SB3 logger): ``<run>/ppo/progress*.csv``.
PPO_LOG_DIR = "ppo"


def prepare_run_dir(
    config: SearchConfig, resume: bool, episodes: int | None = None, overwrite: bool = False
) -> tuple[Path, SearchConfig]:
    """Create (or, with ``resume``, reopen) the run directory; returns it and the config to use.

    On resume every setting comes from the run's config.json except ``episodes``, which (when
    given) replaces the training budget, e.g. to extend a run. ``overwrite`` starts afresh in a
    folder that already holds a run.
    """
    if resume and overwrite:
        raise ReleqError("--resume continues a run and --overwrite replaces it; pass one of them")
    run_dir = Path(config.run_dir or config.default_run_dir())
    cfg_path = run_dir / "config.json"
    if resume:
        if not cfg_path.exists():
            raise ReleqError(f"--resume: {run_dir} holds no config.json; start the run without --resume")
        saved = json.loads(cfg_path.read_text())
        stored = SearchConfig.from_dict(saved["config"])
        stored.run_dir = str(run_dir)
        if episodes is not None:
            stored.episodes = int(episodes)
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


def write_config(run_dir: Path, parts: SearchParts, command: str | None) -> None:
    config = parts.config
    data = {
        "command": command if command is not None else " ".join(["releq-tvm"] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.as_dict(),
        "episode_length": parts.env.episode_length,
        "observation_features": list(_observation_names(parts.env)),
        "cost": parts.cost.describe(),
        "accuracy": (
            "short fine-tune of the quantized float model, top-1 on the first "
            f"{config.val_images} val images (never test)"
            if parts.oracle.scores_accuracy
            else "none: SA = 1 for every configuration (cost only)"
        ),
        "full_precision_val_accuracy": parts.oracle.full_precision if parts.oracle.scores_accuracy else None,
        "reward_th_effective": effective_th(config, parts.oracle),
        "notes": parts.notes,
        **environment_info(),
    }
    atomic_write_text(run_dir / "config.json", json.dumps(data, indent=2) + "\n")


def record_resume(run_dir: Path, config: SearchConfig, command: str | None) -> None:
    """Keep config.json describing the run: the config in force now (``--episodes`` may have
    changed the budget) and, in ``resumes``, each resume's command and time."""
    path = run_dir / "config.json"
    data = json.loads(path.read_text())
    data["config"] = config.as_dict()
    data.setdefault("resumes", []).append({
        "command": command if command is not None else " ".join(["releq-tvm"] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "episodes": config.episodes,
    })
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _observation_names(env) -> tuple[str, ...]:
    from releq_tvm.search.env import OBSERVATION_FEATURES

    return OBSERVATION_FEATURES + (("activation_flag",) if env.act_action_set else ())


def run_search(
    config: SearchConfig,
    resume: bool = False,
    echo=print,
    oracle=None,
    cost=None,
    command: str | None = None,
    resume_episodes: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) one search; returns the content of best.json.

    ``config.run_dir`` names the run (default runs/search/<net>-<measure>-<reward>). With
    ``resume`` the saved config is used and ``resume_episodes`` may change the budget;
    ``overwrite`` replaces a run already in ``run_dir``.
    ``oracle`` and ``cost`` replace the real accuracy oracle and cost backend (for tests).
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    run_dir, config = prepare_run_dir(config, resume, resume_episodes, overwrite)
    parts = build_parts(config, oracle=oracle, cost=cost)
    if resume:
        record_resume(run_dir, config, command)
    else:
        write_config(run_dir, parts, command)
    for note in parts.notes:
        echo(f"note: {note}")
    search = ReleqSearch(parts, run_dir, echo=echo)
    vec_env = DummyVecEnv([lambda: parts.env])

    agent = search.load_checkpoint(vec_env) if resume else None
    if resume:
        search.drop_rows_after_checkpoint()
        stopped_converged = search.converged_episode is not None and config.stop_on_convergence
        if search.training_finished and config.episodes > search.episodes_done and not stopped_converged:
            search.reopen_training()
        echo(f"resuming {run_dir} after episode {search.episode} ({search.episodes_done} training episodes done)")
    if agent is None:
        agent = make_agent(config, vec_env, log_dir=run_dir / PPO_LOG_DIR)
    echo(
        f"search {config.network}: {len(parts.table)} layers, {parts.env.episode_length} steps/episode, "
        f"cost = {parts.cost.describe()}, reward {config.reward}, "
        + (f"full-precision val accuracy {parts.oracle.full_precision:.2f}%" if parts.oracle.scores_accuracy else "accuracy not scored")
    )
    search.reset_clock()

    if not search.training_finished:
        remaining = config.episodes - search.episodes_done
        if remaining > 0 and not (search.converged_episode is not None and config.stop_on_convergence):
            agent.learn(
                total_timesteps=remaining * parts.env.episode_length,
                callback=_make_callback(search),
                reset_num_timesteps=search.episodes_done == 0,
            )
            agent.logger.dump(agent.num_timesteps)  # SB3 writes an update's statistics at the next one
        # learn() ends after the last update (budget spent) or before it (converged): either way
        # every written episode is accounted for.
        search.episodes_done = search.episode
        search.training_finished = True
        search.save_checkpoint(agent)

    while search.greedy_done < config.final_episodes:
        _greedy_episode(search, agent)
        search.save_checkpoint(agent)

    from releq_tvm.search.accuracy import FinetunedAccuracy, long_finetune

    solution = search.solution()
    # Only the real oracle holds the float model and the train split the long fine-tune needs.
    can_finetune = isinstance(parts.oracle, FinetunedAccuracy)
    if search.long_result is None and can_finetune and config.long_finetune and config.long_steps > 0:
        from releq_tvm.data import load_dataset

        echo(f"long fine-tune of {format_bits(solution['w_bits'])} for {config.long_steps} steps ...")
        test = load_dataset(parts.dataset, "test", config.data_dir)
        search.long_result = long_finetune(
            parts.oracle,
            solution["w_bits"],
            solution["a_bits"],
            test,
            steps=config.long_steps,
            learning_rates=config.long_lrs,
            batch_size=config.finetune_batch_size,
            seed=config.seed,
        )
        search.save_checkpoint(agent)
    search._write_best()
    _summary(search, solution, echo)
    return json.loads((run_dir / "best.json").read_text())


def _summary(search: ReleqSearch, solution: dict, echo) -> None:
    bits = format_bits(solution["w_bits"]) + (f" (activations {format_bits(solution['a_bits'])})" if solution["a_bits"] else "")
    converged = f"converged at episode {search.converged_episode}" if search.converged_episode else "did not meet the convergence test"
    hit_rate = 100 * search.hits / max(search.lookups, 1)
    echo(
        f"{search.config.network}: chosen bits {bits}; SA {solution['sa']:.4f}, cost ratio {solution['cost_ratio']:.4f}; "
        f"{converged}; {search.episodes_done} training episodes, {search.elapsed / 60:.1f} min "
        f"({search.cpu_seconds / 60:.1f} CPU min), cache hits {hit_rate:.0f}%"
    )
    if not solution["source"].startswith("deterministic"):
        echo(f"the chosen bits are the {solution['source']}")
    best = search.best
    if best is not None and best["reward"] > solution["reward"] and best["w_bits"] != solution["w_bits"]:
        echo(
            f"best configuration seen (episode {best['episode']}, best.json 'best'): {format_bits(best['w_bits'])}, "
            f"SA {best['sa']:.4f}, cost ratio {best['cost_ratio']:.4f}, reward {best['reward']:+.4f} "
            f"(the policy's own choice scores {solution['reward']:+.4f})"
        )
    if search.long_result:
        r = search.long_result
        echo(
            f"long fine-tune ({r['steps']} steps, lr {r['learning_rate']:g} chosen on val): test accuracy {r['test_accuracy_quantized']:.2f}% vs full precision "
            f"{r['test_accuracy_full_precision']:.2f}% ({-r['loss_pp']:+.2f} pp)"
        )
    elif not search.parts.oracle.scores_accuracy:
        echo("accuracy was not scored (--accuracy none): these bits optimise cost only")
    echo(f"results in {search.run_dir}")
