"""FakeQuantize <-> QuantizeLinear/DequantizeLinear: the same grid, written the way ONNX Runtime runs it.

A FakeQuantize on an activation becomes QuantizeLinear -> DequantizeLinear;
one on a constant weight becomes an integer initializer -> DequantizeLinear,
the form ONNX Runtime's QDQ fusions turn into integer kernels. Weights on
symmetric grids use int8 with zero point 0, asymmetric ones uint8;
activations on an unsigned grid are uint8, and a signed symmetric grid is
int8 with zero point 0 unless ONNX Runtime needs it as uint8 (the same grid
with zero point 128); per-channel ranges give per-axis scales.

ONNX Runtime fuses a QDQ layer into an integer kernel with a quantized output
(QLinearConv, QLinearMatMul, QGemm) only when its input and output have one
type, and on x86 it runs those kernels in u8 (U8S8, as its own quantizer
writes). So the quantizers a fusable layer links (its activation inputs, its
output, and everything sharing a grid with them through a Concat) form one
group, and a group with an unsigned grid stores its signed grids as uint8
(a MobileNetV2 expand conv reads a signed linear bottleneck and writes its
ReLU6 output: with an int8 input it stayed in float). So does a group with a
signed grid that several ops read: ONNX Runtime converts an int8 Q -> DQ to
uint8 itself only where one DequantizeLinear reads the QuantizeLinear (a
Conv before a SiLU, whose Sigmoid and Mul both read it, stayed in float
beside its uint8 input), and gives each reader its own DequantizeLinear. So
a signed grid read by several ops, a layer among them, is uint8 too, in or
out of a group (a transformer's LayerNorm output read by the next layer and
the residual Add: that layer ran in float). Every other signed grid
is int8 with zero point 0, the form OpenVINO needs: it cannot move a
dequantization with a zero point through a ReLU or into a fused attention
block, and ran those parts in float (a ViT's query/key/value quantizers, a
pre-activation DenseNet's BN-ReLU after each Concat). Where the two needs
meet (DenseNet's convs read a ReLU and write a signed grid that a Concat
joins to the next BN-ReLU), ONNX Runtime's wins: the .onnx runs those
BN-ReLUs in float in OpenVINO (twice NNCF's latency for a DenseNet); the
.xml, written for OpenVINO, does not. Hence the two forms of QDQ file
(`runtime`): "onnxruntime" (the default) as above, and "openvino", for an
.onnx deployed in OpenVINO, where every signed grid is int8 with zero point
0 (ONNX Runtime then runs the layers those groups link in float). Both hold
the same grids: only the storage type of the signed ones differs.
A model at opset 21 or later stores every signed activation grid as uint8
for ONNX Runtime: it cannot load int8 activation QDQ there (see ops.IR_OPSET).

A Relu between a layer and a signed grid stored as uint8 (zero point 128)
would keep ONNX Runtime from fusing the Relu into the integer layer: it drops
a Relu only before a quantizer whose zero point is the type's minimum. So the
ReLU output is written as Q -> DQ on the unsigned grid of the same scale, then
requantized onto the signed one: layer -> Q -> DQ (unsigned) -> Relu -> Q -> DQ
(signed). The values are the same (the unsigned grid clips at 0 as the ReLU
does, and the signed grid's clip at 127 steps comes second), and the layer
runs as QLinearConv (a DenseNet stem: Conv -> ReLU -> Concat).

Weights are always int8 with zero point 0: it is the only weight form that
OpenVINO's low-precision transformations run as INT8 (a uint8 weight with
zero point 128, the same grid shifted, made OpenVINO run every Convolution in
f32), and the form ONNX Runtime's x86 QDQ fusions expect. What is written
never depends on the CPU that writes it; the saturation of u8 x s8 kernels on
CPUs without VNNI is guarded against by the overflow fix (the weight grid,
see quant/ranges.py), not by the storage type.

A quantizer placed above value-preserving ops (Flatten, Reshape, Transpose,
MaxPool, ...: placement moves quantizers up through them; a Pad of zeros and
a Dropout, the identity in a deployed model, keep a grid too) leaves those ops
between the DequantizeLinear and the layer, and ONNX Runtime's QDQ fusions
only take a DequantizeLinear that feeds the layer itself. So the output of the
last such op gets a QuantizeLinear -> DequantizeLinear on the same grid, which
changes no value (the values there are already on that grid), shared by the
ops that read it and that ONNX Runtime fuses with a DequantizeLinear (layers,
Add, Mul, pooling; OpenVINO needs none of this): a ResNet's stem MaxPool then runs in uint8 (DQ -> MaxPool -> Q)
and both its readers, the first conv and the residual Add, fuse (QLinearConv,
QLinearAdd; with one Q -> DQ per conv the Add stayed in float, and the
MaxPool with it: 1.7x NNCF's ONNX Runtime latency).
Likewise ONNX Runtime has no integer Gemm with both a float bias and a float
output (QGemm takes one or the other), so such a Gemm (a classifier head) is
written as Gemm without bias -> Add(bias), and no integer conv with a float
output, so a patch embedding's Conv is written as a MatMul of the patches
(qdq_patches.py).

The local rewrites are rules of the pattern engine (`fake_quantize_as_qdq`,
`signed_grid_as_int8`, `gemm_float_bias_as_add`); the requantization after a
value-preserving chain follows the chain from each DequantizeLinear, a walk
no fixed pattern describes, and stays a function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedOpError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import (IR_OPSET, LAYERS, ORT_FOLDED_ACTIVATIONS, ORT_QDQ_READERS, QUANT_DOMAIN, VALUE_PRESERVING,
                      is_fake_quantize)
from ..patterns import Any, Const, Match, P, Rule, RuleSet
from .qdq_patches import patch_convs_as_matmuls

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


def quantize_array(x: np.ndarray, p: QDQParams, levels: int | None = None) -> np.ndarray:
    """x quantized to p's integer grid (what QuantizeLinear computes), saturated at the ends of the `levels`-point
    grid where it is given (a clipped 4-bit weight range leaves weights past its ends: they take the end's
    level, as the FakeQuantize rounds them), else at the integer type's.

    Rounded as torch's fake-quantize kernels round, which the simulation runs: x times the float32 reciprocal of
    the scale, in float32, to the nearest even. Divided in float64, a weight a rounding error from halfway
    between two levels (one in a few thousand) took the other level: an EfficientNet's .onnx then disagreed with
    its simulation at 55 dB, in every runtime, instead of 132."""
    info = np.iinfo(p.zero_point.dtype)
    shape = [1] * x.ndim
    if p.axis is not None:
        shape[p.axis] = -1
    inverse = np.float32(1.0) / p.scale.astype(np.float32).reshape(shape)
    q = np.rint(x.astype(np.float32) * inverse) + p.zero_point.astype(np.int64).reshape(shape)
    qmin, qmax = grid_integers(levels, p) if levels is not None else (info.min, info.max)
    return np.clip(q, qmin, qmax).astype(p.zero_point.dtype)


RUNTIMES = ("onnxruntime", "openvino")  # the runtimes a QDQ .onnx can be written for


def fake_quantize_to_qdq(graph: Graph, runtime: str = "onnxruntime") -> Graph:
    """A copy of `graph` with every FakeQuantize written as QDQ (the graph itself if it has none), in the form
    `runtime` (one of RUNTIMES) runs as INT8."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: one of {RUNTIMES}")
    if runtime == "openvino" and any(SIGNED_GRID_AS_INT8.match(graph, n)
                                     for n in graph if n.op_type == "QuantizeLinear"):
        graph = graph.copy()
        RuleSet([SIGNED_GRID_AS_INT8]).apply(graph)
        graph.remove_unused_constants()
    if not any(is_fake_quantize(n) for n in graph):
        return graph
    graph = graph.copy()
    as_uint8 = _signed_grids_stored_as_uint8(graph) if runtime == "onnxruntime" else set()
    RuleSet([Rule("fake_quantize_as_qdq", FAKE_QUANTIZE, lambda m: _as_qdq(m, id(m.root) in as_uint8),
                  where=_same_output_range)]).apply(graph)
    for node in graph:
        if is_fake_quantize(node):
            raise _not_expressible(node)
    if runtime == "onnxruntime":  # a graph walk, not a local pattern: see _requantize_after_preserving
        patch_convs_as_matmuls(graph)  # before the walk: it requantizes the patches (qdq_patches.py)
        for node in graph.nodes:
            if node.op_type == "DequantizeLinear" and node.input(0).const is None:
                _requantize_after_preserving(graph, node)
    RuleSet([GEMM_FLOAT_BIAS_AS_ADD]).apply(graph)
    graph.remove_unused_constants()
    return graph


