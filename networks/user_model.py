"""A user's own model, registered at run time so that every command taking NET takes it too.

Three ways in (``releq-tvm ... --model SOURCE``):

* an ONNX file (``.onnx``), converted to torch by ``onnx2torch``;
* a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``); its aten operations
  that have a torch module (``aten.conv2d`` -> ``nn.Conv2d``, ``aten.linear`` -> ``nn.Linear``,
  batch norm, ReLU, ReLU6, pools, flatten) become that module again, so the layer table and the
  integer lowering read it as they read a hand-written model;
* an entry point ``package.module:function`` returning an ``nn.Module`` (needs an input shape).

:func:`register_user_model` loads the model, checks that an input of the stated (or given)
shape runs through it and gives logits ``(N, classes)``, and registers it under the source's
name (``mycnn`` for ``mycnn.onnx``) with the trained weights in its builder and no dataset.
Whether the integer lowering supports its operators is the compile stage's to say
(``releq_tvm.compile.graph.extract_graph``); this package knows nothing of TVM.
Every problem a user can fix is a one-line :class:`ModelSourceError`.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import operator
import re
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from releq_tvm.networks.registry import NetworkSpec, get_network_spec, register_user_network

#: What ``--model`` takes, said in every error about its form.
SOURCE_FORMS = "a .onnx file, a .pt2 file (torch.export.save) or an entry point package.module:function"


class ModelSourceError(ValueError):
    """A user model that cannot be read or run; ``str()`` is one line saying what to fix."""

    def __str__(self) -> str:
        return self.args[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def model_name(source: str) -> str:
    """The network name of ``source``: the file's stem (``mycnn`` for ``dir/mycnn.onnx``) or the
    entry point's function (``small_cnn`` for ``pkg.models:small_cnn``), made safe for file names."""
    stem = source.rpartition(":")[2].rpartition(".")[2] if _is_entry_point(source) else Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"


def _is_entry_point(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", source) is not None and not Path(source).exists()


def load_user_model(source: str) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """``(model in eval mode, the (C, H, W) input shape the source states or None)`` of ``source``."""
    if _is_entry_point(source):
        return _call_entry_point(source), None
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".pt2"):
        raise ModelSourceError(f"--model {source}: expected {SOURCE_FORMS}")
    if not path.is_file():
        raise ModelSourceError(f"--model {source} does not exist; pass {SOURCE_FORMS}")
    return _read_onnx(path) if suffix == ".onnx" else _read_exported(path)


def register_user_model(source: str, input_shape: tuple[int, int, int] | None = None) -> NetworkSpec:
    """Load ``source`` (:func:`load_user_model`), check it and register it under :func:`model_name`.

    ``input_shape`` (C, H, W) is needed when the source states none, and must agree with the one
    it states. The model must map ``(N, C, H, W)`` images to logits ``(N, classes)`` at any batch
    size N. Loading the same source again replaces the earlier registration. Returns the spec.
    """
    name = model_name(source)
    try:
        clash = get_network_spec(name).source is None
    except KeyError:
        clash = False
    if clash:
        raise ModelSourceError(f"--model {source} would be named {name}, a registered network's name; rename the file")
    model, stated = load_user_model(source)
    if input_shape is not None and stated is not None and tuple(input_shape) != stated:
        raise ModelSourceError(f"--input-shape {_shape_text(input_shape)} disagrees with {source}, whose input is "
                               f"{_shape_text(stated)}; drop --input-shape")
    shape = tuple(input_shape) if input_shape is not None else stated
    if shape is None:
        raise ModelSourceError(f"{source} does not state its input shape; pass --input-shape C,H,W (e.g. 3,32,32)")
    file_name = None if _is_entry_point(source) else Path(source).name
    return register_model_object(name, model, shape, source, f"user model from {source}", file_name)


