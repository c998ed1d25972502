"""Compile + Measure: the TVM bit-serial build equals the numpy integer model bit for bit.

Fast tests (default run) build LeNet-5 at 8,2,2,3,2 and a tiny residual / depthwise network,
check the fixed-point arithmetic against hand-computed values, the latency table's cache and
the command line's one-line errors. Slow tests (``-m slow``) compile every registered network,
compare MNIST accuracy with the fake-quantized torch model on the full test set, run the whole
measurement and an RPC round trip.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from releq_tvm.cli import main
from releq_tvm.compile import (
    LatencyTable,
    TimingConfig,
    compile_network,
    cpu_cost_ratio,
    fake_quant_model,
    integer_forward,
    load_compiled,
    quantize_network,
    resolve_target,
)
from releq_tvm.compile.integer import _output_shift, _rshift_round_clip
from releq_tvm.compile.latency_table import layer_key
from releq_tvm.compile.target import file_safe, machine_key
from releq_tvm.data import load_dataset
from releq_tvm.errors import ReleqError
from releq_tvm.networks import get_network_spec, layer_table, list_networks
from releq_tvm.report.tables import read_csv

LENET_BITS = (8, 2, 2, 3, 2)
FAST_TIMING = TimingConfig(repeats=3, min_repeat_ms=2, warmup=1)


@pytest.fixture(scope="module")
def lenet_net():
    return quantize_network("lenet", LENET_BITS)


@pytest.fixture(scope="module")
def lenet_compiled(lenet_net):
    return compile_network(lenet_net, "bitserial", batch=4)


@pytest.fixture(scope="module")
def mnist_images():
    return load_dataset("mnist", "test", limit=10).images


# ------------------------------------------------------------------------------------------
# fixed-point arithmetic against hand-computed values


def test_requant_rounds_half_up_by_hand():
    # m = 0.5 at F = 0: acc * 0.5 rounded half up -> -1.5 -> -1, -0.5 -> 0, 0.5 -> 1, 2.5 -> 3
    mult, offset, shift = _output_shift(np.array([0.5]), np.array([0.0]), frac_bits=0, acc_bound=100)
    acc = np.array([-3, -1, 0, 1, 5], dtype=np.int64)
    v = _rshift_round_clip(acc, mult[0], offset[0], shift[0], -(2**31), 2**31 - 1)
    assert v.tolist() == [-1, 0, 0, 1, 3]
    # offset b = 0.25 with m = 1 at F = 2: real value (acc + 0.25) in units of 1/4 -> 4*acc + 1 exactly
    mult, offset, shift = _output_shift(np.array([1.0]), np.array([0.25]), frac_bits=2, acc_bound=100)
    assert (_rshift_round_clip(acc, mult[0], offset[0], shift[0], -(2**31), 2**31 - 1) == 4 * acc + 1).all()


def test_requant_multiplier_is_precise_and_cannot_overflow():
    m = np.array([3.7e-5, -1.2e-3, 0.0, 2.5e-7])
    b = np.array([0.3, -2.0, 1.5, 0.0])
    bound = 150 * 127 * 255
    mult, offset, shift = _output_shift(m, b, frac_bits=24, acc_bound=bound)
    real = mult * np.exp2(-(24.0 + shift))
    assert np.allclose(real, m, rtol=2**-29, atol=0)
    assert (np.abs(mult) < 2**31).all()
    assert (bound * np.abs(mult) + np.abs(offset) < 2**62).all()


# ------------------------------------------------------------------------------------------
# LeNet-5 at the example bits


def test_lenet_tvm_equals_numpy_integer_model(lenet_net, lenet_compiled, mnist_images):
    levels = lenet_compiled.quantize_input(mnist_images)
    out = lenet_compiled.run_levels(levels)  # 10 images through a batch-4 library: 3 calls, last padded
    ref = integer_forward(lenet_net, levels)
    assert out.dtype == np.int32 and out.shape == (10, 10)
    np.testing.assert_array_equal(out, ref)
    assert lenet_net.w_bits == LENET_BITS and lenet_net.a_bits == (8,) * 5


def test_int8_baseline_build_equals_numpy_integer_model(mnist_images):
    net = quantize_network("lenet", 8)
    compiled = compile_network(net, "int8", batch=5)
    levels = compiled.quantize_input(mnist_images)
    np.testing.assert_array_equal(compiled.run_levels(levels), integer_forward(net, levels))


def _timing_ms(ms: float) -> dict:
    return {"median_ms": ms, "iqr_ms": 0.0, "min_ms": ms, "max_ms": ms, "repeats": 1}


def test_auto_build_takes_the_faster_kernel_per_layer_and_stays_exact(tmp_path, mnist_images):
    """auto reads the three families' latencies from the table; a mixed build is still bit-exact."""
    net = quantize_network("lenet", LENET_BITS, (8, 2, 2, 4, 1))
    table = LatencyTable(path=tmp_path / "t.sqlite", timing=FAST_TIMING)
    bits_ms = [0.010, 0.001, 0.002, 0.003, 0.004]
    int8_ms = [0.005, 0.004, 0.001, 0.003, 0.008]
    lut_ms = [None, None, 0.0005, 0.010, 0.003]  # lut runs the dense layers (1-4 weight bits) only
    for row, lq, b, i, t in zip(layer_table("lenet"), net.layers, bits_ms, int8_ms, lut_ms):
        table.store(layer_key(row, lq.w_bits, lq.a_bits, "bitserial"), _timing_ms(b), 0.0)
        table.store(layer_key(row, 8, 8, "int8"), _timing_ms(i), 0.0)
        if t is not None:
            table.store(layer_key(row, lq.w_bits, lq.a_bits, "lut"), _timing_ms(t), 0.0)
    compiled = compile_network(net, "auto", batch=2, table=table)
    chosen = [layer["family"] for layer in compiled.manifest["layers"]]
    assert chosen == ["int8", "bitserial", "lut", "int8", "lut"]  # a tie goes to int8
    assert compiled.manifest["kernels"] == "auto" and table.builds == 0
    levels = compiled.quantize_input(mnist_images)
    np.testing.assert_array_equal(compiled.run_levels(levels), integer_forward(net, levels))
    # the cost the search sees for auto: the same choice, against the same policy at 8 bits
    assert table.network_layers_us("lenet", LENET_BITS, (8, 2, 2, 4, 1), "auto") == pytest.approx(
        [min(v for v in (b, i, t) if v is not None) * 1e3 for b, i, t in zip(bits_ms, int8_ms, lut_ms)])


