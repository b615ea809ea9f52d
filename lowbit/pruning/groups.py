"""Channel dependency groups over the IR: the channels that must be removed together.

A group is a set of channels tied one to one across the graph: the output
channels (filters) of one or more layers, several where a residual Add or a
squeeze-excite Mul joins their outputs, and every place those channels are
read: the next layers' input channels, BatchNormalization and LayerNorm
parameters, biases, depthwise convs (whose channels pass through), constant
per-channel operands. Channels are followed with the op table's channel flow
(`lowbit/ir/ops.py`):

- a Concat lays its inputs' channels side by side, so a reader of its output
  reads each group at an offset;
- a Flatten before a Gemm repeats each channel over the spatial size;
- a Transpose, Squeeze, Unsqueeze or Gather on another axis moves the channel
  axis.

What cannot be followed blocks the groups that reach it, with the reason: an
opaque op, a Reshape that mixes channels, a Split of the channel axis, a
graph output (its shape is kept), a MatMul of two activations (attention).
`channel_groups(graph)` does the analysis and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Graph, Node, Value
from .heads import HeadStructure, find_heads
from ..ir.ops import (REGROUPING, activation_axis, attribute, channel_flow, channel_params, weight_in_axis,
                      weight_out_axis)


@dataclass(frozen=True)
class Segment:
    """`length` consecutive channels of a value owned by one group (None: channels no group owns), each spanning
    `repeat` consecutive entries (after a Flatten of the spatial dims)."""

    group: int | None
    length: int
    repeat: int = 1


@dataclass(frozen=True)
class Layout:
    """Where a value's channels are: its axis, and the segments along it in order."""

    axis: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.length * s.repeat for s in self.segments)


@dataclass(frozen=True)
class Member:
    """A constant input of a node whose entries along `axis` follow `segments`: pruned where its groups are.

    role: "out" (a layer's filters), "in" (a layer's input channels), "scale" (a per-channel weight: BN and
    LayerNorm scale, a depthwise filter) or "param" (a bias, BN statistics, a constant operand).
    """

    node: Node
    port: int
    axis: int
    segments: tuple[Segment, ...]
    role: str

    @property
    def value(self) -> Value:
        return self.node.input(self.port)


@dataclass
class Group:
    """One group's channels: how many, the layers that produce them, every member, and why it cannot be pruned
    (None when it can)."""

    id: int
    size: int
    producers: list[Node] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    blocked: str | None = None

    @property
    def names(self) -> list[str]:
        """The producing layers by the names a user knows: the module path of their weight (`layer1.0.conv1`)
        where it has one, else the node name."""
        return [layer_path(n) or n.name for n in self.producers]


def layer_path(node: Node) -> str | None:
    """A layer's module path from its weight's parameter name (`layer1.0.conv1.weight` -> `layer1.0.conv1`;
    a Linear weight the IR holds transposed keeps its name in meta["torch_name"]), or None."""
    w = node.input(1) if len(node.inputs) > 1 else None
    name = (w.meta.get("torch_name") or w.name) if w is not None and w.const is not None else ""
    name = name.removesuffix(".T")  # written transposed by lowbit's ONNX writer
    return name.removesuffix(".weight") if name.endswith(".weight") else None


