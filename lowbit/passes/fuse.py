"""fuse: mark the op chains a quantizer must never split (Conv-BN-ReLU, MatMul-Add, ...).

Nothing is rewritten: each node of a match gets `meta["fused"] =
"<pattern>:<last node>"`, which the text form shows and the quantizer reads.
The patterns are data (`lowbit.patterns.library.fused.FUSED_PATTERNS`);
matching runs from the outputs back, largest pattern first, and a node
belongs to one group at most.
"""

from __future__ import annotations

from ..ir.graph import Graph
from ..patterns.library.fused import FUSED_PATTERNS, rooted
from ..patterns.rewrite import Match, Rule, RuleSet
from .base import Pass, PassContext, PassResult, register_pass


def _mark(name: str):
    def mark(m: Match):
        group = f"{name}:{m.root.name}"
        for node in m.nodes:
            node.meta["fused"] = group
        return None
    return mark


def _unclaimed(m: Match) -> bool:
    return len(m.nodes) > 1 and all("fused" not in n.meta for n in m.nodes)


def _free(node) -> bool:
    return "fused" not in node.meta


def fusion_rules() -> RuleSet:
    """One rule per multi-node root alternative of every registered fused pattern, in library order."""
    return RuleSet(Rule(name, root, _mark(name), where=_unclaimed, precheck=_free)
                   for name, pattern in FUSED_PATTERNS for root in rooted(pattern) if root.size() > 1)


def fusion_groups(graph: Graph) -> dict[str, list]:
    """group id -> its nodes, in graph order."""
    groups: dict[str, list] = {}
    for node in graph:
        if "fused" in node.meta:
            groups.setdefault(node.meta["fused"], []).append(node)
    return groups


@register_pass
class Fuse(Pass):
    name = "fuse"
    description = "mark fused patterns (the quantizer never splits them)"

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        for node in graph:
            node.meta.pop("fused", None)
        # One sweep is the fixed point: marking creates no new matches.
        fired = fusion_rules().apply_once(graph, reverse=True)
        return PassResult(graph, changed=bool(fired), fired=fired)
