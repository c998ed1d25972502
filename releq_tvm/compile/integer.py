r"""The integer network: what the compiled library computes, defined once in numpy.

Arithmetic (chosen so the TVM build equals this numpy model bit for bit)
------------------------------------------------------------------------
Every tensor between weight layers is an int32 **fixed-point** value ``v`` with real value
``v * 2^-F``; ``F`` (fractional bits) is one number per network, chosen from calibration so the
largest activation seen uses at most 2^29 of the int32 range (4x headroom; beyond it values
saturate, identically in numpy and TVM). Only integer operations run between the input levels
and the output, so numpy and TVM agree exactly; the float logits are ``v_out * 2^-F``, a
power-of-two scaling that is exact in float64.

Weight layer ``l`` (conv, depthwise conv or dense; ``w`` weight bits, ``a`` activation bits):

1. input quantizer (unsigned, range ``r_l``, step ``s_l = r_l / (2^a - 1)``):
   ``x = clip((v * Qm + 2^(Qs-1)) >> Qs, 0, 2^a - 1)`` with ``Qm = round(2^(Qs - F) / s_l)``,
   i.e. ``round(real / s_l)`` in fixed point. ``r_l`` is the learned clipping level alpha of
   the model's :class:`~releq_tvm.quant.PactActivation` on that layer when it carries one (a
   fine-tuned model), else calibrated on the model with quantized weights. The network input
   is quantized on the host instead (``quantize_activation_int`` with range 1.0: inputs are
   images in [0, 1]), so the library takes uint8 levels;
2. ``acc = sum q * x`` over the reduction window, exact int32 (the bit-serial kernel; ``q`` the
   WRPN weight levels of ``quantize_weight_int``, step ``d``);
3. dequantization, bias and batch norm folded into one per-channel fixed-point affine map
   (BN is *not* folded into the weights before quantizing, so the levels are those of the
   fake-quantized torch model): with ``g = gamma / sqrt(var + eps)``, real output
   ``y = acc * m_c + b_c``, ``m_c = s_l * d * g``, ``b_c = (bias - mean) * g + beta``, and
   ``v = clip((acc * M_c + B_c) >> S_c, int32)``, ``M_c = round(m_c 2^(F+S_c))``,
   ``B_c = round(b_c 2^(F+S_c)) + 2^(S_c-1)`` (round half up). ``S_c`` is the largest shift
   that keeps ``|M_c| < 2^31`` and ``acc_max |M_c| + |B_c| < 2^62`` (no int64 overflow for
   any input).

Between layers: ReLU is ``max(v, 0)``; ReLU6 is ``min(max(v, 0), 6 * 2^F)`` (the cap saturated
to int32: no value reaches it when ``6 * 2^F`` does not fit); max pooling is exact on integers;
residual add is a saturating int32 add; uniform average pooling is ``floor((2 * sum + n) / (2 *
n))`` (round half up of ``sum / n``); flatten is a reshape. Concatenation along channels needs no
requantization: every tensor between layers has the one scale ``2^-F``, so it joins the int32
values as they are.

Against the fake-quantized torch model (weights through ``apply_bits``, activations through a
:class:`~releq_tvm.quant.PactActivation` at ``r_l`` before each weight layer) the only
differences are the fixed-point resolution ``2^-F`` of intermediate values and the
round-half-up of ties, so the two agree on almost every activation level and on
classification accuracy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from releq_tvm.bits import parse_bits
from releq_tvm.config import DEFAULT_ACT_BITS
from releq_tvm.errors import ReleqError
from releq_tvm.networks import LayerSpec, create_network, get_network_spec, checkpoint_path, weight_modules
from releq_tvm.quant import (
    INPUT_RANGE,
    act_quantizers,
    apply_act_bits,
    apply_bits,
    calibrate_range,
    quantize_activation_int,
    quantize_weight_int,
    remove_bits,
)
from releq_tvm.quant.quantizers import weight_levels

from releq_tvm.compile.graph import NetworkGraph, extract_graph

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: int64 products and sums stay below this bound (one bit of margin under 2^63).
_INT64_SAFE = 2**62
#: Largest activation magnitude is mapped below 2^HEADROOM_BITS in the int32 fixed-point format.
HEADROOM_BITS = 29


@dataclass
class LayerQuant:
    """Integer parameters of one weight layer (see the module docstring for the formulas)."""

    spec: LayerSpec
    w_bits: int
    a_bits: int
    q: np.ndarray  # int32 weight levels, torch layout (O, I/groups, kh, kw) or (O, I)
    weight_step: float  # real weight = q * weight_step
    act_range: float  # r_l: input activations are clipped to [0, r_l]
    reads_input: bool  # True when the layer reads the network input (quantized on the host)
    in_mult: int  # Qm
    in_shift: int  # Qs
    mult: np.ndarray  # int64 (O,): M_c
    offset: np.ndarray  # int64 (O,): B_c including the rounding half
    shift: np.ndarray  # int64 (O,): S_c
    real_mult: np.ndarray  # float64 (O,): m_c, the real map M_c / B_c / S_c approximate
    real_offset: np.ndarray  # float64 (O,): b_c

    @property
    def act_step(self) -> float:
        return self.act_range / (2**self.a_bits - 1)

    @property
    def acc_bound(self) -> int:
        """Largest possible |acc| of this layer (reduction length x max |q| x max x)."""
        s = self.spec
        reduction = (s.in_channels // s.groups) * s.kernel[0] * s.kernel[1]
        return reduction * weight_levels(self.w_bits) * (2**self.a_bits - 1)

    def in_round(self) -> int:
        return 1 << (self.in_shift - 1) if self.in_shift > 0 else 0


@dataclass
class IntegerNetwork:
    """A network quantized to integer arithmetic: graph, per-layer integers and where they came from."""

    network: str
    input_shape: tuple[int, int, int]
    num_classes: int
    graph: NetworkGraph
    layers: list[LayerQuant]
    frac_bits: int  # F
    weights_source: str  # "checkpoint ...", "weights of <user model>" or "random weights (seed N; ...)"
    calibration: str
    model: nn.Module | None = field(default=None, repr=False)  # the float torch model

    @property
    def w_bits(self) -> tuple[int, ...]:
        return tuple(lq.w_bits for lq in self.layers)

    @property
    def a_bits(self) -> tuple[int, ...]:
        return tuple(lq.a_bits for lq in self.layers)

    @property
    def input_bits(self) -> int:
        return next(lq.a_bits for lq in self.layers if lq.reads_input)

    @property
    def output_scale(self) -> float:
        """Real value of one unit of the integer output (2^-F)."""
        return 2.0 ** -self.frac_bits

    def quantize_input(self, images) -> np.ndarray:
        """Images (N, C, H, W) in [0, 1] to the uint8 levels the library takes."""
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return quantize_activation_int(x, self.input_bits, INPUT_RANGE)

    def logits(self, outputs: np.ndarray) -> np.ndarray:
        """Float64 logits of the integer outputs (exact: a power-of-two scale)."""
        return np.asarray(outputs, dtype=np.float64) * self.output_scale


# --------------------------------------------------------------------------------------------
# building the integer network


def _bit_vector(bits, n_layers: int, network: str, what: str):
    """``bits`` (an int for every layer, a text or a sequence) as a checked vector; None stays None."""
    if bits is None:
        return None
    return parse_bits([bits] if isinstance(bits, int) else bits, n_layers, network, what=what)


def load_network_model(network: str, checkpoint: str | None = None, seed: int = 0) -> tuple[nn.Module, str]:
    """The float model: ``checkpoint`` if given, else the shipped one, else a user model's own weights
    (an entry point's or an nn.Module's), else seeded random weights.

    A fine-tuned ``checkpoint`` (:func:`releq_tvm.train.save_finetuned`) gives its float weights
    and the input quantizers it learned; :func:`load_network_file` also gives its bits.
    """
    loaded, source = load_network_file(network, checkpoint, seed)
    return loaded.model, source


def load_network_file(network: str, checkpoint: str | None = None, seed: int = 0):
    """:func:`load_network_model` as a :class:`releq_tvm.train.ModelFile` (model and the bits a
    fine-tuned checkpoint was trained at), and where the weights came from."""
    from releq_tvm.train import ModelFile, read_model_file

    if checkpoint is not None:
        loaded = read_model_file(network, checkpoint)
        kind = "fine-tuned checkpoint" if loaded.w_bits is not None else "checkpoint"
        return loaded, f"{kind} {checkpoint}"
    spec = get_network_spec(network)
    if checkpoint_path(network) is not None:
        return read_model_file(network), f"shipped checkpoint {spec.checkpoint}"
    if spec.source is not None:  # an entry point's or an nn.Module's model comes with its weights
        return ModelFile("", create_network(network, seed=seed)), f"weights of {spec.source}"
    return ModelFile("", create_network(network, seed=seed)), f"random weights (seed {seed}; no checkpoint ships)"


def calibration_images(network: str, count: int | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Calibration inputs: MNIST training images for MNIST networks, else seeded uniform [0, 1] noise.

    ``count`` defaults to 256 MNIST images, or a handful of noise images (fewer at 224x224).
    """
    spec = get_network_spec(network)
    if spec.dataset == "mnist":
        from releq_tvm.data import load_dataset

        n = count or 256
        return load_dataset("mnist", "train", limit=n).images, f"{n} MNIST training images"
    c, h, w = spec.input_shape
    n = count or (2 if h * w > 100 * 100 else 8)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=gen), f"{n} seeded uniform [0,1] images (seed {seed})"