def _is_signed(fq: Node) -> bool:
    low, high = fq.input(1).const, fq.input(2).const
    return low is not None and high is not None and \
        qdq_params(int(fq.attrs["levels"]), low, high).zero_point.dtype == np.int8


def keeps_grid(node: Node, port: int = 0) -> bool:
    """Whether every value of `node`'s output is one of its input `port`'s, or zero, so that a grid on that input
    (which always holds zero exactly) holds the output too: the value-preserving ops (ops.KEEPS_VALUES), a
    Dropout as a deployed model runs it (no training_mode input: the identity), and a Pad that adds zeros or
    copies edge values (Swin pads its windows between the quantizer and the query/key/value projections)."""
    if port != 0 or node.domain:
        return False
    if node.op_type in VALUE_PRESERVING:
        return True
    if node.op_type == "Dropout":
        return _absent_or_zero(node.input(2))
    if node.op_type == "Pad":
        return node.attrs.get("mode", "constant") != "constant" or (
            _absent_or_zero(node.input(2)) and not node.attrs.get("value", 0.0))
    return False


def _absent_or_zero(value: Value | None) -> bool:
    return value is None or value.const is not None and not np.any(value.const)


def source_quantizer(value: Value | None) -> Node | None:
    """The activation FakeQuantize whose grid `value` is on, read through ops that keep it, or None."""
    while value is not None and value.producer is not None:
        node = value.producer
        if is_fake_quantize(node):
            return node if node.input(0).const is None else None
        if not keeps_grid(node):
            return None
        value = node.input(0)
    return None


