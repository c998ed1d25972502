"""Apply a per-layer weight bit vector to a torch model (fake quantization with STE).

Quantization is a ``torch.nn.utils.parametrize`` parametrization on each weight layer's
``weight``: the float weights stay the trainable parameters, every forward pass sees their
quantized values, and removing the parametrization restores the float model untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from releq_tvm.config import BITS_MAX
from releq_tvm.networks import weight_modules
from releq_tvm.quant.quantizers import ste_quantize_weight


class WeightQuantizer(nn.Module):
    """Parametrization: WRPN mid-tread weights at ``bits`` (straight-through gradient)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ste_quantize_weight(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def apply_bits(model: nn.Module, bits: Sequence[int], input_shape: tuple[int, int, int]) -> nn.Module:
    """Quantize every weight layer of ``model`` in place to ``bits`` (one entry per layer, forward order).

    A layer at more than :data:`BITS_MAX` bits is left in float. Calling again replaces earlier bits.
    """
    layers = weight_modules(model, input_shape)
    if len(layers) != len(bits):
        raise ValueError(f"{len(bits)} bitwidths for {len(layers)} weight layers")
    remove_bits(model)
    for (_, module), b in zip(layers, bits):
        if int(b) <= BITS_MAX:
            parametrize.register_parametrization(module, "weight", WeightQuantizer(int(b)))
    return model


def remove_bits(model: nn.Module) -> nn.Module:
    """Drop every weight quantizer, keeping the float weights (the trained latent values)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model


def current_bits(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int | None, ...]:
    """The bits each weight layer runs at (None for float)."""
    out = []
    for _, module in weight_modules(model, input_shape):
        if parametrize.is_parametrized(module, "weight"):
            out.append(module.parametrizations.weight[0].bits)
        else:
            out.append(None)
    return tuple(out)
