"""ONNX -> IR -> ONNX is exact and keeps the model's structure; the IR carries ONNX's types and shapes.

What must hold, and is checked here:

* Models lowbit writes itself (the reference torch models, via ONNX) read back
  and write out again to a model ONNX Runtime runs to the same bits, at a
  batch size other than the captured one.
* Hand-built models at default-domain opsets 11 to 21, in each opset's own
  form of Split, ReduceMean, Squeeze/Unsqueeze, Clip, Constant, Conv, Gemm,
  Resize, with optional empty inputs, an initializer listed as a graph input
  and attributes of every common type, round-trip with bit-identical outputs
  and the same opsets, nodes, node names, initializers and attribute types.
* Custom-domain nodes, metadata and producer survive; symbolic dims and
  inferred types reach the IR; an ONNX graph can be written to torch; the
  ModelProto given to lowbit is never modified.
"""

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx
from models import REFERENCE_MODELS
from onnx import AttributeProto, TensorProto, helper, numpy_helper

import lowbit

# default-domain opset -> the IR version written with it (what ONNX Runtime expects for it)
IR_VERSIONS = {11: 6, 13: 7, 15: 8, 17: 8, 18: 8, 21: 10}


def _leaves(x):
    return torch.utils._pytree.tree_leaves(x)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _attr_types(model):
    """node name -> {attribute name: AttributeProto type}."""
    return {n.name: {a.name: a.type for a in n.attribute} for n in model.graph.node}


def _round_trip(model):
    return lowbit.codegen(lowbit.lower(model), "onnx")


def _assert_same_outputs(a, b, feeds):
    want, got = run_onnx(a, feeds), run_onnx(b, feeds)
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert w.dtype == g.dtype and w.shape == g.shape, f"output {i}: {w.dtype}{w.shape} vs {g.dtype}{g.shape}"
        assert np.array_equal(w, g), f"output {i}: max diff {np.abs(w.astype(np.float64) - g).max()}"


def _assert_same_structure(original, written):
    assert {(o.domain, o.version) for o in written.opset_import} == \
        {(o.domain, o.version) for o in original.opset_import}
    assert len(written.graph.node) == len(original.graph.node)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    assert [n.name for n in written.graph.node] == [n.name for n in original.graph.node]
    assert [n.domain for n in written.graph.node] == [n.domain for n in original.graph.node]
    assert {i.name for i in written.graph.initializer} == {i.name for i in original.graph.initializer}
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    assert _attr_types(written) == _attr_types(original)


# -- models lowbit wrote itself ---------------------------------------------------

@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_models_round_trip_through_onnx_exactly(name):
    factory, shape = REFERENCE_MODELS[name]
    model = factory()
    first = lowbit.codegen(lowbit.lower(model, (torch.randn(*shape),)), "onnx")
    second = _round_trip(first)
    onnx.checker.check_model(second)
    _assert_same_structure(first, second)
    batch = shape[0] + 3  # not the batch the model was captured with: dim 0 is dynamic
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    _assert_same_outputs(first, second, {first.graph.input[0].name: x})


# -- hand-built models, one per opset ------------------------------------------------

