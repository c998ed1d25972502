"""Bit-exact tests of the TVM kernels against int64 numpy references.

Builds are cached per (kernel, shape, bits, layout, parallel) by ``releq_tvm.kernels.runtime``,
so the grids below cost one TVM build per distinct case (~0.3-0.8 s each). The full 8x8
(w_bits, a_bits) grid runs on one small shape; every other shape runs a rotating subset of
bit pairs that always includes 1-bit weights, odd widths and 8x8.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import releq_tvm.kernels as K
from releq_tvm.kernels.bench import CSV_COLUMNS, bench_kernels, measure_popcount_peak
from releq_tvm.kernels.bitserial import conv2d_tensors, schedule_bitserial
from releq_tvm.kernels.encoding import WORD_BITS, bit_planes, pack_bits_along
from releq_tvm.kernels.int8 import PARALLEL_MIN_CHUNKS, plan_int8_conv2d
from releq_tvm.kernels.target import vector_isa

SEED = 20240611
#: uint64 lanes of this host's vector unit: kernels built for the host read weights packed for it
HOST_LANES = K.vector_isa().uint64_lanes


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by the test case, so every case is reproducible on its own."""
    # zlib.crc32, not hash(): str hashes are salted per process, so they are no seed
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def random_weights(rng, shape, w_bits: int) -> np.ndarray:
    """Levels of ``w_bits`` with both extremes present."""
    lo, hi = K.weight_level_range(w_bits)
    if w_bits == 1:
        q = rng.choice(np.array([-1, 1]), size=shape)
    else:
        q = rng.integers(lo, hi + 1, size=shape)
    flat = q.reshape(-1)
    flat[0], flat[-1] = lo, hi
    return q


def random_activations(rng, shape, a_bits: int) -> np.ndarray:
    x = rng.integers(0, 2**a_bits, size=shape).astype(np.uint8)
    x.reshape(-1)[0] = 2**a_bits - 1
    return x


def popcount(words: np.ndarray) -> np.ndarray:
    as_bytes = np.ascontiguousarray(words, dtype=np.uint64).view(np.uint8)
    return np.unpackbits(as_bytes).reshape(words.shape + (64,)).sum(axis=-1).astype(np.int64)


# ------------------------------------------------------------------------------------------
# levels and encoding (numpy only)


def test_weight_levels_are_mid_tread_and_symmetric():
    assert K.weight_level_range(1) == (-1, 1)
    assert K.weight_level_range(2) == (-1, 1)
    assert K.weight_level_range(3) == (-3, 3)
    assert K.weight_level_range(8) == (-127, 127)
    assert K.activation_level_range(1) == (0, 1)
    assert K.activation_level_range(8) == (0, 255)


@settings(max_examples=60, deadline=None)
@given(w_bits=st.integers(1, 8), data=st.data())
def test_encode_decode_round_trip(w_bits, data):
    lo, hi = K.weight_level_range(w_bits)
    levels = [-1, 1] if w_bits == 1 else list(range(lo, hi + 1))
    q = np.array(data.draw(st.lists(st.sampled_from(levels), min_size=1, max_size=40)))
    u = K.encode_weights(q, w_bits)
    assert u.dtype == np.uint8 and u.max() < 2**w_bits  # fits in w_bits unsigned bits
    np.testing.assert_array_equal(K.decode_weights(u, w_bits), q)
    s, m = K.weight_scale_offset(w_bits)
    np.testing.assert_array_equal(s * u.astype(np.int64) - m, q)


def test_encode_rejects_values_off_the_grid():
    with pytest.raises(ValueError, match="-1 or \\+1"):
        K.encode_weights(np.array([1, 0, -1]), 1)
    with pytest.raises(ValueError, match="\\[-3, 3\\]"):
        K.encode_weights(np.array([4]), 3)
    with pytest.raises(ValueError, match="integer levels"):
        K.encode_weights(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="1..8"):
        K.weight_level_range(9)


@settings(max_examples=80, deadline=None)
@given(w_bits=st.integers(1, 8), a_bits=st.integers(1, 8), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_bit_plane_popcount_identity_gives_the_signed_dot_product(w_bits, a_bits, n, seed):
    """The encoding proof, numerically: s * sum 2^(b+c) pc(U_b & X_c) - M * sum 2^c pc(X_c) == sum q*x."""
    rng = np.random.default_rng(seed)
    q = random_weights(rng, (n,), w_bits)
    x = random_activations(rng, (n,), a_bits)
    s, m = K.weight_scale_offset(w_bits)
    u_planes = pack_bits_along(bit_planes(K.encode_weights(q, w_bits), w_bits), axis=0)  # (words, B)
    x_planes = pack_bits_along(bit_planes(x, a_bits), axis=0)  # (words, A)
    product = sum(
        (1 << (b + c)) * int(popcount(u_planes[:, b] & x_planes[:, c]).sum())
        for b in range(w_bits)
        for c in range(a_bits)
    )
    correction = sum((1 << c) * int(popcount(x_planes[:, c]).sum()) for c in range(a_bits))
    assert s * product - m * correction == int(np.dot(q.astype(np.int64), x.astype(np.int64)))


def test_pack_bits_along_puts_element_64w_plus_j_in_bit_j_of_word_w():
    bits = np.zeros((3, 130), dtype=np.uint8)
    bits[1, 0] = bits[1, 63] = bits[1, 64] = bits[2, 129] = 1
    words = pack_bits_along(bits, axis=1)
    assert words.shape == (3, 3) and words.dtype == np.uint64
    assert words[0].tolist() == [0, 0, 0]
    assert words[1].tolist() == [1 | (1 << 63), 1, 0]
    assert words[2].tolist() == [0, 0, 2]  # 129 = 2*64 + 1; bits 130..191 are zero padding


@pytest.mark.parametrize(
    "shape, lanes, mode, packed",
    [
        (K.ConvShape(8, 8, (9, 9), (3, 3), groups=8), 4, "window", (8, 1, 1, 3)),
        (K.ConvShape(8, 8, (9, 9), (3, 3), groups=8), 8, "window", (8, 1, 1, 3)),
        (K.ConvShape(1, 6, (28, 28), (5, 5)), 4, "window", (1, 6, 1, 3)),
        (K.ConvShape(3, 64, (227, 227), (11, 11), stride=4), 4, "folded", (1, 4, 11, 1, 1, 3, 16)),
        (K.ConvShape(3, 64, (227, 227), (11, 11), stride=4), 8, "folded", (1, 2, 11, 1, 1, 3, 32)),
        (K.ConvShape(16, 20, (8, 8), (3, 3)), 4, "folded", (1, 3, 3, 1, 1, 3, 8)),
        (K.ConvShape(16, 20, (8, 8), (3, 3)), 8, "folded", (1, 1, 3, 1, 1, 3, 32)),
        (K.ConvShape(33, 9, (8, 8), (5, 5)), 4, "channel", (1, 1, 5, 5, 1, 3, 16)),
        (K.ConvShape(33, 9, (8, 8), (5, 5)), 8, "channel", (1, 1, 5, 5, 1, 3, 16)),
        (K.ConvShape(130, 3, (8, 8), (1, 1)), 4, "channel", (1, 1, 1, 1, 3, 3, 4)),
        (K.ConvShape(130, 3, (8, 8), (1, 1)), 8, "channel", (1, 1, 1, 1, 3, 3, 8)),
    ],
)
def test_conv_weight_layout_modes_and_shapes(shape, lanes, mode, packed):
    """The output-channel tile is 1, 2 or 4 registers of the target's uint64 lanes (4 AVX2, 8 AVX-512)."""
    layout = K.conv_weight_layout(shape, 3, lanes)
    assert (layout.mode, layout.shape) == (mode, packed)


def test_weight_layout_rejects_a_lane_count_no_target_has():
    with pytest.raises(ValueError, match="lanes"):
        K.conv_weight_layout(K.ConvShape(16, 16, (8, 8), (3, 3)), 2, 16)


@pytest.mark.parametrize(
    "shape",
    [
        K.ConvShape(3, 20, (8, 8), (3, 5), groups=1),  # folded, slot 4
        K.ConvShape(70, 20, (8, 8), (2, 3), groups=1),  # channel, 2 words
        K.ConvShape(6, 6, (8, 8), (3, 3), groups=6),  # window
        K.ConvShape(8, 12, (8, 8), (3, 3), groups=4),  # folded, 3 groups of outputs per group
    ],
)
@pytest.mark.parametrize("lanes", [4, 8])
def test_pack_weights_puts_each_weight_bit_where_the_layout_says(shape, lanes):
    """Set one bit of one weight's code and find it at the documented coordinates."""
    w_bits = 3
    _, m = K.weight_scale_offset(w_bits)
    layout = K.conv_weight_layout(shape, w_bits, lanes)
    kh, kw = shape.kernel
    cg, og = shape.in_per_group, shape.out_per_group
    rng = rng_for("layout", shape, lanes)
    for _ in range(6):
        o, c, i, j, b = (int(rng.integers(n)) for n in (shape.out_channels, cg, kh, kw, w_bits))
        q = np.full(shape.weight_shape(), -m)  # code u = 0 everywhere
        q[o, c, i, j] = (1 << b) - m  # code u = 2^b
        packed = K.pack_weights(q, w_bits, shape.groups, lanes=lanes)
        assert packed.shape == layout.shape and packed.dtype == np.uint64
        g, ol = divmod(o, og)
        if layout.mode == "window":
            e = i * kw + j
            where = (g, ol, e // WORD_BITS, b)
        else:
            e = c if layout.mode == "channel" else j * layout.slot + c
            col = j if layout.mode == "channel" else 0
            where = (g, ol // layout.tile, i, col, e // WORD_BITS, b, ol % layout.tile)
        expected = np.zeros(layout.shape, dtype=np.uint64)
        expected[where] = np.uint64(1) << np.uint64(e % WORD_BITS)
        np.testing.assert_array_equal(packed, expected)


# ------------------------------------------------------------------------------------------
# references


def _naive_conv(x, q, shape):
    (kh, kw), (sh, sw), (ph, pw) = shape.kernel, shape.stride, shape.padding
    (h, w), (oh, ow) = shape.in_size, shape.out_size
    cg, og = shape.in_per_group, shape.out_per_group
    out = np.zeros(shape.output_shape(), dtype=np.int64)
    for n in range(shape.batch):
        for o in range(shape.out_channels):
            g = o // og
            for r in range(oh):
                for s in range(ow):
                    total = 0
                    for c in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                y, z = r * sh + i - ph, s * sw + j - pw
                                if 0 <= y < h and 0 <= z < w:
                                    total += int(x[n, g * cg + c, y, z]) * int(q[o, c, i, j])
                    out[n, o, r, s] = total
    return out


def test_conv2d_reference_hand_example():
    x = np.arange(9, dtype=np.uint8).reshape(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    q = np.array([[[[1, -1], [2, 0]]]])
    shape = K.ConvShape(1, 1, (3, 3), (2, 2))
    # top-left window [[0,1],[3,4]]: 0 - 1 + 6 + 0 = 5; every step right adds 1-1+2 = 2... by hand:
    expected = np.array([[[[0 - 1 + 6, 1 - 2 + 8], [3 - 4 + 12, 4 - 5 + 14]]]])
    np.testing.assert_array_equal(K.conv2d_reference(x, q, shape), expected)


@pytest.mark.parametrize(
    "shape",
    [
        K.ConvShape(4, 6, (7, 6), (3, 2), stride=(2, 1), padding=(1, 2), groups=2, batch=2),
        K.ConvShape(3, 3, (5, 5), (3, 3), stride=2, padding=1, groups=3),
    ],
)
def test_conv2d_reference_matches_naive_loops(shape):
    rng = rng_for("ref", shape)
    x = random_activations(rng, shape.input_shape(), 8)
    q = random_weights(rng, shape.weight_shape(), 8)
    np.testing.assert_array_equal(K.conv2d_reference(x, q, shape), _naive_conv(x, q, shape))
    nhwc = K.conv2d_reference(x.transpose(0, 2, 3, 1), q, shape, layout="NHWC")
    np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), _naive_conv(x, q, shape))


def test_dense_reference():
    x = np.array([[1, 2, 3]], dtype=np.uint8)
    q = np.array([[1, -1, 2], [0, 3, -3]])
    np.testing.assert_array_equal(K.dense_reference(x, q), [[1 - 2 + 6, 6 - 9]])


# ------------------------------------------------------------------------------------------
# target


def test_host_target_is_x86_llvm():
    target = K.host_target()
    assert target.kind.name == "llvm"
    assert str(target.attrs["mtriple"]).startswith("x86_64")
    assert str(target.attrs["mcpu"])


def test_avx2_detection_follows_the_cpu_name():
    from releq_tvm.kernels.target import target_has_avx2

    assert target_has_avx2(K.make_target("znver3")) and target_has_avx2(K.make_target("skylake"))
    assert not target_has_avx2(K.make_target("nehalem"))


@pytest.mark.parametrize("spec", [None, "host", "znver3", "skylake", {"kind": "llvm", "mcpu": "znver3"}])
def test_make_target_accepts_x86(spec):
    assert str(K.make_target(spec).attrs["mtriple"]).startswith("x86_64")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}, "x86"),
        ({"kind": "cuda"}, "kind"),
        ("cortex-a72", "unsupported target"),
        ("not-a-cpu", "unsupported target"),
        ({"kind": "llvm", "mcpu": "not-a-cpu"}, "does not know"),
    ],
)
def test_make_target_rejects_non_x86_with_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        K.make_target(spec)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# bitpack


