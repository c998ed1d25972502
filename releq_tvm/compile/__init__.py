"""Compile and measure: per-layer bits -> a TVM bit-serial library for x86, and its measured latency.

* :func:`quantize_network` / :func:`integer_forward` - the integer network and its numpy reference;
* :func:`compile_network` / :func:`load_compiled` - the Relax build, exported as ``net.so`` + params;
* :func:`measure_network` -> :class:`NetworkComparison` - per-layer and whole-network latency;
* :class:`LatencyTable` / :func:`cpu_cost_ratio` - the cached per-layer latency the search queries;
* :class:`Runner` - where timed code runs: this process, a TVM RPC server or a tracker's device.
"""

from releq_tvm.compile.artifact import CompiledNetwork, compile_network, load_compiled  # noqa: F401
from releq_tvm.compile.integer import (  # noqa: F401
    IntegerNetwork,
    fake_quant_model,
    integer_forward,
    quantize_network,
)
from releq_tvm.compile.latency_table import LatencyTable, cpu_cost_ratio  # noqa: F401
from releq_tvm.compile.measure import NetworkComparison, measure_network  # noqa: F401
from releq_tvm.compile.target import resolve_target  # noqa: F401
from releq_tvm.compile.timing import Runner  # noqa: F401
from releq_tvm.timing import TimingConfig  # noqa: F401
