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

    def step_and_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, zero point) of the grid in use, differentiable, shaped as the range."""
        steps = self.levels - 1
        if self.grid == "symmetric":
            return self.high.abs().clamp_min(EPS) / (steps - self.zero_point).clamp_min(1), self.zero_point
        step = (self.high - self.low).abs().clamp_min(EPS) / steps  # an overshoot past the low end mirrors (NNCF)
        return step, _round_ste(-self.low / step).clamp(0, steps)

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range in use, (low, high): valid and with zero on the grid (differentiable)."""
        step, zero_point = self.step_and_zero_point()
        return -zero_point * step, (self.levels - 1 - zero_point) * step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized, computed in float32 (the ranges' type) and returned in x's dtype (float16 stays).
        torch's fused learnable fake-quantize kernels do it: one pass forward and back (the same straight-through
        gradients as the formula, a sixth of its time on a large activation)."""
        xf = x.float() if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64) else x
        step, zero_point = self.step_and_zero_point()
        out = _fake_quantize(xf, step, zero_point, self.levels, self._grad_factor(x.numel()))
        return out if out.dtype == x.dtype or not x.is_floating_point() else out.to(x.dtype)

    def _grad_factor(self, elements: int) -> float:
        """How much the step's and zero point's gradients are scaled, for an input of `elements` values."""
        return 1.0

    def extra_repr(self) -> str:
        return f"levels={self.levels}, grid={self.grid}, learning={self.learning}, shape={tuple(self.zero_point.shape)}"


class LSQFakeQuantize(FakeQuantize):
    """A quantizer that learns its step size `scale` (and an asymmetric grid's `offset`), as LSQ ("lsq")."""

    learning = "lsq"

    def _init_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        # LSQ's Qp, the grid's positive levels: read once here, not from a (maybe GPU) tensor at every step
        self.positive_levels = max(self.levels - 1 - float(self.zero_point.min()), 1.0)
        self.scale = nn.Parameter(((high.double() - low.double()) / (self.levels - 1)).clamp_min(EPS).float())
        if self.grid == "asymmetric":
            self.offset = nn.Parameter(self.zero_point.clone())

    def step_and_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        zero_point = _round_ste(self.offset).clamp(0, self.levels - 1) if self.grid == "asymmetric" \
            else self.zero_point
        return self.scale.abs().clamp_min(EPS), zero_point

    def _grad_factor(self, elements: int) -> float:
        """LSQ's gradient scale for the step size: 1 / sqrt(elements per step x positive levels)."""
        return 1.0 / math.sqrt(max(elements // max(self.scale.numel(), 1), 1) * self.positive_levels)


def _fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, levels: int,
                   grad_factor: float) -> torch.Tensor:
    """(clamp(round(x / step + zero_point), 0, levels - 1) - zero_point) * step, with straight-through gradients
    to x, and to step and zero point scaled by `grad_factor`: torch's fused learnable kernels where the range is
    per tensor or along one axis, the formula elsewhere."""
    axes = [i for i, d in enumerate(step.shape) if d != 1]
    if not axes and step.numel() == 1:
        return torch._fake_quantize_learnable_per_tensor_affine(x, step.reshape(1), zero_point.reshape(1).float(),
                                                                0, levels - 1, grad_factor)
    if len(axes) == 1 and step.dim() == x.dim():
        return torch._fake_quantize_learnable_per_channel_affine(x, step.reshape(-1), zero_point.reshape(-1).float(),
                                                                 axes[0], 0, levels - 1, grad_factor)
    step = _scale_grad(step, grad_factor)
    zero_point = _scale_grad(zero_point, grad_factor) if zero_point.requires_grad else zero_point
    q = _round_ste(torch.clamp(x / step + zero_point, 0, levels - 1))
    return (q - zero_point) * step


QUANTIZERS = {"range": FakeQuantize, "lsq": LSQFakeQuantize}


def fake_quantize(levels: int, low: torch.Tensor, high: torch.Tensor, *, grid: str | None = None,
                  learning: str = "range") -> FakeQuantize:
    """The trainable quantizer of a FakeQuantize node: `learning` "range" or "lsq" (see the module docstring)."""
    return QUANTIZERS[learning](levels, low, high, grid)