def test_lut_runs_dense_layers_at_up_to_4_weight_bits_only():
    from releq_tvm.compile.lower import layer_kernels

    net = quantize_network("lenet", (8, 2, 2, 5, 2))
    assert layer_kernels(net, ("int8", "bitserial", "lut", "int8", "lut")) == ("int8", "bitserial", "lut", "int8", "lut")
    with pytest.raises(ReleqError, match=r"^layer 0 \(conv, 8-bit weights\) cannot run the lut kernels"):
        layer_kernels(net, ("lut", "int8", "int8", "int8", "int8"))
    with pytest.raises(ReleqError, match=r"^layer 3 \(dense, 5-bit weights\) cannot run the lut kernels"):
        layer_kernels(net, ("int8", "int8", "lut", "lut", "lut"))


def test_fusion_plan_fuses_residual_relu_and_the_next_quantizer():
    from releq_tvm.compile.lower import plan_fusion

    lenet = plan_fusion(quantize_network("lenet", 8))
    # conv -> relu -> maxpool -> conv: the next layer's quantizer runs in the producer (before the pool)
    first = lenet[next(iter(lenet))]
    assert first.epilogue.relu and first.epilogue.quantize_bits == 8 and first.quantize_for == 1
    last = list(lenet.values())[-1]
    assert last.epilogue.label == "rq" and last.quantize_for is None  # the logits stay int32
    tiny = quantize_network("tiny", 8, model=_tiny_model(), calibration=torch.rand((2, 3, 16, 16)),
                            input_shape=(3, 16, 16))
    fused = plan_fusion(tiny)
    residuals = [f for f in fused.values() if f.residual is not None]
    assert len(residuals) == 2 and all(f.epilogue.relu for f in residuals)
    # a value read twice (the shortcut) is never quantized in its producer
    stem = fused[next(iter(fused))]
    assert stem.epilogue.relu and stem.epilogue.quantize_bits is None


def test_lenet_integer_model_tracks_fake_quant_torch(lenet_net, mnist_images):
    _, values = integer_forward(lenet_net, lenet_net.quantize_input(mnist_images), keep=True)
    # every layer's quantized input equals torch's fake-quantized input on almost every element
    captured = {}
    fq = fake_quant_model(lenet_net)
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0].detach()))
        for name, m in fq.named_modules() if name in {lq.spec.name for lq in lenet_net.layers}
    ]
    with torch.no_grad():
        torch_logits = fq(mnist_images).numpy()
    for h in hooks:
        h.remove()
    ops = {op.attrs["index"]: op.name for op in lenet_net.graph.ops if op.kind == "layer"}
    for lq in lenet_net.layers:
        x_int = values[ops[lq.spec.index] + ":x"].astype(np.float64)
        x_torch = captured[lq.spec.name].numpy().reshape(x_int.shape) / lq.act_step  # pre-hooks run in order
        agree = np.mean(np.abs(x_int - np.round(x_torch)) <= 0)
        assert agree >= 0.999, (lq.spec.name, agree)
    int_logits = lenet_net.logits(values[lenet_net.graph.output])
    assert np.abs(int_logits - torch_logits).max() < 0.05 * np.abs(torch_logits).max()


def test_export_and_load_roundtrip(lenet_compiled, mnist_images, tmp_path):
    out = lenet_compiled.export(tmp_path / "lenet")
    assert sorted(os.listdir(out)) == ["manifest.json", "net.so"]
    lenet_compiled.export(tmp_path / "lenet")  # replacing an existing folder works
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left behind
    loaded = load_compiled(out)
    manifest = loaded.manifest
    assert manifest["w_bits"] == list(LENET_BITS) and manifest["batch"] == 4
    assert manifest["input_shape"] == [1, 28, 28] and manifest["constants"][0]["name"] == "l0_weight"
    assert [layer["w_bits"] for layer in manifest["layers"]] == list(LENET_BITS)
    np.testing.assert_array_equal(loaded.run_levels(loaded.quantize_input(mnist_images)),
                                  lenet_compiled.run_levels(lenet_compiled.quantize_input(mnist_images)))
    np.testing.assert_array_equal(loaded.predict(mnist_images), lenet_compiled.predict(mnist_images))