def grid_readers(value: Value) -> list[Node]:
    """The ops that read the grid `value` is on, through ops that keep it and Concats of that grid alone (not
    those ops themselves)."""
    readers, stack, seen = [], list(value.uses), set()
    while stack:
        node, port = stack.pop()
        if port < 0 or id(node) in seen:
            continue
        seen.add(id(node))
        if keeps_grid(node, port) or _one_grid_concat(node):
            stack.extend(node.output.uses)
        else:
            readers.append(node)
    return readers


def _one_grid_concat(node: Node) -> bool:
    """A Concat of values all on one activation grid (a unified-scale group, before it is written as QDQ)."""
    if node.op_type != "Concat" or node.domain:
        return False
    sources = [source_quantizer(v) for v in node.inputs]
    if not sources or not all(sources):
        return False
    first = sources[0]
    return all(q.attrs["levels"] == first.attrs["levels"] and all(
        np.array_equal(q.input(i).const, first.input(i).const) for i in (1, 2)) for q in sources[1:])


def _read_by_several(fq: Node) -> bool:
    """Whether several ops read `fq`'s grid, one of them an op ONNX Runtime fuses with a DequantizeLinear:
    it gives each its own DequantizeLinear, and then no longer turns an int8 pair into uint8 itself."""
    readers = grid_readers(fq.output)
    return len(readers) > 1 and any(r.op_type in ORT_QDQ_READERS and not r.domain for r in readers)


def _output_quantizer(layer: Node) -> Node | None:
    """The FakeQuantize that alone reads `layer`'s output (after a Relu or Clip ONNX Runtime drops), or None."""
    value = layer.output
    while len(value.uses) == 1:
        user = value.users[0]
        if is_fake_quantize(user):
            return user
        if user.op_type not in ORT_FOLDED_ACTIVATIONS or user.domain:
            return None
        value = user.output
    return None


