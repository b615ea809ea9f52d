"""How channels flow through each kind of op (the op table's `channel_flow`): one handler per flow, which records
the members a node adds to the groups that reach it and the layout of its output, or returns False where it
cannot follow them (the caller then blocks those groups)."""

from __future__ import annotations

import numpy as np

from ..ir.graph import Node, Value
from ..ir.infer import picked_dims
from ..ir.ops import (DIM_CARRIERS, REGROUPING, activation_axis, attribute, channel_params, const_axes,
                      split_sizes, transpose_perm, weight_in_axis, weight_out_axis, weight_quantizer)
from .heads import shape_entry
from .layout import ChannelGroups, Layout, Member, Segment


def _rank(v: Value | None) -> int | None:
    return None if v is None or v.shape is None else len(v.shape)


def _static(dims) -> int | None:
    """The product of `dims` when every one is a known int, else None."""
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None


def _weight_members(cg: ChannelGroups, node: Node, axis: int, segments, role: str, conv_groups: int = 1) -> None:
    """`node`'s weight along `axis` as a member: the constant itself, or the one its FakeQuantize reads, with
    the quantizer's per-channel ranges where they vary along the same axis."""
    fq = weight_quantizer(node)
    if fq is None:
        cg.members.append(Member(node, 1, axis, segments, role, conv_groups))
        return
    cg.members.append(Member(fq, 0, axis, segments, role, conv_groups))
    for port in range(1, 5):
        r = fq.input(port).const
        if r is not None and r.ndim == fq.input(0).const.ndim and r.shape[axis] > 1:
            if conv_groups > 1:  # ranges per column of a grouped weight: one range for G channels
                cg.block_ids([s.group for s in segments], f"the per-channel ranges of {fq.name!r} each serve "
                             f"{conv_groups} channels of a grouped {node.op_type}")
            cg.members.append(Member(fq, port, axis, segments, "param"))


def _layer(cg: ChannelGroups, node: Node, keep) -> bool:
    fq = weight_quantizer(node)
    w = fq.input(0) if fq is not None else node.input(1) if len(node.inputs) > 1 else None
    x = node.input(0)
    if node.op_type == "Gemm" and attribute(node, "transA"):
        return False
    if w is None or w.const is None or w.const.ndim < 2 or not np.issubdtype(w.const.dtype, np.floating):
        cg.block_inputs(node, "{node} multiplies them by another activation, not by a weight")
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
                _weight_members(cg, node, in_axis, layout.segments, "in")
        return True
    if layout is not None:
        x_axis = activation_axis(node) % rank if rank else None
        if layout.axis != x_axis or layout.size != w.const.shape[in_axis]:
            cg.block(layout, f"{node.op_type} {node.name!r} reads them on another axis")
        else:
            _weight_members(cg, node, in_axis, layout.segments, "in")
    _filters(cg, node, out_axis, int(w.const.shape[out_axis]), keep)
    return True


def _filters(cg: ChannelGroups, node: Node, out_axis: int, channels: int, keep, blocks: int = 1,
             conv_groups: int = 1) -> None:
    """The group of a layer's `channels` filters (split in `blocks`, a grouped Conv's): its weight along
    `out_axis` (cut block by block where `conv_groups` > 1), its bias, and its output's layout."""
    g = cg.new(channels, node, blocks=blocks)
    segments = (Segment(g, channels),)
    _weight_members(cg, node, out_axis, segments, "out", conv_groups=conv_groups)
    bias = node.input(2) if len(node.inputs) > 2 else None
    if bias is not None:
        if bias.const is not None and bias.const.shape == (channels,):
            cg.members.append(Member(node, 2, 0, segments, "param"))
        elif bias.const is None or bias.const.size != 1:
            cg.block_ids([g], f"{node.op_type} {node.name!r} has a bias lowbit cannot cut per channel")
    if node.name in keep:
        cg.block_ids([g], f"{node.op_type} {node.name!r} is excluded from pruning")
    out_rank = _rank(node.output)
    if out_rank is None:
        cg.block_ids([g], f"the output of {node.name!r} has no known rank")
        return
    cg.set_layout(node.output, Layout(activation_axis(node) % out_rank, segments))


