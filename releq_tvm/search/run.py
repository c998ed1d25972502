"""The ReLeQ search loop: build the env and the RecurrentPPO agent, train, read off the bits, long fine-tune.

Read top to bottom, :func:`run_search` does:

1. build the pieces from a :class:`SearchConfig` (layer table, float model, accuracy oracle,
   cost backend, :class:`ReleqEnv`), or reload them from ``run_dir`` with ``resume``; a user's
   model (``--model``) is registered first, and the data is ``--data``, the network's own dataset,
   or images passed in memory (:class:`SearchData`);
2. train sb3-contrib ``RecurrentPPO`` with ``n_steps`` = episode length, so the policy is
   updated at the end of every episode (of every batch of ``--envs N`` episodes, which step
   together and have their accuracies evaluated at once on Ray workers:
   :mod:`releq_tvm.search.parallel`); a callback logs every episode (episodes.csv), the
   policy's probability of every bitwidth at every step (action_probs.csv), the best
   configuration (best.json), checks convergence, and checkpoints agent + :class:`RunState` +
   env + RNG state (checkpoint.pt, one atomic file) after every update;
3. run ``final_episodes`` deterministic (argmax) episodes and take the best of them as the
   solution;
4. LONG fine-tune the solution and report its TEST accuracy against full precision.

What each file of the run holds, and how it is written and read back, is
:mod:`releq_tvm.search.run_files`.

A run killed at any moment resumes with ``resume=True``: the rows after the last checkpoint
are dropped (at most the episodes in flight) and training continues from the saved agent,
env states and random state, so a resumed run makes the same choices as an uninterrupted one
(with the same number of environments). Ctrl-C writes the newest consistent checkpoint first.
"""

from __future__ import annotations

import importlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from releq_tvm.bits import format_bits
from releq_tvm.data import TensorDataset
from releq_tvm.errors import ReleqError
from releq_tvm.search.config import SearchConfig
from releq_tvm.search.run_files import (
    PPO_LOG_DIR,
    EpisodeLog,
    RunState,
    best_point,
    checkpoint_bytes,
    episode_point,
    episode_row,
    load_checkpoint,
    prepare_run_dir,
    record_resume,
    save_finetuned_model,
    step_rows,
    write_best,
    write_checkpoint,
    write_config,
)


# ----------------------------------------------------------------------------------------------
# The model and the data
# ----------------------------------------------------------------------------------------------
#: :attr:`SearchData.source` of images passed in memory (the Python API).
IN_MEMORY = "in memory"


@dataclass(frozen=True)
class SearchData:
    """The images of a search that scores accuracy: ``train`` fine-tunes every configuration, ``val``
    scores it for the reward, ``test`` reports the long fine-tune of the chosen one (None: the data
    has no test split, and there is no long fine-tune). Images (N, C, H, W) float in [0, 1], labels
    (N,) class indices, as :func:`releq_tvm.data.load_model_data` gives them.

    ``source`` says where they come from: a ``--data`` spec, a dataset name, or :data:`IN_MEMORY`.
    ``digest`` (:func:`releq_tvm.search.accuracy.data_digest` of train and val) joins the accuracy
    cache key unless the images are the network's registered dataset; :func:`build_parts` sets it.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset | None = None
    source: str = IN_MEMORY
    digest: str | None = None


def register_search_model(config: SearchConfig) -> None:
    """Register ``config.model`` (``--model``: a .onnx / .pt2 file or an entry point) under
    ``config.network``, checked against the operators the integer lowering supports; a model that
    cannot be read, run or compiled is a one-line error. A registered network needs nothing, and a
    model already registered from the same source is not loaded again."""
    from releq_tvm.networks import UnknownNetworkError, get_network_spec

    if config.model is None:
        return
    try:
        spec = get_network_spec(config.network)
        if spec.source == config.model and config.input_shape in (None, spec.input_shape):
            return
    except UnknownNetworkError:
        pass
    from releq_tvm.networks import create_network, register_user_model

    spec = register_user_model(config.model, config.input_shape)
    # the integer lowering's graph tracer, by name (search comes before compile in the data flow)
    extract_graph = importlib.import_module("releq_tvm.compile.graph").extract_graph
    extract_graph(create_network(spec.name), spec.input_shape, spec.name)  # an unsupported operator fails here


def check_search_inputs(config: SearchConfig, data: SearchData | None = None, oracle=None) -> None:
    """Register the model (:func:`register_search_model`) and check that a search scoring accuracy
    has data to score it on: each mistake a one-line error, before any work is done."""
    from releq_tvm.data import DATA_FORMS
    from releq_tvm.networks import get_network_spec

    register_search_model(config)
    spec = get_network_spec(config.network)  # an unknown name lists the registered ones
    if data is not None and config.data is not None:
        raise ReleqError(f"pass the images in memory or --data {config.data}, not both")
    if config.accuracy != "none" and oracle is None and data is None and (config.data or spec.dataset) is None:
        raise ReleqError(f"the search scores {config.network}'s accuracy on data: pass --data with {DATA_FORMS}, "
                         "or --accuracy none to search on cost only")


def _has_test_split(source: str) -> bool:
    """Whether ``--data`` ``source`` holds a test split (optional in an npz file and an image folder)."""
    kind, _, where = source.partition(":")
    if kind == "npz":
        with np.load(where, allow_pickle=False) as arrays:  # train and val were read from it: it is an npz
            return "x_test" in arrays.files
    if kind == "imagefolder":
        return (Path(where) / "test").is_dir()
    return True  # a dataset by name


def _source_split(config: SearchConfig, spec, split: str, limit: int | None = None) -> TensorDataset:
    """``split`` of ``--data`` or, without it, of the network's own dataset."""
    from releq_tvm.data import load_model_data

    source = config.data or spec.dataset
    return load_model_data(source, split, spec.input_shape, spec.num_classes, config.data_dir, limit)


