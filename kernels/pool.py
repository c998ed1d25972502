"""Max pooling for the compiled networks: a scheduled PrimFunc instead of Relax's generic lowering.

Relax legalizes ``nn.max_pool2d`` to a plain loop nest that LLVM leaves scalar: LeNet-5's two
pools on uint8 levels took 2.3 us and 1.2 us in the VM, as long as its first conv. Here the
window loops are unrolled over one output row at a time, which LLVM vectorises: 0.24 us and
0.17 us.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from .common import without_global_symbol

#: Pooled elements above which the rows are spread over all cores.
POOL_PARALLEL_MIN = 1 << 16
#: uint8 output rows up to this many columns are unrolled rather than vectorised by TVM (measured on
#: LeNet-5's pools, znver4: 6x28x28 -> 14x14 0.24 us unrolled, 1.09 us as a 14-lane TVM vector).
UNROLL_MAX_COLS = 32


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def pool_out_size(in_size, kernel, stride, padding) -> tuple[int, int]:
    """Output (rows, cols) of a pool without ceil mode (as torch's default)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = (_pair(v) for v in (in_size, kernel, stride, padding))
    return ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)


def max_pool2d_primfunc(shape: tuple[int, int, int, int], kernel, stride, padding=0,
                        dtype: str = "uint8") -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc ``main(x dtype (N, C, H, W), out dtype (N, C, OH, OW))``: the max over each
    ``kernel`` window at ``stride``, padding read as the dtype's minimum (as torch's max pool).

    ``dtype``: ``uint8`` (levels: the producing kernel already quantized them) or ``int32``.
    No ``global_symbol``: name it when adding it to a module.
    """
    n, c, h, w = (int(s) for s in shape)
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    oh, ow = pool_out_size((h, w), (kh, kw), (sh, sw), (ph, pw))
    if min(oh, ow) < 1:
        raise ValueError(f"pool kernel {kernel} with padding {padding} does not fit input {(h, w)}")
    x = te.placeholder((n, c, h, w), dtype, name="x")
    lowest = tirx.min_value(dtype)
    rk, rl = te.reduce_axis((0, kh), name="rk"), te.reduce_axis((0, kw), name="rl")

    def window(b, ch, i, j):
        r, col = i * sh + rk - ph, j * sw + rl - pw
        if ph == 0 and pw == 0:
            return x[b, ch, r, col]
        valid = tirx.all(r >= 0, r < h, col >= 0, col < w)
        return tirx.Select(valid, x[b, ch, te.max(te.min(r, h - 1), 0), te.max(te.min(col, w - 1), 0)], lowest)

    out = te.compute((n, c, oh, ow), lambda b, ch, i, j: te.max(window(b, ch, i, j), axis=[rk, rl]), name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out]))
    block = sch.get_sblock("out")
    b, ch, i, j, k, l = sch.get_loops(block)
    rows = sch.fuse(b, ch, i)
    sch.reorder(rows, k, l, j)  # one output row is the vector; the window loops walk over it
    if dtype == "uint8" and ow <= UNROLL_MAX_COLS:
        sch.unroll(j)  # LLVM's SLP vectoriser turns the strided byte loads into shuffles of whole-row loads
    else:
        sch.vectorize(j)  # TVM's strided vector loads go element by element, but stay correct
    sch.unroll(k)
    sch.unroll(l)
    if n * c * oh * ow >= POOL_PARALLEL_MIN:
        sch.parallel(rows)  # before the init is split off: parallel() wants whole reduction blocks below it
    sch.decompose_reduction(block, k)
    return without_global_symbol(sch.mod["main"])
