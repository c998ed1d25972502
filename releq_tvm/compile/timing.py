"""Where timed TVM code runs (this process or a TVM RPC server) and its samplers.

The protocol itself (what a sample is, interleaved rounds, what is reported) is
:mod:`releq_tvm.timing`'s, shared with the engines we compare against.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tvm
from tvm import relax

from releq_tvm.errors import ReleqError
from releq_tvm.kernels.target import pin_tvm_threads
from releq_tvm.timing import TimingConfig, summarize


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
