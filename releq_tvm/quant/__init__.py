"""Quantization: WRPN weight quantizer, unsigned learned-clip activation quantizer, per-layer bit vectors."""

from releq_tvm.quant.apply import (  # noqa: F401
    WeightQuantizer,
    act_quantizers,
    apply_act_bits,
    apply_bits,
    calibrate_input_ranges,
    current_act_bits,
    current_bits,
    remove_act_bits,
    remove_bits,
)
from releq_tvm.quant.quantizers import (  # noqa: F401
    ACT_QUANTIZER_VERSION,
    INPUT_RANGE,
    PactActivation,
    calibrate_range,
    pact_quantize,
    quantize_activation,
    quantize_activation_int,
    quantize_weight,
    quantize_weight_int,
    ste_quantize_weight,
    weight_levels,
    weight_scale,
)
