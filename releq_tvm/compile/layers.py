"""One layer's kernel built and timed alone: bit-serial, int8 (``releq_tvm.kernels``) or fp32 (Relax).

The latency table (:mod:`releq_tvm.compile.latency_table`) stores what :func:`measure_layer`
returns. Inputs are seeded random levels: no kernel has data-dependent control flow, so the
values do not change the time.

Which timing protocol a layer gets (:func:`timing_protocol`): in a network each layer's weights
are read once per inference, and the other layers' data passes through the caches in between.
A layer whose weights fit in one core's L2 finds them there again on the next inference (so
``warm`` timing, back-to-back calls, is what the network sees); a bigger layer reads them from
L3 or memory, so it is timed ``cold`` (:func:`releq_tvm.compile.timing.cold_weights_sampler`).
Timing a 38 MB layer warm would flatter whichever kernel reads more bytes. Over TVM RPC every
layer is timed warm (the protocol is recorded with each number).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from releq_tvm.networks import LayerSpec

from releq_tvm.compile.lower import kernel_bits, kernel_primfunc, layer_shape, packed_weights
from releq_tvm.compile.timing import COLD_FACTOR, Runner, cold_weights_sampler, main_sampler
from releq_tvm.kernels.target import cache_sizes
from releq_tvm.timing import TimingConfig, interleaved_timing, timing_note
from releq_tvm.kernels.runtime import BuiltKernel
from releq_tvm.kernels.shapes import ConvShape, DenseShape


def random_levels(shape, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded unsigned ``bits``-bit activation levels (uint8) of ``shape``."""
    return rng.integers(0, 2**bits, size=shape, dtype=np.uint8)


def _random_weight_levels(shape: ConvShape | DenseShape, w_bits: int, rng) -> np.ndarray:
    m = 1 if w_bits == 1 else 2 ** (w_bits - 1) - 1
    q = rng.integers(-m, m + 1, size=shape.weight_shape())
    if w_bits == 1:
        q = np.where(q >= 0, 1, -1)
    return q.astype(np.int32)


def build_layer(backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target) -> tvm.runtime.Executable:
    """Compile one layer's kernel (``bitserial`` / ``int8`` / ``lut`` PrimFunc, or an fp32 Relax conv/dense)."""
    shape = layer_shape(layer, batch)
    if backend == "fp32":
        return tvm.compile(_fp32_layer_module(layer, batch), target=target)
    wb, ab = kernel_bits(backend, w_bits, a_bits)
    func = kernel_primfunc(backend, shape, wb, ab, target).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def layer_arguments(runner: Runner, backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target,
                    seed: int = 0):
    """Seeded inputs (and the output buffer, for kernels) of :func:`build_layer`'s function for ``target``."""
    rng = np.random.default_rng(seed)
    shape = layer_shape(layer, batch)
    if backend == "fp32":
        x = rng.random(_fp32_input_shape(layer, batch), dtype=np.float32)
        w = rng.standard_normal(_fp32_weight_shape(layer), dtype=np.float32)
        args = [runner.tensor(x), runner.tensor(w)]
        if layer.has_bias:
            args.append(runner.tensor(rng.standard_normal(layer.out_channels, dtype=np.float32)))
        return args
    wb, ab = kernel_bits(backend, w_bits, a_bits)
    x = random_levels(shape.input_shape() if isinstance(shape, DenseShape) else shape.input_shape("NCHW"), ab, rng)
    w = packed_weights(backend, _random_weight_levels(shape, wb, rng), wb, shape, target)
    out_shape = shape.output_shape() if isinstance(shape, DenseShape) else shape.output_shape("NCHW")
    return [runner.tensor(x), runner.tensor(w), runner.empty(out_shape, "int32")]


def _fp32_input_shape(layer: LayerSpec, batch: int):
    return (batch, layer.in_channels) if layer.kind == "dense" else (batch, layer.in_channels, *layer.in_size)


def _fp32_weight_shape(layer: LayerSpec):
    if layer.kind == "dense":
        return (layer.in_channels, layer.out_channels)  # pre-transposed, as the frontend's linear lowers
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel)


