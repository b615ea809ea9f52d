"""aten ops that make, cast, stack, repeat and reshape tensors, and two fused products -> IR: the lowering
handlers for what transformers models carry beyond torch_fx's and torch_indexing's ops.

- `type_as` (Gemma, RoBERTa, MPNet), `x.T` (Falcon), `reshape_as` (LeViT);
- `torch.ones` / `torch.zeros` of symbolic sizes (OPT's and DeBERTa's attention masks), `~mask` (DeBERTa);
- `torch.stack` and `repeat_interleave` (GPT-J's interleaved rotary embedding), `repeat` (Bloom's ALiBi);
- `baddbmm` (Bloom's scores), `linalg.vector_norm` of order 1 or 2 (ConvNeXt-V2's global response norm).

Each is written with vocabulary ops (Cast, Transpose, Reshape, Expand, Unsqueeze, Concat, MatMul, Reduce*),
so that it exports to ONNX and OpenVINO; where its inputs are static, cleanup folds it to a constant.
Importing this module registers the handlers in torch_fx.HANDLERS.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.types import from_torch_dtype
from .torch_fx import converted, handles, transposed, typed

aten = torch.ops.aten


@handles(aten.type_as.default)
def _type_as(lw, node, x, other):
    """x.type_as(other) -> Cast to other's dtype (x itself where they match)."""
    dtype = lw.val(other).dtype
    return NotImplemented if dtype is None else converted(lw, lw.val(x), dtype)


@handles(aten.numpy_T.default)
def _numpy_t(lw, node, x):
    """x.T: the dims reversed (of a 2-D weight, as x.t(): a transposed constant a layer reads)."""
    return transposed(lw, lw.val(x), list(range(lw.val(x).rank))[::-1])


@handles(aten.reshape_as.default)
def _reshape_as(lw, node, x, other):
    """x.reshape_as(other) -> Reshape(x, Shape(other))."""
    ov = lw.val(other)
    shape = typed(lw.op("Shape", [ov], suffix="_shape"), "int64", (ov.rank,))
    return lw.op("Reshape", [lw.val(x), shape])


@handles(aten.ones.default, aten.zeros.default)
def _filled(lw, node, size, dtype=None, layout=None, device=None, pin_memory=None):
    """torch.ones / torch.zeros of symbolic sizes (a batch): Expand of a 0-d constant. Of static sizes, the
    lowerer folds the call to a constant (NotImplemented here), which ops reading it fold with in turn."""
    if all(isinstance(d, int) for d in size):
        return NotImplemented
    fill = 1 if node.target == aten.ones.default else 0
    return lw.op("Expand", [lw.python_scalar(fill, from_torch_dtype(node.meta["val"].dtype), "fill"),
                            lw.int_list(size)])


@handles(aten.bitwise_not.default)
def _bitwise_not(lw, node, x):
    """~mask of a bool tensor -> Not (of an int tensor it stays opaque)."""
    xv = lw.val(x)
    return lw.op("Not", [xv]) if xv.dtype == "bool" else NotImplemented


@handles(aten.stack.default)
def _stack(lw, node, tensors, dim=0):
    """torch.stack -> each tensor Unsqueezed at `dim`, then Concat."""
    values = [lw.val(t) for t in tensors]
    rank = values[0].rank + 1
    dim = dim % rank
    parts = []
    for i, v in enumerate(values):
        shape = None if v.shape is None else v.shape[:dim] + (1,) + v.shape[dim:]
        parts.append(typed(lw.op("Unsqueeze", [v, lw.ints([dim], f"axes{i}")], suffix=f"_part{i}"), v.dtype, shape))
    return lw.op("Concat", parts, {"axis": dim})


def _static_or_one_unknown(sizes: list) -> list[int] | None:
    """A Reshape target for output sizes (ints, or symbolic): -1 for the one that is not an int; None where
    two are not."""
    unknown = [i for i, s in enumerate(sizes) if not isinstance(s, int)]
    if len(unknown) > 1:
        return None
    return [s if isinstance(s, int) else -1 for s in sizes]


@handles(aten.repeat.default)
def _repeat(lw, node, x, repeats):
    """x.repeat(r0, r1, ...) (torch's tile): x as [1, d0, 1, d1, ...], expanded to [r0, d0, r1, d1, ...] and
    reshaped to [r0 * d0, r1 * d1, ...]. The repeats may be symbolic; at most one output dim may be."""
    xv, repeats = lw.val(x), list(repeats)
    out_shape = [lw.dim(d) for d in node.meta["val"].shape]
    target = _static_or_one_unknown(out_shape)
    if xv.shape is None or len(repeats) < xv.rank or target is None:
        return NotImplemented
    rank = len(repeats)
    dims = (1,) * (rank - xv.rank) + tuple(xv.shape)
    interleaved = tuple(d for pair in zip((1,) * rank, dims) for d in pair)
    spread = _unsqueezed_pairs(lw, xv, rank, interleaved)
    wide_shape = tuple(d for pair in zip(repeats, dims) for d in pair)
    sizes = lw.int_list([r for pair in zip(repeats, (1,) * rank) for r in pair])
    wide = typed(lw.op("Expand", [spread, sizes], suffix="_wide"), xv.dtype,
                  tuple(r if isinstance(r, int) else None for r in wide_shape))
    return lw.op("Reshape", [wide, lw.ints(target, "tiled")])


