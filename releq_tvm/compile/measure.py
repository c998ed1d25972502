"""Whole networks built and timed side by side (the network comparison), locally or over RPC.

The timing protocol is :mod:`releq_tvm.compile.timing`'s; single layers are built and timed by
:mod:`releq_tvm.compile.layers`. When several builds are compared (:func:`measure_network`) they
are timed in interleaved rounds, one sample of each per round, so load from other jobs on a
shared machine falls on all of them alike. Inputs are seeded random levels: no kernel has
data-dependent control flow, so the values do not change the time.

The builds compared:

* ``bits``       the bit-serial build at the chosen per-layer bits;
* ``bitserial8`` the same network with every layer at 8/8 bits (the reference of speedups);
* ``int8``       the plain int8 kernels (``releq_tvm.kernels``), same integer network;
* ``fp32``       the float torch model through ``torch.export`` -> ``from_exported_program`` ->
                 ``tvm.compile`` with TVM's default (untuned) CPU pipeline.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import tvm

from releq_tvm.networks import get_network_spec

from releq_tvm.compile.integer import random_integer_network
from releq_tvm.compile.layers import build_layer, layer_arguments
from releq_tvm.compile.layers import random_levels as _random_levels
from releq_tvm.compile.timing import Runner, TimingConfig, interleaved_timing, kernel_sampler, time_vm, vm_sampler


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


def time_integer_network(runner: Runner, ex, params: dict, input_shape, input_bits: int, batch: int,
                         config: TimingConfig) -> dict:
    """Time ``main(x, *params)`` of a compiled integer network on seeded input levels."""
    rng = np.random.default_rng(0)
    x = _random_levels((batch, *input_shape), input_bits, rng)
    args = [runner.tensor(x)] + [runner.tensor(a) for a in params.values()]
    return time_vm(runner, runner.vm(ex), args, config)


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
    ``auto`` build (each layer's faster kernel), the int8 build and fp32 (TVM untuned), per layer
    and for the whole network, all measured in this call.

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
    builds = [("bits", "bitserial", w, a), ("bitserial8", "bitserial", eight, eight)]
    if baselines:
        # auto: each layer's faster kernel at the bits (int8 where bit-serial does not pay)
        builds += [("auto", "auto", w, a), ("int8", "int8", eight, eight)]
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
        if baselines:
            out["auto_kernel"] = auto_kernels[i]
            out["auto_ms"] = out["bits_ms"] if auto_kernels[i] == "bitserial" else out["int8_ms"]
        layers_out.append(out)

    sums = {label: sum(e["us"] for e in entries) / 1e3 for label, entries in per_layer.items()}
    if baselines:
        sums["auto"] = sum(row["auto_ms"] for row in layers_out)
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
            "auto_speedup_vs_int8": (whole["int8"]["median_ms"] / whole["auto"]["median_ms"]) if "auto" in whole else None,
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
