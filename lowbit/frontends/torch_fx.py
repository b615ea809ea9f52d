"""The torch frontend: torch.export programs (and the modules behind them) -> Graph.

`capture` (torch_capture.py) runs torch.export on an nn.Module with a dynamic
batch dimension where the model allows it, serialized and on a structural copy;
`from_exported_program` walks the exported aten graph and maps each op to its
exact ONNX equivalent (the table `HANDLERS` below). An aten op with no exact
equivalent becomes an opaque node in the `torch` domain that keeps the op and
its non-tensor arguments, so that the torch writer (`torch_emit.py`) can call
it again unchanged: nothing is lost.

Parameters, buffers and lifted constants become IR constants named by their
fully qualified names (`layer1.0.conv1.weight`), so the module lowbit writes
back has the same state_dict keys. Symbolic sizes (`x.size(0)`) become small
int64 shape computations (`Shape`, `Slice`, `Concat`), or `0`/`-1` entries of
a Reshape where that says the same thing.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..backends.torch_guard import record_fixed_dims
from ..backends.torch_ops import BINARY, UNARY
from ..errors import CaptureError
from ..ir.graph import Graph, Value
from ..ir.ops import ARITHMETIC, IR_OPSET, TORCH_DOMAIN
from ..ir.types import from_torch_dtype, to_onnx_dtype
from .torch_capture import as_example_tuple, capture, capture_program  # noqa: F401  (re-exported)
from .torch_inplace import InplaceTracker, functional_of

aten = torch.ops.aten
INT64_MAX = np.iinfo(np.int64).max


# -- capture ------------------------------------------------------------------------

def example_inputs_from_placeholders(gm: fx.GraphModule) -> tuple | None:
    """Example inputs rebuilt from the fake values torch.export leaves on placeholders."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if not vals or any(not isinstance(v, torch.Tensor) for v in vals):
        return None
    return tuple(torch.zeros([_hint(d) for d in v.shape], dtype=v.dtype) for v in vals)


def _hint(d: Any) -> int:
    if isinstance(d, int):
        return d
    try:
        return int(d.node.hint) if d.node.hint is not None else 2
    except AttributeError:
        return 2


# -- lowering -----------------------------------------------------------------------

