"""A fused query/key/value projection written for OpenVINO as one projection per part, so that the query's and
the key's quantizers run inside their projections.

A ViT (timm's, the bench's) computes q, k and v with one Linear of 3 x D outputs, then cuts its output apart:
Reshape [B, N, 3 * D] -> [B, N, 3, H, D/H], Transpose (the 3 first), and a Gather of index 0, 1 and 2
(`qkv[0]`) or a Split into three slices, each squeezed (timm's `qkv.unbind(0)`). The query and the key are
quantized after that (the attention's first MatMul reads them), the value is not. In OpenVINO's CPU plugin a
FakeQuantize fuses into the op before it when that op computes (a FullyConnected, an Eltwise); after a Gather it
runs alone, in f32, between two layout Reorders, twice per block: lowbit's ViT from ONNX took 1.07-1.12x NNCF's
time in OpenVINO, whose model kept the attention scale as a Multiply computed at run time (from the exporter's
Shape -> Sqrt), into which OpenVINO fused the FakeQuantize (lowbit folds that scale to a constant, and OpenVINO
then folds the Multiply into the FakeQuantize: MulFakeQuantizeFusion).

Written as three projections, each of D outputs (the columns of its part of the weight, its part of a
per-column weight grid and of the bias) followed by its own Reshape [B, N, H, D/H] and Transpose, the same
values reach the same ops: each output element is the same dot product. A per-tensor quantizer that reads a
part through those moves up to the projection's output (exact: elementwise with one grid, on either side of ops
that only move values), where OpenVINO fuses it into the FullyConnected, which writes int8; the Reshape,
Transpose and attention then read int8, and the Gathers, Reorders and lone FakeQuantizes are gone
(bench/results/deploy.md: the ViT at 0.90-0.91x NNCF's latency from ONNX, 0.66-0.82x from torch). Only the
OpenVINO forms (.xml and the .onnx written for OpenVINO) are split: ONNX Runtime runs a QDQ MatMul on integers
only with a quantized output right after it, which neither form gives it.

GPT-2 computes them with one addmm (transformers' Conv1D, a Gemm here) over its tokens viewed as rows, views
the output back as [B, N, 3 * D] and Splits it along that last axis (`ColumnSplit`): written as one Gemm per
part, each with its own view, the query's and key's quantizers move onto their parts the same way (a 4-layer
GPT-2 at 128 tokens ran eight FakeQuantizes alone, with their Reorders: 0.25 ms of 7.3).

A projection is matched by the patterns `_LAYER` and `_BIASED` (lowbit/patterns): its weight may be a
FakeQuantize of a constant (a graph from lowbit's passes) or a DequantizeLinear of one (a QDQ model read back),
read by that layer alone. A graph without a quantizer after the parts is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import MATMULS, QUANT_DOMAIN, VALUE_PRESERVING, is_fake_quantize, split_sizes, weight_out_axis
from ..patterns import Any, Const, P, match_at


@dataclass
class Part:
    """One part as the attention reads it: its index, the node whose output it is (a Gather, or a Squeeze after a
    Split), and the Transpose output axis it was taken along."""

    index: int
    reader: Node
    axis: int


@dataclass
class Projection:
    """x times a constant quantized weight, plus an optional constant bias: what OpenVINO runs as one
    FullyConnected. A MatMul or a Gemm (transA 0, alpha and beta 1, a constant C), and the Add of its bias."""

    layer: Node  # the MatMul or Gemm
    bias: Node | None  # the Add of its bias (a Gemm may hold its bias in C instead)
    weight: Node  # the FakeQuantize or DequantizeLinear of the constant weight
    axis: int  # the weight's axis of output columns: 1, or 0 for a Gemm with transB

    @property
    def output(self) -> Value:
        return (self.bias or self.layer).output

    @property
    def width(self) -> int:
        return self.weight.input(0).const.shape[self.axis]

    def bias_values(self) -> np.ndarray | None:
        """One bias value per output column (a single one broadcast), or None without a bias."""
        constant = _bias_constant(self.layer, self.bias)
        return None if constant is None else np.broadcast_to(constant.const.reshape(-1), (self.width,))


@dataclass
class FusedProjection:
    """A projection (a MatMul of constant quantized weight [K, C], an optional constant bias), a Reshape that cuts
    C into `parts` x `rest` at axis `cut`, and a Transpose whose readers take one part each: Gathers of one index
    (`qkv[0]`), or a Split into single slices each squeezed (timm's `qkv.unbind(0)`)."""

    projection: Projection
    reshape: Node
    transpose: Node
    split: Node | None  # the Split of unbind, removed with the Transpose
    taken: list[Part]
    cut: int
    parts: int


@dataclass
class ColumnSplit:
    """A projection's output cut along its last axis by a Split, directly or through a Reshape that keeps that
    axis (GPT-2's Conv1D computes q, k and v as one [B * N, 3 * D] addmm, views it as [B, N, 3 * D] and splits
    it into three [B, N, D])."""

    projection: Projection
    view: Node | None
    split: Node
    sizes: list[int]


def projections_for_openvino(graph: Graph) -> Graph:
    """`graph`, or a copy in which every fused projection whose parts are quantized is one projection per part,
    and every per-tensor quantizer that reads a projection's output through ops that only move values (a Reshape
    into heads, a Transpose) reads that output itself."""
    if not any(_fused_projection(n) or _column_split(n) or _moved_quantizer(n) for n in graph):
        return graph
    graph = graph.copy()
    for find, rewrite in ((_fused_projection, _split), (_column_split, _split_columns),
                          (_moved_quantizer, _quantizer_up_to)):
        for node in graph.nodes:
            if node.graph is graph and (found := find(node)) is not None:
                rewrite(graph, found)
    graph.remove_unused_constants()
    return graph


def _only_user(value: Value) -> Node | None:
    users = value.users
    return users[0] if len(users) == 1 and not value.is_graph_output else None


def _const_operand(node: Node) -> Value | None:
    """The constant one of a binary node's two inputs, where exactly one is constant."""
    consts = [v for v in node.inputs[:2] if v is not None and v.const is not None]
    return consts[0] if len(consts) == 1 and len(node.inputs) == 2 else None


def _quantized_after(value: Value, depth: int = 4) -> bool:
    """Whether `value` reaches a quantizer through value-preserving ops and multiplications by a constant (the
    attention's scale)."""
    node = _only_user(value)
    if node is None or depth == 0:
        return False
    if is_fake_quantize(node) or node.op_type == "QuantizeLinear" and not node.domain:
        return True
    if node.domain or not (node.op_type in VALUE_PRESERVING or node.op_type == "Mul" and _const_operand(node)):
        return False
    return _quantized_after(node.output, depth - 1)


def _fused_projection(transpose: Node) -> FusedProjection | None:
    if transpose.op_type != "Transpose" or transpose.domain:
        return None
    reshape = transpose.input(0).producer
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain or _only_user(reshape.output) is not transpose:
        return None
    before, after = reshape.input(0).shape, reshape.output.shape
    if before is None or after is None or len(after) != len(before) + 2 or not _keeps_leading_dims(reshape) \
            or not all(isinstance(d, int) for d in after[len(before) - 1:]):
        return None
    cut, width = len(before) - 1, before[-1]
    parts = after[cut]
    if not isinstance(width, int) or parts < 2 or width != int(np.prod(after[cut:])):
        return None
    perm = list(transpose.attrs.get("perm", []))
    taken = _taken_parts(transpose, perm, cut, parts) if perm and not transpose.output.is_graph_output else None
    if not taken or not any(_quantized_after(part.reader.output) for part in taken):
        return None  # no parts, or nothing for OpenVINO to fuse: three projections would only be more ops
    projection = _projection(reshape.input(0))
    if projection is None or projection.layer.op_type != "MatMul" or projection.width != width \
            or _only_user(projection.output) is not reshape or not all(
                _part_of(projection.weight, port, slice(0, width // parts)) is not None
                for port in range(1, len(projection.weight.inputs))):
        return None
    split = transpose.output.users[0] if transpose.output.users[0].op_type == "Split" else None
    return FusedProjection(projection, reshape, transpose, split, taken, cut, parts)


def _keeps_leading_dims(reshape: Node) -> bool:
    """Whether the Reshape keeps every dim of its input but the last (known equal, or copied by a 0 in its
    shape), so that it only cuts the last one."""
    before, after, target = reshape.input(0).shape, reshape.output.shape, reshape.input(1).const
    copied = target is not None and target.ndim == 1 and target.size == len(after) and not reshape.attrs.get(
        "allowzero", 0)
    return all(a == b and a is not None or copied and int(target[i]) == 0
               for i, (a, b) in enumerate(zip(after[:len(before) - 1], before[:-1])))


def _taken_parts(transpose: Node, perm: list[int], cut: int, parts: int) -> list[Part] | None:
    """The parts the Transpose's readers take along the axis the Reshape cut (its output axis a with perm[a] ==
    cut): each reader a Gather of one constant index, or the one reader a Split into `parts` slices of one, each
    used slice squeezed on that axis. None for any other reader."""
    readers = transpose.output.users
    if not readers:
        return None
    if readers[0].op_type == "Split" and len(readers) == 1 and not readers[0].domain:
        split = readers[0]
        axis = split.attrs.get("axis", 0) % len(perm)
        if perm[axis] != cut or split_sizes(split, parts) != [1] * parts or len(split.outputs) != parts:
            return None
        taken = []
        for index, out in enumerate(split.outputs):
            if not out.users:
                continue
            squeeze = _only_user(out)
            if squeeze is None or squeeze.op_type != "Squeeze" or squeeze.domain or _axes(squeeze, len(perm)) != [axis]:
                return None
            taken.append(Part(index, squeeze, axis))
        return taken
    taken = []
    for gather in readers:
        if gather.op_type != "Gather" or gather.domain or gather.input(1).const is None:
            return None
        axis, index = gather.attrs.get("axis", 0) % len(perm), gather.input(1).const
        if index.ndim != 0 or perm[axis] != cut or not -parts <= int(index) < parts:
            return None
        taken.append(Part(int(index) % parts, gather, axis))
    return taken


def _axes(squeeze: Node, rank: int) -> list[int] | None:
    """A Squeeze's constant axes (its input from opset 13, its attribute before) on its input of `rank` dims, made
    non-negative."""
    axes = squeeze.input(1).const if len(squeeze.inputs) > 1 and squeeze.input(1) is not None \
        else squeeze.attrs.get("axes")
    if axes is None:
        return None
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))


def _part_of(weight: Node, port: int, columns: slice, axis: int = 1) -> np.ndarray | None:
    """Input `port` of the weight's quantizer for the output `columns` (along the weight's `axis`: 1 for x @ W,
    0 for a Gemm's transposed B): the weight sliced, a per-tensor grid value as it is, a per-column one sliced;
    None for any other layout."""
    value = weight.input(port)
    if value is None:
        return None
    array = value.const
    width = weight.input(0).const.shape[axis]
    if port == 0:
        return array[:, columns] if axis == 1 else array[columns]
    if array.size == 1:
        return array
    if is_fake_quantize(weight):  # broadcast against the weight: per column is [C] or [1, C] (axis 1), [C, 1] (0)
        layout = {1: [(width,), (1, width)], 0: [(width, 1)]}[axis]
        return (array[..., columns] if axis == 1 else array[columns]) if array.shape in layout else None
    per_column = weight.attrs.get("axis", 1) % 2 == axis and array.ndim == 1 and array.size == width
    return array[columns] if per_column else None


def _split(graph: Graph, p: FusedProjection) -> None:
    step = p.projection.width // p.parts
    perm = list(p.transpose.attrs["perm"])
    rest = [int(d) for d in p.reshape.output.shape[p.cut + 1:]]
    for part in p.taken:
        hint = f"{p.projection.layer.name}_part{part.index}"
        columns = slice(part.index * step, (part.index + 1) * step)
        y = _part_projection(graph, p.projection, columns, hint, part.reader)
        shape = graph.add_constant(f"{hint}_shape", np.asarray([0] * p.cut + rest, np.int64))
        y = graph.make_node("Reshape", [y, shape], name=f"{hint}_heads", before=part.reader).output
        moved = [d - (d > p.cut) for i, d in enumerate(perm) if i != part.axis]
        if moved != sorted(moved):
            y = graph.make_node("Transpose", [y], {"perm": moved}, name=f"{hint}_moved", before=part.reader).output
        y.dtype, y.shape = part.reader.output.dtype, part.reader.output.shape
        graph.replace_all_uses(part.reader.output, y)
        graph.remove(part.reader)
    _remove(graph, p.split, p.transpose, p.reshape, p.projection)


def _part_projection(graph: Graph, p: Projection, columns: slice, hint: str, before: Node) -> Value:
    """The output of a new projection, before `before`, that computes `p`'s output `columns` alone: the same
    input, the weight's columns quantized on their part of the grid, their part of the bias, the same kind of
    layer (a MatMul and its bias Add, a Gemm with its C, or a Gemm and its bias Add)."""

    def op(op_type, inputs, attrs=None, suffix="", domain=""):
        return graph.make_node(op_type, inputs, attrs or {}, name=f"{hint}{suffix}", domain=domain,
                               before=before).output

    params = [graph.add_constant(f"{hint}_weight_{port}", _part_of(p.weight, port, columns, p.axis))
              for port in range(len(p.weight.inputs))]
    weight = op(p.weight.op_type, params, dict(p.weight.attrs), "_weight", p.weight.domain)
    bias = p.bias_values()
    part_bias = graph.add_constant(f"{hint}_bias", bias[columns]) if bias is not None else None
    x = p.layer.input(0)
    if p.layer.op_type == "Gemm" and p.bias is None:
        return op("Gemm", [x, weight] + ([part_bias] if part_bias is not None else []), dict(p.layer.attrs))
    y = op(p.layer.op_type, [x, weight], dict(p.layer.attrs))
    return op("Add", [y, part_bias], suffix="_bias") if part_bias is not None else y


def _remove(graph: Graph, *nodes: Node | Projection | None) -> None:
    """Remove what a split left unread, readers first (a projection: its bias Add, its layer, its weight)."""
    for node in nodes:
        if isinstance(node, Projection):
            _remove(graph, node.bias, node.layer, node.weight)
        elif node is not None:
            graph.remove(node)


def _per_tensor_quantizer(node: Node | None) -> list[Node]:
    """The nodes of a per-tensor quantizer that `node` starts: a FakeQuantize, or a QuantizeLinear and the one
    DequantizeLinear that reads it (a QDQ model read back); [] for anything else."""
    if node is None or not all(v is not None and v.const is not None and v.const.size == 1
                               for v in node.inputs[1:]):
        return []
    if is_fake_quantize(node):
        return [node]
    if node.op_type != "QuantizeLinear" or node.domain:
        return []
    dq = _only_user(node.output)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain or not all(
            v is not None and v.const is not None and v.const.size == 1 for v in dq.inputs[1:]):
        return []
    return [node, dq]


def _moved_quantizer(layer: Node) -> Value | None:
    """The output of the projection `layer` starts (its bias Add's, if it has one) where a per-tensor quantizer
    reads it through ops that only move values (or scale them by a power of two); None otherwise."""
    if layer.op_type not in MATMULS or layer.domain:
        return None
    add = _only_user(layer.output)
    projection = (_projection(add.output) if add is not None else None) or _projection(layer.output)
    if projection is None or projection.layer is not layer:
        return None
    moved_through, _, chain = _path_to_quantizer(projection.output)
    return projection.output if moved_through and chain else None


def _constant_grid(quantizer: Node) -> bool:
    return all(v is None or v.const is not None for v in quantizer.inputs[1:])


def _no_gemm_scaling(layer: Node) -> bool:
    """A MatMul, or a Gemm that computes x @ B (+ C): no transposed A, alpha and beta 1."""
    attrs = layer.attrs
    return not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


def _no_second_bias(add: Node) -> bool:
    """The Add of a bias after a layer with none of its own (a Gemm's C)."""
    layer = next((v.producer for v in add.inputs if v is not None and v.producer is not None), None)
    return layer is None or len(layer.inputs) < 3 or layer.input(2) is None


_WEIGHT = Const("weight", where=lambda w: w.ndim == 2)
# x @ W, W a constant quantized by a FakeQuantize or DequantizeLinear of constant grid parameters; a Gemm's C
# constant; and the Add of a constant bias after it
_LAYER = P(MATMULS, Any("x"),
           P("FakeQuantize", _WEIGHT, name="quantizer", where=_constant_grid, domain=QUANT_DOMAIN)
           | P("DequantizeLinear", _WEIGHT, name="quantizer", where=_constant_grid),
           Any("c"), name="layer", where=_no_gemm_scaling)
_BIASED = P("Add", _LAYER, Const("bias"), name="add", where=_no_second_bias)


def _projection(value: Value) -> Projection | None:
    """The projection whose output `value` is, each of its nodes read by the next alone; None for any other
    producer."""
    node = value.producer
    if node is None:
        return None
    found = match_at(_BIASED, node) if node.op_type == "Add" else match_at(_LAYER, node)
    c = found["c"] if found is not None else None
    if found is None or c is not None and c.const is None:
        return None  # not a projection, or a Gemm whose C is computed at run time
    layer = found["layer"]
    projection = Projection(layer, found.get("add"), found["quantizer"], weight_out_axis(layer) % 2)
    constant = _bias_constant(layer, projection.bias)
    if constant is not None and constant.const.size not in (1, projection.width):
        return None  # a bias not one per column nor one for all
    return projection


def _bias_constant(layer: Node, bias: Node | None) -> Value | None:
    """The constant bias of a projection: its Add's constant operand, or a Gemm's C."""
    if bias is not None:
        return _const_operand(bias)
    return layer.input(2) if layer.op_type == "Gemm" and len(layer.inputs) > 2 else None


def _column_split(split: Node) -> ColumnSplit | None:
    if split.op_type != "Split" or split.domain or not any(_quantized_after(out) for out in split.outputs):
        return None  # nothing for OpenVINO to fuse: more projections would only be more ops
    value, view = split.input(0), split.input(0).producer
    if view is not None and view.op_type == "Reshape" and not view.domain:
        if view.input(1).const is None or _only_user(value) is not split:
            return None
        value = view.input(0)
    else:
        view = None
    projection = _projection(value)
    shape = split.input(0).shape
    if projection is None or _only_user(value) is not (view or split) or not shape or value.shape is None:
        return None
    width = projection.width
    if split.attrs.get("axis", 0) % len(shape) != len(shape) - 1 or shape[-1] != width or value.shape[-1] != width:
        return None  # not along the columns, or a view that moves them
    sizes = split_sizes(split, width)
    if sizes is None or sum(sizes) != width or not all(
            _part_of(projection.weight, port, slice(0, sizes[0]), projection.axis) is not None
            for port in range(1, len(projection.weight.inputs))):
        return None
    return ColumnSplit(projection, view, split, sizes)


def _split_columns(graph: Graph, c: ColumnSplit) -> None:
    """One projection per part of the Split, each with its own view: the same dot products, and the part's
    quantizer then reads a projection (moved onto it by `_quantizer_up_to`)."""
    start = 0
    for index, (size, out) in enumerate(zip(c.sizes, c.split.outputs)):
        columns, start = slice(start, start + size), start + size
        if not out.uses and not out.is_graph_output:
            continue  # a part nothing reads gets no projection
        hint = f"{c.projection.layer.name}_part{index}"
        y = _part_projection(graph, c.projection, columns, hint, c.split)
        if c.view is not None:
            target = c.view.input(1).const.copy()
            target[-1] = size if target[-1] > 0 else target[-1]  # -1 and 0 (copy) give the part's width too
            shape = graph.add_constant(f"{hint}_shape", target)
            y = graph.make_node("Reshape", [y, shape], dict(c.view.attrs), name=f"{hint}_view", before=c.split).output
        y.dtype, y.shape = out.dtype, out.shape
        graph.replace_all_uses(out, y)
    _remove(graph, c.split, c.view, c.projection)


def _power_of_two_scale(node: Node) -> float | None:
    """The factor of a Mul by a positive scalar constant power of two (T5's attention scale of 1, written as a
    Mul by the exporter), which a grid's step can take exactly; None for any other node."""
    if node.op_type != "Mul" or node.domain or (c := _const_operand(node)) is None or c.const.size != 1:
        return None
    factor = float(c.const.reshape(-1)[0])
    return factor if factor > 0 and np.frexp(factor)[0] == 0.5 else None


def _path_to_quantizer(projected: Value) -> tuple[int, float, list[Node]]:
    """From `projected` down single readers that move values or scale them by a power of two: how many such ops,
    the product of the scales, and the per-tensor quantizer they end at ([] where they end elsewhere)."""
    steps, factor, value, node = 0, 1.0, projected, _only_user(projected)
    while node is not None and not node.domain:
        if node.op_type in VALUE_PRESERVING and node.inputs[0] is value:  # the data, not a shape or indices
            pass
        elif (scale := _power_of_two_scale(node)) is not None:
            factor *= scale
        else:
            break
        steps, value, node = steps + 1, node.output, _only_user(node.output)
    return steps, factor, _per_tensor_quantizer(node) if node is not None and node.inputs[0] is value else []


def _quantizer_up_to(graph: Graph, projected: Value) -> None:
    """Move the per-tensor quantizer that reads `projected` through value-preserving ops up to `projected`, where
    OpenVINO fuses it into the FullyConnected: OpenVINO moved it up through a Transpose but not through a Reshape,
    and ran it alone there, in f32 between two layout Reorders. Elementwise with one grid, it gives the same
    values on either side of ops that only move them; a Mul by a power of two on the way (kept in place) scales
    the moved grid's step by its inverse, exactly."""
    _, factor, chain = _path_to_quantizer(projected)
    value = chain[0].input(0)
    reader, x = _only_user(projected), projected
    for old in chain:
        params = list(old.inputs[1:])
        if factor != 1.0:  # a FakeQuantize's four range ends, or a QuantizeLinear/DequantizeLinear's scale
            ports = range(4) if is_fake_quantize(old) else range(1)
            params = [graph.add_constant(f"{old.name}_moved", (v.const / factor).astype(v.const.dtype))
                      if i in ports else v for i, v in enumerate(params)]
        x = graph.make_node(old.op_type, [x, *params], dict(old.attrs), name=old.name, domain=old.domain,
                            before=reader).output
        x.dtype, x.shape = old.output.dtype, projected.shape
    reader.set_input(reader.inputs.index(projected), x)
    graph.replace_all_uses(chain[-1].output, value)
    for old in reversed(chain):
        graph.remove(old)
