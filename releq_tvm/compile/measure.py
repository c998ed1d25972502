"""Whole networks built and timed side by side (the network comparison), locally or over RPC.

The timing protocol is :mod:`releq_tvm.timing`'s (TVM's samplers: :mod:`releq_tvm.compile.timing`); single layers are built and timed by
:mod:`releq_tvm.compile.layers`. When several builds are compared (:func:`measure_network`) they
are timed in interleaved rounds, one sample of each per round, so load from other jobs on a
shared machine falls on all of them alike. Inputs are seeded random levels: no kernel has
data-dependent control flow, so the values do not change the time.

The builds compared:

* ``bits``       the bit-serial build at the chosen per-layer bits;
* ``bitserial8`` the same network with every layer at 8/8 bits (the reference of speedups);
* ``int8``       the plain int8 kernels (``releq_tvm.kernels``), same integer network;
* ``auto``       per layer the fastest of bit-serial at its bits, int8 and lut (what ``compile`` ships);
* ``fp32``       the float torch model through ``torch.export`` -> ``from_exported_program`` ->
                 ``tvm.compile`` with TVM's default (untuned) CPU pipeline ("TVM untuned");
* any ``extra`` engine the caller passes (the report passes onnxruntime and OpenVINO).

The result is a :class:`NetworkComparison`; the report writes it to ``fidelity.csv``
(:mod:`releq_tvm.report.fidelity`) and fig8.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import tvm

from releq_tvm.networks import get_network_spec

from releq_tvm.compile.integer import random_integer_network
from releq_tvm.compile.layers import layer_sampler
from releq_tvm.compile.lower import family_applies
from releq_tvm.compile.layers import random_levels as _random_levels
from releq_tvm.compile.timing import Runner, main_sampler, time_main
from releq_tvm.timing import CallSampler, TimingConfig, interleaved_timing


# --------------------------------------------------------------------------------------------
# whole networks


def build_fp32_network(model: torch.nn.Module, input_shape, batch: int, target) -> tvm.runtime.Executable:
    """The float model through ``torch.export`` and TVM's Relax frontend, compiled for ``target``."""
    from tvm.relax.frontend.torch import from_exported_program

    x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = torch.export.export(model.eval(), (x,))
    mod = from_exported_program(exported, keep_params_as_input=False)
    return tvm.compile(mod, target=target)


def time_integer_network(runner: Runner, ex, input_shape, input_bits: int, batch: int, config: TimingConfig) -> dict:
    """Time ``main(x)`` of a compiled integer network on seeded input levels."""
    rng = np.random.default_rng(0)
    x = _random_levels((batch, *input_shape), input_bits, rng)
    return time_main(runner, runner.vm(ex), [runner.tensor(x)], config)


# --------------------------------------------------------------------------------------------
# the whole comparison: per layer and per network, four builds


@dataclass
class LayerTimes:
    """One conv/dense layer of :class:`NetworkComparison`: its kernel's latency in each build."""

    index: int
    name: str
    kind: str
    shape: str
    macs: int
    w_bits: int
    a_bits: int
    ms: dict[str, float]  # build label ("bits", "bitserial8", "int8", "fp32", "lut" where it applies) -> median, ms
    iqr_ms: dict[str, float]
    auto_kernel: str | None = None  # the family the auto build gave this layer

    @property
    def speedup_vs_8bit(self) -> float:
        return self.ms["bitserial8"] / self.ms["bits"]

    @property
    def auto_ms(self) -> float | None:
        label = {"bitserial": "bits"}.get(self.auto_kernel, self.auto_kernel)
        return None if self.auto_kernel is None else self.ms[label]


