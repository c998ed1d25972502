"""Quantization: WRPN weight quantizer, unsigned activation quantizer, per-layer bit vectors."""

from releq_tvm.quant.apply import WeightQuantizer, apply_bits, current_bits, remove_bits  # noqa: F401
from releq_tvm.quant.quantizers import (  # noqa: F401
    calibrate_range,
    quantize_activation,
    quantize_activation_int,
    quantize_weight,
    quantize_weight_int,
    ste_quantize_weight,
    weight_levels,
    weight_scale,
)
