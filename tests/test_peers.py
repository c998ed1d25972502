"""`bench peers`: every engine runs the same LeNet-5, agrees with the others, and is timed.

One module-scoped build of LeNet-5 at its published bits (ONNX export, QDQ quantization, three
TVM builds) serves every test; timing uses two tiny rounds at one thread. Needs the ``peers``
extra (onnxruntime, openvino); without it the module is skipped, except the test of the error
message a user then sees.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from releq_tvm import peers
from releq_tvm.cli import main
from releq_tvm.compile import integer_forward
from releq_tvm.data import load_dataset
from releq_tvm.errors import ReleqError
from releq_tvm.report.tables import read_csv
from releq_tvm.timing import CallSampler, TimingConfig, interleaved_timing

TINY = peers.PeersConfig(TimingConfig(repeats=2, min_repeat_ms=1.0, warmup=0, calibration_calls=2),
                         calibration_images=32, accuracy_images=200)


def _has_peer_engines() -> bool:
    try:
        peers.import_peer_engines()
    except ReleqError:
        return False
    return True


needs_peers = pytest.mark.skipif(not _has_peer_engines(), reason="needs the peers extra: pip install 'releq-tvm[peers]'")


@pytest.fixture(scope="module")
def lenet_builds():
    return peers.build_peers("lenet", config=TINY)


@pytest.fixture(scope="module")
def mnist_test():
    data = load_dataset("mnist", "test", limit=200)
    return data.images.numpy(), data.labels.numpy()


@pytest.fixture(scope="module")
def engines(lenet_builds):
    return peers.open_engines(lenet_builds, 1)


@needs_peers
def test_tvm_reads_the_thread_count_being_timed_and_the_variable_is_put_back(lenet_builds, monkeypatch):
    """TVM reads TVM_NUM_THREADS on every parallel loop, so it must equal the count timed, not the user's."""
    seen = []
    real = peers.time_engines

    def spy(engines, config, progress=None):
        seen.append(os.environ.get("TVM_NUM_THREADS"))
        return real(engines, config, progress)

    monkeypatch.setattr(peers, "time_engines", spy)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    peers.measure_peers(lenet_builds, threads=(1,), config=TINY, engines=("ours_int8",))
    assert seen == ["1"] and os.environ["TVM_NUM_THREADS"] == "3"


def _top1(engine, images) -> np.ndarray:
    return np.array([int(np.argmax(engine.infer(images[i : i + 1]))) for i in range(len(images))])


@needs_peers
def test_every_engine_timed_with_accuracy_and_written_with_provenance(lenet_builds, tmp_path):
    rows = peers.measure_peers(lenet_builds, threads=(1,), config=TINY)
    assert [r["engine"] for r in rows] == list(peers.ENGINES)
    by_engine = {r["engine"]: r for r in rows}
    for r in rows:
        assert r["latency_ms_median"] > 0 and r["latency_ms_iqr"] >= 0, r
        assert r["rounds"] == 2 and r["calls_per_round"] >= 1 and r["threads"] == 1
        assert r["bits"] == "8,2,2,3,2" and r["act_bits"] == "8,8,8,8,8"
    assert by_engine["ours_int8"]["ratio_to_ours_int8"] == pytest.approx(1.0)
    assert by_engine["ort_int8"]["ratio_to_ort_int8"] == pytest.approx(1.0)
    ratio = by_engine["ort_fp32"]["latency_ms_median"] / by_engine["ours_int8"]["latency_ms_median"]
    assert by_engine["ort_fp32"]["ratio_to_ours_int8"] == pytest.approx(ratio)
    # accuracy on the first 200 MNIST test images: the three fp32 engines predict alike; the
    # 8-bit engines stay within 2 points of them; 8,2,2,3,2 without fine-tuning loses more
    acc = {name: r["accuracy"] for name, r in by_engine.items()}
    assert acc["torch_fp32"] == acc["ort_fp32"] == acc["openvino_fp32"] > 95.0
    for name in ("ort_int8", "openvino_int8", "ours_bitserial8", "ours_int8"):
        assert abs(acc[name] - acc["torch_fp32"]) <= 2.0, acc
    assert 80.0 < acc["ours_bits"] <= 100.0
    assert by_engine["ours_bitserial8"]["accuracy"] == by_engine["ours_int8"]["accuracy"]  # one integer network

    out = tmp_path / "peers.csv"
    command = peers.peers_command(["lenet"], threads=(1,), rounds=2, out=str(out))
    peers.write_peers_csv(rows, out, command, peers.peers_notes(TINY, lenet_builds.target,
                                                                 [peers.network_note(lenet_builds)]))
    header, table = read_csv(out)
    assert header[0] == f"command: {command}"
    assert any(h.startswith("machine:") and "cpu:" in h for h in header)
    assert any(h.startswith("versions:") and "tvm" in h and "torch" in h for h in header)
    assert any("onnxruntime" in h and "openvino" in h for h in header)
    assert any(h.startswith("note: llvm target:") and '"kind": "llvm"' in h for h in header)
    assert list(table[0]) == list(peers.PEERS_COLUMNS)
    assert [r["engine"] for r in table] == list(peers.ENGINES)
    assert float(table[0]["latency_ms_median"]) > 0
    assert peers.peers_png(rows)[:8] == b"\x89PNG\r\n\x1a\n"


@needs_peers
def test_onnx_and_openvino_fp32_logits_equal_torch(engines, mnist_test):
    images = mnist_test[0][:5]
    for i in range(len(images)):
        x = images[i : i + 1]
        reference = engines["torch_fp32"].infer(x)
        np.testing.assert_allclose(engines["ort_fp32"].infer(x), reference, atol=1e-4, rtol=0)
        np.testing.assert_allclose(engines["openvino_fp32"].infer(x), reference, atol=1e-4, rtol=0)