class _Lowerer:
    def __init__(self, ep: torch.export.ExportedProgram, name: str):
        self.ep = ep
        self.graph = Graph(name, {"": IR_OPSET})
        self.env: dict[fx.Node, Any] = {}
        self.sym_names: dict[str, str] = {}
        self._dim_cache: dict[Any, int | str] = {}
        self.fx_node: fx.Node | None = None
        self._inplace: InplaceTracker | None = None

    # -- helpers used by handlers -------------------------------------------------
    def dim(self, d: Any) -> int | str:
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt) and d.node.is_constant():
            return int(d.node.maybe_as_int())
        key = getattr(getattr(d, "node", None), "expr", d)  # printing sympy is slow: cache by expression
        if key not in self._dim_cache:
            expr = str(d)
            self._dim_cache[key] = self.sym_names.get(expr, expr)
        return self._dim_cache[key]

    def type_of(self, val: Any) -> tuple[str | None, tuple | None]:
        if isinstance(val, torch.Tensor):
            return from_torch_dtype(val.dtype), tuple(self.dim(d) for d in val.shape)
        return None, None

    def val(self, arg: Any) -> Value:
        v = self.env[arg]
        if not isinstance(v, Value):
            raise TypeError(f"{arg} is not a tensor value")
        return v

    def maybe(self, arg: Any) -> Value | None:
        return None if arg is None else self.val(arg)

    def const(self, array: Any, hint: str = "c", dtype: Any = None) -> Value:
        return self.graph.add_constant(f"{self.fx_node.name}_{hint}", np.asarray(array, dtype=dtype))

    def ints(self, values: Any, hint: str = "shape") -> Value:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1), hint)

    def scalar(self, x: Any, like: Value) -> Value:
        """A tensor operand for a Python scalar (or a tensor arg) of a binary op."""
        if isinstance(x, fx.Node):
            return self.val(x)
        out_dtype = self.fx_node.meta["val"].dtype if isinstance(self.fx_node.meta.get("val"), torch.Tensor) else None
        dtype = from_torch_dtype(out_dtype) if out_dtype is not None else (like.dtype or "float32")
        return self.python_scalar(x, dtype, "scalar")

    def python_scalar(self, x: Any, dtype: Any, hint: str) -> Value:
        """A 0-d constant of `dtype` for the Python number `x`. Where `dtype` rounds it (0.044715 in float16),
        meta["torch_scalar"] keeps `x`: torch computes with the unrounded scalar, and so does the torch writer."""
        value = self.const(np.array(x, dtype=dtype), hint)
        if isinstance(x, float) and float(value.const) != x:
            value.meta["torch_scalar"] = x
        return value

    def op(self, op_type: str, inputs: list, attrs: dict | None = None, *, num_outputs: int = 1,
           domain: str = "", suffix: str = "") -> Value | list[Value]:
        """Append a node named after the fx node; its outputs take the fx node's types."""
        name = self.fx_node.name + suffix
        node = self.graph.make_node(op_type, inputs, attrs or {}, num_outputs=num_outputs, name=name,
                                    domain=domain, meta={"torch_target": str(self.fx_node.target)})
        val = self.fx_node.meta.get("val")
        if not suffix:
            vals = val if isinstance(val, (tuple, list)) else [val]
            for out, v in zip(node.outputs, vals):
                out.dtype, out.shape = self.type_of(v)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def int_list(self, items: list, reshape_of: fx.Node | None = None) -> Value:
        """A 1-D int64 value for a size list that may hold symbolic sizes.

        For a Reshape of `reshape_of`, a size that is `reshape_of.size(i)` at
        position i becomes 0 (ONNX: copy that dim), and a single remaining
        symbolic size becomes -1.
        """
        items = list(items)
        if reshape_of is not None:
            for i, it in enumerate(items):
                if (isinstance(it, fx.Node) and it.target == aten.sym_size.int and it.args[0] is reshape_of
                        and it.args[1] == i):
                    items[i] = 0
            symbolic = [i for i, it in enumerate(items) if not isinstance(it, int)]
            if len(symbolic) == 1 and -1 not in items:
                items[symbolic[0]] = -1
        if all(isinstance(it, int) for it in items):
            return self.ints(items)
        parts = [self.ints([it], "dim") if isinstance(it, int) else self.sym_value(it) for it in items]
        return self.op("Concat", parts, {"axis": 0}, suffix="_sizes")

    def sym_value(self, arg: Any) -> Value:
        """The [1]-shaped int64 value of a symbolic int."""
        v = self.env.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(v, Value):
            return v
        raise NotImplementedError(f"symbolic size {arg}")

    # -- driver ---------------------------------------------------------------------
    def run(self) -> Graph:
        ep, g = self.ep, self.graph
        sig = ep.graph_signature
        state = {**ep.state_dict, **ep.constants}
        kinds = {**{k: "parameter" for k in sig.inputs_to_parameters},
                 **{k: "buffer" for k in sig.inputs_to_buffers},
                 **{k: "constant" for k in sig.inputs_to_lifted_tensor_constants}}
        targets = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        user_inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name not in targets]
        self._name_symbols(user_inputs)
        for node in ep.graph.nodes:
            self.fx_node = node
            if node.op == "placeholder":
                if node.name in targets:
                    fqn = targets[node.name]
                    value = g.add_constant(fqn, numpy_copy(state[fqn]), unique=False)
                    value.meta.update(torch_kind=kinds[node.name], torch_name=fqn)
                    self.env[node] = value
                else:
                    val = node.meta.get("val")
                    if isinstance(val, torch.Tensor):
                        self.env[node] = g.add_input(node.name, *self.type_of(val))
                    else:
                        self.env[node] = val  # a constant non-tensor input was specialized by export
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                self._outputs(node)
            elif node.op == "get_attr":
                self.env[node] = g.add_constant(str(node.target), _get_attr(ep.graph_module, node.target))
        g.remove_unused_constants()
        g.meta.update(origin="torch", out_spec=ep.call_spec.out_spec, in_spec=ep.call_spec.in_spec)
        return g

    def _name_symbols(self, inputs: list[fx.Node]) -> None:
        """Name the symbol of dim 0 'batch' when every input shares it."""
        firsts = {str(n.meta["val"].shape[0]) for n in inputs
                  if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0
                  and not isinstance(n.meta["val"].shape[0], int)}
        if len(firsts) == 1:
            self.sym_names[firsts.pop()] = "batch"

    def _outputs(self, node: fx.Node) -> None:
        flat = torch.utils._pytree.tree_leaves(node.args[0])
        for leaf in flat:
            v = self.env.get(leaf) if isinstance(leaf, fx.Node) else None
            if not isinstance(v, Value):
                raise CaptureError(f"the model returns {leaf!r}, which is not a tensor: lowbit lowers models whose "
                                   "outputs are tensors (or nested tuples/lists/dicts of tensors)")
            self.graph.outputs.append(v)

    def call(self, node: fx.Node) -> Any:
        target = node.target
        if target is operator.getitem:
            seq = self.env[node.args[0]]
            item = seq[node.args[1]]
            if item is None:
                raise NotImplementedError(f"output {node.args[1]} of {node.args[0].target}")
            return item
        if target in _SYMBOLIC:
            return _SYMBOLIC[target](self, node)
        functional = functional_of(target)
        if functional is not None:
            return self.call_inplace(node, functional)
        return self.dispatch(node, target)

    def dispatch(self, node: fx.Node, target: Any) -> Any:
        """Lower a call of `target` (node.target, or the functional twin of an in-place node.target)."""
        handler = HANDLERS.get(target) or HANDLERS.get(getattr(target, "overloadpacket", None))
        if handler is not None:
            try:
                result = handler(self, node, *node.args, **node.kwargs)
            except _NotExact:
                result = NotImplemented
            if result is not NotImplemented:
                return result
        folded = self.fold(node, target)
        if folded is not None:
            return folded
        return self.opaque(node, target)

    def call_inplace(self, node: fx.Node, functional: Any) -> Any:
        """`y.add_(b)` as `add(y, b)`, after which every name of `y` reads the result (see torch_inplace.py)."""
        if self._inplace is None:
            self._inplace = InplaceTracker(self.ep.graph, set(self.ep.graph_signature.user_inputs))
        if not self._inplace.exact(node) or not self._keeps_dtype(node):
            return self.dispatch(node, node.target)  # aliased: an opaque in-place op, run in place by torch
        result = self.dispatch(node, functional)
        if isinstance(result, Value):
            for name in self._inplace.chain(node.args[0]):
                if name in self.env:
                    self.env[name] = result
        return result

    def _keeps_dtype(self, node: fx.Node) -> bool:
        """True if every tensor argument has the result's dtype (so the functional op computes the same type)."""
        out = node.meta.get("val")
        for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
            val = a.meta.get("val") if isinstance(a, fx.Node) else None
            if isinstance(val, torch.Tensor) and (not isinstance(out, torch.Tensor) or val.dtype != out.dtype):
                return False
        return True

    def fold(self, node: fx.Node, target: Any = None) -> Value | None:
        """Run an op whose tensor inputs are all non-parameter constants (torch.ones(n, n).tril(), ...)."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
            return None
        for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(a, fx.Node):
                v = self.env.get(a)
                if not isinstance(v, Value) or v.const is None or v.meta.get("torch_kind") == "parameter":
                    return None
        def to_tensor(a: Any) -> Any:
            return torch.from_numpy(np.array(self.env[a].const)) if isinstance(a, fx.Node) else a
        args, kwargs = torch.utils._pytree.tree_map(to_tensor, (node.args, node.kwargs))
        out = (target or node.target)(*args, **kwargs)
        value = self.const(out.detach().cpu().numpy(), "value")
        value.meta["torch_kind"] = "computed"  # from buffers and literals: a buffer of the module, not a weight
        return value

    def opaque(self, node: fx.Node, target: Any = None) -> Any:
        """Keep an aten op lowbit does not map: tensor args become inputs, the rest a template."""
        target = node.target if target is None else target
        inputs: list[Value] = []

        def encode(a: Any) -> Any:
            if isinstance(a, fx.Node):
                v = self.env[a]
                if isinstance(v, Value):
                    inputs.append(v)
                    return {"$input": len(inputs) - 1}
                if isinstance(v, list):
                    return [encode_value(x) for x in v]
                return v
            if isinstance(a, (list, tuple)):
                return [encode(x) for x in a]
            if isinstance(a, torch.dtype):
                return {"$dtype": from_torch_dtype(a)}
            if isinstance(a, torch.device):
                return {"$device": str(a)}
            if isinstance(a, torch.memory_format):
                return {"$memory_format": str(a).removeprefix("torch.")}
            if isinstance(a, torch.layout):
                return {"$layout": str(a).removeprefix("torch.")}
            if a is None or isinstance(a, (bool, int, float, str)):
                return a
            raise NotImplementedError(f"argument {a!r} of {node.target}")

        def encode_value(v: Any) -> Any:
            if isinstance(v, Value):
                inputs.append(v)
                return {"$input": len(inputs) - 1}
            return v

        attrs = {"args": encode(list(node.args)), "kwargs": {k: encode(v) for k, v in node.kwargs.items()}}
        val = node.meta.get("val")
        n_out = len(val) if isinstance(val, (tuple, list)) else 1
        attrs["multi_output"] = isinstance(val, (tuple, list))
        warnings.warn(f"lowbit: {target} (node {node.name!r}) has no exact ONNX equivalent; it is kept as an "
                      "opaque torch op that only the torch backend can run", stacklevel=4)
        return self.op(_opaque_name(target), inputs, attrs, num_outputs=n_out, domain=TORCH_DOMAIN)


class _NotExact(Exception):
    """Raised by a handler for a call it cannot map exactly; the op is kept opaque."""


def _opaque_name(target: Any) -> str:
    """aten.cumsum.default -> 'aten::cumsum.default' (what torch_emit resolves back)."""
    ns, _, rest = str(target).partition(".")
    return f"{ns}::{rest}"


def _get_attr(gm: torch.nn.Module, target: str) -> np.ndarray:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return numpy_copy(obj)


def numpy_copy(tensor: torch.Tensor, transpose: bool = False) -> np.ndarray:
    """lowbit's own copy of a tensor (transposed where asked), read-only, so that Value.const keeps it rather than
    copying it again: one copy of every weight, not two (a fresh 9 MB array costs ~15 ms of page faults here)."""
    array = tensor.detach().cpu().numpy()
    array = array.T.copy() if transpose else array.copy()
    array.flags.writeable = False
    return array


def from_exported_program(ep: torch.export.ExportedProgram, name: str = "main",
                          fixed_batch: str | None = None) -> Graph:
    """Lower an ExportedProgram (training or inference IR) into a Graph.

    `fixed_batch` (from `capture_program`) says why the program's batch is static: the graph then records
    its inputs' dim 0 as fixed, so that what lowbit writes refuses other batches (torch_guard.py).
    """
    from .torch_constants import fold_opaque_constants

    graph = _Lowerer(ep, name).run()
    fold_opaque_constants(graph)  # what opaque ops compute from constants alone (BEiT's position index)
    if fixed_batch is not None:
        record_fixed_dims(graph, fixed_batch)
    return graph


# -- symbolic ints ------------------------------------------------------------------------

def _sym_size(lw: _Lowerer, node: fx.Node) -> Value:
    x, dim = lw.val(node.args[0]), node.args[1]
    rank = x.rank
    dim = dim + rank if dim < 0 else dim
    shape = lw.op("Shape", [x], {"start": dim, "end": dim + 1}, suffix="")
    shape.dtype, shape.shape = "int64", (1,)
    return shape


def _sym_binary(op_type: str) -> Callable:
    def handler(lw: _Lowerer, node: fx.Node) -> Value:
        a, b = (lw.sym_value(x) if isinstance(x, fx.Node) else lw.ints([x], "dim") for x in node.args)
        out = lw.op(op_type, [a, b])
        out.dtype, out.shape = "int64", (1,)
        return out
    return handler


_SYMBOLIC = {aten.sym_size.int: _sym_size, operator.mul: _sym_binary("Mul"), operator.add: _sym_binary("Add"),
             operator.sub: _sym_binary("Sub"), operator.floordiv: _sym_binary("Div")}


# -- handlers: aten op -> IR ---------------------------------------------------------------

HANDLERS: dict[Any, Callable] = {}


def handles(*targets: Any) -> Callable:
    def register(fn: Callable) -> Callable:
        for t in targets:
            HANDLERS[t] = fn
        return fn
    return register


def _pair(x: Any, n: int) -> list[int]:
    x = list(x) if isinstance(x, (list, tuple)) else [x]
    return x * n if len(x) == 1 else x


@handles(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
def _conv(lw, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Conv; padding="valid" is no pads, and "same" (torch allows it at stride 1 only) dilation x (kernel - 1) in
    all per axis, the odd one at the end, as torch pads: the ONNX pads say it explicitly."""
    weight = lw.val(w)
    k = len(weight.shape) - 2
    kernel, dilations = list(weight.shape[2:]), _pair(dilation, k)
    if padding == "same":
        total = [d * (size - 1) for d, size in zip(dilations, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    elif padding == "valid":
        pads = [0] * (2 * k)
    elif isinstance(padding, str):
        return NotImplemented
    else:
        pads = _pair(padding, k) * 2
    return lw.op("Conv", [lw.val(x), weight, lw.maybe(b)],
                 {"kernel_shape": kernel, "strides": _pair(stride, k), "pads": pads, "dilations": dilations,
                  "group": groups})


@handles(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def _conv_transpose(lw, node, x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """ConvTranspose (nn.ConvTranspose2d: a decoder's upsampling); torch's padding is the same at both ends."""
    weight = lw.val(w)
    k = len(weight.shape) - 2
    return lw.op("ConvTranspose", [lw.val(x), weight, lw.maybe(b)],
                 {"kernel_shape": list(weight.shape[2:]), "strides": _pair(stride, k), "pads": _pair(padding, k) * 2,
                  "output_padding": _pair(output_padding, k), "dilations": _pair(dilation, k), "group": groups})


@handles(aten.convolution.default)
def _convolution(lw, node, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        return _conv_transpose(lw, node, x, w, b, stride, padding, output_padding, groups, dilation)
    return _conv(lw, node, x, w, b, stride, padding, dilation, groups)


def transposed_weight(lw, wv: Value) -> Value:
    """A 2-D weight constant's transpose, as a constant the IR holds (a layer reads its weight as a constant) that
    remembers the module's tensor: the torch writer keeps the module's layout and transposes it on use."""
    wt = lw.graph.add_constant(f"{wv.name}.T", np.ascontiguousarray(wv.const.T))
    wt.meta.update(torch_kind=wv.meta.get("torch_kind", "parameter"), torch_name=wv.meta.get("torch_name"),
                   torch_transposed=True)
    return wt


@handles(aten.linear.default)
def _linear(lw, node, x, w, b=None):
    xv, wv = lw.val(x), lw.val(w)
    if wv.const is None:
        return NotImplemented
    if xv.rank == 2:
        return lw.op("Gemm", [xv, wv, lw.maybe(b)], {"transB": 1})
    wt = transposed_weight(lw, wv)
    if b is None:
        return lw.op("MatMul", [xv, wt])
    mm = lw.op("MatMul", [xv, wt], suffix="_matmul")
    mm.dtype, mm.shape = lw.type_of(node.meta["val"])
    return lw.op("Add", [mm, lw.val(b)])


@handles(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(lw, node, a, b):
    return lw.op("MatMul", [lw.val(a), lw.val(b)])


@handles(aten.addmm.default)
def _addmm(lw, node, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        return NotImplemented
    return lw.op("Gemm", [lw.val(a), lw.val(b), lw.val(bias)])


def _binary(op_type: str) -> Callable:
    def handler(lw, node, a, b, alpha=1, rounding_mode=None):
        if alpha != 1 or rounding_mode is not None:
            return NotImplemented
        av = lw.scalar(a, None) if not isinstance(a, fx.Node) else lw.val(a)
        bv = lw.scalar(b, av) if not isinstance(b, fx.Node) else lw.val(b)
        out = lw.type_of(node.meta.get("val"))[0] if op_type in ARITHMETIC else None
        if av.dtype != bv.dtype or (out is not None and av.dtype != out):
            if out is None:  # a comparison of two types, or no tensor result: left to torch
                return NotImplemented
            # type promotion (float16 x float32 in T5's norm, int / int): ONNX wants the result's type on both
            av, bv = (cast_to(lw, v, out, f"_{side}") for v, side in ((av, "a"), (bv, "b")))
        return lw.op(op_type, [av, bv])
    return handler


def typed(v: Value, dtype: str | None, shape) -> Value:
    """`v` with its recorded type: an op a handler makes with a suffix (a step before the fx node's own result)
    gets none from the fx node."""
    v.dtype, v.shape = dtype, tuple(shape) if shape is not None else None
    return v


def cast_to(lw, v: Value, dtype: str, suffix: str) -> Value:
    """`v` as `dtype`: itself, or a Cast of it."""
    if v.dtype == dtype:
        return v
    return typed(lw.op("Cast", [v], {"to": to_onnx_dtype(dtype)}, suffix=f"{suffix}_cast"), dtype, v.shape)


def converted(lw, xv: Value, dtype: str) -> Value:
    """x as `dtype`, as the fx node's own result (x.to(dtype), x.type_as(y)): an Identity where it has that type
    already, else a Cast."""
    if xv.dtype == dtype:
        return lw.op("Identity", [xv])
    return lw.op("Cast", [xv], {"to": to_onnx_dtype(dtype)})


for _op, _overload in BINARY.items():
    HANDLERS[_overload.overloadpacket] = _binary(_op)
HANDLERS[aten.min.other], HANDLERS[aten.max.other] = _binary("Min"), _binary("Max")  # torch.min(a, b)


def _unary(op_type: str) -> Callable:
    def handler(lw, node, x):
        return lw.op(op_type, [lw.val(x)])
    return handler


for _op, _overload in UNARY.items():
    HANDLERS[_overload] = _unary(_op)
HANDLERS[aten.silu.default] = _unary("Swish")


@handles(aten.rsqrt.default)
def _rsqrt(lw, node, x):
    """1 / sqrt(x) (RMSNorm's): ONNX has no Rsqrt, so Sqrt then Reciprocal."""
    root = typed(lw.op("Sqrt", [lw.val(x)], suffix="_sqrt"), *lw.type_of(node.meta["val"]))
    return lw.op("Reciprocal", [root])


@handles(aten.hardsigmoid.default)
def _hardsigmoid(lw, node, x):
    return lw.op("HardSigmoid", [lw.val(x)], {"alpha": 1.0 / 6.0, "beta": 0.5})


@handles(aten.gelu.default)
def _gelu(lw, node, x, approximate="none"):
    return lw.op("Gelu", [lw.val(x)], {"approximate": approximate})


@handles(aten.relu6.default)
def _relu6(lw, node, x):
    return _clip(lw, node, x, 0.0, 6.0)


@handles(aten.hardtanh.default)
def _hardtanh(lw, node, x, min_val=-1.0, max_val=1.0):
    return _clip(lw, node, x, min_val, max_val)


@handles(aten.clamp.default)
def _clip(lw, node, x, min=None, max=None):
    xv = lw.val(x)
    if (min is not None and isinstance(min, fx.Node)) or (max is not None and isinstance(max, fx.Node)):
        return NotImplemented
    bound = [None if m is None else lw.python_scalar(m, xv.dtype, hint) for m, hint in
             ((min, "min"), (max, "max"))]
    return lw.op("Clip", [xv, *bound])


@handles(aten.clamp.Tensor)
def _clip_by_tensors(lw, node, x, min=None, max=None):
    """clamp(x, min=t, max=u) with 0-d tensor bounds (T5's float16 overflow guard) -> Clip, the bounds as x's
    type (a 0-d tensor does not change the result's type in torch)."""
    xv = lw.val(x)
    bounds = [None if b is None else lw.val(b) if isinstance(b, fx.Node) else lw.python_scalar(b, xv.dtype, hint)
              for b, hint in ((min, "min"), (max, "max"))]
    if any(b is not None and b.shape != () for b in bounds):
        return NotImplemented
    return lw.op("Clip", [xv, *(None if b is None else cast_to(lw, b, xv.dtype, f"_{hint}")
                                for b, hint in zip(bounds, ("min", "max")))])


@handles(aten.isinf.default)
def _isinf(lw, node, x):
    """isinf(x) -> Equal(Abs(x), inf): ONNX's IsInf is outside lowbit's vocabulary, and this is the same test."""
    xv = lw.val(x)
    magnitude = typed(lw.op("Abs", [xv], suffix="_abs"), xv.dtype, xv.shape)
    return lw.op("Equal", [magnitude, lw.python_scalar(float("inf"), xv.dtype, "inf")])


@handles(aten.any.default)
def _any(lw, node, x):
    """x.any() of a bool tensor -> ReduceSum(Cast(x, float32)) > 0: whether any entry is true."""
    xv = lw.val(x)
    if xv.dtype != "bool":
        return NotImplemented
    ones = cast_to(lw, xv, "float32", "")
    total = typed(lw.op("ReduceSum", [ones], {"keepdims": 0}, suffix="_count"), "float32", ())
    return lw.op("Greater", [total, lw.python_scalar(0.0, "float32", "zero")])


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(lw, node, x, dim, dtype_or_half=None):
    """Softmax; softmax(x, dim, dtype) (Gemma-2, Bloom: in float32) casts x to dtype first, as torch does."""
    xv = lw.val(x)
    if node.target == aten.softmax.int and isinstance(dtype_or_half, torch.dtype):
        xv = cast_to(lw, xv, from_torch_dtype(dtype_or_half), "_in")
    elif dtype_or_half not in (None, False):
        return NotImplemented
    return lw.op("Softmax", [xv], {"axis": dim})


@handles(aten.log_softmax.int, aten._log_softmax.default)
def _log_softmax(lw, node, x, dim, dtype_or_half=None):
    if dtype_or_half not in (None, False):
        return NotImplemented
    return lw.op("LogSoftmax", [lw.val(x)], {"axis": dim})


def _affine(lw, v, n, fill, hint):
    if v is not None:
        return lw.val(v)
    return lw.const(np.full(n, fill, dtype=np.float32), hint)


@handles(aten.batch_norm.default)
def _batch_norm(lw, node, x, w, b, mean, var, training, momentum, eps, cudnn_enabled=True):
    if training or w is None or b is None:
        return NotImplemented
    return lw.op("BatchNormalization", [lw.val(x), lw.val(w), lw.val(b), lw.val(mean), lw.val(var)],
                 {"epsilon": float(eps), "momentum": 1.0 - float(momentum)})


@handles(aten._native_batch_norm_legit_no_training.default)
def _batch_norm_legit(lw, node, x, w, b, mean, var, momentum, eps):
    if w is None or b is None:
        return NotImplemented
    out = lw.op("BatchNormalization", [lw.val(x), lw.val(w), lw.val(b), lw.val(mean), lw.val(var)],
                {"epsilon": float(eps), "momentum": 1.0 - float(momentum)}, suffix="")
    out.dtype, out.shape = lw.type_of(node.meta["val"][0])
    return [out, None, None]


@handles(aten.layer_norm.default)
def _layer_norm(lw, node, x, shape, w=None, b=None, eps=1e-5, cudnn_enable=True):
    xv = lw.val(x)
    if w is None:  # no affine weight (elementwise_affine=False): ONNX's Scale input is required, so a fixed 1
        if xv.dtype is not None and xv.dtype != "float32":
            return NotImplemented
        scale = lw.graph.add_constant(lw.graph.unique_name(f"{node.name}_scale"),
                                      np.ones([int(d) for d in shape], dtype=np.float32))
        scale.meta["torch_kind"] = "buffer"  # not a parameter the module would start to train
    else:
        scale = lw.val(w)
    return lw.op("LayerNormalization", [xv, scale, lw.maybe(b)], {"axis": -len(shape), "epsilon": float(eps)})


@handles(aten.max_pool2d.default, aten.max_pool1d.default)
def _max_pool(lw, node, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    k = len(kernel)
    pads = _pair(padding, k)
    return lw.op("MaxPool", [lw.val(x)], {"kernel_shape": list(kernel), "strides": _pair(stride or kernel, k),
                                          "pads": pads + pads, "dilations": _pair(dilation, k),
                                          "ceil_mode": int(ceil_mode)})


@handles(aten.avg_pool2d.default, aten.avg_pool1d.default)
def _avg_pool(lw, node, x, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    if divisor_override is not None:
        return NotImplemented
    k = len(kernel)
    pads = _pair(padding, k)
    xv = lw.val(x)
    kernel, stride = list(kernel), _pair(stride or kernel, k)
    spatial = list(xv.shape[-k:]) if xv.shape is not None and len(xv.shape) == k + 2 else None
    out = node.meta.get("val")
    if spatial is not None and not any(pads) and out is not None and list(out.shape[-k:]) == [1] * k:
        # one window from the corner (HuggingFace's EfficientNet pools 7x7 with a kernel of its hidden size,
        # 2560): torch clips it to the map, and so does the kernel here, which the runtimes refuse larger than the
        # map; torch computes the same sums and divisor either way
        kernel = [min(kk, d) if isinstance(d, int) else kk for kk, d in zip(kernel, spatial)]
    return lw.op("AveragePool", [xv], {"kernel_shape": kernel, "strides": stride, "pads": pads + pads,
                                       "ceil_mode": int(ceil_mode), "count_include_pad": int(count_include_pad)})


@handles(aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default)
def _adaptive_avg_pool(lw, node, x, output_size):
    if any(s != 1 for s in _pair(output_size, 1)):
        return NotImplemented
    return lw.op("GlobalAveragePool", [lw.val(x)])


@handles(aten.mean.dim)
def _mean(lw, node, x, dims, keepdim=False, dtype=None):
    if dtype is not None or not dims:
        return NotImplemented
    return lw.op("ReduceMean", [lw.val(x), lw.ints(dims, "axes")], {"keepdims": int(keepdim)})


@handles(aten.sum.default, aten.mean.default)
def _reduce_all(lw, node, x, dtype=None):
    if dtype is not None:
        return NotImplemented
    op_type = "ReduceSum" if node.target == aten.sum.default else "ReduceMean"
    return lw.op(op_type, [lw.val(x)], {"keepdims": 0})


@handles(aten.sum.dim_IntList)
def _sum(lw, node, x, dims, keepdim=False, dtype=None):
    if dtype is not None or not dims:
        return NotImplemented
    return lw.op("ReduceSum", [lw.val(x), lw.ints(dims, "axes")], {"keepdims": int(keepdim)})


@handles(aten.flatten.using_ints)
def _flatten(lw, node, x, start=0, end=-1):
    xv = lw.val(x)
    rank = xv.rank
    start, end = start % max(rank, 1), end % max(rank, 1)
    if start == 1 and end == rank - 1:
        return lw.op("Flatten", [xv], {"axis": 1})
    shape = [0] * start + [-1] + [d if isinstance(d, int) else None for d in xv.shape[end + 1:]]
    if None in shape:
        return NotImplemented
    return lw.op("Reshape", [xv, lw.ints(shape)])


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(lw, node, x, shape):
    return lw.op("Reshape", [lw.val(x), lw.int_list(shape, reshape_of=x)])


@handles(aten.permute.default)
def _permute(lw, node, x, dims):
    rank = lw.val(x).rank
    return transposed(lw, lw.val(x), [d % rank for d in dims])


@handles(aten.transpose.int)
def _transpose(lw, node, x, a, b):
    rank = lw.val(x).rank
    perm = list(range(rank))
    a, b = a % rank, b % rank
    perm[a], perm[b] = perm[b], perm[a]
    return transposed(lw, lw.val(x), perm)


@handles(aten.t.default)
def _t(lw, node, x):
    return transposed(lw, lw.val(x), [1, 0] if lw.val(x).rank == 2 else [0])


def transposed(lw, xv: Value, perm: list[int]) -> Value:
    """x with its dims in `perm`'s order. A 2-D weight swapped in forward (Falcon's `x @ self.weight.T`, w.t(),
    w.transpose(0, 1), w.permute(1, 0)) is the transposed weight as a constant, so that the MatMul reading it
    is a layer that quantizes and prunes."""
    if perm == [1, 0] and xv.const is not None and xv.meta.get("torch_kind") == "parameter" \
            and not xv.meta.get("torch_transposed"):
        return transposed_weight(lw, xv)
    return lw.op("Transpose", [xv], {"perm": perm})


@handles(aten.cat.default)
def _cat(lw, node, tensors, dim=0):
    return lw.op("Concat", [lw.val(t) for t in tensors], {"axis": dim})


@handles(aten.slice.Tensor)
def _slice(lw, node, x, dim=0, start=None, end=None, step=1):
    if isinstance(step, fx.Node):
        return NotImplemented
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end

    def bound(b, name):  # a symbolic bound (x[:, :seq_len] with a dynamic length) is its [1]-shaped value
        return lw.sym_value(b) if isinstance(b, fx.Node) else lw.ints([min(b, INT64_MAX)], name)

    return lw.op("Slice", [lw.val(x), bound(start, "starts"), bound(end, "ends"), lw.ints([dim], "axes"),
                           lw.ints([step], "steps")])


@handles(aten.select.int)
def _select(lw, node, x, dim, index):
    if isinstance(index, fx.Node):
        return NotImplemented
    return lw.op("Gather", [lw.val(x), lw.const(np.array(index, dtype=np.int64), "index")], {"axis": dim})


@handles(aten.embedding.default)
def _embedding(lw, node, weight, indices, padding_idx=-1, scale_grad=False, sparse=False):
    return lw.op("Gather", [lw.val(weight), lw.val(indices)], {"axis": 0})


@handles(aten.unsqueeze.default)
def _unsqueeze(lw, node, x, dim):
    return lw.op("Unsqueeze", [lw.val(x), lw.ints([dim], "axes")])


@handles(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(lw, node, x, dims):
    dims = [dims] if isinstance(dims, int) else list(dims)
    xv = lw.val(x)
    dims = [d for d in dims if xv.shape is None or xv.shape[d] == 1]  # torch ignores non-1 dims
    if not dims:
        return xv
    return lw.op("Squeeze", [xv, lw.ints(dims, "axes")])


@handles(aten.dropout.default)
def _dropout(lw, node, x, p, train):
    if train:
        return NotImplemented
    # the ratio is kept (ONNX's optional input) so that a generated module drops out again while it trains
    return lw.op("Dropout", [lw.val(x), lw.python_scalar(float(p), "float32", "ratio")])


@handles(aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
         aten.lift_fresh_copy.default)
def _identity(lw, node, x, *args, **kwargs):
    return lw.op("Identity", [lw.val(x)])


@handles(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
         aten.sym_constrain_range_for_size.default)
def _assert(lw, node, *args, **kwargs):
    return None


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(lw, node, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p or enable_gqa:
        return NotImplemented
    attrs: dict[str, Any] = {"is_causal": int(is_causal)}
    if scale is not None:
        attrs["scale"] = float(scale)
    return lw.op("Attention", [lw.val(q), lw.val(k), lw.val(v), lw.maybe(attn_mask)], attrs)


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(lw, node, x, sizes, dim=0):
    sizes = [t.shape[dim] for t in node.meta["val"]]
    if not all(isinstance(s, int) for s in sizes):
        return NotImplemented
    outs = lw.op("Split", [lw.val(x), lw.ints(sizes, "split")], {"axis": dim}, num_outputs=len(sizes))
    return outs if isinstance(outs, list) else [outs]


@handles(aten.unbind.int)
def _unbind(lw, node, x, dim=0):
    vals = node.meta["val"]
    parts = lw.op("Split", [lw.val(x), lw.ints([1] * len(vals), "split")], {"axis": dim}, num_outputs=len(vals),
                  suffix="_split")
    parts = parts if isinstance(parts, list) else [parts]
    axes = lw.ints([dim], "axes")
    outs = []
    for i, (part, val) in enumerate(zip(parts, vals)):
        out = lw.op("Squeeze", [part, axes], suffix=f"_{i}")
        out.dtype, out.shape = lw.type_of(val)
        outs.append(out)
    return outs


@handles(aten.expand.default)
def _expand(lw, node, x, sizes, implicit=False):
    if any(not isinstance(s, int) for s in sizes):
        shape = [1 if s == -1 else s for s in sizes]
        return lw.op("Expand", [lw.val(x), lw.int_list(shape)])
    return lw.op("Expand", [lw.val(x), lw.ints([1 if s == -1 else s for s in sizes])])


@handles(aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)
def _to(lw, node, x, *args, **kwargs):
    src, dst = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return NotImplemented
    return converted(lw, lw.val(x), from_torch_dtype(dst.dtype))


from . import torch_indexing  # noqa: E402,F401  (registers the index/compare/range/pad handlers)
from . import torch_tensors  # noqa: E402,F401  (registers the make/cast/stack/repeat handlers)
from . import torch_layers  # noqa: E402,F401  (registers the group norm, weight norm, upsampling handlers)
