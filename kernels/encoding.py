r"""Integer levels, their unsigned bit-plane encoding, and the packed weight layouts.

Levels
------
* Weights are signed mid-tread integers. With ``k >= 2`` weight bits the levels are
  ``q in [-(2^(k-1)-1), 2^(k-1)-1]`` (zero is a level, the range is symmetric, so
  ``2^k - 1`` levels); with ``k = 1`` the levels are ``q in {-1, +1}``.
* Activations are unsigned integers ``x in [0, 2^a - 1]`` with ``a`` activation bits,
  passed to the kernels as ``uint8``.

Encoding (why popcounts of unsigned planes give the exact signed sum)
-----------------------------------------------------------------------
Every weight level is written ``q = s*u - M`` with an unsigned code ``u`` of ``k`` bits:

* ``k >= 2``: ``s = 1``, ``M = 2^(k-1) - 1``, ``u = q + M`` in ``[0, 2^k - 2]``;
* ``k = 1``:  ``s = 2``, ``M = 1``,          ``u = (q + 1) / 2`` in ``{0, 1}``.

Write ``u = sum_b 2^b u_b`` and ``x = sum_c 2^c x_c`` with bits ``u_b, x_c in {0, 1}``.
Over one output's reduction window ``R`` (input channels of the group x kernel taps)::

    sum_R q*x = s * sum_R u*x - M * sum_R x
              = s * sum_{b<k, c<a} 2^(b+c) * popcount(U_b AND X_c)  -  M * sum_{c<a} 2^c * popcount(X_c)

where ``U_b`` / ``X_c`` are the bit planes of ``u`` / ``x`` over ``R`` packed into 64-bit
words. The first term is the bit-serial product; the second is an offset correction that
only needs the activation planes, so it is computed once per output position (not per
output channel). Any position that is padding (spatial zero padding, channels added to fill
a 64-bit word, output channels added to fill a vector, the spare kernel columns of a folded
word, which the packing masks) holds ``x = 0`` in the activation
planes *and* ``u = 0`` in the weight planes, so it adds zero to both terms: the result is
the exact integer ``sum q*x`` and is returned as int32 (exact while ``|sum| < 2^31``, e.g.
any reduction length below 66,000 at 8x8 bits).

Packed weight layouts (``uint64``; bit ``j`` of word ``w`` is reduction element ``64*w + j``)
------------------------------------------------------------------------------------------
* ``"channel"`` (more than 32 input channels per group, a 1-column kernel, and dense):
  ``(groups, tiles, kh, kw, words, w_bits, tile)``: reduction element ``e`` is input channel
  ``e`` of the group, ``words = ceil(in_per_group / 64)``. Output channel ``o`` of a group is at
  ``[..., o // tile, ..., o % tile]``; ``tile`` (1, 2 or 4 registers of the target's uint64
  lanes, :func:`out_tile_lanes`) is the register tile of the inner loop and output channels
  are zero-padded to ``tiles * tile``,
  so each tile's weights are contiguous. Dense is this layout for a 1x1 kernel, one group.
* ``"folded"`` (2..32 input channels per group and a kernel wider than one column):
  ``(groups, tiles, kh, 1, words, w_bits, tile)``: the kernel columns are folded into the
  word. Element ``e`` is input channel ``e % slot`` at kernel column ``e // slot``, where
  ``slot`` is the channel count rounded up to a power of two and ``words = ceil(kw*slot/64)``;
  3 RGB channels x 11 columns fill one word instead of eleven.
* ``"window"`` (one input channel per group: depthwise, or a 1-channel input image):
  ``(groups, out_per_group, words, w_bits)``: element ``e`` is kernel tap ``(e // kw, e % kw)``,
  ``words = ceil(kh*kw / 64)``; one channel would fill only one bit of a channel word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import ConvShape, DenseShape

#: Bits per packed word (uint64).
WORD_BITS = 64
#: uint64 lanes of one vector register on the targets we know: 4 (AVX2 ymm) or 8 (AVX-512 zmm).
#: The output-channel tile of the packed weights is a multiple of the target's lane count, so
#: weights are packed for a target: pass ``lanes=vector_isa(target).uint64_lanes``.
UINT64_LANES = (4, 8)


def check_lanes(lanes: int) -> int:
    if lanes not in UINT64_LANES:
        raise ValueError(f"lanes must be one of {UINT64_LANES} (uint64 lanes per register); got {lanes!r}")
    return int(lanes)


def check_bits(bits: int, what: str) -> int:
    """``bits`` as an int after checking it is 1..8; raises ValueError saying ``what`` is wrong."""
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 8:
        raise ValueError(f"{what} must be an integer in 1..8; got {bits!r}")
    return int(bits)


def weight_level_range(w_bits: int) -> tuple[int, int]:
    """Smallest and largest signed weight level for ``w_bits`` (``(-1, 1)`` for 1 bit)."""
    w_bits = check_bits(w_bits, "w_bits")
    m = 1 if w_bits == 1 else 2 ** (w_bits - 1) - 1
    return (-m, m)


def activation_level_range(a_bits: int) -> tuple[int, int]:
    """Smallest and largest unsigned activation level for ``a_bits``."""
    a_bits = check_bits(a_bits, "a_bits")
    return (0, 2**a_bits - 1)


def weight_scale_offset(w_bits: int) -> tuple[int, int]:
    """``(s, M)`` with ``q = s*u - M`` for the unsigned code ``u`` of a ``w_bits`` weight."""
    w_bits = check_bits(w_bits, "w_bits")
    return (2, 1) if w_bits == 1 else (1, 2 ** (w_bits - 1) - 1)


def encode_weights(q: np.ndarray, w_bits: int) -> np.ndarray:
    """Unsigned codes ``u`` (uint8) of signed weight levels ``q``; raises ValueError off the level grid."""
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        if not np.all(np.round(q) == q):
            raise ValueError("weights must be integer levels (quantize before packing)")
        q = q.astype(np.int64)
    lo, hi = weight_level_range(w_bits)
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"{w_bits}-bit weights must lie in [{lo}, {hi}]; got [{q.min()}, {q.max()}]")
    if w_bits == 1:
        if q.size and np.any(q == 0):
            raise ValueError("1-bit weights must be -1 or +1; 0 is not a level")
        return ((q.astype(np.int64) + 1) // 2).astype(np.uint8)
    s, m = weight_scale_offset(w_bits)
    return (q.astype(np.int64) + m).astype(np.uint8)


def decode_weights(u: np.ndarray, w_bits: int) -> np.ndarray:
    """Signed levels (int64) of unsigned codes ``u``: the inverse of :func:`encode_weights`."""
    s, m = weight_scale_offset(w_bits)
    return s * np.asarray(u).astype(np.int64) - m


def pack_bits_along(bits01: np.ndarray, axis: int) -> np.ndarray:
    """Pack a 0/1 array along ``axis`` into uint64 words (bit ``j`` of word ``w`` = element ``64w+j``).

    The axis is zero-padded to a multiple of 64; its length becomes ``ceil(n / 64)``.
    """
    a = np.moveaxis(np.asarray(bits01, dtype=np.uint8), axis, -1)
    n = a.shape[-1]
    words = -(-n // WORD_BITS)
    padded = np.zeros(a.shape[:-1] + (words * WORD_BITS,), dtype=np.uint8)
    padded[..., :n] = a
    packed = np.packbits(padded, axis=-1, bitorder="little")  # 8 bytes per word, little-endian
    out = np.ascontiguousarray(packed).view("<u8").astype(np.uint64)
    return np.moveaxis(out, -1, axis)


def bit_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Split unsigned codes into ``bits`` 0/1 planes stacked on a new last axis (plane ``b`` = bit ``b``)."""
    codes = np.asarray(codes).astype(np.uint16)
    return np.stack([(codes >> b) & 1 for b in range(bits)], axis=-1).astype(np.uint8)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def out_tile_lanes(out_per_group: int, lanes: int) -> int:
    """Output channels per register tile of the channel/folded modes: 1, 2 or 4 registers of
    ``lanes`` uint64 lanes (4, 8 or 16 channels on AVX2; 8, 16 or 32 on AVX-512).

    The product loop keeps one tile of accumulators in vector registers, so output channels
    are padded to a whole number of tiles and stored tile by tile.
    """
    lanes = check_lanes(lanes)
    if out_per_group <= lanes:
        return lanes
    return 4 * lanes if round_up(out_per_group, 2 * lanes) % (4 * lanes) == 0 else 2 * lanes


