"""The output stage every kernel family applies, described as data (oneDNN's post-ops).

A conv / dense kernel computes the exact integer sum ``acc = sum q*x`` per output element. What
happens to it before it is stored is an :class:`Epilogue`, applied in the kernel's ``out``
block while the accumulators are still in registers, so no int64 tensor (and, when the next
layer's quantizer is fused, no int32 tensor) goes through memory. In order, each step optional:

1. ``requantize``: ``v = clip((acc * mult[c] + offset[c]) >> shift[c], int32)`` with per-output-
   channel int64 ``mult``, ``offset`` (rounding half included) and ``shift`` (an arithmetic shift);
2. ``residual``: ``v = clip(v + residual, int32)``, an int32 tensor shaped like the output;
3. ``relu``: ``v = max(v, 0)``;
4. ``quantize_bits = a``: ``out = clip((v * qm + qround) >> qshift, 0, 2^a - 1)`` as uint8, the
   next layer's input quantizer with ``quant = [qm, qround, qshift]`` (int64, shape (3,)).

Without any step the kernel stores ``acc`` as int32 (the plain kernel). The arithmetic is that of
``releq_tvm.compile.integer`` (which this package does not import); the kernels' tests check it
against :func:`epilogue_reference`, the same steps in numpy.

The parameters are PrimFunc arguments after ``data`` and ``weights`` in the order of
:func:`epilogue_placeholders`, so a library depends on the network's structure, not its values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Epilogue:
    """Which output-stage steps a kernel runs (see the module docstring)."""

    requantize: bool = False
    residual: bool = False
    relu: bool = False
    quantize_bits: int | None = None

    def __post_init__(self):
        if (self.residual or self.relu or self.quantize_bits) and not self.requantize:
            raise ValueError("residual, relu and quantize act on requantized values: set requantize=True")
        if self.quantize_bits is not None and not 1 <= int(self.quantize_bits) <= 8:
            raise ValueError(f"quantize_bits must lie in 1..8; got {self.quantize_bits!r}")

    @property
    def out_dtype(self) -> str:
        return "uint8" if self.quantize_bits else "int32"

    @property
    def label(self) -> str:
        """A short name for kernel symbols: ``acc``, ``rq``, ``rq_res_relu_q4`` ..."""
        if not self.requantize:
            return "acc"
        parts = ["rq"] + (["res"] if self.residual else []) + (["relu"] if self.relu else [])
        return "_".join(parts + ([f"q{self.quantize_bits}"] if self.quantize_bits else []))


#: The plain kernel: the exact int32 sum.
PLAIN = Epilogue()


def epilogue_placeholders(epilogue: Epilogue, out_channels: int, out_shape) -> dict[str, te.Tensor]:
    """The epilogue's PrimFunc arguments by name, in argument order."""
    args: dict[str, te.Tensor] = {}
    if epilogue.requantize:
        for name in ("mult", "offset", "shift"):
            args[name] = te.placeholder((out_channels,), "int64", name=name)
    if epilogue.residual:
        args["residual"] = te.placeholder(tuple(out_shape), "int32", name="residual")
    if epilogue.quantize_bits:
        args["quant"] = te.placeholder((3,), "int64", name="quant")
    return args


def _clip(value, lo, hi):
    """``value`` (an int64 expression) clipped to ``[lo, hi]``."""
    return te.max(te.min(value, tirx.const(hi, "int64")), tirx.const(lo, "int64"))


