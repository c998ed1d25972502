"""Parallel episodes: N environments step together, and the accuracies they need at once are
evaluated concurrently on Ray workers (``search --workers N [--envs N] [--ray-address ADDR]``).

How a step of N environments runs (:class:`PrefetchingVecEnv`): before the environments step,
each says which configuration its action will have measured (:meth:`ReleqEnv.config_to_measure`:
at the end of an episode, or every step with ``--finetune per-step``). The oracle evaluates the
ones neither cached nor repeated in one batch (:meth:`FinetunedAccuracy.prefetch`), and the
environments then step one after another as usual, each finding its accuracy ready.

Who owns what: this process (the driver) owns the accuracy cache and every run file; a worker
receives the fine-tune (:class:`~releq_tvm.search.accuracy.ShortFinetune`, shipped once
through Ray's object store) and a configuration, and returns the accuracy and its seconds. A
worker that dies mid-task is replaced and the task retried by Ray (``max_retries``), so nothing
is lost, and nothing is counted twice, because only the driver writes.

Without Ray (``--workers 1``, the default) none of this runs: one process, as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from releq_tvm.config_fields import host_port
from releq_tvm.errors import ReleqError

Bits = tuple[int, ...]

#: Times Ray re-runs an evaluation whose worker died (a killed process, an out-of-memory kill).
TASK_RETRIES = 3
#: The message for a machine without Ray.
INSTALL_HINT = "pip install 'releq-tvm[distributed]' (or: pip install ray)"


def check_ray_installed(workers: int, ray_address: str | None) -> None:
    """One-line error, before any work, when ``--workers N`` (N > 1) or ``--ray-address`` needs Ray and it is missing."""
    if workers <= 1 and ray_address is None:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        flag = f"--workers {workers}" if workers > 1 else "--ray-address"
        raise ReleqError(f"{flag} runs accuracy evaluations on Ray, which is not installed: {INSTALL_HINT}") from None


# ----------------------------------------------------------------------------------------------
# The worker side: module-level, so Ray ships it by reference (the package is importable there)
# ----------------------------------------------------------------------------------------------
_JOBS: dict[str, object] = {}  # per worker process: the fine-tune of each run, fetched once


def _evaluate(job_box: list, w_bits: Bits, a_bits: Bits | None, threads: int) -> tuple[float, float, int]:
    """One configuration's short fine-tune on a worker: (accuracy %, seconds, worker pid).

    ``job_box`` holds the ObjectRef of the :class:`ShortFinetune` inside a list, so Ray passes the
    reference, not the value: the worker fetches it once and keeps it for the run's later tasks.
    """
    import ray
    import torch

    ref = job_box[0]
    key = ref.hex()
    if key not in _JOBS:
        _JOBS.clear()  # one run's data at a time
        _JOBS[key] = ray.get(ref)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    acc = _JOBS[key].accuracy(w_bits, a_bits)
    return float(acc), time.perf_counter() - start, os.getpid()


#: Seconds to wait for a --ray-address to answer at all (Ray itself waits minutes on a closed port).
CONNECT_S = 5.0


def _check_reachable(address: str) -> None:
    """One line, within :data:`CONNECT_S`, when nothing listens at a ``--ray-address`` HOST:PORT."""
    import socket

    if address == "auto":  # Ray finds the cluster this machine runs
        return
    host, port = host_port(address.removeprefix("ray://"), "--ray-address")
    try:
        socket.create_connection((host, port), timeout=CONNECT_S).close()
    except OSError as exc:
        raise ReleqError(f"nothing answers at --ray-address {address} ({exc.strerror or exc}); start the cluster "
                         "with `ray start --head --port PORT` and pass HOST:PORT, or auto") from None


@contextlib.contextmanager
def _stderr_held():
    """Hold what this process (Python or Ray's C++) writes to stderr: pass it on if the block
    succeeds, drop it if it raises (the caller then says what went wrong in one line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        text = held.read().decode(errors="replace")
    sys.stderr.write(text)


def _cannot_join(address: str | None, exc: Exception) -> str:
    """The one line for a Ray that would not start or a cluster that would not let us join."""
    import ray.exceptions

    auth_error = getattr(ray.exceptions, "AuthenticationError", ())  # older Rays have no token authentication

    if address is None:
        return f"cannot start a local Ray ({str(exc).splitlines()[0][:160]})"
    causes, cause = [], exc
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, auth_error) or "InvalidAuthToken" in str(c) for c in causes):
        # Ray turns token authentication on by itself only for a cluster it finds (address auto),
        # never for one named: joining it by name is the user's call, so say how, don't do it.
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        return (f"the Ray cluster at {address} wants its authentication token (RAY_AUTH_MODE is {mode}): "
                "run with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token, "
                "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    return (f"cannot join the Ray cluster at {address} ({str(exc).splitlines()[0][:160]}); "
            "check --ray-address (HOST:PORT of `ray start --head`, or auto)")