def _signed_grids_stored_as_uint8(graph: Graph) -> set[int]:
    """ids of the activation FakeQuantize nodes on signed grids that must be stored as uint8 for ONNX Runtime.

    The quantizers a fusable layer links (inputs and output) and a Concat joins are connected; a connected
    group with any unsigned grid stores its signed ones as uint8, and so does one with a signed grid that several
    ops read (ONNX Runtime turns an int8 pair into uint8 itself only where one DequantizeLinear reads the
    QuantizeLinear: a squeeze-excite Conv whose output a SiLU's Sigmoid and Mul both read stayed in float).
    """
    import networkx as nx

    links = nx.Graph()
    for node in graph:
        if node.domain:
            continue
        if node.op_type == "Concat":
            quantizers = [source_quantizer(v) for v in node.inputs]
            if not quantizers or not all(quantizers):
                continue
        elif node.op_type in LAYERS and (out := _output_quantizer(node)) is not None:
            quantizers = [out] + [q for v in node.inputs if (q := source_quantizer(v)) is not None]
        else:
            continue
        links.add_nodes_from(quantizers)
        nx.add_path(links, quantizers)
    if graph.opset_imports.get("", IR_OPSET) > IR_OPSET:  # ONNX Runtime's opset-21 bug (see ops.IR_OPSET)
        return {id(n) for n in graph if is_fake_quantize(n) and n.input(0).const is None and _is_signed(n)}
    links.add_nodes_from(n for n in graph if is_fake_quantize(n) and n.input(0).const is None)
    as_uint8 = set()
    for group in nx.connected_components(links):
        signed = [q for q in group if _is_signed(q)]
        if len(signed) < len(group) or any(len(q.output.uses) > 1 or _read_by_several(q) for q in signed):
            as_uint8.update(id(q) for q in signed)
    return as_uint8


def _read_on_one_grid(m: Match) -> bool:
    """An activation QuantizeLinear read only by DequantizeLinear nodes on its own grid."""
    q = m.root
    users = q.output.users
    return q.input(0).const is None and bool(users) and all(
        u.op_type == "DequantizeLinear" and u.input(1) is q.input(1) and u.input(2) is q.input(2)
        and u.attrs.get("axis") == q.attrs.get("axis") for u in users)


def _zero_point_to_int8(m: Match) -> None:
    zero = m.graph.add_constant(f"{m.root.name}_int8_zero_point", np.zeros_like(m["zero"].const, np.int8))
    for node in [m.root, *m.root.output.users]:
        node.set_input(2, zero)


# An activation grid of a QDQ graph written for ONNX Runtime that stores a signed grid as uint8 with zero point
# 128 (read only by DequantizeLinear nodes on the same grid): int8 with zero point 0 is the same grid (q - 128),
# the form OpenVINO runs.
SIGNED_GRID_AS_INT8 = Rule(
    "signed_grid_as_int8",
    P("QuantizeLinear", Any("x"), Const("scale"),
      Const("zero", where=lambda z: z.dtype == np.uint8 and bool(np.all(z == 128)))),
    _zero_point_to_int8, where=_read_on_one_grid, check_interior=False)


def _bias_as_add(m: Match) -> Value:
    """Gemm(DQ a, DQ b, float bias) -> Gemm(DQ a, DQ b) -> Add(bias)."""
    gemm = m.root
    product = m.op("Gemm", list(gemm.inputs[:2]), dict(gemm.attrs), name=f"{gemm.name}_product")
    out = m.op("Add", [product, m["bias"]], name=gemm.name)
    for v in (product, out):
        v.dtype, v.shape = gemm.output.dtype, gemm.output.shape
    return out