def test_load_compiled_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ReleqError) as err:
        load_compiled(tmp_path)
    assert "\n" not in str(err.value) and "missing" in str(err.value)


# ------------------------------------------------------------------------------------------
# residual add, depthwise conv, batch norm folding, average pooling


class TinyResidual(nn.Module):
    """conv-BN-ReLU, a depthwise + pointwise pair around an identity shortcut, a 1x1 projection
    shortcut with stride 2, max and adaptive-average pooling, then a dense layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.pw(self.dw(x)) + x)
        x = self.relu(self.down(x) + self.proj(x))
        return self.fc(self.gap(self.pool(x)).flatten(1))


def _tiny_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyResidual()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, one negative gamma per layer
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.weight.data[0] = -m.weight.data[0]
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5
    return model.eval()


def test_tiny_residual_depthwise_network_is_bit_exact():
    gen = torch.Generator().manual_seed(2)
    calib = torch.rand((8, 3, 16, 16), generator=gen)
    model = _tiny_model()
    net = quantize_network("tiny", (8, 3, 2, 4, 5, 6), (8, 4, 6, 5, 5, 7), model=model, calibration=calib,
                           input_shape=(3, 16, 16))
    kinds = [op.kind for op in net.graph.ops]
    assert kinds.count("add") == 2 and kinds.count("avgpool") == 1 and kinds.count("maxpool") == 1
    assert [lq.spec.kind for lq in net.layers] == ["conv", "dwconv", "conv", "conv", "conv", "dense"]
    assert all(bn is not None for bn in net.graph.batch_norms[:5])
    compiled = compile_network(net, "bitserial", batch=2)
    images = torch.rand((3, 3, 16, 16), generator=gen)
    levels = compiled.quantize_input(images)
    np.testing.assert_array_equal(compiled.run_levels(levels), integer_forward(net, levels))
    with torch.no_grad():
        torch_logits = fake_quant_model(net, model)(images).numpy()
    int_logits = net.logits(integer_forward(net, levels))
    assert np.abs(int_logits - torch_logits).max() < 0.05 * np.abs(torch_logits).max() + 1e-6


def test_overlapping_average_pool_is_bit_exact():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=2), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 3)).eval()
    gen = torch.Generator().manual_seed(4)
    net = quantize_network("avg", (4, 3), (8, 5), model=model, calibration=torch.rand((4, 2, 8, 8), generator=gen),
                           input_shape=(2, 8, 8))
    assert [op.kind for op in net.graph.ops].count("avgpool") == 1
    compiled = compile_network(net, "bitserial", batch=3)
    levels = compiled.quantize_input(torch.rand((3, 2, 8, 8), generator=gen))
    np.testing.assert_array_equal(compiled.run_levels(levels), integer_forward(net, levels))


def test_unsupported_operation_is_a_one_line_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    with pytest.raises(ReleqError) as err:
        quantize_network("sig", 8, model=model, calibration=torch.rand(2, 1, 8, 8), input_shape=(1, 8, 8))
    assert "Sigmoid" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------
# latency table


def test_latency_table_measures_once_and_caches_on_disk(tmp_path, monkeypatch):
    import releq_tvm.compile.latency_table as latency_module
    from releq_tvm.store import Store

    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path))
    rows = layer_table("lenet")
    table = LatencyTable(timing=FAST_TIMING)
    # the one store file; the namespace is keyed by CPU model and TVM version (both in it, file-name-safe)
    import tvm

    assert table.path == tmp_path / "cache.sqlite"
    assert table.namespace.startswith(f"latency/{machine_key(table.target)}/")
    assert tvm.__version__ in table.namespace and file_safe(table.machine["cpu_model"]) in table.namespace
    first = table.latency_us(rows[4], 2, 8)
    assert first > 0 and table.builds == 1
    assert table.latency_us(rows[4], 2, 8) == first and table.builds == 1  # no rebuild
    fresh = LatencyTable(timing=FAST_TIMING)  # a new process would read the same file
    assert fresh.latency_us(rows[4], 2, 8) == first and fresh.builds == 0
    store = Store(table.path)  # what another process opening the file sees
    assert store.get(table.namespace, layer_key(rows[4], 2, 8))["us"] == first
    assert store.get(LatencyTable.MACHINES, table.namespace)["machine"]["tvm"] == tvm.__version__
    # a table measured with another TVM (or CPU) is never reused
    real_info = latency_module.machine_info
    monkeypatch.setattr(latency_module, "machine_info", lambda target: dict(real_info(target), tvm="0.0.0"))
    other = LatencyTable(timing=FAST_TIMING)
    assert other.namespace != table.namespace and len(other) == 0
    assert layer_key(rows[4], 2, 8) not in other and other.entry(layer_key(rows[4], 2, 8)) is None


def test_layers_above_the_l2_are_timed_with_cold_weights(tmp_path, monkeypatch):
    # LeNet-5 fc1 (400x120): 48,000 int8 weight bytes, 12,000 packed at 2-bit lut
    import releq_tvm.compile.layers as layers_module
    from releq_tvm.compile.timing import Runner
    from releq_tvm.kernels.target import CacheSizes

    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path))
    fc1 = layer_table("lenet")[2]
    monkeypatch.setattr(layers_module, "cache_sizes", lambda: CacheSizes(l1d=4096, l2=20_000, l3=1 << 20))
    runner = Runner()
    assert layers_module.timing_protocol(runner, 20_001) == "cold"
    assert layers_module.timing_protocol(runner, 20_000) == "warm"
    table = LatencyTable(timing=FAST_TIMING)
    int8 = table.measure(fc1, 8, 8, "int8")
    lut = table.measure(fc1, 2, 8, "lut")
    assert int8["protocol"] == "cold" and lut["protocol"] == "warm" and int8["us"] > 0 and lut["us"] > 0
    # the protocol is stored with the number
    assert LatencyTable(timing=FAST_TIMING).entry(layer_key(fc1, 8, 8, "int8"))["protocol"] == "cold"


def test_cold_weights_sampler_rotates_copies_totalling_twice_the_l3(monkeypatch):
    import releq_tvm.compile.timing as timing_module
    from releq_tvm.compile.timing import Runner
    from releq_tvm.kernels.target import CacheSizes

    monkeypatch.setattr(timing_module, "cache_sizes", lambda: CacheSizes(l1d=1024, l2=4096, l3=10_000))
    runner = Runner()
    x = runner.tensor(np.arange(4, dtype=np.int32))
    w = runner.tensor(np.arange(750, dtype=np.int32))  # 3,000 bytes: ceil(2 * 10,000 / 3,000) = 7 copies
    seen = []

    def main(a, b):
        assert a is x  # only the weights rotate
        np.testing.assert_array_equal(b.numpy(), np.arange(750))  # every copy holds the same values
        seen.append(b)

    sampler = timing_module.cold_weights_sampler(runner, {"main": main}, [x, w], FAST_TIMING)
    seen.clear()
    for _ in range(3):
        sampler()
    distinct = []
    for b in seen:
        if not any(b is d for d in distinct):
            distinct.append(b)
    assert len(distinct) == 7 and any(d is w for d in distinct)
    assert all(seen[i] is seen[i + 7] for i in range(len(seen) - 7))  # the same cyclic order throughout


def test_cache_sizes_are_read_from_the_os():
    from releq_tvm.kernels.target import _size_bytes, cache_sizes

    assert _size_bytes("32K") == 32 << 10 and _size_bytes("1024K") == 1 << 20 and _size_bytes("32M") == 32 << 20
    assert _size_bytes("") == 0
    caches = cache_sizes()
    assert 0 < caches.l1d < caches.l2 < caches.l3


@pytest.mark.parametrize(
    "model",
    ["Intel(R) Xeon(R) Processor", "AMD EPYC 7B13 64-Core Processor", "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"],
)
def test_latency_table_namespace_is_safe_for_any_cpu_name(model, tmp_path, monkeypatch):
    import releq_tvm.compile.target as target_module

    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path))
    monkeypatch.setattr(target_module, "cpu_model", lambda: model)
    table = LatencyTable(path=None, timing=FAST_TIMING)
    assert table.machine["cpu_model"] == model
    assert file_safe(model) in table.namespace
    assert all(ch.isalnum() or ch in "._-/" for ch in table.namespace)


def test_cpu_cost_ratio_is_one_at_8_bits_and_lower_at_fewer(tmp_path):
    table = LatencyTable(path=tmp_path / "t.sqlite", timing=FAST_TIMING)
    assert cpu_cost_ratio("lenet", [8] * 5, table=table, include_fixed=False) == 1.0
    builds = table.builds
    assert builds == 5  # one kernel per layer
    ratio = cpu_cost_ratio("lenet", LENET_BITS, table=table, include_fixed=False)
    assert table.builds == builds + 4  # the 8-bit first layer was already in the table
    assert 0.0 < ratio < 1.0


# ------------------------------------------------------------------------------------------
# targets and the command line


@pytest.mark.parametrize("spec", ["cuda", "aarch64", '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}', "cuda/sm_80"])
def test_unsupported_target_is_one_line(spec):
    with pytest.raises(ReleqError) as err:
        resolve_target(spec)
    assert "\n" not in str(err.value) and "x86" in str(err.value)


def test_target_forms_resolve_to_x86_dicts():
    host = resolve_target()
    assert host.kind.name == "llvm" and str(host.attrs["mtriple"]).startswith("x86_64")
    assert str(resolve_target("llvm/skylake").attrs["mcpu"]) == "skylake"
    assert str(resolve_target('{"kind": "llvm", "mcpu": "znver3"}').attrs["mcpu"]) == "znver3"


def test_cli_bad_bits_is_one_line():
    result = CliRunner().invoke(main, ["compile", "lenet", "--bits", "8,2"])
    assert result.exit_code == 2
    assert "5 weight layers" in result.output and result.output.strip().count("\n") == 0


def test_cli_bad_target_is_one_line():
    result = CliRunner().invoke(main, ["compile", "lenet", "--target", "cuda"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0 and "x86" in result.output


def test_cli_compile_writes_the_folder(tmp_path):
    out = tmp_path / "lenet-c"
    result = CliRunner().invoke(main, ["compile", "lenet", "--bits", "8,2,2,3,2", "-o", str(out), "--no-measure", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["w_bits"] == "8,2,2,3,2" and report["out_dir"] == str(out)
    loaded = load_compiled(out)
    images = load_dataset("mnist", "test", limit=3).images
    assert loaded.predict(images).shape == (3,)


# ------------------------------------------------------------------------------------------
# slow: every network, MNIST accuracy, the full measurement, RPC


@pytest.mark.slow
@pytest.mark.parametrize("name", list_networks())
def test_every_network_compiles_bit_exact(name):
    spec = get_network_spec(name)
    net = quantize_network(name, spec.published_bits, calibration=torch.rand((2, *spec.input_shape),
                                                                            generator=torch.Generator().manual_seed(0)))
    compiled = compile_network(net, "bitserial", batch=1)
    levels = compiled.quantize_input(torch.rand((1, *spec.input_shape), generator=torch.Generator().manual_seed(1)))
    np.testing.assert_array_equal(compiled.run_levels(levels), integer_forward(net, levels))


def _accuracy(pred, labels) -> float:
    return 100.0 * float(np.mean(pred == labels))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(8, 8, 8, 8, 8), LENET_BITS])
def test_lenet_mnist_accuracy_matches_fake_quant(bits):
    """Full MNIST test set: compiled integer network vs the fake-quantized torch model, within 0.1 pp.

    Below 8 bits the checkpoint is first fine-tuned at the bits (300 steps), as the search would.
    """
    from releq_tvm.train import finetune_bits, load_model

    model = load_model("lenet")
    if bits != (8,) * 5:
        finetune_bits(model, bits, (1, 28, 28), load_dataset("mnist", "train"), steps=300, seed=0)
        from releq_tvm.quant import remove_bits

        remove_bits(model)
    net = quantize_network("lenet", bits, model=model)
    compiled = compile_network(net, "bitserial", batch=100)
    test = load_dataset("mnist", "test")
    labels = test.labels.numpy()
    acc_tvm = _accuracy(compiled.predict(test.images), labels)
    with torch.no_grad():
        acc_torch = _accuracy(fake_quant_model(net)(test.images).argmax(1).numpy(), labels)
    print(f"lenet {bits}: compiled {acc_tvm:.2f} %, fake-quant torch {acc_torch:.2f} %")
    assert abs(acc_tvm - acc_torch) <= 0.1
    assert acc_tvm > 90.0  # a working network, not chance (10 %)


@pytest.mark.slow
def test_measure_network_lenet_reports_every_build(tmp_path):
    from releq_tvm.compile import measure_network
    from releq_tvm.report.fidelity import write_fidelity_csv

    table = LatencyTable(path=tmp_path / "t.sqlite", timing=FAST_TIMING)
    calls = []
    result = measure_network("lenet", LENET_BITS, repeats=3, table=table, extra={"other": lambda: calls.append(1)})
    assert len(result.layers) == 5
    for layer in result.layers:
        assert all(layer.ms[label] > 0 for label in ("bits", "bitserial8", "int8", "fp32"))
        assert layer.auto_kernel in ("bitserial", "int8")
    assert all(result.network_ms[label] > 0 for label in ("bits", "bitserial8", "auto", "int8", "fp32", "other"))
    assert calls and result.cost_ratio_measured > 0
    write_fidelity_csv([result], tmp_path / "fidelity.csv")
    header, rows = read_csv(tmp_path / "fidelity.csv")
    assert len(rows) == 1 and rows[0]["network"] == "lenet" and rows[0]["w_bits"] == "8,2,2,3,2"
    assert float(rows[0]["network_bits_ms"]) == pytest.approx(result.network_ms["bits"], rel=1e-5)


def _comparison(network="lenet", bits_ms=2.0):
    """A NetworkComparison with hand-picked numbers (two layers), for the arithmetic tests."""
    from releq_tvm.compile.measure import LayerTimes, NetworkComparison

    layers = [
        LayerTimes(0, "conv1", "conv", "conv i1 o6", 100, 8, 8, {"bits": 1.0, "bitserial8": 2.0, "int8": 0.5},
                   {"bits": 0.1, "bitserial8": 0.1, "int8": 0.1}, "int8"),
        LayerTimes(1, "fc", "dense", "dense i8 o2", 16, 2, 8, {"bits": 0.25, "bitserial8": 1.0, "int8": 0.5},
                   {"bits": 0.1, "bitserial8": 0.1, "int8": 0.1}, "bitserial"),
    ]
    return NetworkComparison(
        network=network, w_bits=(8, 2), a_bits=(8, 8), batch=1, layers=layers,
        network_ms={"bits": bits_ms, "bitserial8": 4.0, "int8": 1.5, "auto": 1.0},
        network_iqr_ms={"bits": 0.1, "bitserial8": 0.1, "int8": 0.1, "auto": 0.1},
        sum_of_layers_ms={"bits": 1.25, "bitserial8": 3.0, "int8": 1.0, "auto": 0.75},
        compile_s={}, timing=FAST_TIMING, where="local",
        machine={"cpu_model": "Test CPU", "target": {"kind": "llvm"}, "tvm": "0.27", "threads": 1},
    )


def test_network_comparison_ratios_are_the_hand_computed_ones():
    m = _comparison()
    assert m.layers[0].auto_ms == 0.5 and m.layers[1].auto_ms == 0.25 and m.layers[1].speedup_vs_8bit == 4.0
    assert m.fixed_ms == 1.0  # 4.0 - 3.0
    assert m.cost_ratio_predicted == pytest.approx((1.25 + 1.0) / (3.0 + 1.0))
    assert m.cost_ratio_measured == pytest.approx(0.5)
    assert m.cost_ratio_error_pct == pytest.approx(100 * (0.5625 - 0.5) / 0.5)
    assert m.speedup("bitserial8") == 2.0 and m.speedup("int8", "auto") == 1.5 and m.speedup("fp32") is None
    assert m.sum_over_network("auto") == 0.75
    data = m.to_dict()
    assert data["fidelity"]["fixed_ms"] == 1.0 and data["speedups"]["auto_over_int8"] == 1.5
    assert data["layers"][1]["auto_ms"] == 0.25 and data["timing"]["repeats"] == FAST_TIMING.repeats


def test_fidelity_csv_has_provenance_and_update_replaces_only_the_same_network(tmp_path):
    from releq_tvm.report.fidelity import write_fidelity_csv

    path = tmp_path / "fidelity.csv"
    write_fidelity_csv([_comparison("lenet"), _comparison("lenet4")], path)
    write_fidelity_csv([_comparison("lenet", bits_ms=3.0)], path, update=True)
    header, rows = read_csv(path)
    assert [h.split(":")[0] for h in header[:4]] == ["command", "machine", "versions", "made"]
    assert sorted(r["network"] for r in rows) == ["lenet", "lenet4"]
    lenet = next(r for r in rows if r["network"] == "lenet")
    assert float(lenet["network_bits_ms"]) == 3.0 and float(lenet["cost_ratio_measured"]) == 0.75
    assert lenet["cpu_model"] == "Test CPU" and lenet["network_int8_ms"] == "1.5" and lenet["network_fp32_ms"] == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rpc_measurement_against_a_local_server(tmp_path):
    """A TVM RPC server on 127.0.0.1 (its own process group, so it and its workers are ended together)."""
    from releq_tvm.compile.timing import Runner

    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
             "--port-end", str(port + 1), "--no-fork"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 180  # the server imports TVM before it binds: slow on a busy machine
        while "bind to" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        runner = Runner(f"127.0.0.1:{port}")
        table = LatencyTable(path=tmp_path / "t.sqlite", timing=FAST_TIMING, runner=runner)
        assert table.latency_us(layer_table("lenet")[4], 2, 8) > 0
        assert runner.where == f"rpc://127.0.0.1:{port}" and table.machine["device"]["reported_by"] == "rpc"
        assert f"{port}" not in table.namespace  # keyed by the server's CPU, not its address
        net = quantize_network("lenet", LENET_BITS)
        compiled = compile_network(net, "bitserial", batch=1)
        from releq_tvm.compile.measure import time_integer_network

        timing = time_integer_network(runner, compiled.executable, net.input_shape, net.input_bits, 1, FAST_TIMING)
        assert timing["median_ms"] > 0
    finally:
        os.killpg(server.pid, 15)
        server.wait()


def _start(command: list[str], log, ready: str, seconds: float = 180):
    """A TVM RPC process in its own process group (it and its workers end together); waits for ``ready`` in its log."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", *command], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.time() + seconds  # TVM is imported before the socket binds: slow on a busy machine
    while ready not in log.read_text() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    return process


