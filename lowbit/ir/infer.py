"""Local type inference: the dtype and shape of a new node's outputs from its inputs.

Passes create nodes through `Graph.make_node`, which calls `infer_node` so that
new values print with their types and the writers can declare them. Only
facts that follow from the inputs alone are inferred; anything else stays
unknown (None), which every writer accepts.
"""

from __future__ import annotations

import numpy as np

from .graph import Node, Value
from .ops import DIM_CARRIERS, MATMULS, SHAPE_PICKERS, op_info, transpose_perm
from .types import Shape, from_onnx_dtype



def broadcast(a: Shape, b: Shape) -> Shape:
    if a is None or b is None:
        return None
    out = []
    for x, y in zip(((1,) * (len(b) - len(a)) + tuple(a)), ((1,) * (len(a) - len(b)) + tuple(b))):
        if x == 1 or x is None:
            out.append(y if x == 1 else None)
        elif y == 1 or x == y:
            out.append(x)
        else:  # symbolic against static: the static size wins; two different symbols: unknown
            out.append(x if isinstance(x, int) else y if isinstance(y, int) else None)
    return tuple(out)


def _matmul(a: Shape, b: Shape) -> Shape:
    if a is None or b is None or len(a) < 1 or len(b) < 2:
        return None
    batch = broadcast(tuple(a[:-2]), tuple(b[:-2])) if len(a) > 2 or len(b) > 2 else ()
    return (*batch, *(a[-2:-1] if len(a) >= 2 else ()), b[-1])


def infer_output(node: Node) -> tuple[str | None, Shape]:
    """The dtype and shape of `node`'s first output as its inputs determine them ((None, None) if they do not)."""
    ins: list[Value | None] = list(node.inputs)
    first = ins[0] if ins else None
    op = node.op_type if node.domain in ("", "ai.onnx", "org.openvinotoolkit") else None
    info = op_info(node.op_type, node.domain)
    rule = "same" if node.op_type == "FakeQuantize" and op else info.shape_rule if info is not None else None
    dtype: str | None = None
    shape: Shape = None
    if rule == "same" and first is not None:
        dtype, shape = first.dtype, first.shape
    elif rule == "broadcast" and len(ins) == 2 and all(v is not None for v in ins):
        dtype, shape = first.dtype, broadcast(ins[0].shape, ins[1].shape)
    elif rule == "compare" and len(ins) == 2 and all(v is not None for v in ins):
        dtype, shape = "bool", broadcast(ins[0].shape, ins[1].shape)
    elif op == "MatMul" and len(ins) == 2:
        dtype, shape = first.dtype, _matmul(ins[0].shape, ins[1].shape)
    elif op == "Cast" and "to" in node.attrs:
        dtype, shape = from_onnx_dtype(node.attrs["to"]), first.shape
    elif op == "Transpose" and first is not None and first.shape is not None:
        perm = transpose_perm(node, len(first.shape))
        if sorted(perm) == list(range(len(first.shape))):
            dtype, shape = first.dtype, tuple(first.shape[p] for p in perm)
    elif op == "Reshape" and len(ins) == 2 and ins[1] is not None and not node.attrs.get("allowzero", 0):
        target = shape_entries(ins[1])
        dtype, shape = first.dtype, (_reshape(first.shape, target) if target is not None else None)
    elif op == "QuantizeLinear" and len(ins) >= 3 and ins[2] is not None:
        dtype, shape = ins[2].dtype, first.shape
    elif op == "DequantizeLinear" and len(ins) >= 2 and ins[1] is not None:
        dtype, shape = ins[1].dtype, first.shape
    elif op == "Concat" and ins and all(v is not None and v.shape is not None for v in ins):
        dtype, shape = first.dtype, _concat([v.shape for v in ins], node.attrs.get("axis", 0))
    elif op == "Pad" and first is not None:
        dtype, shape = first.dtype, pad_shape(node)
    elif op == "Conv" and len(ins) >= 2 and first is not None and ins[1] is not None:
        dtype, shape = first.dtype, _conv(node, first.shape, ins[1].shape)
    elif op == "Gemm" and len(ins) >= 2 and first is not None and ins[1] is not None:
        dtype, shape = first.dtype, _gemm(node, first.shape, ins[1].shape)
    elif op == "Slice" and first is not None:
        dtype, shape = first.dtype, _slice(node, first.shape)
    elif op == "Expand" and len(ins) == 2 and first is not None and ins[1] is not None:
        target = shape_entries(ins[1])
        dtype, shape = first.dtype, (broadcast(first.shape, tuple(target)) if target is not None else None)
    return dtype, shape