@pytest.mark.parametrize(
    "data_shape, bits, axis",
    [((2, 70, 3, 8), 3, 1), ((5, 130), 8, 1), ((3, 1, 4), 1, 1), ((9, 4), 2, 0), ((2, 64, 5), 5, 1)],
)
def test_bitpack_matches_numpy(data_shape, bits, axis):
    import tvm

    lib = tvm.compile(K.bitpack_primfunc(data_shape, bits, axis).with_attr("global_symbol", "main"),
                      target=K.host_target())
    x = random_activations(rng_for("pack", data_shape, bits), data_shape, bits)
    words = -(-data_shape[axis] // WORD_BITS)
    out = tvm.runtime.tensor(np.zeros(data_shape[:axis] + (words, bits) + data_shape[axis + 1:], np.uint64))
    lib["main"](tvm.runtime.tensor(x), out)
    expected = np.moveaxis(pack_bits_along(bit_planes(x, bits), axis), -1, axis + 1)
    np.testing.assert_array_equal(out.numpy(), expected)


# ------------------------------------------------------------------------------------------
# bit-serial conv2d / dense: exact equality with the reference

CONV_CASES = [
    # (id, shape, layout)
    ("folded_3x3_p1", K.ConvShape(16, 16, (8, 8), (3, 3), padding=(1, 1)), "NCHW"),
    ("lenet_conv2_folded_5x5", K.ConvShape(6, 16, (14, 14), (5, 5)), "NCHW"),
    ("channel_2words_s2_odd", K.ConvShape(70, 20, (7, 9), (3, 3), stride=2, padding=(1, 1)), "NCHW"),
    ("channel_2words_s2_nhwc", K.ConvShape(70, 20, (7, 9), (3, 3), stride=2, padding=(1, 1)), "NHWC"),
    ("channel_64_exact_word", K.ConvShape(64, 64, (6, 6), (3, 3), padding=(1, 1)), "NCHW"),
    ("channel_33in_9out_5x5", K.ConvShape(33, 9, (7, 8), (5, 5), padding=(2, 2)), "NCHW"),
    ("pointwise_odd_1x1", K.ConvShape(5, 7, (6, 5), (1, 1)), "NCHW"),
    ("one_channel_input_5x5", K.ConvShape(1, 6, (12, 12), (5, 5)), "NCHW"),
    ("one_channel_one_output", K.ConvShape(1, 1, (5, 7), (3, 3), padding=(1, 1)), "NCHW"),
    ("depthwise_3x3_p1", K.ConvShape(8, 8, (9, 9), (3, 3), padding=(1, 1), groups=8), "NCHW"),
    ("depthwise_3x3_s2_nhwc", K.ConvShape(6, 6, (9, 10), (3, 3), stride=2, padding=(1, 1), groups=6), "NHWC"),
    ("depthwise_multiplier_2", K.ConvShape(3, 6, (7, 7), (3, 3), padding=(1, 1), groups=3), "NCHW"),
    ("grouped_4", K.ConvShape(8, 12, (6, 6), (3, 3), padding=(1, 1), groups=4), "NCHW"),
    ("grouped_2_channel_mode", K.ConvShape(80, 16, (5, 9), (3, 3), padding=(1, 1), groups=2), "NCHW"),
    ("folded_2words_16ch_5x5", K.ConvShape(16, 8, (9, 9), (5, 5), padding=(2, 2)), "NCHW"),
    ("folded_2words_32ch_s2", K.ConvShape(32, 12, (9, 11), (3, 3), stride=2, padding=(1, 1)), "NHWC"),
    ("alexnet_like_11x11_s4", K.ConvShape(3, 8, (31, 31), (11, 11), stride=4, padding=(2, 2)), "NCHW"),
    ("depthwise_11x11_s4_2words", K.ConvShape(2, 4, (31, 31), (11, 11), stride=4, padding=(2, 2), groups=2), "NCHW"),
    ("depthwise_8x9_72taps", K.ConvShape(2, 2, (12, 13), (8, 9), padding=(1, 1), groups=2), "NCHW"),
    # rows of 74 and 112 bits: the row-stream cuts straddle two words
    ("depthwise_wide_row_s2", K.ConvShape(2, 2, (6, 70), (3, 6), stride=(1, 2), padding=(1, 2), groups=2), "NCHW"),
    ("folded_8slot_wide_row_s2", K.ConvShape(5, 3, (4, 27), (3, 3), stride=2, padding=(1, 1)), "NHWC"),
    ("even_2x2_s2_batch3", K.ConvShape(4, 4, (8, 6), (2, 2), stride=2, batch=3), "NCHW"),
    ("rect_kernel_1x3_pad", K.ConvShape(40, 5, (5, 9), (1, 3), padding=(0, 1)), "NHWC"),
]
BIT_PAIR_ROTATION = [(1, 1), (2, 3), (8, 8), (1, 5), (3, 2), (4, 4), (5, 7), (7, 1), (6, 8)]


def _bit_pairs_for(index: int) -> list[tuple[int, int]]:
    """Three pairs per shape: always 1-bit weights or 8x8 somewhere, rotating the rest."""
    n = len(BIT_PAIR_ROTATION)
    return [BIT_PAIR_ROTATION[(index * 3 + k) % n] for k in range(3)]


CONV_GRID = [
    pytest.param(shape, layout, w, a, id=f"{name}-w{w}a{a}")
    for index, (name, shape, layout) in enumerate(CONV_CASES)
    for w, a in _bit_pairs_for(index)
]


def _check_conv(shape, layout, w_bits, a_bits, parallel=None, x=None, q=None):
    kernel = K.build_bitserial_conv2d(shape, w_bits, a_bits, layout=layout, parallel=parallel)
    rng = rng_for("conv", shape, layout, w_bits, a_bits)
    x = random_activations(rng, shape.input_shape(layout), a_bits) if x is None else x
    q = random_weights(rng, shape.weight_shape(), w_bits) if q is None else q
    out = kernel(x, kernel.pack(q))
    assert out.dtype == np.int32 and out.shape == shape.output_shape(layout)
    np.testing.assert_array_equal(out, K.conv2d_reference(x, q, shape, layout))


@pytest.mark.parametrize("shape, layout, w_bits, a_bits", CONV_GRID)
def test_bitserial_conv2d_is_exact(shape, layout, w_bits, a_bits):
    _check_conv(shape, layout, w_bits, a_bits)


@pytest.mark.parametrize("w_bits", range(1, 9))
@pytest.mark.parametrize("a_bits", range(1, 9))
def test_bitserial_full_bit_grid_on_a_small_conv(w_bits, a_bits):
    _check_conv(K.ConvShape(5, 6, (5, 4), (3, 3), padding=(1, 1)), "NCHW", w_bits, a_bits)


@pytest.mark.parametrize(
    "shape, w_bits, a_bits",
    [
        (K.ConvShape(64, 32, (8, 8), (3, 3), padding=(1, 1)), 2, 2),  # channel
        (K.ConvShape(16, 16, (10, 10), (3, 3), padding=(1, 1)), 1, 3),  # folded
        (K.ConvShape(16, 16, (10, 10), (3, 3), padding=(1, 1), groups=16), 3, 1),  # window
    ],
)
def test_bitserial_conv2d_parallel_schedule_is_exact(shape, w_bits, a_bits):
    _check_conv(shape, "NCHW", w_bits, a_bits, parallel=True)


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (1, 8), (2, 1)])
def test_bitserial_extreme_levels_and_padding_reach_the_int32_sums(w_bits, a_bits):
    """All activations at their maximum, weights at one extreme: border outputs see only real taps."""
    shape = K.ConvShape(64, 8, (6, 6), (3, 3), padding=(1, 1))
    lo, hi = K.weight_level_range(w_bits)
    x = np.full(shape.input_shape(), 2**a_bits - 1, dtype=np.uint8)
    for level in (lo, hi):
        q = np.full(shape.weight_shape(), level)
        _check_conv(shape, "NCHW", w_bits, a_bits, x=x, q=q)
        kernel = K.build_bitserial_conv2d(shape, w_bits, a_bits)
        out = kernel(x, kernel.pack(q))
        corner, centre = 64 * 4 * level * (2**a_bits - 1), 64 * 9 * level * (2**a_bits - 1)
        assert out[0, 0, 0, 0] == corner and out[0, 0, 2, 2] == centre


DENSE_GRID = [
    pytest.param(K.DenseShape(400, 120), 1, 1, id="lenet_fc1-w1a1"),
    pytest.param(K.DenseShape(400, 120), 2, 3, id="lenet_fc1-w2a3"),
    pytest.param(K.DenseShape(65, 3, batch=2), 8, 8, id="tail_word_batch2-w8a8"),
    pytest.param(K.DenseShape(1, 1), 1, 8, id="one_by_one-w1a8"),
    pytest.param(K.DenseShape(64, 17), 5, 2, id="exact_word_17out-w5a2"),
    pytest.param(K.DenseShape(512, 512), 1, 1, id="dense512-w1a1"),
    pytest.param(K.DenseShape(84, 10, batch=3), 4, 6, id="lenet_fc3_batch3-w4a6"),
]


DENSE_PARALLEL = [
    pytest.param(K.DenseShape(400, 120), 2, 3, True, id="lenet_fc1-w2a3-parallel"),
    pytest.param(K.DenseShape(512, 512), 1, 1, True, id="dense512-w1a1-parallel"),
]


@pytest.mark.parametrize("shape, w_bits, a_bits, parallel",
                         [pytest.param(*p.values, None, id=p.id) for p in DENSE_GRID] + DENSE_PARALLEL)
def test_bitserial_dense_is_exact(shape, w_bits, a_bits, parallel):
    kernel = K.build_bitserial_dense(shape, w_bits, a_bits, parallel=parallel)
    rng = rng_for("dense", shape, w_bits, a_bits)
    x = random_activations(rng, shape.input_shape(), a_bits)
    q = random_weights(rng, shape.weight_shape(), w_bits)
    out = kernel(x, kernel.pack(q))
    assert out.dtype == np.int32 and out.shape == shape.output_shape()
    np.testing.assert_array_equal(out, K.dense_reference(x, q))


