"""Build and time: single layers (bit-serial, int8, fp32) and whole networks, locally or over RPC.

Timing protocol (every number this package reports): the function runs ``warmup`` times
untimed, then TVM's ``time_evaluator`` takes ``repeats`` samples, each the mean of as many
calls as fill ``min_repeat_ms`` (at least one); we report the median of the samples and their
spread (interquartile range, min, max), in milliseconds. When several builds are compared
(:func:`measure_network`) they are timed in interleaved rounds, one sample of each per round,
so load from other jobs on a shared machine falls on all of them alike. Inputs are seeded
random levels: no kernel has data-dependent control flow, so the values do not change the time.

The builds compared:

* ``bits``       the bit-serial build at the chosen per-layer bits;
* ``bitserial8`` the same network with every layer at 8/8 bits (the reference of speedups);
* ``int8``       the plain int8 kernels (``releq_tvm.kernels``), same integer network;
* ``fp32``       the float torch model through ``torch.export`` -> ``from_exported_program`` ->
                 ``tvm.compile`` with TVM's default (untuned) CPU pipeline.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tvm
from tvm import relax

from releq_tvm.errors import ReleqError
from releq_tvm.networks import LayerSpec, get_network_spec

from releq_tvm.compile.lower import kernel_primfunc, layer_shape
from releq_tvm.kernels.shapes import ConvShape, DenseShape


@dataclass(frozen=True)
class TimingConfig:
    """How each measurement is taken (see the module docstring)."""

    repeats: int = 7
    min_repeat_ms: int = 20
    warmup: int = 2


def summarize(seconds) -> dict:
    """Median and spread of timing samples (seconds in, milliseconds out)."""
    ms = np.asarray(list(seconds), dtype=np.float64) * 1e3
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(med),
        "iqr_ms": float(q3 - q1),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "repeats": int(ms.size),
    }


class Runner:
    """Where timed code runs: this process (``tvm.cpu()``) or a TVM RPC server (``HOST:PORT``)."""

    def __init__(self, rpc: str | None = None):
        self.rpc = rpc
        self.session = None
        if rpc:
            host, _, port = rpc.rpartition(":")
            if not host or not port.isdigit():
                raise ReleqError(f"--rpc {rpc!r} must look like HOST:PORT, e.g. 127.0.0.1:9090")
            from tvm import rpc as tvm_rpc

            try:
                self.session = tvm_rpc.connect(host, int(port))
            except Exception as exc:  # TVM raises its own error types for refused connections
                raise ReleqError(f"cannot reach the TVM RPC server at {rpc} ({str(exc).splitlines()[-1][:120]}); "
                                 "start one with `python -m tvm.exec.rpc_server --port PORT`") from None
            self.device = self.session.cpu()
        else:
            self.device = tvm.cpu()
        self._tmp = tempfile.TemporaryDirectory(prefix="releq-tvm-rpc-") if rpc else None
        self._uploads = 0

    @property
    def where(self) -> str:
        return f"rpc://{self.rpc}" if self.rpc else "local"

    def tensor(self, array: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def empty(self, shape, dtype: str):
        return tvm.runtime.empty(tuple(shape), dtype, self.device)

    def load(self, ex: tvm.runtime.Executable):
        """The runtime module of ``ex`` on this runner (exported and uploaded for RPC)."""
        if self.session is None:
            return ex.jit()
        self._uploads += 1
        path = os.path.join(self._tmp.name, f"m{self._uploads}.so")
        ex.export_library(path)
        self.session.upload(path)
        return self.session.load_module(os.path.basename(path))

    def vm(self, ex: tvm.runtime.Executable) -> relax.VirtualMachine:
        return relax.VirtualMachine(self.load(ex) if self.session is not None else ex, self.device)


def time_vm(runner: Runner, vm: relax.VirtualMachine, args, config: TimingConfig) -> dict:
    """Median/spread of ``vm["main"](*args)`` in ms."""
    for _ in range(config.warmup):
        vm["main"](*args)
    f = vm.time_evaluator("main", runner.device, number=1, repeat=config.repeats, min_repeat_ms=config.min_repeat_ms)
    return summarize(f(*args).results)


def time_kernel(runner: Runner, module, args, config: TimingConfig) -> dict:
    """Median/spread of one compiled PrimFunc ``main(*args)`` in ms."""
    fn = module["main"]
    for _ in range(config.warmup):
        fn(*args)
    f = module.time_evaluator("main", runner.device, number=1, repeat=config.repeats, min_repeat_ms=config.min_repeat_ms)
    return summarize(f(*args).results)


def vm_sampler(runner: Runner, vm: relax.VirtualMachine, args, config: TimingConfig):
    """A function returning one timing sample (seconds) of ``vm["main"](*args)``."""
    f = vm.time_evaluator("main", runner.device, number=1, repeat=1, min_repeat_ms=config.min_repeat_ms)
    return lambda: f(*args).results[0]


def kernel_sampler(runner: Runner, module, args, config: TimingConfig):
    """A function returning one timing sample (seconds) of a compiled PrimFunc ``main(*args)``."""
    f = module.time_evaluator("main", runner.device, number=1, repeat=1, min_repeat_ms=config.min_repeat_ms)
    return lambda: f(*args).results[0]


def interleaved_timing(samplers: dict, config: TimingConfig, progress=None) -> dict[str, dict]:
    """Time several functions in rounds: each round takes one sample of every function.

    On a machine shared with other jobs, load comes and goes over seconds; timing A fully and
    then B would charge a burst to one of them only. Interleaving spreads it over all, so the
    ratios between them (layer sums against whole networks, bits against 8 bits) stay fair.
    Returns :func:`summarize` per name.
    """
    for _ in range(config.warmup):
        for sample in samplers.values():
            sample()
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for r in range(config.repeats):
        if progress is not None:
            progress(f"timing round {r + 1}/{config.repeats} ({len(samplers)} functions)")
        for name, sample in samplers.items():
            samples[name].append(sample())
    return {name: summarize(values) for name, values in samples.items()}


# --------------------------------------------------------------------------------------------
# single layers


def _random_levels(shape, bits: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2**bits, size=shape, dtype=np.uint8)


def _random_weight_levels(shape: ConvShape | DenseShape, w_bits: int, rng) -> np.ndarray:
    m = 1 if w_bits == 1 else 2 ** (w_bits - 1) - 1
    q = rng.integers(-m, m + 1, size=shape.weight_shape())
    if w_bits == 1:
        q = np.where(q >= 0, 1, -1)
    return q.astype(np.int32)


def build_layer(backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target) -> tvm.runtime.Executable:
    """Compile one layer's kernel (``bitserial`` / ``int8`` PrimFunc, or an fp32 Relax conv/dense)."""
    shape = layer_shape(layer, batch)
    if backend == "fp32":
        return tvm.compile(_fp32_layer_module(layer, batch), target=target)
    wb, ab = (w_bits, a_bits) if backend == "bitserial" else (8, 8)
    func = kernel_primfunc(backend, shape, wb, ab, target).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def layer_arguments(runner: Runner, backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target,
                    seed: int = 0):
    """Seeded inputs (and the output buffer, for kernels) of :func:`build_layer`'s function for ``target``."""
    from releq_tvm.compile.lower import packed_weights

    rng = np.random.default_rng(seed)
    shape = layer_shape(layer, batch)
    if backend == "fp32":
        x = rng.random(_fp32_input_shape(layer, batch), dtype=np.float32)
        w = rng.standard_normal(_fp32_weight_shape(layer), dtype=np.float32)
        args = [runner.tensor(x), runner.tensor(w)]
        if layer.has_bias:
            args.append(runner.tensor(rng.standard_normal(layer.out_channels, dtype=np.float32)))
        return args
    wb, ab = (w_bits, a_bits) if backend == "bitserial" else (8, 8)
    x = _random_levels(shape.input_shape() if isinstance(shape, DenseShape) else shape.input_shape("NCHW"), ab, rng)
    w = packed_weights(backend, _random_weight_levels(shape, wb, rng), wb, shape, target)
    out_shape = shape.output_shape() if isinstance(shape, DenseShape) else shape.output_shape("NCHW")
    return [runner.tensor(x), runner.tensor(w), runner.empty(out_shape, "int32")]


