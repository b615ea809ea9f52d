"""Untrusted names and texts cannot escape: opaque op names, pass names in dumps, the text-form parser.

- An opaque torch op name comes from a file (ONNX, the text form): the torch
  writer resolves it only to a registered operator overload of its namespace,
  and refuses anything else at codegen time, before any module runs.
- A pass name reaches the dump directory: file names keep only safe
  characters and stay inside `dump_dir`; `index.html` escapes every name.
- `parse_graph` raises nothing but `TextParseError`, whatever the text
  (fuzzed with hypothesis: arbitrary text and mutations of printed graphs).
"""

import html.parser
import json
import os
import re
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from op_models import Opaque

import lowbit
from lowbit import TextParseError, UnsupportedOpError
from lowbit.ir import Graph, parse_graph, print_graph
from lowbit.passes import Pass, PassManager, PassResult
from lowbit.passes.dump import safe_stem

# -- 1. opaque op names resolve only to registered torch operators ---------------------------------

OPAQUE = """\
graph "g" opset {{"": 20, "torch": 1}}
input %x: float32[2,5]
node n = {op}(%x) {{"args": [{{"$input": 0}}, 1], "kwargs": {{}}, "multi_output": false}} -> %y: float32[2,5]
output %y
"""


def _opaque_graph(op_type: str) -> Graph:
    """A one-node graph calling opaque torch op `op_type` (JSON-quoted, as the printer writes it) on x, dim 1."""
    return parse_graph(OPAQUE.format(op=json.dumps(f"torch::{op_type}")))


BAD_OPS = [
    "import_module::__self__.load_library",   # torch.ops.import_module.__self__ is torch.ops itself
    "load_library::x.default",
    "import_module::os.default",
    "higher_order::cond.default",              # not an _OpNamespace
    "aten::cumsum.__call__",
    "aten::cumsum.op",                          # an attribute of the packet, not an overload
    "aten::cumsum._schemas",
    "aten::__class__.default",
    "aten::name.default",                       # _OpNamespace.name is a str
    "aten::no_such_op_xyz.default",
    "aten::cumsum.no_such_overload",
    "aten::cumsum.default.extra",
    "aten::add.no_such",
    "cumsum.default",                           # no namespace
    "::cumsum.default",
    "aten::",
    "",
    "aten::cum sum.default",
    "aten::cumsum.default\nimport os",
    "__builtins__::eval.default",
]


@pytest.mark.parametrize("op_type", BAD_OPS)
def test_an_opaque_op_that_is_not_a_registered_operator_is_refused_at_codegen(op_type, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops, "load_library", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch.ops, "import_module", lambda *a, **k: calls.append(a))
    graph = _opaque_graph(op_type)
    with pytest.raises(UnsupportedOpError) as e:
        lowbit.codegen(graph, "torch")
    msg = str(e.value)
    assert repr(op_type) in msg and "node 'n'" in msg
    assert "only registered torch operators can be emitted" in msg
    assert calls == []


def test_an_onnx_node_in_the_torch_domain_cannot_reach_torch_ops_attributes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops, "load_library", lambda *a, **k: calls.append(a))
    node = helper.make_node("import_module::__self__.load_library", ["x"], ["y"], domain="torch",
                            args=["/tmp/evil.so"], kwargs="{}")
    g = helper.make_graph([node], "evil", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("torch", 1)])
    path = tmp_path / "evil.onnx"
    onnx.save(model, str(path))
    for source in (model, path):
        graph = lowbit.lower(source)
        (n,) = graph.nodes
        assert (n.domain, n.op_type) == ("torch", "import_module::__self__.load_library")
        with pytest.raises(UnsupportedOpError, match=r"only registered torch operators can be emitted"):
            lowbit.codegen(graph, "torch")
    assert calls == []


def test_registered_opaque_ops_still_run_with_the_right_numbers():
    x = torch.randn(2, 5)
    gm = lowbit.codegen(_opaque_graph("aten::cumsum.default"), "torch")
    assert torch.equal(gm(x), torch.cumsum(x, 1))
    cast = parse_graph('graph "g" opset {"": 20, "torch": 1}\ninput %x: float32[3]\n'
                       'node c = "torch::aten::_to_copy.default"(%x) {"args": [{"$input": 0}], '
                       '"kwargs": {"dtype": {"$dtype": "float64"}}} -> %y: float64[3]\noutput %y\n')
    got = lowbit.codegen(cast, "torch")(x[0, :3])
    assert got.dtype == torch.float64 and torch.equal(got, x[0, :3].double())


