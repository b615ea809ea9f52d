"""aten layer ops with no op of their own in lowbit's vocabulary -> IR: group norm, weight norm, upsampling.

- `group_norm` (PoolFormer, wav2vec2's feature encoder, diffusion U-Nets): the channels reshaped into groups,
  LayerNormalization over each group, the shape restored, then the per-channel scale and shift;
- `_weight_norm` (wav2vec2's positional conv: w = g * v / ||v||): its ops, which cleanup folds to the weight
  when v and g are constants, so that the conv's weight quantizer sees a constant;
- `upsample_bilinear2d` / `upsample_nearest2d` (BEiT's position bias, MobileViT, FPN and YOLO necks) ->
  Resize with the coordinate transformation torch uses (align_corners or pytorch_half_pixel; nearest:
  asymmetric, floor), to the output's spatial sizes.

Group norm and weight norm round differently from torch's fused kernels (a float32 rounding), the rest is exact.
Importing this module registers the handlers in torch_fx.HANDLERS.
"""

from __future__ import annotations

import numpy as np
import torch

from .torch_fx import handles, typed
from .torch_tensors import sum_of_squares

aten = torch.ops.aten


def _per_channel(lw, param, rank: int, label: str):
    """A [C] parameter as [C, 1, ...] to broadcast over a [N, C, ...] tensor of `rank` dims (an Unsqueeze, so that
    a parameter stays one, trainable, in the torch module lowbit writes)."""
    v = lw.val(param)
    axes = list(range(1, rank - 1))
    if not axes:
        return v
    shape = None if v.shape is None else tuple(v.shape) + (1,) * len(axes)
    return typed(lw.op("Unsqueeze", [v, lw.ints(axes, f"{label}_axes")], suffix=f"_{label}"), v.dtype, shape)


@handles(aten.group_norm.default)
def _group_norm(lw, node, x, groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """GroupNorm -> Reshape [N, G, C/G x spatial] -> LayerNormalization (scale 1) -> Reshape back -> x weight
    + bias. The group size must be static (ONNX's LayerNormalization takes a scale of that size)."""
    xv = lw.val(x)
    if xv.shape is None or any(not isinstance(d, int) for d in xv.shape[1:]):
        return NotImplemented
    rank, group_size = xv.rank, int(np.prod(xv.shape[1:])) // groups
    grouped = typed(lw.op("Reshape", [xv, lw.ints([0, groups, group_size], "groups")], suffix="_grouped"),
                     xv.dtype, (xv.shape[0], groups, group_size))
    ones = lw.const(np.ones(group_size, dtype=xv.dtype), "unit_scale")
    normed = typed(lw.op("LayerNormalization", [grouped, ones], {"axis": -1, "epsilon": float(eps)},
                          suffix="_normalized"), xv.dtype, grouped.shape)
    shape = typed(lw.op("Shape", [xv], suffix="_shape"), "int64", (rank,))
    out = typed(lw.op("Reshape", [normed, shape], suffix="_ungrouped"), xv.dtype, xv.shape)
    if weight is not None:
        out = typed(lw.op("Mul", [out, _per_channel(lw, weight, rank, "scale")], suffix="_scaled"),
                    xv.dtype, xv.shape)
    if bias is None:
        return lw.op("Identity", [out])
    return lw.op("Add", [out, _per_channel(lw, bias, rank, "shift")])


@handles(aten._weight_norm.default)
def _weight_norm(lw, node, v, g, dim=0):
    """torch's weight norm, w = v * g / ||v|| (the L2 norm over every dim but `dim`)."""
    vv, gv = lw.val(v), lw.val(g)
    if vv.shape is None:
        return NotImplemented
    total = sum_of_squares(lw, vv, [a for a in range(vv.rank) if a != dim % vv.rank], keepdims=True)
    norm = typed(lw.op("Sqrt", [total], suffix="_norm"), vv.dtype, total.shape)
    gain = typed(lw.op("Div", [gv, norm], suffix="_gain"), vv.dtype, total.shape)
    return lw.op("Mul", [vv, gain])


@handles(aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.default,
         aten.upsample_nearest2d.default)
def _upsample(lw, node, x, *args, **kwargs):
    """F.interpolate (bilinear or nearest, 2-D) -> Resize to the output's spatial sizes, which must be static."""
    xv, out = lw.val(x), node.meta["val"]
    spatial = list(out.shape[2:])
    if xv.rank != 4 or any(not isinstance(d, int) for d in spatial):
        return NotImplemented
    if node.target in (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default):
        align = bool(args[1] if len(args) > 1 else kwargs.get("align_corners", False))
        attrs = {"mode": "linear", "coordinate_transformation_mode": "align_corners" if align else "pytorch_half_pixel"}
    else:
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    lead = typed(lw.op("Shape", [xv], {"start": 0, "end": 2}, suffix="_lead"), "int64", (2,))
    sizes = typed(lw.op("Concat", [lead, lw.ints(spatial, "spatial")], {"axis": 0}, suffix="_sizes"), "int64", (4,))
    return lw.op("Resize", [xv, None, None, sizes], attrs)
