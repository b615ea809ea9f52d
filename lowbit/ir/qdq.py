"""FakeQuantize <-> QuantizeLinear/DequantizeLinear: the same grid, written the way ONNX Runtime runs it.

A FakeQuantize on an activation becomes QuantizeLinear -> DequantizeLinear;
one on a constant weight becomes an integer initializer -> DequantizeLinear,
the form ONNX Runtime's QDQ fusions turn into integer kernels. Symmetric
grids (weights, and signed symmetric activations) use int8 with zero point 0,
others uint8; per-channel ranges give per-axis scales.

Weights are always int8 with zero point 0: it is the only weight form that
OpenVINO's low-precision transformations run as INT8 (a uint8 weight with
zero point 128, the same grid shifted, made OpenVINO run every Convolution in
f32), and the form ONNX Runtime's x86 QDQ fusions expect. What is written
never depends on the CPU that writes it; the saturation of u8 x s8 kernels on
CPUs without VNNI is guarded against by the overflow fix (the weight grid,
see quant/ranges.py), not by the storage type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedOpError
from .graph import Graph, Node
from .ops import is_fake_quantize

EPS = 1e-8


@dataclass
class QDQParams:
    scale: np.ndarray
    zero_point: np.ndarray  # int8 or uint8
    axis: int | None


def qdq_params(levels: int, low: np.ndarray, high: np.ndarray) -> QDQParams:
    """Scale and zero point of the grid of `levels` points spanning [low, high] (per tensor or per channel)."""
    low64 = np.asarray(low, dtype=np.float64)
    high64 = np.asarray(high, dtype=np.float64)
    channel_dims = [i for i, d in enumerate(low64.shape) if d != 1]
    if len(channel_dims) > 1:
        raise UnsupportedOpError(f"a FakeQuantize range of shape {low64.shape} varies along several axes")
    axis = channel_dims[0] if channel_dims else None
    low64, high64 = low64.reshape(-1), high64.reshape(-1)
    if axis is None:
        low64, high64 = low64[:1], high64[:1]
    if not 2 <= levels <= 256:
        raise UnsupportedOpError(f"QDQ writes grids of at most 8 bits; this FakeQuantize has {levels} levels")
    scale = np.maximum((high64 - low64) / (levels - 1), EPS)
    zp_unsigned = np.round(-low64 / scale)
    center = levels // 2
    if np.all(zp_unsigned == center):  # a symmetric signed grid: int8 around 0 ([-127, 127] for 255 levels)
        zp = np.zeros_like(zp_unsigned, dtype=np.int8)
    else:
        zp = np.clip(zp_unsigned, 0, 255).astype(np.uint8)
    if axis is None:
        return QDQParams(scale.astype(np.float32).reshape(()), zp.reshape(()), None)
    return QDQParams(scale.astype(np.float32), zp, axis)


def quantize_array(x: np.ndarray, p: QDQParams) -> np.ndarray:
    """x quantized to p's integer grid (what QuantizeLinear computes)."""
    info = np.iinfo(p.zero_point.dtype)
    shape = [1] * x.ndim
    if p.axis is not None:
        shape[p.axis] = -1
    q = np.round(x.astype(np.float64) / p.scale.reshape(shape)) + p.zero_point.astype(np.int64).reshape(shape)
    return np.clip(q, info.min, info.max).astype(p.zero_point.dtype)


def fake_quantize_to_qdq(graph: Graph) -> Graph:
    """A copy of `graph` with every FakeQuantize written as QDQ (the graph itself if it has none)."""
    if not any(is_fake_quantize(n) for n in graph):
        return graph
    graph = graph.copy()
    for node in graph.nodes:
        if is_fake_quantize(node):
            _rewrite(graph, node)
    graph.remove_unused_constants()
    return graph


def _rewrite(graph: Graph, node: Node) -> None:
    x, low, high, out_low, out_high = node.inputs[:5]
    if any(v is None or v.const is None for v in (low, high, out_low, out_high)):
        raise UnsupportedOpError(f"FakeQuantize {node.name!r} has non-constant ranges; QDQ needs constants")
    if not (np.array_equal(low.const, out_low.const) and np.array_equal(high.const, out_high.const)):
        raise UnsupportedOpError(f"FakeQuantize {node.name!r} maps to a different output range, which QDQ "
                                 "cannot express")
    p = qdq_params(int(node.attrs["levels"]), low.const, high.const)
    attrs = {"axis": p.axis} if p.axis is not None else {}
    quantized = quantize_array(x.const, p) if x.const is not None else None
    scale = graph.add_constant(f"{node.name}_scale", p.scale)
    zero_point = graph.add_constant(f"{node.name}_zero_point", p.zero_point)
    if quantized is not None:
        q = graph.add_constant(f"{x.name}_quantized", quantized)
    else:
        q = graph.make_node("QuantizeLinear", [x, scale, zero_point], attrs, name=f"{node.name}_q",
                            before=node).output
    dq = graph.make_node("DequantizeLinear", [q, scale, zero_point], attrs, name=f"{node.name}_dq",
                         before=node).output
    out = node.output
    graph.replace_all_uses(out, dq)
    dq.dtype, dq.shape = out.dtype, out.shape
    graph.remove(node)
