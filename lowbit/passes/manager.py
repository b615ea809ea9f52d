"""The PassManager: runs a pipeline of passes, checks the graph after each, and dumps what each did.

    pm = PassManager(["cleanup", "fold_bn", "fuse"], dump_dir="dumps/")
    graph = pm.run(graph, PassContext(hw="CPU"))
    pm.records    # one StepRecord per pass: time, node counts, rules fired, diff counts

Before any work, every pass's `prerequisites` (the passes that must have
run before it, in this pipeline or in one that produced the graph: the graph
records them in `meta["passes_run"]`) are checked; a missing one is a
PassError naming it and the pipeline that would work. Each pass's
`requires` hook runs before it and `ensures` after it; then
`graph.verify()`; then the statistics cache (`ctx.statistics`) is cleared
unless the pass declares `preserves_statistics`. A failure names the pass, the broken node and the passes
already run. The input graph is never modified: the pipeline works on a copy.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GraphError, LowbitError, PassError
from ..ir.graph import Graph
from ..ir.infer import reinfer
from .base import Pass, PassContext, PassResult, resolve
from .dump import DumpWriter, Snapshot


@dataclass
class StepRecord:
    """What one pass did."""

    index: int
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    fired: Counter = field(default_factory=Counter)
    added: int = 0
    removed: int = 0
    modified: int = 0
    notes: list[str] = field(default_factory=list)


class PassManager:
    def __init__(self, passes: Sequence[Pass | str], *, dump_dir: str | Path | None = None, verify: bool = True):
        self.passes = [resolve(p) for p in passes]
        self.dump = DumpWriter(dump_dir) if dump_dir is not None else None
        self.verify = verify
        self.records: list[StepRecord] = []

    def check_prerequisites(self, graph: Graph) -> None:
        """Raise PassError if a pass's prerequisites have not run on `graph` nor earlier in this pipeline."""
        ran = list(graph.meta.get("passes_run", []))
        names = [p.name for p in self.passes]
        for index, p in enumerate(self.passes):
            missing = [need for need in p.prerequisites if need not in ran]
            if missing:
                fixed = names[:index] + missing + names[index:]
                raise PassError(f"pass {p.name!r} needs {missing[0]!r} to have run before it, and it has not "
                                f"(pipeline: {', '.join(names)}; run on this graph before: "
                                f"{', '.join(graph.meta.get('passes_run', [])) or 'none'}). "
                                f"Run passes={fixed}")
            ran.append(p.name)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        self.check_prerequisites(graph)
        graph = graph.copy()
        reinfer(graph, only_stale=True)  # a model's own contradictory value_info is mended, not blamed on a pass
        ctx.statistics.clear()  # statistics describe one run's graph
        self.records = []
        before = Snapshot.of(graph) if self.dump else None
        if self.dump:
            self.dump.start(graph, before)
        for index, p in enumerate(self.passes, 1):
            n_before = len(graph)
            done = ", ".join(ctx.history) or "none"
            ctx.upcoming = self.passes[index:]
            try:
                p.requires(graph, ctx)
                start = time.perf_counter()
                result = p(graph, ctx)
                seconds = time.perf_counter() - start
                if not isinstance(result, PassResult):
                    raise PassError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
                graph = result.graph
                p.ensures(graph, ctx)
            except LowbitError:
                raise
            except Exception as e:
                raise PassError(f"pass {p.name!r} (step {index}) failed with {type(e).__name__}: {e}. "
                                f"Passes run before it: {done}") from e
            if self.verify:
                try:
                    graph.verify()
                except GraphError as e:
                    raise PassError(f"pass {p.name!r} (step {index}) left the graph invalid: {e}. "
                                    f"Passes run before it: {done}") from None
            ctx.upcoming = []
            if not p.preserves_statistics:
                ctx.statistics.clear()
            ctx.history.append(p.name)
            graph.meta["passes_run"] = [*graph.meta.get("passes_run", []), p.name]
            record = StepRecord(index, p.name, seconds, n_before, len(graph), result.changed, Counter(result.fired),
                                notes=list(result.notes))
            if self.dump:
                after = Snapshot.of(graph)
                diff = after.diff(before)
                record.added, record.removed, record.modified = diff.counts()
                self.dump.step(record, graph, after, diff)
                before = after
            self.records.append(record)
        if self.dump:
            self.dump.finish(self.records)
        return graph
