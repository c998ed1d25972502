"""Bit-serial conv2d and dense for x86: TE compute definitions beside their TensorIR schedules.

Each kernel is one PrimFunc that takes the raw ``uint8`` activations and the weight bit planes
packed ahead of time (:func:`releq_tvm.kernels.encoding.pack_weights`) and returns the exact
int32 sum of ``q * x`` (the encoding and its proof are in :mod:`releq_tvm.kernels.encoding`).

Stages inside a PrimFunc (block names in brackets):

1. ``pad``         zero-pad the activations spatially (and channels to whole bytes/words), uint8;
2. ``pack_bytes``  OR 8 bits of each of the ``a_bits`` planes into a byte (uint8 vector lanes);
3. ``pack``        join 8 bytes into the uint64 words of each plane (the run time half of
   :func:`bitpack`; the weights' half is done once by ``pack_weights``). Folded layouts with
   one word per kernel row, and window layouts of 16 taps or more (``plan.row_stream``),
   instead pack each padded input row once (``rowbits_bytes``, ``rowbits``) and ``pack`` cuts
   every output position's word out of its rows with two shifts and a mask: each input element
   is packed once per plane, not once per kernel tap that reads it (LeNet-5's 1-channel conv1:
   2.85 -> 1.59 us at 1x1 bits). Folded layouts of 16 or more channel slots go further
   (``colbits_chan``, ``colbits``: :func:`_column_bits`): each column's channels are packed at once,
   8 channels per uint64 and one multiply per plane, and ``pack`` ORs ``kw`` shifted columns into
   a word, all along the row in vectors;
4. ``corr``        the offset correction ``-M * sum_c 2^c popcount(X_c)`` per output position;
5. ``acc``         ``corr + s * sum_{b,c} 2^(b+c) popcount(U_b & X_c)`` in int64 registers;
6. ``out``         the int32 cast, cropped to the real output and written in the output layout.

Three packings (see :mod:`releq_tvm.kernels.encoding`): ``channel`` packs input channels along
the word; ``folded`` also packs the kernel columns when a group has at most 32 channels; both
vectorise the inner loop over output channels. ``window`` (one input channel per group:
depthwise, 1-channel images) packs the kernel taps of each output position and vectorises
over output columns. Dense is the channel packing of a 1x1 convolution on a 1x1 image, so
it shares the conv code and schedule.

Activation layouts: ``"NCHW"`` (default, as torch) or ``"NHWC"``; the output uses the same
layout. NHWC stores each register tile of output channels as one vector; NCHW has to
transpose it. Dense takes ``(batch, in_features)`` and returns ``(batch, out_features)``.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

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
from .epilogue import PLAIN, Epilogue, output_stage
from .encoding import (
    WORD_BITS,
    WeightLayout,
    check_bits,
    conv_weight_layout,
    dense_weight_layout,
    round_up,
    weight_scale_offset,
)
from .shapes import ConvShape, DenseShape
from .target import VectorIsa, vector_isa

_bitwise_or = te.comm_reducer(lambda a, b: a | b, lambda dtype: tirx.const(0, dtype), name="bitwise_or")

#: Window layers (one input channel per group) pack rows once (``plan.row_stream``) only from this many
#: kernel taps: on a 3x3 depthwise layer the row packing's few bytes per row vectorise worse than the
#: per-position gather (64 channels of 16x16 at 1x1 bits: 9.5 -> 14.4 us), while a 5x5 window gains
#: (LeNet-5's conv1 2.85 -> 1.59 us; 32 channels of 16x16 at 2x2 bits 70.7 -> 12.9 us; znver4).
ROW_STREAM_MIN_TAPS = 16

#: Work (binary MACs, i.e. MACs * w_bits * a_bits) below which one core beats two: waking the
#: second thread costs a few microseconds, more than a small layer takes.
PARALLEL_MIN_BINARY_MACS = 4_000_000


@dataclass(frozen=True)
class BitserialPlan:
    """Everything the compute and schedule of one bit-serial kernel depend on."""

    shape: ConvShape
    w_bits: int
    a_bits: int
    layout: str
    weights: WeightLayout
    #: Output columns per register tile (channel/folded mode; vectorised over output channels).
    pos_tile: int
    #: Vector registers (``isa.uint64_lanes`` uint64 lanes) per register tile along the vectorised axis.
    vec_tile: int
    #: Output columns computed, padded to a whole number of tiles (the extra ones are dropped).
    out_w_pad: int
    #: Spread the product loop over all cores (one parallel region per call).
    parallel: bool
    #: The target's vector unit the tiles were chosen for.
    isa: VectorIsa
    #: Folded modes with one word per kernel row, and window modes with one word and at least
    #: :data:`ROW_STREAM_MIN_TAPS` taps: pack each input row's bits once and cut every output
    #: position's word out of the rows with shifts (:func:`_row_stream`), instead of gathering its
    #: elements bit by bit.
    row_stream: bool = False

    @property
    def lanes(self) -> int:
        return self.isa.uint64_lanes

    @property
    def mode(self) -> str:
        return self.weights.mode

    @property
    def binary_macs(self) -> int:
        """AND+popcount bit operations of the useful work: MACs * w_bits * a_bits."""
        return self.shape.macs * self.w_bits * self.a_bits


def accumulator_budget(isa: VectorIsa) -> int:
    """Accumulator registers the product loop may keep live without spilling.

    AVX2 (16 ymm): the vpshufb popcount needs 3 constants (nibble mask, table, zero) and 2-3
    temporaries, which leaves 8. AVX-512 (32 zmm, native ``vpopcntq``): the weights of one
    tile (up to 4 registers), the broadcast activation word and a temporary leave 24.
    """
    return 24 if isa.registers >= 32 else 8


def _choose_tiles(mode: str, out_w: int, tile: int, layout: str, isa: VectorIsa) -> tuple[int, int, int]:
    """(pos_tile, vec_tile, out_w_pad) keeping at most :func:`accumulator_budget` accumulators live.

    For NCHW output, 8 columns x 1 register is preferred when the row is wide enough and the
    tile is one register: each output channel then stores 8 neighbouring int32 as one vector
    instead of 8 scalars. Otherwise the widest tile of at least half the budget that divides
    the row: padded columns cost more than their share (side by side, one thread, znver4, 2x2
    bits: ResNet-20's 16->16 on 32x32 26.3 -> 21.3 us with 8 columns instead of 12, its
    32->32 on 16x16 21.4 -> 16.1 us with 4 instead of 6, its 16->32 stride 2 17.1 -> 13.2 us).
    """
    lanes, budget = isa.uint64_lanes, accumulator_budget(isa)
    if mode == "window":  # vectorised over output columns
        padded, neg_vec = min((round_up(out_w, lanes * v), -v) for v in (4, 2, 1))
        return lanes * -neg_vec, -neg_vec, padded
    vec = tile // lanes
    if layout == "NCHW" and vec == 1 and round_up(out_w, 8) - out_w <= out_w // 8:
        return 8, 1, round_up(out_w, 8)
    most = min(budget // vec, 16)
    for pos in range(most, (most - 1) // 2, -1):  # a tile that divides the row: no column wasted
        if out_w % pos == 0:
            return pos, vec, out_w
    for pos in range(most, 0, -1):
        padded = round_up(out_w, pos)
        if (padded - out_w) * 8 <= out_w:  # at most 1/8 of the columns wasted
            return pos, vec, padded
    return 1, vec, out_w


def plan_conv2d(shape: ConvShape, w_bits: int, a_bits: int, layout: str = "NCHW",
                parallel: bool | None = None, isa: VectorIsa | None = None,
                pos_tile: int | None = None) -> BitserialPlan:
    """The tiling of a bit-serial conv2d for ``isa`` (default: this host's, :func:`vector_isa`);
    ``parallel=None`` uses all cores only for big layers.

    ``pos_tile`` overrides the output columns per register tile (channel and folded modes; the
    register tile is then ``pos_tile`` x the weight tile's registers, so keep it within
    :func:`accumulator_budget` or the accumulators spill).
    """
    check_layout(layout)
    isa = isa or vector_isa()
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    weights = conv_weight_layout(shape, w_bits, isa.uint64_lanes)
    pos, vec, ow_pad = _choose_tiles(weights.mode, shape.out_size[1], weights.tile, layout, isa)
    if pos_tile is not None:
        if weights.mode == "window" or int(pos_tile) < 1:
            raise ValueError(f"pos_tile must be a positive column count, and only channel/folded layouts take one "
                             f"(this layer packs {weights.mode!r}); got {pos_tile!r}")
        pos, ow_pad = int(pos_tile), round_up(shape.out_size[1], int(pos_tile))
    if parallel is None:
        parallel = shape.macs * w_bits * a_bits >= PARALLEL_MIN_BINARY_MACS
    kh, kw = shape.kernel
    row_stream = weights.words == 1 and (
        weights.mode == "folded" or (weights.mode == "window" and kh * kw >= ROW_STREAM_MIN_TAPS))
    return BitserialPlan(shape, w_bits, a_bits, layout, weights, pos, vec, ow_pad, bool(parallel), isa, row_stream)


def plan_dense(shape: DenseShape, w_bits: int, a_bits: int, parallel: bool | None = None,
               isa: VectorIsa | None = None) -> BitserialPlan:
    """The tiling of a bit-serial dense layer (a 1x1 conv on a 1x1 image)."""
    isa = isa or vector_isa()
    plan = plan_conv2d(dense_as_conv(shape), w_bits, a_bits, "NCHW", parallel, isa)
    assert plan.weights.shape == dense_weight_layout(shape, w_bits, isa.uint64_lanes).shape
    return plan


# --------------------------------------------------------------------------------------------
# compute


def _pack_words(shape: list[int], word_axis: int, width: int, element, name: str) -> tuple[te.Tensor, te.Tensor]:
    """uint64 words: ``out[..., w, plane, ...]`` has bit ``j < width`` = bit ``plane`` of ``element(idx, j)``.

    ``shape[word_axis]`` counts words and ``shape[word_axis + 1]`` bit planes; ``element`` maps
    the output index and the bit position to an unsigned integer expression, and must give 0
    for ``width <= j < round_up(width, 8)``. Two stages: ``<name>_bytes`` ORs 8 bits into each
    byte with uint8 vector lanes (8 bits per lane per op instead of 1 per uint64 lane), then
    ``<name>`` joins a word's bytes. Returns ``(bytes, words)``.
    """
    nbytes = -(-width // 8)
    jj = te.reduce_axis((0, 8), name="jj")
    byte_shape = shape[: word_axis + 2] + [nbytes] + shape[word_axis + 2:]

    def byte(*idx):
        k, plane = idx[word_axis + 2], idx[word_axis + 1]
        word_idx = idx[: word_axis + 2] + idx[word_axis + 3:]
        value = element(word_idx, k * 8 + jj) if nbytes > 1 else element(word_idx, jj)
        bit = (value.astype("uint8") >> plane.astype("uint8")) & tirx.const(1, "uint8")
        return _bitwise_or(bit << jj.var.astype("uint8"), axis=jj)

    packed_bytes = te.compute(byte_shape, byte, name=name + "_bytes", tag="bitpack")
    k = te.reduce_axis((0, nbytes), name="k")

    def word(*idx):
        src = idx[: word_axis + 2] + (k,) + idx[word_axis + 2:]
        return _bitwise_or(packed_bytes[src].astype("uint64") << (k.var * 8).astype("uint64"), axis=k)

    return packed_bytes, te.compute(shape, word, name=name, tag="bitpack")


def _row_stream(element, batch: int, groups: int, rows: int, length: int, a_bits: int) -> te.Tensor:
    """uint64 ``(N, G, rows, words, a_bits)``: the bits of every input row, packed once per plane.

    Bit ``e`` of a row (bit ``e % 64`` of word ``e // 64``) is bit ``plane`` of ``element(n, g, r, e)``
    for ``e < length`` and 0 past it. A row longer than one word gets one more (zero) word, so
    :func:`_cut` may read the word after any start. Block names: ``rowbits_bytes``, ``rowbits``.
    """
    words = -(-length // WORD_BITS)
    words += words > 1
    ragged = words * WORD_BITS > length if words > 1 else length % 8 != 0

    def bit_element(idx, j):
        n, g, r, word, _ = idx
        e = word * WORD_BITS + j if words > 1 else j
        if ragged:  # clamped so the load stays in bounds, then masked
            return tirx.Select(e < length, element(n, g, r, te.min(e, length - 1)), tirx.const(0, "uint8"))
        return element(n, g, r, e)

    shape = [batch, groups, rows, words, a_bits]
    return _pack_words(shape, 3, min(length, WORD_BITS), bit_element, "rowbits")[1]


#: Folded layouts of at least this many channel slots pack each column's channels at once
#: (:func:`_column_bits`) instead of bit by bit (:func:`_row_stream`, or the per-position gather
#: when a kernel row takes more than one word). Side by side, one thread, znver4: ResNet-20's
#: 16-channel 3x3 on 32x32 1.57x faster at 1x1 bits, 1.25x at 2x2, 1.13x at 2x3; its 32-channel
#: 3x3 (two words per row) 1.04-1.22x; at 8 slots (LeNet-5's conv2, 6 channels) no gain
#: (0.88-1.08x), so not there.
COLUMN_BITS_MIN_SLOT = 16

#: Bit ``p`` of each byte of a uint64, gathered into one byte: ``((v >> p) & LOW) * GATHER >> 56``
#: (the eight products land on distinct bits, so nothing carries; byte ``k``'s bit becomes bit ``k``).
_BYTE_BITS_LOW, _BYTE_BITS_GATHER = 0x0101010101010101, 0x0102040810204080


def _column_bits(pad: te.Tensor, slot: int, a_bits: int) -> te.Tensor:
    """uint64 ``(N, G, rows, a_bits, cols)``: bit ``ch`` of ``[..., plane, c]`` is bit ``plane`` of
    channel ``ch`` at column ``c`` of ``pad`` ``(N, G, rows, slot, cols)`` (``slot`` a multiple of 8).

    Without gathers: ``colbits_chan`` joins 8 channels of a column into a uint64 (contiguous loads
    along the row), and ``colbits`` takes each plane's bit of those 8 bytes with one multiply; both
    vectorise along the row. A folded word is then the columns it holds (``64 // slot``, at most
    ``kw``) shifted together (the bit-by-bit gather of :func:`_row_stream` took 80 % of a 16-channel 3x3 layer).
    """
    batch, groups, rows, cols = (int(pad.shape[i]) for i in (0, 1, 2, 4))
    u64 = lambda value: tirx.const(value, "uint64")  # noqa: E731
    chans = te.compute(
        (batch, groups, rows, slot // 8, cols),
        lambda n, g, r, cw, c: functools.reduce(operator.or_, (
            pad[n, g, r, cw * 8 + k, c].astype("uint64") << u64(8 * k) for k in range(8))),
        name="colbits_chan",
    )

    def column(n, g, r, p, c):
        return functools.reduce(operator.or_, (
            ((((chans[n, g, r, cw, c] >> p.astype("uint64")) & u64(_BYTE_BITS_LOW)) * u64(_BYTE_BITS_GATHER))
             >> u64(56)) << u64(8 * cw) for cw in range(slot // 8)))

    return te.compute((batch, groups, rows, a_bits, cols), column, name="colbits")


def _cut(stream: te.Tensor, n, g, plane, r, start, width: int) -> tvm.tirx.PrimExpr:
    """Bits ``start .. start + width - 1`` of row ``r`` of a :func:`_row_stream`, as the low bits of a uint64."""
    u64 = lambda value: tirx.const(value, "uint64")  # noqa: E731
    if int(stream.shape[3]) == 1:
        value = stream[n, g, r, 0, plane] >> start.astype("uint64")
    else:
        word, offset = start // WORD_BITS, start % WORD_BITS
        # the next word's low bits moved up: (<< 1) << (63 - offset) is << (64 - offset), defined at
        # offset 0; 63 ^ offset is 63 - offset without a subtraction the vectoriser would make a uint ramp of
        high = (stream[n, g, r, word + 1, plane] << u64(1)) << (offset ^ (WORD_BITS - 1)).astype("uint64")
        value = (stream[n, g, r, word, plane] >> offset.astype("uint64")) | high
    return value if width == WORD_BITS else value & u64((1 << width) - 1)


def bitpack(data: te.Tensor, bits: int, pack_axis: int, name: str = "pack") -> te.Tensor:
    """Pack the low ``bits`` bit planes of an unsigned integer tensor along ``pack_axis``.

    Returns a uint64 tensor shaped like ``data`` with ``pack_axis`` (length ``n``) replaced by
    ``ceil(n / 64)`` words followed by a new plane axis of length ``bits``: bit ``j`` of word
    ``w`` of plane ``b`` is bit ``b`` of element ``64*w + j``; elements past ``n`` read as 0.
    """
    shape = [int(s) for s in data.shape]
    n = shape[pack_axis]
    words = -(-n // WORD_BITS)
    width = min(n, WORD_BITS)
    ragged = words * WORD_BITS > n if words > 1 else width % 8 != 0

    def element(idx, j):
        pos = idx[pack_axis] * WORD_BITS + j if words > 1 else j
        src = list(idx[:pack_axis]) + [pos] + list(idx[pack_axis + 2:])
        if ragged:
            src[pack_axis] = te.min(pos, n - 1)  # clamped so the masked load stays in bounds
            return tirx.Select(pos < n, data[tuple(src)], tirx.const(0, data.dtype))
        return data[tuple(src)]

    out_shape = shape[:pack_axis] + [words, bits] + shape[pack_axis + 1:]
    return _pack_words(out_shape, pack_axis, width, element, name)[1]


def bitpack_primfunc(data_shape: tuple[int, ...], bits: int, pack_axis: int) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, packed)`` running :func:`bitpack` on its own.

    ``data``: uint8 ``data_shape``; ``packed``: uint64, ``data_shape`` with ``pack_axis``
    replaced by ``(ceil(n / 64), bits)``. The kernels fuse the same compute into their first
    stage; this standalone form packs activations once and lets tests check the bit order.
    """
    bits = check_bits(bits, "bits")
    data = te.placeholder(tuple(data_shape), "uint8", name="data")
    packed = bitpack(data, bits, pack_axis, name="packed")
    sch = tvm.s_tir.Schedule(te.create_prim_func([data, packed]))
    lanes = 16 if pack_axis != len(data_shape) - 1 and int(data_shape[-1]) % 16 == 0 else 1
    _schedule_pack(sch, "packed", lanes, None)
    return without_global_symbol(sch.mod["main"])


def _schedule_pack(sch, name: str, byte_lanes: int, decompose_later: list) -> None:
    """Vectorise the two packing stages over their innermost spatial axis (``byte_lanes`` wide).

    With ``byte_lanes == 1`` (the innermost axis is the packed one) the loops stay scalar.
    Reductions whose init must wait (blocks under a loop that is parallelised later) are
    appended to ``decompose_later``; the others are decomposed here.
    """
    for block_name, lanes in ((name + "_bytes", byte_lanes), (name, min(byte_lanes, WORD_JOIN_LANES))):
        block = sch.get_sblock(block_name)
        *spatial, red = sch.get_loops(block)
        if lanes > 1:
            outer, inner = sch.split(spatial[-1], [None, lanes])
            sch.reorder(outer, red, inner)
            sch.vectorize(inner)
        sch.unroll(red)
        if decompose_later is None:
            sch.decompose_reduction(block, red)
        else:
            decompose_later.append((block, red))


def _schedule_row_stream(sch) -> None:
    """The :func:`_row_stream` stages: bytes vectorised along the row, words joined in registers
    (or :func:`_column_bits`'s and the words cut from them, each vectorised along the row)."""
    if has_block(sch, "colbits"):  # _column_bits, and the words made of its columns
        for name in ("colbits_chan", "colbits", "pack"):
            *_, col = sch.get_loops(sch.get_sblock(name))
            sch.vectorize(sch.split(col, [None, 8])[1])
        return
    bytes_block = sch.get_sblock("rowbits_bytes")
    *_, byte, bit = sch.get_loops(bytes_block)
    sch.reorder(bit, byte)
    if int(sch.get(byte).extent) > 1:
        sch.vectorize(byte)
    sch.unroll(bit)
    sch.decompose_reduction(bytes_block, bit)
    words_block = sch.get_sblock("rowbits")
    *_, k = sch.get_loops(words_block)
    sch.unroll(k)
    sch.decompose_reduction(words_block, k)


def _weighted_popcount(word, shift) -> tvm.tirx.PrimExpr:
    return tirx.popcount(word).astype("int64") << tirx.Cast("int64", shift)


#: Byte lanes of the first packing stage (one SSE register of uint8).
PACK_LANES = 16
#: uint64 lanes of the second packing stage (joining a word's 8 bytes).
WORD_JOIN_LANES = 8


def _conv_graph(plan: BitserialPlan, x: te.Tensor, w: te.Tensor):
    """The int64 sum ``s*sum(u*x) - M*sum(x)`` of a bit-serial conv, before the int32 cast.

    Returns ``(total, total_at)``: ``total`` is ``corr + acc`` (the correction per output
    position plus the bit-serial product) and ``total_at(n, g, row, col, o)`` reads it.
    """
    s = plan.shape
    wl = plan.weights
    (kh, kw), (sh, sw) = s.kernel, s.stride
    oh, owp = s.out_size[0], plan.out_w_pad
    rows = (oh - 1) * sh + kh
    scale, offset = weight_scale_offset(plan.w_bits)
    scale_shift = scale.bit_length() - 1  # s is 1 or 2
    load = input_loader(x, s, plan.layout)
    zero8 = tirx.const(0, "uint8")
    rb = te.reduce_axis((0, plan.w_bits), name="rb")
    rc = te.reduce_axis((0, plan.a_bits), name="rc")

    if wl.mode == "window":
        taps, twords = kh * kw, wl.words
        cols = round_up((owp - 1) * sw + kw, PACK_LANES)  # whole vectors for the pad loop
        pad = te.compute(
            (s.batch, s.groups, rows, cols),
            lambda n, g, r, c: tirx.Select(*load(n, g, r, c), zero8),
            name="pad",
        )

        def tap_element(idx, j):
            n, g, word, _, i, c = idx
            t = word * WORD_BITS + j if twords > 1 else j
            value = pad[n, g, i * sh + te.min(t // kw, kh - 1), c * sw + t % kw]
            ragged = twords * WORD_BITS > taps if twords > 1 else taps % 8 != 0
            return tirx.Select(t < taps, value, zero8) if ragged else value

        shape = [s.batch, s.groups, twords, plan.a_bits, oh, owp]
        if plan.row_stream:  # the taps' word is kh cuts of kw bits from the packed rows
            stream = _row_stream(lambda n, g, r, e: pad[n, g, r, e], s.batch, s.groups, rows,
                                 (owp - 1) * sw + kw, plan.a_bits)

            def window_word(n, g, word, plane, i, j):
                cuts = (_cut(stream, n, g, plane, i * sh + ki, j * sw, kw) for ki in range(kh))
                return functools.reduce(operator.or_, (cut << tirx.const(ki * kw, "uint64") if ki else cut
                                                       for ki, cut in enumerate(cuts)))

            pack = te.compute(shape, window_word, name="pack")
        else:
            pack = _pack_words(shape, 2, min(taps, WORD_BITS), tap_element, "pack")[1]
        rt = te.reduce_axis((0, twords), name="rt")
        acc = te.compute(
            (s.batch, s.groups, s.out_per_group, oh, owp),
            lambda n, g, o, i, j: te.sum(
                _weighted_popcount(w[g, o, rt, rb] & pack[n, g, rt, rc, i, j], rb + rc + scale_shift),
                axis=[rt, rb, rc],
            ),
            name="acc",
        )
        st = te.reduce_axis((0, twords), name="st")
        sc = te.reduce_axis((0, plan.a_bits), name="sc")
        corr = te.compute(
            (s.batch, s.groups, oh, owp),
            lambda n, g, i, j: te.sum(-offset * _weighted_popcount(pack[n, g, st, sc, i, j], sc), axis=[st, sc]),
            name="corr",
        )
        total = te.compute(acc.shape, lambda n, g, o, i, j: corr[n, g, i, j] + acc[n, g, o, i, j], name="total")
        return total, (lambda n, g, i, j, o: total[n, g, o, i, j])

    # channel / folded: the reduction element e of a word is channel e % slot at kernel column e // slot
    cg, words, slot, kcols = s.in_per_group, wl.words, wl.slot, wl.kernel_cols
    column_bits = wl.mode == "folded" and slot >= COLUMN_BITS_MIN_SLOT
    if wl.mode == "channel":
        # a single word packs round_up(cg, 8) channels (whole bytes), the extra ones zero
        channels = round_up(cg, 8) if words == 1 else words * WORD_BITS
        cols, col_stride = (owp - 1) * sw + kw, sw
    elif plan.row_stream or column_bits:
        # each row's (column, channel) bits packed once; a word is kw * slot of them (per word)
        channels, cols, col_stride = slot, (owp - 1) * sw + kw, 1
    else:
        # the pad stage stays input-sized (slot channels); the pack stage gathers each word's
        # kernel columns from it (an im2col along the row, done while packing)
        channels, width = slot, (kw * slot if words == 1 else WORD_BITS)
        last_col = (round_up(width, 8) - 1) // slot if words == 1 else words * (WORD_BITS // slot) - 1
        out_cols = round_up(owp, PACK_LANES)
        cols, col_stride = (out_cols - 1) * sw + max(kw - 1, last_col) + 1, 1
    cols = round_up(cols, PACK_LANES)  # whole vectors for the pad and pack loops

    def pad_value(n, g, r, ch, c):
        valid, value = load(n, g * cg + te.min(ch, cg - 1), r, c)
        if channels > cg:
            valid = tirx.all(valid, ch < cg)
        return tirx.Select(valid, value, zero8)

    pad = te.compute((s.batch, s.groups, rows, channels, cols), pad_value, name="pad")
    if wl.mode == "channel":
        pack = bitpack(pad, plan.a_bits, pack_axis=3)  # (N, G, rows, words, a_bits, cols)
    elif column_bits:  # whole bytes of channels: each column's bits at once, a word is the next columns
        colbits = _column_bits(pad, slot, plan.a_bits)
        per_word = WORD_BITS // slot

        def column_word(n, g, r, word, plane, j):
            parts = []
            for i in range(per_word):  # kernel column word * per_word + i, none past the kernel
                kc = word * per_word + i if words > 1 else i
                if i >= kw:
                    break
                part = colbits[n, g, r, plane, j * sw + te.min(kc, kw - 1)] << tirx.const(slot * i, "uint64")
                parts.append(tirx.Select(kc < kw, part, tirx.const(0, "uint64")) if words * per_word > kw else part)
            return functools.reduce(operator.or_, parts)

        pack = te.compute((s.batch, s.groups, rows, words, plan.a_bits, owp), column_word, name="pack")
    elif plan.row_stream:
        stream = _row_stream(lambda n, g, r, e: pad[n, g, r, e % slot, e // slot], s.batch, s.groups, rows,
                             ((owp - 1) * sw + kw) * slot, plan.a_bits)
        pack = te.compute(
            (s.batch, s.groups, rows, 1, plan.a_bits, owp),
            lambda n, g, r, word, plane, j: _cut(stream, n, g, plane, r, j * sw * slot, kw * slot),
            name="pack",
        )
    else:

        def folded_element(idx, j):
            n, g, r, word, _, c = idx
            e = word * WORD_BITS + j if words > 1 else j
            value = pad[n, g, r, e % slot, c * sw + e // slot]
            if (last_col + 1) > kw:  # spare bits past the kernel hold neighbours, not zeros
                value = tirx.Select(e // slot < kw, value, zero8)
            return value

        shape = [s.batch, s.groups, rows, words, plan.a_bits, out_cols]
        pack = _pack_words(shape, 3, width, folded_element, "pack")[1]
    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kcols), name="rkw")
    rw = te.reduce_axis((0, words), name="rw")
    acc = te.compute(
        (s.batch, s.groups, oh, owp, wl.out_pad),
        lambda n, g, i, j, o: te.sum(
            _weighted_popcount(
                w[g, o // wl.tile, rkh, rkw, rw, rb, o % wl.tile]
                & pack[n, g, i * sh + rkh, rw, rc, j * col_stride + rkw],
                rb + rc + scale_shift,
            ),
            axis=[rkh, rkw, rw, rb, rc],
        ),
        name="acc",
    )
    skh = te.reduce_axis((0, kh), name="skh")
    skw = te.reduce_axis((0, kcols), name="skw")
    sw_ = te.reduce_axis((0, words), name="sw")
    sc = te.reduce_axis((0, plan.a_bits), name="sc")
    corr = te.compute(
        (s.batch, s.groups, oh, owp),
        lambda n, g, i, j: te.sum(
            -offset * _weighted_popcount(pack[n, g, i * sh + skh, sw_, sc, j * col_stride + skw], sc),
            axis=[skh, skw, sw_, sc],
        ),
        name="corr",
    )
    total = te.compute(acc.shape, lambda n, g, i, j, o: corr[n, g, i, j] + acc[n, g, i, j, o], name="total")
    return total, (lambda n, g, i, j, o: total[n, g, i, j, o])


def _output_stage(plan: BitserialPlan, total_at, out_shape, index_map, epilogue: Epilogue):
    return output_stage(epilogue, total_at, out_shape, index_map, plan.shape.out_channels, plan.shape.out_per_group)


def conv2d_tensors(plan: BitserialPlan, epilogue: Epilogue = PLAIN) -> list[te.Tensor]:
    """``[data (uint8), weight_planes (uint64), *epilogue arguments, out]`` of a bit-serial conv2d."""
    s = plan.shape
    x = te.placeholder(s.input_shape(plan.layout), "uint8", name="data")
    w = te.placeholder(plan.weights.shape, "uint64", name="weight_planes")
    _, total_at = _conv_graph(plan, x, w)
    extra, out = _output_stage(plan, total_at, s.output_shape(plan.layout), output_index_map(plan.layout), epilogue)
    return [x, w, *extra, out]


def dense_tensors(plan: BitserialPlan, epilogue: Epilogue = PLAIN) -> list[te.Tensor]:
    """``[data (uint8, (N, K)), weight_planes (uint64), *epilogue arguments, out ((N, O))]`` of a bit-serial dense."""
    s = plan.shape
    x2 = te.placeholder((s.batch, s.in_channels), "uint8", name="data")
    # the (N, K) input seen as an NCHW 1x1 image; the view is inlined into the pad stage
    x4 = te.compute((s.batch, s.in_channels, 1, 1), lambda n, c, i, j: x2[n, c], name="as_image")
    w = te.placeholder(plan.weights.shape, "uint64", name="weight_planes")
    _, total_at = _conv_graph(plan, x4, w)
    extra, out = _output_stage(plan, total_at, (s.batch, s.out_channels), lambda n, c: (n, c, 0, 0), epilogue)
    return [x2, w, *extra, out]


# --------------------------------------------------------------------------------------------
# schedule


def _vectorize_innermost_spatial(sch, block, lanes: int, reduce_count: int):
    """Split the innermost spatial loop by ``lanes``, move the reductions outside it, vectorise."""
    loops = sch.get_loops(block)
    spatial, reduce = loops[: len(loops) - reduce_count], loops[len(loops) - reduce_count:]
    outer, inner = sch.split(spatial[-1], [None, lanes])
    sch.reorder(outer, *reduce, inner)
    sch.vectorize(inner)
    return outer, reduce, inner


def schedule_bitserial(func: tvm.tirx.PrimFunc, plan: BitserialPlan) -> tvm.tirx.PrimFunc:
    """Tile, vectorise and parallelise a PrimFunc made by :func:`conv2d_tensors` / :func:`dense_tensors`.

    The product loop is register-tiled (``plan.pos_tile`` x ``plan.vec_tile`` vectors of
    ``plan.lanes`` int64 accumulators), the bit-plane loops are unrolled so every shift is a constant, and the
    correction ``corr`` becomes the reduction's initial value (``fuse_reduction_epilogue``), so
    one register tile is finished and stored as int32 before the next starts. All work that
    scales with output channels runs in a single parallel loop.
    """
    sch = tvm.s_tir.Schedule(func)
    if has_block(sch, "as_image"):
        sch.compute_inline(sch.get_sblock("as_image"))
    sch.fuse_reduction_epilogue(sch.get_sblock("acc"), sch.get_sblock("total"))
    acc, out, corr, pad = (sch.get_sblock(name) for name in ("acc", "out", "corr", "pad"))
    pad_loops = sch.get_loops(pad)
    _, col_i = sch.split(pad_loops[-1], [None, PACK_LANES])
    sch.vectorize(col_i)

    if plan.mode == "window":
        n, g, o, i, j, rt, rb, rc = sch.get_loops(acc)
        jo, jv, jl = sch.split(j, [None, plan.vec_tile, plan.lanes])
        sch.reorder(n, g, i, o, jo, rt, rb, rc, jv, jl)
        chunk = sch.fuse(n, g, i)
        # the taps of one output row are packed by the thread that multiplies them
        sch.compute_at(corr, chunk, preserve_unit_loops=True)
        sch.compute_at(sch.get_sblock("pack"), chunk, preserve_unit_loops=True)
        # parallel() needs whole reduction blocks below it, so their inits are split off last
        decompose_last: list = []
        if plan.row_stream:  # rows packed once by the calling thread; the cuts per output row
            _schedule_row_stream(sch)
            *_, cut_cols = sch.get_loops(sch.get_sblock("pack"))
            sch.vectorize(sch.split(cut_cols, [None, plan.lanes])[1])
        else:
            sch.compute_at(sch.get_sblock("pack_bytes"), chunk, preserve_unit_loops=True)
            byte_lanes = max(v for v in (16, 8, 4) if plan.out_w_pad % v == 0)
            _schedule_pack(sch, "pack", byte_lanes, decompose_last)
        _, (st, _), _ = _vectorize_innermost_spatial(sch, corr, plan.lanes, 2)
        decompose_last.append((corr, st))
        tile_loop, first_reduce, unrolled, lanes = jo, rt, (rb, rc, jv), jl
    else:
        # pack the whole input once, on the calling thread (a few % of the work)
        if plan.row_stream or has_block(sch, "colbits"):
            _schedule_row_stream(sch)
        else:
            _schedule_pack(sch, "pack", PACK_LANES, None)
        decompose_last = []
        n, g, i, j, o, rkh, rkw, rw, rb, rc = sch.get_loops(acc)
        jo, ji = sch.split(j, [None, plan.pos_tile])
        tile = plan.weights.tile
        oo, os, ov, ol = sch.split(o, [None, tile // (plan.vec_tile * plan.lanes), plan.vec_tile, plan.lanes])
        # output-channel tiles outermost: one tile's weights stay in cache for every position
        sch.reorder(n, g, oo, i, jo, os, rkh, rkw, rw, rb, rc, ji, ov, ol)
        chunk = sch.fuse(n, g, oo, i, jo)
        tile_loop, first_reduce, unrolled, lanes = os, rkh, (rb, rc, ji, ov), ol

    if plan.parallel:
        sch.parallel(chunk)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(lanes)
    sch.reverse_compute_at(out, tile_loop)
    vectorize_output(sch, out)
    sch.decompose_reduction(acc, first_reduce)
    for block, loop in decompose_last:
        sch.decompose_reduction(block, loop)
    return sch.mod["main"]


def bitserial_conv2d_primfunc(shape: ConvShape, w_bits: int, a_bits: int, layout: str = "NCHW",
                              parallel: bool | None = None, isa: VectorIsa | None = None,
                              epilogue: Epilogue = PLAIN, pos_tile: int | None = None) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weight_planes, out)`` computing a bit-serial conv2d.

    Arguments (destination-passing, as ``relax.call_tir`` expects):

    * ``data``: uint8 ``(N, C, H, W)`` (NCHW) or ``(N, H, W, C)`` (NHWC), values in
      ``[0, 2^a_bits - 1]`` (only the low ``a_bits`` bits are read);
    * ``weight_planes``: uint64 ``conv_weight_layout(shape, w_bits, isa.uint64_lanes).shape``
      from :func:`pack_weights` with the same lanes;
    * the ``epilogue``'s arguments (:func:`releq_tvm.kernels.epilogue.epilogue_placeholders`), if any;
    * ``out``: ``(N, O, OH, OW)`` (NCHW) or ``(N, OH, OW, O)`` (NHWC): the exact ``sum q*x`` as int32
      (the default epilogue), or what the ``epilogue`` makes of it (int32, or uint8 levels).

    The function carries no ``global_symbol``: name it when adding it to a module
    (``relax.BlockBuilder.add_func(func, "conv3")``) or with
    ``func.with_attr("global_symbol", name)`` before building it alone.
    """
    plan = plan_conv2d(shape, w_bits, a_bits, layout, parallel, isa, pos_tile)
    return without_global_symbol(schedule_bitserial(te.create_prim_func(conv2d_tensors(plan, epilogue)), plan))


def bitserial_dense_primfunc(shape: DenseShape, w_bits: int, a_bits: int,
                             parallel: bool | None = None, isa: VectorIsa | None = None,
                             epilogue: Epilogue = PLAIN) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weight_planes, out)`` computing a bit-serial dense layer.

    * ``data``: uint8 ``(N, in_features)`` in ``[0, 2^a_bits - 1]``;
    * ``weight_planes``: uint64 ``dense_weight_layout(shape, w_bits, isa.uint64_lanes).shape`` from
      :func:`pack_weights` with the same lanes;
    * the ``epilogue``'s arguments, if any;
    * ``out``: ``(N, out_features)``, the exact ``x @ q.T`` as int32, or the ``epilogue``'s output.

    No ``global_symbol``, as for :func:`bitserial_conv2d_primfunc`.
    """
    plan = plan_dense(shape, w_bits, a_bits, parallel, isa)
    return without_global_symbol(schedule_bitserial(te.create_prim_func(dense_tensors(plan, epilogue)), plan))
