"""Physically remove the pruned channels of each group from every member, and fix what depends on the counts.

Each member's constant loses the entries of its groups' removed channels (at
the member's offsets, repeated where a Flatten repeated them; a grouped Conv's
input channels, and a grouped ConvTranspose's filters, in each block's own
columns); a depthwise Conv's (or ConvTranspose's) `group` follows its
filters, a grouped one keeps its G blocks; every value whose channels the
analysis followed gets its new channel count, and shapes are inferred again.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.infer import reinfer
from ..ir.ops import weight_out_axis, weight_quantizer
from ..patterns.library.bn_folding import FOLDED_BN_SCALE
from .flows import channel_ranges
from .groups import ChannelGroups, Layout, Segment
from .heads import rewrite_shapes, set_shape_entry, set_split_sizes
from .layout import row_blocks


def _positions(segments: tuple[Segment, ...], removed: dict[int, np.ndarray], find) -> np.ndarray:
    """The entries along a member's axis that the removed channels of its groups occupy."""
    out, offset = [], 0
    for s in segments:
        gone = removed.get(find(s.group)) if s.group is not None else None
        if gone is not None and gone.size:
            out.append((offset + gone[:, None] * s.repeat + np.arange(s.repeat)[None, :]).reshape(-1))
        offset += s.length * s.repeat
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _kept_size(layout: Layout, removed: dict[int, np.ndarray], find) -> int:
    """How many entries along its axis a value keeps once the removed channels of its groups are gone."""
    gone = [removed[find(s.group)].size * s.repeat if s.group is not None and find(s.group) in removed else 0
            for s in layout.segments]
    return layout.size - sum(gone)


def _take_grouped(array: np.ndarray, positions: np.ndarray, blocks: int) -> np.ndarray:
    """A grouped weight [G * r, c, ...] without the channels at `positions` of its axis 1 (channel g * c + i is
    row block g's column i: a grouped Conv's input channels, a grouped ConvTranspose's filters); each block
    loses as many as the others (plan.lowest)."""
    c = array.shape[1]
    kept = [np.setdiff1d(np.arange(c), positions[(positions >= g * c) & (positions < g * c + c)] - g * c)
            for g in range(blocks)]
    return np.concatenate([block.take(k, axis=1) for block, k in zip(row_blocks(array, blocks), kept)])


def _cut(graph: Graph, v: Value, readers: list[tuple[Node, int, dict[int, np.ndarray], dict[int, int]]]) -> None:
    """Cut constant `v` for the member `readers` (node, port, {axis: positions}, {axis: a grouped weight's G}) that
    read it. Readers that lose the same entries share one cut; `v` itself is cut in place (its name, a
    parameter's, stays) when one cut serves every use of it, and otherwise each cut is a new constant. A constant
    that several layers read (an exporter stores equal initializers once: the zero biases of every layer of a
    model) keeps what each of them needs."""
    by_cut: dict[tuple, list[tuple[Node, int]]] = {}
    for node, port, by_axis, blocks in readers:
        key = tuple(sorted((axis % v.const.ndim, blocks.get(axis, 1), tuple(positions.tolist()))
                           for axis, positions in by_axis.items()))
        by_cut.setdefault(key, []).append((node, port))
    every_use = {(id(n), p) for n, p in v.uses}
    for key, nodes in by_cut.items():
        smaller = np.asarray(v.const)
        for axis, blocks, positions in key:  # a layer's weight loses filters (axis 0), then input channels
            if blocks > 1:
                smaller = _take_grouped(smaller, np.asarray(positions, np.int64), blocks)
                continue
            kept = np.setdiff1d(np.arange(smaller.shape[axis]), np.asarray(positions, np.int64), assume_unique=True)
            smaller = smaller.take(kept, axis=axis)  # a contiguous copy (4x faster than np.delete), rank kept
        smaller.flags.writeable = False  # lowbit's own array: Value.const keeps it rather than copying it again
        if len(by_cut) == 1 and {(id(n), p) for n, p in nodes} >= every_use:
            v.const = smaller
            return
        copy = graph.add_constant(f"{v.name}_pruned", smaller)
        copy.meta.update(v.meta)
        for node, port in nodes:
            node.set_input(port, copy)


