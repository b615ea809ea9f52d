"""The PassManager (pipelines of names, instances and functions; records; dumps; errors) and lowbit.compile.

A pipeline works on a copy of its graph, records what each pass did, writes
per-pass text/diff/dot files and an index when asked, and turns every failure
into a LowbitError that names the pass, the broken node and the passes run
before it.
"""

import copy
import json
import os
import re
import shutil
import stat
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx
from models import REFERENCE_MODELS

import lowbit
from lowbit.passes import DEFAULT_PIPELINE, FunctionPass, Pass, PassContext, PassManager, PassResult
from lowbit.passes.fold_bn import FoldBatchNorm

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(name):
    factory, shape = REFERENCE_MODELS[name]
    torch.manual_seed(1)
    return factory(), torch.randn(*shape)


@pytest.fixture(scope="module")
def small():
    """The SE net (Conv/BN/Swish/HardSwish, 27 nodes), lowered once."""
    model, x = _model("se")
    return model, x, lowbit.lower(model, (x,))


@pytest.fixture(scope="module")
def resnet():
    model, x = _model("resnet18")
    return model, x, lowbit.lower(model, (x,))


def _count(graph, op):
    return sum(1 for n in graph if n.op_type == op)


# -- running passes ------------------------------------------------------------------

def add_neg_at_end(graph, ctx):
    """A function pass: negate the first output (adds one node)."""
    out = graph.outputs[0]
    neg = graph.make_node("Neg", [out], name="negate")
    graph.outputs[0] = neg.output
    return True


def test_passes_by_name_instance_and_function_with_records(small):
    _, _, graph = small
    pm = PassManager(["cleanup", FoldBatchNorm(), add_neg_at_end, "fuse"])
    assert [p.name for p in pm.passes] == ["cleanup", "fold_bn", "add_neg_at_end", "fuse"]
    assert isinstance(pm.passes[2], FunctionPass)
    ctx = PassContext()
    out = pm.run(graph, ctx)
    out.verify()
    assert ctx.history == ["cleanup", "fold_bn", "add_neg_at_end", "fuse"]
    rows = [(r.index, r.name, r.nodes_before, r.nodes_after, dict(r.fired)) for r in pm.records]
    assert rows[:3] == [
        (1, "cleanup", 27, 27, {}),
        (2, "fold_bn", 27, 23, {"fold_bn_conv": 4}),
        (3, "add_neg_at_end", 23, 24, {}),
    ]
    assert rows[3][:4] == (4, "fuse", 24, 24) and rows[3][4]["linear_bn_act"] == 8
    assert [r.changed for r in pm.records] == [False, True, True, True]
    assert all(r.seconds >= 0 for r in pm.records)
    assert out.nodes[-1].op_type == "Neg" and out.outputs[0] is out.nodes[-1].output
    assert len(graph) == 27 and graph.nodes[-1].op_type != "Neg"     # the input graph is untouched


def test_a_pass_class_and_a_function_returning_a_pass_result():
    g = lowbit.ir.graph.Graph("g")
    x = g.add_input("x", "float32", (2,))
    g.outputs.append(g.make_node("Identity", [x], name="id").output)

    class Nothing(Pass):
        name = "nothing"

        def __call__(self, graph, ctx):
            return PassResult(graph, changed=False, notes=["looked, found nothing"])

    def counted(graph, ctx):
        return PassResult(graph, changed=True, fired={"custom_rule": 2})

    def quiet(graph, ctx):
        return None

    pm = PassManager([Nothing, counted, quiet])
    pm.run(g)
    assert [(r.name, r.changed, dict(r.fired), r.notes) for r in pm.records] == [
        ("nothing", False, {}, ["looked, found nothing"]),
        ("counted", True, {"custom_rule": 2}, []),
        ("quiet", True, {}, []),
    ]


def test_the_default_pipeline():
    assert DEFAULT_PIPELINE == ["cleanup", "fold_bn", "fuse"]


# -- dumps ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_dump(resnet, tmp_path_factory):
    _, _, graph = resnet
    d = tmp_path_factory.mktemp("dump")
    pm = PassManager(["cleanup", "fold_bn", "fuse"], dump_dir=d)
    pm.run(graph)
    return d, pm


