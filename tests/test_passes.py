"""The built-in passes, each checked for structure (exact node counts, rules fired, groups) and numerics.

fold_bn must remove every foldable BatchNormalization and keep outputs within
1e-5 of the original torch model (through torch codegen and ONNX Runtime);
cleanup must drop what computes nothing and fold constants without changing
outputs; fuse only annotates, so outputs stay bit-identical.
"""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import run_onnx
from models import REFERENCE_MODELS, randomize_batchnorm
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.ir.text import parse_graph
from lowbit.passes import PassManager
from lowbit.passes.fuse import fusion_groups
from lowbit.patterns import Const, P

TOL = dict(rtol=1e-5, atol=1e-5)


# -- models -----------------------------------------------------------------------

class ConvNoBiasBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class LinearBN(nn.Module):
    """Linear (2D, a Gemm) + BatchNorm1d, with and without bias."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 4, bias=False)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class GroupedBN(nn.Module):
    """Grouped conv + BN, then depthwise conv (no bias) + BN."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.depthwise(torch.relu(self.bn1(self.grouped(x)))))


class SharedConv(nn.Module):
    """The Conv output feeds the BN and a ReLU: folding would change what the ReLU sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


class ConvSwish(nn.Module):
    """Conv -> BN -> y * sigmoid(y) written by hand, then Conv -> scale -> shift -> Tanh."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = y * torch.sigmoid(y)
        return torch.tanh(self.conv2(y) * 2.0 + 1.0)


def _small(cls):
    def factory():
        torch.manual_seed(0)
        return randomize_batchnorm(cls()).eval()
    return factory


SMALL_MODELS = {
    "conv_no_bias_bn": (_small(ConvNoBiasBN), (2, 3, 8, 8)),
    "linear_bn": (_small(LinearBN), (4, 8)),
    "grouped_depthwise_bn": (_small(GroupedBN), (2, 8, 6, 6)),
    "shared_conv": (_small(SharedConv), (2, 3, 8, 8)),
    "conv_swish": (_small(ConvSwish), (2, 3, 8, 8)),
}
ALL_MODELS = {**REFERENCE_MODELS, **SMALL_MODELS}


