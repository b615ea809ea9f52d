"""ONNX control flow (issue 9): If/Loop subgraphs read outer values by name; those captures are uses.

The models are built with onnx.helper: an If whose branches read an outer Conv's output (nothing else reads
it), a Loop whose body reads an outer initializer and an outer node output, and an If nested in a Loop. Each
lowers, round-trips bit for bit, survives every pass (cleanup used to delete what only a subgraph reads, and
ONNX Runtime then refused the model), quantizes (the layers outside the subgraphs; the subgraphs stay FP32)
and runs in ONNX Runtime and OpenVINO.
"""

import numpy as np
import onnx
import pytest
from conftest import run_onnx, run_openvino
from deploy_checks import HOST_OVERFLOW_FIX, sqnr
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.frontends.onnx import from_onnx
from lowbit.backends.onnx import to_onnx
from lowbit.ir.text import parse_graph, print_graph

F = TensorProto.FLOAT


def _finish(nodes, name, x_shape, y_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info("y", F, y_shape)],
                              initializer=[numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model(batch="1") -> onnx.ModelProto:
    """conv(x) is read only by the If's branches: then Relu(c), else c * two; then conv2. The branch taken
    depends on the whole batch (mean(x) > 0), so the batch is fixed at 1, as exported vision models have it:
    calibration then runs each item alone and sees both branches."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", F, None)])
    else_g = helper.make_graph([helper.make_node("Mul", ["c", "two"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", F, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Conv", ["branch", "w2"], ["y"], name="conv2")]
    b = 1 if batch == "1" else batch
    return _finish(nodes, "if_model", [b, 3, 8, 8], [b, 4, 8, 8],
                   {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
                    "w2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.3,
                    "two": np.array(2.0, np.float32), "zero": np.array(0.0, np.float32)})


def loop_model(nested: bool = False) -> onnx.ModelProto:
    """h = x @ w; a 3-trip Loop accumulates Relu(h) * scale onto h (the body reads h and scale from outside;
    nested: an If in the body picks acc + that or acc - h); y = acc @ w2."""
    rng = np.random.default_rng(0)
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                  helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("Mul", ["r", "scale"], ["rs"])]
    if nested:
        then_g = helper.make_graph([helper.make_node("Add", ["acc_in", "rs"], ["t_out"])], "then", [],
                                   [helper.make_tensor_value_info("t_out", F, None)])
        else_g = helper.make_graph([helper.make_node("Sub", ["acc_in", "h"], ["e_out"])], "else", [],
                                   [helper.make_tensor_value_info("e_out", F, None)])
        body_nodes += [helper.make_node("Less", ["i", "one"], ["first"]),
                       helper.make_node("If", ["first"], ["acc_out"], then_branch=then_g, else_branch=else_g)]
    else:
        body_nodes.append(helper.make_node("Add", ["acc_in", "rs"], ["acc_out"]))
    body = helper.make_graph(body_nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_in", F, None)],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_out", F, None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Loop", ["trip", "true", "h"], ["acc"], body=body, name="loop"),
             helper.make_node("MatMul", ["acc", "w2"], ["y"], name="mm2")]
    inits = {"w": rng.standard_normal((16, 16)).astype(np.float32) * 0.3,
             "w2": rng.standard_normal((16, 4)).astype(np.float32) * 0.3,
             "trip": np.array(3, np.int64), "true": np.array(True), "scale": np.array(0.5, np.float32)}
    if nested:
        inits["one"] = np.array(1, np.int64)
    return _finish(nodes, "loop_model", ["N", 16], ["N", 4], inits)


MODELS = {"if": (if_model, (1, 3, 8, 8)), "loop": (lambda: loop_model(False), (8, 16)),
          "nested": (lambda: loop_model(True), (8, 16))}


def _data(shape, n=8):
    rng = np.random.default_rng(1)
    return [rng.uniform(-1, 1, shape).astype(np.float32) + (0.25 if i % 2 else -0.25) for i in range(n)]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    factory, shape = MODELS[request.param]
    return request.param, factory(), _data(shape)


# -- use-def chains --------------------------------------------------------------------------------------

def test_subgraph_captures_are_uses():
    graph = from_onnx(loop_model(nested=True))
    loop = graph.find_node("loop")
    assert [v.name for v in loop.captures] == ["h", "scale", "one"]  # the nested If's reads included
    assert (loop, 2) in graph.find_value("h").uses and (loop, -1) in graph.find_value("h").uses
    assert graph.find_value("scale").uses == [(loop, -2)] and loop.input(-2) is graph.find_value("scale")
    graph.verify()
    conv = from_onnx(if_model()).find_node("conv")
    assert [n.name for n in conv.output.users] == ["if"]  # read only by the branches: still used
    with pytest.raises(lowbit.GraphError, match="used by if"):
        conv.graph.remove(conv)


def test_verify_names_a_subgraph_read_that_a_pass_broke():
    graph = from_onnx(if_model())
    graph.remove(graph.find_node("conv"), safe=False)  # what a careless pass would do
    with pytest.raises(lowbit.GraphError, match="a subgraph of node 'if' \\(If\\) reads 'c'"):
        graph.verify()


def test_rerouting_a_captured_value_renames_what_the_subgraph_reads():
    model = loop_model(nested=True)
    before = model.SerializeToString()
    graph = from_onnx(model)
    h = graph.find_value("h")
    relu = graph.make_node("Relu", [h], name="extra", after=h.producer)
    graph.replace_all_uses(h, relu.output)
    relu.set_input(0, h)
    graph.verify()
    loop = graph.find_node("loop")
    assert loop.captures[0] is relu.output and h.uses == [(relu, 0)]
    with pytest.raises(lowbit.GraphError, match="subgraph reads it"):
        loop.set_input(-1, None)
    out = to_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    x = _data((8, 16))[0]
    h_ = x @ numpy_helper.to_array(model.graph.initializer[0])
    relu_h = np.maximum(h_, 0)  # the loop now reads Relu(h) where it read h (and starts from it)
    acc = relu_h + 0.5 * np.maximum(relu_h, 0)  # i = 0: acc + Relu(.) * scale
    acc = acc - relu_h - relu_h  # i = 1, 2: acc - h
    want = acc @ numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(run_onnx(out, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    assert model.SerializeToString() == before  # the user's model (and its subgraphs) is untouched


def test_captures_survive_copy_and_the_text_form():
    graph = from_onnx(loop_model(nested=True))
    for other in (graph.copy(), parse_graph(print_graph(graph), {k: v.const for k, v in graph.constants.items()})):
        other.verify()
        loop = other.find_node("loop")
        assert [v.name for v in loop.captures] == ["h", "scale", "one"]
        assert all(v.graph is other for v in loop.captures)


def test_new_names_never_clash_with_names_a_subgraph_defines():
    graph = from_onnx(loop_model())
    assert graph.unique_name("rs") != "rs" and graph.unique_name("acc_out") != "acc_out"


# -- passes, round trip, quantization, runtimes -------------------------------------------------------------

def test_round_trip_is_exact(case):
    _, model, data = case
    out = lowbit.codegen(lowbit.lower(model), "onnx")
    for x in data[:2]:
        np.testing.assert_array_equal(run_onnx(out, {"x": x})[0], run_onnx(model, {"x": x})[0])


def test_cleanup_keeps_what_only_a_subgraph_reads(case):
    _, model, data = case
    out = lowbit.compile(model, ["cleanup", "fold_bn", "fuse"])
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]  # nothing is dead
    for x in data[:2]:
        np.testing.assert_array_equal(run_onnx(out, {"x": x})[0], run_onnx(model, {"x": x})[0])


@pytest.fixture(scope="module")
def quantized(case):
    name, model, data = case
    return name, model, data, lowbit.quantize(model, lowbit.Dataset(data), overflow_fix=HOST_OVERFLOW_FIX)


def test_layers_outside_subgraphs_are_quantized_inside_stay_fp32(quantized):
    name, model, _, q = quantized
    q_inputs = sorted(n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear")
    assert q_inputs == (["branch", "x"] if name == "if" else ["acc", "x"])
    int8_weights = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in {i.name for i in q.graph.initializer}}
    assert int8_weights == ({"w_quantized", "w2_quantized"})
    cf = next(n for n in q.graph.node if n.op_type in ("If", "Loop"))
    original = next(n for n in model.graph.node if n.op_type in ("If", "Loop"))
    assert cf.attribute == original.attribute  # subgraphs unchanged: FP32


def _simulate(q: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The QDQ model in onnx's reference implementation (opset 21 has its QuantizeLinear/DequantizeLinear)."""
    from onnx.reference import ReferenceEvaluator

    sim = onnx.ModelProto()
    sim.CopyFrom(q)
    del sim.opset_import[:]
    sim.opset_import.append(helper.make_opsetid("", 21))
    return ReferenceEvaluator(sim).run(None, {"x": x})[0]


def test_quantized_model_runs_in_onnxruntime_and_openvino(quantized, tmp_path):
    import openvino as ov

    name, model, data, q = quantized
    path = lowbit.export(q, tmp_path / "m.xml")
    compiled = ov.Core().read_model(path)
    # both branches of the If are taken (items alternate the sign of their mean)
    for x in data[:4]:
        fp32 = run_onnx(model, {"x": x})[0]
        ort_out = run_onnx(q, {"x": x})[0]
        assert sqnr(_simulate(q, x), ort_out) >= 40
        assert sqnr(ort_out, run_openvino(compiled, [x])[0]) >= 40
        # measured: if 18.5-22.5 dB; loop 12-13 dB and nested 14-16 dB, as the same model without the Loop
        # (h + 1.5 * Relu(h) in plain ops) gets from these 8 small items: control flow costs nothing
        assert sqnr(fp32, ort_out) >= (15 if name == "if" else 10)


def test_control_flow_model_with_a_dynamic_batch_is_calibrated_item_by_item():
    """With a dynamic batch, items joined into one batch would take one branch of the If for all of them
    (its condition reads the whole batch): the else branch's negative values would then be clipped by an
    unsigned grid. Each item is run alone, so both branches are calibrated."""
    model = if_model(batch="N")
    data = _data((1, 3, 8, 8))
    q = lowbit.quantize(model, lowbit.Dataset(data))
    for x in data[:2]:  # one item of each sign of mean: both branches
        assert sqnr(run_onnx(model, {"x": x})[0], run_onnx(q, {"x": x})[0]) >= 15


def test_fp32_model_runs_in_openvino(case, tmp_path):
    import openvino as ov

    _, model, data = case
    path = lowbit.export(model, tmp_path / "m.xml")
    got = run_openvino(ov.Core().read_model(path), [data[0]])[0]
    np.testing.assert_allclose(got, run_onnx(model, {"x": data[0]})[0], rtol=1e-5, atol=1e-5)


def test_control_flow_cannot_be_written_to_torch_named_error(case):
    with pytest.raises(lowbit.UnsupportedOpError, match="(If|Loop).*torch writer cannot emit"):
        lowbit.codegen(lowbit.lower(case[1]), "torch")


# -- torch.cat's legacy empty inputs (GPT-2 with use_cache=True) -------------------------------------------

def _concat_with_legacy_empty():
    """y = Concat(Mul(e, e), x, axis=-2) with e a 1-D empty constant: torch.cat skips e, ONNX refuses it."""
    from lowbit.ir.graph import Graph

    graph = Graph("cat", {"": 20})
    x = graph.add_input("x", "float32", ("batch", 4, 8, 16))
    e = graph.add_constant("e", np.zeros((0,), np.float32))
    empty = graph.make_node("Mul", [e, e], name="empty").output
    cat = graph.make_node("Concat", [empty, x], {"axis": -2}, name="cat")
    graph.outputs.append(graph.make_node("Relu", [cat.output], name="relu").output)
    return graph, cat


def _cleanup(graph):
    from lowbit.compiler import pass_context, run_pipeline

    return run_pipeline(graph.copy(), ["cleanup"], pass_context())[0]


def test_concat_shape_inference_skips_legacy_empty_inputs():
    graph, cat = _concat_with_legacy_empty()
    assert cat.output.shape == ("batch", 4, 8, 16)
    graph.verify()


def test_legacy_empty_concat_inputs_are_left_out_of_onnx_and_dropped_by_cleanup():
    graph, _ = _concat_with_legacy_empty()
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 16)).astype(np.float32)
    written = to_onnx(graph)  # the writer leaves the empty input out even without cleanup
    onnx.checker.check_model(written, full_check=True)
    np.testing.assert_array_equal(run_onnx(written, {"x": x})[0], np.maximum(x, 0))
    cleaned = _cleanup(graph)
    assert [n.op_type for n in cleaned] == ["Relu"] and cleaned.find_node("relu").input(0).name == "x"
    np.testing.assert_array_equal(run_onnx(to_onnx(cleaned), {"x": x})[0], np.maximum(x, 0))


