"""Fold an inference BatchNormalization into the Conv, Gemm or MatMul(+bias) before it.

    BN(Conv(x, W, b))          -> Conv(x, W * s, (b - mean) * s + beta)       s = gamma / sqrt(var + eps),
    BN(ConvTranspose(x, W, b)) -> likewise, W scaled along its axis 1       (one group only)
    BN(Gemm(x, W, b))          -> Gemm(x, W * s, (b - mean) * s + beta)       per output channel
    BN(Add(MatMul(x, W), b))   -> Add(MatMul(x, W * s), (b - mean) * s + beta)
    BN(MatMul(x, W))           -> Add(MatMul(x, W * s), beta - mean * s)

Only where BN normalizes the layer's output channels (axis 1 of a Conv
output, or of a rank-2 Gemm/MatMul output) and the layer's output feeds only
the BN. Arithmetic is done in float64 and stored in the weight's dtype.
"""

from __future__ import annotations

import numpy as np

from ...ir.graph import Graph, Node, Value
from ...ir.ops import attribute, is_fake_quantize, weight_out_axis, weight_quantizer
from ..pattern import Any, Const, P, match_at
from ..rewrite import Match, Rule, RuleSet


# node meta of a layer a BatchNormalization was folded into: the BN's scale s along the weight's output axis,
# which a per-tensor weight quantizer divides out with per_tensor_weights="unfolded" (passes/quantize.py)
FOLDED_BN_SCALE = "folded_bn_scale"
# FakeQuantize meta: a merged Conv's per-tensor weight quantizer that rounds W, not W * s (per_tensor_weights)
BEFORE_BN = "before_bn"


def _bn(layer):
    return P("BatchNormalization", layer, Const("gamma"), Const("beta"), Const("mean"), Const("var"), name="bn")


def _shift(m: Match, bias: np.ndarray | None, s: np.ndarray) -> np.ndarray:
    b = np.zeros_like(s) if bias is None else bias.astype(np.float64)
    return (b - m["mean"].const.astype(np.float64)) * s + m["beta"].const.astype(np.float64)


def _set_const(graph: Graph, node: Node, index: int, array: np.ndarray, name: str, like: Value) -> None:
    """Give input `index` of `node` new data: in place if nothing else reads it, else a new constant."""
    old = node.input(index)
    if old is not None and old.const is not None and len(old.uses) == 1 and not old.is_graph_output:
        old.const = array.astype(old.const.dtype)
        return
    value = graph.add_constant(name, array.astype(like.const.dtype))
    base = like.meta.get("torch_name", "")
    if base:
        value.meta.update(torch_kind="parameter", torch_name=base.rsplit(".", 1)[0] + "." + name.rsplit(".", 1)[-1])
    if index < len(node.inputs):
        node.set_input(index, value)
    else:
        while len(node.inputs) < index:
            node.append_input(None)
        node.append_input(value)


def _fold_layer(m: Match, layer: Node, out_axis: int) -> Value:
    """Scale the weight of `layer` along `out_axis` and rewrite its bias input (index 2)."""
    s = bn_scale(m["bn"])
    w = m["w"]
    shape = [1] * w.const.ndim
    shape[out_axis] = -1
    _set_const(m.graph, layer, 1, w.const.astype(np.float64) * s.reshape(shape), f"{layer.name}.weight", w)
    layer.meta[FOLDED_BN_SCALE] = tuple(s.tolist())
    bias = layer.input(2)
    _set_const(m.graph, layer, 2, _shift(m, None if bias is None else bias.const, s), f"{layer.name}.bias", w)
    return layer.output


def _channels_ok(m: Match, layer: Node) -> bool:
    bias = layer.input(2)
    n_out = m["gamma"].const.shape[0] if m["gamma"].const.ndim == 1 else -1
    return (bias is None or bias.const is not None) and n_out > 0


def fold_conv(m: Match) -> Value:
    return _fold_layer(m, m["layer"], weight_out_axis(m["layer"]))


def fold_gemm(m: Match) -> Value:
    return _fold_layer(m, m["layer"], weight_out_axis(m["layer"]))