def _stop(*processes) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, 15)
            process.wait()


class _FakeRemote:
    """What LatencyTable reads of a remote runner, without a server: its CPU as the session reports it."""

    remote, session = True, object()

    def __init__(self, where: str, llvm_cpu: str = "znver4", threads: int = 1):
        self.where = where
        self._facts = {"llvm_cpu": llvm_cpu, "triple": "x86_64-pc-linux-gnu", "vendor": "amd", "features": ["avx2"],
                       "cpu_model": None, "threads": threads, "reported_by": "rpc"}

    def machine(self) -> dict:
        return dict(self._facts)

    def target(self):
        from releq_tvm.compile.target import resolve_target

        return resolve_target({"kind": "llvm", "mcpu": self._facts["llvm_cpu"]})


def test_latency_table_of_a_remote_device_is_keyed_by_its_cpu_not_its_address(tmp_path):
    """Two servers with one CPU share a namespace; another remote CPU reads another; the local key is unchanged."""
    from releq_tvm.compile.timing import Runner

    path = tmp_path / "t.sqlite"
    one = LatencyTable(path=path, runner=_FakeRemote("rpc://10.0.0.1:9090"))
    two = LatencyTable(path=path, runner=_FakeRemote("rpc-tracker://10.0.0.2:9190/epyc"))
    other = LatencyTable(path=path, runner=_FakeRemote("rpc://10.0.0.1:9090", llvm_cpu="skylake-avx512"))
    assert one.namespace == two.namespace != other.namespace
    assert one.namespace.startswith("latency/rpc-amd_znver4-znver4-tvm") and "skylake-avx512" in other.namespace
    assert str(one.target.attrs["mcpu"]) == "znver4" and str(other.target.attrs["mcpu"]) == "skylake-avx512"
    assert one.machine["device"]["reported_by"] == "rpc" and "cpu_model" not in one.machine
    explicit = LatencyTable(target="haswell", path=path, runner=_FakeRemote("rpc://10.0.0.1:9090"))
    assert str(explicit.target.attrs["mcpu"]) == "haswell" and explicit.namespace != one.namespace
    local = LatencyTable(path=path, runner=Runner())
    assert local.namespace == LatencyTable(path=path).namespace
    assert local.namespace.startswith(f"latency/{machine_key(local.target)}/") and "device" not in local.machine


