"""The ReLeQ search: cost backends, latency-target correction, env (check_env), accuracy cache, runs, resume.

Accuracy is faked (a deterministic function of the bits) except in the cache test, which
fine-tunes LeNet-5 for two steps; no test builds TVM code.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from releq_tvm.errors import ReleqError
from releq_tvm.networks import layer_table
from releq_tvm.search.config import SearchConfig
from releq_tvm.search.cost import CpuLatencyCost, SQCost, StripesCost, correct_to_target
from releq_tvm.search.env import OBSERVATION_FEATURES, ReleqEnv
from releq_tvm.search.reward import make_reward, state_of_quantization
from releq_tvm.search.run import build_parts, run_search


class FakeAccuracy:
    """Deterministic stand-in for the fine-tune oracle: loses 0.02 pp per squared bit removed.

    ``kill_after`` raises KeyboardInterrupt at that lookup, like a kill in the middle of an episode.
    """

    scores_accuracy = True
    full_precision = 99.0

    def __init__(self, kill_after=None):
        self.lookups = self.hits = 0
        self.last_hit = False
        self.seconds = 0.0
        self.kill_after = kill_after
        self._seen = set()

    def accuracy(self, w_bits, a_bits=None):
        self.lookups += 1
        if self.kill_after is not None and self.lookups > self.kill_after:
            raise KeyboardInterrupt("simulated kill")
        key = (tuple(w_bits), None if a_bits is None else tuple(a_bits))
        self.last_hit = key in self._seen
        self.hits += int(self.last_hit)
        self._seen.add(key)
        loss = 0.02 * sum((8 - b) ** 2 for b in w_bits) + (0.05 * sum(8 - b for b in a_bits) if a_bits else 0.0)
        return 99.0 - loss


def fake_latency(network, w_bits, a_bits=None, kernels="bitserial"):
    """Bit-serial-like cost: sum of w*a planes over the 8x8 reference (activations 8 when not searched)."""
    a_bits = a_bits or [8] * len(w_bits)
    return sum(w * a for w, a in zip(w_bits, a_bits)) / (64.0 * len(w_bits))


def make_env(finetune="per-episode", act_action_set=None, latency_target=None, cost=None, network="lenet"):
    table = layer_table(network)
    cost = cost or SQCost(table)
    return ReleqEnv(
        table,
        weight_std=[0.1 * (i + 1) for i in range(len(table))],
        oracle=FakeAccuracy(),
        cost=cost,
        reward_fn=make_reward("asymmetric"),
        act_action_set=act_action_set,
        finetune=finetune,
        latency_target=latency_target,
    )


# ---------------------------------------------------------------------------------------------
# cost backends and the latency-target correction
# ---------------------------------------------------------------------------------------------
def test_sq_backend_is_the_formula():
    table = layer_table("lenet")
    cost = SQCost(table)
    bits = (8, 2, 2, 3, 2)
    assert cost.ratio(bits) == pytest.approx(state_of_quantization(table, bits))
    assert SQCost(table, form="plain").ratio(bits) == pytest.approx(17 / 40)


def test_cpu_backend_uses_injected_latency_and_memoises():
    calls = []

    def latency(network, w_bits, a_bits=None, kernels="bitserial"):
        calls.append((network, tuple(w_bits), a_bits, kernels))
        return fake_latency(network, w_bits, a_bits)

    cost = CpuLatencyCost("lenet", latency_ratio=latency)
    assert cost.ratio((8, 8, 8, 8, 8)) == pytest.approx(1.0)
    assert cost.ratio((4, 4, 4, 4, 4)) == pytest.approx(0.5)
    assert cost.ratio((4, 4, 4, 4, 4)) == pytest.approx(0.5)
    # the default prices what compile ships (auto); the paper's comparison is one option away
    assert calls == [("lenet", (8,) * 5, None, "auto"), ("lenet", (4,) * 5, None, "auto")]
    assert "auto" in cost.describe()
    paper = CpuLatencyCost("lenet", latency_ratio=latency, kernels="bitserial")
    paper.ratio((2,) * 5)
    assert calls[-1][-1] == "bitserial"
    with pytest.raises(ReleqError, match="--cpu-kernels"):
        CpuLatencyCost("lenet", kernels="int4")


def test_runs_from_before_auto_resume_with_their_bitserial_pricing():
    assert SearchConfig.from_dict({"network": "lenet", "measure": "cpu"}).cpu_kernels == "bitserial"
    assert SearchConfig(network="lenet").cpu_kernels == "auto"


def test_stripes_backend_ratio_is_one_at_8_bits_and_falls_with_weight_bits():
    cost = StripesCost(layer_table("lenet"))
    assert cost.ratio((8,) * 5) == pytest.approx(1.0)
    assert cost.ratio((2,) * 5) < cost.ratio((4,) * 5) < 1.0


def test_latency_correction_reverse_order_activations_then_weights():
    def ratio(w, a):  # (w0*a0 + w1*a1) / (2 * 64)
        return (w[0] * a[0] + w[1] * a[1]) / 128.0

    # Start (w, a) = ((8, 8), (8, 8)): ratio 1. Walk layer 1 first:
    #   a1 8 -> 4: (64 + 32) / 128 = 0.75 > 0.6
    #   w1 8 -> 4: (64 + 16) / 128 = 0.625 > 0.6
    #   then layer 0, a0 8 -> 4: (32 + 16) / 128 = 0.375 <= 0.6: stop.
    w, a, r, steps = correct_to_target((8, 8), (8, 8), ratio, 0.6, w_set=(1, 2, 4, 8), a_set=(2, 4, 8))
    assert (w, a, steps) == ((8, 4), (4, 4), 3)
    assert r == pytest.approx(0.375)


def test_latency_correction_weights_only_repeats_passes():
    def ratio(w, a):  # (w0 + 3 w1) / 32
        return (w[0] + 3 * w[1]) / 32.0

    # Pass 1: w1 8->4 (0.625), w0 8->4 (0.5). Pass 2: w1 4->2 (0.3125), w0 4->2 (0.25 <= 0.3).
    w, a, r, steps = correct_to_target((8, 8), None, ratio, 0.3, w_set=(1, 2, 4, 8))
    assert (w, a, steps) == ((2, 2), None, 4)
    assert r == pytest.approx(0.25)
    # A configuration that already fits is left alone.
    assert correct_to_target((2, 2), None, ratio, 0.3, w_set=(1, 2, 4, 8))[:3] == ((2, 2), None, 0.25)
    # An unreachable target ends at the lowest bits, still over target.
    w, _, r, _ = correct_to_target((8, 8), None, ratio, 0.01, w_set=(1, 2, 4, 8))
    assert w == (1, 1) and r == pytest.approx(4 / 32)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"finetune": "per-step"},
        {"act_action_set": (2, 4, 8), "cost": CpuLatencyCost("lenet", latency_ratio=fake_latency)},
        {"latency_target": 0.4},
    ],
    ids=["per-episode", "per-step", "activations", "latency-target"],
)
def test_env_passes_gymnasium_and_sb3_check_env(kwargs):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    gym_check_env(make_env(**kwargs), skip_render_check=True)
    sb3_check_env(make_env(**kwargs), warn=False)


def test_observation_by_hand_at_reset_and_after_one_step():
    env = make_env()
    table = layer_table("lenet")
    obs, _ = env.reset(seed=0)
    names = list(OBSERVATION_FEATURES)
    assert obs.shape == (13,)
    assert obs[names.index("layer_index")] == 0.0
    assert obs[names.index("current_bits")] == 1.0  # every layer starts at 8 bits
    assert obs[names.index("previous_bits")] == 0.0
    assert obs[names.index("sq_or_cost")] == pytest.approx(1.0)
    assert obs[names.index("sa")] == 1.0
    obs, reward, terminated, truncated, _ = env.step(0)  # action 0 = 1 bit for conv1
    assert obs[names.index("layer_index")] == pytest.approx(0.25)
    assert obs[names.index("previous_bits")] == pytest.approx(1 / 8)
    assert obs[names.index("sq_or_cost")] == pytest.approx(state_of_quantization(table, (1, 8, 8, 8, 8)))
    # per-episode fine-tune: no reward before the last layer.
    assert reward == 0.0 and not terminated and not truncated


@pytest.mark.parametrize("network,layers", [("lenet", 5), ("lenet4", 4), ("resnet20", 22)])
def test_episode_length_is_the_layer_count_and_obs_stay_in_bounds(network, layers):
    env = make_env(network=network, finetune="per-step")
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs, _ = env.reset()
        assert env.observation_space.contains(obs)
        steps, terminated = 0, False
        while not terminated:
            obs, reward, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
            steps += 1
            assert env.observation_space.contains(obs)
            assert np.isfinite(reward)
        assert steps == layers == env.episode_length


def test_bits_carry_over_between_episodes():
    env = make_env()
    env.reset()
    for action in (0, 1, 2, 3, 4):  # bits 1, 2, 3, 4, 5
        *_, terminated, _, _ = env.step(action)
    assert terminated and env.last_episode.w_bits == (1, 2, 3, 4, 5)
    # The reward of the final configuration, SA from the fake: 99 - 0.02 * (49+36+25+16+9) = 96.3.
    assert env.last_episode.sa == pytest.approx(96.3 / 99.0)
    obs, _ = env.reset()
    assert obs[OBSERVATION_FEATURES.index("current_bits")] == pytest.approx(1 / 8)  # conv1 still at 1 bit
    assert obs[OBSERVATION_FEATURES.index("sa")] == pytest.approx(96.3 / 99.0)
    obs, _ = env.reset(options={"w_bits": (8, 8, 8, 8, 8), "sa": 1.0})
    assert obs[OBSERVATION_FEATURES.index("current_bits")] == 1.0


def test_activation_mode_has_two_steps_per_layer_and_maps_actions():
    env = make_env(act_action_set=(2, 4, 8), cost=CpuLatencyCost("lenet", latency_ratio=fake_latency))
    assert env.episode_length == 10 and env.schedule[:3] == [(0, "w"), (0, "a"), (1, "w")]
    # Discrete(8): indices 0-2 -> 2 bits, 3-5 -> 4 bits, 6-7 -> 8 bits for activations.
    assert [env.action_to_bits(i, "a") for i in range(8)] == [2, 2, 2, 4, 4, 4, 8, 8]
    assert [env.action_to_bits(i, "w") for i in range(8)] == list(range(1, 9))


def test_latency_target_corrects_the_episode_in_reverse_order():
    cost = CpuLatencyCost("lenet", latency_ratio=fake_latency)  # weights only: mean(w) / 8
    env = make_env(latency_target=0.5, cost=cost)
    env.reset()
    for _ in range(5):
        *_, terminated, _, info = env.step(7)  # the agent asks for 8 bits everywhere
    out = env.last_episode
    assert out.proposed_w_bits == (8,) * 5
    # One level per layer per pass, last layer first: 4 passes of 5 take the sum from 40 to 20.
    assert out.w_bits == (4,) * 5 and out.corrections == 20 and info["corrections"] == 20
    assert out.cost == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# accuracy cache
# ---------------------------------------------------------------------------------------------
def test_accuracy_cache_survives_reopening(tmp_path):
    from releq_tvm.search.accuracy import AccuracyCache

    path = tmp_path / "acc.sqlite"
    cache = AccuracyCache(path)
    key = cache.register({"network": "lenet", "steps": 2})
    assert cache.get(key, (8, 2, 2, 3, 2)) is None
    cache.put(key, (8, 2, 2, 3, 2), None, 97.5, 1.0)
    cache.put(key, (8, 2, 2, 3, 2), (8, 4, 4, 4, 4), 96.0, 1.0)
    # A second connection sees the committed rows before the first one closes (a kill loses nothing).
    other = AccuracyCache(path)
    assert other.get(key, (8, 2, 2, 3, 2)) == 97.5
    assert other.get(key, (8, 2, 2, 3, 2), (8, 4, 4, 4, 4)) == 96.0
    assert other.get(AccuracyCache.settings_key({"network": "lenet", "steps": 3}), (8, 2, 2, 3, 2)) is None
    cache.close()
    other.close()
    assert AccuracyCache(path).count(key) == 2


def _lenet_oracle(cache_path, steps: int, lr: float, train_images: int, val_images: int):
    """The real LeNet-5 accuracy oracle (shipped weights) on the first MNIST train / val images,
    ``steps`` short fine-tune steps at ``lr``, its cache at ``cache_path``."""
    from releq_tvm.data import load_dataset
    from releq_tvm.search.accuracy import AccuracyCache, FinetunedAccuracy, FinetuneSettings
    from releq_tvm.train import load_model, model_hash

    model = load_model("lenet")
    train = load_dataset("mnist", "train", limit=train_images)
    val = load_dataset("mnist", "val", limit=val_images)
    settings = FinetuneSettings("lenet", model_hash(model), steps, lr, 64, 0, len(val), train_images, 64)
    return FinetunedAccuracy(model, (1, 28, 28), train, val, settings, AccuracyCache(cache_path))


def test_finetuned_accuracy_hits_the_cache_on_second_lookup(tmp_path):
    from releq_tvm.search.accuracy import AccuracyCache, FinetunedAccuracy

    oracle = _lenet_oracle(tmp_path / "a.sqlite", 2, 1e-3, 1024, 200)
    assert oracle.full_precision > 95.0
    first = oracle.accuracy((8, 4, 4, 4, 8))
    assert not oracle.last_hit and 0.0 <= first <= 100.0
    assert oracle.accuracy((8, 4, 4, 4, 8)) == first and oracle.last_hit
    with_acts = oracle.accuracy((8, 4, 4, 4, 8), (8, 4, 4, 4, 4))
    assert not oracle.last_hit and 0.0 <= with_acts <= 100.0
    # A fresh oracle on the same file (a new run, or a resumed one) trains nothing again.
    again = FinetunedAccuracy(oracle.model, oracle.input_shape, oracle.train, oracle.val, oracle.settings,
                              AccuracyCache(tmp_path / "a.sqlite"))
    assert again.accuracy((8, 4, 4, 4, 8)) == first and again.last_hit
    assert (again.hits, again.lookups) == (1, 1)


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def _episodes(run_dir: Path) -> list[dict]:
    with open(run_dir / "episodes.csv", newline="") as f:
        return list(csv.DictReader(f))


def _config(tmp_path, name, **kw) -> SearchConfig:
    base = dict(network="lenet", episodes=6, final_episodes=2, run_dir=str(tmp_path / name), stop_on_convergence=False)
    base.update(kw)
    return SearchConfig(**base)


def test_cli_tiny_run_with_accuracy_none_writes_every_file(tmp_path, monkeypatch):
    from releq_tvm.cli import main

    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["search", "lenet", "--accuracy", "none", "--episodes", "3", "--final-episodes", "1", "--run-dir", str(run_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "cost only" in result.output
    for name in ("config.json", "episodes.csv", "action_probs.csv", "best.json", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    rows = _episodes(run_dir)
    assert [r["episode"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["phase"] for r in rows] == ["train"] * 3 + ["greedy"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["measure"] == "none" and config["config"]["ppo_clip_range"] == 0.1
    assert config["versions"]["stable-baselines3"] and config["machine"]["cpu_count"]
    best = json.loads((run_dir / "best.json").read_text())
    assert best["accuracy_scored"] is False and "cost only" in best["note"]
    assert len(best["solution"]["w_bits"]) == 5
    with open(run_dir / "action_probs.csv", newline="") as f:
        probs = list(csv.DictReader(f))
    assert len(probs) == 4 * 5  # one row per step of every episode
    assert sum(float(probs[0][f"p_{b}"]) for b in range(1, 9)) == pytest.approx(1.0, abs=1e-4)
    # Re-running into the same directory without --resume is refused in one line.
    again = CliRunner().invoke(main, ["search", "lenet", "--accuracy", "none", "--run-dir", str(run_dir)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_cli_rejects_bad_input_in_one_line(tmp_path):
    from releq_tvm.cli import main

    bad = CliRunner().invoke(main, ["search", "lenet", "--action-set", "0-9", "--run-dir", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "1..8" in bad.output
    bad = CliRunner().invoke(main, ["search", "lenet", "--search-activations", "--run-dir", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "--measure cpu or stripes" in bad.output


def test_resume_continues_numbering_and_reproduces_the_uninterrupted_run(tmp_path):
    straight = run_search(_config(tmp_path, "straight"), echo=lambda s: None, oracle=FakeAccuracy())
    # Killed during the 4th episode (the 4th accuracy lookup): episodes 1-3 are on disk.
    with pytest.raises(KeyboardInterrupt):
        run_search(_config(tmp_path, "killed"), echo=lambda s: None, oracle=FakeAccuracy(kill_after=3))
    assert [r["episode"] for r in _episodes(tmp_path / "killed")] == ["1", "2", "3"]
    resumed = run_search(
        _config(tmp_path, "killed"), resume=True, echo=lambda s: None, oracle=FakeAccuracy()
    )
    a, b = _episodes(tmp_path / "straight"), _episodes(tmp_path / "killed")
    assert [r["episode"] for r in b] == [str(i) for i in range(1, 9)]
    assert [r["phase"] for r in b] == ["train"] * 6 + ["greedy"] * 2
    # Agent, env and random state were restored: the same choices as without the kill.
    assert [r["w_bits"] for r in a] == [r["w_bits"] for r in b]
    assert resumed["solution"] == straight["solution"]


def test_ppo_statistics_are_logged_in_the_run_and_nothing_in_tmp(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where SB3 would make SB3-<date>
    (tmp_path / "tmp").mkdir()
    run_search(_config(tmp_path, "run", episodes=3, final_episodes=1), echo=lambda s: None, oracle=FakeAccuracy())
    with open(tmp_path / "run" / "ppo" / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # one row per update, each with SB3's own statistics of that update
    updates = [r for r in rows if r.get("train/clip_fraction")]
    assert len(updates) == 3
    for r in updates:
        assert 0.0 <= float(r["train/clip_fraction"]) <= 1.0
        assert float(r["train/entropy_loss"]) < 0.0  # minus the entropy of an 8-way softmax
        assert r["train/approx_kl"] != "" and r["train/explained_variance"] != ""
    assert not list((tmp_path / "tmp").iterdir())
    # a resumed run writes its own file (SB3's CSV writer would truncate the first)
    run_search(_config(tmp_path, "run"), resume=True, resume_episodes=4, echo=lambda s: None, oracle=FakeAccuracy())
    assert (tmp_path / "run" / "ppo" / "progress-resume3.csv").is_file()
    assert len(list(csv.DictReader(open(tmp_path / "run" / "ppo" / "progress.csv")))) == len(rows)


def test_resume_can_extend_a_finished_run(tmp_path):
    run_search(_config(tmp_path, "run", episodes=3, final_episodes=1), echo=lambda s: None, oracle=FakeAccuracy())
    assert [r["phase"] for r in _episodes(tmp_path / "run")] == ["train"] * 3 + ["greedy"]
    # Resumed with a larger budget, training goes on from episode 4 and the greedy episode is redone.
    run_search(_config(tmp_path, "run"), resume=True, resume_episodes=5, echo=lambda s: None, oracle=FakeAccuracy())
    rows = _episodes(tmp_path / "run")
    assert [r["episode"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["phase"] for r in rows] == ["train"] * 5 + ["greedy"]
    # config.json describes the run as it now stands: the new budget, and the resume recorded
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["config"]["episodes"] == 5
    assert [r["episodes"] for r in stored["resumes"]] == [5]
    # Resuming a finished run with nothing to add only reports it.
    best = run_search(_config(tmp_path, "run"), resume=True, echo=lambda s: None, oracle=FakeAccuracy())
    assert len(_episodes(tmp_path / "run")) == 6 and best["solution"]["episode"] == 6


def test_run_state_reads_a_checkpoint_in_the_format_written_before_it():
    """checkpoint.pt's "state" is dataclasses.asdict(RunState) plus "env": the keys the run saved
    one by one before RunState existed, so checkpoints of earlier runs still resume."""
    from dataclasses import asdict

    from releq_tvm.search.run_files import RunState

    saved = {  # a checkpoint's "state", as written before RunState
        "episodes_done": 3, "episode": 4, "training_finished": True, "greedy_done": 1,
        "greedy_results": [{"episode": 4, "phase": "greedy", "w_bits": [8, 8, 4, 4, 2], "reward": 0.25}],
        "best": {"episode": 2, "phase": "train", "w_bits": [8, 4, 4, 4, 2], "reward": 0.5},
        "converged_episode": None, "streak": 2, "last_greedy": "8,8,4,4,2", "lookups": 4, "hits": 1,
        "elapsed": 1.5, "cpu_seconds": 1.25, "long_result": None,
        "env": {"w_bits": [8, 8, 4, 4, 2], "a_bits": None, "sa": 0.99, "accuracy_pct": 98.0},
    }
    state = RunState.from_dict(saved)
    assert (state.episodes_done, state.episode, state.greedy_done, state.streak) == (3, 4, 1, 2)
    assert state.best["w_bits"] == [8, 4, 4, 4, 2] and state.last_greedy == "8,8,4,4,2"
    assert {**asdict(state), "env": saved["env"]} == saved  # saved back in the same format


def test_overwrite_replaces_a_run(tmp_path):
    run_search(_config(tmp_path, "run", episodes=2, final_episodes=1), echo=lambda s: None, oracle=FakeAccuracy())
    with pytest.raises(ReleqError, match="--overwrite"):
        run_search(_config(tmp_path, "run", episodes=1, final_episodes=1), echo=lambda s: None, oracle=FakeAccuracy())
    run_search(
        _config(tmp_path, "run", episodes=1, final_episodes=1), overwrite=True, echo=lambda s: None, oracle=FakeAccuracy()
    )
    assert [r["phase"] for r in _episodes(tmp_path / "run")] == ["train", "greedy"]


def test_search_activations_needs_a_hardware_cost(tmp_path):
    with pytest.raises(ReleqError, match="--measure cpu or stripes"):
        build_parts(_config(tmp_path, "x", search_activations=True, accuracy="none"))


def test_accuracy_none_works_on_a_network_without_data_or_checkpoint(tmp_path):
    parts = build_parts(_config(tmp_path, "x", network="resnet20", accuracy="none", measure="stripes"))
    assert parts.env.episode_length == 22
    assert any("cost only" in n for n in parts.notes)
    assert parts.cost.ratio((8,) * 22) == pytest.approx(1.0)


def test_search_efficiency_asks_the_oracle_once_per_ppo_episode():
    """PPO's configurations come from the env's own evaluation: no second lookup, so a cache hit is
    counted only when the agent really revisited a configuration (one hit per revisit)."""
    from releq_tvm.search.efficiency import compare_search_methods

    oracle = FakeAccuracy()
    config = SearchConfig(network="lenet", measure="stripes")
    rows = compare_search_methods("lenet", budget=12, methods=("ppo",), config=config, echo=lambda s: None, oracle=oracle)
    (ppo,) = rows
    assert oracle.lookups == ppo["episodes"]  # one per-episode fine-tune per episode, nothing more
    assert ppo["cache_hits"] == oracle.lookups - ppo["configurations"]


def test_search_efficiency_same_budget_for_every_method(tmp_path):
    from releq_tvm.report.search_efficiency import efficiency_png, write_efficiency_csv
    from releq_tvm.search.efficiency import compare_search_methods

    config = SearchConfig(network="lenet", accuracy="none")
    rows = compare_search_methods("lenet", exhaustive_set=(4, 8), config=config, echo=lambda s: None)
    assert [r["method"] for r in rows] == ["ppo", "random", "exhaustive"]
    # {4, 8}^5 = 32 configurations, the budget of every method.
    assert all(r["configurations"] == 32 for r in rows)
    exhaustive = rows[2]
    # Cost only (SA = 1): the best of {4, 8}^5 is all 4 bits, SQ = 0.5.
    assert exhaustive["best_bits"] == "4,4,4,4,4" and exhaustive["cost_ratio"] == pytest.approx(0.5)
    assert sum(r["winner"] for r in rows) >= 1
    out = tmp_path / "search_efficiency.csv"
    write_efficiency_csv(rows, out, "releq-tvm search-efficiency lenet --accuracy none", config)
    text = out.read_text()
    assert text.startswith("# command: releq-tvm search-efficiency")
    assert "network,method,bit_set" in text
    # results/README.md drafts its entry from that header
    from releq_tvm.report.provenance import drafted_section

    # every method's trace holds its evaluated points in order; the best is the trace's top reward
    for r in rows:
        assert len(r["trace"]) == r["configurations"]
        assert max(t[2] for t in r["trace"]) == pytest.approx(r["reward"], abs=1e-5)
    assert efficiency_png(rows)[:8] == b"\x89PNG\r\n\x1a\n"
    section = drafted_section("search_efficiency.csv", out)
    assert "- command: `releq-tvm search-efficiency lenet --accuracy none`" in section


@pytest.mark.slow
def test_short_real_lenet_search_end_to_end(tmp_path, monkeypatch):
    """A short real search (fine-tune accuracy, SQ cost) with the long fine-tune; minutes, not seconds."""
    from releq_tvm.cli import main

    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["search", "lenet", "--episodes", "10", "--final-episodes", "1", "--short-steps", "20", "--long-steps", "200",
         "--run-dir", str(run_dir)],
    )
    assert result.exit_code == 0, result.output
    best = json.loads((run_dir / "best.json").read_text())
    assert best["accuracy_scored"] and best["long_finetune"]["test_accuracy_full_precision"] > 98.5
    assert 0.0 < best["long_finetune"]["test_accuracy_quantized"] <= 100.0


def test_max_loss_raises_th_of_the_asymmetric_reward_only():
    from releq_tvm.search.run import effective_th

    oracle = FakeAccuracy()  # full precision 99.0 %
    # th = 1 - 0.5 / 99 = 0.994949...
    assert effective_th(SearchConfig(network="lenet", max_loss=0.5), oracle) == pytest.approx(1 - 0.5 / 99.0)
    # a loose limit never lowers METHOD.md's th (0.4), and None / other rewards keep it
    assert effective_th(SearchConfig(network="lenet", max_loss=99.0), oracle) == pytest.approx(0.4)
    assert effective_th(SearchConfig(network="lenet", max_loss=None), oracle) == pytest.approx(0.4)
    assert effective_th(SearchConfig(network="lenet", reward="sa_minus_sq", max_loss=0.5), oracle) == pytest.approx(0.4)


def test_max_loss_reward_scores_minus_one_beyond_the_limit():
    # FakeAccuracy loses 0.02 pp per squared bit removed: 8,8,8,8,6 loses 0.08 pp, 8,8,8,8,4 0.32 pp
    parts = build_parts(SearchConfig(network="lenet", max_loss=0.2), oracle=FakeAccuracy())
    env = parts.env
    env.reset()
    rewards = {}
    for last in (6, 4):
        env.reset(options={"w_bits": [8] * 5})
        for layer in range(5):
            bits = 8 if layer < 4 else last
            _, r, done, _, _ = env.step(env.action_set.index(bits))
        rewards[last] = r
    sq6 = state_of_quantization(parts.table, (8, 8, 8, 8, 6))
    sa6 = (99.0 - 0.08) / 99.0
    assert rewards[6] == pytest.approx((1 - sq6**0.2) * sa6 ** (0.4 / sa6))
    assert rewards[4] == -1.0


def test_one_episode_batch_advantages_and_why_normalisation_is_off():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from releq_tvm.search.run import make_agent

    table = layer_table("lenet")
    # +1 at the end of the episode, nothing before: a good episode for every one of its steps
    env = ReleqEnv(table, [0.1] * len(table), FakeAccuracy(), SQCost(table), lambda sa, cost, acc: 1.0)
    agent = make_agent(SearchConfig(network="lenet", seed=3), DummyVecEnv([lambda: env]))
    assert agent.normalize_advantage is False
    agent.learn(total_timesteps=env.episode_length)
    adv = agent.rollout_buffer.advantages.ravel()
    returns = agent.rollout_buffer.returns.ravel()
    # discounted returns 0.9^(4-t) (gamma 0.9, reward 1 at t = 4), advantages all positive
    np.testing.assert_allclose(returns[-1], 1.0, rtol=1e-6)
    assert (adv > 0).all()
    # what SB3's per-batch normalisation would make of them: the first steps turn negative
    normalised = (adv - adv.mean()) / (adv.std() + 1e-8)
    assert normalised[0] < 0 < normalised[-1]


def test_unconverged_run_chooses_the_best_configuration_seen(tmp_path):
    # 6 training episodes never meet the convergence test; the chosen bits are then the
    # highest-reward configuration of any episode (read-off included), and say so. Without the
    # max-loss cut-off the random early episodes (e.g. 1,3,5,1,6) beat the read-off 6,6,8,8,8.
    out = run_search(_config(tmp_path, "short", max_loss=None), echo=lambda s: None, oracle=FakeAccuracy())
    rows = _episodes(tmp_path / "short")
    top = max(rows, key=lambda r: float(r["reward"]))
    assert out["converged_episode"] is None and top["phase"] == "train"
    assert out["solution"]["reward"] == pytest.approx(float(top["reward"]), abs=1e-5)
    assert ",".join(map(str, out["solution"]["w_bits"])) == top["w_bits"]
    assert out["solution"]["source"].startswith("best configuration seen")
    # with the cut-off every training episode scores -1 and the read-off stands
    out = run_search(_config(tmp_path, "guarded"), echo=lambda s: None, oracle=FakeAccuracy())
    assert out["solution"]["source"].startswith("deterministic read-off")


# ---------------------------------------------------------------------------------------------
# activations: learned clipping levels in the oracle, and cache keys that name the quantizer
# ---------------------------------------------------------------------------------------------
def test_accuracies_with_activations_are_keyed_by_the_activation_quantizer(tmp_path):
    from releq_tvm.quant import ACT_QUANTIZER_VERSION
    from releq_tvm.search.accuracy import AccuracyCache

    cache = AccuracyCache(tmp_path / "acc.sqlite")
    key = cache.register({"network": "lenet", "steps": 2})
    w, a = (8, 2, 2, 3, 2), (8, 4, 4, 2, 4)
    # an entry written by the fixed-range quantizer (the key before activation ranges were learned)
    cache.store.put(f"accuracy/{key}", "w 8,2,2,3,2|a 8,4,4,2,4", {"accuracy": 91.0, "seconds": 1.0, "created": 0.0})
    cache.store.put(f"accuracy/{key}", "w 8,2,2,3,2|a ", {"accuracy": 97.5, "seconds": 1.0, "created": 0.0})
    assert cache.get(key, w, a) is None  # measured with other activation values: fine-tuned again
    assert cache.get(key, w) == 97.5  # weights-only accuracies did not change and stay valid
    cache.put(key, w, a, 96.0, 1.0)
    assert cache.get(key, w, a) == 96.0
    assert cache.store.get(f"accuracy/{key}", f"w 8,2,2,3,2|a 8,4,4,2,4|{ACT_QUANTIZER_VERSION}")["accuracy"] == 96.0
    cache.close()


def test_oracle_short_finetune_trains_the_clipping_levels(tmp_path):
    from releq_tvm.quant import act_quantizers
    from releq_tvm.train import train_steps

    oracle = _lenet_oracle(tmp_path / "a.sqlite", 3, 1e-2, 512, 100)
    train = oracle.train
    quantized = oracle.quantized_model((8, 2, 2, 3, 2), (8, 4, 4, 2, 4))
    carried = act_quantizers(quantized)
    assert [q.bits for q in carried.values()] == [8, 4, 4, 2, 4]
    ranges, _ = oracle._input_ranges()
    # the image at the fixed [0, 1], the other layers start at their calibrated ranges
    assert ranges[0] == 1.0 and [q.alpha.item() for q in carried.values()] == pytest.approx(ranges)
    assert not carried["0"].learned and all(q.learned for name, q in carried.items() if name != "0")
    train_steps(quantized, train, 3, lr=1e-2, batch_size=64, seed=0)
    moved = [q.alpha.item() / r - 1.0 for q, r in zip(carried.values(), ranges)]
    assert moved[0] == 0.0 and all(0 < abs(m) <= 3 * 3 * 1e-2 for m in moved[1:]), moved
    # the oracle's own float model is untouched (every configuration starts from it)
    assert not act_quantizers(oracle.model)
    acc = oracle.accuracy((8, 2, 2, 3, 2), (8, 4, 4, 2, 4))
    assert 50.0 < acc <= 100.0 and not oracle.last_hit


def test_long_finetune_saves_the_model_it_reports(tmp_path):
    """A tiny W+A run with the real oracle (small splits) and a 3-step long fine-tune: the run folder
    holds finetuned.pt, best.json and the summary name it, and the file is exactly the fine-tuned
    model: its bits are the solution's and its test accuracy is the one best.json reports."""
    from releq_tvm.data import load_dataset
    from releq_tvm.search.cost import CpuLatencyCost
    from releq_tvm.quant import apply_bits
    from releq_tvm.train import evaluate, read_model_file

    oracle = _lenet_oracle(tmp_path / "a.sqlite", 1, 1e-3, 512, 100)
    config = _config(tmp_path, "run", episodes=1, final_episodes=1, measure="cpu", search_activations=True,
                     act_action_set=(2, 4, 8), long_steps=3, long_lrs=(1e-3, 3e-3))
    lines = []
    best = run_search(config, echo=lines.append, oracle=oracle, cost=CpuLatencyCost("lenet", latency_ratio=fake_latency))
    run_dir = tmp_path / "run"
    long = best["long_finetune"]
    assert long["model_file"] == "finetuned.pt" and (run_dir / "finetuned.pt").is_file()
    assert any(f"--checkpoint {run_dir / 'finetuned.pt'}" in line for line in lines), lines
    saved = read_model_file("lenet", run_dir / "finetuned.pt")
    assert list(saved.w_bits) == best["solution"]["w_bits"] and list(saved.a_bits) == best["solution"]["a_bits"]
    assert saved.about["learning_rate"] == long["learning_rate"]
    test = load_dataset("mnist", "test")
    assert round(evaluate(apply_bits(saved.model, saved.w_bits, (1, 28, 28)), test), 4) == long["test_accuracy_quantized"]
    assert [t["learning_rate"] for t in long["learning_rates_tried"]] == [1e-3, 3e-3]


