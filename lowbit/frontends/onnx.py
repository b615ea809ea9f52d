"""The ONNX frontend: `from_onnx` reads an onnx.ModelProto into a Graph (its writer is backends/onnx.py).

Reading keeps everything: every node with its domain and attributes (typed
exactly as they were), initializers as constants, the model's opsets,
metadata and local functions. So ONNX -> IR -> ONNX gives a model that ONNX
Runtime runs to the same outputs, bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from ..backends.onnx import LOWBIT_META
from ..errors import ModelLoadError
from ..ir.graph import Graph, Node, Value, subgraph_free_names
from ..ir.types import from_onnx_dtype

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
