"""The data of channel dependency groups: segments of channels, a value's layout, the members a group cuts, and
the union-find over groups (`ChannelGroups`). `groups.py` builds them; `flows.py` follows channels through ops."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..ir.graph import Graph, Node, Value
from ..ir.ops import layer_path
from .heads import HeadStructure


def row_blocks(array, blocks: int):
    """A grouped weight [G * r, c, ...] as [G, r, c, ...]: block g's rows (a Member's `conv_groups`)."""
    return array.reshape(blocks, array.shape[0] // blocks, *array.shape[1:])


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
    LayerNorm scale, a depthwise filter) or "param" (a bias, BN statistics, a constant operand). `conv_groups`
    G > 1: the member is axis 1 of a grouped weight ([G * r, c, ...]), which holds one block's channels only:
    channel g * c + i is column i of row block g (a grouped Conv's input channels, a grouped ConvTranspose's
    filters).
    """

    node: Node
    port: int
    axis: int
    segments: tuple[Segment, ...]
    role: str
    conv_groups: int = 1

    @property
    def value(self) -> Value:
        return self.node.input(self.port)


@dataclass
class Group:
    """One group's channels: how many, the layers that produce them, every member, and why it cannot be pruned
    (None when it can). `blocks`: the equal runs of consecutive channels that must each lose as many channels as
    the others (the blocks of a grouped Conv or ConvTranspose that reads or writes them), 1 when any may go."""

    id: int
    size: int
    producers: list[Node] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    blocked: str | None = None
    blocks: int = 1

    @property
    def names(self) -> list[str]:
        """The producing layers by the names a user knows: the module path of their weight (`layer1.0.conv1`)
        where it has one, else the node name."""
        return [layer_path(n) or n.name for n in self.producers]


class ChannelGroups:
    """The groups of a graph (a union-find over channel sets) and each value's channel layout."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._parent: list[int] = []
        self._size: list[int] = []
        self._producers: list[list[Node]] = []
        self._blocked: dict[int, str] = {}
        self._blocks: list[int] = []
        self.members: list[Member] = []
        self.layouts: dict[int, tuple[Value, Layout]] = {}  # id(value) -> (value, layout)
        self.heads: list[tuple[int, HeadStructure]] = []  # (group, structure) of each prunable attention
        self.reshape_entries: list[tuple[Node, Layout]] = []  # Reshapes whose target spells a channel count out
        self.channel_splits: list[Node] = []  # Splits and Slices of the channel axis: their sizes follow the cuts
        self._retired: set[int] = set()  # groups refined into parts (`refine`)
        self.head_projections: set[int] = set()  # ids of the MatMuls that make heads (no channel group of their own)
        self.depthwise: dict[int, tuple[Node, int]] = {}  # id(depthwise Conv or ConvTranspose) -> (it, its
        # filters per channel)

    # -- union-find ------------------------------------------------------------------------------------------

    def new(self, size: int, producer: Node, blocks: int = 1) -> int:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._producers.append([producer])
        self._blocks.append(1)
        g = len(self._parent) - 1
        self.split(g, blocks)
        return g

    def split(self, g: int, blocks: int) -> None:
        """Group `g` loses as many channels from each of `blocks` equal runs (a grouped Conv's blocks)."""
        root = self.find(g)
        both = math.lcm(self._blocks[root], blocks)
        if self._size[root] % both:
            self.block_ids([root], f"grouped convolutions split these {self._size[root]} channels in "
                           f"{self._blocks[root]} and in {blocks} blocks, which do not tile each other")
        else:
            self._blocks[root] = both

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
        self.split(a, self._blocks[b])
        if b in self._blocked:
            self._blocked.setdefault(a, self._blocked.pop(b))

    def size(self, g: int) -> int:
        """How many channels group `g` (a root) holds."""
        return self._size[g]

    def refine(self, g: int, sizes: list[int]) -> list[int] | None:
        """Make group `g` consecutive groups of `sizes` channels, in every layout and member that holds it: a Split
        or Slice of its channels sends each part to other readers (Phi-3's fused gate and up projections, cut in
        two and multiplied). Returns the parts; None where `g` cannot be cut: it was joined to another group, or
        is cut in blocks (a grouped Conv's)."""
        if self.find(g) != g or self._blocks[g] != 1 or sum(sizes) != self._size[g] or any(
                self.find(h) == g for h, _ in self.heads) or any(
                self.find(o) == g for o in range(len(self._parent)) if o != g and o not in self._retired):
            return None
        parts = []
        for size in sizes:
            self._parent.append(len(self._parent))
            self._size.append(size)
            self._producers.append(list(self._producers[g]))
            self._blocks.append(1)
            parts.append(len(self._parent) - 1)
            if g in self._blocked:
                self._blocked[parts[-1]] = self._blocked[g]
        self._retired.add(g)

        def cut(segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
            return tuple(piece for seg in segments for piece in (
                [Segment(p, n, seg.repeat) for p, n in zip(parts, sizes)] if seg.group == g else [seg]))

        self.members = [dataclasses.replace(m, segments=cut(m.segments)) for m in self.members]
        self.layouts = {key: (v, Layout(lay.axis, cut(lay.segments))) for key, (v, lay) in self.layouts.items()}
        self.reshape_entries = [(n, Layout(lay.axis, cut(lay.segments))) for n, lay in self.reshape_entries]
        return parts

    def block_ids(self, ids, reason: str) -> None:
        for g in ids:
            if g is not None:
                self._blocked.setdefault(self.find(g), reason)

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            self.block_ids([s.group for s in layout.segments], reason)

    # -- layouts ---------------------------------------------------------------------------------------------

    def block_inputs(self, node: Node, reason: str) -> None:
        """Block every group that reaches `node`; `reason` may name it as {node}."""
        for v in node.inputs:
            self.block(self.layout(v), reason.format(node=f"{node.op_type} {node.name!r}"))

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
            if g in self._retired:
                continue
            root = self.find(g)
            if root not in by_root:
                by_root[root] = Group(root, self._size[root], list(self._producers[root]),
                                      blocked=self._blocked.get(root), blocks=self._blocks[root])
        for m in self.members:
            for root in {self.find(s.group) for s in m.segments if s.group is not None}:
                by_root[root].members.append(m)
        return list(by_root.values())


