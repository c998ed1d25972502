"""Quantizers named by what they are: WRPN mid-tread symmetric weights, unsigned calibrated activations.

Weights (METHOD.md section 2), k bits of which one is the sign, per-layer scale = max|w|:

    w_f = clip(w / scale, -1, 1)
    q   = round((2^(k-1) - 1) * w_f)        integer level in [-(2^(k-1)-1), 2^(k-1)-1]
    w_q = q * scale / (2^(k-1) - 1)

Zero is a level (mid-tread). k = 1 is binary and mid-rise: q = sign(w) in {-1, +1} (sign(0) = +1),
w_q = q * scale. The integer backends consume ``q`` and ``step = scale / (2^(k-1)-1)``
(``scale`` for k = 1); the torch model consumes ``w_q`` through a straight-through estimator.

Activations are unsigned: a = round(clip(x / range, 0, 1) * (2^b - 1)), with ``range`` calibrated
on data (the maximum seen, or a percentile of it).
"""

from __future__ import annotations

import numpy as np
import torch


def weight_levels(bits: int) -> int:
    """Largest integer level M of a ``bits``-bit mid-tread weight (1 for the binary case)."""
    if bits < 1:
        raise ValueError(f"weight bits must be >= 1, got {bits}")
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def weight_scale(w) -> float:
    """Per-layer scale: max |w| (a tiny floor keeps an all-zero layer finite)."""
    if isinstance(w, torch.Tensor):
        largest = float(w.detach().abs().max())
    else:
        largest = float(np.abs(np.asarray(w)).max())
    return max(largest, 1e-12)


def quantize_weight_int(w: np.ndarray, bits: int, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Integer levels ``q`` (int32) and the step so that ``w_q = q * step`` (numpy, for the backends)."""
    w = np.asarray(w, dtype=np.float64)
    scale = weight_scale(w) if scale is None else float(scale)
    m = weight_levels(bits)
    if bits == 1:
        q = np.where(w >= 0, 1, -1)
        return q.astype(np.int32), scale
    q = np.round(np.clip(w / scale, -1.0, 1.0) * m)
    return q.astype(np.int32), scale / m


def quantize_weight(w: torch.Tensor, bits: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fake-quantized weights ``w_q`` (torch, no gradient path; see :func:`ste_quantize_weight`)."""
    if scale is None:
        scale = w.detach().abs().max().clamp_min(1e-12)
    if bits == 1:
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w)) * scale
    m = weight_levels(bits)
    return torch.round(torch.clamp(w / scale, -1.0, 1.0) * m) / m * scale


def ste_quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w_q`` in the forward pass, identity gradient in the backward (straight-through estimator)."""
    return w + (quantize_weight(w, bits) - w).detach()


def quantize_activation_int(x, bits: int, act_range: float) -> np.ndarray:
    """Unsigned integer activations in [0, 2^bits - 1] (numpy uint8 for bits <= 8)."""
    levels = 2**bits - 1
    x = np.asarray(x, dtype=np.float64)
    q = np.round(np.clip(x / act_range, 0.0, 1.0) * levels)
    return q.astype(np.uint8 if bits <= 8 else np.int32)


def quantize_activation(x: torch.Tensor, bits: int, act_range: float) -> torch.Tensor:
    """Fake-quantized unsigned activations (torch), straight-through in the backward pass."""
    levels = 2**bits - 1
    q = torch.round(torch.clamp(x / act_range, 0.0, 1.0) * levels) * (act_range / levels)
    return x + (q - x).detach()


def calibrate_range(samples: torch.Tensor, percentile: float = 99.99) -> float:
    """Activation range from calibration samples: a high percentile of the values (robust to outliers)."""
    flat = samples.detach().flatten().float()
    if flat.numel() == 0:
        return 1.0
    value = torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], percentile / 100.0).item()
    return max(value, 1e-6)
