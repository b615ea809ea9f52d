"""The pattern language: patterns are data, matched against the values of a graph.

    x = Any("x")
    swish = P("Mul", x, P("Sigmoid", x))                  # the same name binds the same value
    conv_bn = P("BatchNormalization", P("Conv", Any("x"), Const("w"), name="conv"), Const(), Const(), Const(),
                Const(), name="bn")
    act = P({"Relu", "Clip"}, Opt(P("Add", P("Conv", name="conv"), Const("bias"))))

- `P(op, *inputs, name=, attrs=, where=, domain=)`: a node of type `op` (a name or a set
  of names) whose first inputs match `inputs` (further inputs are free; an
  empty `inputs` leaves all free). `attrs` maps an attribute to a required
  value or a predicate; `where(node)` is a last test. `Add`, `Mul`, `Max`,
  `Min` and `Equal` match their two inputs in either order.
- `Any(name)`: any value (or an omitted input); `Const(name, where=)`: a constant.
- `a | b`: either pattern, tried in order. `Opt(p)`: `p`, or else the value
  that p's first input would match (the node is skipped).
- `name=` captures: a node for `P`, a value for `Any`/`Const`. A name used
  twice must bind the same thing both times.

Matching yields every way a pattern fits (backtracking through commutative
orders and alternatives); `match_node` takes the first that also passes the
interior-use check: a matched node other than the root must have no users
outside the match, or a rewrite would change what they see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any as AnyType

from ..ir.graph import Node, Value
from ..ir.ops import COMMUTATIVE, LAYERS, attribute

Bindings = dict[str, AnyType]
NODES = "__nodes__"  # the bindings key under which a match lists every node it spans


class Pattern:
    """Base class: a pattern matches a Value (the output of a node, a constant, an input)."""

    name: str | None = None

    def match(self, value: Value | None, b: Bindings, trace: Trace) -> Iterator[Bindings]:
        raise NotImplementedError

    def __or__(self, other: Pattern) -> Pattern:
        return OneOf(self, other)

    def size(self) -> int:
        """How many op nodes the pattern spans at most (used to rank matches and closeness)."""
        return 0


def _bind(b: Bindings, name: str | None, obj: AnyType, trace: Trace, what: str) -> Bindings | None:
    if name is None:
        return b
    if name in b:
        if b[name] is not obj:
            trace.fail(lambda: f"{what} must be the same as capture {name!r}")
            return None
        return b
    return {**b, name: obj}


class Any(Pattern):
    """Any value, including an omitted optional input."""

    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, value, b, trace):
        nb = _bind(b, self.name, value, trace, f"value {value.name if value else None!r}")
        if nb is not None:
            yield nb

    def __repr__(self) -> str:
        return f"Any({self.name!r})" if self.name else "Any()"


class Const(Pattern):
    """A constant value (one with data), optionally with a predicate on its array."""

    def __init__(self, name: str | None = None, where: Callable[[AnyType], bool] | None = None):
        self.name, self.where = name, where

    def match(self, value, b, trace):
        if value is None or value.const is None:
            trace.fail(lambda: f"expected a constant, got {_describe(value)}")
            return
        if self.where is not None and not self.where(value.const):
            trace.fail(lambda: f"constant {value.name!r} fails its predicate")
            return
        nb = _bind(b, self.name, value, trace, f"constant {value.name!r}")
        if nb is not None:
            yield nb

    def __repr__(self) -> str:
        return f"Const({self.name!r})" if self.name else "Const()"




class P(Pattern):
    """A node of a given op type (or set of types) whose inputs match sub-patterns."""

    def __init__(self, op: str | set[str] | frozenset[str] | tuple[str, ...], *inputs: Pattern,
                 name: str | None = None, attrs: dict[str, AnyType] | None = None,
                 where: Callable[[Node], bool] | None = None, domain: str = ""):
        self.ops = frozenset([op]) if isinstance(op, str) else frozenset(op)
        self.inputs = tuple(inputs)
        self.name, self.attrs, self.where, self.domain = name, dict(attrs or {}), where, domain
        self.commutative = len(self.inputs) == 2 and self.ops <= COMMUTATIVE

    def size(self) -> int:
        return 1 + sum(p.size() for p in self.inputs)

    def match(self, value, b, trace):
        node = value.producer if value is not None else None
        if node is None or node.op_type not in self.ops or node.domain != self.domain:
            trace.fail(lambda: f"expected {_ops_text(self.ops)}, got {_describe(value)}")
            return
        if value.index != 0 and len(node.outputs) > 1:
            trace.fail(lambda: f"expected output 0 of {node.name!r}, got output {value.index}")
            return
        yield from self.match_node(node, b, trace)

    def match_node(self, node: Node, b: Bindings, trace: Trace) -> Iterator[Bindings]:
        """Match this pattern rooted at `node` itself."""
        if node.op_type not in self.ops or node.domain != self.domain:
            trace.fail(lambda: f"expected {_ops_text(self.ops)}, got {node.op_type} ({node.name!r})")
            return
        for key, want in self.attrs.items():
            have = attribute(node, key)  # ONNX defaults from the op table apply
            ok = want(have) if callable(want) else have == want
            if not ok:
                trace.fail(lambda: f"{node.op_type} {node.name!r}: attribute {key}={have!r} does not satisfy {want!r}")
                return
        if self.where is not None and not self.where(node):
            trace.fail(lambda: f"{node.op_type} {node.name!r} fails its predicate")
            return
        nb = _bind(b, self.name, node, trace, f"node {node.name!r}")
        if nb is None:
            return
        nb = {**nb, NODES: (*nb.get(NODES, ()), node)}
        trace.progress(node)
        inputs = node.inputs
        if len(inputs) < len(self.inputs):  # inputs left off the end are omitted optional inputs
            inputs = inputs + (None,) * (len(self.inputs) - len(inputs))
        orders = [inputs[:2], inputs[1::-1]] if self.commutative else [inputs]
        for inputs in orders:
            yield from _match_inputs(self.inputs, inputs, nb, trace)
        trace.retreat(node)

    def __repr__(self) -> str:
        ins = ", ".join(map(repr, self.inputs))
        label = f", name={self.name!r}" if self.name else ""
        return f"P({_ops_text(self.ops)}{', ' if ins else ''}{ins}{label})"


def _match_inputs(patterns, values, b, trace) -> Iterator[Bindings]:
    if not patterns:
        yield b
        return
    for nb in patterns[0].match(values[0], b, trace):
        yield from _match_inputs(patterns[1:], values[1:], nb, trace)


class OneOf(Pattern):
    """The first alternative that matches (all of them, in order, when backtracking)."""

    def __init__(self, *options: Pattern):
        self.options = tuple(o for opt in options for o in (opt.options if isinstance(opt, OneOf) else (opt,)))

    def size(self) -> int:
        return max(o.size() for o in self.options)

    def match(self, value, b, trace):
        for option in self.options:
            yield from option.match(value, b, trace)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.options))


class Opt(Pattern):
    """An optional node: matches `pattern`, or else skips it and matches its first input's pattern."""

    def __init__(self, pattern: P):
        if not isinstance(pattern, P) or not pattern.inputs:
            raise TypeError("Opt takes a P(...) with at least one input pattern")
        self.pattern = pattern

    def size(self) -> int:
        return self.pattern.size()

    def match(self, value, b, trace):
        yield from self.pattern.match(value, b, trace)
        yield from self.pattern.inputs[0].match(value, b, trace)

    def __repr__(self) -> str:
        return f"Opt({self.pattern!r})"


