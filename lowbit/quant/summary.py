"""Per-value statistics summaries: one run over the calibration data serves every pass of a pipeline.

A `ValueSummary` keeps, for one tapped value, what every statistic the
passes use can be derived from exactly (up to float rounding):

- per sample (a sample is a row of dim 0, as `RangeStats` counts them) the
  minimum and maximum, per channel where asked (`[samples, channels]`), else
  over the whole row (`[samples, 1]`);
- where asked, the per-channel sum (float32 per batch, accumulated in float64)
  and the count of elements per channel.

From it: `range(estimator)` ("min_max", "mean_min_max": the estimators of
`RangeStats`; "percentile" cannot be derived), `channel_mean()`
(per-channel mean), `channel_abs_max()` (per-channel largest magnitude), and `scaled(inv_s)`,
the summary of the value times a positive per-channel factor (what
smooth_quant makes of a value).

A `StatisticsCache` (`PassContext.statistics`) holds summaries by value name.
An entry describes the value's FP32 function (FakeQuantize taken as the
identity): it remembers the value's producer node and is not handed out when
another node produces that name now, nor for another Graph object; the
PassManager clears it after any pass that does not declare
`preserves_statistics`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

ANY_AXIS = "any"
DERIVABLE_ESTIMATORS = ("mean_min_max", "min_max")


@dataclass(frozen=True)
class Need:
    """What a pass will read of one value: its range, and per-channel facts along `axis` (1 or -1)."""

    value: object  # ir Value
    axis: int | None = None  # the channel axis; None: no per-channel statistic is needed
    extremes: bool = False  # per-sample per-channel min/max (channel_abs_max, scaled)
    sums: bool = False  # per-channel sums (channel_mean)


def as_array(x) -> np.ndarray:
    """A tapped value as a float32 (or float64) numpy array: ONNX Runtime's arrays as they are, torch tensors
    without a copy where they are float32 (statistics import no framework: an ONNX model never meets torch)."""
    if hasattr(x, "detach"):  # a torch tensor (the torch path)
        x = x.detach()
        if str(x.dtype) not in ("torch.float32", "torch.float64"):
            x = x.float()  # float16, bfloat16 (numpy has no bfloat16), integers
        x = x.cpu().numpy()
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


class ValueSummary:
    """Per-sample minima/maxima (per channel or per row) and per-channel sums of one value, batch by batch."""

    def __init__(self, axis: int | None = None, extremes: bool = False, sums: bool = False):
        self.axis = axis
        self.extremes = extremes and axis is not None
        self.sums = sums and axis is not None
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.total: np.ndarray | None = None
        self.count = 0

    def covers(self, need: Need) -> bool:
        """Whether this summary answers `need`."""
        if not (need.extremes or need.sums):
            return True
        return (need.axis == self.axis and (not need.extremes or self.extremes) and (not need.sums or self.sums))

    def update(self, x, samples: int | None = None) -> None:
        """Reduce one batch of the value (a numpy array or a torch tensor), which holds `samples` calibration
        samples (see `by_sample`)."""
        x = as_array(x)
        x = x.reshape(1, -1) if x.ndim < 2 else x
        axis = None if self.axis is None else self.axis % x.ndim
        if axis == 0:
            raise ValueError("the channel axis of a summary cannot be the sample axis")
        others = tuple(d for d in range(1, x.ndim) if d != axis)
        if self.extremes:
            lo, hi = (x.min(axis=others), x.max(axis=others)) if others else (x, x)
        else:
            flat = x.reshape(x.shape[0], -1)
            lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
        self.lo.append(by_sample(lo.astype(np.float32), samples, np.min))
        self.hi.append(by_sample(hi.astype(np.float32), samples, np.max))
        if self.sums:
            s = _channel_sums(x, axis).astype(np.float64)
            self.total = s if self.total is None else self.total + s
            self.count += x.size // x.shape[axis]

    def _extremes(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.lo:
            raise ValueError("no statistics collected")
        return np.concatenate(self.lo), np.concatenate(self.hi)

    def range(self, estimator: str) -> tuple[float, float]:
        """The range `RangeStats(estimator)` gives ("min_max" or "mean_min_max")."""
        lo, hi = self._extremes()
        if estimator == "min_max":
            return float(lo.min()), float(hi.max())
        if estimator != "mean_min_max":
            raise ValueError(f"the {estimator!r} range cannot be derived from a summary")
        return float(lo.min(axis=1).astype(np.float64).mean()), float(hi.max(axis=1).astype(np.float64).mean())

    def channel_mean(self) -> np.ndarray:
        """The per-channel mean (float64), as `ChannelMean(axis).mean()`."""
        if self.total is None:
            raise ValueError("no per-channel sums collected")
        return self.total / self.count

    def channel_abs_max(self) -> np.ndarray:
        """The per-channel largest magnitude (float32), as `ChannelAbsMax(axis).max()`."""
        if not self.extremes:
            raise ValueError("no per-channel extremes collected")
        lo, hi = self._extremes()
        return np.maximum(np.maximum(hi.max(axis=0), -lo.min(axis=0)), 0)

    def scaled(self, factor: np.ndarray) -> ValueSummary | None:
        """The summary of the value times `factor` (> 0) per channel; None where this one cannot say."""
        if not self.extremes or (self.sums and self.total is None):
            return None
        f = np.asarray(factor, dtype=np.float64).reshape(-1)
        if f.size != self.lo[0].shape[1] or not bool((f > 0).all()):
            return None
        out = ValueSummary(self.axis, self.extremes, self.sums)
        f32 = f.astype(np.float32)
        out.lo = [lo * f32 for lo in self.lo]
        out.hi = [hi * f32 for hi in self.hi]
        out.total = None if self.total is None else self.total * f
        out.count = self.count
        return out


def _channel_sums(x: np.ndarray, axis: int) -> np.ndarray:
    """The float32 sum of `x` per index of `axis`, by numpy's own reductions, never BLAS: OpenBLAS's worker
    threads spin after each call, and between a calibration run's taps that takes the cores from torch's or
    ONNX Runtime's own threads (BERT-base: 2.5x slower calibration on 2 cores)."""
    if axis == x.ndim - 1:
        return x.reshape(-1, x.shape[-1]).sum(axis=0, dtype=np.float32)
    if axis == 1:
        return x.reshape(x.shape[0], x.shape[1], -1).sum(axis=2, dtype=np.float32).sum(axis=0)
    return x.sum(axis=tuple(d for d in range(x.ndim) if d != axis), dtype=np.float32)


