"""Our builds beside the engines a user would deploy instead: same network, same weights, one process.

``releq-tvm bench peers`` (issue 12, item 4) runs one network at batch 1 in

* ``torch_fp32``      the float torch model (``torch.set_num_threads``);
* ``ort_fp32``        onnxruntime on the model exported to ONNX (opset 17, TorchScript exporter:
                      the dynamo exporter needs onnxscript, which is not a dependency);
* ``ort_int8``        onnxruntime on a static QDQ quantization of that ONNX model
                      (``quantize_static``: per-channel int8 weights, uint8 activations,
                      calibrated on :data:`PeersConfig.calibration_images` of the network's
                      calibration images: MNIST training images, else seeded uniform noise);
* ``openvino_fp32``   OpenVINO CPU on the same ONNX model, ``INFERENCE_PRECISION_HINT`` f32
                      (on CPUs with AVX512-BF16 OpenVINO would otherwise run bf16 and the
                      column would not be fp32), ``PERFORMANCE_HINT`` LATENCY;
* ``openvino_int8``   OpenVINO on the same QDQ model (its low-precision pass runs it in int8);
* ``ours_*``          our TVM builds of :data:`OUR_BUILDS` (bit-serial at the bits, bit-serial at
                      all 8 bits, the int8 kernels), through :func:`releq_tvm.compile.compile_network`.

The float weights are the compile stage's (:func:`releq_tvm.compile.integer.load_network_model`:
the shipped checkpoint, else seeded random weights), so every engine computes the same network.

Timing: the package's one protocol (:mod:`releq_tvm.compile.timing`) with :data:`PEERS_TIMING`:
``rounds`` interleaved rounds in rotated order; in each, every engine's sample is the mean over
back-to-back calls lasting about 5 ms (:class:`~releq_tvm.compile.timing.CallSampler`), after an
idle pause of 50 ms (so the previous engine's worker threads stop spinning: several thread pools
share the cores of one process, which a deployment of one engine would not see) and 2 ms of
untimed calls (the first calls after idling wake this engine's threads and run slow). Each
engine reports the median and interquartile range over rounds, in milliseconds. The timed call
is the engine's own inference call on an input already in its format: a float32 array for the
peers, uint8 input levels in a TVM tensor for ours (the host-side input quantizer is outside, a
few microseconds).

Threads: per thread count every peer gets a fresh session at that count (onnxruntime
``intra_op_num_threads``, ``inter_op_num_threads`` 1, sequential execution; OpenVINO
``INFERENCE_NUM_THREADS``), torch ``set_num_threads``, and TVM's runtime pool is resized in
place (``runtime.config_threadpool``). TVM sizes that pool once, from ``TVM_NUM_THREADS`` (else
half the logical cores on x86), so :func:`measure_peers` sets ``TVM_NUM_THREADS`` to the largest
thread count before the pool exists. When the pool already exists and is smaller than a thread
count asked for, that thread count is measured in a child process (the same command with
``TVM_NUM_THREADS`` set, through a hidden ``--child-json`` option); its rows say so.

Accuracy (MNIST networks with trained weights only): top-1 of every engine on the first
:data:`PeersConfig.accuracy_images` MNIST *test* images, one image per call.
"""

from __future__ import annotations

import copy

import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from releq_tvm.bits import format_bits
from releq_tvm.timing import CallSampler, TimingConfig, interleaved_timing, timing_note
from releq_tvm.config import BITS_MAX
from releq_tvm.errors import ReleqError

if TYPE_CHECKING:  # torch is imported where it is used: `releq-tvm bench kernels` need not load it
    import torch

#: What to install when a peer engine is missing (the ``peers`` extra of pyproject.toml).
PEERS_INSTALL = "pip install 'releq-tvm[peers]'"

