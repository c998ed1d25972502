"""The Python API: :func:`search`, :func:`compile` and :func:`simulate` a network from a script or a notebook.

Each takes ``model`` in any of the forms the command line takes, and one more:

* a registered network's name (``"lenet"``; ``releq-tvm networks`` lists them);
* a torch ``nn.Module`` with ``input_shape=(C, H, W)``: registered, for this process, under
  ``name`` (default: its class name in lower case) with its weights as they are at the call;
* a path to a ``.onnx`` or ``.pt2`` file, or an entry point ``"package.module:function"``
  (``--model``; see the README's "Your own model").

Each returns a frozen dataclass (:class:`SearchResult`, :class:`CompileResult`,
:class:`SimulateResult`), never a dict. Anything the caller can fix (an unknown name, bits that do
not fit the network, a model that cannot be compiled) raises :class:`releq_tvm.errors.ReleqError`
with a one-line message. The commands ``releq-tvm compile`` and ``simulate`` run the same code:
``compile`` calls :func:`compile`, and both :func:`simulate` and ``simulate`` call
:func:`releq_tvm.sim.run.simulate_network`, as :func:`search` and ``search`` call
:func:`releq_tvm.search.run.run_search`.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Union

from releq_tvm.errors import ReleqError

if TYPE_CHECKING:  # the API imports torch, TVM and the simulator only when a function runs
    import torch
    from torch import nn

    from releq_tvm.compile.measure import NetworkComparison
    from releq_tvm.data import TensorDataset
    from releq_tvm.sim.stripes import LayerResult, SimResult

#: A network: a registered name, an ``nn.Module``, a .onnx / .pt2 path or ``"package.module:function"``.
Model = Union[str, os.PathLike, "nn.Module"]
#: Bits per weight layer: one value for every layer (``4``, ``"4"``), a list, or text like ``"8,2,2,3,2"``.
Bits = Union[int, str, Sequence[int]]
#: Images (N, C, H, W) float in [0, 1] with labels (N,): a :class:`releq_tvm.data.TensorDataset` or a pair.
Data = Union["TensorDataset", tuple["torch.Tensor", "torch.Tensor"]]


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class SearchResult:
    """A finished ReLeQ search (its files: :mod:`releq_tvm.search.run_files`).

    ``accuracy`` is in percent: the test accuracy of the chosen bits after the long fine-tune
    when one ran (``accuracy_split == "test"``), else the val accuracy after the short fine-tune
    (``"val"``), or None when the search scored cost only (``accuracy="none"``).
    ``full_precision_accuracy`` is the float model's on the same split. ``cost_ratio`` is the
    chosen bits' cost over the same network at 8 bits (below 1: cheaper).
    """

    network: str
    run_dir: Path
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...] | None  # None: activations were not searched
    accuracy: float | None  # percent
    accuracy_split: str | None  # "test", "val" or None
    full_precision_accuracy: float | None  # percent, same split as accuracy
    cost_ratio: float  # x / 8-bit
    reward: float
    converged_episode: int | None  # None: the policy did not meet the convergence test
    training_episodes: int
    model_file: Path | None  # the long fine-tune's model (compile it with checkpoint=); None: none ran

    @property
    def best_json(self) -> Path:
        """The run's summary file, which this result is read from."""
        return self.run_dir / "best.json"


@dataclass(frozen=True)
class CompileResult:
    """A network compiled into ``out_dir`` (``net.so`` + ``manifest.json``; load it with
    :func:`releq_tvm.compile.load_compiled`), and its latency when it was measured.

    ``layer_kernels`` is the kernel family each weight layer got (``bitserial``, ``int8``,
    ``lut``). Times are in seconds (``*_seconds``) or milliseconds (``*_ms``).
    """

    network: str
    out_dir: Path
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    kernels: str  # the policy asked for: auto, bitserial or int8
    layer_kernels: tuple[str, ...]
    weights: str  # where the weights came from
    frac_bits: int  # fractional bits of the fixed-point requantization
    target: Mapping  # the TVM target as JSON
    compile_seconds: float
    seconds: float  # the whole call, measurement included
    measurement: NetworkComparison | None = None  # None: measure=False

    @property
    def files(self) -> tuple[Path, Path]:
        return self.out_dir / "net.so", self.out_dir / "manifest.json"

    @property
    def _build(self) -> str:
        """The label, in :class:`NetworkComparison`, of the build this artifact is."""
        return {"auto": "auto", "bitserial": "bits", "int8": "int8"}[self.kernels]

    @property
    def measured_ms(self) -> float | None:
        """Median whole-network latency of this build, ms per call of ``batch`` images (None: not timed;
        ``kernels="auto"`` and ``"int8"`` are timed with ``baselines=True`` only)."""
        m = self.measurement
        return None if m is None else m.network_ms.get(self._build)

    @property
    def predicted_ms(self) -> float | None:
        """Latency predicted from the standalone kernels of this build plus the network's fixed
        cost outside them (what the latency table and the search's cost ratio assume), ms."""
        m = self.measurement
        if m is None or self._build not in m.sum_of_layers_ms:
            return None
        return m.sum_of_layers_ms[self._build] + m.fixed_ms


