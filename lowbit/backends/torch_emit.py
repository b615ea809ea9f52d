"""The torch writer: Graph -> torch.fx.GraphModule of aten ops.

Each IR op is emitted as the aten op the torch frontend maps to it (`Conv` ->
`aten.conv2d`, `Gemm` -> `aten.linear`, `Swish` -> `aten.silu`, ...), so
torch -> IR -> torch computes bit for bit what the original did. Constants
become parameters (weights; trainable, for QAT) or buffers, under the fully
qualified names they had in the original module where known. Opaque torch
nodes call their original op again with their recorded arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from ..errors import UnsupportedOpError
from ..ir.graph import Graph, Node, Value
from ..ir.ops import TORCH_DOMAIN, is_fake_quantize, transpose_perm
from ..ir.types import is_float
from ..patterns import Any as AnyValue
from ..patterns import Const, P, match_at
from .torch_guard import FIXED_DIMS, FIXED_REASON, check_input_dims
from .torch_ops import BINARY, SCALAR_RHS, UNARY

aten = torch.ops.aten
INT64_MAX = np.iinfo(np.int64).max


# Helpers that generated code calls for ONNX semantics torch has no single op for.
def to_torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an IR dtype name ("float32" -> torch.float32)."""
    return getattr(torch, dtype)


def onnx_reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX Reshape with a runtime shape tensor (0 copies the input dim)."""
    dims = [x.shape[i] if s == 0 else s for i, s in enumerate(shape.tolist())]
    return x.reshape(dims)


def onnx_slice(x: torch.Tensor, starts: Any, ends: Any, axes: list[int], steps: list[int]) -> torch.Tensor:
    """ONNX Slice whose starts/ends are runtime tensors (x[:, :seq_len] with a dynamic length)."""
    starts = starts.tolist() if isinstance(starts, torch.Tensor) else list(starts)
    ends = ends.tolist() if isinstance(ends, torch.Tensor) else list(ends)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        x = x[(slice(None),) * (axis % x.dim()) + (slice(int(start), int(end), int(step)),)]
    return x


def onnx_expand(x: torch.Tensor, shape: Any) -> torch.Tensor:
    """ONNX Expand: numpy-style broadcast of x against `shape`."""
    dims = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(int(d) for d in dims)))


def onnx_gather(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Gather: x indexed along `axis` by an index tensor of any rank."""
    axis = axis % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = torch.index_select(x, axis, index.reshape(-1))
    return picked.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1:])