def by_sample(rows: np.ndarray, samples: int | None, reduce) -> np.ndarray:
    """Per-row statistics [rows, k] reduced to per-sample ones [samples, k].

    A sample is one row of the batch fed to the model. A value whose leading dim holds several rows per
    sample (a transformer's [batch x sequence, channels] after a flattening Reshape, GPT-2's Conv1D input)
    has its rows grouped by sample, in order: otherwise mean-min-max would average each token's extremes,
    a range far narrower than a sequence's, and clip (GPT-2: 17.7 dB instead of 29.7)."""
    if not samples or rows.shape[0] == samples or rows.shape[0] % samples:
        return rows
    return reduce(rows.reshape(samples, rows.shape[0] // samples, *rows.shape[1:]), axis=1)


class StatisticsCache:
    """Summaries by value name, valid for one Graph object and for the node that produced each value."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._graph = None
        self._entries: dict[str, list[tuple[object, ValueSummary]]] = {}

    def bind(self, graph) -> None:
        """Forget everything when `graph` is not the graph the entries were collected on."""
        if self._graph is None or self._graph() is not graph:
            self.clear()
            self._graph = weakref.ref(graph)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def get(self, need: Need) -> ValueSummary | None:
        """A summary of `need.value` that answers it, or None."""
        if not self.enabled:
            return None
        for producer, summary in self._entries.get(need.value.name, []):
            if producer is need.value.producer and summary.covers(need):
                return summary
        return None

    def put(self, value, summary: ValueSummary) -> None:
        """Store `summary` for `value` as it is produced now (entries for an earlier producer are dropped)."""
        kept = [(p, s) for p, s in self._entries.get(value.name, []) if p is value.producer]
        self._entries[value.name] = [(value.producer, summary), *kept]

    def discard(self, value) -> None:
        self._entries.pop(value.name, None)

    def summaries(self, value) -> list[ValueSummary]:
        """Every valid summary of `value`."""
        return [s for p, s in self._entries.get(value.name, []) if p is value.producer]


def merge_needs(needs: list[Need]) -> dict[str, list[Need]]:
    """Needs grouped by value name, merged so that each value gets as few summaries as answer all of them."""
    by_value: dict[str, dict[object, Need]] = {}
    for n in needs:
        slots = by_value.setdefault(n.value.name, {})
        if n.axis is None or not (n.extremes or n.sums):
            if not slots:
                slots[None] = Need(n.value)
            continue
        old = slots.pop(n.axis, None) or Need(n.value, n.axis)
        slots.pop(None, None)  # a per-channel summary answers ranges too
        slots[n.axis] = Need(n.value, n.axis, old.extremes or n.extremes, old.sums or n.sums)
    return {name: list(slots.values()) for name, slots in by_value.items()}