@dataclass
class NetworkComparison:
    """What :func:`measure_network` measured: per-layer kernels and whole networks, side by side.

    ``network_ms`` / ``network_iqr_ms`` hold one entry per whole-network build (``bits``,
    ``bitserial8``, ``auto``, ``int8``, ``fp32`` and any ``extra`` engine), ``sum_of_layers_ms``
    the sum of that build's standalone kernels. Times in milliseconds.
    """

    network: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    batch: int
    layers: list[LayerTimes]
    network_ms: dict[str, float]
    network_iqr_ms: dict[str, float]
    sum_of_layers_ms: dict[str, float]
    compile_s: dict[str, float]
    timing: TimingConfig
    where: str
    machine: dict

    def speedup(self, over: str, build: str = "bits") -> float | None:
        """Latency of ``over`` / latency of ``build`` (above 1: ``build`` is faster); None if either is missing."""
        if over not in self.network_ms or build not in self.network_ms:
            return None
        return self.network_ms[over] / self.network_ms[build]

    def sum_over_network(self, build: str) -> float:
        """Sum of ``build``'s kernels / the whole ``build`` network (1: nothing outside the kernels)."""
        return self.sum_of_layers_ms[build] / self.network_ms[build]

    @property
    def fixed_ms(self) -> float:
        """Time of the 8-bit network outside its kernels (the latency table's fixed cost)."""
        return max(0.0, self.network_ms["bitserial8"] - self.sum_of_layers_ms["bitserial8"])

    @property
    def cost_ratio_predicted(self) -> float:
        """The search's cost ratio from kernels: (layers at the bits + fixed) / (layers at 8 + fixed)."""
        return (self.sum_of_layers_ms["bits"] + self.fixed_ms) / (self.sum_of_layers_ms["bitserial8"] + self.fixed_ms)

    @property
    def cost_ratio_measured(self) -> float:
        return self.network_ms["bits"] / self.network_ms["bitserial8"]

    @property
    def cost_ratio_error_pct(self) -> float:
        return 100.0 * (self.cost_ratio_predicted - self.cost_ratio_measured) / self.cost_ratio_measured

    def to_dict(self) -> dict:
        """JSON-able: the fields plus the derived ratios (``compile --json``)."""
        out = asdict(self)
        out["timing"] = {**asdict(self.timing), "statistic": "median of rounds; iqr = interquartile range"}
        for layer, data in zip(self.layers, out["layers"]):
            data.update(speedup_vs_8bit=layer.speedup_vs_8bit, auto_ms=layer.auto_ms)
        out["speedups"] = {over: self.speedup(over) for over in self.network_ms if over != "bits"}
        out["speedups"]["auto_over_int8"] = self.speedup("int8", "auto")
        out["fidelity"] = {
            **{b: self.sum_over_network(b) for b in self.network_ms if b in self.sum_of_layers_ms},
            "fixed_ms": self.fixed_ms, "cost_ratio_predicted": self.cost_ratio_predicted,
            "cost_ratio_measured": self.cost_ratio_measured, "cost_ratio_error_pct": self.cost_ratio_error_pct,
        }
        return out


