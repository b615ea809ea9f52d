"""Attention heads as channel groups: a head is pruned whole, from every projection that makes it and from the
projection that reads the heads back.

For each attention (an `Attention` node, scaled dot-product attention on
[batch, heads, tokens, head_dim] inputs, or the MatMul(q, kT) -> scale ->
mask -> Softmax -> MatMul(., v) an ONNX file holds) this follows each of query, key and value back
through Transpose, Gather and Reshape to the Reshape that split a projection's
output channels into factors ([..., 3, heads, head_dim] for a fused qkv
projection, [..., heads, head_dim] for separate ones), and the output forward
to the Reshape that merges heads and head_dim again and the projection that
reads it. Where every step fits, the heads form one group of `heads`
channels, each spanning `head_dim` consecutive entries of the projections'
weights (once per outer factor: q, k and v of a fused projection):

- members: the projections' weights and biases (their output channels) and
  the output projection's input channels;
- the shape constants of the Reshapes on the way (heads, and heads x
  head_dim where they merge) and the recorded shapes of the values between,
  which `shrink` rewrites with the number of heads kept.

Where a step does not fit (a value read outside the structure, a shape that is
not a constant), nothing is recorded, and the projections are ordinary layers
whose groups the Reshape blocks, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import (DIM_MOVERS, MATMULS, SCALES, SCORE_STEPS, attribute, transpose_perm, weight_in_axis,
                      weight_out_axis)

OUTER, HEAD, DIM = "outer", "head", "dim"


@dataclass
class HeadStructure:
    """One attention's heads: `heads` of `head_dim`, the projections (MatMul, bias Add or None, outer factor
    indices its value covers), the output projection, and what shrink rewrites."""

    attention: Node  # the Attention node, or the MatMul by the values of a decomposed attention
    heads: int
    head_dim: int
    outer: int
    projections: list[tuple[Node, Node | None]] = field(default_factory=list)
    out_projection: Node | None = None
    shape_entries: list[tuple[Node, int, int]] = field(default_factory=list)  # (Reshape, out dim, unit)
    split_sizes: list[tuple[Node, int]] = field(default_factory=list)  # (Split of a fused projection, unit)
    value_dims: list[tuple[Value, int, int]] = field(default_factory=list)  # (value, dim, unit)
    tables: list[tuple[Node, int, int]] = field(default_factory=list)  # (reader, port, axis) of a per-head term


def _const_index(node: Node) -> int | None:
    v = node.input(1) if len(node.inputs) > 1 else None
    if v is None or v.const is None or np.ndim(v.const) != 0:
        return None
    return int(v.const)


def _split(reshape: Node) -> list[int] | None:
    """The factors a Reshape splits its input's last axis into (the other dims kept), or None."""
    x, out = reshape.input(0), reshape.output
    if x.shape is None or out.shape is None or len(out.shape) <= len(x.shape):
        return None
    r = len(x.shape) - 1
    factors = list(out.shape[r:])
    if list(out.shape[:r]) != list(x.shape[:r]) or not all(isinstance(f, int) for f in factors + [x.shape[-1]]):
        return None
    return factors if int(np.prod(factors)) == x.shape[-1] else None


def _back(value: Value):
    """From an Attention input back to the projection output it is cut from: (projection output, split
    Reshape, factors, the nodes from the Reshape to the input each with the labels of its output's dims, the
    labels of the input's dims, outer digits chosen)."""
    chain = []
    v = value
    while True:
        node = v.producer
        if node is None or node.domain:
            return None
        if node.op_type == "Reshape":
            factors = _split(node)
            if factors is None:
                return None
            break
        if node.op_type not in DIM_MOVERS:
            return None
        chain.append(node)
        v = node.input(0)
    split = node
    rank_in = len(split.input(0).shape)
    labels: list = [("o", i) for i in range(rank_in - 1)] + [("f", k) for k in range(len(factors))]
    chosen: dict[int, int] = {}
    steps = []
    for n in reversed(chain):
        rank = len(labels)
        if n.op_type == "Transpose":
            labels = [labels[p] for p in transpose_perm(n, rank)]
        else:
            index, axis = _const_index(n), n.attrs.get("axis", 0) % rank
            if index is None or labels[axis][0] != "f":
                return None
            chosen[labels[axis][1]] = index % factors[labels[axis][1]]
            labels = labels[:axis] + labels[axis + 1:]
        steps.append((n, labels))
    return split.input(0), split, factors, steps, labels, chosen


