"""prune_filters: remove the least important filters of every channel group, physically (lowbit/pruning/).

Reads `ctx.pruning` (a PruneSpec: ratio, criterion, round_to, NNI-style
config_list), the ignored scope (layers never pruned) and, for the Taylor
criterion, the calibration data. Records the report,
one row per group with its layers, its channel count before and after and why
it was left alone, in `graph.meta["pruning"]`.
"""

from __future__ import annotations

import dataclasses

from ..ir.graph import Graph
from ..pruning import PruneSpec, prune_graph
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class PruneFilters(Pass):
    name = "prune_filters"
    description = "remove the least important filters of each channel dependency group (physically smaller)"

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        spec = ctx.pruning or PruneSpec()
        if ctx.ignored_scope is not None:
            spec = dataclasses.replace(spec, keep=frozenset(spec.keep | ctx.ignored_scope.resolve(graph)))
        report = prune_graph(graph, spec, ctx.dataset)
        graph.meta["pruning"] = report
        pruned = [r for r in report if r["kept"] < r["channels"]]
        notes = [f"{len(pruned)} of {len(report)} channel groups pruned"]
        notes += [f"left alone: {', '.join(r['layers'][:3])}: {r['blocked']}" for r in report if r["blocked"]]
        return PassResult(graph, changed=bool(pruned), notes=notes)
