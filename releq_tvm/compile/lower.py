"""Lower an :class:`IntegerNetwork` to a Relax module: one kernel call per weight layer, the rest in Relax.

Every conv / dense is a ``relax.call_tir`` of a scheduled TIR kernel from ``releq_tvm.kernels``
(the bit-serial kernel at the layer's bits, or the plain int8 kernel for the int8 baseline);
the fixed-point requantization, ReLU, pooling, residual add and flatten are Relax operators,
legalized and fused by TVM's default CPU pipeline. The arithmetic is exactly that of
:func:`releq_tvm.compile.integer.integer_forward`.

The weights are *parameters* of ``main`` (not constants): the library depends only on the
network structure, the bits and the batch size, and the values live in a params file. Kernel
PrimFuncs are marked opaque so the fusion pass never merges them with elementwise operators
(their schedules are hand-made; a fused, rescheduled copy would lose them).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tvm
from tvm import relax

from releq_tvm.compile.integer import INT32_MAX, INT32_MIN, IntegerNetwork, LayerQuant
from releq_tvm.errors import ReleqError
from releq_tvm.networks import LayerSpec
from releq_tvm.kernels.shapes import ConvShape, DenseShape
from releq_tvm.kernels.target import vector_isa

#: Kernel families a network can be built with.
BACKENDS = ("bitserial", "int8")
#: TVM's op-pattern code for an opaque function (never fused).
_OPAQUE = 8


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


def kernel_primfunc(backend: str, shape: ConvShape | DenseShape, w_bits: int, a_bits: int, target) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``main(data uint8, weights, out int32)`` of one layer, planned for
    ``target``'s vector unit (the weights must be packed for the same target: :func:`packed_weights`)."""
    isa = vector_isa(target)
    if backend == "bitserial":
        from releq_tvm.kernels.bitserial import bitserial_conv2d_primfunc, bitserial_dense_primfunc

        if isinstance(shape, DenseShape):
            return bitserial_dense_primfunc(shape, w_bits, a_bits, isa=isa)
        return bitserial_conv2d_primfunc(shape, w_bits, a_bits, isa=isa)
    if backend == "int8":
        k = _int8_kernels()
        return k.int8_dense_primfunc(shape, isa=isa) if isinstance(shape, DenseShape) else k.int8_conv2d_primfunc(shape, isa=isa)
    raise ReleqError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def packed_weights(backend: str, q: np.ndarray, w_bits: int, shape: ConvShape | DenseShape, target) -> np.ndarray:
    """Weight levels ``q`` (torch layout) in the layout the layer's kernel for ``target`` reads
    (bit planes, or int8)."""
    groups = 1 if isinstance(shape, DenseShape) else shape.groups
    isa = vector_isa(target)
    if backend == "bitserial":
        from releq_tvm.kernels.encoding import pack_weights

        return pack_weights(q, w_bits, groups=groups, lanes=isa.uint64_lanes)
    return _int8_kernels().pack_int8_weights(q, groups=groups, isa=isa)


def network_params(net: IntegerNetwork, backend: str, target) -> "OrderedDict[str, np.ndarray]":
    """The arrays ``main`` takes after the input, by name, in call order (weights packed for ``target``)."""
    params: OrderedDict[str, np.ndarray] = OrderedDict()
    for lq in net.layers:
        i = lq.spec.index
        per_channel = (1, -1) if lq.spec.kind == "dense" else (1, -1, 1, 1)
        params[f"l{i}_weight"] = packed_weights(backend, lq.q, lq.w_bits, layer_shape(lq.spec, 1), target)
        params[f"l{i}_mult"] = lq.mult.reshape(per_channel)
        params[f"l{i}_offset"] = lq.offset.reshape(per_channel)
        params[f"l{i}_shift"] = lq.shift.reshape(per_channel)
        if not lq.reads_input:
            params[f"l{i}_in_mult"] = np.array([lq.in_mult], np.int64)
            params[f"l{i}_in_round"] = np.array([lq.in_round()], np.int64)
            params[f"l{i}_in_shift"] = np.array([lq.in_shift], np.int64)
    return params