def test_dump_writes_txt_diff_dot_for_every_pass(resnet_dump):
    d, _ = resnet_dump
    names = set(os.listdir(d))
    for stem in ("00-input", "01-cleanup", "02-fold_bn", "03-fuse"):
        for ext in ("txt", "diff", "dot"):
            assert f"{stem}.{ext}" in names, f"missing {stem}.{ext}"
    assert {"index.html", "passes.json"} <= names
    assert not [n for n in names if n.startswith("04-")]
    assert (d / "00-input.txt").read_text().startswith('graph "ResNet"')
    assert (d / "02-fold_bn.txt").read_text().count("BatchNormalization") == 0
    assert (d / "01-cleanup.dot").read_text().startswith("digraph ")


def test_dump_txt_is_the_text_form_of_each_step(resnet_dump, resnet):
    d, _ = resnet_dump
    _, _, graph = resnet
    assert (d / "00-input.txt").read_text() == str(graph)
    fused = PassManager(["cleanup", "fold_bn", "fuse"]).run(graph)
    assert (d / "03-fuse.txt").read_text() == str(fused)


def test_dump_index_lists_every_pass_and_the_rules_that_fired(resnet_dump):
    d, _ = resnet_dump
    html = (d / "index.html").read_text()
    for name in ("input", "cleanup", "fold_bn", "fuse"):
        assert f">{name}</a>" in html
    assert "fold_bn_conv &times;20" in html
    assert "linear_bn_act &times;9" in html


def test_fold_bn_diff_lists_exactly_the_removed_batch_norms(resnet_dump, resnet):
    d, _ = resnet_dump
    _, _, graph = resnet
    diff = (d / "02-fold_bn.diff").read_text()
    removed = [line for line in diff.splitlines() if line.startswith("- node")]
    assert len(removed) == _count(graph, "BatchNormalization") == 20
    assert all("= BatchNormalization(" in line for line in removed)
    assert {line.split()[2] for line in removed} == {n.name for n in graph if n.op_type == "BatchNormalization"}
    assert diff.startswith("# nodes: +0 added, -20 removed")
    assert not [line for line in diff.splitlines() if line.startswith("+ node")]


def test_passes_json_matches_the_records(resnet_dump):
    d, pm = resnet_dump
    entries = json.loads((d / "passes.json").read_text())
    assert [e["name"] for e in entries] == ["input", "cleanup", "fold_bn", "fuse"]
    assert entries[0]["counts"] == [0, 0, 0] and entries[0]["before"] == entries[0]["after"] == 69
    for e, r in zip(entries[1:], pm.records):
        assert e["index"] == r.index
        assert (e["before"], e["after"]) == (r.nodes_before, r.nodes_after)
        assert e["counts"] == [r.added, r.removed, r.modified]
        assert e["fired"] == dict(r.fired)
    fold = entries[2]
    assert fold["counts"][:2] == [0, 20] and fold["fired"] == {"fold_bn_conv": 20}
    annotated = (d / "03-fuse.txt").read_text().count('  # {"fused": ')
    assert entries[3]["counts"] == [0, 0, annotated]       # fuse only annotates: every marked node is "changed"
    assert annotated >= 18                                  # at least the 9 Conv->Relu pairs


def test_svg_is_written_iff_graphviz_is_on_path(resnet_dump):
    d, _ = resnet_dump
    svgs = sorted(n for n in os.listdir(d) if n.endswith(".svg"))
    if shutil.which("dot") is None:
        assert svgs == []
        assert "graph (svg)" not in (d / "index.html").read_text()
    else:
        assert svgs == ["00-input.svg", "01-cleanup.svg", "02-fold_bn.svg", "03-fuse.svg"]


