"""Cost backends of the search: one number per configuration, the cost ratio to the all-8-bit network.

``--measure`` picks the backend; every backend answers ``ratio(w_bits, a_bits) -> float`` with
1.0 meaning "costs as much as every layer at 8 bits" and smaller meaning cheaper:

- ``none``: the State of Quantization formula (METHOD.md section 3), no hardware involved;
- ``cpu``: measured TVM bit-serial latency of the network over its latency at 8 bits
  (:mod:`releq_tvm.compile`, which measures missing table entries on first use);
- ``stripes``: Stripes cycles (or energy) over Stripes at 8 bits (:mod:`releq_tvm.sim`).

How the ratio enters the search (the same for every backend): it *replaces SQ*. The State of
Quantization entry of the observation is the ratio (clipped to [0, 2]), and every reward takes
it where METHOD.md writes SQ: the asymmetric reward is ``1 - ratio^a`` scaled by the accuracy
term, ``sa_over_sq`` is ``sa / ratio``, ``sa_minus_sq`` is ``sa - ratio``, and the hardware reward
adds ``1 / ratio``. The cpu and stripes modules are imported on first use, so the ``none``
backend (and its tests) work without TVM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, get_args

from releq_tvm.config import BITS_MAX, E_MEM_OVER_E_MAC
from releq_tvm.config_fields import check_rpc_options, where_label
from releq_tvm.errors import ReleqError
from releq_tvm.search.reward import state_of_quantization

#: ``--measure`` choices.
Measure = Literal["none", "cpu", "stripes"]
MEASURES: tuple[str, ...] = get_args(Measure)
#: ``--metric`` choices of the Stripes backend.
StripesMetric = Literal["cycles", "energy"]
STRIPES_METRICS: tuple[str, ...] = get_args(StripesMetric)

Bits = tuple[int, ...]


class CostBackend(Protocol):
    """Anything that prices a configuration relative to the all-8-bit network."""

    name: str
    #: True when activation bits change the ratio (False: ``a_bits`` is accepted and ignored).
    uses_activations: bool

    def ratio(self, w_bits: Sequence[int], a_bits: Sequence[int] | None = None) -> float:
        """Cost of (w_bits, a_bits) over the cost of every layer at 8/8 bits (dimensionless)."""
        ...

    def describe(self) -> str:
        """One line for logs and config.json: what the ratio measures."""
        ...


class _Memo:
    """Per-configuration memo: the search asks for the same ratio many times per episode."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Bits, Bits | None], float] = {}

    def ratio(self, w_bits, a_bits=None) -> float:
        key = (tuple(int(b) for b in w_bits), None if a_bits is None else tuple(int(b) for b in a_bits))
        if key not in self._memo:
            self._memo[key] = float(self._compute(*key))
        return self._memo[key]

    def _compute(self, w_bits: Bits, a_bits: Bits | None) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class SQCost(_Memo):
    """``--measure none``: the State of Quantization formula (weights only)."""

    name = "none"
    uses_activations = False

    def __init__(self, table, form: str = "cost", bits_max: int = BITS_MAX, e_mem_over_e_mac: float = E_MEM_OVER_E_MAC):
        super().__init__()
        self.table, self.form, self.bits_max, self.e_mem_over_e_mac = list(table), form, bits_max, e_mem_over_e_mac

    def _compute(self, w_bits, a_bits):
        return state_of_quantization(self.table, w_bits, self.bits_max, self.form, self.e_mem_over_e_mac)

    def describe(self) -> str:
        if self.form == "plain":
            return "SQ = sum(bits) / (8 L)"
        return f"SQ = sum (n_w*{self.e_mem_over_e_mac:g} + n_mac) * bits / same at 8 bits"


#: What ``--measure cpu`` prices: ``auto`` (what ``compile`` ships: each layer the faster of its
#: bit-serial kernel and int8, against the int8 build) or ``bitserial`` (the paper's comparison:
#: pure bit-serial against bit-serial at 8 bits).
CpuKernels = Literal["auto", "bitserial"]
CPU_KERNELS: tuple[str, ...] = get_args(CpuKernels)