# A Gemm on dequantized inputs with a float bias and a float output (not fused with an output quantizer, which
# quantizes the bias in the runtime): ONNX Runtime's QGemm takes one of the two, so the bias becomes an Add.
GEMM_FLOAT_BIAS_AS_ADD = Rule(
    "gemm_float_bias_as_add",
    P("Gemm", P("DequantizeLinear"), P("DequantizeLinear"), Const("bias"), attrs={"beta": 1.0},
      where=lambda gemm: not any(u.op_type == "QuantizeLinear" for u in gemm.output.users)),
    _bias_as_add, check_interior=False)


def _joins_one_grid(node: Node, dq: Node) -> bool:
    """A Concat of DequantizeLinear outputs that all share `dq`'s grid (a unified-scale group)."""
    if node.op_type != "Concat":
        return False
    grid = [np.asarray(dq.input(i).const) for i in (1, 2)]
    for v in node.inputs:
        other = v.producer if v is not None else None
        if other is None or other.op_type != "DequantizeLinear" or any(
                other.input(i).const is None or not np.array_equal(other.input(i).const, g)
                for i, g in zip((1, 2), grid)):
            return False
    return True


def _requantize_after_preserving(graph: Graph, dq: Node) -> None:
    """Requantize, once, the output of each value-preserving op (or one-grid Concat) that `dq`'s per-tensor grid
    reaches, for every op that reads it other than further value-preserving ops (see the module doc)."""
    if dq.input(1).const is None or dq.input(1).const.size != 1:
        return
    stack = [(user, port) for user, port in dq.output.uses if port >= 0]
    seen = set()
    while stack:
        node, port = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if not (keeps_grid(node, port) or _joins_one_grid(node, dq)):
            continue
        out = node.output
        onward, readers = [], []
        for user, at in out.uses:
            if at < 0 or user.op_type == "QuantizeLinear":
                continue  # a subgraph's capture, or a quantizer already on the grid
            if keeps_grid(user, at) or _joins_one_grid(user, dq):
                onward.append((user, at))
            elif user.op_type in ORT_QDQ_READERS and not user.domain:
                readers.append((user, at))
        stack.extend(onward)
        if readers and not out.is_graph_output:
            q = graph.make_node("QuantizeLinear", [out, dq.input(1), dq.input(2)], name=f"{dq.name}_again",
                                after=node).output
            again = graph.make_node("DequantizeLinear", [q, dq.input(1), dq.input(2)], name=f"{dq.name}_again",
                                    after=q.producer).output
            again.dtype, again.shape = out.dtype, out.shape
            for user, at in readers:
                user.set_input(at, again)