def test_svg_is_rendered_with_the_dot_found_on_path(small, tmp_path, monkeypatch):
    """A stand-in `dot` on PATH shows how the manager calls Graphviz: DOT on stdin, -Tsvg -o FILE."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    dot = fake_bin / "dot"
    dot.write_text(f"#!{sys.executable}\n"
                   "import sys\n"
                   "src = sys.stdin.read()\n"
                   "assert sys.argv[1] == '-Tsvg' and src.startswith('digraph')\n"
                   "open(sys.argv[sys.argv.index('-o') + 1], 'w').write('<svg>%d</svg>' % len(src))\n")
    dot.chmod(dot.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    _, _, graph = small
    out = tmp_path / "dump"
    PassManager(["fold_bn"], dump_dir=out).run(graph)
    assert sorted(n for n in os.listdir(out) if n.endswith(".svg")) == ["00-input.svg", "01-fold_bn.svg"]
    assert (out / "01-fold_bn.svg").read_text().startswith("<svg>")
    assert "href='01-fold_bn.svg'" in (out / "index.html").read_text()


# -- errors ----------------------------------------------------------------------------

def test_an_unknown_pass_name_lists_the_known_passes_and_suggests_one():
    with pytest.raises(lowbit.UnknownPassError) as e:
        PassManager(["cleanup", "fold_nb"])
    msg = str(e.value)
    assert msg.startswith("unknown pass 'fold_nb'. Did you mean 'fold_bn'?")
    known = msg.split("Known passes: ")[1].split(", ")
    assert {"cleanup", "fold_bn", "fuse"} <= set(known)
    assert known == sorted(known)
    with pytest.raises(lowbit.UnknownPassError) as e:
        PassManager(["zzzzzz"])
    assert "Did you mean" not in str(e.value)


def test_a_pipeline_entry_of_the_wrong_kind_is_refused():
    with pytest.raises(lowbit.UnknownPassError, match="not int"):
        PassManager([42])


def test_a_dump_dir_that_cannot_be_written_raises_dump_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "dumps"
    with pytest.raises(lowbit.DumpError) as e:
        PassManager(["cleanup"], dump_dir=target)
    assert str(target) in str(e.value)
    assert isinstance(e.value, lowbit.LowbitError)


class UseBeforeDef(Pass):
    """Breaks the graph: a node inserted at the front reads the output of the last node."""

    name = "use_before_def"

    def __call__(self, graph, ctx):
        graph.make_node("Neg", [graph.nodes[-1].outputs[0]], name="too_early", before=graph.nodes[0])
        return PassResult(graph, changed=True)


class DropUses(Pass):
    """Breaks the graph: forgets the uses of the first input."""

    name = "drop_uses"

    def __call__(self, graph, ctx):
        graph.inputs[0]._uses.clear()
        return PassResult(graph, changed=True)


def test_a_pass_that_uses_a_value_before_its_definition_raises_pass_error(small):
    _, _, graph = small
    with pytest.raises(lowbit.PassError) as e:
        PassManager(["cleanup", UseBeforeDef()]).run(graph)
    msg = str(e.value)
    assert "pass 'use_before_def' (step 2) left the graph invalid" in msg
    assert "node 'too_early' (Neg) input 0" in msg and "is defined by a later node" in msg
    assert msg.endswith("Passes run before it: cleanup")
    graph.verify()                                      # the caller's graph is intact


def test_a_pass_that_corrupts_use_lists_raises_pass_error(small):
    _, _, graph = small
    first = graph.nodes[0]
    with pytest.raises(lowbit.PassError) as e:
        PassManager([DropUses()]).run(graph)
    msg = str(e.value)
    assert "pass 'drop_uses' (step 1) left the graph invalid" in msg
    assert f"does not list node {first.name!r} input 0 as a use" in msg
    assert msg.endswith("Passes run before it: none")


def test_verify_can_be_turned_off(small):
    _, _, graph = small
    out = PassManager([DropUses()], verify=False).run(graph)
    assert len(out) == len(graph)


def test_a_pass_raising_a_plain_exception_names_it_and_the_passes_run_before(small):
    _, _, graph = small

    def explode(graph, ctx):
        raise RuntimeError("boom")

    with pytest.raises(lowbit.PassError) as e:
        PassManager(["cleanup", "fold_bn", explode, "fuse"]).run(graph)
    assert str(e.value) == ("pass 'explode' (step 3) failed with RuntimeError: boom. "
                            "Passes run before it: cleanup, fold_bn")
    assert isinstance(e.value.__cause__, RuntimeError)


def test_a_pass_returning_something_else_than_a_pass_result(small):
    _, _, graph = small

    class Sloppy(Pass):
        name = "sloppy"

        def __call__(self, graph, ctx):
            return graph

    with pytest.raises(lowbit.PassError, match="pass 'sloppy' returned Graph, not a PassResult"):
        PassManager([Sloppy()]).run(graph)


def test_requires_raising_stops_the_pipeline(small):
    _, _, graph = small
    ran = []

    class Needy(Pass):
        name = "needy"

        def requires(self, graph, ctx):
            if "fold_bn" not in ctx.history:
                raise lowbit.PassError("pass 'needy' needs fold_bn to run first")

        def __call__(self, graph, ctx):
            ran.append(self.name)
            return PassResult(graph, changed=False)

    def after(graph, ctx):
        ran.append("after")

    pm = PassManager(["cleanup", Needy(), after])
    with pytest.raises(lowbit.PassError, match="needs fold_bn to run first"):
        pm.run(graph)
    assert ran == []
    assert [r.name for r in pm.records] == ["cleanup"]
    # with its precondition met it runs, and so does the rest
    PassManager(["fold_bn", Needy(), after]).run(graph)
    assert ran == ["needy", "after"]


def test_a_missing_prerequisite_is_named_before_any_pass_runs(small):
    """quantize needs fuse (a quantizer between a MatMul and its bias Add would split the fused pattern)."""
    _, _, graph = small
    ran = []

    def spy(graph, ctx):
        ran.append("spy")

    pm = PassManager([spy, "cleanup", "quantize"])
    with pytest.raises(lowbit.PassError) as e:
        pm.run(graph, PassContext(dataset=lowbit.Dataset([torch.zeros(1, 1, 8, 8)])))
    assert str(e.value) == (
        "pass 'quantize' needs 'fuse' to have run before it, and it has not (pipeline: spy, cleanup, quantize; run "
        "on this graph before: none). Run passes=['spy', 'cleanup', 'fuse', 'quantize']")
    assert ran == [] and pm.records == []
    with pytest.raises(lowbit.PassError, match="pass 'fast_bias_correction' needs 'quantize'"):
        lowbit.compile(small[0], ["cleanup", "fuse", "fast_bias_correction"], example_inputs=(small[1],))


def test_prerequisites_run_in_an_earlier_pipeline_count(small):
    """The graph records the passes run on it, so a fused graph (or a module compile returned) can be quantized
    in a pipeline of its own."""
    _, x, graph = small
    fused = PassManager(["cleanup", "fuse"]).run(graph)
    assert fused.meta["passes_run"] == ["cleanup", "fuse"]
    assert "passes_run" not in graph.meta  # the input graph is never modified
    data = lowbit.Dataset([x])
    quantized = PassManager(["quantize"]).run(fused, PassContext(dataset=data, options={"progress": False}))
    assert quantized.meta["passes_run"] == ["cleanup", "fuse", "quantize"]
    module = lowbit.compile(small[0], ["cleanup", "fuse"], example_inputs=(x,))
    q = lowbit.compile(module, ["quantize", "snap_bias"], dataset=data, progress=False)
    assert sum(1 for n in q.lowbit_graph if n.op_type == "FakeQuantize") > 0


def test_a_plain_exception_from_requires_or_ensures_becomes_a_pass_error(small):
    _, _, graph = small

    class Picky(Pass):
        name = "picky"

        def requires(self, graph, ctx):
            raise ValueError("no BatchNormalization allowed")

        def __call__(self, graph, ctx):
            return PassResult(graph, changed=False)

    class Broken(Pass):
        name = "broken_promise"

        def __call__(self, graph, ctx):
            return PassResult(graph, changed=False)

        def ensures(self, graph, ctx):
            raise AssertionError("no fusion groups")

    with pytest.raises(lowbit.PassError, match=r"pass 'picky' \(step 2\) failed with ValueError: no "
                                               r"BatchNormalization allowed\. Passes run before it: cleanup"):
        PassManager(["cleanup", Picky()]).run(graph)
    with pytest.raises(lowbit.PassError, match=r"pass 'broken_promise' \(step 1\) failed with AssertionError"):
        PassManager([Broken()]).run(graph)


# -- lowbit.compile ------------------------------------------------------------------------

def _leaves(x):
    return torch.utils._pytree.tree_leaves(x)


def test_compile_a_torch_model_gives_a_torch_module_with_the_same_outputs():
    model, x = _model("se")
    out = lowbit.compile(model, example_inputs=(x,))
    assert isinstance(out, torch.nn.Module) and isinstance(out, torch.fx.GraphModule)
    ops = [n.target for n in out.graph.nodes if n.op == "call_function"]
    assert not [t for t in ops if "batch_norm" in str(t)], "the default pipeline folds BN"
    for batch in (2, 5):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            np.testing.assert_allclose(out(xb).numpy(), model(xb).numpy(), **TOL)


def test_compile_does_not_mutate_the_users_model():
    model, x = _model("se")
    model.train()
    state = copy.deepcopy(model.state_dict())
    lowbit.compile(model, example_inputs=(x,))
    assert model.training is True
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    model.eval()
    lowbit.compile(model, example_inputs=(x,))
    assert model.training is False


def test_a_training_wrapper_around_a_model_in_eval_mode_gives_a_module_in_eval_mode():
    """nn.Module starts in training mode: a wrapper made around a model the user put in eval mode (its Dropout
    off) must not give back a module whose Dropout drops out."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    inner = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4)).eval()
    wrapper, x = Wrapper(inner), torch.randn(6, 8)
    assert wrapper.training and not inner[1].training
    out = lowbit.compile(wrapper, [], example_inputs=(x,))
    assert not out.training
    with torch.no_grad():
        np.testing.assert_allclose(out(x).numpy(), wrapper(x).numpy(), rtol=1e-6, atol=1e-6)
    inner.train()  # every Dropout training: the module lowbit gives back trains too
    assert lowbit.compile(wrapper, [], example_inputs=(x,)).training


