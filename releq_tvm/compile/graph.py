"""A network as a short list of integer-friendly operations, read from the torch model by FX.

``torch.fx.symbolic_trace`` turns any registered network (``nn.Sequential`` stacks, the ResNet
with its residual adds, torchvision's AlexNet) into a graph of module calls. :func:`extract_graph`
walks it once and keeps what the integer network needs to know:

* ``layer``   a Conv2d / Linear (one row of the layer table, same order), with the BatchNorm2d
              that directly follows it folded in (its input quantizer is part of the layer);
* ``relu``, ``maxpool``, ``avgpool`` (a uniform average: AdaptiveAvgPool2d whose output size
  divides its input, or AvgPool2d without padding), ``add`` (residual), ``flatten``;
* Dropout and Identity disappear (inference).

Anything else raises :class:`ReleqError` naming the node, so a new network fails loudly at
compile time rather than computing something else. This module needs torch only (no TVM).
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
    kind: str  # "input" | "layer" | "relu" | "maxpool" | "avgpool" | "add" | "flatten"
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
        what = node.target if node.op != "call_module" else type(modules[node.target]).__name__
        return ReleqError(f"{network}: cannot compile {node.op} {what!r} at {node.name}{': ' + why if why else ''}")

    for node in traced.graph.nodes:
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
                    raise unsupported(node, "weight layer missing from the layer table")
                if isinstance(module, nn.Conv2d) and (_pair(module.dilation) != (1, 1) or module.padding_mode != "zeros"):
                    raise unsupported(node, "only zero padding without dilation is supported")
                x = src(node.args[0])
                shape = (row.out_channels, *row.out_size) if row.kind != "dense" else (row.out_channels,)
                if row.kind == "dense" and len(shapes[x]) != 1:
                    raise unsupported(node, "Linear on a tensor that is not flat")
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
                    raise unsupported(node, "batch norm must directly follow its conv")
            elif isinstance(module, nn.ReLU):
                x = src(node.args[0])
                emit(node.name, "relu", (x,), shapes[x])
            elif isinstance(module, nn.MaxPool2d):
                if module.ceil_mode or _pair(module.dilation) != (1, 1):
                    raise unsupported(node, "ceil_mode / dilation")
                x = src(node.args[0])
                k, s, p = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), _pair(module.padding)
                c, h, w = shapes[x]
                emit(node.name, "maxpool", (x,), (c, _pool_out(h, k[0], s[0], p[0]), _pool_out(w, k[1], s[1], p[1])),
                     kernel=k, stride=s, padding=p)
            elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
                x = src(node.args[0])
                c, h, w = shapes[x]
                if isinstance(module, nn.AdaptiveAvgPool2d):
                    size = _pair_none(module.output_size)
                    oh, ow = (h if size[0] is None else int(size[0])), (w if size[1] is None else int(size[1]))
                    if h % oh or w % ow:
                        raise unsupported(node, f"adaptive pool {h}x{w} -> {oh}x{ow} has unequal windows")
                    k = (h // oh, w // ow)
                    s = k
                else:
                    k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
                    if _pair(module.padding) != (0, 0) or module.ceil_mode:
                        raise unsupported(node, "padded or ceil_mode average pooling")
                    oh, ow = _pool_out(h, k[0], s[0], 0), _pool_out(w, k[1], s[1], 0)
                if k == (1, 1) and s == (1, 1):
                    alias[node.name] = x  # a 1x1 average is the identity (AlexNet's AdaptiveAvgPool(6) at 224)
                else:
                    emit(node.name, "avgpool", (x,), (c, oh, ow), kernel=k, stride=s)
            elif isinstance(module, (nn.Dropout, nn.Identity)):
                alias[node.name] = src(node.args[0])
            elif isinstance(module, nn.Flatten):
                if module.start_dim != 1 or module.end_dim != -1:
                    raise unsupported(node, "only flatten(1) is supported")
                _emit_flatten(node, src(node.args[0]), shapes, emit)
            else:
                raise unsupported(node)
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if target in (operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs:
                a, b = src(node.args[0]), src(node.args[1])
                if shapes[a] != shapes[b]:
                    raise unsupported(node, f"add of shapes {shapes[a]} and {shapes[b]}")
                emit(node.name, "add", (a, b), shapes[a])
            elif target in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1 or len(node.args) > 2:
                    raise unsupported(node, "only flatten(x, 1) is supported")
                _emit_flatten(node, src(node.args[0]), shapes, emit)
            elif target in (torch.relu, nn.functional.relu, "relu"):
                x = src(node.args[0])
                emit(node.name, "relu", (x,), shapes[x])
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
            raise ReleqError(f"{network}: the network input feeds {user.kind} {user.name}; only weight layers may read it")
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
