"""Measured per-layer latency, cached on disk, and the cost ratio the search asks for.

:class:`LatencyTable` maps (layer shape, weight bits, activation bits, backend) to a measured
latency in microseconds. An entry is measured the first time it is asked for (one kernel
build, well under a second, plus a few milliseconds of timing), then served from the one cache
store (:mod:`releq_tvm.store`). The namespace is the machine key (CPU model, LLVM CPU, TVM
version, threads) plus a digest of the machine description and a hash of the kernel sources,
so a table measured elsewhere, with another TVM or with other kernel code, is never used.
Timed on a remote device (a TVM RPC server or tracker), the key and description are that
device's CPU as its TVM reports it (:func:`remote_machine_info`). Each
entry is its own write, so processes measuring at the same time never lose each other's
entries. Tables of the old format (JSON files under ``cache_dir()/latency/``) are not read:
their entries are measured again.

Besides the layers, a network spends time in what is not a conv / dense: input quantizers,
requantization, pooling, residual adds. :meth:`LatencyTable.fixed_us` measures it once per
network (the whole 8-bit bit-serial network minus the sum of its 8-bit layers, timed in
interleaved rounds so both see the same machine load) and caches it;
it does not depend on the bits (the activation bit-packing, which does, is inside the layer
kernels). :func:`cpu_cost_ratio` adds it to both sides of the ratio by default.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm

from releq_tvm.bits import parse_bits
from releq_tvm.config import BITS_MAX, DEFAULT_ACT_BITS
from releq_tvm.networks import LayerSpec, get_network_spec, layer_table
from releq_tvm.progress import progress_bar
from releq_tvm.store import Store, open_store

from releq_tvm.compile.integer import random_integer_network
from releq_tvm.compile.layers import layer_sampler, measure_layer
from releq_tvm.compile.lower import build_network, family_applies, kernel_bits
from releq_tvm.compile.target import (file_safe, kernels_fingerprint, machine_info, machine_key, resolve_target,
                                      target_dict)
from releq_tvm.compile.timing import Runner, main_sampler
from releq_tvm.timing import TimingConfig, interleaved_timing

#: Bump when the meaning of a stored number changes (kernel protocol, timing protocol).
#: 2: layers whose weights exceed the L2 are timed with cold weights (``compile.layers``).
TABLE_FORMAT = 2
#: Bump when the meaning of the stored fixed (non-layer) time changes; layer entries keep theirs.
#: 2: the network's arrays are constants of the library, so ``main(x)`` checks one argument, not 25.
#: 3: max pooling runs as a scheduled kernel (``kernels.pool``), not the generic Relax lowering.
FIXED_FORMAT = 3


def shape_label(layer: LayerSpec) -> str:
    """Every shape field a kernel's code depends on, e.g. ``conv i6 o16 k5x5 s1x1 p0x0 g1 in14x14``."""
    if layer.kind == "dense":
        return f"dense i{layer.in_channels} o{layer.out_channels}"
    return (
        f"{layer.kind} i{layer.in_channels} o{layer.out_channels} k{layer.kernel[0]}x{layer.kernel[1]}"
        f" s{layer.stride[0]}x{layer.stride[1]} p{layer.padding[0]}x{layer.padding[1]} g{layer.groups}"
        f" in{layer.in_size[0]}x{layer.in_size[1]}"
    )


def auto_families(layer: LayerSpec, w_bits: int) -> tuple[str, ...]:
    """The kernel families ``auto`` chooses among for ``layer`` at ``w_bits``, in tie-break order."""
    return tuple(f for f in ("int8", "bitserial", "lut") if family_applies(f, layer, w_bits))


def layer_key(layer: LayerSpec, w_bits: int, a_bits: int, backend: str = "bitserial", batch: int = 1) -> str:
    """The table key of one (shape, batch, bits, backend)."""
    w_bits, a_bits = kernel_bits(backend, w_bits, a_bits)  # int8 and fp32 do not depend on the bits, lut on w
    return f"{backend}|{shape_label(layer)} n{batch}|w{w_bits}a{a_bits}"


