"""Lower an :class:`IntegerNetwork` to a Relax module: one kernel call per weight layer, the rest in Relax.

Every conv / dense is a ``relax.call_tir`` of a scheduled TIR kernel from ``releq_tvm.kernels``
(the bit-serial kernel at the layer's bits, the int8 or the lookup-table kernel, per layer), whose
output stage runs the requantization and what :func:`plan_fusion` fuses into it; max pooling is a
scheduled kernel too (:mod:`releq_tvm.kernels.pool`). ReLU / ReLU6 left on their own, average
pooling, residual adds, concat and flatten are Relax operators, legalized and fused by TVM's
default CPU pipeline. The arithmetic is exactly that of
:func:`releq_tvm.compile.integer.integer_forward`.

:func:`build_relax_module` makes the weights parameters of ``main``; :func:`build_network` binds
them as constants of the library, so ``main(x)`` takes the input alone. Kernel PrimFuncs are
marked opaque so the fusion pass never merges them with elementwise operators (their schedules
are hand-made; a fused, rescheduled copy would lose them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from releq_tvm.compile.integer import (
    INT32_MAX, INT32_MIN, IntegerNetwork, LayerQuant, quantizer_saturates, relu6_cap,
)
from releq_tvm.errors import ReleqError
from releq_tvm.networks import LayerSpec
from releq_tvm.kernels.shapes import ConvShape, DenseShape
from releq_tvm.kernels.epilogue import PLAIN, Epilogue, quantize_primfunc
from releq_tvm.kernels.pool import max_pool2d_primfunc
from releq_tvm.kernels.target import vector_isa

#: Kernel families a layer can be built with (``auto``, the faster per layer, is resolved from the
#: latency table by :func:`releq_tvm.compile.artifact.compile_network`).
BACKENDS = ("bitserial", "int8", "lut")
#: The lookup-table kernels (:mod:`releq_tvm.kernels.lut`) run dense layers at 1-4 weight bits.
LUT_MAX_BITS = 4


def family_applies(family: str, layer: LayerSpec, w_bits: int) -> bool:
    """Whether ``family`` can run ``layer`` at ``w_bits`` (bit-serial and int8 run every layer at up
    to 8 bits; lut dense layers at 1-4 weight bits, any activation bits up to 8)."""
    return family != "lut" or (layer.kind == "dense" and w_bits <= LUT_MAX_BITS)


def kernel_bits(family: str, w_bits: int, a_bits: int) -> tuple[int, int]:
    """The (weight, activation) bits ``family``'s kernel is built at for a layer at ``w_bits``/``a_bits``:
    bit-serial at both, lut at the weight bits over 8-bit activation levels, int8 at 8/8."""
    if family == "bitserial":
        return w_bits, a_bits
    return (w_bits, 8) if family == "lut" else (8, 8)
#: TVM's op-pattern code for an opaque function (never fused).
_OPAQUE = 8


def layer_kernels(net: IntegerNetwork, kernels: str | Sequence[str]) -> tuple[str, ...]:
    """One kernel family per layer: ``kernels`` for all of them, or checked per layer."""
    n = len(net.layers)
    families = (kernels,) * n if isinstance(kernels, str) else tuple(kernels)
    bad = [k for k in families if k not in BACKENDS]
    if bad or len(families) != n:
        what = f"unknown kernel family {bad[0]!r}" if bad else f"{len(families)} kernel families for {n} layers"
        raise ReleqError(f"{what}; pass one of {', '.join(BACKENDS)} per layer (auto is resolved by compile_network)")
    for lq, family in zip(net.layers, families):
        if not family_applies(family, lq.spec, lq.w_bits):
            raise ReleqError(f"layer {lq.spec.index} ({lq.spec.kind}, {lq.w_bits}-bit weights) cannot run the lut kernels: "
                             f"they run dense layers at 1-{LUT_MAX_BITS} weight bits; use bitserial or int8 there")
    return families


def layer_shape(s: LayerSpec, batch: int) -> ConvShape | DenseShape:
    """The kernels' shape object of one layer-table row at ``batch``."""
    if s.kind == "dense":
        return DenseShape(s.in_channels, s.out_channels, batch=batch)
    return ConvShape(s.in_channels, s.out_channels, s.in_size, s.kernel, s.stride, s.padding, s.groups, batch=batch)