class CpuLatencyCost(_Memo):
    """``--measure cpu``: measured CPU latency over the same network built at 8 bits (``kernels``:
    see :data:`CPU_KERNELS`).

    ``latency_ratio`` defaults to :func:`releq_tvm.compile.cpu_cost_ratio` (the on-disk
    latency table; missing entries are built and timed on first use). Tests inject a fake.
    ``rpc`` (``HOST:PORT`` of a TVM RPC server) or ``rpc_tracker`` (``HOST:PORT``) + ``rpc_key``
    time the table on that remote device instead of this process: the connection (and, with a
    tracker, the device) is taken on the first ratio asked for and kept, and ``latency_ratio`` is
    then called with ``table=`` that device's :class:`releq_tvm.compile.LatencyTable`.
    """

    name = "cpu"
    uses_activations = True

    def __init__(self, network: str, latency_ratio: Callable[..., float] | None = None, kernels: str = "auto",
                 rpc: str | None = None, rpc_tracker: str | None = None, rpc_key: str | None = None):
        super().__init__()
        if kernels not in CPU_KERNELS:
            raise ReleqError(f"unknown --cpu-kernels {kernels!r}; use one of {', '.join(CPU_KERNELS)}")
        check_rpc_options(rpc, rpc_tracker, rpc_key)
        self.network = network
        self.kernels = kernels
        self.rpc, self.rpc_tracker, self.rpc_key = rpc, rpc_tracker, rpc_key
        self._fn = latency_ratio
        self._table = None

    @property
    def remote(self) -> bool:
        return self.rpc is not None or self.rpc_tracker is not None

    @property
    def where(self) -> str:
        """Where the latencies are timed: ``local``, ``rpc://HOST:PORT`` or ``rpc-tracker://HOST:PORT/KEY``."""
        return where_label(self.rpc, self.rpc_tracker, self.rpc_key)

    def _function(self) -> Callable[..., float]:
        if self._fn is None:
            self._fn = _import_backend("releq_tvm.compile", "cpu_cost_ratio", "cpu")
        return self._fn

    def remote_table(self):
        """The remote device's latency table, connected on first use (None when timing locally)."""
        if self.remote and self._table is None:
            runner_class = _import_backend("releq_tvm.compile", "Runner", "cpu")
            table_class = _import_backend("releq_tvm.compile", "LatencyTable", "cpu")
            self._table = table_class(runner=runner_class(self.rpc, self.rpc_tracker, self.rpc_key))
        return self._table

    def _compute(self, w_bits, a_bits):
        extra = {"table": self.remote_table()} if self.remote else {}
        return self._function()(self.network, list(w_bits), None if a_bits is None else list(a_bits),
                                kernels=self.kernels, **extra)

    def describe(self) -> str:
        if self.kernels == "auto":
            text = (f"measured TVM CPU latency of {self.network} built auto (each layer the fastest of bit-serial at "
                    "its bits and int8) / the same at 8-bit weights and activations (the int8 build)")
        else:
            text = f"measured TVM bit-serial CPU latency of {self.network} / latency at 8-bit weights and activations"
        return f"{text}; timed on {self.where}" if self.remote else text


