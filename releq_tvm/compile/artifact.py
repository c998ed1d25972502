"""The deployable result: ``net.so`` + ``manifest.json`` in one folder, and its loader.

``DIR/net.so``         the Relax VM executable (``ex.export_library``): ``main(x)`` with ``x``
                       uint8 input levels ``(batch, C, H, W)``, returning the int32 fixed-point
                       logits ``(batch, classes)``. The packed weights, per-channel fixed-point
                       multipliers / offsets / shifts and input quantizers are constants inside
                       it (:func:`releq_tvm.compile.lower.build_network` says why);
``DIR/manifest.json``  bits, scales, shapes, the bound constants, how to quantize the input
                       and scale the output, target / machine / versions, where weights came from.

The folder is written to a temporary sibling and renamed into place, so a reader never sees a
half-written result. :func:`load_compiled` gives back a :class:`CompiledNetwork` that takes
float images in [0, 1] (or uint8 levels) and any number of them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from releq_tvm.errors import ReleqError
from releq_tvm.kernels.target import pin_tvm_threads
from releq_tvm.quant import quantize_activation_int

from releq_tvm.compile.integer import INPUT_RANGE, IntegerNetwork
from releq_tvm.compile.lower import build_network, layer_kernels
from releq_tvm.compile.target import machine_info, resolve_target

#: 2: fused epilogues (l{i}_in_quant, per-channel 1-D requantization), per-layer kernels;
#: 3: the parameters are constants inside net.so, ``main(x)`` (no params.npz).
MANIFEST_FORMAT = 3
LIBRARY = "net.so"
MANIFEST = "manifest.json"


@dataclass
class CompiledNetwork:
    """A compiled integer network (its parameters bound inside), ready to run on this machine."""

    manifest: dict
    executable: object  # tvm.runtime.Executable (fresh build) or Module (loaded library)
    device: object = field(default_factory=tvm.cpu)
    _vm: relax.VirtualMachine | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return int(self.manifest["batch"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            pin_tvm_threads()  # parallel loops run inline at one thread (kernels.target.pin_tvm_threads)
            self._vm = relax.VirtualMachine(self.executable, self.device)
        return self._vm

    def quantize_input(self, images) -> np.ndarray:
        """Float images in [0, 1] to the uint8 levels ``main`` takes (the first layer's quantizer)."""
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        q = self.manifest["input_quantizer"]
        return quantize_activation_int(x, int(q["bits"]), float(q["range"]))

    def run_levels(self, levels: np.ndarray) -> np.ndarray:
        """Integer outputs (int32, ``(N, classes)``) for uint8 input levels ``(N, C, H, W)``, any N."""
        levels = np.asarray(levels)
        if levels.dtype != np.uint8 or tuple(levels.shape[1:]) != self.input_shape:
            raise ReleqError(f"input must be uint8 (N, {', '.join(map(str, self.input_shape))}); "
                             f"got {levels.dtype} {tuple(levels.shape)}")
        vm = self.vm
        outs = []
        for start in range(0, len(levels), self.batch):
            chunk = levels[start : start + self.batch]
            n = len(chunk)
            if n < self.batch:  # the library has a static batch: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *self.input_shape), np.uint8)])
            out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(chunk), self.device))
            outs.append(out.numpy()[:n])
        return np.concatenate(outs) if outs else np.zeros((0, self.manifest["num_classes"]), np.int32)

    def logits(self, images) -> np.ndarray:
        """Float64 logits of float images in [0, 1]: integer outputs times ``output_scale`` (2^-F)."""
        return self.run_levels(self.quantize_input(images)).astype(np.float64) * float(self.manifest["output_scale"])

    def predict(self, images) -> np.ndarray:
        return self.logits(images).argmax(axis=1)

    def export(self, directory: str | Path) -> Path:
        """Write ``net.so`` and ``manifest.json`` into ``directory`` atomically."""
        if not hasattr(self.executable, "export_library"):
            raise ReleqError("this network was loaded from a library; copy its folder instead of re-exporting")
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.executable.export_library(str(tmp / LIBRARY))
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=1) + "\n", encoding="utf-8")
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_manifest(net: IntegerNetwork, kernels: str, families: Sequence[str], batch: int, target,
                   constants: dict[str, np.ndarray]) -> dict:
    """Everything needed to use the library besides the arrays (JSON-able). ``kernels`` is the policy
    asked for (``bitserial``, ``int8``, ``auto``), ``families`` what each layer runs."""
    layers = []
    for lq, family in zip(net.layers, families):
        s = lq.spec
        layers.append({
            "index": s.index, "name": s.name, "kind": s.kind,
            "in_channels": s.in_channels, "out_channels": s.out_channels, "kernel": list(s.kernel),
            "stride": list(s.stride), "padding": list(s.padding), "groups": s.groups,
            "in_size": list(s.in_size), "out_size": list(s.out_size), "macs": s.macs,
            "w_bits": lq.w_bits, "a_bits": lq.a_bits, "family": family,
            "weight_step": lq.weight_step, "act_range": lq.act_range, "act_step": lq.act_step,
            "batch_norm": net.graph.batch_norms[s.index],
        })
    return {
        "format": MANIFEST_FORMAT,
        "network": net.network,
        "kernels": kernels,
        "w_bits": list(net.w_bits),
        "a_bits": list(net.a_bits),
        "batch": batch,
        "input_shape": list(net.input_shape),
        "input_dtype": "uint8",
        "input_quantizer": {"bits": net.input_bits, "range": INPUT_RANGE,
                            "formula": "round(clip(x / range, 0, 1) * (2^bits - 1))"},
        "num_classes": net.num_classes,
        "output_dtype": "int32",
        "frac_bits": net.frac_bits,
        "output_scale": net.output_scale,
        # what net.so holds, for readers: the arrays are inside it, not beside it
        "constants": [{"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape)} for name, arr in constants.items()],
        "layers": layers,
        "weights": net.weights_source,
        "calibration": net.calibration,
        "machine": machine_info(target),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "entry": "relax.VirtualMachine(tvm.runtime.load_module('net.so'), dev)['main'](x)",
        "threads": "set TVM_NUM_THREADS to the thread count before the first call (TVM reads it on every parallel "
                   "loop; unset, a 1-thread pool still pays a launch per loop)",
    }


def compile_network(net: IntegerNetwork, kernels: str | Sequence[str] = "bitserial", batch: int = 1, target=None,
                    table=None) -> CompiledNetwork:
    """Lower ``net`` to Relax and compile it for ``target`` (host by default).

    ``kernels``: ``bitserial`` (every layer bit-serial at its bits), ``int8`` (every layer int8),
    ``auto`` (per layer the faster of the two, from ``table``, default: this machine's latency
    table, measuring what is missing) or one family per layer. The manifest lists each layer's.
    """
    target = resolve_target(target)
    policy = kernels if isinstance(kernels, str) else "per-layer"
    if kernels == "auto":
        from releq_tvm.compile.latency_table import LatencyTable, choose_kernels, default_table

        table = table or (default_table(target) if batch == 1 else LatencyTable(target, batch=batch))
        kernels = choose_kernels([lq.spec for lq in net.layers], net.w_bits, net.a_bits, table)
    families = layer_kernels(net, kernels)
    ex, constants = build_network(net, families, batch, target)
    return CompiledNetwork(build_manifest(net, policy, families, batch, target, constants), ex)


def load_compiled(directory: str | Path, device=None) -> CompiledNetwork:
    """Load a folder written by :meth:`CompiledNetwork.export` (or ``releq-tvm compile -o DIR``)."""
    directory = Path(directory)
    missing = [name for name in (LIBRARY, MANIFEST) if not (directory / name).is_file()]
    if missing:
        raise ReleqError(f"{directory} is not a compiled network (missing {', '.join(missing)}); "
                         "write one with `releq-tvm compile NET -o DIR`")
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ReleqError(f"{directory}/{MANIFEST} has format {manifest.get('format')}, expected {MANIFEST_FORMAT}; recompile it")
    lib = tvm.runtime.load_module(str(directory / LIBRARY))
    return CompiledNetwork(manifest, lib, device or tvm.cpu())