# --------------------------------------------------------------------------------------------
# search-seeds: one search per seed, and the front of what they saw
def _episode(n, w, a, acc, cost):
    from releq_tvm.report.runs import Episode

    return Episode(n, "train", w, a, acc, acc / 99.0, cost, 0.0, None)


def _fake_run(seed, episodes):
    from releq_tvm.report.runs import SearchRun

    meta = {"config": {"network": "lenet", "seed": seed, "measure": "cpu", "cpu_kernels": "auto", "episodes": 10}}
    best = {"training_episodes": len(episodes), "converged_episode": None, "elapsed_seconds": 120.0,
            "solution": {"w_bits": list(episodes[-1].bits), "a_bits": list(episodes[-1].a_bits),
                         "accuracy_val": episodes[-1].accuracy, "cost_ratio": episodes[-1].cost, "reward": 0.1},
            "long_finetune": {"test_accuracy_quantized": 98.5, "test_accuracy_full_precision": 99.0, "loss_pp": 0.5}}
    return SearchRun(Path(f"seed{seed}"), meta, tuple(episodes), best, None, (), (1, 2, 4, 8))


def test_seen_configurations_and_their_front_are_counted_once_over_seeds():
    """Configurations: A (cost 0.5, 97 %), B (0.6, 96 %: dominated by A), C (0.9, 99 %), D (1.0, 99 %:
    dominated by C, same accuracy, dearer). Seed 1 sees A again: one row, seen by both seeds."""
    from releq_tvm.report.seeds import front_of, front_rows, seed_rows, seen_configurations

    a8 = (8,) * 5
    A, B, C, D = ((1,) * 5, (1,) * 5, 97.0, 0.5), ((2,) * 5, (1,) * 5, 96.0, 0.6), ((2,) * 5, a8, 99.0, 0.9), (a8, a8, 99.0, 1.0)
    runs = [_fake_run(0, [_episode(1, *A), _episode(2, *B), _episode(3, *D)]),
            _fake_run(1, [_episode(1, *C), _episode(2, *A)])]
    seen = seen_configurations(runs)
    assert len(seen) == 4
    assert {s.w_bits: s.seeds for s in seen}[(1,) * 5] == ("0", "1")
    assert [(s.cost, s.accuracy) for s in front_of(seen)] == [(0.5, 97.0), (0.9, 99.0)]
    rows = front_rows(seen, {(A[0], A[1]): {"test_accuracy_quantized": 98.1, "loss_pp": 0.9}})
    assert [r["on_front"] for r in rows] == [True, False, True, False]
    assert [r["faster_than_reference"] for r in rows] == [True, True, True, False]
    assert rows[0]["test_acc_long_finetune_pct"] == 98.1 and rows[1]["test_acc_long_finetune_pct"] is None
    per_seed = seed_rows(runs)
    assert [r["seed"] for r in per_seed] == ["0", "1"]
    assert per_seed[0]["converged_episode"] == "not converged" and per_seed[0]["wall_min"] == 2.0
    assert per_seed[1]["w_bits"] == "1,1,1,1,1" and per_seed[1]["loss_pp"] == 0.5