class ChannelGroups:
    """The groups of a graph (a union-find over channel sets) and each value's channel layout."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._parent: list[int] = []
        self._size: list[int] = []
        self._producers: list[list[Node]] = []
        self._blocked: dict[int, str] = {}
        self.members: list[Member] = []
        self.layouts: dict[int, tuple[Value, Layout]] = {}  # id(value) -> (value, layout)
        self.heads: list[tuple[int, HeadStructure]] = []  # (group, structure) of each prunable attention
        self.head_projections: set[int] = set()  # ids of the MatMuls that make heads (no channel group of their own)

    # -- union-find ------------------------------------------------------------------------------------------

    def new(self, size: int, producer: Node) -> int:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._producers.append([producer])
        return len(self._parent) - 1

    def find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self._size[a] != self._size[b]:  # cannot happen for aligned layouts; kept safe
            self.block_ids([a, b], "joins channel sets of different sizes")
            return
        self._parent[b] = a
        self._producers[a] += self._producers[b]
        if b in self._blocked:
            self._blocked.setdefault(a, self._blocked.pop(b))

    def block_ids(self, ids, reason: str) -> None:
        for g in ids:
            if g is not None:
                self._blocked.setdefault(self.find(g), reason)

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            self.block_ids([s.group for s in layout.segments], reason)

    # -- layouts ---------------------------------------------------------------------------------------------

    def layout(self, v: Value | None) -> Layout | None:
        entry = self.layouts.get(id(v)) if v is not None else None
        return entry[1] if entry is not None else None

    def set_layout(self, v: Value, layout: Layout | None) -> None:
        if layout is not None:
            self.layouts[id(v)] = (v, layout)

    def groups(self) -> list[Group]:
        """Every group, in the order its first layer appears, with its members and blocking reason."""
        by_root: dict[int, Group] = {}
        for g in range(len(self._parent)):
            root = self.find(g)
            if root not in by_root:
                by_root[root] = Group(root, self._size[root], list(self._producers[root]),
                                      blocked=self._blocked.get(root))
        for m in self.members:
            for root in {self.find(s.group) for s in m.segments if s.group is not None}:
                by_root[root].members.append(m)
        return list(by_root.values())


def channel_groups(graph: Graph, keep: set[str] = frozenset()) -> ChannelGroups:
    """The channel dependency groups of `graph`; the filters of layers named in `keep` are never pruned."""
    cg = ChannelGroups(graph)
    for structure in find_heads(graph):
        _add_heads(cg, structure, keep)
    for node in graph:
        _visit(cg, node, keep)
    for v in graph.outputs:
        cg.block(cg.layout(v), f"they reach the graph output {v.name!r}, whose shape is kept")
    for _, (v, layout) in list(cg.layouts.items()):
        if any(port < 0 for _, port in v.uses):
            cg.block(layout, f"a subgraph reads {v.name!r}")
    return cg


def _add_heads(cg: ChannelGroups, structure: HeadStructure, keep) -> None:
    """One group of an attention's heads (see heads.py): its projections' filters, per head, and the output
    projection's input channels."""
    projections = [mm for mm, _ in structure.projections]
    g = cg.new(structure.heads, projections[0])
    cg._producers[g] = list(projections)
    for mm, add in structure.projections:
        per_value = structure.outer if len(structure.projections) == 1 else 1
        segments = (Segment(g, structure.heads, structure.head_dim),) * per_value
        cg.members.append(Member(mm, 1, 1, segments, "out"))
        if add is not None:
            port = next(i for i, v in enumerate(add.inputs) if v is not None and v.const is not None)
            cg.members.append(Member(add, port, 0, segments, "param"))
        cg.head_projections.add(id(mm))
    out = structure.out_projection
    cg.members.append(Member(out, 1, 0, (Segment(g, structure.heads, structure.head_dim),), "in"))
    cg.heads.append((g, structure))
    excluded = [n.name for n in [*projections, out] if n.name in keep]
    if excluded:
        cg.block_ids([g], f"the attention projection {excluded[0]!r} is excluded from pruning")


# -- following channels through one node -----------------------------------------------------------------------

def _rank(v: Value | None) -> int | None:
    return None if v is None or v.shape is None else len(v.shape)


def _static(dims) -> int | None:
    """The product of `dims` when every one is a known int, else None."""
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None


def _block_inputs(cg: ChannelGroups, node: Node, reason: str) -> None:
    for v in node.inputs:
        cg.block(cg.layout(v), reason.format(node=f"{node.op_type} {node.name!r}"))


def _visit(cg: ChannelGroups, node: Node, keep) -> None:
    flow = channel_flow(node)
    if not any(cg.layout(v) is not None for v in node.inputs) and flow not in ("layer",):
        return  # nothing tracked reaches this node, and it makes no channels
    handler = _FLOWS.get(flow)
    if handler is None or handler(cg, node, keep) is False:
        _block_inputs(cg, node, "{node} does not let lowbit follow channels through it")


