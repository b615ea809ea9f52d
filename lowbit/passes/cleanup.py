"""cleanup: drop Identity and eval-mode Dropout, fold constants, remove dead nodes and unused constants.

Constant folding evaluates, with ONNX's reference implementation, every
standard node whose inputs are all constants (and `Shape` of a value whose
shape is static, and a Gather or Slice that picks only static dimensions out
of a `Shape` of a value with dynamic ones: a transformer's head size, read
from a shape whose batch is dynamic, becomes a constant, and so does the
attention scale computed from it), and replaces its outputs by constants,
except a
DequantizeLinear: an integer weight and its DequantizeLinear are how a QDQ
model says a layer runs in INT8, so folding it would silently dequantize the
model. Shapes are then refined: a dim the exporter's shape inference left
symbolic, which the folded sizes now give (a Pad's pads, a Reshape's target
with its -1), becomes static. Nodes whose outputs nothing reads are removed,
last to first.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper

from ..backends.onnx import node_proto
from ..ir.graph import Graph, Node
from ..ir.infer import refine_shapes, shape_entries, shape_output
from ..ir.ops import MAX_FOLDED_ELEMENTS, NEVER_FOLDED, SHAPE_PICKERS
from ..patterns.library.cleanup import rules
from .base import Pass, PassContext, PassResult, register_pass

def evaluate(node: Node, opset: int) -> list[np.ndarray]:
    """Run one node on its constant inputs with onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    inits = [onnx.numpy_helper.from_array(np.asarray(v.const), v.name) for v in node.inputs if v is not None]
    outputs = [helper.make_empty_tensor_value_info(v.name) for v in node.outputs]
    graph = helper.make_graph([node_proto(node)], "fold", [], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return [np.asarray(a) for a in ReferenceEvaluator(model).run(None, {})]


def _foldable(node: Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLDED or next(node.subgraphs(), None):
        return False  # (a node with subgraphs, If/Loop/Scan, is left to the runtime)
    if node.op_type == "Shape":
        shape = node.input(0).shape
        return shape is not None and all(isinstance(d, int) for d in shape)
    return all(v is None or v.const is not None for v in node.inputs)


MAX_ROUNDS = 8  # of folding and refining shapes: a Swin from torch.onnx.export needs 3


def _static_part_of_shape(node: Node) -> list[np.ndarray] | None:
    """What a Gather or Slice gives when it picks only static dimensions out of Shape(x), else None."""
    source = node.input(0)
    shape_op = source.producer
    if node.op_type not in SHAPE_PICKERS or shape_op is None or shape_op.op_type != "Shape" or shape_op.domain:
        return None
    entries = shape_entries(node.output)
    if entries is None or not all(isinstance(d, int) for d in entries):
        return None
    picked = np.array(entries, np.int64)
    return [picked.reshape(np.shape(node.input(1).const)) if node.op_type == "Gather" else picked]


def fold_constants(graph: Graph) -> int:
    opset = graph.opset_imports.get("", 21)
    folded = 0
    for node in graph.nodes:
        if any(v.is_graph_output for v in node.outputs):
            continue
        if not _foldable(node):
            results = _static_part_of_shape(node)
            if results is None:
                continue
        elif node.op_type == "Shape":
            dims = np.array(node.input(0).shape, dtype=np.int64)
            results = [shape_output(node, dims)]
        else:
            try:
                results = evaluate(node, opset)
            except Exception:  # an op the reference cannot run: leave it to the runtime
                continue
        if any(r.size > MAX_FOLDED_ELEMENTS for r in results):
            continue
        kind = _folded_kind(graph, node)
        for value, array in zip(node.outputs, results):
            const = graph.add_constant(f"{value.name}_folded", array)
            if kind is not None:
                const.meta["torch_kind"] = kind
            graph.replace_all_uses(value, const)
        graph.remove(node)
        folded += 1
    return folded


def _folded_kind(graph: Graph, node) -> str | None:
    """What a torch module holds a folded result of `node` as: a parameter where it is computed from one (a
    transposed weight), else "computed" (from buffers and literals: a position table; the module holds it as a
    buffer); None for an ONNX model, whose initializers all become parameters."""
    if graph.meta.get("origin") != "torch":
        return None
    return "parameter" if any(v is not None and v.meta.get("torch_kind") == "parameter" for v in node.inputs) \
        else "computed"


def remove_dead_nodes(graph: Graph) -> int:
    removed = 0
    for node in reversed(graph.nodes):
        if all(not v.uses and not v.is_graph_output for v in node.outputs):
            graph.remove(node)
            removed += 1
    return removed


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    description = "drop Identity/eval Dropout, fold constants, remove dead nodes"

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        fired = Counter(rules.apply(graph))
        folded = refined = 0
        for round_ in range(MAX_ROUNDS):  # refined shapes make more sizes static: fold again, until nothing changes
            more = fold_constants(graph)
            if round_ and not more:
                break
            folded += more
            if more:  # what folding made constant (a Pad's pads, computed from shapes) may now match a rule
                fired.update(rules.apply(graph))
            newly = refine_shapes(graph)
            refined += newly
            if not newly:
                break
        counts = {"fold_constants": folded, "refine_shapes": refined,
                  "remove_dead_nodes": remove_dead_nodes(graph),
                  "remove_unused_constants": graph.remove_unused_constants()}
        fired.update({k: v for k, v in counts.items() if v})
        return PassResult(graph, changed=bool(fired), fired=fired)