class StripesCost(_Memo):
    """``--measure stripes``: simulated Stripes cycles or energy over Stripes at 8 bits."""

    name = "stripes"
    # Weights are the serial operand; activation bits still move memory traffic and energy,
    # so they are passed on and the simulator decides.
    uses_activations = True

    def __init__(self, table, metric: str = "cycles", config=None, cost_ratio: Callable[..., float] | None = None):
        super().__init__()
        if metric not in STRIPES_METRICS:
            raise ReleqError(f"unknown Stripes metric {metric!r}; use one of {', '.join(STRIPES_METRICS)}")
        self.table, self.metric, self.config = list(table), metric, config
        self._fn = cost_ratio

    def _function(self) -> Callable[..., float]:
        if self._fn is None:
            self._fn = _import_backend("releq_tvm.sim", "stripes_cost_ratio", "stripes")
        return self._fn

    def _compute(self, w_bits, a_bits):
        return self._function()(
            self.table, list(w_bits), None if a_bits is None else list(a_bits), metric=self.metric, config=self.config
        )

    def describe(self) -> str:
        return f"Stripes {self.metric} / Stripes {self.metric} at 8 bits (cycle-level simulator)"


def _import_backend(module: str, attr: str, measure: str) -> Callable[..., float]:
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ReleqError(
            f"--measure {measure} needs {module}.{attr}, which this install lacks ({exc}); use --measure none"
        ) from None


def check_remote_measure(measure: str, rpc: str | None, rpc_tracker: str | None) -> None:
    """``--rpc`` / ``--rpc-tracker`` time the CPU latency table: one line unless ``measure`` is cpu."""
    if (rpc or rpc_tracker) and measure != "cpu":
        raise ReleqError("--rpc and --rpc-tracker time the CPU latency table; they need --measure cpu")


def make_cost_backend(
    measure: str,
    network: str,
    table,
    sq_form: str = "cost",
    metric: str = "cycles",
    cpu_kernels: str = "auto",
    rpc: str | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
) -> CostBackend:
    """The backend for ``--measure``; cpu and stripes import their stage on first use. ``rpc`` /
    ``rpc_tracker`` + ``rpc_key``: where ``cpu`` times its latency table (see :class:`CpuLatencyCost`)."""
    check_remote_measure(measure, rpc, rpc_tracker)
    if measure == "none":
        return SQCost(table, form=sq_form)
    if measure == "cpu":
        return CpuLatencyCost(network, kernels=cpu_kernels, rpc=rpc, rpc_tracker=rpc_tracker, rpc_key=rpc_key)
    if measure == "stripes":
        return StripesCost(table, metric=metric)
    raise ReleqError(f"unknown --measure {measure!r}; use one of {', '.join(MEASURES)}")


def _next_lower(value: int, allowed: Sequence[int]) -> int | None:
    lower = [v for v in allowed if v < value]
    return max(lower) if lower else None


def correct_to_target(
    w_bits: Sequence[int],
    a_bits: Sequence[int] | None,
    ratio: Callable[[Bits, Bits | None], float],
    target: float,
    w_set: Sequence[int],
    a_set: Sequence[int] | None = None,
) -> tuple[Bits, Bits | None, float, int]:
    """Lower bits until ``ratio(w, a) <= target`` (METHOD.md section 4's resource constraint).

    Walks the layers last to first; at each layer it lowers the activation bits by one level
    of ``a_set`` (when activations are searched) and checks, then the weight bits by one level
    of ``w_set`` and checks, and stops as soon as the configuration fits. Passes repeat until
    it fits or nothing can be lowered (then the cheapest reachable configuration is returned).

    Returns (w_bits, a_bits, final ratio, number of one-level reductions).
    """
    w = [int(b) for b in w_bits]
    a = None if a_bits is None else [int(b) for b in a_bits]
    current = ratio(tuple(w), None if a is None else tuple(a))
    steps = 0
    while current > target:
        moved = False
        for layer in reversed(range(len(w))):
            for values, allowed in ((a, a_set), (w, w_set)):
                if values is None or allowed is None:
                    continue
                lower = _next_lower(values[layer], allowed)
                if lower is None:
                    continue
                values[layer] = lower
                moved, steps = True, steps + 1
                current = ratio(tuple(w), None if a is None else tuple(a))
                if current <= target:
                    return tuple(w), None if a is None else tuple(a), current, steps
        if not moved:
            break
    return tuple(w), None if a is None else tuple(a), current, steps