def _observe(graph_model: fx.GraphModule, layer_names: Sequence[str], x: torch.Tensor):
    """Inputs of each weight layer and the largest |value| of any intermediate tensor."""
    inputs: dict[str, torch.Tensor] = {}
    largest = [0.0]

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_module" and n.target in layer_names:
                inputs[n.target] = self.env[n.args[0]]
            if isinstance(out, torch.Tensor) and n.op != "placeholder":
                largest[0] = max(largest[0], float(out.detach().abs().max()))
            return out

    with torch.no_grad():
        Recorder(graph_model).run(x)
    return inputs, largest[0]


def _affine(model: nn.Module, graph: NetworkGraph, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(g, b) of the layer's bias and folded batch norm: real output = g * conv_without_bias + b."""
    modules = dict(model.named_modules())
    layer = modules[graph.layers[index].name]
    out_channels = graph.layers[index].out_channels
    bias = layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(out_channels)
    bn_name = graph.batch_norms[index]
    if bn_name is None:
        return np.ones(out_channels), bias
    bn: nn.BatchNorm2d = modules[bn_name]
    gamma = bn.weight.detach().double().numpy() if bn.affine else np.ones(out_channels)
    beta = bn.bias.detach().double().numpy() if bn.affine else np.zeros(out_channels)
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    g = gamma / np.sqrt(var + bn.eps)
    return g, (bias - mean) * g + beta


def _output_shift(m: np.ndarray, b: np.ndarray, frac_bits: int, acc_bound: int):
    """Per-channel (M, B, S): the largest S keeping |M| < 2^31 and acc_bound |M| + |B| < 2^62."""
    m, b = np.asarray(m, np.float64), np.asarray(b, np.float64)
    shift = np.full(m.shape, -1, np.int64)
    for s in range(62, -1, -1):  # vectorised over channels: the first (largest) s that fits wins
        scale = 2.0 ** (frac_bits + s)
        mi, bi = np.abs(np.round(m * scale)), np.abs(np.round(b * scale))
        fits = (mi < 2**31) & (acc_bound * mi + bi + 2.0**s < _INT64_SAFE)
        shift[(shift < 0) & fits] = s
    if (shift < 0).any():
        raise ReleqError(f"layer output scale {np.abs(m).max():g} too large for the fixed-point format")
    scale = np.exp2((frac_bits + shift).astype(np.float64))
    mult = np.round(m * scale).astype(np.int64)
    half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0).astype(np.int64)
    offset = np.round(b * scale).astype(np.int64) + half
    return mult, offset, shift