#: What `releq-tvm bench peers` runs without arguments (issue 12: LeNet-5 and ResNet-20 at 1 and 2 threads).
DEFAULT_NETWORKS = ("lenet", "resnet20")
DEFAULT_THREADS = (1, 2)
#: The engines a user would deploy instead of ours, in the order rows and bars are listed.
PEER_ENGINES = ("torch_fp32", "ort_fp32", "ort_int8", "openvino_fp32", "openvino_int8")
#: Our builds: engine name -> (``compile_network`` backend, bits: ``"bits"`` the requested
#: per-layer bits, ``"eight"`` 8 / 8 everywhere). ``auto`` gives each layer the fastest of int8,
#: bit-serial and lut at its bits, from the latency table (measuring what is missing on first use).
OUR_BUILDS: dict[str, tuple[str, str]] = {
    "ours_auto": ("auto", "bits"),
    "ours_bits": ("bitserial", "bits"),
    "ours_bitserial8": ("bitserial", "eight"),
    "ours_int8": ("int8", "eight"),
}
ENGINES = PEER_ENGINES + tuple(OUR_BUILDS)
#: Human names for tables and plots.
ENGINE_LABELS = {
    "torch_fp32": "torch fp32",
    "ort_fp32": "onnxruntime fp32",
    "ort_int8": "onnxruntime int8 (QDQ)",
    "openvino_fp32": "OpenVINO fp32",
    "openvino_int8": "OpenVINO int8 (QDQ)",
    "ours_auto": "ours auto at the bits (deployable)",
    "ours_bits": "ours bit-serial at the bits",
    "ours_bitserial8": "ours bit-serial 8/8",
    "ours_int8": "ours int8",
}

#: Columns of :func:`write_peers_csv`, in order.
PEERS_COLUMNS = (
    "network", "bits", "act_bits", "engine", "precision", "threads", "latency_ms_median", "latency_ms_iqr",
    "ratio_to_ours_int8", "ratio_to_ort_int8", "accuracy", "accuracy_images", "rounds", "calls_per_round",
    "process", "weights",
)


#: The timing of engines side by side (module docstring). settle_ms: onnxruntime's idle workers
#: at 2 threads slow the next engine for 20-50 ms (measured here); rewarm_ms: the first calls after
#: idling run slow (1.1-1.3 ms against 0.22 ms for torch fp32 at 2 threads, measured here).
PEERS_TIMING = TimingConfig(repeats=30, min_repeat_ms=5.0, warmup=0, settle_ms=50.0, rewarm_ms=2.0, calibration_calls=5)


@dataclass(frozen=True)
class PeersConfig:
    """How the comparison is run (see the module docstring); times in milliseconds."""

    timing: TimingConfig = field(default_factory=lambda: PEERS_TIMING)
    calibration_images: int = 64  # QDQ calibration (ORT's CalibrationDataReader)
    accuracy_images: int = 2000  # first N MNIST test images; 0 skips accuracy
    seed: int = 0


def import_peer_engines():
    """``(onnxruntime, openvino)``, or a one-line :class:`ReleqError` saying what to install."""
    try:
        import onnxruntime
        import openvino
    except ImportError as exc:
        missing = exc.name or "onnxruntime / openvino"
        raise ReleqError(f"bench peers needs onnxruntime and openvino ({missing} is not installed); "
                         f"run: {PEERS_INSTALL}") from None
    return onnxruntime, openvino


def parse_threads(text: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; one line saying what is wrong otherwise."""
    from releq_tvm.config_fields import parse_counts

    return parse_counts(text, "--threads")


#: ``--bits published``: each network's published weight bits (the default when no --bits is given).
PUBLISHED = "published"


def network_bits(network: str, bits=None, act_bits=None, checkpoint: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(weight bits, activation bits) of ``network`` (:func:`releq_tvm.train.network_bits`), where
    ``bits`` :data:`PUBLISHED` is None: the published weight bits."""
    from releq_tvm.train import network_bits as bits_in_force

    if isinstance(bits, str) and bits.strip() == PUBLISHED:
        bits = None
    return bits_in_force(network, bits, act_bits, checkpoint)[:2]


# --------------------------------------------------------------------------------------------
# the builds: ONNX fp32 + QDQ int8 (in memory), our TVM builds


@dataclass
class PeerModels:
    """The float model as ONNX and its static QDQ int8 quantization, both held in memory."""

    onnx_fp32: bytes
    onnx_int8: bytes
    openvino_fp32: object  # openvino.Model read from onnx_fp32
    openvino_int8: object
    calibration: str


@dataclass
class OurBuild:
    """One of our builds: the integer network (the numpy reference) and its compiled library."""

    backend: str
    net: object  # releq_tvm.compile.IntegerNetwork
    compiled: object  # releq_tvm.compile.CompiledNetwork (batch 1)


@dataclass
class PeerBuilds:
    """Every engine's build of one network at one bit configuration, before threads are chosen."""

    network: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    model: torch.nn.Module  # the float model every engine runs
    weights: str  # where the float weights came from
    input_shape: tuple[int, int, int]
    peers: PeerModels
    ours: dict[str, OurBuild]
    target: object  # tvm.target.Target
    checkpoint: str | None = None

    def precision(self, engine: str) -> str:
        """What ``engine`` computes, in a few words (the CSV's ``precision`` column)."""
        if engine in OUR_BUILDS:
            b = self.ours[engine]
            family = "bit-serial" if b.backend == "bitserial" else b.backend
            return f"{family} w {format_bits(b.net.w_bits)} / a {format_bits(b.net.a_bits)}"
        return {
            "torch_fp32": "fp32",
            "ort_fp32": "fp32",
            "ort_int8": "int8 QDQ (per-channel s8 weights, u8 activations)",
            "openvino_fp32": "fp32 (inference precision f32)",
            "openvino_int8": "int8 from the QDQ model",
        }[engine]


def export_onnx(model: torch.nn.Module, input_shape, path) -> None:
    """``model`` (eval) to ONNX opset 17 at batch 1, input ``x``, output ``logits``."""
    import torch

    x = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["logits"])