def _slice(node: Node, x: Shape) -> Shape:
    """A Slice by constant starts, ends, axes and steps: each sliced dim's size where the input's is static (a
    sliced symbolic dim is unknown), the other dims as they are."""
    if x is None or len(node.inputs) < 3:
        return None
    bounds = [node.input(i) for i in range(1, 5)]
    if any(b is None or b.const is None for b in bounds[:2]) or \
            any(b is not None and b.const is None for b in bounds[2:]):
        return None
    starts, ends = (np.ravel(b.const).tolist() for b in bounds[:2])
    axes = np.ravel(bounds[2].const).tolist() if bounds[2] is not None else list(range(len(starts)))
    steps = np.ravel(bounds[3].const).tolist() if bounds[3] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps \
            or not all(-len(x) <= a < len(x) for a in axes):
        return None
    out = list(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x[axis]
        # ONNX clamps starts and ends as Python's slice.indices does
        out[axis] = len(range(*slice(start, end, step).indices(size))) if isinstance(size, int) else None
    return tuple(out)


def _conv(node: Node, x: Shape, w: Shape) -> Shape:
    """N, the weight's output channels, and each spatial size where the input's is static."""
    if x is None or w is None or len(x) != len(w) or len(x) < 3:
        return None
    k = len(x) - 2
    strides = list(node.attrs.get("strides", [1] * k))
    dilations = list(node.attrs.get("dilations", [1] * k))
    pads = list(node.attrs.get("pads", [0] * (2 * k)))
    auto = node.attrs.get("auto_pad", "NOTSET")
    spatial = []
    for i in range(k):
        size, kernel = x[2 + i], w[2 + i]
        if not isinstance(size, int) or not isinstance(kernel, int):
            spatial.append(None)
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            spatial.append(-(-size // strides[i]))
        else:
            padded = size + (pads[i] + pads[k + i] if auto == "NOTSET" else 0)
            spatial.append((padded - dilations[i] * (kernel - 1) - 1) // strides[i] + 1)
    return (x[0], w[0], *spatial)


def _gemm(node: Node, a: Shape, b: Shape) -> Shape:
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    rows = a[1] if node.attrs.get("transA", 0) else a[0]
    cols = b[0] if node.attrs.get("transB", 0) else b[1]
    return (rows, cols)


def infer_node(node: Node) -> None:
    """Fill in the unknown dtype/shape of `node`'s outputs where its inputs determine them."""
    if not node.outputs:
        return
    dtype, shape = infer_output(node)
    out = node.outputs[0]
    if out.dtype is None:
        out.dtype = dtype
    if out.shape is None:
        out.shape = shape


def _merge(recorded: Shape, inferred: Shape) -> Shape:
    """The inferred shape, keeping a recorded dim where inference does not know it (a symbolic name)."""
    if inferred is None:
        return recorded
    if recorded is None or len(recorded) != len(inferred):
        return inferred
    return tuple(i if i is not None else r for r, i in zip(recorded, inferred))


def reinfer(graph, *, only_stale: bool = False) -> int:
    """Re-derive every node's output dtype and shape from its inputs, in order, after a pass that changed
    shapes (pruning channels); returns how many values changed. What inference does not determine is kept.
    With `only_stale`, only values whose record contradicts their inputs are rewritten (a model whose own
    value_info is wrong: the PassManager mends it before the first pass, so no pass is blamed for it)."""
    changed = 0
    for node in graph:
        if not node.outputs or (only_stale and stale_type(node) is None):
            continue
        dtype, shape = infer_output(node)
        out = node.outputs[0]
        new_dtype, new_shape = dtype or out.dtype, _merge(out.shape, shape)
        if (new_dtype, new_shape) != (out.dtype, out.shape):
            out.dtype, out.shape = new_dtype, new_shape
            changed += 1
    return changed


def refine_shapes(graph) -> int:
    """Where inference gives a dim that a value's record holds as symbolic or unknown, take it: a static size,
    or the symbol of the input it follows from (an exporter's shape inference saw sizes computed at run time and
    made up names: transformers' MobileNetV2 "same" pads, torch.onnx.export's `x.view(batch, tokens, -1, 16)`);
    in order, so that what follows sees it. Recorded static dims are never changed. Returns how many values were
    refined."""
    refined = 0
    for node in graph:
        if not node.outputs:
            continue
        shape, out = infer_output(node)[1], node.outputs[0]
        if shape is None or (out.shape is not None and len(out.shape) != len(shape)):
            continue
        new = shape if out.shape is None else tuple(i if i is not None and not isinstance(r, int) else r
                                                    for r, i in zip(out.shape, shape))
        if new != out.shape:
            out.shape = new
            refined += 1
    equal = equal_dims(graph)
    if equal:
        refined += _rename_dims(graph, equal)
    return refined


def equal_dims(graph) -> dict[str, str | int]:
    """Symbolic dims that the graph's static facts prove equal to another dim (symbol -> symbol or int), where an
    exporter's shape inference named one size twice (a broadcast of two names: Swin's masked attention scores):

    - a MatMul or Gemm reads its constant weight's rows: the activation's contracted dim is that size (the model
      runs at no other);
    - a Reshape keeps the number of elements: with the symbols both sides share cancelled, one symbol left on
      each side and equal static products make the two equal, and one symbol left on one side alone is the
      static quotient.
    Names are resolved to the one a graph input uses where there is one, else the earlier one."""
    inputs = {d for v in graph.inputs if v.shape is not None for d in v.shape if isinstance(d, str)}
    equal: dict[str, str | int] = {}

    def find(d):
        while isinstance(d, str) and d in equal:
            d = equal[d]
        return d

    def unite(a, b) -> None:
        a, b = find(a), find(b)
        if a == b or (isinstance(a, int) and isinstance(b, int)):
            return
        if isinstance(a, int) or (a in inputs and b not in inputs):
            a, b = b, a  # a is renamed to b: ints and graph inputs' names win
        equal[a] = b

    while True:  # until no fact proves more (a weight read later resolves a Reshape's dim)
        known = len(equal)
        for node in graph:
            _dim_facts(node, find, unite)
        if len(equal) == known:
            break
    return {d: find(d) for d in equal}


def _dim_facts(node: Node, find, unite) -> None:
    """Unite the dims `node` proves equal (see equal_dims)."""
    ins = node.inputs
    if node.domain not in ("", "ai.onnx") or not ins or ins[0] is None or not ins[0].shape:
        return
    x, w = ins[0], ins[1] if len(ins) > 1 else None
    if node.op_type in MATMULS and w is not None and w.const is not None and w.const.ndim == 2 \
            and not (node.op_type == "Gemm" and node.attrs.get("transA", 0)):
        rows = w.const.shape[1 if node.op_type == "Gemm" and node.attrs.get("transB", 0) else 0]
        if isinstance(x.shape[-1], str):
            unite(x.shape[-1], int(rows))
        return
    if node.op_type != "Reshape" or node.outputs[0].shape is None or node.attrs.get("allowzero", 0):
        return
    a, b = [find(d) for d in x.shape], [find(d) for d in node.outputs[0].shape]
    if any(d is None for d in a + b):
        return
    for d in [d for d in a if isinstance(d, str)]:  # symbols both sides hold cancel
        if d in b:
            a.remove(d)
            b.remove(d)
    left, right = [d for d in a if isinstance(d, str)], [d for d in b if isinstance(d, str)]
    pa, pb = (int(np.prod([d for d in side if isinstance(d, int)])) for side in (a, b))
    if len(left) == 1 and len(right) == 1 and pa == pb:
        unite(right[0], left[0])
    elif len(left) + len(right) == 1 and pa and pb:
        whole, part = (pb, pa) if left else (pa, pb)  # symbol * part == whole
        if whole % part == 0:
            unite((left or right)[0], whole // part)


def _rename_dims(graph, equal: dict[str, str | int]) -> int:
    """Write each dim `equal` resolves in every value's shape; returns how many values changed."""
    changed = 0
    for v in graph.values():
        if v.shape is not None and any(isinstance(d, str) and d in equal for d in v.shape):
            v.shape = tuple(equal.get(d, d) if isinstance(d, str) else d for d in v.shape)
            changed += 1
    return changed


def stale_type(node: Node) -> str | None:
    """Why `node`'s first output's recorded dtype or shape contradicts what its inputs give, or None. Only
    facts known on both sides count: a dtype, a rank, a static dim."""
    if not node.outputs:
        return None
    out = node.outputs[0]
    dtype, shape = infer_output(node)
    if dtype is not None and out.dtype is not None and dtype != out.dtype:
        return f"dtype {out.dtype}, but its inputs give {dtype}"
    if shape is not None and out.shape is not None:
        if len(shape) != len(out.shape) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                               for a, b in zip(shape, out.shape)):
            return f"shape {tuple(out.shape)}, but its inputs give {tuple(shape)}"
    return None


def pad_shape(node: Node) -> Shape:
    """A Pad's output shape when its pads (and axes) are constants: static dims grow by their pads, a
    symbolic dim keeps its name where its pads are 0; None where the pads are computed at run time."""
    x, pads = node.input(0), node.input(1)
    axes = node.input(3) if len(node.inputs) > 3 else None
    if x.shape is None or pads is None or pads.const is None or (axes is not None and axes.const is None):
        return None
    rank = len(x.shape)
    chosen = [int(a) % rank for a in axes.const] if axes is not None else list(range(rank))
    amounts = np.asarray(pads.const, dtype=np.int64).reshape(-1)
    if amounts.size != 2 * len(chosen):
        return None
    grow = dict.fromkeys(range(rank), 0)
    for i, axis in enumerate(chosen):
        grow[axis] = int(amounts[i] + amounts[i + len(chosen)])
    return tuple(d + grow[i] if isinstance(d, int) else (d if grow[i] == 0 else None)
                 for i, d in enumerate(x.shape))


def is_legacy_empty(shape: Shape) -> bool:
    """A 1-D empty tensor: torch.cat skips one among inputs of any rank (a legacy rule ONNX does not have)."""
    return shape is not None and len(shape) == 1 and shape[0] == 0


def empty_concat_inputs(node: Node) -> list[bool]:
    """Per input of a Concat, whether it adds nothing: size 0 along the axis (the pass-through half of a rotary
    embedding that rotates every dim), or a legacy 1-D empty tensor beside inputs of another rank (transformers'
    empty key/value cache)."""
    shapes = [v.shape if v is not None else None for v in node.inputs]
    legacy = any(s is not None and len(s) != 1 for s in shapes)
    rank = len(node.output.shape) if node.output.shape is not None else None
    axis = node.attrs.get("axis", 0) % rank if rank else None
    return [s is not None and ((legacy and is_legacy_empty(s)) or (len(s) == rank and s[axis] == 0))
            for s in shapes]


def _concat(shapes: list, axis: int) -> Shape:
    kept = [s for s in shapes if not is_legacy_empty(s)]
    if not kept:
        return shapes[0]
    rank = len(kept[0])
    if rank == 0 or any(len(s) != rank for s in kept) or not -rank <= axis < rank:
        return None  # not a valid Concat: left unknown for the checker or the runtime to name
    axis %= rank
    dims = list(kept[0])
    sizes = [s[axis] for s in kept]
    dims[axis] = sum(sizes) if all(isinstance(d, int) for d in sizes) else None
    return tuple(dims)


def shape_output(shape_op: Node, dims):
    """What Shape node `shape_op` gives for its input's `dims` (a list or array): those from its start to its
    end."""
    return dims[shape_op.attrs.get("start", 0):shape_op.attrs.get("end", len(dims))]


def shape_entries(v: Value, known: dict[int, list] | None = None) -> list | None:
    """The entries of a 1-D int64 value that holds dims, each an int, a symbolic dim (its name) or None (unknown):
    a constant, or dims read with Shape, picked with a Gather or Slice by constant indices and joined with
    Unsqueeze and Concat (how torch.onnx.export writes `x.view(x.size(0), -1, 16)`); None for anything else.
    `known` gives the entries of some values by id (picked_dims: which dims a Shape's readers take)."""
    if known is not None and id(v) in known:
        return known[id(v)]
    if v.const is not None:
        return [int(d) for d in np.ravel(v.const)] if np.issubdtype(v.const.dtype, np.integer) else None
    node = v.producer
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Where":  # torch.onnx.export's expand(-1): Where(Equal(sizes, -1), 1, sizes)
        return _where_entries(node, known)
    if op == "Reshape" and node.input(1) is not None and node.input(1).const is not None \
            and np.size(node.input(1).const) == 1:  # a 1-D vector reshaped to 1-D ([-1]): the same entries
        entries = shape_entries(node.input(0), known)
        held = int(np.ravel(node.input(1).const)[0])
        return entries if entries is not None and held in (-1, len(entries)) else None
    if op == "Shape":
        shape = node.input(0).shape
        return None if shape is None else shape_output(node, list(shape))
    if op in DIM_CARRIERS or op in SHAPE_PICKERS:
        parts = [shape_entries(x, known) for x in (node.inputs if op == "Concat" else node.inputs[:1])]
        if any(p is None for p in parts):
            return None
        dims = [d for p in parts for d in p]
        if op == "Gather":
            index = node.input(1).const
            if index is None or node.attrs.get("axis", 0) != 0 or not all(-len(dims) <= i < len(dims)
                                                                          for i in np.ravel(index)):
                return None
            return [dims[int(i)] for i in np.ravel(index)]
        if op == "Slice":
            bounds = [x.const if x is not None else None for x in node.inputs[1:]]
            if len(bounds) < 2 or any(b is None or b.size != 1 for b in bounds[:2]) or \
                    any(b is not None and b.size != 1 for b in bounds[2:]):
                return None
            step = int(np.ravel(bounds[3])[0]) if len(bounds) > 3 and bounds[3] is not None else 1
            return dims[int(np.ravel(bounds[0])[0]):int(np.ravel(bounds[1])[0]):step]
        return dims
    return None


def _where_entries(node: Node, known: dict[int, list] | None) -> list | None:
    """The entries of Where(Equal(a, b), x, y) over dims: x's where a's and b's are equal, y's elsewhere; a symbolic
    dim equals no negative constant (a size is never -1) and itself, and nothing else is known."""
    cond = node.input(0).producer if node.input(0) is not None else None
    if cond is None or cond.op_type != "Equal" or cond.domain or any(v is None for v in node.inputs):
        return None
    parts = [shape_entries(u, known) for u in (cond.input(0), cond.input(1), node.input(1), node.input(2))]
    if any(p is None for p in parts):
        return None
    size = max(len(p) for p in parts)
    if any(len(p) not in (1, size) for p in parts):
        return None
    a, b, x, y = ([p[0]] * size if len(p) == 1 else p for p in parts)
    out = []
    for ai, bi, xi, yi in zip(a, b, x, y):
        if isinstance(ai, int) and isinstance(bi, int) or ai == bi:
            equal = ai == bi
        elif isinstance(ai, str) and isinstance(bi, int) and bi < 0 or isinstance(bi, str) and isinstance(ai, int) \
                and ai < 0:
            equal = False
        else:
            return None
        out.append(xi if equal else yi)
    return out


def picked_dims(shape_op: Node) -> list[tuple[Node, list[int]]] | None:
    """For a Shape node: each reader of its output with the dims of the Shape's input it picks (a Gather or Slice
    by constant indices); None where a reader is anything else (the whole shape read at once)."""
    x = shape_op.input(0)
    if x.shape is None:
        return None
    rank = len(x.shape)
    dims = shape_output(shape_op, list(range(rank)))
    picked = []
    for reader, port in shape_op.output.uses:
        if port != 0 or reader.domain or reader.op_type not in SHAPE_PICKERS:
            return None
        held = {id(reader.input(0)): dims}
        entries = shape_entries(reader.output, held)
        if entries is None:
            return None
        picked.append((reader, entries))
    return picked


def _reshape(shape: Shape, target: list) -> Shape:
    """A Reshape's output from its input's shape and target entries (ints, symbolic dims, None): a 0 copies the
    input's dim, and a -1 is what the input's dims leave once the other entries are divided out, symbols
    cancelling symbols (`[batch, 12, 32]` to `[batch, 12, -1, 16]` gives 2)."""
    out: list = []
    for i, d in enumerate(target):
        if d == 0:
            out.append(shape[i] if shape is not None and i < len(shape) else None)
        elif d == -1 or (isinstance(d, int) and d < -1):
            out.append(None)
        else:
            out.append(d)
    if -1 in target and shape is not None:
        out[target.index(-1)] = _remaining_dim(list(shape), [d for i, d in enumerate(out) if i != target.index(-1)])
    return tuple(out)


def _remaining_dim(dims: list, divided_by: list):
    """The dim that the product of `dims` leaves once divided by the product of `divided_by` (ints and symbolic
    dims), or None where it is not a whole int or one symbol."""
    if any(d is None for d in dims + divided_by):
        return None
    left = [d for d in dims if not isinstance(d, int)]
    for d in divided_by:
        if not isinstance(d, int):
            if d not in left:
                return None
            left.remove(d)
    num = int(np.prod([d for d in dims if isinstance(d, int)]))
    den = int(np.prod([d for d in divided_by if isinstance(d, int)]))
    if den == 0 or num % den:
        return None
    if not left:
        return num // den
    return left[0] if len(left) == 1 and num == den else None
