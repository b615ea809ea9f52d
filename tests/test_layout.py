"""The package's layering, checked with ast: no pass imports another pass (what passes share lives in
lowbit/quant or lowbit/ir; data one pass leaves for another goes through the PassContext)."""

from __future__ import annotations

import ast
from pathlib import Path

PASSES = Path(__file__).resolve().parent.parent / "lowbit" / "passes"
INFRASTRUCTURE = {"__init__", "base", "builtin", "manager", "dump"}  # the pass machinery, not passes


def _imported_siblings(path: Path) -> set[str]:
    """Names of modules of lowbit/passes that `path` imports (relative imports of level 1)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lowbit.passes."):
            found.add(node.module.split(".")[2])
    return found


def test_no_pass_imports_another_pass():
    passes = {p.stem for p in PASSES.glob("*.py")} - INFRASTRUCTURE
    assert {"quantize", "fast_bias_correction", "smooth_quant", "cleanup"} <= passes
    offenders = {p.stem: sorted(_imported_siblings(p) & passes) for p in PASSES.glob("*.py")
                 if p.stem in passes and _imported_siblings(p) & passes}
    assert offenders == {}


# --------------------------------------------------------------------------- one op table

PACKAGE = PASSES.parent
OP_TABLES = {PACKAGE / "ir" / "ops.py", PACKAGE / "backends" / "torch_ops.py"}  # the op table and its aten mapping


def _op_sets(path: Path, vocabulary: set[str]) -> list[str]:
    """`file:line` of every set, tuple or list literal in `path`, or dict literal of constants, that names two or
    more ops."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            items = node.elts
        elif isinstance(node, ast.Dict) and all(isinstance(v, ast.Constant) for v in node.values):
            items = [k for k in node.keys if k is not None]  # a table of facts (a dispatch table maps to code)
        else:
            continue
        names = [e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if sum(name in vocabulary for name in names) >= 2:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_only_the_op_table_defines_op_sets():
    """Facts about ops (groups, axes, defaults, channel flow) live in lowbit/ir/ops.py; a module that writes its
    own set of op names would drift from it (they used to disagree: five activation lists, two UNARY tables)."""
    from lowbit.ir.ops import VOCABULARY

    vocabulary = set(VOCABULARY) | {"FakeQuantize", "QuantizeLinear", "DequantizeLinear"}
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path not in OP_TABLES
                 for hit in _op_sets(path, vocabulary)]
    assert offenders == []
    # and the check sees one: the table itself is full of them
    assert len(_op_sets(PACKAGE / "ir" / "ops.py", vocabulary)) >= 5


def test_the_op_table_knows_each_ops_channel_flow_and_axes():
    from lowbit.ir.ops import FLOWS, VOCABULARY, activation_axis, channel_flow, weight_in_axis, weight_out_axis

    assert all(info.flow in FLOWS for info in VOCABULARY.values())
    from lowbit.ir.graph import Graph

    graph = Graph("g")
    x = graph.add_input("x", "float32", (1, 4, 8, 8))

    def node(op, **attrs):
        return graph.make_node(op, [x], attrs)

    gemm, gemm_t = node("Gemm"), node("Gemm", transB=1)
    assert (weight_out_axis(gemm), weight_in_axis(gemm)) == (1, 0)
    assert (weight_out_axis(gemm_t), weight_in_axis(gemm_t)) == (0, 1)
    conv, depthwise = node("Conv"), node("Conv", group=4)
    assert (weight_out_axis(conv), weight_in_axis(conv), activation_axis(conv)) == (0, 1, 1)
    assert (channel_flow(conv), channel_flow(depthwise)) == ("layer", "grouped")
    assert (weight_out_axis(node("MatMul")), activation_axis(node("MatMul"))) == (-1, -1)
    assert [channel_flow(node(op)) for op in ("Relu", "Concat", "Split", "Flatten", "MaxPool", "ReduceMean")] == [
        "elementwise", "concat", "split", "reshape", "pool", "reduce"]
    assert weight_out_axis(node("Relu")) is None


# --------------------------------------------------------------------------- arrows between packages