def epilogue_value(epilogue: Epilogue, acc, channel, out_index, args: dict[str, te.Tensor]):
    """The stored value of one output element: ``acc`` (an integer expression) through the steps.

    ``channel`` indexes the per-channel parameters; ``out_index`` the residual.
    """
    if not epilogue.requantize:
        return acc.astype("int32")
    t = acc.astype("int64") * args["mult"][channel] + args["offset"][channel]
    v = _clip(t >> args["shift"][channel], INT32_MIN, INT32_MAX)  # int64 holding an int32 value
    if epilogue.residual:
        v = _clip(v + args["residual"][tuple(out_index)].astype("int64"), INT32_MIN, INT32_MAX)
    if epilogue.relu:
        v = te.max(v, tirx.const(0, "int64"))
    if epilogue.quantize_bits:
        quant = args["quant"]
        v = _clip((v * quant[0] + quant[1]) >> quant[2], 0, 2**epilogue.quantize_bits - 1)
        return v.astype("uint8")
    return v.astype("int32")


def output_stage(epilogue: Epilogue, acc_at, out_shape, index_map, out_channels: int, out_per_group: int):
    """A kernel's ``out`` block, the same for every family: for each output index, the group-local
    sum ``acc_at(n, group, row, col, channel in group)`` through the epilogue.

    ``index_map`` maps output indices to ``(n, channel, row, col)``. Returns ``(epilogue
    arguments, out)``.
    """
    args = epilogue_placeholders(epilogue, out_channels, out_shape)

    def value(*idx):
        n, oc, i, j = index_map(*idx)
        return epilogue_value(epilogue, acc_at(n, oc // out_per_group, i, j, oc % out_per_group), oc, idx, args)

    return list(args.values()), te.compute(tuple(out_shape), value, name="out")


def epilogue_reference(epilogue: Epilogue, acc: np.ndarray, channel_axis: int, mult=None, offset=None, shift=None,
                       residual=None, quant=None) -> np.ndarray:
    """The epilogue in numpy (int64 arithmetic, floor shifts), for tests."""
    if not epilogue.requantize:
        return acc.astype(np.int32)
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    m, o, s = (np.asarray(a, np.int64).reshape(shape) for a in (mult, offset, shift))
    v = np.clip((acc.astype(np.int64) * m + o) >> s, INT32_MIN, INT32_MAX)
    if epilogue.residual:
        v = np.clip(v + np.asarray(residual, np.int64), INT32_MIN, INT32_MAX)
    if epilogue.relu:
        v = np.maximum(v, 0)
    if epilogue.quantize_bits:
        qm, qr, qs = (int(q) for q in quant)
        return np.clip((v * qm + qr) >> qs, 0, 2**epilogue.quantize_bits - 1).astype(np.uint8)
    return v.astype(np.int32)


#: Elements below which a standalone quantizer runs on one core (a parallel launch costs microseconds).
QUANTIZE_PARALLEL_MIN = 1 << 16


def quantize_primfunc(shape: tuple[int, ...], bits: int) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(v int32 shape, quant int64 (3,), out uint8 shape)``: a layer's input
    quantizer ``clip((v * qm + qround) >> qshift, 0, 2^bits - 1)`` on its own, for an int32 tensor
    that several consumers read (where it cannot be fused into the producer's epilogue).

    Vectorised over the flattened tensor (16 lanes), parallel above :data:`QUANTIZE_PARALLEL_MIN`
    elements.
    """
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must lie in 1..8; got {bits!r}")
    v = te.placeholder(tuple(shape), "int32", name="v")
    quant = te.placeholder((3,), "int64", name="quant")
    out = te.compute(
        tuple(shape),
        lambda *i: _clip((v[i].astype("int64") * quant[0] + quant[1]) >> quant[2], 0, 2**bits - 1).astype("uint8"),
        name="out",
    )
    sch = tvm.s_tir.Schedule(te.create_prim_func([v, quant, out]))
    block = sch.get_sblock("out")
    fused = sch.fuse(*sch.get_loops(block))
    size = int(np.prod(shape))
    lanes = 16 if size % 16 == 0 else 1
    outer, inner = sch.split(fused, [None, lanes])
    if lanes > 1:
        sch.vectorize(inner)
    if size >= QUANTIZE_PARALLEL_MIN:
        sch.parallel(outer)
    func = sch.mod["main"]
    return func.without_attr("global_symbol") if "global_symbol" in func.attrs else func
