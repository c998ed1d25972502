"""Property tests of the WRPN weight quantizer and the unsigned learned-clip (PACT) activation quantizer."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from releq_tvm.networks import create_network, get_network_spec
from releq_tvm.quant import (
    INPUT_RANGE,
    PactActivation,
    act_quantizers,
    apply_act_bits,
    apply_bits,
    calibrate_input_ranges,
    current_act_bits,
    current_bits,
    pact_quantize,
    quantize_activation_int,
    quantize_weight,
    quantize_weight_int,
    remove_act_bits,
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


# ---------------------------------------------------------------------------------------------
# the learned-clip (PACT) activation quantizer

activations = arrays(np.float32, st.integers(1, 64), elements=st.floats(-20, 20, allow_nan=False, width=32))
alphas = st.floats(0.015625, 50.0, allow_nan=False, width=32)


@settings(max_examples=80, deadline=None)
@given(activations, alphas, bits_st)
def test_pact_levels_zero_and_range(x, alpha, bits):
    a = torch.tensor(alpha)
    q = pact_quantize(torch.from_numpy(x), bits, a)
    levels = 2**bits - 1
    k = q / a * levels
    # every output is one of the 2^b levels k * alpha / (2^b - 1), k = 0 .. 2^b - 1
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-3)
    assert 0 <= int(torch.round(k).min()) and int(torch.round(k).max()) <= levels
    assert len(torch.unique(torch.round(k))) <= 2**bits
    # the range [0, alpha] holds exactly, zero is a level, negatives and zero map to it
    assert float(q.min()) >= 0.0 and float(q.max()) <= alpha
    assert (q[torch.from_numpy(x) <= 0] == 0).all()
    assert pact_quantize(torch.zeros(1), bits, a).item() == 0.0
    # values at or beyond alpha land on the top level, alpha itself (k / levels * alpha, exact)
    top = pact_quantize(torch.tensor([alpha, alpha * 2]), bits, a)
    assert torch.equal(top, torch.full((2,), alpha))


@settings(max_examples=80, deadline=None)
@given(activations, alphas, bits_st)
def test_pact_idempotent_and_error_bound(x, alpha, bits):
    a = torch.tensor(alpha)
    t = torch.from_numpy(x)
    q = pact_quantize(t, bits, a)
    assert torch.equal(pact_quantize(q, bits, a), q)
    # inside the range the error is at most half a step
    inside = (t >= 0) & (t <= alpha)
    err = (q - t).abs()[inside]
    assert err.numel() == 0 or float(err.max()) <= alpha / (2**bits - 1) / 2 * (1 + 1e-5) + 1e-6


def test_pact_by_hand():
    # 2 bits, alpha 1.0: levels 0, 1/3, 2/3, 1; same levels as the integer quantizer
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 0.9, 7.0])
    q = pact_quantize(x, 2, torch.tensor(1.0))
    torch.testing.assert_close(q, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0]))
    assert (q * 3).round().int().tolist() == quantize_activation_int(x.numpy(), 2, 1.0).tolist()
    # 1 bit, alpha 2.0: levels {0, 2}, threshold at 1
    torch.testing.assert_close(pact_quantize(torch.tensor([0.9, 1.1, 3.0]), 1, torch.tensor(2.0)),
                               torch.tensor([0.0, 2.0, 2.0]))


def test_pact_gradients_by_hand():
    # 2 bits, alpha = 1: q = [0, 0, 0, 2/3, 1, 1, 1]
    # d/dx: 1 strictly inside (0, alpha), 0 at or below 0 and at or beyond alpha
    # d/dalpha: 0 for x <= 0; (q - x) / alpha inside: 0 - 0.1, 2/3 - 0.5, 1 - 0.9; 1 for x >= alpha
    xs = [-1.0, 0.0, 0.1, 0.5, 0.9, 1.0, 2.0]
    expected_dx = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    expected_dalpha = [0.0, 0.0, -0.1, 1 / 6, 0.1, 1.0, 1.0]
    for value, want_dx, want_da in zip(xs, expected_dx, expected_dalpha):
        x = torch.tensor(value, requires_grad=True)
        alpha = torch.tensor(1.0, requires_grad=True)
        pact_quantize(x, 2, alpha).backward()
        assert x.grad.item() == pytest.approx(want_dx, abs=1e-6), value
        assert alpha.grad.item() == pytest.approx(want_da, abs=1e-6), value
    # 1 bit, alpha = 2: x = 0.8 -> 0, d/dalpha = (0 - 0.8) / 2; x = 1.2 -> 2, (2 - 1.2) / 2
    x = torch.tensor([0.8, 1.2], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    pact_quantize(x, 1, alpha).sum().backward()
    assert alpha.grad.item() == pytest.approx(-0.4 + 0.4, abs=1e-6)
    torch.testing.assert_close(x.grad, torch.ones(2))


def test_pact_activation_learns_a_factor_of_its_calibrated_range():
    q = PactActivation(4, 2.5)
    assert q.alpha.item() == 2.5 and q.learned
    assert [name for name, _ in q.named_parameters()] == ["alpha_factor"]
    # the gradient reaching the factor is alpha_init times the one reaching alpha: x = 3 > alpha
    q(torch.tensor([3.0])).sum().backward()
    assert q.alpha_factor.grad.item() == pytest.approx(2.5)
    # a quantizer rebuilt from a learned alpha has exactly that alpha (the integer lowering relies on it)
    with torch.no_grad():
        q.alpha_factor.fill_(0.8731)
    rebuilt = PactActivation(4, q.alpha.item(), learn=False)
    assert rebuilt.alpha.item() == q.alpha.item() and not rebuilt.learned
    x = torch.linspace(-1, 4, 101)
    assert torch.equal(rebuilt(x), q(x))
    for bad in ((0, 1.0), (9, 1.0), (4, 0.0), (4, -1.0)):
        with pytest.raises(ValueError):
            PactActivation(*bad)


def test_apply_act_bits_then_remove_restores_float_model():
    spec = get_network_spec("lenet")
    model = create_network("lenet", pretrained=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((32, *spec.input_shape), generator=gen)
    ref = model(images)
    ranges, learn = calibrate_input_ranges(model, spec.input_shape, images)
    # the image keeps the fixed range [0, 1]; the other inputs start at a calibrated percentile
    assert ranges[0] == INPUT_RANGE and learn == [False, True, True, True, True]
    assert all(r > 0.5 for r in ranges[1:])
    apply_act_bits(model, (8, 4, 4, 2, 4), spec.input_shape, ranges, learn)
    assert current_act_bits(model, spec.input_shape) == (8, 4, 4, 2, 4)
    carried = act_quantizers(model)
    assert [q.alpha.item() for q in carried.values()] == pytest.approx(ranges)
    # the clipping levels are model parameters: the optimiser and the state_dict see them
    trained = [name for name, p in model.named_parameters() if p.requires_grad and "act_quantizer" in name]
    assert trained == ["3.act_quantizer.alpha_factor", "7.act_quantizer.alpha_factor",
                       "9.act_quantizer.alpha_factor", "11.act_quantizer.alpha_factor"]
    assert "9.act_quantizer.alpha_init" in model.state_dict()
    out = model(images)
    assert not torch.allclose(out, ref)
    # a deep copy runs its own quantizers: changing its 2-bit alpha leaves the original alone
    twin = copy.deepcopy(model)
    assert torch.equal(twin(images), out)
    with torch.no_grad():
        act_quantizers(twin)["9"].alpha_factor.fill_(0.5)
    assert not torch.equal(twin(images), out) and torch.equal(model(images), out)
    remove_act_bits(model)
    torch.testing.assert_close(model(images), ref)
    assert current_act_bits(model, spec.input_shape) == (None,) * 5


def test_finetune_trains_the_clipping_levels_not_the_image_range():
    from releq_tvm.data import load_dataset
    from releq_tvm.train import finetune_bits

    spec = get_network_spec("lenet")
    model = create_network("lenet", pretrained=True)
    train = load_dataset("mnist", "train", limit=256)
    steps, lr = 5, 1e-2
    finetune_bits(model, (8, 2, 2, 3, 2), spec.input_shape, train, steps, lr=lr, batch_size=64, seed=0,
                  act_bits=(8, 4, 4, 2, 4), calibration=train.images[:128])
    factors = [q.alpha_factor.item() for q in act_quantizers(model).values()]
    assert factors[0] == 1.0  # the image's range is fixed
    # Adam moves each factor by about lr per step (at most a few lr), so each one moved, and not far
    assert all(0 < abs(f - 1.0) <= 3 * steps * lr for f in factors[1:]), factors