def test_gpt2_with_its_default_kv_cache_lowers_and_runs_in_onnxruntime():
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    from lowbit.frontends.torch_fx import from_exported_program

    register_dynamic_cache_export_support()  # so torch.export can return the DynamicCache
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 8))
    graph = from_exported_program(torch.export.export(model, (ids,)), "GPT2Model")
    cats = [n for n in graph if n.op_type == "Concat" and any(v.shape == (0,) for v in n.inputs)]
    assert len(cats) == 4  # the key and value caches of two layers start from torch.tensor([])
    assert all(n.output.shape == (1, 4, 8, 16) for n in cats)
    with torch.no_grad():
        want = model(ids)
    wants = [want.last_hidden_state] + [t for layer in want.past_key_values.layers for t in (layer.keys, layer.values)]
    cleaned = _cleanup(graph)
    assert not any(v.shape == (0,) for n in cleaned if n.op_type == "Concat" for v in n.inputs)
    for g in (graph, cleaned):
        got = run_onnx(to_onnx(g), {g.inputs[0].name: ids.numpy()})
        assert len(got) == 5
        got = [got[0], *sorted(got[1:], key=lambda a: float(a.sum()))]
        expected = [wants[0].numpy(), *sorted((t.numpy() for t in wants[1:]), key=lambda a: float(a.sum()))]
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Conv pads as other exporters write them