def _ray_temp_dir() -> str | None:
    """Ray's session folder: under TMPDIR as Ray would, unless that path is too long for the Unix
    sockets Ray makes inside it (at most 107 bytes with ~70 of Ray's own); then /tmp/ray, Ray's default."""
    under_tmpdir = os.path.join(tempfile.gettempdir(), "ray")
    return None if len(under_tmpdir) <= 36 else "/tmp/ray"


# ----------------------------------------------------------------------------------------------
# The driver side
# ----------------------------------------------------------------------------------------------
class RayEvaluator:
    """Runs short fine-tunes on Ray: a local Ray of ``workers`` single-threaded CPU workers, or the
    cluster at ``address`` (then the cluster's CPUs decide how many run at once, not ``workers``).

    ``evaluate_many(job, configs)`` is what :meth:`FinetunedAccuracy.prefetch` calls. ``pids``
    collects the worker processes that answered (for the run's log and the fault test).
    """

    def __init__(self, workers: int, address: str | None = None, threads: int = 1):
        check_ray_installed(workers if address else max(workers, 2), address)
        import ray

        self.workers, self.address, self.threads = workers, address, threads
        self._started = not ray.is_initialized()
        if self._started and address is not None:
            _check_reachable(address)
        if self._started:
            try:
                # a refused join logs a warning a second until Ray gives up (a local start spawns
                # Ray's processes, which must not inherit the held stderr)
                with _stderr_held() if address else contextlib.nullcontext():
                    ray.init(
                        address=address,
                        num_cpus=None if address else workers,
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                        _temp_dir=_ray_temp_dir(),
                    )
            except Exception as exc:  # ConnectionError, RuntimeError, AuthenticationError, ValueError...
                raise ReleqError(_cannot_join(address, exc)) from None
        #: CPUs Ray offers these tasks: ``workers`` locally, the whole cluster's when joined
        self.cpus = int(ray.cluster_resources().get("CPU", 0)) if address else workers
        self._task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_evaluate)
        self._job_ref = None
        self._job = None
        self.pids: set[int] = set()
        self.tasks = 0
        self.shipped = 0  # fine-tunes put into Ray's object store

    def describe(self) -> str:
        where = (f"the Ray cluster at {self.address} ({self.cpus} CPUs)" if self.address
                 else f"{self.workers} local Ray workers")
        return f"accuracy evaluations on {where} (1 CPU and {self.threads} torch thread(s) each)"

    def evaluate_many(self, job, configs: Sequence[tuple[Bits, Bits | None]]) -> list[tuple[float, float]]:
        """(accuracy %, seconds) of each configuration, evaluated concurrently; in order."""
        import ray

        if job is not self._job:  # a run ships its fine-tune once (its data can be 200 MB)
            self._job, self._job_ref = job, ray.put(job)
            self.shipped += 1
        refs = [self._task.remote([self._job_ref], w, a, self.threads) for w, a in configs]
        results = ray.get(refs)
        self.tasks += len(refs)
        self.pids.update(pid for _, _, pid in results)
        return [(acc, seconds) for acc, seconds, _ in results]

    def close(self) -> None:
        """Shut down the Ray this evaluator started (a joined cluster stays up)."""
        import ray

        self._job = self._job_ref = None
        if self._started and ray.is_initialized():
            ray.shutdown()


def make_vec_env(envs: Sequence, evaluator: RayEvaluator | None):
    """SB3's vector env over ``envs``: plain (one after another) without an evaluator, else one
    whose steps evaluate their accuracies together first (:class:`PrefetchingVecEnv`)."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    fns = [(lambda e=e: e) for e in envs]
    if evaluator is None:
        return DummyVecEnv(fns)

    class PrefetchingVecEnv(DummyVecEnv):
        """DummyVecEnv whose step first evaluates, in one batch, the accuracies its environments will ask for."""

        def step_wait(self):
            configs = [
                config for env, action in zip(self.envs, self.actions)
                if (config := env.unwrapped.config_to_measure(action)) is not None
            ]
            if configs:
                self.envs[0].unwrapped.oracle.prefetch(configs, evaluator.evaluate_many)
            return super().step_wait()

    return PrefetchingVecEnv(fns)
