"""A patch embedding written for ONNX Runtime's integer kernels: a quantized Conv whose kernel tiles its input
(stride = kernel, no padding, dilation or groups: a ViT's or Swin's patch embedding) and whose output stays float
becomes a MatMul of the image's patches by the flattened filters.

ONNX Runtime runs a quantized Conv on integers only where its output is quantized too (QLinearConv); a ViT's
patch embedding, whose output a Reshape carries into the class-token Concat, ran as DequantizeLinear -> Conv in
float, and ONNX Runtime's ConvInteger is 2.8-6x slower than that float Conv. But a Conv whose kernel tiles its
input is a MatMul: each patch's C x kh x kw pixels times the filters laid out as a [C*kh*kw, D] int8 weight (the
same integers, a per-column scale where the Conv had a per-filter one), which ONNX Runtime runs as
MatMulIntegerToFloat. The image is cut into patches by Reshape -> Transpose -> Reshape, which keep its values on
their grid (the writer requantizes after them, qdq.py); the bias is an Add; a Transpose and a Reshape give the
Conv's [B, D, H/kh, W/kw] back. The same products, summed in another order. OpenVINO runs the Conv itself in
INT8: its QDQ form (runtime="openvino") and the .xml keep it.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node


def patch_convs_as_matmuls(graph: Graph) -> int:
    """Rewrite every patch-embedding Conv of the QDQ `graph` whose output stays float; the number rewritten."""
    convs = [n for n in graph if _patch_conv(n)]
    for conv in convs:
        _as_matmul(graph, conv)
    return len(convs)


def _dequantized(node: Node | None, constant: bool) -> bool:
    """A DequantizeLinear of a constant (or of an activation), with constant scale and zero point."""
    return node is not None and node.op_type == "DequantizeLinear" and not node.domain and \
        (node.input(0).const is not None) == constant and all(node.input(i) is not None and
                                                              node.input(i).const is not None for i in (1, 2))


def _patch_conv(conv: Node) -> bool:
    """`conv` reads a per-tensor activation grid and symmetric int8 filters, its kernel tiles its input of static
    size, and its output is not quantized."""
    if conv.op_type != "Conv" or conv.domain:
        return False
    x_dq, w_dq, bias = conv.input(0).producer, conv.input(1).producer, conv.input(2)
    if not (_dequantized(x_dq, constant=False) and _dequantized(w_dq, constant=True)):
        return False
    weight, x_shape, scales = w_dq.input(0).const, conv.input(0).shape, w_dq.input(1).const.size
    per_tensor_input = x_dq.input(1).const.size == 1
    symmetric_filters = weight.ndim == 4 and not np.any(w_dq.input(2).const) and (
        scales == 1 or scales == weight.shape[0] and w_dq.attrs.get("axis", 1) == 0)
    if not (per_tensor_input and symmetric_filters) or bias is not None and bias.const is None:
        return False
    kernel = list(weight.shape[2:])
    if kernel[0] * kernel[1] == 1:  # a pointwise conv: no patches, and a CNN's layout would be transposed twice
        return False
    a = conv.attrs
    if a.get("group", 1) != 1 or list(a.get("kernel_shape", kernel)) != kernel or list(a.get("strides", [1, 1])) \
            != kernel or any(a.get("pads", [0] * 4)) or any(d != 1 for d in a.get("dilations", [1, 1])) \
            or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    if x_shape is None or len(x_shape) != 4 or not all(isinstance(d, int) for d in x_shape[1:]) \
            or x_shape[2] % kernel[0] or x_shape[3] % kernel[1] or x_shape[1] != weight.shape[1]:
        return False
    return not any(u.op_type == "QuantizeLinear" for u in conv.output.users)  # QLinearConv runs that one


def _as_matmul(graph: Graph, conv: Node) -> None:
    x, w_dq, bias = conv.input(0), conv.input(1).producer, conv.input(2)
    weight = w_dq.input(0).const
    filters, channels, kh, kw = weight.shape
    _, _, height, width = x.shape
    rows, cols = height // kh, width // kw

    def op(op_type, inputs, attrs=None, hint=""):
        return graph.make_node(op_type, inputs, attrs or {}, name=f"{conv.name}_{hint}", before=conv).output

    def ints(values, hint):
        return graph.add_constant(f"{conv.name}_{hint}", np.asarray(values, np.int64))

    tiles = op("Reshape", [x, ints([-1, channels, rows, kh, cols, kw], "tiles_shape")], hint="tiles")
    moved = op("Transpose", [tiles], {"perm": [0, 2, 4, 1, 3, 5]}, hint="patches_moved")
    patches = op("Reshape", [moved, ints([-1, rows * cols, channels * kh * kw], "patches_shape")], hint="patches")
    columns = graph.add_constant(f"{conv.name}_weight_columns",
                                 np.ascontiguousarray(weight.reshape(filters, -1).T))
    scale, zero = w_dq.input(1), w_dq.input(2)
    axis = {"axis": 1} if scale.const.size > 1 else {}
    if scale.const.ndim > 1:
        scale = graph.add_constant(f"{conv.name}_weight_scale", scale.const.reshape(-1))
        zero = graph.add_constant(f"{conv.name}_weight_zero_point", zero.const.reshape(-1))
    w = op("DequantizeLinear", [columns, scale, zero], axis, hint="weight_dq")
    y = op("MatMul", [patches, w], hint="matmul")
    if bias is not None:
        y = op("Add", [y, bias], hint="bias")
    y = op("Transpose", [y], {"perm": [0, 2, 1]}, hint="filters_first")
    y = op("Reshape", [y, ints([-1, filters, rows, cols], "map_shape")], hint="map")
    y.dtype, y.shape = conv.output.dtype, conv.output.shape
    graph.replace_all_uses(conv.output, y)
    graph.remove(conv)
    if not w_dq.output.uses and not w_dq.output.is_graph_output:
        graph.remove(w_dq)