@dataclass(frozen=True)
class SimulateResult:
    """A network on the Stripes accelerator at the chosen bits against the same accelerator at 8 bits.

    Cycles are accelerator clock cycles for one image; ``speedup`` is ``cycles_8bit / cycles``
    and ``energy_reduction`` the 8-bit energy over the energy at the bits. ``alternative`` is the
    run with the other fully-connected setting (weights mode with dense layers), else None.
    """

    network: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    mode: str  # "weights" (ReLeQ: weights serial) or "activations" (Stripes as published)
    fc_serial: bool
    cycles: int
    cycles_8bit: int
    stall_cycles: int
    speedup: float
    energy_reduction: float
    layers: tuple[LayerResult, ...]
    notes: tuple[str, ...]
    sim: SimResult  # everything the simulator computed (energy parts, the config in force)
    alternative: SimResult | None = None


# ---------------------------------------------------------------------------------------------
# the model argument


def resolve_model(model: Model, input_shape: Sequence[int] | None = None, name: str | None = None) -> str:
    """The registered name of ``model`` (see the module docstring), registering and checking it
    first when it is not a registered name; an unsupported operator fails here, before any work."""
    from torch import nn

    from releq_tvm.cli_options import resolve_network
    from releq_tvm.networks import (
        MissingCheckpointError, ModelSourceError, UnknownNetworkError, get_network_spec, list_networks,
    )

    try:
        if isinstance(model, nn.Module):
            return _register_module(model, input_shape, name)
        if name is not None:
            raise ReleqError(f"name= names an nn.Module; {model} is named by itself")
        if isinstance(model, str) and (model in list_networks() or not _looks_like_source(model)):
            get_network_spec(model)  # an unknown name lists the registered ones
            if input_shape is not None:
                raise ReleqError(f"input_shape goes with an nn.Module or a model file; {model}'s input shape is known")
            return model
        if isinstance(model, (str, os.PathLike)):
            return resolve_network(None, os.fspath(model), _shape_text(input_shape) if input_shape else None)
    except (UnknownNetworkError, MissingCheckpointError, ModelSourceError) as exc:
        raise ReleqError(str(exc)) from None
    raise ReleqError(f"model must be a network name, an nn.Module, a .onnx or .pt2 path or 'package.module:function'; "
                     f"got a {type(model).__name__}")


def _looks_like_source(text: str) -> bool:
    return ":" in text or Path(text).suffix.lower() in (".onnx", ".pt2") or Path(text).exists()


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(s) for s in shape)


def _register_module(model: nn.Module, input_shape: Sequence[int] | None, name: str | None) -> str:
    """Register a copy of ``model`` (its weights as they are now) under ``name`` and check that its
    operators compile; a later call with the same name replaces it."""
    from releq_tvm.cli_options import parse_input_shape
    from releq_tvm.compile.graph import extract_graph
    from releq_tvm.networks import create_network
    from releq_tvm.networks.user_model import ModelSourceError, register_model_object

    name = name or type(model).__name__.lower()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ReleqError(f"name {name!r} must be letters, digits, '_', '.' or '-' (it names run folders and files)")
    if input_shape is None:
        raise ReleqError(f"an nn.Module states no input shape; pass input_shape=(C, H, W), e.g. (1, 28, 28), for {name}")
    shape = parse_input_shape(_shape_text(input_shape))
    snapshot = copy.deepcopy(model).eval()
    what = f"nn.Module {type(model).__qualname__}"
    try:
        register_model_object(name, snapshot, shape, what, f"user model: an {what} (Python API)")
    except ModelSourceError:  # does not run at input_shape, or gives no logits
        raise
    except ValueError:  # the name is taken by a registered network
        raise ReleqError(f"{name} is a registered network's name; pass name= another name for your {what}") from None
    extract_graph(create_network(name), shape, name)  # an unsupported operator fails here
    return name