@dataclass(frozen=True)
class WeightLayout:
    """Where each weight bit lives in the packed uint64 array (see the module docstring)."""

    mode: str  # "channel" | "folded" | "window"
    shape: tuple[int, ...]
    w_bits: int
    groups: int
    out_per_group: int
    #: Reduction elements per kernel column in a word (folded mode); channel mode: words * 64.
    slot: int

    @property
    def words(self) -> int:
        """Words along the reduction per kernel row+column (channel), per kernel row (folded) or per output (window)."""
        return self.shape[4] if self.mode != "window" else self.shape[2]

    @property
    def kernel_cols(self) -> int:
        """Kernel columns the inner loop walks: kw in channel mode, 1 when columns are folded into the word."""
        return self.shape[3] if self.mode != "window" else 1

    @property
    def tile(self) -> int:
        """Output channels per register tile (channel/folded)."""
        return self.shape[-1] if self.mode != "window" else 1

    @property
    def out_pad(self) -> int:
        """Output channels per group after padding to whole tiles (channel/folded)."""
        return self.shape[1] * self.shape[-1] if self.mode != "window" else self.out_per_group


def _next_pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


#: Fold kernel columns into the word when a group has at most this many input channels.
FOLD_MAX_CHANNELS = WORD_BITS // 2


