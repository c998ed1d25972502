"""The timing protocol behind every latency this package reports (TVM's side: :mod:`releq_tvm.compile.timing`).

One protocol (:class:`TimingConfig`) for our kernels, our networks and the engines we compare
against (``releq-tvm bench peers``, fig8):

* a *sample* is the mean time of as many back-to-back calls as fill ``min_repeat_ms`` (at least
  one). TVM functions are sampled by TVM's ``time_evaluator``
  (:func:`releq_tvm.compile.timing.main_sampler`), locally or over TVM RPC; any Python
  callable, such as an onnxruntime session, by :class:`CallSampler`, which fixes its calls per sample from the fastest of
  ``calibration_calls`` untimed calls and runs ``rewarm_ms`` of untimed calls before each sample;
* ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round takes one sample of every
  function, starting one function later each round (:func:`interleaved_timing`), so load from
  other jobs on a shared machine falls on all of them alike and none always runs first;
* ``settle_ms`` of idle time before each sample lets the previous engine's worker threads stop
  spinning (several thread pools in one process share the cores; a deployment of one engine
  would not see that);
* we report the median of the samples and their spread (interquartile range, min, max), in
  milliseconds (:func:`summarize`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TimingConfig:
    """How each measurement is taken (see the module docstring)."""

    repeats: int = 7
    min_repeat_ms: float = 20
    warmup: int = 2
    #: idle pause before each sample (ms); 0 for our own single-threaded builds
    settle_ms: float = 0.0
    #: untimed calls for this long (ms; at least one when above 0) before each sample of a
    #: :class:`CallSampler`: the first calls after idling wake an engine's threads and run slow
    rewarm_ms: float = 0.0
    #: untimed calls of a :class:`CallSampler` whose fastest fixes its calls per sample
    calibration_calls: int = 5


def summarize(seconds) -> dict:
    """Median and spread of timing samples (seconds in, milliseconds out)."""
    ms = np.asarray(list(seconds), dtype=np.float64) * 1e3
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(med),
        "iqr_ms": float(q3 - q1),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "repeats": int(ms.size),
    }


class CallSampler:
    """One timing sample (seconds) of a Python callable: the mean over ``count`` back-to-back calls.

    ``count`` is fixed at construction from the fastest of ``config.calibration_calls`` untimed
    calls (the fastest: a burst of load then must not shrink the samples), so a sample lasts about
    ``config.min_repeat_ms``; each sample first runs ``config.rewarm_ms`` of untimed calls.
    """

    def __init__(self, call: Callable[[], object], config: TimingConfig):
        self.call, self.rewarm_s = call, config.rewarm_ms / 1e3
        fastest = math.inf
        for _ in range(max(1, config.calibration_calls)):
            start = time.perf_counter()
            call()
            fastest = min(fastest, time.perf_counter() - start)
        self.count = max(1, math.ceil(config.min_repeat_ms / 1e3 / max(fastest, 1e-9)))

    def __call__(self) -> float:
        call = self.call
        if self.rewarm_s > 0:
            start = time.perf_counter()
            call()
            while time.perf_counter() - start < self.rewarm_s:
                call()
        start = time.perf_counter()
        for _ in range(self.count):
            call()
        return (time.perf_counter() - start) / self.count


def interleaved_timing(samplers: dict, config: TimingConfig, progress=None) -> dict[str, dict]:
    """Time several functions in rounds: each round takes one sample of every function.

    On a machine shared with other jobs, load comes and goes over seconds; timing A fully and
    then B would charge a burst to one of them only. Interleaving spreads it over all, so the
    ratios between them (layer sums against whole networks, bits against 8 bits) stay fair; the
    order rotates by one function per round. Returns :func:`summarize` per name (plus
    ``calls_per_sample`` for :class:`CallSampler` functions).
    """
    names = list(samplers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(config.warmup + config.repeats):
        timed = r >= config.warmup
        if progress is not None and timed:
            progress(f"timing round {r - config.warmup + 1}/{config.repeats} ({len(names)} functions)")
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if config.settle_ms > 0:
                time.sleep(config.settle_ms / 1e3)
            seconds = samplers[name]()
            if timed:
                samples[name].append(seconds)
    out = {name: summarize(values) for name, values in samples.items()}
    for name, sampler in samplers.items():
        if isinstance(sampler, CallSampler):
            out[name]["calls_per_sample"] = sampler.count
    return out


def timing_note(config: TimingConfig) -> str:
    """The protocol of ``config`` in one line, for a result file's ``# note:`` header."""
    parts = [f"{config.warmup} untimed + {config.repeats} timed interleaved rounds in rotated order",
             f"a sample = mean over back-to-back calls lasting >= {config.min_repeat_ms:g} ms"]
    if config.settle_ms > 0:
        parts.append(f"after a {config.settle_ms:g} ms idle pause")
    if config.rewarm_ms > 0:
        parts.append(f"and {config.rewarm_ms:g} ms of untimed calls")
    return ", ".join(parts) + "; median and iqr over rounds, ms"