def fold_matmul(m: Match) -> Value:
    s = bn_scale(m["bn"])
    w, mm = m["w"], m["layer"]
    _set_const(m.graph, mm, 1, w.const.astype(np.float64) * s.reshape(1, -1), f"{mm.name}.weight", w)
    mm.meta[FOLDED_BN_SCALE] = tuple(s.tolist())
    add = m.get("add")
    if add is not None:
        index = 1 if add.input(1) is m["b"] else 0
        _set_const(m.graph, add, index, _shift(m, m["b"].const, s), f"{mm.name}.bias", w)
        return add.output
    bias = m.const(_shift(m, None, s).astype(w.const.dtype), "bias")
    return m.op("Add", [mm.output, bias], name=f"{mm.name}_bias")


def _rank2(m: Match) -> bool:
    shape = m["bn"].input(0).shape
    return shape is not None and len(shape) == 2


def _conv_ok(m: Match) -> bool:
    return _channels_ok(m, m["layer"])


def _conv_transpose_ok(m: Match) -> bool:
    """One group: a grouped ConvTranspose's weight holds each group's output channels along axis 1 in turn."""
    layer = m["layer"]
    return (_channels_ok(m, layer) and attribute(layer, "group") == 1
            and m["w"].const.shape[1] == m["gamma"].const.shape[0])


def _gemm_ok(m: Match) -> bool:
    g = m["layer"]
    return (_channels_ok(m, g) and _rank2(m) and not g.attrs.get("transA", 0)
            and g.attrs.get("alpha", 1.0) == 1.0 and g.attrs.get("beta", 1.0) == 1.0
            and (g.input(2) is None or g.input(2).const.ndim == 1))


def _matmul_ok(m: Match) -> bool:
    return _rank2(m) and m["w"].const.ndim == 2 and ("b" not in m or m["b"].const.shape == (m["w"].const.shape[1],))


_matmul = P("MatMul", Any("x"), Const("w"), name="layer")

rules = RuleSet([
    Rule("fold_bn_conv", _bn(P("Conv", Any("x"), Const("w"), name="layer")), fold_conv, where=_conv_ok),
    Rule("fold_bn_conv_transpose", _bn(P("ConvTranspose", Any("x"), Const("w"), name="layer")), fold_conv,
         where=_conv_transpose_ok),
    Rule("fold_bn_gemm", _bn(P("Gemm", Any("x"), Const("w"), name="layer")), fold_gemm, where=_gemm_ok),
    Rule("fold_bn_matmul_add", _bn(P("Add", _matmul, Const("b"), name="add")), fold_matmul, where=_matmul_ok),
    Rule("fold_bn_matmul", _bn(_matmul), fold_matmul, where=_matmul_ok),
])


# -- BN merge for quantization-aware training (fold_bn="train") ------------------------------------------------
#
# The Conv keeps its BatchNormalization, which goes on training (batch statistics, running ones updated), and is
# marked `bn_merge`; training sees the rounding of the weight that will be deployed, W * s:
# - a per-channel weight quantizer rounds W on its own grid: folding scales weight and grid alike per channel,
#   q(W * s; grid * s) = s * q(W; grid) exactly, so its range is learned in W's units and never goes stale when
#   the BN's statistics move;
# - a per-tensor one rounds W * s itself (the simulated folding of backends/torch_bn_merge.py): one grid cannot
#   follow per-channel scales; with per_tensor_weights="unfolded" it rounds W instead (meta `before_bn`), as a
#   per-channel one does, and its one grid becomes one per channel, scaled by s, when the BN is folded.
# `fold_merged` then folds each marked BN exactly by its running statistics.

CONV_BN = _bn(P("Conv", Any("x"), Any("w"), name="layer"))


def bn_scale(bn: Node) -> np.ndarray:
    """gamma / sqrt(var + eps) of a BatchNormalization with constant parameters (float64)."""
    gamma, var = bn.input(1).const.astype(np.float64), bn.input(4).const.astype(np.float64)
    return gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))


def _merge_candidate(bn: Node) -> Node | None:
    """The Conv whose output only `bn` reads, normalized per output channel by constants; its weight a
    constant, or a FakeQuantize of one that only it reads."""
    found = match_at(CONV_BN, bn) if bn.op_type == "BatchNormalization" else None
    if found is None or not all(v is not None and v.const is not None for v in bn.inputs[1:5]):
        return None
    conv, w = found["layer"], found["w"]
    if w.const is None and (weight_quantizer(conv) is None or len(w.uses) != 1):
        return None
    bias = conv.input(2)
    return conv if (bias is None or bias.const is not None) and bn.input(1).const.ndim == 1 else None


