"""Figure 8: measured CPU latency of the TVM bit-serial build at the chosen bits against 8 bits.

Latency numbers come from a *measure function* ``measure(network, w_bits, a_bits) ->
CpuLatency``. The default, :func:`tvm_measure`, builds and times the whole network with
:mod:`releq_tvm.compile`; tests inject a fake, so no TVM build runs in the default test suite.

Measuring every network takes tens of minutes on a small machine, so :func:`disk_cached`
keeps each measurement (with its date) in the one cache store (namespace ``report/cpu_latency``
of ``cache_dir()/cache.sqlite``), keyed by the machine (CPU model, LLVM CPU, TVM version, threads), the network, the bits and the repeats; the
``measured_utc`` column of fig8 says when each number was taken. ``--fresh-cpu`` re-measures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from releq_tvm.bits import format_bits
from releq_tvm.config import DEFAULT_ACT_BITS
from releq_tvm.report.choices import PRIMARY_VARIANT, WA_RUN_VARIANT, BitChoice, report_rows, row_label
from releq_tvm.report.stripes_report import MEAN_LABEL, mean_row

if TYPE_CHECKING:
    from releq_tvm.report.pareto import SeparableCost


@dataclass(frozen=True)
class CpuLatency:
    """Whole-network latencies of one network on this CPU, milliseconds per image (batch 1).

    ``mixed_ms``: bit-serial build at the chosen bits; ``bitserial8_ms``: the same build with
    every layer at 8/8 bits (the reference of the speedup); ``int8_ms``: plain int8 kernels;
    ``fp32_ms``: the float model through TVM's default CPU pipeline (untuned); ``auto_ms``: the
    deployable build at the chosen bits (each layer the fastest of bit-serial, int8 and lut);
    ``ort_fp32_ms``, ``ort_int8_ms``, ``openvino_int8_ms``: the same float network in onnxruntime
    (fp32, static QDQ int8) and OpenVINO (from the QDQ model), timed in the same rounds
    (:data:`releq_tvm.peers.FIG8_PEERS`). None: not measured.
    """

    mixed_ms: float
    bitserial8_ms: float
    int8_ms: float | None = None
    fp32_ms: float | None = None
    auto_ms: float | None = None
    ort_fp32_ms: float | None = None
    ort_int8_ms: float | None = None
    openvino_int8_ms: float | None = None
    repeats: int | None = None
    spread: str = ""  # how the medians spread (e.g. IQRs), for the notes
    measured: str = ""  # when (UTC, ISO 8601)


MeasureFn = Callable[[str, tuple[int, ...], tuple[int, ...] | None], CpuLatency]

FIG8_COLUMNS = (
    "network",
    "bits_source",
    "variant",
    "w_bits",
    "a_bits",
    "avg_bits",
    "latency_8bit_bitserial_ms",
    "latency_mixed_ms",
    "speedup",
    "latency_int8_ms",
    "latency_fp32_tvm_untuned_ms",
    "speedup_vs_int8",
    "speedup_vs_fp32_tvm_untuned",
    "latency_auto_ms",
    "auto_speedup_vs_int8",
    "latency_ort_fp32_ms",
    "latency_ort_int8_ms",
    "latency_openvino_int8_ms",
    "auto_speedup_vs_ort_int8",
    "auto_speedup_vs_openvino_int8",
    "repeats",
    "measured_utc",
)
FIG8_RATIO_COLUMNS = ("speedup", "speedup_vs_int8", "speedup_vs_fp32_tvm_untuned", "auto_speedup_vs_int8",
                      "auto_speedup_vs_ort_int8", "auto_speedup_vs_openvino_int8")
#: The ``# note:`` lines of fig8_tvm_cpu.csv (the report adds where the bits came from).
FIG8_NOTES = (
    "latency per image (batch 1) in ms, median of interleaved timing rounds on this CPU, every engine of a network in "
    "the same rounds; bit-serial builds (8bit_bitserial, mixed): every conv/dense a TVM bit-serial kernel (w weight "
    "bits x a activation bits), the paper's comparison; auto: per layer the fastest of bit-serial at its bits, our "
    "int8 kernel and the lut kernel (dense layers at 1-4 weight bits), what `releq-tvm compile` ships; int8: our "
    "int8 kernels everywhere",
    "speedup = latency of the all-8-bit bit-serial build / latency at the chosen bits; speedup_vs_X = X latency / "
    "latency at the chosen bits (bit-serial); auto_speedup_vs_X = X latency / auto latency (above 1: auto is faster)",
    "fp32_tvm_untuned: the float model through TVM's default CPU pipeline, no tuning; peers (empty without the peers "
    "extra): ort_fp32 = onnxruntime fp32 on the ONNX export, ort_int8 = onnxruntime static QDQ int8 (per-channel s8 "
    "weights, u8 activations), openvino_int8 = OpenVINO on that QDQ model; same float weights as the fp32 build, "
    "threads = TVM's runtime pool",
    "measured_utc: when the row was measured (rows are cached per machine, bits and repeats; --fresh-cpu re-measures)",
    "variant: primary = the network's bits used by every report file (published or its primary search run); "
    "w+a run = another search run of the network that searched activation bits (--search-activations), its builds "
    "at its own w_bits and a_bits; bits_source names the run",
    "GEOMEAN row: geometric mean over the networks' primary rows above (w+a run rows left out)",
)
#: What results/README.md says about fig8_tvm_cpu.csv.
FIG8_README_LINES = (
    "Per network: the bits; latency of the all-8-bit TVM bit-serial build and of the mixed-bit bit-serial build and",
    "their ratio (speedup, the paper's figure 8); the deployable `auto` build, our int8 build, TVM's untuned fp32, and",
    "onnxruntime fp32/int8 and OpenVINO int8 on the same network, all timed side by side; `auto` over int8 and over",
    "each int8 peer. Each search run that searched activation bits adds a row (`variant` w+a run) built at its own",
    "weight and activation bits. Last row: geometric mean over the networks' primary rows.",
)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def cpu_row(choice: BitChoice, measure: MeasureFn, variant: str = PRIMARY_VARIANT) -> dict:
    """One fig8 row: latencies (ms) and speedups (x) of ``choice`` measured by ``measure``, every
    build at the choice's activation bits (8 where it has none)."""
    a_bits = choice.a_bits or (DEFAULT_ACT_BITS,) * len(choice.w_bits)
    lat = measure(choice.network, tuple(choice.w_bits), tuple(a_bits))
    return {
        "network": choice.network,
        "bits_source": choice.source,
        "variant": variant,
        "w_bits": format_bits(choice.w_bits),
        "a_bits": format_bits(a_bits),
        "avg_bits": choice.mean_bits,
        "latency_8bit_bitserial_ms": lat.bitserial8_ms,
        "latency_mixed_ms": lat.mixed_ms,
        "speedup": _ratio(lat.bitserial8_ms, lat.mixed_ms),
        "latency_int8_ms": lat.int8_ms,
        "latency_fp32_tvm_untuned_ms": lat.fp32_ms,
        "speedup_vs_int8": _ratio(lat.int8_ms, lat.mixed_ms),
        "speedup_vs_fp32_tvm_untuned": _ratio(lat.fp32_ms, lat.mixed_ms),
        "latency_auto_ms": lat.auto_ms,
        "auto_speedup_vs_int8": _ratio(lat.int8_ms, lat.auto_ms),
        "latency_ort_fp32_ms": lat.ort_fp32_ms,
        "latency_ort_int8_ms": lat.ort_int8_ms,
        "latency_openvino_int8_ms": lat.openvino_int8_ms,
        "auto_speedup_vs_ort_int8": _ratio(lat.ort_int8_ms, lat.auto_ms),
        "auto_speedup_vs_openvino_int8": _ratio(lat.openvino_int8_ms, lat.auto_ms),
        "repeats": lat.repeats,
        "measured_utc": lat.measured,
    }