def _fp32_input_shape(layer: LayerSpec, batch: int):
    return (batch, layer.in_channels) if layer.kind == "dense" else (batch, layer.in_channels, *layer.in_size)


def _fp32_weight_shape(layer: LayerSpec):
    if layer.kind == "dense":
        return (layer.in_channels, layer.out_channels)  # pre-transposed, as the frontend's linear lowers
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel)


def _fp32_layer_module(layer: LayerSpec, batch: int) -> tvm.IRModule:
    """The Relax ops ``from_exported_program`` emits for one Conv2d / Linear (float32)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(_fp32_input_shape(layer, batch), "float32"))
    w = relax.Var("w", relax.TensorType(_fp32_weight_shape(layer), "float32"))
    params = [x, w]
    b = None
    if layer.has_bias:
        b = relax.Var("b", relax.TensorType((layer.out_channels,), "float32"))
        params.append(b)
    with bb.function("main", params):
        with bb.dataflow():
            if layer.kind == "dense":
                y = relax.op.matmul(x, w)
                if b is not None:
                    y = relax.op.add(y, b)
            else:
                y = relax.op.nn.conv2d(x, w, strides=layer.stride, padding=layer.padding, groups=layer.groups)
                if b is not None:
                    y = relax.op.add(y, relax.op.reshape(b, (1, layer.out_channels, 1, 1)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def measure_layer(backend: str, layer: LayerSpec, w_bits: int, a_bits: int, batch: int, target,
                  config: TimingConfig = TimingConfig(), runner: Runner | None = None) -> dict:
    """Build and time one layer; returns :func:`summarize`'s dict plus ``compile_s``."""
    runner = runner or Runner()
    start = time.perf_counter()
    ex = build_layer(backend, layer, w_bits, a_bits, batch, target)
    compile_s = time.perf_counter() - start
    args = layer_arguments(runner, backend, layer, w_bits, a_bits, batch, target)
    if backend == "fp32":
        timing = time_vm(runner, runner.vm(ex), args, config)
    else:
        timing = time_kernel(runner, runner.load(ex), args, config)
    timing["compile_s"] = compile_s
    return timing


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