def _strided_conv_model(rng, **conv_attrs):
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 9, 9])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, None, None])
    weights = [nh.from_array(rng.normal(size=shape).astype(np.float32), name)
               for name, shape in (("w", (8, 3, 3, 3)), ("b", (8,)), ("w2", (4, 8, 1, 1)), ("b2", (4,)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[2, 2], **conv_attrs),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2", "b2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], weights),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("conv_attrs", [{"pads": [0, 0, 1, 1]}, {"auto_pad": "SAME_UPPER"},
                                        {"auto_pad": "SAME_LOWER"}], ids=["asymmetric", "same_upper", "same_lower"])
def test_asymmetric_and_auto_pads_quantize_with_bias_correction(conv_attrs, tmp_path):
    """TensorFlow-exported convs pad asymmetrically (pads=[0,0,1,1]) or say SAME_UPPER: fast_bias_correction
    evaluates such layers with their own padding (it used to fail on them): both convs are evaluated, and the
    bias it corrects differs from the uncorrected model's."""
    import json

    rng = np.random.default_rng(0)
    model = _strided_conv_model(rng, **conv_attrs)
    data = [rng.random((1, 3, 9, 9), dtype=np.float32) for _ in range(16)]
    corrected = lowbit.quantize(model, lowbit.Dataset(data), dump_dir=tmp_path)
    fired = next(e["fired"] for e in json.loads((tmp_path / "passes.json").read_text())
                 if e["name"] == "fast_bias_correction")
    assert fired.get("bias_corrected", 0) >= 1 and sum(fired.values()) == 2  # the other: NNCF's 2x-bias rule
    plain = lowbit.quantize(model, lowbit.Dataset(data), fast_bias_correction=False)
    biases = [{t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name in ("b", "b2")}
              for m in (corrected, plain)]
    assert any(not np.allclose(biases[0][k], biases[1][k]) for k in ("b", "b2"))
    x = np.concatenate(data)
    reference, got = run_onnx(model, {"x": x})[0], run_onnx(corrected, {"x": x})[0]
    assert sqnr(reference, got) >= 20