def _layer(cg: ChannelGroups, node: Node, keep) -> bool:
    w = node.input(1) if len(node.inputs) > 1 else None
    x = node.input(0)
    if node.op_type == "ConvTranspose" or (node.op_type == "Gemm" and attribute(node, "transA")):
        return False
    if w is None or w.const is None or w.const.ndim < 2 or not np.issubdtype(w.const.dtype, np.floating):
        _block_inputs(cg, node, "{node} multiplies them by another activation, not by a weight")
        return True
    rank = _rank(x)
    in_axis, out_axis = weight_in_axis(node) % w.const.ndim, weight_out_axis(node) % w.const.ndim
    if node.op_type == "MatMul" and w.const.ndim != 2:
        return False
    layout = cg.layout(x)
    if id(node) in cg.head_projections:  # its filters are heads (heads.py): only its input channels here
        if layout is not None:
            if layout.axis != rank - 1 or layout.size != w.const.shape[in_axis]:
                cg.block(layout, f"{node.op_type} {node.name!r} reads them on another axis")
            else:
                cg.members.append(Member(node, 1, in_axis, layout.segments, "in"))
        return True
    if layout is not None:
        x_axis = activation_axis(node) % rank if rank else None
        if layout.axis != x_axis or layout.size != w.const.shape[in_axis]:
            cg.block(layout, f"{node.op_type} {node.name!r} reads them on another axis")
        else:
            cg.members.append(Member(node, 1, in_axis, layout.segments, "in"))
    out = node.output
    channels = int(w.const.shape[out_axis])
    g = cg.new(channels, node)
    segments = (Segment(g, channels),)
    cg.members.append(Member(node, 1, out_axis, segments, "out"))
    bias = node.input(2) if len(node.inputs) > 2 else None
    if bias is not None:
        if bias.const is not None and bias.const.shape == (channels,):
            cg.members.append(Member(node, 2, 0, segments, "param"))
        elif bias.const is None or bias.const.size != 1:
            cg.block_ids([g], f"{node.op_type} {node.name!r} has a bias lowbit cannot cut per channel")
    if node.name in keep:
        cg.block_ids([g], f"{node.op_type} {node.name!r} is excluded from pruning")
    out_rank = _rank(out)
    if out_rank is None:
        cg.block_ids([g], f"the output of {node.name!r} has no known rank")
        return True
    cg.set_layout(out, Layout(activation_axis(node) % out_rank, segments))
    return True


def _grouped(cg: ChannelGroups, node: Node, keep) -> bool:
    layout = cg.layout(node.input(0))
    w = node.input(1)
    group = attribute(node, "group")
    depthwise = w.const is not None and w.const.shape[1] == 1 and w.const.shape[0] == group == layout.size
    if layout.axis != 1 or not depthwise:
        return False  # a grouped (not depthwise) conv ties channels in blocks: not followed
    cg.members.append(Member(node, 1, 0, layout.segments, "scale"))
    bias = node.input(2) if len(node.inputs) > 2 else None
    if bias is not None and bias.const is not None and bias.const.shape == (group,):
        cg.members.append(Member(node, 2, 0, layout.segments, "param"))
    elif bias is not None:
        return False
    if node.name in keep:
        cg.block(layout, f"the depthwise Conv {node.name!r} is excluded from pruning")
    cg.set_layout(node.output, layout)
    return True