def _group_blocks(cg: ChannelGroups, node: Node, layout: Layout | None, w: Value, group: int, keep) -> bool:
    """A grouped Conv or ConvTranspose (not depthwise): its G filter blocks each read their own block of the input
    channels. Each block must keep as many input channels as the others, and as many filters (Torch-Pruning's
    rule): the groups reaching it lose channels evenly from its G input blocks, and its filters make a group split
    in G blocks. A Conv's weight ([G * b, a, ...]) holds one block's input channels along axis 1, a
    ConvTranspose's ([G * a, b, ...]) one block's filters: that member is cut block by block (`conv_groups`)."""
    in_axis, out_axis = weight_in_axis(node), weight_out_axis(node)
    in_groups, out_groups = (group if axis == 1 else 1 for axis in (in_axis, out_axis))  # block-local axis 1
    if layout is not None:
        if layout.size != w.const.shape[in_axis] * in_groups:
            cg.block(layout, f"the grouped {node.op_type} {node.name!r} reads them on another axis")
        elif len(layout.segments) != 1 or layout.segments[0].repeat != 1 or layout.segments[0].group is None:
            cg.block(layout, f"the grouped {node.op_type} {node.name!r} reads them in {group} blocks across "
                     "several groups")
        else:
            cg.split(layout.segments[0].group, group)
            _weight_members(cg, node, in_axis, layout.segments, "in", conv_groups=in_groups)
    _filters(cg, node, out_axis, int(w.const.shape[out_axis]) * out_groups, keep, blocks=group,
             conv_groups=out_groups)
    return True


def _grouped(cg: ChannelGroups, node: Node, keep) -> bool:
    layout = cg.layout(node.input(0))
    fq = weight_quantizer(node)
    w = fq.input(0) if fq is not None else node.input(1)
    group = attribute(node, "group")
    # a depthwise Conv's filters, `multiplier` per channel ([C * k, 1, ...]), follow the channel they read
    multiplier = w.const.shape[0] // group if w.const is not None and node.op_type == "Conv" else 1
    depthwise = w.const is not None and layout is not None and w.const.shape[1] == 1 \
        and w.const.shape[0] == group * multiplier and group == layout.size
    if layout is not None and layout.axis != 1:
        return False
    if not depthwise:
        if layout is None and w.const is not None and w.const.shape[1] == 1:
            return True  # a depthwise conv reading what no group tracks: its filters follow nothing prunable
        if w.const is not None and w.const.ndim >= 3:
            return _group_blocks(cg, node, layout, w, group, keep)
        cg.block(layout, f"the grouped {node.op_type} {node.name!r} mixes them in {group} blocks; lowbit prunes "
                 "through depthwise ones only")
        return True
    segments = tuple(Segment(s.group, s.length, s.repeat * multiplier) for s in layout.segments)
    _weight_members(cg, node, 0, segments, "scale")
    bias = node.input(2) if len(node.inputs) > 2 else None
    if bias is not None and bias.const is not None and bias.const.shape == (group * multiplier,):
        cg.members.append(Member(node, 2, 0, segments, "param"))
    elif bias is not None:
        return False
    if node.name in keep:
        cg.block(layout, f"the depthwise Conv {node.name!r} is excluded from pruning")
    cg.depthwise[id(node)] = (node, multiplier)
    cg.set_layout(node.output, Layout(1, segments))
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
        cg.block_inputs(node, "{node} joins them to values lowbit does not follow channel by channel")
        return True
    first = tracked[0].segments
    for other in tracked[1:]:
        if [(s.length, s.repeat) for s in other.segments] != [(s.length, s.repeat) for s in first]:
            cg.block_inputs(node, "{node} joins channels laid out differently")
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
    """Pools keep the channels of NCHW's axis 1; a Pad those of any axis it pads nothing on (a channels-last
    tensor's, as Swin pads its windows)."""
    layout = cg.layout(node.input(0))
    if node.op_type == "Pad":
        pads = node.input(1).const if len(node.inputs) > 1 and node.input(1) is not None else None
        rank = _rank(node.input(0))
        if pads is None or rank is None or len(node.inputs) > 3 or pads[layout.axis] or pads[rank + layout.axis]:
            return False
    elif layout.axis != 1 or node.op_type == "Resize":
        return False
    cg.set_layout(node.output, layout)
    return True