def load_search_data(config: SearchConfig, spec) -> SearchData:
    """train and val (the first ``train_images`` / ``val_images``) of ``--data`` or the network's
    own dataset, and test when the long fine-tune will run and the data has one."""
    source = config.data or spec.dataset
    train = _source_split(config, spec, "train", config.train_images)
    val = _source_split(config, spec, "val", config.val_images)
    long = config.long_finetune and config.long_steps > 0
    test = _source_split(config, spec, "test") if long and _has_test_split(source) else None
    return SearchData(train, val, test, source)


def _first(data: TensorDataset, n: int | None) -> TensorDataset:
    return data if n is None or len(data) <= n else TensorDataset(data.images[:n], data.labels[:n])


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
    dataset: str | None  # the network's registered dataset (None: a user's model)
    notes: list[str] = field(default_factory=list)
    data: SearchData | None = None  # None: accuracy is not scored, or the oracle was given


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


def build_parts(config: SearchConfig, oracle=None, cost=None, data: SearchData | None = None) -> SearchParts:
    """Layer table, float model, accuracy oracle, cost backend and env for ``config``.

    ``data``: the images to score accuracy on, in memory (default: ``config.data``, else the
    network's own dataset). ``oracle`` / ``cost`` replace the real ones (tests inject fakes; no
    data or TVM needed).
    """
    from releq_tvm.networks import MissingCheckpointError, create_network, get_network_spec, layer_table
    from releq_tvm.search.accuracy import AccuracyCache, FinetunedAccuracy, FinetuneSettings, NoAccuracy, data_digest
    from releq_tvm.search.cost import make_cost_backend
    from releq_tvm.search.env import ReleqEnv
    from releq_tvm.search.reward import make_reward
    from releq_tvm.train import model_hash

    config.validate()  # again: fields may have been set after construction
    check_search_inputs(config, data, oracle)
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
            if data is None:
                data = load_search_data(config, spec)
            train, val = _first(data.train, config.train_images), _first(data.val, config.val_images)
            # a dataset's name (with the network) implies its images; any other images key by their digest
            digest = None if data.source == spec.dataset else data_digest(train, val)
            data = SearchData(train, val, data.test, data.source, digest)
            if data.test is None and config.long_finetune and config.long_steps > 0:
                notes.append(f"the data ({data.source}) has no test split: no long fine-tune; the accuracy "
                             "reported is the val accuracy after the short fine-tune")
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
                data=digest,
            )
            cache = AccuracyCache(config.cache_path)  # None: the shared store, cache_dir()/cache.sqlite
            oracle = FinetunedAccuracy(model, spec.input_shape, train, val, settings, cache)
    if oracle.scores_accuracy and oracle.full_precision <= 0:
        raise ReleqError(f"{config.network} gets none of the val images right at full precision: check that the "
                         "labels are its classes, in its order, and the images in [0, 1] as it was trained on")
    if cost is None:
        cost = make_cost_backend(config.measure, config.network, table, sq_form=config.sq_form, metric=config.metric,
                                 cpu_kernels=config.cpu_kernels, rpc=config.rpc, rpc_tracker=config.rpc_tracker,
                                 rpc_key=config.rpc_key)
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
    return SearchParts(config, table, env, oracle, cost, model, spec.input_shape, spec.dataset, notes,
                       data if oracle.scores_accuracy else None)


