"""One layer evaluated in numpy, as ONNX defines it: what fast bias correction runs a layer's mean input through,
with and without its quantizers, for models of any origin (an ONNX model never goes through torch).

`fake_quantize` is the FakeQuantize formula of `lowbit/backends/torch_fq.py` (OpenVINO's), in float32. `conv` takes
ONNX Conv's attributes: strides, explicit or SAME_UPPER/SAME_LOWER/VALID pads (asymmetric ones included),
dilations and groups (depthwise convolutions by broadcasting, others as one matrix product per group).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def fake_quantize(x: np.ndarray, levels: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """round((clip(x, low, high) - low) / (high - low) * (levels - 1)) / (levels - 1) * (high - low) + low."""
    x = np.asarray(x, dtype=np.float32)
    low, high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    width = np.maximum(high - low, np.float32(1e-8))
    steps = np.float32(levels - 1)
    q = np.round((np.minimum(np.maximum(x, low), high) - low) / width * steps)
    return (q / steps * width + low).astype(np.float32)


def conv_pads(attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """The Conv's pads as [begin..., end...], auto_pad resolved for the input's spatial size."""
    k = len(kernel)
    strides = list(attrs.get("strides", [1] * k))
    dilations = list(attrs.get("dilations", [1] * k))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        return list(attrs.get("pads", [0] * (2 * k))) if auto == "NOTSET" else [0] * (2 * k)
    begin, end = [], []
    for i in range(k):
        extent = (kernel[i] - 1) * dilations[i] + 1
        total = max((-(-spatial[i] // strides[i]) - 1) * strides[i] + extent - spatial[i], 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def conv(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """ONNX Conv without bias: x [N, C, *spatial], w [O, C / group, *kernel] -> [N, O, *out]."""
    k = w.ndim - 2
    strides = list(attrs.get("strides", [1] * k))
    dilations = list(attrs.get("dilations", [1] * k))
    group = int(attrs.get("group", 1))
    pads = conv_pads(attrs, x.shape[2:], w.shape[2:])
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[k + i]) for i in range(k)])
    extents = [(w.shape[2 + i] - 1) * dilations[i] + 1 for i in range(k)]
    windows = sliding_window_view(x, extents, axis=tuple(range(2, 2 + k)))  # [N, C, *positions, *extents]
    pick = (slice(None), slice(None), *(slice(None, None, s) for s in strides),
            *(slice(None, None, d) for d in dilations))
    windows = windows[pick]  # [N, C, *out, *kernel]
    n, c = x.shape[:2]
    out = windows.shape[2:2 + k]
    o, per_group = w.shape[0], c // group
    if per_group == 1 and group == c:  # depthwise (o = c * multiplier): one multiply-add per kernel offset
        multiplier = o // c
        wk = w.reshape(c, multiplier, -1)  # [C, m, kernel elements]
        y = np.zeros((n, c, multiplier, *out), dtype=np.float32)
        for index, offset in enumerate(np.ndindex(*w.shape[2:])):
            tap = windows[(Ellipsis, *offset)][:, :, None]  # [N, C, 1, *out]
            y += tap * wk[:, :, index].reshape(1, c, multiplier, *([1] * k))
        return y.reshape(n, o, *out)
    outs = []
    per_out = o // group
    for g in range(group):
        cols = windows[:, g * per_group:(g + 1) * per_group]  # [N, cg, *out, *kernel]
        cols = np.moveaxis(cols, 1, 1 + k).reshape(n * int(np.prod(out)), -1)  # [N * out, cg * kernel]
        wg = w[g * per_out:(g + 1) * per_out].reshape(per_out, -1)
        outs.append((cols @ wg.T).reshape(n, *out, per_out))
    return np.moveaxis(np.concatenate(outs, axis=-1), -1, 1).astype(np.float32)


def gemm(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """ONNX Gemm without its C input: alpha * A' B' (A', B' transposed as transA / transB say)."""
    a = x.T if attrs.get("transA", 0) else x
    b = w.T if attrs.get("transB", 0) else w
    return (np.float32(attrs.get("alpha", 1.0)) * (a @ b)).astype(np.float32)
