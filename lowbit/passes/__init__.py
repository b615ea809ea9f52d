"""Passes (one per file), the PassManager that runs them, and the pass registry.

    from lowbit.passes import Pass, PassResult, PassManager, register_pass
"""

from . import builtin  # noqa: F401
from .base import PASSES, FunctionPass, Pass, PassContext, PassResult, register_pass, resolve
from .manager import PassManager, StepRecord
from .options import Options

DEFAULT_PIPELINE = ["cleanup", "fold_bn", "fuse"]
PTQ_PIPELINE = ["cleanup", "fold_bn", "fuse", "quantize", "fast_bias_correction", "snap_bias"]
# model_type="transformer" (as NNCF's): smooth activation outliers into the weights before placing quantizers
TRANSFORMER_PTQ_PIPELINE = ["cleanup", "fold_bn", "fuse", "smooth_quant", "quantize", "fast_bias_correction",
                            "snap_bias"]

__all__ = ["PASSES", "DEFAULT_PIPELINE", "PTQ_PIPELINE", "TRANSFORMER_PTQ_PIPELINE", "FunctionPass", "Options", "Pass",
           "PassContext", "PassResult", "PassManager", "StepRecord", "register_pass", "resolve"]