def fig8_rows(
    choices: Mapping[str, BitChoice],
    measure: MeasureFn,
    progress: Callable[[str], None] | None = None,
    extra: Sequence[BitChoice] = (),
) -> list[dict]:
    """A row per network, each followed by the rows of its ``extra`` choices (W+A search runs),
    then the geometric-mean row of the speedup columns over the networks' primary rows."""
    rows = []
    for variant, choice in report_rows(choices, extra):
        if progress is not None:
            a_text = f" a {format_bits(choice.a_bits)}" if choice.a_bits else ""
            progress(f"cpu: measuring {choice.network} at {format_bits(choice.w_bits)}{a_text}")
        rows.append(cpu_row(choice, measure, variant))
    return rows + [mean_row([r for r in rows if r["variant"] == PRIMARY_VARIANT], FIG8_RATIO_COLUMNS)]


def fig8_png(rows: Sequence[Mapping], machine: str) -> bytes:
    """Left: speedup bars per row (W+A run rows in their own colour, geometric mean last). Right:
    every latency, log scale."""
    from releq_tvm.report.plots import MEAN_COLOUR, PALETTE, bars, figure, grouped_bars, png_bytes

    labels = [row_label(r["network"], r.get("variant"), r.get("bits_source", "")) for r in rows]
    wa_run = [r.get("variant") == WA_RUN_VARIANT for r in rows]
    colours = [MEAN_COLOUR if r["network"] == MEAN_LABEL else PALETTE[1] if wa else PALETTE[0] for r, wa in zip(rows, wa_run)]
    fig, (ax1, ax2) = figure(12.0 + 0.8 * sum(wa_run), 4.8, 1, 2)
    bars(ax1, labels, [r.get("speedup") for r in rows], colours)
    ax1.set_ylabel("speedup over the 8-bit bit-serial build (x)")
    ax1.set_title("Mixed bits vs all-8-bit, same TVM bit-serial kernels")
    nets = [r for r in rows if r["network"] != MEAN_LABEL]
    grouped_bars(
        ax2,
        [label for label, r in zip(labels, rows) if r["network"] != MEAN_LABEL],
        {
            "fp32 (TVM untuned)": [r.get("latency_fp32_tvm_untuned_ms") for r in nets],
            "onnxruntime fp32": [r.get("latency_ort_fp32_ms") for r in nets],
            "bit-serial 8/8": [r.get("latency_8bit_bitserial_ms") for r in nets],
            "bit-serial mixed": [r.get("latency_mixed_ms") for r in nets],
            "int8 (ours)": [r.get("latency_int8_ms") for r in nets],
            "onnxruntime int8": [r.get("latency_ort_int8_ms") for r in nets],
            "OpenVINO int8": [r.get("latency_openvino_int8_ms") for r in nets],
            "auto mixed (ours, deployable)": [r.get("latency_auto_ms") for r in nets],
        },
        fmt=None,
        reference=None,
        log=True,
    )
    ax2.set_ylabel("latency per image (ms, log scale)")
    ax2.set_title("Measured latency, batch 1")
    fig.suptitle(f"TVM on CPU ({machine}); dashed: 1x; grey: geometric mean")
    return png_bytes(fig)


