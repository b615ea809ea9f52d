"""Fold an inference BatchNormalization into the Conv, Gemm or MatMul(+bias) before it.

    BN(Conv(x, W, b))          -> Conv(x, W * s, (b - mean) * s + beta)       s = gamma / sqrt(var + eps),
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
from ...ir.ops import weight_out_axis
from ..pattern import Any, Const, P
from ..rewrite import Match, Rule, RuleSet


def _bn(layer):
    return P("BatchNormalization", layer, Const("gamma"), Const("beta"), Const("mean"), Const("var"), name="bn")


def _scale(m: Match) -> np.ndarray:
    eps = float(m["bn"].attrs.get("epsilon", 1e-5))
    return m["gamma"].const.astype(np.float64) / np.sqrt(m["var"].const.astype(np.float64) + eps)


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
    s = _scale(m)
    w = m["w"]
    shape = [1] * w.const.ndim
    shape[out_axis] = -1
    _set_const(m.graph, layer, 1, w.const.astype(np.float64) * s.reshape(shape), f"{layer.name}.weight", w)
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
    s = _scale(m)
    w, mm = m["w"], m["layer"]
    _set_const(m.graph, mm, 1, w.const.astype(np.float64) * s.reshape(1, -1), f"{mm.name}.weight", w)
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
    Rule("fold_bn_gemm", _bn(P("Gemm", Any("x"), Const("w"), name="layer")), fold_gemm, where=_gemm_ok),
    Rule("fold_bn_matmul_add", _bn(P("Add", _matmul, Const("b"), name="add")), fold_matmul, where=_matmul_ok),
    Rule("fold_bn_matmul", _bn(_matmul), fold_matmul, where=_matmul_ok),
])