def _int8_kernels():
    try:
        from releq_tvm.kernels import int8 as module  # the plain int8 baseline of the kernels package
    except ImportError:
        raise ReleqError("the int8 baseline kernels (releq_tvm.kernels.int8) are not installed") from None
    return module


def kernel_primfunc(backend: str, shape: ConvShape | DenseShape, w_bits: int, a_bits: int, target,
                    epilogue: Epilogue = PLAIN) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``main(data uint8, weights, *epilogue args, out)`` of one layer, planned
    for ``target``'s vector unit (the weights must be packed for the same target: :func:`packed_weights`)."""
    isa = vector_isa(target)
    if backend == "bitserial":
        from releq_tvm.kernels.bitserial import bitserial_conv2d_primfunc, bitserial_dense_primfunc

        if isinstance(shape, DenseShape):
            return bitserial_dense_primfunc(shape, w_bits, a_bits, isa=isa, epilogue=epilogue)
        return bitserial_conv2d_primfunc(shape, w_bits, a_bits, isa=isa, epilogue=epilogue)
    if backend == "int8":
        k = _int8_kernels()
        if isinstance(shape, DenseShape):
            return k.int8_dense_primfunc(shape, isa=isa, epilogue=epilogue)
        return k.int8_conv2d_primfunc(shape, isa=isa, epilogue=epilogue)
    if backend == "lut" and isinstance(shape, DenseShape):
        from releq_tvm.kernels.lut import lut_dense_primfunc

        return lut_dense_primfunc(shape, w_bits, isa=isa, epilogue=epilogue)
    raise ReleqError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def packed_weights(backend: str, q: np.ndarray, w_bits: int, shape: ConvShape | DenseShape, target) -> np.ndarray:
    """Weight levels ``q`` (torch layout) in the layout the layer's kernel for ``target`` reads
    (bit planes, or int8)."""
    groups = 1 if isinstance(shape, DenseShape) else shape.groups
    isa = vector_isa(target)
    if backend == "bitserial":
        from releq_tvm.kernels.encoding import pack_weights

        return pack_weights(q, w_bits, groups=groups, lanes=isa.uint64_lanes)
    if backend == "lut":
        from releq_tvm.kernels.lut import pack_lut_weights

        return pack_lut_weights(q, w_bits, isa=isa)
    return _int8_kernels().pack_int8_weights(q, groups=groups, isa=isa)


def network_params(net: IntegerNetwork, kernels: str | Sequence[str], target) -> "OrderedDict[str, np.ndarray]":
    """The arrays ``main`` takes after the input, by name, in call order (weights packed for ``target``
    and each layer's kernel family, :func:`layer_kernels`).

    Per layer ``i``: ``l{i}_weight``; ``l{i}_mult``, ``l{i}_offset``, ``l{i}_shift`` (int64, one per
    output channel: the requantization); ``l{i}_in_quant`` (int64 ``[Qm, round, Qs]``, the input
    quantizer) unless the layer reads the network input.
    """
    params: OrderedDict[str, np.ndarray] = OrderedDict()
    for lq, family in zip(net.layers, layer_kernels(net, kernels)):
        i = lq.spec.index
        params[f"l{i}_weight"] = packed_weights(family, lq.q, lq.w_bits, layer_shape(lq.spec, 1), target)
        params[f"l{i}_mult"] = np.asarray(lq.mult, np.int64).reshape(-1)
        params[f"l{i}_offset"] = np.asarray(lq.offset, np.int64).reshape(-1)
        params[f"l{i}_shift"] = np.asarray(lq.shift, np.int64).reshape(-1)
        if not lq.reads_input:
            params[f"l{i}_in_quant"] = np.array([lq.in_mult, lq.in_round(), lq.in_shift], np.int64)
    return params


