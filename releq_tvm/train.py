"""Training, fine-tuning and evaluation of (fake-quantized) torch models, seeded and CPU-deterministic."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

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


def load_model(name: str, checkpoint: str | None = None) -> nn.Module:
    """The trained float model of ``name``: from ``checkpoint`` if given, else the shipped one.

    Raises a one-line error when neither exists (see :class:`MissingCheckpointError`).
    """
    from pathlib import Path

    from releq_tvm.errors import ReleqError
    from releq_tvm.networks import create_network

    if checkpoint is None:
        return create_network(name, pretrained=True)
    path = Path(checkpoint)
    if not path.is_file():
        raise ReleqError(f"checkpoint {path} does not exist; pass a file written by `releq-tvm train {name}`")
    model = create_network(name)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError) as exc:
        raise ReleqError(f"checkpoint {path} does not fit {name} ({str(exc).splitlines()[0]})") from None
    return model.eval()
