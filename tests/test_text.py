"""The text form of a graph is stable and parses back.

`print_graph` writes one statement a line; `parse_graph` reads it back into a
graph that prints the same text and computes the same outputs, bit for bit.
Large constants are written by digest and come back from `constants=`; small
ones are written inline. Attributes keep their Python types through the text
(JSON plus tagged numpy arrays). Every parse error is a `TextParseError` that
names the line at fault.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import run_onnx
from models import REFERENCE_MODELS
from op_models import Opaque

import lowbit
from lowbit import TextParseError
from lowbit.ir import Graph, parse_graph, print_graph


def _constants(graph):
    return {name: v.const for name, v in graph.constants.items()}


# -- reference models ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_models_print_parse_and_run_identically(name):
    factory, shape = REFERENCE_MODELS[name]
    model = factory()
    graph = lowbit.lower(model, (torch.randn(*shape),))
    text = print_graph(graph)
    assert str(graph) == text
    assert print_graph(graph) == text, "printing is deterministic"
    assert text.startswith(f'graph "{graph.name}" opset ') and text.endswith("\n")
    assert len(text.splitlines()) == 1 + len(graph.inputs) + len(graph.constants) + len(graph) + len(graph.outputs)

    parsed = parse_graph(text, constants=_constants(graph))
    parsed.verify()
    assert print_graph(parsed) == text
    assert [n.op_type for n in parsed] == [n.op_type for n in graph]

    x = np.random.default_rng(0).standard_normal((3, *shape[1:])).astype(np.float32)
    want = run_onnx(lowbit.codegen(graph, "onnx"), {graph.inputs[0].name: x})
    got = run_onnx(lowbit.codegen(parsed, "onnx"), {parsed.inputs[0].name: x})
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        assert w.tobytes() == g.tobytes(), f"{name}: max diff {np.abs(w - g).max()}"


def test_opaque_torch_nodes_keep_their_domain_and_op_through_the_text_form():
    model = Opaque()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = lowbit.lower(model, (torch.randn(2, 5),))
    text = print_graph(graph)
    assert 'node cummax = "torch::aten::cummax.default"(%x) {"args": [{"$input": 0}, 1]' in text
    parsed = parse_graph(text, constants=_constants(graph))
    assert print_graph(parsed) == text
    assert [(n.domain, n.op_type) for n in parsed] == [(n.domain, n.op_type) for n in graph]
    assert ("torch", "aten::cummax.default") in [(n.domain, n.op_type) for n in parsed]
    x = torch.randn(4, 5)
    assert torch.equal(lowbit.codegen(parsed, "torch")(x), model(x))


# -- the exact text of a small graph ----------------------------------------------------

def _tiny():
    g = Graph("tiny")
    x = g.add_input("a b", "float32", ("batch", 3, 4, 4))
    w = g.add_constant("onnx::Conv_3", np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3) / 10)
    two = g.add_constant("two", np.array(2.0, np.float32))
    sizes = g.add_constant("sizes", np.array([1, 1], np.int64))
    conv = g.make_node("Conv", [x, w, None], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1],
                                               "dilations": [1, 1], "group": 1},
                       name="conv", output_names=["conv_out"])
    mul = g.make_node("Mul", [conv.output, two], name="mul", output_names=["scaled"])
    split = g.make_node("Split", [mul.output, sizes], {"axis": 1}, name="split", output_names=["lo", "hi"])
    for v in (conv.output, mul.output):
        v.dtype, v.shape = "float32", ("batch", 2, 4, 4)
    for v in split.outputs:
        v.dtype, v.shape = "float32", ("batch", 1, 4, 4)
    g.outputs = list(split.outputs)
    g.verify()
    return g


TINY = """\
graph "tiny" opset {"": 21}
input %"a b": float32[batch,3,4,4]
const %"onnx::Conv_3": float32[2,3,3,3] = sha256:3557a2030e6653d0
const %two: float32[] = [2.0]
const %sizes: int64[2] = [1, 1]
node conv = Conv(%"a b", %"onnx::Conv_3", _) {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 3], \
"pads": [1, 1, 1, 1], "strides": [1, 1]} -> %conv_out: float32[batch,2,4,4]
node mul = Mul(%conv_out, %two) -> %scaled: float32[batch,2,4,4]
node split = Split(%scaled, %sizes) {"axis": 1} -> %lo: float32[batch,1,4,4], %hi: float32[batch,1,4,4]
output %lo
output %hi
"""


def test_exact_text_of_a_small_graph():
    g = _tiny()
    assert print_graph(g) == TINY
    assert str(g) == TINY


def test_the_small_graph_parses_back_with_its_structure():
    g = _tiny()
    parsed = parse_graph(TINY, constants={"onnx::Conv_3": g.constants["onnx::Conv_3"].const})
    assert print_graph(parsed) == TINY
    assert parsed.name == "tiny" and parsed.opset_imports == {"": 21}
    (x,) = parsed.inputs
    assert (x.name, x.dtype, x.shape) == ("a b", "float32", ("batch", 3, 4, 4))
    conv, mul, split = parsed.nodes
    assert conv.inputs[0] is x and conv.inputs[2] is None and len(conv.inputs) == 3
    assert conv.attrs == {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                          "strides": [1, 1]}
    assert x.uses == [(conv, 0)] and conv.output.uses == [(mul, 0)]
    two = parsed.constants["two"]
    assert two.const.shape == () and two.const.dtype == np.float32 and two.const == 2.0
    sizes = parsed.constants["sizes"]
    assert sizes.const.dtype == np.int64 and sizes.const.tolist() == [1, 1]
    np.testing.assert_array_equal(parsed.constants["onnx::Conv_3"].const, g.constants["onnx::Conv_3"].const)
    assert not parsed.constants["onnx::Conv_3"].const.flags.writeable
    assert [v.name for v in split.outputs] == ["lo", "hi"] and parsed.outputs == split.outputs
    assert [v.index for v in split.outputs] == [0, 1]


def test_a_changed_weight_changes_the_digest():
    g = _tiny()
    before = print_graph(g)
    w = g.constants["onnx::Conv_3"]
    changed = w.const.copy()
    changed[0, 0, 0, 0] += 1
    w.const = changed
    after = print_graph(g)
    diff = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(diff) == 1 and diff[0][0].startswith('const %"onnx::Conv_3"')


def test_types_and_shapes_round_trip():
    g = Graph("types")
    values = [
        g.add_input("sym", "float32", ("batch", None, 3, "s0 + 1")),  # a dim that is not an identifier
        g.add_input("scalar", "int64", ()),
        g.add_input("unknown_rank", "float16", None),
        g.add_input("untyped", None, None),
        g.add_input("no_dtype", None, (2, 3)),
    ]
    text = print_graph(g)
    assert 'input %sym: float32[batch,?,3,"s0 + 1"]\n' in text
    assert "input %scalar: int64[]\n" in text and "input %unknown_rank: float16\n" in text
    assert "input %untyped: ?\n" in text and "input %no_dtype: ?[2,3]\n" in text
    parsed = parse_graph(text)
    assert print_graph(parsed) == text
    assert [(v.name, v.dtype, v.shape) for v in parsed.inputs] == [(v.name, v.dtype, v.shape) for v in values]


def test_quoted_names_of_every_kind_round_trip():
    g = Graph('a "quoted" graph')
    x = g.add_input("input:0", "float32", (2,))
    c = g.add_constant("_", np.array([1.0, -0.5], np.float32))
    n = g.make_node("Add", [x, c], name="/layer.0/Add = x", output_names=["out -> 1, 2"])
    n.output.dtype, n.output.shape = "float32", (2,)
    g.outputs = [n.output]
    text = print_graph(g)
    parsed = parse_graph(text)
    assert print_graph(parsed) == text
    assert parsed.name == 'a "quoted" graph'
    (node,) = parsed.nodes
    assert node.name == "/layer.0/Add = x" and node.output.name == "out -> 1, 2"
    assert [v.name for v in node.inputs] == ["input:0", "_"]


def test_inline_constants_keep_dtype_shape_and_values():
    g = Graph("consts")
    arrays = {
        "f32": np.array([[0.1, -2.5], [np.inf, 1e-30]], np.float32),
        "f64": np.array([1 / 3, -0.0], np.float64),
        "f16": np.array([0.1, 65504.0], np.float16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "i64": np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min], np.int64),
        "b": np.array([True, False, True]),
        "scalar": np.array(7, np.int32),
        "empty": np.zeros((0, 3), np.float32),
    }
    for name, a in arrays.items():
        g.add_constant(name, a)
    text = print_graph(g)
    assert "sha256" not in text
    parsed = parse_graph(text)
    assert print_graph(parsed) == text
    for name, a in arrays.items():
        got = parsed.constants[name].const
        assert got.dtype == a.dtype and got.shape == a.shape, name
        assert got.tobytes() == a.tobytes(), name


# -- parse errors ---------------------------------------------------------------------------

HEAD = 'graph "g" opset {"": 21}\ninput %x: float32[2]\n'


@pytest.mark.parametrize("text,match", [
    (HEAD + "nodes r = Relu(%x) -> %r: float32[2]\n", r"^line 3: .*one of graph, input, const, node, output"),
    (HEAD + "node r = Relu(%y) -> %r: float32[2]\n", r"^line 3: value %y is used before it is defined"),
    (HEAD + "output %nope\n", r"^line 3: value %nope is used before it is defined"),
    (HEAD + "node r = Relu(%x) -> %r: float32[2]\nnode s = Relu(%x) -> %r: float32[2]\n",
     r"^line 4: value %r is defined twice"),
    (HEAD + "node r = Relu(%x -> %r: float32[2]\n", r"^line 3: expected"),
    (HEAD + 'node r = Relu(%x) {"alpha": } -> %r: float32[2]\n', r"^line 3: expected JSON"),
    (HEAD + "node r = Relu(%x) -> %r: float32[2] trailing\n", r"^line 3: expected end of line"),
    ("input %x: float32[2]\n", r"^line 1: expected 'graph' on the first line"),
    ("\n# a comment\ninput %x: float32[2]\n", r"^line 3: expected 'graph' on the first line"),
    ("graph g opset {}\n", r"^line 1: expected JSON"),
    ("", r"holds no graph"),
])
def test_parse_errors_name_the_line(text, match):
    with pytest.raises(TextParseError, match=match):
        parse_graph(text)


def test_missing_constants_for_a_digest_tell_the_user_to_pass_them():
    text = print_graph(_tiny())
    with pytest.raises(TextParseError, match=r"^line 3: constant %onnx::Conv_3 .*digest.*constants=\{'onnx::Conv_3'"):
        parse_graph(text)
    with pytest.raises(TextParseError, match=r"^line 3: .*constants="):
        parse_graph(text, constants={"two": np.array(2.0, np.float32)})


def test_a_constant_that_does_not_match_its_digest_is_refused():
    g = _tiny()
    text = print_graph(g)
    w = g.constants["onnx::Conv_3"].const
    for wrong in (w + 1, w.astype(np.float64), w.reshape(3, 2, 3, 3)):
        with pytest.raises(TextParseError, match=r"^line 3: the array given for constant %onnx::Conv_3 does not "
                                                 r"match its digest 3557a2030e6653d0"):
            parse_graph(text, constants={"onnx::Conv_3": wrong})


def test_a_value_defined_twice_by_inputs_or_constants_is_a_parse_error():
    with pytest.raises(TextParseError, match=r"^line 3: .*%x.*defined twice"):
        parse_graph(HEAD + "input %x: float32[2]\n")
    with pytest.raises(TextParseError, match=r"^line 3: .*%x.*defined twice"):
        parse_graph(HEAD + "const %x: float32[2] = [1.0, 2.0]\n")


def test_an_inline_constant_that_does_not_fit_its_type_is_a_parse_error():
    with pytest.raises(TextParseError, match=r"^line 3: .*%c"):
        parse_graph(HEAD + "const %c: float32[3] = [1.0, 2.0]\n")
    with pytest.raises(TextParseError, match=r"^line 3: .*%c"):
        parse_graph(HEAD + "const %c: floatish[2] = [1.0, 2.0]\n")


def test_parse_errors_are_lowbit_errors():
    assert issubclass(TextParseError, lowbit.LowbitError)


# -- attributes ------------------------------------------------------------------------------

ATTRS = {
    "int": 3,
    "negative": -7,
    "big": 2 ** 62,
    "zero": 0,
    "bool": True,
    "float": 0.5,
    "epsilon": 1e-5,
    "third": 1 / 3,
    "whole_float": 1.0,
    "nan": float("nan"),
    "neg_inf": float("-inf"),
    "string": "tanh",
    "unicode": "naïve → ünïcode \"quoted\"",
    "empty_string": "",
    "none": None,
    "ints": [1, -2, 3],
    "floats": [0.1, 2.5, 1e-5],
    "strings": ["NCHW", "a b"],
    "empty_list": [],
    "f32_array": np.array([[0.1, -2.0, np.nan]], np.float32),
    "f64_scalar_array": np.array(1.5, np.float64),
    "i64_array": np.array([1, -2, 2 ** 40], np.int64),
    "u8_array": np.array([[0], [255]], np.uint8),
    "bool_array": np.array([True, False]),
    "bytes": b"\x00\xff raw",
    "template": {"args": [{"$input": 0}, 1, [-1], None, True, 2.5],
                 "kwargs": {"dtype": {"$dtype": "float32"}, "memory_format": {"$memory_format": "contiguous_format"}},
                 "multi_output": False},
    "nested": [[1, 2], {"a": [0.5, {"$input": 1}]}, [[np.array([3], np.int32)]]],
}


def _assert_same(got, want, path="attrs"):
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def test_attributes_round_trip_with_their_python_types():
    g = Graph("attrs")
    x = g.add_input("x", "float32", (2,))
    node = g.make_node("Custom", [x], ATTRS, name="n", domain="my.domain", output_names=["y"])
    g.outputs = [node.output]
    text = print_graph(g)
    parsed = parse_graph(text)
    assert print_graph(parsed) == text
    (got,) = parsed.nodes
    assert got.domain == "my.domain" and got.op_type == "Custom"
    _assert_same(got.attrs, ATTRS)
    assert repr(got.attrs["epsilon"]) == "1e-05"


@pytest.mark.parametrize("value", [1e-5, 1e-12, 0.1, 1 / 6, 3.4028234663852886e38, 5e-324, -0.0, float("inf")])
def test_float_attributes_are_exact(value):
    g = Graph("floats")
    x = g.add_input("x", "float32", (2,))
    g.make_node("HardSigmoid", [x], {"alpha": value}, name="n")
    (node,) = parse_graph(print_graph(g)).nodes
    got = node.attrs["alpha"]
    assert type(got) is float and got == value and math.copysign(1, got) == math.copysign(1, value)


def test_node_annotations_print_after_the_node_and_parse_back_into_meta():
    g = Graph("notes")
    x = g.add_input("x", "float32", (2,))
    node = g.make_node("Relu", [x], name="r", output_names=["y"], meta={"fused": "conv_relu:r", "origin": "hidden"})
    g.outputs = [node.output]
    text = print_graph(g)
    assert 'node r = Relu(%x) -> %y: float32[2]  # {"fused": "conv_relu:r"}\n' in text
    assert "hidden" not in text  # only annotations are printed, not every meta key
    (node,) = parse_graph(text).nodes
    assert node.meta == {"fused": "conv_relu:r"}
    assert print_graph(parse_graph(text)) == text
