"""``--ray-address`` (issue 15): a search joins a Ray cluster that ``ray start --head`` started,
its evaluations run there, and the cluster is still up when the search has finished.

The cluster is a real one on 127.0.0.1 with token authentication (Ray's default for ``ray start``
once a token exists), its token in a file of this test's own. The drivers run as subprocesses, so
the authentication settings they read at start-up are theirs and no Ray of this process is touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the distributed extra is not installed")

TESTS = Path(__file__).resolve().parent
RAY = Path(sys.executable).with_name("ray")
RELEQ_TVM = [sys.executable, "-m", "releq_tvm"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(session_dir: str) -> None:
    """Kill the processes of this cluster only (``ray stop`` would stop every Ray on the machine)."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if session_dir in " ".join(p.info["cmdline"] or [])]
    for proc in list(ours):
        try:
            ours += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in ours:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(ours, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """(address, environment with the token) of a 2-CPU head on 127.0.0.1."""
    base = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray puts Unix sockets inside
    token = Path(base, "token")
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{_free_port()}"
    session_dir = os.path.join(base, "r")
    try:
        subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={address.split(':')[1]}",
                        "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={session_dir}"],
                       env=env, check=True, capture_output=True, timeout=120)
        yield address, env
    finally:
        _stop(session_dir)
        shutil.rmtree(base, ignore_errors=True)


def _driver(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS)


EVALUATE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_search import _lenet_oracle
from releq_tvm.search.parallel import RayEvaluator

ev = RayEvaluator(1, address={address!r})
job = _lenet_oracle(Path({tmp!r}) / "a.sqlite", 3, 1e-3, 512, 200).short_finetune(False)
configs = [((8, 4, 4, 4, 8), None), ((2, 2, 2, 2, 2), None)]
remote = [acc for acc, _ in ev.evaluate_many(job, configs)]
print(json.dumps({{"remote": remote, "here": [job.accuracy(*c) for c in configs], "cpus": ev.cpus,
                  "workers": sorted(ev.pids), "me": os.getpid(), "said": ev.describe()}}))
ev.close()
"""


def test_evaluations_run_on_the_cluster_and_it_stays_up(cluster, tmp_path):
    address, env = cluster
    out = _driver(EVALUATE.format(tests=str(TESTS), address=address, tmp=str(tmp_path)), env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # the cluster's workers give the numbers this process gives, and they are not this process
    assert got["remote"] == got["here"]
    assert got["workers"] and got["me"] not in got["workers"]
    assert got["cpus"] == 2 and f"the Ray cluster at {address} (2 CPUs)" in got["said"]
    # close() leaves a joined cluster up: another driver still finds its 2 CPUs
    again = _driver(f"import ray; ray.init(address={address!r}); print(int(ray.cluster_resources()['CPU']))", env, 120)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == "2", again.stderr[-2000:]


def test_search_with_ray_address_runs_its_episodes_on_the_cluster(cluster, tmp_path):
    address, env = cluster
    run = tmp_path / "run"
    out = subprocess.run(
        [*RELEQ_TVM, "search", "lenet", "--ray-address", address, "--envs", "2",
         "--episodes", "2", "--final-episodes", "1", "--short-steps", "2", "--train-images", "256",
         "--val-images", "100", "--long-steps", "0", "--no-early-stop", "--run-dir", str(run),
         "--cache", str(tmp_path / "acc.sqlite")],
        env={**env, "RELEQ_TVM_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert f"the Ray cluster at {address} (2 CPUs)" in out.stdout and "2 environments" in out.stdout
    with open(run / "episodes.csv") as f:
        phases = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert len(phases) == 3 and (run / "best.json").exists()


def test_a_driver_without_the_token_is_told_how_to_join_in_one_line(cluster, tmp_path):
    address, env = cluster
    bare = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    out = subprocess.run(
        [*RELEQ_TVM, "search", "lenet", "--ray-address", address,
         "--episodes", "2", "--run-dir", str(tmp_path / "run"), "--cache", str(tmp_path / "acc.sqlite")],
        env=bare, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    error = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "wants its authentication token" in error[0] and "RAY_AUTH_MODE=token" in error[0], out.stderr[-2000:]


@pytest.mark.parametrize("address, said", [("127.0.0.1:{port}", "nothing answers at --ray-address"),
                                           ("nohost", "must look like HOST:PORT")])
def test_an_address_nothing_answers_at_is_one_line_within_seconds(address, said):
    import time

    from releq_tvm.errors import ReleqError
    from releq_tvm.search.parallel import RayEvaluator

    start = time.perf_counter()
    with pytest.raises(ReleqError, match=said):
        RayEvaluator(1, address=address.format(port=_free_port()))
    assert time.perf_counter() - start < 10  # Ray alone waits minutes on a closed port