def memoized(measure: MeasureFn) -> MeasureFn:
    """``measure`` with a per-report memo: fig8 and the ADMM comparison share measurements."""
    memo: dict = {}

    def wrapped(network, w_bits, a_bits):
        key = (network, tuple(w_bits), None if a_bits is None else tuple(a_bits))
        if key not in memo:
            memo[key] = measure(network, tuple(w_bits), a_bits)
        return memo[key]

    return wrapped


def tvm_measure(repeats: int = 7, progress: Callable[[str], None] | None = None) -> MeasureFn:
    """The real measure function: :func:`releq_tvm.compile.measure_network` on this CPU.

    Each call compiles and times the whole network five ways (chosen bits bit-serial and auto, all
    8-bit bit-serial, int8, fp32 TVM untuned) at batch 1 and, when the peers extra is installed,
    :data:`releq_tvm.peers.FIG8_PEERS` on the same float weights at TVM's thread count, all in the
    same interleaved rounds; ``repeats`` rounds, medians reported.
    """

    def measure(network: str, w_bits: tuple[int, ...], a_bits: tuple[int, ...] | None) -> CpuLatency:
        from releq_tvm.compile import measure_network
        from releq_tvm.compile.integer import load_network_model

        model, _ = load_network_model(network, None, seed=0)
        engines = _peer_engines(network, model, progress)
        m = measure_network(network, list(w_bits), None if a_bits is None else list(a_bits), repeats=repeats,
                            model=model, extra={name: e.call for name, e in engines.items()}, progress=progress)
        spread = "; ".join(f"{k} IQR {v:.3g} ms" for k, v in m.network_iqr_ms.items())
        return CpuLatency(
            measured=_now(),
            mixed_ms=m.network_ms["bits"],
            bitserial8_ms=m.network_ms["bitserial8"],
            int8_ms=m.network_ms.get("int8"),
            fp32_ms=m.network_ms.get("fp32"),
            auto_ms=m.network_ms.get("auto"),
            ort_fp32_ms=m.network_ms.get("ort_fp32"),
            ort_int8_ms=m.network_ms.get("ort_int8"),
            openvino_int8_ms=m.network_ms.get("openvino_int8"),
            repeats=m.timing.repeats,
            spread=spread,
        )

    return measure