def _elementwise(cg: ChannelGroups, node: Node, keep) -> bool:
    out_rank = _rank(node.output)
    if out_rank is None:
        return False
    tracked: list[Layout] = []
    for v in node.inputs:
        layout, rank = cg.layout(v), _rank(v)
        if layout is not None:
            tracked.append(Layout(layout.axis + out_rank - rank, layout.segments))
    axis, size = tracked[0].axis, tracked[0].size
    if any(t.axis != axis or t.size != size for t in tracked):
        return False
    for port, v in enumerate(node.inputs):
        if v is None or cg.layout(v) is not None:
            continue
        rank = _rank(v)
        at = None if rank is None else axis - (out_rank - rank)
        dim = 1 if at is not None and at < 0 else (v.shape[at] if at is not None else None)
        if dim == 1:
            continue  # broadcast along the channels
        source = _constant_source(node, port, at)
        if source is not None and dim == size:
            cg.members.append(Member(*source, tracked[0].segments, "param"))
            if source[0] is not node:  # an expanded constant: its expansion's channels shrink with it
                cg.set_layout(v, Layout(at, tracked[0].segments))
            continue
        _block_inputs(cg, node, "{node} joins them to values lowbit does not follow channel by channel")
        return True
    first = tracked[0].segments
    for other in tracked[1:]:
        if [(s.length, s.repeat) for s in other.segments] != [(s.length, s.repeat) for s in first]:
            _block_inputs(cg, node, "{node} joins channels laid out differently")
            return True
        for a, b in zip(first, other.segments):
            if (a.group is None) != (b.group is None):
                cg.block_ids([a.group, b.group], f"{node.op_type} {node.name!r} joins them to fixed channels")
            elif a.group is not None:
                cg.union(a.group, b.group)
    cg.set_layout(node.output, Layout(axis, first))
    return True


def _constant_source(node: Node, port: int, axis: int | None) -> tuple[Node, int, int] | None:
    """(node, port, axis) of the constant that input `port` of `node` is, or that an Expand broadcasts into it (a
    ViT's class token, expanded over the batch); None for a computed value."""
    v = node.input(port)
    if axis is None:
        return None
    if v.const is not None:
        return node, port, axis
    expand = v.producer
    if expand is not None and expand.op_type == "Expand" and not expand.domain and expand.input(0).const is not None:
        const_axis = axis - (len(v.shape) - expand.input(0).const.ndim)
        if const_axis >= 0 and expand.input(0).const.shape[const_axis] == v.shape[axis]:
            return expand, 0, const_axis
    return None


def _normalize(cg: ChannelGroups, node: Node, keep) -> bool:
    layout, rank = cg.layout(node.input(0)), _rank(node.input(0))
    ports = channel_params(node, layout.axis, rank) if rank is not None else None
    if ports is None:
        return False  # it mixes the channels (a Softmax over them)
    for port in ports:
        v = node.input(port) if port < len(node.inputs) else None
        if v is None:
            continue
        if v.const is None or v.const.shape != (layout.size,):
            return False
        cg.members.append(Member(node, port, 0, layout.segments, "scale" if port == 1 else "param"))
    cg.set_layout(node.output, layout)
    return True


def _pool(cg: ChannelGroups, node: Node, keep) -> bool:
    layout = cg.layout(node.input(0))
    if layout.axis != 1 or node.op_type == "Resize":
        return False
    if node.op_type == "Pad":
        pads = node.input(1).const if len(node.inputs) > 1 and node.input(1) is not None else None
        rank = _rank(node.input(0))
        if pads is None or len(node.inputs) > 3 or pads[1] or pads[rank + 1]:
            return False
    cg.set_layout(node.output, layout)
    return True


def _reduce(cg: ChannelGroups, node: Node, keep) -> bool:
    layout, rank = cg.layout(node.input(0)), _rank(node.input(0))
    if node.op_type == "ArgMax" or rank is None:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.input(1) is not None:
        axes = None if node.input(1).const is None else node.input(1).const.tolist()
    if axes is None:
        return False
    axes = [a % rank for a in axes]
    if layout.axis in axes:
        return False
    keepdims = node.attrs.get("keepdims", 1)
    axis = layout.axis if keepdims else layout.axis - sum(a < layout.axis for a in axes)
    cg.set_layout(node.output, Layout(axis, layout.segments))
    return True