# ---------------------------------------------------------------------------------------------
# compile


def compile(
    model: Model,
    bits: Bits | None = None,
    act_bits: Bits | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    calibration: torch.Tensor | None = None,
    kernels: str = "auto",
    target: str | dict | None = None,
    rpc: str | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    batch: int = 1,
    repeats: int = 7,
    measure: bool = True,
    baselines: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CompileResult:
    """Quantize ``model`` to integers at ``bits`` / ``act_bits``, compile it with TVM for an x86 CPU
    into ``out_dir`` and, with ``measure``, time it (what ``releq-tvm compile`` does).

    ``bits`` (weights) and ``act_bits`` (each weight layer's input, the first one's being the image):
    one value for every layer or one per layer; None takes a fine-tuned ``checkpoint``'s bits, else
    the published bits (weights) and 8 (activations). A model that is not registered has no
    published bits. ``checkpoint``: a float state_dict or a fine-tuned model file (a search run's
    ``finetuned.pt``, :attr:`SearchResult.model_file`), whose learned clipping levels the build
    keeps. ``calibration``: images (N, C, H, W) in [0, 1] that set the other activation ranges
    (default: the network's training images for MNIST networks, else seeded uniform noise).
    ``kernels``: ``auto`` (per layer the fastest of bit-serial, int8 and lut on this machine),
    ``bitserial`` or ``int8``. ``target``: host (None), a CPU name, ``llvm -mcpu=...`` or a JSON
    target (default with ``rpc`` / ``rpc_tracker``: the remote device's CPU). ``rpc``: ``HOST:PORT`` of a
    TVM RPC server to time on; or ``rpc_tracker`` (``HOST:PORT``) and ``rpc_key``: time on a device of
    that key which the TVM RPC tracker hands out. ``batch``: images per call.
    ``repeats``: timing samples per measurement. ``baselines``: also time the int8, auto and fp32
    builds (:attr:`CompileResult.measurement`; ``releq_tvm.report.fidelity.write_fidelity_csv``
    writes it as ``--fidelity-csv`` does). ``progress`` receives one line per step. ``out_dir``
    defaults to ``runs/compile/<net>-<bits>``.
    """
    from releq_tvm.bits import format_bits, parse_bits
    from releq_tvm.compile.artifact import compile_network
    from releq_tvm.compile.integer import quantize_network
    from releq_tvm.compile.measure import measure_network
    from releq_tvm.compile.target import resolve_target
    from releq_tvm.compile.timing import Runner
    from releq_tvm.config_fields import check_rpc_options
    from releq_tvm.networks import get_network_spec, layer_table

    check_rpc_options(rpc, rpc_tracker, rpc_key)
    network = resolve_model(model, input_shape, name)
    if kernels not in ("auto", "bitserial", "int8"):
        raise ReleqError(f"kernels must be auto, bitserial or int8; got {kernels!r}")
    n = len(layer_table(network))
    if bits is None and checkpoint is None and get_network_spec(network).published_bits is None:
        raise ReleqError(f"{network} has no published bitwidths; pass --bits with {n} values (one value = all layers)")
    w_bits = parse_bits(_bits_value(bits), n, network) if bits is not None else None  # None: the checkpoint's or published
    a_bits = parse_bits(_bits_value(act_bits), n, network, what="--act-bits") if act_bits is not None else None
    remote = bool(measure and (rpc or rpc_tracker))
    runner = Runner(rpc, rpc_tracker, rpc_key) if remote else Runner()
    target = resolve_target(runner.target() if remote and target is None else target)
    say = progress or (lambda message: None)

    started = time.perf_counter()
    net = quantize_network(network, w_bits, a_bits, checkpoint=None if checkpoint is None else os.fspath(checkpoint),
                           calibration=calibration)
    say(f"quantized {network} to integers (w {format_bits(net.w_bits)}, a {format_bits(net.a_bits)}); "
        "lower to Relax and compile")
    t0 = time.perf_counter()
    compiled = compile_network(net, kernels, batch, target)
    compile_seconds = time.perf_counter() - t0
    out = Path(out_dir) if out_dir else Path("runs") / "compile" / f"{network}-{format_bits(net.w_bits).replace(',', '')}"
    compiled.export(out)
    measurement = None
    if measure:
        # "bits" is the pure bit-serial build at the bits (the paper's comparison): reuse ours if it is one
        reuse = compiled if (kernels == "bitserial" and not remote) else None
        measurement = measure_network(network, net.w_bits, net.a_bits, repeats=repeats, target=target, batch=batch,
                                      baselines=baselines, runner=runner, compiled=reuse, model=net.model, progress=say)
    return CompileResult(
        network=network,
        out_dir=out,
        w_bits=tuple(net.w_bits),
        a_bits=tuple(net.a_bits),
        kernels=kernels,
        layer_kernels=tuple(layer["family"] for layer in compiled.manifest["layers"]),
        weights=net.weights_source,
        frac_bits=net.frac_bits,
        target=compiled.manifest["machine"]["target"],
        compile_seconds=compile_seconds,
        seconds=time.perf_counter() - started,
        measurement=measurement,
    )


def _bits_value(bits: Bits) -> str | Sequence[int]:
    """What :func:`releq_tvm.bits.parse_bits` reads: text or a sequence (one int is one value for all)."""
    return (int(bits),) if isinstance(bits, int) else bits


# ---------------------------------------------------------------------------------------------
# simulate


def simulate(
    model: Model,
    bits: Bits | None = None,
    act_bits: Bits | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
    mode: str = "weights",
    fc_serial: bool = True,
    overrides: Mapping[str, str | float] | None = None,
    method: str = "stepped",
    checkpoint: str | os.PathLike | None = None,
) -> SimulateResult:
    """Simulate ``model`` on the Stripes bit-serial accelerator at ``bits`` / ``act_bits`` against the
    same accelerator at 8 bits (what ``releq-tvm simulate`` does).

    ``bits`` None takes the published bits (a model that is not registered has none); ``act_bits``
    None is 8 for every layer. ``mode``: ``weights`` (weights bit-serial, ReLeQ) or ``activations``
    (Stripes as published). ``fc_serial``: in weights mode, fully connected layers run
    weights-serial (else at the bit-parallel DaDN rate; the other setting is in ``alternative``).
    ``overrides``: Stripes constants by name (``{"nbin_width_bits": 256}``; see
    :mod:`releq_tvm.sim.config`). ``method``: ``stepped`` (counts stalls) or ``closed`` (closed form).
    ``checkpoint``: a fine-tuned model file (a search's ``model_file``): with ``bits`` / ``act_bits``
    None, the bits it was fine-tuned at are simulated.
    """
    from releq_tvm.sim.config import MODES
    from releq_tvm.sim.run import simulate_network

    network = resolve_model(model, input_shape, name)
    if mode not in MODES:
        raise ReleqError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if method not in ("stepped", "closed"):
        raise ReleqError(f"method must be stepped or closed; got {method!r}")
    run = simulate_network(network, None if bits is None else _bits_value(bits),
                           None if act_bits is None else _bits_value(act_bits), mode, fc_serial,
                           {key: str(value) for key, value in (overrides or {}).items()}, method,
                           None if checkpoint is None else os.fspath(checkpoint))
    r = run.result
    return SimulateResult(
        network=network, w_bits=tuple(r.w_bits), a_bits=tuple(r.a_bits), mode=mode, fc_serial=fc_serial,
        cycles=r.cycles, cycles_8bit=r.cycles_8bit, stall_cycles=r.stall_cycles, speedup=r.speedup,
        energy_reduction=r.energy_reduction, layers=tuple(r.layers), notes=tuple(run.notes), sim=r,
        alternative=run.alternative,
    )


# ---------------------------------------------------------------------------------------------
# search


def search(
    model: Model,
    train: Data | None = None,
    val: Data | None = None,
    test: Data | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
    **settings,
) -> SearchResult:
    """Search per-layer bitwidths of ``model`` with ReLeQ (RecurrentPPO), as ``releq-tvm search`` does.

    ``train`` (fine-tunes each configuration) and ``val`` (scores the reward) are images
    (N, C, H, W) float in [0, 1] with integer labels (N,); ``test`` is the split the long fine-tune
    of the chosen bits is reported on (without it, in-memory data gets no long fine-tune and the
    result's accuracy is the val one). Without them the data is the ``data`` setting (a ``--data``
    spec such as ``"npz:mydata.npz"``), else a registered network's own dataset; a model of your
    own needs one or the other unless ``accuracy="none"`` (cost only).
    ``settings`` are :class:`releq_tvm.search.config.SearchConfig` fields, e.g. ``episodes``
    (training episode budget), ``measure`` (``none``, ``cpu``, ``stripes``), ``accuracy``,
    ``short_steps`` / ``long_steps`` (fine-tune optimiser steps), ``seed``; their defaults are
    that class's. ``run_dir`` is where the run's files go (default
    ``runs/search/<net>-<measure>-<reward>``); ``resume`` continues it, ``overwrite`` replaces it.
    ``echo`` receives the progress lines (default: none).
    """
    from releq_tvm.networks import MissingCheckpointError, get_network_spec
    from releq_tvm.search.config import SearchConfig
    from releq_tvm.search.run import SearchData, run_search

    network = resolve_model(model, input_shape, name)
    known = {f.name for f in fields(SearchConfig)} - {"network", "model", "input_shape", "run_dir"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ReleqError(f"unknown search setting {unknown[0]!r}; pass fields of releq_tvm.search.config.SearchConfig "
                         "such as episodes, measure, accuracy, short_steps, long_steps, seed")
    # a file or an entry point is recorded in config.json, so a resumed run loads it again
    source = None if network == model or not isinstance(model, (str, os.PathLike)) else os.fspath(model)
    config = SearchConfig(network=network, model=source,
                          input_shape=None if source is None or input_shape is None else tuple(input_shape),
                          run_dir=None if run_dir is None else os.fspath(run_dir), **settings)
    if (train is None) != (val is None):
        raise ReleqError("pass both train and val (train fine-tunes each configuration, val scores it), or neither")
    spec = get_network_spec(network)
    if config.accuracy != "none" and train is None and config.data is None and spec.dataset is None:
        raise ReleqError(f"the search scores {network}'s accuracy: pass train= and val= (images, labels), or "
                         "accuracy='none' to search on cost only")
    if test is not None and train is None:
        raise ReleqError("test= goes with train= and val=; a registered network's test split is its dataset's")
    data = None
    if train is not None:
        data = SearchData(_as_dataset(train, spec, "train"), _as_dataset(val, spec, "val"),
                          None if test is None else _as_dataset(test, spec, "test"))
    try:
        best = run_search(config, resume=resume, overwrite=overwrite, echo=echo or (lambda line: None), data=data)
    except MissingCheckpointError as exc:
        raise ReleqError(str(exc)) from None
    return _search_result(Path(config.run_dir or config.default_run_dir()), best)


def _as_dataset(data: Data, spec, split: str) -> TensorDataset:
    """``data`` as a :class:`TensorDataset` checked against the network's input shape and classes."""
    import torch

    from releq_tvm.data import TensorDataset, _check_labels

    images, labels = (data.images, data.labels) if isinstance(data, TensorDataset) else data
    images, labels = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(spec.input_shape) or labels.shape != images.shape[:1]:
        raise ReleqError(f"{split}= must be images (N, {_shape_text(spec.input_shape)}) with labels (N,) for "
                         f"{spec.name}; got {tuple(images.shape)} and {tuple(labels.shape)}")
    _check_labels(labels, spec.num_classes, f"{split}=")
    return TensorDataset(images, labels)


def _search_result(run_dir: Path, best: dict) -> SearchResult:
    solution, long = best["solution"], best.get("long_finetune")
    if long:
        accuracy, split, full = long["test_accuracy_quantized"], "test", long["test_accuracy_full_precision"]
    elif best["accuracy_scored"]:
        accuracy, split, full = solution["accuracy_val"], "val", best["full_precision_val_accuracy"]
    else:
        accuracy = split = full = None
    model_file = long.get("model_file") if long else None
    return SearchResult(
        network=best["network"],
        run_dir=run_dir,
        w_bits=tuple(solution["w_bits"]),
        a_bits=None if solution["a_bits"] is None else tuple(solution["a_bits"]),
        accuracy=accuracy,
        accuracy_split=split,
        full_precision_accuracy=full,
        cost_ratio=solution["cost_ratio"],
        reward=solution["reward"],
        converged_episode=best["converged_episode"],
        training_episodes=best["training_episodes"],
        model_file=None if model_file is None else run_dir / model_file,
    )
