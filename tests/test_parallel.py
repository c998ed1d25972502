"""Parallel episodes (issue 15): N environments per policy update, accuracies evaluated together on
Ray workers, faults (a killed worker, Ctrl-C) and resuming with another N."""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from releq_tvm.search.config import SearchConfig
from releq_tvm.search.run import run_search
from releq_tvm.search.run_files import load_checkpoint
from test_search import FakeAccuracy, _config, _episodes, _lenet_oracle


def _updates(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((run_dir / "ppo").glob("progress*.csv")):
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/clip_fraction")]
    return rows


# ---------------------------------------------------------------------------------------------
# N environments, no Ray
# ---------------------------------------------------------------------------------------------
def test_n_environments_step_together_and_each_update_sees_n_episodes(tmp_path):
    oracle = FakeAccuracy()
    run_search(_config(tmp_path, "run", episodes=6, envs=3), echo=lambda s: None, oracle=oracle)
    rows = _episodes(tmp_path / "run")
    assert [r["phase"] for r in rows] == ["train"] * 6 + ["greedy"] * 2
    assert [r["episode"] for r in rows] == [str(i) for i in range(1, 9)]
    # 6 episodes in batches of 3: two policy updates (the last one logged when learn() ends)
    assert len(_updates(tmp_path / "run")) == 2
    # every environment keeps its own network state, checkpointed one by one
    checkpoint = load_checkpoint(tmp_path / "run")
    assert len(checkpoint.env_states) == 3
    # the three environments of a batch start from one policy, so their bits differ only by sampling
    first_batch = {r["w_bits"] for r in rows[:3]}
    assert len(first_batch) > 1
    # the episodes of a batch share its time evenly
    assert len({r["seconds"] for r in rows[:3]}) == 1 and len({r["seconds"] for r in rows[3:6]}) == 1
    assert oracle.lookups == 6 + 2


def test_a_budget_that_is_no_multiple_of_n_rounds_up_to_whole_batches(tmp_path):
    run_search(_config(tmp_path, "run", episodes=5, envs=2, final_episodes=1), echo=lambda s: None,
               oracle=FakeAccuracy())
    assert [r["phase"] for r in _episodes(tmp_path / "run")] == ["train"] * 6 + ["greedy"]


def test_resume_with_another_number_of_environments(tmp_path):
    # killed during the second batch of two episodes (lookup 3): the first batch is on disk
    with pytest.raises(KeyboardInterrupt):
        run_search(_config(tmp_path, "run", episodes=6, envs=2), echo=lambda s: None, oracle=FakeAccuracy(kill_after=3))
    assert [r["episode"] for r in _episodes(tmp_path / "run")] == ["1", "2"]
    assert len(load_checkpoint(tmp_path / "run").env_states) == 2
    run_search(_config(tmp_path, "run"), resume=True, echo=lambda s: None, oracle=FakeAccuracy(),
               resume_settings={"envs": 3})
    rows = _episodes(tmp_path / "run")
    assert [r["phase"] for r in rows] == ["train"] * 8 + ["greedy"] * 2  # 2 + batches of 3 up to >= 6
    checkpoint = load_checkpoint(tmp_path / "run")
    assert len(checkpoint.env_states) == 3 and checkpoint.state.episodes_done == 8
    with pytest.raises(ValueError, match="keeps its seed"):
        run_search(_config(tmp_path, "run"), resume=True, echo=lambda s: None, oracle=FakeAccuracy(),
                   resume_settings={"seed": 3})


def test_one_worker_starts_no_ray(tmp_path, monkeypatch):
    import releq_tvm.search.parallel as parallel

    def refuse(*args, **kwargs):
        raise AssertionError("no Ray with --workers 1")

    monkeypatch.setattr(parallel, "RayEvaluator", refuse)
    config = _config(tmp_path, "run", episodes=2, final_episodes=1)
    assert (config.workers, config.n_envs) == (1, 1)
    run_search(config, echo=lambda s: None, oracle=FakeAccuracy())
    assert len(load_checkpoint(tmp_path / "run").env_states) == 1


def test_workers_without_a_fine_tune_to_run_start_no_ray(tmp_path, monkeypatch):
    """An oracle with nothing to ship (here a fake; --accuracy none alike) steps in this process."""
    pytest.importorskip("ray", reason="the distributed extra is not installed")
    import releq_tvm.search.parallel as parallel

    def refuse(*args, **kwargs):
        raise AssertionError("no Ray without a fine-tune to run")

    monkeypatch.setattr(parallel, "RayEvaluator", refuse)
    said = []
    run_search(_config(tmp_path, "run", episodes=2, final_episodes=1, workers=2), echo=said.append,
               oracle=FakeAccuracy())
    assert any("accuracy is not fine-tuned here (FakeAccuracy), so nothing runs on Ray" in s for s in said)
    assert len(load_checkpoint(tmp_path / "run").env_states) == 2


def test_ctrl_c_saves_the_newest_consistent_checkpoint_and_says_how_to_resume(tmp_path):
    said = []
    # checkpoints every 4 episodes; killed in episode 3: episode 2's update is the newest consistent point
    with pytest.raises(KeyboardInterrupt):
        run_search(_config(tmp_path, "run", checkpoint_every=4), echo=said.append, oracle=FakeAccuracy(kill_after=2))
    assert load_checkpoint(tmp_path / "run").state.episodes_done == 2
    assert f"continue with: releq-tvm search --resume --run-dir {tmp_path / 'run'}" in said[-1]
    run_search(_config(tmp_path, "run"), resume=True, echo=lambda s: None, oracle=FakeAccuracy())
    assert [r["phase"] for r in _episodes(tmp_path / "run")] == ["train"] * 6 + ["greedy"] * 2


def test_workers_without_ray_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    from releq_tvm.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = CliRunner().invoke(main, ["search", "lenet", "--accuracy", "none", "--workers", "2",
                                       "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --workers 2 runs accuracy evaluations on Ray, which is not installed: "
        "pip install 'releq-tvm[distributed]' (or: pip install ray)"]
    assert not (tmp_path / "run").exists()


def test_seeds_side_by_side_or_episodes_side_by_side_not_both(tmp_path):
    from releq_tvm.cli import main

    result = CliRunner().invoke(main, ["search-seeds", "lenet", "--accuracy", "none", "--jobs", "2", "--workers", "2",
                                       "--root", str(tmp_path / "seeds")])
    assert result.exit_code == 2 and "pass one of them (e.g. --jobs 1 --workers 2)" in result.output
    assert not (tmp_path / "seeds").exists()


# ---------------------------------------------------------------------------------------------
# prefetch: evaluated together, counted once, written by this process only
# ---------------------------------------------------------------------------------------------
def test_prefetch_evaluates_each_new_configuration_once_and_counts_it_as_a_miss(tmp_path):
    oracle = _lenet_oracle(tmp_path / "a.sqlite", 2, 1e-3, 256, 100)
    a, b, c = (8, 4, 4, 4, 8), (8, 2, 2, 2, 8), (8, 8, 8, 8, 8)
    oracle.accuracy(c)  # cached before the batch
    asked = []

    def serial(job, configs):
        asked.extend(configs)
        return [(job.accuracy(*config), 0.5) for config in configs]

    assert oracle.prefetch([(a, None), (b, None), (a, None), (c, None)], serial) == 2
    assert asked == [(a, None), (b, None)]  # the repeat and the cached one are not trained
    assert oracle.cache.count(oracle.key) == 4  # the float reference, c, a and b
    lookups, hits = oracle.lookups, oracle.hits
    acc_a = oracle.accuracy(a)
    assert not oracle.last_hit  # the miss it was, though evaluated ahead
    assert oracle.accuracy(a) == acc_a and oracle.last_hit  # the second environment: a hit
    assert (oracle.lookups - lookups, oracle.hits - hits) == (2, 1)
    # the same number this process computes without prefetch (a seeded fine-tune)
    assert acc_a == oracle.short_finetune(False).accuracy(a)


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluator():
    pytest.importorskip("ray", reason="the distributed extra is not installed")
    from releq_tvm.search.parallel import RayEvaluator

    ev = RayEvaluator(2, threads=1)
    yield ev
    ev.close()


def _slow_oracle(tmp_path, steps):
    return _lenet_oracle(tmp_path / "a.sqlite", steps, 1e-3, 512, 200)


def test_ray_workers_give_the_accuracy_this_process_gives(tmp_path, evaluator):
    oracle = _slow_oracle(tmp_path, 3)
    job = oracle.short_finetune(False)
    configs = [((8, 4, 4, 4, 8), None), ((2, 2, 2, 2, 2), None)]
    shipped = evaluator.shipped
    assert evaluator.evaluate_many(job, configs)[0][0] == job.accuracy(*configs[0])
    # the oracle hands out one fine-tune object, so its data goes to the workers once per run
    assert oracle.short_finetune(False) is job
    results = evaluator.evaluate_many(oracle.short_finetune(False), configs)
    assert evaluator.shipped - shipped == 1
    assert [acc for acc, _ in results] == [job.accuracy(*c) for c in configs]
    assert all(seconds > 0 for _, seconds in results)
    assert os.getpid() not in evaluator.pids and len(evaluator.pids) >= 1


def _evaluating_workers() -> list[int]:
    """Pids of the Ray workers running an evaluation now (Ray titles a busy worker ``ray::<function>``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::_evaluate"):
                pids.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return pids


def test_killing_a_ray_worker_mid_task_loses_no_configuration(tmp_path, evaluator):
    job = _slow_oracle(tmp_path, 60).short_finetune(False)  # ~1-2 s per task
    configs = [((b, 4, 4, 4, 8), None) for b in (1, 2, 3, 4)]
    out = {}
    runner = threading.Thread(target=lambda: out.update(results=evaluator.evaluate_many(job, configs)))
    tasks_before = evaluator.tasks
    runner.start()
    deadline = time.time() + 60
    while not _evaluating_workers() and time.time() < deadline:
        time.sleep(0.05)
    victims = _evaluating_workers()
    assert victims, "no Ray worker was seen evaluating"
    os.kill(victims[0], signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive()
    # every configuration came back, once, with the number this process computes
    assert [acc for acc, _ in out["results"]] == [job.accuracy(*c) for c in configs]
    assert evaluator.tasks - tasks_before == len(configs)
    assert victims[0] not in evaluator.pids or len(evaluator.pids) > 1


def test_search_on_two_ray_workers_trains_each_configuration_once(tmp_path, evaluator, monkeypatch):
    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path / "cache"))
    config = SearchConfig(network="lenet", episodes=4, final_episodes=1, short_steps=2, train_images=256,
                          val_images=100, long_steps=0, long_finetune=False, workers=2, stop_on_convergence=False,
                          run_dir=str(tmp_path / "run"), cache_path=str(tmp_path / "acc.sqlite"))
    said = []
    run_search(config, echo=said.append)
    assert any("2 local Ray workers" in line and "2 environments" in line for line in said)
    rows = _episodes(tmp_path / "run")
    assert [r["phase"] for r in rows] == ["train"] * 4 + ["greedy"]
    from releq_tvm.search.accuracy import AccuracyCache

    distinct = {r["w_bits"] for r in rows}
    # the float reference plus each distinct configuration, each fine-tuned once
    assert AccuracyCache(tmp_path / "acc.sqlite").count() == len(distinct) + 1
    # and each counted as one miss: the episodes' lookups less their hits
    assert sum(int(r["lookups"]) - int(r["cache_hits"]) for r in rows) == len(distinct)


def test_workers_benchmark_counts_new_configurations_per_minute(tmp_path, evaluator):
    from releq_tvm.search.workers_bench import bench_workers

    base = SearchConfig(network="lenet", measure="none", episodes=4, short_steps=2, train_images=256, val_images=100)
    rows = bench_workers(base, [1, 2], tmp_path, echo=lambda s: None)
    assert [(r["workers"], r["envs"], r["training_episodes"]) for r in rows] == [(1, 1, 4), (2, 2, 4)]
    for row in rows:
        train = [r for r in _episodes(tmp_path / f"workers{row['workers']}") if r["phase"] == "train"]
        # each search starts from its own empty cache: every distinct configuration is new once
        assert row["new_configurations"] == len({r["w_bits"] for r in train})
        minutes = sum(float(r["seconds"]) for r in train) / 60
        assert row["new_per_minute"] == pytest.approx(row["new_configurations"] / minutes, rel=0.01)
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[1]["new_per_minute"] / rows[0]["new_per_minute"], abs=1e-3)
