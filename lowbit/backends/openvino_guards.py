"""Rewrites of a graph about to be written as ONNX or OpenVINO IR that keep OpenVINO from computing it wrong,
without changing what it computes. tests/test_openvino_workarounds.py holds, for each, the smallest model that
shows OpenVINO's fault, as a canary that fails once OpenVINO is fixed.

- A quantized Conv or ConvTranspose with no bias, or an all-zero one, whose output a quantizer reads beside
  another op (a float reader, or the graph output): OpenVINO 2026.4's CPU plugin computes the quantized branch as
  zeros (0 dB; a PoolFormer's patch embeddings, read by their residual Add through a quantizer and by their
  GroupNorm in float). MatMul and Gemm are not affected.
  With any non-zero bias it is right, so such a layer gets a bias of TINY_BIAS per output channel: the
  convolution's float32 outputs do not change unless they are within about 1e-23 of zero, where the quantizer
  reads zero either way. Its .onnx, in ONNX Runtime too, carries that bias; ONNX Runtime rounds it to the int32
  zero of QLinearConv's bias.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import CONVOLUTIONS, attribute, is_fake_quantize, weight_out_axis

TINY_BIAS = 1e-30  # float32-normal, so no runtime flushes it to the zero bias it replaces


def guarded_for_openvino(graph: Graph) -> Graph:
    """`graph`, or a copy in which each quantized convolution that OpenVINO would compute wrong (see the module
    doc) has the bias that keeps it right."""
    names = [n.name for n in graph if _needs_bias(n)]
    if not names:
        return graph
    graph = graph.copy()
    for node in [n for n in graph if n.name in names]:
        bias = graph.add_constant(f"{node.name}_bias", np.full(_out_channels(node), TINY_BIAS, np.float32))
        if len(node.inputs) > 2:
            node.set_input(2, bias)
        else:
            node.append_input(bias)
    graph.remove_unused_constants()
    return graph


def _out_channels(node: Node) -> int:
    """A quantized convolution's output channels, from its constant weight: a Conv's first axis; a ConvTranspose's
    second, once per group."""
    weight = node.input(1).producer.input(0).const
    groups = attribute(node, "group") if node.op_type == "ConvTranspose" else 1
    return int(weight.shape[weight_out_axis(node)] * groups)


def _needs_bias(node: Node) -> bool:
    if node.op_type not in CONVOLUTIONS or node.domain or len(node.inputs) < 2 or node.input(1) is None:
        return False
    if not _quantizes_a_constant(node.input(1).producer):
        return False
    bias = node.input(2) if len(node.inputs) > 2 else None
    if bias is not None and (bias.const is None or np.asarray(bias.const).any()):
        return False
    return _read_by_a_quantizer_and_more(node.output)


def _quantizes_a_constant(node: Node | None) -> bool:
    """A FakeQuantize or DequantizeLinear of a constant: a quantized weight."""
    if node is None or not (is_fake_quantize(node) or node.op_type == "DequantizeLinear" and not node.domain):
        return False
    return node.input(0).const is not None


def _read_by_a_quantizer_and_more(value: Value) -> bool:
    quantizers = [u for u in value.users if is_fake_quantize(u) or u.op_type == "QuantizeLinear" and not u.domain]
    return bool(quantizers) and (len(quantizers) < len(value.users) or value.is_graph_output)