def shape_entry(reshape: Node, dim: int) -> tuple[Node, int, int] | None:
    """Where output dim `dim` of a Reshape's target shape is held: (reading node, its input port, position in
    that constant); None unless a constant holds it (directly, or as a Concat input)."""
    shape = reshape.input(1)
    if shape.const is not None and shape.const.ndim == 1:
        return reshape, 1, dim
    concat = shape.producer
    if concat is None or concat.op_type != "Concat" or concat.domain:
        return None
    offset = 0
    for port, v in enumerate(concat.inputs):
        size = v.shape[0] if v is not None and v.shape is not None and len(v.shape) == 1 else None
        if not isinstance(size, int):
            return None
        if offset <= dim < offset + size:
            return (concat, port, dim - offset) if v.const is not None else None
        offset += size
    return None


@dataclass
class _Core:
    """The attention itself: query, key and value [batch, heads, tokens, head_dim], its output, and its nodes
    (one Attention, or MatMul(q, kT) -> scale -> mask -> Softmax -> MatMul(., v) as an ONNX file holds it)."""

    q: Value
    k: Value
    v: Value
    out: Value
    nodes: list[Node]


def find_heads(graph: Graph) -> tuple[list[HeadStructure], dict[str, str]]:
    """Every attention whose heads can be pruned whole; and, by name, the Reshapes that cut the heads of one
    whose scores get a term per head that cannot be followed to a constant to cut with them, each with why
    those heads stay."""
    found, kept = [], {}
    for node in graph:
        terms: list[Value] = []
        core = _core(node, terms)
        structure = _structure(core) if core is not None else None
        if structure is None:  # heads that stay for another reason, which the flows name
            continue
        untraced = [t for t in terms if not _per_head_table(t, structure)]
        if not untraced:
            found.append(structure)
            continue
        reason = (f"attention {node.name!r} adds a term per head ({untraced[0].name!r}) to its scores, which "
                  "lowbit cannot follow to a constant to cut: its heads stay")
        for v in (core.q, core.k, core.v):
            traced = _back(v)
            if traced is not None:
                kept[traced[1].name] = reason
    return found, kept


def _per_head_table(term: Value, structure: HeadStructure) -> bool:
    """Follow a term added to the scores per head ([..., heads, tokens, tokens], as Swin's relative position
    bias) back through Identity, Unsqueeze, Transpose, a Reshape that keeps the heads as its last dim, a Gather
    of other rows, and an Add of a term the same for every head (Swin's shifted-window mask), to the constant it
    is read from (a bias table [positions, heads]); record that constant's heads axis and the values and
    Reshapes on the way in `structure` (for shrink). False where it cannot be followed, or anything else reads
    the way."""
    head, v = len(term.shape) - 3, term
    dims, entries = [(term, head)], []
    while v.const is None:
        node = v.producer
        if node is None or node.domain or len(v.uses) != 1 or v.is_graph_output:
            return False
        port = _per_head_operand(node, v, head) if node.op_type == "Add" else 0
        x = node.input(port) if port is not None else None
        if x is None or x.shape is None:
            return False
        if node.op_type == "Add":  # broadcast: the per-head operand's dims are the output's last ones
            head -= len(v.shape) - len(x.shape)
        elif node.op_type == "Identity":
            pass
        elif node.op_type == "Unsqueeze":
            axes = node.input(1).const if len(node.inputs) > 1 and node.input(1) is not None else None
            if axes is None:
                return False
            axes = sorted(int(a) % len(v.shape) for a in np.ravel(axes))
            if head in axes:
                return False
            head -= sum(a < head for a in axes)
        elif node.op_type == "Transpose":
            head = transpose_perm(node, len(v.shape))[head]
        elif node.op_type == "Reshape":
            if head != len(v.shape) - 1 or x.shape[-1] != v.shape[-1] or shape_entry(node, head) is None:
                return False
            entries.append((node, head, 1))
            head = len(x.shape) - 1
        elif node.op_type == "Gather":
            index, axis = node.input(1), node.attrs.get("axis", 0) % len(x.shape)
            if index is None or index.const is None or axis <= head < axis + index.const.ndim:
                return False
            head = head if head < axis else head - index.const.ndim + 1
        else:
            return False
        if x.shape[head] != structure.heads:
            return False
        reader, v = node, x
        dims.append((v, head))
    if len(v.uses) != 1 or v.is_graph_output or len(dims) < 2:
        return False
    structure.tables.append((reader, port, head))
    structure.shape_entries.extend(entries)
    structure.value_dims.extend((value, dim, 1) for value, dim in dims[:-1])
    return True


