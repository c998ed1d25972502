"""Plain int8 conv2d and dense for x86: the "8-bit build" the bit-serial kernels are compared with.

Activations are ``uint8`` in ``[0, 255]``, weights are signed integers in ``[-128, 127]``, and
the output is the exact int32 ``sum q*x``. The inner product is AVX2 ``vpmaddwd`` (16
int16 x int16 products summed in pairs into 8 int32 lanes): activations are widened to int16
once, in the ``pad`` stage, and weights (stored as int8, half the memory traffic of int16)
are sign-extended as they are loaded, so every product is exact. The faster-looking
``vpmaddubsw`` (uint8 x int8) saturates its int16 pair sums (``2 * 255 * 127 > 32767``), so
it is not exact for full-range operands and is not used.

Weight layouts (``int8``, from :func:`pack_int8_weights`):

* ``channel`` (more than one input channel per group, and dense):
  ``(groups, tiles, kh, kw, in_pairs, 2 * tile)``: input channel ``2*p + k`` of output channel
  ``o`` is at ``[g, o // tile, i, j, p, 2 * (o % tile) + k]`` (channels padded with zeros to
  an even count, outputs to ``tiles * tile``; ``tile`` is 8 or 16 int32 lanes);
* ``window`` (one input channel per group: depthwise or a 1-channel image):
  ``(groups, out_per_group, kh, kw)``, vectorised over output columns instead.

Layouts of data and output are as in :mod:`releq_tvm.kernels.bitserial` (NCHW default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from .common import check_layout, dense_as_conv, has_block, input_loader, output_index_map, without_global_symbol
from .encoding import round_up
from .shapes import ConvShape, DenseShape

#: int32 lanes of one AVX2 register: the output-channel vector of the channel mode.
INT32_LANES = 8
#: Work (MACs) below which one core beats two (waking the second thread costs microseconds).
INT8_PARALLEL_MIN_MACS = 2_000_000

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

    def ramp(region, lanes: int):
        idx = [r.min for r in region.region]
        idx[-1] = tirx.Ramp(idx[-1], 1, lanes)
        return idx

    pair = tirx.reinterpret("int32", tirx.BufferLoad(pair_region.source, ramp(pair_region, 2)))
    product = tirx.call_llvm_pure_intrin(
        "int32x8",
        "llvm.x86.avx2.pmadd.wd",
        tirx.reinterpret("int16x16", tirx.Broadcast(pair, 8)),
        tirx.Cast("int16x16", tirx.BufferLoad(w_region.source, ramp(w_region, 16))),
    )
    acc_idx = ramp(acc_region, 8)
    body = tirx.BufferStore(acc_region.source, tirx.BufferLoad(acc_region.source, acc_idx) + product, acc_idx)
    new = tvm.s_tir.SBlock(old.iter_vars, old.reads, old.writes, old.name_hint, body,
                           annotations=old.annotations)
    sch.state.replace(sch.get_sref(block), new, {old: new})


@dataclass(frozen=True)
class Int8Plan:
    """Tiling of one int8 kernel."""

    shape: ConvShape
    layout: str
    mode: str  # "channel" | "window"
    weight_shape: tuple[int, ...]
    pos_tile: int  # output columns per register tile (channel mode)
    vec_tile: int  # AVX2 registers per register tile along the vectorised axis
    out_w_pad: int
    parallel: bool


def int8_weight_shape(shape: ConvShape) -> tuple[str, tuple[int, ...]]:
    """``(mode, packed weight shape)`` of an int8 conv (see the module docstring)."""
    kh, kw = shape.kernel
    og, cg = shape.out_per_group, shape.in_per_group
    if cg == 1:
        return "window", (shape.groups, og, kh, kw)
    tile = 2 * INT32_LANES if round_up(og, INT32_LANES) % (2 * INT32_LANES) == 0 else INT32_LANES
    return "channel", (shape.groups, -(-og // tile), kh, kw, -(-cg // 2), 2 * tile)


def plan_int8_conv2d(shape: ConvShape, layout: str = "NCHW", parallel: bool | None = None) -> Int8Plan:
    """The tiling of an int8 conv2d; ``parallel=None`` uses all cores only for big layers."""
    check_layout(layout)
    mode, wshape = int8_weight_shape(shape)
    ow = shape.out_size[1]
    if mode == "window":
        padded, neg_vec = min((round_up(ow, INT32_LANES * v), -v) for v in (2, 1))
        pos, vec, owp = INT32_LANES * -neg_vec, -neg_vec, padded
    elif layout == "NCHW" and round_up(ow, 8) - ow <= ow // 8:
        # 8 columns x 1 register: each output channel stores 8 neighbouring int32 as one vector
        pos, vec, owp = 8, 1, round_up(ow, 8)
    else:
        vec = wshape[5] // (2 * INT32_LANES)
        pos, owp = 1, ow
        for p in range(8 // vec, 0, -1):
            if (round_up(ow, p) - ow) * 8 <= ow:
                pos, owp = p, round_up(ow, p)
                break
    if parallel is None:
        parallel = shape.macs >= INT8_PARALLEL_MIN_MACS
    return Int8Plan(shape, layout, mode, wshape, pos, vec, owp, bool(parallel))


def pack_int8_weights(q: np.ndarray, groups: int = 1) -> np.ndarray:
    """Lay out int8 weight levels for the int8 kernels (int8 array; see the module docstring).

    ``q``: conv ``(out_channels, in_channels // groups, kh, kw)`` or dense ``(out, in)``, values in
    ``[-128, 127]``.
    """
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
    mode, wshape = int8_weight_shape(ConvShape(cg * groups, o, (kh, kw), (kh, kw), groups=groups))
    og = o // groups
    qg = q.astype(np.int8).reshape(groups, og, cg, kh, kw)
    if mode == "window":
        return np.ascontiguousarray(qg.reshape(wshape))
    tiles, pairs, tile = wshape[1], wshape[4], wshape[5] // 2
    full = np.zeros((groups, tiles * tile, 2 * pairs, kh, kw), dtype=np.int8)
    full[:, :og, :cg] = qg
    # (g, T, t, p, k, kh, kw) -> (g, T, kh, kw, p, t, k) -> (g, T, kh, kw, p, 2*t + k)
    full = full.reshape(groups, tiles, tile, pairs, 2, kh, kw).transpose(0, 1, 5, 6, 3, 2, 4)
    return np.ascontiguousarray(full.reshape(wshape))


def _int8_graph(plan: Int8Plan, x: te.Tensor, w: te.Tensor):
    """``acc_at(n, g, row, col, o)``: the int32 sums of an int8 conv over an NCHW/NHWC input ``x``."""
    s = plan.shape
    (kh, kw), (sh, sw) = s.kernel, s.stride
    oh, owp = s.out_size[0], plan.out_w_pad
    rows, cols = (oh - 1) * sh + kh, (owp - 1) * sw + kw
    load = input_loader(x, s, plan.layout)
    zero = tirx.const(0, "int16")
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    if plan.mode == "window":
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

    cg, tiles, pairs, tile = s.in_per_group, plan.weight_shape[1], plan.weight_shape[4], plan.weight_shape[5] // 2

    def channel_pad(n, g, r, c, e):
        valid, value = load(n, g * cg + te.min(e, cg - 1), r, c)
        if 2 * pairs > cg:
            valid = tirx.all(valid, e < cg)
        return tirx.Select(valid, value.astype("int16"), zero)

    # channels innermost, so one activation pair is one 32-bit broadcast
    pad = te.compute((s.batch, s.groups, rows, cols, 2 * pairs), channel_pad, name="pad")
    rp = te.reduce_axis((0, pairs), name="rp")
    rk = te.reduce_axis((0, 2), name="rk")
    acc = te.compute(
        (s.batch, s.groups, oh, owp, tiles * tile),
        lambda n, g, i, j, o: te.sum(
            pad[n, g, i * sh + rkh, j * sw + rkw, rp * 2 + rk].astype("int32")
            * w[g, o // tile, rkh, rkw, rp, o % tile * 2 + rk].astype("int32"),
            axis=[rkh, rkw, rp, rk],
        ),
        name="acc",
    )
    return lambda n, g, i, j, o: acc[n, g, i, j, o]


def _crop(plan: Int8Plan, acc_at, out_shape, index_map) -> te.Tensor:
    og = plan.shape.out_per_group

    def value(*idx):
        n, oc, i, j = index_map(*idx)
        return acc_at(n, oc // og, i, j, oc % og)

    return te.compute(out_shape, value, name="out")


def int8_conv2d_tensors(plan: Int8Plan) -> list[te.Tensor]:
    """``[data (uint8), weights (int8), out (int32)]`` of an int8 conv2d."""
    s = plan.shape
    x = te.placeholder(s.input_shape(plan.layout), "uint8", name="data")
    w = te.placeholder(plan.weight_shape, "int8", name="weights")
    out = _crop(plan, _int8_graph(plan, x, w), s.output_shape(plan.layout), output_index_map(plan.layout))
    return [x, w, out]


def int8_dense_tensors(plan: Int8Plan) -> list[te.Tensor]:
    """``[data (uint8, (N, K)), weights (int8), out (int32, (N, O))]`` of an int8 dense layer."""
    s = plan.shape
    x2 = te.placeholder((s.batch, s.in_channels), "uint8", name="data")
    x4 = te.compute((s.batch, s.in_channels, 1, 1), lambda n, c, i, j: x2[n, c], name="as_image")
    w = te.placeholder(plan.weight_shape, "int8", name="weights")
    out = _crop(plan, _int8_graph(plan, x4, w), (s.batch, s.out_channels), lambda n, c: (n, c, 0, 0))
    return [x2, w, out]


def schedule_int8(func: tvm.tirx.PrimFunc, plan: Int8Plan) -> tvm.tirx.PrimFunc:
    """Register-tile the int8 product, tensorize it with ``vpmaddwd`` and parallelise the tiles."""
    sch = tvm.s_tir.Schedule(func)
    if has_block(sch, "as_image"):
        sch.compute_inline(sch.get_sblock("as_image"))
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    if plan.mode == "window":
        n, g, o, i, j, rkh, rkw = sch.get_loops(acc)
        jo, jv, jl = sch.split(j, [None, plan.vec_tile, INT32_LANES])
        sch.reorder(n, g, o, i, jo, rkh, rkw, jv, jl)
        chunk = sch.fuse(n, g, o, i, jo)
        sch.unroll(rkw)
        sch.unroll(jv)
        sch.vectorize(jl)
        tile_loop, product = chunk, None
    else:
        n, g, i, j, o, rkh, rkw, rp, rk = sch.get_loops(acc)
        jo, ji = sch.split(j, [None, plan.pos_tile])
        tile = plan.weight_shape[5] // 2
        oo, os, ov, ol = sch.split(o, [None, tile // (plan.vec_tile * INT32_LANES), plan.vec_tile, INT32_LANES])
        # output-channel tiles outermost: one tile's weights stay in cache for every position
        sch.reorder(n, g, oo, i, jo, os, rkh, rkw, rp, ji, ov, ol, rk)
        chunk = sch.fuse(n, g, oo, i, jo)
        sch.unroll(ji)
        sch.unroll(ov)
        tile_loop, product = os, ol
    if plan.parallel:
        sch.parallel(chunk)
    sch.reverse_compute_at(out, tile_loop)
    if plan.layout == "NCHW" and plan.mode == "channel" and plan.pos_tile == 8:
        sch.vectorize(sch.get_loops(out)[-1])  # 8 neighbouring columns of one output channel
    init = sch.decompose_reduction(acc, rkh)
    if product is not None:
        sch.vectorize(sch.get_loops(init)[-1])
        _replace_with_pmaddwd(sch, sch.blockize(product))
    return sch.mod["main"]


def int8_conv2d_primfunc(shape: ConvShape, layout: str = "NCHW", parallel: bool | None = None) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weights, out)`` computing an exact int8 conv2d.

    * ``data``: uint8 ``(N, C, H, W)`` (NCHW) or ``(N, H, W, C)`` (NHWC);
    * ``weights``: int8 ``int8_weight_shape(shape)[1]`` from :func:`pack_int8_weights`;
    * ``out``: int32 ``(N, O, OH, OW)`` (NCHW) or ``(N, OH, OW, O)`` (NHWC).
    """
    plan = plan_int8_conv2d(shape, layout, parallel)
    return without_global_symbol(schedule_int8(te.create_prim_func(int8_conv2d_tensors(plan)), plan))


def int8_dense_primfunc(shape: DenseShape, parallel: bool | None = None) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weights, out)``: uint8 ``(N, K)`` x int8-packed weights -> int32 ``(N, O)``."""
    plan = plan_int8_conv2d(dense_as_conv(shape), "NCHW", parallel)
    return without_global_symbol(schedule_int8(te.create_prim_func(int8_dense_tensors(plan)), plan))