def _input_shift(act_step: float, frac_bits: int) -> tuple[int, int]:
    """(Qm, Qs): the largest Qs with Qm = round(2^(Qs-F) / step) < 2^31."""
    for s in range(62, -1, -1):
        qm = round(2.0 ** (s - frac_bits) / act_step)
        if qm < 2**31:
            return qm, s
    raise ReleqError(f"activation step {act_step:g} too fine for the fixed-point format")


def quantize_network(
    network: str,
    w_bits: int | str | Sequence[int] | None,
    a_bits: int | str | Sequence[int] | None = None,
    model: nn.Module | None = None,
    checkpoint: str | None = None,
    calibration: torch.Tensor | None = None,
    seed: int = 0,
    input_shape: tuple[int, int, int] | None = None,
) -> IntegerNetwork:
    """Quantize ``network`` to integer arithmetic at ``w_bits`` / ``a_bits`` (default 8) per layer.

    ``model`` (a float torch model) overrides the checkpoint / random weights. A fine-tuned
    ``checkpoint`` (``releq-tvm finetune ... -o FILE``, :func:`releq_tvm.train.save_finetuned`)
    brings its learned clipping levels and its bits: ``w_bits`` / ``a_bits`` of None take the
    file's, and others are a one-line :class:`ReleqError`. ``w_bits=None`` without such a file
    takes the network's published bits. ``calibration``
    (images in [0, 1]) overrides :func:`calibration_images`. A layer whose input quantizer the
    model carries (:func:`releq_tvm.quant.apply_act_bits`, after a fine-tune) keeps its learned
    clipping level, and ``a_bits=None`` takes its bits; the other activation ranges are calibrated
    on the model with quantized weights (``calibrate_range`` of each weight layer's input).
    A model that is not registered needs ``model``, ``calibration`` and ``input_shape``
    (``network`` is then only its name).
    """
    if input_shape is None:
        spec = get_network_spec(network)
        input_shape = spec.input_shape
    elif model is None or calibration is None:
        raise ValueError("an unregistered network needs model, calibration and input_shape")
    if model is None:
        loaded, source = load_network_file(network, checkpoint, seed)
        model = loaded.model
    else:
        loaded, source = None, "caller's model"
    model = model.eval()
    graph = extract_graph(model, input_shape, network)
    n = len(graph.layers)
    w_bits = _bit_vector(w_bits, n, network, "--bits")
    a_bits = _bit_vector(a_bits, n, network, "--act-bits")
    if loaded is not None:
        w_bits, a_bits = loaded.bits_in_force(w_bits, a_bits)
    if w_bits is None:
        w_bits = parse_bits(get_network_spec(network).published_bits, n, network)
    learned = act_quantizers(model)
    if a_bits is None:
        a_bits = [learned[row.name].bits if row.name in learned else DEFAULT_ACT_BITS for row in graph.layers]
    a_bits = parse_bits(a_bits, n, network, what="--act-bits")
    for i, row in enumerate(graph.layers):
        if row.name in learned and learned[row.name].bits != a_bits[i]:
            raise ReleqError(f"{network}: layer {row.name} learned its activation range at {learned[row.name].bits} bits, "
                             f"not {a_bits[i]}; pass its bits or drop --act-bits")
    if calibration is None:
        calibration, calib_text = calibration_images(network, seed=seed)
    else:
        calib_text = f"{len(calibration)} caller images"

    qmodel = apply_bits(copy.deepcopy(model), w_bits, input_shape)
    layer_names = [row.name for row in graph.layers]
    inputs, largest = _observe(fx.symbolic_trace(qmodel), layer_names, calibration)
    frac_bits = int(min(30, max(0, math.floor(HEADROOM_BITS - math.log2(max(largest, 1e-30))))))

    modules = dict(model.named_modules())
    input_name = graph.ops[0].name
    layers: list[LayerQuant] = []
    for op in graph.ops:
        if op.kind != "layer":
            continue
        i = op.attrs["index"]
        row = graph.layers[i]
        reads_input = op.inputs[0] == input_name
        if reads_input:
            act_range = INPUT_RANGE
            if row.name in learned and learned[row.name].alpha.item() != INPUT_RANGE:
                raise ReleqError(f"{network}: layer {row.name} reads the image, quantized on the host at range "
                                 f"{INPUT_RANGE}; its learned range {learned[row.name].alpha.item():g} cannot be built")
        elif row.name in learned:
            act_range = learned[row.name].alpha.item()
        else:
            act_range = calibrate_range(inputs[row.name])
        q, step = quantize_weight_int(modules[row.name].weight.detach().double().numpy(), w_bits[i])
        act_step = act_range / (2 ** a_bits[i] - 1)
        g, b = _affine(model, graph, i)
        real_mult = act_step * step * g
        lq = LayerQuant(
            spec=row, w_bits=w_bits[i], a_bits=a_bits[i], q=q, weight_step=float(step), act_range=float(act_range),
            reads_input=reads_input, in_mult=0, in_shift=0,
            mult=np.zeros(0, np.int64), offset=np.zeros(0, np.int64), shift=np.zeros(0, np.int64),
            real_mult=real_mult, real_offset=b,
        )
        lq.mult, lq.offset, lq.shift = _output_shift(real_mult, b, frac_bits, lq.acc_bound)
        if not reads_input:
            lq.in_mult, lq.in_shift = _input_shift(act_step, frac_bits)
        layers.append(lq)
    bits_of_input = {lq.a_bits for lq in layers if lq.reads_input}
    if len(bits_of_input) != 1:
        raise ReleqError(f"{network}: layers reading the input must share one activation bitwidth")
    out_op = graph.op(graph.output)
    if len(out_op.shape) != 1:
        raise ReleqError(f"{network}: the network output must be flat (N, classes); got {out_op.shape}")
    return IntegerNetwork(
        network=network, input_shape=tuple(input_shape), num_classes=out_op.shape[0], graph=graph, layers=layers,
        frac_bits=frac_bits, weights_source=source, calibration=calib_text, model=model,
    )