def _per_head_operand(add: Node, out: Value, head: int) -> int | None:
    """Which input of `add` carries the heads dim `head` of its output, the other being the same for every head
    (size 1 there, or broadcast from fewer dims); None unless exactly one does."""
    ports = []
    for port, u in enumerate(add.inputs):
        if u is None or u.shape is None:
            return None
        i = head - (len(out.shape) - len(u.shape))
        if i >= 0 and u.shape[i] != 1:
            ports.append(port)
    return ports[0] if len(ports) == 1 else None


def _heads_cut_with(terms, per_head_terms: list[Value] | None, optional: bool = False) -> bool:
    """Whether the masks or scales `terms` on an attention's scores leave its heads prunable: all of known shape
    (None entries skipped where `optional`), none with a dim per head, which would have to be cut too; where
    `per_head_terms` is a list, such terms are collected into it instead."""
    terms = [v for v in terms if v is not None or not optional]
    if any(v is None or v.shape is None for v in terms):
        return False
    per_head = [v for v in terms if len(v.shape) >= 3 and v.shape[-3] != 1]
    if per_head_terms is None:
        return not per_head
    per_head_terms.extend(per_head)
    return True


def _core(node: Node, per_head_terms: list[Value] | None = None) -> _Core | None:
    """The attention `node` ends (its Softmax or Attention), or None. A mask or scale on the scores with a dim
    per head makes it None, unless `per_head_terms` collects them."""
    if node.domain:
        return None
    if node.op_type == "Attention" and len(node.inputs) >= 3:
        if not _heads_cut_with(node.inputs[3:], per_head_terms, optional=True):
            return None
        return _Core(*node.inputs[:3], node.output, [node])
    if node.op_type != "Softmax" or node.output.shape is None or len(node.output.shape) != 4 \
            or node.attrs.get("axis", -1) % 4 != 3:
        return None
    nodes, scores = [node], node.input(0)
    while scores.producer is not None and scores.producer.op_type in SCORE_STEPS:
        step = scores.producer
        if step.op_type == "Where":
            rest, scores = [step.input(0), step.input(2)], step.input(1)
        else:
            computed = [v for v in step.inputs if v is not None and v.const is None]
            if step.op_type in SCALES and len(computed) != 1:
                return None
            scores = computed[0] if step.op_type != "Add" else step.input(0)
            rest = [v for v in step.inputs if v is not scores]
        if not _heads_cut_with(rest, per_head_terms):
            return None
        nodes.append(step)
    qk = scores.producer
    kt = qk.input(1).producer if qk is not None and qk.op_type == "MatMul" else None
    if kt is None or kt.op_type != "Transpose" or list(kt.attrs.get("perm", [])) != [0, 1, 3, 2]:
        return None
    users = node.output.users
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input(0) is not node.output:
        return None
    pv = users[0]
    return _Core(qk.input(0), kt.input(0), pv.input(1), pv.output, [qk, kt, *nodes, pv])