def quantize_qdq(fp32_path, int8_path, images: torch.Tensor) -> None:
    """Static QDQ quantization of an ONNX model: per-channel QInt8 weights, QUInt8 activations,
    activation ranges calibrated (MinMax) on ``images`` fed one at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class ImageReader(CalibrationDataReader):
        def __init__(self):
            self._images = iter(images.detach().cpu().numpy().astype(np.float32))

        def get_next(self):
            image = next(self._images, None)
            return None if image is None else {"x": np.ascontiguousarray(image[None])}

    prepared = Path(fp32_path).with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))  # shape inference + folding, as ORT's docs ask
    quantize_static(str(prepared), str(int8_path), ImageReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def build_peer_models(model: torch.nn.Module, input_shape, calibration: torch.Tensor, calibration_text: str) -> PeerModels:
    """Export, quantize and read the peers' models in a temporary folder that is removed after."""
    _, openvino = import_peer_engines()
    core = openvino.Core()
    with tempfile.TemporaryDirectory(prefix="releq-tvm-peers-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, input_shape, fp32)
        quantize_qdq(fp32, int8, calibration)
        return PeerModels(
            onnx_fp32=fp32.read_bytes(), onnx_int8=int8.read_bytes(),
            openvino_fp32=core.read_model(str(fp32)), openvino_int8=core.read_model(str(int8)),
            calibration=calibration_text,
        )


def build_peers(network: str, w_bits=None, a_bits=None, config: PeersConfig = PeersConfig(),
                checkpoint: str | None = None, target=None, progress=None, like: PeerBuilds | None = None) -> PeerBuilds:
    """Build every engine of :data:`ENGINES` for ``network`` at ``w_bits`` / ``a_bits`` (default:
    published bits / 8): the float model, its ONNX and QDQ models, and our TVM builds. ``like``
    (builds of the same network at other bits) lends its float model and the peers' models,
    which do not depend on our bits."""
    from releq_tvm.compile import compile_network, quantize_network, resolve_target
    from releq_tvm.compile.integer import calibration_images, load_network_model
    from releq_tvm.networks import get_network_spec
    from releq_tvm.quant import remove_act_bits

    import_peer_engines()
    say = progress or (lambda message: None)
    w, a = network_bits(network, w_bits, a_bits, checkpoint)
    target = resolve_target(target)
    input_shape = tuple(get_network_spec(network).input_shape)
    if like is not None and like.network == network:
        model, weights, peers = like.model, like.weights, like.peers
        trained = model
    else:
        trained, weights = load_network_model(network, checkpoint, seed=config.seed)
        trained = trained.eval()
        # the float network every other engine runs: a fine-tuned file's learned input quantizers
        # belong to its own bits, so the peers, torch and our 8-bit builds go without them
        model = remove_act_bits(copy.deepcopy(trained))
        say(f"{network}: export to ONNX, QDQ int8 calibrated on {config.calibration_images} images")
        images, images_text = calibration_images(network, count=config.calibration_images, seed=config.seed)
        peers = build_peer_models(model, input_shape, images, images_text)

    bits = {"bits": (w, a), "eight": ((BITS_MAX,) * len(w), (BITS_MAX,) * len(w))}
    nets: dict[str, object] = {}
    ours: dict[str, OurBuild] = {}
    for engine, (backend, which) in OUR_BUILDS.items():
        if which not in nets:  # the compile stage's quantization: same weights, its calibration images
            nets[which] = quantize_network(network, *bits[which], model=trained if which == "bits" else model,
                                           seed=config.seed)
        say(f"{network}: compile {engine} ({backend}, w {format_bits(bits[which][0])})")
        ours[engine] = OurBuild(backend, nets[which], compile_network(nets[which], backend, 1, target))
    return PeerBuilds(network, w, a, model, weights, input_shape, peers, ours, target, checkpoint)


# --------------------------------------------------------------------------------------------
# engines at a thread count


@dataclass
class Engine:
    """One engine ready to run at batch 1 (see the module docstring for what ``call`` times)."""

    name: str
    infer: Callable[[np.ndarray], np.ndarray]  # float32 images (1, C, H, W) in [0, 1] -> logits (1, classes)
    call: Callable[[], object]  # one inference on a prepared input: the timed unit
    keep: list = field(default_factory=list, repr=False)  # sessions the closures use


def _torch_engine(model: torch.nn.Module, x: np.ndarray) -> Engine:
    import torch

    xt = torch.from_numpy(x)

    def infer(images):
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(images, np.float32))).numpy()

    def call():
        with torch.inference_mode():
            return model(xt)

    return Engine("torch_fp32", infer, call)


