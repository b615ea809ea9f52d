"""The border with ONNX: `from_onnx` reads an onnx.ModelProto into a Graph, `to_onnx` writes one.

Reading keeps everything: every node with its domain and attributes (typed
exactly as they were), initializers as constants, the model's opsets,
metadata and local functions. So ONNX -> IR -> ONNX gives a model that ONNX
Runtime runs to the same outputs, bit for bit.

Writing emits the vocabulary as is, expands ops newer than the target opset
(`Swish`, `Attention`, see `decompose.py`), and refuses nodes only another
framework can run (opaque torch ops) with an error that names them.
"""

from __future__ import annotations

import json

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from ..errors import ModelLoadError, UnsupportedOpError
from .graph import Graph, Node, Value, renamed_attrs, subgraph_free_names
from .infer import is_legacy_empty
from .ops import is_opaque
from .types import from_onnx_dtype, to_onnx_dtype

DEFAULT_IR_VERSION = 10  # what ONNX Runtime and OpenVINO read today


# -- loading --------------------------------------------------------------------

def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an .onnx file, raising ModelLoadError with the reason."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"ONNX file {str(path)!r} does not exist: check the path")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError, onnx raises ValueError for external data
        raise ModelLoadError(f"cannot read {str(path)!r} as an ONNX model ({type(e).__name__}: {e}); "
                             "the file is corrupt or not ONNX: re-export it") from None
    check_model(model, str(path))
    return model


def check_model(model: onnx.ModelProto, where: str = "the ONNX model") -> None:
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{where} holds no graph (no nodes and no outputs): the file is empty or corrupt")
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as e:
        raise ModelLoadError(f"{where} is not a valid ONNX model: {' '.join(str(e).split())}; "
                             "fix or re-export it") from None


# -- ONNX -> IR -----------------------------------------------------------------

def _type_of(vi: onnx.ValueInfoProto) -> tuple[str | None, tuple | None]:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return None, None
    dtype = from_onnx_dtype(t.elem_type)
    if not t.HasField("shape"):
        return dtype, None
    dims = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None)
    return dtype, tuple(dims)


def _attr_value(a: AttributeProto) -> Any:
    if a.type == AttributeProto.STRING:
        try:
            return a.s.decode()
        except UnicodeDecodeError:
            return a.s
    if a.type == AttributeProto.STRINGS:
        return [s.decode(errors="surrogateescape") for s in a.strings]
    if a.type == AttributeProto.TENSOR:
        return numpy_helper.to_array(a.t)
    if a.type == AttributeProto.TENSORS:
        return [numpy_helper.to_array(t) for t in a.tensors]
    if a.type == AttributeProto.GRAPH:  # a copy: the IR renames what a subgraph reads, never the user's model
        g = onnx.GraphProto()
        g.CopyFrom(a.g)
        return g
    if a.type == AttributeProto.GRAPHS:
        graphs = []
        for sub in a.graphs:
            graphs.append(onnx.GraphProto())
            graphs[-1].CopyFrom(sub)
        return graphs
    return helper.get_attribute_value(a)


