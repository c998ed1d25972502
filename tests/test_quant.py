"""Property tests of the WRPN weight quantizer and the unsigned activation quantizer."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from releq_tvm.networks import create_network, get_network_spec
from releq_tvm.quant import (
    apply_bits,
    current_bits,
    quantize_activation_int,
    quantize_weight,
    quantize_weight_int,
    remove_bits,
    ste_quantize_weight,
    weight_levels,
    weight_scale,
)

finite = st.floats(-10, 10, allow_nan=False, width=32)
weights = arrays(np.float32, st.integers(2, 64), elements=finite).filter(lambda w: np.abs(w).max() > 1e-3)
bits_st = st.integers(1, 8)


@pytest.mark.parametrize("bits,levels", [(1, 1), (2, 1), (3, 3), (4, 7), (8, 127)])
def test_weight_levels(bits, levels):
    assert weight_levels(bits) == levels


@settings(max_examples=60, deadline=None)
@given(weights, bits_st)
def test_number_of_levels_and_range(w, bits):
    q, step = quantize_weight_int(w, bits)
    m = weight_levels(bits)
    assert q.min() >= -m and q.max() <= m
    # k >= 2: at most 2^k - 1 distinct levels (mid-tread, symmetric); k = 1: two levels, no zero
    expected_max = 2 if bits == 1 else 2**bits - 1
    assert len(np.unique(q)) <= expected_max
    if bits == 1:
        assert set(np.unique(q)) <= {-1, 1}
    # the largest-magnitude weight always lands on the outermost level (clipped there if need be)
    assert np.abs(q).max() == m
    assert step == pytest.approx(weight_scale(w, bits) / m, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(weights, st.integers(2, 8))
def test_zero_is_a_level_and_symmetry(w, bits):
    t = torch.from_numpy(w)
    with_zero = torch.cat([t, torch.zeros(1)])
    assert quantize_weight(with_zero, bits)[-1] == 0
    torch.testing.assert_close(quantize_weight(-t, bits), -quantize_weight(t, bits))


@settings(max_examples=60, deadline=None)
@given(weights, bits_st)
def test_idempotent(w, bits):
    t = torch.from_numpy(w)
    wq = quantize_weight(t, bits)
    torch.testing.assert_close(quantize_weight(wq, bits), wq, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(weights, st.integers(2, 8))
def test_error_bound(w, bits):
    t = torch.from_numpy(w).double()
    scale = weight_scale(t, bits)
    inside = t.abs() <= scale
    # mid-tread rounding: error at most half a step inside the range, step = scale / (2^(k-1) - 1);
    # weights beyond the scale are clipped to +-scale
    err = (quantize_weight(t, bits) - t).abs()
    assert torch.cat([err[inside], torch.zeros(1, dtype=err.dtype)]).max() <= scale / weight_levels(bits) / 2 + 1e-9
    torch.testing.assert_close(quantize_weight(t, bits)[~inside], torch.sign(t[~inside]) * scale)


@settings(max_examples=40, deadline=None)
@given(weights, bits_st)
def test_scale_error_no_worse_than_max_scale(w, bits):
    # the chosen scale is the least-squares one of a grid that contains max|w| (and, at 1 bit, exact)
    t = torch.from_numpy(w).double()
    chosen = ((quantize_weight(t, bits) - t) ** 2).sum()
    at_max = ((quantize_weight(t, bits, scale=t.abs().max()) - t) ** 2).sum()
    # the scale is searched in float32: allow float32 rounding of the error (relative 1e-6 of sum w^2)
    assert chosen <= at_max + 1e-6 * (t**2).sum()


def test_scale_by_hand():
    # 1 bit: mean|w| = (0.5 + 0 + 0.25 + 2) / 4 = 0.6875
    assert weight_scale(np.array([-0.5, 0.0, 0.25, 2.0]), 1) == pytest.approx(0.6875)
    # 2 bits on ten 1s and one 4: levels {0, s}. s = 4 sends the 1s to 0 (error 10); s < 2 keeps
    # them at s and clips 4 to s: error 10 (s - 1)^2 + (4 - s)^2, least at s = 28/22 = 1.27. The
    # grid (4 * 2^(-4 + 4j/31)) has 1.144 (error 8.37 by hand), 1.2506 (8.19) and 1.368 (8.28).
    w = np.array([1.0] * 10 + [4.0])
    assert weight_scale(w, 2) == pytest.approx(4 * 2 ** (-4 + 4 * 18 / 31))
    assert weight_scale(w) == 4.0


def test_two_bits_keep_most_of_a_gaussian_layer():
    # the reason for the least-squares scale: with max|w| a 2-bit (ternary) gaussian layer is ~95 % zeros
    w = np.random.default_rng(0).standard_normal(20000)
    q, _ = quantize_weight_int(w, 2)
    assert 0.3 < np.mean(q == 0) < 0.6
    q_max, _ = quantize_weight_int(w, 2, scale=np.abs(w).max())
    assert np.mean(q_max == 0) > 0.9
    # more bits never raise the error
    errors = [((quantize_weight(torch.from_numpy(w), k) - torch.from_numpy(w)) ** 2).sum().item() for k in range(1, 9)]
    assert all(b <= a for a, b in zip(errors[1:], errors[2:]))


def test_binary_is_sign_times_scale():
    # scale = mean|w| = 0.6875
    w = torch.tensor([-0.5, 0.0, 0.25, 2.0])
    torch.testing.assert_close(quantize_weight(w, 1), torch.tensor([-0.6875, 0.6875, 0.6875, 0.6875]))


def test_two_bit_by_hand():
    # 2 bits: levels {-1, 0, 1} * scale; with scale = 1.0: 0.49 -> 0, 0.51 -> 1, -0.7 -> -1
    w = torch.tensor([0.49, 0.51, -0.7, 1.0])
    torch.testing.assert_close(quantize_weight(w, 2, scale=1.0), torch.tensor([0.0, 1.0, -1.0, 1.0]))
    # 3 bits: levels k/3: 0.49*3 = 1.47 -> 1/3
    torch.testing.assert_close(quantize_weight(w, 3, scale=1.0), torch.tensor([1 / 3, 2 / 3, -2 / 3, 1.0]))


def test_straight_through_gradient_is_identity():
    w = torch.tensor([0.3, -0.8, 0.1], requires_grad=True)
    ste_quantize_weight(w, 2).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(3))


def test_activation_quantizer_unsigned_by_hand():
    # 2 bits, range 1.0: levels 0, 1/3, 2/3, 1 -> ints 0..3; negatives clip to 0, beyond range to 3
    x = np.array([-0.5, 0.1, 0.2, 0.5, 0.9, 7.0])
    assert quantize_activation_int(x, 2, 1.0).tolist() == [0, 0, 1, 2, 3, 3]
    assert quantize_activation_int(x, 8, 1.0).dtype == np.uint8


def test_apply_bits_then_remove_restores_float_model():
    spec = get_network_spec("lenet")
    model = create_network("lenet")
    x = torch.rand(4, *spec.input_shape)
    ref = model(x)
    apply_bits(model, (8, 2, 2, 3, 2), spec.input_shape)
    assert current_bits(model, spec.input_shape) == (8, 2, 2, 3, 2)
    q_out = model(x)
    assert not torch.allclose(q_out, ref)
    conv2 = model[3]
    assert len(torch.unique(conv2.weight)) <= 3  # 2-bit: {-s, 0, s}
    remove_bits(model)
    torch.testing.assert_close(model(x), ref)
    assert current_bits(model, spec.input_shape) == (None,) * 5