def _ort_engine(name: str, onnx_bytes: bytes, threads: int, x: np.ndarray) -> Engine:
    onnxruntime, _ = import_peer_engines()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    return Engine(name, lambda images: session.run(None, {"x": np.ascontiguousarray(images, np.float32)})[0],
                  lambda: session.run(None, feed), [session])


def _openvino_engine(name: str, model, threads: int, x: np.ndarray) -> Engine:
    _, openvino = import_peer_engines()
    compiled = openvino.Core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
    })
    request = compiled.create_infer_request()

    def infer(images):
        return np.array(request.infer({0: np.ascontiguousarray(images, np.float32)})[0])

    return Engine(name, infer, lambda: request.infer({0: x}), [compiled, request])


def _our_engine(name: str, build: OurBuild, x: np.ndarray) -> Engine:
    import tvm
    from tvm import relax

    from releq_tvm.kernels.target import pin_tvm_threads

    c = build.compiled
    device = tvm.cpu()
    pin_tvm_threads()
    vm = relax.VirtualMachine(c.executable, device)
    main = vm["main"]
    levels = tvm.runtime.tensor(c.quantize_input(x), device)

    def infer(images):
        out = main(tvm.runtime.tensor(c.quantize_input(images), device))
        return out.numpy().astype(np.float64) * float(c.manifest["output_scale"])

    return Engine(name, infer, lambda: main(levels), [vm])


def _peer_makers(models: PeerModels, model: torch.nn.Module, threads: int, x: np.ndarray) -> dict[str, Callable[[], Engine]]:
    return {
        "torch_fp32": lambda: _torch_engine(model, x),
        "ort_fp32": lambda: _ort_engine("ort_fp32", models.onnx_fp32, threads, x),
        "ort_int8": lambda: _ort_engine("ort_int8", models.onnx_int8, threads, x),
        "openvino_fp32": lambda: _openvino_engine("openvino_fp32", models.openvino_fp32, threads, x),
        "openvino_int8": lambda: _openvino_engine("openvino_int8", models.openvino_int8, threads, x),
    }


def _seeded_input(input_shape) -> np.ndarray:
    import torch

    return torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)).numpy()


def open_engines(builds: PeerBuilds, threads: int, engines: Sequence[str] = ENGINES) -> dict[str, Engine]:
    """The engines of ``builds`` at ``threads`` threads (fresh peer sessions; torch's thread count
    set). TVM's pool is resized separately (:func:`set_tvm_threads`): it is global to the thread."""
    import torch

    x = _seeded_input(builds.input_shape)
    torch.set_num_threads(threads)
    makers = _peer_makers(builds.peers, builds.model, threads, x)
    makers.update({name: (lambda name=name: _our_engine(name, builds.ours[name], x)) for name in builds.ours})
    return {name: makers[name]() for name in engines if name in makers}


