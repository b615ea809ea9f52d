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
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise IgnoredScopeError(f"ignored scope pattern {pattern!r} is not a valid regular expression: "
                                        f"{e}") from None
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


REGEX_PREFIX = "{re}"  # NNCF's scopes: a regular expression after it, a node name without


def nncf_scope(entries: list[str] | tuple[str, ...]) -> IgnoredScope | None:
    """NNCF's scope strings as an IgnoredScope (None for none): node names, and regular expressions after the
    `{re}` prefix."""
    if not entries:
        return None
    return IgnoredScope(names=[e for e in entries if not e.startswith(REGEX_PREFIX)],
                        patterns=[e[len(REGEX_PREFIX):] for e in entries if e.startswith(REGEX_PREFIX)])


def _names(value, field_name: str, kind: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise IgnoredScopeError(f"ignored_scope.{field_name} must be a list of {kind}s, got "
                                f"{type(value).__name__} {value!r}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise IgnoredScopeError(f"ignored_scope.{field_name} must hold {kind}s (str), got "
                                f"{type(bad[0]).__name__} {bad[0]!r}")
    return list(value)


def as_ignored_scope(scope) -> IgnoredScope | None:
    """An IgnoredScope from what a user may pass as `ignored_scope`.

    None; a lowbit IgnoredScope; a list (or tuple) of node names; or any object
    with `names` / `patterns` / `types` / `subgraphs` attributes, as
    `nncf.IgnoredScope` (duck-typed: nncf is never imported), whose subgraphs
    have `inputs` and `outputs`. Anything else is an IgnoredScopeError naming
    its type.
    """
    if scope is None or isinstance(scope, IgnoredScope):
        return scope
    if isinstance(scope, (list, tuple)):
        return IgnoredScope(names=_names(scope, "names", "node name"))
    fields = ("names", "patterns", "types", "subgraphs")
    if isinstance(scope, (str, bytes, dict)) or not any(hasattr(scope, f) for f in fields):
        raise IgnoredScopeError(
            f"ignored_scope must be a lowbit.IgnoredScope (or nncf.IgnoredScope), or a list of node names, not "
            f"{type(scope).__name__}" + (f" {scope!r}: wrap a single name as [{scope!r}]"
                                         if isinstance(scope, str) else ""))
    subgraphs = []
    raw = getattr(scope, "subgraphs", None) or []
    if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)):
        raise IgnoredScopeError(f"ignored_scope.subgraphs must be a list of subgraphs, got {type(raw).__name__}")
    for sub in raw:
        if isinstance(sub, dict):
            inputs, outputs = sub.get("inputs"), sub.get("outputs")
        else:
            inputs, outputs = getattr(sub, "inputs", None), getattr(sub, "outputs", None)
        if inputs is None or outputs is None:
            raise IgnoredScopeError(f"an ignored_scope subgraph needs `inputs` and `outputs` (node names), got "
                                    f"{type(sub).__name__} {sub!r}")
        subgraphs.append(Subgraph(_names(inputs, "subgraphs[].inputs", "node name"),
                                  _names(outputs, "subgraphs[].outputs", "node name")))
    validate = getattr(scope, "validate", True)
    return IgnoredScope(names=_names(getattr(scope, "names", None), "names", "node name"),
                        patterns=_names(getattr(scope, "patterns", None), "patterns", "regular expression"),
                        types=_names(getattr(scope, "types", None), "types", "op type"),
                        subgraphs=subgraphs, validate=bool(validate) if isinstance(validate, bool) else True)
