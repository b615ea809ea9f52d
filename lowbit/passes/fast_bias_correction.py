"""fast_bias_correction: shift each quantized layer's bias so its mean output matches FP32.

For every Conv / Gemm / MatMul+Add with a constant bias whose input or weight
is quantized: build an input whose every channel holds that channel's mean
input (measured on the calibration data: FP32 statistics from the shared
cache, tapped in the pipeline's one run before `quantize` changed the graph),
run the layer once in FP32 and once with its quantizers (in numpy, as ONNX
defines the layer: lowbit/quant/layer_eval.py), and add the per-output-channel
difference of the mean outputs to the bias. Cheap (one
forward of one layer per layer) and it removes most of the systematic shift
that weight rounding causes.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import activation_axis, is_fake_quantize
from ..quant.calibration import gather
from ..quant.layer_eval import conv, fake_quantize, gemm
from ..quant.layers import biased_layers, set_bias
from ..quant.summary import Need
from .base import Pass, PassContext, PassResult, register_pass

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


def _fake_quantize(x: np.ndarray, fq: Node) -> np.ndarray:
    """`x` through FakeQuantize node `fq`'s ranges (the torch writer's formula, float32)."""
    return fake_quantize(x, int(fq.attrs["levels"]), fq.input(1).const, fq.input(2).const)


def _run_layer(layer: Node, x_fq: Node | None, w_fq: Node | None, blob: np.ndarray, quantized: bool) -> np.ndarray:
    """`layer` (without its bias) on `blob`, with or without its quantizers, evaluated in numpy as ONNX defines
    it (lowbit/quant/layer_eval.py): the same for a torch and an ONNX model, and no model runs through torch."""
    x = np.ascontiguousarray(blob, dtype=np.float32)
    if quantized and x_fq is not None:
        x = _fake_quantize(x, x_fq)
    w = _unquantized(layer.input(1))[0].const.astype(np.float32)  # float16 models: statistics in float32
    if quantized and w_fq is not None:
        w = _fake_quantize(w, w_fq)
    if layer.op_type == "Conv":
        return conv(x, w, layer.attrs)
    if layer.op_type == "MatMul":
        return np.matmul(x, w)
    return gemm(x, w, layer.attrs)


def _channel_mean(y: np.ndarray, axis: int) -> np.ndarray:
    axis = axis % y.ndim
    return y.astype(np.float64).mean(axis=tuple(d for d in range(y.ndim) if d != axis))


def _layers(graph: Graph, quantized: bool) -> list[tuple[Node, Value, Node | None, Value, Node | None, Node | None]]:
    """(layer, bias, bias Add, unquantized input, its FakeQuantize, the weight's FakeQuantize) of each biased
    layer with a known input shape and a constant weight; with `quantized`, only those with a quantizer."""
    layers = []
    for layer, bias, add in biased_layers(graph):
        x, x_fq = _unquantized(layer.input(0))
        w, w_fq = _unquantized(layer.input(1))
        if (not quantized or w_fq is not None) and x.shape is not None and w.const is not None:
            layers.append((layer, bias, add, x, x_fq, w_fq))
    return layers


SHIFT_LIMIT = 2.0  # NNCF's threshold: a shift of 2x a bias value or more is noise, not weight rounding


def _plausible(bias: np.ndarray, shift: np.ndarray) -> bool:
    """NNCF's rule: correct a layer only if no bias value is 0 and no shift is SHIFT_LIMIT times its bias."""
    b = bias.astype(np.float64)
    return bool(np.all(b != 0) and np.max(np.abs(shift / np.where(b == 0, 1, b))) < SHIFT_LIMIT)


@register_pass
class FastBiasCorrection(Pass):
    name = "fast_bias_correction"
    prerequisites = ("quantize",)
    description = "shift biases so quantized layers keep their FP32 mean output"

    def statistics_needed(self, graph: Graph, ctx: PassContext) -> list[Need]:
        """The per-channel mean input of every biased layer (which of them get quantized is not known yet)."""
        return [Need(x, activation_axis(layer), sums=True) for layer, _, _, x, _, _ in _layers(graph, quantized=False)]

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = _layers(graph, quantized=True)
        if not layers:
            return PassResult(graph, changed=False)
        # FP32 means: tapped before `quantize` changed the graph where it ran in this pipeline (it keeps them)
        summaries = gather(graph, ctx, [Need(x, activation_axis(layer), sums=True) for layer, _, _, x, _, _ in layers])
        means = {layer.name: s.channel_mean() for (layer, *_), s in zip(layers, summaries)}
        corrected = skipped = 0
        for layer, bias, add, x, x_fq, w_fq in layers:
            axis = activation_axis(layer)
            blob = _blob(layer, x, np.asarray(means[layer.name]), axis)
            if blob is None:
                continue
            fp32 = _channel_mean(_run_layer(layer, x_fq, w_fq, blob, quantized=False), axis)
            quant = _channel_mean(_run_layer(layer, None, w_fq, blob, quantized=True), axis)
            shift = fp32 - quant
            if shift.shape != bias.const.shape or not np.all(np.isfinite(shift)):
                continue
            if not _plausible(bias.const, shift):
                skipped += 1
                continue
            new_bias = (bias.const.astype(np.float64) + shift).astype(bias.const.dtype)
            set_bias(graph, layer, bias, add, new_bias)
            corrected += 1
        fired = {k: v for k, v in (("bias_corrected", corrected), ("bias_shift_implausible", skipped)) if v}
        return PassResult(graph, changed=corrected > 0, fired=fired)
