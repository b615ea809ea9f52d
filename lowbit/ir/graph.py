"""The graph IR: `Graph`, `Node` and `Value`, with true use-def chains.

A `Graph` holds its nodes in topological order (a doubly linked list, so
inserting or removing a node costs O(1)), its inputs, outputs and constants.
A `Value` is produced by exactly one node, or is a graph input, or is a
constant (it then holds a read-only numpy array). Every `Value` knows its
users, as `(node, input_index)` pairs.

Passes change a graph only through the mutation API here (`make_node`,
`insert_before`/`insert_after`, `set_input`, `replace_all_uses`, `remove`,
`add_constant`, ...), which keeps the chains true; `verify()` checks them.
Constant arrays are immutable: to change a weight, give the value a new array
(`value.const = new_array`) rather than writing into the old one.

Subgraphs (the `then_branch`/`else_branch` of an ONNX `If`, the `body` of a
`Loop` or `Scan`) stay onnx GraphProto attributes, but the outer values they
read by name (their captures, found recursively through nested subgraphs) are
tracked like inputs: `node.captures` lists them and each one lists the node
as a use at a negative port (`-1 - k` for capture k, so `node.input(port)` and
`node.set_input(port, v)` work for every use). A value only a subgraph reads
is therefore used, and rerouting it (`replace_all_uses`) renames what the
subgraph reads, in a copy of the GraphProto: the user's model is never
written to.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import GraphError
from .types import Shape, numpy_dtype_name


class Value:
    """An edge of the graph: a tensor with a name, dtype, shape and its users."""

    __slots__ = ("name", "dtype", "shape", "producer", "index", "_uses", "_const", "meta", "graph")

    def __init__(self, name: str, dtype: str | None = None, shape: Shape = None):
        self.name = name
        self.dtype = dtype
        self.shape = None if shape is None else tuple(shape)
        self.producer: Node | None = None
        self.index = 0
        self._uses: list[tuple[Node, int]] = []
        self._const: np.ndarray | None = None
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None

    # -- constants -----------------------------------------------------------
    @property
    def const(self) -> np.ndarray | None:
        """The value's data if it is a constant (read-only), else None."""
        return self._const

    @const.setter
    def const(self, array: np.ndarray) -> None:
        array = np.array(array, copy=True) if not isinstance(array, np.ndarray) or array.flags.writeable else array
        array.flags.writeable = False
        self._const = array
        self.dtype = numpy_dtype_name(array)
        self.shape = tuple(int(d) for d in array.shape)

    @property
    def is_const(self) -> bool:
        return self._const is not None

    # -- use-def -------------------------------------------------------------
    @property
    def uses(self) -> list[tuple[Node, int]]:
        """(node, input index) for every place this value is consumed."""
        return list(self._uses)

    @property
    def users(self) -> list[Node]:
        """The distinct nodes that consume this value, in use order."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    @property
    def is_graph_input(self) -> bool:
        return self.graph is not None and self in self.graph._input_set

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and any(v is self for v in self.graph.outputs)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {self.dtype}, {self.shape})"


class Node:
    """An operation: `op_type` in `domain` ("" is ONNX), inputs, outputs, attributes.

    `inputs` may contain None for an omitted optional input. `attrs` holds
    plain Python values (ints, floats, strings, lists, numpy arrays). `meta`
    carries facts that are not semantics (origin op, source location, ...).
    """

    __slots__ = ("op_type", "domain", "name", "_inputs", "outputs", "attrs", "meta", "graph", "_prev", "_next",
                 "_captures", "_capture_names")

    def __init__(self, op_type: str, inputs: Sequence[Value | None], outputs: Sequence[Value],
                 attrs: dict[str, Any] | None = None, name: str = "", domain: str = "",
                 meta: dict[str, Any] | None = None, captures: Sequence[Value] | None = None):
        self.op_type = op_type
        self.domain = domain
        self.name = name
        self._inputs: list[Value | None] = list(inputs)
        self.outputs: list[Value] = list(outputs)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self.graph: Graph | None = None
        self._prev: Node | None = None
        self._next: Node | None = None
        # the outer values the subgraph attributes read, and the names they read them by; None: not resolved
        # yet (the graph resolves them by name when the node is attached)
        self._captures: list[Value | None] | None = None if captures is None else list(captures)
        self._capture_names: list[str] = [] if captures is None else [v.name for v in captures]
        if captures is None and not any(True for _ in self.subgraphs()):
            self._captures = []
        for i, v in enumerate(self.outputs):
            if v.producer is not None:
                raise GraphError(f"value {v.name!r} is already produced by node {v.producer.name!r}")
            v.producer, v.index = self, i

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self.outputs) != 1:
            raise GraphError(f"node {self.name!r} ({self.op_type}) has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    def input(self, i: int) -> Value | None:
        """Input `i`; a negative port `-1 - k` is capture k (see `captures`)."""
        if i < 0:
            k = -1 - i
            return self._captures[k] if self._captures and k < len(self._captures) else None
        return self._inputs[i] if i < len(self._inputs) else None

    # -- subgraphs -----------------------------------------------------------
    def subgraphs(self) -> Iterator[tuple[str, Any]]:
        """(attribute name, GraphProto) for every subgraph attribute (If branches, Loop/Scan bodies)."""
        for key, value in self.attrs.items():
            if _is_graph_proto(value):
                yield key, value
            elif isinstance(value, (list, tuple)) and value and all(_is_graph_proto(g) for g in value):
                for g in value:
                    yield key, g

    @property
    def captures(self) -> tuple[Value, ...]:
        """The outer-scope values this node's subgraphs read (each a use of the value at port -1 - k)."""
        return tuple(v for v in self._captures or () if v is not None)

    @property
    def capture_ports(self) -> list[tuple[int, Value]]:
        """(port, value) for every capture: the ports a use of a captured value names."""
        return [(-1 - k, v) for k, v in enumerate(self._captures or ()) if v is not None]

    def set_input(self, i: int, value: Value | None) -> None:
        """Point input `i` (or with a negative port, a capture) at `value`, keeping both use lists true."""
        if i < 0:
            self._set_capture(-1 - i, value)
            return
        old = self._inputs[i]
        if old is value:
            return
        if old is not None and self.graph is not None:
            old._uses.remove((self, i))
        self._inputs[i] = value
        if value is not None and self.graph is not None:
            value._uses.append((self, i))

    def _set_capture(self, k: int, value: Value | None) -> None:
        captures = self._captures or []
        if k >= len(captures) or captures[k] is None:
            raise GraphError(f"node {self.name!r} ({self.op_type}) has no capture {k}")
        old = captures[k]
        if old is value:
            return
        if value is None:
            raise GraphError(f"cannot drop capture {old.name!r} of node {self.name!r} ({self.op_type}): "
                             "its subgraph reads it; give it another value instead")
        if self.graph is not None:
            old._uses.remove((self, -1 - k))
        inner = self._capture_names[k]
        twin = next((j for j, v in enumerate(captures) if v is value), None)
        if inner != value.name:
            self.attrs = _renamed_attrs(self, {inner: value.name})
            for j, name in enumerate(self._capture_names):
                if name == inner:
                    self._capture_names[j] = value.name
        if twin is not None:  # the subgraph now reads `value` by one name: one capture, the other is dropped
            captures[k] = None
            return
        captures[k] = value
        self._capture_names[k] = value.name
        if self.graph is not None:
            value._uses.append((self, -1 - k))

    def sync_captures(self) -> None:
        """Rename what the subgraphs read where a captured value was renamed since (`value.name = ...`)."""
        mapping = {inner: v.name for inner, v in zip(self._capture_names, self._captures or ())
                   if v is not None and inner != v.name}
        if mapping:
            self.attrs = _renamed_attrs(self, mapping)
            self._capture_names = [mapping.get(n, n) for n in self._capture_names]

    def append_input(self, value: Value | None) -> None:
        self._inputs.append(None)
        self.set_input(len(self._inputs) - 1, value)

    @property
    def predecessors(self) -> list[Node]:
        return list(dict.fromkeys(v.producer for v in [*self._inputs, *self.captures]
                                  if v is not None and v.producer is not None))

    @property
    def successors(self) -> list[Node]:
        return list(dict.fromkeys(n for v in self.outputs for n, _ in v._uses))

    def __repr__(self) -> str:
        ins = ", ".join("_" if v is None else v.name for v in self._inputs)
        return f"Node({self.name!r}: {self.qualified_op}({ins}) -> {[v.name for v in self.outputs]})"


