"""The graph IR (`Graph`, `Node`, `Value`) and its borders with torch, ONNX and OpenVINO."""

from .graph import Graph, Node, Value
from .ops import IR_OPSET, VOCABULARY, op_info
from .text import parse_graph, print_graph

__all__ = ["Graph", "Node", "Value", "IR_OPSET", "VOCABULARY", "op_info", "parse_graph", "print_graph"]
