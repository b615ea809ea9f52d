"""In-place aten ops (`add_`, `relu_`, `hardtanh_`, ...) as their functional ops, where that is exact.

torch.export keeps the in-place ops a model calls (`x += y`, `nn.ReLU(inplace=True)`)
in the graph. `y.add_(b)` mutates `y` and returns it; the torch frontend lowers it as
the functional `add(y, b)` and from then on reads the result wherever the program
reads `y` (or any in-place result of `y`). That is exact when no other alias of
`y`'s storage, created before the mutation, is read after it: neither a view that
`y` is part of, nor a view of `y`, nor a parameter or buffer (the module's state).
Otherwise the op stays as it was (an opaque node that the torch writer calls in
place again). An input written in place (`x /= 255`) is lowered functionally
too: the outputs are the same, and the compiled model leaves the caller's
tensor as it was.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx


def functional_of(target: Any) -> Any:
    """aten.add_.Tensor -> aten.add.Tensor: the functional overload of an op that writes only its first
    argument; None for any other op (a functional op, an out= variant, an op with no functional twin)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.arguments:
        return None
    writes = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
    if not writes[0] or any(writes[1:]):
        return None
    ns, _, name = schema.name.partition("::")
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(getattr(torch.ops, ns, None), name[:-1], None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    if not isinstance(functional, torch._ops.OpOverload) or functional._schema.is_mutable:
        return None
    return functional


def is_inplace(node: fx.Node) -> bool:
    """True for a call of an op that writes its first argument in place."""
    return node.op == "call_function" and functional_of(node.target) is not None


def is_view(node: fx.Node) -> bool:
    """True for a node whose result may share storage with its first argument (view, reshape, select, ...)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True  # an element of a list of views (split, unbind); conservative for the rest
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


class InplaceTracker:
    """Decides which in-place calls of one fx graph may be lowered functionally."""

    def __init__(self, graph: fx.Graph, user_inputs: set[str] | frozenset = frozenset()):
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self.user_inputs = set(user_inputs)  # placeholders that are the caller's inputs (not weights, buffers)

    def chain(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that name the same tensor as `node`: its first non-in-place ancestor and every in-place
        result of it (`y`, `y.add_(1)`, `y.add_(1).relu_()`)."""
        while is_inplace(node) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        members, todo = [node], [node]
        while todo:
            current = todo.pop()
            for user in current.users:
                if is_inplace(user) and user.args and user.args[0] is current and user not in members:
                    members.append(user)
                    todo.append(user)
        return members

    def _storage(self, node: fx.Node) -> fx.Node:
        """The node whose storage `node` lives in (through views and in-place results)."""
        while (is_view(node) or is_inplace(node)) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    def _aliases(self, base: fx.Node) -> list[fx.Node]:
        """Every node that shares `base`'s storage: views and in-place results of it, transitively."""
        seen, todo = [base], [base]
        while todo:
            for user in todo.pop().users:
                if (is_view(user) or is_inplace(user)) and user.args and user.args[0] in seen and user not in seen:
                    seen.append(user)
                    todo.append(user)
        return seen

    def exact(self, node: fx.Node) -> bool:
        """True if lowering in-place `node` as its functional op and rebinding its first argument is exact."""
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node):
            return False
        base = self._storage(target)
        if base.op == "placeholder" and base.name not in self.user_inputs:
            return False  # a parameter, buffer or constant: the module's state, which the mutation changes
        if base.op not in ("call_function", "placeholder"):
            return False
        at = self.position[node]
        chain = set(self.chain(target))
        for alias in self._aliases(base):
            if alias in chain or self.position[alias] > at:
                continue
            if any(self.position[u] > at for u in alias.users):
                return False
        return True

