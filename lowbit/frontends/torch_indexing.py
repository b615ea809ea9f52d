"""aten index, comparison, range and padding ops -> IR: the lowering handlers (the emitters back to torch are
backends/torch_indexing.py).

These are the ops HuggingFace transformers models carry besides their layers:
the attention mask built from `arange(seq) >= 0` (BERT, DistilBERT, ViT),
`gather` of position ids (BERT), `pad` before a strided conv (MobileNetV2,
Swin), `x[:, index]` and `roll` (Swin's window shifts) and `masked_fill`
(Swin's shifted-window attention mask). Lowered to their ONNX ops,
they export to ONNX and OpenVINO and fold to constants where their inputs
are static; left opaque, they blocked every export.

Importing this module registers the handlers in torch_fx.HANDLERS.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..backends.torch_ops import PAD_MODES
from ..ir.types import from_torch_dtype
from .torch_fx import cast_to, handles, typed

aten = torch.ops.aten


# -- lowering: aten -> IR ------------------------------------------------------------------------------------


def _operands(lw, a, b):
    """Two tensor operands of a comparison: a Python number takes the other operand's dtype."""
    av = lw.val(a) if isinstance(a, fx.Node) else None
    bv = lw.val(b) if isinstance(b, fx.Node) else None
    if av is None:
        av = lw.const(np.array(a, dtype=bv.dtype), "scalar")
    if bv is None:
        bv = lw.const(np.array(b, dtype=av.dtype), "scalar")
    return (av, bv) if av.dtype == bv.dtype else None


def _compare(op_type: str):
    def handler(lw, node, a, b):
        operands = _operands(lw, a, b)
        if operands is None:  # mixed dtypes: ONNX comparisons take one type
            return NotImplemented
        if op_type != "NotEqual":
            return lw.op(op_type, list(operands))
        equal = lw.op("Equal", list(operands), suffix="_equal")
        equal.dtype, equal.shape = "bool", lw.type_of(node.meta["val"])[1]
        return lw.op("Not", [equal])
    return handler


for _packet, _op in ((aten.ge, "GreaterOrEqual"), (aten.le, "LessOrEqual"), (aten.ne, "NotEqual"),
                     (aten.eq, "Equal"), (aten.lt, "Less"), (aten.gt, "Greater")):
    handles(_packet.Scalar, _packet.Tensor)(_compare(_op))


def _scalar_operand(lw, x, dtype: str, hint: str):
    """A 0-d operand of Range: a constant for a Python number, a reshaped symbolic size for an fx node."""
    if isinstance(x, fx.Node):
        v = lw.val(x)
        if v.shape != ():
            v = lw.op("Reshape", [v, lw.ints([], f"{hint}_scalar")], suffix=f"_{hint}")
            v.dtype, v.shape = lw.val(x).dtype, ()
        return cast_to(lw, v, dtype, f"_{hint}")
    return lw.const(np.array(x, dtype=dtype), hint)


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(lw, node, *args, **kwargs):
    bounds = list(args) + [kwargs[k] for k in ("start", "end", "step") if k in kwargs]
    bounds = [b for b in bounds if isinstance(b, (int, float, fx.Node))]
    if not 1 <= len(bounds) <= 3:
        return NotImplemented
    start, end, step = ([0] + bounds + [1])[:3] if len(bounds) == 1 else (bounds + [1])[:3]
    dtype = from_torch_dtype(node.meta["val"].dtype)
    operands = [_scalar_operand(lw, b, dtype, hint) for b, hint in ((start, "start"), (end, "limit"),
                                                                     (step, "delta"))]
    return lw.op("Range", operands)


@handles(aten.gather.default)
def _gather_elements(lw, node, x, dim, index, sparse_grad=False):
    return lw.op("GatherElements", [lw.val(x), lw.val(index)], {"axis": dim})