def _reduce(cg: ChannelGroups, node: Node, keep) -> bool:
    layout, rank = cg.layout(node.input(0)), _rank(node.input(0))
    if node.op_type == "ArgMax" or rank is None:
        return False
    axes = const_axes(node, rank)
    if axes is None:
        return False
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
            cg.block_inputs(node, "{node} joins them to channels of unknown count")
            return True
    cg.set_layout(node.output, Layout(axis, tuple(segments)))
    return True


def _split(cg: ChannelGroups, node: Node, keep) -> bool:
    """A Split or Slice of other axes keeps the channels; one of the channel axis gives each output the channels of
    its range, the groups it cuts through refined into parts (`ChannelGroups.refine`), and its sizes follow the
    cuts (shrink.py)."""
    layout, rank = cg.layout(node.input(0)), _rank(node.input(0))
    axis = node.attrs.get("axis", 0)
    if node.op_type == "Slice":
        touched = const_axes(node, rank) if rank is not None else None
        if touched is None:
            return False
    else:
        touched = [axis % rank] if rank is not None else None
    if touched is None:
        return False
    if layout.axis not in touched:
        for out in node.outputs:
            cg.set_layout(out, layout)
        return True
    ranges = channel_ranges(node, layout.size) if touched == [layout.axis] else None
    if ranges is None or not _cut_at(cg, node.input(0), sorted({end for r in ranges for end in r})):
        return False
    layout = cg.layout(node.input(0))
    for out, (start, end) in zip(node.outputs, ranges):
        cg.set_layout(out, Layout(layout.axis, _segments_in(layout, start, end)))
    cg.channel_splits.append(node)
    return True


def channel_ranges(node: Node, size: int) -> list[tuple[int, int]] | None:
    """The [start, end) entries of the split axis each output of a Split (its constant sizes, or equal parts) or
    a Slice (constant bounds, step 1) takes, of `size`; None where they are not constants."""
    if node.op_type == "Split":
        sizes = split_sizes(node, size)
        if sizes is None or sum(sizes) != size:
            return None
        ends = np.cumsum(sizes).tolist()
        return [(end - n, end) for n, end in zip(sizes, ends)]
    bounds = [node.input(i).const if len(node.inputs) > i and node.input(i) is not None else None for i in (1, 2)]
    steps = node.input(4) if len(node.inputs) > 4 else None
    if any(b is None or np.size(b) != 1 for b in bounds) or (
            steps is not None and (steps.const is None or np.ravel(steps.const).tolist() != [1])):
        return None
    start, end = (int(np.ravel(b)[0]) for b in bounds)
    start, end = (min(max(i + size if i < 0 else i, 0), size) for i in (start, end))
    return [(start, max(start, end))]


def _cut_at(cg: ChannelGroups, value: Value, boundaries: list[int]) -> bool:
    """Refine the groups of `value`'s layout so that each boundary (an entry of its axis) falls between two
    segments; False where one cannot be (inside a channel's repeats, or a group that cannot be refined)."""
    for boundary in boundaries:
        offset = 0
        for seg in cg.layout(value).segments:
            width = seg.length * seg.repeat
            if offset < boundary < offset + width:
                cut, rest = divmod(boundary - offset, seg.repeat)
                root = cg.find(seg.group) if seg.group is not None else None
                if rest or root is None or seg.length != cg.size(root) \
                        or cg.refine(root, [cut, seg.length - cut]) is None:
                    return False
                break
            offset += width
    return True


def _segments_in(layout: Layout, start: int, end: int) -> tuple[Segment, ...]:
    """The segments of `layout` that lie in entries [start, end) (boundaries fall between segments)."""
    out, offset = [], 0
    for seg in layout.segments:
        width = seg.length * seg.repeat
        if start <= offset and offset + width <= end and width:
            out.append(seg)
        offset += width
    return tuple(out)