def remote_machine_info(target, device: dict) -> dict:
    """What a latency measured on a remote device depends on: that device's CPU as its TVM reports it
    (``device``: :meth:`Runner.machine`), the target the kernels were built for and this TVM's version
    (it compiles them). Not the server's address: servers with the same CPU share entries."""
    return {"device": device, "target": target_dict(target), "tvm": tvm.__version__}


def remote_machine_key(machine: dict) -> str:
    """A file-name-safe key of a remote device (vendor, LLVM CPU, target CPU, TVM version, threads), as
    :func:`machine_key` is for this machine's; ``rpc-`` first, so the two never meet."""
    device = machine["device"]
    return file_safe(f"rpc-{device['vendor']}_{device['llvm_cpu']}-{machine['target'].get('mcpu', 'generic')}"
                     f"-tvm{machine['tvm']}-t{device['threads']}")


class LatencyTable:
    """Per-layer latencies (microseconds) of one CPU, measured lazily and cached on disk.

    The CPU is this machine's, or with a remote ``runner`` (a TVM RPC server or tracker) the
    remote device's as its TVM reports it (:meth:`Runner.machine`): then ``target`` defaults to
    that CPU and the namespace names it, not the server's address, so servers with the same CPU
    share entries. ``target`` defaults to the host CPU otherwise; ``path`` is the cache store
    file (None: the shared ``cache_dir()/cache.sqlite``). The entries live in the store's
    :attr:`namespace`, which names the machine key and a digest of the full machine description
    (so another machine, TVM or kernel code reads another namespace and measures afresh).
    ``builds`` counts the kernels this object compiled (0 when everything came from the cache).
    """

    #: The store namespace holding the machine description of every latency namespace.
    MACHINES = "latency/machines"

    def __init__(self, target=None, path: str | Path | None = None, timing: TimingConfig = TimingConfig(),
                 batch: int = 1, runner: Runner | None = None):
        remote = runner is not None and runner.remote
        self.target = resolve_target(runner.target() if remote and target is None else target)
        # the kernel sources are part of what a number depends on: edited kernels invalidate the table
        if remote:
            self.machine = dict(remote_machine_info(self.target, runner.machine()), kernels=kernels_fingerprint())
            key = remote_machine_key(self.machine)
        else:
            self.machine = dict(machine_info(self.target), kernels=kernels_fingerprint())
            key = machine_key(self.target)
        description = {"format": TABLE_FORMAT, "machine": self.machine}
        digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
        self.namespace = f"latency/{key}/{digest}"
        self._disk = Store(path) if path is not None else open_store()
        self.path = self._disk.path
        self.timing = timing
        self.batch = batch
        self.runner = runner
        self.builds = 0
        self._lock = threading.Lock()
        self._description = description
        self._entries: dict[str, dict] = self._disk.items(self.namespace)

    # -- storage -------------------------------------------------------------------------------
    def _lookup(self, key: str) -> dict | None:
        """The entry under ``key``: from memory, else from the store (another process may have measured it)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._disk.get(self.namespace, key)
            if entry is not None:
                self._entries[key] = entry
        return entry

    def _save(self, key: str, entry: dict) -> None:
        with self._lock:
            if not self._entries:  # say, for humans reading the store, what this namespace was measured on
                self._disk.put(self.MACHINES, self.namespace, self._description)
            self._entries[key] = entry
            self._disk.put(self.namespace, key, entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def entry(self, key: str) -> dict | None:
        return self._lookup(key)

    # -- layers --------------------------------------------------------------------------------
    def measure(self, layer: LayerSpec, w_bits: int, a_bits: int, backend: str = "bitserial") -> dict:
        """Build and time one layer now (replacing any cached entry); returns the stored entry."""
        key = layer_key(layer, w_bits, a_bits, backend, self.batch)
        timing = measure_layer(backend, layer, w_bits, a_bits, self.batch, self.target, self.timing, self.runner)
        self.builds += 1
        return self.store(key, timing, timing["compile_s"], timing["protocol"])

    def store(self, key: str, timing: dict, compile_s: float, protocol: str = "warm") -> dict:
        """Record a timing (``summarize`` dict, ms) measured elsewhere under ``key`` with ``protocol``
        (``warm`` / ``cold`` weights: :func:`releq_tvm.compile.layers.timing_protocol`); returns the entry."""
        entry = {
            "us": timing["median_ms"] * 1e3,
            "iqr_us": timing["iqr_ms"] * 1e3,
            "min_us": timing["min_ms"] * 1e3,
            "max_us": timing["max_ms"] * 1e3,
            "repeats": timing["repeats"],
            "compile_s": round(compile_s, 3),
            "protocol": protocol,
            "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self._save(key, entry)
        return entry

    def latency_us(self, layer: LayerSpec, w_bits: int, a_bits: int = DEFAULT_ACT_BITS, backend: str = "bitserial") -> float:
        """Median latency of one layer in microseconds (measured on first request, then cached)."""
        entry = self._lookup(layer_key(layer, w_bits, a_bits, backend, self.batch))
        if entry is None:
            entry = self.measure(layer, w_bits, a_bits, backend)
        return float(entry["us"])

    def kernel_choice(self, layer: LayerSpec, w_bits: int, a_bits: int) -> str:
        """The fastest kernel family for one layer at its bits among :func:`auto_families` (int8 is
        exact at any bits up to 8); ties go to int8, then bit-serial. Latencies are measured on
        first request."""
        return min(auto_families(layer, w_bits), key=lambda family: self.latency_us(layer, w_bits, a_bits, family))

    def network_layers_us(self, network: str, w_bits: Sequence[int], a_bits: Sequence[int] | None = None,
                          backend: str = "bitserial") -> list[float]:
        """Per-layer latencies (us) of ``network`` at the given bits, in layer-table order.

        ``backend`` ``auto`` gives each layer the latency of :meth:`kernel_choice`'s kernel.
        """
        rows = layer_table(network)
        w = parse_bits(list(w_bits), len(rows), network)
        a = parse_bits(list(a_bits) if a_bits is not None else [DEFAULT_ACT_BITS] * len(rows), len(rows), network,
                       what="--act-bits")
        self._measure_missing(network, [
            (row, wb, ab, b) for row, wb, ab in zip(rows, w, a)
            for b in (auto_families(row, wb) if backend == "auto" else (backend,))
        ])
        if backend == "auto":
            return [self.latency_us(row, wb, ab, self.kernel_choice(row, wb, ab)) for row, wb, ab in zip(rows, w, a)]
        return [self.latency_us(row, wb, ab, backend) for row, wb, ab in zip(rows, w, a)]

    def _measure_missing(self, network: str, requests: Sequence[tuple[LayerSpec, int, int, str]]) -> None:
        """Build and time each (layer, w_bits, a_bits, backend) of ``requests`` the table lacks, behind
        a progress bar: a network's missing layers take about a second each."""
        missing: dict[str, tuple[LayerSpec, int, int, str]] = {}
        for layer, w_bits, a_bits, backend in requests:
            key = layer_key(layer, w_bits, a_bits, backend, self.batch)
            if key not in missing and self._lookup(key) is None:
                missing[key] = (layer, w_bits, a_bits, backend)
        if missing:  # no bar at all when everything is cached (the search asks on every step)
            for layer, w_bits, a_bits, backend in progress_bar(missing.values(), f"latency table: {network}", unit="layer"):
                self.measure(layer, w_bits, a_bits, backend)

    # -- the rest of the network ---------------------------------------------------------------
    def _fixed_key(self, network: str) -> str:
        return f"network|{network} n{self.batch}|fixed|v{FIXED_FORMAT}"

    def fixed_us(self, network: str) -> float:
        """Latency (us) of everything in ``network`` that is not a weight layer, measured once.

        The whole 8-bit bit-serial network minus the sum of its 8-bit layers (floored at 0).
        """
        key = self._fixed_key(network)
        entry = self._lookup(key)
        if entry is None:
            entry = self.measure_network_fixed(network)
        return float(entry["us"])

    def measure_network_fixed(self, network: str) -> dict:
        """Build the 8-bit network and its layers, time them in interleaved rounds, store the difference.

        The 8-bit layer entries are refreshed too, so the stored layers and the stored fixed
        time come from the same rounds.
        """
        runner = self.runner or Runner()
        rows = layer_table(network)
        samplers, layers = {}, {}
        for row in progress_bar(rows, f"{network}: build the 8-bit layers", unit="layer"):
            key = layer_key(row, BITS_MAX, BITS_MAX, "bitserial", self.batch)
            if key not in samplers:
                layers[key] = samplers[key] = layer_sampler(runner, "bitserial", row, BITS_MAX, BITS_MAX, self.batch,
                                                            self.target, self.timing)
        net = random_integer_network(network, [BITS_MAX] * len(rows))
        executable, _ = build_network(net, "bitserial", self.batch, self.target)
        x = np.random.default_rng(0).integers(0, 2**net.input_bits, size=(self.batch, *net.input_shape), dtype=np.uint8)
        samplers["network"] = main_sampler(runner, runner.vm(executable), [runner.tensor(x)], self.timing)
        self.builds += len(samplers)
        timings = interleaved_timing(samplers, self.timing)
        for key, layer in layers.items():
            self.store(key, timings[key], layer.compile_s, layer.protocol)
        layers_us = sum(self._entries[layer_key(row, BITS_MAX, BITS_MAX, "bitserial", self.batch)]["us"] for row in rows)
        whole_us = timings["network"]["median_ms"] * 1e3
        entry = {
            "us": max(0.0, whole_us - layers_us),
            "whole_8bit_us": whole_us,
            "layers_8bit_us": layers_us,
            "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self._save(self._fixed_key(network), entry)
        return entry

    def cost_ratio(self, network: str, w_bits: Sequence[int], a_bits: Sequence[int] | None = None,
                   include_fixed: bool = True, kernels: str = "bitserial") -> float:
        """(sum of layer latencies at the bits + fixed) / (the same at all 8 bits), both built with
        ``kernels`` (``bitserial``: the paper's comparison; ``auto``: what compile ships, whose
        all-8-bit build is the int8 one)."""
        n = len(layer_table(network))
        fixed = self.fixed_us(network) if include_fixed else 0.0
        cost = sum(self.network_layers_us(network, w_bits, a_bits, kernels)) + fixed
        ref = sum(self.network_layers_us(network, [BITS_MAX] * n, [BITS_MAX] * n, kernels)) + fixed
        return cost / ref


def choose_kernels(network_layers: Sequence[LayerSpec], w_bits: Sequence[int], a_bits: Sequence[int],
                   table: LatencyTable) -> tuple[str, ...]:
    """``auto``: per layer, the fastest of :func:`auto_families` (bit-serial at its bits, int8, lut)."""
    return tuple(table.kernel_choice(row, wb, ab) for row, wb, ab in zip(network_layers, w_bits, a_bits))


_DEFAULT_TABLES: dict[str, LatencyTable] = {}


def default_table(target=None) -> LatencyTable:
    """One shared :class:`LatencyTable` per target (host CPU by default) in this process."""
    resolved = resolve_target(target)
    key = machine_key(resolved)
    if key not in _DEFAULT_TABLES:
        _DEFAULT_TABLES[key] = LatencyTable(resolved)
    return _DEFAULT_TABLES[key]


def cpu_cost_ratio(network: str, w_bits: Sequence[int], a_bits: Sequence[int] | None = None,
                   table: LatencyTable | None = None, include_fixed: bool = True, kernels: str = "bitserial") -> float:
    """Predicted CPU latency of ``network`` at ``w_bits`` / ``a_bits`` over the same at all 8 bits.

    Sum of measured per-layer bit-serial latencies (plus, with ``include_fixed``, the network's
    measured non-conv time on both sides). Missing (shape, bits) entries are measured on
    demand and cached; ``a_bits`` defaults to 8 for every layer. Pure apart from that cache:
    the same arguments on the same machine give the same number. ``kernels`` ``auto`` prices what
    ``compile --kernels auto`` builds (each layer's faster kernel) against the same policy at 8 bits.
    """
    get_network_spec(network)  # one-line error for an unknown name
    table = table if table is not None else default_table()
    return table.cost_ratio(network, w_bits, a_bits, include_fixed=include_fixed, kernels=kernels)