def _structure(core: _Core) -> HeadStructure | None:
    att = core.nodes[-1]
    traced = [_back(v) for v in (core.q, core.k, core.v)]
    if any(t is None for t in traced):
        return None
    inside: set[int] = {id(n) for n in core.nodes}
    outer_seen: dict[int, set[int]] = {}
    structure = None
    for p_out, split, factors, steps, labels, chosen in traced:
        if len(labels) != 4 or labels[1][0] != "f" or labels[3][0] != "f":
            return None
        head_k, dim_k = labels[1][1], labels[3][1]
        if dim_k != len(factors) - 1 or head_k != dim_k - 1 or set(chosen) != set(range(head_k)):
            return None  # heads and head_dim must be the last two factors; outer factors chosen by a Gather
        heads, head_dim = factors[head_k], factors[dim_k]
        outer = int(np.prod(factors[:head_k])) if head_k else 1
        if structure is None:
            structure = HeadStructure(att, heads, head_dim, outer)
        elif (structure.heads, structure.head_dim) != (heads, head_dim):
            return None
        digit = int(np.ravel_multi_index([chosen[k] for k in range(head_k)], factors[:head_k])) if head_k else 0
        source = _source(p_out)
        if source is None:
            return None
        total = source.parts * outer
        if structure.outer != total:
            if structure.projections:
                return None
            structure.outer = total
        projection = source.projection
        outer_seen.setdefault(id(projection[0]), set()).add(source.part * outer + digit)
        last = len(p_out.shape) - 1
        structure.value_dims.append((p_out, last, head_dim * outer))
        if projection not in structure.projections:
            structure.projections.append(projection)
            for value in [*source.values, projection[0].output]:
                structure.value_dims.append((value, len(value.shape) - 1, head_dim * total))
            for reshape in source.reshapes:
                if shape_entry(reshape, len(reshape.output.shape) - 1) is None:
                    return None
                structure.shape_entries.append((reshape, len(reshape.output.shape) - 1, head_dim * total))
            if source.split is not None:
                structure.split_sizes.append((source.split, head_dim * outer))
                inside.add(id(source.split))
            inside |= {id(n) for n in source.reshapes}
        entry = shape_entry(split, len(split.input(0).shape) - 1 + head_k)
        if entry is None:
            return None
        structure.shape_entries.append((split, len(split.input(0).shape) - 1 + head_k, 1))
        structure.value_dims.append((split.output, len(split.input(0).shape) - 1 + head_k, 1))
        inside |= {id(split)} | {id(n) for n, _ in steps} | {id(n) for n in projection if n is not None}
        for n, dims in steps:  # the dim holding the heads, after each Transpose and Gather
            structure.value_dims.append((n.output, dims.index(("f", head_k)), 1))
    if any(len(digits) != structure.outer for digits in outer_seen.values()):
        return None  # a fused projection whose q, k or v part goes elsewhere
    for n in core.nodes[:-1]:  # the scores between q @ kT and the Softmax: [batch, heads, ...]
        structure.value_dims.append((n.output, 1, 1))
    if not _forward(structure, core.out, inside):
        return None
    # every value inside is read only inside (a projection output used elsewhere would lose channels)
    for value, _, _ in structure.value_dims:
        if value.is_graph_output or any(id(u) not in inside for u, _ in value.uses):
            return None
    return structure


@dataclass
class _Source:
    """Where a query/key/value part comes from: the projection (MatMul or Gemm by a 2-D constant; its bias Add
    or None), which of `parts` equal parts of the projection's channels a Split gave it, and the values and
    Reshapes between whose channel counts shrink with the heads."""

    projection: tuple[Node, Node | None]
    part: int = 0
    parts: int = 1
    values: list[Value] = field(default_factory=list)  # last dim: parts x heads x head_dim (x outer)
    reshapes: list[Node] = field(default_factory=list)  # target's last entry, likewise
    split: Node | None = None


def _keeps_last_dim(reshape: Node) -> bool:
    x, out = reshape.input(0), reshape.output
    return (reshape.op_type == "Reshape" and not reshape.domain and x.shape is not None and out.shape is not None
            and isinstance(x.shape[-1], int) and out.shape[-1] == x.shape[-1])


def _source(p_out: Value) -> _Source | None:
    source = _Source((None, None))
    v = p_out
    node = v.producer
    if node is not None and node.op_type == "Split" and not node.domain:
        sizes = node.input(1).const if len(node.inputs) > 1 and node.input(1) is not None else None
        rank = len(node.input(0).shape) if node.input(0).shape is not None else None
        if rank is None or node.attrs.get("axis", 0) % rank != rank - 1 or sizes is None \
                or len(set(np.asarray(sizes).tolist())) != 1:
            return None
        source.part, source.parts, source.split = node.outputs.index(v), len(node.outputs), node
        v = node.input(0)
        source.values.append(v)
        node = v.producer
    while node is not None and _keeps_last_dim(node):  # GPT-2's [batch x tokens, channels] <-> [batch, tokens, ...]
        source.reshapes.append(node)
        v = node.input(0)
        source.values.append(v)
        node = v.producer
    add = None
    if node is not None and node.op_type == "Add" and not node.domain:
        consts = [x for x in node.inputs if x is not None and x.const is not None]
        others = [x for x in node.inputs if x is not None and x.const is None]
        if len(consts) != 1 or len(others) != 1 or consts[0].const.shape != (v.shape[-1],):
            return None
        add, node = node, others[0].producer
        source.values.append(node.output if node is not None else others[0])
    if node is None or node.domain or node.op_type not in MATMULS or attribute(node, "transA"):
        return None
    w = node.input(1)
    if w.const is None or w.const.ndim != 2 or w.const.shape[weight_out_axis(node) % 2] != v.shape[-1]:
        return None
    bias = node.input(2) if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None and (bias.const is None or bias.const.shape != (v.shape[-1],)):
        return None
    source.projection = (node, add)
    return source


