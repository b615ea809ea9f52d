"""IR -> torch for the index, comparison, range and padding ops (their lowering handlers are
frontends/torch_indexing.py): Range, the comparisons, Where, Not, And/Or, GatherElements, GatherND, CumSum,
Pad.

Importing this module registers the emitters in torch_emit.EMITTERS.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedOpError
from ..ir.graph import Node
from .torch_emit import _Emitter, emits
from .torch_ops import COMPARE, LOGICAL, PAD_MODES

aten = torch.ops.aten


# -- emitting: IR -> torch -----------------------------------------------------------------------------------


def onnx_range(start, limit, delta) -> torch.Tensor:
    """ONNX Range with 0-d tensor or number operands; the dtype is the operands'."""
    dtype = start.dtype if isinstance(start, torch.Tensor) else None
    bounds = [b.item() if isinstance(b, torch.Tensor) else b for b in (start, limit, delta)]
    return torch.arange(*bounds, dtype=dtype)


def onnx_gather_elements(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX GatherElements: torch.gather, negative indices counted from the end."""
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index))


@emits("Range")
def _emit_range(e: _Emitter, n: Node):
    start, limit, delta = (e.scalar(v) for v in n.inputs)
    if not any(isinstance(b, fx.Node) for b in (start, limit, delta)):
        dtype = {"int64": torch.int64, "int32": torch.int32}.get(n.output.dtype, torch.float32)
        return e.call(aten.arange.start_step, start, limit, delta, dtype=dtype)
    return e.call(onnx_range, e[n.input(0)], e[n.input(1)], e[n.input(2)])


@emits(*COMPARE)
def _emit_compare(e: _Emitter, n: Node):
    a, b = n.inputs
    rhs = e.scalar(b)
    tensor_op, scalar_op = COMPARE[n.op_type]
    if not isinstance(rhs, fx.Node) and a.const is None:
        return e.call(scalar_op, e[a], rhs)
    return e.call(tensor_op, e[a], e[b])


@emits("Where")
def _emit_where(e: _Emitter, n: Node):
    return e.call(aten.where.self, e[n.input(0)], e[n.input(1)], e[n.input(2)])


@emits("Not")
def _emit_not(e: _Emitter, n: Node):
    return e.call(aten.logical_not.default, e[n.input(0)])


@emits("GatherElements")
def _emit_gather_elements(e: _Emitter, n: Node):
    return e.call(onnx_gather_elements, e[n.input(0)], e[n.input(1)], n.attrs.get("axis", 0))


@emits("CumSum")
def _emit_cumsum(e: _Emitter, n: Node):
    if n.attrs.get("exclusive", 0) or n.attrs.get("reverse", 0):
        raise UnsupportedOpError(f"CumSum {n.name!r} is exclusive or reversed, which the torch writer does not take")
    return e.call(aten.cumsum.default, e[n.input(0)], int(e.ints(n.input(1))[0]))


@emits(*LOGICAL)
def _emit_logical(e: _Emitter, n: Node):
    return e.call(LOGICAL[n.op_type], e[n.input(0)], e[n.input(1)])


def onnx_gather_nd(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """ONNX GatherND (batch_dims 0): x indexed on its leading dims by the last axis of `index`."""
    return x[tuple(index.unbind(-1))]


@emits("GatherND")
def _emit_gather_nd(e: _Emitter, n: Node):
    if n.attrs.get("batch_dims", 0):
        raise UnsupportedOpError(f"GatherND {n.name!r} has batch_dims, which the torch writer does not take")
    return e.call(onnx_gather_nd, e[n.input(0)], e[n.input(1)])


@emits("Pad")
def _emit_pad(e: _Emitter, n: Node):
    x, pads = n.input(0), e.ints(n.input(1))
    if len(n.inputs) > 3 and n.input(3) is not None:
        raise UnsupportedOpError(f"Pad {n.name!r} pads only some axes: the torch writer takes pads for all axes")
    rank = len(pads) // 2
    begins, ends = pads[:rank], pads[rank:]
    lead = next((i for i in range(rank) if begins[i] or ends[i]), rank)
    torch_pad = [p for i in reversed(range(lead, rank)) for p in (begins[i], ends[i])]
    mode = {v: k for k, v in PAD_MODES.items()}.get(n.attrs.get("mode", "constant"), None)
    if mode is None:
        raise UnsupportedOpError(f"Pad {n.name!r} has mode {n.attrs['mode']!r}, which torch cannot express")
    if mode == "constant":
        value = e.scalar(n.input(2)) if len(n.inputs) > 2 and n.input(2) is not None else 0.0
        return e.call(aten.constant_pad_nd.default, e[x], torch_pad, value)
    return e.call(aten.pad.default, e[x], torch_pad, mode)