def _cut_folded_bn_scale(node: Node, port: int, by_axis: dict[int, np.ndarray], rank: int) -> None:
    """The scale of the BN folded into a layer, as fold_bn recorded it (bn_folding.FOLDED_BN_SCALE), loses the
    filters the layer's weight loses."""
    s, axis = node.meta.get(FOLDED_BN_SCALE), weight_out_axis(node)
    if s is None or port != 1 or axis is None:
        return
    gone = next((p for a, p in by_axis.items() if a % rank == axis % rank), None)
    if gone is not None and gone.size:
        node.meta[FOLDED_BN_SCALE] = tuple(np.delete(np.asarray(s), gone).tolist())


def _resize_split(graph: Graph, node: Node, layout: Layout, removed: dict[int, np.ndarray], find) -> None:
    """Write a Split's sizes (a constant input, also where it had equal parts) or a Slice's bounds for the entries
    of its axis that stay: each output keeps its own channels."""
    gone = _positions(layout.segments, removed, find)
    kept_before = lambda entry: entry - int(np.count_nonzero(gone < entry))  # noqa: E731
    ranges = channel_ranges(node, layout.size)
    if node.op_type == "Split":
        set_split_sizes(node, [kept_before(end) - kept_before(start) for start, end in ranges])
        return
    start, end = ranges[0]
    node.set_input(1, graph.add_constant(f"{node.name}_starts_pruned", np.array([kept_before(start)], np.int64)))
    node.set_input(2, graph.add_constant(f"{node.name}_ends_pruned", np.array([kept_before(end)], np.int64)))


def shrink(graph: Graph, cg: ChannelGroups, removed: dict[int, np.ndarray]) -> int:
    """Remove `removed[group root]` (channel indices) from every member; returns how many constants changed."""
    find = cg.find
    # id(value) -> (value, {(id(node), port): (node, port, {axis: positions}, {axis: a grouped weight's G})})
    cuts: dict[int, tuple] = {}
    for m in cg.members:
        positions = _positions(m.segments, removed, find)
        if not positions.size:
            continue
        v = m.value
        _, readers = cuts.setdefault(id(v), (v, {}))
        _, _, by_axis, blocks = readers.setdefault((id(m.node), m.port), (m.node, m.port, {}, {}))
        by_axis[m.axis] = np.union1d(by_axis.get(m.axis, np.zeros(0, np.int64)), positions)
        if m.conv_groups > 1:
            blocks[m.axis] = m.conv_groups
    depthwise = []  # (a depthwise Conv or ConvTranspose, the node and port its cut weight is read at: it, or its
    # quantizer, its filters per channel); a grouped Conv keeps its G blocks, each one smaller
    for node, multiplier in cg.depthwise.values():
        fq = weight_quantizer(node)  # QAT with masks: the constant the weight quantizer reads
        holder, port = (fq, 0) if fq is not None else (node, 1)
        if id(holder.input(port)) in cuts:
            depthwise.append((node, holder, port, multiplier))
    for v, readers in cuts.values():
        for node, port, by_axis, _ in readers.values():
            _cut_folded_bn_scale(node, port, by_axis, v.const.ndim)
        _cut(graph, v, list(readers.values()))
    for node, holder, port, multiplier in depthwise:  # a depthwise Conv's group follows its filters
        node.attrs["group"] = int(holder.input(port).const.shape[0]) // multiplier
    for g, structure in cg.heads:  # the Reshapes around attention, for the heads kept
        gone = removed.get(find(g))
        if gone is not None and gone.size:
            rewrite_shapes(structure, structure.heads - gone.size)
    for reshape, layout in cg.reshape_entries:  # the channel counts a Reshape's target spells out
        set_shape_entry(reshape, layout.axis, _kept_size(layout, removed, find))
    for node in cg.channel_splits:  # the sizes of a Split or Slice of the channel axis, for the channels kept
        _resize_split(graph, node, cg.layout(node.input(0)), removed, find)
    # a constant whose every reader now reads its own cut of it, the sizes and bounds a Split or Slice read before
    graph.remove_unused_constants()
    for v, layout in cg.layouts.values():
        if v.shape is not None:
            shape = list(v.shape)
            shape[layout.axis] = _kept_size(layout, removed, find)
            v.shape = tuple(shape)
    reinfer(graph)
    return len(cuts)