def _forward(structure: HeadStructure, v: Value, inside: set[int]) -> bool:
    """From the attention's output to the Reshape merging heads and head_dim and the projection reading it."""
    head = 1
    structure.value_dims.append((v, head, 1))
    while True:
        users = v.users
        if len(users) != 1 or users[0].domain:
            return False
        node = users[0]
        inside.add(id(node))
        if node.op_type == "Identity":  # torch's .contiguous()
            v = node.output
            structure.value_dims.append((v, head, 1))
            continue
        if node.op_type == "Transpose":
            head = transpose_perm(node, len(v.shape)).index(head)
            v = node.output
            structure.value_dims.append((v, head, 1))
            continue
        if node.op_type != "Reshape" or node.output.shape is None or v.shape is None:
            return False
        out = node.output
        if list(out.shape) == list(v.shape):  # a Reshape to the same shape: its head entry follows the heads
            if shape_entry(node, head) is None:
                return False
            structure.shape_entries.append((node, head, 1))
            v = out
            structure.value_dims.append((v, head, 1))
            continue
        merged = len(v.shape) - 2
        if head != merged or len(out.shape) != len(v.shape) - 1 or list(out.shape[:merged]) != list(v.shape[:merged]):
            return False
        if shape_entry(node, merged) is None:
            return False
        structure.shape_entries.append((node, merged, structure.head_dim))
        structure.value_dims.append((out, merged, structure.head_dim))
        readers = out.users
        while len(readers) == 1 and _keeps_last_dim(readers[0]):  # back to [batch x tokens, channels] (GPT-2)
            reshape = readers[0]
            if shape_entry(reshape, len(reshape.output.shape) - 1) is None:
                return False
            structure.shape_entries.append((reshape, len(reshape.output.shape) - 1, structure.head_dim))
            structure.value_dims.append((reshape.output, len(reshape.output.shape) - 1, structure.head_dim))
            inside.add(id(reshape))
            out = reshape.output
            readers = out.users
        if len(readers) != 1 or readers[0].op_type not in MATMULS or readers[0].domain \
                or readers[0].input(0) is not out or attribute(readers[0], "transA"):
            return False
        w = readers[0].input(1)
        if w.const is None or w.const.ndim != 2 or \
                w.const.shape[weight_in_axis(readers[0]) % 2] != structure.heads * structure.head_dim:
            return False
        structure.out_projection = readers[0]
        inside.add(id(readers[0]))
        return True


def set_shape_entry(reshape: Node, dim: int, size: int) -> None:
    """Write `size` as output dim `dim` of a Reshape's constant target shape (a -1 is left to the runtime)."""
    reader, port, index = shape_entry(reshape, dim)
    value = reader.input(port)
    array = np.array(value.const).reshape(-1)
    if array[index] == -1:
        return
    array[index] = size
    array = array.reshape(np.shape(value.const))
    if len(value.uses) > 1:  # shared with another reader: this one gets its own
        reader.set_input(port, reader.graph.add_constant(f"{value.name}_pruned", array))
    else:
        value.const = array


def rewrite_shapes(structure: HeadStructure, kept: int) -> None:
    """After shrink: the Reshapes' shape constants, a Split's sizes and the values' recorded shapes for `kept`
    heads."""
    for reshape, dim, unit in dict.fromkeys(structure.shape_entries):
        set_shape_entry(reshape, dim, kept * unit)
    for split, unit in dict.fromkeys(structure.split_sizes):
        sizes = split.input(1)
        array = np.full_like(sizes.const, kept * unit)
        if len(sizes.uses) > 1:
            split.set_input(1, split.graph.add_constant(f"{sizes.name}_pruned", array))
        else:
            sizes.const = array
    for value, dim, unit in structure.value_dims:
        if value.shape is not None and isinstance(value.shape[dim], int):
            shape = list(value.shape)
            shape[dim] = kept * unit
            value.shape = tuple(shape)
