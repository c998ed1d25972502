r"""Lookup-table dense kernels (T-MAC style) for 1-4 bit weights and 8-bit activations, and the
unpack method that multiplies the packed codes directly where ``vpdpbusd`` makes that faster.

``y[n, o] = sum_k x[n, k] * q[o, k]`` with ``x`` uint8 levels and ``q`` signed ``w_bits`` levels in
the bit-serial encoding of :mod:`releq_tvm.kernels.encoding` (``q = s*u - M``, ``u`` unsigned
with bit planes ``u_p``)::

    sum_k q*x = s * sum_p 2^p * sum_k u_p[k] * x[k]  -  M * sum_k x[k]

Tables
------
The reduction is cut into groups of :data:`GROUP` = 4 activations. For each group ``t`` and each
4-bit pattern ``e`` the table entry ``T_t[e] = sum_{i<4} bit_i(e) * x[4t + i]`` is the sum of the
activations ``e`` selects, so ``sum_{k in group t} u_p[k] * x[k] = T_t[e]`` with ``e`` the 4 bits of
plane ``p`` over the group: one lookup replaces 4 multiply-adds, and every plane of every output
channel indexes the same 16 entries. An entry reaches ``4 * 255 = 1020``: no byte holds it, and
a byte table (what ``vpshufb`` looks up) must stay exact, so each activation is split into its
two nibbles ``x = lo + 16*hi`` and each group gets two byte tables, ``T_lo`` and ``T_hi`` (sums
of the low / high nibbles, at most ``4 * 15 = 60``): ``T_t = T_lo_t + 16 * T_hi_t``, exactly.

Accumulation (why it stays exact)
---------------------------------
On the vpshufb paths the four groups of a *block* (:data:`BLOCK` = 16 activations) are summed in
uint8 lanes: at most ``4 * 60 = 240``. The block's byte sums are widened into uint16 lanes with ``vpmaddubsw``
(uint8 x int8 pairs summed into int16) against constant weights ``[2^p, 0]`` / ``[0, 2^p]`` (low
nibbles) and ``[2^(p+4), 0]`` / ``[0, 2^(p+4)]`` (high nibbles): one instruction widens the
even (odd) bytes, weights them by the plane and never saturates (``240 * 64 < 2^15``; the one
weight that does not fit an int8, ``2^7`` for plane 3's high nibbles, is applied as ``64`` twice).
A block adds at most ``4080 * u_max`` to a uint16 lane (``u_max = 2^w - 2`` is the largest code,
1 at 1 bit), so :func:`flush_blocks` blocks (16, 8, 2, 1 at 1..4 bits) fit before the lanes are
added into int32 accumulators. The offset term ``-M * sum x`` is added once per output, so the
int32 result is the exact ``sum q*x`` (while ``|sum| < 2^31``: any ``in_features`` below 561,000
at 4 bits).

The inner loop (vpshufb paths), per tile of ``vec_tile`` registers and batch row, per block: the
8 tables of the block's 4 groups are broadcast once; per weight plane and register, two loads of
``lanes`` packed bytes give 4 index vectors (``& 15``, ``>> 4``), 8 ``vpshufb`` look them up in
the low and high tables, 6 byte adds sum the groups, 4 ``vpmaddubsw`` + adds widen and weight
into the two uint16 accumulators (even and odd bytes). Every :func:`flush_blocks` blocks the
uint16 lanes are split into int32 (``& 0xffff``, ``>> 16``); at the end ``s * acc - M * sum x``
is stored for the output stage. Tiles of output channels are the parallel loop; batch rows run
inside a tile, so a tile's weights are read from memory once per call.

Instruction paths (:attr:`VectorIsa.lut`)
------------------------------------------
* ``"avx512vbmi"`` (AVX512-VBMI and AVX512-VNNI): by default the unpack method (below); with
  ``method="lookup"`` (and for reductions too long for the unpack) the two tables of a block are each one 64-byte
  register (group ``j``'s 16 entries at bytes ``16j..16j+15``) and ``vpermb``
  (``llvm.x86.avx512.permvar.qi.512``) looks up all four groups at once: index byte ``4s + g``
  carries the nibble of group ``g`` for channel ``s`` and ``16 g`` in bits 4-5. ``vpdpbusd``
  (``llvm.x86.avx512.vpdpbusd.512``) then multiplies the looked-up bytes (at most 60, so exact as
  its signed operand) by the plane weight (``2^p`` low, ``2^(p+4)`` high, at most 128 as its
  unsigned operand) and adds the 4 groups into the int32 of channel ``s``: no uint8 sums, uint16
  lanes or flushes. Per 64 weight bytes (2 x 16 channels x 4 groups of one plane): one ``& 15``,
  one ``>> 4``, the two selector ors, 4 ``vpermb``, 4 ``vpdpbusd`` (11 instructions against the
  avx512bw path's ~15, which also flushes every block at 4 bits). Tiles of 4 registers (128
  channels, 8 int32 accumulators) share each block's 2 table loads; weights are prefetched
  :data:`PREFETCH_BYTES` ahead, since in a network they stream from DRAM;
* ``"avx512bw"``: ``vpshufb`` on zmm (``llvm.x86.avx512.pshuf.b.512``): the 16-byte table is
  broadcast to the 4 lanes of the register (``vbroadcasti32x4``), so one lookup serves 64 output
  channels of one group; ``vpmaddubsw`` on zmm widens;
* ``"avx2"``: the same on ymm (``llvm.x86.avx2.pshuf.b``, ``llvm.x86.avx2.pmadd.ub.sw``), 32 channels;
* ``"scalar"``: plain TIR loops over the same tables and packed weights (no AVX2), 16 channels
  per tile.

Packed weights (``uint8``, :func:`pack_lut_weights`; ``w_bits * K * O / 8`` bytes up to padding)
----------------------------------------------------------------------------------------------
``(tiles, blocks, w_bits, 2, vec_tile, lanes)``. Byte ``[b, k, p, h, r, x]`` holds the 4 bits of
plane ``p`` of groups ``4k + 2h`` (low nibble) and ``4k + 2h + 1`` (high nibble) for output
channel ``b * vec_tile * lanes + r * lanes + channel_of(x)``, with
``channel_of(x) = (lanes / 4) * (0, 2, 1, 3)[x % 4] + x // 4``: the order in which the
widened uint16 lanes come out as int32 vectors, so each int32 vector covers consecutive output
channels and is stored as one vector. The kernel reads the bytes in memory order; one load of
``lanes`` bytes gives the indices of two groups (``x & 15`` and ``x >> 4``). Inputs are padded
with zeros to whole blocks and outputs to whole tiles (a zero index looks up ``T[0] = 0``).

On the avx512vbmi path the packed weights are ``(tiles, blocks, w_bits, vec_tile, 64)``: byte
``[b, k, p, r, 4s + g]`` holds the 4 bits of plane ``p`` of group ``4k + g`` for output channel
``b * vec_tile * 32 + r * 32 + s`` (low nibble) and ``... + 16 + s`` (high nibble), ``s < 16``; the
int32 accumulators come out in channel order.

The unpack method (:attr:`LutPlan.method`, :func:`lut_method`)
-------------------------------------------------------------
On AVX512-VNNI the codes need no tables: ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.512``) multiplies 64
uint8 activations by 64 int8 bytes and adds each 4 into an int32 lane, so a weight byte whose bits are
cut into fields (:data:`UNPACK_FIELDS`: two 4-bit codes, four 2-bit, eight 1-bit, or the 3-bit mix of
3 + 3 + 2 / 3 + 3 + 1 + 1 / 3 + 3 + 2 bits per 3 bytes, two codes split into 2 low bits and 1 high bit)
multiplies all its codes at once if its fields are taken apart *after* the sums. Byte ``4s + j`` of a
weight vector holds input ``4g + j`` of 16-channel slot ``s``'s channels, one field per slot; the 4
inputs of group ``g`` are broadcast to every int32 lane (``vpbroadcastd``). With fields starting at
bits ``b_0 = 0 < b_1 < ...``, vector ``v`` (bit 7 flipped, see below) and ``m_i`` the mask of bits
``b_i..7``, ``vpdpbusd`` adds ``int8(v & m_i) * x`` into accumulator ``i`` (``v`` itself for ``i = 0``):
``F`` products and ``F - 1`` ands per 64 weight bytes (4 bits: 2 and 1). As ``int8(v & m_i)`` is
``(raw & m_i) - 128``, accumulator ``i`` minus accumulator ``i + 1`` is ``2^b_i`` times the sum of
field ``i``, and the top field's sum is ``(acc >> b_top) + (128 >> b_top) * sum x``: exact shifts of
exact int32 sums, since every byte is in ``[-128, 127]`` (any ``in_features`` below 65,793,
:func:`unpack_fits`). Codes are then ``sum_fields 2^code bit * field`` per slot, and ``s * sum u x -
M * sum x`` is stored as on the lookup paths. A tile is :data:`UNPACK_SLOTS` slots (128 channels,
``w_bits`` vectors per group, 8 to 10 accumulators); tiles are the parallel loop and stream their
weights once; no software prefetch (:data:`UNPACK_PREFETCH_BYTES`).

Packed weights ``(tiles, 4 * blocks, w_bits, 64)``: byte ``[b, g, v, 4s + j]`` is ``0x80 ^ sum_fields
(((u >> code bit) & (2^bits - 1)) << first bit)`` over vector ``v``'s fields ``(first bit, bits, slot,
code bit)``, with ``u`` the code of output channel ``128 b + 16 slot + s`` at input ``4g + j`` (0 past
the ends): ``w_bits / 8`` bytes per weight, as the lookups.

The PrimFunc takes ``(data uint8 (N, K), weights, *epilogue arguments, out (N, O))`` like the
int8 and bit-serial dense kernels, and finishes through the shared :func:`output_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from .common import without_global_symbol
from .encoding import encode_weights, weight_level_range, weight_scale_offset
from .epilogue import PLAIN, Epilogue, output_stage
from .shapes import DenseShape
from .target import VectorIsa, vector_isa

#: Activations per table: 2^4 = 16 entries, one ``vpshufb`` table.
GROUP = 4
#: Groups summed in uint8 lanes before widening (4 * 60 = 240 fits a byte).
GROUPS_PER_BLOCK = 4
#: Activations per block.
BLOCK = GROUP * GROUPS_PER_BLOCK
#: Largest value a block adds to a uint16 lane for one weight plane of weight 1 (low plus 16 x high
#: nibble sums): 240 + 16 * 240.
BLOCK_PLANE_MAX = 240 + 16 * 240
#: Weight widths the lookup kernels take (a 4-bit plane group indexes a 16-entry table; wider
#: weights are better served by the int8 kernels).
LUT_W_BITS = (1, 2, 3, 4)
#: Output channels per weight register on each path (the index bytes of one lookup, except on
#: avx512vbmi where 64 index bytes carry 16 channels x 4 groups, twice), and the LLVM intrinsics.
LUT_LANES = {"avx512vbmi": 32, "avx512bw": 64, "avx2": 32, "scalar": 16}
#: The paths from the most to the least demanding: a target runs its own path and every later one.
LUT_PATHS = ("avx512vbmi", "avx512bw", "avx2", "scalar")
_PSHUFB = {"avx512bw": "llvm.x86.avx512.pshuf.b.512", "avx2": "llvm.x86.avx2.pshuf.b"}
_PMADDUBSW = {"avx512bw": "llvm.x86.avx512.pmaddubs.w.512", "avx2": "llvm.x86.avx2.pmadd.ub.sw"}
_VPERMB = "llvm.x86.avx512.permvar.qi.512"
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
#: Bytes of weights the avx512vbmi path prefetches ahead of the block it reads: enough lines in flight
#: to cover DRAM latency at one core's bandwidth (~100 ns x 26 GB/s), as one tile's weights stream by.
PREFETCH_BYTES = 4096
#: How a plan computes: ``"lookup"`` (the tables above) or ``"unpack"`` (codes unpacked in registers and
#: multiplied by ``vpdpbusd``, see "The unpack method").
LUT_METHODS = ("lookup", "unpack")
#: Weight widths the unpack method serves by default on the avx512vbmi path: all, since it beat the vpermb
#: lookups side by side at each (AlexNet fc6/fc7, batch 1, cold weights, Zen 4: ~1.15x at 4 bits, ~1.3x at 2,
#: ~1.1-1.2x at 3, ~1.05-1.1x at 1, where one lookup plane needs only 4 vpermb + 4 vpdpbusd per 512 weights
#: against the unpack's 8 vpdpbusd). The lookups remain for targets without AVX512-VNNI and for reductions
#: too long for the unpack's int32 sums.
UNPACK_W_BITS = (1, 2, 3, 4)
#: The unpack method's fields, per weight width: the ``w_bits`` 64-byte vectors that hold one group of 4
#: inputs for a tile of :data:`UNPACK_SLOTS` x 16 output channels, each a tuple of fields
#: ``(first bit, bits, slot, code bit)``: bits ``first .. first + bits - 1`` of byte ``4s + j`` hold bits
#: ``code bit ..`` of the code of output channel ``16 slot + s`` at input ``4 group + j``. 3-bit codes take
#: 3 bytes per 8 channels: six whole codes, and two split into 2 low bits and 1 high bit.
UNPACK_FIELDS = {
    1: (tuple((i, 1, i, 0) for i in range(8)),),
    2: tuple(tuple((2 * i, 2, 4 * v + i, 0) for i in range(4)) for v in range(2)),
    3: (((0, 3, 0, 0), (3, 3, 1, 0), (6, 2, 6, 0)),
        ((0, 3, 2, 0), (3, 3, 3, 0), (6, 1, 6, 2), (7, 1, 7, 2)),
        ((0, 3, 4, 0), (3, 3, 5, 0), (6, 2, 7, 0))),
    4: tuple(((0, 4, 2 * v, 0), (4, 4, 2 * v + 1, 0)) for v in range(4)),
}
#: Output channel slots (of 16, one int32 vector each) per tile of the unpack method: 128 channels.
UNPACK_SLOTS = 8
#: Largest magnitude of a byte the unpack method multiplies (a signed byte); with activations up to 255 an
#: int32 accumulator stays exact below ``2^31 / (255 * 128)`` = 65,793 inputs.
UNPACK_BYTE_MAX = 128
#: The same for the unpack method: 0, no software prefetch (its tiles stream linearly and the hardware
#: prefetcher keeps up; prefetching 4 KiB ahead made AlexNet fc6 at 4 bits ~15 % slower on Zen 4).
UNPACK_PREFETCH_BYTES = 0
#: Lookups (MACs * w_bits) below which one core beats two: waking the second thread costs microseconds.
LUT_PARALLEL_MIN_LOOKUPS = 4_000_000
#: int32 vector ``t`` of a widened register holds the bytes ``4l + b`` with ``t = _WIDEN_ORDER[b]``.
_WIDEN_ORDER = (0, 2, 1, 3)


def check_lut_bits(w_bits: int) -> int:
    if isinstance(w_bits, bool) or int(w_bits) != w_bits or int(w_bits) not in LUT_W_BITS:
        raise ValueError(f"lookup-table kernels take w_bits in {LUT_W_BITS}; got {w_bits!r} "
                         "(use the bit-serial or int8 kernels for wider weights)")
    return int(w_bits)


def max_code(w_bits: int) -> int:
    """The largest unsigned code ``u = sum_p 2^p u_p`` of a ``w_bits`` weight (``2^w - 2``; 1 at 1 bit)."""
    scale, offset = weight_scale_offset(check_lut_bits(w_bits))
    return (weight_level_range(w_bits)[1] + offset) // scale


def flush_blocks(w_bits: int) -> int:
    """Blocks summed into uint16 lanes before they are added into int32: the largest count whose
    worst case ``count * 4080 * max_code(w_bits)`` stays below 2^16 (16, 8, 2, 1 for 1..4 bits)."""
    return max(1, 0xFFFF // (BLOCK_PLANE_MAX * max_code(w_bits)))


def channel_of(x: int, lanes: int) -> int:
    """Output channel (within its register) of index byte ``x`` of a ``lanes``-byte register."""
    return (lanes // 4) * _WIDEN_ORDER[x % 4] + x // 4


@dataclass(frozen=True)
class LutPlan:
    """Everything the compute, schedule and weight packing of one lookup-table dense kernel depend on."""

    shape: DenseShape
    w_bits: int
    #: ``"avx512vbmi"``, ``"avx512bw"``, ``"avx2"`` or ``"scalar"`` (:attr:`VectorIsa.lut`)
    path: str
    #: Registers of ``lanes`` output channels per tile (the loop body's register tile).
    vec_tile: int
    parallel: bool
    isa: VectorIsa
    #: ``"lookup"`` or ``"unpack"`` (:func:`lut_method`)
    method: str = "lookup"

    @property
    def lanes(self) -> int:
        """Output channels per lookup (index bytes of one register); per int32 accumulator when unpacking."""
        return 16 if self.method == "unpack" else LUT_LANES[self.path]

    @property
    def tile(self) -> int:
        """Output channels per tile (one iteration of the parallel loop)."""
        return self.lanes * self.vec_tile

    @property
    def tiles(self) -> int:
        return -(-self.shape.out_features // self.tile)

    @property
    def out_pad(self) -> int:
        return self.tiles * self.tile

    @property
    def blocks(self) -> int:
        """Blocks of :data:`BLOCK` activations along the reduction (the input padded with zeros)."""
        return -(-self.shape.in_features // BLOCK)

    @property
    def flush(self) -> int:
        """Blocks per uint16 -> int32 flush (:func:`flush_blocks`)."""
        return min(self.blocks, flush_blocks(self.w_bits))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.method == "unpack":  # w_bits 64-byte vectors per group of 4 inputs and tile
            return (self.tiles, GROUPS_PER_BLOCK * self.blocks, self.w_bits, 64)
        if self.path == "avx512vbmi":  # one 64-byte register holds two nibbles of 32 channels x 4 groups
            return (self.tiles, self.blocks, self.w_bits, self.vec_tile, 2 * self.lanes)
        return (self.tiles, self.blocks, self.w_bits, 2, self.vec_tile, self.lanes)

    @property
    def weight_bytes(self) -> int:
        return int(np.prod(self.weight_shape))


def unpack_fits(shape: DenseShape) -> bool:
    """Whether the unpack method's int32 sums stay exact for ``shape`` (:data:`UNPACK_BYTE_MAX`)."""
    return -(-shape.in_features // BLOCK) * BLOCK * 255 * UNPACK_BYTE_MAX < 2**31


def lut_method(isa: VectorIsa, w_bits: int, path: str | None = None, shape: DenseShape | None = None) -> str:
    """``"unpack"`` where it is the faster method: the avx512vbmi path (whose targets have AVX512-VNNI)
    at :data:`UNPACK_W_BITS` and a reduction short enough for its int32 sums; ``"lookup"`` elsewhere."""
    path = path or isa.lut
    fits = shape is None or unpack_fits(shape)
    return "unpack" if path == "avx512vbmi" and check_lut_bits(w_bits) in UNPACK_W_BITS and fits else "lookup"


def plan_lut_dense(shape: DenseShape, w_bits: int, parallel: bool | None = None,
                   isa: VectorIsa | None = None, path: str | None = None, method: str | None = None) -> LutPlan:
    """The tiling of a lookup-table dense layer for ``isa`` (default: this host's, :func:`vector_isa`).

    ``path`` overrides ``isa.lut`` with a path the target also runs (``"scalar"`` always runs; a
    vector path needs its instructions); ``method`` overrides :func:`lut_method` (``"unpack"`` needs
    an AVX-512 path and AVX512-VNNI). ``parallel=None`` uses all cores only for big layers.
    """
    w_bits = check_lut_bits(w_bits)
    isa = isa or vector_isa()
    path = path or isa.lut
    if path not in LUT_PATHS:
        raise ValueError(f"unknown lookup path {path!r}; expected one of {LUT_PATHS}")
    if LUT_PATHS.index(path) < LUT_PATHS.index(isa.lut):
        raise ValueError(f"lookup path {path!r} needs instructions this target lacks (its path is {isa.lut!r})")
    method = method or lut_method(isa, w_bits, path, shape)
    if method not in LUT_METHODS:
        raise ValueError(f"unknown lut method {method!r}; expected one of {LUT_METHODS}")
    if shape.in_features * 255 * (2**w_bits - 1) >= 2**31:
        raise ValueError(f"in_features={shape.in_features} is too long for exact int32 sums at {w_bits} bits")
    if method == "unpack":
        if path not in ("avx512vbmi", "avx512bw") or isa.int8 != "avx512-vnni":
            raise ValueError(f"the unpack method needs AVX-512 and AVX512-VNNI (zmm vpdpbusd); this target's lookup "
                             f"path is {path!r} and its int8 dot product {isa.int8!r}: use method='lookup'")
        if not unpack_fits(shape):
            raise ValueError(f"in_features={shape.in_features} is too long for the unpack method's exact int32 sums "
                             "(below 65,793): use method='lookup'")
        vec_tile = UNPACK_SLOTS
        if parallel is None:
            parallel = shape.macs * w_bits >= LUT_PARALLEL_MIN_LOOKUPS
        return LutPlan(shape, w_bits, path, vec_tile, bool(parallel), isa, method)
    regs = -(-shape.out_features // LUT_LANES[path])
    if path == "avx512vbmi":
        # four registers (128 channels, 8 int32 accumulators) share each block's two table loads and
        # give vpdpbusd eight independent chains; small layers take the largest tile they fill
        vec_tile = 4 if regs >= 16 else next(t for t in (4, 2, 1) if regs % t == 0)
    else:
        # two registers per tile give the lookups of one table two independent chains, when the
        # output channels fill them (avx2 keeps one: 16 ymm registers)
        vec_tile = 2 if path == "avx512bw" and regs % 2 == 0 else 1
    if parallel is None:
        parallel = shape.macs * w_bits >= LUT_PARALLEL_MIN_LOOKUPS
    return LutPlan(shape, w_bits, path, vec_tile, bool(parallel), isa, method)


def pack_lut_weights(q: np.ndarray, w_bits: int, isa: VectorIsa | None = None,
                     path: str | None = None, method: str | None = None) -> np.ndarray:
    """Lay out signed weight levels ``q`` (``(out_features, in_features)``) for the lookup kernel.

    ``isa``/``path``/``method`` as in :func:`plan_lut_dense` (pack with the plan the kernel was built from);
    returns a C-contiguous uint8 array shaped ``plan.weight_shape`` (see the module docstring),
    ``w_bits * K * O / 8`` bytes up to padding. Raises ``ValueError`` for levels off the grid.
    """
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"dense weights must be (out_features, in_features); got shape {q.shape}")
    o, k = q.shape
    plan = plan_lut_dense(DenseShape(k, o), w_bits, False, isa, path, method)
    u = np.zeros((plan.out_pad, plan.blocks * BLOCK), dtype=np.uint8)
    u[:o, :k] = encode_weights(q, plan.w_bits)
    if plan.method == "unpack":
        return _pack_unpack_weights(u, plan)
    # the index of plane p over group t: bit i is plane p of input 4t + i
    codes = u.reshape(plan.out_pad, -1, GROUP)  # (O', groups, i)
    nibbles = np.zeros(codes.shape[:2] + (plan.w_bits,), dtype=np.uint8)
    for p in range(plan.w_bits):
        for i in range(GROUP):
            nibbles[:, :, p] |= ((codes[:, :, i] >> p) & 1) << i
    if plan.path == "avx512vbmi":
        # byte [b, k, p, r, 4s + g]: group 4k + g of channel (b, r, s) low, of channel (b, r, 16 + s) high
        nib = nibbles.reshape(plan.tiles, plan.vec_tile, 2, 16, plan.blocks, GROUP, plan.w_bits)
        byte = nib[:, :, 0] | (nib[:, :, 1] << 4)  # (tiles, vec_tile, s, block, g, p)
        return np.ascontiguousarray(byte.transpose(0, 3, 5, 1, 2, 4).reshape(plan.weight_shape))
    nib = nibbles.reshape(plan.out_pad, plan.blocks, 2, 2, plan.w_bits)  # (O', block, h, low/high, p)
    byte = (nib[:, :, :, 0] | (nib[:, :, :, 1] << 4)).astype(np.uint8)  # (O', block, h, p)
    lanes, tile = plan.lanes, plan.tile
    chan = np.array([channel_of(x, lanes) for x in range(lanes)])
    index = (np.arange(plan.tiles)[:, None, None] * tile + np.arange(plan.vec_tile)[None, :, None] * lanes
             + chan[None, None, :])  # (tiles, vec_tile, lanes) -> output channel
    packed = byte[index]  # (tiles, vec_tile, lanes, block, h, p)
    return np.ascontiguousarray(packed.transpose(0, 3, 5, 4, 1, 2))


def _pack_unpack_weights(u: np.ndarray, plan: LutPlan) -> np.ndarray:
    """The unpack method's bytes (module docstring): fields of :data:`UNPACK_FIELDS`, then bit 7 flipped."""
    codes = u.reshape(plan.tiles, UNPACK_SLOTS, 16, -1, GROUP)  # (tile, slot, s, group, j)
    packed = np.zeros(plan.weight_shape, dtype=np.uint8)  # (tile, group, vector, 4s + j)
    for v, fields in enumerate(UNPACK_FIELDS[plan.w_bits]):
        byte = np.zeros((plan.tiles, codes.shape[3], 16, GROUP), dtype=np.uint8)  # (tile, group, s, j)
        for first, bits, slot, code_bit in fields:
            field = (codes[:, slot] >> code_bit) & ((1 << bits) - 1)  # (tile, s, group, j)
            byte |= (field << first).transpose(0, 2, 1, 3).astype(np.uint8)
        packed[:, :, v] = byte.reshape(plan.tiles, -1, 16 * GROUP) ^ 0x80
    return packed


# --------------------------------------------------------------------------------------------
# TIR: tables, then lookups; the output stage is the shared TE epilogue


def _u8(value: int, lanes: int):
    return tirx.Broadcast(tirx.const(value, "uint8"), lanes)


def _int8_pairs(weight: int, odd: bool, lanes: int):
    """The int8 vector ``[weight, 0, weight, 0, ...]`` (``[0, weight, ...]`` if ``odd``) of ``lanes`` bytes."""
    return tirx.reinterpret(f"int8x{lanes}", tirx.Broadcast(tirx.const(weight << (8 if odd else 0), "int16"),
                                                            lanes // 2))


def _table_stmt(plan: LutPlan, x, tables, asum):
    """Fill ``tables[n, block, half, 16j + e]`` (uint8, the low / high nibble sums of group ``4 block + j``)
    and ``asum[n] = sum_k x[n, k]`` (int32)."""
    ramp64 = tirx.Ramp(tirx.const(0, "int32"), 1, 64)
    # mask_i: lane 16j + e is 0xff where bit i of e is set (LLVM folds this to a constant vector)
    masks = [tirx.Cast("uint8x64", (ramp64 >> i) & 1) * _u8(255, 64) for i in range(GROUP)]

    def block(n, blk, a16):
        a = T.Bind(a16)
        nib = {}
        for i in range(GROUP):  # lane 16j + e of spread_i is input 4j + i of the block
            spread = tirx.Shuffle([a] * 4, [tirx.IntImm("int32", GROUP * (lane // 16) + i) for lane in range(64)])
            nib[0, i] = spread & _u8(15, 64)
            nib[1, i] = spread >> _u8(4, 64)
        for half in (0, 1):
            total = nib[half, 0] & masks[0]
            for i in range(1, GROUP):
                total = total + (nib[half, i] & masks[i])
            T.buffer_store(tables, total, [n, blk, half, tirx.Ramp(0, 1, 64)])

    return _activation_blocks(plan, x, asum, block)


def _activation_blocks(plan: LutPlan, x, asum, block):
    """Per batch row ``n``, ``block(n, blk, a16)`` for each block of 16 activations ``a16`` (uint8x16, the
    inputs past the end read as zero), and ``asum[n] = sum_k x[n, k]`` (int32)."""
    k, n_rows = plan.shape.in_features, plan.shape.batch
    full, tail = divmod(k, BLOCK)
    with IRBuilder() as ib:
        with T.serial(0, n_rows) as n:
            lane_sum = T.alloc_buffer((16,), "int32", scope="local")
            T.buffer_store(lane_sum, tirx.Broadcast(tirx.const(0, "int32"), 16), [tirx.Ramp(0, 1, 16)])
            if full:
                with T.serial(0, full) as blk:
                    a16 = x[n, tirx.Ramp(blk * BLOCK, 1, 16)]
                    block(n, blk, a16)
                    T.buffer_store(lane_sum, lane_sum[tirx.Ramp(0, 1, 16)] + tirx.Cast("int32x16", a16),
                                   [tirx.Ramp(0, 1, 16)])
            if tail:  # the last, partial block: inputs past the end read as zero
                offs = tirx.Ramp(tirx.const(full * BLOCK, "int32"), 1, 16)
                inside = offs < tirx.Broadcast(tirx.const(k, "int32"), 16)
                clamped = tirx.Min(offs, tirx.Broadcast(tirx.const(k - 1, "int32"), 16))
                a16 = tirx.Select(inside, x[n, clamped], _u8(0, 16))
                block(n, full, a16)
                T.buffer_store(lane_sum, lane_sum[tirx.Ramp(0, 1, 16)] + tirx.Cast("int32x16", a16),
                               [tirx.Ramp(0, 1, 16)])
            total = lane_sum[0]
            for i in range(1, 16):
                total = total + lane_sum[i]
            T.buffer_store(asum, total, [n])
    return ib.get()


def _unpack_activation_stmt(plan: LutPlan, x, words, asum):
    """The unpack method's activations: ``words[n, g]`` (int32) holds inputs ``4g .. 4g + 3`` of row ``n``
    (zero past the end), one ``vpbroadcastd`` operand; and ``asum[n] = sum_k x[n, k]``."""

    def block(n, blk, a16):
        T.buffer_store(words, tirx.reinterpret("int32x4", a16), [n, tirx.Ramp(blk * GROUPS_PER_BLOCK, 1, 4)])

    return _activation_blocks(plan, x, asum, block)


def _unpack_stmt(plan: LutPlan, words, asum, w, acc):
    """The unpack method (module docstring): per tile, batch row and group of 4 inputs, the activations
    broadcast to every int32 lane; per weight vector the byte itself and each field's ``& mask`` are
    ``vpdpbusd``'s signed operand, one int32 accumulator each; at the end the fields' sums are taken
    apart (differences and exact shifts) and added into the codes' sums per output channel."""
    w_bits, fields = plan.w_bits, UNPACK_FIELDS[plan.w_bits]
    scale, offset = weight_scale_offset(w_bits)
    vec = tirx.Ramp(tirx.const(0, "int32"), 1, 64)
    ahead = max(1, UNPACK_PREFETCH_BYTES // (64 * w_bits))  # groups; past the tile it reads the next tile's
    accumulators = [(v, f) for v, vector in enumerate(fields) for f in range(len(vector))]
    slot_of = {key: i for i, key in enumerate(accumulators)}

    def i32(value):
        return tirx.Broadcast(tirx.const(value, "int32"), 16)

    with IRBuilder() as ib:
        loop = T.parallel if plan.parallel and plan.tiles > 1 else T.serial
        with loop(0, plan.tiles) as ob:
            with T.serial(0, plan.shape.batch) as n:
                acc32 = T.alloc_buffer((len(accumulators), 16), "int32", scope="local")
                for i in range(len(accumulators)):
                    T.buffer_store(acc32, i32(0), [i, tirx.Ramp(0, 1, 16)])
                with T.serial(0, plan.blocks) as blk:
                    for g in range(GROUPS_PER_BLOCK):
                        group = blk * GROUPS_PER_BLOCK + g
                        x4 = T.Bind(tirx.reinterpret("uint8x64", tirx.Broadcast(words[n, group], 16)))
                        for v, vector in enumerate(fields):
                            if UNPACK_PREFETCH_BYTES:
                                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                              T.address_of(w[ob, group + ahead, v, 0]), 0, 3, 1))
                            packed = T.Bind(w[ob, group, v, vec])
                            for f, (first, _, _, _) in enumerate(vector):
                                operand = packed if first == 0 else packed & _u8((0xFF << first) & 0xFF, 64)
                                i = slot_of[v, f]
                                total = T.call_llvm_pure_intrin("int32x16", _VPDPBUSD, acc32[i, tirx.Ramp(0, 1, 16)],
                                                                x4, operand)
                                T.buffer_store(acc32, total, [i, tirx.Ramp(0, 1, 16)])
                x_sum = tirx.Broadcast(asum[n], 16)
                codes = {}  # slot -> sum_k u x of its 16 channels
                for v, vector in enumerate(fields):
                    for f, (first, _, slot, code_bit) in enumerate(vector):
                        here = acc32[slot_of[v, f], tirx.Ramp(0, 1, 16)]
                        if f + 1 < len(vector):  # the fields above it cancel: 2^first * its sum
                            part = (here - acc32[slot_of[v, f + 1], tirx.Ramp(0, 1, 16)]) >> i32(first)
                        else:  # the top field, minus 128 per input (the flipped bit 7)
                            part = (here >> i32(first)) + x_sum * i32(128 >> first)
                        if code_bit:
                            part = part << i32(code_bit)
                        codes[slot] = part if slot not in codes else codes[slot] + part
                for slot in range(UNPACK_SLOTS):
                    total = codes[slot] if scale == 1 else codes[slot] * i32(scale)
                    base = ob * plan.tile + 16 * slot
                    T.buffer_store(acc, total - x_sum * i32(offset), [n, tirx.Ramp(base, 1, 16)])
    return ib.get()


def _vector_lookup_stmt(plan: LutPlan, tables, asum, w, acc):
    """The lookups of the vector paths: per tile and batch row, ``vpshufb`` + uint8 sums per block,
    ``vpmaddubsw`` into uint16 lanes, int32 flushes, then the offset correction (module docstring)."""
    lanes, vec_tile, w_bits = plan.lanes, plan.vec_tile, plan.w_bits
    half_lanes, quarter = lanes // 2, lanes // 4
    pshufb, pmaddubsw = _PSHUFB[plan.path], _PMADDUBSW[plan.path]
    scale, offset = weight_scale_offset(w_bits)
    full_flushes, tail_blocks = divmod(plan.blocks, plan.flush)
    vec = tirx.Ramp(tirx.const(0, "int32"), 1, lanes)
    u16 = f"uint16x{half_lanes}"

    def widen(byte_sum, weight, odd):
        return tirx.reinterpret(u16, T.call_llvm_pure_intrin(f"int16x{half_lanes}", pmaddubsw, byte_sum,
                                                             _int8_pairs(weight, odd, lanes)))

    def block(ob, n, blk, acc16):
        # the 16-byte table of group j, broadcast to every 128-bit lane
        tabs = {}
        for j in range(GROUPS_PER_BLOCK):
            for half in (0, 1):
                table = tables[n, blk, half, tirx.Ramp(16 * j, 1, 16)]
                tabs[j, half] = T.Bind(tirx.Shuffle([table] * (lanes // 16), [tirx.IntImm("int32", i)
                                                                              for i in range(lanes)]))
        for p in range(w_bits):
            for r in range(vec_tile):
                idx = []
                for h in (0, 1):
                    packed = T.Bind(w[ob, blk, p, h, r, vec])
                    idx += [packed & _u8(15, lanes), packed >> _u8(4, lanes)]
                sums = []
                for half in (0, 1):
                    total = None
                    for j in range(GROUPS_PER_BLOCK):
                        hit = T.call_llvm_pure_intrin(f"uint8x{lanes}", pshufb, tabs[j, half], idx[j])
                        total = hit if total is None else total + hit
                    sums.append(T.Bind(total))
                for odd in (False, True):
                    value = widen(sums[0], 1 << p, odd)
                    if p + 4 < 7:
                        value = value + widen(sums[1], 1 << (p + 4), odd)
                    else:  # 2^7 is no int8: weight 64, twice
                        hi = T.Bind(widen(sums[1], 64, odd))
                        value = value + hi + hi
                    slot = 2 * r + int(odd)
                    T.buffer_store(acc16, acc16[slot, tirx.Ramp(0, 1, half_lanes)] + value,
                                   [slot, tirx.Ramp(0, 1, half_lanes)])

    def flush_group(ob, n, first_blk, count, acc16, acc32):
        for slot in range(2 * vec_tile):
            T.buffer_store(acc16, tirx.Broadcast(tirx.const(0, "uint16"), half_lanes),
                           [slot, tirx.Ramp(0, 1, half_lanes)])
        if count == 1:
            block(ob, n, first_blk, acc16)
        else:
            with T.serial(0, count) as b:
                block(ob, n, first_blk + b, acc16)
        for r in range(vec_tile):
            for odd in (0, 1):
                lanes16 = acc16[2 * r + odd, tirx.Ramp(0, 1, half_lanes)]
                words = T.Bind(tirx.reinterpret(f"uint32x{quarter}", lanes16))
                parts = (words & tirx.Broadcast(tirx.const(0xFFFF, "uint32"), quarter),
                         words >> tirx.Broadcast(tirx.const(16, "uint32"), quarter))
                for high, part in enumerate(parts):
                    t = _WIDEN_ORDER[2 * high + odd]
                    index = [r, t, tirx.Ramp(0, 1, quarter)]
                    T.buffer_store(acc32, acc32[tuple(index)] + tirx.reinterpret(f"int32x{quarter}", part), index)

    with IRBuilder() as ib:
        loop = T.parallel if plan.parallel and plan.tiles > 1 else T.serial
        with loop(0, plan.tiles) as ob:
            with T.serial(0, plan.shape.batch) as n:
                acc16 = T.alloc_buffer((2 * vec_tile, half_lanes), "uint16", scope="local")
                acc32 = T.alloc_buffer((vec_tile, 4, quarter), "int32", scope="local")
                for r in range(vec_tile):
                    for t in range(4):
                        T.buffer_store(acc32, tirx.Broadcast(tirx.const(0, "int32"), quarter),
                                       [r, t, tirx.Ramp(0, 1, quarter)])
                if full_flushes == 1:
                    flush_group(ob, n, 0, plan.flush, acc16, acc32)
                elif full_flushes > 1:
                    with T.serial(0, full_flushes) as f:
                        flush_group(ob, n, f * plan.flush, plan.flush, acc16, acc32)
                if tail_blocks:
                    flush_group(ob, n, full_flushes * plan.flush, tail_blocks, acc16, acc32)
                correction = tirx.Broadcast(asum[n] * tirx.const(offset, "int32"), quarter)
                for r in range(vec_tile):
                    for t in range(4):
                        total = acc32[r, t, tirx.Ramp(0, 1, quarter)]
                        if scale != 1:
                            total = total * tirx.Broadcast(tirx.const(scale, "int32"), quarter)
                        base = ob * plan.tile + r * lanes + t * quarter
                        T.buffer_store(acc, total - correction, [n, tirx.Ramp(base, 1, quarter)])
    return ib.get()


def _vpermb_lookup_stmt(plan: LutPlan, tables, asum, w, acc):
    """The avx512vbmi path: per tile, batch row and block, two 64-byte tables (the low / high nibble
    tables of the block's 4 groups), per weight register one ``& 15`` and one ``>> 4`` give two index
    vectors, the group number ``g`` goes into bits 4-5 of byte ``4s + g``, and ``vpermb`` looks each up
    in both tables; ``vpdpbusd`` multiplies the looked-up bytes by the plane weight (``2^p`` low,
    ``2^(p+4)`` high) and adds the 4 groups into the int32 of channel ``s`` (module docstring)."""
    vec_tile, w_bits, width = plan.vec_tile, plan.w_bits, 2 * plan.lanes
    scale, offset = weight_scale_offset(w_bits)
    vec = tirx.Ramp(tirx.const(0, "int32"), 1, width)
    block_bytes = w_bits * vec_tile * width
    ahead = max(1, PREFETCH_BYTES // block_bytes)  # blocks; past the tile it reads the next tile's
    # bits 4-5 of byte 4s + g select table g: (0, 16, 32, 48) in every int32
    select = tirx.reinterpret(f"uint8x{width}", tirx.Broadcast(tirx.const(0x30201000, "int32"), width // 4))
    weight = {(p, hi): _u8((1 << p) << (4 * hi), width) for p in range(w_bits) for hi in (0, 1)}

    with IRBuilder() as ib:
        loop = T.parallel if plan.parallel and plan.tiles > 1 else T.serial
        with loop(0, plan.tiles) as ob:
            with T.serial(0, plan.shape.batch) as n:
                acc32 = T.alloc_buffer((vec_tile, 2, 16), "int32", scope="local")
                for r in range(vec_tile):
                    for slot in (0, 1):
                        T.buffer_store(acc32, tirx.Broadcast(tirx.const(0, "int32"), 16), [r, slot, tirx.Ramp(0, 1, 16)])
                with T.serial(0, plan.blocks) as blk:
                    table = [T.Bind(tables[n, blk, half, vec]) for half in (0, 1)]
                    for p in range(w_bits):
                        for r in range(vec_tile):
                            if PREFETCH_BYTES:
                                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                              T.address_of(w[ob, blk + ahead, p, r, 0]), 0, 3, 1))
                            packed = T.Bind(w[ob, blk, p, r, vec])
                            indices = ((packed & _u8(15, width)) | select, (packed >> _u8(4, width)) | select)
                            for slot, index in enumerate(indices):
                                index = T.Bind(index)
                                total = acc32[r, slot, tirx.Ramp(0, 1, 16)]
                                for hi in (0, 1):
                                    looked_up = T.call_llvm_pure_intrin(f"uint8x{width}", _VPERMB, table[hi], index)
                                    total = T.call_llvm_pure_intrin("int32x16", _VPDPBUSD, total, weight[p, hi],
                                                                    looked_up)
                                T.buffer_store(acc32, total, [r, slot, tirx.Ramp(0, 1, 16)])
                correction = tirx.Broadcast(asum[n] * tirx.const(offset, "int32"), 16)
                for r in range(vec_tile):
                    for slot in (0, 1):
                        total = acc32[r, slot, tirx.Ramp(0, 1, 16)]
                        if scale != 1:
                            total = total * tirx.Broadcast(tirx.const(scale, "int32"), 16)
                        base = ob * plan.tile + r * plan.lanes + 16 * slot
                        T.buffer_store(acc, total - correction, [n, tirx.Ramp(base, 1, 16)])
    return ib.get()


def _scalar_lookup_stmt(plan: LutPlan, tables, asum, w, acc):
    """The generic path: the same tables and packed weights, one output channel at a time in plain TIR."""
    lanes, w_bits = plan.lanes, plan.w_bits
    scale, offset = weight_scale_offset(w_bits)
    quarter = lanes // 4
    with IRBuilder() as ib:
        loop = T.parallel if plan.parallel and plan.tiles > 1 else T.serial
        with loop(0, plan.tiles) as ob:
            with T.serial(0, plan.shape.batch) as n:
                with T.serial(0, lanes) as xb:
                    total = T.alloc_buffer((1,), "int32", scope="local")
                    T.buffer_store(total, tirx.const(0, "int32"), [0])
                    with T.serial(0, plan.blocks) as blk:
                        for p in range(w_bits):
                            for h in (0, 1):
                                packed = T.Bind(w[ob, blk, p, h, 0, xb].astype("int32"))
                                for low_high in (0, 1):
                                    j = 2 * h + low_high
                                    e = (packed >> (4 * low_high)) & 15
                                    entry = (tables[n, blk, 0, 16 * j + e].astype("int32")
                                             + (tables[n, blk, 1, 16 * j + e].astype("int32") << 4))
                                    T.buffer_store(total, total[0] + (entry << p), [0])
                    widen_order = ((xb & 1) << 1) | ((xb & 3) >> 1)  # _WIDEN_ORDER[xb % 4]
                    channel = ob * lanes + quarter * widen_order + (xb >> 2)
                    T.buffer_store(acc, total[0] * scale - asum[n] * offset, [n, channel])
    return ib.get()


def lut_dense_tensors(plan: LutPlan, epilogue: Epilogue = PLAIN) -> list[te.Tensor]:
    """``[data (uint8, (N, K)), weights (uint8), *epilogue arguments, out ((N, O))]`` of a lookup-table dense layer."""
    s = plan.shape
    x = te.placeholder((s.batch, s.in_features), "uint8", name="data")
    w = te.placeholder(plan.weight_shape, "uint8", name="weights")
    x_buf = tirx.decl_buffer(x.shape, "uint8", "data")
    w_buf = tirx.decl_buffer(w.shape, "uint8", "weights")
    # first the activations alone (the unpack method's 32-bit words of 4 activations, or the lookup
    # tables of partial sums) and their sum, then the weights against them
    if plan.method == "unpack":
        pre_shape, pre_dtype, pre_name = (s.batch, GROUPS_PER_BLOCK * plan.blocks), "int32", "words"
        pre_stmt, acc_stmt = _unpack_activation_stmt, _unpack_stmt
    else:
        pre_shape, pre_dtype, pre_name = (s.batch, plan.blocks, 2, GROUPS_PER_BLOCK * 16), "uint8", "tables"
        pre_stmt = _table_stmt
        acc_stmt = {"scalar": _scalar_lookup_stmt, "avx512vbmi": _vpermb_lookup_stmt}.get(plan.path, _vector_lookup_stmt)
    pre, asum = te.extern(
        [pre_shape, (s.batch,)], [x],
        lambda ins, outs: pre_stmt(plan, ins[0], *outs),
        name=f"lut_{pre_name}", in_buffers=[x_buf],
        out_buffers=[tirx.decl_buffer(pre_shape, pre_dtype, pre_name), tirx.decl_buffer((s.batch,), "int32", "asum")],
    )
    acc = te.extern(
        (s.batch, plan.out_pad), [pre, asum, w],
        lambda ins, outs: acc_stmt(plan, *ins, outs[0]),
        name="lut_acc", in_buffers=[tirx.decl_buffer(pre.shape, pre_dtype, pre_name),
                                    tirx.decl_buffer(asum.shape, "int32", "asum"), w_buf],
        out_buffers=[tirx.decl_buffer((s.batch, plan.out_pad), "int32", "acc")],
    )
    extra, out = output_stage(epilogue, lambda n, g, i, j, o: acc[n, o], (s.batch, s.out_features),
                              lambda n, c: (n, c, 0, 0), s.out_features, s.out_features)
    return [x, w, *extra, out]


#: int32 lanes of the output stage's vectors.
OUT_LANES = 16


def schedule_lut(func: tvm.tirx.PrimFunc, plan: LutPlan) -> tvm.tirx.PrimFunc:
    """The lookups are scheduled where they are written; the output stage is vectorised."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    n, c = sch.get_loops(out)
    if plan.shape.out_features % OUT_LANES == 0:
        _, inner = sch.split(c, [None, OUT_LANES])
        sch.vectorize(inner)
    return sch.mod["main"]


def lut_dense_primfunc(shape: DenseShape, w_bits: int, parallel: bool | None = None,
                       isa: VectorIsa | None = None, epilogue: Epilogue = PLAIN,
                       path: str | None = None, method: str | None = None) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(data, weights, out)`` computing a lookup-table dense layer.

    * ``data``: uint8 ``(N, in_features)``, any values in ``[0, 255]``;
    * ``weights``: uint8 ``plan_lut_dense(shape, w_bits, isa=isa).weight_shape`` from
      :func:`pack_lut_weights` with the same ``isa`` / ``path``;
    * the ``epilogue``'s arguments, if any;
    * ``out``: ``(N, out_features)``, the exact ``x @ q.T`` as int32, or the ``epilogue``'s output.

    ``isa`` (default: this host's) must match the target the function is compiled for; ``path``
    overrides ``isa.lut`` (see :func:`plan_lut_dense`). No ``global_symbol``, as for the other families.
    """
    plan = plan_lut_dense(shape, w_bits, parallel, isa, path, method)
    return without_global_symbol(schedule_lut(te.create_prim_func(lut_dense_tensors(plan, epilogue)), plan))
