"""Layers as the passes after quantization see them: which have a constant bias, and how a bias is set (the
channel axis of their activations is ops.activation_axis). Shared by fast_bias_correction and the passes that
correct or prune layers, so that no pass imports another."""

from __future__ import annotations

from ..ir.graph import Graph, Node, Value
from ..ir.ops import op_info


def _bias_input(node: Node) -> int | None:
    """The bias input of a Conv or Gemm (ConvTranspose is not corrected: its channels are grouped otherwise)."""
    info = op_info(node.op_type, node.domain)
    return info.bias_input if info is not None and node.op_type != "ConvTranspose" else None


def biased_layers(graph: Graph) -> list[tuple[Node, Value, Node | None]]:
    """(layer, its constant bias, the bias Add or None) for Conv/Gemm with a bias and MatMul + Add(bias)."""
    found = []
    for node in graph:
        if node.domain:
            continue
        port = _bias_input(node)
        if port is not None and node.input(port) is not None and node.input(port).const is not None:
            if node.input(port).const.ndim == 1:
                found.append((node, node.input(port), None))
        elif node.op_type == "MatMul" and node.input(1) is not None and len(node.output.uses) == 1:
            add, _ = node.output.uses[0]
            if add.op_type == "Add" and not add.domain:
                other = add.input(1) if add.input(0) is node.output else add.input(0)
                if other is not None and other.const is not None and other.const.ndim == 1:
                    found.append((node, other, add))
    return found


def set_bias(graph: Graph, layer: Node, bias: Value, add: Node | None, values) -> None:
    """Give `layer` (or its bias Add) the bias `values`: in place where only it reads `bias`, else a new constant."""
    owner = add if add is not None else layer
    replace_constant(graph, owner, owner.inputs.index(bias), values, f"{bias.name}_{layer.name}")


def replace_constant(graph: Graph, node: Node, port: int, values, fresh_name: str) -> None:
    """Give `node` the constant `values` at input `port`: in place where only it reads the old constant; a
    constant other nodes read too keeps its value for them, and `node` gets a new one named `fresh_name`."""
    old = node.input(port)
    if len(old.uses) == 1 and not old.is_graph_output:
        old.const = values
        return
    fresh = graph.add_constant(fresh_name, values)
    fresh.meta.update(old.meta)
    node.set_input(port, fresh)