class Graph:
    """A dataflow graph in topological order, with inputs, outputs and constants."""

    def __init__(self, name: str = "graph", opset_imports: dict[str, int] | None = None):
        self.name = name
        self.opset_imports: dict[str, int] = dict(opset_imports or {"": 21})
        self.inputs: list[Value] = []
        self._input_set: set[Value] = set()
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        self._names: set[str] = set()  # value names
        self._node_names: set[str] = set()
        self._counters: dict[str, int] = {}

    # -- reading -------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        node = self._head
        while node is not None:
            nxt = node._next
            yield node
            node = nxt

    @property
    def nodes(self) -> list[Node]:
        """The nodes in topological order (a snapshot: safe to mutate while iterating)."""
        return list(self)

    def __len__(self) -> int:
        return self._count

    def values(self) -> Iterator[Value]:
        """Every value: inputs, constants, then node outputs in order."""
        yield from self.inputs
        yield from self.constants.values()
        for node in self:
            yield from node.outputs

    def find_node(self, name: str) -> Node | None:
        return next((n for n in self if n.name == name), None)

    def find_value(self, name: str) -> Value | None:
        return next((v for v in self.values() if v.name == name), None)

    # -- names ---------------------------------------------------------------
    def unique_name(self, hint: str, *, node: bool = False) -> str:
        """A value name (or with node=True, a node name) not used yet in this graph, based on `hint`."""
        taken = self._node_names if node else self._names
        hint = hint or ("n" if node else "v")
        name = hint
        while name in taken:
            self._counters[hint] = self._counters.get(hint, 0) + 1
            name = f"{hint}_{self._counters[hint]}"
        taken.add(name)
        return name

    def _claim(self, name: str) -> str:
        self._names.add(name)
        return name

    # -- building ------------------------------------------------------------
    def add_input(self, name: str, dtype: str | None, shape: Shape) -> Value:
        value = Value(self._claim(name), dtype, shape)
        value.graph = self
        self.inputs.append(value)
        self._input_set.add(value)
        return value

    def add_constant(self, name: str, array: Any, *, unique: bool = True) -> Value:
        """A new constant holding `array` (copied unless it is already read-only)."""
        name = self.unique_name(name) if unique else self._claim(name)
        value = Value(name)
        value.const = np.asarray(array) if isinstance(array, np.ndarray) else np.array(array)
        value.graph = self
        self.constants[name] = value
        return value

    def make_node(self, op_type: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None, *,
                  num_outputs: int = 1, outputs: Sequence[Value] | None = None, name: str | None = None,
                  domain: str = "", output_names: Sequence[str] | None = None,
                  before: Node | None = None, after: Node | None = None,
                  meta: dict[str, Any] | None = None) -> Node:
        """Create a node and insert it: at the end, or `before`/`after` a given node."""
        name = self.unique_name(name or op_type.lower(), node=True)
        if outputs is None:
            names = output_names or ([name] if num_outputs == 1 else [f"{name}_{i}" for i in range(num_outputs)])
            outputs = [Value(self.unique_name(n)) for n in names]
        node = Node(op_type, inputs, outputs, attrs, name=name, domain=domain, meta=meta)
        infer_node(node)
        if before is not None:
            self.insert_before(before, node)
        elif after is not None:
            self.insert_after(after, node)
        else:
            self.append(node)
        return node

    def _attach(self, node: Node) -> None:
        if node.graph is not None:
            raise GraphError(f"node {node.name!r} is already in a graph")
        if node._captures is None:
            self._resolve_captures(node)
        node.graph = self
        self._node_names.add(node.name)
        for i, v in enumerate(node._inputs):
            if v is not None:
                v._uses.append((node, i))
        for port, v in node.capture_ports:
            v._uses.append((node, port))
        for _, sub in node.subgraphs():  # names a subgraph defines are taken: unique_name never reuses them
            self._names.update(subgraph_defined_names(sub))
        for v in node.outputs:
            v.graph = self
            self._names.add(v.name)
        self._count += 1

    def _resolve_captures(self, node: Node) -> None:
        """Bind the names `node`'s subgraphs read from outside to this graph's values of those names."""
        names = list(dict.fromkeys(n for _, sub in node.subgraphs() for n in subgraph_free_names(sub)))
        by_name = {v.name: v for v in self.values()} if names else {}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise GraphError(f"a subgraph of node {node.name!r} ({node.op_type}) reads {missing[0]!r}, "
                             f"which graph {self.name!r} does not define")
        node._captures = [by_name[n] for n in names]
        node._capture_names = list(names)

    def append(self, node: Node) -> Node:
        self._attach(node)
        node._prev, node._next = self._tail, None
        if self._tail is None:
            self._head = node
        else:
            self._tail._next = node
        self._tail = node
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        self._check_member(anchor)
        self._attach(node)
        node._prev, node._next = anchor._prev, anchor
        if anchor._prev is None:
            self._head = node
        else:
            anchor._prev._next = node
        anchor._prev = node
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        self._check_member(anchor)
        if anchor._next is None:
            return self.append(node)
        return self.insert_before(anchor._next, node)

    def _check_member(self, node: Node) -> None:
        if node.graph is not self:
            raise GraphError(f"node {node.name!r} is not in graph {self.name!r}")

    # -- rewriting -----------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value, *, outputs: bool = True) -> None:
        """Make every consumer of `old` consume `new` (and the graph outputs, unless outputs=False).

        A graph output keeps its name, since users fetch outputs by name: `new`
        takes it over (an Identity carries it when `new` is an input, a
        constant or another output).
        """
        for node, i in list(old._uses):
            node.set_input(i, new)
        if not outputs or not any(v is old for v in self.outputs):
            return
        if new.producer is not None and new.graph is self and not new.is_graph_output:
            old.name, new.name = new.name, old.name
            for user in [*old.users, *new.users]:
                if user._captures:
                    user.sync_captures()
            carrier = new
        else:
            name = old.name
            old.name = self.unique_name(f"{name}_replaced")
            carrier = Value(name, new.dtype, new.shape)
            self.append(Node("Identity", [new], [carrier], name=self.unique_name(f"{name}_output", node=True)))
        self.outputs = [carrier if v is old else v for v in self.outputs]

    def remove(self, node: Node, *, safe: bool = True) -> None:
        """Unlink `node`. With safe=True its outputs must be unused and not graph outputs."""
        self._check_member(node)
        if safe:
            for v in node.outputs:
                if v._uses or v.is_graph_output:
                    users = ", ".join(n.name for n in v.users) or "the graph outputs"
                    raise GraphError(f"cannot remove node {node.name!r}: its output {v.name!r} is used by {users}")
        for i, v in enumerate(node._inputs):
            if v is not None:
                v._uses.remove((node, i))
        for port, v in node.capture_ports:
            v._uses.remove((node, port))
        if node._prev is None:
            self._head = node._next
        else:
            node._prev._next = node._next
        if node._next is None:
            self._tail = node._prev
        else:
            node._next._prev = node._prev
        node._prev = node._next = None
        node.graph = None
        self._count -= 1

    def remove_unused_constants(self) -> int:
        unused = [name for name, v in self.constants.items() if not v._uses and not v.is_graph_output]
        for name in unused:
            del self.constants[name]
        return len(unused)

    def sort(self) -> None:
        """Restore topological order (stable: keeps the current order where it is already valid)."""
        order = _toposort(self)
        self._head = self._tail = None
        prev = None
        for node in order:
            node._prev, node._next = prev, None
            if prev is None:
                self._head = node
            else:
                prev._next = node
            prev = node
        self._tail = prev

    # -- checking ------------------------------------------------------------
    def verify(self) -> None:
        """Raise GraphError naming the first broken fact: use-def chains, order, names, and recorded dtypes and
        shapes that contradict what a node's inputs give (infer.stale_type)."""
        defined: set[int] = set()
        names: dict[str, str] = {}

        def define(v: Value, where: str) -> None:
            if v.name in names:
                raise GraphError(f"value name {v.name!r} is defined twice ({names[v.name]} and {where})")
            names[v.name] = where
            defined.add(id(v))

        for v in self.inputs:
            define(v, "graph input")
        for name, v in self.constants.items():
            if v.const is None or v.name != name:
                raise GraphError(f"constant {name!r} has no data or a mismatched name {v.name!r}")
            define(v, "constant")
        count = 0
        for node in self:
            count += 1
            if node.graph is not self:
                raise GraphError(f"node {node.name!r} is linked into graph {self.name!r} but does not belong to it")
            for i, v in enumerate(node._inputs):
                if v is None:
                    continue
                if id(v) not in defined:
                    later = v.producer is not None and v.producer.graph is self
                    where = "a later node" if later else "nowhere in this graph"
                    raise GraphError(f"node {node.name!r} ({node.op_type}) input {i} {v.name!r} is defined by {where}")
                if (node, i) not in v._uses:
                    raise GraphError(f"value {v.name!r} does not list node {node.name!r} input {i} as a use")
            for port, v in node.capture_ports:
                if id(v) not in defined:
                    raise GraphError(f"a subgraph of node {node.name!r} ({node.op_type}) reads {v.name!r}, which is "
                                     "defined by a later node or nowhere in this graph")
                if (node, port) not in v._uses:
                    raise GraphError(f"value {v.name!r} does not list node {node.name!r} (a subgraph's capture) "
                                     "as a use")
            if node._captures is not None:
                read = {n for _, sub in node.subgraphs() for n in subgraph_free_names(sub)}
                held = {name for name, v in zip(node._capture_names, node._captures) if v is not None}
                if read != held:
                    raise GraphError(f"the subgraphs of node {node.name!r} ({node.op_type}) read "
                                     f"{sorted(read)} from outside, but the node captures {sorted(held)}")
            for i, v in enumerate(node.outputs):
                if v.producer is not node or v.index != i:
                    raise GraphError(f"node {node.name!r} output {i} {v.name!r} does not name the node as its producer")
                define(v, f"node {node.name!r}")
        if count != self._count:
            raise GraphError(f"graph {self.name!r} counts {self._count} nodes but links {count}")
        for v in self.values():
            if len(set(v._uses)) != len(v._uses):
                dup = next(u for u in v._uses if v._uses.count(u) > 1)
                raise GraphError(f"value {v.name!r} lists node {dup[0].name!r} input {dup[1]} as a use twice")
            for user, i in v._uses:
                if user.graph is not self or user.input(i) is not v:
                    raise GraphError(f"value {v.name!r} lists a stale use by node {user.name!r} input {i}")
        for v in self.outputs:
            if id(v) not in defined:
                raise GraphError(f"graph output {v.name!r} is not defined in the graph")
        for node in self:
            stale = stale_type(node)
            if stale is not None:
                raise GraphError(f"node {node.name!r} ({node.op_type}) output {node.outputs[0].name!r} records "
                                 f"{stale}: a pass changed its inputs without updating it "
                                 "(lowbit.ir.infer.reinfer(graph) re-derives them)")

    # -- copying -------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> Graph:
        """copy.deepcopy is `copy()`: the default walk recurses value -> producer -> inputs -> ... through the whole
        graph and overflows Python's stack on a ResNet18 (copy.deepcopy of a module lowbit returned failed)."""
        new = self.copy()
        memo[id(self)] = new
        return new

    def copy(self) -> Graph:
        """A structural deep copy; constant arrays (immutable) are shared."""
        new = Graph(self.name, self.opset_imports)
        # torch's pytree specs (the "out_spec" of a torch-origin graph) are immutable: shared, not copied
        # (deep-copying one also trips a torch FutureWarning)
        shared = {id(v): v for v in self.meta.values() if type(v).__module__.startswith("torch.utils._pytree")}
        new.meta = _copy.deepcopy(self.meta, shared)
        vmap: dict[int, Value] = {}

        def clone(v: Value) -> Value:
            c = Value(v.name, v.dtype, v.shape)
            c.meta = _copy.deepcopy(v.meta)
            c._const = v._const
            c.graph = new
            vmap[id(v)] = c
            return c

        for v in self.inputs:
            c = clone(v)
            new.inputs.append(c)
            new._input_set.add(c)
            new._names.add(c.name)
        new._counters = dict(self._counters)
        for name, v in self.constants.items():
            new.constants[name] = clone(v)
            new._names.add(name)
        for node in self:
            outs = [clone(v) for v in node.outputs]
            ins = [None if v is None else vmap[id(v)] for v in node._inputs]
            clone_node = Node(node.op_type, ins, outs, _copy.deepcopy(node.attrs), node.name, node.domain,
                              _copy.deepcopy(node.meta))
            if node._captures is not None and node._captures:
                clone_node._captures = [None if v is None else vmap[id(v)] for v in node._captures]
                clone_node._capture_names = list(node._capture_names)
            new.append(clone_node)
        new.outputs = [vmap[id(v)] for v in self.outputs]
        return new

    def __str__(self) -> str:
        from .text import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self.inputs)} inputs, {self._count} nodes, {len(self.outputs)} outputs>"


