"""Which bit vector each network is reported at: the published table, or a search run's choice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from releq_tvm.bits import format_bits, parse_bits
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
    """The bits every network in ``networks`` is reported at: its *primary* choice.

    In order of precedence: the choice of the network's primary weight-only run among ``runs``
    (:class:`releq_tvm.report.runs.SearchRun`, see :func:`primary_runs`); its published bits when
    ``use_published`` and it has some; the primary run among those that searched activation bits.
    The runs that searched activation bits get rows of their own besides (:func:`activation_run_choices`).
    A network left without bits is an error that names the fix.
    """
    from releq_tvm.networks import get_network_spec

    weight_only = primary_runs([r for r in runs if r.choice().a_bits is None])
    any_run = primary_runs(runs)
    out: dict[str, BitChoice] = {}
    for net in networks:
        if net in weight_only:
            out[net] = weight_only[net].choice()
        elif use_published and (net not in any_run or get_network_spec(net).published_bits is not None):
            out[net] = published_choice(net)
        elif net in any_run:
            out[net] = any_run[net].choice()
        else:
            raise ReleqError(
                f"no search run of {net} among --bits-from; add `--bits-from published` or a run directory of {net}"
            )
    return out


#: ``variant`` of a report row that stands for its network: the bits every file of the report uses
#: (published, or the network's primary search run), the only rows the GEOMEAN rows average.
PRIMARY_VARIANT = "primary"
#: ``variant`` of a row of another search run that searched activation bits (``search --search-activations``).
WA_RUN_VARIANT = "w+a run"


def activation_run_choices(runs: Sequence, primary: Mapping[str, BitChoice]) -> list[BitChoice]:
    """The choice of every run among ``runs`` that searched activation bits (its choice has
    ``a_bits``), for the networks of ``primary``, except the run that already stands for its
    network there; once each, in the order given."""
    out: dict[str, BitChoice] = {}
    for run in runs:
        choice = run.choice()
        own = primary.get(choice.network)
        if own is not None and choice.a_bits is not None and choice.source != own.source:
            out.setdefault(choice.source, choice)
    return list(out.values())


def report_rows(primary: Mapping[str, BitChoice], extra: Sequence[BitChoice] = ()) -> list[tuple[str, BitChoice]]:
    """``(variant, choice)`` of every row of a per-network table: each network's primary choice,
    followed by the ``extra`` choices of that network (:data:`WA_RUN_VARIANT`)."""
    rows = []
    for net, choice in primary.items():
        rows.append((PRIMARY_VARIANT, choice))
        rows += [(WA_RUN_VARIANT, c) for c in extra if c.network == net]
    return rows


def row_label(network: str, variant: str | None, source: str) -> str:
    """A row's name in a figure: the network, and for a W+A run row also the run's folder
    (``lenet w+a wa/seed0``); ``variant`` None (a summary row): the network cell as it is."""
    if variant != WA_RUN_VARIANT:
        return network
    return f"{network} w+a {'/'.join(Path(source).parts[-2:])}"


def with_act_bits(choice: BitChoice, act_bits: str | Sequence[int]) -> BitChoice:
    """``choice`` at activation bits ``act_bits`` (``--act-bits``: one value, or one per weight layer,
    checked like ``--bits``); a choice that carries activation bits of its own (a W+A search run)
    keeps them, but ``act_bits`` must still fit its network."""
    a_bits = parse_bits(act_bits, len(choice.w_bits), choice.network, what="--act-bits")
    return choice if choice.a_bits is not None else replace(choice, a_bits=a_bits)
