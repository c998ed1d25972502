"""Build and run the kernels on numpy arrays.

:func:`build_bitserial_conv2d` and friends compile a scheduled PrimFunc for an x86 target and
return a :class:`BuiltKernel`: call it on numpy arrays to get the int32 output, or hand
:meth:`BuiltKernel.arguments` and :attr:`BuiltKernel.module` to a timer (the project's one
timing protocol lives outside this package: ``releq_tvm.timing`` and
``releq_tvm.compile.timing``). Builds are cached per (kernel, shape, bits, layout, parallel,
target) for the life of the process, because one TVM build costs 0.1-2 s.

Threads: parallel kernels use TVM's runtime thread pool, one thread per physical core unless
the ``TVM_NUM_THREADS`` environment variable says otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tvm

from .bitserial import bitserial_conv2d_primfunc, bitserial_dense_primfunc, plan_conv2d, plan_dense
from .encoding import pack_weights, weight_level_range
from .int8 import int8_conv2d_primfunc, int8_dense_primfunc, pack_int8_weights, plan_int8_conv2d
from .lut import lut_dense_primfunc, pack_lut_weights, plan_lut_dense
from .common import dense_as_conv
from .shapes import ConvShape, DenseShape
from .target import make_target, vector_isa


@dataclass(frozen=True)
class BuiltKernel:
    """A compiled kernel plus what a caller needs to feed it.

    ``kind`` is ``"bitserial_conv2d"``, ``"bitserial_dense"``, ``"int8_conv2d"``, ``"int8_dense"``
    or ``"lut_dense"``. ``w_bits``/``a_bits`` are 8/8 for the int8 kernels; the lookup-table
    kernel takes 8-bit activations (``a_bits`` 8).
    """

    kind: str
    shape: ConvShape | DenseShape
    w_bits: int
    a_bits: int
    layout: str
    parallel: bool
    target: str
    prim_func: tvm.tirx.PrimFunc = field(repr=False)
    executable: object = field(repr=False)
    input_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()
    weight_dtype: str = ""
    output_shape: tuple[int, ...] = ()
    _packer: Callable[[np.ndarray], np.ndarray] = field(repr=False, default=None)

    @property
    def module(self) -> tvm.runtime.Module:
        """The runtime module holding ``main`` (what ``time_evaluator`` runs)."""
        return self.executable.mod

    @property
    def family(self) -> str:
        """The kernel family: ``"bitserial"``, ``"int8"`` or ``"lut"``."""
        return self.kind.rsplit("_", 1)[0]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed weights one call reads (padding included)."""
        return int(np.prod(self.weight_shape, dtype=np.int64)) * np.dtype(self.weight_dtype).itemsize

    @property
    def binary_macs(self) -> int:
        """Bit operations of one call: MACs * w_bits * a_bits (MACs * 64 for the int8 kernels)."""
        return self.shape.macs * self.w_bits * self.a_bits

    def pack(self, q: np.ndarray) -> np.ndarray:
        """Weight levels ``(O, C/groups, kh, kw)`` / ``(O, I)`` in the layout ``main`` takes."""
        return self._packer(q)

    def arguments(self, x: np.ndarray, w_packed: np.ndarray) -> list:
        """``main``'s arguments on ``tvm.cpu()``: activations, packed weights and a zeroed int32 output.

        Raises ``ValueError`` (with what ``main`` wants) for a wrong shape, dtype or activation range.
        """
        x = np.ascontiguousarray(x)
        if x.shape != self.input_shape or x.dtype != np.uint8:
            raise ValueError(f"{self.kind} wants uint8 activations {self.input_shape}; got {x.dtype} {x.shape}")
        if x.size and int(x.max()) >= 2**self.a_bits:
            raise ValueError(f"{self.kind} with a_bits={self.a_bits} takes activations in [0, {2**self.a_bits - 1}]; "
                             f"got a maximum of {int(x.max())}")
        if w_packed.shape != self.weight_shape or str(w_packed.dtype) != self.weight_dtype:
            raise ValueError(
                f"{self.kind} wants packed weights {self.weight_dtype} {self.weight_shape}; got "
                f"{w_packed.dtype} {w_packed.shape} (use BuiltKernel.pack)"
            )
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros(self.output_shape, dtype=np.int32), dev)
        return [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.ascontiguousarray(w_packed), dev), out]

    def __call__(self, x: np.ndarray, w_packed: np.ndarray) -> np.ndarray:
        """Run once on numpy arrays; returns the int32 output."""
        args = self.arguments(x, w_packed)
        self.executable["main"](*args)
        return args[-1].numpy()

    def random_inputs(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Valid random activations and packed weights (seeded) for timing."""
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 2**self.a_bits, size=self.input_shape, dtype=np.int64).astype(np.uint8)
        weight_shape = self.shape.weight_shape()
        if self.kind.startswith("int8"):
            q = rng.integers(-128, 128, size=weight_shape)
        elif self.w_bits == 1:
            q = rng.choice(np.array([-1, 1]), size=weight_shape)
        else:
            lo, hi = weight_level_range(self.w_bits)
            q = rng.integers(lo, hi + 1, size=weight_shape)
        return x, self.pack(q)


def _compile(func: tvm.tirx.PrimFunc, target: tvm.target.Target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


@functools.lru_cache(maxsize=256)
def _cached_build(kind: str, shape, w_bits: int, a_bits: int, layout: str, parallel: bool | None,
                  target_json: str) -> BuiltKernel:
    target = make_target(tvm.target.Target(target_json))
    isa = vector_isa(target)
    if kind == "bitserial_conv2d":
        plan = plan_conv2d(shape, w_bits, a_bits, layout, parallel, isa)
        func = bitserial_conv2d_primfunc(shape, w_bits, a_bits, layout, parallel, isa)
        ins, outs = shape.input_shape(layout), shape.output_shape(layout)
        wshape, wdtype = plan.weights.shape, "uint64"
        packer = functools.partial(pack_weights, w_bits=w_bits, groups=shape.groups, lanes=isa.uint64_lanes)
    elif kind == "bitserial_dense":
        plan = plan_dense(shape, w_bits, a_bits, parallel, isa)
        func = bitserial_dense_primfunc(shape, w_bits, a_bits, parallel, isa)
        ins, outs = shape.input_shape(), shape.output_shape()
        wshape, wdtype = plan.weights.shape, "uint64"
        packer = functools.partial(pack_weights, w_bits=w_bits, lanes=isa.uint64_lanes)
    elif kind == "int8_conv2d":
        # vpdpbusd (AVX-512 VNNI / AVX-VNNI) or vpmaddwd, as isa.int8 says; the packed layout follows it
        plan = plan_int8_conv2d(shape, layout, parallel, isa)
        func = int8_conv2d_primfunc(shape, layout, parallel, isa)
        ins, outs = shape.input_shape(layout), shape.output_shape(layout)
        wshape, wdtype = plan.weight_shape, "int8"
        packer = functools.partial(pack_int8_weights, groups=shape.groups, isa=isa)
    elif kind == "int8_dense":
        plan = plan_int8_conv2d(dense_as_conv(shape), "NCHW", parallel, isa)
        func = int8_dense_primfunc(shape, parallel, isa)
        ins, outs = shape.input_shape(), shape.output_shape()
        wshape, wdtype = plan.weight_shape, "int8"
        packer = functools.partial(pack_int8_weights, isa=isa)
    elif kind == "lut_dense":
        plan = plan_lut_dense(shape, w_bits, parallel, isa)
        func = lut_dense_primfunc(shape, w_bits, parallel, isa)
        ins, outs = shape.input_shape(), shape.output_shape()
        wshape, wdtype = plan.weight_shape, "uint8"
        packer = functools.partial(pack_lut_weights, w_bits=w_bits, isa=isa)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    return BuiltKernel(
        kind, shape, w_bits, a_bits, layout, plan.parallel, str(target), func, _compile(func, target),
        tuple(ins), tuple(wshape), wdtype, tuple(outs), packer,
    )


def _target_json(target) -> str:
    return str(make_target(target))


def build_bitserial_conv2d(shape: ConvShape, w_bits: int, a_bits: int, target=None, layout: str = "NCHW",
                           parallel: bool | None = None) -> BuiltKernel:
    """Compile a bit-serial conv2d (cached). ``target``: anything :func:`make_target` accepts (default: this CPU)."""
    return _cached_build("bitserial_conv2d", shape, int(w_bits), int(a_bits), layout, parallel, _target_json(target))


def build_bitserial_dense(shape: DenseShape, w_bits: int, a_bits: int, target=None,
                          parallel: bool | None = None) -> BuiltKernel:
    """Compile a bit-serial dense layer (cached)."""
    return _cached_build("bitserial_dense", shape, int(w_bits), int(a_bits), "NC", parallel, _target_json(target))


def build_int8_conv2d(shape: ConvShape, target=None, layout: str = "NCHW", parallel: bool | None = None) -> BuiltKernel:
    """Compile the plain int8 conv2d baseline (cached).

    The inner product follows ``vector_isa(target).int8``: ``vpdpbusd`` where the target has
    AVX-512 VNNI (zmm) or AVX-VNNI (ymm), ``vpmaddwd`` otherwise; ``kernel.pack(q)`` lays the
    weights out for it.
    """
    return _cached_build("int8_conv2d", shape, 8, 8, layout, parallel, _target_json(target))


def build_int8_dense(shape: DenseShape, target=None, parallel: bool | None = None) -> BuiltKernel:
    """Compile the plain int8 dense baseline (cached; the ISA as in :func:`build_int8_conv2d`)."""
    return _cached_build("int8_dense", shape, 8, 8, "NC", parallel, _target_json(target))


def build_lut_dense(shape: DenseShape, w_bits: int, target=None, parallel: bool | None = None) -> BuiltKernel:
    """Compile a lookup-table dense layer (cached): ``w_bits`` in 1-4 weight bits, 8-bit activations.

    The lookup path follows ``vector_isa(target).lut`` (``vpshufb`` on zmm or ymm, else scalar);
    ``kernel.pack(q)`` lays the weights out for it (:func:`releq_tvm.kernels.lut.pack_lut_weights`).
    """
    return _cached_build("lut_dense", shape, int(w_bits), 8, "NC", parallel, _target_json(target))


def run(kernel: BuiltKernel, x: np.ndarray, w_packed: np.ndarray) -> np.ndarray:
    """Run ``kernel`` once on numpy arrays and return its int32 output."""
    return kernel(x, w_packed)
