"""fast_bias_correction: shift each quantized layer's bias so its mean output matches FP32.

For every Conv / Gemm / MatMul+Add with a constant bias whose input or weight
is quantized: build an input whose every channel holds that channel's mean
input (measured on the calibration data, in the `quantize` pass's run when it
ran first), run the layer once in FP32 and once with its quantizers, and add
the per-output-channel difference of the mean outputs to the bias. Cheap (one
forward of one layer per layer) and it removes most of the systematic shift
that weight rounding causes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir.graph import Graph, Node, Value
from ..ir.ops import QUANT_DOMAIN, is_fake_quantize
from .base import Pass, PassContext, PassResult, register_pass
from .quantize import biased_layers, calibrate, channel_axis

SPATIAL_DEFAULT = 8


def _unquantized(v: Value) -> tuple[Value, Node | None]:
    """The value under a FakeQuantize (and that FakeQuantize), or v itself."""
    if v.producer is not None and is_fake_quantize(v.producer):
        return v.producer.input(0), v.producer
    return v, None


def _blob(layer: Node, value: Value, means: np.ndarray, axis: int) -> np.ndarray | None:
    """A one-sample input of `layer` whose every channel holds its mean; None where the shapes disagree.

    The channel count is the measured one (the graph's shape may have lost it:
    a Pad whose pads were computed at run time has a symbolic output shape);
    other unknown dims get SPATIAL_DEFAULT (at least the Conv's kernel extent).
    """
    rank = len(value.shape)
    axis = axis % rank
    channels = means.size
    if isinstance(value.shape[axis], int) and value.shape[axis] != channels:
        return None
    weight = _unquantized(layer.input(1))[0].const
    kernel = list(weight.shape[2:]) if layer.op_type == "Conv" else []
    dilations = list(layer.attrs.get("dilations", [1] * len(kernel)))
    shape = []
    for i, d in enumerate(value.shape):
        if i == 0:
            shape.append(1)
        elif i == axis:
            shape.append(channels)
        elif isinstance(d, int):
            shape.append(d)
        else:
            spatial = i - 2
            extent = (kernel[spatial] - 1) * dilations[spatial] + 1 if 0 <= spatial < len(kernel) else 1
            shape.append(max(SPATIAL_DEFAULT, extent))
    view = [1] * rank
    view[axis] = -1
    return np.broadcast_to(means.reshape(view).astype(np.float32), shape).copy()


def _run_layer(layer: Node, x_fq: Node | None, w_fq: Node | None, blob: np.ndarray, quantized: bool) -> np.ndarray:
    """Run `layer` (without its bias) on `blob`, with or without its quantizers, via the torch writer."""
    from ..ir.torch_emit import to_torch

    g = Graph("layer", {"": 21})
    x = g.add_input("x", "float32", blob.shape)
    if quantized and x_fq is not None:
        ranges = [g.add_constant(f"r{i}", v.const.astype(np.float32)) for i, v in enumerate(x_fq.inputs[1:5])]
        x = g.make_node("FakeQuantize", [x, *ranges], dict(x_fq.attrs), domain=QUANT_DOMAIN).output
    weight = layer.input(1)
    w_value, _ = _unquantized(weight)
    w = g.add_constant("w", w_value.const.astype(np.float32))  # float16 models: statistics in float32
    if quantized and w_fq is not None:
        ranges = [g.add_constant(f"wr{i}", v.const.astype(np.float32)) for i, v in enumerate(w_fq.inputs[1:5])]
        w = g.make_node("FakeQuantize", [w, *ranges], dict(w_fq.attrs), domain=QUANT_DOMAIN).output
    out = g.make_node(layer.op_type, [x, w], dict(layer.attrs)).output
    g.outputs.append(out)
    with torch.no_grad():
        return to_torch(g)(torch.from_numpy(np.ascontiguousarray(blob))).numpy()


def _channel_mean(y: np.ndarray, axis: int) -> np.ndarray:
    axis = axis % y.ndim
    return y.astype(np.float64).mean(axis=tuple(d for d in range(y.ndim) if d != axis))


@register_pass
class FastBiasCorrection(Pass):
    name = "fast_bias_correction"
    description = "shift biases so quantized layers keep their FP32 mean output"

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = []
        for layer, bias, add in biased_layers(graph):
            x, x_fq = _unquantized(layer.input(0))
            w, w_fq = _unquantized(layer.input(1))
            if (x_fq is not None or w_fq is not None) and x.shape is not None and w.const is not None:
                layers.append((layer, bias, add, x, x_fq, w_fq))
        if not layers:
            return PassResult(graph, changed=False)
        means = ctx.options.get("input_channel_means", {})
        missing = {layer.name: (x, channel_axis(layer)) for layer, _, _, x, _, _ in layers if layer.name not in means}
        if missing:
            _, stats = calibrate(graph, ctx, [], missing, "mean_min_max")
            means = {**means, **{k: s.mean() for k, s in stats.items()}}
        corrected = 0
        for layer, bias, add, x, x_fq, w_fq in layers:
            axis = channel_axis(layer)
            blob = _blob(layer, x, np.asarray(means[layer.name]), axis)
            if blob is None:
                continue
            fp32 = _channel_mean(_run_layer(layer, x_fq, w_fq, blob, quantized=False), axis)
            quant = _channel_mean(_run_layer(layer, x_fq, w_fq, blob, quantized=True), axis)
            shift = fp32 - quant
            if shift.shape != bias.const.shape or not np.all(np.isfinite(shift)):
                continue
            new_bias = (bias.const.astype(np.float64) + shift).astype(bias.const.dtype)
            owner = add if add is not None else layer
            port = next(i for i, v in enumerate(owner.inputs) if v is bias)
            if len(bias.uses) == 1 and not bias.is_graph_output:
                bias.const = new_bias
            else:
                fresh = graph.add_constant(f"{bias.name}_corrected", new_bias)
                fresh.meta.update(bias.meta)
                owner.set_input(port, fresh)
            corrected += 1
        return PassResult(graph, changed=corrected > 0, fired={"bias_corrected": corrected} if corrected else {})
