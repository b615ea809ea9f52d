"""Imports every built-in pass so that each registers its name."""

from . import (  # noqa: F401
    cleanup, fast_bias_correction, fold_bn, fuse, prune_filters, quantize, smooth_quant, snap_bias)