def mark_bn_merge(graph: Graph) -> int:
    """Mark each Conv followed by a foldable BatchNormalization `bn_merge` (the BN's name); how many."""
    marked = 0
    for bn in graph.nodes:
        conv = _merge_candidate(bn)
        if conv is not None:
            conv.meta["bn_merge"] = bn.name
            marked += 1
    return marked


def merged_pairs(graph: Graph) -> list[tuple[Node, Node]]:
    """(Conv, BatchNormalization) of every Conv marked `bn_merge`."""
    by_name = {n.name: n for n in graph if n.op_type == "BatchNormalization"}
    return [(n, by_name[n.meta["bn_merge"]]) for n in graph if n.meta.get("bn_merge") in by_name]


def per_channel_quantizer(w: Value) -> bool:
    """A weight read through a FakeQuantize whose range varies along the output channels."""
    fq = w.producer
    return fq is not None and is_fake_quantize(fq) and fq.input(1).const is not None and fq.input(1).const.size > 1


def rounds_stored_weight(w: Value) -> bool:
    """A merged Conv's weight `w` whose quantizer rounds W itself, on a grid that folding scales by s: a
    per-channel quantizer, or a per-tensor one placed with per_tensor_weights="unfolded"."""
    return per_channel_quantizer(w) or bool(w.producer is not None and w.producer.meta.get(BEFORE_BN))


def merged_weight(conv: Node, bn: Node) -> np.ndarray:
    """The weight a merged Conv's quantizer sees: W * s along the output channels (float64)."""
    w = conv.input(1)
    w = w if w.const is not None else w.producer.input(0)
    return w.const.astype(np.float64) * bn_scale(bn).reshape([-1] + [1] * (w.const.ndim - 1))


def _scale_ranges(graph: Graph, fq: Node, s: np.ndarray) -> None:
    lows, highs = (fq.input(i).const.astype(np.float64) * s for i in (1, 2))
    low, high = np.minimum(lows, highs).astype(np.float32), np.maximum(lows, highs).astype(np.float32)
    for port, array in ((1, low), (2, high), (3, low), (4, high)):
        fq.set_input(port, graph.add_constant(f"{fq.name}_folded_range", array))


def fold_merged(graph: Graph, rounded: dict[str, np.ndarray] | None = None) -> int:
    """Fold every `bn_merge` BatchNormalization exactly into its Conv (by its running statistics); how many.

    `rounded` maps a merged Conv's name to the weight its quantizer gave while training: q(W) for a per-channel
    quantizer, q(W * s) for a per-tensor one (backends/torch_bn_merge.py computes them with the module's own
    quantizers). The folded weight is then written on its folded grid, s * q(W) or q(W * s), so the exported
    FakeQuantize gives back the module's integers: folding W * s in floating point instead moves a weight that
    lies within rounding error of a midpoint between two levels to the other level (a few per large layer once
    the BN statistics are trained; 27 dB of disagreement on a ResNet18)."""
    pairs = merged_pairs(graph)
    rounded = rounded or {}
    for conv, bn in pairs:
        s, w = bn_scale(bn), conv.input(1)
        weight = w if w.const is not None else w.producer.input(0)
        folded = merged_weight(conv, bn)
        per_filter = s.reshape([-1] + [1] * (folded.ndim - 1))
        if rounds_stored_weight(w):  # its grid, in W's units, scales with the weight (mirrored where s < 0)
            _scale_ranges(graph, w.producer, per_filter)
            if conv.name in rounded:
                folded = rounded[conv.name].astype(np.float64) * per_filter
        elif conv.name in rounded:
            folded = rounded[conv.name]
        folded = folded.astype(weight.const.dtype)
        holder = w.producer if w.const is None else conv
        holder.set_input(0 if w.const is None else 1, graph.add_constant(f"{conv.name}.weight", folded))
        bias = conv.input(2)
        shift = (np.zeros_like(s) if bias is None else bias.const.astype(np.float64)) - bn.input(3).const
        _set_const(graph, conv, 2, shift * s + bn.input(2).const.astype(np.float64), f"{conv.name}.bias",
                   weight)
        graph.replace_all_uses(bn.output, conv.output)
        graph.remove(bn)
        del conv.meta["bn_merge"]
    if pairs:
        graph.remove_unused_constants()
    return len(pairs)