@dataclass(frozen=True)
class FusedLayer:
    """What one weight layer's kernel computes beyond its sum (see :func:`plan_fusion`)."""

    epilogue: Epilogue
    #: graph values the kernel's output stands for: the layer, and the add / relu fused into it
    covers: tuple[str, ...]
    #: the other operand of a fused residual add
    residual: str | None
    #: the layer whose input quantizer the kernel applies (its output is that layer's uint8 input)
    quantize_for: int | None


def plan_fusion(net: IntegerNetwork) -> dict[str, FusedLayer]:
    """Per layer op, the epilogue its kernel runs: requantization always; then a residual add whose
    other operand is already computed; then a ReLU; then the next layer's input quantizer when the
    value's only path leads, through max-pooling and flatten alone, to exactly one weight layer.
    A ReLU6 is fused as a ReLU when that quantizer follows and saturates at 6 or below (its range
    is at most 6, as a range calibrated after a ReLU6 is); otherwise it runs on its own.

    Quantizing before max-pooling is exact: the quantizer is monotone non-decreasing (``Qm > 0``),
    so it commutes with max, and it maps everything at or below zero to level 0 (as ReLU then
    quantizing would), and everything at or above a value it saturates at to its top level (as a
    clip there then quantizing would). Values read by more than one op (a residual shortcut), by
    an average pool, a concat or as the network output stay int32.
    """
    ops = net.graph.ops
    order = {op.name: k for k, op in enumerate(ops)}
    users: dict[str, list] = {op.name: [] for op in ops}
    for op in ops:
        for name in op.inputs:
            users[name].append(op)
    layers = {lq.spec.index: lq for lq in net.layers}

    def only_user(name: str, kind: str):
        found = users[name]
        return found[0] if len(found) == 1 and found[0].kind == kind and name != net.graph.output else None

    plan: dict[str, FusedLayer] = {}
    for op in ops:
        if op.kind != "layer":
            continue
        covers, residual, relu = [op.name], None, False
        add = only_user(op.name, "add")
        if add is not None:
            other = [name for name in add.inputs if name != op.name]
            if len(other) == 1 and order[other[0]] < order[op.name]:
                covers.append(add.name)
                residual = other[0]
        relu_op = only_user(covers[-1], "relu") or only_user(covers[-1], "relu6")
        if relu_op is not None:
            covers.append(relu_op.name)
            relu = True
        quantize_for = _quantized_consumer(net, covers[-1], users, layers)
        if relu_op is not None and relu_op.kind == "relu6" and (
                quantize_for is None or not quantizer_saturates(layers[quantize_for], relu6_cap(net.frac_bits))):
            covers.pop()  # the ReLU6 runs on its own, and nothing but it reads the kernel's output
            relu, quantize_for = False, None
        bits = layers[quantize_for].a_bits if quantize_for is not None else None
        epilogue = Epilogue(requantize=True, residual=residual is not None, relu=relu, quantize_bits=bits)
        plan[op.name] = FusedLayer(epilogue, tuple(covers), residual, quantize_for)
    return plan


def _quantized_consumer(net: IntegerNetwork, tail: str, users: dict[str, list], layers: dict[int, LayerQuant]):
    """The index of the one weight layer that value ``tail``'s only path reaches through max-pooling
    and flatten alone, or None (none, several, a layer reading the network input)."""
    while tail != net.graph.output and len(users[tail]) == 1:
        nxt = users[tail][0]
        if nxt.kind == "layer":
            consumer = layers[nxt.attrs["index"]]
            return None if consumer.reads_input else consumer.spec.index
        if nxt.kind not in ("maxpool", "flatten"):
            return None
        tail = nxt.name
    return None


