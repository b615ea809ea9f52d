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

On the way back, ops that leave the heads dim as it is (a rotary embedding on
head_dim: q * cos + cat(-q2, q1) * sin, its cos and sin the same for every
head) are passed. Grouped-query attention (Llama, Qwen2, Mistral) repeats each
key/value head for n query heads (Unsqueeze, Expand, Reshape: attention head a
reads key/value head a // n): there a channel of the group is one key/value
head with its n query heads, so that every query head keeps its key and value.

Where a step does not fit (a value read outside the structure, a shape that is
not a constant), nothing is recorded, and the projections are ordinary layers
whose groups the Reshape blocks, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.infer import empty_concat_inputs, picked_dims, shape_entries
from ..ir.ops import (DIM_KEEPERS, DIM_MOVERS, const_axes, HEAD_TERM_JOINS, MATMULS, PROBABILITY_STEPS, SCALES,
                      SCORE_STEPS, attribute, nan_guard, split_sizes, transpose_perm, weight_in_axis,
                      weight_out_axis)

OUTER, HEAD, DIM = "outer", "head", "dim"


@dataclass
class HeadStructure:
    """One attention's heads: `heads` groups of `repeat` attention heads of `head_dim` (repeat > 1: grouped-query
    attention, a group is one key/value head), the projections (MatMul, bias Add or None) with the channels
    each gives a group (`widths`, by id of the MatMul), the output projection, and what shrink rewrites."""

    attention: Node  # the Attention node, or the MatMul by the values of a decomposed attention
    heads: int
    head_dim: int
    outer: int
    repeat: int = 1
    widths: dict[int, int] = field(default_factory=dict)  # id(projection MatMul) -> channels per group
    out_width: int = 0  # the output projection's input channels per group
    projections: list[tuple[Node, Node | None]] = field(default_factory=list)
    out_projection: Node | None = None
    shape_entries: list[tuple[Node, int, int]] = field(default_factory=list)  # (Reshape, out dim, unit)
    split_sizes: list[tuple[Node, int]] = field(default_factory=list)  # (Split of a fused projection, unit)
    value_dims: list[tuple[Value, int, int]] = field(default_factory=list)  # (value, dim, unit)
    tables: list[tuple[Node, int, int]] = field(default_factory=list)  # (reader, port, axis) of a per-head term
    # a per-head term's values that other attentions read too (T5 computes its position bias once for every
    # layer): (value, reader, port) of each read this attention's walk makes; and the attentions tied to this
    # one by them, whose heads must go together
    shared_reads: list[tuple[Value, Node, int]] = field(default_factory=list)
    tied: list = field(default_factory=list)


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


@dataclass
class _Path:
    """Query, key or value traced back from the attention to the Reshape that split a projection's output into
    heads: the projection output, the split, its factors; the Transposes and Gathers from the split on, each
    with the labels of its output's dims; the labels at the attention and the outer factors a Gather chose; the
    ops passed that keep the heads dim (a rotary embedding), each with the dim of its output holding the heads;
    and, for grouped-query attention, how many attention heads read each of its heads and the Unsqueeze,
    Expand and Reshape that repeat them."""

    p_out: Value
    split: Node
    factors: list[int]
    steps: list[tuple[Node, list]]
    labels: list
    chosen: dict[int, int]
    kept: list[tuple[Node, int]]
    repeat: int = 1
    repeat_nodes: list[Node] = field(default_factory=list)
    after_repeat: tuple[int, int] = (0, 0)  # how many of `steps` (the last) and of `kept` (the first) read it


def _back(value: Value) -> _Path | None:
    """From an Attention input ([batch, heads, tokens, head_dim]) back to the projection output it is cut from."""
    repeat, repeat_nodes, after_repeat = 1, [], (0, 0)
    chain, kept, v, head = [], [], value, 1
    while True:
        region = _kept_region(v, head)
        if region is None:
            return None
        v, nodes = region
        kept += nodes
        node = v.producer
        if node is None or node.domain:
            return None
        found = _repeat(v) if not repeat_nodes and head == 1 else None
        if found is not None:  # the keys repeated, then transposed and scaled (the default exporter's kT)
            v, repeat, repeat_nodes = found
            after_repeat = (len(chain), len(kept))
            continue
        if node.op_type == "Reshape":
            factors = _split(node)
            if factors is None:
                return None
            break
        if node.op_type not in DIM_MOVERS or node.input(0).shape is None:
            return None
        chain.append(node)
        if node.op_type == "Transpose":
            head = transpose_perm(node, len(v.shape))[head]
        elif head >= node.attrs.get("axis", 0) % len(node.input(0).shape):  # a Gather of one index drops its axis
            head += 1
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
    return _Path(split.input(0), split, factors, steps, labels, chosen, kept, repeat, repeat_nodes, after_repeat)


def _repeat(value: Value) -> tuple[Value, int, list[Node]] | None:
    """Grouped-query attention's repeat of the key/value heads (transformers' repeat_kv): an Unsqueeze of the dim
    after the heads, an Expand of it to n, a Reshape of (heads, n) into one dim, so that attention head a reads
    head a // n. (the value repeated, n, [Unsqueeze, Expand, Reshape]) or None."""
    merge = value.producer
    expand = merge.input(0).producer if merge is not None and merge.op_type == "Reshape" else None
    unsqueeze = expand.input(0).producer if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or any(n.domain for n in (merge, expand, unsqueeze)):
        return None
    x, wide = unsqueeze.input(0), expand.output
    if x.shape is None or wide.shape is None or value.shape is None or len(x.shape) != 4 or len(wide.shape) != 5:
        return None
    n, heads = wide.shape[2], x.shape[1]
    if const_axes(unsqueeze, 5) != [2] or not isinstance(n, int) \
            or not isinstance(heads, int) or list(wide.shape) != [*x.shape[:2], n, *x.shape[2:]] \
            or list(value.shape) != [x.shape[0], heads * n, *x.shape[2:]]:
        return None
    if shape_entry(expand, 1) is None or shape_entry(merge, 1) is None:
        return None
    return x, n, [unsqueeze, expand, merge]


def _kept_region(value: Value, head: int) -> tuple[Value, list[tuple[Node, int]]] | None:
    """Back from `value` (its heads at dim `head`) through ops that leave the heads dim as it is (DIM_KEEPERS: a
    rotary embedding) to the one value they start from: (that value, the nodes passed, each with `head`); None
    where they start from two values, or one of them mixes the heads (a Slice or Concat of the heads dim, an
    operand with another count of heads)."""
    if value.shape is None or not isinstance(value.shape[head], int):
        return None
    rank, heads = len(value.shape), value.shape[head]
    starts, nodes, todo, seen = {}, [], [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer
        if node is None or node.domain or node.op_type not in DIM_KEEPERS \
                or len(node.outputs) != 1 and node.op_type != "Split":
            starts[id(v)] = v
            continue
        operands = _head_operands(node, head, heads, rank)
        if not operands:
            return None
        nodes.append((node, head))
        todo.extend(operands)
    return (next(iter(starts.values())), nodes) if len(starts) == 1 else None


def _head_operands(node: Node, head: int, heads: int, rank: int) -> list[Value] | None:
    """The inputs of `node` that carry its output's heads (dim `head`, `heads` of them), or None where the node
    mixes them: a Slice, Concat or reduction along that dim, or an operand with neither the same heads nor one
    for all."""
    def carries(u: Value | None) -> bool:
        return u is not None and u.shape is not None and len(u.shape) == rank and u.shape[head] == heads

    if heads == 1 or any(o.shape is None or len(o.shape) != rank or o.shape[head] != heads for o in node.outputs):
        return None
    if node.op_type == "Slice":
        axes = const_axes(node, rank)
        if axes is None or head in axes:
            return None
        operands = [node.input(0)]
    elif node.op_type == "Split":  # of another dim (GPT-NeoX: q, k and v out of each head's channels)
        if node.attrs.get("axis", 0) % rank == head:
            return None
        operands = [node.input(0)]
    elif node.op_type == "Concat":  # an empty input adds nothing (transformers' empty key/value cache)
        if node.attrs.get("axis", 0) % rank == head:
            return None
        operands = [u for u, empty in zip(node.inputs, empty_concat_inputs(node)) if not empty]
    elif node.op_type.startswith("Reduce"):  # over other dims, keeping them (RMSNorm's mean of squares)
        axes = const_axes(node, rank)
        if axes is None or not node.attrs.get("keepdims", 1) or head in axes:
            return None
        operands = [node.input(0)]
    elif len(node.inputs) == 1:  # Neg, Sqrt, Reciprocal, Cast, Identity
        operands = [node.input(0)]
    else:  # element-wise with broadcasting: an operand without the heads dim is the same for every head
        operands = []
        for u in node.inputs:
            i = head - (rank - len(u.shape)) if u is not None and u.shape is not None else None
            if i is None:
                return None
            if i >= 0 and u.shape[i] != 1:
                operands.append(u)
    return operands if all(carries(u) for u in operands) else None


def shape_entry(reshape: Node, dim: int) -> tuple[Node, int, int] | None:
    """Where output dim `dim` of a Reshape's target shape is held: (reading node, its input port, position in
    that constant); None unless a constant holds it (directly, or as a Concat input)."""
    shape = reshape.input(1)
    if shape.const is not None and shape.const.ndim == 1:
        return reshape, 1, dim
    held = _concat_part(shape, dim)
    return held if held is not None and held[0].input(held[1]).const is not None else None


def _concat_part(v: Value, dim: int) -> tuple[Node, int, int] | None:
    """For a 1-D value a Concat makes (a target shape): (that Concat, the input port holding entry `dim`, the
    entry's position in that input); None where the parts' lengths are not known."""
    concat = v.producer
    if concat is None or concat.op_type != "Concat" or concat.domain:
        return None
    offset = 0
    for port, part in enumerate(concat.inputs):
        size = part.shape[0] if part is not None and part.shape is not None and len(part.shape) == 1 else None
        if not isinstance(size, int):
            return None
        if offset <= dim < offset + size:
            return concat, port, dim - offset
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
    k_transposed: bool = False  # k is kT, [batch, heads, head_dim, tokens] (no Transpose of k alone before q @ kT)


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
        untraced = [t for t in terms if not _per_head_table(t, structure, {id(n) for n in core.nodes})]
        if not untraced:
            found.append((structure, core))
            continue
        _keep_heads(kept, core, f"attention {node.name!r} adds a term per head ({untraced[0].name!r}) to its "
                                "scores, which lowbit cannot follow to a constant to cut: its heads stay")
    return _tie_shared_terms(found, kept), kept


def _keep_heads(kept: dict[str, str], core: _Core, reason: str) -> None:
    for v in (core.q, core.k, core.v):
        traced = _back(v)
        if traced is not None:
            kept[traced.split.name] = reason


def _tie_shared_terms(found: list[tuple[HeadStructure, _Core]], kept: dict[str, str]) -> list[HeadStructure]:
    """Tie the attentions whose per-head terms share values: where every read of such a value is one of their
    walks', their heads go together (the same heads of every layer); else they all stay, and so do the heads of
    every attention tied to them through another value (ties are transitive)."""
    reads: dict[int, tuple[Value, set, list]] = {}
    for structure, core in found:
        for value, reader, port in structure.shared_reads:
            entry = reads.setdefault(id(value), (value, set(), []))
            entry[1].add((id(reader), port))
            entry[2].append((structure, core))
    staying = {key for key, (value, traced, owners) in reads.items()
               if value.is_graph_output or {(id(u), p) for u, p in value.uses} != traced
               or len({s.heads for s, _ in owners}) != 1}
    dropped: set[int] = set()
    while staying:
        key = staying.pop()
        value, _, owners = reads[key]
        for structure, core in owners:
            if id(structure) in dropped:
                continue
            dropped.add(id(structure))
            _keep_heads(kept, core, f"attention {structure.attention.name!r} shares a term per head "
                                    f"({value.name!r}) with what lowbit cannot prune with it: its heads stay")
            staying |= {k for k, (_, _, others) in reads.items()
                        if k != key and any(s is structure for s, _ in others)}
    for value, _, owners in reads.values():
        if not any(id(s) in dropped for s, _ in owners):
            first = owners[0][0]
            first.tied.extend(s for s, _ in owners[1:] if s is not first and s not in first.tied)
    return [s for s, _ in found if id(s) not in dropped]


def _per_head_table(term: Value, structure: HeadStructure, core_ids: set[int]) -> bool:
    """Follow a term added to the scores per head ([..., heads, tokens, tokens], as Swin's relative position
    bias) back through Identity, Unsqueeze, Transpose, a Reshape that keeps the heads as its last dim, an Expand
    along other dims (MPNet's, to the batch), a Gather of other rows, a Slice or Concat along other dims and a
    Resize that keeps the heads (BEiT's table, interpolated, then joined to its class-token rows), and an Add or
    Where of a term the same for every head (Swin's shifted-window mask, T5's padding mask), to the constants it
    is read from (bias tables [positions, heads]); record each constant's heads axis and the values and
    Reshapes on the way in `structure` (for shrink). The term may be that constant itself (torch.onnx.export
    computes a bias from constant tables and sizes at export time). A computed value other attentions read too,
    or a torch parameter they read (one tensor trains), is recorded in `structure.shared_reads` (find_heads ties
    them or keeps their heads); another constant that other nodes read (an exporter stores equal tables once)
    ties nothing: each reader gets its own cut (shrink._cut). False where it cannot be followed."""
    if structure.repeat != 1:  # grouped-query attention with a table per attention head: not followed
        return False
    readers = [(u, p) for u, p in term.uses if id(u) in core_ids]
    if len(readers) != 1:
        return False
    walk = _TermWalk(structure.heads)
    if not walk.back(term, len(term.shape) - 3, *readers[0]):
        return False
    structure.shared_reads.extend(walk.shared)
    structure.tables.extend(walk.tables)
    structure.shape_entries.extend(walk.entries)
    structure.value_dims.extend((value, dim, 1) for value, dim in walk.dims)
    return True


@dataclass
class _TermWalk:
    """What `_per_head_table` finds on its way back from a per-head term: the constants with their heads axis
    (by reader and port), the computed values with theirs, the shape entries shrink rewrites, the shared reads."""

    heads: int
    tables: list = field(default_factory=list)
    dims: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    shared: list = field(default_factory=list)

    def back(self, v: Value, head: int, reader: Node, port: int) -> bool:
        """Follow `v` (heads on axis `head`), read by `reader` at `port`, to the constants it comes from."""
        if v.is_graph_output or v.shape is None or v.shape[head] != self.heads:
            return False
        if v.const is not None:
            if len(v.uses) > 1 and v.meta.get("torch_kind") == "parameter":
                self.shared.append((v, reader, port))
            self.tables.append((reader, port, head))
            return True
        if len([u for u, _ in v.uses if not _own_size_read(u, v)]) > 1:  # read by other attentions too:
            self.shared.append((v, reader, port))  # accounted for once every walk is done
        self.dims.append((v, head))
        node = v.producer
        if node is None or node.domain:
            return False
        inputs = self._inputs(node, v, head)
        return inputs is not None and all(x is not None and x.shape is not None and self.back(x, h, node, p)
                                          for p, x, h in inputs)

    def _inputs(self, node: Node, v: Value, head: int) -> list[tuple[int, Value, int]] | None:
        """The inputs of `node` (producing `v`) that carry its heads: (port, value, their heads axis)."""
        op, rank, x = node.op_type, len(v.shape), node.input(0)
        if op in HEAD_TERM_JOINS:  # broadcast: the per-head operand's dims are the output's last ones
            port = _per_head_operand(node, v, head)
            x = node.input(port) if port is not None and (op != "Where" or port > 0) else None
            return None if x is None or x.shape is None else [(port, x, head - (rank - len(x.shape)))]
        if x is None or x.shape is None:
            return None
        if op == "Identity":
            return [(0, x, head)]
        if op == "Unsqueeze":
            axes = const_axes(node, rank)
            return None if axes is None or head in axes else [(0, x, head - sum(a < head for a in axes))]
        if op == "Transpose":
            return [(0, x, transpose_perm(node, rank)[head])]
        if op == "Reshape":
            if head != rank - 1 or x.shape[-1] != v.shape[-1] or shape_entry(node, head) is None:
                return None
            self.entries.append((node, head, 1))
            return [(0, x, len(x.shape) - 1)]
        if op == "Expand":  # broadcast along other dims (MPNet's bias, expanded to the batch)
            target = shape_entries(node.input(1))
            if target is None or len(target) != rank or head < rank - len(x.shape) \
                    or target[head] not in (1, self.heads):
                return None
            if target[head] != 1:  # the target spells the heads out: shrink writes the kept count there
                if shape_entry(node, head) is None:
                    return None
                self.entries.append((node, head, 1))
            return [(0, x, head - (rank - len(x.shape)))]
        if op == "Gather":  # rows picked by any index (T5's relative position buckets)
            index, axis = node.input(1), node.attrs.get("axis", 0) % len(x.shape)
            if index is None or index.shape is None or axis <= head < axis + len(index.shape):
                return None
            return [(0, x, head if head < axis else head - len(index.shape) + 1)]
        if op == "Slice" or op == "Concat":  # along other dims (BEiT's table, its class-token rows apart, then joined)
            operands = _head_operands(node, head, self.heads, rank)
            return None if operands is None else [(p, u, head) for p, u in enumerate(node.inputs)
                                                  if any(u is o for o in operands)]
        if op == "Resize" and _resizes_other_dims(node, head):  # BEiT's table interpolated to the image size
            return [(0, x, head)]
        return None


def _own_size_read(node: Node, v: Value) -> bool:
    """`node` is a Shape of `v` read only into the output size of a Resize of `v` (see _resizes_other_dims)."""
    return node.op_type == "Shape" and not node.domain and node.input(0) is v and all(
        user.op_type == "Concat" and all(r.op_type == "Resize" and q == 3 and r.input(0) is v
                                         for r, q in user.output.uses)
        for user, _ in node.output.uses)


def _resizes_other_dims(resize: Node, head: int) -> bool:
    """A Resize that keeps dim `head` as it is: a scale of 1 there, or an output size read from the input's own
    Shape (torch's interpolate writes [Shape(x)[:2], spatial sizes])."""
    scales, sizes = resize.input(2), resize.input(3)
    if sizes is None:
        return scales is not None and scales.const is not None and np.size(scales.const) > head \
            and float(np.ravel(scales.const)[head]) == 1.0
    held = _concat_part(sizes, head)
    shape_op = held[0].input(held[1]).producer if held is not None else None
    return shape_op is not None and shape_op.op_type == "Shape" and shape_op.input(0) is resize.input(0) \
        and int(shape_op.attrs.get("start", 0)) == 0 and held[2] == head


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
    if qk is None or qk.op_type != "MatMul" or qk.domain:
        return None
    kt = qk.input(1).producer
    if kt is not None and (kt.op_type != "Transpose" or list(kt.attrs.get("perm", [])) != [0, 1, 3, 2]):
        kt = None  # kT made otherwise (torch.onnx.export: one Transpose [0, 2, 3, 1] from the split, then a scale)
    probabilities = node.output
    while True:
        guard = nan_guard(probabilities)  # torch.onnx.export's default exporter: Where(IsNaN(p), 0, p)
        if guard is not None:
            nodes += [guard.input(0).producer, guard]
            probabilities = guard.output
        elif len(probabilities.users) == 1 and probabilities.users[0].op_type in PROBABILITY_STEPS \
                and not probabilities.users[0].domain and len(probabilities.users[0].outputs) == 1:
            nodes.append(probabilities.users[0])
            probabilities = probabilities.users[0].output
        else:
            break
    users = probabilities.users
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input(0) is not probabilities:
        return None
    pv = users[0]
    if kt is None:
        return _Core(qk.input(0), qk.input(1), pv.input(1), pv.output, [qk, *nodes, pv], k_transposed=True)
    return _Core(qk.input(0), kt.input(0), pv.input(1), pv.output, [qk, kt, *nodes, pv])


def _structure(core: _Core) -> HeadStructure | None:
    paths = [_back(v) for v in (core.q, core.k, core.v)]
    if core.k_transposed and paths[1] is not None and len(paths[1].labels) == 4:  # kT's labels, as k's
        labels = paths[1].labels
        paths[1].labels = [labels[0], labels[1], labels[3], labels[2]]
    if any(p is None or len(p.labels) != 4 or p.labels[1][0] != "f" or p.labels[3][0] != "f" for p in paths):
        return None
    # the attention's heads: each path's, times its repeat (grouped-query attention repeats the key/value heads)
    attention_heads = {p.factors[p.labels[1][1]] * p.repeat for p in paths}
    repeat = max(p.repeat for p in paths)
    if len(attention_heads) != 1 or any(p.repeat not in (1, repeat) for p in paths):
        return None
    structure = HeadStructure(core.nodes[-1], attention_heads.pop() // repeat, 0, 0, repeat=repeat)
    inside: set[int] = {id(n) for n in core.nodes}
    outer_seen: dict[int, set[int]] = {}
    if not all(_add_path(structure, p, inside, outer_seen) for p in paths):
        return None
    if any(len(digits) != structure.outer for digits in outer_seen.values()):
        return None  # a fused projection whose q, k or v part goes elsewhere
    for n in core.nodes[:-1]:  # the scores between q @ kT and the Softmax: [batch, heads, ...]
        structure.value_dims.append((n.output, 1, repeat))
    if not _forward(structure, core.out, inside):
        return None
    # every value inside is read only inside (a projection output used elsewhere would lose channels)
    for value, dim, _ in structure.value_dims:
        if value.is_graph_output or any(id(u) not in inside and not _reads_sizes_but(u, dim) for u, _ in value.uses):
            return None
    return structure


def _reads_sizes_but(node: Node, dim: int) -> bool:
    """`node` is a Shape whose readers pick dims of its input other than `dim` (torch.onnx.export reads the batch
    size of a value it reshapes so): pruning the heads in `dim` changes nothing it gives."""
    if node.op_type != "Shape" or node.domain:
        return False
    picked = picked_dims(node)
    return picked is not None and all(dim not in dims for _, dims in picked)


def _add_path(structure: HeadStructure, path: _Path, inside: set[int], outer_seen: dict[int, set[int]]) -> bool:
    """Record query, key or value `path` in `structure`: its projection, the channels it gives each group, the
    shapes and values shrink rewrites; the nodes it passes go `inside`. False where it does not fit."""
    head_k, dim_k = path.labels[1][1], path.labels[3][1]
    factors = path.factors
    if dim_k != len(factors) - 1 or head_k != dim_k - 1 or set(path.chosen) != set(range(head_k)):
        return False  # heads and head_dim must be the last two factors; outer factors chosen by a Gather
    head_dim, outer = factors[dim_k], int(np.prod(factors[:head_k])) if head_k else 1
    per = factors[head_k] // structure.heads  # this path's heads per group: a query's repeat, else 1
    if structure.head_dim not in (0, head_dim):
        return False
    structure.head_dim = head_dim
    if not structure.outer:
        structure.outer = outer
    digit = int(np.ravel_multi_index([path.chosen[k] for k in range(head_k)], factors[:head_k])) if head_k else 0
    source = _source(path.p_out)
    if source is None:
        return False
    total = source.parts * outer
    if structure.outer != total:
        if structure.projections:
            return False
        structure.outer = total
    projection = source.projection
    outer_seen.setdefault(id(projection[0]), set()).add(source.part * outer + digit)
    width = head_dim * per
    if structure.widths.setdefault(id(projection[0]), width) != width:
        return False
    structure.value_dims.append((path.p_out, len(path.p_out.shape) - 1, width * outer))
    if projection not in structure.projections:
        structure.projections.append(projection)
        for value in [*source.values, projection[0].output]:
            structure.value_dims.append((value, len(value.shape) - 1, width * total))
        for reshape in source.reshapes:
            if shape_entry(reshape, len(reshape.output.shape) - 1) is None:
                return False
            structure.shape_entries.append((reshape, len(reshape.output.shape) - 1, width * total))
        if source.split is not None:
            structure.split_sizes.append((source.split, width * outer))
            inside.add(id(source.split))
        inside |= {id(n) for n in [*source.reshapes, source.scale] if n is not None}
    split, dim = path.split, len(path.split.input(0).shape) - 1 + head_k
    if shape_entry(split, dim) is None:
        return False
    structure.shape_entries.append((split, dim, per))
    structure.value_dims.append((split.output, dim, per))
    inside |= {id(split)} | {id(n) for n, _ in path.steps} | {id(n) for n in projection if n is not None}
    steps_after, kept_after = path.after_repeat  # what reads the repeated heads holds `repeat` times as many
    for i, (n, dims) in enumerate(path.steps):  # the dim holding the heads, after each Transpose and Gather
        unit = per * path.repeat if i >= len(path.steps) - steps_after else per
        structure.value_dims.append((n.output, dims.index(("f", head_k)), unit))
    for i, (n, head) in enumerate(path.kept):  # a rotary embedding's ops, the heads in dim `head`
        unit = per * path.repeat if i < kept_after else per
        structure.value_dims.extend((o, head, unit) for o in n.outputs)
        inside.add(id(n))
    if path.repeat_nodes:  # [batch, heads, 1 | n, ...] after the Unsqueeze and Expand, heads x n after the Reshape
        unsqueeze, expand, merge = path.repeat_nodes
        structure.value_dims += [(unsqueeze.output, 1, per), (expand.output, 1, per), (merge.output, 1, path.repeat)]
        structure.shape_entries += [(expand, 1, per), (merge, 1, path.repeat)]
        inside |= {id(n) for n in path.repeat_nodes}
    return True


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
    scale: Node | None = None  # a Mul or Div by one number after the projection


def _keeps_last_dim(reshape: Node) -> bool:
    x, out = reshape.input(0), reshape.output
    return (reshape.op_type == "Reshape" and not reshape.domain and x.shape is not None and out.shape is not None
            and isinstance(x.shape[-1], int) and out.shape[-1] == x.shape[-1])


def _source(p_out: Value) -> _Source | None:
    source = _Source((None, None))
    v = p_out
    node = v.producer
    if node is not None and node.op_type == "Split" and not node.domain:
        rank = len(node.input(0).shape) if node.input(0).shape is not None else None
        sizes = split_sizes(node, node.input(0).shape[-1]) if rank is not None else None
        if rank is None or node.attrs.get("axis", 0) % rank != rank - 1 or sizes is None or len(set(sizes)) != 1:
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
    if node is not None and node.op_type in SCALES and not node.domain and node.input(1) is not None \
            and node.input(1).const is not None and node.input(1).const.size == 1:  # OPT's q_proj(h) * scaling
        source.scale = node
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
    # per group: its attention heads, each as wide as a value head (GPT-NeoX splits q, k and v out of each head)
    head, repeat = 1, structure.repeat
    width = (v.shape[-1] if v.shape is not None and isinstance(v.shape[-1], int) else structure.head_dim) * repeat
    structure.out_width = width
    structure.value_dims.append((v, head, repeat))
    while True:
        users = [u for u in v.users if not _reads_sizes_but(u, head)]
        if len(users) != 1 or users[0].domain:
            return False
        node = users[0]
        inside.add(id(node))
        if node.op_type == "Identity":  # torch's .contiguous()
            v = node.output
            structure.value_dims.append((v, head, repeat))
            continue
        if node.op_type == "Transpose":
            head = transpose_perm(node, len(v.shape)).index(head)
            v = node.output
            structure.value_dims.append((v, head, repeat))
            continue
        if node.op_type != "Reshape" or node.output.shape is None or v.shape is None:
            return False
        out = node.output
        if list(out.shape) == list(v.shape):  # a Reshape to the same shape: its head entry follows the heads
            if shape_entry(node, head) is None:
                return False
            structure.shape_entries.append((node, head, repeat))
            v = out
            structure.value_dims.append((v, head, repeat))
            continue
        merged, last = len(v.shape) - 2, len(out.shape) - 1
        if head != merged or not _merges_last_two(v, out):
            return False
        if shape_entry(node, last) is None:
            return False
        structure.shape_entries.append((node, last, width))
        structure.value_dims.append((out, last, width))
        readers = out.users
        while len(readers) == 1 and _keeps_last_dim(readers[0]):  # back to [batch x tokens, channels] (GPT-2)
            reshape = readers[0]
            if shape_entry(reshape, len(reshape.output.shape) - 1) is None:
                return False
            structure.shape_entries.append((reshape, len(reshape.output.shape) - 1, width))
            structure.value_dims.append((reshape.output, len(reshape.output.shape) - 1, width))
            inside.add(id(reshape))
            out = reshape.output
            readers = out.users
        if len(readers) != 1 or readers[0].op_type not in MATMULS or readers[0].domain \
                or readers[0].input(0) is not out or attribute(readers[0], "transA"):
            return False
        w = readers[0].input(1)
        if w.const is None or w.const.ndim != 2 or \
                w.const.shape[weight_in_axis(readers[0]) % 2] != structure.heads * width:
            return False
        structure.out_projection = readers[0]
        inside.add(id(readers[0]))
        return True


def _merges_last_two(v: Value, out: Value) -> bool:
    """A Reshape of `v` into `out` makes v's last two dims (heads, head_dim) out's last, whatever it does to the
    dims before them: [b, t, h, d] -> [b, t, h x d], or at once [b, t, h, d] -> [b x t, h x d] (torch.onnx.export's
    default exporter, before GPT-2's Conv1D)."""
    if len(out.shape) == len(v.shape) - 1 and list(out.shape[:-1]) == list(v.shape[:-2]):
        return True
    h, d = v.shape[-2:]
    return isinstance(h, int) and isinstance(d, int) and out.shape[-1] == h * d


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
        if split.attrs.get("split") is None and (len(split.inputs) < 2 or split.input(1) is None):
            continue  # equal parts by `num_outputs` (or by default): they stay equal
        set_split_sizes(split, [kept * unit] * len(split.outputs))
    for value, dim, unit in structure.value_dims:
        if value.shape is not None and isinstance(value.shape[dim], int):
            shape = list(value.shape)
            shape[dim] = kept * unit
            value.shape = tuple(shape)


def set_split_sizes(split: Node, sizes) -> None:
    """Write a Split's part sizes in the form its opset takes: its `split` attribute before opset 13 (or where it
    has one), else a new constant sizes input (a Split of equal parts by `num_outputs` loses that attribute: the
    parts may differ now). Shrink removes the constant it read before, if nothing else reads it."""
    sizes = np.asarray(sizes, np.int64)
    if split.attrs.get("split") is not None or split.graph.opset_imports.get("", 21) < 13:
        split.attrs["split"] = sizes.tolist()
        return
    split.attrs.pop("num_outputs", None)
    if len(split.inputs) < 2:
        split.append_input(None)
    split.set_input(1, split.graph.add_constant(f"{split.name}_split_pruned", sizes))