def _peer_engines(network: str, model, progress) -> dict:
    """fig8's peer engines of ``network`` (:data:`releq_tvm.peers.FIG8_PEERS`), or none without the peers extra."""
    from releq_tvm import peers
    from releq_tvm.errors import ReleqError
    from releq_tvm.kernels.target import tvm_threads

    try:
        peers.import_peer_engines()
    except ReleqError:
        return {}
    if progress is not None:
        progress(f"build peers {', '.join(peers.FIG8_PEERS)} (ONNX export, QDQ int8)")
    return peers.peer_engines(network, model, tvm_threads())


def cpu_separable_cost(network: str, bit_set) -> SeparableCost:
    """Per-layer TVM bit-serial latencies (us, 8-bit activations) for each bit value, from the
    on-disk latency table (missing entries are built and timed now), plus the network's fixed
    non-layer time: the same sum :func:`releq_tvm.compile.cpu_cost_ratio` takes."""
    import numpy as np

    from releq_tvm.compile.latency_table import default_table
    from releq_tvm.config import BITS_MAX
    from releq_tvm.networks import layer_table
    from releq_tvm.report.pareto import SeparableCost

    table = default_table()
    n = len(layer_table(network))
    values = tuple(sorted(set(bit_set) | {BITS_MAX}))
    layer = np.zeros((n, len(values)))
    for j, b in enumerate(values):
        layer[:, j] = table.network_layers_us(network, [b] * n, [DEFAULT_ACT_BITS] * n)
    reference = float(layer[:, values.index(BITS_MAX)].sum())
    return SeparableCost("cpu_latency", values, layer, reference, fixed=table.fixed_us(network))


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The store namespace of the CPU latencies the report measured.
CPU_LATENCY_NAMESPACE = "report/cpu_latency"
#: Part of every key: rows measured before fig8 timed the peers beside our builds are not reused.
CPU_LATENCY_FORMAT = "with peers"


def disk_cached(measure: MeasureFn, path, machine: str, repeats: int, fresh: bool = False) -> MeasureFn:
    """``measure`` with an on-disk cache, keyed by ``machine``, network, bits, repeats.

    ``path``: the cache store file (None: the shared ``cache_dir()/cache.sqlite``); entries live
    in its ``report/cpu_latency`` namespace, one write each. The old ``cpu_latency.json`` is not
    read: its networks are measured again. ``fresh``: measure everything again (and overwrite
    the cached entries).
    """
    import dataclasses

    from releq_tvm.store import Store, open_store

    store = Store(path) if path is not None else open_store()

    def wrapped(network, w_bits, a_bits):
        key = (f"{machine}|{network}|w {format_bits(w_bits)}|a {format_bits(a_bits) if a_bits else '8'}|repeats {repeats}"
               f"|{CPU_LATENCY_FORMAT}")
        entry = None if fresh else store.get(CPU_LATENCY_NAMESPACE, key)
        if entry is not None:
            return CpuLatency(**entry)
        lat = measure(network, w_bits, a_bits)
        store.put(CPU_LATENCY_NAMESPACE, key, dataclasses.asdict(lat))
        return lat

    return wrapped


def host_machine_key() -> str:
    """The compile stage's machine key of this host (CPU model, LLVM CPU, TVM version, threads)."""
    from releq_tvm.compile.target import machine_key, resolve_target

    return machine_key(resolve_target(None))
