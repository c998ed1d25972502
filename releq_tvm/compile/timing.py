"""Where timed TVM code runs (this process, a TVM RPC server, or a device from a TVM RPC tracker) and its samplers.

The protocol itself (what a sample is, interleaved rounds, what is reported) is
:mod:`releq_tvm.timing`'s, shared with the engines we compare against. Two kinds of sample:

* *warm* (:func:`main_sampler`): TVM's ``time_evaluator`` calls the function back to back on the
  same arguments, so whatever fits in the caches stays there;
* *cold weights* (:func:`cold_weights_sampler`): each call takes the next of several copies of
  one argument (a layer's weights) whose total is :data:`COLD_FACTOR` x the L3, so each call
  reads that argument from memory, as a network reads a big layer's weights once per inference.
  Calls are made from Python (about 0.2 us each, measured; TVM's ``time_evaluator`` cannot
  rotate arguments, and its cache-flush hook left ``clflush`` traffic in flight that slowed the
  timed call by up to 1.7x on the AMD EPYC we measured).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tempfile

import numpy as np
import tvm
from tvm import relax

from releq_tvm.compile.target import resolve_target
from releq_tvm.config_fields import check_rpc_options, host_port, where_label
from releq_tvm.errors import ReleqError
from releq_tvm.kernels.target import X86_TRIPLE, cache_sizes, pin_tvm_threads, tvm_threads
from releq_tvm.machine import cpu_model
from releq_tvm.timing import CallSampler, TimingConfig, summarize

#: Copies of a cold argument total at least this many times the L3 (each call then finds its copy evicted).
COLD_FACTOR = 2
#: How long (s) a --rpc-tracker request waits for a free device of its key before giving up.
TRACKER_WAIT_S = 60.0
#: How long (s) the TCP connection to a tracker may take (an unreachable tracker fails this fast).
TRACKER_CONNECT_S = 5.0


def _how_to_start(key: str) -> str:
    return ("start a tracker with `python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190` and a server "
            f"with `python -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key {key}`")


def _last_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[-1] if lines else type(exc).__name__)[:120]


def connect_server(rpc: str):
    """A TVM RPC session with the server at ``HOST:PORT`` (one-line :class:`ReleqError` if unreachable)."""
    host, port = host_port(rpc, "--rpc")
    from tvm import rpc as tvm_rpc

    try:
        return tvm_rpc.connect(host, port)
    except Exception as exc:  # TVM raises its own error types for refused connections
        raise ReleqError(f"cannot reach the TVM RPC server at {rpc} ({_last_line(exc)}); "
                         "start one with `python -m tvm.exec.rpc_server --port PORT`") from None


def request_device(tracker: str, key: str, wait_s: float = TRACKER_WAIT_S, session_timeout_s: float = 0):
    """A TVM RPC session with a device of ``key`` that the tracker at ``HOST:PORT`` hands out.

    Fails with one line when the tracker is unreachable (within :data:`TRACKER_CONNECT_S`), knows
    no device of ``key``, or has none free within ``wait_s`` seconds. ``session_timeout_s`` (0: none)
    lets the server end the session after that long; the default keeps the device for as long as
    the session lives, because a search measures table entries lazily over hours. (A request that
    timed out stays queued at TVM's tracker, which may later hand a device to it in vain.)
    """
    import socket

    from tvm import rpc as tvm_rpc

    host, port = host_port(tracker, "--rpc-tracker")
    try:  # TVM's own connect retries a refused tracker for 60 s
        socket.create_connection((host, port), timeout=TRACKER_CONNECT_S).close()
        client = tvm_rpc.connect_tracker(host, port)
        keys = client.summary()["queue_info"]
    except Exception as exc:
        raise ReleqError(f"cannot reach the TVM RPC tracker at {tracker} ({_last_line(exc)}); {_how_to_start(key)}") from None
    try:
        if key not in keys:
            raise ReleqError(f"the TVM RPC tracker at {tracker} has no device of key {key!r} (it has: "
                             f"{', '.join(sorted(keys)) or 'none'}); {_how_to_start(key)}")
        client._sock.settimeout(wait_s)  # TrackerSession.request waits on this socket for a free device
        try:
            return client.request(key, priority=1, session_timeout=session_timeout_s, max_retry=1)
        except Exception as exc:
            raise ReleqError(f"the TVM RPC tracker at {tracker} had no free device of key {key!r} within "
                             f"{wait_s:g} s ({_last_line(exc)}); free one or start another server with that key") from None
    finally:
        client.close()


def _cpu_facts(get_function) -> dict:
    """What LLVM reports about the CPU of the process whose global functions ``get_function`` looks up
    (this one, or a remote server's). The feature map cannot cross RPC: it is read from its printout."""
    try:
        features = str(get_function("ffi.ReprPrint")(get_function("tvm.codegen.llvm.GetHostCPUFeatures")()))
        return {
            "llvm_cpu": str(get_function("target.llvm_get_system_cpu")()),
            "triple": str(get_function("target.llvm_get_system_triple")()),
            "vendor": str(get_function("target.llvm_get_system_x86_vendor")()),
            "features": sorted(re.findall(r'"([\w.+-]+)": T\.bool\(True\)', features)),
        }
    except Exception as exc:  # a runtime-only TVM (no LLVM) lacks these functions
        raise ReleqError(f"the TVM runtime timing the code does not report its CPU ({_last_line(exc)}); "
                         "run the RPC server from a full TVM install (pip install apache-tvm)") from None


class Runner:
    """Where timed code runs: this process (``tvm.cpu()``), a TVM RPC server (``rpc``: ``HOST:PORT``),
    or a device of ``key`` that a TVM RPC tracker (``tracker``: ``HOST:PORT``) hands out.

    ``wait_s``: how long a tracker request waits for a free device (seconds).
    """

    def __init__(self, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                 wait_s: float = TRACKER_WAIT_S):
        check_rpc_options(rpc, tracker, key)
        pin_tvm_threads()  # parallel loops run inline at one thread (kernels.target.pin_tvm_threads)
        self.rpc, self.tracker, self.key = rpc, tracker, key
        self.session = None
        if rpc:
            self.session = connect_server(rpc)
        elif tracker:
            self.session = request_device(tracker, key, wait_s)
        self.device = self.session.cpu() if self.session is not None else tvm.cpu()
        self._tmp = tempfile.TemporaryDirectory(prefix="releq-tvm-rpc-") if self.session is not None else None
        self._uploads = 0
        self._machine: dict | None = None

    @property
    def where(self) -> str:
        return where_label(self.rpc, self.tracker, self.key)

    @property
    def remote(self) -> bool:
        """True when the code runs in another process (an RPC server), whose CPU may not be this one's."""
        return self.session is not None

    def machine(self) -> dict:
        """The CPU the timed code runs on, as its own TVM reports it: LLVM CPU name (``llvm_cpu``),
        target triple, x86 vendor, enabled LLVM CPU features, TVM runtime threads, and ``reported_by``
        (``local``, or ``rpc`` when asked through the session). A remote's CPU model name is None:
        TVM's RPC server does not tell it."""
        if self._machine is None:
            if self.session is None:
                facts = _cpu_facts(tvm.get_global_func)
                facts.update(cpu_model=cpu_model(), threads=tvm_threads(), reported_by="local")
            else:
                facts = _cpu_facts(self.session.get_function)
                threads = int(self.session.get_function("runtime.NumThreads")())
                facts.update(cpu_model=None, threads=threads, reported_by="rpc")
            self._machine = facts
        return dict(self._machine)

    def target(self) -> tvm.target.Target:
        """The LLVM target of the CPU the code runs on (``-mcpu`` its LLVM name; an x86-64 Linux triple
        is written ``x86_64-linux-gnu`` as for the host, whatever vendor field its TVM build has)."""
        if self.session is None:
            return resolve_target(None)
        facts = self.machine()
        arch, *rest = facts["triple"].split("-")
        triple = X86_TRIPLE if arch in ("x86_64", "amd64") and "linux" in rest else facts["triple"]
        return resolve_target({"kind": "llvm", "mcpu": facts["llvm_cpu"], "mtriple": triple})

    def tensor(self, array: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def empty(self, shape, dtype: str):
        return tvm.runtime.empty(tuple(shape), dtype, self.device)

    def load(self, ex: tvm.runtime.Executable):
        """The runtime module of ``ex`` on this runner (exported and uploaded for RPC)."""
        if self.session is None:
            return ex.jit()
        self._uploads += 1
        path = os.path.join(self._tmp.name, f"m{self._uploads}.so")
        ex.export_library(path)
        self.session.upload(path)
        return self.session.load_module(os.path.basename(path))

    def vm(self, ex: tvm.runtime.Executable) -> relax.VirtualMachine:
        return relax.VirtualMachine(self.load(ex) if self.session is not None else ex, self.device)


def time_main(runner: Runner, timed, args, config: TimingConfig) -> dict:
    """Median/spread (ms) of ``timed["main"](*args)``: ``timed`` is a Relax VM (a network) or a
    runtime module (one compiled PrimFunc); both offer ``time_evaluator("main", ...)``."""
    for _ in range(config.warmup):
        timed["main"](*args)
    f = timed.time_evaluator("main", runner.device, number=1, repeat=config.repeats, min_repeat_ms=int(config.min_repeat_ms))
    return summarize(f(*args).results)


def main_sampler(runner: Runner, timed, args, config: TimingConfig):
    """A function returning one timing sample (seconds) of ``timed["main"](*args)`` (as :func:`time_main`)."""
    f = timed.time_evaluator("main", runner.device, number=1, repeat=1, min_repeat_ms=int(config.min_repeat_ms))
    return lambda: f(*args).results[0]


def cold_weights_sampler(runner: Runner, timed, args, config: TimingConfig, weight_index: int = 1) -> CallSampler:
    """A sampler of ``timed["main"](*args)`` whose ``args[weight_index]`` comes from memory on every call.

    The argument is copied until the copies total :data:`COLD_FACTOR` x this host's L3, and each
    call takes the next copy (see the module docstring). Local runs only: over RPC each call
    would be a network round trip.
    """
    if runner.session is not None:
        raise ValueError("cold-weight timing runs in this process only, not over TVM RPC")
    weights = args[weight_index].numpy()
    copies = max(2, math.ceil(COLD_FACTOR * cache_sizes().l3 / max(1, weights.nbytes)))
    calls = [list(args)] + [list(args) for _ in range(copies - 1)]
    for call_args in calls[1:]:
        call_args[weight_index] = runner.tensor(weights)
    main, rotation = timed["main"], itertools.cycle(calls)
    return CallSampler(lambda: main(*next(rotation)), config)