def build_relax_module(net: IntegerNetwork, kernels: str | Sequence[str], batch: int,
                       target) -> tuple[tvm.IRModule, "OrderedDict[str, np.ndarray]"]:
    """The Relax IRModule of ``net`` for ``target`` and the arrays ``main`` takes after the input, by
    name, in call order (:func:`network_params`).

    ``main(x: uint8 (batch, C, H, W), *params) -> int32 (batch, classes)`` (:func:`build_network`
    binds the params as constants); the output is the fixed-point logits (``* 2^-F`` gives the
    real ones). Each weight layer is one kernel call
    whose output stage runs the requantization and what :func:`plan_fusion` fused into it; an
    input that stays int32 is quantized by a vectorised kernel of its own
    (:func:`releq_tvm.kernels.epilogue.quantize_primfunc`). No int64 tensor reaches memory.
    """
    params = network_params(net, kernels, target)
    families = dict(zip((lq.spec.index for lq in net.layers), layer_kernels(net, kernels)))
    fusion = plan_fusion(net)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, *net.input_shape), "uint8"))
    pvars = OrderedDict((name, relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))) for name, arr in params.items())
    layers = {lq.spec.index: lq for lq in net.layers}
    funcs: dict[tuple, relax.GlobalVar] = {}

    def kernel(lq: LayerQuant, epilogue: Epilogue) -> relax.GlobalVar:
        shape = layer_shape(lq.spec, batch)
        family = families[lq.spec.index]
        wb, ab = kernel_bits(family, lq.w_bits, lq.a_bits)
        key = ("layer", family, shape, wb, ab, epilogue)
        if key not in funcs:
            name = f"{family}_{lq.spec.kind}{len(funcs)}_w{wb}a{ab}_{epilogue.label}"
            func = kernel_primfunc(family, shape, wb, ab, target, epilogue)
            funcs[key] = bb.add_func(func.with_attrs({"op_pattern": _OPAQUE, "global_symbol": name}), name)
        return funcs[key]

    def quantizer(shape: tuple[int, ...], bits: int) -> relax.GlobalVar:
        key = ("quantize", shape, bits)
        if key not in funcs:
            name = f"quantize{len(funcs)}_a{bits}"
            func = quantize_primfunc(shape, bits)
            funcs[key] = bb.add_func(func.with_attrs({"op_pattern": _OPAQUE, "global_symbol": name}), name)
        return funcs[key]

    def max_pool(op, dtype: str) -> relax.GlobalVar:
        in_shape = (batch, *net.graph.op(op.inputs[0]).shape)
        window = tuple(op.attrs[k] for k in ("kernel", "stride", "padding"))
        key = ("maxpool", in_shape, window, dtype)
        if key not in funcs:
            name = f"maxpool{len(funcs)}_{dtype}"
            func = max_pool2d_primfunc(in_shape, *window, dtype)
            funcs[key] = bb.add_func(func.with_attrs({"op_pattern": _OPAQUE, "global_symbol": name}), name)
        return funcs[key]

    def i64(value):
        return relax.const(value, "int64")

    def clip_cast(v, lo, hi, dtype):
        return relax.op.astype(relax.op.clip(v, lo, hi), dtype)

    with bb.function("main", [x, *pvars.values()]):
        with bb.dataflow():
            values: dict[str, relax.Expr] = {}
            #: values that already hold a layer's uint8 input: name -> that layer's index
            quantized: dict[str, int] = {}
            fused_away: set[str] = set()
            for op in net.graph.ops:
                if op.kind == "input":
                    values[op.name] = x
                    continue
                if op.name in fused_away:
                    continue
                src = [values[name] for name in op.inputs]
                if op.kind == "layer":
                    lq = layers[op.attrs["index"]]
                    i = lq.spec.index
                    a = src[0]
                    shape = layer_shape(lq.spec, batch)
                    dense = isinstance(shape, DenseShape)
                    if not lq.reads_input and quantized.get(op.inputs[0]) != i:
                        in_shape = shape.input_shape() if dense else shape.input_shape("NCHW")
                        a = bb.emit(relax.call_tir(quantizer(in_shape, lq.a_bits), [a, pvars[f"l{i}_in_quant"]],
                                                   relax.TensorType(in_shape, "uint8")), f"l{i}_x")
                    fused = fusion[op.name]
                    args = [a, pvars[f"l{i}_weight"], pvars[f"l{i}_mult"], pvars[f"l{i}_offset"], pvars[f"l{i}_shift"]]
                    if fused.residual is not None:
                        args.append(values[fused.residual])
                    if fused.quantize_for is not None:
                        args.append(pvars[f"l{fused.quantize_for}_in_quant"])
                    out_shape = shape.output_shape() if dense else shape.output_shape("NCHW")
                    out = bb.emit(
                        relax.call_tir(kernel(lq, fused.epilogue), args, relax.TensorType(out_shape, fused.epilogue.out_dtype)),
                        op.name,
                    )
                    for name in fused.covers:
                        values[name] = out
                        if fused.quantize_for is not None:
                            quantized[name] = fused.quantize_for
                    fused_away.update(fused.covers[1:])
                    continue
                if op.kind == "relu":
                    value = relax.op.maximum(src[0], relax.const(0, "int32"))
                elif op.kind == "relu6":
                    value = relax.op.clip(src[0], 0, relu6_cap(net.frac_bits))
                elif op.kind == "maxpool":
                    # on uint8 levels when the producer fused the next quantizer (exact: see plan_fusion)
                    dtype = "uint8" if op.inputs[0] in quantized else "int32"
                    value = relax.call_tir(max_pool(op, dtype), [src[0]], relax.TensorType((batch, *op.shape), dtype))
                elif op.kind == "avgpool":
                    value = _uniform_avgpool(src[0], op, batch, i64)
                elif op.kind == "add":
                    t = relax.op.add(relax.op.astype(src[0], "int64"), relax.op.astype(src[1], "int64"))
                    value = clip_cast(t, INT32_MIN, INT32_MAX, "int32")
                elif op.kind == "concat":  # every input int32 at the one scale 2^-F: see plan_fusion
                    value = relax.op.concat(src, axis=1)
                elif op.kind == "flatten":
                    value = relax.op.reshape(src[0], (batch, *op.shape))
                else:
                    raise AssertionError(op.kind)
                if op.kind in ("maxpool", "flatten") and op.inputs[0] in quantized:
                    quantized[op.name] = quantized[op.inputs[0]]
                values[op.name] = bb.emit(value, op.name)
            out = bb.emit_output(values[net.graph.output])
        bb.emit_func_output(out)
    return bb.get(), params


