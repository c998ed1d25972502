"""Plain int8 conv2d and dense for x86: the "8-bit build" the bit-serial kernels are compared with.

Activations are ``uint8`` in ``[0, 255]``, weights are signed integers in ``[-128, 127]``, and
the output is the exact int32 ``sum q*x``. The inner product depends on the target's
:class:`~releq_tvm.kernels.target.VectorIsa` (``isa.int8``):

* ``"avx512-vnni"``: AVX-512 VNNI ``vpdpbusd`` on zmm registers. One instruction multiplies
  64 uint8 activations by 64 int8 weights and adds each group of 4 products into one of 16
  int32 accumulator lanes. It is the non-saturating variant (``vpdpbusds`` saturates), and a
  4-product sum lies in ``[4 * 255 * -128, 4 * 255 * 127]``, far inside int32, so it is exact.
  Activations stay uint8 in the ``pad`` stage (no widening), 4 input channels per 32-bit word.
* ``"avx-vnni"``: the same on ymm registers (``llvm.x86.avx512.vpdpbusd.256``, 8 int32 lanes),
  which LLVM emits as the VEX-encoded AVX-VNNI ``vpdpbusd`` on CPUs without AVX-512.
* ``"pmaddwd"``: AVX2 ``vpmaddwd`` (16 int16 x int16 products summed in pairs into 8 int32
  lanes): activations are widened to int16 once, in the ``pad`` stage, and weights (stored as
  int8, half the memory traffic of int16) are sign-extended as they are loaded, so every
  product is exact. The faster-looking ``vpmaddubsw`` (uint8 x int8) saturates its int16 pair
  sums (``2 * 255 * 127 > 32767``), so it is not exact for full-range operands and is not used.

Weight layouts (``int8``, from :func:`pack_int8_weights`; they depend on the ISA, so pack with
the same ``isa`` the kernel was planned for, e.g. through ``BuiltKernel.pack``):

* ``channel`` (more than one input channel per group, unless ``column``; and dense):
  ``(groups, tiles, kh, kw, in_blocks, dot * tile)`` with ``dot`` input channels per block
  (4 for VNNI, 2 for vpmaddwd): input channel ``dot*p + k`` of output channel ``o`` is at
  ``[g, o // tile, i, j, p, dot * (o % tile) + k]`` (channels padded with zeros to a multiple
  of ``dot``, outputs to ``tiles * tile``; ``tile`` is 1, 2 or 4 accumulator registers of
  ``isa.int32_lanes`` int32 lanes);
* ``column`` (2 or 3 input channels per group, e.g. an RGB image, when it saves product slots):
  ``(groups, tiles, kh, 1, blocks, dot * tile)``: the ``kw * cg`` terms of kernel row ``i``,
  term ``f = j * cg + c`` for kernel column ``j`` and channel ``c``, are packed ``dot`` to a
  block, so term ``f`` of output channel ``o`` is at ``[g, o // tile, i, 0, f // dot,
  dot * (o % tile) + f % dot]`` (zeros past ``kw * cg``). The activations are the image rows
  flattened to (column, channel) terms, where a kernel row's terms at one output column are
  contiguous: one block is still one 32-bit broadcast. AlexNet's 3-channel 11x11 conv1 on VNNI
  multiplies 36 terms per kernel row instead of 44 (11 columns x 4 channel slots);
* ``window`` (one input channel per group: depthwise or a 1-channel image), vectorised over
  output columns instead of output channels: ``(groups, out_per_group, kh, taps)``, weight
  ``w[o, 0, i, j]`` at ``[g, o % out_per_group, i, j]`` for ``g = o // out_per_group``.

  - AVX-512 VNNI with VBMI (``isa.lut == "avx512vbmi"``): ``taps = 4 * ceil(kw / 4)`` (zeros
    past ``kw``): each kernel row's taps in quads, one int32 per quad. 16 output columns per zmm
    accumulator: one 64-byte load of an image row, a ``vpermb`` that lays out the 16 columns'
    4-tap windows as one quad per int32 lane (zeroing the padding) and one ``vpdpbusd`` with the
    broadcast weight quad, per kernel row and quad (:func:`_replace_with_window_vpdpbusd`). No
    padded copy of the input; a register tile of several output rows shares each shuffled input
    row; a fused epilogue runs on whole 16-column vectors (on padded rows, then cropped, when the
    rows are not a multiple of 16 columns). Strides up to 4 (a 16-column window spans ``15 *
    stride + 4`` bytes); wider strides run the int16 code below on the same layout.
  - other ISAs: ``taps = kw``; int16 activations (a padded copy), 8 int32 lanes of int16
    multiply-adds, the same code for every ISA.

Layouts of data and output are as in :mod:`releq_tvm.kernels.bitserial` (NCHW default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from .common import (
    check_layout,
    dense_as_conv,
    has_block,
    input_loader,
    output_index_map,
    vectorize_output,
    without_global_symbol,
)
from .encoding import round_up
from .epilogue import PLAIN, Epilogue, epilogue_placeholders, epilogue_value, output_stage
from .shapes import ConvShape, DenseShape
from .target import VectorIsa, vector_isa

#: int32 lanes of one AVX2 register: the vpmaddwd output-channel vector and the window-mode vector.
INT32_LANES = 8
#: Work (MACs) below which one core beats two (waking the second thread costs microseconds).
INT8_PARALLEL_MIN_MACS = 2_000_000
#: ISAs whose int8 product is ``vpdpbusd`` (4 uint8 x int8 products per int32 lane).
VNNI_ISAS = ("avx512-vnni", "avx-vnni")
#: Input channels per group up to which a conv may pack kernel columns with channels (an RGB
#: image); wider inputs keep the ``channel`` layout, whose padding wastes at most 3 of 4+ slots.
COLUMN_MAX_CHANNELS = 3


def _isa(isa: VectorIsa | None) -> VectorIsa:
    return isa if isa is not None else vector_isa()


def int8_dot(isa: VectorIsa) -> int:
    """Input channels summed into one int32 lane by one product instruction (4 VNNI, 2 vpmaddwd)."""
    return 4 if isa.int8 in VNNI_ISAS else 2


def int8_accumulator_budget(isa: VectorIsa) -> int:
    """int32 accumulator registers the channel-mode register tile may keep live.

    AVX-512 (32 zmm): ``vpdpbusd`` needs no temporaries besides the broadcast activations and
    the weights of one tile (up to 4 registers), which leaves 24. AVX2/AVX-VNNI (16 ymm): 8.
    """
    return 24 if isa.int8 == "avx512-vnni" else 8


def _replace_with_pmaddwd(sch: tvm.s_tir.Schedule, block) -> None:
    """Replace a blockized 8-output x 2-input product with one AVX2 ``vpmaddwd``.

    ``block`` reads ``acc[..., o:o+8]`` (int32), ``pad[..., c:c+2]`` (int16, one activation pair)
    and ``weights[..., 2o:2o+16]`` (int8 or int16, channel pairs of 8 outputs interleaved) and adds
    ``sum_k pad[c+k] * weights[2(o+i)+k]`` to ``acc[o+i]``. ``vpmaddwd`` does exactly this: it
    multiplies 16 int16 pairs and adds neighbours into 8 int32 lanes. This is what
    ``Schedule.tensorize`` would do; tensorize (like ``tvm.ir.save_json``) segfaults in the
    0.27.0.post1 wheel, so the block is rewritten through the schedule state directly.
    """
    old = sch.get(block)
    acc_region, = old.writes
    reads = {r.source.name: r for r in old.reads}
    pair_region, w_region = reads["pad"], reads["weights"]

    pair = tirx.reinterpret("int32", tirx.BufferLoad(pair_region.source, _ramp(pair_region, 2)))
    product = tirx.call_llvm_pure_intrin(
        "int32x8",
        "llvm.x86.avx2.pmadd.wd",
        tirx.reinterpret("int16x16", tirx.Broadcast(pair, 8)),
        tirx.Cast("int16x16", tirx.BufferLoad(w_region.source, _ramp(w_region, 16))),
    )
    acc_idx = _ramp(acc_region, 8)
    body = tirx.BufferStore(acc_region.source, tirx.BufferLoad(acc_region.source, acc_idx) + product, acc_idx)
    _replace_body(sch, block, body)


def _replace_with_vpdpbusd(sch: tvm.s_tir.Schedule, block, lanes: int = 16) -> None:
    """Replace a blockized ``lanes``-output x 4-input product with one VNNI ``vpdpbusd``.

    ``block`` reads ``acc[..., o:o+lanes]`` (int32), ``pad[..., c:c+4]`` (uint8, the 4
    activations of one channel quad) and ``weights[..., 4o:4o+4*lanes]`` (int8, channel quads of
    ``lanes`` outputs interleaved) and adds ``sum_k pad[c+k] * weights[4(o+i)+k]`` to
    ``acc[o+i]``. ``vpdpbusd(acc, a, b)`` adds the 4 products ``a[4i+k] * b[4i+k]`` (uint8 x int8)
    of each lane ``i`` to ``acc[i]`` without saturation, so ``a`` is the activation quad read as
    one int32 and broadcast to every lane. ``lanes`` is 16 (zmm, ``vpdpbusd.512``) or 8 (ymm,
    ``vpdpbusd.256``: AVX512-VL or AVX-VNNI). Like :func:`_replace_with_pmaddwd`, this stands in
    for the ``tensorize`` that the 0.27.0.post1 wheel cannot run.
    """
    if lanes not in (8, 16):
        raise ValueError(f"vpdpbusd has 8 (ymm) or 16 (zmm) int32 lanes; got {lanes}")
    old = sch.get(block)
    acc_region, = old.writes
    reads = {r.source.name: r for r in old.reads}
    quad_region, w_region = reads["pad"], reads["weights"]
    quad = tirx.reinterpret("int32", tirx.BufferLoad(quad_region.source, _ramp(quad_region, 4)))
    acc_idx = _ramp(acc_region, lanes)
    total = tirx.call_llvm_pure_intrin(
        f"int32x{lanes}",
        f"llvm.x86.avx512.vpdpbusd.{32 * lanes}",
        tirx.BufferLoad(acc_region.source, acc_idx),
        tirx.reinterpret(f"uint8x{4 * lanes}", tirx.Broadcast(quad, lanes)),
        tirx.reinterpret(f"uint8x{4 * lanes}", tirx.BufferLoad(w_region.source, _ramp(w_region, 4 * lanes))),
    )
    _replace_body(sch, block, tirx.BufferStore(acc_region.source, total, acc_idx))


def _ramp(region, lanes: int) -> list:
    """Indices of ``region`` with its last axis read as a ``lanes``-wide vector."""
    idx = [r.min for r in region.region]
    idx[-1] = tirx.Ramp(idx[-1], 1, lanes)
    return idx


def _replace_body(sch: tvm.s_tir.Schedule, block, body) -> None:
    old = sch.get(block)
    new = tvm.s_tir.SBlock(old.iter_vars, old.reads, old.writes, old.name_hint, body,
                           annotations=old.annotations)
    sch.state.replace(sch.get_sref(block), new, {old: new})


@dataclass(frozen=True)
class Int8Plan:
    """Tiling of one int8 kernel."""

    shape: ConvShape
    layout: str
    mode: str  # "channel" | "column" | "window"
    weight_shape: tuple[int, ...]
    pos_tile: int  # output columns per register tile (channel and column modes)
    vec_tile: int  # accumulator registers per register tile along the vectorised axis
    out_w_pad: int
    parallel: bool
    #: The target's vector unit the plan is for (``isa.int8`` picks the product instruction).
    isa: VectorIsa
    #: window mode only: the product is :func:`_replace_with_window_vpdpbusd` (16 output columns per
    #: zmm, kernel rows' taps in quads), not int16 multiply-adds over 8 columns
    window_quads: bool = False
    #: quad-window mode: output rows per register tile (``vec_tile`` vectors of 16 columns each);
    #: with stride 1 the rows of a tile share each shuffled input row
    row_tile: int = 1

    @property
    def lanes(self) -> int:
        """int32 lanes of one accumulator register (channel mode)."""
        return self.isa.int32_lanes

    @property
    def dot(self) -> int:
        """Input channels per product block (4 for VNNI, 2 for vpmaddwd)."""
        return int8_dot(self.isa)

    @property
    def tile(self) -> int:
        """Output channels per weight tile (channel mode)."""
        return self.weight_shape[5] // self.dot


def int8_weight_shape(shape: ConvShape, isa: VectorIsa | None = None) -> tuple[str, tuple[int, ...]]:
    """``(mode, packed weight shape)`` of an int8 conv for ``isa`` (default: this host's).

    Only ``groups``, channels and kernel size matter (not the image), so weights can be packed
    without knowing the layer's input size.
    """
    isa = _isa(isa)
    kh, kw = shape.kernel
    og, cg = shape.out_per_group, shape.in_per_group
    if cg == 1:
        # VNNI + VBMI: a kernel row's taps in quads, one int32 per quad (zeros past kw)
        taps = round_up(kw, 4) if _window_by_quads(isa) else kw
        return "window", (shape.groups, og, kh, taps)
    lanes, dot = isa.int32_lanes, int8_dot(isa)
    regs = round_up(og, lanes) // lanes
    # AVX-512: up to 4 registers (64 outputs) per tile, so a dense layer (one output position)
    # still has 4 independent accumulator chains; AVX2: 1 or 2, as the 8-accumulator budget allows
    widths = (4, 2, 1) if isa.int8 == "avx512-vnni" else (2, 1)
    tile = lanes * next(v for v in widths if regs % v == 0)
    if _packs_kernel_columns(cg, kw, dot):
        return "column", (shape.groups, -(-og // tile), kh, 1, -(-(kw * cg) // dot), dot * tile)
    return "channel", (shape.groups, -(-og // tile), kh, kw, -(-cg // dot), dot * tile)


def _window_by_quads(isa: VectorIsa) -> bool:
    """Whether ``window`` convs run on :func:`_replace_with_window_vpdpbusd` (``vpermb`` + ``vpdpbusd``
    on zmm): AVX-512 VNNI with VBMI (``isa.lut == "avx512vbmi"`` says both)."""
    return isa.int8 == "avx512-vnni" and isa.lut == "avx512vbmi"


#: int32 lanes (output columns) of one quad-window accumulator (a zmm register).
WINDOW_QUAD_LANES = 16
#: Bytes of one quad-window activation load (a zmm register): the ``vpermb`` table.
WINDOW_QUAD_BYTES = 64
#: Accumulator registers along one output row of a quad-window tile; wider rows are split.
WINDOW_MAX_VECTORS = 8
#: Accumulator registers of one quad-window tile (rows x vectors); the other zmm hold the shuffled activations, the broadcast weights and the
#: shuffle constants. Below 16: TVM puts a tile's accumulator buffer on the stack only under 1 KiB
#: (``kMaxStackAlloca``); a bigger one inside a parallel loop is a TVMBackendAllocWorkspace call
#: per tile, even at one thread (a 16-register tile ran ~2x slower for that).
WINDOW_MAX_ACCUMULATORS = 15


def _quad_window_fits(shape: ConvShape) -> bool:
    """Whether one 64-byte load holds the taps of a quad-window vector: 16 output columns at
    stride ``sw`` read a span of ``15 * sw + 4`` bytes per tap quad; and whether the input (one
    image plane per group) holds at least one load, which the clamped loads need."""
    h, w = shape.in_size
    span = (WINDOW_QUAD_LANES - 1) * shape.stride[1] + 4
    return span <= WINDOW_QUAD_BYTES and shape.batch * shape.groups * h * w >= WINDOW_QUAD_BYTES


def _packs_kernel_columns(in_per_group: int, kw: int, dot: int) -> bool:
    """Whether an image-like input (at most :data:`COLUMN_MAX_CHANNELS` channels per group) packs
    its kernel rows' ``kw * in_per_group`` (column, channel) terms into dot blocks (``column``
    mode): only when that wastes fewer product slots than padding the channels to ``dot`` at every
    kernel column (``channel`` mode): 36 slots instead of 44 per kernel row for AlexNet's
    3-channel 11x11 conv1 on VNNI."""
    return (in_per_group <= COLUMN_MAX_CHANNELS
            and round_up(kw * in_per_group, dot) < kw * round_up(in_per_group, dot))


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


#: Independent accumulators that hide the latency of ``vpdpbusd`` (about 4-5 cycles at 1-2 per cycle).
VNNI_MIN_ACCUMULATORS = 12


def _vnni_tiles(ow: int, regs: int, budget: int) -> tuple[int, int]:
    """``(pos_tile, vec_tile)`` of a VNNI register tile: least padded work with enough accumulators.

    ``vec_tile`` divides the ``regs`` registers of a weight tile, ``pos_tile * vec_tile`` stays
    within ``budget``. A tile scores the fraction of its columns that are real times the fraction
    of :data:`VNNI_MIN_ACCUMULATORS` it keeps in flight; ties go to less padding, then to more
    accumulators, then to more registers along the output channels (fewer broadcasts per product).
    """
    best = None
    for vec in (v for v in range(1, regs + 1) if regs % v == 0 and v <= budget):
        for pos in range(1, min(budget // vec, 16) + 1):
            real = ow / round_up(ow, pos)
            key = (round(real * min(1.0, pos * vec / VNNI_MIN_ACCUMULATORS), 6), round(real, 6), pos * vec, vec)
            if best is None or key > best[0]:
                best = (key, pos, vec)
    return best[1], best[2]


def plan_int8_conv2d(shape: ConvShape, layout: str = "NCHW", parallel: bool | None = None,
                     isa: VectorIsa | None = None) -> Int8Plan:
    """The tiling of an int8 conv2d for ``isa`` (default: this host's, :func:`vector_isa`);
    ``parallel=None`` uses all cores only for big layers."""
    check_layout(layout)
    isa = _isa(isa)
    mode, wshape = int8_weight_shape(shape, isa)
    ow = shape.out_size[1]
    quads = mode == "window" and _window_by_quads(isa) and _quad_window_fits(shape)
    rows = 1
    if quads:
        # whole output rows per tile where they fit in WINDOW_MAX_VECTORS accumulators; as many
        # rows as divide the output's height within WINDOW_MAX_ACCUMULATORS
        vectors = -(-ow // WINDOW_QUAD_LANES)
        vec = -(-vectors // -(-vectors // WINDOW_MAX_VECTORS))
        pos, owp = WINDOW_QUAD_LANES * vec, round_up(ow, WINDOW_QUAD_LANES * vec)
        rows = _largest_divisor(shape.out_size[0], WINDOW_MAX_ACCUMULATORS // vec)
    elif mode == "window":
        padded, neg_vec = min((round_up(ow, INT32_LANES * v), -v) for v in (2, 1))
        pos, vec, owp = INT32_LANES * -neg_vec, -neg_vec, padded
    else:
        budget, regs = int8_accumulator_budget(isa), wshape[5] // int8_dot(isa) // isa.int32_lanes
        if layout == "NCHW" and round_up(ow, 8) - ow <= ow // 8:
            # 8 columns per register tile: each output channel stores 8 neighbouring int32 as one vector
            pos, vec, owp = 8, _largest_divisor(regs, budget // 8), round_up(ow, 8)
        elif isa.int8 == "pmaddwd":
            vec = regs
            pos, owp = 1, ow
            for p in range(budget // vec, 0, -1):
                if (round_up(ow, p) - ow) * 8 <= ow:  # at most 1/8 of the columns wasted
                    pos, owp = p, round_up(ow, p)
                    break
        else:
            pos, vec = _vnni_tiles(ow, regs, budget)
            owp = round_up(ow, pos)
    if parallel is None:
        parallel = shape.macs >= INT8_PARALLEL_MIN_MACS
    return Int8Plan(shape, layout, mode, wshape, pos, vec, owp, bool(parallel), isa, quads, rows)


def pack_int8_weights(q: np.ndarray, groups: int = 1, isa: VectorIsa | None = None) -> np.ndarray:
    """Lay out int8 weight levels for the int8 kernels planned for ``isa`` (default: this host's).

    Returns an int8 array (see the module docstring). ``q``: conv ``(out_channels,
    in_channels // groups, kh, kw)`` or dense ``(out, in)``, values in ``[-128, 127]``.
    """
    isa = _isa(isa)
    q = np.asarray(q)
    if q.size and (q.min() < -128 or q.max() > 127):
        raise ValueError(f"int8 weights must lie in [-128, 127]; got [{q.min()}, {q.max()}]")
    if q.ndim == 2:
        q = q.reshape(q.shape[0], q.shape[1], 1, 1)
        groups = 1
    if q.ndim != 4 or groups < 1 or q.shape[0] % groups:
        raise ValueError(
            f"weights must be (O, C/groups, kh, kw) with groups dividing O; got {q.shape}, groups={groups}"
        )
    o, cg, kh, kw = q.shape
    mode, wshape = int8_weight_shape(ConvShape(cg * groups, o, (kh, kw), (kh, kw), groups=groups), isa)
    og = o // groups
    qg = q.astype(np.int8).reshape(groups, og, cg, kh, kw)
    if mode == "window":
        full = np.zeros(wshape, dtype=np.int8)  # taps past kw (quad padding) are zero
        full[..., :kw] = qg.reshape(groups, og, kh, kw)
        return full
    dot = int8_dot(isa)
    tiles, blocks, tile = wshape[1], wshape[4], wshape[5] // dot
    if mode == "column":
        # term f = j * cg + c of kernel row i (column j, channel c), zero past kw * cg
        full = np.zeros((groups, tiles * tile, kh, dot * blocks), dtype=np.int8)
        full[:, :og, :, :kw * cg] = qg.transpose(0, 1, 3, 4, 2).reshape(groups, og, kh, kw * cg)
        # (g, T, t, kh, p, k) -> (g, T, kh, p, t, k) -> (g, T, kh, 1, p, dot*t + k)
        full = full.reshape(groups, tiles, tile, kh, blocks, dot).transpose(0, 1, 3, 4, 2, 5)
        return np.ascontiguousarray(full.reshape(wshape))
    full = np.zeros((groups, tiles * tile, dot * blocks, kh, kw), dtype=np.int8)
    full[:, :og, :cg] = qg
    # (g, T, t, p, k, kh, kw) -> (g, T, kh, kw, p, t, k) -> (g, T, kh, kw, p, dot*t + k)
    full = full.reshape(groups, tiles, tile, blocks, dot, kh, kw).transpose(0, 1, 5, 6, 3, 2, 4)
    return np.ascontiguousarray(full.reshape(wshape))


def _int8_graph(plan: Int8Plan, x: te.Tensor, w: te.Tensor):
    """``acc_at(n, g, row, col, o)``: the int32 sums of an int8 conv over an NCHW/NHWC input ``x``."""
    s = plan.shape
    (kh, kw), (sh, sw) = s.kernel, s.stride
    oh, owp = s.out_size[0], plan.out_w_pad
    rows, cols = (oh - 1) * sh + kh, (owp - 1) * sw + kw
    load = input_loader(x, s, plan.layout)
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    if plan.window_quads:
        return _window_quad_graph(plan, x, w, rkh)
    if plan.mode == "window":
        zero = tirx.const(0, "int16")

        def window_pad(n, g, r, c):
            valid, value = load(n, g, r, c)
            return tirx.Select(valid, value.astype("int16"), zero)

        pad = te.compute((s.batch, s.groups, rows, cols), window_pad, name="pad")
        acc = te.compute(
            (s.batch, s.groups, s.out_per_group, oh, owp),
            lambda n, g, o, i, j: te.sum(
                pad[n, g, i * sh + rkh, j * sw + rkw].astype("int32") * w[g, o, rkh, rkw].astype("int32"),
                axis=[rkh, rkw],
            ),
            name="acc",
        )
        return lambda n, g, i, j, o: acc[n, g, o, i, j]

    cg, tiles, blocks = s.in_per_group, plan.weight_shape[1], plan.weight_shape[4]
    dot, tile = plan.dot, plan.tile
    # VNNI multiplies uint8 activations directly; vpmaddwd needs them widened to int16
    pad_dtype = "uint8" if dot == 4 else "int16"
    zero = tirx.const(0, pad_dtype)
    rp = te.reduce_axis((0, blocks), name="rp")
    rk = te.reduce_axis((0, dot), name="rk")
    if plan.mode == "column":
        # each image row flattened to (column, channel) terms: the kw * cg terms of one kernel row
        # at output column j start at term j * sw * cg, so a dot block of them is one contiguous
        # word; blocks running past the window read the next column, whose weights are zero
        width = (owp - 1) * sw * cg + dot * blocks

        def column_pad(n, g, r, m):
            valid, value = load(n, g * cg + m % cg, r, m // cg)
            return tirx.Select(valid, value.astype(pad_dtype), zero)

        pad = te.compute((s.batch, s.groups, rows, width), column_pad, name="pad")
        rkw = te.reduce_axis((0, 1), name="rkw")  # the kernel columns are in rp, rk
        acc = te.compute(
            (s.batch, s.groups, oh, owp, tiles * tile),
            lambda n, g, i, j, o: te.sum(
                pad[n, g, i * sh + rkh, (j * sw + rkw) * cg + rp * dot + rk].astype("int32")
                * w[g, o // tile, rkh, rkw, rp, o % tile * dot + rk].astype("int32"),
                axis=[rkh, rkw, rp, rk],
            ),
            name="acc",
        )
        return lambda n, g, i, j, o: acc[n, g, i, j, o]

    def channel_pad(n, g, r, c, e):
        valid, value = load(n, g * cg + te.min(e, cg - 1), r, c)
        if dot * blocks > cg:
            valid = tirx.all(valid, e < cg)
        return tirx.Select(valid, value.astype(pad_dtype), zero)

    # channels innermost, so one activation pair (int16) or quad (uint8) is one 32-bit broadcast
    pad = te.compute((s.batch, s.groups, rows, cols, dot * blocks), channel_pad, name="pad")
    acc = te.compute(
        (s.batch, s.groups, oh, owp, tiles * tile),
        lambda n, g, i, j, o: te.sum(
            pad[n, g, i * sh + rkh, j * sw + rkw, rp * dot + rk].astype("int32")
            * w[g, o // tile, rkh, rkw, rp, o % tile * dot + rk].astype("int32"),
            axis=[rkh, rkw, rp, rk],
        ),
        name="acc",
    )
    return lambda n, g, i, j, o: acc[n, g, i, j, o]


def _window_quad_graph(plan: Int8Plan, x: te.Tensor, w: te.Tensor, rkh):
    """The window-mode sums read straight from the image planes (no pad stage), kernel columns in
    quads ``rb`` of taps ``rk``; :func:`_replace_with_window_vpdpbusd` replaces the product.

    The image plane of group ``g`` is ``x[n, g]`` in NCHW; an NHWC input is first transposed to
    planes (``plane``), so the product loads 64 contiguous bytes of one row either way.
    """
    s = plan.shape
    (h, wd), (sh, sw), (ph, pw) = s.in_size, s.stride, s.padding
    oh, owp = s.out_size[0], plan.out_w_pad
    src = x
    if plan.layout == "NHWC":
        src = te.compute((s.batch, s.groups, h, wd), lambda n, g, r, c: x[n, r, c, g], name="plane")
    rb = te.reduce_axis((0, plan.weight_shape[3] // 4), name="rb")
    rk = te.reduce_axis((0, 4), name="rk")

    def tap(n, g, o, i, j):
        r, c = i * sh + rkh - ph, j * sw + rb * 4 + rk - pw
        valid = tirx.all(r >= 0, r < h, c >= 0, c < wd)
        value = src[n, g, te.max(te.min(r, h - 1), 0), te.max(te.min(c, wd - 1), 0)]
        return tirx.Select(valid, value, tirx.const(0, "uint8")).astype("int32") \
            * w[g, o, rkh, rb * 4 + rk].astype("int32")

    acc = te.compute((s.batch, s.groups, s.out_per_group, oh, owp),
                     lambda n, g, o, i, j: te.sum(tap(n, g, o, i, j), axis=[rkh, rb, rk]), name="acc")
    return lambda n, g, i, j, o: acc[n, g, o, i, j]


def _replace_with_window_vpdpbusd(sch: tvm.s_tir.Schedule, block, plan: Int8Plan) -> None:
    """Replace a blockized 16-column x 4-tap window product with ``vpermb`` + ``vpdpbusd`` (zmm).

    ``block`` adds, for output columns ``j0 .. j0+15`` of output row ``i``, the taps ``4rb ..
    4rb+3`` of kernel row ``rkh``: ``acc[j] += sum_k x[row, j*sw + 4rb + k - pw] * w[rkh, 4rb + k]``.
    One 64-byte load of the image row (no padded copy) holds all 16 x 4 activations (the span
    is ``15 * sw + 4`` bytes); ``vpermb`` lays them out as 16 quads, one per int32 lane, zeroing
    the lanes that fall in the padding; ``vpdpbusd`` multiplies them by the broadcast weight quad
    (uint8 x int8, 4 products per lane: exact). The load starts at the quads' first column,
    clamped into the input tensor (so it never reads outside it); the shuffle indices absorb the
    clamp. A kernel row in the padding reads a real (clamped) row with every lane zeroed: no
    branch, so LLVM shares one input row's shuffle among the tile's output rows that read it.
    """
    s = plan.shape
    (h, wd), (sh, sw), (ph, pw) = s.in_size, s.stride, s.padding
    lanes, width = WINDOW_QUAD_LANES, WINDOW_QUAD_BYTES
    old = sch.get(block)
    acc_region, = old.writes
    reads = {r.source.name: r for r in old.reads}
    w_region = reads["weights"]
    src = reads["plane"].source if "plane" in reads else reads["data"].source
    n, g, _, i, j0 = (r.min for r in acc_region.region)
    rkh, rb4 = w_region.region[2].min, w_region.region[3].min

    def i32(value):
        return tirx.const(value, "int32")

    def u8(value):  # a scalar int32 expression, broadcast as uint8
        return tirx.Broadcast(tirx.Cast("uint8", value), width)

    row = i * sh + rkh - ph
    image_row = te.max(te.min(row, i32(h - 1)), i32(0))  # padding rows: a real row, zeroed below
    start = j0 * sw + rb4 - pw  # image column of the first tap of the first lane
    row_base = ((n * s.groups + g) * h + image_row) * wd  # flat offset of the row in the planes
    total = s.batch * s.groups * h * wd
    col = te.max(te.min(start, total - width - row_base), -row_base)  # load start, inside the tensor
    lane = tirx.Ramp(tirx.const(0, "uint8"), tirx.const(1, "uint8"), width)
    # byte 4t + k of the product reads image column start + t*sw + k: offset t*sw + k of the span
    offset = (lane >> tirx.const(2, "uint8")) * tirx.const(sw, "uint8") + (lane & tirx.const(3, "uint8"))
    loaded = tirx.BufferLoad(src, [n, g, image_row, tirx.Ramp(col, 1, width)])
    # vpermb reads the low 6 bits of each index: masking keeps the cast non-negative
    index = offset + u8((start - col) & i32(width - 1))
    quads = tirx.call_llvm_pure_intrin(f"uint8x{width}", "llvm.x86.avx512.permvar.qi.512", loaded, index)
    # lanes inside the image: offsets in [-start, wd - start), none in a padding row
    first = te.max(te.min(-start, i32(width)), i32(0))
    end = tirx.Select(tirx.all(row >= 0, row < h), te.max(te.min(wd - start, i32(width)), i32(0)), i32(0))
    inside = tirx.all(offset >= u8(first), offset < u8(end))
    quads = tirx.Select(inside, quads, tirx.Broadcast(tirx.const(0, "uint8"), width))
    weight = tirx.reinterpret("int32", tirx.BufferLoad(w_region.source, _ramp(w_region, 4)))
    acc_idx = _ramp(acc_region, lanes)
    total_acc = tirx.call_llvm_pure_intrin(
        f"int32x{lanes}", "llvm.x86.avx512.vpdpbusd.512",
        tirx.BufferLoad(acc_region.source, acc_idx), quads,
        tirx.reinterpret(f"uint8x{width}", tirx.Broadcast(weight, lanes)),
    )
    _replace_body(sch, block, tirx.BufferStore(acc_region.source, total_acc, acc_idx))


def _vectorize_row_output(sch: tvm.s_tir.Schedule, out_block) -> None:
    """Vectorise the ``out`` block's innermost loop (a tile's output columns, contiguous in NCHW)
    in the widest power-of-two vectors, up to 16 lanes, that divide it: a 112-column row in 7
    vectors of 16, a 56-column row in 7 of 8 (no ragged tail), so the epilogue runs on vectors."""
    loop = sch.get_loops(out_block)[-1]
    extent = int(sch.get(loop).extent)
    width = max(v for v in (16, 8, 4, 2, 1) if extent % v == 0)
    if width > 1:
        sch.vectorize(sch.split(loop, [None, width])[1])


def _crop(plan: Int8Plan, acc_at, out_shape, index_map, epilogue: Epilogue):
    if _epilogue_on_padded_rows(plan, epilogue):
        return _padded_row_output_stage(plan, acc_at, out_shape, index_map, epilogue)
    return output_stage(epilogue, acc_at, out_shape, index_map, plan.shape.out_channels, plan.shape.out_per_group)


def _epilogue_on_padded_rows(plan: Int8Plan, epilogue: Epilogue) -> bool:
    """Whether a quad-window kernel runs its epilogue on whole 16-column vectors of the padded rows
    (``epilogue`` stage) before cropping them (``out``): when the rows are not a multiple of 16
    columns, the out stage alone would run the int64 steps on vectors of 2 (14 columns) or 1 (7)."""
    return plan.window_quads and epilogue.requantize and plan.shape.out_size[1] % WINDOW_QUAD_LANES != 0


def _padded_row_output_stage(plan: Int8Plan, acc_at, out_shape, index_map, epilogue: Epilogue):
    """:func:`~releq_tvm.kernels.epilogue.output_stage`'s result in two stages: the epilogue steps
    (:func:`~releq_tvm.kernels.epilogue.epilogue_value`, the same arithmetic) on every padded column
    ``j < out_w_pad``, then the crop to the output. The padding columns' values are dropped; they read
    the residual at the row's last column (any in-bounds index would do)."""
    s = plan.shape
    ow, og = s.out_size[1], s.out_per_group
    args = epilogue_placeholders(epilogue, s.out_channels, out_shape)
    nhwc = plan.layout == "NHWC"

    def padded(n, c, i, j):
        jj = te.min(j, ow - 1)
        out_index = (n, i, jj, c) if nhwc else (n, c, i, jj)
        return epilogue_value(epilogue, acc_at(n, c // og, i, j, c % og), c, out_index, args)

    rows = te.compute((s.batch, s.out_channels, s.out_size[0], plan.out_w_pad), padded, name="epilogue")
    out = te.compute(tuple(out_shape), lambda *idx: rows[index_map(*idx)], name="out")
    return list(args.values()), out


def int8_conv2d_tensors(plan: Int8Plan, epilogue: Epilogue = PLAIN) -> list[te.Tensor]:
    """``[data (uint8), weights (int8), *epilogue arguments, out]`` of an int8 conv2d."""
    s = plan.shape
    x = te.placeholder(s.input_shape(plan.layout), "uint8", name="data")
    w = te.placeholder(plan.weight_shape, "int8", name="weights")
    extra, out = _crop(plan, _int8_graph(plan, x, w), s.output_shape(plan.layout), output_index_map(plan.layout),
                       epilogue)
    return [x, w, *extra, out]


def int8_dense_tensors(plan: Int8Plan, epilogue: Epilogue = PLAIN) -> list[te.Tensor]:
    """``[data (uint8, (N, K)), weights (int8), *epilogue arguments, out ((N, O))]`` of an int8 dense layer."""
    s = plan.shape
    x2 = te.placeholder((s.batch, s.in_channels), "uint8", name="data")
    x4 = te.compute((s.batch, s.in_channels, 1, 1), lambda n, c, i, j: x2[n, c], name="as_image")
    w = te.placeholder(plan.weight_shape, "int8", name="weights")
    extra, out = _crop(plan, _int8_graph(plan, x4, w), (s.batch, s.out_channels), lambda n, c: (n, c, 0, 0), epilogue)
    return [x2, w, *extra, out]


#: Iterations of a channel/column-mode kernel's parallel loop to aim for: enough to balance a few
#: threads. Each iteration allocates the register tile's accumulator buffer, which is a
#: TVMBackendAllocWorkspace call (a thread-pool lookup and, in the lambda, no ``noalias``) when
#: it is 1 KiB or more (16+ zmm accumulators, TVM's kMaxStackAlloca), so one iteration is a
#: chunk of whole output rows, not one tile.
PARALLEL_MIN_CHUNKS = 16


def _rows_per_chunk(plan: Int8Plan, outer: int) -> int:
    """Output rows per parallel chunk: the most rows (a divisor of the height) that still leave
    :data:`PARALLEL_MIN_CHUNKS` chunks over ``batch * groups * outer`` (the weight tiles) x rows."""
    s = plan.shape
    oh, others = s.out_size[0], s.batch * s.groups * outer
    fits = [d for d in range(1, oh + 1) if oh % d == 0 and others * (oh // d) >= PARALLEL_MIN_CHUNKS]
    return max(fits, default=1)


def schedule_int8(func: tvm.tirx.PrimFunc, plan: Int8Plan) -> tvm.tirx.PrimFunc:
    """Register-tile the int8 product, replace it with ``vpdpbusd``/``vpmaddwd`` (the quad window:
    ``vpermb`` + ``vpdpbusd``) and parallelise the tiles."""
    sch = tvm.s_tir.Schedule(func)
    if has_block(sch, "as_image"):
        sch.compute_inline(sch.get_sblock("as_image"))
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    if plan.mode == "channel":
        n, g, r, c, e = sch.get_loops(sch.get_sblock("pad"))
        if plan.layout == "NCHW":
            sch.reorder(e, c)  # read image rows contiguously (2-3x faster than reading across channels)
    if plan.mode == "column":
        # (column, channel) terms in write order: LLVM vectorises the few channels' interleave
        n, g, r, m = sch.get_loops(sch.get_sblock("pad"))
        sch.split(m, [None, plan.shape.in_per_group])
    if plan.mode != "window":
        rows = plan.shape.batch * plan.shape.groups * int(sch.get(r).extent)
        if plan.parallel and rows >= 4:  # a dense layer's single row is not worth a parallel launch
            sch.parallel(sch.fuse(n, g, r))
    if plan.window_quads:
        n, g, o, i, j, rkh, rb, rk = sch.get_loops(acc)
        io, ii = sch.split(i, [None, plan.row_tile])
        jo, jv, jl = sch.split(j, [None, plan.vec_tile, WINDOW_QUAD_LANES])
        # kernel rows outside the tile's rows: LLVM shares the shuffled activations of an input
        # row among the tile's output rows that read it (stride 1: row i + rkh)
        sch.reorder(n, g, o, io, jo, rkh, rb, ii, jv, jl, rk)
        chunk = sch.fuse(n, g, o, io, jo)
        for loop in (rkh, rb, ii, jv):
            sch.unroll(loop)
        tile_loop, product, first_reduction = chunk, None, rkh
    elif plan.mode == "window":
        n, g, o, i, j, rkh, rkw = sch.get_loops(acc)
        jo, jv, jl = sch.split(j, [None, plan.vec_tile, INT32_LANES])
        sch.reorder(n, g, o, i, jo, rkh, rkw, jv, jl)
        chunk = sch.fuse(n, g, o, i, jo)
        sch.unroll(rkw)
        sch.unroll(jv)
        sch.vectorize(jl)
        tile_loop, product, first_reduction = chunk, None, rkh
    else:
        lanes = plan.lanes
        n, g, i, j, o, rkh, rkw, rp, rk = sch.get_loops(acc)
        jo, ji = sch.split(j, [None, plan.pos_tile])
        oo, os, ov, ol = sch.split(o, [None, plan.tile // (plan.vec_tile * lanes), plan.vec_tile, lanes])
        # output-channel tiles outermost: one tile's weights stay in cache for every position
        reduction = (rkh, rkw, rp)
        if plan.mode == "column":
            # kernel rows innermost: LLVM fully unrolls the short block loop of a column tile,
            # and neighbouring columns' blocks overlap, so it would keep every overlapping
            # broadcast live across the unrolled blocks and spill accumulators
            reduction = (rp, rkh, rkw)
        if plan.parallel:
            # parallel over chunks of whole rows, not over tiles: a tile's accumulator buffer is a
            # TVMBackendAllocWorkspace call per iteration of a parallel loop (_rows_per_chunk)
            io, ii = sch.split(i, [None, _rows_per_chunk(plan, int(sch.get(oo).extent))])
            sch.reorder(n, g, oo, io, ii, jo, os, *reduction, ji, ov, ol, rk)
            chunk = sch.fuse(n, g, oo, io)
        else:
            sch.reorder(n, g, oo, i, jo, os, *reduction, ji, ov, ol, rk)
            chunk = sch.fuse(n, g, oo, i, jo)
        sch.unroll(ji)
        sch.unroll(ov)
        tile_loop, product, first_reduction = os, ol, reduction[0]
    if plan.parallel:
        sch.parallel(chunk)
    if has_block(sch, "epilogue"):  # the quad window's epilogue on padded rows (_padded_row_output_stage)
        staged = sch.get_sblock("epilogue")
        sch.reverse_compute_at(staged, tile_loop)
        sch.vectorize(sch.split(sch.get_loops(staged)[-1], [None, WINDOW_QUAD_LANES])[1])
    sch.reverse_compute_at(out, tile_loop)
    if plan.window_quads:
        _vectorize_row_output(sch, out)
    else:
        vectorize_output(sch, out)
    init = sch.decompose_reduction(acc, first_reduction)
    if plan.window_quads:
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])
        sch.unroll(init_loops[-2])
        sch.unroll(init_loops[-3])
        _replace_with_window_vpdpbusd(sch, sch.blockize(jl), plan)
    if product is not None:
        sch.vectorize(sch.get_loops(init)[-1])
        if plan.dot == 4:
            _replace_with_vpdpbusd(sch, sch.blockize(product), plan.lanes)
        else:
            _replace_with_pmaddwd(sch, sch.blockize(product))
    return sch.mod["main"]


def int8_conv2d_primfunc(shape: ConvShape, layout: str = "NCHW", parallel: bool | None = None,
                         isa: VectorIsa | None = None, epilogue: Epilogue = PLAIN) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weights, out)`` computing an exact int8 conv2d for ``isa``.

    ``isa`` (default: this host's, :func:`vector_isa`) must match the target the function is
    compiled for (``vector_isa(target)``): a VNNI function does not run on a CPU without VNNI.

    * ``data``: uint8 ``(N, C, H, W)`` (NCHW) or ``(N, H, W, C)`` (NHWC);
    * ``weights``: int8 ``int8_weight_shape(shape, isa)[1]`` from :func:`pack_int8_weights` (same ``isa``);
    * the ``epilogue``'s arguments (:func:`releq_tvm.kernels.epilogue.epilogue_placeholders`), if any;
    * ``out``: ``(N, O, OH, OW)`` (NCHW) or ``(N, OH, OW, O)`` (NHWC): the exact int32 sum, or the
      ``epilogue``'s output.
    """
    plan = plan_int8_conv2d(shape, layout, parallel, isa)
    return without_global_symbol(schedule_int8(te.create_prim_func(int8_conv2d_tensors(plan, epilogue)), plan))


def int8_dense_primfunc(shape: DenseShape, parallel: bool | None = None,
                        isa: VectorIsa | None = None, epilogue: Epilogue = PLAIN) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weights, out)``: uint8 ``(N, K)`` x int8-packed weights -> int32 ``(N, O)``.

    ``isa`` and ``epilogue`` as in :func:`int8_conv2d_primfunc`.
    """
    plan = plan_int8_conv2d(dense_as_conv(shape), "NCHW", parallel, isa)
    return without_global_symbol(schedule_int8(te.create_prim_func(int8_dense_tensors(plan, epilogue)), plan))