def _about_the_run(parts: SearchParts) -> dict:
    """What config.json records of the built pieces, beside the config itself."""
    from releq_tvm.search.env import OBSERVATION_FEATURES

    config, env, oracle = parts.config, parts.env, parts.oracle
    return {
        "episode_length": env.episode_length,
        "observation_features": list(OBSERVATION_FEATURES + (("activation_flag",) if env.act_action_set else ())),
        "cost": parts.cost.describe(),
        "accuracy": (
            "short fine-tune of the quantized float model, top-1 on the first "
            f"{config.val_images} val images (never test)"
            if oracle.scores_accuracy
            else "none: SA = 1 for every configuration (cost only)"
        ),
        "data": None if parts.data is None else {"source": parts.data.source, "digest": parts.data.digest},
        "full_precision_val_accuracy": oracle.full_precision if oracle.scores_accuracy else None,
        "reward_th_effective": effective_th(config, oracle),
        "notes": parts.notes,
    }


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
# One run's bookkeeping
# ----------------------------------------------------------------------------------------------
class ReleqSearch:
    """One run's :class:`RunState`, episode log and convergence test. Driven by :func:`run_search`."""

    def __init__(self, parts: SearchParts, run_dir: Path, echo=print):
        self.parts, self.config, self.env = parts, parts.config, parts.env
        # parallel episodes: more environments over the same network, oracle and cost (env 0 reads off)
        self.envs = [parts.env] + [parts.env.fresh_copy() for _ in range(parts.config.n_envs - 1)]
        self.run_dir, self.echo = Path(run_dir), echo
        self.value_columns = sorted(set(self.env.action_set) | set(self.env.act_action_set or ()))
        self.log = EpisodeLog(self.run_dir, self.value_columns)
        self.state = RunState()
        self._step_probs: list[list[np.ndarray]] = [[] for _ in self.envs]
        self.pending_checkpoint: bytes | None = None  # the newest consistent checkpoint not yet on disk
        self.reset_clock()

    def record_step(self, probs: np.ndarray, env_index: int = 0) -> None:
        self._step_probs[env_index].append(np.asarray(probs, dtype=np.float64))

    def lap(self, episodes: int = 1) -> tuple[float, float]:
        """Wall and CPU seconds since the last lap, each episode's share when ``episodes`` ended together."""
        now, cpu_now = time.perf_counter(), time.process_time()
        seconds, cpu = (now - self._clock) / episodes, (cpu_now - self._cpu_clock) / episodes
        self._clock, self._cpu_clock = now, cpu_now
        return seconds, cpu

    def finish_episode(self, phase: str, chosen_bits: list[int], env_index: int = 0,
                       lap: tuple[float, float] | None = None) -> bool:
        """Write the episode environment ``env_index`` just finished (``lap``: its share of the time
        of the episodes that ended with it; default: the time since the last one); return False
        when training should stop (converged)."""
        out, state = self.envs[env_index].last_episode, self.state
        state.episode += 1
        seconds, cpu = lap if lap is not None else self.lap()
        state.elapsed += seconds
        state.cpu_seconds += cpu
        state.lookups += out.lookups
        state.hits += out.hits
        step_probs, self._step_probs[env_index] = self._step_probs[env_index], []
        greedy = [self.env.action_to_bits(int(np.argmax(p)), self.env.schedule[i][1]) for i, p in enumerate(step_probs)]
        greedy_prob = float(np.mean([p.max() for p in step_probs]))
        greedy_text = format_bits(greedy)
        row = episode_row(state.episode, phase, out, greedy_text, greedy_prob, seconds)
        self.log.append(row, step_rows(self.env, state.episode, phase, step_probs, chosen_bits, self.value_columns))
        point = episode_point(out, state.episode, phase)
        if state.best is None or point["reward"] > state.best["reward"]:
            state.best = point
        if phase == "greedy":
            state.greedy_results.append(point)
            state.greedy_done += 1
        self._progress(row, out, phase)
        if phase != "train":
            self.write_best()
            return True
        state.streak = state.streak + 1 if greedy_text == state.last_greedy else 1
        state.last_greedy = greedy_text
        converged = state.streak >= self.config.converge_window and greedy_prob >= self.config.converge_prob
        if converged and state.converged_episode is None:
            state.converged_episode = state.episode
            self.echo(
                f"converged at episode {state.episode}: greedy bits {greedy_text} for {state.streak} episodes, "
                f"mean probability {greedy_prob:.2f}"
            )
        self.write_best()
        return not (converged and self.config.stop_on_convergence)

    def _progress(self, row: dict, out, phase: str) -> None:
        state = self.state
        total = self.config.episodes if phase == "train" else self.config.final_episodes
        index = state.episode if phase == "train" else state.greedy_done
        hit_rate = state.hits / max(state.lookups, 1)
        bits = row["w_bits"] + (f" a {row['a_bits']}" if row["a_bits"] else "")
        cost_name = "SQ" if self.config.measure == "none" else "cost"
        self.echo(
            f"{phase:>6} {index:>4}/{total:<4} bits {bits}  acc {out.accuracy:6.2f}%  SA {out.sa:.4f}  "
            f"{cost_name} {out.cost:.4f}  r {out.reward:+.4f}  {'hit ' if out.hits == out.lookups else 'miss'}  "
            f"{row['seconds']}s  (cache hits {100 * hit_rate:.0f}%, greedy {row['greedy_bits']} p={row['greedy_prob']})"
        )

    @property
    def stopped_by_convergence(self) -> bool:
        return self.state.converged_episode is not None and self.config.stop_on_convergence

    def solution(self) -> dict | None:
        """The chosen configuration, with ``source`` saying where it comes from.

        A converged run: the deterministic read-off episodes' best (ties: the later one), as in
        ReLeQ. A run that stopped before converging: the better by reward of that read-off and
        the best configuration any episode evaluated, since an unconverged policy's argmax can
        be far from what the search has already found (measured: a 24-episode LeNet-5 demo
        read off 1,1,1,1,1 at reward -1 after seeing 1,1,4,3,4 at +0.33).
        """
        state = self.state
        if not state.greedy_results:
            return None
        greedy = max(reversed(state.greedy_results), key=lambda p: p["reward"])
        if state.converged_episode is None and state.best is not None and state.best["reward"] > greedy["reward"]:
            return {**state.best, "source": "best configuration seen (the policy did not converge)"}
        return {**greedy, "source": "deterministic read-off of the policy"}

    def write_best(self) -> None:
        write_best(self.run_dir, self.config, self.parts.oracle, self.state, self.solution())

    def save_checkpoint(self, agent, write: bool = True) -> None:
        """Checkpoint the run now (agent, state, every env, RNG); ``write`` False keeps it in memory
        only, for :meth:`save_pending` to write when the run is interrupted."""
        blob = checkpoint_bytes(agent, self.state, [env.state_dict() for env in self.envs])
        if write:
            write_checkpoint(self.run_dir, blob)
        self.pending_checkpoint = None if write else blob

    def save_pending(self) -> None:
        """Write the newest consistent checkpoint, if it is not on disk yet (on Ctrl-C)."""
        if self.pending_checkpoint is not None:
            write_checkpoint(self.run_dir, self.pending_checkpoint)
            self.pending_checkpoint = None

    def resume(self, vec_env):
        """Restore the state, env, agent and random state of checkpoint.pt and drop the rows after
        it (at most the episode in flight). Returns the agent; None when no checkpoint was written."""
        from sb3_contrib import RecurrentPPO

        checkpoint = load_checkpoint(self.run_dir)
        agent = None
        if checkpoint is not None:
            self.state = checkpoint.state
            for i, env in enumerate(self.envs):  # resumed with more environments: the new ones start as env 0
                env.load_state_dict(checkpoint.env_states[i if i < len(checkpoint.env_states) else 0])
            agent = RecurrentPPO.load(io.BytesIO(checkpoint.agent), env=vec_env, device="cpu")
            # a resumed run logs PPO's statistics to a file of its own: SB3's CSV writer truncates
            agent.set_logger(ppo_logger(self.run_dir / PPO_LOG_DIR, suffix=f"-resume{self.state.episodes_done}"))
            checkpoint.restore_rng()  # last: loading the agent draws from torch's random state
        self.log.keep_through(self.state.episode)
        return agent

    def reopen_training(self) -> None:
        """Continue training a finished run (a larger budget on resume): its greedy episodes are redone."""
        state = self.state
        rows = self.log.keep_through(state.episodes_done)
        state.episode = state.episodes_done
        state.training_finished = False
        state.greedy_done, state.greedy_results, state.long_result = 0, [], None
        state.best = best_point(rows)

    def reset_clock(self) -> None:
        self._clock = time.perf_counter()
        self._cpu_clock = time.process_time()


