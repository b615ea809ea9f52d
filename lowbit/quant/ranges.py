"""FakeQuantize ranges (OpenVINO semantics) for a quantizer config and observed value ranges.

A FakeQuantize has `levels` and input/output low/high (here output = input):
values are clipped to [low, high] and rounded to one of `levels` evenly
spaced points. Conventions (as in NNCF, so the step is max/127 for 8 bits):

- symmetric signed, 256 levels:   [-m * 128/127, m]     (int8, zero point 0)
- symmetric signed, 255 levels:   [-m, m]               (narrow range; int8 [-127, 127])
- symmetric unsigned, 256 levels: [0, m]                (uint8, zero point 0), when the minimum is >= 0
- asymmetric, 256 levels:         [lo, hi] widened to contain 0, then shifted so 0 is a level (uint8)
- half range (overflow fix):      the config's own grid over [-m * 127/63, m * 127/63], so that values
                                  in [-m, m] use only the integers [-63, 63] (still int8, zero point 0)

The half range keeps the config's levels (255 or 256) rather than a 127-level
grid: OpenVINO's low-precision transformations run only 255/256-level weight
FakeQuantizes as INT8, and the QDQ writer gives the same int8 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hw_configs import QuantizerConfig

EPS = 1e-8
MIN_RANGE = 8e-5  # NNCF's floor for a quantizer's range: a zero or constant value still gets a usable scale
RELATIVE_FLOOR = 0.01  # a channel's range is at least 1% of the tensor's widest (NNCF's fix_zero_filters)


def _floor_magnitude(m: np.ndarray) -> np.ndarray:
    """Magnitudes with degenerate ranges fixed: a channel that is all zero (a pruned filter, a dead ReLU) takes
    the tensor's widest magnitude, or 1 when every channel is zero (its values are exactly on any grid, and a
    wide scale keeps the runtimes' int32 bias, bias / (input scale x weight scale), in range); a nearly zero
    one is raised to max(1% of the widest, MIN_RANGE). ONNX Runtime, OpenVINO and the torch simulation then
    agree on it (with a 1e-8 range they did not: 3.5 dB)."""
    top = float(m.max()) if m.size else 0.0
    floor = max(top * RELATIVE_FLOOR, MIN_RANGE)
    return np.where(m <= 0, top if top > 0 else 1.0, np.maximum(m, floor))


@dataclass
class FQRange:
    levels: int
    low: np.ndarray
    high: np.ndarray


def fq_range(config: QuantizerConfig, lo, hi, half_range: bool = False) -> FQRange:
    """The range of a quantizer of `config` over values in [lo, hi] (scalars or per-channel arrays).

    half_range=True (the overflow fix, for signed symmetric weights of 3 bits
    or more) uses half the integer grid, [-63, 63] for 8 bits, so that x86
    kernels without VNNI, which add pairs of u8 x s8 products in 16 bits,
    cannot saturate.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    levels = 2 ** config.bits - (1 if config.narrow_range else 0)
    if half_range and config.symmetric and config.signed is not False and config.bits >= 3:
        full, half = 2 ** (config.bits - 1) - 1, 2 ** (config.bits - 2) - 1
        m = _floor_magnitude(np.maximum(np.abs(lo), np.abs(hi))) * (full / half)
        lo, hi = -m, m
    if config.symmetric:
        m = _floor_magnitude(np.maximum(np.abs(lo), np.abs(hi)))
        signed = config.signed if config.signed is not None else bool(np.any(lo < 0))
        if not signed:
            low, high = np.zeros_like(m), m
        elif config.narrow_range:
            low, high = -m, m
        else:
            half = 2 ** (config.bits - 1)
            low, high = -m * half / (half - 1), m
        return FQRange(levels, low.astype(np.float32), high.astype(np.float32))
    width = hi - lo
    widest = float(width.max()) if width.size else 0.0
    fixed = np.where(width <= 0, widest if widest > 0 else 1.0,
                     np.maximum(width, max(widest * RELATIVE_FLOOR, MIN_RANGE)))
    hi = np.where(lo < 0, hi, lo + fixed)  # an all-zero or positive-only range grows upwards, else downwards
    lo = np.where(lo < 0, hi - fixed, lo)
    width = hi - lo
    step = width / (levels - 1)
    zero_point = np.round(-lo / step)
    low = -zero_point * step
    return FQRange(levels, low.astype(np.float32), (low + (levels - 1) * step).astype(np.float32))
