"""Quantizers named by what they are: WRPN mid-tread symmetric weights, unsigned learned-clip (PACT) activations.

Weights (METHOD.md section 2), k bits of which one is the sign, one scale per layer and bitwidth:

    w_f = clip(w / scale, -1, 1)
    q   = round((2^(k-1) - 1) * w_f)        integer level in [-(2^(k-1)-1), 2^(k-1)-1]
    w_q = q * scale / (2^(k-1) - 1)

Zero is a level (mid-tread). k = 1 is binary and mid-rise: q = sign(w) in {-1, +1} (sign(0) = +1),
w_q = q * scale.

The scale (METHOD.md: "e.g. max|w|") is the one of a fixed grid that minimises the squared
quantization error, ``scale = c * max|w|`` with c in :data:`SCALE_FRACTIONS` (k = 1: the exact
optimum, mean|w|, as in XNOR-Net). Why not max|w| itself: at 2 bits the levels are {-1, 0, 1}
* scale, and a threshold at max|w| / 2 sends ~95 % of a bell-shaped layer to zero. Measured on
LeNet-5 (100-step fine-tune, MNIST val): all layers at 2 bits reached 40 % with max|w| and
all at 1 bit 97 %, so 2 bits scored worse than 1 bit and the search learnt to avoid 2 bits.

The integer backends consume ``q`` and ``step = scale / (2^(k-1)-1)``
(``scale`` for k = 1); the torch model consumes ``w_q`` through a straight-through estimator.

Activations are unsigned, b bits, with a clipping level alpha (PACT, Choi et al. 2018):

    y = clip(x, 0, alpha)
    a = round(y / alpha * (2^b - 1))    integer level in [0, 2^b - 1]
    x_q = a / (2^b - 1) * alpha         in [0, alpha]

alpha starts from a calibrated range (a high percentile of the values seen, see
:func:`calibrate_range`) and is learned in the fine-tunes (:class:`PactActivation`); the image
entering the first layer is clipped at the fixed :data:`INPUT_RANGE` instead.
"""

from __future__ import annotations

import numpy as np
import torch

from releq_tvm.config import BITS_MAX


def weight_levels(bits: int) -> int:
    """Largest integer level M of a ``bits``-bit mid-tread weight (1 for the binary case)."""
    if bits < 1:
        raise ValueError(f"weight bits must be >= 1, got {bits}")
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


#: Names the weight quantizer in every accuracy cache key; change it when quantized values change.
QUANTIZER_VERSION = "wrpn-lsq-grid32"

#: Names the activation quantizer in the cache key of every accuracy measured with quantized
#: activations; change it when quantized activation values change (pact-1: learned clipping
#: level, the image at the fixed INPUT_RANGE; before it, fixed calibrated ranges everywhere).
ACT_QUANTIZER_VERSION = "pact-1"

#: Range of the network input: images are scaled to [0, 1] (data.py), so the first layer's input
#: quantizer clips at 1.0, is never learned, and runs on the host in the compiled network.
INPUT_RANGE = 1.0

#: Candidate scales as fractions of max|w|: 32 steps, geometric from 1/16 to 1 (~9 % apart).
SCALE_FRACTIONS: tuple[float, ...] = tuple(2.0 ** (-4.0 + 4.0 * j / 31) for j in range(32))


def weight_scale(w, bits: int | None = None) -> float:
    """Per-layer scale of ``bits``-bit weights: the grid value of least squared error (see the module doc).

    ``bits=None`` gives max|w|. A tiny floor keeps an all-zero layer finite.
    """
    # float32 in both paths (the torch model and the integer backends) so they pick the same scale
    a = w.detach().abs().float() if isinstance(w, torch.Tensor) else torch.from_numpy(np.abs(np.asarray(w, dtype=np.float32)))
    largest = max(float(a.max()), 1e-12)
    if bits is None:
        return largest
    if bits == 1:
        return max(float(a.mean()), 1e-12)
    m = weight_levels(bits)
    best, best_err = largest, float("inf")
    for c in SCALE_FRACTIONS:
        s = largest * c
        err = float(((torch.round(torch.clamp(a / s, max=1.0) * m) * (s / m) - a) ** 2).sum())
        if err < best_err * (1 - 1e-12):
            best, best_err = s, err
    return best


