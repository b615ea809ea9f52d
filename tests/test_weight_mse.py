"""Weight ranges set for the least rounding error (quant/weight_mse.py): the clip ratio the search finds is the
best on its grid, per channel where the quantizer is (the option `weight_range_estimator`, and the deployment
of clipped weights: tests/test_qat_quantizers.py)."""

import dataclasses

import numpy as np
import pytest

from lowbit.hw_configs import QuantizerConfig
from lowbit.quant.ranges import fq_range
from lowbit.quant.weight_mse import clip_ratio

FOUR_BIT = QuantizerConfig("w4", bits=4, mode="symmetric", granularity="per_tensor", narrow_range=True,
                           signed=True)


def _rounding_error(w, lo, hi, config, ratio) -> np.ndarray:
    """The squared error of `w` rounded on the grid of `config` over [lo, hi] * ratio, per channel (axis 0)."""
    grid = fq_range(config, np.asarray(lo) * ratio, np.asarray(hi) * ratio)
    step = (grid.high.astype(np.float64) - grid.low) / (grid.levels - 1)
    q = np.clip(np.round((w - grid.low) / step), 0, grid.levels - 1) * step + grid.low
    return np.square(q - w).reshape(w.shape[0], -1).sum(axis=1)


@pytest.mark.parametrize("bits, clipped_to", [(2, 0.3), (3, 0.5), (4, 0.8)])
def test_a_heavy_tailed_weight_is_clipped_to_the_ratio_with_the_least_rounding_error(bits, clipped_to):
    config = dataclasses.replace(FOUR_BIT, bits=bits)
    w = np.random.default_rng(0).laplace(size=(16, 8, 3, 3)).astype(np.float32)
    ratio = float(clip_ratio(w, w.min(), w.max(), config, 0))
    error = _rounding_error(w, w.min(), w.max(), config, ratio).sum()
    dense = [_rounding_error(w, w.min(), w.max(), config, r).sum() for r in np.linspace(0.02, 1.0, 99)]
    assert ratio < clipped_to  # the few large weights are clipped, the more so the fewer the levels
    assert error <= min(dense) * 1.01  # as good as a dense search, to its 0.01 steps
    assert error < 0.75 * dense[-1]  # and far better than the min/max grid


def test_a_per_channel_grid_clips_each_channel_on_its_own():
    rng = np.random.default_rng(1)
    w = np.stack([rng.uniform(-1, 1, 256), rng.laplace(size=256)]).astype(np.float32)  # channel 1 heavy-tailed
    config = QuantizerConfig("w4c", bits=4, mode="symmetric", granularity="per_channel", narrow_range=True,
                             signed=True)
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    ratio = clip_ratio(w, lo, hi, config, 0)
    assert ratio.shape == (2, 1)
    assert ratio[1, 0] < 0.85 < ratio[0, 0]  # a uniform channel keeps about its range, a heavy-tailed one not
    for c in range(2):
        best = min(_rounding_error(w[c:c + 1], lo[c], hi[c], config, r)[0] for r in np.linspace(0.05, 1, 96))
        assert _rounding_error(w[c:c + 1], lo[c], hi[c], config, ratio[c, 0])[0] <= best * 1.01