# --------------------------------------------------------------------------------------------
# the numpy reference


def random_integer_network(network: str, w_bits, a_bits=None, seed: int = 0):
    """The integer network with seeded random weights and two noise calibration images.

    For timing only: latency does not depend on the weight values, and this skips loading
    checkpoints and datasets.
    """
    spec = get_network_spec(network)
    calib = torch.rand((2, *spec.input_shape), generator=torch.Generator().manual_seed(seed))
    return quantize_network(network, w_bits, a_bits, model=create_network(network, seed=seed), calibration=calib)


def relu6_cap(frac_bits: int) -> int:
    """6.0 in the int32 fixed-point format of ``frac_bits`` fractional bits (INT32_MAX when it does
    not fit: no value is larger then)."""
    return min(6 << frac_bits, INT32_MAX)


def quantizer_saturates(lq: LayerQuant, value: int) -> bool:
    """Whether ``lq``'s input quantizer maps the fixed-point ``value`` to its top level, so that it
    maps every larger value there too (it is monotone) and a clip at ``value`` before it changes nothing."""
    return int(_quantize_fixed(np.array([value], np.int64), lq)[0]) == 2**lq.a_bits - 1


def _rshift_round_clip(x: np.ndarray, mult, offset, shift, lo: int, hi: int) -> np.ndarray:
    y = (x.astype(np.int64) * mult + offset) >> shift
    return np.clip(y, lo, hi)


