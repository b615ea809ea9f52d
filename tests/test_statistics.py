"""The shared calibration statistics (lowbit/quant/summary.py): derived statistics equal the direct ones, a
transformer pipeline runs over the data once and quantizes as with the cache off, a stale entry is never used."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.compiler import pass_context
from lowbit.ir.graph import Value
from lowbit.ir.ops import is_fake_quantize
from lowbit.passes import TRANSFORMER_PTQ_PIPELINE, Pass, PassManager, PassResult
from lowbit.quant.stats import RangeStats
from lowbit.quant.summary import Need, StatisticsCache, ValueSummary

sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import build  # noqa: E402

SHAPES = [(5, 7), (3, 6, 5), (2, 4, 5, 3)]


def _batches(shape, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [shape[0], 1, shape[0] + 2]  # batches of different sizes
    return [torch.randn((n, *shape[1:]), generator=g) * 3 + 0.5 for n in sizes]


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-6, atol=1e-6)


class ChannelMean:
    """Reference, computed directly: the mean of a value per channel (`axis`), over every other axis and every
    sample."""

    def __init__(self, axis: int):
        self.axis = axis
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        axis = self.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        s = x.sum(dim=dims, dtype=torch.float64)
        self.total = s if self.total is None else self.total + s
        self.count += x.numel() // x.shape[axis]

    def mean(self):
        return (self.total / self.count).numpy()


class ChannelAbsMax:
    """Reference, computed directly: the largest |value| per channel (`axis`), over every other axis and every
    sample."""

    def __init__(self, axis: int):
        self.axis = axis
        self.peak: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        axis = self.axis % x.dim()
        peak = x.abs().movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)

    def max(self):
        if self.peak is None:
            raise ValueError("no statistics collected")
        return self.peak.numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_derived_statistics_equal_the_direct_ones(shape, axis):
    xs = _batches(shape, len(shape) * 10 + axis)
    summary, whole = ValueSummary(axis, extremes=True, sums=True), ValueSummary()
    direct = {e: RangeStats(e) for e in ("min_max", "mean_min_max")}
    mean, peak = ChannelMean(axis), ChannelAbsMax(axis)
    for x in xs:
        for stat in (summary, whole, mean, peak, *direct.values()):
            stat.update(x)
    for estimator, stat in direct.items():
        _close(summary.range(estimator), stat.range())
        _close(whole.range(estimator), stat.range())
    _close(summary.channel_mean(), mean.mean())
    _close(summary.channel_abs_max(), peak.max())


@pytest.mark.parametrize("shape", SHAPES)
def test_a_scaled_summary_is_the_summary_of_the_scaled_value(shape):
    xs = _batches(shape, 7)
    factor = np.linspace(0.1, 4.0, shape[-1])
    summary, scaled_direct = ValueSummary(-1, extremes=True, sums=True), ValueSummary(-1, extremes=True, sums=True)
    for x in xs:
        summary.update(x)
        scaled_direct.update(x * torch.from_numpy(factor).float())
    scaled = summary.scaled(factor)
    for estimator in ("min_max", "mean_min_max"):
        _close(scaled.range(estimator), scaled_direct.range(estimator))
    _close(scaled.channel_mean(), scaled_direct.channel_mean())
    _close(scaled.channel_abs_max(), scaled_direct.channel_abs_max())
    assert ValueSummary().scaled(factor) is None  # no per-channel extremes: cannot say


@pytest.fixture(scope="module")
def bert():
    module, make_input, model_type = build("bert", "small")
    items = [make_input(1) for _ in range(6)]
    return lowbit.lower(module, (items[0],)), items, model_type


def _context(items, model_type, enabled=True):
    ctx = pass_context(dataset=lowbit.Dataset(items), subset_size=len(items), model_type=model_type, progress=False)
    ctx.statistics = StatisticsCache(enabled=enabled)
    return ctx


def _fq_ranges(graph):
    return {n.name: (n.input(1).const, n.input(2).const) for n in graph if is_fake_quantize(n)}


def _count_runs(monkeypatch):
    import lowbit.runtime as runtime

    runs = []
    original = runtime.GraphRunner.__init__

    def counting(self, graph, taps, *args, **kwargs):
        runs.append(len(taps))
        original(self, graph, taps, *args, **kwargs)

    monkeypatch.setattr(runtime.GraphRunner, "__init__", counting)
    return runs


def test_transformer_pipeline_runs_over_the_data_once_with_the_ranges_of_separate_runs(bert, monkeypatch):
    graph, items, model_type = bert
    runs = _count_runs(monkeypatch)
    shared = PassManager(TRANSFORMER_PTQ_PIPELINE).run(graph, _context(items, model_type))
    assert len(runs) == 1
    separate = PassManager(TRANSFORMER_PTQ_PIPELINE).run(graph, _context(items, model_type, enabled=False))
    assert len(runs) == 4  # smooth_quant, quantize, fast_bias_correction: one run each
    a, b = _fq_ranges(shared), _fq_ranges(separate)
    assert a.keys() == b.keys() and len(a) > 10
    for name, (low, high) in a.items():
        np.testing.assert_allclose(low, b[name][0], rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(high, b[name][1], rtol=1e-5, atol=1e-7, err_msg=name)


class _DoubleTheWeights(Pass):
    """Changes values (every MatMul weight x 2) without declaring that statistics do not survive it."""

    name = "double_the_weights"

    def __call__(self, graph, ctx):
        for node in graph:
            if node.op_type == "MatMul" and node.input(1).const is not None:
                node.input(1).const = node.input(1).const * 2
        return PassResult(graph, changed=True)


def test_a_pass_that_does_not_preserve_statistics_clears_them(bert, monkeypatch):
    graph, items, model_type = bert
    runs = _count_runs(monkeypatch)
    pipeline = ["cleanup", "fold_bn", "fuse", "smooth_quant", _DoubleTheWeights(), "quantize"]
    ctx = _context(items, model_type)
    cached = PassManager(pipeline).run(graph, ctx)
    assert len(runs) == 2  # quantize ran over the data again, on the changed graph
    reference = PassManager(pipeline).run(graph, _context(items, model_type, enabled=False))
    a, b = _fq_ranges(cached), _fq_ranges(reference)
    for name, (low, high) in a.items():
        np.testing.assert_allclose(high, b[name][1], rtol=1e-5, atol=1e-7, err_msg=name)


def test_an_entry_is_not_used_for_another_producer_or_another_graph(bert):
    graph, _, _ = bert
    g = graph.copy()
    node = next(n for n in g if n.op_type == "MatMul")
    cache = StatisticsCache()
    cache.bind(g)
    summary = ValueSummary()
    summary.update(torch.ones(2, 3))
    cache.put(node.output, summary)
    assert cache.get(Need(node.output)) is summary
    assert cache.get(Need(node.output, -1, sums=True)) is None  # it has no sums
    other = next(n for n in g if n.op_type == "MatMul" and n is not node)
    same_name = Value(node.output.name, node.output.dtype, node.output.shape)
    same_name.producer = other  # the name now made by another node
    assert cache.get(Need(same_name)) is None
    cache.bind(g.copy())
    assert cache.get(Need(node.output)) is None and len(cache) == 0


def test_a_flattened_batch_keeps_one_sample_per_item():
    """[batch x sequence, channels] (a Reshape before GPT-2's Conv1D) gives the ranges of [batch, sequence,
    channels]: rows are grouped by sample, so mean-min-max averages each sequence's extremes, not each token's."""
    x = torch.randn(4, 16, 8) * torch.linspace(0.1, 3.0, 16).reshape(1, 16, 1)
    whole, flat = ValueSummary(extremes=False), ValueSummary(extremes=False)
    whole.update(x, samples=4)
    flat.update(x.reshape(64, 8), samples=4)
    for estimator in ("mean_min_max", "min_max"):
        assert flat.range(estimator) == pytest.approx(whole.range(estimator), rel=1e-6)
    per_token = ValueSummary(extremes=False)
    per_token.update(x.reshape(64, 8))  # the old behaviour: every row a sample, a much narrower range
    assert per_token.range("mean_min_max")[1] < 0.8 * whole.range("mean_min_max")[1]
    channels_whole, channels_flat = ValueSummary(axis=-1, extremes=True), ValueSummary(axis=-1, extremes=True)
    channels_whole.update(x, samples=4)
    channels_flat.update(x.reshape(64, 8), samples=4)
    np.testing.assert_allclose(channels_flat.channel_abs_max(), channels_whole.channel_abs_max())
    stats = RangeStats("percentile")
    stats.update(x.reshape(64, 8), samples=4)
    reference = RangeStats("percentile")
    reference.update(x)
    assert stats.range() == pytest.approx(reference.range(), rel=1e-6)


def test_a_streamed_torch_run_hands_each_tap_over_once_with_the_values_of_a_plain_run(bert):
    """Calibration on the torch path streams each tapped value into its statistics as soon as it is computed
    (nothing kept alive to the end of the forward): the same tensors a run returning them gives."""
    from lowbit.runtime import GraphRunner

    graph, items, _ = bert
    taps = [n.output for n in graph if n.op_type in ("MatMul", "LayerNormalization")][:12] + [graph.inputs[0]]
    arrays = [np.asarray(items[0].numpy() if hasattr(items[0], "numpy") else items[0])]
    returned = dict(zip([v.name for v in taps], GraphRunner(graph, taps)(arrays)))
    streamed = []
    GraphRunner(graph, taps, streaming=True).stream(arrays, lambda name, t: streamed.append((name, np.array(t))))
    assert sorted(name for name, _ in streamed) == sorted(returned)
    for name, t in streamed:  # the graph input comes back as the array given, computed taps as torch tensors
        np.testing.assert_array_equal(t, np.asarray(returned[name]))