UPPER_LAYERS = {"passes", "patterns", "quant", "backends", "frontends", "runtime", "pruning", "train"}
# the frameworks lowbit reads and writes; ONNX is not one of them here: the IR's vocabulary, dtype codes and
# subgraph attributes are ONNX's (../shared/DESIGN.md, "The IR")
FRAMEWORKS = {"torch", "onnxruntime", "openvino", "nncf", "transformers"}


def _lowbit_imports(path: Path) -> set[str]:
    """The lowbit subpackages `path` imports (absolute, or relative from inside lowbit/<package>/)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("lowbit."):
                found.add(node.module.split(".")[1])
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lowbit."))
    return found


def test_the_core_ir_imports_no_pass_pattern_algorithm_or_backend():
    """Arrows point one way (../shared/DESIGN.md): nothing in lowbit/ir/ imports the layers built on it."""
    offenders = {p.name: sorted(_lowbit_imports(p) & UPPER_LAYERS) for p in sorted((PACKAGE / "ir").glob("*.py"))
                 if _lowbit_imports(p) & UPPER_LAYERS}
    assert offenders == {}
    assert "errors" in _lowbit_imports(PACKAGE / "ir" / "graph.py")  # the check reads relative imports


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-lowbit modules `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - {"lowbit"}


def test_the_core_ir_imports_no_framework():
    """The framework borders live in frontends/ (readers) and backends/ (writers); lowbit/ir/ is plain Python and
    numpy, so a pass or a pattern written against it runs for a torch model and an ONNX model alike."""
    offenders = {p.name: sorted(_third_party_imports(p) & FRAMEWORKS) for p in sorted((PACKAGE / "ir").glob("*.py"))
                 if _third_party_imports(p) & FRAMEWORKS}
    assert offenders == {}
    # and the check sees an import: the torch writer imports torch
    assert "torch" in _third_party_imports(PACKAGE / "backends" / "torch_emit.py")
    readers_and_writers = {p.stem for p in (PACKAGE / "frontends").glob("*.py")} | {
        p.stem for p in (PACKAGE / "backends").glob("*.py")}
    assert {"onnx", "torch_fx", "torch_emit", "qdq", "openvino"} <= readers_and_writers


def test_the_onnx_ptq_path_imports_no_torch(tmp_path):
    """An ONNX model is lowered, calibrated in ONNX Runtime, bias-corrected in numpy and written back without
    torch ever being imported (checked in a fresh interpreter)."""
    import subprocess
    import sys

    script = """
import sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
import lowbit
rng = np.random.default_rng(0)
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])
weights = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
           numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")]
nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], weights), opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
q = lowbit.quantize(model, lowbit.Dataset([rng.random((1, 3, 8, 8), dtype=np.float32) for _ in range(4)]))
assert [n.op_type for n in q.graph.node].count("DequantizeLinear") == 2  # the input and the weight
lowbit.export(q, sys.argv[1])
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "q.xml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def _unit_imports(path: Path) -> set[str]:
    """The other top-level units of lowbit (a subpackage or a module beside api.py) that `path` imports, at
    module level or inside a function."""
    parts = path.relative_to(PACKAGE).parts
    me, depth = parts[0].removesuffix(".py"), len(parts) - 1
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not (node.module or "").startswith("lowbit."):
                continue
            found.add(node.module.split(".")[1])
        elif node.level - 1 == depth:  # reaches lowbit/ itself
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return found - {me, "__version__"}


def test_no_import_cycles_between_the_packages():
    """Arrows between lowbit's units point one way (function-level imports included): api -> frontends/backends,
    state -> compiler -> ir, never back."""
    import networkx as nx

    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        if path != PACKAGE / "__init__.py":
            graph.add_edges_from((path.relative_to(PACKAGE).parts[0].removesuffix(".py"), unit)
                                 for unit in _unit_imports(path))
    assert ("compiler", "passes") in graph.edges and ("frontends", "ir") in graph.edges
    assert list(nx.simple_cycles(graph)) == []


def test_every_bench_script_imports():
    """`make bench` runs bench/run.py, which imports every bench: a name a refactor removed from the package
    (bench/patterns.py imported two op sets that moved into the op table) fails here, not in a bench run."""
    import subprocess
    import sys

    bench = PACKAGE.parent / "bench"
    out = subprocess.run([sys.executable, "-c", "import run, ov_latency, report"], cwd=bench, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