def _concat(cg: ChannelGroups, node: Node, keep) -> bool:
    rank = _rank(node.output)
    if rank is None:
        return False
    axis = node.attrs.get("axis", 0) % rank
    layouts = [cg.layout(v) for v in node.inputs]
    if any(lay is not None and lay.axis != axis for lay in layouts):
        return _elementwise(cg, node, keep)  # joined along another axis (tokens): the channels are tied
    segments: list[Segment] = []
    for v, layout in zip(node.inputs, layouts):
        if layout is not None:
            segments += layout.segments
        elif v is not None and v.shape is not None and isinstance(v.shape[axis], int):
            segments.append(Segment(None, v.shape[axis]))
        else:
            _block_inputs(cg, node, "{node} joins them to channels of unknown count")
            return True
    cg.set_layout(node.output, Layout(axis, tuple(segments)))
    return True


def _split(cg: ChannelGroups, node: Node, keep) -> bool:
    layout, rank = cg.layout(node.input(0)), _rank(node.input(0))
    axis = node.attrs.get("axis", 0)
    if node.op_type == "Slice":
        axes = node.input(3).const if len(node.inputs) > 3 and node.input(3) is not None else None
        if rank is None or axes is None:
            return False
        touched = [int(a) % rank for a in np.atleast_1d(axes)]
    else:
        touched = [axis % rank] if rank is not None else None
    if touched is None or layout.axis in touched:
        return False  # a cut of the channel axis
    for out in node.outputs:
        cg.set_layout(out, layout)
    return True


def _reshape(cg: ChannelGroups, node: Node, keep) -> bool:
    x, out = node.input(0), node.output
    layout, rank, out_rank = cg.layout(x), _rank(x), _rank(out)
    if rank is None or out_rank is None:
        return False
    op, axis = node.op_type, layout.axis
    if op == "Identity":
        new_axis = axis
    elif op == "Transpose":
        perm = node.attrs.get("perm") or list(reversed(range(rank)))
        new_axis = list(perm).index(axis)
    elif op == "Squeeze" or op == "Unsqueeze":
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.input(1) is not None and node.input(1).const is not None:
            axes = node.input(1).const.tolist()
        if axes is None:
            return False
        if op == "Squeeze":
            axes = [a % rank for a in axes]
            if axis in axes:
                return False
            new_axis = axis - sum(a < axis for a in axes)
        else:
            axes = sorted(a % out_rank for a in axes)
            new_axis = axis
            for a in axes:
                if a <= new_axis:
                    new_axis += 1
    elif op in REGROUPING and _same_dims(x.shape[:axis + 1], out.shape[:axis + 1]):
        new_axis = axis  # only dims after the channels are merged or split (a ViT's patches: [B, C, H*W])
    elif op in REGROUPING and _flattens_from(x, out, axis):
        inner = _static(x.shape[axis + 1:])
        if inner is None:
            return False
        segments = tuple(Segment(s.group, s.length, s.repeat * inner) for s in layout.segments)
        cg.set_layout(out, Layout(axis, segments))
        return True
    else:
        return False
    cg.set_layout(out, Layout(new_axis, layout.segments))
    return True


def _same_dims(a, b) -> bool:
    """Two shape prefixes that are the same dims (equal ints, or the same symbolic name)."""
    return len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b))


def _flattens_from(x: Value, out: Value, axis: int) -> bool:
    """`out` keeps `x`'s dims before `axis` and merges the channel axis with every dim after it."""
    if len(out.shape) != axis + 1:
        return False
    return list(out.shape[:axis]) == list(x.shape[:axis]) or (axis == 1 and out.shape[0] == x.shape[0])


def _index(cg: ChannelGroups, node: Node, keep) -> bool:
    layout, rank = cg.layout(node.input(0)), _rank(node.input(0))
    if node.op_type != "Gather" or rank is None or node.input(1) is None or node.input(1).const is None:
        return False
    gather_axis = node.attrs.get("axis", 0) % rank
    if gather_axis == layout.axis:
        return False
    added = node.input(1).const.ndim - 1
    new_axis = layout.axis if layout.axis < gather_axis else layout.axis + added
    cg.set_layout(node.output, Layout(new_axis, layout.segments))
    return True


_FLOWS = {"layer": _layer, "grouped": _grouped, "elementwise": _elementwise, "normalize": _normalize,
          "pool": _pool, "reduce": _reduce, "concat": _concat, "split": _split, "reshape": _reshape,
          "index": _index}
