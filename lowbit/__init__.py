"""lowbit: a model-compression compiler.

    graph = lowbit.lower(model, example_inputs=(x,))   # torch or ONNX -> IR
    print(graph)                                         # the text form
    onnx_model = lowbit.codegen(graph, "onnx")           # or "torch", "openvino"
"""

from . import ir
from .api import codegen, lower
from .errors import (CaptureError, GraphError, LowbitError, MissingExampleInputsError, ModelLoadError,
                     TextParseError, UnknownTargetError, UnsupportedModelError, UnsupportedOpError)

__version__ = "0.1.0"

__all__ = ["lower", "codegen", "ir", "LowbitError", "CaptureError", "GraphError", "MissingExampleInputsError",
           "ModelLoadError", "TextParseError", "UnknownTargetError", "UnsupportedModelError", "UnsupportedOpError"]