WEIGHT_ELEMENTS = 1024  # shape inference sees larger float initializers as typed inputs, without their data


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its large float initializers turned into typed graph inputs: shape inference (and its data
    propagation, which reads small integer tensors) gives the same types without serializing the weights
    (1.7 of DistilBERT's 7.9 s of PTQ from ONNX went there)."""
    g = model.graph
    floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    big = [i for i in g.initializer if i.data_type in floating and int(np.prod(i.dims)) > WEIGHT_ELEMENTS]
    if not big:
        return model
    names = {i.name for i in big}
    graph = helper.make_graph(list(g.node), g.name, [*g.input, *(helper.make_tensor_value_info(
        i.name, i.data_type, list(i.dims)) for i in big if i.name not in {v.name for v in g.input})],
        list(g.output), initializer=[i for i in g.initializer if i.name not in names],
        value_info=list(g.value_info))
    graph.sparse_initializer.extend(g.sparse_initializer)
    light = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    return light


def _infer_types(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False, data_prop=True)
    except Exception:  # custom ops or >2 GB models: fall back to what the file says
        inferred = model
    g = inferred.graph
    return {vi.name: _type_of(vi) for vi in [*g.value_info, *g.input, *g.output]}


# graph.meta entries an ONNX model carries in its metadata_props: the passes run on it (prerequisites,
# save), the device and options they ran with, and the fingerprint of the model it was made from (load)
LOWBIT_META = {"lowbit.passes_run": "passes_run", "lowbit.source": "source", "lowbit.options": "pipeline_options"}


def from_onnx(model: onnx.ModelProto) -> Graph:
    """Lower an ONNX model into a Graph (the model is not modified)."""
    g = model.graph
    opsets = {o.domain if o.domain != "ai.onnx" else "": o.version for o in model.opset_import}
    graph = Graph(g.name or "graph", opsets)
    props = {p.key: p.value for p in model.metadata_props}
    graph.meta.update(origin="onnx", ir_version=model.ir_version, producer_name=model.producer_name,
                      producer_version=model.producer_version,
                      metadata_props={k: v for k, v in props.items() if k not in LOWBIT_META},
                      functions=[f.SerializeToString() for f in model.functions])
    for key, meta_key in LOWBIT_META.items():  # what lowbit did to the model, written by to_onnx
        if key in props:
            try:
                graph.meta[meta_key] = json.loads(props[key])
            except json.JSONDecodeError:
                pass
    types = _infer_types(model)
    values: dict[str, Value] = {}
    for init in g.initializer:
        values[init.name] = graph.add_constant(init.name, numpy_helper.to_array(init), unique=False)
    for sparse in g.sparse_initializer:  # densified: the IR has one kind of constant
        vals = numpy_helper.to_array(sparse.values)
        array = np.zeros(tuple(sparse.dims), dtype=vals.dtype)
        idx = numpy_helper.to_array(sparse.indices)
        if idx.ndim == 1:
            array.reshape(-1)[idx] = vals
        else:
            array[tuple(idx.T)] = vals
        values[sparse.values.name] = graph.add_constant(sparse.values.name, array, unique=False)
    for vi in g.input:
        if vi.name in values:  # an initializer listed as input (IR < 4): a constant a caller may override
            values[vi.name].meta["graph_input"] = True
            continue
        dtype, shape = _type_of(vi)
        values[vi.name] = graph.add_input(vi.name, dtype, shape)
    for i, n in enumerate(g.node):
        inputs = []
        for name in n.input:
            if not name:
                inputs.append(None)
            elif name in values:
                inputs.append(values[name])
            else:
                raise ModelLoadError(f"ONNX node {n.name or n.op_type!r} reads {name!r}, which nothing defines "
                                     "before it: the model is not topologically sorted or is broken")
        outs = []
        for name in n.output:
            dtype, shape = types.get(name, (None, None))
            outs.append(Value(name or graph.unique_name(f"{n.name}_unused"), dtype, shape))
        captures = None
        subgraphs = [sub for a in n.attribute for sub in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs)]
        if subgraphs:  # the outer values the subgraphs read: tracked as uses, like inputs
            captures = []
            for name in dict.fromkeys(x for sub in subgraphs for x in subgraph_free_names(sub)):
                if name not in values:
                    raise ModelLoadError(f"a subgraph of ONNX node {n.name or n.op_type!r} reads {name!r}, which "
                                         "nothing defines before the node: the model is broken")
                captures.append(values[name])
        node = Node(n.op_type, inputs, outs, {a.name: _attr_value(a) for a in n.attribute},
                    name=n.name or graph.unique_name(f"{n.op_type.lower()}_{i}"), domain=n.domain,
                    meta={"onnx_attr_types": {a.name: a.type for a in n.attribute}}, captures=captures)
        if n.doc_string:
            node.meta["doc_string"] = n.doc_string
        graph.append(node)
        for v in outs:
            values[v.name] = v
    for vi in g.output:
        if vi.name not in values:
            raise ModelLoadError(f"ONNX graph output {vi.name!r} is produced by no node: the model is broken")
        graph.outputs.append(values[vi.name])
    return graph


# -- IR -> ONNX -----------------------------------------------------------------

def _value_info(v: Value) -> onnx.ValueInfoProto:
    shape = None if v.shape is None else [d if d is not None else None for d in v.shape]
    return helper.make_tensor_value_info(v.name, to_onnx_dtype(v.dtype), shape)


