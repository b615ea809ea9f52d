"""Rules (a pattern plus a replacement), rule sets, the rewrite engine and `explain`.

    def fuse_swish(m):                       # m is the Match; return the new value for the root
        return m.op("Swish", [m["x"]])

    rules = RuleSet([Rule("swish", P("Mul", Any("x"), P("Sigmoid", Any("x"))), fuse_swish)])
    fired = rules.apply(graph)               # Counter({"swish": 3})

The engine indexes rules by the op type of their root and, before matching,
rejects a node whose inputs are not produced by the ops the rule's direct
sub-patterns name: the cost of a sweep grows with the graph, not with graph
x rules. Sweeps repeat in node order until nothing fires; a rule set that
keeps firing past `max_rounds` sweeps raises RuleLoopError naming the rules.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any as AnyType

import numpy as np

from ..errors import RuleLoopError
from ..ir.graph import Graph, Node, Value
from .pattern import NO_TRACE, NODES, Bindings, Opt, P, Trace, interior_ok


class Match:
    """One place a rule matched: its captures, the nodes it spans, and helpers to build the replacement."""

    def __init__(self, rule: Rule, graph: Graph, root: Node, bindings: Bindings):
        self.rule, self.graph, self.root, self.bindings = rule, graph, root, bindings

    def __getitem__(self, name: str) -> AnyType:
        return self.bindings[name]

    def get(self, name: str, default: AnyType = None) -> AnyType:
        return self.bindings.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.bindings

    @property
    def nodes(self) -> tuple[Node, ...]:
        return self.bindings.get(NODES, ())

    def op(self, op_type: str, inputs: Sequence[Value | None], attrs: dict | None = None, *,
           name: str | None = None, num_outputs: int = 1, domain: str = "") -> AnyType:
        """Insert a node before the root; returns its output (or outputs)."""
        node = self.graph.make_node(op_type, inputs, attrs, name=name or f"{self.root.name}_{op_type.lower()}",
                                    num_outputs=num_outputs, domain=domain, before=self.root,
                                    meta={"rule": self.rule.name})
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, array: AnyType, name: str = "c") -> Value:
        return self.graph.add_constant(f"{self.root.name}_{name}", np.asarray(array))


Replace = Callable[[Match], AnyType]


class Rule:
    """A named pattern and what to do where it matches.

    `replace(match)` either returns the value(s) that replace the root's
    outputs (matched nodes left without users are then removed), or changes
    the graph itself and returns None; returning False declines.
    `where(match)` can reject a structural match; `precheck(root_node)` is a
    cheap test run before any matching.
    """

    def __init__(self, name: str, pattern: P, replace: Replace, where: Callable[[Match], bool] | None = None,
                 check_interior: bool = True, precheck: Callable[[Node], bool] | None = None):
        if not isinstance(pattern, P):
            raise TypeError(f"rule {name!r}: the root of a rule's pattern must be a P(...)")
        self.name, self.pattern, self.replace, self.where = name, pattern, replace, where
        self.check_interior, self.precheck = check_interior, precheck
        self._input_ops = [p.ops if isinstance(p, P) else None for p in pattern.inputs]

    @property
    def root_ops(self) -> frozenset[str]:
        return self.pattern.ops

    def quick_reject(self, node: Node) -> bool:
        """True when the node's inputs cannot match: cheap, before any backtracking."""
        if self.precheck is not None and not self.precheck(node):
            return True
        producers = [v.producer.op_type if v is not None and v.producer is not None else None for v in node.inputs]
        if self.pattern.commutative:
            return not all(ops is None or any(p in ops for p in producers[:2]) for ops in self._input_ops)
        return any(ops is not None and (i >= len(producers) or producers[i] not in ops)
                   for i, ops in enumerate(self._input_ops))

    def match(self, graph: Graph, node: Node, trace: Trace = NO_TRACE) -> Match | None:
        for bindings in self.pattern.match_node(node, {}, trace):
            m = Match(self, graph, node, bindings)
            if self.check_interior:
                reason = interior_ok(node, list(m.nodes))
                if reason is not None:
                    trace.fail(lambda: f"the match would split a shared value: {reason}")
                    continue
            if self.where is not None and not self.where(m):
                trace.fail(lambda: f"rule {self.name!r}: its where() rejected the match at {node.name!r}")
                continue
            return m
        return None

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.pattern!r})"


