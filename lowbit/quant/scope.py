"""`IgnoredScope`: the nodes quantization must leave in FP32, by name, regex, op type or subgraph.

Names are node names as the text form prints them (`lowbit.lower(model)`
shows them). Every entry must match something: an entry that matches
nothing raises IgnoredScopeError with the closest names, since a typo would
otherwise silently quantize what the user meant to protect.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from ..errors import IgnoredScopeError
from ..ir.graph import Graph


@dataclass
class Subgraph:
    """Every node on a path from one of `inputs` to one of `outputs` (node names)."""

    inputs: list[str]
    outputs: list[str]


@dataclass
class IgnoredScope:
    names: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    subgraphs: list[Subgraph] = field(default_factory=list)
    validate: bool = True

    def resolve(self, graph: Graph) -> set[str]:
        """The names of the ignored nodes of `graph`."""
        nodes = graph.nodes
        names = [n.name for n in nodes]
        known = set(names)
        ignored: set[str] = set()
        for name in self.names:
            if name not in known:
                self._missing("name", name, names)
            ignored.add(name)
        for pattern in self.patterns:
            rx = re.compile(pattern)
            hits = {n for n in names if rx.fullmatch(n) or rx.search(n)}
            if not hits:
                self._missing("pattern", pattern, names)
            ignored |= hits
        ops = sorted({n.op_type for n in nodes})
        for op in self.types:
            hits = {n.name for n in nodes if n.op_type == op}
            if not hits:
                self._missing("type", op, ops)
            ignored |= hits
        for sub in self.subgraphs:
            ignored |= self._subgraph(graph, sub, names)
        return ignored

    def _subgraph(self, graph: Graph, sub: Subgraph, names: list[str]) -> set[str]:
        by_name = {n.name: n for n in graph}
        for name in [*sub.inputs, *sub.outputs]:
            if name not in by_name:
                self._missing("subgraph node", name, names)
        forward: set[str] = set()
        stack = [by_name[n] for n in sub.inputs]
        while stack:
            n = stack.pop()
            if n.name not in forward:
                forward.add(n.name)
                stack.extend(n.successors)
        backward: set[str] = set()
        stack = [by_name[n] for n in sub.outputs]
        while stack:
            n = stack.pop()
            if n.name not in backward:
                backward.add(n.name)
                stack.extend(n.predecessors)
        hits = forward & backward
        if not hits and self.validate:
            raise IgnoredScopeError(f"ignored subgraph {sub.inputs} -> {sub.outputs} contains no node: no path "
                                    "leads from those inputs to those outputs")
        return hits

    def _missing(self, kind: str, entry: str, candidates: list[str]) -> None:
        if not self.validate:
            return
        close = difflib.get_close_matches(entry, candidates, n=5, cutoff=0.4)
        if close:
            hint = f"; closest: {', '.join(close)}"
        elif kind == "type":
            hint = f"; the model has: {', '.join(candidates)}"
        else:
            hint = ""
        raise IgnoredScopeError(f"ignored scope {kind} {entry!r} matches no node of the model{hint}. Node names "
                                "are those `print(lowbit.lower(model))` shows")