def test_a_lowered_model_with_opaque_ops_round_trips_through_text_and_torch():
    model = Opaque()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = lowbit.lower(model, (torch.randn(2, 5),))
    assert [n for n in graph if n.domain == "torch"], "Opaque keeps at least one aten op opaque"
    parsed = parse_graph(print_graph(graph), constants={k: v.const for k, v in graph.constants.items()})
    x = torch.randn(3, 5)
    assert torch.equal(lowbit.codegen(parsed, "torch")(x), model(x))


# -- 2. dumps: safe file names, escaped index ----------------------------------------------------

EVIL_NAMES = [
    "../../escape",
    "/etc/passwd",
    "a/b\\c",
    "'quoted\" name",
    "x'><script>alert(1)</script><a href='",
    "..",
    ".",
    "",
    "-rf",
    "n\x00ul\nline",
    "ünïcödé → pass",
    "L" * 500,
    "a/b",      # sanitizes like the next one: names must stay unique
    "a\\b",
]


class _Named(Pass):
    """A pass that changes nothing, with any name and a rule that 'fired' under a hostile name."""

    def __init__(self, name):
        self.name = name

    def __call__(self, graph, ctx):
        return PassResult(graph, changed=False, fired=Counter({f"<script>{self.name}\"'": 1}))


def _relu_graph():
    g = Graph("g")
    x = g.add_input("x", "float32", (2,))
    n = g.make_node("Relu", [x], name="r", output_names=["y"])
    n.output.dtype, n.output.shape = "float32", (2,)
    g.outputs = [n.output]
    return g


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.hrefs, self.ids, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key == "href":
                self.hrefs.append(value)
            elif key == "id":
                self.ids.append(value)

    def handle_data(self, data):
        self.text.append(data)


def test_hostile_pass_names_stay_inside_the_dump_dir_with_safe_names_and_escaped_html(tmp_path):
    dump = tmp_path / "inner" / "dump"
    PassManager([_Named(name) for name in EVIL_NAMES], dump_dir=dump).run(_relu_graph())

    everything = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    files = sorted(os.listdir(dump))
    assert everything == ["inner", "inner/dump"] + [f"inner/dump/{f}" for f in files], "a file escaped dump_dir"
    assert all((dump / f).is_file() for f in files)
    for f in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", f) and ".." not in f and len(f) <= 80, f
    stems = sorted({f.rsplit(".", 1)[0] for f in files} - {"index", "passes"})
    assert len(stems) == len(EVIL_NAMES) + 1                  # every pass and the input: unique stems
    for stem in stems:
        assert {f"{stem}.txt", f"{stem}.diff", f"{stem}.dot"} <= set(files)

    page = (dump / "index.html").read_text()
    assert "<script" not in page.lower()
    parser = _Links()
    parser.feed(page)
    assert "script" not in parser.tags
    assert sorted(parser.ids) == stems
    for href in parser.hrefs:
        assert href.lstrip("#") in stems or href in files, href
    shown = "".join(parser.text)
    for name in EVIL_NAMES:
        assert name.strip() in shown                            # the real name is shown, escaped
        assert f"<script>{name}\"'" in shown                   # and so is the rule that fired


def test_safe_stems_are_unique_bounded_and_never_dot_dot():
    taken = set()
    stems = [safe_stem(1, name, taken) for name in ["../x", "..\\x", "../x", "", "..", "X" * 1000, "Case", "case"]]
    assert len(set(s.lower() for s in stems)) == len(stems)
    for s in stems:
        assert re.fullmatch(r"01-[A-Za-z0-9._-]+", s) and ".." not in s and len(s) <= 70, s


# -- 3. the text parser raises only TextParseError ----------------------------------------------