def time_fp32_network(runner: Runner, ex, input_shape, batch: int, config: TimingConfig) -> dict:
    rng = np.random.default_rng(0)
    x = runner.tensor(rng.random((batch, *input_shape), dtype=np.float32))
    return time_vm(runner, runner.vm(ex), [x], config)


def time_integer_network(runner: Runner, ex, params: dict, input_shape, input_bits: int, batch: int,
                         config: TimingConfig) -> dict:
    """Time ``main(x, *params)`` of a compiled integer network on seeded input levels."""
    rng = np.random.default_rng(0)
    x = _random_levels((batch, *input_shape), input_bits, rng)
    args = [runner.tensor(x)] + [runner.tensor(a) for a in params.values()]
    return time_vm(runner, runner.vm(ex), args, config)


def random_integer_network(network: str, w_bits, a_bits=None, seed: int = 0):
    """The integer network with seeded random weights and two noise calibration images.

    For timing only: latency does not depend on the weight values, and this skips loading
    checkpoints and datasets.
    """
    from releq_tvm.compile.integer import quantize_network
    from releq_tvm.networks import create_network

    spec = get_network_spec(network)
    calib = torch.rand((2, *spec.input_shape), generator=torch.Generator().manual_seed(seed))
    return quantize_network(network, w_bits, a_bits, model=create_network(network, seed=seed), calibration=calib)


