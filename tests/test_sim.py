"""Stripes simulator: hand-computed cycles and energies, stepped vs closed form, CLI."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from releq_tvm.errors import ReleqError
from releq_tvm.networks import LayerSpec, UnknownNetworkError, get_network_spec, layer_table, list_networks
from releq_tvm.sim import stripes as stripes_mod
from releq_tvm.sim.cli import simulate_cmd
from releq_tvm.sim.config import ENERGY_CONSTANTS, STRIPES_CONSTANTS, StripesConfig
from releq_tvm.sim.stripes import (
    BIT_PARALLEL,
    StripesSimulator,
    clear_cache,
    closed_form_cycles,
    stripes_cost_ratio,
)

DEFAULT = StripesConfig()
SRAM_PJ_PER_BIT = 10.0 / 64  # 0.15625
DRAM_PJ_PER_BIT = 1300.0 / 64  # 20.3125
SIP_PJ_AT_8 = 15 * 0.03 + 0.1  # 16-input adder tree of 8-bit operands + 32-bit accumulate = 0.55


def conv(c: int, f: int, k: int, out: int, groups: int = 1, stride: int = 1) -> LayerSpec:
    n_w = f * (c // groups) * k * k
    return LayerSpec(
        index=0,
        name=f"conv{c}x{f}k{k}o{out}g{groups}",
        kind="dwconv" if groups > 1 and groups == c else "conv",
        in_channels=c,
        out_channels=f,
        kernel=(k, k),
        stride=(stride, stride),
        padding=(k // 2, k // 2),
        groups=groups,
        in_size=(out * stride, out * stride),
        out_size=(out, out),
        n_weights=n_w,
        macs=out * out * n_w,
        has_bias=False,
    )


def dense(c: int, f: int) -> LayerSpec:
    return LayerSpec(
        index=0, name=f"fc{c}x{f}", kind="dense", in_channels=c, out_channels=f, kernel=(1, 1), stride=(1, 1),
        padding=(0, 0), groups=1, in_size=(1, 1), out_size=(1, 1), n_weights=c * f, macs=c * f, has_bias=True,
    )


def cycles(layer, w, a=8, config=DEFAULT, method="stepped") -> int:
    costs, _ = StripesSimulator(config).layer_costs([layer], [w], [a], method)
    return costs[0].counts.cycles


# ---------------------------------------------------------------- cycles, hand computed


@pytest.mark.parametrize("p", range(1, 9))
def test_conv_with_windows_multiple_of_16_speeds_up_exactly_8_over_p(p):
    # 16x16 = 256 windows -> 16 groups; 64 filters -> 1 pass; 3x3 -> 9; 32 channels -> 2 groups:
    # 16 * 1 * 9 * 2 * p = 288 p cycles; at 8 bits 2304.
    layer = conv(32, 64, 3, 16)
    assert cycles(layer, p) == cycles(layer, p, method="closed") == 288 * p
    r = StripesSimulator().simulate([layer], [p])
    assert r.layers[0].cycles_8bit == 2304
    assert Fraction(r.cycles_8bit, r.cycles) == Fraction(8, p)


def test_fragmented_conv_rounds_every_dimension_up():
    # 7x7 = 49 windows -> ceil(49/16) = 4; 300 filters -> ceil(300/256) = 2; 1x1; 20 channels ->
    # ceil(20/16) = 2; p = 3: 4 * 2 * 1 * 2 * 3 = 48 (not 49*300*20*3/(16*256*16) ~ 0.65).
    assert cycles(conv(20, 300, 1, 7), 3) == 48


def test_depthwise_uses_one_channel_group_per_filter():
    # MobileNet's 14x14 depthwise 3x3 on 512 channels: ceil(196/16) = 13 window groups, 512 filters
    # -> 2 passes of 256, 9 kernel positions, ceil(1/16) = 1 channel group: 13*2*9*1*p = 234 p.
    layer = conv(512, 512, 3, 14, groups=512)
    assert cycles(layer, 5) == cycles(layer, 5, method="closed") == 1170


def test_dense_layer_cycles_under_each_switch_and_mode():
    fc = dense(1024, 256)
    # Weights-serial fc: 4096 filters per pass -> 1; ceil(1024/16) = 64 channel groups; p bits.
    assert cycles(fc, 3) == 64 * 3
    # --no-fc-serial: bit-parallel DaDN rate ceil(256/256) * ceil(1024/16) = 64 whatever the bits.
    no_fc = replace(DEFAULT, fc_weights_serial=False)
    assert cycles(fc, 3, config=no_fc) == cycles(fc, 8, config=no_fc) == 64
    # AlexNet fc6 (9216 -> 4096): serial 1 * 576 * 4 = 2304; DaDN 16 * 576 = 9216.
    assert cycles(dense(9216, 4096), 4) == 2304
    assert cycles(dense(9216, 4096), 4, config=no_fc) == 9216


@pytest.mark.parametrize("a", [1, 2, 4, 8])
def test_activations_mode_charges_fc_at_the_baseline_rate(a):
    # T_base = OxOy * ceil(F/256) * KxKy * ceil(C/16) = 1 * 1 * 1 * 64 = 64, any bits.
    act = StripesConfig(mode="activations")
    fc = dense(1024, 256)
    costs, _ = StripesSimulator(act).layer_costs([fc], [3], [a])
    assert costs[0].counts.cycles == 64
    assert costs[0].mapping.dataflow == BIT_PARALLEL
    assert StripesSimulator(act).simulate([fc], [3], [a]).speedup == 1.0


def test_activations_mode_scales_conv_with_activation_bits_only():
    act = StripesConfig(mode="activations")
    layer = conv(32, 64, 3, 16)  # 288 cycles per serial bit (see above)
    assert cycles(layer, w=2, a=5, config=act) == cycles(layer, w=8, a=5, config=act) == 288 * 5


# ---------------------------------------------------------------- energy, hand computed


def test_energy_parts_hand_computed_and_add_up():
    # conv 16 -> 16, 3x3, 4x4 output: 16 windows = 1 group, 1 pass, 9 positions, 1 channel group.
    # p_w = 2, a = 8, outputs leave at 8 bits (last layer).
    layer = conv(16, 16, 3, 4)
    r = StripesSimulator().simulate([layer], [2])
    row = r.layers[0]
    assert row.cycles == 18  # 1 * 1 * 9 * 1 * 2
    # compute: 16 windows x 16 filters SIPs x 9 x 1 x 2 steps = 4608 SIP-steps x 0.55 pJ
    assert row.energy.compute_pj == pytest.approx(4608 * 0.55)  # 2534.4
    # on-chip: SB 1*9*16*16*2 = 4608, NBin 16*16*1*9*8 = 18432, NBout 16*16*8 = 2048 bits
    assert row.energy.onchip_pj == pytest.approx((4608 + 18432 + 2048) * SRAM_PJ_PER_BIT)  # 3920
    assert row.energy.offchip_pj == 0.0  # 2304 weights x 2 bits fit in 32 MB
    assert row.energy.total_pj == pytest.approx(2534.4 + 3920.0)
    # 8 bits: 18432 SIP-steps x 0.55 = 10137.6; SB 18432 + NBin 18432 + NBout 2048 = 38912 bits -> 6080
    assert row.energy_8bit.total_pj == pytest.approx(10137.6 + 6080.0)
    assert r.energy_reduction == pytest.approx(16217.6 / 6454.4)
    for e in (row.energy, row.energy_8bit, r.energy, r.energy_8bit):
        assert e.total_pj == pytest.approx(e.compute_pj + e.onchip_pj + e.offchip_pj)


def test_weights_past_the_capacity_are_charged_at_dram_energy():
    layer = conv(16, 16, 3, 4)  # 2304 weights
    small = replace(DEFAULT, sb_capacity_bits=1000)
    r = StripesSimulator(small).simulate([layer], [2])
    # 2304 * 2 = 4608 bits, 1000 on chip -> 3608 bits x 20.3125 pJ = 73287.5 pJ
    assert r.layers[0].energy.offchip_pj == pytest.approx(3608 * DRAM_PJ_PER_BIT)
    # 8 bits: 18432 - 1000 = 17432 bits -> 354087.5 pJ
    assert r.layers[0].energy_8bit.offchip_pj == pytest.approx(17432 * DRAM_PJ_PER_BIT)


def test_residency_fills_the_capacity_in_layer_order():
    # Two layers of 2304 weights at 1 bit each: capacity 3000 -> the first fits, the second spills
    # 2304 + 2304 - 3000 = 1608 bits.
    layers = [conv(16, 16, 3, 4), conv(16, 16, 3, 4)]
    _, offchip = StripesSimulator(replace(DEFAULT, sb_capacity_bits=3000)).layer_costs(layers, [1, 1])
    np.testing.assert_allclose(offchip, [0.0, 1608 * DRAM_PJ_PER_BIT])


def test_bit_parallel_fc_pays_a_full_multiplier_per_mac():
    # 64 -> 10 at any bits: 640 MACs x (0.2 + 0.03) pJ = 147.2 pJ.
    costs, _ = StripesSimulator(replace(DEFAULT, fc_weights_serial=False)).layer_costs([dense(64, 10)], [2])
    assert costs[0].compute_pj == pytest.approx(640 * 0.23)


# ---------------------------------------------------------------- stalls


@pytest.mark.parametrize(
    "layer, config, w, expected, closed",
    [
        # NBin narrowed to Stripes' published 256 bits/cycle: the weights-serial brick of
        # 16 windows x 16 channels x 8 bits = 2048 bits takes 8 cycles at the first bit step of
        # each of the 9 blocks, the second step 1: 9 * (8 + 1) = 81 against 9 * 2 = 18.
        (conv(16, 16, 3, 4), replace(DEFAULT, nbin_width_bits=256), 2, 81, 18),
        # NBout at 512 bits: a 1x1 conv (one block per output group) writes 16 windows x 16
        # filters per tile x 8 bits = 2048 bits at its last step: 4 cycles; 1 + 4 = 5 against 2.
        (conv(16, 256, 1, 4), replace(DEFAULT, nbout_width_bits=512), 2, 5, 2),
        # SB at 64 bits, weights-serial: each step reads 16 filters x 16 channels x 1 bit = 256
        # bits per tile -> 4 cycles per step: 1 * 1 * 9 * 1 * 3 steps * 4 = 108 against 27.
        (conv(16, 256, 3, 4), replace(DEFAULT, sb_width_bits=64), 3, 108, 27),
    ],
)
def test_a_narrow_buffer_stalls_the_stepped_schedule(layer, config, w, expected, closed):
    stepped, _ = StripesSimulator(config).layer_costs([layer], [w])
    closed_costs, _ = StripesSimulator(config).layer_costs([layer], [w], method="closed")
    assert stepped[0].counts.cycles == expected > closed_costs[0].counts.cycles == closed
    assert stepped[0].counts.stall_cycles == expected - closed
    # Stalls cost time, not traffic: both counters price the same bits and SIP steps.
    assert stepped[0].compute_pj == pytest.approx(closed_costs[0].compute_pj)
    assert stepped[0].onchip_pj == pytest.approx(closed_costs[0].onchip_pj)


def test_chunked_stepping_matches_one_grid(monkeypatch):
    layer = conv(24, 300, 3, 13)  # ragged in windows, filters and channels
    narrow = replace(DEFAULT, nbin_width_bits=300)
    whole, _ = StripesSimulator(narrow).layer_costs([layer], [3])
    clear_cache()
    monkeypatch.setattr(stripes_mod, "_MAX_GRID_STEPS", 7)
    chunked, _ = StripesSimulator(narrow).layer_costs([layer], [3])
    clear_cache()
    assert chunked[0].counts == whole[0].counts


# ---------------------------------------------------------------- properties

layer_shapes = st.one_of(
    st.builds(
        lambda c, f, k, out: conv(c, f, k, out),
        st.integers(1, 80), st.integers(1, 600), st.sampled_from([1, 3, 5]), st.integers(1, 20),
    ),
    st.builds(lambda c, out: conv(c, c, 3, out, groups=c), st.integers(2, 600), st.integers(1, 20)),
    st.builds(dense, st.integers(1, 3000), st.integers(1, 5000)),
)
configs = st.sampled_from(
    [
        DEFAULT,
        replace(DEFAULT, fc_weights_serial=False),
        StripesConfig(mode="activations"),
        replace(DEFAULT, nbin_width_bits=256, sb_width_bits=128, nbout_width_bits=512),
        StripesConfig(mode="activations", sb_width_bits=300, nbin_width_bits=100),
    ]
)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(layer=layer_shapes, config=configs, w=st.integers(2, 8), a=st.integers(2, 8))
def test_cycles_and_energy_never_rise_when_bits_fall(layer, config, w, a):
    sim = StripesSimulator(config)
    base, _ = sim.layer_costs([layer], [w], [a])
    for lw, la in ((w - 1, a), (w, a - 1)):
        lower, _ = sim.layer_costs([layer], [lw], [la])
        assert lower[0].counts.cycles <= base[0].counts.cycles
        assert lower[0].compute_pj + lower[0].onchip_pj <= base[0].compute_pj + base[0].onchip_pj + 1e-9


@settings(derandomize=True, max_examples=150, deadline=None)
@given(layer=layer_shapes, w=st.integers(1, 8), a=st.integers(1, 8))
def test_stepped_equals_closed_form_when_nothing_stalls(layer, w, a):
    for config in (DEFAULT, StripesConfig(mode="activations"), replace(DEFAULT, fc_weights_serial=False)):
        sim = StripesSimulator(config)
        stepped, _ = sim.layer_costs([layer], [w], [a])
        closed, _ = sim.layer_costs([layer], [w], [a], method="closed")
        assert stepped[0].counts.stall_cycles == 0
        assert stepped[0].counts == closed[0].counts


def test_lowering_one_layer_never_raises_resnet20_cycles():
    table = layer_table("resnet20")
    rng = np.random.default_rng(0)
    sim = StripesSimulator()
    for _ in range(20):
        bits = rng.integers(2, 9, size=len(table))
        i = int(rng.integers(len(table)))
        lower = bits.copy()
        lower[i] -= 1
        assert sim.totals(table, lower)[0] <= sim.totals(table, bits)[0]


# ---------------------------------------------------------------- whole networks


@pytest.mark.parametrize("name", list_networks())
def test_every_network_at_its_published_bits(name):
    table = layer_table(name)
    bits = get_network_spec(name).published_bits
    for fc in (True, False):
        config = replace(DEFAULT, fc_weights_serial=fc)
        r = StripesSimulator(config).simulate(table, bits, network=name)
        assert [row.cycles for row in r.layers] == closed_form_cycles(table, bits, config=config)
        assert r.stall_cycles == 0
        assert r.speedup >= 1.0 and r.energy_reduction >= 1.0
        for row in r.layers:
            assert row.energy.total_pj == pytest.approx(
                row.energy.compute_pj + row.energy.onchip_pj + row.energy.offchip_pj
            )
        assert r.energy.total_pj == pytest.approx(sum(row.energy.total_pj for row in r.layers))


def test_cost_ratio_is_one_over_speedup_and_one_at_8_bits():
    table = layer_table("resnet20")
    bits = get_network_spec("resnet20").published_bits
    r = StripesSimulator().simulate(table, bits)
    assert stripes_cost_ratio(table, (8,) * len(table)) == 1.0
    assert stripes_cost_ratio(table, bits) == pytest.approx(1 / r.speedup)
    assert stripes_cost_ratio(table, bits, metric="energy") == pytest.approx(1 / r.energy_reduction)
    with pytest.raises(ReleqError, match="metric"):
        stripes_cost_ratio(table, bits, metric="latency")


def test_resnet20_simulates_well_under_a_second():
    table = layer_table("resnet20")
    bits = get_network_spec("resnet20").published_bits
    clear_cache()
    t0 = time.perf_counter()
    StripesSimulator().simulate(table, bits)
    assert time.perf_counter() - t0 < 1.0


def test_bad_inputs_raise_one_line_errors():
    table = [conv(16, 16, 3, 4)]
    with pytest.raises(ReleqError, match="1 layers"):
        StripesSimulator().simulate(table, [2, 2])
    with pytest.raises(ReleqError, match="positive"):
        StripesSimulator().simulate(table, [0])
    with pytest.raises(ReleqError, match="mode"):
        StripesConfig(mode="both")
    with pytest.raises(ReleqError, match="unknown Stripes setting"):
        DEFAULT.with_overrides({"tile": "8"})
    assert DEFAULT.with_overrides({"tiles": "8"}).tiles == 8


def test_every_constant_has_a_unit_and_a_source():
    assert set(ENERGY_CONSTANTS) <= set(STRIPES_CONSTANTS)
    for name, c in STRIPES_CONSTANTS.items():
        assert c.unit and c.source, name
        if hasattr(DEFAULT, name):
            assert getattr(DEFAULT, name) == c.value


# ---------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_hand_computed_totals():
    # lenet4 at 2,2,3,2. conv 1->20 5x5 24x24: 36*1*25*1 = 900 per bit; conv 20->50 5x5 8x8:
    # 4*1*25*2 = 200; fc 800->500: 1*50 = 50; fc 500->10: 1*32 = 32.
    # chosen 900*2 + 200*2 + 50*3 + 32*2 = 2414; 8 bits 8 * 1182 = 9456 -> 3.917x.
    # --no-fc-serial: fc at ceil(500/256)*50 = 100 and 32 -> 2332 vs 8932 -> 3.830x.
    result = CliRunner().invoke(simulate_cmd, ["lenet4"])
    assert result.exit_code == 0, result.output
    assert "TOTAL" in result.output and "3.917x" in result.output and "--no-fc-serial: speedup 3.830x" in result.output
    data = json.loads(CliRunner().invoke(simulate_cmd, ["lenet4", "--json"]).output)
    assert (data["totals"]["cycles"], data["totals"]["cycles_8bit"]) == (2414, 9456)
    assert data["fc_switch_alternative"]["cycles"] == 2332
    assert [row["cycles"] for row in data["layers"]] == [1800, 400, 150, 64]


def test_cli_writes_a_csv_with_its_command(tmp_path):
    out = tmp_path / "lenet4.csv"
    result = CliRunner().invoke(simulate_cmd, ["lenet4", "--bits", "8", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == f"# command: releq-tvm simulate lenet4 --bits 8 --act-bits 8 --mode weights --fc-serial --csv {out}"
    body = [line for line in lines if not line.startswith("#")]
    assert len(body) == 1 + 2 * (4 + 1)  # header, then 4 layers + TOTAL for each fc setting
    assert [p.name for p in tmp_path.iterdir()] == ["lenet4.csv"]  # no temp file left behind


def test_cli_rejects_bad_bits_and_unknown_networks():
    bad = CliRunner().invoke(simulate_cmd, ["lenet4", "--bits", "2,2"])
    assert isinstance(bad.exception, ReleqError)
    assert "has 2 values but lenet4 has 4 weight layers" in str(bad.exception)
    out_of_set = CliRunner().invoke(simulate_cmd, ["lenet4", "--bits", "2,2,9,2"])
    assert isinstance(out_of_set.exception, ReleqError)
    unknown = CliRunner().invoke(simulate_cmd, ["lenet7"])
    assert isinstance(unknown.exception, UnknownNetworkError)
    bad_set = CliRunner().invoke(simulate_cmd, ["lenet4", "--set", "nbin_width_bits"])
    assert isinstance(bad_set.exception, ReleqError)