def measure_network(
    network: str,
    w_bits,
    a_bits=None,
    repeats: int = 7,
    target=None,
    batch: int = 1,
    baselines: bool = True,
    runner: Runner | None = None,
    table=None,
    compiled=None,
    model: torch.nn.Module | None = None,
    extra: dict[str, Callable[[], object]] | None = None,
    progress=None,
) -> NetworkComparison:
    """Latency of ``network`` at ``w_bits`` / ``a_bits`` against the all-8-bit bit-serial build, the
    ``auto`` build (each layer's faster kernel), the int8 build and fp32 (TVM untuned), per layer
    and for the whole network, all measured in this call.

    Everything is built first and then timed in interleaved rounds
    (:func:`releq_tvm.timing.interleaved_timing`), so per-layer and whole-network numbers, bits
    and 8 bits, see the same machine load. Per-layer numbers are also written to the latency
    table, so the search sees the same values. ``compiled`` reuses an existing build of the
    chosen bits; ``model`` supplies float weights for the fp32 build (else seeded random weights:
    latency does not depend on the values). ``baselines=False`` skips auto, int8 and fp32.
    ``extra``: more whole-network engines, name -> one batch-``batch`` inference call (another
    engine's session on the same network), timed in the same rounds by
    :class:`releq_tvm.timing.CallSampler`.
    """
    from releq_tvm.bits import parse_bits
    from releq_tvm.compile.artifact import compile_network
    from releq_tvm.compile.latency_table import LatencyTable, layer_key, shape_label
    from releq_tvm.compile.target import resolve_target
    from releq_tvm.config import BITS_MAX, DEFAULT_ACT_BITS
    from releq_tvm.networks import create_network, layer_table

    say = progress or (lambda message: None)
    target = resolve_target(target)
    runner = runner or Runner()
    config = TimingConfig(repeats=repeats)
    table = table or LatencyTable(target, timing=config, batch=batch, runner=runner)
    spec = get_network_spec(network)
    rows = layer_table(network)
    n = len(rows)
    w = parse_bits(w_bits, n, network)
    a = parse_bits(a_bits if a_bits is not None else [DEFAULT_ACT_BITS] * n, n, network, what="--act-bits")
    eight = (BITS_MAX,) * n

    # build everything first, then time it all in interleaved rounds
    backends = [("bits", "bitserial", w, a), ("bitserial8", "bitserial", eight, eight)]
    if baselines:
        backends += [("int8", "int8", eight, eight), ("fp32", "fp32", eight, eight), ("lut", "lut", w, a)]
    layer_keys: dict[str, list[str | None]] = {}
    samplers: dict[str, object] = {}
    layer_samplers = {}
    for label, backend, wb, ab in backends:
        keys: list[str | None] = []
        for row, lw, la in zip(rows, wb, ab):
            if backend != "fp32" and not family_applies(backend, row, lw):
                keys.append(None)  # lut: dense layers at 1-4 weight bits only
                continue
            key = layer_key(row, lw, la, backend, batch)
            if key not in samplers:
                say(f"build layer {row.index} {row.name} ({label})")
                samplers[key] = layer_samplers[key] = layer_sampler(runner, backend, row, lw, la, batch, target, config)
            keys.append(key)
        layer_keys[label] = keys

    compile_s: dict[str, float] = {}
    rng = np.random.default_rng(0)
    builds = [("bits", "bitserial", w, a), ("bitserial8", "bitserial", eight, eight)]
    if baselines:
        # auto: each layer's fastest kernel at the bits (int8 where neither bit-serial nor lut pays)
        builds += [("auto", "auto", w, a), ("int8", "int8", eight, eight)]
    auto_kernels: list[str | None] = [None] * n
    for label, kernels, wb, ab in builds:
        start = time.perf_counter()
        if label == "bits" and compiled is not None:
            c = compiled
        else:
            say(f"build network ({label})")
            c = compile_network(random_integer_network(network, wb, ab), kernels, batch, target, table=table)
        if label == "auto":
            auto_kernels = [layer["family"] for layer in c.manifest["layers"]]
        compile_s[label] = time.perf_counter() - start
        x = _random_levels((batch, *spec.input_shape), int(c.manifest["input_quantizer"]["bits"]), rng)
        samplers[f"network|{label}"] = main_sampler(runner, runner.vm(c.executable), [runner.tensor(x)], config)
    if baselines:
        say("build network (fp32: torch.export, from_exported_program)")
        start = time.perf_counter()
        float_model = model if model is not None else create_network(network)
        ex = build_fp32_network(float_model, spec.input_shape, batch, target)
        compile_s["fp32"] = time.perf_counter() - start
        x = runner.tensor(rng.random((batch, *spec.input_shape), dtype=np.float32))
        samplers["network|fp32"] = main_sampler(runner, runner.vm(ex), [x], config)
    for name, call in (extra or {}).items():
        samplers[f"network|{name}"] = CallSampler(call, config)

    timings = interleaved_timing(samplers, config, say)
    for key, layer in layer_samplers.items():
        table.store(key, timings[key], layer.compile_s, layer.protocol)
    per_layer = {label: [None if key is None else table.entry(key) for key in keys] for label, keys in layer_keys.items()}
    whole = {name.split("|", 1)[1]: t for name, t in timings.items() if name.startswith("network|")}

    layers = [
        LayerTimes(
            index=row.index, name=row.name, kind=row.kind, shape=shape_label(row), macs=row.macs, w_bits=w[i], a_bits=a[i],
            ms={label: e[i]["us"] / 1e3 for label, e in per_layer.items() if e[i] is not None},
            iqr_ms={label: e[i]["iqr_us"] / 1e3 for label, e in per_layer.items() if e[i] is not None},
            auto_kernel=auto_kernels[i],
        )
        for i, row in enumerate(rows)
    ]
    sums = {label: sum(e["us"] for e in entries) / 1e3 for label, entries in per_layer.items() if None not in entries}
    if baselines:
        sums["auto"] = sum(layer.auto_ms for layer in layers)
    return NetworkComparison(
        network=network, w_bits=w, a_bits=a, batch=batch, layers=layers,
        network_ms={k: t["median_ms"] for k, t in whole.items()},
        network_iqr_ms={k: t["iqr_ms"] for k, t in whole.items()},
        sum_of_layers_ms=sums, compile_s=compile_s, timing=config, where=runner.where,
        machine=timed_machine(target, runner),
    )


def timed_machine(target, runner) -> dict:
    """The machine a network was timed on, as a result file names it: this one's
    (:func:`~releq_tvm.compile.target.machine_info`), or with a remote ``runner`` the remote device's
    as its TVM reports it (vendor and LLVM CPU; TVM's RPC does not tell the model name, core count
    or caches, so those are None), with the device facts under ``device``."""
    from releq_tvm.compile.target import machine_info, target_dict

    if not runner.remote:
        return machine_info(target)
    device = runner.machine()
    return {
        "cpu_model": f"{device['vendor']} {device['llvm_cpu']} (remote, {runner.where})",
        "target": target_dict(target), "tvm": tvm.__version__, "cores": None, "threads": device["threads"],
        "caches_kib": None, "device": device,
    }