# --------------------------------------------------------------------------------------------
# the whole comparison: per layer and per network, four builds


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
    progress=None,
) -> dict:
    """Latency of ``network`` at ``w_bits`` / ``a_bits`` against the all-8-bit bit-serial build, the
    plain int8 build and fp32, per layer and for the whole network, all measured in this call.

    Everything is built first and then timed in interleaved rounds (:func:`interleaved_timing`),
    so per-layer and whole-network numbers, bits and 8 bits, see the same machine load. Per-layer
    numbers are also written to the latency table, so the search sees the same values.
    ``compiled`` reuses an existing build of the chosen bits; ``model`` supplies float weights
    for the fp32 build (else seeded random weights: latency does not depend on the values).
    ``baselines=False`` skips int8 and fp32. Times in milliseconds; see the module docstring for
    the protocol. Returns a JSON-able dict with ``layers`` rows, ``network`` timings, ``totals``
    and ``fidelity`` (how far the sum of per-layer latencies is from the measured network).
    """
    from releq_tvm.bits import format_bits, parse_bits
    from releq_tvm.compile.artifact import compile_network
    from releq_tvm.compile.latency_table import LatencyTable, layer_key, shape_label
    from releq_tvm.compile.target import machine_info, resolve_target
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

    # build everything first, then time it all in interleaved rounds (see interleaved_timing)
    backends = [("bits", "bitserial", w, a), ("bitserial8", "bitserial", eight, eight)]
    if baselines:
        backends += [("int8", "int8", eight, eight), ("fp32", "fp32", eight, eight)]
    layer_keys: dict[str, list[str]] = {}
    samplers: dict[str, object] = {}
    layer_compile_s: dict[str, float] = {}
    for label, backend, wb, ab in backends:
        keys = []
        for row, lw, la in zip(rows, wb, ab):
            key = layer_key(row, lw, la, backend, batch)
            if key not in samplers:
                say(f"build layer {row.index} {row.name} ({label})")
                start = time.perf_counter()
                ex = build_layer(backend, row, lw, la, batch, target)
                layer_compile_s[key] = time.perf_counter() - start
                args = layer_arguments(runner, backend, row, lw, la, batch, target)
                samplers[key] = (vm_sampler(runner, runner.vm(ex), args, config) if backend == "fp32"
                                 else kernel_sampler(runner, runner.load(ex), args, config))
            keys.append(key)
        layer_keys[label] = keys

    compile_s: dict[str, float] = {}
    rng = np.random.default_rng(0)
    builds = [("bits", w, a), ("bitserial8", eight, eight)] + ([("int8", eight, eight)] if baselines else [])
    for label, wb, ab in builds:
        backend = "int8" if label == "int8" else "bitserial"
        start = time.perf_counter()
        if label == "bits" and compiled is not None:
            c = compiled
        else:
            say(f"build network ({label})")
            c = compile_network(random_integer_network(network, wb, ab), backend, batch, target)
        compile_s[label] = time.perf_counter() - start
        x = _random_levels((batch, *spec.input_shape), int(c.manifest["input_quantizer"]["bits"]), rng)
        args = [runner.tensor(x)] + [runner.tensor(arr) for arr in c.params.values()]
        samplers[f"network|{label}"] = vm_sampler(runner, runner.vm(c.executable), args, config)
    if baselines:
        say("build network (fp32: torch.export, from_exported_program)")
        start = time.perf_counter()
        float_model = model if model is not None else create_network(network)
        ex = build_fp32_network(float_model, spec.input_shape, batch, target)
        compile_s["fp32"] = time.perf_counter() - start
        x = runner.tensor(rng.random((batch, *spec.input_shape), dtype=np.float32))
        samplers["network|fp32"] = vm_sampler(runner, runner.vm(ex), [x], config)

    timings = interleaved_timing(samplers, config, say)
    for key, compile_time in layer_compile_s.items():
        table.store(key, timings[key], compile_time)
    per_layer = {label: [table.entry(key) for key in keys] for label, keys in layer_keys.items()}
    whole = {name.split("|", 1)[1]: t for name, t in timings.items() if name.startswith("network|")}

    layers_out = []
    for i, row in enumerate(rows):
        out = {
            "index": row.index, "name": row.name, "kind": row.kind, "shape": shape_label(row),
            "macs": row.macs, "w_bits": w[i], "a_bits": a[i],
        }
        for label in per_layer:
            out[f"{label}_ms"] = per_layer[label][i]["us"] / 1e3
            out[f"{label}_iqr_ms"] = per_layer[label][i]["iqr_us"] / 1e3
        out["speedup_vs_8bit"] = out["bitserial8_ms"] / out["bits_ms"]
        layers_out.append(out)

    sums = {label: sum(e["us"] for e in entries) / 1e3 for label, entries in per_layer.items()}
    fixed_ms = max(0.0, whole["bitserial8"]["median_ms"] - sums["bitserial8"])
    predicted = (sums["bits"] + fixed_ms) / (sums["bitserial8"] + fixed_ms)
    measured = whole["bits"]["median_ms"] / whole["bitserial8"]["median_ms"]
    fidelity = {
        label: {"sum_of_layers_ms": sums[label], "network_ms": whole[label]["median_ms"],
                "sum_over_network": sums[label] / whole[label]["median_ms"]}
        for label in whole if label in sums
    }
    return {
        "network": network,
        "w_bits": format_bits(w),
        "a_bits": format_bits(a),
        "batch": batch,
        "layers": layers_out,
        "network_ms": whole,
        "totals": {
            "sum_of_layers_ms": sums,
            "fixed_ms": fixed_ms,
            "speedup_vs_8bit": whole["bitserial8"]["median_ms"] / whole["bits"]["median_ms"],
            "speedup_vs_int8": (whole["int8"]["median_ms"] / whole["bits"]["median_ms"]) if "int8" in whole else None,
            "speedup_vs_fp32": (whole["fp32"]["median_ms"] / whole["bits"]["median_ms"]) if "fp32" in whole else None,
        },
        "fidelity": {
            **fidelity,
            "cost_ratio_predicted": predicted,
            "cost_ratio_measured": measured,
            "cost_ratio_error_pct": 100.0 * (predicted - measured) / measured,
        },
        "compile_s": compile_s,
        "timing": {"repeats": config.repeats, "min_repeat_ms": config.min_repeat_ms, "warmup": config.warmup,
                   "statistic": "median of repeats; iqr = interquartile range", "where": runner.where},
        "machine": machine_info(target),
    }


