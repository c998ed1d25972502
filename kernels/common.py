"""TE helpers shared by the bit-serial and int8 kernels (layouts, padded input reads)."""

from __future__ import annotations

from tvm import te, tirx

from .shapes import ConvShape, DenseShape

#: Activation layouts a conv kernel accepts; its output uses the same layout.
LAYOUTS = ("NCHW", "NHWC")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    return layout


def dense_as_conv(shape: DenseShape) -> ConvShape:
    """The 1x1 convolution on a 1x1 image that a dense layer is (one code path for both)."""
    return ConvShape(shape.in_features, shape.out_features, (1, 1), (1, 1), batch=shape.batch)


def input_loader(x: te.Tensor, shape: ConvShape, layout: str):
    """``load(n, channel, row, col) -> (valid, value)`` with ``row``/``col`` in padded coordinates.

    The indices are clamped into the image so the load stays in bounds even in vector lanes
    that fall in the padding; ``valid`` says whether the value is real (select 0 otherwise).
    """
    (h, w), (ph, pw) = shape.in_size, shape.padding
    nhwc = layout == "NHWC"

    def load(n, ch, r, c):
        valid = tirx.all(r >= ph, r < ph + h, c >= pw, c < pw + w)
        rr = te.max(te.min(r - ph, h - 1), 0)
        cc = te.max(te.min(c - pw, w - 1), 0)
        return valid, (x[n, rr, cc, ch] if nhwc else x[n, ch, rr, cc])

    return load


def output_index_map(layout: str):
    """Maps output indices in ``layout`` to ``(n, channel, row, col)``."""
    if layout == "NCHW":
        return lambda n, c, i, j: (n, c, i, j)
    return lambda n, i, j, c: (n, c, i, j)


def has_block(sch, name: str) -> bool:
    root = sch.get_sblock("root")
    return any(sch.get(b).name_hint == name for b in sch.get_child_blocks(root))


def without_global_symbol(func):
    """The PrimFunc without the ``global_symbol`` "main" the schedule gave it.

    A caller adding it to a Relax module names it (``BlockBuilder.add_func(func, name)``); a
    leftover "main" symbol would clash with the Relax ``main``.
    """
    return func.without_attr("global_symbol") if "global_symbol" in func.attrs else func


def vectorize_output(sch, out_block) -> None:
    """Vectorise the innermost loop of a kernel's ``out`` block (after it was moved into the tile loop).

    That loop walks the output buffer's contiguous axis (columns in NCHW, channels in NHWC), so
    the epilogue (int64 requantization, clips, the next quantizer) runs on vectors and the
    stores are vector stores.
    """
    loops = sch.get_loops(out_block)
    extent = int(sch.get(loops[-1]).extent) if loops else 1
    if extent > 1 and extent & (extent - 1) == 0:
        sch.vectorize(loops[-1])
    elif extent % 4 == 0:  # other widths would split into ragged vectors: whole vectors of the largest 2^k lanes
        lanes = extent & -extent  # 28 -> 4
        sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