#: The peers fig8 times beside our builds (``releq-tvm report``): onnxruntime fp32 stands beside
#: TVM's untuned fp32, and the two int8 engines a user would deploy.
FIG8_PEERS = ("ort_fp32", "ort_int8", "openvino_int8")


def peer_engines(network: str, model: torch.nn.Module, threads: int, engines: Sequence[str] = FIG8_PEERS,
                 config: PeersConfig = PeersConfig()) -> dict[str, Engine]:
    """Peer ``engines`` of ``network``'s float ``model`` at batch 1 and ``threads`` threads, ready
    to be timed beside our builds (QDQ calibrated as for ``bench peers``)."""
    from releq_tvm.compile.integer import calibration_images
    from releq_tvm.networks import get_network_spec

    input_shape = tuple(get_network_spec(network).input_shape)
    images, images_text = calibration_images(network, count=config.calibration_images, seed=config.seed)
    makers = _peer_makers(build_peer_models(model.eval(), input_shape, images, images_text), model, threads,
                          _seeded_input(input_shape))
    return {name: makers[name]() for name in engines}


def _tvm_thread_funcs():
    import tvm

    return tvm.get_global_func("runtime.NumThreads"), tvm.get_global_func("runtime.config_threadpool")


def set_tvm_threads(threads: int) -> bool:
    """Resize this thread's TVM runtime pool to ``threads`` and set ``TVM_NUM_THREADS`` to match (TVM
    reads it on every parallel loop: :func:`releq_tvm.kernels.target.pin_tvm_threads`); False,
    and the variable untouched, when the pool is smaller."""
    num_threads, config_threadpool = _tvm_thread_funcs()
    config_threadpool(1, threads)  # 1 = kBig: the affinity mode TVM's pool starts with
    if int(num_threads()) != threads:
        return False
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return True


# --------------------------------------------------------------------------------------------
# timing and accuracy


def time_engines(engines: dict[str, Engine], config: PeersConfig, progress=None) -> dict[str, dict]:
    """Median / IQR (ms) of each engine's call, side by side (the module docstring's protocol)."""
    samplers = {name: CallSampler(e.call, config.timing) for name, e in engines.items()}
    return interleaved_timing(samplers, config.timing, progress)


def accuracy_data(builds: PeerBuilds, count: int):
    """(images, labels) of the first ``count`` MNIST test images, or None when accuracy means
    nothing here (not an MNIST network, random weights, or ``count`` 0)."""
    from releq_tvm.networks import get_network_spec

    if count <= 0 or get_network_spec(builds.network).dataset != "mnist" or builds.weights.startswith("random"):
        return None
    from releq_tvm.data import load_dataset

    data = load_dataset("mnist", "test", limit=count)
    return data.images.numpy(), data.labels.numpy()