def _reshape(cg: ChannelGroups, node: Node, keep) -> bool:
    x, out = node.input(0), node.output
    layout, rank, out_rank = cg.layout(x), _rank(x), _rank(out)
    if rank is None or out_rank is None:
        return False
    op, axis = node.op_type, layout.axis
    if op == "Identity":
        new_axis = axis
    elif op == "Transpose":
        new_axis = transpose_perm(node, rank).index(axis)
    elif op == "Squeeze" or op == "Unsqueeze":
        axes = const_axes(node, rank if op == "Squeeze" else out_rank)
        if axes is None:
            return False
        if op == "Squeeze":
            if axis in axes:
                return False
            new_axis = axis - sum(a < axis for a in axes)
        else:
            new_axis = axis
            for a in sorted(axes):
                if a <= new_axis:
                    new_axis += 1
    elif op in REGROUPING and _same_dims(x.shape[:axis + 1], out.shape[:axis + 1]):
        new_axis = axis  # only dims after the channels are merged or split (a ViT's patches: [B, C, H*W])
    elif op in REGROUPING and _flattens_from(x, out, axis):
        inner = _static(x.shape[axis + 1:])
        if inner is None:
            return False
        segments = tuple(Segment(s.group, s.length, s.repeat * inner) for s in layout.segments)
        return _reshaped(cg, node, Layout(axis, segments))
    elif op == "Reshape" and axis == rank - 1 and isinstance(x.shape[-1], int) and out.shape[-1] == x.shape[-1]:
        # the channels stay the last axis, whole; only the dims before them are merged or split (GPT-2's Conv1D
        # reads [batch x tokens, channels])
        new_axis = out_rank - 1
    else:
        return False
    return _reshaped(cg, node, Layout(new_axis, layout.segments))


def _reshaped(cg: ChannelGroups, node: Node, layout: Layout) -> bool:
    """The output layout of a Reshape or Flatten; a Reshape's target shape that spells the channel count out (a
    constant, or a constant part of a Concat) is recorded for shrink to rewrite."""
    if node.op_type == "Reshape":
        entry = shape_entry(node, layout.axis)
        if entry is not None:
            reader, port, index = entry
            held = int(np.asarray(reader.input(port).const).reshape(-1)[index])
            if held not in (-1, 0):
                if held != layout.size:
                    return False
                cg.reshape_entries.append((node, layout))
    cg.set_layout(node.output, layout)
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


def _size(cg: ChannelGroups, node: Node, keep) -> bool:
    """A Shape of channels reads their count, not their values. Each dim it gives must be picked out (a Gather or
    Slice by constant indices); one that is the channel axis may only go, as it is, into the target of a Reshape
    of the very value the Shape reads (torch.onnx.export's `x.flatten(2)`: Reshape(x, [Shape(x)[0:2], -1])),
    which then reads the kept count. Anywhere else the count would change behind the graph's back (a Reshape of
    other values by it), and the channels stay."""
    x, layout = node.input(0), cg.layout(node.input(0))
    picked = picked_dims(node)
    return picked is not None and all(layout.axis not in dims or _only_reshapes(picker.output, x)
                                      for picker, dims in picked)


def _only_reshapes(sizes: Value, x: Value) -> bool:
    """`sizes` (dims of `x`) reaches nothing but the target of Reshapes of `x`, through DIM_CARRIERS."""
    for user, port in sizes.uses:
        if user.domain or port < 0:
            return False
        if user.op_type == "Reshape" and port == 1 and user.input(0) is x:
            continue
        if user.op_type not in DIM_CARRIERS or (user.op_type != "Concat" and port != 0) \
                or not _only_reshapes(user.output, x):
            return False
    return True


HANDLERS = {"layer": _layer, "grouped": _grouped, "elementwise": _elementwise, "normalize": _normalize,
          "pool": _pool, "reduce": _reduce, "concat": _concat, "split": _split, "reshape": _reshape,
          "index": _index, "size": _size}