def test_a_network_timed_remotely_names_the_remote_cpu_not_this_one():
    from releq_tvm.compile.measure import timed_machine
    from releq_tvm.compile.target import machine_info, resolve_target
    from releq_tvm.compile.timing import Runner

    remote = _FakeRemote("rpc-tracker://10.0.0.2:9190/epyc", llvm_cpu="skylake-avx512", threads=4)
    target = resolve_target(remote.target())
    m = timed_machine(target, remote)
    assert m["cpu_model"] == "amd skylake-avx512 (remote, rpc-tracker://10.0.0.2:9190/epyc)"
    assert m["threads"] == 4 and m["cores"] is None and m["device"]["reported_by"] == "rpc"
    assert m["target"]["mcpu"] == "skylake-avx512"
    assert timed_machine(resolve_target(None), Runner()) == machine_info(resolve_target(None))


def test_local_runner_describes_this_machine(tmp_path):
    from releq_tvm.compile.timing import Runner
    from releq_tvm.kernels.target import host_cpu_name, tvm_threads

    runner = Runner()
    facts = runner.machine()
    assert runner.where == "local" and not runner.remote and facts["reported_by"] == "local"
    assert facts["llvm_cpu"] == host_cpu_name() and facts["threads"] == tvm_threads()
    assert facts["triple"].startswith("x86_64") and facts["vendor"] in ("amd", "intel") and "sse2" in facts["features"]
    assert str(runner.target().attrs["mcpu"]) == host_cpu_name()


