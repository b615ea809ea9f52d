"""Channel dependency groups over the IR: the channels that must be removed together.

A group is a set of channels tied one to one across the graph: the output
channels (filters) of one or more layers, several where a residual Add or a
squeeze-excite Mul joins their outputs, and every place those channels are
read: the next layers' input channels, BatchNormalization and LayerNorm
parameters, biases, depthwise convs (whose channels pass through), constant
per-channel operands; a grouped Conv's (or ConvTranspose's) filters are a group of G blocks, and
the channels it reads lose as many channels from each of its G input blocks
(`Group.blocks`). Channels are followed with the op table's channel flow
(`lowbit/ir/ops.py`):

- a Concat lays its inputs' channels side by side, so a reader of its output
  reads each group at an offset;
- a Flatten before a Gemm repeats each channel over the spatial size;
- a Transpose, Squeeze, Unsqueeze or Gather on another axis moves the channel
  axis;
- a Split or Slice of the channel axis (constant sizes or bounds) gives each
  output the channels of its range: a group it cuts through becomes one group
  per part (`ChannelGroups.refine`; Phi-3's chunked gate and up projections
  are tied again by their product), and its sizes follow the cut (shrink.py).

What cannot be followed blocks the groups that reach it, with the reason: an
opaque op, a Reshape that mixes channels, a Split of the channel axis inside a
group joined to others, a graph output (its shape is kept), a MatMul of two
activations (attention).
`channel_groups(graph)` does the analysis and changes nothing.
"""

from __future__ import annotations

from ..ir.graph import Graph, Node
from ..ir.ops import channel_flow, is_fake_quantize, weight_in_axis, weight_out_axis
from .flows import HANDLERS
from .heads import HeadStructure, find_heads
from .layout import ChannelGroups, Group, Layout, Member, Segment, layer_path

__all__ = ["ChannelGroups", "Group", "Layout", "Member", "Segment", "channel_groups", "layer_path"]


def channel_groups(graph: Graph, keep: set[str] = frozenset()) -> ChannelGroups:
    """The channel dependency groups of `graph`; the filters of layers named in `keep` are never pruned."""
    cg = ChannelGroups(graph)
    structures, kept = find_heads(graph)
    group_of, tables = {}, set()
    for structure in structures:
        group_of[id(structure)] = _add_heads(cg, structure, keep, tables)
    for structure in structures:  # attentions sharing a per-head term (T5's position bias): the same heads go
        for other in structure.tied:
            cg.union(group_of[id(structure)], group_of[id(other)])
    for node in graph:
        _visit(cg, node, keep, kept.get(node.name))
    for v in graph.outputs:
        cg.block(cg.layout(v), f"they reach the graph output {v.name!r}, whose shape is kept")
    for _, (v, layout) in list(cg.layouts.items()):
        if any(port < 0 for _, port in v.uses):
            cg.block(layout, f"a subgraph reads {v.name!r}")
    return cg


def _add_heads(cg: ChannelGroups, structure: HeadStructure, keep, tables: set) -> int:
    """One group of an attention's heads (see heads.py): its projections' filters, per head, and the output
    projection's input channels; returns the group. A per-head table several attentions read is a member once
    (`tables`: those added)."""
    projections = [mm for mm, _ in structure.projections]
    g = cg.new(structure.heads, projections[0])
    cg._producers[g] = list(projections)
    for mm, add in structure.projections:
        segments = (Segment(g, structure.heads, structure.widths[id(mm)]),) * structure.outer
        cg.members.append(Member(mm, 1, weight_out_axis(mm) % 2, segments, "out"))
        if add is not None:
            port = next(i for i, v in enumerate(add.inputs) if v is not None and v.const is not None)
            cg.members.append(Member(add, port, 0, segments, "param"))
        elif mm.op_type == "Gemm" and len(mm.inputs) > 2 and mm.input(2) is not None:
            cg.members.append(Member(mm, 2, 0, segments, "param"))
        cg.head_projections.add(id(mm))
    out = structure.out_projection
    cg.members.append(Member(out, 1, weight_in_axis(out) % 2, (Segment(g, structure.heads, structure.out_width),),
                             "in"))
    for reader, port, axis in structure.tables:  # a term per head on the scores (a relative position bias table)
        if (id(reader), port) not in tables:
            tables.add((id(reader), port))
            cg.members.append(Member(reader, port, axis, (Segment(g, structure.heads, 1),), "param"))
    cg.heads.append((g, structure))
    excluded = [n.name for n in [*projections, out] if n.name in keep]
    if excluded:
        cg.block_ids([g], f"the attention projection {excluded[0]!r} is excluded from pruning")
    return g


# -- following channels through one node ------------------------------------------------------------------

def _visit(cg: ChannelGroups, node: Node, keep, blocked_because: str | None = None) -> None:
    if is_fake_quantize(node):  # QAT with masks: a weight's is its layer's (flows.py), an activation's passes
        layout = cg.layout(node.input(0))
        if layout is not None and all(v is not None and v.const is not None and v.const.size == 1
                                      for v in node.inputs[1:5]):
            cg.set_layout(node.output, layout)
        elif layout is not None:
            cg.block(layout, f"the per-channel activation quantizer {node.name!r} holds them")
        return
    flow = channel_flow(node)
    if not any(cg.layout(v) is not None for v in node.inputs) and flow not in ("layer", "grouped"):
        return  # nothing tracked reaches this node, and it makes no channels
    handler = HANDLERS.get(flow)
    if handler is None or handler(cg, node, keep) is False:
        cg.block_inputs(node, blocked_because or "{node} does not let lowbit follow channels through it")