# ------------------------------------------------------------------------------------------
# int8 baseline


INT8_CASES = [
    pytest.param(shape, layout, id=name)
    for name, shape, layout in CONV_CASES
    if name not in ("channel_64_exact_word", "depthwise_11x11_s4_2words")
] + [pytest.param(K.ConvShape(64, 32, (8, 8), (3, 3), padding=(1, 1)), "NCHW", id="channel_64_to_32")]


@pytest.mark.parametrize("shape, layout", INT8_CASES)
def test_int8_conv2d_is_exact_over_full_ranges(shape, layout):
    kernel = K.build_int8_conv2d(shape, layout=layout)
    rng = rng_for("int8", shape, layout)
    x = rng.integers(0, 256, size=shape.input_shape(layout)).astype(np.uint8)
    q = rng.integers(-128, 128, size=shape.weight_shape())
    x.reshape(-1)[:2], q.reshape(-1)[:2] = 255, (-128, 127)
    out = kernel(x, kernel.pack(q))
    np.testing.assert_array_equal(out, K.conv2d_reference(x, q, shape, layout))


@pytest.mark.parametrize("parallel", [False, True])
def test_int8_extremes_do_not_saturate(parallel):
    """255 * -128 in every product: vpmaddubsw would saturate here, vpmaddwd must not."""
    shape = K.ConvShape(64, 16, (6, 6), (3, 3), padding=(1, 1))
    kernel = K.build_int8_conv2d(shape, parallel=parallel)
    x = np.full(shape.input_shape(), 255, dtype=np.uint8)
    q = np.full(shape.weight_shape(), -128)
    out = kernel(x, kernel.pack(q))
    np.testing.assert_array_equal(out, K.conv2d_reference(x, q, shape))
    assert out[0, 0, 2, 2] == 64 * 9 * 255 * -128


@pytest.mark.parametrize(
    "shape", [K.DenseShape(400, 120), K.DenseShape(65, 3, batch=2), K.DenseShape(512, 512), K.DenseShape(1, 1)],
    ids=str,
)
def test_int8_dense_is_exact(shape):
    kernel = K.build_int8_dense(shape)
    rng = rng_for("int8dense", shape)
    x = rng.integers(0, 256, size=shape.input_shape()).astype(np.uint8)
    q = rng.integers(-128, 128, size=shape.weight_shape())
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.dense_reference(x, q))


def test_int8_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="-128, 127"):
        K.pack_int8_weights(np.array([[128]]))


# int8 on AVX-512 VNNI (vpdpbusd) and on AVX2 (vpmaddwd), chosen from the target

HOST_INT8 = vector_isa().int8
needs_vnni = pytest.mark.skipif(
    HOST_INT8 != "avx512-vnni", reason=f"this host's int8 path is {HOST_INT8!r}, not AVX-512 VNNI (vpdpbusd)"
)

VNNI_CONV_CASES = [
    pytest.param(K.ConvShape(16, 32, (8, 8), (3, 3), padding=(1, 1)), "NCHW", None, id="3x3_16_to_32"),
    pytest.param(K.ConvShape(3, 10, (9, 7), (3, 3), padding=(1, 1)), "NCHW", None, id="odd_3_to_10"),
    pytest.param(K.ConvShape(17, 33, (7, 9), (3, 3), padding=(1, 1)), "NCHW", None, id="odd_17_to_33"),
    pytest.param(K.ConvShape(17, 33, (7, 9), (3, 3), padding=(1, 1)), "NHWC", None, id="odd_17_to_33_nhwc"),
    pytest.param(K.ConvShape(24, 48, (11, 10), (3, 3), stride=2, padding=(1, 1)), "NCHW", None, id="stride2"),
    pytest.param(K.ConvShape(64, 64, (5, 30), (3, 3), padding=(1, 1)), "NHWC", True, id="64_to_64_parallel_nhwc"),
    pytest.param(K.ConvShape(32, 40, (6, 6), (3, 3), padding=(1, 1), groups=2), "NCHW", None, id="grouped_2"),
]


def _full_range(rng, shape, layout="NCHW"):
    """uint8 activations and int8 weights over their whole ranges, both extremes present."""
    x = rng.integers(0, 256, size=shape.input_shape(layout) if isinstance(shape, K.ConvShape) else shape.input_shape())
    q = rng.integers(-128, 128, size=shape.weight_shape())
    x.reshape(-1)[:2], q.reshape(-1)[:3] = 255, (-128, 127, -128)
    return x.astype(np.uint8), q


@needs_vnni
@pytest.mark.parametrize("shape, layout, parallel", VNNI_CONV_CASES)
def test_int8_conv2d_vnni_is_exact(shape, layout, parallel):
    kernel = K.build_int8_conv2d(shape, layout=layout, parallel=parallel)
    assert "vpdpbusd" in kernel.module.inspect_source("s")
    tile = kernel.weight_shape[-1] // 4  # channel quads of `tile` outputs
    assert tile % 16 == 0 and kernel.weight_shape[-2] == -(-shape.in_per_group // 4)
    x, q = _full_range(rng_for("int8vnni", shape, layout), shape, layout)
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.conv2d_reference(x, q, shape, layout))


@needs_vnni
@pytest.mark.parametrize("shape", [K.DenseShape(512, 512), K.DenseShape(100, 10), K.DenseShape(70, 33, batch=3)],
                         ids=["512x512", "100x10", "70x33_batch3"])
def test_int8_dense_vnni_is_exact(shape):
    kernel = K.build_int8_dense(shape)
    assert "vpdpbusd" in kernel.module.inspect_source("s")
    x, q = _full_range(rng_for("int8vnni_dense", shape), shape)
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.dense_reference(x, q))


@needs_vnni
def test_int8_vnni_extremes_do_not_saturate():
    """vpdpbusd, not vpdpbusds: 4 * 255 * -128 per lane and 64 * 9 * 255 * 127 per output stay exact."""
    shape = K.ConvShape(64, 16, (6, 6), (3, 3), padding=(1, 1))
    kernel = K.build_int8_conv2d(shape)
    x = np.full(shape.input_shape(), 255, dtype=np.uint8)
    for level in (-128, 127):
        q = np.full(shape.weight_shape(), level)
        out = kernel(x, kernel.pack(q))
        np.testing.assert_array_equal(out, K.conv2d_reference(x, q, shape))
        assert out[0, 0, 2, 2] == 64 * 9 * 255 * level


@pytest.mark.skipif(HOST_INT8 not in ("avx512-vnni", "avx-vnni"), reason=f"this host has no VNNI ({HOST_INT8!r})")
@pytest.mark.parametrize("shape", [K.ConvShape(17, 33, (7, 9), (3, 3), padding=(1, 1)), K.DenseShape(100, 10)],
                         ids=["conv_17_to_33", "dense_100x10"])
def test_int8_vnni_on_ymm_is_exact(shape):
    """The 8-lane ``vpdpbusd.256`` path (AVX-VNNI CPUs), run here as its AVX512-VL encoding."""
    import tvm

    isa = dataclasses.replace(vector_isa(), int8="avx-vnni")
    assert isa.int32_lanes == 8
    dense = isinstance(shape, K.DenseShape)
    func = K.int8_dense_primfunc(shape, isa=isa) if dense else K.int8_conv2d_primfunc(shape, isa=isa)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
    asm = lib.mod.inspect_source("s")
    assert re.search(r"vpdpbusd\s[^\n]*ymm", asm) and not re.search(r"vpdpbusd\s[^\n]*zmm", asm)
    x, q = _full_range(rng_for("int8vnni_ymm", shape), shape)
    packed = K.pack_int8_weights(q, 1 if dense else shape.groups, isa=isa)
    assert packed.shape[-1] in (32, 64)  # channel quads of 8 or 16 outputs
    out = tvm.runtime.tensor(np.zeros(shape.output_shape(), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed), out)
    expected = K.dense_reference(x, q) if isinstance(shape, K.DenseShape) else K.conv2d_reference(x, q, shape)
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize(
    "shape, layout",
    [
        pytest.param(K.ConvShape(16, 32, (8, 8), (3, 3), padding=(1, 1)), "NCHW", id="conv_16_to_32"),
        pytest.param(K.ConvShape(17, 33, (7, 9), (3, 3), stride=2, padding=(1, 1)), "NHWC", id="conv_17_to_33_s2_nhwc"),
        pytest.param(K.DenseShape(512, 512), None, id="dense_512x512"),
        pytest.param(K.DenseShape(100, 10), None, id="dense_100x10"),
    ],
)
def test_int8_pmaddwd_path_for_avx2_targets_is_exact(shape, layout):
    """Built for ``haswell`` (no VNNI) the kernels keep vpmaddwd on channel pairs; it runs on any AVX2 host."""
    if isinstance(shape, K.DenseShape):
        kernel = K.build_int8_dense(shape, target="haswell")
        x, q = _full_range(rng_for("int8avx2", shape), shape)
        expected = K.dense_reference(x, q)
    else:
        kernel = K.build_int8_conv2d(shape, target="haswell", layout=layout)
        x, q = _full_range(rng_for("int8avx2", shape, layout), shape, layout)
        expected = K.conv2d_reference(x, q, shape, layout)
    asm = kernel.module.inspect_source("s")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm
    assert kernel.weight_shape[-1] in (16, 32)  # channel pairs of 8 or 16 outputs
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), expected)


