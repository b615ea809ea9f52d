"""FakeQuantize as a torch module: OpenVINO's semantics, differentiable, so a quantized model can be fine-tuned.

    y = round((clip(x, low, high) - low) / (high - low) * (levels - 1)) / (levels - 1) * (high - low) + low

Rounding passes gradients straight through (the straight-through estimator),
so gradients reach both `x` and the range parameters `low` and `high`
(learned ranges for quantization-aware training).
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
        low, high = self.low, self.high
        width = (high - low).clamp_min(1e-8)
        steps = self.levels - 1
        clipped = torch.minimum(torch.maximum(x, low), high)
        q = (clipped - low) / width * steps
        q = q + (torch.round(q) - q).detach()
        return q / steps * width + low

    def extra_repr(self) -> str:
        return f"levels={self.levels}, shape={tuple(self.low.shape)}"