# ----------------------------------------------------------------------------------------------
# Episodes: training (sampled, through SB3's callback) and read-off (argmax)
# ----------------------------------------------------------------------------------------------
def _make_callback(search: ReleqSearch):
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeCallback(BaseCallback):
        """Per step: the policy's probabilities; per episode: log, convergence, checkpoint."""

        def _on_rollout_start(self) -> None:
            # Rollouts are exactly one episode (per environment) long, so here the previous
            # episodes' update is done: a consistent point, written every checkpoint_every episodes
            # and otherwise kept in memory for an interrupt.
            state = search.state
            if state.episode > state.episodes_done:
                before, state.episodes_done = state.episodes_done, state.episode
                every = search.config.checkpoint_every
                search.save_checkpoint(self.model, write=state.episodes_done // every > before // every)

        def _on_step(self) -> bool:
            model = self.model
            with torch.no_grad():
                # _last_lstm_states is still the state the actions were sampled from.
                dist, _ = model.policy.get_distribution(
                    self.locals["obs_tensor"], model._last_lstm_states.pi, self.locals["episode_starts"]
                )
            for i, probs in enumerate(dist.distribution.probs.cpu().numpy()):
                search.record_step(probs, i)
            keep_training = True
            done = np.flatnonzero(self.locals["dones"])  # all environments end their episodes together
            lap = search.lap(len(done)) if len(done) else None
            for i in done:
                chosen = [int(b) for b in _episode_actions(search, int(i))]
                keep_training = search.finish_episode("train", chosen, int(i), lap) and keep_training
            return keep_training

    return EpisodeCallback()


def _episode_actions(search: ReleqSearch, env_index: int = 0) -> list[int]:
    """The bits the agent picked at each step of the episode just finished (before any correction)."""
    out = search.envs[env_index].last_episode
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


# ----------------------------------------------------------------------------------------------
# The search: set up, train, read off, long fine-tune
# ----------------------------------------------------------------------------------------------
def run_search(
    config: SearchConfig,
    resume: bool = False,
    echo=print,
    oracle=None,
    cost=None,
    command: str | None = None,
    resume_episodes: int | None = None,
    overwrite: bool = False,
    data: SearchData | None = None,
    resume_settings: dict | None = None,
) -> dict:
    """Run (or resume) one search; returns the content of best.json.

    ``config.run_dir`` names the run (default runs/search/<net>-<measure>-<reward>). With
    ``resume`` the saved config is used (its ``--model`` registered again) and ``resume_episodes``
    may change the budget; ``overwrite`` replaces a run already in ``run_dir``.
    ``data``: images in memory to score accuracy on instead of ``config.data`` or the network's
    own dataset (on resume, the same images again: their digest is checked against the run's).
    ``resume_settings``: settings a resumed run takes anew (``workers``, ``envs``, ``ray_address``:
    how fast it runs, not what it means; see :data:`releq_tvm.search.config.RESUME_SETTINGS`).
    ``oracle`` and ``cost`` replace the real accuracy oracle and cost backend (for tests).

    Ctrl-C stops the run at its newest consistent checkpoint (written, if it was not yet) and
    re-raises KeyboardInterrupt after saying how to resume.
    """
    from releq_tvm.search.parallel import make_vec_env

    # -- set up ------------------------------------------------------------------------------------
    evaluator = None
    if not resume:  # before the run folder is made: a Ray that would not start leaves no run behind
        check_search_inputs(config, data, oracle)
        evaluator = _start_ray(config, oracle, echo)
    try:
        run_dir, config = prepare_run_dir(config, resume, resume_episodes, overwrite, resume_settings)
        if resume:  # its settings, with any given anew (nothing is written before record_resume)
            evaluator = _start_ray(config, oracle, echo)
        parts = build_parts(config, oracle=oracle, cost=cost, data=data)
        if resume:
            _check_same_data(run_dir, parts)
            record_resume(run_dir, config, command)
        else:
            write_config(run_dir, config, _about_the_run(parts), command)
        for note in parts.notes:
            echo(f"note: {note}")
        search = ReleqSearch(parts, run_dir, echo=echo)
        if evaluator is not None:
            echo(f"{evaluator.describe()}; {config.n_envs} environments step together")
            if config.n_envs < evaluator.cpus:
                echo(f"note: {config.n_envs} environment(s) ask for at most {config.n_envs} evaluation(s) at once, so "
                     f"{evaluator.cpus - config.n_envs} of Ray's {evaluator.cpus} CPUs idle; --envs {evaluator.cpus} uses them all")
    except BaseException:
        if evaluator is not None:
            evaluator.close()
        raise
    try:
        return _run(search, make_vec_env(search.envs, evaluator), resume)
    except KeyboardInterrupt:
        search.save_pending()
        state = search.state
        echo(f"interrupted: {run_dir} is saved after training episode {state.episodes_done} "
             f"({state.greedy_done} read-off episodes); continue with: releq-tvm search --resume --run-dir {run_dir}")
        raise
    finally:
        if evaluator is not None:
            evaluator.close()


def _start_ray(config: SearchConfig, oracle, echo):
    """Ray workers for the accuracy evaluations, local or joined. None: ``--workers 1`` (no Ray), or
    nothing to fine-tune (``--accuracy none``, or an ``oracle`` without a short fine-tune), so no
    Ray is started only to sit idle."""
    if config.workers <= 1 and config.ray_address is None:
        return None
    from releq_tvm.search.parallel import RayEvaluator, check_ray_installed

    check_ray_installed(config.workers, config.ray_address)  # the flags asked for Ray, needed or not
    finetunes = hasattr(oracle, "short_finetune") if oracle is not None else config.accuracy != "none"
    if not finetunes:
        what = type(oracle).__name__ if oracle is not None else "--accuracy none"
        echo(f"note: --workers {config.workers}: accuracy is not fine-tuned here ({what}), "
             "so nothing runs on Ray; the environments step in this process")
        return None
    return RayEvaluator(config.workers, config.ray_address, threads=config.threads or 1)


def _run(search: ReleqSearch, vec_env, resume: bool) -> dict:
    """Train, read off and long fine-tune (the body of :func:`run_search`)."""
    parts, config, run_dir, echo = search.parts, search.config, search.run_dir, search.echo

    agent = None
    if resume:
        agent = search.resume(vec_env)
        state = search.state
        if state.training_finished and config.episodes > state.episodes_done and not search.stopped_by_convergence:
            search.reopen_training()
        echo(f"resuming {run_dir} after episode {state.episode} ({state.episodes_done} training episodes done)")
    if agent is None:
        agent = make_agent(config, vec_env, log_dir=run_dir / PPO_LOG_DIR)
    state = search.state
    echo(
        f"search {config.network}: {len(parts.table)} layers, {parts.env.episode_length} steps/episode, "
        f"cost = {parts.cost.describe()}, reward {config.reward}, "
        + (f"full-precision val accuracy {parts.oracle.full_precision:.2f}%" if parts.oracle.scores_accuracy else "accuracy not scored")
    )
    search.reset_clock()

    # -- train: one policy update per batch of N episodes (the budget rounds up to whole batches) ----
    if not state.training_finished:
        remaining = config.episodes - state.episodes_done
        if remaining > 0 and not search.stopped_by_convergence:
            agent.learn(
                total_timesteps=remaining * parts.env.episode_length,
                callback=_make_callback(search),
                reset_num_timesteps=state.episodes_done == 0,
            )
            agent.logger.dump(agent.num_timesteps)  # SB3 writes an update's statistics at the next one
        # learn() ends after the last update (budget spent) or before it (converged): either way
        # every written episode is accounted for.
        state.episodes_done = state.episode
        state.training_finished = True
        search.save_checkpoint(agent)

    # -- read off the solution: deterministic episodes -----------------------------------------------
    while state.greedy_done < config.final_episodes:
        _greedy_episode(search, agent)
        search.save_checkpoint(agent)

    # -- finish: long fine-tune of the solution, best.json, summary ----------------------------------
    from releq_tvm.search.accuracy import FinetunedAccuracy, long_finetune

    solution = search.solution()
    # Only the real oracle holds the float model and the train split the long fine-tune needs.
    can_finetune = isinstance(parts.oracle, FinetunedAccuracy)
    long_due = state.long_result is None and can_finetune and config.long_finetune and config.long_steps > 0
    test = _test_split(parts) if long_due else None
    if test is not None:
        echo(f"long fine-tune of {format_bits(solution['w_bits'])} for {config.long_steps} steps ...")
        result, model = long_finetune(
            parts.oracle,
            solution["w_bits"],
            solution["a_bits"],
            test,
            steps=config.long_steps,
            learning_rates=config.long_lrs,
            batch_size=config.finetune_batch_size,
            seed=config.seed,
        )
        # the model first: a kill before the checkpoint only repeats the long fine-tune on resume
        result["model_file"] = save_finetuned_model(run_dir, model, config.network, parts.oracle.input_shape, result)
        state.long_result = result
        search.save_checkpoint(agent)
    search.write_best()
    _summary(search, solution, echo)
    return json.loads((run_dir / "best.json").read_text())


def _test_split(parts: SearchParts) -> TensorDataset | None:
    """The long fine-tune's test images (None: the data has no test split)."""
    if parts.data is not None:
        return parts.data.test
    from releq_tvm.networks import get_network_spec  # an oracle the caller gave: the test split of config's data

    return _source_split(parts.config, get_network_spec(parts.config.network), "test")


def _check_same_data(run_dir: Path, parts: SearchParts) -> None:
    """A resumed run scores accuracy on the images it started with (config.json's ``data``)."""
    saved = json.loads((run_dir / "config.json").read_text()).get("data")
    now = None if parts.data is None else {"source": parts.data.source, "digest": parts.data.digest}
    if saved is not None and now is not None and saved["digest"] != now["digest"]:
        raise ReleqError(
            f"{run_dir} scored accuracy on other images ({saved['source']}, digest {saved['digest']}) than these "
            f"({now['source']}, digest {now['digest']}); resume with the run's images, or start a new run"
        )


def _summary(search: ReleqSearch, solution: dict, echo) -> None:
    state = search.state
    bits = format_bits(solution["w_bits"]) + (f" (activations {format_bits(solution['a_bits'])})" if solution["a_bits"] else "")
    converged = f"converged at episode {state.converged_episode}" if state.converged_episode else "did not meet the convergence test"
    hit_rate = 100 * state.hits / max(state.lookups, 1)
    echo(
        f"{search.config.network}: chosen bits {bits}; SA {solution['sa']:.4f}, cost ratio {solution['cost_ratio']:.4f}; "
        f"{converged}; {state.episodes_done} training episodes, {state.elapsed / 60:.1f} min "
        f"({state.cpu_seconds / 60:.1f} CPU min), cache hits {hit_rate:.0f}%"
    )
    if not solution["source"].startswith("deterministic"):
        echo(f"the chosen bits are the {solution['source']}")
    best = state.best
    if best is not None and best["reward"] > solution["reward"] and best["w_bits"] != solution["w_bits"]:
        echo(
            f"best configuration seen (episode {best['episode']}, best.json 'best'): {format_bits(best['w_bits'])}, "
            f"SA {best['sa']:.4f}, cost ratio {best['cost_ratio']:.4f}, reward {best['reward']:+.4f} "
            f"(the policy's own choice scores {solution['reward']:+.4f})"
        )
    if state.long_result:
        r = state.long_result
        echo(
            f"long fine-tune ({r['steps']} steps, lr {r['learning_rate']:g} chosen on val): test accuracy {r['test_accuracy_quantized']:.2f}% vs full precision "
            f"{r['test_accuracy_full_precision']:.2f}% ({-r['loss_pp']:+.2f} pp)"
        )
        if r.get("model_file"):
            model_file = search.run_dir / r["model_file"]
            config = search.config
            net = config.network if config.model is None else f"--model {config.model}" + (
                "" if config.input_shape is None else f" --input-shape {','.join(map(str, config.input_shape))}")
            echo(f"fine-tuned model in {model_file} (build it: releq-tvm compile {net} --checkpoint {model_file})")
    elif not search.parts.oracle.scores_accuracy:
        echo("accuracy was not scored (--accuracy none): these bits optimise cost only")
    echo(f"results in {search.run_dir}")