def conv_weight_layout(shape: ConvShape, w_bits: int, lanes: int) -> WeightLayout:
    """The packed weight layout of a convolution (any input size, stride or padding) for a
    target with ``lanes`` uint64 lanes per register (:attr:`VectorIsa.uint64_lanes`).

    ``window`` when a group has one input channel; ``folded`` when it has 2..32 and the kernel
    is wider than one column; ``channel`` otherwise (see the module docstring).
    """
    w_bits = check_bits(w_bits, "w_bits")
    kh, kw = shape.kernel
    og, cg, g = shape.out_per_group, shape.in_per_group, shape.groups
    if cg == 1:
        twords = -(-(kh * kw) // WORD_BITS)
        return WeightLayout("window", (g, og, twords, w_bits), w_bits, g, og, 1)
    tile = out_tile_lanes(og, lanes)
    tiles = -(-og // tile)
    if cg <= FOLD_MAX_CHANNELS and kw > 1:
        slot = _next_pow2(cg)
        words = -(-(kw * slot) // WORD_BITS)
        return WeightLayout("folded", (g, tiles, kh, 1, words, w_bits, tile), w_bits, g, og, slot)
    cwords = -(-cg // WORD_BITS)
    return WeightLayout("channel", (g, tiles, kh, kw, cwords, w_bits, tile), w_bits, g, og, cwords * WORD_BITS)


def dense_weight_layout(shape: DenseShape, w_bits: int, lanes: int) -> WeightLayout:
    """The packed weight layout of a dense layer: the channel layout of a 1x1 conv with one group."""
    return conv_weight_layout(ConvShape(shape.in_features, shape.out_features, (1, 1), (1, 1)), w_bits, lanes)


def pack_weights(q_int: np.ndarray, w_bits: int, groups: int = 1, *, lanes: int) -> np.ndarray:
    """Pack signed weight levels into uint64 bit planes, once, ahead of time.

    ``q_int``: conv weights ``(out_channels, in_channels // groups, kh, kw)`` or dense weights
    ``(out_features, in_features)``, integer levels of ``w_bits`` (see the module docstring).
    ``lanes``: uint64 lanes per register of the target the kernel is built for
    (``vector_isa(target).uint64_lanes``), which sets the output-channel tile.
    Returns a C-contiguous uint64 array shaped ``conv_weight_layout(...).shape`` /
    ``dense_weight_layout(...).shape``; raises ``ValueError`` for levels off the ``w_bits`` grid.
    """
    q = np.asarray(q_int)
    if q.ndim == 2:
        q = q.reshape(q.shape[0], q.shape[1], 1, 1)
        groups = 1
    elif q.ndim != 4:
        raise ValueError(f"weights must be (O, C/groups, kh, kw) or (O, I); got shape {q.shape}")
    o, cg, kh, kw = q.shape
    if groups < 1 or o % groups:
        raise ValueError(f"groups={groups} must divide out_channels={o}")
    layout = conv_weight_layout(ConvShape(cg * groups, o, (kh, kw), (kh, kw), groups=groups), w_bits, lanes)
    u = encode_weights(q, w_bits)
    g, og = layout.groups, layout.out_per_group
    planes = bit_planes(u, w_bits).reshape(g, og, cg, kh, kw, w_bits)  # 0/1 per weight bit
    if layout.mode == "window":
        taps = planes.reshape(g, og, kh * kw, w_bits)  # row-major taps along the word
        return np.ascontiguousarray(pack_bits_along(taps, axis=2))
    if layout.mode == "folded":  # element e = kernel column * slot + channel, per kernel row
        elems = np.zeros((g, og, kh, kw, layout.slot, w_bits), dtype=np.uint8)
        elems[:, :, :, :, :cg] = planes.transpose(0, 1, 3, 4, 2, 5)
        elems = elems.reshape(g, og, kh, 1, kw * layout.slot, w_bits)
    else:  # element e = channel
        elems = planes.transpose(0, 1, 3, 4, 2, 5)  # (g, og, kh, kw, cg, B)
    words = pack_bits_along(elems, axis=4)  # (g, og, kh, kw_loop, words, B)
    padded = np.zeros((g, layout.out_pad) + words.shape[2:], dtype=np.uint64)
    padded[:, :og] = words
    tiles, tile = layout.shape[1], layout.tile
    tiled = padded.reshape((g, tiles, tile) + words.shape[2:])  # (g, T, t, kh, kw_loop, words, B)
    return np.ascontiguousarray(tiled.transpose(0, 1, 3, 4, 5, 6, 2))
