"""Constants a torch model computes with ops lowbit keeps opaque: computed once, by torch, at lowering.

BEiT (and Data2Vec-Vision) build their relative position index at forward time: arange, meshgrid, in-place
adds into `select` views, a copy into a slice of `zeros`. Those ops have no ONNX equivalent, and their writes
through views cannot be folded one node at a time, as cleanup folds (a write through a view changes its
base, which a later node reads). Where opaque ops read only constants, the region of constant computation
they belong to (what they read and what reads them) is written back to torch and run once, in program order,
as the model ran it; the values it hands to the rest of the graph become constants, and ONNX and OpenVINO can
take the model.

Parameters and buffers are not constants here (training or the user may change them), nor is the result of an
op that draws random numbers or reads uninitialized memory.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import MAX_FOLDED_ELEMENTS, NEVER_FOLDED, TORCH_DOMAIN, UNREPEATABLE_TORCH_OPS
from ..patterns import remove_dead

VARIABLE_KINDS = ("parameter", "buffer")


def fold_opaque_constants(graph: Graph) -> int:
    """Replace what opaque torch ops compute from constants alone by constants; returns how many values."""
    if not any(n.domain == TORCH_DOMAIN for n in graph):  # most models: nothing to look for
        return 0
    region = _constant_region(graph)
    part = _opaque_part(region)
    if not part:
        return 0
    inside = {id(n) for n in part}
    boundary = [v for n in part for v in n.outputs
                if v.is_graph_output or any(id(u) not in inside for u, _ in v.uses)]
    if not boundary or any(v.shape is None or any(not isinstance(d, int) for d in v.shape)
                           or int(np.prod(v.shape)) > MAX_FOLDED_ELEMENTS for v in boundary):
        return 0
    arrays = _run(graph, part, boundary)
    for v, array in zip(boundary, arrays):
        const = graph.add_constant(f"{v.name}_computed", array)
        const.dtype, const.shape = v.dtype, v.shape
        const.meta["torch_kind"] = "computed"  # from literals: a buffer of the module, not a weight
        graph.replace_all_uses(v, const)
    remove_dead(graph, part)
    graph.remove_unused_constants()
    return len(boundary)


def _constant_region(graph: Graph) -> list[Node]:
    """Every node, in order, whose inputs are constants (not parameters or buffers) or made by such nodes."""
    made: set[int] = set()
    region = []
    for node in graph:
        if next(node.subgraphs(), None) is not None or node.op_type in NEVER_FOLDED or _unrepeatable(node):
            continue
        if all(v is None or id(v) in made or (v.const is not None and v.meta.get("torch_kind") not in VARIABLE_KINDS)
               for v in node.inputs):
            region.append(node)
            made.update(id(o) for o in node.outputs)
    return region


def _unrepeatable(node: Node) -> bool:
    return node.domain == TORCH_DOMAIN and any(word in node.op_type for word in UNREPEATABLE_TORCH_OPS)


def _opaque_part(region: list[Node]) -> list[Node]:
    """The nodes of `region` joined to an opaque op by the values they read and make, in order. Joined through
    the values they share as well: an in-place op writes into what it reads (copy_ into a slice of zeros), and
    another reader of that base (a view of the zeros) must see the write, which no edge of the graph says."""
    parent = {id(n): id(n) for n in region}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    readers: dict[int, int] = {}  # id(value) -> a region node that reads or makes it
    for node in region:
        for v in [*node.inputs, *node.outputs]:
            if v is None:
                continue
            other = readers.setdefault(id(v), id(node))
            parent[find(other)] = find(id(node))
    joined = {find(id(n)) for n in region if n.domain == TORCH_DOMAIN}
    return [n for n in region if find(id(n)) in joined]


def _run(graph: Graph, part: list[Node], boundary: list[Value]) -> list[np.ndarray]:
    """Write `part` as a torch module with no inputs, run it, and give the `boundary` values it computes."""
    from ..backends import backend

    sub = Graph(f"{graph.name}_constants", graph.opset_imports)
    mapped: dict[int, Value] = {}
    for node in part:
        inputs = []
        for v in node.inputs:
            if v is not None and id(v) not in mapped:
                c = sub.add_constant(v.name, v.const)
                c.dtype, c.shape, c.meta = v.dtype, v.shape, dict(v.meta)
                mapped[id(v)] = c
            inputs.append(None if v is None else mapped[id(v)])
        copy = sub.make_node(node.op_type, inputs, dict(node.attrs), num_outputs=len(node.outputs), name=node.name,
                             domain=node.domain, meta=dict(node.meta))
        for old, new in zip(node.outputs, copy.outputs):
            new.dtype, new.shape = old.dtype, old.shape
            mapped[id(old)] = new
    sub.outputs.extend(mapped[id(v)] for v in boundary)
    results = backend("torch").build(sub)()
    results = results if isinstance(results, (list, tuple)) else [results]
    return [r.detach().cpu().numpy().copy() for r in results]
