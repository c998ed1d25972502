"""A network as a short list of integer-friendly operations, read from the torch model by FX.

``torch.fx.symbolic_trace`` turns any registered network (``nn.Sequential`` stacks, the ResNet
with its residual adds, torchvision's AlexNet) into a graph of module calls. :func:`extract_graph`
walks it once and keeps what the integer network needs to know:

* ``layer``   a Conv2d / Linear (one row of the layer table, same order), with the BatchNorm2d
              that directly follows it folded in (its input quantizer is part of the layer);
* ``relu``; ``relu6`` (ReLU6, or Hardtanh / clamp between 0 and 6); ``maxpool``; ``avgpool`` (a
  uniform average: AdaptiveAvgPool2d whose output size divides its input, or AvgPool2d without
  padding); ``add`` (residual); ``concat`` (``torch.cat`` along channels); ``flatten``; the
  pools, ReLU and ReLU6 as modules or as ``torch.nn.functional`` calls alike;
* Dropout and Identity disappear (inference), and so do constants nothing reads (an ONNX
  converter leaves them behind).

Anything else raises :class:`ReleqError`, one line naming the operator as torch names it
(``'GELU'`` for a module, ``'torch.sigmoid'``, ``'Tensor.sigmoid'``, ``'aten.sigmoid'``) and the
node, so a new network fails loudly at compile time rather than computing something else. This
module needs torch only (no TVM).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from releq_tvm.errors import ReleqError
from releq_tvm.networks import LayerSpec, layer_table


@dataclass(frozen=True)
class GraphOp:
    """One operation of the integer network; ``shape`` is its output shape without the batch axis."""

    name: str
    kind: str  # "input" | "layer" | "relu" | "relu6" | "maxpool" | "avgpool" | "add" | "concat" | "flatten"
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    #: layer: index into the layer table; pools: kernel/stride/padding as (rows, cols) pairs.
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkGraph:
    """Operations in execution order; ``ops[0]`` is the input, ``output`` names the result."""

    ops: tuple[GraphOp, ...]
    output: str
    layers: tuple[LayerSpec, ...]
    #: module path of the BatchNorm2d folded into each layer (None where there is none).
    batch_norms: tuple[str | None, ...]

    def op(self, name: str) -> GraphOp:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(name)

    def users(self, name: str) -> list[GraphOp]:
        return [op for op in self.ops if name in op.inputs]


#: What the supported operators are, said in the error for any other one (the README lists them too).
SUPPORTED = ("Conv2d (grouped and depthwise too), Linear, BatchNorm2d after its conv, ReLU, ReLU6, MaxPool2d, "
             "AvgPool2d, AdaptiveAvgPool2d, add, torch.cat along channels, flatten, Dropout, Identity")

#: The torch operator each op kind comes from, for messages.
KIND_NAMES = {"layer": "Conv2d / Linear", "relu": "ReLU", "relu6": "ReLU6", "maxpool": "MaxPool2d",
              "avgpool": "average pooling", "add": "add", "concat": "torch.cat", "flatten": "flatten"}

_CONCAT = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
_CLAMP = (torch.clamp, torch.clip, "clamp", "clip")


def operator_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The operator of ``node`` as a user writes it in torch: a module's class (``GELU``), a function
    with its namespace (``torch.sigmoid``, ``torch.nn.functional.gelu``, ``operator.mul``), a tensor
    method (``Tensor.sigmoid``) or an ATen operator of an exported program (``aten.sigmoid``)."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket)
    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    for prefix, namespace in (("torch.nn.functional", nn.functional), ("torch", torch), ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    return f"{getattr(target, '__module__', None) or '?'}.{name}"


def _argument(node: fx.Node, position: int, name: str, default=None):
    """Argument ``name`` of a call, given at ``position`` or by keyword."""
    if position < len(node.args):
        return node.args[position]
    return node.kwargs.get(name, default)


def _is_relu6(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """ReLU6 however it is written: nn.ReLU6, nn.Hardtanh(0, 6), F.relu6, F.hardtanh(x, 0, 6),
    clamp(x, 0, 6)."""
    target = node.target
    if node.op == "call_module":
        module = modules[target]
        return isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0)  # ReLU6 is one
    if target in (nn.functional.relu6, torch.ops.aten.relu6.default):
        return True
    if target in (nn.functional.hardtanh, torch.ops.aten.hardtanh.default):
        return (_argument(node, 1, "min_val", -1.0), _argument(node, 2, "max_val", 1.0)) == (0.0, 6.0)
    if target in _CLAMP and node.op in ("call_function", "call_method"):
        return (_argument(node, 1, "min"), _argument(node, 2, "max")) == (0, 6)
    return False


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pool_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def extract_graph(model: nn.Module, input_shape: tuple[int, int, int], network: str = "model") -> NetworkGraph:
    """Trace ``model`` (eval mode) into a :class:`NetworkGraph` whose layers match ``layer_table``."""
    table = layer_table(model, input_shape)
    by_name = {row.name: row for row in table}
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # FX raises many types for untraceable control flow
        raise ReleqError(f"{network}: torch.fx cannot trace the model ({str(exc).splitlines()[0]})") from None
    modules = dict(traced.named_modules())
    users = {node.name: len(node.users) for node in traced.graph.nodes}

    ops: list[GraphOp] = []
    shapes: dict[str, tuple[int, ...]] = {}
    alias: dict[str, str] = {}  # fx node -> the op that carries its value (identity ops, folded BN)
    folded: dict[int, str] = {}
    output = None

    def src(arg) -> str:
        if not isinstance(arg, fx.Node):
            raise ReleqError(f"{network}: a non-tensor argument {arg!r} reached a tensor operation")
        return alias.get(arg.name, arg.name)

    def emit(name: str, kind: str, inputs: tuple[str, ...], shape: tuple[int, ...], **attrs) -> None:
        ops.append(GraphOp(name, kind, inputs, tuple(int(s) for s in shape), attrs))
        shapes[name] = tuple(int(s) for s in shape)

    def unsupported(node: fx.Node, why: str = "") -> ReleqError:
        what = f"{network}: cannot compile {operator_name(node, modules)!r} at {node.name}"
        return ReleqError(f"{what}: {why}" if why else f"{what}; the operators compiled are {SUPPORTED}")

    def feature_map(node: fx.Node) -> tuple[str, tuple[int, int, int]]:
        x = src(node.args[0])
        if len(shapes[x]) != 3:
            raise unsupported(node, f"pools a tensor of shape {shapes[x]}, not (C, H, W)")
        return x, shapes[x]

    def max_pool(node: fx.Node, kernel, stride, padding, dilation, ceil_mode) -> None:
        if ceil_mode or _pair(dilation) != (1, 1):
            raise unsupported(node, "ceil_mode and dilation are not supported")
        x, (c, h, w) = feature_map(node)
        k, s, p = _pair(kernel), _pair(stride or kernel), _pair(padding)
        emit(node.name, "maxpool", (x,), (c, _pool_out(h, k[0], s[0], p[0]), _pool_out(w, k[1], s[1], p[1])),
             kernel=k, stride=s, padding=p)

    def avg_pool(node: fx.Node, kernel, stride, padding, ceil_mode, divisor_override) -> None:
        if _pair(padding) != (0, 0) or ceil_mode or divisor_override is not None:
            raise unsupported(node, "padding, ceil_mode and divisor_override are not supported")
        x, (c, h, w) = feature_map(node)
        k, s = _pair(kernel), _pair(stride or kernel)
        uniform_average(node, x, k, s, (c, _pool_out(h, k[0], s[0], 0), _pool_out(w, k[1], s[1], 0)))

    def adaptive_avg_pool(node: fx.Node, output_size) -> None:
        x, (c, h, w) = feature_map(node)
        size = _pair_none(output_size)
        oh, ow = (h if size[0] is None else int(size[0])), (w if size[1] is None else int(size[1]))
        if h % oh or w % ow:
            raise unsupported(node, f"{h}x{w} -> {oh}x{ow} has windows of unequal sizes")
        k = (h // oh, w // ow)
        uniform_average(node, x, k, k, (c, oh, ow))

    def uniform_average(node: fx.Node, x: str, kernel, stride, shape) -> None:
        if kernel == (1, 1) and stride == (1, 1):
            alias[node.name] = x  # a 1x1 average is the identity (AlexNet's AdaptiveAvgPool(6) at 224)
        else:
            emit(node.name, "avgpool", (x,), shape, kernel=kernel, stride=stride)

    for node in traced.graph.nodes:
        if node.op in ("call_module", "call_function") and not node.users and not node.all_input_nodes:
            continue  # a constant nothing reads (an ONNX converter leaves them behind)
        if node.op == "placeholder":
            if ops:
                raise unsupported(node, "only one network input is supported")
            emit(node.name, "input", (), input_shape)
        elif node.op == "output":
            output = src(node.args[0])
        elif node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                row = by_name.get(node.target)
                if row is None:
                    raise unsupported(node, "a weight layer that the layer table did not see run")
                if isinstance(module, nn.Conv2d) and (_pair(module.dilation) != (1, 1) or module.padding_mode != "zeros"):
                    raise unsupported(node, "only zero padding and dilation 1 are supported")
                x = src(node.args[0])
                shape = (row.out_channels, *row.out_size) if row.kind != "dense" else (row.out_channels,)
                if row.kind == "dense" and len(shapes[x]) != 1:
                    raise unsupported(node, "Linear on a tensor that is not flat; flatten it first")
                emit(node.name, "layer", (x,), shape, index=row.index)
            elif isinstance(module, nn.BatchNorm2d):
                prev = node.args[0]
                prev_op = ops[-1] if ops else None
                if (
                    isinstance(prev, fx.Node)
                    and prev_op is not None
                    and prev_op.kind == "layer"
                    and prev_op.name == src(prev)
                    and users[prev.name] == 1
                    and prev_op.attrs["index"] not in folded
                ):
                    folded[prev_op.attrs["index"]] = node.target
                    alias[node.name] = prev_op.name
                else:
                    raise unsupported(node, "BatchNorm2d must directly follow its Conv2d, which nothing else reads")
            elif _is_relu6(node, modules):
                x = src(node.args[0])
                emit(node.name, "relu6", (x,), shapes[x])
            elif isinstance(module, nn.ReLU):
                x = src(node.args[0])
                emit(node.name, "relu", (x,), shapes[x])
            elif isinstance(module, nn.MaxPool2d):
                max_pool(node, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
            elif isinstance(module, nn.AvgPool2d):
                avg_pool(node, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                         module.divisor_override)
            elif isinstance(module, nn.AdaptiveAvgPool2d):
                adaptive_avg_pool(node, module.output_size)
            elif isinstance(module, (nn.Dropout, nn.Identity)):
                alias[node.name] = src(node.args[0])
            elif isinstance(module, nn.Flatten):
                if module.start_dim != 1 or module.end_dim != -1:
                    raise unsupported(node, "only Flatten(1, -1) is supported")
                _emit_flatten(node, src(node.args[0]), shapes, emit)
            else:
                raise unsupported(node)
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if target in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
                a, b = src(node.args[0]), src(node.args[1])
                if shapes[a] != shapes[b]:
                    raise unsupported(node, f"add of shapes {shapes[a]} and {shapes[b]} (no broadcasting)")
                emit(node.name, "add", (a, b), shapes[a])
            elif target in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1 or len(node.args) > 2:
                    raise unsupported(node, "only flatten(x, 1) is supported")
                _emit_flatten(node, src(node.args[0]), shapes, emit)
            elif target in (torch.relu, nn.functional.relu, "relu"):
                x = src(node.args[0])
                emit(node.name, "relu", (x,), shapes[x])
            elif _is_relu6(node, modules):
                x = src(node.args[0])
                emit(node.name, "relu6", (x,), shapes[x])
            elif target is nn.functional.max_pool2d and not _argument(node, 6, "return_indices", False):
                max_pool(node, _argument(node, 1, "kernel_size"), _argument(node, 2, "stride"),
                         _argument(node, 3, "padding", 0), _argument(node, 4, "dilation", 1),
                         _argument(node, 5, "ceil_mode", False))
            elif target is nn.functional.avg_pool2d:
                avg_pool(node, _argument(node, 1, "kernel_size"), _argument(node, 2, "stride"),
                         _argument(node, 3, "padding", 0), _argument(node, 4, "ceil_mode", False),
                         _argument(node, 6, "divisor_override"))
            elif target is nn.functional.adaptive_avg_pool2d:
                adaptive_avg_pool(node, _argument(node, 1, "output_size"))
            elif target in _CONCAT:
                tensors = _argument(node, 0, "tensors")
                if not isinstance(tensors, (list, tuple)):
                    raise unsupported(node, "concatenates a value that is not a list of tensors")
                _emit_concat(node, [src(arg) for arg in tensors], _argument(node, 1, "dim", 0), shapes, emit, unsupported)
            else:
                raise unsupported(node)
        else:
            raise unsupported(node)

    if output is None:
        raise ReleqError(f"{network}: traced graph has no output")
    kept = [op for op in ops if op.kind == "layer"]
    if [op.attrs["index"] for op in kept] != list(range(len(table))):
        raise ReleqError(f"{network}: traced weight layers do not match the layer table order")
    net = NetworkGraph(tuple(ops), output, tuple(table), tuple(folded.get(i) for i in range(len(table))))
    for user in net.users(ops[0].name):
        if user.kind != "layer":
            raise ReleqError(f"{network}: the network input feeds {KIND_NAMES[user.kind]} at {user.name}; only Conv2d "
                             "and Linear may read it (the image is quantized on the host for them)")
    return net


def _pair_none(value):
    return (value, value) if value is None or isinstance(value, int) else tuple(value)


def _emit_flatten(node: fx.Node, x: str, shapes, emit) -> None:
    shape = shapes[x]
    if len(shape) == 1:
        return emit(node.name, "flatten", (x,), shape)
    size = 1
    for s in shape:
        size *= s
    emit(node.name, "flatten", (x,), (size,))


def _emit_concat(node: fx.Node, inputs: list[str], dim, shapes, emit, unsupported) -> None:
    """``torch.cat`` along the channel axis (axis 1 of (N, C, H, W) or of (N, features))."""
    ranks = {len(shapes[x]) for x in inputs}
    if len(ranks) != 1:
        raise unsupported(node, "concatenates tensors of different ranks")
    rank = ranks.pop() + 1  # the batch axis
    if not isinstance(dim, int) or dim % rank != 1:
        raise unsupported(node, f"concatenates along dim {dim}; only the channel dim 1 is supported")
    rest = {shapes[x][1:] for x in inputs}
    if len(rest) != 1:
        raise unsupported(node, f"concatenates tensors of sizes {' and '.join(str(shapes[x]) for x in inputs)}")
    emit(node.name, "concat", tuple(inputs), (sum(shapes[x][0] for x in inputs), *rest.pop()))