@pytest.fixture(scope="module")
def lowered():
    """name -> (model, example input, lowered graph); each model is lowered once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            factory, shape = ALL_MODELS[name]
            torch.manual_seed(1)
            model, x = factory(), torch.randn(*shape)
            cache[name] = (model, x, lowbit.lower(model, (x,)))
        return cache[name]
    return get


def _count(graph, op):
    return sum(1 for n in graph if n.op_type == op)


def _run(passes, graph):
    pm = PassManager(passes)
    return pm.run(graph), pm.records


def _ort(graph, *arrays):
    return run_onnx(lowbit.codegen(graph, "onnx"), {v.name: a for v, a in zip(graph.inputs, arrays)})


def _assert_same_as_torch(model, x, graph):
    with torch.no_grad():
        want = model(x).numpy()
        got_torch = lowbit.codegen(graph, "torch")(x).numpy()
    np.testing.assert_allclose(got_torch, want, **TOL)
    (got_ort,) = _ort(graph, x.numpy())
    np.testing.assert_allclose(got_ort, want, **TOL)


# -- fold_bn --------------------------------------------------------------------------

# name -> (BatchNormalization nodes before, after, rules fired)
FOLD_BN = {
    "resnet18": (20, 0, {"fold_bn_conv": 20}),
    "mobilenet_v2": (52, 0, {"fold_bn_conv": 52}),
    "concat": (13, 0, {"fold_bn_conv": 13}),
    "se": (4, 0, {"fold_bn_conv": 4}),
    "vit": (0, 0, {}),
    "densenet": (22, 12, {"fold_bn_conv": 10}),  # BNs after a Concat (pre-activation) stay
    "resnext": (8, 0, {"fold_bn_conv": 8}),  # grouped and two-filters-per-channel convs included
    "conv_no_bias_bn": (1, 0, {"fold_bn_conv": 1}),
    "linear_bn": (2, 0, {"fold_bn_gemm": 2}),
    "grouped_depthwise_bn": (2, 0, {"fold_bn_conv": 2}),
    "shared_conv": (1, 1, {}),
}


def test_fold_bn_table_covers_every_reference_model():
    assert set(REFERENCE_MODELS) <= set(FOLD_BN)


@pytest.mark.parametrize("name", list(FOLD_BN))
def test_fold_bn_counts_and_numerics(lowered, name):
    model, x, graph = lowered(name)
    before, after, fired = FOLD_BN[name]
    assert _count(graph, "BatchNormalization") == before
    folded, records = _run(["fold_bn"], graph)
    folded.verify()
    assert _count(folded, "BatchNormalization") == after
    assert dict(records[0].fired) == fired
    assert records[0].nodes_before - records[0].nodes_after == before - after
    assert records[0].changed is bool(fired)
    _assert_same_as_torch(model, x, folded)


def test_fold_bn_gives_a_bias_to_a_conv_without_one(lowered):
    _, _, graph = lowered("conv_no_bias_bn")
    (before,) = [n for n in graph if n.op_type == "Conv"]
    assert before.input(2) is None
    folded, _ = _run(["fold_bn"], graph)
    (conv,) = [n for n in folded if n.op_type == "Conv"]
    assert len(conv.inputs) == 3 and conv.inputs[2].const is not None
    assert conv.inputs[2].const.shape == (8,) and conv.inputs[2].const.dtype == np.float32
    assert conv.output.users[0].op_type == "Relu"


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_bn_folds_a_batchnorm_into_the_conv_transpose_before_it(groups):
    """A decoder's ConvTranspose -> BatchNorm: folded along the weight's axis 1 (its output channels) with one
    group, exactly (ONNX Runtime against torch); a grouped one, whose axis 1 holds each group's channels in turn,
    keeps its BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False, groups=groups), nn.BatchNorm2d(6),
                          nn.ReLU()).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 4, 5, 5)
    folded, records = _run(["fold_bn"], lowbit.lower(model, (x,)))
    ops = [n.op_type for n in folded]
    assert ops == (["ConvTranspose", "Relu"] if groups == 1 else ["ConvTranspose", "BatchNormalization", "Relu"])
    assert records[0].fired == ({"fold_bn_conv_transpose": 1} if groups == 1 else {})
    with torch.no_grad():
        np.testing.assert_allclose(_ort(folded, x.numpy())[0], model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_fold_bn_leaves_a_conv_with_another_consumer_alone(lowered):
    _, _, graph = lowered("shared_conv")
    folded, records = _run(["fold_bn"], graph)
    assert [n.op_type for n in folded] == [n.op_type for n in graph] == ["Conv", "BatchNormalization", "Relu", "Add"]
    assert records[0].fired == {} and records[0].changed is False
    conv = folded.nodes[0]
    assert np.array_equal(conv.inputs[1].const, graph.nodes[0].inputs[1].const)


def test_fold_bn_does_not_modify_the_graph_given_to_the_manager(lowered):
    _, _, graph = lowered("resnet18")
    text = str(graph)
    weights = {name: v.const for name, v in graph.constants.items()}
    folded, _ = _run(["fold_bn"], graph)
    assert folded is not graph
    assert str(graph) == text
    assert _count(graph, "BatchNormalization") == 20
    assert all(graph.constants[name].const is array for name, array in weights.items())
    graph.verify()


def _conv_bn_onnx():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mean"),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_fold_bn_keeps_the_output_names_of_an_onnx_model():
    model = _conv_bn_onnx()
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = lowbit.compile(model, passes=["fold_bn"])
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    np.testing.assert_allclose(run_onnx(out, {"x": x})[0], run_onnx(model, {"x": x})[0], **TOL)
    assert [o.name for o in out.graph.output] == ["y"], "a user fetches outputs by name: folding must keep them"


# -- cleanup -------------------------------------------------------------------------

def _cleanup_onnx():
    """Constant -> Add(const, const) -> Mul(x, .), Identity/Dropout inside and at the outputs, a dead node."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["c1"], name="c1",
                         value=numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32))),
        helper.make_node("Constant", [], ["c2"], name="c2",
                         value=numpy_helper.from_array(np.array([0.5, 0.5, 0.5], np.float32))),
        helper.make_node("Add", ["c1", "c2"], ["s"], name="add_consts"),
        helper.make_node("Identity", ["x"], ["xi"], name="ident"),
        helper.make_node("Dropout", ["xi"], ["xd"], name="drop"),
        helper.make_node("Mul", ["xd", "s"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Neg", ["x"], ["dead"], name="dead_neg"),
        helper.make_node("Dropout", ["r"], ["y"], name="drop_out"),
        helper.make_node("Identity", ["m"], ["y2"], name="ident_out"),
    ]
    graph = helper.make_graph(nodes, "cleanup", [helper.make_tensor_value_info("x", f32, [2, 3])],
                              [helper.make_tensor_value_info("y", f32, [2, 3]),
                               helper.make_tensor_value_info("y2", f32, [2, 3])],
                              initializer=[numpy_helper.from_array(np.ones(3, np.float32), "unused_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def test_cleanup_structure():
    graph = lowbit.lower(_cleanup_onnx())
    assert len(graph) == 10 and "unused_w" in graph.constants
    clean, records = _run(["cleanup"], graph)
    clean.verify()
    assert [(n.name, n.op_type) for n in clean] == [("mul", "Mul"), ("relu", "Relu"), ("drop_out", "Dropout"),
                                                   ("ident_out", "Identity")]
    assert dict(records[0].fired) == {"drop_identity": 1, "drop_eval_dropout": 1, "fold_constants": 3,
                                      "remove_dead_nodes": 1, "remove_unused_constants": 3}
    assert (records[0].nodes_before, records[0].nodes_after) == (10, 4)
    mul = clean.find_node("mul")
    assert mul.inputs[0] is clean.inputs[0]                     # Identity and Dropout bypassed
    folded = mul.inputs[1]
    assert folded.const is not None and folded.const.tolist() == [1.5, 2.5, 3.5]
    assert list(clean.constants) == [folded.name]               # unused_w and the folded inputs are gone
    assert [v.name for v in clean.outputs] == ["y", "y2"]       # output Dropout/Identity keep the names


def test_cleanup_numerics_in_onnx_runtime():
    model = _cleanup_onnx()
    clean, _ = _run(["cleanup"], lowbit.lower(model))
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = run_onnx(model, {"x": x})
    got = _ort(clean, x)
    assert len(got) == 2
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def _head_scale_onnx():
    """y = x * (1 / sqrt(x.shape[-1])) * x.shape[0]: the attention scale read from a shape with a dynamic batch
    (as torch.onnx.export writes it), and a dimension that is dynamic."""
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "minus1", "big"], ["last"], name="slice_last"),
        helper.make_node("Cast", ["last"], ["last_f"], to=f32, name="cast"),
        helper.make_node("Sqrt", ["last_f"], ["root"], name="sqrt"),
        helper.make_node("Div", ["one", "root"], ["scale"], name="div"),
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul_scale"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0, name="gather_batch"),
        helper.make_node("Cast", ["batch"], ["batch_f"], to=f32, name="cast_batch"),
        helper.make_node("Mul", ["scaled", "batch_f"], ["y"], name="mul_batch"),
    ]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array([1 << 40], np.int64), "big"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([1.0], np.float32), "one")]
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", f32, ["batch", 4, 16])],
                              [helper.make_tensor_value_info("y", f32, ["batch", 4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_cleanup_folds_static_dimensions_read_from_a_shape_with_a_dynamic_batch():
    model = _head_scale_onnx()
    clean, records = _run(["cleanup"], lowbit.lower(model))
    clean.verify()
    # the head size (16) and everything computed from it fold; the batch size stays a runtime value
    assert [n.name for n in clean] == ["shape", "mul_scale", "gather_batch", "cast_batch", "mul_batch"]
    assert clean.find_node("mul_scale").input(1).const.tolist() == [0.25]
    x = np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(_ort(clean, x)[0], run_onnx(model, {"x": x})[0], rtol=1e-6)


def test_cleanup_proves_two_names_of_one_dim_equal_from_a_reshape_and_a_weight():
    """An exporter names a size twice where its shape inference cannot tell (Swin's masked attention scores: the
    broadcast of two batch names gets a third). A Reshape keeps the number of elements, and a MatMul's
    activation is as wide as its constant weight's rows: `sum` [u, 16, 16] reshaped to [b, 16, -1] and read by a
    [16, 8] weight proves u = b (the graph input's name wins) and the -1 dim 16."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("Add", ["x", "m"], ["sum"]),
             helper.make_node("Reshape", ["sum", "split"], ["heads"]),
             helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "zero", "one"], ["b"]),
             helper.make_node("Concat", ["b", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["heads", "target"], ["merged"]),
             helper.make_node("MatMul", ["merged", "w"], ["y"])]
    inits = {"split": np.array([-1, 16, 2, 8], np.int64), "zero": np.array([0], np.int64),
             "one": np.array([1], np.int64), "rest": np.array([16, -1], np.int64),
             "w": np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)}
    info = [helper.make_tensor_value_info(name, f, dims) for name, dims in
            (("sum", ["u", 16, 16]), ("heads", ["u", 16, 2, 8]), ("merged", ["b", 16, "w"]))]
    graph = helper.make_graph(nodes, "names", [helper.make_tensor_value_info("x", f, ["b", 16, 16]),
                                               helper.make_tensor_value_info("m", f, ["c", 16, 16])],
                              [helper.make_tensor_value_info("y", f, ["b", 16, 8])],
                              initializer=[numpy_helper.from_array(a, k) for k, a in inits.items()], value_info=info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = lowbit.lower(model)
    assert before.find_value("sum").shape == ("u", 16, 16) and before.find_value("merged").shape == ("b", 16, "w")
    cleaned = lowbit.compile(model, passes=["cleanup"])
    g = lowbit.lower(cleaned)
    assert g.find_value("sum").shape == ("b", 16, 16)
    assert g.find_value("heads").shape == ("b", 16, 2, 8)
    assert g.find_value("merged").shape == ("b", 16, 16)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 16, 16)).astype(np.float32),
             "m": rng.standard_normal((1, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_onnx(cleaned, feeds)[0], run_onnx(model, feeds)[0], rtol=1e-6)


def _merged_transpose_onnx(split_shape) -> onnx.ModelProto:
    """k: [b, 4, 6, 8] -> Reshape [-1, 6, 8] -> Transpose [0, 2, 1] -> Reshape to `split_shape` (recorded as the
    output's shape, a dynamic target computed from Shape(k) as torch.onnx.export's default exporter writes it)."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Reshape", ["k", "merge"], ["merged"], allowzero=1),
             helper.make_node("Transpose", ["merged"], ["swapped"], perm=[0, 2, 1]),
             helper.make_node("Shape", ["k"], ["shape"]), helper.make_node("Slice", ["shape", "zero", "one"], ["b"]),
             helper.make_node("Concat", ["b", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["swapped", "target"], ["kt"], allowzero=1),
             helper.make_node("MatMul", ["q", "kt"], ["y"])]
    inits = {"merge": np.array([-1, 6, 8], np.int64), "zero": np.array([0], np.int64),
             "one": np.array([1], np.int64), "rest": np.array(split_shape[1:], np.int64)}
    info = [helper.make_tensor_value_info("merged", f, ["bh", 6, 8]), helper.make_tensor_value_info("swapped", f,
                                                                                                   ["bh", 8, 6]),
            helper.make_tensor_value_info("kt", f, ["b", *split_shape[1:]])]
    graph = helper.make_graph(nodes, "kt", [helper.make_tensor_value_info("k", f, ["b", 4, 6, 8]),
                                            helper.make_tensor_value_info("q", f, ["b", 4, 6, 8])],
                              [helper.make_tensor_value_info("y", f, ["b", 4, 6, 6])],
                              initializer=[numpy_helper.from_array(a, k) for k, a in inits.items()], value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_cleanup_writes_a_transpose_through_merged_batch_and_heads_as_one_transpose():
    """torch.onnx.export's default exporter transposes an attention's keys [b, heads, tokens, dim] by merging
    batch and heads, swapping the last two dims and splitting again: cleanup writes it as the one Transpose it is
    (the heads stay a dim of their own, which head pruning follows), and drops the shape arithmetic."""
    rng = np.random.default_rng(0)
    feeds = {"k": rng.standard_normal((3, 4, 6, 8)).astype(np.float32),
             "q": rng.standard_normal((3, 4, 6, 8)).astype(np.float32)}
    model = _merged_transpose_onnx([-1, 4, 8, 6])
    cleaned = lowbit.compile(model, passes=["cleanup"])
    assert [(n.op_type, [a.ints for a in n.attribute]) for n in cleaned.graph.node] == [
        ("Transpose", [[0, 1, 3, 2]]), ("MatMul", [])]
    np.testing.assert_allclose(run_onnx(cleaned, feeds)[0], run_onnx(model, feeds)[0], rtol=1e-6)


def test_cleanup_keeps_a_split_into_other_dims():
    """Split back into [b, 2, 16, 6], the heads are regrouped: not a transpose, and both Reshapes stay."""
    model = _merged_transpose_onnx([-1, 2, 16, 6])
    model.graph.node[-1].CopyFrom(helper.make_node("Identity", ["kt"], ["y"]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 16, 6]))
    cleaned = lowbit.compile(model, passes=["cleanup"])
    assert [n.op_type for n in cleaned.graph.node].count("Reshape") == 2
    rng = np.random.default_rng(0)
    feeds = {v: rng.standard_normal((3, 4, 6, 8)).astype(np.float32) for v in ("k", "q")}
    np.testing.assert_allclose(run_onnx(cleaned, feeds)[0], run_onnx(model, feeds)[0], rtol=1e-6)


def test_shape_entries_see_through_torch_onnx_exports_expand_sizes():
    """torch.onnx.export writes `t.expand(batch, -1, 12)` with the sizes Reshape(Concat(...), [-1]) and then
    Where(Equal(sizes, -1), 1, sizes): the entries are the batch's dim, 1 (a -1 broadcasts) and 12; a symbolic
    dim is a size, never -1."""
    from lowbit.ir.infer import shape_entries

    f = TensorProto.FLOAT
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "zero", "one"], ["b"]),
             helper.make_node("Concat", ["b", "rest"], ["cat"], axis=0),
             helper.make_node("Reshape", ["cat", "flat"], ["sizes"]),
             helper.make_node("Equal", ["sizes", "minus"], ["is_minus"]),
             helper.make_node("Where", ["is_minus", "ones", "sizes"], ["target"]),
             helper.make_node("Expand", ["t", "target"], ["y"])]
    inits = {"zero": np.array([0], np.int64), "one": np.array([1], np.int64), "rest": np.array([-1, 12], np.int64),
             "flat": np.array([-1], np.int64), "minus": np.array([-1, -1, -1], np.int64),
             "ones": np.array([1, 1, 1], np.int64), "t": np.ones((1, 4, 12), np.float32)}
    graph = helper.make_graph(nodes, "expand", [helper.make_tensor_value_info("x", f, ["batch", 8])],
                              [helper.make_tensor_value_info("y", f, ["batch", 4, 12])],
                              initializer=[numpy_helper.from_array(a, k) for k, a in inits.items()])
    g = lowbit.lower(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert shape_entries(g.find_value("target")) == ["batch", 1, 12]
    assert shape_entries(g.find_value("sizes")) == ["batch", -1, 12]


def test_cleanup_drops_the_eval_dropout_of_mobilenet(lowered):
    model, x, graph = lowered("mobilenet_v2")
    assert _count(graph, "Dropout") == 1
    clean, records = _run(["cleanup"], graph)
    assert _count(clean, "Dropout") == 0
    # and the ratio constant it read (kept for a generated module's training) goes with it
    assert dict(records[0].fired) == {"drop_eval_dropout": 1, "remove_unused_constants": 1}
    assert records[0].nodes_after == records[0].nodes_before - 1
    np.testing.assert_array_equal(_ort(clean, x.numpy())[0], _ort(graph, x.numpy())[0])


def test_cleanup_keeps_a_training_dropout():
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="drop"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    graph = helper.make_graph(nodes, "train_drop", [helper.make_tensor_value_info("x", f32, [2, 3])],
                              [helper.make_tensor_value_info("z", f32, [2, 3])],
                              initializer=[numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                                           numpy_helper.from_array(np.array(True), "train")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    clean, records = _run(["cleanup"], lowbit.lower(model))
    assert [n.op_type for n in clean] == ["Dropout", "Relu"]
    assert "drop_eval_dropout" not in records[0].fired


# -- fuse ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_fused(lowered):
    _, _, graph = lowered("resnet18")
    folded, _ = _run(["fold_bn"], graph)
    fused, records = _run(["fuse"], folded)
    return folded, fused, records[0]


def test_fuse_resnet18_conv_relu_pairs(resnet_fused):
    _, fused, record = resnet_fused
    groups = fusion_groups(fused)
    pairs = {k: v for k, v in groups.items() if [n.op_type for n in v] == ["Conv", "Relu"]}
    # conv1 + the first conv of each of the 8 BasicBlocks; the second conv meets the residual Add
    assert len(pairs) == 9
    for key, (conv, relu) in pairs.items():
        assert key == f"linear_bn_act:{relu.name}"
        assert relu.inputs[0] is conv.output
    assert record.fired["linear_bn_act"] == 9


def test_fuse_resnet18_residual_adds_and_their_relus_are_not_grouped(resnet_fused):
    _, fused, _ = resnet_fused
    adds = [n for n in fused if n.op_type == "Add"]
    assert len(adds) == 8
    assert all("fused" not in n.meta for n in adds)
    relus_after_add = [n for n in fused if n.op_type == "Relu" and n.inputs[0].producer.op_type == "Add"]
    assert len(relus_after_add) == 8 and all("fused" not in n.meta for n in relus_after_add)
    assert all("fused" not in n.meta for n in fused if n.op_type in ("MaxPool", "GlobalAveragePool", "Flatten"))


def test_fuse_resnet18_groups_only_chains_a_quantizer_could_split(resnet_fused):
    """A lone layer has nothing a quantizer could split: only multi-node chains become groups."""
    _, fused, _ = resnet_fused
    layers = [n for n in fused if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 21
    groups = fusion_groups(fused)
    assert len(groups) == 9 and all(len(nodes) == 2 for nodes in groups.values())  # the 9 Conv->Relu pairs
    ungrouped = [n for n in layers if "fused" not in n.meta]
    # the 8 second convs and 3 downsample convs feed a residual Add; the classifier Gemm is last
    assert sorted(n.op_type for n in ungrouped) == ["Conv"] * 11 + ["Gemm"]
    assert all(n.output.users[0].op_type == "Add" for n in ungrouped if n.op_type == "Conv")


def test_fuse_does_not_change_numerics_and_annotations_parse_back(resnet_fused, lowered):
    _, x, _ = lowered("resnet18")
    folded, fused, _ = resnet_fused
    assert [n.name for n in fused] == [n.name for n in folded]
    for a, b in zip(folded, fused):
        assert a.inputs and [v.name for v in a.inputs if v] == [v.name for v in b.inputs if v]
    np.testing.assert_array_equal(_ort(fused, x.numpy())[0], _ort(folded, x.numpy())[0])
    text = str(fused)
    annotated = [line for line in text.splitlines() if '  # {"fused": "' in line]
    assert len(annotated) == sum(1 for n in fused if "fused" in n.meta) > 0
    assert '# {"fused": "linear_bn_act:relu"}' in text
    parsed = parse_graph(text, constants={k: v.const for k, v in fused.constants.items()})
    assert {n.name: n.meta.get("fused") for n in parsed} == {n.name: n.meta.get("fused") for n in fused}
    assert str(parsed) == text


def test_fuse_mobilenet_v2_conv_clip_groups(lowered):
    _, _, graph = lowered("mobilenet_v2")
    fused, records = _run(["fold_bn", "fuse"], graph)
    groups = fusion_groups(fused)
    clip_groups = {k: v for k, v in groups.items() if v[-1].op_type == "Clip"}
    assert len(clip_groups) == _count(fused, "Clip") == 35
    for key, nodes in clip_groups.items():
        assert [n.op_type for n in nodes] == ["Conv", "Clip"]
        assert key == f"linear_bn_act:{nodes[1].name}"
    assert records[1].fired["linear_bn_act"] == 35
    assert all("fused" not in n.meta for n in fused if n.op_type == "Add")


def test_fuse_groups_x_times_sigmoid_x_with_its_conv(lowered):
    _, x, graph = lowered("conv_swish")
    fused, records = _run(["fold_bn", "fuse"], graph)
    groups = fusion_groups(fused)
    assert [n.op_type for n in groups["linear_bn_act:mul"]] == ["Conv", "Sigmoid", "Mul"]
    assert [n.op_type for n in groups["scale_shift:add"]] == ["Mul", "Add"]
    assert all(n.name != "tanh" for nodes in groups.values() for n in nodes)
    # without fold_bn the BatchNormalization is inside the group
    unfolded, _ = _run(["fuse"], graph)
    assert [n.op_type for n in fusion_groups(unfolded)["linear_bn_act:mul"]] == [
        "Conv", "BatchNormalization", "Sigmoid", "Mul"]
    np.testing.assert_array_equal(_ort(unfolded, x.numpy())[0], _ort(graph, x.numpy())[0])


def test_fuse_uses_a_registered_pattern_first():
    from lowbit.patterns.library.fused import FUSED_PATTERNS, register_fused_pattern

    factory, shape = SMALL_MODELS["conv_swish"]
    graph = lowbit.lower(factory(), (torch.randn(*shape),))
    pattern = P("Tanh", P("Add", P("Mul", P("Conv", name="conv"), Const()), Const()), name="tanh")
    register_fused_pattern("conv_affine_tanh", pattern)
    try:
        assert FUSED_PATTERNS[0][0] == "conv_affine_tanh"
        with pytest.raises(ValueError, match="exists already"):
            register_fused_pattern("conv_affine_tanh", pattern)
        fused, records = _run(["fuse"], graph)
        groups = fusion_groups(fused)
        assert [n.op_type for n in groups["conv_affine_tanh:tanh"]] == ["Conv", "Mul", "Add", "Tanh"]
        assert "scale_shift:add" not in groups                   # the larger user pattern claimed those nodes
        assert records[0].fired["conv_affine_tanh"] == 1
    finally:
        FUSED_PATTERNS[:] = [e for e in FUSED_PATTERNS if e[0] != "conv_affine_tanh"]
    assert "conv_affine_tanh" not in dict(FUSED_PATTERNS)
    again, _ = _run(["fuse"], graph)
    assert "scale_shift:add" in fusion_groups(again)


def test_fuse_rerun_recomputes_groups_instead_of_stacking_them(lowered):
    _, _, graph = lowered("concat")
    once, _ = _run(["fold_bn", "fuse"], graph)
    twice, records = _run(["fuse"], once)
    assert {n.name: n.meta.get("fused") for n in twice} == {n.name: n.meta.get("fused") for n in once}
    assert Counter(k.split(":")[0] for k in fusion_groups(twice))["linear_bn_act"] == 13
    assert records[0].fired["linear_bn_act"] == 13


def test_cleanup_drops_zero_pads_and_gives_folded_pads_their_shape():
    """Pads computed at run time (transformers' "same" padding: Cast of arithmetic on constants) fold to
    constants; a Pad of zeros is then dropped, and the others get the static shape their pads imply
    (ONNX shape inference had left every dim symbolic)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [helper.make_node("Mul", ["p1", "one"], ["p1m"]), helper.make_node("Cast", ["p1m"], ["pads1"], to=i64),
             helper.make_node("Pad", ["x", "pads1"], ["a"]),
             helper.make_node("Conv", ["a", "w"], ["c"]),
             helper.make_node("Mul", ["p0", "one"], ["p0m"]), helper.make_node("Cast", ["p0m"], ["pads0"], to=i64),
             helper.make_node("Pad", ["c", "pads0"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    inits = {"p1": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.float32), "p0": np.zeros(8, np.float32),
             "one": np.array(1.0, np.float32), "w": np.random.default_rng(0).standard_normal((4, 3, 3, 3))
             .astype(np.float32)}
    graph = helper.make_graph(nodes, "pads", [helper.make_tensor_value_info("x", f, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", f, ["N", 4, 8, 8])],
                              initializer=[numpy_helper.from_array(a, k) for k, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cleaned = lowbit.compile(model, passes=["cleanup"])
    g = lowbit.lower(cleaned)
    pads = [n for n in g if n.op_type == "Pad"]
    assert len(pads) == 1 and pads[0].output.shape == ("N", 3, 10, 10)
    conv = next(n for n in g if n.op_type == "Conv")
    assert conv.output.shape[1:] == (4, 8, 8)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(cleaned, {"x": x})[0], run_onnx(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
