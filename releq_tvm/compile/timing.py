"""Where timed TVM code runs (this process or a TVM RPC server) and its samplers.

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
import tempfile

import numpy as np
import tvm
from tvm import relax

from releq_tvm.errors import ReleqError
from releq_tvm.kernels.target import cache_sizes, pin_tvm_threads
from releq_tvm.timing import CallSampler, TimingConfig, summarize

#: Copies of a cold argument total at least this many times the L3 (each call then finds its copy evicted).
COLD_FACTOR = 2


class Runner:
    """Where timed code runs: this process (``tvm.cpu()``) or a TVM RPC server (``HOST:PORT``)."""

    def __init__(self, rpc: str | None = None):
        pin_tvm_threads()  # parallel loops run inline at one thread (kernels.target.pin_tvm_threads)
        self.rpc = rpc
        self.session = None
        if rpc:
            host, _, port = rpc.rpartition(":")
            if not host or not port.isdigit():
                raise ReleqError(f"--rpc {rpc!r} must look like HOST:PORT, e.g. 127.0.0.1:9090")
            from tvm import rpc as tvm_rpc

            try:
                self.session = tvm_rpc.connect(host, int(port))
            except Exception as exc:  # TVM raises its own error types for refused connections
                raise ReleqError(f"cannot reach the TVM RPC server at {rpc} ({str(exc).splitlines()[-1][:120]}); "
                                 "start one with `python -m tvm.exec.rpc_server --port PORT`") from None
            self.device = self.session.cpu()
        else:
            self.device = tvm.cpu()
        self._tmp = tempfile.TemporaryDirectory(prefix="releq-tvm-rpc-") if rpc else None
        self._uploads = 0

    @property
    def where(self) -> str:
        return f"rpc://{self.rpc}" if self.rpc else "local"

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