from .infer import infer_node, stale_type  # noqa: E402  (infer.py imports Node and Value from here)


def _toposort(graph: Graph) -> list[Node]:
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    indegree = {id(n): 0 for n in nodes}
    for n in nodes:
        indegree[id(n)] = len({id(p) for p in n.predecessors if id(p) in position})
    import heapq

    ready = [(position[id(n)], n) for n in nodes if indegree[id(n)] == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for s in n.successors:
            if id(s) in indegree:
                indegree[id(s)] -= 1
                if indegree[id(s)] == 0:
                    heapq.heappush(ready, (position[id(s)], s))
    if len(order) != len(nodes):
        stuck = next(n for n in nodes if indegree[id(n)] > 0)
        raise GraphError(f"graph {graph.name!r} has a cycle through node {stuck.name!r}")
    return order


# -- subgraph attributes (onnx GraphProto, read by duck typing: ir/ imports no framework here) ---------------

def _is_graph_proto(obj: Any) -> bool:
    return type(obj).__name__ == "GraphProto" and hasattr(obj, "node") and hasattr(obj, "initializer")


def _attr_graphs(attr: Any) -> list[Any]:
    """The GraphProtos an onnx AttributeProto holds (a GRAPH or GRAPHS attribute), else []."""
    graphs = list(attr.graphs)
    if attr.HasField("g"):
        graphs.insert(0, attr.g)
    return graphs


def _local_names(g: Any) -> set[str]:
    names = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    names |= {t.values.name for t in g.sparse_initializer}
    names |= {o for n in g.node for o in n.output if o}
    return names


def subgraph_free_names(g: Any) -> list[str]:
    """The names a GraphProto reads from its enclosing scopes, in first-read order (nested subgraphs included)."""
    defined = ({vi.name for vi in g.input} | {t.name for t in g.initializer}
               | {t.values.name for t in g.sparse_initializer})
    free: dict[str, None] = {}
    for n in g.node:
        for name in n.input:
            if name and name not in defined:
                free[name] = None
        for a in n.attribute:
            for sub in _attr_graphs(a):
                for name in subgraph_free_names(sub):
                    if name not in defined:
                        free[name] = None
        defined.update(o for o in n.output if o)
    for vi in g.output:
        if vi.name not in defined:
            free[vi.name] = None
    return list(free)


def subgraph_defined_names(g: Any) -> set[str]:
    """Every value name a GraphProto and its nested subgraphs define."""
    names = _local_names(g)
    for n in g.node:
        for a in n.attribute:
            for sub in _attr_graphs(a):
                names |= subgraph_defined_names(sub)
    return names


def _rename_free(g: Any, mapping: dict[str, str]) -> None:
    """Rename, in place, the names `g` reads from outside (a simultaneous mapping; shadowed names are kept)."""
    local = _local_names(g)
    clash = (set(mapping.values()) - set(mapping)) & subgraph_defined_names(g)
    if clash:
        raise GraphError(f"subgraph {g.name!r} defines {sorted(clash)[0]!r} itself, so it cannot read an outer "
                         "value of that name: rename that outer value")
    mapping = {k: v for k, v in mapping.items() if k not in local}
    if not mapping:
        return
    for n in g.node:
        for j, name in enumerate(n.input):
            if name in mapping:
                n.input[j] = mapping[name]
        for a in n.attribute:
            for sub in _attr_graphs(a):
                _rename_free(sub, mapping)
    for vi in [*g.output, *g.value_info]:
        if vi.name in mapping:
            vi.name = mapping[vi.name]


def _renamed_attrs(node: Node, mapping: dict[str, str]) -> dict[str, Any]:
    """`node.attrs` with its subgraphs reading outer values by new names (renamed copies; nothing is mutated)."""
    def renamed(g: Any) -> Any:
        copy = type(g)()
        copy.CopyFrom(g)
        _rename_free(copy, mapping)
        return copy

    attrs = dict(node.attrs)
    for key, value in node.attrs.items():
        if _is_graph_proto(value):
            attrs[key] = renamed(value)
        elif isinstance(value, (list, tuple)) and value and all(_is_graph_proto(g) for g in value):
            attrs[key] = [renamed(g) for g in value]
    return attrs


def renamed_attrs(node: Node) -> dict[str, Any]:
    """`node.attrs`, with subgraphs reading each captured value by its current name (nothing is mutated)."""
    mapping = {inner: v.name for inner, v in zip(node._capture_names, node._captures or ())
               if v is not None and inner != v.name}
    return _renamed_attrs(node, mapping) if mapping else node.attrs


def iter_values(nodes: Iterable[Node]) -> Iterator[Value]:
    for node in nodes:
        yield from node.outputs