def _kernel_bits(backend: str, lq: LayerQuant) -> tuple[int, int]:
    return (lq.w_bits, lq.a_bits) if backend == "bitserial" else (8, 8)


def build_relax_module(net: IntegerNetwork, backend: str, batch: int, target) -> tuple[tvm.IRModule, list[str]]:
    """The Relax IRModule of ``net`` for ``target`` and the parameter names ``main`` takes after the input.

    ``main(x: uint8 (batch, C, H, W), *params) -> int32 (batch, classes)``; the output is the
    fixed-point logits (``* 2^-F`` gives the real ones).
    """
    params = network_params(net, backend, target)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, *net.input_shape), "uint8"))
    pvars = OrderedDict((name, relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))) for name, arr in params.items())
    layers = {lq.spec.index: lq for lq in net.layers}

    kernels: dict[tuple, relax.GlobalVar] = {}
    for lq in net.layers:
        shape = layer_shape(lq.spec, batch)
        wb, ab = _kernel_bits(backend, lq)
        key = (shape, wb, ab)
        if key not in kernels:
            name = f"{backend}_{lq.spec.kind}{len(kernels)}_w{wb}a{ab}"
            func = kernel_primfunc(backend, shape, wb, ab, target).with_attrs({"op_pattern": _OPAQUE, "global_symbol": name})
            kernels[key] = bb.add_func(func, name)

    def i64(value):
        return relax.const(value, "int64")

    def clip_cast(v, lo, hi, dtype):
        return relax.op.astype(relax.op.clip(v, lo, hi), dtype)

    with bb.function("main", [x, *pvars.values()]):
        with bb.dataflow():
            values: dict[str, relax.Expr] = {}
            for op in net.graph.ops:
                if op.kind == "input":
                    values[op.name] = x
                    continue
                src = [values[name] for name in op.inputs]
                if op.kind == "layer":
                    lq = layers[op.attrs["index"]]
                    i = lq.spec.index
                    a = src[0]
                    if not lq.reads_input:
                        t = relax.op.multiply(relax.op.astype(a, "int64"), pvars[f"l{i}_in_mult"])
                        t = relax.op.right_shift(relax.op.add(t, pvars[f"l{i}_in_round"]), pvars[f"l{i}_in_shift"])
                        a = bb.emit(clip_cast(t, 0, 2**lq.a_bits - 1, "uint8"), f"l{i}_x")
                    shape = layer_shape(lq.spec, batch)
                    out_shape = shape.output_shape() if isinstance(shape, DenseShape) else shape.output_shape("NCHW")
                    wb, ab = _kernel_bits(backend, lq)
                    acc = bb.emit(
                        relax.call_tir(kernels[(shape, wb, ab)], [a, pvars[f"l{i}_weight"]], relax.TensorType(out_shape, "int32")),
                        f"l{i}_acc",
                    )
                    t = relax.op.multiply(relax.op.astype(acc, "int64"), pvars[f"l{i}_mult"])
                    t = relax.op.right_shift(relax.op.add(t, pvars[f"l{i}_offset"]), pvars[f"l{i}_shift"])
                    value = clip_cast(t, INT32_MIN, INT32_MAX, "int32")
                elif op.kind == "relu":
                    value = relax.op.maximum(src[0], relax.const(0, "int32"))
                elif op.kind == "maxpool":
                    value = relax.op.nn.max_pool2d(src[0], op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"])
                elif op.kind == "avgpool":
                    value = _uniform_avgpool(src[0], op, batch, i64)
                elif op.kind == "add":
                    t = relax.op.add(relax.op.astype(src[0], "int64"), relax.op.astype(src[1], "int64"))
                    value = clip_cast(t, INT32_MIN, INT32_MAX, "int32")
                elif op.kind == "flatten":
                    value = relax.op.reshape(src[0], (batch, *op.shape))
                else:
                    raise AssertionError(op.kind)
                values[op.name] = bb.emit(value, op.name)
            out = bb.emit_output(values[net.graph.output])
        bb.emit_func_output(out)
    return bb.get(), list(params)


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
