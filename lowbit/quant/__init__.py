"""Quantization: calibration data, ignored scopes, quantizer placement, range statistics, FakeQuantize math.

The passes that use these live in `lowbit/passes/` (`quantize`, `fast_bias_correction`).
"""

from .dataset import Dataset
from .scope import IgnoredScope

__all__ = ["Dataset", "IgnoredScope"]