#: Columns of :func:`write_fidelity_csv`, in order.
FIDELITY_COLUMNS = (
    "network", "w_bits", "a_bits", "batch", "layers_bits_ms", "network_bits_ms", "layers_8bit_ms", "network_8bit_ms",
    "fixed_ms", "sum_over_network_bits", "sum_over_network_8bit", "cost_ratio_predicted", "cost_ratio_measured",
    "cost_ratio_error_pct", "speedup_vs_8bit", "network_int8_ms", "network_fp32_ms", "cpu_model", "target", "tvm",
    "threads", "repeats", "where", "date",
)
#: The command that (re)makes one row of a fidelity CSV, written in its ``# command:`` header.
FIDELITY_COMMAND = "releq-tvm compile NET --no-baselines --repeats 7 --fidelity-csv {path}  (one run per network row)"


def fidelity_row(result: dict) -> dict:
    """One CSV row of a :func:`measure_network` result."""
    import datetime as _dt
    import json as _json

    f, t, m = result["fidelity"], result["totals"], result["machine"]
    net = result["network_ms"]
    return {
        "network": result["network"], "w_bits": result["w_bits"], "a_bits": result["a_bits"], "batch": result["batch"],
        "layers_bits_ms": t["sum_of_layers_ms"]["bits"], "network_bits_ms": net["bits"]["median_ms"],
        "layers_8bit_ms": t["sum_of_layers_ms"]["bitserial8"], "network_8bit_ms": net["bitserial8"]["median_ms"],
        "fixed_ms": t["fixed_ms"], "sum_over_network_bits": f["bits"]["sum_over_network"],
        "sum_over_network_8bit": f["bitserial8"]["sum_over_network"],
        "cost_ratio_predicted": f["cost_ratio_predicted"], "cost_ratio_measured": f["cost_ratio_measured"],
        "cost_ratio_error_pct": f["cost_ratio_error_pct"], "speedup_vs_8bit": t["speedup_vs_8bit"],
        "network_int8_ms": net.get("int8", {}).get("median_ms", ""), "network_fp32_ms": net.get("fp32", {}).get("median_ms", ""),
        "cpu_model": m["cpu_model"], "target": _json.dumps(m["target"], sort_keys=True), "tvm": m["tvm"],
        "threads": m.get("threads", ""), "repeats": result["timing"]["repeats"], "where": result["timing"]["where"],
        "date": _dt.date.today().isoformat(),
    }


def write_fidelity_csv(results, path, update: bool = False, command: str | None = None) -> None:
    """Write one row per :func:`measure_network` result (columns :data:`FIDELITY_COLUMNS`) atomically.

    The file starts with ``# key: value`` provenance lines (read it with
    ``pandas.read_csv(path, comment="#")``); every row also carries its machine, versions,
    repeats and date. With ``update`` the rows already in ``path`` are kept, except those of
    the same network, bits and batch, which the new results replace.
    """
    import csv
    import datetime as _dt
    import io as _io
    import platform
    import sys
    from pathlib import Path

    from releq_tvm.io import atomic_write_text

    def ident(row) -> tuple:
        return (row["network"], row["w_bits"], row["a_bits"], str(row["batch"]))

    new_rows = [fidelity_row(result) for result in results]
    rows = []
    if update and Path(path).is_file():
        with open(path, newline="", encoding="utf-8") as f:
            replaced = {ident(r) for r in new_rows}
            rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#")) if ident(r) not in replaced]
    machine = results[0]["machine"] if results else {}
    buf = _io.StringIO()
    for line in (
        f"command: {command or FIDELITY_COMMAND.format(path=path)}",
        f"machine: {platform.platform()}; cpu: {machine.get('cpu_model', '')}; cores: {machine.get('cores', '')}",
        f"versions: python {sys.version.split()[0]}; tvm {machine.get('tvm', '')}; torch {torch.__version__}",
        f"made: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "note: per network, the sum of per-layer kernel latencies (standalone builds) against the measured whole "
        "network, at the chosen bits and at all 8 bits; fixed_ms = network_8bit_ms - layers_8bit_ms; "
        "cost_ratio_predicted = (layers_bits + fixed) / (layers_8bit + fixed) against cost_ratio_measured = "
        "network_bits / network_8bit",
    ):
        buf.write(f"# {line}\n")
    writer = csv.DictWriter(buf, fieldnames=FIDELITY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    for row in new_rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