def register_model_object(name: str, model: nn.Module, input_shape: tuple[int, int, int], source: str,
                          description: str, checkpoint: str | None = None) -> NetworkSpec:
    """Register ``model`` under ``name`` once it is checked to run at ``input_shape`` and give logits;
    every :func:`create_network` of it is a copy. ``source`` names the model in messages and in the
    spec. A registered network's name raises ``ValueError`` (see :func:`register_user_network`)."""
    num_classes = _check_runs(model, input_shape, source)
    return register_user_network(NetworkSpec(
        name=name,
        builder=lambda: copy.deepcopy(model),
        input_shape=tuple(input_shape),
        dataset=None,
        num_classes=num_classes,
        description=description,
        checkpoint=checkpoint,
        source=source,
    ))


def _shape_text(shape) -> str:
    return ",".join(str(int(s)) for s in shape)


def _check_runs(model: nn.Module, shape: tuple[int, int, int], source: str) -> int:
    """The number of classes: the width of the logits of one image; batches of 1 and 2 must run."""
    for batch in (1, 2):
        try:
            with torch.no_grad():
                out = model(torch.zeros((batch, *shape)))
        except Exception as exc:  # any layer may refuse the shape, each with its own exception type
            if batch == 1:
                raise ModelSourceError(f"input shape {_shape_text(shape)} does not fit {source} ({_first_line(exc)}); "
                                       "pass the shape it was trained at with --input-shape C,H,W") from None
            raise ModelSourceError(f"{source} runs one image but not a batch of two ({_first_line(exc)}); flatten "
                                   "with torch.flatten(x, 1), not a reshape to a fixed batch size") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelSourceError(f"{source} must return logits (N, classes); for {batch} image(s) of shape "
                                   f"{_shape_text(shape)} it returns {got}")
    return int(out.shape[1])


# ---------------------------------------------------------------------------------------------
# entry points


def _call_entry_point(source: str) -> nn.Module:
    module_name, _, attr = source.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSourceError(f"--model {source}: cannot import {module_name} ({_first_line(exc)}); install it or "
                               "add its folder to PYTHONPATH") from None
    except Exception as exc:  # the user's module may raise anything while it is imported
        raise ModelSourceError(f"--model {source}: importing {module_name} failed ({_first_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelSourceError(f"--model {source}: {module_name} has no {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSourceError(f"--model {source}: {attr} is not a function")
    try:
        model = target()
    except Exception as exc:  # the user's function may raise anything
        raise ModelSourceError(f"--model {source}: calling {attr}() failed ({_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"--model {source}: {attr}() returned a {type(model).__name__}, not a torch nn.Module")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# ONNX files


def _read_onnx(path: Path) -> tuple[nn.Module, tuple[int, int, int] | None]:
    import onnx

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, ...: a damaged file
        raise ModelSourceError(f"{path} is not a valid ONNX model ({_first_line(exc)}); export it again") from None
    stated = _onnx_input_shape(proto, path)
    proto = _at_converter_opset(proto)
    try:
        from onnx2torch import convert
    except ImportError:
        raise ModelSourceError("reading ONNX files needs onnx2torch: pip install onnx2torch") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert(proto)
    except NotImplementedError as exc:
        raise ModelSourceError(_unconvertible(proto, path, exc)) from None
    except Exception as exc:  # the converter's own checks (attributes, shapes) raise several types
        raise ModelSourceError(f"{path}: onnx2torch cannot convert it ({_first_line(exc)})") from None
    return _with_torch_modules(converted), stated


#: The newest ONNX opset whose operators onnx2torch 1.5 converts: newer files are converted down to it.
ONNX2TORCH_OPSET = 18


def _at_converter_opset(proto):
    """``proto`` at opset :data:`ONNX2TORCH_OPSET` when it is newer (torch exports opset 20 today:
    onnx2torch knows no Reshape, Constant or Flatten past 18), else as it is."""
    import onnx.version_converter

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset <= ONNX2TORCH_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, ONNX2TORCH_OPSET)
    except Exception:  # no down adapter for some operator: convert as it is, onnx2torch names what it lacks
        return proto


def _onnx_input_shape(proto, path: Path) -> tuple[int, int, int] | None:
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ModelSourceError(f"{path} has {len(inputs)} inputs; a network here takes one image tensor (N, C, H, W)")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelSourceError(f"{path}: its input {inputs[0].name} has {len(dims)} axes, not 4 (N, C, H, W)")
    sizes = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]]
    return None if None in sizes else (sizes[0], sizes[1], sizes[2])


