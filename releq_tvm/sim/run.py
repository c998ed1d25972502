"""Simulate a registered network by name: the one path the CLI, the CSVs and the benchmark share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from releq_tvm.bits import format_bits
from releq_tvm.sim.config import StripesConfig
from releq_tvm.sim.stripes import SimResult, StripesSimulator


@dataclass(frozen=True)
class NetworkRun:
    """A network simulated once with the chosen fc switch and, in weights mode, once with the other."""

    result: SimResult
    alternative: SimResult | None  # the other fc_weights_serial setting (weights mode, dense layers present)
    notes: tuple[str, ...]


def resolve_bits(network: str, bits: str | None, act_bits: str | None,
                 checkpoint: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    """Weight and activation bit vectors of ``network`` (:func:`releq_tvm.train.network_bits`: as
    given, else a fine-tuned ``checkpoint``'s, else the published weight bits and 8-bit
    activations), with notes saying where they came from."""
    from releq_tvm.networks import get_network_spec
    from releq_tvm.train import network_bits

    chosen = network_bits(network, bits, act_bits, checkpoint)
    notes: list[str] = []
    if "checkpoint" in (chosen.w_source, chosen.a_source):
        notes.append(f"bits of the fine-tuned model file {checkpoint}")
    if chosen.w_source == "published":
        spec = get_network_spec(network)
        notes.append(f"weight bits: the published bitwidths of {network}")
        if spec.published_bits_note:
            notes.append(f"{network}: {spec.published_bits_note}")
    return chosen.w_bits, chosen.a_bits, tuple(notes)


def simulate_network(
    network: str,
    bits: str | None = None,
    act_bits: str | None = None,
    mode: str = "weights",
    fc_serial: bool = True,
    overrides: Mapping[str, str] | None = None,
    method: str = "stepped",
    checkpoint: str | None = None,
) -> NetworkRun:
    """Simulate ``network`` at ``bits`` (text like ``"8,2,2,3,2"``; None: a fine-tuned ``checkpoint``'s
    bits, else its published bits; see :func:`resolve_bits`)."""
    from releq_tvm.networks import layer_table

    w, a, notes = resolve_bits(network, bits, act_bits, checkpoint)
    table = layer_table(network)
    config = StripesConfig(mode=mode, fc_weights_serial=fc_serial).with_overrides(dict(overrides or {}))
    result = StripesSimulator(config).simulate(table, w, a, method=method, network=network)
    alternative = None
    if mode == "weights" and any(layer.kind == "dense" for layer in table):
        other = replace(config, fc_weights_serial=not fc_serial)
        alternative = StripesSimulator(other).simulate(table, w, a, method=method, network=network)
    if mode == "activations":
        notes += ("activations mode: fully connected layers run at the bit-parallel DaDN rate; --fc-serial is ignored",)
    return NetworkRun(result, alternative, notes)


def command_line(
    network: str,
    w_bits: tuple[int, ...],
    a_bits: tuple[int, ...],
    mode: str,
    fc_serial: bool,
    overrides: Mapping[str, str] | None = None,
    method: str = "stepped",
    csv_path: str | None = None,
) -> str:
    """The explicit ``releq-tvm simulate`` command that reproduces a run (written into result files)."""
    parts = ["releq-tvm", "simulate", network, "--bits", _compact(w_bits), "--act-bits", _compact(a_bits)]
    parts += ["--mode", mode, "--fc-serial" if fc_serial else "--no-fc-serial"]
    for key, value in (overrides or {}).items():
        parts += ["--set", f"{key}={value}"]
    if method != "stepped":
        parts += ["--method", method]
    if csv_path is not None:
        parts += ["--csv", str(csv_path)]
    return " ".join(parts)


def _compact(bits: tuple[int, ...]) -> str:
    # One value stands for every layer (parse_bits broadcasts it), which keeps commands short.
    return str(bits[0]) if len(set(bits)) == 1 else format_bits(bits)
