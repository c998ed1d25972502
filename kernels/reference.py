"""Plain int64 numpy references for every kernel: the oracle the tests compare against.

They take the *integer levels* (signed weights ``q``, unsigned activations ``x``), never the
packed bit planes, so they check the packing and encoding as well as the arithmetic.
"""

from __future__ import annotations

import numpy as np

from .shapes import ConvShape, DenseShape


def conv2d_reference(x: np.ndarray, q: np.ndarray, shape: ConvShape, layout: str = "NCHW") -> np.ndarray:
    """Exact ``sum(q * x)`` convolution in int64.

    ``x``: activations ``shape.input_shape(layout)`` (any integer dtype). ``q``: weights
    ``(out_channels, in_channels // groups, kh, kw)``. Returns ``shape.output_shape(layout)``.
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC'; got {layout!r}")
    x = np.asarray(x).astype(np.int64)
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    q = np.asarray(q).astype(np.int64)
    if x.shape != shape.input_shape("NCHW") or q.shape != shape.weight_shape():
        raise ValueError(f"x {x.shape} / q {q.shape} do not match {shape}")
    (ph, pw), (sh, sw), (kh, kw) = shape.padding, shape.stride, shape.kernel
    oh, ow = shape.out_size
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cg, og = shape.in_per_group, shape.out_per_group
    out = np.zeros((shape.batch, shape.out_channels, oh, ow), dtype=np.int64)
    for g in range(shape.groups):
        xg = xp[:, g * cg:(g + 1) * cg]
        qg = q[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                window = xg[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]  # (N, cg, oh, ow)
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", window, qg[:, :, i, j])
    return out.transpose(0, 2, 3, 1) if layout == "NHWC" else out


def dense_reference(x: np.ndarray, q: np.ndarray, shape: DenseShape | None = None) -> np.ndarray:
    """Exact ``x @ q.T`` in int64: ``x`` is ``(batch, in_features)``, ``q`` is ``(out_features, in_features)``."""
    x = np.asarray(x).astype(np.int64)
    q = np.asarray(q).astype(np.int64)
    if shape is not None and (x.shape != shape.input_shape() or q.shape != shape.weight_shape()):
        raise ValueError(f"x {x.shape} / q {q.shape} do not match {shape}")
    return x @ q.T