class RuleSet:
    """An ordered collection of rules, indexed by root op; `a + b` composes."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: list[Rule] = list(rules)
        self._by_op: dict[str, list[Rule]] = defaultdict(list)
        for rule in self.rules:
            for op in sorted(rule.root_ops):
                self._by_op[op].append(rule)

    def __add__(self, other: RuleSet | Iterable[Rule]) -> RuleSet:
        return RuleSet([*self.rules, *(other.rules if isinstance(other, RuleSet) else other)])

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def rules_for(self, node: Node) -> list[Rule]:
        return self._by_op.get(node.op_type, [])

    def apply_once(self, graph: Graph, reverse: bool = False) -> Counter:
        """One sweep over the graph in node order (or from the outputs back); how often each rule fired."""
        fired: Counter = Counter()
        nodes = graph.nodes
        for node in reversed(nodes) if reverse else nodes:
            for rule in self.rules_for(node):
                if node.graph is not graph:
                    break
                if rule.quick_reject(node):
                    continue
                m = rule.match(graph, node)
                if m is not None and _apply(graph, m):
                    fired[rule.name] += 1
        return fired

    def apply(self, graph: Graph, max_rounds: int = 32, reverse: bool = False) -> Counter:
        """Sweep until no rule fires; returns the total count per rule.

        reverse=True visits consumers before producers, so a rule rooted late
        in a chain claims it before a smaller rule rooted inside it.
        """
        total: Counter = Counter()
        for _ in range(max_rounds):
            fired = self.apply_once(graph, reverse)
            if not fired:
                return total
            total += fired
        names = ", ".join(f"{name} ({n} times in the last sweep)" for name, n in fired.most_common())
        raise RuleLoopError(f"rewrites did not converge after {max_rounds} sweeps; still firing: {names}. "
                            "A rule's replacement must not match its own pattern again: add a where= guard")


def _apply(graph: Graph, m: Match) -> bool:
    result = m.rule.replace(m)
    if result is False:
        return False
    if result is not None and result is not True:
        new = list(result) if isinstance(result, (list, tuple)) else [result]
        if len(new) != len(m.root.outputs):
            raise ValueError(f"rule {m.rule.name!r} returned {len(new)} values for a root with "
                             f"{len(m.root.outputs)} outputs")
        for old, value in zip(m.root.outputs, new):
            if value is not None and value is not old:
                graph.replace_all_uses(old, value)
        remove_dead(graph, m.nodes)
    return True


def remove_dead(graph: Graph, nodes: Iterable[Node]) -> int:
    """Remove those of `nodes` (and then their now-dead producers among them) that nothing uses."""
    pending = [n for n in nodes if n.graph is graph]
    removed = 0
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if n.graph is graph and all(not v.uses and not v.is_graph_output for v in n.outputs):
                graph.remove(n)
                pending.remove(n)
                removed += 1
                changed = True
    return removed


def explain(graph: Graph, rule: Rule) -> str:
    """Why `rule` does not match: the node where it came closest and the part that failed there."""
    candidates = [n for n in graph if n.op_type in rule.root_ops and n.domain == rule.pattern.domain]
    if not candidates:
        present = sorted({n.op_type for n in graph})
        return (f"rule {rule.name!r} needs a root of type {'|'.join(sorted(rule.root_ops))}, and the graph has "
                f"none (it has: {', '.join(present[:20])})")
    best: tuple[int, Node, Trace] | None = None
    for node in candidates:
        trace = Trace(enabled=True)
        if rule.match(graph, node, trace) is not None:
            return f"rule {rule.name!r} matches at {node.op_type} {node.name!r}"
        if best is None or trace.best_depth > best[0]:
            best = (trace.best_depth, node, trace)
    depth, node, trace = best
    path = " -> ".join(f"{n.op_type} {n.name!r}" for n in trace.best_path) or f"{node.op_type} {node.name!r}"
    return (f"rule {rule.name!r} came closest at {node.op_type} {node.name!r}: matched {max(depth, 0)} of "
            f"{rule.pattern.size()} pattern nodes ({path}); then {trace.best_reason}")


__all__ = ["Match", "Rule", "RuleSet", "explain", "remove_dead", "Opt"]
