"""Training, fine-tuning and evaluation of (fake-quantized) torch models, seeded and CPU-deterministic."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

import torch
from torch import nn

from releq_tvm.config import DEFAULTS
from releq_tvm.data import TensorDataset
from releq_tvm.progress import progress_bar
from releq_tvm.quant import apply_act_bits, apply_bits, calibrate_input_ranges


def model_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a model's state_dict: names, shapes and values.

    The one digest of a model's weights: every cache keyed by a model (the search's fine-tuned
    accuracies, the report's accuracies) uses it, so one model has one key everywhere.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            logits = model(data.images[start : start + batch_size])
            correct += int((logits.argmax(1) == data.labels[start : start + batch_size]).sum())
    return 100.0 * correct / max(1, len(data))


def train_steps(
    model: nn.Module,
    data: TensorDataset,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """``steps`` Adam steps with a cosine learning-rate decay; batches drawn with a seeded generator.

    Works for float and fake-quantized models alike (the quantizer's STE carries the gradient);
    every parameter that requires a gradient is trained, the learned clipping levels of the
    activation quantizers (children of the model) included.
    ``progress(step, loss)`` is called after every step. Without it, a run longer than the
    search's short fine-tune (``DEFAULTS.finetune.short_steps``) shows a progress bar on a
    terminal; the short fine-tunes, one per search step, stay quiet.
    """
    if steps <= 0:
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = len(data)
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    step_range: Iterable[int] = range(steps)
    if progress is None and steps > DEFAULTS.finetune.short_steps:
        step_range = progress_bar(step_range, "train", unit="step")
    for step in step_range:
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        loss = loss_fn(model(data.images[idx]), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


def finetune_bits(
    model: nn.Module,
    bits: Sequence[int],
    input_shape: tuple[int, int, int],
    data: TensorDataset,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    act_bits: Sequence[int] | None = None,
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """Quantize ``model`` in place to ``bits`` and fine-tune it for ``steps`` steps (0: no fine-tune).

    With ``act_bits`` each weight layer's input is quantized too (:func:`apply_act_bits`), its
    clipping level calibrated on the float model over ``calibration`` (images, required then)
    and trained with the weights; the image entering the first layer keeps the fixed range [0, 1].
    """
    if act_bits is not None:
        if calibration is None:
            raise ValueError("act_bits needs calibration images to start the clipping levels from")
        ranges, learn = calibrate_input_ranges(model, input_shape, calibration)
        apply_act_bits(model, act_bits, input_shape, ranges, learn)
    apply_bits(model, bits, input_shape)
    return train_steps(model, data, steps, lr=lr, batch_size=batch_size, seed=seed)


#: The ``format`` entry of a fine-tuned model file (:func:`save_finetuned`); :func:`read_model_file`
#: reads version :data:`FINETUNED_VERSION` and refuses others.
FINETUNED_FORMAT = "releq-tvm fine-tuned model"
FINETUNED_VERSION = 1

_WEIGHT_ORIGINAL = ".parametrizations.weight.original"


def _float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each quantized weight under its plain name (``<layer>.weight``),
    holding the float latent values the quantizer reads: what :func:`remove_bits` would leave."""
    return {
        (key[: -len(_WEIGHT_ORIGINAL)] + ".weight" if key.endswith(_WEIGHT_ORIGINAL) else key): t.detach().cpu().clone()
        for key, t in model.state_dict().items()
    }


def save_finetuned(path, model: nn.Module, network: str, input_shape: tuple[int, int, int], about: dict | None = None) -> Path:
    """Write the fake-quantized ``model`` (after :func:`finetune_bits` or a search's fine-tune) to ``path``.

    The file is one ``torch.save`` of a dict (readable with ``torch.load(..., weights_only=True)``):

    * ``format``: :data:`FINETUNED_FORMAT`, ``version``: :data:`FINETUNED_VERSION`, ``network``;
    * ``w_bits``: the weight bits of every layer (forward order), read off the model's quantizers;
    * ``a_bits``: the activation bits of every layer's input, or None (float activations);
    * ``act_learned``: per layer, whether its clipping level was trained (False for the image), or None;
    * ``state_dict``: the float (latent) weights under their plain names (``<layer>.weight``, as in
      a ``releq-tvm train`` checkpoint) plus every ``<layer>.act_quantizer.alpha_init`` and
      ``.alpha_factor`` (the learned clipping level is their product);
    * ``about``: how it was made (command, steps, accuracies), for humans.

    Every weight layer must carry a weight quantizer; activation quantizers on every layer or none.
    The write is atomic. Returns the path.
    """
    import io

    from releq_tvm.io import atomic_write_bytes
    from releq_tvm.networks import weight_modules
    from releq_tvm.quant import act_quantizers, current_act_bits, current_bits

    w_bits = current_bits(model, input_shape)
    a_bits = current_act_bits(model, input_shape)
    if None in w_bits:
        raise ValueError(f"every weight layer must be quantized to save a fine-tuned model; bits {w_bits}")
    if None in a_bits and any(b is not None for b in a_bits):
        raise ValueError(f"activation quantizers on some layers only ({a_bits}) cannot be saved")
    carried = act_quantizers(model)
    learned = [carried[name].learned for name, _ in weight_modules(model, input_shape)] if carried else None
    blob = {
        "format": FINETUNED_FORMAT,
        "version": FINETUNED_VERSION,
        "network": network,
        "w_bits": [int(b) for b in w_bits],
        "a_bits": [int(b) for b in a_bits] if carried else None,
        "act_learned": learned,
        "state_dict": _float_state_dict(model),
        "about": dict(about or {}),
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


@dataclass
class ModelFile:
    """A model read from a checkpoint file (:func:`read_model_file`).

    ``model`` has float weights and, from a fine-tuned file with activation bits, the input
    quantizers it was fine-tuned with (learned clipping levels); ``w_bits`` / ``a_bits`` are the
    bits it was fine-tuned at (None: a plain state_dict, or float activations).
    """

    path: str
    model: nn.Module
    w_bits: tuple[int, ...] | None = None
    a_bits: tuple[int, ...] | None = None
    about: dict = field(default_factory=dict)

    def bits_in_force(self, w_bits: Sequence[int] | None, a_bits: Sequence[int] | None):
        """``(w_bits, a_bits)``: the given ones, else the file's (None where neither says).

        Raises a one-line :class:`ReleqError` when a given vector differs from the bits the file
        was fine-tuned at. Activation bits given for a file fine-tuned with float activations are
        kept (their ranges are then calibrated, as for a plain checkpoint).
        """
        from releq_tvm.bits import format_bits
        from releq_tvm.errors import ReleqError

        for given, saved, option, what in ((w_bits, self.w_bits, "--bits", "weight"),
                                           (a_bits, self.a_bits, "--act-bits", "activation")):
            if given is not None and saved is not None and tuple(given) != tuple(saved):
                raise ReleqError(f"{option} {format_bits(given)} disagrees with {self.path}, fine-tuned at {what} bits "
                                 f"{format_bits(saved)}; drop {option} to use the file's")
        return (tuple(w_bits) if w_bits is not None else self.w_bits,
                tuple(a_bits) if a_bits is not None else self.a_bits)


class NetworkBits(NamedTuple):
    """The bits a command runs ``network`` at, and where each vector came from."""

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    w_source: str  # "given", "checkpoint" or "published"
    a_source: str  # "given", "checkpoint" or "default" (DEFAULT_ACT_BITS)


def network_bits(network: str, bits=None, act_bits=None, checkpoint: str | None = None) -> NetworkBits:
    """The weight and activation bits of ``network``: as given (text or ints), else the bits a
    fine-tuned ``checkpoint`` was trained at (``releq-tvm finetune -o``, a search's finetuned.pt;
    given bits must agree with it), else the published weight bits and
    :data:`releq_tvm.config.DEFAULT_ACT_BITS`; checked by :func:`releq_tvm.bits.parse_bits`. A
    network without published bits and none given is a one-line error."""
    from releq_tvm.bits import parse_bits
    from releq_tvm.config import DEFAULT_ACT_BITS
    from releq_tvm.errors import ReleqError
    from releq_tvm.networks import get_network_spec, layer_table

    spec = get_network_spec(network)  # UnknownNetworkError names the registered networks
    n = len(layer_table(network))
    w = None if bits is None else parse_bits(bits, n, network, what="--bits")
    a = None if act_bits is None else parse_bits(act_bits, n, network, what="--act-bits")
    w_source, a_source = ("given" if w is not None else "published"), ("given" if a is not None else "default")
    if checkpoint is not None:
        file_w, file_a = read_model_file(network, checkpoint).bits_in_force(w, a)
        w_source = "checkpoint" if w is None and file_w is not None else w_source
        a_source = "checkpoint" if a is None and file_a is not None else a_source
        w, a = file_w, file_a
    if w is None:
        if spec.published_bits is None:
            raise ReleqError(f"{network} has no published bitwidths; pass --bits with {n} values")
        w = parse_bits(list(spec.published_bits), n, network)
    if a is None:
        a = parse_bits([DEFAULT_ACT_BITS], n, network, what="--act-bits")
    return NetworkBits(tuple(w), tuple(a), w_source, a_source)


def read_model_file(name: str, checkpoint=None) -> ModelFile:
    """Read ``checkpoint`` for network ``name``: a plain state_dict (``releq-tvm train``) or a
    fine-tuned model (:func:`save_finetuned`); None: the shipped checkpoint. A missing, corrupt or
    foreign file is a one-line :class:`ReleqError` (no shipped one: :class:`MissingCheckpointError`).
    """
    from releq_tvm.bits import parse_bits
    from releq_tvm.errors import ReleqError
    from releq_tvm.networks import create_network, get_network_spec, weight_modules
    from releq_tvm.quant import apply_act_bits

    if checkpoint is None:
        return ModelFile(f"shipped checkpoint of {name}", create_network(name, pretrained=True))
    path = Path(checkpoint)
    made_by = f"`releq-tvm train {name}` or `releq-tvm finetune {name} ... -o FILE`"
    if not path.is_file():
        raise ReleqError(f"checkpoint {path} does not exist; pass a file written by {made_by}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file (and long texts): one line to the user
        raise ReleqError(f"checkpoint {path} is corrupt or not a model checkpoint (torch.load failed with "
                         f"{type(exc).__name__}); pass a file written by {made_by}") from None
    model = create_network(name)
    w_bits = a_bits = None
    about: dict = {}
    if isinstance(blob, dict) and "format" in blob:
        if blob.get("format") != FINETUNED_FORMAT or blob.get("version") != FINETUNED_VERSION:
            raise ReleqError(f"checkpoint {path} has format {blob.get('format')!r} version {blob.get('version')!r}; "
                             f"this release reads {FINETUNED_FORMAT!r} version {FINETUNED_VERSION} and plain state_dicts")
        if blob.get("network") != name:
            raise ReleqError(f"checkpoint {path} holds a fine-tuned {blob.get('network')}, not {name}")
        try:
            state, about = blob["state_dict"], dict(blob.get("about") or {})
            input_shape = get_network_spec(name).input_shape
            n = len(weight_modules(model, input_shape))
            w_bits = parse_bits(list(blob["w_bits"]), n, name, what=f"checkpoint {path}: w_bits")
            if blob["a_bits"] is not None:
                a_bits = parse_bits(list(blob["a_bits"]), n, name, what=f"checkpoint {path}: a_bits")
                # placeholder levels: load_state_dict below sets each alpha_init and alpha_factor
                apply_act_bits(model, a_bits, input_shape, [1.0] * n, [bool(f) for f in blob["act_learned"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleqError(f"checkpoint {path} is a damaged fine-tuned model file ({exc})") from None
    elif isinstance(blob, dict) and blob and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        state = blob
    else:
        raise ReleqError(f"checkpoint {path} is not a model checkpoint (a {type(blob).__name__}); pass a file written by {made_by}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ReleqError(f"checkpoint {path} does not fit {name} ({str(exc).splitlines()[0]})") from None
    return ModelFile(str(path), model.eval(), w_bits, a_bits, about)


def load_model(name: str, checkpoint: str | None = None) -> nn.Module:
    """The trained model of ``name``: from ``checkpoint`` if given, else the shipped one.

    The weights are float; a fine-tuned file (:func:`save_finetuned`) with activation bits also
    gives the input quantizers it learned (see :func:`read_model_file` for its bits). Raises a
    one-line error when neither exists (see :class:`MissingCheckpointError`).
    """
    return read_model_file(name, checkpoint).model
