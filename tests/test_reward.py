"""Reward and State of Quantization against hand-computed values (METHOD.md sections 3-4)."""

from types import SimpleNamespace

import pytest

from releq_tvm.networks import layer_table
from releq_tvm.search.reward import (
    asymmetric_reward,
    hardware_reward,
    make_reward,
    sa_minus_sq,
    sa_over_sq,
    state_of_quantization,
)


def test_asymmetric_reward_by_hand():
    # SQ = 0.5, SA = 0.9, a = 0.2, b = 0.4, th = 0.4:
    #   1 - 0.5^0.2 = 1 - 0.870551 = 0.129449
    #   0.9^(0.4/0.9) = exp(0.444444 * ln 0.9) = exp(-0.046827) = 0.954253
    #   r = 0.129449 * 0.954253 = 0.123527
    assert asymmetric_reward(0.9, 0.5) == pytest.approx(0.12352745744947417, rel=1e-12)
    assert asymmetric_reward(0.9, 0.5) == pytest.approx((1 - 0.5**0.2) * 0.9 ** (0.4 / 0.9), rel=1e-12)


def test_asymmetric_reward_endpoints():
    # Every layer at 8 bits: SQ = 1 -> 1 - 1^0.2 = 0, whatever the accuracy.
    assert asymmetric_reward(1.0, 1.0) == 0.0
    # Every layer at 1 bit with no accuracy loss: SQ = 1/8 -> 1 - 2^-0.6 = 0.340246.
    assert asymmetric_reward(1.0, 0.125) == pytest.approx(0.3402460446135529, rel=1e-12)


def test_asymmetric_reward_th_cut_off():
    # Below th the loss is not recoverable: -1 regardless of SQ.
    assert asymmetric_reward(0.399, 0.01) == -1.0
    assert asymmetric_reward(0.0, 1.0) == -1.0
    # At exactly th: r = (1 - 0.3^0.2) * 0.4^(0.4/0.4) = 0.213997 * 0.4 = 0.085599.
    assert asymmetric_reward(0.4, 0.3) == pytest.approx(0.08559876576135089, rel=1e-12)
    # th is a parameter: with th = 0.95, SA = 0.94 is already cut off.
    assert asymmetric_reward(0.94, 0.3, th=0.95) == -1.0


def test_asymmetric_reward_prefers_accuracy_at_equal_cost():
    assert asymmetric_reward(0.99, 0.3) > asymmetric_reward(0.95, 0.3) > asymmetric_reward(0.8, 0.3)


def test_ratio_and_difference_rewards():
    assert sa_over_sq(0.9, 0.5) == pytest.approx(1.8)
    assert sa_minus_sq(0.9, 0.5) == pytest.approx(0.4)


def test_hardware_reward_by_hand():
    # acc_q 0.98 at or below the limit 0.985: 1/(|0.98 - 0.99| + 1e-4) + 1/0.5 = 99.0099 + 2.
    assert hardware_reward(0.98, 0.99, 0.5, acc_limit=0.985) == pytest.approx(101.00990099009901)
    # acc_q 0.988 above the limit: the fixed 1/|0.985 - 0.99| = 200, plus 1/0.5.
    assert hardware_reward(0.988, 0.99, 0.5, acc_limit=0.985) == pytest.approx(202.0)
    # Above the limit only cost moves the reward.
    assert hardware_reward(0.989, 0.99, 0.25, acc_limit=0.985) == pytest.approx(204.0)
    # Without a limit: 10 * 0.98 + 1/0.5 = 11.8.
    assert hardware_reward(0.98, 0.99, 0.5) == pytest.approx(11.8)


def test_make_reward_passes_cost_in_place_of_sq():
    assert make_reward("asymmetric")(0.9, 0.5, 0.99) == pytest.approx(asymmetric_reward(0.9, 0.5))
    assert make_reward("sa_over_sq")(0.9, 0.5, 0.99) == pytest.approx(1.8)
    # hardware: acc_q = SA * acc_o = 0.5 * 0.98 = 0.49, no limit -> 4.9 + 1/0.25.
    assert make_reward("hardware")(0.5, 0.25, 0.98) == pytest.approx(8.9)
    with pytest.raises(ValueError):
        make_reward("nope")


def test_sq_cost_weighted_two_layer_hand_example():
    table = [SimpleNamespace(n_weights=10, macs=1000), SimpleNamespace(n_weights=100, macs=200)]
    # Layer weights with E_mem/E_mac = 120: 10*120 + 1000 = 2200 and 100*120 + 200 = 12200.
    # bits (2, 4): (2200*2 + 12200*4) / ((2200 + 12200) * 8) = 53200 / 115200 = 0.461806.
    assert state_of_quantization(table, (2, 4)) == pytest.approx(0.4618055555555556, rel=1e-12)
    # The plain form ignores the layer sizes: (2 + 4) / (8 * 2) = 0.375.
    assert state_of_quantization(table, (2, 4), form="plain") == pytest.approx(0.375)
    # E_mem/E_mac = 0 leaves the MAC counts: (1000*2 + 200*4) / (1200 * 8) = 2800 / 9600.
    assert state_of_quantization(table, (2, 4), e_mem_over_e_mac=0.0) == pytest.approx(2800 / 9600)


def test_sq_on_lenet_bounds():
    table = layer_table("lenet")
    assert state_of_quantization(table, (8,) * 5) == pytest.approx(1.0)
    assert state_of_quantization(table, (1,) * 5) == pytest.approx(1 / 8)
    # fc1 (48,000 weights) dominates: lowering it saves more than lowering conv1.
    assert state_of_quantization(table, (8, 8, 2, 8, 8)) < state_of_quantization(table, (2, 8, 8, 8, 8))
    with pytest.raises(ValueError):
        state_of_quantization(table, (8, 8))