def shape_tensor(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """ONNX Shape(start, end) as an int64 tensor."""
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


class _Emitter:
    def __init__(self, graph: Graph, on_value: Callable[[str, torch.Tensor], None] | None = None,
                 fake_quantize: str = "module"):
        self.graph = graph
        self.on_value = on_value  # streaming: called with (name, tensor) for each graph output as computed
        self.fake_quantize = fake_quantize  # "module" (lowbit's trainable FakeQuantize), "native", "dequantize"
        self.merged_bn: dict[str, str] = {}  # BN node name -> module path, of BNs merged into a Conv (torch_bn_merge)
        self._notified: set[int] = set()
        self.fx = fx.Graph()
        self.env: dict[int, Any] = {}
        self.root: dict[str, torch.Tensor] = {}
        self._modules: set[str] = set()  # submodule paths implied by dotted names in root
        self.names: dict[str, str] = {}
        self.consumed: set[int] = set()
        # unified-scale group (FakeQuantize meta) -> (the module its FakeQuantizes call, (levels, grid, learning),
        # low, high)
        self.unified: dict[Any, tuple[str, tuple, np.ndarray, np.ndarray]] = {}

    # -- values ---------------------------------------------------------------
    def __getitem__(self, v: Value | None) -> Any:
        if v is None:
            return None
        if id(v) not in self.env:
            if v.const is None:
                raise UnsupportedOpError(f"value {v.name!r} is used before it is computed")
            if v.meta.get("torch_transposed") and v.const.ndim == 2:
                # a Linear weight the IR holds as W.T: the module keeps the user's layout, transposed on use
                original = self.fx.get_attr(self._register(v, np.ascontiguousarray(v.const.T)))
                self.env[id(v)] = self.call(aten.t.default, original)
            else:
                self.env[id(v)] = self.fx.get_attr(self._register(v))
        return self.env[id(v)]

    def scalar(self, v: Value | None) -> Any:
        """A Python number for a 0-d constant (as torch scalar args want), else the tensor."""
        if v is not None and v.const is not None and v.const.ndim == 0:
            exact = v.meta.get("torch_scalar")  # the unrounded Python number, while the constant still holds it
            if exact is not None and np.array(exact, dtype=v.const.dtype) == v.const:
                return exact
            return v.const.item()
        return self[v]

    def ints(self, v: Value | None) -> list[int] | None:
        if v is None:
            return None
        if v.const is None:
            raise UnsupportedOpError(f"the torch writer needs {v.name!r} to be a constant")
        return [int(i) for i in v.const.reshape(-1)]

    def _register(self, v: Value, array: np.ndarray | None = None, kind: str | None = None) -> str:
        array = v.const if array is None else array
        name = v.meta.get("torch_name") or v.name
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", name) or self._clash(name):
            name = self.fresh_path(v.name, "c")
        # a contiguous copy in torch's own (64-byte aligned) memory: oneDNN's results depend on the weights' layout
        # and alignment in the last bits, so a module rebuilt from a saved state computes bit for bit what the
        # saved one did
        tensor = torch.tensor(np.asarray(array))  # (np.ascontiguousarray would make a 0-d constant 1-d)
        trainable = kind or v.meta.get("torch_kind", "parameter" if is_float(v.dtype) and array.ndim >= 1 else "buffer")
        self.root[name] = torch.nn.Parameter(tensor) if trainable == "parameter" else tensor
        parts = name.split(".")
        self._modules.update(".".join(parts[:i]) for i in range(1, len(parts)))
        self.names.setdefault(v.name, name)
        return name

    def tensor(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A tensor the module holds under a fresh name made of `name` (not one of the graph's constants), read."""
        path = self.fresh_path(name)
        self.root[path] = tensor
        return self.fx.get_attr(path)

    def fresh_path(self, name: str, prefix: str = "m") -> str:
        """An attribute name made of `name` (`prefix`_ before a leading digit) that nothing in the module takes."""
        path = re.sub(r"[^0-9A-Za-z_]", "_", name)
        path = f"{prefix}_{path}" if not path or path[0].isdigit() else path
        base, i = path, 0
        while self._clash(path):
            i += 1
            path = f"{base}_{i}"
        return path

    def _clash(self, name: str) -> bool:
        """True if `name` is taken, or is a module path of a taken name, or a taken name is its module path."""
        parts = name.split(".")
        return name in self.root or name in self._modules or any(
            ".".join(parts[:i]) in self.root for i in range(1, len(parts)))

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.fx.call_function(target, args, kwargs)

    def _notify(self, v: Value) -> None:
        self._notified.add(id(v))
        self.call(self.on_value, v.name, self.env[id(v)])

    def _streaming_module(self) -> fx.GraphModule:
        """forward() hands each graph output to `on_value` as soon as it is computed and returns nothing,
        so a tapped intermediate is freed once the model no longer needs it (a calibration run that kept every
        tap alive spent a quarter of BERT's forward in page faults)."""
        for v in self.graph.outputs:
            if id(v) not in self._notified:
                self._notify(v)
        self.fx.output(None)
        return fx.GraphModule(self.root, self.fx, class_name="LowbitStream").eval()

    # -- driver ----------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        fixed = self.graph.meta.get(FIXED_DIMS) or {}
        for v in self.graph.inputs:
            self.env[id(v)] = self.fx.placeholder(re.sub(r"[^0-9A-Za-z_]", "_", v.name))
            if v.name in fixed:  # refuse sizes the model was not captured for (torch_guard.py)
                dims = tuple((int(axis), int(size)) for axis, size in fixed[v.name])
                reason = str(self.graph.meta.get(FIXED_REASON, "the model fixes it"))
                self.env[id(v)] = self.call(check_input_dims, self.env[id(v)], v.name, dims, reason)
        for node in self.graph:
            if id(node) in self.consumed:
                continue
            if node.domain == TORCH_DOMAIN:
                outs = emit_opaque(self, node)
            elif is_fake_quantize(node):
                outs = emit_fake_quantize(self, node)
            elif node.domain in ("", "ai.onnx") and node.op_type in EMITTERS:
                outs = EMITTERS[node.op_type](self, node)
            else:
                raise UnsupportedOpError(
                    f"node {node.name!r} is {node.qualified_op}, which the torch writer cannot emit: "
                    "write this graph as ONNX or OpenVINO instead")
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for v, o in zip(node.outputs, outs):
                self.env[id(v)] = o
                if self.on_value is not None and v.is_graph_output and id(v) not in self._notified:
                    self._notify(v)
        if self.on_value is not None:
            return self._streaming_module()
        results = [self[v] for v in self.graph.outputs]
        spec = self.graph.meta.get("out_spec")
        if spec is not None and spec.num_leaves == len(results) and not spec.is_leaf():
            # rebuilt when the module runs, from real tensors: the model's own output type (a transformers
            # ModelOutput, a DynamicCache) cannot be built from fx Nodes at codegen
            self.fx._codegen = _FlatInputsTreeOutput(_PyTreeInfo([], None, spec))
            self.fx.output(results)
        else:
            self.fx.output(results[0] if len(results) == 1 else tuple(results))
        gm = fx.GraphModule(self.root, self.fx, class_name="LowbitModule").eval()  # BatchNorm and Dropout modules too
        gm.lowbit_names = dict(self.names)  # IR constant / FakeQuantize node name -> attribute path in gm
        keep_on_copy(gm, "lowbit_names")
        return gm


class _FlatInputsTreeOutput(_PyTreeCodeGen):
    """fx codegen: forward() takes the graph inputs as they are and returns `tree_unflatten(outputs, out_spec)`."""

    def process_inputs(self, *inputs: Any) -> Any:
        return list(inputs)

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **kwargs: Any) -> str:
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, **kwargs)


def keep_on_copy(gm: fx.GraphModule, name: str) -> None:
    """Make attribute `name` survive copy.deepcopy of the GraphModule (fx drops unknown attributes)."""
    gm.meta.setdefault("_user_preserved_attributes", {})[name] = getattr(gm, name)


def to_torch(graph: Graph, on_value: Callable[[str, torch.Tensor], None] | None = None,
             fake_quantize: str = "module") -> fx.GraphModule:
    """Write a Graph as an fx.GraphModule whose forward takes the graph inputs in order.

    With `on_value`, forward() instead calls `on_value(name, tensor)` for each graph output as soon as it is
    computed and returns None (how calibration streams tapped values into its statistics).
    `fake_quantize` says how FakeQuantize nodes are written: "module" (lowbit's trainable FakeQuantize
    module), "native" (torch.fake_quantize_per_tensor/per_channel_affine on the same grid, as QDQ writes it)
    or "dequantize" (as "native", with constant weights stored as integers and dequantized on use)."""
    if fake_quantize not in FAKE_QUANTIZE_FORMS:
        raise ValueError(f"fake_quantize={fake_quantize!r}: one of {FAKE_QUANTIZE_FORMS}")
    return _Emitter(graph, on_value, fake_quantize).run()


FAKE_QUANTIZE_FORMS = ("module", "native", "dequantize")


# -- emitters ---------------------------------------------------------------------

EMITTERS: dict[str, Callable[[_Emitter, Node], Any]] = {}


def emits(*op_types: str) -> Callable:
    def register(fn: Callable) -> Callable:
        for op in op_types:
            EMITTERS[op] = fn
        return fn
    return register


def _spatial(node: Node, key: str, k: int, default: int) -> list[int]:
    return list(node.attrs.get(key, [default] * k))


def _sym_pads(node: Node, k: int) -> list[int]:
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpError(f"node {node.name!r} uses auto_pad={node.attrs['auto_pad']}: the torch writer "
                                 "needs explicit pads")
    pads = _spatial(node, "pads", 2 * k, 0)
    if pads[:k] != pads[k:]:
        raise UnsupportedOpError(f"node {node.name!r} has asymmetric pads {pads}, which torch's op cannot express")
    return pads[:k]


@emits("Conv")
def _conv(e: _Emitter, n: Node):
    if n.meta.get("bn_merge"):
        from .torch_bn_merge import emit_merged_conv, simulated_folding

        if simulated_folding(n):
            return emit_merged_conv(e, n)
    return _conv_call(e, n, e[n.input(1)], e[n.input(2)])


def _conv_call(e: _Emitter, n: Node, weight, bias):
    """The convolution; pads that differ at the two ends of an axis (padding="same" with an even kernel, a model
    converted from TensorFlow) become a zero pad of the input first, which torch's conv cannot take itself."""
    k = len(n.input(1).shape) - 2
    target = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[k]
    x, pads = e[n.input(0)], _spatial(n, "pads", 2 * k, 0)
    if n.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and pads[:k] != pads[k:]:
        # constant_pad_nd takes (begin, end) pairs from the last axis back
        x = e.call(aten.constant_pad_nd.default, x, [p for axis in reversed(range(k)) for p in (pads[axis],
                                                                                            pads[k + axis])], 0.0)
        pads = [0] * k
    else:
        pads = _sym_pads(n, k)
    return e.call(target, x, weight, bias, _spatial(n, "strides", k, 1), pads, _spatial(n, "dilations", k, 1),
                  n.attrs.get("group", 1))


@emits("ConvTranspose")
def _conv_transpose(e: _Emitter, n: Node):
    """torch's conv_transpose; its padding is the same at both ends of an axis, and `output_shape` must be
    spelled out as ONNX's pads and output_padding (UnsupportedOpError otherwise)."""
    k = len(n.input(1).shape) - 2
    if "output_shape" in n.attrs:
        raise UnsupportedOpError(f"node {n.name!r} gives ConvTranspose an output_shape: the torch writer needs its "
                                 "pads and output_padding")
    target = {1: aten.conv_transpose1d.default, 2: aten.conv_transpose2d.input, 3: aten.conv_transpose3d.input}[k]
    return e.call(target, e[n.input(0)], e[n.input(1)], e[n.input(2)], _spatial(n, "strides", k, 1),
                  _sym_pads(n, k), _spatial(n, "output_padding", k, 0), n.attrs.get("group", 1),
                  _spatial(n, "dilations", k, 1))


# MatMul by a 2-D float weight, then an Add of a 1-D bias on its right that alone reads it: one aten.linear,
# as torch's own nn.Linear lowers (x @ W.T + b in one call, bit for bit)
LINEAR_BIAS = P("Add", P("MatMul", AnyValue("x"), Const("weight", where=lambda w: w.ndim == 2 and w.dtype.kind == "f"),
                         name="matmul"),
                Const("bias", where=lambda b: b.ndim == 1),
                where=lambda add: add.input(0).producer is not None and add.input(0).producer.op_type == "MatMul")


def _linear_bias(mm: Node) -> Node | None:
    """The Add that adds a bias to MatMul `mm`'s output as LINEAR_BIAS describes, or None."""
    add = mm.output.users[0] if len(mm.output.uses) == 1 else None
    found = match_at(LINEAR_BIAS, add) if add is not None else None
    if found is None or found["matmul"] is not mm:
        return None
    return add if found["bias"].const.shape == (found["weight"].const.shape[-1],) else None


@emits("MatMul")
def _matmul(e: _Emitter, n: Node):
    a, b = n.inputs
    if b.const is None or b.const.ndim != 2 or not is_float(b.dtype):
        return e.call(aten.matmul.default, e[a], e[b])
    weight = e.fx.get_attr(e._register(b, np.ascontiguousarray(b.const.T)))
    add = _linear_bias(n)
    if add is None:
        return e.call(aten.linear.default, e[a], weight)
    e.consumed.add(id(add))
    out = e.call(aten.linear.default, e[a], weight, e[add.input(1)])
    e.env[id(add.output)] = out
    return out


@emits("Gemm")
def _gemm(e: _Emitter, n: Node):
    a, b, c = n.input(0), n.input(1), n.input(2)
    alpha, beta = n.attrs.get("alpha", 1.0), n.attrs.get("beta", 1.0)
    trans_a, trans_b = n.attrs.get("transA", 0), n.attrs.get("transB", 0)
    x = e.call(aten.t.default, e[a]) if trans_a else e[a]
    if trans_b and alpha == 1.0 and beta == 1.0 and (c is None or c.rank == 1):
        return e.call(aten.linear.default, x, e[b], e[c])
    w = e[b] if trans_b == 0 else e.call(aten.t.default, e[b])
    if c is None:
        out = e.call(aten.mm.default, x, w)
        return out if alpha == 1.0 else e.call(aten.mul.Tensor, out, alpha)
    return e.call(aten.addmm.default, e[c], x, w, beta=beta, alpha=alpha)


@emits(*BINARY)
def _binary(e: _Emitter, n: Node):
    a, b = n.inputs
    rhs = e.scalar(b)
    if n.op_type in SCALAR_RHS and not isinstance(rhs, fx.Node) and a.const is None:
        return e.call(SCALAR_RHS[n.op_type], e[a], rhs)
    return e.call(BINARY[n.op_type], e[a], e[b])


@emits(*UNARY)
def _unary(e: _Emitter, n: Node):
    return e.call(UNARY[n.op_type], e[n.input(0)])


@emits("Swish")
def _swish(e: _Emitter, n: Node):
    alpha = n.attrs.get("alpha", 1.0)
    x = e[n.input(0)]
    if alpha == 1.0:
        return e.call(aten.silu.default, x)
    return e.call(aten.mul.Tensor, x, e.call(aten.sigmoid.default, e.call(aten.mul.Tensor, x, alpha)))


@emits("HardSigmoid")
def _hardsigmoid(e: _Emitter, n: Node):
    alpha, beta = n.attrs.get("alpha", 0.2), n.attrs.get("beta", 0.5)
    x = e[n.input(0)]
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return e.call(aten.hardsigmoid.default, x)
    return e.call(aten.clamp.default, e.call(aten.add.Tensor, e.call(aten.mul.Tensor, x, alpha), beta), 0.0, 1.0)


@emits("Gelu")
def _gelu(e: _Emitter, n: Node):
    return e.call(aten.gelu.default, e[n.input(0)], approximate=n.attrs.get("approximate", "none"))


@emits("Clip")
def _clip(e: _Emitter, n: Node):
    lo, hi = e.scalar(n.input(1)), e.scalar(n.input(2))
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return e.call(aten.clamp.Tensor, e[n.input(0)], e[n.input(1)], e[n.input(2)])
    return e.call(aten.clamp.default, e[n.input(0)], lo, hi)


@emits("Softmax", "LogSoftmax")
def _softmax(e: _Emitter, n: Node):
    target = aten.softmax.int if n.op_type == "Softmax" else aten.log_softmax.int
    return e.call(target, e[n.input(0)], n.attrs.get("axis", -1))


@emits("BatchNormalization")
def _batch_norm(e: _Emitter, n: Node):
    module = e.merged_bn.get(n.name) or _batch_norm_module(e, n)
    if module is not None:  # train() makes it normalize by batch statistics and update its running ones
        return e.fx.call_module(module, (e[n.input(0)],))
    for stat in n.inputs[3:5]:  # running statistics are buffers, never trained
        if stat.const is not None and id(stat) not in e.env:
            e.env[id(stat)] = e.fx.get_attr(e._register(stat, kind=stat.meta.get("torch_kind", "buffer")))
    x, w, b, mean, var = (e[v] for v in n.inputs[:5])
    return e.call(aten.batch_norm.default, x, w, b, mean, var, False, 1.0 - n.attrs.get("momentum", 0.9),
                  n.attrs.get("epsilon", 1e-5), True)


BATCH_NORM_SLOTS = ("weight", "bias", "running_mean", "running_var")


def _batch_norm_module(e: _Emitter, n: Node) -> str | None:
    """A BatchNormalization whose parameters and statistics are constants only it reads becomes an
    nn.BatchNorm module (under the user's module path where the names give it, `layer1.0.bn1`), so the generated
    module fine-tunes as the user's did; returns its path, or None to emit it as a function."""
    x, params = n.input(0), n.inputs[1:5]
    rank = len(x.shape) if x.shape is not None else None
    if len(params) != 4 or rank not in (2, 3, 4, 5) or n.attrs.get("training_mode") or any(
            v is None or v.const is None or id(v) in e.env or len(v.uses) != 1 for v in params):
        return None
    names = [v.meta.get("torch_name") or v.name for v in params]
    prefixes = {name.removesuffix("." + slot) for name, slot in zip(names, BATCH_NORM_SLOTS) if name.endswith(slot)}
    path = prefixes.pop() if len(prefixes) == 1 and all(nm.endswith(s) for nm, s in zip(names, BATCH_NORM_SLOTS)) \
        else None
    if path is None or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", path) or e._clash(path):
        path = e.fresh_path(n.name)
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[rank]
    bn = cls(params[0].const.shape[0], eps=n.attrs.get("epsilon", 1e-5), momentum=1.0 - n.attrs.get("momentum", 0.9))
    for v, slot in zip(params, BATCH_NORM_SLOTS):
        tensor = torch.tensor(np.asarray(v.const))
        setattr(bn, slot, torch.nn.Parameter(tensor) if slot in ("weight", "bias") else tensor)
        e.names.setdefault(v.name, f"{path}.{slot}")
    e.root[path] = bn
    parts = path.split(".")
    e._modules.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return path


@emits("LayerNormalization")
def _layer_norm(e: _Emitter, n: Node):
    scale = n.input(1)
    axis = n.attrs.get("axis", -1)
    rank = n.input(0).rank
    shape = list(scale.shape) if axis in (-len(scale.shape), rank - len(scale.shape) if rank else None) else None
    if shape is None:
        raise UnsupportedOpError(f"LayerNormalization {n.name!r}: the scale shape does not match axis {axis}")
    return e.call(aten.layer_norm.default, e[n.input(0)], shape, e[scale], e[n.input(2)],
                  n.attrs.get("epsilon", 1e-5))


@emits("MaxPool")
def _max_pool(e: _Emitter, n: Node):
    kernel = list(n.attrs["kernel_shape"])
    k = len(kernel)
    if len(n.outputs) > 1 and n.outputs[1].uses:
        raise UnsupportedOpError(f"MaxPool {n.name!r}: its Indices output has no torch equivalent")
    target = {1: aten.max_pool1d.default, 2: aten.max_pool2d.default, 3: aten.max_pool3d.default}[k]
    return e.call(target, e[n.input(0)], kernel, _spatial(n, "strides", k, 1), _sym_pads(n, k),
                  _spatial(n, "dilations", k, 1), bool(n.attrs.get("ceil_mode", 0)))


@emits("AveragePool")
def _avg_pool(e: _Emitter, n: Node):
    kernel = list(n.attrs["kernel_shape"])
    k = len(kernel)
    target = {1: aten.avg_pool1d.default, 2: aten.avg_pool2d.default, 3: aten.avg_pool3d.default}[k]
    return e.call(target, e[n.input(0)], kernel, _spatial(n, "strides", k, 1), _sym_pads(n, k),
                  bool(n.attrs.get("ceil_mode", 0)), bool(n.attrs.get("count_include_pad", 0)))


@emits("GlobalAveragePool")
def _global_avg_pool(e: _Emitter, n: Node):
    k = n.input(0).rank - 2
    target = {1: aten.adaptive_avg_pool1d.default, 2: aten.adaptive_avg_pool2d.default,
              3: aten.adaptive_avg_pool3d.default}[k]
    return e.call(target, e[n.input(0)], [1] * k)


@emits("Resize")
def _resize(e: _Emitter, n: Node):
    """Resize of the two spatial dims of a [N, C, H, W] tensor to its recorded output size: bilinear (ONNX's
    linear with align_corners or pytorch_half_pixel) or nearest (asymmetric, floor), the ones torch computes."""
    x, out = n.input(0), n.output
    size = list(out.shape[2:]) if out.shape is not None and x.rank == 4 else None
    mode = n.attrs.get("mode", "nearest")
    transform = n.attrs.get("coordinate_transformation_mode", "half_pixel")
    if size is None or any(not isinstance(d, int) for d in size) or list(out.shape[:2]) != list(x.shape[:2]):
        raise UnsupportedOpError(f"Resize {n.name!r}: the torch writer resizes the spatial dims of a 4-D tensor "
                                 "to a static size only")
    if mode == "linear" and transform in ("align_corners", "pytorch_half_pixel"):
        return e.call(aten.upsample_bilinear2d.vec, e[x], size, transform == "align_corners", None)
    if mode == "nearest" and transform == "asymmetric" and n.attrs.get("nearest_mode", "round_prefer_floor") == "floor":
        return e.call(aten.upsample_nearest2d.vec, e[x], size, None)
    raise UnsupportedOpError(f"Resize {n.name!r} ({mode}, {transform}) has no torch equivalent: torch resizes "
                             "bilinear with align_corners or pytorch_half_pixel, or nearest asymmetric with floor")


def _axes(e: _Emitter, n: Node) -> list[int] | None:
    if n.input(1) is not None:
        return e.ints(n.input(1))
    return list(n.attrs["axes"]) if "axes" in n.attrs else None


@emits("ReduceMean", "ReduceSum")
def _reduce(e: _Emitter, n: Node):
    axes = _axes(e, n)
    target = aten.mean.dim if n.op_type == "ReduceMean" else aten.sum.dim_IntList
    keepdims = bool(n.attrs.get("keepdims", 1))
    if not axes:
        if not keepdims:
            return e.call(aten.sum.default if n.op_type == "ReduceSum" else aten.mean.default, e[n.input(0)])
        axes = list(range(n.input(0).rank))
    return e.call(target, e[n.input(0)], axes, keepdims)


@emits("Flatten")
def _flatten(e: _Emitter, n: Node):
    axis = n.attrs.get("axis", 1)
    if axis == 1:
        return e.call(aten.flatten.using_ints, e[n.input(0)], 1)
    if axis == 0:
        return e.call(aten.reshape.default, e[n.input(0)], [1, -1])
    lead = e.call(aten.flatten.using_ints, e[n.input(0)], 0, axis - 1)
    return e.call(aten.flatten.using_ints, lead, 1)


@emits("Reshape")
def _reshape(e: _Emitter, n: Node):
    x, shape = n.inputs[:2]
    if shape.const is None:
        return e.call(onnx_reshape, e[x], e[shape])
    dims = [e.call(aten.sym_size.int, e[x], i) if s == 0 else s for i, s in enumerate(e.ints(shape))]
    return e.call(aten.reshape.default, e[x], dims)


@emits("Transpose")
def _transpose(e: _Emitter, n: Node):
    return e.call(aten.permute.default, e[n.input(0)], transpose_perm(n, n.input(0).rank))


@emits("Concat")
def _concat(e: _Emitter, n: Node):
    return e.call(aten.cat.default, [e[v] for v in n.inputs], n.attrs["axis"])


@emits("Slice")
def _slice(e: _Emitter, n: Node):
    x = e[n.input(0)]
    if n.input(1).const is None or n.input(2).const is None:  # runtime bounds
        count = n.input(3).const.size if n.input(3) is not None and n.input(3).const is not None else None
        axes = e.ints(n.input(3)) or list(range(count or 1))
        steps = e.ints(n.input(4)) or [1] * len(axes)
        if any(st < 1 for st in steps):
            raise UnsupportedOpError(f"Slice {n.name!r} has a negative step: the torch writer takes positive steps")
        return e.call(onnx_slice, x, e[n.input(1)], e[n.input(2)], axes, steps)
    starts, ends = e.ints(n.input(1)), e.ints(n.input(2))
    axes = e.ints(n.input(3)) or list(range(len(starts)))
    steps = e.ints(n.input(4)) or [1] * len(starts)
    for s, t, a, st in zip(starts, ends, axes, steps):
        if st < 1:
            raise UnsupportedOpError(f"Slice {n.name!r} has step {st}: the torch writer takes positive steps only")
        x = e.call(aten.slice.Tensor, x, a, s, min(t, INT64_MAX), st)
    return x


@emits("Gather")
def _gather(e: _Emitter, n: Node):
    data, index = n.inputs
    axis = n.attrs.get("axis", 0)
    if index.const is not None and index.const.ndim == 0:
        return e.call(aten.select.int, e[data], axis, int(index.const))
    if data.const is not None and axis == 0 and data.rank == 2:
        return e.call(aten.embedding.default, e[data], e[index])
    return e.call(onnx_gather, e[data], e[index], axis)


@emits("Unsqueeze")
def _unsqueeze(e: _Emitter, n: Node):
    axes = _axes(e, n)
    out_rank = n.input(0).rank + len(axes) if n.input(0).rank is not None else None
    x = e[n.input(0)]
    for a in sorted(a % out_rank if out_rank else a for a in axes):
        x = e.call(aten.unsqueeze.default, x, a)
    return x


@emits("Squeeze")
def _squeeze(e: _Emitter, n: Node):
    axes = _axes(e, n)
    if not axes:
        return e.call(aten.squeeze.default, e[n.input(0)])
    return e.call(aten.squeeze.dims, e[n.input(0)], axes)


@emits("Dropout", "Identity")
def _identity(e: _Emitter, n: Node):
    ratio = n.input(1) if n.op_type == "Dropout" and len(n.inputs) > 1 else None
    if ratio is not None and ratio.const is not None and ratio.const.size == 1 and float(ratio.const) > 0 \
            and (len(n.inputs) < 3 or n.input(2) is None) and len(n.outputs) == 1:
        # an nn.Dropout: the identity in eval(), dropping out again when the generated module trains
        path = e.fresh_path(n.name)
        e.root[path] = torch.nn.Dropout(float(e.scalar(ratio)))  # the exact Python number where it was one
        return e.fx.call_module(path, (e[n.input(0)],))
    return [e[n.input(0)]] + [None] * (len(n.outputs) - 1)


@emits("Attention")
def _attention(e: _Emitter, n: Node):
    q, k, v = (e[x] for x in n.inputs[:3])
    kwargs: dict[str, Any] = {"is_causal": bool(n.attrs.get("is_causal", 0))}
    if "scale" in n.attrs:
        kwargs["scale"] = n.attrs["scale"]
    return e.call(aten.scaled_dot_product_attention.default, q, k, v, e[n.input(3)], **kwargs)


@emits("Split")
def _split(e: _Emitter, n: Node):
    axis = n.attrs.get("axis", 0)
    if n.input(1) is not None:
        sizes = e.ints(n.input(1))
    elif "split" in n.attrs:
        sizes = list(n.attrs["split"])
    else:
        total = n.input(0).shape[axis]
        count = len(n.outputs)
        if not isinstance(total, int):
            raise UnsupportedOpError(f"Split {n.name!r}: the torch writer needs a static size on axis {axis}")
        chunk = -(-total // count)
        sizes = [min(chunk, total - i * chunk) for i in range(count)]
    parts = e.call(aten.split_with_sizes.default, e[n.input(0)], sizes, axis)
    import operator

    return [e.call(operator.getitem, parts, i) for i in range(len(sizes))]


@emits("Expand")
def _expand(e: _Emitter, n: Node):
    shape = n.input(1)
    return e.call(onnx_expand, e[n.input(0)], e.ints(shape) if shape.const is not None else e[shape])


@emits("Cast")
def _cast(e: _Emitter, n: Node):
    from ..ir.types import from_onnx_dtype

    return e.call(aten._to_copy.default, e[n.input(0)], dtype=to_torch_dtype(from_onnx_dtype(n.attrs["to"])))


@emits("Shape")
def _shape(e: _Emitter, n: Node):
    return e.call(shape_tensor, e[n.input(0)], n.attrs.get("start", 0), n.attrs.get("end"))


@emits("Constant")
def _constant(e: _Emitter, n: Node):
    value = n.attrs.get("value")
    if value is None:
        raise UnsupportedOpError(f"Constant {n.name!r}: only the 'value' form is supported by the torch writer")
    tmp = Value(n.output.name)
    tmp.const = np.asarray(value)
    return e.fx.get_attr(e._register(tmp))


def emit_fake_quantize(e: _Emitter, n: Node):
    from .torch_fq import fake_quantize

    low, high = n.input(1), n.input(2)
    if low.const is None or high.const is None:
        raise UnsupportedOpError(f"FakeQuantize {n.name!r}: the torch writer needs constant ranges")
    if e.fake_quantize != "module":
        return _native_fake_quantize(e, n)
    x = e[n.input(0)]
    from .torch_bn_merge import merged_conv

    kind = (int(n.attrs["levels"]), n.meta.get("grid"), n.meta.get("learning", "range"))
    group = n.meta.get("unified")
    name = _shared_quantizer(e, group, kind, low.const, high.const)
    if name is None:  # the first FakeQuantize of its group (or of none) makes the module the group calls
        name = e.fresh_path(n.name)
        e.root[name] = fake_quantize(kind[0], torch.from_numpy(np.array(low.const)),
                                     torch.from_numpy(np.array(high.const)), grid=kind[1], learning=kind[2])
        e._modules.add(name)
        if group is not None and group not in e.unified:
            e.unified[group] = (name, kind, low.const, high.const)
    e.names[n.name] = name
    if merged_conv(n) is not None:  # the merged Conv calls it, on the BN-scaled weight (torch_bn_merge.py)
        return x
    return e.fx.call_module(name, (x,))


def _shared_quantizer(e: _Emitter, group: Any, kind: tuple, low: np.ndarray, high: np.ndarray) -> str | None:
    """The module of `group` when this FakeQuantize has its grid and learns as it does (a group whose members a
    pass gave different grids keeps them apart: the module computes what the graph says)."""
    shared = e.unified.get(group) if group is not None else None
    if shared is None:
        return None
    name, shared_kind, shared_low, shared_high = shared
    same = shared_kind == kind and np.array_equal(shared_low, low) and np.array_equal(shared_high, high)
    return name if same else None


def _native_fake_quantize(e: _Emitter, n: Node):
    """torch's own fake-quantize op on the grid QDQ writes (qdq.qdq_params); with "dequantize", a constant weight
    becomes an integer buffer and (q - zero_point) * scale."""
    from .qdq import grid_ends, grid_integers, qdq_params, quantize_array

    levels = int(n.attrs["levels"])
    p = qdq_params(levels, n.input(1).const, n.input(2).const)
    signed = p.zero_point.dtype == np.int8
    qmin, qmax = grid_integers(levels, p)
    x = n.input(0)
    if e.fake_quantize == "dequantize" and x.const is not None:
        q = e.fx.get_attr(e._register(x, quantize_array(x.const, p, levels), kind="buffer"))
        shape = [1] * x.const.ndim
        if p.axis is not None:
            shape[p.axis] = -1
        scale = e.tensor(f"{n.name}_scale", torch.tensor(p.scale.reshape(shape)))
        zero = e.tensor(f"{n.name}_zero_point", torch.tensor(p.zero_point.astype(np.float32).reshape(shape)))
        dtype = to_torch_dtype(x.dtype) if x.dtype else torch.float32
        shifted = e.call(aten.sub.Tensor, e.call(aten._to_copy.default, q, dtype=dtype), zero)
        return e.call(aten.mul.Tensor, shifted, scale)
    # torch.onnx.export takes only the full 8-bit ranges: a narrower grid (255 levels, a 7-bit overflow fix, 4
    # bits) is clipped to its own ends first, then quantized on the full range with the same scale and zero point
    full_min, full_max = (-128, 127) if signed else (0, 255)
    value = e[x]
    if (qmin, qmax) != (full_min, full_max):
        ends = grid_ends(levels, p)
        if p.axis is None:
            value = e.call(aten.clamp.default, value, float(ends[0]), float(ends[1]))
        else:
            shape = [1] * len(x.shape) if x.shape is not None else [1]
            shape[p.axis] = -1
            bounds = [e.tensor(f"{n.name}_{label}", torch.tensor(end.astype(np.float32).reshape(shape)))
                      for end, label in zip(ends, ("low", "high"))]
            value = e.call(aten.clamp.Tensor, value, *bounds)
    if p.axis is None:
        return e.call(torch.fake_quantize_per_tensor_affine, value, float(p.scale), int(p.zero_point), full_min,
                      full_max)
    return e.call(torch.fake_quantize_per_channel_affine, value, e.tensor(f"{n.name}_scale", torch.tensor(p.scale)),
                  e.tensor(f"{n.name}_zero_point", torch.tensor(p.zero_point.astype(np.int32))), p.axis, full_min,
                  full_max)


# -- opaque torch ops ---------------------------------------------------------------

_OP_PART = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*")  # an identifier, never a dunder


def _resolve(op_name: str, node_name: str | None = None) -> Callable:
    """'aten::cumsum.default' -> torch.ops.aten.cumsum.default, and nothing but a registered operator overload.

    The name comes from a graph (an ONNX file, the text form), so it is not trusted: namespace, op and
    overload must be identifiers (no dunders), each lookup step must give torch's own operator type
    (namespace -> packet -> overload) and the overload must be the op it was asked for. Anything else
    (`import_module::__self__.load_library`, `higher_order::cond`, a misspelt op) raises
    UnsupportedOpError here, at codegen time, before any generated module can run.
    """
    ns, sep, rest = op_name.partition("::")
    name, _, overload = rest.partition(".")
    overload = overload or "default"
    target = None
    if sep and all(_OP_PART.fullmatch(p) for p in (ns, name, overload)):
        try:
            namespace = getattr(torch.ops, ns)
            packet = getattr(namespace, name) if isinstance(namespace, torch._ops._OpNamespace) else None
            if isinstance(packet, torch._ops.OpOverloadPacket):
                target = getattr(packet, overload)
        except (AttributeError, RuntimeError):
            target = None
    if not (isinstance(target, torch._ops.OpOverload) and target.namespace == ns
            and target._overloadpacket._qualified_op_name == f"{ns}::{name}"):
        where = f"node {node_name!r}: " if node_name is not None else ""
        raise UnsupportedOpError(
            f"{where}opaque torch op {op_name!r} is not a registered torch operator overload "
            "('namespace::op.overload', e.g. 'aten::cumsum.default'): only registered torch operators can be "
            "emitted. Fix the op name, or load the library that registers the op before codegen")
    return target


def emit_opaque(e: _Emitter, n: Node):
    def decode(a: Any) -> Any:
        if isinstance(a, dict):
            if "$input" in a:
                return e[n.input(a["$input"])]
            if "$dtype" in a:
                return to_torch_dtype(a["$dtype"])
            if "$device" in a:
                return torch.device(a["$device"])
            if "$memory_format" in a:
                return getattr(torch, a["$memory_format"])
            if "$layout" in a:
                return getattr(torch, a["$layout"])
            return {k: decode(v) for k, v in a.items()}
        if isinstance(a, list):
            return [decode(x) for x in a]
        return a

    target = _resolve(n.op_type, n.name)
    out = e.fx.call_function(target, tuple(decode(n.attrs.get("args", []))), decode(n.attrs.get("kwargs", {})))
    if n.attrs.get("multi_output"):
        import operator

        return [e.call(operator.getitem, out, i) for i in range(len(n.outputs))]
    return out


from . import torch_indexing  # noqa: E402,F401  (registers the index/compare/range/pad emitters)
