"""The stable text form of a graph: `print_graph` writes it, `parse_graph` reads it back.

One statement a line, in topological order, so that two graphs diff line by line:

    graph "resnet" opset {"": 21}
    input %x: float32[batch,3,224,224]
    const %conv1.weight: float32[64,3,7,7] = sha256:1f0c2a9b7d3e4f51
    const %two: float32[] = [2.0]
    node conv1 = Conv(%x, %conv1.weight, _) {"group": 1, "strides": [2, 2]} -> %conv1: float32[batch,64,112,112]
    output %fc

Names that are not plain identifiers are JSON-quoted (`%"onnx::Conv_3"`);
`_` is an omitted optional input; attributes are JSON with sorted keys. A
node's annotations (facts a pass recorded that are not semantics, such as
its fusion group) follow as `# {"fused": ...}`.
Constants of up to `INLINE_LIMIT` elements are written in full; larger ones by
a digest of their bytes, so a changed weight shows in a diff. To parse those
back, pass their arrays as `constants={name: array}`.

The parser takes any string: whatever is wrong with it (bad syntax, JSON
nested too deep, numbers too big, tagged attributes that do not decode, a
graph that does not verify) raises `TextParseError` naming the line, and
nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

import numpy as np

from ..errors import GraphError, TextParseError
from .graph import Graph, Node, Value
from .types import DTYPES, Shape

INLINE_LIMIT = 8
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_DIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INT64 = (-(2 ** 63), 2 ** 63 - 1)


# -- printing -------------------------------------------------------------------

def _name(name: str) -> str:
    return name if _PLAIN.match(name) else json.dumps(name)


def _type(v: Value) -> str:
    dtype = v.dtype or "?"
    if v.shape is None:
        return dtype
    dims = []
    for d in v.shape:
        if d is None:
            dims.append("?")
        elif isinstance(d, str):
            dims.append(d if _DIM.match(d) else json.dumps(d))
        else:
            dims.append(str(int(d)))
    return f"{dtype}[{','.join(dims)}]"


def digest(array: np.ndarray) -> str:
    """A short content hash of an array (dtype, shape and bytes)."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def _const_body(array: np.ndarray) -> str:
    if array.size <= INLINE_LIMIT and array.dtype.kind in "biuf":
        return json.dumps(array.reshape(-1).tolist())
    return f"sha256:{digest(array)}"


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": obj.dtype.name, "shape": list(obj.shape), "data": obj.reshape(-1).tolist()}}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if hasattr(obj, "SerializeToString"):  # an onnx GraphProto/TensorProto attribute
        return {"__proto__": type(obj).__name__, "data": base64.b64encode(obj.SerializeToString()).decode()}
    return obj


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def _decode(obj: Any) -> Any:
    """Undo `_encode`; raises ValueError naming what does not decode (the parser makes it a TextParseError)."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            spec = obj["__ndarray__"]
            if not (isinstance(spec, dict) and {"dtype", "shape", "data"} <= spec.keys()
                    and isinstance(spec["dtype"], str) and isinstance(spec["shape"], list)
                    and all(type(d) is int and 0 <= d <= INT64[1] for d in spec["shape"])):
                raise ValueError('an "__ndarray__" needs {"dtype": a name, "shape": [ints >= 0], "data": [...]}')
            try:
                if np.dtype(spec["dtype"]).kind not in "biufc":  # no objects, raw bytes or huge string items
                    raise TypeError(spec["dtype"])
                return np.array(spec["data"], dtype=spec["dtype"]).reshape(spec["shape"])
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f'"__ndarray__" data does not fit {spec["dtype"]}{spec["shape"]}') from None
        if "__bytes__" in obj:
            return _b64(obj["__bytes__"], '"__bytes__"')
        if "__proto__" in obj:
            import onnx
            from google.protobuf.message import DecodeError, Message

            kind = obj["__proto__"]
            cls = getattr(onnx, kind, None) if isinstance(kind, str) and kind.endswith("Proto") else None
            if not (isinstance(cls, type) and issubclass(cls, Message)):
                raise ValueError(f'"__proto__" {kind!r} is not an ONNX proto type (such as "TensorProto")')
            proto = cls()
            try:
                proto.ParseFromString(_b64(obj.get("data"), '"__proto__" data'))
            except DecodeError:
                raise ValueError(f'"__proto__" data is not a serialized {kind}') from None
            return proto
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def attrs_text(attrs: dict[str, Any]) -> str:
    return json.dumps(_encode(attrs), sort_keys=True)


# node.meta keys that are part of what a pass did, so the text form (and its diffs) show them
# grid, learning: how a FakeQuantize trains (torch_fq.py); unified: its unified-scale group, one torch module
# (passes/quantize.py); bn_merge: a Conv whose BN trains on (fold_bn.py); before_bn: its per-tensor weight
# quantizer rounds W, not W * s (per_tensor_weights="unfolded")
ANNOTATIONS = ("fused", "grid", "learning", "unified", "bn_merge", "before_bn")


def node_text(node: Node) -> str:
    ins = ", ".join("_" if v is None else f"%{_name(v.name)}" for v in node.inputs)
    attrs = f" {attrs_text(node.attrs)}" if node.attrs else ""
    outs = ", ".join(f"%{_name(v.name)}: {_type(v)}" for v in node.outputs)
    notes = {k: node.meta[k] for k in ANNOTATIONS if k in node.meta}
    tail = f"  # {json.dumps(notes, sort_keys=True)}" if notes else ""
    return f"node {_name(node.name)} = {_name(node.qualified_op)}({ins}){attrs} -> {outs}{tail}"


def print_graph(graph: Graph) -> str:
    """The text form of `graph` (stable: the same graph always prints the same)."""
    lines = [f"graph {json.dumps(graph.name)} opset {json.dumps(graph.opset_imports, sort_keys=True)}"]
    lines += [f"input %{_name(v.name)}: {_type(v)}" for v in graph.inputs]
    lines += [f"const %{_name(v.name)}: {_type(v)} = {_const_body(v.const)}" for v in graph.constants.values()]
    lines += [node_text(n) for n in graph]
    lines += [f"output %{_name(v.name)}" for v in graph.outputs]
    return "\n".join(lines) + "\n"


# -- parsing --------------------------------------------------------------------

class _Cursor:
    def __init__(self, line: str, lineno: int):
        self.s, self.i, self.lineno = line, 0, lineno
        self._json = json.JSONDecoder()

    def fail(self, what: str) -> TextParseError:
        return TextParseError(f"line {self.lineno}: expected {what} at column {self.i + 1}: {self.s.strip()!r}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def peek(self, token: str) -> bool:
        self.ws()
        return self.s.startswith(token, self.i)

    def expect(self, token: str) -> None:
        if not self.peek(token):
            raise self.fail(repr(token))
        self.i += len(token)

    def json(self) -> Any:
        self.ws()
        try:
            obj, self.i = self._json.raw_decode(self.s, self.i)
        except json.JSONDecodeError as e:
            raise self.fail(f"JSON ({e.msg})") from None
        except RecursionError:
            raise self.fail("JSON (nested too deep)") from None
        except ValueError as e:  # an integer of more digits than Python converts
            raise self.fail(f"JSON ({e})") from None
        return obj

    def word(self, pattern: str = r"[^\s,()\[\]{}=]+") -> str:
        self.ws()
        if self.i < len(self.s) and self.s[self.i] == '"':
            return self.json()
        m = re.compile(pattern).match(self.s, self.i)
        if not m:
            raise self.fail("a name")
        self.i = m.end()
        return m.group(0)

    def value_name(self) -> str:
        self.expect("%")
        return self.word(r"[A-Za-z_][A-Za-z0-9_.\-/]*")

    def type(self) -> tuple[str | None, Shape]:
        dtype = self.word(r"[A-Za-z0-9?]+")
        dtype = None if dtype == "?" else dtype
        if not self.peek("["):
            return dtype, None
        self.expect("[")
        dims: list[Any] = []
        while not self.peek("]"):
            if dims:
                self.expect(",")
            start = self.i
            d = self.word(r"[A-Za-z0-9_?\-]+")
            if re.fullmatch(r"-?\d{1,19}", d) and INT64[0] <= int(d) <= INT64[1]:
                d = int(d)
            elif re.fullmatch(r"-?\d+", d):
                self.i = start
                raise self.fail("a dimension (an int64, a name or ?)")
            dims.append(None if d == "?" else d)
        self.expect("]")
        return dtype, tuple(dims)

    def done(self) -> None:
        self.ws()
        if self.i != len(self.s):
            raise self.fail("end of line")


def parse_graph(text: str, constants: dict[str, np.ndarray] | None = None) -> Graph:
    """Read the text form back into a Graph. Large constants come from `constants`.

    Raises TextParseError, naming the line, for anything wrong with `text`, and nothing else.
    """
    if not isinstance(text, str):
        raise TextParseError(f"parse_graph takes the text form as a str, not {type(text).__name__}")
    at: list[_Cursor] = []  # the line being parsed, for the message below
    try:
        return _parse(text, constants or {}, at)
    except TextParseError:
        raise
    except Exception as e:  # a case the checks in _parse missed: still a parse error, never a crash
        where = f"line {at[0].lineno}: cannot parse {at[0].s.strip()[:200]!r}" if at else "cannot parse the text"
        raise TextParseError(f"{where} ({type(e).__name__}: {str(e)[:200]})") from e


def _parse(text: str, constants: dict[str, np.ndarray], at: list[_Cursor]) -> Graph:
    graph: Graph | None = None
    values: dict[str, Value] = {}
    outputs: list[str] = []

    def lookup(c: _Cursor, name: str) -> Value:
        if name not in values:
            raise TextParseError(f"line {c.lineno}: value %{name} is used before it is defined")
        return values[name]

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        c = _Cursor(line, lineno)
        at[:] = [c]
        keyword = c.word(r"[a-z]+")
        if graph is None:
            if keyword != "graph":
                raise c.fail("'graph' on the first line")
            name = c.json()
            if not isinstance(name, str):
                raise c.fail("the graph name as a JSON string")
            c.expect("opset")
            opsets = c.json()
            if not (isinstance(opsets, dict) and all(type(v) is int for v in opsets.values())):
                raise c.fail('the opsets as a JSON object of domain -> version, such as {"": 21}')
            graph = Graph(name, opsets)
            c.done()
            continue
        if keyword in ("input", "const"):
            name = c.value_name()
            if name in values:
                raise TextParseError(f"line {lineno}: value %{name} is defined twice")
        if keyword == "input":
            c.expect(":")
            dtype, shape = c.type()
            c.done()
            values[name] = graph.add_input(name, dtype, shape)
        elif keyword == "const":
            c.expect(":")
            dtype, shape = c.type()
            c.expect("=")
            if c.peek("sha256:"):
                c.expect("sha256:")
                want = c.word(r"[0-9a-f]+")
                if name not in constants:
                    raise TextParseError(f"line {lineno}: constant %{name} is stored by digest; pass its array "
                                         f"in parse_graph(..., constants={{{name!r}: array}})")
                array = np.asarray(constants[name])
                if digest(array) != want:
                    raise TextParseError(f"line {lineno}: the array given for constant %{name} does not match "
                                         f"its digest {want}")
            else:
                data = c.json()
                try:
                    if dtype not in DTYPES:
                        raise TypeError(dtype)
                    array = np.array(data, dtype=dtype)
                    array = array.reshape(shape if shape is not None else array.shape)
                    if shape is not None and array.shape != shape:
                        raise ValueError(shape)
                except (TypeError, ValueError, OverflowError):
                    raise TextParseError(f"line {lineno}: constant %{name}: its data does not fit "
                                         f"{dtype}{list(shape) if shape is not None else ''}") from None
            c.done()
            values[name] = graph.add_constant(name, array, unique=False)
        elif keyword == "node":
            name = c.word()
            c.expect("=")
            op = c.word(r"[^\s(]+")
            domain, sep, op_type = op.partition("::")
            if not sep:
                domain, op_type = "", op
            c.expect("(")
            inputs: list[Value | None] = []
            while not c.peek(")"):
                if inputs:
                    c.expect(",")
                if c.peek("_"):
                    c.expect("_")
                    inputs.append(None)
                else:
                    inputs.append(lookup(c, c.value_name()))
            c.expect(")")
            attrs = {}
            if c.peek("{"):
                start = c.i
                try:
                    attrs = _decode(c.json())
                except (ValueError, RecursionError) as e:
                    c.i = start
                    raise c.fail(f"attributes that decode ({e})") from None
            c.expect("->")
            outs: list[Value] = []
            while True:
                oname = c.value_name()
                c.expect(":")
                dtype, shape = c.type()
                outs.append(Value(oname, dtype, shape))
                if not c.peek(","):
                    break
                c.expect(",")
            meta = {}
            if c.peek("#"):
                c.expect("#")
                meta = c.json()
                if not isinstance(meta, dict):
                    raise c.fail("annotations as a JSON object")
            c.done()
            graph.append(Node(op_type, inputs, outs, attrs, name=name, domain=domain, meta=meta))
            for v in outs:
                if v.name in values:
                    raise TextParseError(f"line {lineno}: value %{v.name} is defined twice")
                values[v.name] = v
        elif keyword == "output":
            outputs.append(c.value_name())
            c.done()
            graph.outputs.append(lookup(c, outputs[-1]))
        else:
            raise c.fail("one of graph, input, const, node, output")
    if graph is None:
        raise TextParseError("the text holds no graph: the first line must be 'graph \"name\" opset {...}'")
    try:
        graph.verify()
    except GraphError as e:
        raise TextParseError(f"the text parses into a graph that is not valid: {e}") from None
    return graph
