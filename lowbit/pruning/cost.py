"""What a model costs, read from its IR: parameters and multiply-accumulates per sample.

`cost(graph)` counts every float tensor constant's elements (weights, biases, norm
parameters and statistics) and the MACs of Conv, ConvTranspose, Gemm and
MatMul for one sample: a symbolic dim (the batch) counts as 1. Layers whose
shapes are not static are left out and counted in `unknown`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph, Node
from ..ir.ops import CONVOLUTIONS, LAYERS


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    unknown: int = 0  # layers whose MACs could not be counted (a dynamic spatial size)


def _dims(shape) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in shape]  # a symbolic dim is the batch (or a sequence): 1


def _macs(node: Node) -> int | None:
    out = _dims(node.output.shape)
    w = node.input(1) if len(node.inputs) > 1 else None
    w_shape = _dims(w.shape) if w is not None else None
    if out is None or w_shape is None:
        return None
    if any(isinstance(d, str) for d in (node.output.shape or ())[1:]) and node.op_type in CONVOLUTIONS:
        return None  # a dynamic spatial size
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(w_shape[1:]))
    if node.op_type == "ConvTranspose":
        x = _dims(node.input(0).shape)
        return None if x is None else int(np.prod(x)) * int(np.prod(w_shape[1:]))
    a = _dims(node.input(0).shape)
    if a is None:
        return None
    transposed = node.op_type == "Gemm" and node.attrs.get("transA", 0)
    inner = a[-2] if transposed else a[-1]
    return int(np.prod(out)) * inner


def cost(graph: Graph) -> Cost:
    """Parameters and per-sample MACs of `graph`."""
    params = sum(int(v.const.size) for v in graph.constants.values()
                 if v.const is not None and np.ndim(v.const) >= 1
                 and np.issubdtype(np.asarray(v.const).dtype, np.floating))
    macs, unknown = 0, 0
    for node in graph:
        if node.op_type in LAYERS and not node.domain:
            m = _macs(node)
            if m is None:
                unknown += 1
            else:
                macs += m
    return Cost(params, macs, unknown)