@pytest.mark.parametrize("options, message", [
    ({"tracker": "127.0.0.1:9190"}, "--rpc-tracker and --rpc-key go together"),
    ({"key": "epyc"}, "--rpc-tracker and --rpc-key go together"),
    ({"rpc": "127.0.0.1:9090", "tracker": "127.0.0.1:9190", "key": "epyc"}, "not both"),
    ({"tracker": "9190", "key": "epyc"}, "--rpc-tracker '9190' must look like HOST:PORT"),
    ({"tracker": "127.0.0.1:{free}", "key": "epyc"}, "cannot reach the TVM RPC tracker at 127.0.0.1:"),
])
def test_runner_rejects_bad_rpc_options_in_one_line(options, message):
    from releq_tvm.compile.timing import Runner

    options = {k: v.format(free=_free_port()) for k, v in options.items()}
    started = time.time()
    with pytest.raises(ReleqError, match=message) as error:
        Runner(**options)
    assert "\n" not in str(error.value) and time.time() - started < 5


def test_compile_cli_rejects_a_tracker_without_a_key():
    result = CliRunner().invoke(main, ["compile", "lenet", "--rpc-tracker", "127.0.0.1:9190", "--no-measure"])
    assert result.exit_code == 2 and "--rpc-tracker and --rpc-key go together" in result.output