def _seed_graphs():
    """A few printed graphs (and the constants their digests need) that cover the whole text form."""
    seeds = []
    g = Graph("tiny")
    x = g.add_input("a b", "float32", ("batch", 3, 4, 4))
    w = g.add_constant("onnx::Conv_3", np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3) / 10)
    two = g.add_constant("two", np.array(2.0, np.float32))
    sizes = g.add_constant("sizes", np.array([1, 1], np.int64))
    conv = g.make_node("Conv", [x, w, None], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 1},
                       name="conv", output_names=["conv_out"], meta={"fused": "conv:conv"})
    mul = g.make_node("Mul", [conv.output, two], name="mul", output_names=["scaled"])
    split = g.make_node("Split", [mul.output, sizes], {"axis": 1}, name="split", output_names=["lo", "hi"])
    for v in (conv.output, mul.output):
        v.dtype, v.shape = "float32", ("batch", 2, 4, 4)
    for v in split.outputs:
        v.dtype, v.shape = "float32", ("batch", 1, None, "s0 + 1")
    g.outputs = list(split.outputs)
    seeds.append(g)

    g = Graph('attrs "quoted"')
    x = g.add_input("input:0", "float16", None)
    attrs = {"f32": np.array([[0.5, np.nan]], np.float32), "bytes": b"\x00\xff", "nested": [[1, 2], {"a": None}],
             "big": 2 ** 62, "inf": float("-inf"), "s": "naïve", "proto": helper.make_tensor("t", 1, [1], [1.0]),
             "args": [{"$input": 0}, 1], "kwargs": {"dtype": {"$dtype": "float32"}}}
    n = g.make_node("Custom", [x, None], attrs, name="/layer.0/Add = x", domain="my.domain", output_names=["o, 1"])
    c = g.add_constant("_", np.array([True, False]))
    m = g.make_node("Where", [c, n.output, n.output], name="w", output_names=["z"])
    m.output.dtype = "bool"
    g.outputs = [m.output]
    seeds.append(g)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeds.append(lowbit.lower(Opaque(), (torch.randn(2, 5),)))
        seeds.append(lowbit.lower(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                                      torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2)),
                                  (torch.randn(1, 3, 8, 8),)))
    return [(print_graph(s), {k: v.const for k, v in s.constants.items()}) for s in seeds]


SEEDS = _seed_graphs()
HEAD = 'graph "g" opset {"": 21}\ninput %x: float32[2]\n'
PAYLOADS = [
    '"', "'", "[", "]", "{", "}", "(", ")", "%", ",", ":", "=", "->", "_", "#", "\n", " ", "?", "-", ".", "::",
    "\\", "\\u0000", "\\ud800", "\x00", "\t", "é", "\U0001f642", "sha256:", "sha256:00", "0", "-1", "1e999", "NaN",
    "Infinity", "-Infinity", "true", "null", "99999999999999999999", "9" * 5000, "-" + "9" * 5000,
    "[" * 3000, "{\"a\":" * 3000, "[[[[[[[[1]]]]]]]]",
    '{"__ndarray__": {"dtype": "float32", "shape": [3], "data": [1]}}',
    '{"__ndarray__": {"dtype": "nope", "shape": 1, "data": "x"}}', '{"__ndarray__": 5}', '{"__ndarray__": {}}',
    '{"__bytes__": "!!!"}', '{"__bytes__": 5}', '{"__proto__": "TensorProto", "data": "zz=="}',
    '{"__proto__": "load", "data": ""}', '{"__proto__": "ModelProto", "data": "AAAA"}', '{"__proto__": 1}',
    "float32", "int64", "bool", "object", "U8", "V3", "string", "float8e4m3fn", "node", "input", "const", "output",
    "graph", "opset", "%x", '""', '"torch::aten::cumsum.default"', "torch::import_module::__self__.load_library",
    '[1, 2.5, true, null, "s", [3]]', "[1e308, 1e308]", "[-1]", "[0]", "[99999999999]",
]
MUTATION = st.tuples(st.sampled_from(["delete", "duplicate", "insert", "replace", "token", "swap_lines"]),
                     st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.sampled_from(PAYLOADS))


def mutate(text, mutations):
    """Apply (kind, a, b, payload) edits to `text`: cut, copy, insert, overwrite, swap a token or two lines."""
    for kind, a, b, payload in mutations:
        n = max(len(text), 1)
        i, j = sorted((a % n, a % n + b % 40))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "insert":
            text = text[:i] + payload + text[i:]
        elif kind == "replace":
            text = text[:i] + payload + text[i + 1 + b % 3:]
        elif kind == "token":
            tokens = [m.span() for m in re.finditer(r'"[^"\n]*"|[A-Za-z0-9_.:\-]+|\S', text)]
            if tokens:
                (s, e), (s2, e2) = tokens[a % len(tokens)], tokens[b % len(tokens)]
                text = text[:s] + (payload if (a ^ b) & 1 else text[s2:e2]) + text[e:]
        else:
            lines = text.split("\n")
            x, y = a % len(lines), b % len(lines)
            lines[x], lines[y] = lines[y], lines[x]
            text = "\n".join(lines)
    return text