def _fp32_layer_module(layer: LayerSpec, batch: int) -> tvm.IRModule:
    """The Relax ops ``from_exported_program`` emits for one Conv2d / Linear (float32)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(_fp32_input_shape(layer, batch), "float32"))
    w = relax.Var("w", relax.TensorType(_fp32_weight_shape(layer), "float32"))
    params = [x, w]
    b = None
    if layer.has_bias:
        b = relax.Var("b", relax.TensorType((layer.out_channels,), "float32"))
        params.append(b)
    with bb.function("main", params):
        with bb.dataflow():
            if layer.kind == "dense":
                y = relax.op.matmul(x, w)
                if b is not None:
                    y = relax.op.add(y, b)
            else:
                y = relax.op.nn.conv2d(x, w, strides=layer.stride, padding=layer.padding, groups=layer.groups)
                if b is not None:
                    y = relax.op.add(y, relax.op.reshape(b, (1, layer.out_channels, 1, 1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def timing_protocol(runner: Runner, weight_bytes: int) -> str:
    """``"cold"`` for a layer whose weights (bytes, as the kernel reads them) exceed this host's L2,
    else ``"warm"``; always ``"warm"`` over TVM RPC (see the module docstring)."""
    return "cold" if runner.session is None and weight_bytes > cache_sizes().l2 else "warm"


def protocol_sampler(runner: Runner, timed, args, weight_bytes: int, config: TimingConfig):
    """``(sampler, protocol)``: a sampler of ``timed["main"](*args)`` (weights in ``args[1]``) under
    :func:`timing_protocol` for ``weight_bytes``."""
    protocol = timing_protocol(runner, weight_bytes)
    sampler = cold_weights_sampler if protocol == "cold" else main_sampler
    return sampler(runner, timed, args, config), protocol


@dataclass(frozen=True)
class LayerSampler:
    """One built layer ready to time: ``sample()`` returns one timing sample in seconds."""

    sample: Callable[[], float]
    #: ``"warm"`` or ``"cold"`` (:func:`timing_protocol`)
    protocol: str
    weight_bytes: int
    compile_s: float

    def __call__(self) -> float:
        return self.sample()


def layer_sampler(runner: Runner, backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target,
                  config: TimingConfig) -> LayerSampler:
    """Build one layer (:func:`build_layer`) and a sampler of it under its :func:`timing_protocol`."""
    start = time.perf_counter()
    ex = build_layer(backend, layer, w_bits, a_bits, batch, target)
    compile_s = time.perf_counter() - start
    args = layer_arguments(runner, backend, layer, w_bits, a_bits, batch, target)
    timed = runner.vm(ex) if backend == "fp32" else runner.load(ex)
    weight_bytes = int(np.prod(args[1].shape)) * np.dtype(args[1].dtype).itemsize
    sample, protocol = protocol_sampler(runner, timed, args, weight_bytes, config)
    return LayerSampler(sample, protocol, weight_bytes, compile_s)


def measure_layer(backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target,
                  config: TimingConfig = TimingConfig(), runner: Runner | None = None) -> dict:
    """Build and time one layer; returns :func:`summarize`'s dict plus ``compile_s``, ``protocol``
    and ``weight_bytes``."""
    sampler = layer_sampler(runner or Runner(), backend, layer, w_bits, a_bits, batch, target, config)
    timing = interleaved_timing({"layer": sampler}, config)["layer"]
    return dict(timing, compile_s=sampler.compile_s, protocol=sampler.protocol, weight_bytes=sampler.weight_bytes)


class KernelTiming:
    """The project's one timing protocol for ``bench_kernels`` (a ``releq_tvm.kernels.bench.KernelTimer``).

    The kernels of one layer are timed in interleaved rounds (:func:`releq_tvm.timing.interleaved_timing`),
    so load from other jobs falls on all of them alike and their ratios stay fair; each is sampled
    as the latency table samples a layer (:func:`timing_protocol`): ``cold``
    (:func:`~releq_tvm.compile.timing.cold_weights_sampler`) when its packed weights exceed this
    host's L2, else ``warm`` (:func:`~releq_tvm.compile.timing.main_sampler`).
    """

    def __init__(self, config: TimingConfig = TimingConfig(), runner: Runner | None = None):
        self.config = config
        self.runner = runner or Runner()

    def __call__(self, calls: dict[str, tuple[BuiltKernel, list]]) -> dict[str, dict]:
        """``{name: (kernel, args)}`` -> ``{name: summarize's dict (ms) + "protocol"}``."""
        samplers, protocols = {}, {}
        for name, (kernel, args) in calls.items():
            samplers[name], protocols[name] = protocol_sampler(self.runner, kernel.module, args, kernel.weight_bytes,
                                                               self.config)
        timings = interleaved_timing(samplers, self.config)
        return {name: dict(timings[name], protocol=protocols[name]) for name in calls}

    def notes(self) -> list[str]:
        """The protocol in words, for the provenance header."""
        caches = cache_sizes()
        return [
            f"timing: {timing_note(self.config)}; one layer's kernels are timed side by side in each round",
            f"protocol: warm = back-to-back calls on the same arguments (weights that fit stay in cache); "
            f"cold = each call takes the next of several copies of the weights totalling {COLD_FACTOR} x the "
            f"L3 ({caches.l3 / 2**20:g} MiB), so it reads them from memory, as a network reads a big layer's "
            f"weights once per inference; a kernel is timed cold when its packed weights exceed one core's L2 "
            f"({caches.l2 / 2**20:g} MiB), as the latency table times layers",
        ]