@pytest.mark.parametrize("cpu", ["znver4", "icelake-server", "sapphirerapids"])
def test_int8_vnni_targets_compile_to_vpdpbusd_on_zmm(cpu):
    """Any host: LLVM emits code for any mcpu. Intel's 'prefer-256-bit' tuning does not narrow
    the explicit 512-bit intrinsic, so these use zmm too."""
    assert vector_isa(cpu).int8 == "avx512-vnni"
    kernel = K.build_int8_dense(K.DenseShape(512, 512), target=cpu)
    asm = kernel.module.inspect_source("s")
    assert re.search(r"vpdpbusd\s[^\n]*zmm", asm) and "vpmaddwd" not in asm
    assert kernel.weight_shape == (1, 512 // 64, 1, 1, 128, 4 * 64)


def test_int8_avx_vnni_target_compiles_to_vex_vpdpbusd_on_ymm():
    """An AVX-VNNI CPU without AVX-512 (Alder Lake) gets the VEX ``{vex} vpdpbusd`` on ymm."""
    assert vector_isa("alderlake").int8 == "avx-vnni"
    asm = K.build_int8_dense(K.DenseShape(512, 512), target="alderlake").module.inspect_source("s")
    assert re.search(r"\{vex\}\s*vpdpbusd\s[^\n]*ymm", asm) and "zmm" not in asm


def test_int8_avx2_target_compiles_to_vpmaddwd():
    asm = K.build_int8_dense(K.DenseShape(512, 512), target="haswell").module.inspect_source("s")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm


def _packed_znver4_int8(shape: K.ConvShape, layout: tuple[str, tuple[int, ...]], key: str):
    """Seeded int8 weight levels of ``shape`` and their znver4 packing, whose (mode, shape) must be ``layout``;
    returns (rng, levels, packed) for the caller's spot checks."""
    isa = vector_isa("znver4")
    assert K.int8_weight_shape(shape, isa) == layout
    rng = rng_for(key)
    q = rng.integers(-128, 128, size=shape.weight_shape())
    packed = K.pack_int8_weights(q, shape.groups, isa=isa)
    assert packed.shape == layout[1] and packed.dtype == np.int8
    return rng, q, packed


def test_pack_int8_weights_vnni_layout_puts_each_weight_where_the_docstring_says():
    """Channel ``4p + k`` of output ``o`` at ``[g, o // tile, i, j, p, 4 * (o % tile) + k]`` (any host: numpy only)."""
    shape = K.ConvShape(34, 66, (8, 8), (3, 2), groups=2)  # per group: 17 channels -> 5 quads, 33 outputs -> 3 x 16
    rng, q, packed = _packed_znver4_int8(shape, ("channel", (2, 3, 3, 2, 5, 64)), "int8vnni_layout")
    tile, og = 16, shape.out_per_group
    for o, c, i, j in zip(*(rng.integers(0, n, 40) for n in q.shape)):
        g, ol = divmod(int(o), og)
        assert packed[g, ol // tile, i, j, c // 4, 4 * (ol % tile) + c % 4] == q[o, c, i, j]
    # padding: channels 17..19 and outputs 33..47 of each group are zero
    assert not packed[:, :, :, :, 4, :].reshape(2, 3, 3, 2, 16, 4)[..., 1:].any()
    assert not packed[:, 2].reshape(2, 3, 2, 5, 16, 4)[:, :, :, :, og - 2 * tile:].any()


#: AlexNet's conv1 (3 channels, 11x11, stride 4, padding 2) on a smaller image: 15x15 outputs
CONV1_LIKE = K.ConvShape(3, 64, (63, 63), (11, 11), stride=4, padding=2)

COLUMN_CASES = [
    pytest.param("avx512-vnni", CONV1_LIKE, "NCHW", None, id="vnni_conv1_like"),
    pytest.param("avx512-vnni", K.ConvShape(3, 20, (17, 13), (5, 5), padding=2), "NHWC", True, id="vnni_3ch_5x5_nhwc"),
    pytest.param("avx512-vnni", K.ConvShape(4, 40, (9, 11), (3, 3), stride=(2, 1), padding=(1, 0), groups=2), "NCHW",
                 None, id="vnni_2ch_per_group"),
    pytest.param("avx-vnni", CONV1_LIKE, "NCHW", None, id="ymm_conv1_like"),
    pytest.param("pmaddwd", CONV1_LIKE, "NCHW", None, id="pmaddwd_conv1_like"),
    pytest.param("pmaddwd", K.ConvShape(6, 34, (10, 12), (7, 5), stride=(1, 3), padding=(3, 2), groups=2), "NHWC",
                 False, id="pmaddwd_3ch_per_group_nhwc"),
]


def _int8_isa_and_target(int8: str):
    """``(isa, target)`` running the ``int8`` path on this host (VNNI paths need a VNNI host)."""
    if int8 == "pmaddwd":
        return vector_isa("haswell"), K.make_target("haswell")
    if HOST_INT8 != "avx512-vnni":
        pytest.skip(f"this host's int8 path is {HOST_INT8!r}: {int8} runs only on an AVX-512 VNNI host here")
    return dataclasses.replace(vector_isa(), int8=int8), K.host_target()  # avx-vnni: its AVX512-VL encoding


@pytest.mark.parametrize("int8, shape, layout, parallel", COLUMN_CASES)
def test_int8_column_mode_is_exact(int8, shape, layout, parallel):
    """Few-channel inputs pack (kernel column, channel) terms into one dot block; blocks that run
    past a kernel row read the next image column, which the zero weights must cancel."""
    import tvm

    isa, target = _int8_isa_and_target(int8)
    plan = plan_int8_conv2d(shape, layout, parallel, isa)
    dot = 4 if int8 != "pmaddwd" else 2
    kw, cg = shape.kernel[1], shape.in_per_group
    assert plan.mode == "column" and plan.weight_shape[3:5] == (1, -(-(kw * cg) // dot))
    func = K.int8_conv2d_primfunc(shape, layout, parallel, isa)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    assert ("vpmaddwd" if int8 == "pmaddwd" else "vpdpbusd") in lib.mod.inspect_source("s")
    x, q = _full_range(rng_for("int8column", int8, shape, layout), shape, layout)
    out = tvm.runtime.tensor(np.zeros(shape.output_shape(layout), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(K.pack_int8_weights(q, shape.groups, isa=isa)), out)
    np.testing.assert_array_equal(out.numpy(), K.conv2d_reference(x, q, shape, layout))


def test_int8_column_mode_only_where_it_saves_product_slots():
    vnni, avx2 = vector_isa("znver4"), vector_isa("haswell")
    assert K.int8_weight_shape(K.ConvShape(3, 64, (224, 224), (11, 11)), vnni) == ("column", (1, 1, 11, 1, 9, 256))
    assert K.int8_weight_shape(K.ConvShape(3, 64, (224, 224), (11, 11)), avx2)[0] == "column"  # 34 slots, not 44
    assert K.int8_weight_shape(K.ConvShape(3, 16, (8, 8), (3, 3)), vnni)[0] == "channel"  # 12 slots either way
    assert K.int8_weight_shape(K.ConvShape(2, 16, (8, 8), (3, 3)), avx2)[0] == "channel"  # pairs fill exactly
    assert K.int8_weight_shape(K.ConvShape(5, 16, (8, 8), (7, 7)), vnni)[0] == "channel"  # not an image input
    assert K.int8_weight_shape(K.ConvShape(1, 16, (8, 8), (5, 5)), vnni)[0] == "window"


def test_pack_int8_weights_column_layout_puts_each_weight_where_the_docstring_says():
    """Term ``f = j * cg + c`` of kernel row ``i`` at ``[g, o // tile, i, 0, f // 4, 4 * (o % tile) + f % 4]``."""
    shape = K.ConvShape(6, 34, (8, 8), (3, 5), groups=2)  # per group: 3 channels x 5 columns = 15 terms -> 4 blocks
    rng, q, packed = _packed_znver4_int8(shape, ("column", (2, 1, 3, 1, 4, 128)), "int8column_layout")
    tile, og, cg = 32, shape.out_per_group, shape.in_per_group
    for o, c, i, j in zip(*(rng.integers(0, n, 40) for n in q.shape)):
        g, ol = divmod(int(o), og)
        f = j * cg + c
        assert packed[g, ol // tile, i, 0, f // 4, 4 * (ol % tile) + f % 4] == q[o, c, i, j]
    # padding: term 15 and outputs 17..31 of each group are zero
    blocks = packed.reshape(2, 1, 3, 1, 4, tile, 4)
    assert not blocks[:, :, :, :, 3, :, 3].any() and not blocks[:, :, :, :, :, og:].any()


@pytest.mark.parametrize("cpu", ["znver4", "icelake-server"])
def test_int8_column_mode_compiles_to_vpdpbusd_on_zmm_without_spills(cpu):
    """Any host. The kernel rows are the inner reduction loop: with the blocks innermost, LLVM
    unrolled them and kept the overlapping activation broadcasts of neighbouring columns live,
    spilling zmm registers to the stack in the product loop."""
    kernel = K.build_int8_conv2d(K.ConvShape(3, 64, (224, 224), (11, 11), stride=4, padding=2), target=cpu)
    assert kernel.weight_shape == (1, 1, 11, 1, 9, 256)
    asm = kernel.module.inspect_source("s")
    assert re.search(r"vpdpbusd\s[^\n]*zmm", asm) and "vpmaddwd" not in asm
    assert not re.search(r"vmov\w*\s+%zmm\d+, -?\d*\(%rsp\)", asm)


# ------------------------------------------------------------------------------------------
# the API the compile stage uses


def _params(func):
    return [(str(p.dtype), tuple(int(d) for d in p.shape)) for p in func.params]


def test_primfunc_signatures_are_as_documented():
    conv = K.ConvShape(16, 32, (8, 8), (3, 3), padding=(1, 1))
    func = K.bitserial_conv2d_primfunc(conv, 2, 3)
    assert _params(func) == [
        ("uint8", (1, 16, 8, 8)),
        ("uint64", K.conv_weight_layout(conv, 2, HOST_LANES).shape),
        ("int32", (1, 32, 8, 8)),
    ]
    assert "global_symbol" not in func.attrs  # named by whoever adds it to a module
    nhwc = K.bitserial_conv2d_primfunc(conv, 2, 3, layout="NHWC")
    assert _params(nhwc)[0] == ("uint8", (1, 8, 8, 16)) and _params(nhwc)[2] == ("int32", (1, 8, 8, 32))
    dense = K.DenseShape(400, 120)
    assert _params(K.bitserial_dense_primfunc(dense, 1, 1)) == [
        ("uint8", (1, 400)),
        ("uint64", K.dense_weight_layout(dense, 1, HOST_LANES).shape),
        ("int32", (1, 120)),
    ]
    assert _params(K.int8_conv2d_primfunc(conv)) == [
        ("uint8", (1, 16, 8, 8)),
        ("int8", K.int8_weight_shape(conv)[1]),
        ("int32", (1, 32, 8, 8)),
    ]


def test_primfuncs_run_inside_a_relax_module():
    import tvm
    from tvm import relax

    conv = K.ConvShape(6, 16, (10, 10), (3, 3), padding=(1, 1))
    dense = K.DenseShape(16 * 10 * 10, 10)
    w_bits, a_bits = 2, 3
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(conv.input_shape(), "uint8"))
    w_conv = relax.Var("w_conv", relax.TensorType(K.conv_weight_layout(conv, w_bits, HOST_LANES).shape, "uint64"))
    w_int8 = relax.Var("w_int8", relax.TensorType(K.int8_weight_shape(conv)[1], "int8"))
    with builder.function("main", [x, w_conv, w_int8]):
        conv_fn = builder.add_func(K.bitserial_conv2d_primfunc(conv, w_bits, a_bits), "conv_bitserial")
        int8_fn = builder.add_func(K.int8_conv2d_primfunc(conv), "conv_int8")
        with builder.dataflow():
            y = builder.emit(relax.call_tir(conv_fn, [x, w_conv], relax.TensorType(conv.output_shape(), "int32")))
            z = builder.emit(relax.call_tir(int8_fn, [x, w_int8], relax.TensorType(conv.output_shape(), "int32")))
            out = builder.emit_output(relax.Tuple([y, z]))
        builder.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(builder.get(), target=K.host_target()), tvm.cpu())
    rng = rng_for("relax")
    xv = random_activations(rng, conv.input_shape(), a_bits)
    q = random_weights(rng, conv.weight_shape(), w_bits)
    y, z = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(K.pack_weights(q, w_bits, lanes=HOST_LANES)),
                      tvm.runtime.tensor(K.pack_int8_weights(q)))
    expected = K.conv2d_reference(xv, q, conv)
    np.testing.assert_array_equal(y.numpy(), expected)
    np.testing.assert_array_equal(z.numpy(), expected)
    del dense


def test_built_kernel_rejects_wrong_inputs_with_a_message():
    shape = K.ConvShape(16, 16, (8, 8), (3, 3), padding=(1, 1))
    kernel = K.build_bitserial_conv2d(shape, 1, 1)
    x, w = kernel.random_inputs()
    with pytest.raises(ValueError, match="uint8 activations"):
        kernel(x.astype(np.int32), w)
    with pytest.raises(ValueError, match="packed weights"):
        kernel(x, w[..., :1])
    with pytest.raises(ValueError, match="layout must be"):
        K.build_bitserial_conv2d(shape, 1, 1, layout="NCWH")


def test_kernel_timing_reports_a_positive_median_and_spread():
    """A built kernel timed by the project's one protocol (the timer `releq-tvm bench kernels` passes)."""
    from releq_tvm.compile.layers import KernelTiming
    from releq_tvm.timing import TimingConfig

    kernel = K.build_bitserial_dense(K.DenseShape(400, 120), 1, 1)
    timer = KernelTiming(TimingConfig(repeats=5, min_repeat_ms=2, warmup=1))
    timing = timer({"fc": (kernel, kernel.arguments(*kernel.random_inputs()))})["fc"]
    assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"] < 100
    assert timing["iqr_ms"] >= 0 and timing["repeats"] == 5 and timing["protocol"] == "warm"


def test_measured_peaks_are_positive():
    peak = measure_popcount_peak(repeat=3)
    assert peak.gbinary_ops_per_s > 1 and peak.gmacs_int8_per_s > 0.1 and peak.threads >= 1


def _peak_reference(kind: str, args: list[np.ndarray], reps: int) -> np.ndarray:
    """What the peak loops compute, in numpy: each repetition reads every word once."""
    if kind == "popcount":
        a, b = args  # (P, words, vecs, lanes), (P, words, cols)
        both = a[:, :, None, None, :, :] & b[:, None, :, :, None, None]  # (P, j, k, cols, vecs, lanes)
        counts = np.unpackbits(both.view(np.uint8), axis=-1).reshape(both.shape + (64,)).sum(-1)
        return counts.sum(axis=(1, 2)).astype(np.int64) * (reps // a.shape[1])
    pad, w = args  # (P, words, cols, group), (P, words, vecs, group * lanes)
    group = pad.shape[-1]
    w4 = w.reshape(w.shape[:3] + (-1, group)).astype(np.int64)  # (P, words, vecs, lanes, group)
    # every (k, j) pair meets reps / words times: sum_k pad[k] times sum_j w[j]
    return np.einsum("pkce,pjvle->pcvl", pad.astype(np.int64), w4) * (reps // pad.shape[1])


@pytest.mark.parametrize("cpu", ["host", "haswell"])
@pytest.mark.parametrize("kind", ["popcount", "int8"])
def test_peak_loops_do_the_work_they_count(cpu, kind):
    """The peak kernels compute exactly the sums their op counts claim (no work folded away)."""
    from releq_tvm.kernels.bench import _peak_module

    lib, tensors, ops = _peak_module(kind, 1, str(K.make_target(cpu)))
    lib["main"](*tensors)
    args = [t.numpy() for t in tensors[:-1]]
    expected = _peak_reference(kind, args, reps=256)
    np.testing.assert_array_equal(tensors[-1].numpy(), expected)
    words = args[0].shape[1]
    per_step = 64 if kind == "popcount" else args[0].shape[-1]  # bits of a word, or MACs of a group
    assert ops == expected.size * 256 * words * per_step


def test_bench_kernels_rows_and_the_csv_with_its_provenance_header(tmp_path):
    from releq_tvm.bench_cli import write_kernels_csv
    from releq_tvm.report.tables import read_csv

    bench = bench_kernels(shapes=[("fc", K.DenseShape(128, 16))], bit_pairs=[(1, 1), (2, 2)], lut_w_bits=(),
                          time_kernels=_fast_kernel_timing())
    path = tmp_path / "kernels.csv"
    write_kernels_csv(bench, path, "releq-tvm bench kernels --out kernels.csv")
    header, read = read_csv(path)
    assert [r["kernel"] for r in read] == ["bitserial", "bitserial", "int8"]
    assert tuple(read[0]) == CSV_COLUMNS and len(bench.rows) == 3
    assert [(r["w_bits"], r["a_bits"]) for r in read] == [("1", "1"), ("2", "2"), ("8", "8")]
    assert all(float(r["latency_ms"]) > 0 for r in read)
    assert {r["protocol"] for r in read} == {"warm"}  # a few KB of weights stay in L2
    assert all(int(r["weight_bytes"]) > 0 and float(r["over_memory_bound"]) > 0 for r in read)
    assert float(read[0]["speedup_vs_int8"]) > 0 and read[2]["speedup_vs_int8"] == ""
    assert int(read[1]["binary_ops"]) == 128 * 16 * 4
    assert float(read[0]["efficiency_vs_popcount_peak"]) > 0 and read[0]["efficiency_vs_int8_peak"] == ""
    assert float(read[2]["efficiency_vs_int8_peak"]) > 0 and read[2]["efficiency_vs_popcount_peak"] == ""
    isa = K.vector_isa()
    assert bench.isa == isa and bench.peak.gbinary_ops_per_s > 0 and bench.peak.gmacs_int8_per_s > 0
    assert [r["isa"] for r in read] == [isa.name, isa.name, isa.int8]
    # the crossover is the largest w*a whose bit-serial kernel beat int8 on this layer
    wins = [int(r["w_bits"]) * int(r["a_bits"]) for r in read[:2] if float(r["speedup_vs_int8"]) > 1]
    assert {r["crossover_wa"] for r in read} == {str(max(wins)) if wins else ""}
    # the project's provenance header, the bench's facts as notes: no sidecar, no temp files
    assert [h.split(":")[0] for h in header[:4]] == ["command", "machine", "versions", "made"]
    assert header[0] == "command: releq-tvm bench kernels --out kernels.csv" and header[3].endswith("seed: 0")
    assert header[4:] == [f"note: {n}" for n in bench.notes()]
    notes = "\n".join(bench.notes())
    assert bench.target in notes and f"bit-serial {isa.name} ({isa.uint64_lanes} x uint64 lanes" in notes
    assert f"threads: {bench.threads} " in notes and f"{bench.peak.gbinary_ops_per_s_per_core:.6g} G binary ops/s" in notes
    assert "3 timed interleaved rounds" in notes and "lasting >= 1 ms" in notes
    assert "protocol: warm = " in notes and f"{bench.bandwidth.gbytes_per_s_per_core:.4g} GB/s" in notes
    assert [p.name for p in tmp_path.iterdir()] == ["kernels.csv"]


def test_bench_kernels_command_writes_one_csv_with_provenance(tmp_path, monkeypatch):
    """`releq-tvm bench kernels`: the CLI writes the rows it is given under the header (measuring is mocked)."""
    from click.testing import CliRunner

    import releq_tvm.kernels.bench as bench_module
    from releq_tvm.cli import main
    from releq_tvm.report.tables import read_csv

    row = dict.fromkeys(CSV_COLUMNS, "") | {"layer": "fc", "kernel": "int8", "w_bits": 8, "a_bits": 8, "latency_ms": "0.5"}
    fake = bench_module.KernelBench(
        rows=[row], target="llvm -mcpu=znver4", avx2=True, isa=K.vector_isa("znver4"), threads=1, peak=None,
        bandwidth=None, timing_notes=("timing: as the test says",), parallel=None, seed=0,
    )
    passed = {}
    monkeypatch.setattr(bench_module, "bench_kernels", lambda **kwargs: passed.update(kwargs) or fake)
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    out = tmp_path / "kernels.csv"
    result = CliRunner().invoke(main, ["bench", "kernels", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"wrote {out}"
    header, rows = read_csv(out)
    assert header[0] == f"command: TVM_NUM_THREADS=1 releq-tvm bench kernels --out {out}"
    assert "note: peaks: not measured (efficiency columns empty)" in header and "note: timing: as the test says" in header
    assert ("note: instruction sets: bit-serial avx512-vpopcntdq (8 x uint64 lanes, 32 registers); "
            f"lut {K.vector_isa('znver4').lut}; int8 avx512-vnni") in header
    assert type(passed["time_kernels"]).__name__ == "KernelTiming"  # the project's timing, not the kernels' own
    assert [(r["layer"], r["latency_ms"]) for r in rows] == [("fc", "0.5")]
    assert [p.name for p in tmp_path.iterdir()] == ["kernels.csv"]  # no .meta.json sidecar


# ------------------------------------------------------------------------------------------
# codegen: plans follow the target's ISA (LLVM compiles for any mcpu, so these run on any host)


def _assembly(func, cpu: str) -> str:
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.make_target(cpu))
    return lib.mod.inspect_source("s")


@pytest.mark.parametrize("cpu", ["znver4", "icelake-server"])
def test_bitserial_plan_for_avx512_vpopcntdq_uses_vpopcntq_on_zmm(cpu):
    import re

    isa = K.vector_isa(cpu)
    assert (isa.name, isa.uint64_lanes, isa.registers) == ("avx512-vpopcntdq", 8, 32)
    asm = _assembly(K.bitserial_dense_primfunc(K.DenseShape(512, 512), 2, 2, isa=isa), cpu)
    assert len(re.findall(r"vpopcntq\s+[^\n]*zmm", asm)) >= 8
    assert "vpshufb" not in asm  # no nibble-table popcount where the hardware has one


def test_bitserial_plan_for_avx2_uses_the_nibble_table_popcount():
    import re

    isa = K.vector_isa("haswell")
    assert (isa.name, isa.uint64_lanes, isa.registers, isa.int8) == ("avx2", 4, 16, "pmaddwd")
    asm = _assembly(K.bitserial_dense_primfunc(K.DenseShape(512, 512), 2, 2, isa=isa), "haswell")
    assert "vpshufb" in asm and "vpopcntq" not in asm and not re.search(r"\bzmm", asm)


@pytest.mark.parametrize("cpu", ["haswell", "host"])
@pytest.mark.parametrize("w_bits, a_bits", [(1, 1), (2, 3), (8, 8)])
def test_bitserial_exact_on_every_path_this_host_runs(cpu, w_bits, a_bits):
    """The AVX2 plan (ymm, 4 lanes) and the host's plan (8 lanes on AVX-512) give the same exact sums."""
    shape = K.ConvShape(40, 36, (7, 9), (3, 3), padding=(1, 1))
    rng = rng_for("paths", cpu, w_bits, a_bits)
    x = random_activations(rng, shape.input_shape(), a_bits)
    q = random_weights(rng, shape.weight_shape(), w_bits)
    kernel = K.build_bitserial_conv2d(shape, w_bits, a_bits, cpu)
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.conv2d_reference(x, q, shape))
    dense = K.DenseShape(200, 37)
    xd = random_activations(rng, dense.input_shape(), a_bits)
    qd = random_weights(rng, dense.weight_shape(), w_bits)
    kd = K.build_bitserial_dense(dense, w_bits, a_bits, cpu)
    np.testing.assert_array_equal(kd(xd, kd.pack(qd)), K.dense_reference(xd, qd))


# ------------------------------------------------------------------------------------------
# fused epilogues: requantize, residual, ReLU and the next layer's quantizer in the out stage

EPILOGUES = [
    K.Epilogue(requantize=True),
    K.Epilogue(requantize=True, relu=True, quantize_bits=3),
    K.Epilogue(requantize=True, residual=True, relu=True),
    K.Epilogue(requantize=True, residual=True, relu=False, quantize_bits=8),
]


def _epilogue_args(epilogue, rng, acc):
    """Parameters that spread v over about +-2^20 (per-channel signs and scales differ), residuals
    that saturate int32 both ways, and a quantizer whose levels overflow the range at both ends."""
    channels = acc.shape[1]
    args = {}
    if epilogue.requantize:
        shift = rng.integers(8, 20, size=channels)
        scale = (2.0**20 / max(1, int(np.abs(acc).max()))) * rng.uniform(0.5, 1.5, size=channels)
        scale[0] = -scale[0]
        args["mult"] = np.round(scale * 2.0**shift).astype(np.int64)
        args["offset"] = rng.integers(-(2**18), 2**18, size=channels) * (1 << shift) // 4 + (1 << (shift - 1))
        args["shift"] = shift
    if epilogue.residual:
        residual = rng.integers(-(2**21), 2**21, size=acc.shape)
        residual.flat[:8] = [2**31 - 1, -(2**31)] * 4  # saturation reached both ways
        args["residual"] = residual
    if epilogue.quantize_bits:
        qs = 24
        args["quant"] = [int(1.5 * 2 ** (qs - 20 + epilogue.quantize_bits)), 1 << (qs - 1), qs]
    return {k: np.asarray(v, np.int32 if k == "residual" else np.int64) for k, v in args.items()}


@pytest.mark.parametrize("family", ["bitserial", "int8"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e.label)
def test_fused_epilogue_equals_the_numpy_steps(family, epilogue):
    import tvm

    conv = K.ConvShape(24, 20, (7, 9), (3, 3), padding=(1, 1))
    dense = K.DenseShape(150, 37)
    rng = rng_for("epilogue", family, epilogue.label)
    w_bits, a_bits = (2, 3) if family == "bitserial" else (8, 8)
    for shape in (conv, dense):
        is_dense = isinstance(shape, K.DenseShape)
        if family == "bitserial":
            build = K.bitserial_dense_primfunc if is_dense else K.bitserial_conv2d_primfunc
            func = build(shape, w_bits, a_bits, epilogue=epilogue)
        else:
            build = K.int8_dense_primfunc if is_dense else K.int8_conv2d_primfunc
            func = build(shape, epilogue=epilogue)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
        x = random_activations(rng, shape.input_shape(), a_bits)
        q = random_weights(rng, shape.weight_shape(), w_bits)
        acc = K.dense_reference(x, q) if is_dense else K.conv2d_reference(x, q, shape)
        extra = _epilogue_args(epilogue, rng, acc)
        lanes = K.vector_isa()
        w = (K.pack_weights(q, w_bits, lanes=lanes.uint64_lanes) if family == "bitserial"
             else K.pack_int8_weights(q, isa=lanes))
        out = np.zeros(acc.shape, dtype=epilogue.out_dtype)
        tensors = [tvm.runtime.tensor(a) for a in (x, w, *extra.values(), out)]
        lib["main"](*tensors)
        expected = K.epilogue_reference(epilogue, acc, 1, **extra)
        np.testing.assert_array_equal(tensors[-1].numpy(), expected)
        if epilogue.quantize_bits:  # the test reaches both ends of the level range
            assert expected.min() == 0 and expected.max() == 2**epilogue.quantize_bits - 1
        else:
            assert (expected > 0).any() and ((expected == 0) if epilogue.relu else (expected < 0)).any()
        if epilogue.residual and not epilogue.quantize_bits:
            assert expected.max() == 2**31 - 1  # the saturating add


@pytest.mark.parametrize("epilogue", EPILOGUES[1:3], ids=lambda e: e.label)
def test_fused_epilogue_on_the_int8_column_layout(epilogue):
    """The column layout (few input channels) feeds the same out stage: AlexNet's conv1-like shape."""
    import tvm

    shape = CONV1_LIKE
    assert plan_int8_conv2d(shape).mode == "column"
    rng = rng_for("epilogue_column", epilogue.label)
    func = K.int8_conv2d_primfunc(shape, epilogue=epilogue)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
    x, q = _full_range(rng, shape)
    acc = K.conv2d_reference(x, q, shape)
    extra = _epilogue_args(epilogue, rng, acc)
    out = np.zeros(acc.shape, dtype=epilogue.out_dtype)
    tensors = [tvm.runtime.tensor(a) for a in (x, K.pack_int8_weights(q, isa=K.vector_isa()), *extra.values(), out)]
    lib["main"](*tensors)
    np.testing.assert_array_equal(tensors[-1].numpy(), K.epilogue_reference(epilogue, acc, 1, **extra))


@pytest.mark.parametrize("shape, pos_tile, vec_tile", [
    (K.ConvShape(16, 16, (32, 32), (3, 3), padding=(1, 1)), 8, 2),  # not 12: 36 columns for 32
    (K.ConvShape(32, 32, (16, 16), (3, 3), padding=(1, 1)), 4, 4),  # not 6: 18 for 16
    (K.ConvShape(6, 16, (14, 14), (5, 5)), 10, 2),  # LeNet-5's conv2: not 11
    (K.ConvShape(16, 16, (7, 7), (3, 3), padding=(1, 1)), 7, 2),
    (K.ConvShape(16, 16, (13, 13), (3, 3), padding=(1, 1)), 7, 2),  # 13 is prime: padded to 14, within 1/8
])
def test_bitserial_register_tile_divides_the_row_where_it_can(shape, pos_tile, vec_tile):
    """AVX-512 (32 registers, 8 uint64 lanes): the widest tile of at least half the 24 accumulators
    that divides the output row, else the least padding within 1/8 of the row."""
    plan = K.plan_conv2d(shape, 2, 2, isa=K.vector_isa(K.make_target("znver4")))
    assert (plan.pos_tile, plan.vec_tile) == (pos_tile, vec_tile)
    assert plan.out_w_pad == -(-shape.out_size[1] // pos_tile) * pos_tile


@pytest.mark.parametrize("pos_tile", [1, 3, 8])
def test_bitserial_tile_override_keeps_results_exact(pos_tile):
    import tvm

    shape = K.ConvShape(40, 36, (7, 9), (3, 3), padding=(1, 1))
    plan = K.plan_conv2d(shape, 2, 2, pos_tile=pos_tile)
    assert plan.pos_tile == pos_tile and plan.out_w_pad % pos_tile == 0 and plan.out_w_pad >= 9
    func = K.bitserial_conv2d_primfunc(shape, 2, 2, pos_tile=pos_tile)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
    rng = rng_for("tiles", pos_tile)
    x = random_activations(rng, shape.input_shape(), 2)
    q = random_weights(rng, shape.weight_shape(), 2)
    out = np.zeros(shape.output_shape(), np.int32)
    tensors = [tvm.runtime.tensor(a) for a in (x, K.pack_weights(q, 2, lanes=HOST_LANES), out)]
    lib["main"](*tensors)
    np.testing.assert_array_equal(tensors[-1].numpy(), K.conv2d_reference(x, q, shape))


@pytest.mark.parametrize("shape, uses_row_stream", [
    (K.ConvShape(1, 6, (28, 28), (5, 5), padding=(2, 2)), True),  # LeNet-5 conv1: window, 25 taps
    (K.ConvShape(6, 16, (14, 14), (5, 5)), True),  # LeNet-5 conv2: folded, 40 bits per kernel row
    # folded with whole bytes of channels: columns' bits at once (_column_bits), rows of odd widths
    (K.ConvShape(16, 32, (9, 11), (3, 3), stride=2, padding=(1, 1)), True),  # ResNet-20's 16 -> 32, stride 2
    (K.ConvShape(16, 16, (7, 13), (3, 3), padding=(1, 1)), True),  # 13 columns: no whole vector
    (K.ConvShape(3, 8, (9, 9), (3, 3), padding=(1, 1)), True),  # slot 4: the bit-by-bit row stream
    (K.ConvShape(2, 2, (12, 13), (8, 9), padding=(1, 1), groups=2), False),  # 72 taps: two words
    (K.ConvShape(2, 2, (6, 70), (3, 6), stride=(1, 2), padding=(1, 2), groups=2), True),  # 18 taps, 74-bit rows
    (K.ConvShape(8, 8, (9, 9), (3, 3), padding=(1, 1), groups=8), False),  # 3x3 depthwise: 9 taps gather
    (K.ConvShape(16, 8, (9, 9), (5, 5), padding=(2, 2)), False),  # folded, 80 bits per kernel row
    (K.ConvShape(70, 20, (7, 9), (3, 3)), False),  # channel
])
def test_row_stream_packing_equals_the_per_position_gather(shape, uses_row_stream):
    """Cutting each position's word out of rows packed once gives the same sums as gathering it."""
    import tvm

    plan = K.plan_conv2d(shape, 2, 3, parallel=False)
    assert plan.row_stream is uses_row_stream
    rng = rng_for("row_stream", shape)
    x = random_activations(rng, shape.input_shape("NCHW"), 3)
    q = random_weights(rng, shape.weight_shape(), 2)
    w = K.pack_weights(q, 2, shape.groups, lanes=plan.lanes)
    outputs = []
    for row_stream in (True, False):
        variant = dataclasses.replace(plan, row_stream=row_stream and uses_row_stream)
        func = schedule_bitserial(tvm.te.create_prim_func(conv2d_tensors(variant)), variant)
        lib = tvm.compile(func.with_attr("global_symbol", "main"), target=K.host_target())
        out = tvm.runtime.tensor(np.zeros(shape.output_shape("NCHW"), np.int32))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
        outputs.append(out.numpy())
    np.testing.assert_array_equal(outputs[0], K.conv2d_reference(x, q, shape, "NCHW"))
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("shape, kernel, stride, padding, dtype", [
    ((1, 6, 28, 28), 2, 2, 0, "uint8"),  # LeNet-5's pools: unrolled rows
    ((1, 16, 10, 10), 2, 2, 0, "uint8"),
    ((2, 3, 9, 11), 3, 2, 1, "uint8"),  # padding reads the minimum, batch 2
    ((1, 4, 7, 70), (3, 2), (2, 1), (1, 0), "uint8"),  # a row wider than the unroll limit: TVM vector
    ((1, 5, 12, 9), 3, 3, 1, "int32"),  # negative values under padding
    ((1, 64, 112, 112), 3, 2, 1, "uint8"),  # ResNet-18's stem pool: parallel rows
])
def test_max_pool_matches_numpy(shape, kernel, stride, padding, dtype):
    import tvm

    from releq_tvm.kernels.pool import pool_out_size

    (kh, kw), (sh, sw), (ph, pw) = ((v, v) if isinstance(v, int) else v for v in (kernel, stride, padding))
    rng = rng_for("maxpool", shape, dtype)
    x = rng.integers(0, 256, size=shape).astype(np.uint8) if dtype == "uint8" else \
        rng.integers(-2**31, 2**31, size=shape).astype(np.int32)
    lib = tvm.compile(K.max_pool2d_primfunc(shape, kernel, stride, padding, dtype).with_attr("global_symbol", "main"),
                      target=K.host_target())
    oh, ow = pool_out_size(shape[2:], kernel, stride, padding)
    out = tvm.runtime.tensor(np.zeros(shape[:2] + (oh, ow), dtype))
    lib["main"](tvm.runtime.tensor(x), out)
    lowest = np.iinfo(dtype).min
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=lowest)
    expected = np.full(shape[:2] + (oh, ow), lowest, dtype)
    for i in range(kh):
        for j in range(kw):
            expected = np.maximum(expected, padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw])
    np.testing.assert_array_equal(out.numpy(), expected)


def test_tile_override_is_refused_for_window_layouts():
    with pytest.raises(ValueError, match="window"):
        K.plan_conv2d(K.ConvShape(8, 8, (9, 9), (3, 3), groups=8), 2, 2, pos_tile=4)


# ------------------------------------------------------------------------------------------
# bench kernels: lut rows, the timing protocol column, memory bandwidth and the memory bound


def _fast_kernel_timing():
    """The project's kernel timer with a few short rounds (tests only)."""
    from releq_tvm.compile.layers import KernelTiming
    from releq_tvm.timing import TimingConfig

    return KernelTiming(TimingConfig(repeats=3, min_repeat_ms=1, warmup=1))


@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,parallel", [(K.DenseShape(100, 70), None), (K.DenseShape(64, 130, batch=2), True)])
def test_build_lut_dense_is_exact(shape, parallel, w_bits):
    """The lookup-table kernel built through the runtime is bit-exact against numpy, extremes included."""
    kernel = K.build_lut_dense(shape, w_bits, parallel=parallel)
    assert (kernel.kind, kernel.family, kernel.w_bits, kernel.a_bits) == ("lut_dense", "lut", w_bits, 8)
    rng = rng_for("lut", shape, w_bits)
    q = random_weights(rng, shape.weight_shape(), w_bits)
    lo, hi = K.weight_level_range(w_bits)
    q[0, :], q[-1, :] = hi, lo  # the largest sums of either sign
    x = rng.integers(0, 256, size=shape.input_shape(), dtype=np.int64).astype(np.uint8)
    x[0, :] = 255
    packed = kernel.pack(q)
    assert packed.nbytes == kernel.weight_bytes
    np.testing.assert_array_equal(kernel(x, packed), K.dense_reference(x, q, shape))


def test_memory_bandwidth_loop_reads_what_it_counts_and_is_positive():
    from releq_tvm.kernels.bench import _bandwidth_module, measure_memory_bandwidth

    lib, tensors, nbytes = _bandwidth_module(2, str(K.make_target(None)), 64 << 10)
    lib["main"](*tensors)
    data = tensors[0].numpy()
    assert nbytes == data.nbytes == 64 << 10
    np.testing.assert_array_equal(tensors[1].numpy(), data.sum(axis=1, dtype=np.uint64))
    bandwidth = measure_memory_bandwidth(repeat=2, buffer_bytes=16 << 20)
    assert bandwidth.gbytes_per_s > 0 and bandwidth.gbytes_per_s_per_core > 0 and bandwidth.threads >= 1
    assert bandwidth.buffer_bytes == 16 << 20


def test_bench_kernels_lut_rows_protocol_and_memory_bound(monkeypatch):
    """lut rows sit beside bit-serial and int8; weights over the (patched) L2 are timed cold; the memory
    bound is weight_bytes over the measured bandwidth."""
    import releq_tvm.compile.layers as layers
    import releq_tvm.compile.timing as compile_timing
    from releq_tvm.kernels.target import CacheSizes

    shape = K.DenseShape(256, 64)
    l2 = 4096  # lut w1 (2 KB packed) and bit-serial w1 fit, lut w4 (8 KB) and int8 (16 KB) do not
    caches = CacheSizes(l1d=1024, l2=l2, l3=16 << 10)  # small L3: few cold copies
    monkeypatch.setattr(layers, "cache_sizes", lambda: caches)
    monkeypatch.setattr(compile_timing, "cache_sizes", lambda: caches)
    bench = bench_kernels(shapes=[("fc", shape)], bit_pairs=[(1, 8)], lut_w_bits=(1, 4),
                          time_kernels=_fast_kernel_timing())
    rows = bench.rows
    assert [(r["kernel"], r["w_bits"], r["a_bits"]) for r in rows] == [
        ("bitserial", 1, 8), ("lut", 1, 8), ("lut", 4, 8), ("int8", 8, 8)]
    assert all(tuple(r) == CSV_COLUMNS for r in rows)
    lut = rows[1:3]
    methods = {K.plan_lut_dense(shape, w).method for w in (1, 4)}
    assert {r["isa"] for r in lut} == {K.vector_isa().lut} and {r["mode"] for r in lut} == methods
    assert [r["mode"] for r in rows if r["kernel"] == "int8"] == ["channel"]  # a dense layer: 4 inputs per int32 lane
    assert [r["binary_ops"] for r in lut] == [shape.macs * 8, shape.macs * 4 * 8]
    assert all(r["efficiency_vs_popcount_peak"] == r["efficiency_vs_int8_peak"] == "" for r in lut)
    int8_ms = float(rows[-1]["latency_ms"])
    for r in rows[:-1]:
        assert float(r["speedup_vs_int8"]) == pytest.approx(int8_ms / float(r["latency_ms"]), rel=2e-3, abs=1e-3)
    assert [r["weight_bytes"] for r in lut] == [K.build_lut_dense(shape, w).weight_bytes for w in (1, 4)]
    # the protocol follows the weights' size against the L2, as the latency table's does
    assert [r["protocol"] for r in rows] == ["cold" if r["weight_bytes"] > l2 else "warm" for r in rows]
    assert {r["protocol"] for r in rows} == {"warm", "cold"}
    bandwidth = bench.bandwidth
    assert bandwidth.gbytes_per_s_per_core > 0
    for r in rows:
        bound_ms = r["weight_bytes"] / (bandwidth.gbytes_per_s_per_core * 1e9 * r["threads"]) * 1e3
        assert float(r["memory_bound_ms"]) == pytest.approx(bound_ms, rel=1e-5)
        # latency_ms is rounded to 1 ns in the row, over_memory_bound is not
        assert float(r["over_memory_bound"]) == pytest.approx(float(r["latency_ms"]) / bound_ms, rel=1e-2)


# ------------------------------------------------------------------------------------------
# int8 window mode on AVX-512 VNNI + VBMI: 16 output columns per zmm, vpermb + vpdpbusd on tap quads

needs_vbmi_vnni = pytest.mark.skipif(
    not (HOST_INT8 == "avx512-vnni" and K.vector_isa().lut == "avx512vbmi"),
    reason="the quad-window path runs on AVX-512 VNNI + VBMI hosts only (its assembly is checked on any host)",
)

QUAD_WINDOW_CASES = [
    # (id, shape, layout, parallel)
    ("dw_s1_odd_19ch", K.ConvShape(19, 19, (15, 17), (3, 3), padding=1, groups=19), "NCHW", False),
    ("dw_s1_odd_19ch_parallel", K.ConvShape(19, 19, (15, 17), (3, 3), padding=1, groups=19), "NCHW", True),
    ("dw_s2_odd_37ch_nhwc", K.ConvShape(37, 37, (9, 33), (3, 3), stride=2, padding=1, groups=37), "NHWC", False),
    ("dw_s2_37ch_parallel", K.ConvShape(37, 37, (10, 33), (3, 3), stride=2, padding=1, groups=37), "NCHW", True),
    ("dw_multiplier_2_batch2_nhwc", K.ConvShape(5, 10, (11, 13), (3, 3), padding=1, groups=5, batch=2), "NHWC", None),
    ("mobilenet_dw_112_s1", K.ConvShape(32, 32, (112, 112), (3, 3), padding=1, groups=32), "NCHW", None),
    ("mobilenet_dw_112_s2", K.ConvShape(64, 64, (112, 112), (3, 3), stride=2, padding=1, groups=64), "NCHW", None),
    ("mobilenet_dw_7x7_1024ch", K.ConvShape(1024, 1024, (7, 7), (3, 3), padding=1, groups=1024), "NCHW", None),
    ("lenet_conv1_1ch_5x5", K.ConvShape(1, 6, (32, 32), (5, 5)), "NCHW", None),
    ("mnist_like_1ch_5x5_p2", K.ConvShape(1, 8, (28, 28), (5, 5), padding=2), "NHWC", None),
    ("wide_row_3_tiles", K.ConvShape(3, 3, (5, 300), (3, 3), padding=1, groups=3), "NCHW", None),
    ("dw_11x11_s4_3quads", K.ConvShape(2, 4, (31, 31), (11, 11), stride=4, padding=2, groups=2), "NCHW", None),
    ("dw_s2x1_no_padding", K.ConvShape(7, 7, (12, 20), (3, 3), stride=(2, 1), groups=7), "NCHW", None),
    ("dw_pad_wider_than_quads", K.ConvShape(3, 3, (6, 40), (5, 5), padding=(2, 5), groups=3), "NCHW", None),
]


@needs_vbmi_vnni
@pytest.mark.parametrize("shape, layout, parallel",
                         [pytest.param(s, lay, p, id=name) for name, s, lay, p in QUAD_WINDOW_CASES])
def test_int8_quad_window_is_exact(shape, layout, parallel):
    """Full-range uint8 x int8 on the vpermb + vpdpbusd window path: padding rows and columns,
    clamped loads at both ends of the tensor, rows of 1..19 vectors, quads past kw."""
    plan = plan_int8_conv2d(shape, layout, parallel)
    assert plan.mode == "window" and plan.window_quads
    assert plan.weight_shape[3] == -(-shape.kernel[1] // 4) * 4
    kernel = K.build_int8_conv2d(shape, layout=layout, parallel=parallel)
    x, q = _full_range(rng_for("int8quadwindow", shape, layout), shape, layout)
    x.reshape(-1)[-3:] = 255  # the tensor's last bytes, read by loads clamped to its end
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.conv2d_reference(x, q, shape, layout))


@needs_vbmi_vnni
@pytest.mark.parametrize("level", [-128, 127])
def test_int8_quad_window_extremes_do_not_saturate(level):
    shape = K.ConvShape(16, 16, (9, 20), (3, 3), padding=1, groups=16)
    kernel = K.build_int8_conv2d(shape)
    x = np.full(shape.input_shape(), 255, dtype=np.uint8)
    q = np.full(shape.weight_shape(), level)
    out = kernel(x, kernel.pack(q))
    np.testing.assert_array_equal(out, K.conv2d_reference(x, q, shape))
    assert out[0, 3, 4, 5] == 9 * 255 * level and out[0, 3, 0, 0] == 4 * 255 * level


@needs_vbmi_vnni
@pytest.mark.parametrize("shape", [
    pytest.param(K.ConvShape(6, 6, (9, 40), (3, 3), stride=5, padding=1, groups=6), id="stride5_wider_than_a_load"),
    pytest.param(K.ConvShape(2, 2, (4, 4), (3, 3), padding=1, groups=2), id="input_smaller_than_a_load"),
])
def test_int8_window_falls_back_to_int16_on_the_quad_layout(shape):
    """Where one 64-byte load cannot serve (stride > 4, or an input under 64 bytes) the int16 window
    code runs on the same packed weights (taps padded to quads), so packing never needs the stride."""
    plan = plan_int8_conv2d(shape)
    assert plan.mode == "window" and not plan.window_quads and plan.weight_shape[3] == 4
    kernel = K.build_int8_conv2d(shape)
    x, q = _full_range(rng_for("int8window_fallback", shape), shape)
    np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.conv2d_reference(x, q, shape))


def test_pack_int8_weights_window_layout_pads_taps_to_quads_on_vbmi_only():
    """``w[o, 0, i, j]`` at ``[o // og, o % og, i, j]``; zeros past kw on VNNI + VBMI (any host: numpy only)."""
    shape = K.ConvShape(3, 6, (8, 8), (3, 5), groups=3)
    q = rng_for("int8window_layout").integers(-128, 128, size=shape.weight_shape())
    expected_taps = {"znver4": 8, "icelake-server": 8, "cascadelake": 5, "alderlake": 5, "haswell": 5, "x86-64": 5}
    for cpu, taps in expected_taps.items():
        isa = vector_isa(cpu)
        assert K.int8_weight_shape(shape, isa) == ("window", (3, 2, 3, taps)), cpu
        packed = K.pack_int8_weights(q, shape.groups, isa=isa)
        assert packed.shape == (3, 2, 3, taps) and packed.dtype == np.int8
        np.testing.assert_array_equal(packed[..., :5], q.reshape(3, 2, 3, 5))
        assert not packed[..., 5:].any()


QUAD_WINDOW_EPILOGUE_CASES = [
    # rows of 7 vectors of 16: the out stage alone, 16 lanes
    pytest.param(K.ConvShape(24, 24, (10, 112), (3, 3), padding=1, groups=24), "NCHW", id="row112_s1"),
    # rows of 56 and 14 columns: the epilogue stage on padded 16-column vectors, then the crop
    pytest.param(K.ConvShape(24, 24, (10, 112), (3, 3), stride=2, padding=1, groups=24), "NCHW", id="row56_s2"),
    pytest.param(K.ConvShape(6, 12, (9, 14), (3, 3), padding=1, groups=6, batch=2), "NHWC", id="row14_x2_nhwc"),
]


@needs_vbmi_vnni
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e.label)
@pytest.mark.parametrize("shape, layout", QUAD_WINDOW_EPILOGUE_CASES)
def test_fused_epilogue_on_the_int8_quad_window(epilogue, shape, layout):
    """The quad-window tiles feed the common epilogue arithmetic, on whole rows of 16 columns or on
    padded rows cropped afterwards (residuals and per-channel parameters at the right index)."""
    import tvm

    plan = plan_int8_conv2d(shape, layout)
    assert plan.window_quads
    staged = "epilogue" in str(K.int8_conv2d_primfunc(shape, layout, epilogue=epilogue))
    assert staged == (shape.out_size[1] % 16 != 0)
    rng = rng_for("epilogue_quad_window", epilogue.label, shape, layout)
    func = K.int8_conv2d_primfunc(shape, layout, epilogue=epilogue)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
    x, q = _full_range(rng, shape, layout)
    acc = K.conv2d_reference(x, q, shape, layout)
    channel_axis = 1 if layout == "NCHW" else 3
    extra = _epilogue_args(epilogue, rng, np.moveaxis(acc, channel_axis, 1))
    if "residual" in extra:
        extra["residual"] = np.ascontiguousarray(np.moveaxis(extra["residual"], 1, channel_axis))
    out = np.zeros(acc.shape, dtype=epilogue.out_dtype)
    tensors = [tvm.runtime.tensor(a) for a in (x, K.pack_int8_weights(q, shape.groups), *extra.values(), out)]
    lib["main"](*tensors)
    np.testing.assert_array_equal(tensors[-1].numpy(), K.epilogue_reference(epilogue, acc, channel_axis, **extra))


#: MobileNet v1's depthwise shapes at stride 1 and 2 (channels trimmed: the code per channel is the same)
MOBILENET_DW = [
    pytest.param(K.ConvShape(32, 32, (112, 112), (3, 3), padding=1, groups=32), id="dw112_s1"),
    pytest.param(K.ConvShape(64, 64, (112, 112), (3, 3), stride=2, padding=1, groups=64), id="dw112_s2"),
    pytest.param(K.ConvShape(128, 128, (56, 56), (3, 3), padding=1, groups=128), id="dw56_s1"),
    pytest.param(K.ConvShape(512, 512, (14, 14), (3, 3), padding=1, groups=512), id="dw14_s1"),
]


@pytest.mark.parametrize("cpu", ["znver4", "icelake-server"])
@pytest.mark.parametrize("shape", MOBILENET_DW)
def test_int8_quad_window_compiles_to_vpermb_and_vpdpbusd_without_spills(cpu, shape):
    """Any host. One vpermb per shuffled input row and 16 columns, one zmm vpdpbusd per kernel row;
    the row tile shares shuffles (fewer vpermb than vpdpbusd at stride 1), and on Zen 4 its
    accumulators stay in zmm registers (no spill to the stack)."""
    kernel = K.build_int8_conv2d(shape, target=cpu)
    assert kernel.weight_shape == (shape.groups, 1, 3, 4)
    asm = kernel.module.inspect_source("s")
    permutes = len(re.findall(r"vpermb\s[^\n]*zmm", asm))
    products = len(re.findall(r"vpdpbusd\s[^\n]*zmm", asm))
    assert permutes and products and "vpmaddwd" not in asm and "vpmulld" not in asm
    if shape.stride == (1, 1):
        assert permutes < products
    if cpu == "znver4":  # LLVM's Ice Lake scheduling spills 2 of 32 zmm on the 112-wide rows
        assert not re.search(r"vmov\w*\s+%zmm\d+, -?\d*\(%rsp\)", asm)


@pytest.mark.parametrize("cpu", ["haswell", "x86-64", "cascadelake", "alderlake"])
def test_int8_window_without_vbmi_keeps_the_int16_path(cpu):
    """AVX2 (vpmaddwd), plain x86-64, AVX-512 VNNI without VBMI and AVX-VNNI build the int16 window
    code on unpadded taps; each runs exactly where this host can run it."""
    shape = K.ConvShape(19, 19, (15, 17), (3, 3), stride=2, padding=1, groups=19)
    isa = vector_isa(cpu)
    plan = plan_int8_conv2d(shape, "NCHW", None, isa)
    assert plan.mode == "window" and not plan.window_quads and plan.weight_shape == (19, 1, 3, 3)
    kernel = K.build_int8_conv2d(shape, target=cpu)
    asm = kernel.module.inspect_source("s")
    assert "vpermb" not in asm and "vpdpbusd" not in asm
    if cpu in ("haswell", "x86-64"):
        assert "zmm" not in asm and (cpu == "haswell") == ("ymm" in asm)
    runs_here = cpu in ("haswell", "x86-64") or (cpu == "cascadelake" and HOST_INT8 == "avx512-vnni")
    if runs_here and (cpu == "x86-64" or K.vector_isa().name != "x86-64"):
        x, q = _full_range(rng_for("int8window_int16", cpu), shape)
        np.testing.assert_array_equal(kernel(x, kernel.pack(q)), K.conv2d_reference(x, q, shape))


# ------------------------------------------------------------------------------------------
# epilogue extremes (32 x 32 -> 64-bit products) and the int8 kernels' parallel chunks

def _extreme_epilogue_args(acc: np.ndarray, channels: int) -> dict[str, np.ndarray]:
    """Per-channel parameters at the ends of what ``compile.integer`` produces: ``|mult| = 2^31 - 1``
    (both signs) with shifts 0 (int32 saturation), 31 and 62, and a unit multiplier at shift 1 with
    the rounding half as offset, so odd accumulators (both signs) land on ties; offsets keep
    ``acc_max |mult| + |offset| < 2^62``, as the lowering guarantees."""
    bound = int(np.abs(acc).max()) + 1
    top = 2**31 - 1
    table = [  # (mult, shift, offset)
        (top, 0, 0), (-top, 0, 0), (top, 31, 1 << 30), (-top, 31, 1 << 30), (top, 62, 0), (-top, 62, 1 << 61),
        (1, 1, 1), (-1, 1, 1), (1, 0, 0), (-1, 0, -5), (3, 2, 2), ((1 << 20) + 1, 20, -(1 << 19)),
    ]
    mult, shift, offset = (np.array([table[c % len(table)][k] for c in range(channels)], np.int64) for k in range(3))
    assert (np.abs(mult) < 2**31).all() and (bound * np.abs(mult) + np.abs(offset) < 2**62).all()
    return {"mult": mult, "offset": offset, "shift": shift}


EXTREME_QUANTS = [  # (qm, qround, qshift): the largest multiplier and shift, a unit one, a tie-heavy one
    pytest.param([2**31 - 1, 1 << 61, 62], id="qm_max_qs62"),
    pytest.param([2**31 - 1, 1 << 30, 31], id="qm_max_qs31"),
    pytest.param([1, 0, 0], id="qm_unit"),
    pytest.param([5, 1 << 3, 4], id="qm_ties"),
]


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("quant", EXTREME_QUANTS)
def test_fused_epilogue_extremes_are_exact(parallel, quant):
    """The largest multipliers and shifts the lowering can produce, negative accumulators and
    rounding ties: the int8 kernel (channel mode, 16 accumulators per tile) equals the reference."""
    import tvm

    shape = K.ConvShape(24, 24, (9, 16), (3, 3), padding=(1, 1))
    rng = rng_for("epilogue_extremes", parallel, *quant)
    x, q = _full_range(rng, shape)
    acc = K.conv2d_reference(x, q, shape)
    assert acc.min() < 0 < acc.max() and (acc % 2 == 1).any()
    for epilogue in (K.Epilogue(requantize=True), K.Epilogue(requantize=True, quantize_bits=8),
                     K.Epilogue(requantize=True, relu=True, quantize_bits=4)):
        func = K.int8_conv2d_primfunc(shape, parallel=parallel, epilogue=epilogue)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
        extra = _extreme_epilogue_args(acc, shape.out_channels)
        if epilogue.quantize_bits:
            extra["quant"] = np.asarray(quant, np.int64)
        out = np.zeros(acc.shape, dtype=epilogue.out_dtype)
        tensors = [tvm.runtime.tensor(a) for a in (x, K.pack_int8_weights(q), *extra.values(), out)]
        lib["main"](*tensors)
        expected = K.epilogue_reference(epilogue, acc, 1, **extra)
        np.testing.assert_array_equal(tensors[-1].numpy(), expected)
        if not epilogue.quantize_bits:  # saturation both ways (shift 0) and the 2^62 shift's 0 / -1
            assert expected.max() == 2**31 - 1 and expected.min() == -(2**31)


@pytest.mark.parametrize("quant", EXTREME_QUANTS)
def test_standalone_quantizer_extremes_are_exact(quant):
    import tvm

    v = np.array([2**31 - 1, -(2**31), 0, 1, -1, 7, -7, 8, 9, 2**30, -(2**30), 12345] * 8, np.int32).reshape(6, 16)
    from releq_tvm.kernels.epilogue import quantize_primfunc

    func = quantize_primfunc(v.shape, 8)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=K.host_target())
    out = tvm.runtime.tensor(np.zeros(v.shape, np.uint8))
    lib["main"](tvm.runtime.tensor(v), tvm.runtime.tensor(np.asarray(quant, np.int64)), out)
    qm, qr, qs = quant
    expected = np.clip((v.astype(np.int64) * qm + qr) >> qs, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out.numpy(), expected)


def _workspace_allocations(func, target) -> list[int]:
    """Sizes (bytes) of the TVMBackendAllocWorkspace calls one call of ``func`` makes, counted by
    wrapping the library's ``__TVMBackendAllocWorkspace`` pointer."""
    import ctypes
    import os
    import tempfile

    import tvm

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.so")
        ex.export_library(path)
        module = tvm.runtime.load_module(path)
        slot = ctypes.c_void_p.in_dll(ctypes.CDLL(path), "__TVMBackendAllocWorkspace")
    proto = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int)
    real, sizes = proto(slot.value), []

    def counting(device_type, device_id, size, dtype_code, dtype_bits):
        sizes.append(int(size))
        return real(device_type, device_id, size, dtype_code, dtype_bits)

    hook = proto(counting)
    slot.value = ctypes.cast(hook, ctypes.c_void_p).value
    args = [tvm.runtime.tensor(np.zeros([int(d) for d in p.shape], str(p.dtype))) for p in func.params]
    module["main"](*args)
    slot.value = ctypes.cast(real, ctypes.c_void_p).value
    return sizes


@pytest.mark.parametrize("shape", [
    pytest.param(K.ConvShape(128, 128, (56, 56), (1, 1)), id="mobilenet_pw56"),  # 8 x 2 zmm tiles: 1 KiB
    pytest.param(K.ConvShape(3, 64, (224, 224), (11, 11), stride=4, padding=2), id="alexnet_conv1"),  # column
])
def test_int8_parallel_allocates_tiles_per_chunk_not_per_tile(shape):
    """A register tile of 16 zmm accumulators is a 1 KiB buffer, which TVM allocates with
    TVMBackendAllocWorkspace inside a parallel loop (on the stack below 1 KiB): the parallel loop
    runs over chunks of whole rows, so one call allocates it a few dozen times, not once per tile."""
    plan = plan_int8_conv2d(shape, "NCHW", True)
    assert plan.pos_tile * plan.vec_tile * plan.lanes * 4 >= 1024 or plan.isa.int8 != "avx512-vnni"
    epilogue = K.Epilogue(requantize=True, relu=True, quantize_bits=8)
    tiles = shape.out_size[0] * -(-shape.out_size[1] // plan.pos_tile) * plan.weight_shape[1]
    serial = _workspace_allocations(K.int8_conv2d_primfunc(shape, parallel=False, epilogue=epilogue), K.host_target())
    chunked = _workspace_allocations(K.int8_conv2d_primfunc(shape, parallel=True, epilogue=epilogue), K.host_target())
    assert len(serial) <= 2
    assert len(chunked) - len(serial) < max(shape.out_size[0], PARALLEL_MIN_CHUNKS) + 1 < tiles // 4