def grid_integers(levels: int, p: QDQParams) -> tuple[int, int]:
    """The lowest and highest integer of the `levels`-point grid `p` places in its integer type: a grid narrower
    than the type (fewer than 8 bits, the overflow fix's) uses only part of it, centred on 0 in int8."""
    qmin = -(levels // 2) if p.zero_point.dtype == np.int8 else 0
    return qmin, qmin + levels - 1


def grid_ends(levels: int, p: QDQParams) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest value of the `levels`-point grid `p` (scale, zero point) places in its integer
    type (`grid_integers`)."""
    zero = p.zero_point.astype(np.float64)
    return tuple((q - zero) * p.scale.astype(np.float64) for q in grid_integers(levels, p))


def _clipped_to_grid(m: Match, x: Value, p: QDQParams, levels: int) -> Value:
    """x clipped to the ends of a grid narrower than 8 bits: QuantizeLinear alone would saturate at its integer
    type's ends (int8 or uint8), so an activation past a 4-bit range would keep more than the 16 levels."""
    dtype = np.float16 if x.dtype == "float16" else np.float32
    low, high = (m.graph.add_constant(f"{m.root.name}_grid_{end}", np.asarray(value, dtype=dtype).reshape(()))
                 for end, value in zip(("low", "high"), grid_ends(levels, p)))
    clip = m.op("Clip", [x, low, high], name=f"{m.root.name}_grid_clip")
    clip.dtype, clip.shape = x.dtype, x.shape
    return clip


def _reads_layer_relu(x: Value) -> bool:
    """`x`, read by nothing else, is the output of a Relu that alone reads an integer-fusable layer's output."""
    relu = x.producer
    if relu is None or relu.op_type != "Relu" or relu.domain or len(x.uses) != 1:
        return False
    layer = relu.input(0).producer
    return layer is not None and layer.op_type in LAYERS and not layer.domain and len(relu.input(0).uses) == 1


def _unsigned_first(graph: Graph, node: Node, relu: Node, p: QDQParams, attrs: dict) -> None:
    """layer -> Relu -> (signed grid) becomes layer -> Q -> DQ (unsigned grid, `p`'s scale, zero point 0) -> Relu
    -> (signed grid); see the module doc. The Relu, a no-op after the unsigned grid, stays between the two pairs:
    ONNX Runtime would merge two adjacent Q -> DQ pairs into one on another scale."""
    scale_dtype = np.float16 if node.output.dtype == "float16" else np.float32
    scale = graph.add_constant(f"{node.name}_relu_scale", p.scale.astype(scale_dtype))
    zero = graph.add_constant(f"{node.name}_relu_zero_point", np.zeros_like(p.zero_point))
    x = relu.input(0)
    q = graph.make_node("QuantizeLinear", [x, scale, zero], attrs, name=f"{node.name}_relu_q", before=relu).output
    dq = graph.make_node("DequantizeLinear", [q, scale, zero], attrs, name=f"{node.name}_relu_dq",
                         before=relu).output
    dq.dtype, dq.shape = x.dtype, x.shape
    relu.set_input(0, dq)


# A FakeQuantize with constant ranges: QuantizeLinear -> DequantizeLinear (a constant input: an integer
# initializer -> DequantizeLinear); _as_qdq below.
FAKE_QUANTIZE = P("FakeQuantize", Any("x"), Const("low"), Const("high"), Const("out_low"), Const("out_high"),
                  domain=QUANT_DOMAIN)


def _same_output_range(m: Match) -> bool:
    return np.array_equal(m["low"].const, m["out_low"].const) and np.array_equal(m["high"].const, m["out_high"].const)


def _not_expressible(node: Node) -> UnsupportedOpError:
    """Why a FakeQuantize the rule left has no QDQ form."""
    if any(v is None or v.const is None for v in node.inputs[1:5]):
        return UnsupportedOpError(f"FakeQuantize {node.name!r} has non-constant ranges; QDQ needs constants")
    return UnsupportedOpError(f"FakeQuantize {node.name!r} maps to a different output range, which QDQ "
                              "cannot express")


def _as_qdq(m: Match, as_uint8: bool) -> Value:
    graph, node, x = m.graph, m.root, m["x"]
    p = qdq_params(int(node.attrs["levels"]), m["low"].const, m["high"].const)
    attrs = {"axis": p.axis} if p.axis is not None else {}
    quantized = quantize_array(x.const, p, int(node.attrs["levels"])) if x.const is not None else None
    if quantized is None and int(node.attrs["levels"]) < 255 and p.axis is None:
        x = _clipped_to_grid(m, x, p, int(node.attrs["levels"]))
    if quantized is None and as_uint8 and p.zero_point.dtype == np.int8:
        p = QDQParams(p.scale, (p.zero_point.astype(np.int16) + 128).astype(np.uint8), p.axis)
        if _reads_layer_relu(x):
            _unsigned_first(graph, node, x.producer, p, attrs)
    # DequantizeLinear's output type is its scale's: a float16 model keeps float16 scales (opset >= 19)
    scale_dtype = np.float16 if node.output.dtype == "float16" else np.float32
    scale = graph.add_constant(f"{node.name}_scale", p.scale.astype(scale_dtype))
    zero_point = graph.add_constant(f"{node.name}_zero_point", p.zero_point)
    if quantized is not None:
        q = graph.add_constant(f"{x.name}_quantized", quantized)
    else:
        q = m.op("QuantizeLinear", [x, scale, zero_point], attrs, name=f"{node.name}_q")
    dq = m.op("DequantizeLinear", [q, scale, zero_point], attrs, name=f"{node.name}_dq")
    dq.dtype, dq.shape = node.output.dtype, node.output.shape
    return dq