def _ops_text(ops: frozenset[str]) -> str:
    return next(iter(ops)) if len(ops) == 1 else "{" + "|".join(sorted(ops)) + "}"


def _describe(value: Value | None) -> str:
    if value is None:
        return "an omitted input"
    if value.const is not None:
        return f"constant {value.name!r}"
    if value.producer is None:
        return f"graph input {value.name!r}"
    return f"{value.producer.op_type} ({value.producer.name!r})"


class Trace:
    """Records how far a match got and why it stopped (for `explain`); a no-op when disabled."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.depth = 0
        self.best_depth = -1
        self.best_reason = ""
        self.path: list[Node] = []
        self.best_path: list[Node] = []

    def progress(self, node: Node) -> None:
        if self.enabled:
            self.depth += 1
            self.path.append(node)

    def retreat(self, node: Node) -> None:
        if self.enabled:
            self.depth -= 1
            self.path.pop()

    def fail(self, reason) -> None:
        """Record why matching stopped; `reason` is a string or a function giving one (built only if enabled)."""
        if self.enabled and self.depth > self.best_depth:
            text = reason() if callable(reason) else reason
            self.best_depth, self.best_reason, self.best_path = self.depth, text, list(self.path)


NO_TRACE = Trace(False)


def interior_ok(root: Node, nodes: list[Node]) -> str | None:
    """None if every matched node but the root is used only inside the match, else the reason."""
    inside = {id(n) for n in nodes}
    for n in nodes:
        if n is root:
            continue
        for v in n.outputs:
            if v.is_graph_output:
                return f"{n.op_type} {n.name!r} output {v.name!r} is a graph output"
            for user, _ in v.uses:
                if id(user) not in inside:
                    return f"{n.op_type} {n.name!r} is also used by {user.op_type} {user.name!r} outside the match"
    return None


def match_at(pattern: P, node: Node) -> Bindings | None:
    """The captures of `pattern` rooted at `node`, whose interior nothing outside the match reads, or None: for
    code that reads a pattern without rewriting the graph (a writer emitting a matched chain as one call)."""
    for bindings in pattern.match_node(node, {}, NO_TRACE):
        if interior_ok(node, list(bindings.get(NODES, ()))) is None:
            return bindings
    return None


def is_weighted(node: Node) -> bool:
    return node.op_type in LAYERS and not node.domain
