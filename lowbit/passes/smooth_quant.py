"""smooth_quant: move activation outliers into the weights of MatMul / Gemm layers before quantization.

Transformers' activations have a few channels far larger than the rest, so a
per-tensor activation quantizer spends its grid on them; weights, quantized
per output channel, have room to spare. For a layer y = x W with a constant
W, scaling input channel j of x by 1/s_j and row j of W by s_j leaves y
unchanged, and with

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)

the activation's channels come out flatter (SmoothQuant, Xiao et al. 2023;
NNCF applies it with alpha 0.95 to MatMuls of transformer models, and so does
lowbit's default pipeline for `model_type="transformer"`).

The per-channel maxima come from the pipeline's shared statistics
(`quant/summary.py`): this pass's run over the data also taps what
`quantize` and `fast_bias_correction` will read, and the summaries of the
values it rescales are rescaled with them, so those passes run no forward.

Layers that read the same activation share one s (their weights' maxima are
combined). 1/s is folded into the producer when that is a
LayerNormalization whose output only these layers read, or a ReLU after a
MatMul/Gemm of constant weight (T5's feed-forward: the layer's output
columns take it); otherwise a `Mul`
node (meta "smooth_quant") computes x / s, and the `quantize` pass keeps it
in FP32 and quantizes its output. Where the layers read x through Reshapes
that keep its last axis (GPT-2's Conv1D views [B, N, C] as [B * N, C]), both
go above them, onto the value as it was computed (`_views_above`). Layers in
the ignored scope, layers whose weight is not a constant, and MatMuls between
two activations are left alone.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import OptionError, PassError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import MATMULS, VIEWS, attribute, is_fake_quantize, weight_in_axis, weight_out_axis
from ..quant.calibration import cache_of, gather
from ..quant.layers import replace_constant
from ..quant.summary import Need
from .base import Pass, PassContext, PassResult, register_pass

DEFAULT_ALPHA = 0.95
SCALE_LIMITS = (1e-4, 1e4)


def smoothable(node: Node) -> tuple[Value, int] | None:
    """(the constant weight, its input-channel axis) of a MatMul / Gemm whose input 0 is an activation."""
    if node.domain or node.op_type not in MATMULS or attribute(node, "transA"):
        return None
    x, w = node.input(0), node.input(1)
    if x is None or w is None or x.const is not None or w.const is None or w.const.ndim != 2:
        return None
    return w, weight_in_axis(node) % 2


def smoothing_scale(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel; 1 where a channel never fired or its weights are all zero."""
    act = act_max.astype(np.float64)
    wgt = weight_max.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(act, alpha) / np.power(wgt, 1 - alpha)
    s = np.where((act > 0) & (wgt > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *SCALE_LIMITS)


@register_pass
class SmoothQuant(Pass):
    name = "smooth_quant"
    description = "rescale MatMul/Gemm input channels so activation outliers move into the weights"
    # the values it rescales get their cached statistics rescaled too (`_rescale_statistics`); the layers' outputs
    # keep their FP32 function
    preserves_statistics = True

    def __init__(self, alpha: float | None = None):
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise OptionError(f"smooth_quant alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if any(is_fake_quantize(n) for n in graph):
            raise PassError("smooth_quant must run before quantize: the graph already holds FakeQuantize nodes")
        if ctx.dataset is None:
            raise PassError("smooth_quant needs calibration data: pass dataset= to compile")

    def statistics_needed(self, graph: Graph, ctx: PassContext) -> list[Need]:
        return [Need(layers[0].input(0), -1, extremes=True) for layers in _groups(graph, ctx).values()]

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        alpha = next((a for a in (self.alpha, ctx.options.smooth_quant_alpha) if a is not None), DEFAULT_ALPHA)
        groups = _groups(graph, ctx)
        if not groups:
            return PassResult(graph, changed=False)
        summaries = gather(graph, ctx, [Need(layers[0].input(0), -1, extremes=True) for layers in groups.values()])
        stats = dict(zip(groups, summaries))
        position = {id(node): i for i, node in enumerate(graph)}
        fired = defaultdict(int)
        for name, layers in groups.items():
            x = layers[0].input(0)
            weight_max = np.max([_row_abs_max(*smoothable(n)) for n in layers], axis=0)
            act_max = stats[name].channel_abs_max()
            if act_max.shape != weight_max.shape:
                continue  # the channel axis is not the last one (e.g. a MatMul over a transposed view)
            s = smoothing_scale(act_max, weight_max, alpha)
            for layer in layers:
                _scale_weight(graph, layer, s)
            views = _views_above(x, layers)
            readers = [views[0]] if views else layers
            source = views[0].input(0) if views else x
            if _fold_into_layer_norm(source, readers, 1.0 / s):
                _rescale_statistics(ctx, x, [source] + [v.output for v in views], 1.0 / s)
                fired["folded_into_layer_norm"] += 1
            elif (changed := _fold_into_layer_before(graph, source, readers, 1.0 / s)) is not None:
                for value in changed:  # each its own summaries, scaled: a ReLU's input is not its output
                    _rescale_statistics(ctx, value, [value], 1.0 / s)
                if views:
                    _rescale_statistics(ctx, x, [v.output for v in views], 1.0 / s)
                fired["folded_into_layer_before"] += 1
            else:
                mul = _insert_mul(graph, source, min(readers, key=lambda n: position[id(n)]), readers, 1.0 / s)
                _rescale_statistics(ctx, x, [mul.output] + [v.output for v in views], 1.0 / s)
                fired["mul_inserted"] += 1
            fired["layers_smoothed"] += len(layers)
        return PassResult(graph, changed=bool(fired), fired=fired)


def _groups(graph: Graph, ctx: PassContext) -> dict[str, list[Node]]:
    """The smoothable layers not in the ignored scope, by the name of the activation they read."""
    ignored = ctx.ignored_scope.resolve(graph) if ctx.ignored_scope is not None else set()
    groups: dict[str, list[Node]] = defaultdict(list)
    for node in graph:
        if node.name not in ignored and smoothable(node) is not None:
            groups[node.input(0).name].append(node)
    return groups


def _views_above(x: Value, layers: list[Node]) -> list[Node]:
    """The Reshapes (first to last) that carry a value of the same last axis into `x`, each read by the next
    alone and `x` by `layers` alone: HuggingFace's Conv1D (GPT-2) views its input [B, N, C] as [B * N, C] for
    its addmm. Smoothing above them puts the scale, and the quantizer after it, where the values are computed
    (OpenVINO fuses a FakeQuantize into the op before it, not through a Reshape: alone, in f32, GPT-2's took a
    fifth of its time). A Reshape that keeps the last dim's size keeps every element's channel."""
    views, readers, value = [], {id(n) for n in layers}, x
    while (view := value.producer) is not None and view.op_type in VIEWS and not view.domain \
            and not value.is_graph_output and {id(n) for n in value.users} == readers \
            and view.input(0).shape and value.shape and isinstance(value.shape[-1], int) \
            and view.input(0).shape[-1] == value.shape[-1]:
        views.insert(0, view)
        readers, value = {id(view)}, view.input(0)
    return views


def _rescale_statistics(ctx: PassContext, x: Value, outs: list[Value], inv_s: np.ndarray) -> None:
    """Cache each of `outs` (x / s per last-axis channel, or a view of it that keeps the last axis) as x's
    summaries scaled by inv_s, per channel along the last axis; what cannot be scaled (a summary without
    per-channel extremes along the last axis) is dropped, for a later run to tap."""
    cache = cache_of(ctx)
    last = {-1} | ({len(x.shape) - 1} if x.shape is not None else set())
    along_last = [s for s in cache.summaries(x) if s.axis in last]
    for out in outs:
        cache.discard(out)
        for summary in filter(None, (s.scaled(inv_s) for s in along_last)):
            if out is not x:  # another rank: the last axis by its negative index
                summary.axis = -1
            cache.put(out, summary)


def _row_abs_max(weight: Value, axis: int) -> np.ndarray:
    return np.abs(weight.const).max(axis=1 - axis)


def _scale_weight(graph: Graph, layer: Node, s: np.ndarray) -> None:
    weight, axis = smoothable(layer)
    shape = [-1, 1] if axis == 0 else [1, -1]
    _replace_constant(graph, layer, 1, weight.const * s.reshape(shape))


def _fold_into_layer_norm(x: Value, layers: list[Node], inv_s: np.ndarray) -> bool:
    """Scale the LayerNormalization that computes `x` by inv_s, where `layers` alone read x; False elsewhere."""
    norm = x.producer
    if norm is None or norm.op_type != "LayerNormalization" or norm.domain or x.is_graph_output:
        return False
    normalizes_last_axis = norm.attrs.get("axis", -1) in (-1, len(x.shape or ()) - 1)
    if {id(n) for n in x.users} != {id(n) for n in layers} or not normalizes_last_axis:
        return False
    params = [v for v in norm.inputs[1:3] if v is not None]
    if not params or any(v.const is None or v.const.shape != inv_s.shape or len(v.uses) != 1 for v in params):
        return False
    for v in params:
        v.const = (v.const.astype(np.float64) * inv_s).astype(v.const.dtype)
    return True


def _fold_into_layer_before(graph: Graph, x: Value, readers: list[Node], inv_s: np.ndarray) -> list[Value] | None:
    """Scale the output columns of the layer that computes `x` through a ReLU (T5's feed-forward) by inv_s, where
    each value on the way has one reader and `readers` alone read x: relu(y) / s = relu(y / s) for s > 0. Returns
    the values that changed (the layer's output, its bias Add's, x), or None where the chain is not that. A Mul
    after the ReLU would cost a node, and ONNX Runtime runs the layer before such a Mul in float (it fuses no
    DequantizeLinear -> MatMul -> Relu -> Mul)."""
    relu = x.producer
    if relu is None or relu.op_type != "Relu" or relu.domain or x.is_graph_output \
            or {id(n) for n in x.users} != {id(n) for n in readers}:
        return None
    add, layer = None, relu.input(0).producer
    if layer is not None and layer.op_type == "Add" and not layer.domain and _only_reader(relu.input(0), relu):
        add, layer = layer, next((v.producer for v in layer.inputs if v is not None and v.const is None), None)
    if layer is None or layer.domain or layer.op_type not in MATMULS or attribute(layer, "transA") \
            or not _only_reader(layer.output, add or relu):
        return None
    axis = weight_out_axis(layer) % 2
    weight = layer.input(1)
    biases = [(add, i) for i, v in enumerate(add.inputs) if v is not layer.output] if add is not None else []
    if layer.op_type == "Gemm" and len(layer.inputs) > 2 and layer.input(2) is not None:
        biases.append((layer, 2))
    if weight is None or weight.const is None or weight.const.ndim != 2 or weight.const.shape[axis] != inv_s.size \
            or any(owner.input(i).const is None or owner.input(i).const.size != inv_s.size for owner, i in biases):
        return None
    _replace_constant(graph, layer, 1, weight.const * inv_s.reshape([1, -1] if axis == 1 else [-1, 1]))
    for owner, i in biases:
        bias = owner.input(i).const
        _replace_constant(graph, owner, i, (bias.reshape(-1) * inv_s).reshape(bias.shape))
    return [v.output for v in (layer, add) if v is not None] + [x]


def _only_reader(value: Value, node: Node) -> bool:
    return not value.is_graph_output and [n for n in value.users] == [node]


def _replace_constant(graph: Graph, node: Node, port: int, array: np.ndarray) -> None:
    """Give `node` the constant `array` (computed in float64) at input `port`, in the old constant's dtype; a tied
    constant keeps its value for its other readers."""
    old = node.input(port)
    replace_constant(graph, node, port, np.asarray(array).astype(old.const.dtype), f"{old.name}_smoothed")


def _insert_mul(graph: Graph, x: Value, first: Node, layers: list[Node], inv_s: np.ndarray) -> Node:
    """A Mul of x by inv_s, before `first`, that `layers` read instead of x."""
    dtype = np.float16 if x.dtype == "float16" else np.float32  # a float16 model keeps float16 arithmetic
    factor = graph.add_constant(f"{x.name}_smooth_scale", inv_s.astype(dtype))
    mul = graph.make_node("Mul", [x, factor], name=f"{x.name}_smooth", before=first, meta={"smooth_quant": True})
    for layer in layers:
        layer.set_input(0, mul.output)
    return mul
