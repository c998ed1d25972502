"""Which bit vector each network is reported at: the published table, or a search run's choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from releq_tvm.bits import format_bits
from releq_tvm.errors import ReleqError


@dataclass(frozen=True)
class BitChoice:
    """The weight (and optionally activation) bits a network is reported at, and where they came from."""

    network: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...] | None  # None: 8-bit activations, the default of the integer backends
    source: str  # "published", "admm" or the run directory
    notes: tuple[str, ...] = ()
    #: Test accuracy (%) the source itself reports for these bits (a search run's long fine-tune).
    source_accuracy: float | None = None

    @property
    def label(self) -> str:
        return f"{self.network} {format_bits(self.w_bits)} ({self.source})"

    @property
    def mean_bits(self) -> float:
        return sum(self.w_bits) / len(self.w_bits)


def published_choice(network: str) -> BitChoice:
    """The published bitwidths of METHOD.md section 6 (with the network's mapping note, if any)."""
    from releq_tvm.networks import get_network_spec

    spec = get_network_spec(network)
    if spec.published_bits is None:
        raise ReleqError(f"{network} has no published bitwidths; pass a search run of it with --bits-from RUN_DIR")
    notes = (f"{network}: {spec.published_bits_note}",) if spec.published_bits_note else ()
    return BitChoice(network, tuple(spec.published_bits), None, "published", notes)


def admm_choice(network: str) -> BitChoice | None:
    """The ADMM-based method's bitwidths the paper compares against (None for other networks)."""
    from releq_tvm.networks import ADMM_BITS

    bits = ADMM_BITS.get(network)
    return None if bits is None else BitChoice(network, tuple(bits), None, "admm")


def primary_runs(runs: Sequence) -> dict:
    """The run that stands for each network among ``runs`` (:class:`releq_tvm.report.runs.SearchRun`,
    by network name): default reward and clip if any (else any), last given wins."""
    out: dict = {}
    for run in runs:
        current = out.get(run.network)
        if current is None or run.is_default_setting() or not current.is_default_setting():
            out[run.network] = run
    return out


def choose_bits(networks: Sequence[str], runs: Sequence, use_published: bool = True) -> dict[str, BitChoice]:
    """The bits of every network in ``networks``.

    A network with search runs among ``runs`` (:class:`releq_tvm.report.runs.SearchRun`) takes
    the choice of its *primary* run (see :func:`primary_runs`); the others take their published
    bits when ``use_published``. A network left without bits is an error that names the fix.
    """
    primary = primary_runs(runs)
    out: dict[str, BitChoice] = {}
    for net in networks:
        if net in primary:
            out[net] = primary[net].choice()
        elif use_published:
            out[net] = published_choice(net)
        else:
            raise ReleqError(
                f"no search run of {net} among --bits-from; add `--bits-from published` or a run directory of {net}"
            )
    return out
