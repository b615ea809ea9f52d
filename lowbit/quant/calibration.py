"""Runs over the calibration data: `collect` feeds tapped values to statistics; `gather` serves a pass's
`Need`s from the shared statistics cache, tapping in ONE run whatever is missing for this pass and for
the passes after it (each declares what it will read with `Pass.statistics_needed`).

The arguments named `ctx` are the pipeline's PassContext (read for dataset, subset_size, options,
statistics and upcoming): this module does not import the passes.
"""

from __future__ import annotations

from ..errors import DatasetError, LowbitError
from ..ir.graph import Graph
from .dataset import CALIBRATION_BATCH, batches, calibration_data
from .summary import Need, StatisticsCache, ValueSummary, merge_needs


def collect(graph: Graph, ctx, requests: list[tuple[object, object]]) -> None:
    """One pass over the calibration data, feeding each tapped value to its statistic's `update`."""
    from ..runtime import GraphRunner

    if not requests:
        return
    taps = list({v.name: v for v, _ in requests}.values())
    runner = GraphRunner(graph, taps, streaming=True)
    if ctx.dataset is None:
        raise DatasetError("quantization needs calibration data: pass dataset=lowbit.Dataset(...)")
    # every pass of the pipeline reads the same items, read once from the user's dataset (a generator works)
    ctx.dataset = data = calibration_data(ctx.dataset, ctx.subset_size)
    by_name: dict[str, list] = {}
    for value, stat in requests:
        by_name.setdefault(value.name, []).append(stat)
    for arrays in progress(batches(graph, data, batch_size=ctx.options.batch_size), ctx):
        samples = _samples(arrays)

        def sink(name, tensor, samples=samples):
            for stat in by_name.get(name, ()):  # ValueSummary, or RangeStats for percentiles
                stat.update(tensor, samples)

        runner.stream(arrays, sink)


def _samples(arrays) -> int | None:
    """How many samples a batch holds: the inputs' common leading dim (None if they have none)."""
    sizes = {a.shape[0] for a in arrays if getattr(a, "ndim", 0) > 0}
    return sizes.pop() if len(sizes) == 1 else None


def progress(iterable, ctx):
    """`iterable`, with a transient progress bar unless ctx.options.progress is False."""
    if not ctx.options.progress:
        yield from iterable
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed} batches"),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("calibrating", total=None)
        for item in iterable:
            yield item
            bar.advance(task)


def cache_of(ctx) -> StatisticsCache:
    """The context's statistics cache (made on first use for a context that has none)."""
    cache = getattr(ctx, "statistics", None)
    if cache is None:
        cache = ctx.statistics = StatisticsCache()
    return cache


def upcoming_needs(graph: Graph, ctx) -> list[Need]:
    """What the passes after the current one will read, up to the first that clears the statistics.

    A pass whose hook fails (a bad option, an already quantized graph) asks
    for nothing here: the pass itself reports the error when it runs.
    """
    needs: list[Need] = []
    for p in getattr(ctx, "upcoming", None) or []:
        try:
            needs += p.statistics_needed(graph, ctx)
        except LowbitError:
            pass
        if not getattr(p, "preserves_statistics", False):
            break
    return needs


def gather(graph: Graph, ctx, needs: list[Need], extra: list[tuple[object, object]] = ()) -> list[ValueSummary]:
    """A summary answering each of `needs` (in order), from the cache or from one run over the data.

    The run also taps what the upcoming passes declare, so that they find it
    cached, and feeds `extra` (value, statistic) pairs (statistics no summary
    derives, such as percentiles: with any, the run always happens). With the
    cache disabled (`StatisticsCache(enabled=False)`) each call runs over the
    data for `needs` and `extra` alone.
    """
    cache = cache_of(ctx)
    cache.bind(graph)
    if not needs and not extra:
        return []
    wanted = needs + (upcoming_needs(graph, ctx) if cache.enabled else [])
    missing = [n for n in wanted if cache.get(n) is None]
    fresh: dict[str, list[ValueSummary]] = {}
    if missing or extra:
        values = {n.value.name: n.value for n in missing}
        requests = []
        for name, merged in merge_needs(missing).items():
            for n in merged:
                summary = ValueSummary(n.axis, n.extremes, n.sums)
                fresh.setdefault(name, []).append(summary)
                requests.append((values[name], summary))
        collect(graph, ctx, requests + list(extra))
        for value, summary in requests:
            cache.put(value, summary)
    found = []
    for n in needs:
        summary = cache.get(n) or next((s for s in fresh.get(n.value.name, []) if s.covers(n)), None)
        if summary is None:
            raise RuntimeError(f"no statistics gathered for {n.value.name!r}")
        found.append(summary)
    return found