def _unconvertible(proto, path: Path, exc: NotImplementedError) -> str:
    """One line naming the ONNX operator onnx2torch has no conversion for, and its node."""
    found = re.search(r"operation_type='([^']+)'", str(exc))
    op_type = found.group(1) if found else None
    node = next((n for n in proto.graph.node if n.op_type == op_type), None)
    if op_type is None:
        return f"{path}: onnx2torch cannot convert it ({_first_line(exc)})"
    where = f" at node {node.name or '(unnamed)'}" if node is not None else ""
    return (f"{path}: unsupported operator {op_type}{where} (onnx2torch has no conversion for it); "
            "see the README's 'Your own model' for the operators releq-tvm compiles")


def _with_torch_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """onnx2torch's module with identifier names (``c1_Conv`` for the ONNX node ``/c1/Conv``), its
    global average pool as ``nn.AdaptiveAvgPool2d(1)`` and its concat as ``torch.cat``: the torch
    operations the integer lowering reads."""
    root: dict[str, object] = {}
    taken: set[str] = set()
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if type(module).__name__.startswith("OnnxConcat"):  # torch.cat(inputs, axis) as a module
                node.op, node.target, node.args = "call_function", torch.cat, (list(node.args), module.axis)
                continue
            if type(module).__name__.startswith("OnnxGlobalAveragePool"):
                module = nn.AdaptiveAvgPool2d(1)
            node.target = _unique(_identifier(node.target), taken)
            root[node.target] = module
        elif node.op == "get_attr":
            root[node.target] = _fetch(gm, node.target)
    return fx.GraphModule(root, graph, class_name=type(gm).__name__).eval()


