"""snap_bias: round each quantized layer's bias to the integer grid that INT8 kernels add it on.

An integer Conv/Gemm (ONNX Runtime's QLinearConv, QGemm) accumulates in
int32 and adds its bias there, as round(bias / (input scale x weight
scale)). The torch simulation adds the float bias. The difference is at most
half an accumulator step, but it is the same for every pixel of a channel,
so it flips the rounding of a share of that channel's outputs, and the flips
grow through a deep network: a 53-layer MobileNetV2 exported to ONNX Runtime
agreed with its simulation at 34 dB, and at 42 dB with snapped biases.
Rounding the bias onto that grid in the graph makes the simulation, ONNX
Runtime and OpenVINO (which adds the bias in float) add the same value.
The change is at most half a step of the accumulator, far below the output's
own step, so accuracy does not move.

Runs after the ranges (quantize) and the bias values (fast_bias_correction)
are final. A layer needs a per-tensor activation quantizer on its input
(through value-preserving ops, as the QDQ writer finds it) and a quantized
constant weight with one scale per output channel or one in all.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph
from ..ir.ops import is_fake_quantize
from ..backends.qdq import qdq_params, source_quantizer
from ..quant.layers import biased_layers, set_bias
from .base import Pass, PassContext, PassResult, register_pass

INT32_LIMIT = 2.0 ** 31 - 1


def _scale(fq) -> np.ndarray | None:
    low, high = fq.input(1).const, fq.input(2).const
    if low is None or high is None:
        return None
    return qdq_params(int(fq.attrs["levels"]), low, high).scale.astype(np.float32).reshape(-1)


@register_pass
class SnapBias(Pass):
    name = "snap_bias"
    prerequisites = ("quantize",)
    description = "round quantized layers' biases to the int32 grid integer kernels add them on"
    preserves_statistics = True  # a bias moves by under half an accumulator step: no statistic depends on it

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        snapped = 0
        for layer, bias, add in biased_layers(graph):
            x_fq, w_fq = source_quantizer(layer.input(0)), layer.input(1).producer
            if x_fq is None or w_fq is None or not is_fake_quantize(w_fq) or w_fq.input(0).const is None:
                continue
            x_scale, w_scale = _scale(x_fq), _scale(w_fq)
            if x_scale is None or w_scale is None or x_scale.size != 1 or w_scale.size not in (1, bias.const.size):
                continue
            step = x_scale[0] * w_scale  # float32, as ONNX Runtime computes the bias scale
            steps = np.round(bias.const.astype(np.float32) / step)
            if not np.all(np.isfinite(steps)) or np.max(np.abs(steps)) > INT32_LIMIT:
                continue
            values = (steps * step).astype(bias.const.dtype)
            if not np.array_equal(values, bias.const):
                set_bias(graph, layer, bias, add, values)
                snapped += 1
        return PassResult(graph, changed=snapped > 0, fired={"bias_snapped": snapped} if snapped else {})