def quantize_weight_int(w: np.ndarray, bits: int, scale: float | None = None) -> tuple[np.ndarray, float]:
    """Integer levels ``q`` (int32) and the step so that ``w_q = q * step`` (numpy, for the backends)."""
    w = np.asarray(w, dtype=np.float64)
    scale = weight_scale(w, bits) if scale is None else float(scale)
    m = weight_levels(bits)
    if bits == 1:
        q = np.where(w >= 0, 1, -1)
        return q.astype(np.int32), scale
    q = np.round(np.clip(w / scale, -1.0, 1.0) * m)
    return q.astype(np.int32), scale / m


def quantize_weight(w: torch.Tensor, bits: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fake-quantized weights ``w_q`` (torch, no gradient path; see :func:`ste_quantize_weight`)."""
    if scale is None:
        scale = weight_scale(w, bits)
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


def round_ste(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` in the forward pass, identity gradient in the backward (straight-through)."""
    return u + (torch.round(u) - u).detach()


def pact_quantize(x: torch.Tensor, bits: int, alpha: torch.Tensor) -> torch.Tensor:
    """Fake-quantized unsigned activations at ``bits`` with clipping level ``alpha`` (a tensor).

    Gradients (round is straight-through, so this is the derivative of the formula itself):
    d/dx = 1 for 0 < x < alpha and 0 elsewhere; d/d alpha = 1 where x >= alpha (PACT), 0 where
    x <= 0, and ``(x_q - x) / alpha`` inside (the quantization-error term of LSQ): without it
    alpha hears only from the clipped values (a 99.99th-percentile start clips almost none),
    while at 2-4 bits the rounding error of the values inside is what a lower alpha trades off.
    """
    if bits < 1:
        raise ValueError(f"activation bits must be >= 1, got {bits}")
    levels = 2**bits - 1
    y = torch.where(x >= alpha, alpha, torch.relu(x))  # where, not minimum: a tie goes to alpha whole
    # y / alpha * levels, not y / step: an input exactly halfway between levels (0.5 at 8 bits,
    # an MNIST pixel) stays exactly halfway and rounds as the integer backends round it.
    # k / levels * alpha, not k * step: the top level is alpha exactly (levels * step exceeds
    # alpha by one float32 ulp for ~6 % of alphas at 2 bits)
    return round_ste(y / alpha * levels) / levels * alpha


def quantize_activation(x: torch.Tensor, bits: int, act_range: float) -> torch.Tensor:
    """:func:`pact_quantize` at a fixed range (a number; no gradient reaches it)."""
    return pact_quantize(x, bits, torch.tensor(float(act_range), dtype=x.dtype))


class PactActivation(torch.nn.Module):
    """Unsigned ``bits``-bit activation quantizer with a learned clipping level alpha (PACT).

    ``alpha = alpha_init * alpha_factor``; ``alpha_factor`` (starts at 1) is the parameter.
    Why a factor and not alpha: Adam moves a parameter by about its learning rate per step
    whatever the gradient's scale, so learning alpha itself would move a layer whose range is
    0.5 and one whose range is 50 by the same absolute amount; the factor makes each step
    relative to the layer's calibrated range (lr 1e-3: at most ~0.1 % per step). A quantizer
    built from a learned alpha (``PactActivation(bits, q.alpha.item())``) has exactly the same
    alpha, since ``alpha_init * 1.0`` is exact. ``learn=False`` keeps alpha fixed (the image).
    """

    def __init__(self, bits: int, alpha: float, learn: bool = True):
        super().__init__()
        if not 1 <= int(bits) <= BITS_MAX:
            raise ValueError(f"activation bits must lie in 1..{BITS_MAX}, got {bits}")
        if not float(alpha) > 0:
            raise ValueError(f"the clipping level must be positive, got {alpha}")
        self.bits = int(bits)
        self.register_buffer("alpha_init", torch.tensor(float(alpha), dtype=torch.float32))
        self.alpha_factor = torch.nn.Parameter(torch.tensor(1.0), requires_grad=learn)

    @property
    def alpha(self) -> torch.Tensor:
        """The clipping level (0-dim float32 tensor, carries the gradient to ``alpha_factor``)."""
        return self.alpha_init * self.alpha_factor

    @property
    def learned(self) -> bool:
        return self.alpha_factor.requires_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pact_quantize(x, self.bits, self.alpha)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={self.alpha.item():.4g}, learned={self.learned}"


def calibrate_range(samples: torch.Tensor, percentile: float = 99.99) -> float:
    """Activation range from calibration samples: a high percentile of the values (robust to outliers)."""
    flat = samples.detach().flatten().float()
    if flat.numel() == 0:
        return 1.0
    value = torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], percentile / 100.0).item()
    return max(value, 1e-6)