def _identifier(name: str) -> str:
    text = re.sub(r"\W+", "_", name).strip("_") or "op"
    return f"m_{text}" if text[0].isdigit() else text


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _fetch(gm: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


# ---------------------------------------------------------------------------------------------
# torch.export programs


def _read_exported(path: Path) -> tuple[nn.Module, tuple[int, int, int] | None]:
    # torch.export.load logs each failed reading attempt with its traceback before it raises
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    try:
        export_log.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
            gm = program.module()
    except Exception as exc:  # zipfile, pickle and torch errors for a damaged file
        raise ModelSourceError(f"{path} is not a readable torch.export program ({_first_line(exc)}); save it again "
                               "with torch.export.save") from None
    finally:
        export_log.setLevel(level)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelSourceError(f"{path} takes {len(inputs)} inputs; a network here takes one image tensor (N, C, H, W)")
    val = inputs[0].meta.get("val")
    if val is None or val.dim() != 4:
        raise ModelSourceError(f"{path}: its input is not an image tensor (N, C, H, W)")
    stated = tuple(int(s) for s in val.shape[1:])
    return _modules_from_aten(gm, path), stated


def _arguments(node: fx.Node) -> dict:
    """The aten operator's arguments by schema name, defaults filled in."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        else:
            values[arg.name] = arg.default_value if arg.has_default_value() else None
    return values


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _modules_from_aten(gm: fx.GraphModule, path: Path) -> fx.GraphModule:
    """The exported graph with each aten operation that has a torch module replaced by the module.

    Operations without one are kept as they are, for the integer lowering to accept or refuse.
    The export's input guard (a fixed batch size) is dropped: the modules run at any batch size.
    """
    build = _GraphBuilder()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            build.env[node] = build.graph.placeholder(node.name)
            build.env[node].meta = dict(node.meta)
        elif node.op == "get_attr":
            build.attrs[node] = _fetch(gm, node.target)  # put in the new graph only where an operation reads it
        elif node.op in ("call_module", "call_function") and not node.users:
            continue  # the export's guard on the input's shape; the unused outputs of batch norm
        elif _transposed_weight(node, build):
            continue  # read by the addmm it feeds (core ATen's linear)
        elif node.op == "output":
            result = node.args[0]
            if isinstance(result, (tuple, list)):
                if len(result) != 1:
                    raise ModelSourceError(f"{path} returns {len(result)} outputs; a network here returns one (logits)")
                result = result[0]
            build.graph.output(build.arg(result))
        else:
            replaced = _as_torch_module(node, build)
            if replaced is None and any(build.tensor(x) is not None for x in node.all_input_nodes):
                # only conv, linear and batch norm carry weights into the integer network
                raise ModelSourceError(f"{path}: unsupported operator {node.target} with weights at node {node.name}")
            build.env[node] = build.graph.node_copy(node, build.arg) if replaced is None else replaced
    return fx.GraphModule(build.root, build.graph, class_name="ExportedModel").eval()


class _GraphBuilder:
    """The new graph, the modules and tensors it names, and the old node -> new node map."""

    def __init__(self):
        self.graph = fx.Graph()
        self.root: dict[str, object] = {}
        self.taken: set[str] = set()
        self.env: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[fx.Node, object] = {}  # old get_attr node -> its value (a weight, a constant)

    def name(self, text: str) -> str:
        return _unique(_identifier(text), self.taken)

    def arg(self, node):
        if isinstance(node, (tuple, list)):
            return type(node)(self.arg(x) for x in node)
        if not isinstance(node, fx.Node):
            return node
        if node not in self.env and node in self.attrs:
            name = self.name(node.target)
            self.root[name] = self.attrs[node]
            self.env[node] = self.graph.get_attr(name)
        return self.env[node]

    def tensor(self, node) -> torch.Tensor | None:
        value = self.attrs.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, torch.Tensor) else None

    def module(self, name: str, mod: nn.Module, x) -> fx.Node:
        name = self.name(name)
        self.root[name] = mod
        return self.graph.call_module(name, (self.arg(x),))


def _transposed_weight(node: fx.Node, build: _GraphBuilder) -> bool:
    """``permute(weight, [1, 0])`` feeding only ``addmm``: core ATen's linear, replaced as a whole."""
    aten = torch.ops.aten
    return (node.target is aten.permute.default and build.tensor(node.args[0]) is not None
            and all(user.target is aten.addmm.default for user in node.users))


def _weight_owner(node: fx.Node) -> str:
    """``features.0`` for the layer whose weight is the get_attr ``features.0.weight``."""
    return node.target.rpartition(".")[0] or node.target


def _as_torch_module(node: fx.Node, build: _GraphBuilder) -> fx.Node | None:
    """The new node standing for the aten ``node`` (a torch module, or its input for an identity),
    or None to keep it as it is."""
    aten = torch.ops.aten
    t = node.target
    if node.op != "call_function":
        return None
    bn_legit = aten._native_batch_norm_legit_no_training.default
    if t is operator.getitem and getattr(node.args[0], "target", None) in (bn_legit, aten.max_pool2d_with_indices.default):
        return build.arg(node.args[0]) if node.args[1] == 0 else None  # the value; the other outputs are unused
    if not isinstance(t, torch._ops.OpOverload):
        return None
    a = _arguments(node)
    if t is aten.conv2d.default or (t is aten.convolution.default and not a["transposed"]):
        w, b = build.tensor(a["weight"]), build.tensor(a["bias"])
        if w is None or w.dim() != 4 or (a["bias"] is not None and b is None):
            return None
        groups = int(a["groups"])
        conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(a["stride"]),
                         padding=tuple(a["padding"]), dilation=tuple(a["dilation"]), groups=groups, bias=b is not None)
        _load(conv, weight=w, bias=b)
        return build.module(_weight_owner(a["weight"]), conv, a["input"])
    if t is aten.linear.default:
        w, b = build.tensor(a["weight"]), build.tensor(a["bias"])
        if w is None or (a["bias"] is not None and b is None):
            return None
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        _load(linear, weight=w, bias=b)
        return build.module(_weight_owner(a["weight"]), linear, a["input"])
    if t is aten.addmm.default and getattr(a["mat2"], "target", None) is aten.permute.default:
        # core ATen's linear: addmm(bias, x, permute(weight, [1, 0]))
        transposed = a["mat2"]
        w, b = build.tensor(transposed.args[0]), build.tensor(a["self"])
        if w is None or b is None or list(transposed.args[1]) != [1, 0] or a["beta"] != 1 or a["alpha"] != 1:
            return None
        linear = nn.Linear(w.shape[1], w.shape[0])
        _load(linear, weight=w, bias=b)
        return build.module(_weight_owner(transposed.args[0]), linear, a["mat1"])
    if t in (aten.batch_norm.default, bn_legit):
        mean, var = build.tensor(a["running_mean"]), build.tensor(a["running_var"])
        w, b = build.tensor(a["weight"]), build.tensor(a["bias"])
        if a.get("training") or mean is None or var is None or (w is None) != (b is None):
            return None
        bn = nn.BatchNorm2d(mean.shape[0], eps=float(a["eps"]), affine=w is not None)
        _load(bn, weight=w, bias=b, running_mean=mean, running_var=var)
        return build.module(_weight_owner(a["running_mean"]), bn.eval(), a["input"])
    if t in (aten.relu.default, aten.relu_.default):
        return build.module(node.name, nn.ReLU(), a["self"])
    if t in (aten.relu6.default, aten.relu6_.default):
        return build.module(node.name, nn.ReLU6(), a["self"])
    if t in (aten.hardtanh.default, aten.hardtanh_.default):
        lo, hi = float(a["min_val"]), float(a["max_val"])
        return build.module(node.name, nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi), a["self"])
    if t in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default):
        k = tuple(a["kernel_size"])
        pool = nn.MaxPool2d(k, tuple(a["stride"]) or k, tuple(a["padding"]), tuple(a["dilation"]),
                            ceil_mode=bool(a["ceil_mode"]))
        return build.module(node.name, pool, a["self"])
    if t is aten.avg_pool2d.default:
        k = tuple(a["kernel_size"])
        pool = nn.AvgPool2d(k, tuple(a["stride"]) or k, tuple(a["padding"]), ceil_mode=bool(a["ceil_mode"]),
                            count_include_pad=bool(a["count_include_pad"]), divisor_override=a["divisor_override"])
        return build.module(node.name, pool, a["self"])
    if t is aten.adaptive_avg_pool2d.default:
        return build.module(node.name, nn.AdaptiveAvgPool2d(tuple(a["output_size"])), a["self"])
    before, after = _shape(node.args[0]), _shape(node)
    if t is aten.mean.dim and before is not None and len(before) == 4 and a["dtype"] is None \
            and sorted(int(d) % 4 for d in a["dim"]) == [2, 3]:
        pooled = build.module(node.name, nn.AdaptiveAvgPool2d(1), a["self"])
        if a["keepdim"]:
            return pooled
        name = build.name(f"{node.name}_flatten")
        build.root[name] = nn.Flatten()
        return build.graph.call_module(name, (pooled,))
    if t is aten.add.Tensor and isinstance(a["other"], fx.Node) and a["alpha"] == 1:
        return build.graph.call_function(operator.add, (build.arg(a["self"]), build.arg(a["other"])))
    flat = before is not None and len(before) >= 2 and after == (before[0], math.prod(before[1:]))
    if t in (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default) and flat:
        return build.module(node.name, nn.Flatten(), a["self"])
    if t in (aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default):
        return build.arg(node.args[0])
    return None


def _load(mod: nn.Module, **tensors) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(mod, name).copy_(value)