def engine_accuracy(engines: dict[str, Engine], images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy (%) of each engine, one image per call (the models have batch 1)."""
    out = {}
    for name, engine in engines.items():
        predicted = np.array([int(np.argmax(engine.infer(images[i : i + 1]))) for i in range(len(images))])
        out[name] = 100.0 * float(np.mean(predicted == labels))
    return out


# --------------------------------------------------------------------------------------------
# the comparison


def measure_peers(builds: PeerBuilds, threads: Sequence[int] = (1,), config: PeersConfig = PeersConfig(),
                  engines: Sequence[str] = ENGINES, progress=None, allow_child: bool = True) -> list[dict]:
    """Time every engine of ``builds`` at each thread count (and their accuracy); one row per
    (engine, threads), columns :data:`PEERS_COLUMNS`.

    ``ratio_to_ours_int8`` / ``ratio_to_ort_int8`` are the engine's median latency over that
    engine's median at the same thread count (above 1: slower). TVM's pool is resized in place
    when it can be, else that thread count runs in a child process (module docstring; with
    ``allow_child`` False, a :class:`ReleqError`); torch's thread count and TVM's pool size are
    put back afterwards.
    """
    import torch

    say = progress or (lambda message: None)
    threads = tuple(threads)
    torch_before = torch.get_num_threads()
    env_before = os.environ.get("TVM_NUM_THREADS")
    if env_before is None:  # read once, when TVM's pool is created; a pool that already exists keeps its size
        os.environ["TVM_NUM_THREADS"] = str(max(threads))
    num_threads, _ = _tvm_thread_funcs()
    tvm_before = int(num_threads())
    try:
        accuracy: dict[str, float] = {}
        data = accuracy_data(builds, config.accuracy_images)
        if data is not None:
            say(f"{builds.network}: accuracy on the first {len(data[1])} MNIST test images")
            accuracy = engine_accuracy(open_engines(builds, 1, engines), *data)
        rows = []
        for k in threads:
            if set_tvm_threads(k):
                say(f"{builds.network}: {config.timing.repeats} interleaved rounds at {k} thread(s)")
                opened = open_engines(builds, k, engines)
                timings = time_engines(opened, config, say)
                process = "this process"
            elif not allow_child:
                raise ReleqError(f"TVM's runtime pool has {int(num_threads())} thread(s), fewer than {k}; "
                                 f"set TVM_NUM_THREADS={k} before the first TVM call")
            else:
                say(f"{builds.network}: TVM's pool has {int(num_threads())} thread(s); {k} threads run in a child process")
                timings = _timings_in_child(builds, k, config, engines)
                process = f"child process (TVM_NUM_THREADS={k})"
            rows += _rows(builds, k, timings, accuracy, process, data)
        return rows
    finally:
        torch.set_num_threads(torch_before)
        set_tvm_threads(tvm_before)
        if env_before is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = env_before


def _rows(builds: PeerBuilds, threads: int, timings: dict, accuracy: dict, process: str, data) -> list[dict]:
    def ratio(name, ref):
        return timings[name]["median_ms"] / timings[ref]["median_ms"] if ref in timings else None

    return [{
        "network": builds.network, "bits": format_bits(builds.w_bits), "act_bits": format_bits(builds.a_bits),
        "engine": name, "precision": builds.precision(name), "threads": threads,
        "latency_ms_median": t["median_ms"], "latency_ms_iqr": t["iqr_ms"],
        "ratio_to_ours_int8": ratio(name, "ours_int8"), "ratio_to_ort_int8": ratio(name, "ort_int8"),
        "accuracy": accuracy.get(name), "accuracy_images": len(data[1]) if data is not None else None,
        "rounds": t["repeats"], "calls_per_round": t["calls_per_sample"], "process": process, "weights": builds.weights,
    } for name, t in timings.items()]


def child_command(builds: PeerBuilds, threads: int, config: PeersConfig, json_path) -> list[str]:
    """The hidden child invocation that times ``builds`` at ``threads`` and writes JSON timings."""
    from releq_tvm.compile.target import describe_target

    cmd = [sys.executable, "-m", "releq_tvm", "bench", "peers", builds.network,
           "--bits", format_bits(builds.w_bits), "--act-bits", format_bits(builds.a_bits),
           "--threads", str(threads), "--rounds", str(config.timing.repeats), "--accuracy-images", "0",
           "--target", describe_target(builds.target), "--child-json", str(json_path)]
    if builds.checkpoint:
        cmd += ["--checkpoint", builds.checkpoint]
    return cmd


def _timings_in_child(builds: PeerBuilds, threads: int, config: PeersConfig, engines: Sequence[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="releq-tvm-peers-child-") as tmp:
        path = Path(tmp) / "timings.json"
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        done = subprocess.run(child_command(builds, threads, config, path), env=env, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ReleqError(f"the child process timing {builds.network} at {threads} threads failed: {last}")
        timings = json.loads(path.read_text(encoding="utf-8"))
    return {name: timings[name] for name in engines if name in timings}


def write_child_timings(rows: list[dict], path) -> None:
    """The child's answer to :func:`_timings_in_child`: timings by engine, as JSON."""
    from releq_tvm.io import atomic_write_text

    timings = {r["engine"]: {"median_ms": r["latency_ms_median"], "iqr_ms": r["latency_ms_iqr"], "repeats": r["rounds"],
                             "calls_per_sample": r["calls_per_round"]} for r in rows}
    atomic_write_text(path, json.dumps(timings))


# --------------------------------------------------------------------------------------------
# results: CSV with provenance, grouped bars, a table for the terminal


def peers_command(networks: Sequence[str], bits_list: Sequence = (None,), act_bits=None,
                  threads: Sequence[int] = DEFAULT_THREADS, rounds: int = PEERS_TIMING.repeats,
                  out: str = "results/peers.csv", checkpoint: str | None = None) -> str:
    """The explicit command that remakes a peers CSV (written into its header)."""
    parts = ["releq-tvm", "bench", "peers", *networks]
    for bits in bits_list:
        if bits is None and len(bits_list) > 1:
            bits = PUBLISHED
        if bits is not None:
            parts += ["--bits", bits if isinstance(bits, str) else format_bits(bits)]
    if act_bits is not None:
        parts += ["--act-bits", act_bits if isinstance(act_bits, str) else format_bits(act_bits)]
    parts += ["--threads", ",".join(map(str, threads)), "--rounds", str(rounds), "--out", str(out)]
    if checkpoint is not None:
        parts += ["--checkpoint", str(checkpoint)]
    return " ".join(parts)


def network_note(builds: PeerBuilds, load: tuple[float, float] | None = None) -> str:
    """One ``# note:`` line saying where a network's weights and calibration images came from,
    and the machine's 1-minute load average before and after timing it (``load``): on a machine
    shared with other jobs, multi-threaded numbers measure the contention too."""
    calibrations = "; ".join(dict.fromkeys(b.net.calibration for b in builds.ours.values()))
    text = (f"{builds.network} at w {format_bits(builds.w_bits)} / a {format_bits(builds.a_bits)}: "
            f"weights {builds.weights}; QDQ calibration {builds.peers.calibration}; "
            f"our builds calibrated on {calibrations}")
    if load is not None:
        text += f"; 1-minute load average {load[0]:.2f} before timing, {load[1]:.2f} after"
    return text


def peers_notes(config: PeersConfig, target, network_notes: Sequence[str] = ()) -> list[str]:
    """The ``# note:`` lines of a peers CSV: target, peer versions, engines, protocol, data."""
    from releq_tvm.compile.target import describe_target
    from releq_tvm.report.provenance import package_version

    peers = "; ".join(f"{name} {package_version(name)}" for name in ("onnxruntime", "openvino", "onnx"))
    return [
        f"llvm target: {describe_target(target)}",
        f"peer versions: {peers}",
        "engines: " + "; ".join(f"{name} = {ENGINE_LABELS[name]}" for name in ENGINES),
        "batch 1; ONNX opset 17 (TorchScript exporter); QDQ = onnxruntime quantize_static, per-channel QInt8 weights, "
        "QUInt8 activations, MinMax calibration; OpenVINO: PERFORMANCE_HINT LATENCY, INFERENCE_PRECISION_HINT f32, "
        "int8 from the same QDQ model; ours: releq_tvm.compile.compile_network",
        f"timing: {timing_note(config.timing)}; ratio_to_X = median / X's median at the same threads (above 1: slower)",
        "threads: onnxruntime intra_op (inter_op 1, sequential), OpenVINO INFERENCE_NUM_THREADS, "
        "torch.set_num_threads, TVM runtime pool (TVM_NUM_THREADS, resized in place)",
        f"accuracy: top-1 % on the first {config.accuracy_images} MNIST test images, one image per call, for MNIST "
        "networks with trained weights (empty otherwise); our builds are not fine-tuned at their bits",
        *network_notes,
    ]


def write_peers_csv(rows: Sequence[dict], path, command: str, notes: Sequence[str] = ()) -> None:
    """Rows (:data:`PEERS_COLUMNS`) under the project's provenance header, written atomically."""
    from releq_tvm.io import atomic_write_text
    from releq_tvm.report.provenance import Provenance
    from releq_tvm.report.tables import csv_text

    atomic_write_text(path, csv_text(PEERS_COLUMNS, rows, Provenance(command=command).header_lines(notes)))


def peers_png(rows: Sequence[dict]) -> bytes:
    """Grouped bars: median latency (log scale) per engine, one bar per thread count, one panel
    per network and bits."""
    from releq_tvm.report.plots import PALETTE, figure, png_bytes

    configs = list(dict.fromkeys((r["network"], r["bits"], r["act_bits"]) for r in rows))
    threads = sorted({int(r["threads"]) for r in rows})
    fig, axes = figure(max(7.0, 1.0 * len(ENGINES)), 3.8 * len(configs), len(configs), 1, squeeze=False)
    for ax, (network, bits, act_bits) in zip(axes[:, 0], configs):
        mine = [r for r in rows if (r["network"], r["bits"], r["act_bits"]) == (network, bits, act_bits)]
        engines = [e for e in dict.fromkeys(r["engine"] for r in mine)]
        width = 0.8 / len(threads)
        for j, (k, colour) in enumerate(zip(threads, PALETTE)):
            by_engine = {r["engine"]: float(r["latency_ms_median"]) for r in mine if int(r["threads"]) == k}
            xs = [i + (j - (len(threads) - 1) / 2) * width for i in range(len(engines))]
            values = [by_engine.get(e, float("nan")) for e in engines]
            ax.bar(xs, values, width, color=colour, edgecolor="black", linewidth=0.5, label=f"{k} thread{'s' * (k > 1)}")
            for x, v in zip(xs, values):
                if math.isfinite(v):
                    ax.text(x, v * 1.05, f"{v:.3g}", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_yscale("log")
        ax.set_xticks(range(len(engines)))
        ax.set_xticklabels([ENGINE_LABELS.get(e, e) for e in engines], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("median latency, ms (log)")
        ax.set_title(f"{network}: w {bits} / a {act_bits}, batch 1", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=8)
        top = max((float(r["latency_ms_median"]) for r in mine), default=1.0)
        ax.set_ylim(top=top * 4)
    return png_bytes(fig)


def format_peers_table(rows: Sequence[dict]) -> str:
    """The rows as a fixed-width table for the terminal."""
    lines = [f"{'network':<9} {'bits':<16} {'engine':<16} {'thr':>3} {'median ms':>10} {'iqr ms':>8} "
             f"{'/ours int8':>10} {'/ort int8':>9} {'acc %':>6}"]
    for r in rows:
        acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        ours = "" if r.get("ratio_to_ours_int8") is None else f"{r['ratio_to_ours_int8']:.2f}"
        ort = "" if r.get("ratio_to_ort_int8") is None else f"{r['ratio_to_ort_int8']:.2f}"
        bits = r["bits"] if len(r["bits"]) <= 16 else r["bits"][:13] + "..."
        lines.append(f"{r['network']:<9} {bits:<16} {r['engine']:<16} {r['threads']:>3} {r['latency_ms_median']:>10.4f} "
                     f"{r['latency_ms_iqr']:>8.4f} {ours:>10} {ort:>9} {acc:>6}")
    return "\n".join(lines)


def run_peers(networks: Sequence[str] = DEFAULT_NETWORKS, bits_list: Sequence = (None,), act_bits=None,
              threads: Sequence[int] = DEFAULT_THREADS, config: PeersConfig = PeersConfig(), out="results/peers.csv",
              checkpoint: str | None = None, target=None, command: str | None = None, progress=None) -> list[dict]:
    """Build, time and write: ``out`` (CSV with provenance) and the PNG beside it; returns the rows.

    Every network is run at every weight-bit configuration of ``bits_list`` (each text such as
    ``"8,2,2,3,2"`` or ints, one value meaning every layer; None: the network's published bits),
    with ``act_bits`` (default 8 everywhere). The peers' models are built once per network.
    """
    from releq_tvm.compile import resolve_target
    from releq_tvm.io import atomic_write_bytes

    import_peer_engines()
    target = resolve_target(target)
    bits_list = list(bits_list) or [None]
    # every error before any build
    resolved = {network: list(dict.fromkeys(network_bits(network, bits, act_bits, checkpoint) for bits in bits_list))
                for network in networks}
    rows, notes = [], []
    for network, configs in resolved.items():
        builds = None
        for w, a in configs:
            builds = build_peers(network, w, a, config, checkpoint, target, progress, like=builds)
            load_before = os.getloadavg()[0]
            rows += measure_peers(builds, threads, config, progress=progress)
            notes.append(network_note(builds, (load_before, os.getloadavg()[0])))
        del builds  # the next network's builds need the memory more
    command = command or peers_command(networks, bits_list, act_bits, threads, config.timing.repeats, out,
                                         checkpoint)
    write_peers_csv(rows, out, command, peers_notes(config, target, notes))
    atomic_write_bytes(Path(out).with_suffix(".png"), peers_png(rows))
    return rows