def _onnx_pads(pad: list[int], rank: int) -> list[int]:
    """torch's (last dim first) begin/end pairs -> ONNX's begins of every dim, then ends."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return begins + ends


@handles(aten.pad.default, aten.constant_pad_nd.default)
def _pad(lw, node, x, pad, mode="constant", value=None):
    if isinstance(mode, (int, float)):  # constant_pad_nd(x, pad, value)
        mode, value = "constant", mode
    if mode not in PAD_MODES or any(not isinstance(p, int) for p in pad):
        return NotImplemented
    xv = lw.val(x)
    inputs = [xv, lw.ints(_onnx_pads(list(pad), len(xv.shape)), "pads")]
    if mode == "constant" and value:
        inputs.append(lw.const(np.array(value, dtype=xv.dtype), "value"))
    return lw.op("Pad", inputs, {"mode": PAD_MODES[mode]})


@handles(aten.index.Tensor)
def _index(lw, node, x, indices):
    picked = [(axis, i) for axis, i in enumerate(indices) if i is not None]
    if any(lw.val(i).dtype not in ("int64", "int32") for _, i in picked):  # a boolean mask
        return NotImplemented
    if len(picked) == 1:
        axis, index = picked[0]
        return lw.op("Gather", [lw.val(x), lw.val(index)], {"axis": axis})
    if [axis for axis, _ in picked] != list(range(len(picked))):  # advanced indices not leading: not a GatherND
        return NotImplemented
    return _gather_nd(lw, node, lw.val(x), [lw.val(i) for _, i in picked])


def _gather_nd(lw, node, x, indices):
    """x[i0, i1, ...] (index tensors on the leading dims, broadcast together) -> GatherND of the stacked indices."""
    total = indices[0]
    for k, index in enumerate(indices[1:]):  # Add broadcasts: its shape is the indices' common shape
        total = lw.op("Add", [total, index], suffix=f"_broadcast{k}")
    shape = lw.op("Shape", [total], suffix="_shape")
    columns = []
    for k, index in enumerate(indices):
        expanded = lw.op("Expand", [index, shape], suffix=f"_expand{k}")
        columns.append(lw.op("Unsqueeze", [expanded, lw.ints([-1], f"axis{k}")], suffix=f"_column{k}"))
    stacked = lw.op("Concat", columns, {"axis": -1}, suffix="_stacked")
    return lw.op("GatherND", [x, stacked])


@handles(aten.cumsum.default)
def _cumsum(lw, node, x, dim, dtype=None):
    xv = lw.val(x)
    out_dtype = from_torch_dtype(node.meta["val"].dtype)
    xv = cast_to(lw, xv, out_dtype, "")  # torch sums bools and small ints as int64; ONNX CumSum keeps its type
    return lw.op("CumSum", [xv, lw.const(np.array(dim, dtype=np.int64), "axis")])


@handles(aten.diff.default)
def _diff(lw, node, x, n=1, dim=-1, prepend=None, append=None):
    if n != 1:
        return NotImplemented
    parts = [lw.val(v) for v in (prepend, x, append) if v is not None]
    xv = parts[0] if len(parts) == 1 else lw.op("Concat", parts, {"axis": dim}, suffix="_joined")
    big = np.iinfo(np.int64).max
    later = lw.op("Slice", [xv, lw.ints([1], "one"), lw.ints([big], "end"), lw.ints([dim], "dim")], suffix="_later")
    earlier = lw.op("Slice", [xv, lw.ints([0], "zero"), lw.ints([-1], "last"), lw.ints([dim], "dim_")],
                    suffix="_earlier")
    return lw.op("Sub", [later, earlier])


@handles(aten.new_ones.default, aten.new_zeros.default)
def _new_filled(lw, node, x, size, dtype=None, layout=None, device=None, pin_memory=None):
    if any(not isinstance(d, int) for d in size):
        return NotImplemented
    val = node.meta["val"]
    fill = np.ones if node.target == aten.new_ones.default else np.zeros
    return lw.op("Identity", [lw.const(fill(tuple(size), dtype=from_torch_dtype(val.dtype)), "filled")])


for _packet, _op in ((aten.__and__, "And"), (aten.bitwise_and, "And"), (aten.logical_and, "And"),
                     (aten.__or__, "Or"), (aten.bitwise_or, "Or"), (aten.logical_or, "Or")):
    for _overload in ("Tensor", "default"):
        if hasattr(_packet, _overload):
            handles(getattr(_packet, _overload))(lambda lw, node, a, b, _op=_op: (
                lw.op(_op, [lw.val(a), lw.val(b)]) if isinstance(a, fx.Node) and isinstance(b, fx.Node)
                and lw.val(a).dtype == "bool" == lw.val(b).dtype else NotImplemented))


@handles(aten.roll.default)
def _roll(lw, node, x, shifts, dims=()):
    """torch.roll along dims of static size: the last `shift` entries, then the rest (Slice, Slice, Concat per
    dim), as Swin shifts its windows. A roll of the flattened tensor (no dims) or by a symbolic shift stays
    opaque."""
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    v = lw.val(x)
    if not dims or len(shifts) != len(dims) or v.shape is None \
            or any(not isinstance(s, int) or not isinstance(v.shape[d], int) or v.shape[d] < 1
                   for s, d in zip(shifts, dims)):
        return NotImplemented
    rank = len(v.shape)
    moves = [(s % v.shape[d], d % rank) for s, d in zip(shifts, dims) if s % v.shape[d]]
    if not moves:
        return lw.op("Identity", [v])
    for k, (shift, dim) in enumerate(moves):
        size = v.shape[dim]

        def part(start, end, label):
            out = lw.op("Slice", [v, lw.ints([start], f"{label}{k}_start"), lw.ints([end], f"{label}{k}_end"),
                                  lw.ints([dim], f"{label}{k}_axis")], suffix=f"_{label}{k}")
            out.dtype, out.shape = v.dtype, v.shape[:dim] + (end - start,) + v.shape[dim + 1:]
            return out

        parts = [part(size - shift, size, "tail"), part(0, size - shift, "head")]
        last = k == len(moves) - 1
        v_next = lw.op("Concat", parts, {"axis": dim}, suffix="" if last else f"_rolled{k}")
        if not last:
            v_next.dtype, v_next.shape = v.dtype, v.shape
        v = v_next
    return v


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(lw, node, x, mask, value):
    """x.masked_fill(mask, value) -> Where(mask, value, x) (a tensor value must be 0-d, as torch requires)."""
    xv = lw.val(x)
    if isinstance(value, fx.Node):
        fill = lw.val(value)
        if fill.dtype != xv.dtype:
            return NotImplemented
    else:
        fill = lw.const(np.array(value, dtype=xv.dtype), "value")
    return lw.op("Where", [lw.val(mask), fill, xv])


@handles(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(lw, node, condition, a, b):
    """torch.where(condition, a, b) -> Where; a Python number takes the output's dtype (T5's relative-position
    buckets, a mask's fill)."""
    dtype = from_torch_dtype(node.meta["val"].dtype)
    operands = [lw.val(v) if isinstance(v, fx.Node) else lw.python_scalar(v, dtype, hint)
                for v, hint in ((a, "x"), (b, "y"))]
    if any(v.dtype != dtype for v in operands):  # type promotion: ONNX's Where takes one type
        return NotImplemented
    return lw.op("Where", [lw.val(condition), *operands])


@handles(aten.full_like.default)
def _full_like(lw, node, x, fill_value, **kwargs):
    """torch.full_like(x, v) -> Expand(v, Shape(x)): a constant where x's shape is static (cleanup folds it)."""
    if isinstance(fill_value, fx.Node):
        return NotImplemented
    shape = typed(lw.op("Shape", [lw.val(x)], suffix="_shape"), "int64", (len(node.meta["val"].shape),))
    value = lw.python_scalar(fill_value, from_torch_dtype(node.meta["val"].dtype), "value")
    return lw.op("Expand", [value, shape])