def _request_when_registered(runner_class, tracker: str, key: str, seconds: float = 60):
    """A runner on ``key`` once the server has registered with the tracker (it does so after binding)."""
    deadline = time.time() + seconds
    while True:
        try:
            return runner_class(tracker=tracker, key=key)
        except ReleqError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_rpc_tracker_measurement_names_the_remote_cpu(tmp_path):
    """A TVM RPC tracker and a server registered to it with a key, both on 127.0.0.1."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    from releq_tvm.compile.timing import Runner
    from releq_tvm.kernels.target import host_cpu_name

    tracker_port, server_port = _free_port(), _free_port()
    tracker = server = None
    try:
        tracker = _start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
                          "--port-end", str(tracker_port + 1)], tmp_path / "tracker.log", "bind to")
        server = _start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                         "--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{tracker_port}",
                         "--key", "releq-test"], tmp_path / "server.log", "bind to")
        address = f"127.0.0.1:{tracker_port}"
        runner = _request_when_registered(Runner, address, "releq-test")
        assert runner.where == f"rpc-tracker://{address}/releq-test" and runner.remote
        facts = runner.machine()
        # asked of the server through the session (reported_by, no CPU model name), same CPU as here
        assert facts["reported_by"] == "rpc" and facts["cpu_model"] is None and facts["threads"] >= 1
        assert facts["llvm_cpu"] == host_cpu_name() and facts["features"] == Runner().machine()["features"]
        table = LatencyTable(path=tmp_path / "t.sqlite", timing=FAST_TIMING, runner=runner)
        assert table.machine["device"] == facts and str(table.target.attrs["mcpu"]) == facts["llvm_cpu"]
        assert table.namespace.startswith(f"latency/rpc-{facts['vendor']}_{facts['llvm_cpu']}-")
        us = table.latency_us(layer_table("lenet")[4], 2, 8)
        assert 0 < us < float("inf")
        started = time.time()
        with pytest.raises(ReleqError, match="has no device of key 'no-such-key'") as error:
            Runner(tracker=address, key="no-such-key")
        assert "\n" not in str(error.value) and time.time() - started < 5
    finally:
        _stop(server, tracker)


@pytest.mark.parametrize("env", [None, "1", "2"])
def test_running_tvm_code_pins_the_thread_count_tvm_reads_per_parallel_loop(env):
    """Runner (every timing) sets TVM_NUM_THREADS to the pool's size when unset, and keeps a value given;
    machine_info's thread count (part of every latency-table key) equals TVM's own pool size."""
    code = ("import os, tvm; from releq_tvm.compile.timing import Runner; from releq_tvm.kernels.target import tvm_threads; "
            "Runner(); print(os.environ['TVM_NUM_THREADS'], tvm_threads(), tvm.get_global_func('runtime.NumThreads')())")
    environ = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if env is not None:
        environ["TVM_NUM_THREADS"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    pinned, ours, runtime = out.stdout.split()
    assert pinned == ours == runtime == (env or str(max(1, (os.cpu_count() or 1) // 2)))


def test_learned_clipping_levels_reach_the_integer_network():
    """LeNet-5 fine-tuned 5 steps with learned activation clipping levels (PACT) at activation bits
    8,4,4,2,4: the integer network takes the learned levels, and its numpy forward predicts what the
    fake-quantized torch model predicts on 200 MNIST test images, image for image."""
    from releq_tvm.quant import act_quantizers, remove_bits
    from releq_tvm.train import finetune_bits, load_model

    a_bits = (8, 4, 4, 2, 4)
    train = load_dataset("mnist", "train", limit=2000)
    model = load_model("lenet")
    finetune_bits(model, LENET_BITS, (1, 28, 28), train, steps=5, lr=3e-3, batch_size=64, seed=0, act_bits=a_bits,
                  calibration=train.images[:256])
    learned = act_quantizers(model)
    assert learned["0"].alpha.item() == 1.0 and all(q.alpha_factor.item() != 1.0 for n, q in learned.items() if n != "0")
    test = load_dataset("mnist", "test", limit=200)
    with torch.no_grad():
        trained_logits = model(test.images)
    remove_bits(model)  # the lowering quantizes the float weights itself; the input quantizers stay
    net = quantize_network("lenet", LENET_BITS, model=model)
    assert net.a_bits == a_bits  # the bits of the quantizers the model carries
    assert [lq.act_range for lq in net.layers] == [learned[lq.spec.name].alpha.item() for lq in net.layers]
    with torch.no_grad():
        torch_logits = fake_quant_model(net)(test.images)
    assert torch.equal(torch_logits, trained_logits)  # the reference is the fine-tuned model itself
    int_logits = net.logits(integer_forward(net, net.quantize_input(test.images)))
    np.testing.assert_array_equal(int_logits.argmax(1), torch_logits.argmax(1).numpy())
    assert np.abs(int_logits - torch_logits.numpy()).max() < 0.01 * np.abs(torch_logits.numpy()).max()
    assert _accuracy(int_logits.argmax(1), test.labels.numpy()) > 90.0  # a working network, not chance
    with pytest.raises(ReleqError, match="learned its activation range at 2 bits, not 4"):
        quantize_network("lenet", LENET_BITS, (8, 4, 4, 4, 4), model=model)


def test_compile_checkpoint_builds_the_saved_finetuned_model(tmp_path):
    """The route from a fine-tune to a build: LeNet-5 fine-tuned 5 steps at w 8,2,2,3,2, a 8,4,4,2,4
    (learned clipping levels), saved with save_finetuned, built by `compile --checkpoint FILE` with
    the file's bits: the library predicts what the fine-tuned torch model predicts on 200 MNIST test
    images, and its integer outputs are exactly the numpy integer forward of the same file."""
    from releq_tvm.quant import act_quantizers, apply_bits
    from releq_tvm.train import finetune_bits, load_model, read_model_file, save_finetuned

    a_bits = (8, 4, 4, 2, 4)
    train = load_dataset("mnist", "train", limit=2000)
    model = load_model("lenet")
    finetune_bits(model, LENET_BITS, (1, 28, 28), train, steps=5, lr=3e-3, batch_size=64, seed=0, act_bits=a_bits,
                  calibration=train.images[:256])
    test = load_dataset("mnist", "test", limit=200)
    with torch.no_grad():
        trained_logits = model(test.images)
    path = save_finetuned(tmp_path / "ft.pt", model, "lenet", (1, 28, 28), {"steps": 5})

    # the file gives back the same model: bits, learned levels, and (with its weight bits) the same logits
    loaded = read_model_file("lenet", path)
    assert (loaded.w_bits, loaded.a_bits, loaded.about) == (LENET_BITS, a_bits, {"steps": 5})
    assert {n: q.alpha.item() for n, q in act_quantizers(loaded.model).items()} == \
        {n: q.alpha.item() for n, q in act_quantizers(model).items()}
    assert [q.learned for q in act_quantizers(loaded.model).values()] == [False, True, True, True, True]
    with torch.no_grad():
        assert torch.equal(apply_bits(loaded.model, LENET_BITS, (1, 28, 28))(test.images), trained_logits)

    result = CliRunner().invoke(main, ["compile", "lenet", "--checkpoint", str(path), "--no-measure", "--kernels",
                                       "bitserial", "--batch", "50", "-o", str(tmp_path / "build")])
    assert result.exit_code == 0, result.output
    assert "weights: fine-tuned checkpoint" in result.output
    built = load_compiled(tmp_path / "build")
    assert (built.manifest["w_bits"], built.manifest["a_bits"]) == (list(LENET_BITS), list(a_bits))
    np.testing.assert_array_equal(built.predict(test.images), trained_logits.argmax(1).numpy())
    net = quantize_network("lenet", None, checkpoint=str(path))  # bits from the file, as the CLI
    assert [lq.act_range for lq in net.layers] == [act_quantizers(model)[lq.spec.name].alpha.item() for lq in net.layers]
    np.testing.assert_array_equal(built.run_levels(built.quantize_input(test.images)),
                                  integer_forward(net, net.quantize_input(test.images)))
