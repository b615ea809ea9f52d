"""Imports every built-in pass so that each registers its name."""

from . import cleanup, fast_bias_correction, fold_bn, fuse, quantize, smooth_quant, snap_bias  # noqa: F401
