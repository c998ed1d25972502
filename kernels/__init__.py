"""TVM bit-serial (and plain int8) conv2d / dense kernels for x86, with numpy references.

This package knows nothing of torch or RL: it takes integer levels as numpy arrays and
returns exact int32 results. Import it as ``releq_tvm.kernels``.

* :mod:`.shapes`: ``ConvShape`` / ``DenseShape``;
* :mod:`.encoding`: weight levels, the unsigned bit-plane encoding (with its proof), the packed
  weight layouts and :func:`pack_weights`;
* :mod:`.bitserial`: the bit-serial TE computes + TensorIR schedules and their PrimFuncs;
* :mod:`.int8`: the plain int8 kernels (``vpdpbusd`` on AVX-512 VNNI / AVX-VNNI, else AVX2 ``vpmaddwd``);
* :mod:`.lut`: the lookup-table dense kernels for 1-4 bit weights (T-MAC style ``vpshufb``/``vpermb`` tables, and on AVX512-VBMI/VNNI the packed codes multiplied directly by ``vpdpbusd``);
* :mod:`.epilogue`: the output stage (requantize, residual, ReLU, next quantizer) as data;
* :mod:`.pool`: max pooling of uint8 levels (or int32) between the layers of a compiled network;
* :mod:`.common`: TE helpers both share (layouts, padded input reads);
* :mod:`.reference`: int64 numpy references;
* :mod:`.runtime`: build / run helpers (:class:`BuiltKernel`; timing is the caller's);
* :mod:`.target`: the x86 LLVM target and its :class:`VectorIsa` (lanes, registers, int8 path),
  read from LLVM's feature list: every plan takes one, so no ISA is hard-coded;
* :mod:`.bench`: the kernel benchmark: rows and the facts behind them (`releq-tvm bench kernels` writes the CSV).
"""

from .bitserial import (
    bitpack,
    bitpack_primfunc,
    bitserial_conv2d_primfunc,
    bitserial_dense_primfunc,
    plan_conv2d,
    plan_dense,
)
from .encoding import (
    activation_level_range,
    conv_weight_layout,
    decode_weights,
    dense_weight_layout,
    encode_weights,
    pack_weights,
    weight_level_range,
    weight_scale_offset,
)
from .epilogue import PLAIN, Epilogue, epilogue_reference
from .int8 import int8_conv2d_primfunc, int8_dense_primfunc, int8_weight_shape, pack_int8_weights
from .lut import LutPlan, lut_dense_primfunc, pack_lut_weights, plan_lut_dense
from .pool import max_pool2d_primfunc
from .reference import conv2d_reference, dense_reference
from .runtime import (
    BuiltKernel,
    build_bitserial_conv2d,
    build_bitserial_dense,
    build_int8_conv2d,
    build_int8_dense,
    build_lut_dense,
    run,
)
from .shapes import ConvShape, DenseShape
from .target import VectorIsa, host_target, make_target, vector_isa

__all__ = [
    "BuiltKernel",
    "Epilogue",
    "LutPlan",
    "PLAIN",
    "ConvShape",
    "DenseShape",
    "VectorIsa",
    "activation_level_range",
    "bitpack",
    "bitpack_primfunc",
    "bitserial_conv2d_primfunc",
    "bitserial_dense_primfunc",
    "build_bitserial_conv2d",
    "build_bitserial_dense",
    "build_int8_conv2d",
    "build_int8_dense",
    "build_lut_dense",
    "conv2d_reference",
    "conv_weight_layout",
    "decode_weights",
    "dense_reference",
    "dense_weight_layout",
    "encode_weights",
    "epilogue_reference",
    "host_target",
    "int8_conv2d_primfunc",
    "int8_dense_primfunc",
    "int8_weight_shape",
    "lut_dense_primfunc",
    "make_target",
    "max_pool2d_primfunc",
    "pack_int8_weights",
    "pack_lut_weights",
    "pack_weights",
    "plan_conv2d",
    "plan_dense",
    "plan_lut_dense",
    "run",
    "vector_isa",
    "weight_level_range",
    "weight_scale_offset",
]
