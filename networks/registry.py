"""Network registry (timm-style): ``register_network`` / ``create_network`` / ``list_networks``.

Each entry knows its torch builder, input shape, dataset and the published bitwidths of
METHOD.md section 6. The weight-layer table is never typed: :func:`layer_table` traces the
model with forward hooks and reads every Conv2d / Linear that runs, in execution order.
This package knows nothing of TVM or RL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn


class UnknownNetworkError(KeyError):
    """Raised for a name that is not registered; ``str()`` is a one-line, actionable message."""

    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return self.args[0]


@dataclass(frozen=True)
class LayerSpec:
    """One weight layer as it runs in the model (sizes in elements, MACs per image)."""

    index: int
    name: str  # module path inside the model, e.g. "features.0"
    kind: str  # "conv" | "dwconv" | "dense"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    in_size: tuple[int, int]  # input feature map (H, W); (1, 1) for dense
    out_size: tuple[int, int]  # output feature map (H, W); (1, 1) for dense
    n_weights: int
    macs: int
    has_bias: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network: how to build it and what the paper published for it."""

    name: str
    builder: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W), batch excluded
    dataset: str | None  # None: a user's model, whose data the tool does not know
    num_classes: int
    description: str
    published_bits: tuple[int, ...] | None = None
    #: Published list as printed, when it does not map one-to-one on the weight layers.
    published_bits_raw: tuple[int, ...] | None = None
    #: How ``published_bits_raw`` maps onto the layers (said in every report that uses it).
    published_bits_note: str = ""
    checkpoint: str | None = None  # file name under networks/checkpoints (a user model: its file's name)
    #: A user's model (``--model``, :mod:`releq_tvm.networks.user_model`): the file or entry point
    #: it came from. Its builder returns the trained model, so it needs no shipped checkpoint.
    source: str | None = None


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    dataset: str,
    num_classes: int,
    description: str,
    published_bits: tuple[int, ...] | None = None,
    published_bits_raw: tuple[int, ...] | None = None,
    published_bits_note: str = "",
    checkpoint: str | None = None,
):
    """Decorator: register a zero-argument model builder under ``name``."""

    def decorate(builder: Callable[[], nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} registered twice")
        _REGISTRY[name] = NetworkSpec(
            name=name,
            builder=builder,
            input_shape=input_shape,
            dataset=dataset,
            num_classes=num_classes,
            description=description,
            published_bits=published_bits,
            published_bits_raw=published_bits_raw,
            published_bits_note=published_bits_note,
            checkpoint=checkpoint,
        )
        return builder

    return decorate


def register_user_network(spec: NetworkSpec) -> NetworkSpec:
    """Register a user's model (``spec.source`` set) at run time; it replaces an earlier one of its name.

    A registered network's name is refused (ValueError): a user model never shadows one.
    """
    if spec.source is None:
        raise ValueError(f"{spec.name}: a user network needs its source")
    old = _REGISTRY.get(spec.name)
    if old is not None and old.source is None:
        raise ValueError(f"{spec.name!r} is a registered network's name")
    _REGISTRY[spec.name] = spec
    _TABLE_CACHE.pop(spec.name, None)  # the table of the model it replaces
    return spec


def list_networks() -> list[str]:
    return list(_REGISTRY)


def get_network_spec(name: str) -> NetworkSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNetworkError(
            f"unknown network {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None


def checkpoint_path(name: str):
    """Path of the file with the trained weights of ``name``: its shipped checkpoint or, for a user
    model, its ONNX / .pt2 file; None when there is none (an entry point's model is built by code)."""
    spec = get_network_spec(name)
    if spec.checkpoint is None:
        return None
    if spec.source is not None:
        return Path(spec.source)
    path = resources.files("releq_tvm.networks") / "checkpoints" / spec.checkpoint
    return path if path.is_file() else None


class MissingCheckpointError(FileNotFoundError):
    def __str__(self) -> str:
        return self.args[0]


def create_network(name: str, pretrained: bool = False, seed: int = 0) -> nn.Module:
    """Build ``name`` in eval mode; ``pretrained`` loads its shipped checkpoint.

    Without ``pretrained`` the weights are the seeded default initialisation, so two calls
    give the same model. A user model (``spec.source``) always comes with its own weights.
    """
    spec = get_network_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.builder()
    if pretrained and spec.source is None:
        path = checkpoint_path(name)
        if path is None:
            raise MissingCheckpointError(
                f"no trained checkpoint ships for {name}; train one with "
                f"`releq-tvm train {name} --data-dir DIR` or pass --checkpoint FILE"
            )
        with resources.as_file(path) as p:
            state = torch.load(p, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def weight_modules(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of every Conv2d / Linear, in the order they run."""
    modules = dict(model.named_modules())
    return [(row.name, modules[row.name]) for row in _trace(model, input_shape)]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _trace(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerSpec]:
    names = {m: n for n, m in model.named_modules()}
    rows: list[LayerSpec] = []
    seen: set[int] = set()

    def hook(module, inputs, output):
        if id(module) in seen:
            return  # a module reused twice would be one weight layer, counted once
        seen.add(id(module))
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = _pair(module.kernel_size)
            groups = module.groups
            depthwise = groups > 1 and groups == module.in_channels
            out_hw = (int(output.shape[2]), int(output.shape[3]))
            n_w = module.weight.numel()
            macs = out_hw[0] * out_hw[1] * module.out_channels * (module.in_channels // groups) * kh * kw
            rows.append(
                LayerSpec(
                    index=len(rows),
                    name=names[module],
                    kind="dwconv" if depthwise else "conv",
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    kernel=(kh, kw),
                    stride=_pair(module.stride),
                    padding=_pair(module.padding),
                    groups=groups,
                    in_size=(int(x.shape[2]), int(x.shape[3])),
                    out_size=out_hw,
                    n_weights=n_w,
                    macs=macs,
                    has_bias=module.bias is not None,
                )
            )
        else:
            rows.append(
                LayerSpec(
                    index=len(rows),
                    name=names[module],
                    kind="dense",
                    in_channels=module.in_features,
                    out_channels=module.out_features,
                    kernel=(1, 1),
                    stride=(1, 1),
                    padding=(0, 0),
                    groups=1,
                    in_size=(1, 1),
                    out_size=(1, 1),
                    n_weights=module.weight.numel(),
                    macs=module.in_features * module.out_features,
                    has_bias=module.bias is not None,
                )
            )

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return rows


_TABLE_CACHE: dict[str, list[LayerSpec]] = {}


def layer_table(name_or_model: str | nn.Module, input_shape: tuple[int, int, int] | None = None) -> list[LayerSpec]:
    """The weight-layer table, traced from the model (cached per registered name)."""
    if isinstance(name_or_model, str):
        if name_or_model not in _TABLE_CACHE:
            spec = get_network_spec(name_or_model)
            _TABLE_CACHE[name_or_model] = _trace(create_network(name_or_model), spec.input_shape)
        return list(_TABLE_CACHE[name_or_model])
    return _trace(name_or_model, input_shape)


def total_macs(table: list[LayerSpec]) -> int:
    return sum(r.macs for r in table)


def total_weights(table: list[LayerSpec]) -> int:
    return sum(r.n_weights for r in table)