def _onnx_model(tmp_path):
    model, x = _model("concat")
    proto = lowbit.codegen(lowbit.lower(model, (x,)), "onnx")
    path = tmp_path / "concat.onnx"
    onnx.save(proto, path)
    return proto, path, x.numpy()


def test_compile_an_onnx_model_or_path_gives_a_model_proto(tmp_path):
    proto, path, x = _onnx_model(tmp_path)
    original = proto.SerializeToString()
    want = run_onnx(proto, {"x": x})[0]
    for source in (proto, path, str(path)):
        out = lowbit.compile(source)
        assert isinstance(out, onnx.ModelProto)
        assert not [n for n in out.graph.node if n.op_type == "BatchNormalization"]
        np.testing.assert_allclose(run_onnx(out, {"x": x})[0], want, **TOL)
    assert proto.SerializeToString() == original         # the user's ModelProto is not mutated


def test_compile_with_no_passes_named_runs_cleanup_fold_bn_fuse(tmp_path):
    model, x = _model("se")
    lowbit.compile(model, example_inputs=(x,), dump_dir=tmp_path / "d")
    entries = json.loads((tmp_path / "d" / "passes.json").read_text())
    assert [e["name"] for e in entries] == ["input", "cleanup", "fold_bn", "fuse"]
    assert entries[2]["fired"] == {"fold_bn_conv": 4}