def _attribute(name: str, value: Any, attr_type: int | None) -> AttributeProto:
    if attr_type == AttributeProto.TENSOR or isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(np.asarray(value)))
    if attr_type == AttributeProto.TENSORS:
        return helper.make_attribute(name, [numpy_helper.from_array(np.asarray(t)) for t in value])
    if attr_type is not None and attr_type != AttributeProto.UNDEFINED:
        if attr_type == AttributeProto.FLOAT:
            value = float(value)
        elif attr_type == AttributeProto.FLOATS:
            value = [float(x) for x in value]
        return helper.make_attribute(name, value, attr_type=attr_type)
    return helper.make_attribute(name, value)


def _node_proto(node: Node) -> onnx.NodeProto:
    types = node.meta.get("onnx_attr_types", {})
    values = list(node.inputs)
    if node.op_type == "Concat" and not node.domain and any(v is not None and is_legacy_empty(v.shape) for v in values) \
            and any(v is not None and v.shape is not None and len(v.shape) != 1 for v in values):
        values = [v for v in values if v is None or not is_legacy_empty(v.shape)]  # torch.cat skips them; ONNX won't
    inputs = ["" if v is None else v.name for v in values]
    while inputs and inputs[-1] == "":  # an omitted trailing optional input is left out, as ONNX writers do
        inputs.pop()
    proto = helper.make_node(node.op_type, inputs, [v.name for v in node.outputs], name=node.name,
                             domain=node.domain or None)
    attrs = renamed_attrs(node)  # subgraphs read captured values by their current names
    proto.attribute.extend(_attribute(k, v, types.get(k)) for k, v in attrs.items())
    if "doc_string" in node.meta:
        proto.doc_string = node.meta["doc_string"]
    return proto


def to_onnx(graph: Graph, *, opset: int | None = None, fake_quantize: str = "qdq",
            runtime: str = "onnxruntime") -> onnx.ModelProto:
    """Write a Graph as an onnx.ModelProto (the graph is not modified).

    FakeQuantize nodes are written as QuantizeLinear/DequantizeLinear
    (fake_quantize="qdq", in the form `runtime` runs as INT8: "onnxruntime"
    or "openvino", see qdq.py) or kept as OpenVINO's FakeQuantize
    (fake_quantize="openvino", for OpenVINO's ONNX reader).
    """
    from .decompose import expand_for_opset
    from .ops import QUANT_DOMAIN
    from .qdq import fake_quantize_to_qdq

    opaque = [n for n in graph if is_opaque(n.domain)]
    if opaque:
        names = ", ".join(f"{n.name} ({n.op_type})" for n in opaque[:5])
        raise UnsupportedOpError(
            f"{len(opaque)} node(s) are opaque {opaque[0].domain} ops with no ONNX equivalent: {names}. "
            "Write this graph back to torch (codegen(graph, 'torch')), or replace those ops in the model.")
    opsets = dict(graph.opset_imports)
    if opset is not None:
        opsets[""] = opset
    graph = expand_for_opset(graph, opsets.get("", 21))
    if fake_quantize == "qdq":
        graph = fake_quantize_to_qdq(graph, runtime)
    elif any(n.domain == QUANT_DOMAIN for n in graph):
        opsets.setdefault(QUANT_DOMAIN, 1)
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    value_info = [_value_info(v) for n in graph for v in n.outputs
                  if id(v) not in known and (v.dtype is not None or v.shape is not None)]
    initializers = [numpy_helper.from_array(np.asarray(v.const), v.name) for v in graph.constants.values()]
    overridable = [v for v in graph.constants.values() if v.meta.get("graph_input")]
    g = helper.make_graph([_node_proto(n) for n in graph], graph.name,
                          [_value_info(v) for v in [*graph.inputs, *overridable]],
                          [_value_info(v) for v in graph.outputs], initializer=initializers, value_info=value_info)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name=graph.meta.get("producer_name") or "lowbit",
                              producer_version=graph.meta.get("producer_version") or "")
    model.ir_version = graph.meta.get("ir_version") or DEFAULT_IR_VERSION
    for f in graph.meta.get("functions", []):
        model.functions.add().ParseFromString(f)
    for k, v in graph.meta.get("metadata_props", {}).items():
        model.metadata_props.add(key=k, value=v)
    for key, meta_key in LOWBIT_META.items():
        if graph.meta.get(meta_key):
            model.metadata_props.add(key=key, value=json.dumps(graph.meta[meta_key], sort_keys=True))
    return model