def parse_or_text_error(text, constants=None):
    """Parse; a TextParseError is fine, and any other exception fails the test."""
    try:
        parse_graph(text, constants=constants)
    except TextParseError:
        pass


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_printed_graphs_parse_or_raise_text_parse_error(seed, mutations):
    text, constants = SEEDS[seed]
    parse_or_text_error(mutate(text, mutations), constants)


PREFIXES = ["", HEAD, HEAD + "node n = Relu(%x) ", HEAD + "node n = Relu(%x) {\"a\": ", HEAD + "const %c: float32[",
            HEAD + "const %c: float32[2] = ", HEAD + "node n = Relu(%x) -> %y: float32[2]  # "]
JSONISH = st.lists(st.sampled_from(list('{}[]",:%_-.0123456789e #\n') + ["__ndarray__", "__bytes__", "__proto__",
                                                                         "dtype", "shape", "data", "->"])).map("".join)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(prefix=st.sampled_from(PREFIXES), body=st.one_of(st.text(), JSONISH))
def test_arbitrary_text_parses_or_raises_text_parse_error(prefix, body):
    parse_or_text_error(prefix + body)


@pytest.mark.parametrize("text", [
    HEAD + "const %c: float32[1] = " + "[" * 100_000 + "]" * 100_000 + "\n",      # RecursionError
    HEAD + 'node n = Relu(%x) ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + " -> %y: float32[2]\n",
    HEAD + "const %c: int64[1] = [" + "9" * 5000 + "]\n",                          # int digit limit
    HEAD + "input %y: float32[" + "9" * 5000 + "]\n",
    HEAD + "const %c: int64[1] = [99999999999999999999999]\n",                     # OverflowError
    HEAD + "const %c: float32[99999999999999999999999] = [1.0]\n",
    HEAD + "const %c: float32[-1] = [1.0]\n",                                     # parsed as float32[1]
    HEAD + "const %c: float32[-5] = [1.0]\n",
    HEAD + "const %c: object[1] = [{\"a\": 1}]\n",                              # an object array
    HEAD + 'node n = Relu(%x) {"a": {"__bytes__": "!!!"}} -> %y: float32[2]\n',      # binascii.Error
    HEAD + 'node n = Relu(%x) {"a": {"__ndarray__": {"dtype": "float32"}}} -> %y: float32[2]\n',   # KeyError
    HEAD + 'node n = Relu(%x) {"a": {"__ndarray__": 3}} -> %y: float32[2]\n',        # TypeError
    HEAD + 'node n = Relu(%x) {"a": {"__ndarray__": {"dtype": "U100000000", "shape": [1], "data": ["a"]}}} '
           '-> %y: float32[2]\n',                                                    # a 400 MB string item
    HEAD + 'node n = Relu(%x) {"a": {"__proto__": "load", "data": ""}} -> %y: float32[2]\n',
    HEAD + 'node n = Relu(%x) {"a": {"__proto__": "TensorProto", "data": "zz"}} -> %y: float32[2]\n',
    HEAD + 'node n = Relu(%x) -> %y: float32[2]  # [1]\n',                         # meta that is not a dict
    HEAD + "const %c: float32[] = sha256:00\n",
    'graph "g" opset []\n',
    'graph 5 opset {"": "x"}\n',
])
def test_known_crashers_and_silently_accepted_texts_raise_text_parse_error(text):
    with pytest.raises(TextParseError):
        parse_graph(text, constants={"c": np.zeros(1, np.float32)})


def test_a_proto_attribute_names_only_onnx_proto_classes(monkeypatch):
    called = []
    monkeypatch.setattr(onnx, "load", lambda *a, **k: called.append(a) or onnx.TensorProto())
    with pytest.raises(TextParseError, match=r"line 3: .*'load' is not an ONNX proto type"):
        parse_graph(HEAD + 'node n = Relu(%x) {"a": {"__proto__": "load", "data": ""}} -> %y: float32[2]\n')
    assert called == []