def test_compile_with_passes_and_dump_dir(tmp_path):
    model, x = _model("se")
    d = tmp_path / "dumps"
    out = lowbit.compile(model, passes=["fold_bn"], example_inputs=(x,), dump_dir=d)
    assert sorted(n for n in os.listdir(d) if not n.endswith(".svg")) == [
        "00-input.diff", "00-input.dot", "00-input.txt", "01-fold_bn.diff", "01-fold_bn.dot", "01-fold_bn.txt",
        "index.html", "passes.json"]
    assert re.search(r">fold_bn</a>", (d / "index.html").read_text())
    assert "fused" not in (d / "01-fold_bn.txt").read_text()   # fuse did not run
    with torch.no_grad():
        np.testing.assert_allclose(out(x).numpy(), model(x).numpy(), **TOL)


def test_compile_with_an_unknown_pass_raises_unknown_pass_error():
    model, x = _model("se")
    with pytest.raises(lowbit.UnknownPassError, match="Did you mean 'fuse'"):
        lowbit.compile(model, passes=["fusee"], example_inputs=(x,))


def test_options_are_typed_and_checked_where_a_context_is_built():
    """Passes read ctx.options.<field>; a dict is converted, and an unknown key or value is named."""
    ctx = PassContext(options={"progress": False, "overflow_fix": "enable"})
    assert (ctx.options.progress, ctx.options.overflow_fix, ctx.options.range_estimator) == (False, "enable",
                                                                                           "mean_min_max")
    assert ctx.options.effective_preset == "performance"
    assert PassContext(options={"model_type": "transformer"}).options.effective_preset == "mixed"
    with pytest.raises(lowbit.OptionError, match="unknown option 'overflowfix': the options are batch_size, "):
        PassContext(options={"overflowfix": "enable"})
    with pytest.raises(lowbit.OptionError, match="unknown overflow_fix 'auto': use one of enable, first_layer, "
                                                 "disable"):
        PassContext(options={"overflow_fix": "auto"})
    with pytest.raises(lowbit.OptionError, match="batch_size must be a positive int, got 0"):
        PassContext(options={"batch_size": 0})