def build_network(net: IntegerNetwork, kernels: str | Sequence[str], batch: int,
                  target) -> tuple[tvm.runtime.Executable, "OrderedDict[str, np.ndarray]"]:
    """Compile ``net`` for ``target`` with ``kernels`` (one family for every layer, or one per layer;
    ``auto`` is resolved by the caller): the Relax VM executable, whose ``main(x)`` takes the input
    alone, and the arrays bound into it as constants, by name (:func:`network_params`).

    Why constants: a parameter of ``main`` is checked (dtype, rank, shape) by the VM on every call,
    about 0.25 us each; LeNet-5's 24 arrays cost 6 us of its 19 us call (measured: 19.3 -> 13.6 us
    bound, ResNet-20 at int8 0.87 -> 0.75 ms), and a deployed network has fixed weights anyway.
    """
    mod, params = build_relax_module(net, kernels, batch, target)
    bound = relax.transform.BindParams("main", {name: tvm.runtime.tensor(np.ascontiguousarray(arr))
                                                for name, arr in params.items()})(mod)
    return tvm.compile(bound, target=target), params


def _uniform_avgpool(v, op, batch: int, i64):
    """floor((2*sum + n) / (2n)) over non-overlapping or strided windows (integer.py's formula)."""
    (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
    c, oh, ow = op.shape
    count = kh * kw
    t = relax.op.astype(v, "int64")
    if (sh, sw) == (kh, kw):
        # non-overlapping windows: a reshape exposes each window as two axes
        t = relax.op.reshape(t, (batch, c, oh, kh, ow, kw))
        total = relax.op.sum(t, axis=[3, 5])
    else:
        total = None
        for i in range(kh):
            for j in range(kw):
                part = relax.op.strided_slice(t, axes=[2, 3], begin=[i, j],
                                              end=[i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1], strides=[sh, sw])
                total = part if total is None else relax.op.add(total, part)
    t = relax.op.floor_divide(relax.op.add(relax.op.multiply(total, i64(2)), i64(count)), i64(2 * count))
    return relax.op.astype(t, "int32")