def _quantize_fixed(v: np.ndarray, lq: LayerQuant) -> np.ndarray:
    x = _rshift_round_clip(v, np.int64(lq.in_mult), np.int64(lq.in_round()), np.int64(lq.in_shift), 0, 2**lq.a_bits - 1)
    return x.astype(np.uint8)


def _integer_layer(x: np.ndarray, lq: LayerQuant) -> np.ndarray:
    """int64 ``sum q * x`` (float64 torch conv: exact, every partial sum is an integer below 2^53)."""
    s = lq.spec
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    qt = torch.from_numpy(lq.q.astype(np.float64))
    if s.kind == "dense":
        acc = xt @ qt.T
    else:
        acc = torch.nn.functional.conv2d(xt, qt, stride=s.stride, padding=s.padding, groups=s.groups)
    return acc.numpy().astype(np.int64)


def _channel_view(a: np.ndarray, ndim: int) -> np.ndarray:
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def integer_forward(net: IntegerNetwork, x_levels: np.ndarray, keep: bool = False):
    """The exact integer outputs (int32, (N, classes)) of ``net`` for uint8 input levels.

    With ``keep`` also returns every intermediate tensor by op name (accumulators under
    ``"<name>:acc"``, quantized inputs under ``"<name>:x"``) for layer-by-layer checks.
    """
    values: dict[str, np.ndarray] = {}
    layers = {lq.spec.index: lq for lq in net.layers}
    for op in net.graph.ops:
        if op.kind == "input":
            values[op.name] = np.asarray(x_levels, dtype=np.uint8)
        elif op.kind == "layer":
            lq = layers[op.attrs["index"]]
            src = values[op.inputs[0]]
            x = src if lq.reads_input else _quantize_fixed(src, lq)
            acc = _integer_layer(x, lq)
            if np.abs(acc).max(initial=0) > INT32_MAX:
                raise AssertionError("accumulator exceeds int32")  # impossible: acc_bound < 2^31
            nd = acc.ndim
            v = _rshift_round_clip(acc, _channel_view(lq.mult, nd), _channel_view(lq.offset, nd),
                                   _channel_view(lq.shift, nd), INT32_MIN, INT32_MAX)
            values[op.name] = v.astype(np.int32)
            if keep:
                values[op.name + ":x"] = x
                values[op.name + ":acc"] = acc.astype(np.int32)
        elif op.kind == "relu":
            values[op.name] = np.maximum(values[op.inputs[0]], 0)
        elif op.kind == "relu6":
            values[op.name] = np.clip(values[op.inputs[0]], 0, relu6_cap(net.frac_bits))
        elif op.kind == "maxpool":
            t = torch.from_numpy(values[op.inputs[0]].astype(np.float64))  # int32 values: exact in float64
            p = torch.nn.functional.max_pool2d(t, op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"])
            values[op.name] = p.numpy().astype(np.int32)
        elif op.kind == "avgpool":
            v = values[op.inputs[0]].astype(np.int64)
            (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
            c, oh, ow = op.shape
            total = np.zeros((v.shape[0], c, oh, ow), np.int64)
            for i in range(kh):
                for j in range(kw):
                    total += v[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            count = kh * kw
            values[op.name] = np.floor_divide(2 * total + count, 2 * count).astype(np.int32)
        elif op.kind == "add":
            a, b = (values[name].astype(np.int64) for name in op.inputs)
            values[op.name] = np.clip(a + b, INT32_MIN, INT32_MAX).astype(np.int32)
        elif op.kind == "concat":
            values[op.name] = np.concatenate([values[name] for name in op.inputs], axis=1)
        elif op.kind == "flatten":
            v = values[op.inputs[0]]
            values[op.name] = v.reshape(v.shape[0], -1)
        else:
            raise AssertionError(op.kind)
    out = values[net.graph.output]
    return (out, values) if keep else out


# --------------------------------------------------------------------------------------------
# the torch fake-quantized reference


def fake_quant_model(net: IntegerNetwork, model: nn.Module | None = None) -> nn.Module:
    """A copy of the float model with WRPN weights (``apply_bits``) and an unsigned activation
    quantizer (:class:`~releq_tvm.quant.PactActivation` at each layer's bits and range) before
    every weight layer; input quantizers the model carries are replaced by ones at the same
    ranges, so a fine-tuned model computes exactly what it computed before.

    This is the float model the integer network reproduces; its accuracy is the reference.
    """
    model = copy.deepcopy(model if model is not None else net.model)
    if model is None:
        raise ValueError("no torch model attached to this IntegerNetwork")
    remove_bits(model)  # activations first: tracing the layers is cheap while the weights are float
    by_name = {lq.spec.name: lq for lq in net.layers}
    order = [by_name[name] for name, _ in weight_modules(model, net.input_shape)]
    apply_act_bits(model, [lq.a_bits for lq in order], net.input_shape, [lq.act_range for lq in order], learn=False)
    apply_bits(model, net.w_bits, net.input_shape)
    return model.eval()
