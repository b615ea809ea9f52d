"""Decompositions of IR ops into older ONNX ops.

`Swish` (ONNX opset 24) and `Attention` (opset 23) are single kernels in
torch, so the IR keeps them whole; a writer that targets an older opset calls
`expand_for_opset`, which returns a copy of the graph where each is replaced
by the standard ops that compute it:

    Swish(x, alpha)               -> x * Sigmoid(alpha * x)
    Attention(q, k, v, mask?)     -> Softmax(q @ kT * scale + mask) @ v
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedOpError
from .graph import Graph, Node
from .ops import op_info

def _newer_than(node: Node, opset: int) -> bool:
    """`node` is a default-domain op that the ONNX opset `opset` does not have yet (ops.OpInfo.since_opset)."""
    info = op_info(node.op_type, node.domain) if node.domain == "" else None
    return info is not None and (info.since_opset or 0) > opset


def expand_for_opset(graph: Graph, opset: int) -> Graph:
    """`graph` itself if it needs nothing expanded, else a copy with the expansions made."""
    if not any(_newer_than(n, opset) for n in graph):
        return graph
    graph = graph.copy()
    for node in graph.nodes:
        if _newer_than(node, opset):
            EXPANSIONS[node.op_type](graph, node)
            graph.remove(node)
    return graph


def _finish(graph: Graph, node: Node, result) -> None:
    """Move `node`'s output name and type onto `result` and reroute its users."""
    out = node.output
    graph.replace_all_uses(out, result)
    name = out.name
    out.name, result.name = f"{name}__replaced", name
    result.dtype, result.shape = out.dtype, out.shape


def expand_swish(graph: Graph, node: Node) -> None:
    x = node.input(0)
    alpha = float(node.attrs.get("alpha", 1.0))
    gate_in = x
    if alpha != 1.0:
        a = graph.add_constant(f"{node.name}_alpha", np.array(alpha, dtype=x.dtype or "float32"))
        gate_in = graph.make_node("Mul", [x, a], name=f"{node.name}_scale", before=node).output
    sig = graph.make_node("Sigmoid", [gate_in], name=f"{node.name}_sigmoid", before=node).output
    _finish(graph, node, graph.make_node("Mul", [x, sig], name=f"{node.name}_mul", before=node).output)


def expand_attention(graph: Graph, node: Node) -> None:
    q, k, v = node.inputs[:3]
    mask = node.input(3)
    if len([x for x in node.inputs if x is not None]) > 4 or len(node.outputs) > 1:
        raise UnsupportedOpError(f"Attention node {node.name!r} uses KV-cache inputs or extra outputs, "
                                 "which lowbit cannot expand below opset 23: write with opset=23")
    dtype = q.dtype or "float32"
    head_dim = q.shape[-1] if q.shape else None
    scale = node.attrs.get("scale")
    if scale is None:
        if not isinstance(head_dim, int):
            raise UnsupportedOpError(f"Attention node {node.name!r} has no 'scale' and a symbolic head size: "
                                     "give the scale explicitly")
        scale = 1.0 / math.sqrt(head_dim)
    before = dict(before=node)
    rank = len(k.shape) if k.shape else 4
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    kt = graph.make_node("Transpose", [k], {"perm": perm}, name=f"{node.name}_kT", **before).output
    scores = graph.make_node("MatMul", [q, kt], name=f"{node.name}_qk", **before).output
    s = graph.add_constant(f"{node.name}_scale", np.array(scale, dtype=dtype))
    scores = graph.make_node("Mul", [scores, s], name=f"{node.name}_scaled", **before).output
    if node.attrs.get("is_causal", 0):
        scores = _add_causal_mask(graph, node, q, k, scores, dtype)
    if mask is not None:
        if mask.dtype == "bool":
            neg = graph.add_constant(f"{node.name}_neginf", np.array(-np.inf, dtype=dtype))
            scores = graph.make_node("Where", [mask, scores, neg], name=f"{node.name}_mask", **before).output
        else:
            scores = graph.make_node("Add", [scores, mask], name=f"{node.name}_mask", **before).output
    probs = graph.make_node("Softmax", [scores], {"axis": -1}, name=f"{node.name}_softmax", **before).output
    _finish(graph, node, graph.make_node("MatMul", [probs, v], name=f"{node.name}_pv", **before).output)


def _add_causal_mask(graph: Graph, node: Node, q, k, scores, dtype):
    """scores + mask, where mask is -inf above the diagonal (query i sees keys <= i)."""
    before = dict(before=node)
    start = graph.add_constant(f"{node.name}_seq_start", np.array([-2], dtype=np.int64))
    end = graph.add_constant(f"{node.name}_seq_end", np.array([-1], dtype=np.int64))
    lengths = []
    for t in (q, k):  # the mask is [query length, key length]
        shape = graph.make_node("Shape", [t], name=f"{node.name}_shape", **before).output
        lengths.append(graph.make_node("Slice", [shape, start, end], name=f"{node.name}_len", **before).output)
    dims = graph.make_node("Concat", lengths, {"axis": 0}, name=f"{node.name}_dims", **before).output
    zeros = graph.make_node("ConstantOfShape", [dims], {"value": np.array([0.0], dtype=dtype)},
                            name=f"{node.name}_zeros", **before).output
    neg = graph.add_constant(f"{node.name}_neginf", np.array(-np.inf, dtype=dtype))
    upper = graph.make_node("Add", [zeros, neg], name=f"{node.name}_neg", **before).output
    tri = graph.make_node("Trilu", [upper, graph.add_constant(f"{node.name}_k", np.array(1, dtype=np.int64))],
                          {"upper": 1}, name=f"{node.name}_causal", **before).output
    return graph.make_node("Add", [scores, tri], name=f"{node.name}_causal_add", **before).output


EXPANSIONS = {"Swish": expand_swish, "Attention": expand_attention}
