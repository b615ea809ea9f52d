"""The ONNX backend: `to_onnx` writes a Graph as an onnx.ModelProto (its reader is frontends/onnx.py).

Writing emits the vocabulary as is, expands ops newer than the target opset
(`Swish`, `Attention`, see `ir/decompose.py`), writes FakeQuantize as QDQ
(`qdq.py`) and refuses nodes only another framework can run (opaque torch
ops) with an error that names them. ONNX -> IR -> ONNX runs to the same
outputs in ONNX Runtime, bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from ..errors import UnsupportedOpError
from ..ir.graph import Graph, Node, Value, renamed_attrs
from ..ir.infer import is_legacy_empty
from ..ir.ops import is_opaque
from ..ir.types import to_onnx_dtype

DEFAULT_IR_VERSION = 10  # what ONNX Runtime and OpenVINO read today
# graph.meta entries written to (and read back from, by frontends/onnx.py) the model's metadata_props
LOWBIT_META = {"lowbit.passes_run": "passes_run", "lowbit.source": "source", "lowbit.options": "pipeline_options",
               "lowbit.hw_config": "hw_config"}


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


def node_proto(node: Node) -> onnx.NodeProto:
    """One node as an onnx.NodeProto (cleanup folds constants by running it in onnx.reference)."""
    types = node.meta.get("onnx_attr_types", {})
    values = list(node.inputs)
    if node.op_type == "Concat" and not node.domain \
            and any(v is not None and is_legacy_empty(v.shape) for v in values) \
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
    (fake_quantize="openvino", for OpenVINO's ONNX reader). Either way the
    graph is first guarded against OpenVINO's known miscomputations
    (openvino_guards.py), which a .onnx meets too when OpenVINO runs it.
    The forms for OpenVINO write a fused query/key/value projection as one
    projection per part, and put a quantizer that reads a projection through
    a Reshape or Transpose on the projection itself (openvino_projections.py).
    """
    from ..ir.decompose import expand_for_opset
    from ..ir.ops import QUANT_DOMAIN
    from .openvino_guards import guarded_for_openvino
    from .openvino_projections import projections_for_openvino
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
    graph = guarded_for_openvino(expand_for_opset(graph, opsets.get("", 21)))
    if fake_quantize == "openvino" or runtime == "openvino":  # the forms OpenVINO runs
        graph = projections_for_openvino(graph)
    if fake_quantize == "qdq":
        graph = fake_quantize_to_qdq(graph, runtime)
    elif any(n.domain == QUANT_DOMAIN for n in graph):
        opsets.setdefault(QUANT_DOMAIN, 1)
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    value_info = [_value_info(v) for n in graph for v in n.outputs
                  if id(v) not in known and (v.dtype is not None or v.shape is not None)]
    initializers = [numpy_helper.from_array(np.asarray(v.const), v.name) for v in graph.constants.values()]
    overridable = [v for v in graph.constants.values() if v.meta.get("graph_input")]
    g = helper.make_graph([node_proto(n) for n in graph], graph.name,
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