@needs_peers
def test_qdq_int8_top1_agrees_with_fp32(engines, mnist_test):
    images = mnist_test[0]
    fp32 = _top1(engines["ort_fp32"], images)
    for name in ("ort_int8", "openvino_int8"):
        agree = float(np.mean(_top1(engines[name], images) == fp32))
        assert agree >= 0.95, (name, agree)


@needs_peers
def test_our_builds_equal_the_integer_model(lenet_builds, engines, mnist_test):
    images = mnist_test[0][:20]
    for name in ("ours_int8", "ours_bits", "ours_auto"):
        build = lenet_builds.ours[name]
        levels = build.net.quantize_input(images)
        expected = integer_forward(build.net, levels)
        np.testing.assert_array_equal(build.compiled.run_levels(levels), expected)
        np.testing.assert_array_equal(engines[name].infer(images[:1]), build.net.logits(expected[:1]))


def test_interleaved_rounds_rotate_and_report_medians():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    config = TimingConfig(repeats=3, min_repeat_ms=0.0, warmup=1, rewarm_ms=1e-6, calibration_calls=1)
    timings = interleaved_timing({name: CallSampler(call, config) for name, call in calls.items()}, config)
    # calibration a, b, c; then per round one untimed (rewarm) + one timed call of each, starting
    # one later each round; the first round is the untimed warm-up
    assert "".join(order) == "abc" + "aabbcc" + "bbccaa" + "ccaabb" + "aabbcc"
    assert all(t["repeats"] == 3 and t["calls_per_sample"] == 1 and t["median_ms"] >= 0 for t in timings.values())


def test_call_sampler_fills_min_repeat_ms():
    calls = []
    sampler = CallSampler(lambda: (calls.append(1), time.sleep(0.001)), TimingConfig(min_repeat_ms=5.0, calibration_calls=2))
    assert 2 <= sampler.count <= 5  # 5 ms of calls that take a little over 1 ms each
    seconds = sampler()
    assert len(calls) == 2 + sampler.count and seconds >= 0.001


@needs_peers
def test_other_bits_reuse_the_float_model_and_the_peers_models(lenet_builds):
    other = peers.build_peers("lenet", "4", config=TINY, like=lenet_builds)
    assert other.peers is lenet_builds.peers and other.model is lenet_builds.model
    assert other.w_bits == (4,) * 5 and other.ours["ours_bits"].net.w_bits == (4,) * 5
    assert lenet_builds.ours["ours_bits"].net.w_bits == (8, 2, 2, 3, 2)
    assert "lenet at w 4,4,4,4,4 / a 8,8,8,8,8:" in peers.network_note(other)
    command = peers.peers_command(["alexnet"], [None, "4", (2,) * 8], threads=(1,), rounds=3, out="x.csv")
    assert command == ("releq-tvm bench peers alexnet --bits published --bits 4 --bits 2,2,2,2,2,2,2,2 --threads 1 --rounds 3 "
                       "--out x.csv")
    assert peers.peers_command(["lenet"], threads=(1,), rounds=3, out="x.csv", checkpoint="ft.pt").endswith(
        "--out x.csv --checkpoint ft.pt")


def test_threads_and_bits_are_checked_in_one_line():
    assert peers.parse_threads("1,2,2") == (1, 2)
    with pytest.raises(ReleqError, match="--threads"):
        peers.parse_threads("0,2")
    assert peers.network_bits("lenet") == ((8, 2, 2, 3, 2), (8,) * 5)
    assert peers.network_bits("lenet", "published") == peers.network_bits("lenet")
    with pytest.raises(ReleqError, match="--bits has 2 values"):
        peers.network_bits("lenet", "2,2")


def test_a_finetuned_checkpoint_gives_its_own_bits(tmp_path):
    """bench peers --checkpoint FILE of a fine-tuned model builds at the file's w and a bits (its
    learned levels belong to them); bits given on the command line must agree with the file."""
    from releq_tvm.data import load_dataset
    from releq_tvm.quant import act_quantizers
    from releq_tvm.train import finetune_bits, load_model, save_finetuned

    w, a = (4, 2, 1, 8, 3), (8, 8, 8, 8, 4)
    train = load_dataset("mnist", "train", limit=256)
    model = load_model("lenet")
    finetune_bits(model, w, (1, 28, 28), train, steps=1, lr=1e-3, batch_size=32, seed=0, act_bits=a,
                  calibration=train.images[:64])
    path = str(save_finetuned(tmp_path / "ft.pt", model, "lenet", (1, 28, 28), {"steps": 1}))
    assert peers.network_bits("lenet", None, None, path) == (w, a)
    assert peers.network_bits("lenet", "4,2,1,8,3", None, path) == (w, a)
    with pytest.raises(ReleqError, match="disagrees"):
        peers.network_bits("lenet", "2", None, path)
    # our builds at the file's bits keep its learned levels; the 8-bit ones and the peers run the float network
    builds = peers.build_peers("lenet", None, None, peers.PeersConfig(calibration_images=16), path)
    assert (builds.w_bits, builds.a_bits) == (w, a)
    assert builds.ours["ours_auto"].compiled.manifest["a_bits"] == list(a)
    assert builds.ours["ours_int8"].compiled.manifest["a_bits"] == [8] * 5
    assert not act_quantizers(builds.model)


def test_missing_peer_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    out = tmp_path / "peers.csv"
    result = CliRunner().invoke(main, ["bench", "peers", "lenet", "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert "pip install 'releq-tvm[peers]'" in lines[0] and "onnxruntime" in lines[0]
    assert not out.exists()