def build_model(opset: int, initializer_as_input: bool = True) -> onnx.ModelProto:
    """Conv-Relu-Split-Clip-Resize-ReduceMean-Mul-Flatten-Gemm-Unsqueeze-Squeeze in `opset`'s own forms.

    Outputs: Y [N, 10] and Z, the mean of every element of Y (reduced over an empty axes list).
    With `initializer_as_input`, the initializer conv_b is also listed as a graph input (IR < 4 style: a
    constant with a default the caller may override).
    """
    rng = np.random.default_rng(opset)
    f32 = np.float32
    inits = [
        _init("conv_w", rng.standard_normal((4, 3, 3, 3)).astype(f32)),
        _init("conv_b", rng.standard_normal(4).astype(f32)),
        _init("clip_max", np.array(0.75, f32)),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "conv_w", "conv_b"], ["conv_out"], name="conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1, auto_pad="NOTSET"),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
    ]
    # Split channels 4 -> a, b: attribute (opset 11), `split` input (13..17), num_outputs (18+)
    if opset < 13:
        nodes.append(helper.make_node("Split", ["relu_out"], ["a", "b"], name="split", axis=1, split=[1, 3]))
    elif opset < 18:
        inits.append(_init("split_sizes", np.array([1, 3], np.int64)))
        nodes.append(helper.make_node("Split", ["relu_out", "split_sizes"], ["a", "b"], name="split", axis=1))
    else:
        nodes.append(helper.make_node("Split", ["relu_out"], ["a", "b"], name="split", axis=1, num_outputs=2))
    channels = 3 if opset < 18 else 2
    # Clip with the min input omitted (""), max given as an input
    nodes.append(helper.make_node("Clip", ["a", "", "clip_max"], ["a_clip"], name="clip"))
    # Resize with roi omitted (""), scales from a Constant node with a FLOATS attribute
    scales = [1.0, 1.0, 0.5, 0.5]
    nodes.append(helper.make_node("Constant", [], ["scales"], name="scales_const", value_floats=scales)
                 if opset >= 12 else  # value_floats is new in opset 12
                 helper.make_node("Constant", [], ["scales"], name="scales_const",
                                  value=_init("scales_value", np.array(scales, f32))))
    if opset < 13:  # roi became optional in Resize-13
        inits.append(_init("roi", np.zeros(0, f32)))
    nodes.append(helper.make_node("Resize", ["a_clip", "roi" if opset < 13 else "", "scales"], ["a_small"],
                                  name="resize", mode="nearest", coordinate_transformation_mode="asymmetric",
                                  nearest_mode="floor"))
    # ReduceMean over H, W: axes attribute (< 18) or axes input (18+)
    if opset < 18:
        nodes.append(helper.make_node("ReduceMean", ["b"], ["b_mean"], name="reduce", axes=[2, 3], keepdims=1))
    else:
        inits.append(_init("hw_axes", np.array([2, 3], np.int64)))
        nodes.append(helper.make_node("ReduceMean", ["b", "hw_axes"], ["b_mean"], name="reduce", keepdims=1))
    nodes += [
        helper.make_node("Mul", ["a_small", "b_mean"], ["gated"], name="mul"),
        helper.make_node("Flatten", ["gated"], ["flat"], name="flatten", axis=1),
    ]
    features = channels * 4 * 4
    inits += [_init("fc_w", rng.standard_normal((10, features)).astype(f32)),
              _init("fc_b", rng.standard_normal(10).astype(f32))]
    # Gemm with transB, a non-trivial alpha and an integral float beta (1.0 must stay a FLOAT)
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="gemm",
                                  transB=1, alpha=0.5, beta=1.0))
    # Unsqueeze/Squeeze: axes attribute (11), axes input (13+): one from a Constant TENSOR, one an initializer
    if opset < 13:
        nodes += [helper.make_node("Unsqueeze", ["fc"], ["fc_3d"], name="unsqueeze", axes=[1]),
                  helper.make_node("Squeeze", ["fc_3d"], ["Y"], name="squeeze", axes=[1])]
    else:
        inits.append(_init("squeeze_axes", np.array([1], np.int64)))
        nodes += [helper.make_node("Constant", [], ["unsqueeze_axes"], name="axes_const",
                                   value=_init("axes_value", np.array([1], np.int64))),
                  helper.make_node("Unsqueeze", ["fc", "unsqueeze_axes"], ["fc_3d"], name="unsqueeze"),
                  helper.make_node("Squeeze", ["fc_3d", "squeeze_axes"], ["Y"], name="squeeze")]
    # Reduce over an empty axes list (= every axis): an empty INTS attribute in either form
    if opset < 18:
        reduce_all = helper.make_node("ReduceMean", ["Y"], ["Z"], name="reduce_all", keepdims=0)
        reduce_all.attribute.append(helper.make_attribute("axes", [], attr_type=AttributeProto.INTS))
        nodes.append(reduce_all)
    else:
        empty = helper.make_node("Constant", [], ["no_axes"], name="empty_const")
        empty.attribute.append(helper.make_attribute("value_ints", [], attr_type=AttributeProto.INTS))
        nodes += [empty, helper.make_node("ReduceMean", ["Y", "no_axes"], ["Z"], name="reduce_all", keepdims=0)]

    graph = helper.make_graph(
        nodes, f"opset{opset}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8]),
         *([helper.make_tensor_value_info("conv_b", TensorProto.FLOAT, [4])] if initializer_as_input else [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, [])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="handmade")
    model.ir_version = IR_VERSIONS[opset]
    onnx.checker.check_model(model, full_check=True)
    return model


OPSETS = [11, 13, 15, 17, 18, 21]


def test_hand_built_models_cover_every_common_attribute_type():
    """The fixtures themselves: each kind of attribute the round trip must keep appears in them."""
    for opset in OPSETS:
        kinds = {(a.type, len(a.ints) == 0 and a.type == AttributeProto.INTS)
                 for n in build_model(opset).graph.node for a in n.attribute}
        for kind in (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.STRING, AttributeProto.INTS,
                     AttributeProto.TENSOR, *((AttributeProto.FLOATS,) if opset >= 12 else ())):
            assert (kind, False) in kinds, (opset, AttributeProto.AttributeType.Name(kind))
        assert (AttributeProto.INTS, True) in kinds, f"opset {opset}: no empty INTS attribute"


@pytest.mark.parametrize("initializer_as_input", [False, True], ids=["plain", "initializer_as_input"])
@pytest.mark.parametrize("opset", OPSETS)
def test_hand_built_model_round_trips_exactly(opset, initializer_as_input):
    model = build_model(opset, initializer_as_input)
    written = _round_trip(model)
    onnx.checker.check_model(written)
    _assert_same_structure(model, written)
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    _assert_same_outputs(model, written, {"X": x})


@pytest.mark.parametrize("opset", OPSETS)
def test_attribute_values_and_types_are_kept(opset):
    model = build_model(opset)
    written = {n.name: n for n in _round_trip(model).graph.node}
    for node in model.graph.node:
        out = written[node.name]
        got = {a.name: a for a in out.attribute}
        assert set(got) == {a.name for a in node.attribute}, node.name
        for a in node.attribute:
            b = got[a.name]
            assert b.type == a.type, f"{node.name}.{a.name}: {b.type} != {a.type}"
            if a.type == AttributeProto.TENSOR:
                assert np.array_equal(numpy_helper.to_array(b.t), numpy_helper.to_array(a.t))
                assert b.t.data_type == a.t.data_type
            else:
                assert helper.get_attribute_value(b) == helper.get_attribute_value(a), f"{node.name}.{a.name}"
    gemm = {a.name: a for a in written["gemm"].attribute}
    assert gemm["beta"].type == AttributeProto.FLOAT and gemm["beta"].f == 1.0
    assert gemm["transB"].type == AttributeProto.INT and gemm["transB"].i == 1


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_optional_empty_inputs_are_kept_empty(opset):
    graph = lowbit.lower(build_model(opset))
    clip = graph.find_node("clip")
    assert clip.input(1) is None and clip.input(2).name == "clip_max"
    written = {n.name: n for n in lowbit.codegen(graph, "onnx").graph.node}
    assert list(written["clip"].input) == ["a", "", "clip_max"]
    assert list(written["resize"].input) == ["a_clip", "roi" if opset < 13 else "", "scales"]


def test_omitted_trailing_optional_inputs_are_left_out():
    """Conv without bias is written Conv(x, W), not Conv(x, W, ''): tools such as NNCF read '' as a bias name."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = lowbit.lower(conv, (x,))
    node = next(n for n in graph.nodes if n.op_type == "Conv")
    written = lowbit.codegen(graph, "onnx")
    proto = next(n for n in written.graph.node if n.op_type == "Conv")
    assert list(proto.input) == [v.name for v in node.inputs if v is not None]
    assert len(proto.input) == 2
    got = run_onnx(written, {written.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, conv(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("opset", [13, 18])
def test_initializer_listed_as_input_is_a_constant_that_stays_overridable(opset):
    model = build_model(opset, initializer_as_input=True)
    graph = lowbit.lower(model)
    # conv_b is listed as a graph input and an initializer: in the IR it is a constant, not something to feed
    assert [v.name for v in graph.inputs] == ["X"]
    assert np.array_equal(graph.constants["conv_b"].const,
                          numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv_b")))
    written = lowbit.codegen(graph, "onnx")
    # ... and the written model still lets a caller override it, as the original did
    assert [i.name for i in written.graph.input] == ["X", "conv_b"]
    assert "conv_b" in {i.name for i in written.graph.initializer}
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    bias = np.full(4, 0.5, np.float32)
    _assert_same_outputs(model, written, {"X": x, "conv_b": bias})


# -- custom domains, metadata ---------------------------------------------------------

def _custom_op_model():
    my_op = helper.make_node(
        "MyOp", ["r"], ["Y"], name="my_op", domain="com.example",
        count=3, scale=1.0, ratio=0.25, mode="fast", sizes=[1, 2, 3], weights=[0.5, 1.0], tags=["a", "b"],
        table=_init("table", np.arange(6, dtype=np.int32).reshape(2, 3)))
    my_op.attribute.append(helper.make_attribute("empty", [], attr_type=AttributeProto.INTS))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["r"], name="relu"), my_op], "custom",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 3)])
    model.ir_version = 8
    return model


def test_custom_domain_node_is_kept_with_its_attributes_and_opset():
    model = _custom_op_model()
    graph = lowbit.lower(model)
    node = graph.find_node("my_op")
    assert (node.domain, node.op_type) == ("com.example", "MyOp")
    assert graph.opset_imports == {"": 17, "com.example": 3}
    written = lowbit.codegen(graph, "onnx")
    assert {(o.domain, o.version) for o in written.opset_import} == {("", 17), ("com.example", 3)}
    out = next(n for n in written.graph.node if n.name == "my_op")
    assert (out.domain, out.op_type, list(out.input), list(out.output)) == ("com.example", "MyOp", ["r"], ["Y"])
    original = model.graph.node[1]
    assert _attr_types(written)["my_op"] == _attr_types(model)["my_op"]
    got = {a.name: a for a in out.attribute}
    for a in original.attribute:
        if a.type == AttributeProto.TENSOR:
            assert got[a.name].t.data_type == TensorProto.INT32
            assert np.array_equal(numpy_helper.to_array(got[a.name].t), numpy_helper.to_array(a.t))
        else:
            assert helper.get_attribute_value(got[a.name]) == helper.get_attribute_value(a), a.name


def test_local_functions_and_subgraph_attributes_round_trip():
    """A model-local function (custom domain) and an If whose branches read an outer-scope value."""
    add_relu = helper.make_function(
        "com.example", "AddRelu", ["a", "b"], ["y"],
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
        [helper.make_opsetid("", 17)])
    then_branch = helper.make_graph([helper.make_node("Relu", ["h"], ["t"], name="then_relu")], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 3])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 3])])
    graph = helper.make_graph(
        [helper.make_node("AddRelu", ["X", "X"], ["h"], name="fn", domain="com.example"),
         helper.make_node("ReduceSum", ["X"], ["total"], name="sum", keepdims=0),
         helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
         helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        "functions", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
        initializer=[_init("zero", np.array(0.0, np.float32))])
    model = helper.make_model(graph, functions=[add_relu], opset_imports=[helper.make_opsetid("", 17),
                                                                          helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    written = _round_trip(model)
    _assert_same_structure(model, written)
    assert [f.SerializeToString() for f in written.functions] == [add_relu.SerializeToString()]
    branch = next(n for n in written.graph.node if n.name == "branch")
    assert {a.name: a.type for a in branch.attribute} == {"then_branch": AttributeProto.GRAPH,
                                                          "else_branch": AttributeProto.GRAPH}
    branches = {a.name: a.g.SerializeToString() for a in branch.attribute}
    assert branches == {"then_branch": then_branch.SerializeToString(),
                        "else_branch": else_branch.SerializeToString()}
    for sign in (1.0, -1.0):  # both branches
        x = sign * np.abs(np.random.default_rng(5).standard_normal((4, 3))).astype(np.float32)
        _assert_same_outputs(model, written, {"X": x})


def test_metadata_and_producer_are_kept():
    model = build_model(17)
    model.producer_name, model.producer_version = "my-exporter", "4.2"
    model.doc_string = "a test model"
    helper.set_model_props(model, {"author": "lowbit tests", "license": "MIT"})
    written = _round_trip(model)
    assert (written.producer_name, written.producer_version) == ("my-exporter", "4.2")
    assert {p.key: p.value for p in written.metadata_props} == {"author": "lowbit tests", "license": "MIT"}
    assert written.ir_version == model.ir_version


# -- types and shapes ----------------------------------------------------------------

def test_symbolic_dims_and_inferred_types_reach_the_ir():
    graph = lowbit.lower(build_model(18))
    x = graph.inputs[0]
    assert (x.name, x.dtype, x.shape) == ("X", "float32", ("N", 3, 8, 8))
    conv = graph.find_node("conv").output  # an intermediate: its type comes from ONNX shape inference
    assert (conv.dtype, conv.shape) == ("float32", ("N", 4, 8, 8))
    a, b = graph.find_node("split").outputs
    assert a.shape == b.shape == ("N", 2, 8, 8)
    assert graph.find_node("reduce").output.shape == ("N", 2, 1, 1)
    # ONNX shape inference cannot prove Resize keeps N (it scales by a float): it names a new dim
    resized = graph.find_node("resize").output
    assert resized.dtype == "float32" and resized.shape[1:] == (2, 4, 4) and isinstance(resized.shape[0], str)
    assert graph.find_node("gemm").output.shape[1:] == (10,)
    assert graph.find_node("empty_const").output.dtype == "int64"
    assert graph.outputs[0].shape == ("N", 10) and graph.outputs[1].shape == ()
    dim0 = lowbit.codegen(graph, "onnx").graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N" and not dim0.HasField("dim_value")


def test_onnx_graph_writes_to_torch():
    rng = np.random.default_rng(3)
    f32 = np.float32
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
         helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["Y"], name="gemm", transB=1)],
        "cnn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 5])],
        initializer=[_init("w", rng.standard_normal((4, 2, 3, 3)).astype(f32)),
                     _init("b", rng.standard_normal(4).astype(f32)),
                     _init("fc_w", rng.standard_normal((5, 144)).astype(f32)),
                     _init("fc_b", rng.standard_normal(5).astype(f32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    module = lowbit.codegen(lowbit.lower(model), "torch")
    assert isinstance(module, torch.nn.Module)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 2, 6, 6)).astype(f32)
        (want,) = run_onnx(model, {"X": x})
        with torch.no_grad():
            (got,) = _leaves(module(torch.from_numpy(x)))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


# -- the input model is never modified ----------------------------------------------------

@pytest.mark.parametrize("make", [lambda: build_model(13), lambda: build_model(21), _custom_op_model],
                         ids=["opset13", "opset21", "custom"])
def test_lowering_does_not_mutate_the_model_proto(make):
    from lowbit.frontends.onnx import from_onnx

    model = make()
    before = model.SerializeToString()
    graph = from_onnx(model)
    assert model.SerializeToString() == before
    lowbit.lower(model)
    assert model.SerializeToString() == before
    lowbit.codegen(graph, "onnx")
    assert model.SerializeToString() == before


def test_lowering_a_file_matches_lowering_the_proto(tmp_path):
    model = build_model(18, initializer_as_input=False)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    from_file, from_proto = lowbit.lower(path), lowbit.lower(model)
    assert str(from_file) == str(from_proto)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _assert_same_outputs(model, lowbit.codegen(lowbit.lower(str(path)), "onnx"), {"X": x})
