"""Statistics reduced on the fly, batch by batch: nothing keeps every activation.

Range estimators for a per-tensor activation quantizer:
- `min_max`: the smallest and largest value seen;
- `mean_min_max` (default): the mean over samples of each sample's min and max,
  which ignores rare outliers (NNCF's default for activations);
- `percentile`: the mean over samples of each sample's 0.01th and 99.99th
  percentiles.
Per-channel statistics (means for bias correction, largest magnitudes for
smooth quantization) are derived from the summaries of `summary.py`.
"""

from __future__ import annotations

import numpy as np

from .summary import as_array

RANGE_ESTIMATORS = ("mean_min_max", "min_max", "percentile")
PERCENTILE = 99.99
_QUANTILE_SAMPLE = 1 << 16  # rows longer than this are subsampled (sorted, evenly spaced) before the quantile


class RangeStats:
    """Per-sample minima and maxima of a value, reduced as the chosen estimator says."""

    def __init__(self, estimator: str = "mean_min_max"):
        self.estimator = estimator
        self.count = 0
        self.sum_lo = 0.0
        self.sum_hi = 0.0
        self.lo = float("inf")
        self.hi = float("-inf")

    def update(self, x, samples: int | None = None) -> None:
        """Reduce one batch of the value (a numpy array or a torch tensor)."""
        x = as_array(x)
        flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
        if samples and flat.shape[0] != samples and flat.shape[0] % samples == 0:
            flat = flat.reshape(samples, -1)  # several rows per sample (a flattened batch x sequence)
        if self.estimator == "percentile":
            if flat.shape[1] > _QUANTILE_SAMPLE:
                idx = np.linspace(0, flat.shape[1] - 1, _QUANTILE_SAMPLE).astype(np.int64)
                flat = np.sort(flat, axis=1)[:, idx]
            lo, hi = np.quantile(flat, [1 - PERCENTILE / 100, PERCENTILE / 100], axis=1)
        else:
            lo, hi = flat.min(axis=1), flat.max(axis=1)
        self.count += lo.size
        self.sum_lo += float(lo.sum())
        self.sum_hi += float(hi.sum())
        self.lo = min(self.lo, float(lo.min()))
        self.hi = max(self.hi, float(hi.max()))

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise ValueError("no statistics collected")
        if self.estimator == "min_max":
            return self.lo, self.hi
        return self.sum_lo / self.count, self.sum_hi / self.count

