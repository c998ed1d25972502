"""``search --measure cpu --rpc / --rpc-tracker``: the cost backend times its latency table remotely.

No network is measured here: the remote table itself is tested in test_compile.py
(``test_rpc_tracker_measurement_names_the_remote_cpu``); these tests check the wiring, with a
fake latency ratio and a fake runner.
"""

from __future__ import annotations

import socket
import time

import pytest

import releq_tvm.compile as compile_package
from releq_tvm.errors import ReleqError
from releq_tvm.networks import layer_table
from releq_tvm.search.cost import CpuLatencyCost, make_cost_backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_backend_names_the_tracker_and_connects_only_when_asked():
    """Built without a connection (the tracker here is not running); the first ratio then fails in one line."""
    tracker = f"127.0.0.1:{_free_port()}"
    cost = make_cost_backend("cpu", "lenet", layer_table("lenet"), rpc_tracker=tracker, rpc_key="epyc")
    assert cost.describe().endswith(f"; timed on rpc-tracker://{tracker}/epyc")
    started = time.time()
    with pytest.raises(ReleqError, match=f"cannot reach the TVM RPC tracker at {tracker}") as error:
        cost.ratio([8, 2, 2, 3, 2])
    assert "\n" not in str(error.value) and time.time() - started < 5


def test_cpu_backend_prices_on_the_remote_table_made_once(monkeypatch):
    made = []

    class FakeRunner:
        def __init__(self, rpc=None, tracker=None, key=None):
            made.append((rpc, tracker, key))

    class FakeTable:
        def __init__(self, runner):
            self.runner = runner

    monkeypatch.setattr(compile_package, "Runner", FakeRunner)  # the cost backend resolves both there by name
    monkeypatch.setattr(compile_package, "LatencyTable", FakeTable)
    tables = []

    def fake_latency(network, w_bits, a_bits=None, kernels="auto", table=None):
        tables.append(table)
        return sum(w_bits) / (8 * len(w_bits))

    cost = CpuLatencyCost("lenet", latency_ratio=fake_latency, rpc_tracker="10.0.0.2:9190", rpc_key="epyc")
    assert made == []  # nothing is connected before the first ratio
    assert cost.ratio([8, 8, 8, 8, 8]) == 1.0 and cost.ratio([4, 4, 4, 4, 4]) == 0.5
    assert made == [(None, "10.0.0.2:9190", "epyc")] and tables[0] is tables[1] and isinstance(tables[0].runner, FakeRunner)


def test_cpu_backend_over_one_server_and_locally():
    def fake_latency(network, w_bits, a_bits=None, kernels="auto", **extra):
        return 1.0

    server = make_cost_backend("cpu", "lenet", layer_table("lenet"), rpc="10.0.0.1:9090")
    assert server.describe().endswith("; timed on rpc://10.0.0.1:9090")
    local = CpuLatencyCost("lenet", latency_ratio=fake_latency)
    assert "timed on" not in local.describe() and local.remote_table() is None and local.ratio([8] * 5) == 1.0


@pytest.mark.parametrize("measure, options, message", [
    ("cpu", {"rpc_tracker": "127.0.0.1:9190"}, "--rpc-tracker and --rpc-key go together"),
    ("cpu", {"rpc": "127.0.0.1:9090", "rpc_tracker": "127.0.0.1:9190", "rpc_key": "k"}, "not both"),
    ("none", {"rpc": "127.0.0.1:9090"}, "need --measure cpu"),
    ("stripes", {"rpc_tracker": "127.0.0.1:9190", "rpc_key": "k"}, "need --measure cpu"),
])
def test_rpc_options_of_the_cost_backend_are_checked_in_one_line(measure, options, message):
    with pytest.raises(ReleqError, match=message):
        make_cost_backend(measure, "lenet", layer_table("lenet"), **options)
