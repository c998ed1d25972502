"""Kernel benchmark: latency and throughput of the bit-serial, lookup-table and int8 kernels on this CPU.

:func:`bench_kernels` times every (layer shape, bit pair) of the bit-serial kernels, the
lookup-table kernels of the dense shapes (1-4 weight bits, 8-bit activations) and the int8
baseline, and returns a :class:`KernelBench`: one row each (:data:`CSV_COLUMNS`) and the facts the
numbers depend on (target, instruction sets, threads, peaks, memory bandwidth, timing protocol) as
lines for a provenance header. This package knows nothing of ``releq_tvm``, so two things are
the caller's: writing the file (``releq-tvm bench kernels`` writes it with the project's
provenance header) and the timing, a :class:`KernelTimer` (the CLI passes the project's one
protocol, warm or cold weights as the latency table times layers).

Throughput is reported in *binary operations* (one AND+popcount bit of the product, i.e. MACs x
w_bits x a_bits; 64 per MAC for int8) and as a fraction of this CPU's peak, measured here by
:func:`measure_popcount_peak`: a tight AND+popcount loop over uint64 data that stays in L1, on
every core, built by the same TVM/LLVM as the kernels. Beside it :func:`measure_memory_bandwidth`
measures how fast a core streams data from memory; a kernel cannot run faster than it reads its
packed weights (``memory_bound_ms``), which is what bounds the big dense layers (AlexNet's fc6
and fc7) at batch 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tvm
from tvm import te, tirx

from .common import dense_as_conv
from .int8 import INT32_LANES, _replace_with_pmaddwd, _replace_with_vpdpbusd, int8_weight_shape
from .lut import plan_lut_dense
from .runtime import (
    BuiltKernel,
    build_bitserial_conv2d,
    build_bitserial_dense,
    build_int8_conv2d,
    build_int8_dense,
    build_lut_dense,
)
from .shapes import ConvShape, DenseShape
from .target import VectorIsa, cache_sizes, make_target, target_has_avx2, tvm_threads, vector_isa

#: Representative layers: LeNet-5 conv2, a ResNet-20 stage-3 conv, a ResNet-20 stage-1 conv,
#: LeNet-5 fc1, a 512x512 fully connected layer, a MobileNet-style depthwise 3x3, and AlexNet's
#: fc6 and fc7 (37.7 and 16.8 MB of int8 weights: read from memory on every call).
DEFAULT_SHAPES: tuple[tuple[str, ConvShape | DenseShape], ...] = (
    ("lenet_conv2", ConvShape(6, 16, (14, 14), (5, 5))),
    ("resnet20_conv_64", ConvShape(64, 64, (8, 8), (3, 3), padding=(1, 1))),
    ("resnet20_conv_16", ConvShape(16, 16, (32, 32), (3, 3), padding=(1, 1))),
    ("lenet_fc1", DenseShape(400, 120)),
    ("dense_512", DenseShape(512, 512)),
    ("depthwise_3x3", ConvShape(64, 64, (16, 16), (3, 3), padding=(1, 1), groups=64)),
    ("alexnet_fc6", DenseShape(9216, 4096)),
    ("alexnet_fc7", DenseShape(4096, 4096)),
)
#: (w_bits, a_bits) pairs of the bit-serial kernels, for every shape :data:`LAYER_BIT_PAIRS` leaves out.
DEFAULT_BIT_PAIRS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 2), (2, 3), (4, 4), (8, 8))
#: Weight-only quantisation (8-bit activations): the comparison that matters for a layer whose
#: time goes to reading its weights, int8 against lut against bit-serial at the same activations.
WEIGHT_ONLY_BIT_PAIRS: tuple[tuple[int, int], ...] = ((1, 8), (2, 8), (4, 8))
#: Bit-serial pairs by layer name, where a layer gets its own.
LAYER_BIT_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "alexnet_fc6": WEIGHT_ONLY_BIT_PAIRS,
    "alexnet_fc7": WEIGHT_ONLY_BIT_PAIRS,
}
#: Weight bits of the lookup-table rows (every dense shape; activations are 8 bits).
DEFAULT_LUT_W_BITS: tuple[int, ...] = (1, 2, 3, 4)

CSV_COLUMNS = (
    "layer", "shape", "kernel", "isa", "mode", "w_bits", "a_bits", "batch", "macs", "binary_ops", "threads",
    "protocol", "latency_ms", "latency_spread_ms", "latency_min_ms", "weight_bytes", "memory_bound_ms",
    "over_memory_bound", "gbinary_ops_per_s", "gmacs_per_s", "efficiency_vs_popcount_peak", "efficiency_vs_int8_peak",
    "speedup_vs_int8", "crossover_wa",
)


class KernelTimer(Protocol):
    """The caller's timing protocol, which :func:`bench_kernels` uses for every row.

    Called with the kernels of one layer, ``{name: (kernel, args)}`` where ``args`` are
    ``kernel.module["main"]``'s arguments (:meth:`BuiltKernel.arguments`), it returns per name the
    latency of one call in milliseconds: ``median_ms``, ``iqr_ms``, ``min_ms``, ``max_ms`` and
    ``protocol`` (``"warm"``: back-to-back calls on the same weights; ``"cold"``: the weights come
    from memory on every call). ``notes()`` says what it did, one line each, for the provenance header.
    """

    def __call__(self, calls: Mapping[str, tuple[BuiltKernel, list]]) -> dict[str, dict]: ...

    def notes(self) -> list[str]: ...


@dataclass(frozen=True)
class Peak:
    """Measured peak throughput of this machine: on ``threads`` cores and per core."""

    gbinary_ops_per_s: float  # AND + popcount, uint64 data in L1, all threads
    gmacs_int8_per_s: float  # vpdpbusd (VNNI) or vpmaddwd int8 MACs, data in L1, all threads
    threads: int
    #: max(one-thread peak, all-thread peak / threads): on a shared machine the other cores'
    #: load hits the all-thread run harder, so the better of the two estimates one core.
    gbinary_ops_per_s_per_core: float = 0.0
    gmacs_int8_per_s_per_core: float = 0.0


@dataclass(frozen=True)
class MemoryBandwidth:
    """Measured memory read bandwidth of this machine (GB/s, 1e9 bytes/s): on ``threads`` cores and per core."""

    gbytes_per_s: float  # all threads, each streaming its slice of the buffer
    threads: int
    #: max(one-thread, all-thread / threads), as for :class:`Peak`
    gbytes_per_s_per_core: float
    #: bytes streamed per sample (:data:`BANDWIDTH_L3_FACTOR` x the L3), and the samples taken
    buffer_bytes: int
    repeat: int


#: The bandwidth buffer is this many times the L3: each pass evicts what the previous one left,
#: so every load comes from memory.
BANDWIDTH_L3_FACTOR = 4
#: uint64 vectors summed side by side: independent chains, so the loop waits on loads only.
_BANDWIDTH_ACCUMULATORS = 8

#: What each peak loop runs, by kind and ISA, for the provenance header.
_PEAK_INSTRUCTIONS = {
    ("popcount", "avx512-vpopcntdq"): "vpandq + vpopcntq on zmm (8 x uint64)",
    ("popcount", "avx2"): "vpand + vpshufb nibble-table popcount + vpsadbw on ymm (4 x uint64)",
    ("popcount", "x86-64"): "scalar and + popcnt",
    ("int8", "avx512-vnni"): "vpdpbusd on zmm (64 uint8 x int8 -> 16 int32)",
    ("int8", "avx-vnni"): "vpdpbusd on ymm (32 uint8 x int8 -> 8 int32)",
    ("int8", "pmaddwd"): "vpmaddwd on ymm (int16 pairs -> 8 int32)",
}


@functools.lru_cache(maxsize=8)
def _peak_module(kind: str, threads: int, target_json: str):
    """A tight L1-resident kernel: ``threads`` parallel slices, each re-reading 16 KB ``reps`` times.

    Each slice runs the register tile the real kernels run (a few weight vectors times a few
    broadcast activations, 16 accumulators on AVX-512, 8 on AVX2) with the target's widest
    instructions (:data:`_PEAK_INSTRUCTIONS`), so the peak is what this core can do, not what
    a load-bound loop reaches. The data index rotates with the repetition so LLVM cannot fold
    the repetitions into a multiply.
    """
    words, reps = 32, 256
    target = make_target(tvm.target.Target(target_json))
    if kind == "popcount":
        # A register tile as the kernels use it: ``vecs`` weight vectors x ``cols`` broadcast
        # activation words, vecs * cols accumulators; vecs + cols loads per vecs * cols popcounts.
        lanes = vector_isa(target).uint64_lanes  # zmm vpopcntq on AVX-512 VPOPCNTDQ, ymm on AVX2
        vecs, cols = (4, 4) if lanes == 8 else (2, 4)
        a = te.placeholder((threads, words, vecs, lanes), "uint64", name="a")
        b = te.placeholder((threads, words, cols), "uint64", name="b")
        r = te.reduce_axis((0, reps), name="r")
        k = te.reduce_axis((0, words), name="k")
        out = te.compute(
            (threads, cols, vecs, lanes),
            lambda p, c, t, l: te.sum(
                tirx.popcount(a[p, (k + r) % words, t, l] & b[p, k, c]).astype("int64"), axis=[r, k]
            ),
            name="acc",
        )
        ops_per_call = threads * reps * words * cols * vecs * lanes * 64
        sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, out]))
        block = sch.get_sblock("acc")
        p, c, t, l, rr, kk = sch.get_loops(block)
        sch.reorder(p, rr, kk, c, t, l)
        sch.parallel(p)
        sch.unroll(c)
        sch.unroll(t)
        sch.vectorize(l)
        sch.decompose_reduction(block, rr)
    else:
        # the widest int8 dot product the target has: vpdpbusd (4 uint8 x int8 per int32 lane) on
        # VNNI hosts, vpmaddwd (2 int16 per int32 lane) elsewhere
        isa = vector_isa(target)
        vnni = isa.int8 in ("avx512-vnni", "avx-vnni")
        lanes = isa.int32_lanes if vnni else INT32_LANES
        group = 4 if vnni else 2
        in_dtype, w_dtype = ("uint8", "int8") if vnni else ("int16", "int16")
        # register tile: ``cols`` broadcast activation groups x ``vecs`` weight vectors
        vecs, cols = (4, 4) if lanes == 16 else (2, 4)
        pad = te.placeholder((threads, words, cols, group), in_dtype, name="pad")
        w = te.placeholder((threads, words, vecs, group * lanes), w_dtype, name="weights")
        r = te.reduce_axis((0, reps), name="r")
        k = te.reduce_axis((0, words), name="k")
        e = te.reduce_axis((0, group), name="e")
        out = te.compute(
            (threads, cols, vecs, lanes),
            lambda p, c, t, o: te.sum(
                pad[p, k, c, e].astype("int32") * w[p, (k + r) % words, t, o * group + e].astype("int32"),
                axis=[r, k, e],
            ),
            name="acc",
        )
        ops_per_call = threads * reps * words * cols * vecs * lanes * group  # MACs
        sch = tvm.s_tir.Schedule(te.create_prim_func([pad, w, out]))
        block = sch.get_sblock("acc")
        p, c, t, o, rr, kk, ee = sch.get_loops(block)
        sch.reorder(p, rr, kk, c, t, o, ee)
        sch.parallel(p)
        sch.unroll(c)
        sch.unroll(t)
        init = sch.decompose_reduction(block, rr)
        sch.vectorize(sch.get_loops(init)[-1])
        if vnni:
            _replace_with_vpdpbusd(sch, sch.blockize(o), lanes)
        else:
            _replace_with_pmaddwd(sch, sch.blockize(o))
    func = sch.mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    rng = np.random.default_rng(0)
    if kind == "popcount":
        sizes = [[int(d) for d in t.shape] for t in (a, b)]
        args = [rng.integers(0, 2**63, size=size, dtype=np.int64).astype(np.uint64) for size in sizes]
    else:
        args = [rng.integers(0 if str(t.dtype) == "uint8" else -128, 128, size=[int(d) for d in t.shape])
                .astype(str(t.dtype)) for t in (pad, w)]
    out_np = np.zeros([int(d) for d in out.shape], dtype="int64" if kind == "popcount" else "int32")
    tensors = [tvm.runtime.tensor(v) for v in (*args, out_np)]
    return lib, tensors, ops_per_call


def measure_popcount_peak(target=None, threads: int | None = None, repeat: int = 9) -> Peak:
    """Peak AND+popcount (binary ops/s) and int8 (MACs/s: vpdpbusd on VNNI, else vpmaddwd) throughput,
    all cores and per core, with the widest instructions the target has.

    The best of ``repeat`` samples is taken: a peak is what the hardware can do, and on a shared
    machine every disturbance only makes a sample slower.
    """
    target = make_target(target)
    threads = threads or tvm_threads()
    rates = {}
    for kind in ("popcount", "int8"):
        for n in sorted({1, threads}):
            lib, tensors, ops = _peak_module(kind, n, str(target))
            lib["main"](*tensors)
            samples = lib.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=repeat)(*tensors).results
            rates[kind, n] = ops / min(samples) / 1e9
    return Peak(
        rates["popcount", threads],
        rates["int8", threads],
        threads,
        max(rates["popcount", 1], rates["popcount", threads] / threads),
        max(rates["int8", 1], rates["int8", threads] / threads),
    )


def _bandwidth_module(threads: int, target_json: str, buffer_bytes: int):
    """A streaming sum: ``threads`` parallel slices of a ``buffer_bytes`` uint64 buffer, each summed
    into :data:`_BANDWIDTH_ACCUMULATORS` vectors of the target's widest uint64 lanes.

    The loads are whole vectors in memory order (the hardware prefetchers see one stream per
    thread) and the adds are independent chains, so the time is the time to read the buffer.
    Returns the compiled library, its tensors (data, out) and the bytes one call reads.
    """
    target = make_target(tvm.target.Target(target_json))
    lanes, accs = vector_isa(target).uint64_lanes, _BANDWIDTH_ACCUMULATORS
    chunks = max(1, buffer_bytes // (threads * accs * lanes * 8))
    data = te.placeholder((threads, chunks, accs, lanes), "uint64", name="data")
    k = te.reduce_axis((0, chunks), name="k")
    out = te.compute((threads, accs, lanes), lambda p, a, l: te.sum(data[p, k, a, l], axis=k), name="acc")
    sch = tvm.s_tir.Schedule(te.create_prim_func([data, out]))
    block = sch.get_sblock("acc")
    p, a, l, kk = sch.get_loops(block)
    sch.reorder(p, kk, a, l)
    sch.parallel(p)
    sch.unroll(a)
    sch.vectorize(l)
    init = sch.decompose_reduction(block, kk)
    sch.vectorize(sch.get_loops(init)[-1])
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=target)
    shape = [int(d) for d in data.shape]
    values = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)  # any values: only the reads count
    tensors = [tvm.runtime.tensor(values), tvm.runtime.tensor(np.zeros((threads, accs, lanes), dtype=np.uint64))]
    return lib, tensors, values.nbytes


def measure_memory_bandwidth(target=None, threads: int | None = None, repeat: int = 9,
                             buffer_bytes: int | None = None) -> MemoryBandwidth:
    """Memory read bandwidth (GB/s), one thread and ``threads`` threads (default: TVM's pool), per core.

    Streams a buffer of :data:`BANDWIDTH_L3_FACTOR` x this host's L3 (``buffer_bytes`` overrides)
    with :func:`_bandwidth_module`; the best of ``repeat`` single passes is taken, as for
    :func:`measure_popcount_peak`: on a shared machine a disturbance only makes a pass slower.
    """
    target = make_target(target)
    threads = threads or tvm_threads()
    buffer_bytes = buffer_bytes or BANDWIDTH_L3_FACTOR * cache_sizes().l3
    rates = {}
    for n in sorted({1, threads}):
        lib, tensors, nbytes = _bandwidth_module(n, str(target), buffer_bytes)
        lib["main"](*tensors)
        samples = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat)(*tensors).results
        rates[n] = nbytes / min(samples) / 1e9
        del lib, tensors  # one buffer of 4 x L3 at a time
    return MemoryBandwidth(rates[threads], threads, max(rates[1], rates[threads] / threads), buffer_bytes, repeat)


def _build(shape, family: str, w_bits: int, a_bits: int, target, parallel: bool | None) -> BuiltKernel:
    """The kernel of ``family`` (``"bitserial"``, ``"lut"`` or ``"int8"``) for one layer shape."""
    dense = isinstance(shape, DenseShape)
    if family == "bitserial":
        build = build_bitserial_dense if dense else build_bitserial_conv2d
        return build(shape, w_bits, a_bits, target, parallel=parallel)
    if family == "lut":
        return build_lut_dense(shape, w_bits, target, parallel=parallel)
    return (build_int8_dense if dense else build_int8_conv2d)(shape, target, parallel=parallel)


def _layer_kernels(shape, bit_pairs: Sequence[tuple[int, int]], lut_w_bits: Sequence[int],
                   include_int8: bool) -> list[tuple[str, int, int]]:
    """(family, w_bits, a_bits) of every kernel timed for one layer: bit-serial, lut (dense only), int8 last."""
    kernels = [("bitserial", int(w), int(a)) for w, a in bit_pairs]
    if isinstance(shape, DenseShape):
        kernels += [("lut", int(w), 8) for w in lut_w_bits]
    return kernels + ([("int8", 8, 8)] if include_int8 else [])


def _mode(kernel: BuiltKernel) -> str:
    """The kernel's weight layout or method: bit-serial ``conv``/``dense`` layouts, int8 ``channel``/
    ``column``/``window``, lut ``lookup``/``unpack``."""
    isa = vector_isa(tvm.target.Target(kernel.target))
    if kernel.family == "lut":
        return plan_lut_dense(kernel.shape, kernel.w_bits, kernel.parallel, isa).method
    if kernel.family == "int8":
        shape = dense_as_conv(kernel.shape) if isinstance(kernel.shape, DenseShape) else kernel.shape
        return int8_weight_shape(shape, isa)[0]
    from .encoding import conv_weight_layout, dense_weight_layout

    lanes = isa.uint64_lanes
    if isinstance(kernel.shape, DenseShape):
        return dense_weight_layout(kernel.shape, kernel.w_bits, lanes).mode
    return conv_weight_layout(kernel.shape, kernel.w_bits, lanes).mode


def _row(layer: str, kernel: BuiltKernel, timing: dict, peak: Peak | None, bandwidth: MemoryBandwidth | None,
         threads: int) -> dict:
    shape = kernel.shape
    family = kernel.family
    w_bits, a_bits = kernel.w_bits, kernel.a_bits
    macs = shape.macs
    binary_ops = macs * w_bits * a_bits
    seconds = timing["median_ms"] / 1e3
    gbops = binary_ops / seconds / 1e9
    used = threads if kernel.parallel else 1
    # the time to read the packed weights once at this machine's streaming rate, on the cores used
    bound_ms = kernel.weight_bytes / (bandwidth.gbytes_per_s_per_core * 1e9 * used) * 1e3 if bandwidth else None
    return {
        "layer": layer,
        "shape": shape.label(),
        "kernel": family,
        "isa": _isa_used(kernel),
        "mode": _mode(kernel),
        "w_bits": w_bits,
        "a_bits": a_bits,
        "batch": shape.batch,
        "macs": macs,
        "binary_ops": binary_ops,
        "threads": used,
        "protocol": timing["protocol"],
        "latency_ms": f"{timing['median_ms']:.6f}",
        "latency_spread_ms": f"{timing['iqr_ms']:.6f}",
        "latency_min_ms": f"{timing['min_ms']:.6f}",
        "weight_bytes": kernel.weight_bytes,
        "memory_bound_ms": "" if bound_ms is None else f"{bound_ms:.6g}",
        "over_memory_bound": "" if bound_ms is None else f"{timing['median_ms'] / bound_ms:.3f}",
        "gbinary_ops_per_s": f"{gbops:.3f}",
        "gmacs_per_s": f"{macs / seconds / 1e9:.3f}",
        # against the per-core peak times the cores this kernel ran on (lut rows have no peak of their own)
        "efficiency_vs_popcount_peak": (
            f"{gbops / (peak.gbinary_ops_per_s_per_core * used):.4f}" if peak and family == "bitserial" else ""
        ),
        "efficiency_vs_int8_peak": (
            f"{macs / seconds / 1e9 / (peak.gmacs_int8_per_s_per_core * used):.4f}" if peak and family == "int8" else ""
        ),
        "speedup_vs_int8": "",
        "crossover_wa": "",
    }


def _isa_used(kernel: BuiltKernel) -> str:
    """The instruction set the kernel's inner product runs on (e.g. ``avx512-vpopcntdq``, ``avx512-vnni``,
    ``avx512bw`` for the lookup tables' ``vpshufb``)."""
    isa = vector_isa(tvm.target.Target(kernel.target))
    if kernel.family == "lut":
        return plan_lut_dense(kernel.shape, kernel.w_bits, kernel.parallel, isa).path
    return isa.int8 if kernel.family == "int8" else isa.name


def crossover_wa(rows: Sequence[dict]) -> int | None:
    """The largest w*a among one layer's bit-serial rows that beat its int8 row (None: none did)."""
    wins = [int(r["w_bits"]) * int(r["a_bits"]) for r in rows
            if r["kernel"] == "bitserial" and r["speedup_vs_int8"] and float(r["speedup_vs_int8"]) > 1.0]
    return max(wins) if wins else None


@dataclass(frozen=True)
class KernelBench:
    """What :func:`bench_kernels` measured: the rows and what they depend on."""

    rows: list[dict]  # one per kernel, keys :data:`CSV_COLUMNS`
    target: str  # the LLVM target, as TVM prints it (kind, mtriple, mcpu, mattr)
    avx2: bool  # whether LLVM emits AVX2 for the target
    isa: VectorIsa
    threads: int  # TVM's runtime pool (TVM_NUM_THREADS, else half the logical CPUs)
    peak: Peak | None  # None: not measured, efficiencies empty
    bandwidth: MemoryBandwidth | None  # None: not measured, memory-bound columns empty
    timing_notes: tuple[str, ...]  # the timer's own account (:meth:`KernelTimer.notes`)
    parallel: bool | None  # None: each kernel chose by its size
    seed: int

    def notes(self) -> list[str]:
        """The facts behind the rows, one line each, for the notes of a provenance header."""
        isa = self.isa
        peak = self.peak
        if peak is None:
            peaks = "peaks: not measured (efficiency columns empty)"
        else:
            peaks = (
                f"peaks per core: {peak.gbinary_ops_per_s_per_core:.6g} G binary ops/s "
                f"({_PEAK_INSTRUCTIONS['popcount', isa.name]}), {peak.gmacs_int8_per_s_per_core:.6g} G int8 MAC/s "
                f"({_PEAK_INSTRUCTIONS['int8', isa.int8]}); on all {peak.threads} threads: "
                f"{peak.gbinary_ops_per_s:.6g} and {peak.gmacs_int8_per_s:.6g}"
            )
        bw = self.bandwidth
        if bw is None:
            bandwidth = "memory bandwidth: not measured (memory_bound_ms and over_memory_bound empty)"
        else:
            bandwidth = (
                f"memory read bandwidth per core: {bw.gbytes_per_s_per_core:.4g} GB/s; on all {bw.threads} threads: "
                f"{bw.gbytes_per_s:.4g} GB/s (best of {bw.repeat} passes of a uint64 vector sum over "
                f"{bw.buffer_bytes / 2**20:g} MiB, {BANDWIDTH_L3_FACTOR} x the L3)"
            )
        parallel = {None: "auto (each kernel by its size)", True: "all threads", False: "one thread"}[self.parallel]
        return [
            f"llvm target: {self.target}; avx2: {'yes' if self.avx2 else 'no'}",
            f"instruction sets: bit-serial {isa.name} ({isa.uint64_lanes} x uint64 lanes, {isa.registers} registers); "
            f"lut {isa.lut}; int8 {isa.int8}",
            f"threads: {self.threads} (TVM runtime pool); parallel: {parallel}; the threads column says what ran",
            peaks,
            bandwidth,
            *self.timing_notes,
            "latency_ms is the median of the samples, latency_spread_ms their interquartile range; the machine "
            "may be shared, so compare rows of one file rather than across files",
            "binary_ops = MACs x w_bits x a_bits (int8: 8 x 8; lut: w_bits x 8); efficiency = throughput / "
            "(per-core peak x threads); speedup_vs_int8 = the layer's int8 latency / the row's latency",
            "weight_bytes = the packed weights one call reads (activations and outputs not counted); "
            "memory_bound_ms = weight_bytes / (per-core read bandwidth x threads), the least time to read them "
            "from memory; over_memory_bound = latency_ms / memory_bound_ms (near 1: the kernel is memory bound)",
        ]


def bench_kernels(
    shapes: Sequence[tuple[str, ConvShape | DenseShape]] = DEFAULT_SHAPES,
    bit_pairs: Sequence[tuple[int, int]] = DEFAULT_BIT_PAIRS,
    *,
    time_kernels: KernelTimer,
    layer_bit_pairs: Mapping[str, Sequence[tuple[int, int]]] = LAYER_BIT_PAIRS,
    lut_w_bits: Sequence[int] = DEFAULT_LUT_W_BITS,
    target=None,
    include_int8: bool = True,
    measure_peak: bool = True,
    parallel: bool | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> KernelBench:
    """Time every layer's kernels with ``time_kernels``; returns the rows and their facts.

    Per layer: the bit-serial kernel at each of ``layer_bit_pairs[layer]`` (else ``bit_pairs``), the
    lookup-table kernel at each of ``lut_w_bits`` (dense layers; 8-bit activations) and the int8
    baseline, all timed together by ``time_kernels`` (the caller's protocol: :class:`KernelTimer`)
    on seeded random inputs. Columns: see :data:`CSV_COLUMNS`. Latencies are in milliseconds;
    ``gbinary_ops_per_s`` counts MACs x w_bits x a_bits per second (x64 for int8);
    ``efficiency_vs_popcount_peak`` (bit-serial rows) divides that by the measured per-core
    AND+popcount peak times ``threads`` (the cores the kernel ran on);
    ``efficiency_vs_int8_peak`` (int8 rows) does the same for int8 MACs/s against the measured
    int8 peak; ``speedup_vs_int8`` is int8 latency / the row's latency on the same layer;
    ``memory_bound_ms`` is ``weight_bytes`` at the measured per-core read bandwidth times
    ``threads``. ``measure_peak`` measures the compute peaks and the memory bandwidth (else their
    columns stay empty). ``parallel`` forces every kernel onto all cores (True) or one (False);
    None lets each kernel decide by its size (the ``threads`` column says what ran).
    """
    target = make_target(target)
    threads = tvm_threads()
    say = progress or (lambda message: None)
    peak = bandwidth = None
    if measure_peak:
        say("measuring the AND+popcount and int8 peaks and the memory bandwidth")
        peak = measure_popcount_peak(target, threads)
        bandwidth = measure_memory_bandwidth(target, threads)
    rows: list[dict] = []
    for layer, shape in shapes:
        pairs = layer_bit_pairs.get(layer, bit_pairs)
        kernels = {}
        for family, w_bits, a_bits in _layer_kernels(shape, pairs, lut_w_bits, include_int8):
            kernel = _build(shape, family, w_bits, a_bits, target, parallel)
            kernels[f"{family} w{w_bits}a{a_bits}"] = (kernel, kernel.arguments(*kernel.random_inputs(seed)))
        say(f"{layer}: timing {len(kernels)} kernels")
        timings = time_kernels(kernels)
        shape_rows = []
        for name, (kernel, _) in kernels.items():
            row = _row(layer, kernel, timings[name], peak, bandwidth, threads)
            say(f"{layer} {name}: {row['latency_ms']} ms ({row['protocol']}), {row['gbinary_ops_per_s']} Gbop/s")
            shape_rows.append(row)
        if include_int8:
            int8_ms = float(shape_rows[-1]["latency_ms"])
            for row in shape_rows[:-1]:
                row["speedup_vs_int8"] = f"{int8_ms / float(row['latency_ms']):.3f}"
            crossing = crossover_wa(shape_rows)
            for row in shape_rows:
                row["crossover_wa"] = "" if crossing is None else crossing
        rows.extend(shape_rows)
    return KernelBench(
        rows=rows,
        target=str(target),
        avx2=target_has_avx2(target),
        isa=vector_isa(target),
        threads=threads,
        peak=peak,
        bandwidth=bandwidth,
        timing_notes=tuple(time_kernels.notes()),
        parallel=parallel,
        seed=seed,
    )