def test_search_seeds_runs_each_seed_in_parallel_and_resumes_finished_runs(tmp_path):
    """Two seeds in two processes on the SQ cost; the CSVs name both; a second call only reads the runs."""
    from releq_tvm.cli import main

    root, out = tmp_path / "runs", tmp_path / "seeds.csv"
    args = ["search-seeds", "lenet", "--seeds", "2", "--jobs", "2", "--root", str(root), "-o", str(out),
            "--accuracy", "none", "--episodes", "3", "--final-episodes", "1", "--cache", str(tmp_path / "c.sqlite")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(line for line in out.read_text().splitlines() if not line.startswith("#")))
    assert [r["seed"] for r in rows] == ["0", "1"]
    assert all(r["training_episodes"] == "3" and r["converged_episode"] == "not converged" for r in rows)
    for seed in (0, 1):
        best = json.loads((root / f"seed{seed}" / "best.json").read_text())
        assert ",".join(map(str, best["solution"]["w_bits"])) == rows[seed]["w_bits"]
        assert "search lenet" in (root / f"seed{seed}" / "search.log").read_text()
    front = [l for l in (tmp_path / "seeds_front.csv").read_text().splitlines() if not l.startswith("#")]
    assert len(front) >= 2 and (tmp_path / "seeds.png").stat().st_size > 1000
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "seed 0: resume" in again.output
    assert json.loads((root / "seed0" / "best.json").read_text())["training_episodes"] == 3
    assert all(r["variant"] == "episodes=3" for r in rows)
    compared = CliRunner().invoke(main, ["compare-runs", str(root / "seed1"), str(root / "seed0"), "-o", str(tmp_path / "c.csv")])
    assert compared.exit_code == 0, compared.output
    rows = list(csv.DictReader(line for line in (tmp_path / "c.csv").read_text().splitlines() if not line.startswith("#")))
    assert [r["seed"] for r in rows] == ["1", "0"]  # in the order given
