"""FakeQuantize as a torch module: OpenVINO's semantics, differentiable, so a quantized model can be fine-tuned.

    y = round((clip(x, low, high) - low) / (high - low) * (levels - 1)) / (levels - 1) * (high - low) + low

Rounding passes gradients straight through (the straight-through estimator),
so gradients reach both `x` and the range parameters `low` and `high`
(learned ranges for quantization-aware training). A float16 (or bfloat16) input
is quantized in float32 and the result given back in its own dtype, so the
next layer of a half-precision model gets the type it computes in.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FakeQuantize(nn.Module):
    def __init__(self, levels: int, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.levels = int(levels)
        self.low = nn.Parameter(low.clone().float())
        self.high = nn.Parameter(high.clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized, computed in float32 (the ranges' type) and returned in x's dtype (float16 stays)."""
        low, high = self.low, self.high
        width = (high - low).clamp_min(1e-8)
        steps = self.levels - 1
        xf = x.float() if x.is_floating_point() and x.dtype != torch.float32 and x.dtype != torch.float64 else x
        clipped = torch.minimum(torch.maximum(xf, low), high)
        q = (clipped - low) / width * steps
        q = q + (torch.round(q) - q).detach()
        out = q / steps * width + low
        return out if out.dtype == x.dtype or not x.is_floating_point() else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, shape={tuple(self.low.shape)}"