def _unsqueezed_pairs(lw, xv, rank: int, interleaved: tuple):
    """x ([d0, d1, ...], leading dims missing) as [1, d0, 1, d1, ...] by one Unsqueeze (keeps symbolic dims)."""
    missing = rank - xv.rank
    axes = list(range(2 * missing)) + [2 * (missing + i) for i in range(xv.rank)]
    return typed(lw.op("Unsqueeze", [xv, lw.ints(axes, "pairs")], suffix="_spread"), xv.dtype, interleaved)


@handles(aten.repeat_interleave.self_int)
def _repeat_interleave(lw, node, x, repeats, dim=None, output_size=None):
    """x.repeat_interleave(n, dim) -> each entry n times in a row along `dim`: Unsqueeze after `dim`, Expand it
    to n, Reshape the two into one. A flattening repeat (no dim), or symbolic sizes after `dim`, stay opaque."""
    xv = lw.val(x)
    if dim is None or isinstance(repeats, fx.Node) or xv.shape is None:
        return NotImplemented
    rank = xv.rank
    dim = dim % rank
    later = list(xv.shape[dim + 1:])
    if any(not isinstance(d, int) for d in later):
        return NotImplemented
    shape = xv.shape[:dim + 1] + (1,) + xv.shape[dim + 1:]
    spread = typed(lw.op("Unsqueeze", [xv, lw.ints([dim + 1], "axes")], suffix="_spread"), xv.dtype, shape)
    sizes = lw.ints([1] * (dim + 1) + [repeats] + [1] * len(later), "sizes")
    wide = typed(lw.op("Expand", [spread, sizes], suffix="_wide"), xv.dtype,
                  xv.shape[:dim + 1] + (repeats,) + xv.shape[dim + 1:])
    return lw.op("Reshape", [wide, lw.ints([0] * dim + [-1] + later, "merged")])


@handles(aten.baddbmm.default)
def _baddbmm(lw, node, x, batch1, batch2, *, beta=1, alpha=1):
    """beta * x + alpha * (batch1 @ batch2) -> MatMul, Mul by the scalars that are not 1, Add (x is not read where
    beta is 0, as torch)."""
    out_dtype, out_shape = lw.type_of(node.meta["val"])
    product = typed(lw.op("MatMul", [lw.val(batch1), lw.val(batch2)], suffix="_product"), out_dtype, out_shape)
    if alpha != 1:
        product = typed(lw.op("Mul", [product, lw.python_scalar(alpha, out_dtype, "alpha")], suffix="_alpha"),
                         out_dtype, out_shape)
    if beta == 0:
        return lw.op("Identity", [product])
    xv = lw.val(x)
    if beta != 1:
        xv = typed(lw.op("Mul", [xv, lw.python_scalar(beta, out_dtype, "beta")], suffix="_beta"), xv.dtype, xv.shape)
    return lw.op("Add", [xv, product])


@handles(aten.linalg_vector_norm.default)
def _vector_norm(lw, node, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """torch.linalg.vector_norm of order 2 (Sqrt of ReduceSum of squares) or 1 (ReduceSum of Abs); other orders
    and a dtype stay opaque."""
    if ord not in (1, 2) or dtype is not None:
        return NotImplemented
    xv = lw.val(x)
    axes = list(range(xv.rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    if ord == 2:
        return lw.op("Sqrt", [sum_of_squares(lw, xv, axes, keepdim)])
    magnitude = typed(lw.op("Abs", [xv], suffix="_abs"), xv.dtype, xv.shape)
    return lw.op("ReduceSum", [magnitude, lw.ints(axes, "axes")], {"keepdims": int(keepdim)})


def sum_of_squares(lw, xv, axes: list[int], keepdims: bool):
    """ReduceSum of x * x over `axes` (an L2 norm's before its Sqrt), typed."""
    axes = sorted({a % xv.rank for a in axes})
    shape = None if xv.shape is None else tuple(
        1 if i in axes else d for i, d in enumerate(xv.shape) if keepdims or i not in axes)
    square = typed(lw.op("Mul", [xv, xv], suffix="_square"), xv.dtype, xv.shape)
    return typed(lw.op("ReduceSum", [square, lw.ints(axes, "axes")], {"keepdims": int(keepdims)}, suffix="_sum"),
                 xv.dtype, shape)
