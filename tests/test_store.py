"""The one on-disk cache: round trips, namespaces, two writing processes, a corrupt file, its users."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from releq_tvm.store import CorruptStoreWarning, Store, open_store


def test_round_trip_of_json_values(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    value = {"us": 12.5, "repeats": 3, "bits": [8, 2, 2], "note": "é", "none": None}
    assert store.get("ns", "k") is None and store.get("ns", "k", default=7) == 7
    store.put("ns", "k", value)
    assert store.get("ns", "k") == value
    store.put("ns", "k", 1.5)  # replaces
    assert store.get("ns", "k") == 1.5
    store.put_many("ns", {"b": 2, "a": 1})
    assert store.items("ns") == {"a": 1, "b": 2, "k": 1.5} and store.count("ns") == 3
    store.delete("ns", "k")
    assert store.get("ns", "k") is None and store.count("ns") == 2
    store.close()
    assert Store(tmp_path / "c.sqlite").items("ns") == {"a": 1, "b": 2}  # on disk, not in memory


def test_namespaces_are_isolated(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    store.put("latency/a", "k", 1)
    store.put("latency/b", "k", 2)
    store.put("report/accuracy", "k", 3)
    assert (store.get("latency/a", "k"), store.get("latency/b", "k"), store.get("report/accuracy", "k")) == (1, 2, 3)
    assert list(store.namespaces("latency/")) == ["latency/a", "latency/b"]
    store.clear("latency/a")
    assert store.items("latency/a") == {} and store.items("latency/b") == {"k": 2}
    assert store.count("report/accuracy") == 1


def test_default_store_lives_in_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RELEQ_TVM_CACHE", str(tmp_path))
    assert open_store().path == tmp_path / "cache.sqlite"
    assert open_store() is open_store()  # one connection per file and process


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from releq_tvm.store import Store

    path, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = Store(path)
    Path(path + "." + name + ".ready").touch()
    while not go.exists():  # both start writing at the same moment
        time.sleep(0.005)
    for i in range(200):
        store.put("shared", f"{name}-{i}", {"writer": name, "i": i})
    """
)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path, go = tmp_path / "c.sqlite", tmp_path / "go"
    Store(path).close()  # created once, so neither writer races to create the schema
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(go)]) for name in ("a", "b")]
    try:
        for name in ("a", "b"):
            ready = tmp_path / f"c.sqlite.{name}.ready"
            for _ in range(6000):
                if ready.exists() or any(w.poll() is not None for w in writers):
                    break
                time.sleep(0.01)
        go.touch()
        assert [w.wait(timeout=120) for w in writers] == [0, 0]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    items = Store(path).items("shared")
    assert len(items) == 400
    assert all(items[f"{n}-{i}"] == {"writer": n, "i": i} for n in ("a", "b") for i in range(200))


def test_a_corrupt_file_is_set_aside_with_one_warning(tmp_path):
    path = tmp_path / "cache.sqlite"
    garbage = b"this is not an sqlite database\x00\xff" * 64
    path.write_bytes(garbage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = Store(path)
    ours = [w for w in caught if issubclass(w.category, CorruptStoreWarning)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message) and "corrupt-" in str(ours[0].message)
    store.put("ns", "k", 1)  # usable at once
    assert Store(path).get("ns", "k") == 1
    aside = list(tmp_path.glob("cache.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage  # kept for a human to look at
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Store(path)  # the fresh file opens without a warning


def test_a_damaged_page_inside_a_valid_file_is_caught_on_open(tmp_path):
    path = tmp_path / "cache.sqlite"
    store = Store(path)
    store.put_many("ns", {f"k{i}": "x" * 200 for i in range(2000)})
    store.close()
    with open(path, "r+b") as f:  # the header stays valid; pages in the middle are overwritten
        f.seek(4096 * 20)
        f.write(bytes(range(256)) * 48)
    with pytest.warns(CorruptStoreWarning) as caught:
        store = Store(path)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert store.count("ns") == 0 and len(list(tmp_path.glob("cache.sqlite.corrupt-*"))) == 1


# ------------------------------------------------------------------ the caches built on it


def test_accuracy_cache_survives_a_fresh_object(tmp_path):
    from releq_tvm.search.accuracy import AccuracyCache

    cache = AccuracyCache(tmp_path / "c.sqlite")
    key = cache.register({"network": "lenet", "steps": 2})
    cache.put(key, (8, 2), None, 97.5, 1.0)
    cache.put(key, (8, 2), (8, 4), 96.0, 1.0)
    other_key = cache.register({"network": "lenet", "steps": 3})
    cache.put(other_key, (8, 2), None, 90.0, 1.0)
    cache.close()
    again = AccuracyCache(tmp_path / "c.sqlite")
    assert again.get(key, (8, 2)) == 97.5 and again.get(key, (8, 2), (8, 4)) == 96.0
    assert again.get(key, (2, 8)) is None
    assert (again.count(key), again.count(other_key), again.count()) == (2, 1, 3)
    assert again.store.get(AccuracyCache.SETTINGS, key) == {"network": "lenet", "steps": 2}


def test_latency_table_survives_a_fresh_object(tmp_path):
    from releq_tvm.compile.latency_table import LatencyTable, layer_key
    from releq_tvm.networks import layer_table

    row = layer_table("lenet")[4]
    table = LatencyTable(path=tmp_path / "c.sqlite")
    timing = {"median_ms": 0.25, "iqr_ms": 0.0, "min_ms": 0.25, "max_ms": 0.25, "repeats": 1}
    table.store(layer_key(row, 2, 8), timing, 0.0)
    fresh = LatencyTable(path=tmp_path / "c.sqlite")
    assert layer_key(row, 2, 8) in fresh and fresh.latency_us(row, 2, 8) == pytest.approx(250.0)
    assert fresh.builds == 0
    # an entry another process wrote after this object loaded is served, not measured again
    table.store(layer_key(row, 3, 8), dict(timing, median_ms=0.5), 0.0)
    assert fresh.latency_us(row, 3, 8) == pytest.approx(500.0) and fresh.builds == 0


def test_report_cpu_cache_survives_a_fresh_wrapper(tmp_path):
    from releq_tvm.report.cpu_report import CpuLatency, disk_cached

    calls = []

    def measure(network, w_bits, a_bits):
        calls.append(network)
        return CpuLatency(mixed_ms=1.0, bitserial8_ms=2.0, repeats=3, measured="2026-01-01T00:00:00Z")

    first = disk_cached(measure, tmp_path / "c.sqlite", "machine", 3)("lenet", (8, 2), None)
    again = disk_cached(measure, tmp_path / "c.sqlite", "machine", 3)("lenet", (8, 2), None)
    assert again == first and calls == ["lenet"]
    disk_cached(measure, tmp_path / "c.sqlite", "other machine", 3)("lenet", (8, 2), None)
    disk_cached(measure, tmp_path / "c.sqlite", "machine", 3, fresh=True)("lenet", (8, 2), None)
    assert calls == ["lenet"] * 3
