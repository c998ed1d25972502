"""Apply per-layer weight and activation bit vectors to a torch model (fake quantization with STE).

Quantization is a ``torch.nn.utils.parametrize`` parametrization on each weight layer's
``weight``: the float weights stay the trainable parameters, every forward pass sees their
quantized values, and removing the parametrization restores the float model untouched.

Activations are quantized at each weight layer's input by a :class:`PactActivation` the layer
carries as a child module (``act_quantizer``) and calls from a forward pre-hook: its clipping
level is a model parameter, so the fine-tunes train it and the integer lowering reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from releq_tvm.config import BITS_MAX
from releq_tvm.networks import weight_modules
from releq_tvm.quant.quantizers import INPUT_RANGE, PactActivation, calibrate_range, ste_quantize_weight


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


# --------------------------------------------------------------------------------------------
# activations: a learned-clip quantizer on each weight layer's input

#: Attribute under which a weight layer carries its input quantizer (a child module, so its
#: alpha is in ``model.parameters()`` and the state_dict, and survives ``copy.deepcopy``).
ACT_QUANTIZER = "act_quantizer"


def _quantize_input(module: nn.Module, inputs: tuple) -> tuple:
    # a module-level function reading the quantizer off the module: a deep copy of the model
    # copies the hook table by reference, and this hook still finds the copy's own quantizer
    return (getattr(module, ACT_QUANTIZER)(inputs[0]),) + tuple(inputs[1:])


def apply_act_bits(
    model: nn.Module,
    a_bits: Sequence[int],
    input_shape: tuple[int, int, int],
    ranges: Sequence[float],
    learn: Sequence[bool] | bool = True,
) -> nn.Module:
    """Quantize each weight layer's *input* in place: a :class:`PactActivation` at ``a_bits[l]``
    bits whose clipping level starts at ``ranges[l]`` (one entry per layer, forward order).

    ``a_bits[l]`` is the precision of the activations entering layer l, i.e. the output
    precision of whatever feeds it, so "the next layer's input bitwidth equals the previous
    layer's output bitwidth" holds by construction. ``learn`` (one flag, or one per layer) says
    whose alpha the fine-tunes train. A layer above :data:`BITS_MAX` keeps a float input, as
    :func:`apply_bits` does for weights. Calling again replaces earlier quantizers.
    """
    layers = weight_modules(model, input_shape)
    learn = [bool(learn)] * len(layers) if isinstance(learn, bool) else [bool(f) for f in learn]
    if not len(layers) == len(a_bits) == len(ranges) == len(learn):
        raise ValueError(f"{len(a_bits)} activation bitwidths, {len(ranges)} ranges, {len(learn)} flags "
                         f"for {len(layers)} weight layers")
    remove_act_bits(model)
    for (_, module), bits, act_range, trained in zip(layers, a_bits, ranges, learn):
        if int(bits) > BITS_MAX:
            continue
        module.add_module(ACT_QUANTIZER, PactActivation(int(bits), float(act_range), learn=trained))
        module.register_forward_pre_hook(_quantize_input)
    return model


def remove_act_bits(model: nn.Module) -> nn.Module:
    """Drop every input quantizer (and its learned alpha)."""
    for module in model.modules():
        if isinstance(getattr(module, ACT_QUANTIZER, None), PactActivation):
            for hook_id in [k for k, hook in module._forward_pre_hooks.items() if hook is _quantize_input]:
                del module._forward_pre_hooks[hook_id]
            delattr(module, ACT_QUANTIZER)
    return model


def act_quantizers(model: nn.Module) -> dict[str, PactActivation]:
    """The input quantizer of each weight layer that carries one, by the layer's module name."""
    return {
        name: getattr(module, ACT_QUANTIZER)
        for name, module in model.named_modules()
        if isinstance(getattr(module, ACT_QUANTIZER, None), PactActivation)
    }


def current_act_bits(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int | None, ...]:
    """The bits each weight layer's input is quantized to (None for float)."""
    carried = act_quantizers(model)
    return tuple(carried[name].bits if name in carried else None for name, _ in weight_modules(model, input_shape))


def calibrate_input_ranges(
    model: nn.Module, input_shape: tuple[int, int, int], images: torch.Tensor
) -> tuple[list[float], list[bool]]:
    """Range of each weight layer's input on ``images``, and whether it is a learned range.

    A layer that reads the network input (the images, in [0, 1]) gets :data:`INPUT_RANGE` and
    ``False``: the compiled network quantizes the image on the host at that fixed range. Every
    other layer gets a high percentile of its inputs (:func:`calibrate_range`) and ``True``.
    """
    modules = [m for _, m in weight_modules(model, input_shape)]
    seen: dict[int, torch.Tensor] = {}
    reads_input: dict[int, bool] = {}

    def record(index: int):
        def pre_hook(mod, inputs):
            if index not in seen:
                seen[index], reads_input[index] = inputs[0].detach(), inputs[0] is images

        return pre_hook

    handles = [m.register_forward_pre_hook(record(i), prepend=True) for i, m in enumerate(modules)]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    ranges = [INPUT_RANGE if reads_input[i] else calibrate_range(seen[i]) for i in range(len(modules))]
    return ranges, [not reads_input[i] for i in range(len(modules))]
