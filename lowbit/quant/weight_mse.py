"""Weight ranges that minimize the rounding error: the range of a low-bit weight grid, clipped.

At 8 bits a weight's own ends (min/max) lose little. At 4 bits, 15 levels must
cover every value up to the largest, and the few large weights of a tensor
(a depthwise filter among them, where one grid serves a whole tensor) leave a
step so wide that most weights round to zero or one step. Clipping the range
trades an error on those few for a finer step for all the rest; the range
that minimizes the squared error of the rounded weights ("MSE" range setting:
Nagel et al., "A White Paper on Neural Network Quantization", 2021, sec. 3.4;
AIMET's and NVIDIA's pytorch-quantization's weight calibrators) is the usual
choice.

"auto", the default, clips where one grid serves a whole tensor below 8
bits: a per-tensor grid. A per-channel grid already fits each filter's own
ends, and keeps them (as NNCF's). Measured on the digits models at W4A8,
three epochs of QAT, the mean of six seeds (FP32: MobileNetV2 99.11%,
ResNet18 99.56%):

| weights | model | min/max | mse |
|---|---|---|---|
| per tensor (NNCF's meaning) | MobileNetV2 | 98.48 | 98.96 |
| per tensor (NNCF's meaning) | ResNet18 | 99.56 | 99.60 |
| per tensor (folded weight) | MobileNetV2 | 98.07 | 98.22 |
| per channel | MobileNetV2 | 99.08 | 99.00 |
| per channel | ResNet18 | 99.60 | 99.56 |

and PTQ alone (one run) per tensor 96.22 -> 97.11 (MobileNetV2) and 98.89 ->
99.33 (ResNet18), per channel 98.67 -> 98.44 and 99.33 -> 99.11 (one test
image each way). Per channel, clipping bought nothing here.

`clip_ratio` searches the ratio r in (0, 1] by which both ends are scaled:
coarse steps over [MIN_RATIO, 1], then fine steps around the best one, each
candidate rounded (`layer_eval.fake_quantize`, the FakeQuantize formula) on the
grid `ranges.fq_range` makes of it (the same levels, symmetry and floors the
quantizer will have). A per-channel quantizer gets a
ratio per channel; a per-tensor one a single ratio, also where its range is
given per channel (NNCF's per-tensor weights of a layer with a folded
BatchNorm: one range of the stored weight, scaled per channel).
"""

from __future__ import annotations

import numpy as np

from ..hw_configs import QuantizerConfig
from .layer_eval import fake_quantize
from .ranges import fq_range

WEIGHT_RANGE_ESTIMATORS = ("auto", "min_max", "mse")  # auto: "mse" for per-tensor grids below 8 bits
MIN_RATIO = 0.05  # a 2-bit (ternary) grid of a heavy-tailed weight clips to below a fifth of its largest value
COARSE = np.linspace(MIN_RATIO, 1.0, 20)  # steps of 0.05
FINE = np.linspace(-0.04, 0.04, 9)  # steps of 0.01 around the best coarse ratio


def resolved(estimator: str, config: QuantizerConfig) -> str:
    """The estimator a weight quantizer of `config` uses: "auto" is "mse" for a per-tensor grid below 8 bits,
    else "min_max"."""
    if estimator == "auto":
        return "mse" if config.bits < 8 and not config.per_channel else "min_max"
    return estimator


def clip_ratio(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, config: QuantizerConfig, axis: int | None,
               half_range: bool = False) -> np.ndarray:
    """The ratio by which the ends `lo`, `hi` of the weight `w` are scaled for the least squared rounding error
    of `w`: one per channel (shaped as `lo`) for a per-channel `config`, else one (a scalar array). `lo` and
    `hi` are scalars, or per-channel ends shaped to broadcast along `axis`."""
    w = np.asarray(w, np.float64)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if lo.size == 1:
        flat, lo_c, hi_c = w.reshape(1, -1), lo.reshape(1), hi.reshape(1)
    else:
        axis %= w.ndim
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        lo_c, hi_c = lo.reshape(-1), hi.reshape(-1)
    per_channel = bool(config.per_channel) and lo.size > 1
    best = _search(flat, lo_c, hi_c, config, per_channel, half_range, COARSE)
    around = (best[:, None] if per_channel else best[0]) + FINE
    ratio = _search(flat, lo_c, hi_c, config, per_channel, half_range, np.clip(around, 0.01, 1.0))
    return ratio.reshape(lo.shape) if per_channel else ratio.reshape(())


def _search(flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, config: QuantizerConfig, per_channel: bool,
            half_range: bool, ratios: np.ndarray) -> np.ndarray:
    """The best of `ratios` (a vector, or a row per channel): one per channel where `per_channel`, else [one]."""
    per_row = ratios.ndim == 2
    candidates = ratios.shape[-1]
    errors = np.empty((flat.shape[0] if per_channel else 1, candidates))
    for i in range(candidates):
        r = ratios[:, i] if per_row else ratios[i]
        grid = fq_range(config, lo * r, hi * r, half_range=half_range)
        q = fake_quantize(flat, grid.levels, grid.low.reshape(-1, 1), grid.high.reshape(-1, 1))
        err = np.square(q - flat).sum(axis=1)
        errors[:, i] = err if per_channel else err.sum()
    pick = errors.argmin(axis=1)
    return ratios[np.arange(len(pick)), pick] if per_row else ratios[pick]
