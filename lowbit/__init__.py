"""lowbit: a model-compression compiler.

    graph = lowbit.lower(model, example_inputs=(x,))   # torch or ONNX -> IR
    print(graph)                                         # the text form
    onnx_model = lowbit.codegen(graph, "onnx")           # or "torch", "openvino"
    fast = lowbit.compile(model, passes=["cleanup", "fold_bn", "fuse"], dump_dir="dumps/")
"""

from . import ir, passes, patterns
from .api import codegen, lower
from .compiler import compile, export, prune, quantize, strip
from .state import load, save
from .train import accuracy_aware_training, batch_norm_adaptation, create_compressed_model
from .quant import Dataset, IgnoredScope
from .errors import (AlreadyQuantizedError, CalibrationDataError, CaptureError, ConfigError, DatasetError, DumpError,
                     GraphError, HardwareConfigError, IgnoredScopeError, InputShapeError, LowbitError,
                     MissingExampleInputsError, ModelLoadError, OptionError, OutputPathError, PassError, PruneError,
                     RuleLoopError, StateError, TextParseError, UnknownPassError, UnknownTargetError,
                     UnsupportedModelError, UnsupportedOpError)

__version__ = "0.1.0"

__all__ = [
    # the compiler and its workflows
    "lower", "codegen", "compile", "quantize", "prune", "strip", "export", "save", "load",
    "batch_norm_adaptation", "accuracy_aware_training", "create_compressed_model", "Dataset", "IgnoredScope",
    "ir", "passes", "patterns",
    # the errors a user can cause
    "LowbitError", "AlreadyQuantizedError", "CalibrationDataError", "CaptureError", "ConfigError", "DatasetError",
    "DumpError", "GraphError", "HardwareConfigError", "IgnoredScopeError", "InputShapeError",
    "MissingExampleInputsError", "ModelLoadError", "OptionError", "OutputPathError", "PassError", "PruneError",
    "RuleLoopError", "StateError", "TextParseError", "UnknownPassError", "UnknownTargetError",
    "UnsupportedModelError", "UnsupportedOpError",
]
