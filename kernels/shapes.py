"""Layer shapes the kernels are built for (sizes in elements; batch included).

Field names follow the network layer table (``in_channels``, ``kernel``, ``stride``,
``padding``, ``groups``, ``in_size``) so a caller can build a shape from a layer row
without this package importing the networks package.
"""

from __future__ import annotations

from dataclasses import dataclass


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution: input ``(batch, in_channels, *in_size)``, weight
    ``(out_channels, in_channels // groups, *kernel)``.

    Padding is symmetric zero padding of ``padding = (rows, cols)`` on each side, as in
    ``torch.nn.Conv2d``. Depthwise is ``groups == in_channels``.
    """

    in_channels: int
    out_channels: int
    in_size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("in_size", "kernel", "stride", "padding"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if min(self.in_channels, self.out_channels, self.groups, self.batch) < 1:
            raise ValueError(f"channels, groups and batch must be >= 1: {self}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups={self.groups} must divide in_channels={self.in_channels} and out_channels={self.out_channels}"
            )
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0 or min(self.in_size) < 1:
            raise ValueError(f"kernel/stride/in_size must be >= 1 and padding >= 0: {self}")
        if min(self.out_size) < 1:
            raise ValueError(f"kernel {self.kernel} does not fit input {self.in_size} with padding {self.padding}")

    @property
    def out_size(self) -> tuple[int, int]:
        """Output (rows, cols)."""
        (h, w), (kh, kw), (sh, sw), (ph, pw) = self.in_size, self.kernel, self.stride, self.padding
        return ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def reduction_length(self) -> int:
        """Terms summed into one output: ``in_per_group * kh * kw``."""
        return self.in_per_group * self.kernel[0] * self.kernel[1]

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one call (all batch images)."""
        oh, ow = self.out_size
        return self.batch * self.out_channels * oh * ow * self.reduction_length

    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_per_group, *self.kernel)

    def input_shape(self, layout: str = "NCHW") -> tuple[int, int, int, int]:
        h, w = self.in_size
        return (self.batch, self.in_channels, h, w) if layout == "NCHW" else (self.batch, h, w, self.in_channels)

    def output_shape(self, layout: str = "NCHW") -> tuple[int, int, int, int]:
        oh, ow = self.out_size
        return (self.batch, self.out_channels, oh, ow) if layout == "NCHW" else (self.batch, oh, ow, self.out_channels)

    def label(self) -> str:
        """Short human-readable name, e.g. ``conv 16->16 3x3/1 p1 g1 32x32 n1``."""
        kind = "dwconv" if self.is_depthwise else "conv"
        return (
            f"{kind} {self.in_channels}->{self.out_channels} {self.kernel[0]}x{self.kernel[1]}/{self.stride[0]}"
            f" p{self.padding[0]} g{self.groups} {self.in_size[0]}x{self.in_size[1]} n{self.batch}"
        )


@dataclass(frozen=True)
class DenseShape:
    """A fully connected layer: input ``(batch, in_features)``, weight ``(out_features, in_features)``."""

    in_features: int
    out_features: int
    batch: int = 1

    def __post_init__(self) -> None:
        if min(self.in_features, self.out_features, self.batch) < 1:
            raise ValueError(f"in_features, out_features and batch must be >= 1: {self}")

    @property
    def reduction_length(self) -> int:
        return self.in_features

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one call (all batch rows)."""
        return self.batch * self.in_features * self.out_features

    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def input_shape(self) -> tuple[int, int]:
        return (self.batch, self.in_features)

    def output_shape(self) -> tuple[int, int]:
        return (self.batch, self.out_features)

    def label(self) -> str:
        return f"dense {self.in_features}->{self.out_features} n{self.batch}"
