"""FakeQuantize as torch modules: OpenVINO's semantics, differentiable, for quantization-aware training.

    y = round((clip(x, low, high) - low) / (high - low) * (levels - 1)) / (levels - 1) * (high - low) + low

Rounding passes gradients straight through (the straight-through estimator), so gradients reach `x` and the
range. Two ways to learn the range:

- `FakeQuantize` ("range", NNCF's way): the parameters are the range ends `low` and `high`.
- `LSQFakeQuantize` ("lsq", Esser et al., LSQ, ICLR'20): the parameter is the step size `scale` (and, for an
  asymmetric grid, a float `offset` rounded to the zero point: LSQ+), its gradient scaled by
  1 / sqrt(elements per step x positive levels) so that it learns at the pace of the weights.

Either way the range in use stays valid while training: the width is kept above 1e-8 (low < high), and zero
stays exactly a level, as the QDQ writer and the integer kernels need (a high end pushed below the low end
counts as the width between them). A "symmetric" grid keeps the zero point
it was calibrated with (0 for unsigned, the centre for signed: its low end follows its high end); an
"asymmetric" one moves its zero point to the nearest integer (NNCF's range tuning). `ranges()` gives the range
in use, which is what export writes. A float16 (or bfloat16) input is quantized in float32 and the result given
back in its own dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

EPS = 1e-8
GRIDS = ("symmetric", "asymmetric")
LEARNING = ("range", "lsq")


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


def _scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t's value, with its gradient multiplied by `factor`."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


def calibrated_zero_point(levels: int, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The integer zero point of the grid of `levels` points over [low, high] (float, per channel)."""
    step = ((high.double() - low.double()) / (levels - 1)).clamp_min(EPS)
    return torch.round(-low.double() / step).clamp(0, levels - 1).float()


def infer_grid(levels: int, low: torch.Tensor, high: torch.Tensor) -> str:
    """"symmetric" when the zero point is 0 or the grid's centre on every channel (a range from a symmetric
    quantizer), else "asymmetric": the grid of a FakeQuantize whose graph did not say."""
    zp = calibrated_zero_point(levels, low, high)
    return "symmetric" if bool(torch.all(zp == 0)) or bool(torch.all(zp == levels // 2)) else "asymmetric"


class FakeQuantize(nn.Module):
    """A quantizer that learns its range ends `low` and `high` ("range")."""

    learning = "range"

    def __init__(self, levels: int, low: torch.Tensor, high: torch.Tensor, grid: str | None = None):
        super().__init__()
        self.levels = int(levels)
        low, high = low.clone().float(), high.clone().float()
        self.grid = grid if grid in GRIDS else infer_grid(self.levels, low, high)
        self.register_buffer("zero_point", calibrated_zero_point(self.levels, low, high), persistent=False)
        self._init_range(low, high)

    def _init_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        if self.grid == "symmetric":  # the low end follows the high one: a buffer (as calibrated), not trained,
            self.register_buffer("low", low)  # so that every parameter gets a gradient (DDP requires it)
        else:
            self.low = nn.Parameter(low)
        self.high = nn.Parameter(high)

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range in use, (low, high): valid and with zero on the grid (differentiable)."""
        steps = self.levels - 1
        if self.grid == "symmetric":
            positive = (steps - self.zero_point).clamp_min(1)
            step = self.high.abs().clamp_min(EPS) / positive
            return -self.zero_point * step, positive * step
        width = (self.high - self.low).abs().clamp_min(EPS)  # an overshoot past the low end mirrors (as NNCF's)
        step = width / steps
        zero_point = _round_ste(-self.low / step).clamp(0, steps)
        low = -zero_point * step
        return low, low + width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized, computed in float32 (the ranges' type) and returned in x's dtype (float16 stays)."""
        low, high = self.ranges()
        width = (high - low).clamp_min(EPS)
        steps = self.levels - 1
        xf = x.float() if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64) else x
        clipped = torch.minimum(torch.maximum(xf, low), high)
        q = _round_ste((clipped - low) / width * steps)
        out = q / steps * width + low
        return out if out.dtype == x.dtype or not x.is_floating_point() else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, grid={self.grid}, learning={self.learning}, shape={tuple(self.zero_point.shape)}"


class LSQFakeQuantize(FakeQuantize):
    """A quantizer that learns its step size `scale` (and an asymmetric grid's `offset`), as LSQ ("lsq")."""

    learning = "lsq"

    def _init_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        self.scale = nn.Parameter(((high.double() - low.double()) / (self.levels - 1)).clamp_min(EPS).float())
        if self.grid == "asymmetric":
            self.offset = nn.Parameter(self.zero_point.clone())

    def _step(self, elements: int) -> torch.Tensor:
        positive = max(self.levels - 1 - float(self.zero_point.min()), 1.0)
        per_step = max(elements // max(self.scale.numel(), 1), 1)
        return _scale_grad(self.scale.abs().clamp_min(EPS), 1.0 / math.sqrt(per_step * positive))

    def _zero_point(self) -> torch.Tensor:
        if self.grid == "asymmetric":
            return _round_ste(self.offset).clamp(0, self.levels - 1)
        return self.zero_point

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, zero_point = self.scale.abs().clamp_min(EPS), self._zero_point()
        return -zero_point * step, (self.levels - 1 - zero_point) * step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64) else x
        step, zero_point = self._step(x.numel()), self._zero_point()
        q = _round_ste(torch.clamp(xf / step + zero_point, 0, self.levels - 1))
        out = (q - zero_point) * step
        return out if out.dtype == x.dtype or not x.is_floating_point() else out.to(x.dtype)


QUANTIZERS = {"range": FakeQuantize, "lsq": LSQFakeQuantize}


def fake_quantize(levels: int, low: torch.Tensor, high: torch.Tensor, *, grid: str | None = None,
                  learning: str = "range") -> FakeQuantize:
    """The trainable quantizer of a FakeQuantize node: `learning` "range" or "lsq" (see the module docstring)."""
    return QUANTIZERS[learning](levels, low, high, grid)