class _TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _drop_filters(graph, keep=6, reinfer_after=False):
    """What filter pruning does: conv a keeps `keep` filters, conv b the matching input channels."""
    from lowbit.ir.infer import reinfer

    a, b = [n for n in graph if n.op_type == "Conv"]
    for conv, cut in ((a, lambda w: w[:keep]), (b, lambda w: w[:, :keep])):
        fresh = graph.add_constant(f"{conv.name}_pruned_weight", np.ascontiguousarray(cut(conv.input(1).const)))
        conv.set_input(1, fresh)
    a.set_input(2, graph.add_constant(f"{a.name}_pruned_bias", a.input(2).const[:keep].copy()))
    if reinfer_after:
        assert reinfer(graph) == 2  # conv a's output and the Relu's
    return True


class _Stale(Pass):
    name = "stale"

    def __call__(self, graph, ctx):
        return PassResult(graph, changed=_drop_filters(graph))


def test_a_pass_that_leaves_a_stale_shape_is_named_and_reinfer_fixes_it():
    """verify() checks recorded dtypes and shapes against what each node's inputs give; reinfer re-derives them
    (downstream too) after a pass that changes shapes, as pruning will."""
    graph = lowbit.lower(_TwoConvs().eval(), (torch.randn(1, 3, 8, 8),))
    conv_a = next(n for n in graph if n.op_type == "Conv")
    with pytest.raises(lowbit.PassError, match=(
            rf"pass 'stale' \(step 1\) left the graph invalid: node {conv_a.name!r} \(Conv\) output "
            rf"{conv_a.output.name!r} records shape \('batch', 8, 8, 8\), but its inputs give \('batch', 6, 8, 8\)")):
        PassManager([_Stale()]).run(graph)
    pruned = PassManager([lambda g, ctx: _drop_filters(g, reinfer_after=True)]).run(graph)
    shapes = {n.op_type: n.output.shape for n in pruned}
    assert shapes["Conv"] == ("batch", 4, 3, 3) and shapes["Relu"] == ("batch", 6, 8, 8)
    x = torch.randn(2, 3, 8, 8)
    got = lowbit.codegen(pruned, "torch")(x)
    assert tuple(got.shape) == (2, 4, 3, 3)


def test_a_models_own_wrong_value_info_is_mended_not_blamed_on_a_pass():
    """An exporter's stale value_info (a Conv output recorded with the wrong channel count) would make the first
    pass look guilty: the PassManager re-derives contradicted shapes before it runs anything."""
    graph = lowbit.lower(_TwoConvs().eval(), (torch.randn(1, 3, 8, 8),))
    conv_a = next(n for n in graph if n.op_type == "Conv")
    conv_a.output.shape = ("batch", 5, 8, 8)  # what a buggy exporter might have written
    out = PassManager(["cleanup"]).run(graph)
    assert next(n for n in out if n.op_type == "Conv").output.shape == ("batch", 8, 8, 8)
