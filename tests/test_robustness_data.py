"""Calibration takes any data the model takes (issue 9): items of different shapes, fixed-batch models, one-shot
generators read once, NaN/inf named by item, degenerate ranges the runtimes agree on, float16 models, and the
messages for a missing dataset, a bad subset_size and an ignored_scope of the wrong type."""

import copy
import re
import types

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import run_onnx, run_openvino
from deploy_checks import HOST_OVERFLOW_FIX, sqnr

import lowbit
from lowbit.api import graph_of
from lowbit.compiler import pass_context, ptq_passes, run_pipeline
from lowbit.ir.graph import Graph
from lowbit.backends.openvino import to_openvino
from lowbit.backends.torch_fq import FakeQuantize
from lowbit.quant.dataset import CalibrationData, batches


def _quantized_graph(model, data, **options):
    """The quantized IR of `model` (what compile writes back), to run as the torch simulation."""
    passes = ptq_passes(data, options.get("model_type"))
    ctx = pass_context(dataset=data, progress=False, **options)
    example = None
    if isinstance(model, nn.Module):
        example = (ctx.dataset.first(),)
    graph, _ = run_pipeline(lowbit.lower(model, example), passes, ctx)
    return graph


def _fq_count(module) -> int:
    return sum(isinstance(m, FakeQuantize) for m in module.modules())


def _fq_ranges(module) -> list[np.ndarray]:
    return [np.concatenate([m.low.detach().numpy().ravel(), m.high.detach().numpy().ravel()])
            for m in module.modules() if isinstance(m, FakeQuantize)]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return Small().eval()


def _images(n, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


# --------------------------------------------------------------------------- shapes and batches


def _graph(*inputs) -> Graph:
    g = Graph("g", {"": 20})
    for name, shape in inputs:
        g.add_input(name, "float32", shape)
    return g


def test_items_of_different_shapes_are_grouped_never_concatenated():
    g = _graph(("x", ("batch", "seq")))
    lengths = [5, 5, 7, 5, 5, 5]
    data = CalibrationData([np.ones((1, n), np.float32) for n in lengths], 300)
    assert [b[0].shape for b in batches(g, data, batch_size=2)] == [(2, 5), (1, 7), (2, 5), (1, 5)]


def test_fixed_batch_gets_exactly_that_batch():
    g = _graph(("x", (2, 4)), ("m", (2, 4)))
    items = [(np.full((n, 4), i, np.float32), np.full((n, 4), -i, np.float32)) for i, n in enumerate([1, 1, 3, 1])]
    got = list(batches(g, CalibrationData(items, 300), batch_size=32))
    assert [b[0].shape for b in got] == [(2, 4)] * 3
    assert [b[0][:, 0].tolist() for b in got] == [[0, 1], [2, 2], [2, 3]]
    assert all(np.array_equal(x, -m) for x, m in got)  # the inputs of one sample stay together


def test_inputs_that_disagree_on_dim0_are_fed_one_by_one():
    g = _graph(("x", ("batch", 4)), ("scale", (4,)))
    items = [(np.ones((1, 4), np.float32), np.ones(4, np.float32))] * 3
    assert [b[1].shape for b in batches(g, CalibrationData(items, 300))] == [(4,)] * 3
    bad = CalibrationData([(np.ones((1, 4), np.float32), np.ones(5, np.float32))], 300)
    with pytest.raises(lowbit.DatasetError, match=r"dataset item 0: input 'scale' expected float32\[4\]"):
        list(batches(g, bad))


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    from zoo_models import build

    module, make_input, model_type = build("bert", "small")
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    torch.onnx.export(module, (make_input(1),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})
    return module, onnx.load(str(path)), model_type


def test_natural_length_text_calibrates_on_the_onnx_path(bert_onnx):
    module, model, model_type = bert_onnx
    g = torch.Generator().manual_seed(5)
    items = [torch.randint(0, 100, (1, n), generator=g).numpy() for n in (5, 9, 9, 3, 12, 7, 7, 7)]
    q = lowbit.quantize(model, lowbit.Dataset(items), model_type=model_type, overflow_fix=HOST_OVERFLOW_FIX)
    x = torch.randint(0, 100, (2, 10), generator=g)
    with torch.no_grad():
        reference = module(x).numpy()
    assert sqnr(reference, run_onnx(q, {"x": x.numpy()})[0]) >= 12  # 16.6 dB measured (random small BERT)


class Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.emb(ids))))


def test_natural_length_text_calibrates_on_the_torch_path_with_a_dynamic_sequence():
    torch.manual_seed(0)
    model = Text().eval()
    seq = torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(model, (torch.randint(0, 50, (1, 8)),), dynamic_shapes=({1: seq},))
    g = torch.Generator().manual_seed(0)
    items = [torch.randint(0, 50, (1, n), generator=g) for n in (5, 9, 9, 3, 12)]
    q = lowbit.quantize(program, lowbit.Dataset(items))
    assert _fq_count(q) == 4
    x = torch.randint(0, 50, (1, 7), generator=g)
    with torch.no_grad():
        assert sqnr(model(x).numpy(), q(x).numpy()) >= 18  # 21.9 dB measured (5 short calibration items)


@pytest.fixture(scope="module")
def fixed_batch_onnx(small, tmp_path_factory):
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    torch.onnx.export(small, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"])  # no dynamic axes: x is float32[1, 3, 8, 8]
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    return model


def test_fixed_batch_onnx_model_calibrates_at_its_batch(fixed_batch_onnx):
    """Batches of 4 are split into the batch of 1 the model takes; min-max ranges are those of the same samples
    fed one by one, so the two QDQ models are identical."""
    by_four = lowbit.quantize(fixed_batch_onnx, lowbit.Dataset([x.numpy() for x in _images(3, batch=4)]))
    one_by_one = lowbit.quantize(fixed_batch_onnx, lowbit.Dataset(
        [x[i:i + 1].numpy() for x in _images(3, batch=4) for i in range(4)]))
    scales = [i for i in by_four.graph.initializer if i.name.endswith("_scale")]
    assert len(scales) >= 4
    assert by_four.SerializeToString() == one_by_one.SerializeToString()
    x = _images(1)[0].numpy()
    assert run_onnx(by_four, {"x": x})[0].shape == (1, 4, 8, 8)


# --------------------------------------------------------------------------- one-shot iterables


class Attention(nn.Module):
    """MatMuls with constant weights (smooth_quant acts) and a biased layer (fast_bias_correction acts)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        scores = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), dim=-1)
        return self.out(scores @ h)


def _counting(items, pulled):
    for i, x in enumerate(items):
        pulled.append(i)
        yield x


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_a_generator_is_read_once_by_capture_and_every_pass(origin):
    torch.manual_seed(0)
    model = Attention().eval()
    g = torch.Generator().manual_seed(1)
    items = [torch.randn(2, 6, 16, generator=g) for _ in range(6)]
    if origin == "onnx":
        model = lowbit.codegen(lowbit.lower(model, (items[0],)), "onnx")
        items = [x.numpy() for x in items]
    pulled = []
    from_generator = lowbit.quantize(model, lowbit.Dataset(_counting(items, pulled)), model_type="transformer")
    assert pulled == list(range(6))  # capture, smooth_quant, quantize and fast_bias_correction: one read
    from_list = lowbit.quantize(model, lowbit.Dataset(items), model_type="transformer")
    if origin == "torch":  # item 0 was not used up by capture: the same ranges as from a list
        assert _fq_count(from_generator) == _fq_count(from_list) > 0
        for a, b in zip(_fq_ranges(from_generator), _fq_ranges(from_list)):
            np.testing.assert_array_equal(a, b)
    else:
        assert from_generator.SerializeToString() == from_list.SerializeToString()


def test_subset_size_limits_what_is_read():
    pulled = []
    lowbit.quantize(Small().eval(), lowbit.Dataset(_counting(_images(10), pulled)), subset_size=3)
    assert pulled == [0, 1, 2]


# --------------------------------------------------------------------------- NaN and inf


def _poisoned(index, value, n=5):
    items = _images(n)
    items[index] = items[index].clone()
    items[index][0, 1, 2, 3] = value
    return items


@pytest.mark.parametrize("index,value,what",
                         [(3, float("nan"), r"1 NaN and 0 inf"), (0, float("inf"), r"0 NaN and 1 inf")])
def test_nan_or_inf_in_calibration_data_names_the_item_torch(small, index, value, what):
    snapshot = copy.deepcopy(small.state_dict())
    with pytest.raises(lowbit.DatasetError, match=rf"dataset item {index} holds {what} value\(s\) of 192"):
        lowbit.quantize(small, lowbit.Dataset(_poisoned(index, value)))
    assert all(torch.equal(v, snapshot[k]) for k, v in small.state_dict().items())


def test_nan_in_calibration_data_names_the_item_onnx(small):
    model = lowbit.codegen(lowbit.lower(small, (torch.randn(1, 3, 8, 8),)), "onnx")
    items = [{"x": x.numpy()} for x in _poisoned(2, float("-inf"))]
    with pytest.raises(lowbit.DatasetError, match=r"dataset item 2 at \['x'\] holds 0 NaN and 1 inf"):
        lowbit.quantize(model, lowbit.Dataset(items))


def test_nan_is_found_before_any_pass_runs(small):
    """smooth_quant would run first; the bad item is the last one, found when the items are read."""
    items = [torch.randn(2, 6, 16) for _ in range(4)] + [torch.full((2, 6, 16), float("nan"))]
    with pytest.raises(lowbit.DatasetError, match=r"dataset item 4 holds 192 NaN"):
        lowbit.quantize(Attention().eval(), lowbit.Dataset(items), model_type="transformer")


# --------------------------------------------------------------------------- degenerate ranges


class Degenerate(nn.Module):
    def __init__(self):
        super().__init__()
        self.zero = nn.Conv2d(3, 4, 3, padding=1)  # all-zero weight: a constant output (its bias)
        self.after_const = nn.Conv2d(4, 4, 3, padding=1)  # reads that constant activation
        self.dead = nn.Conv2d(3, 4, 1)  # zero weight, negative bias: ReLU gives an all-zero activation
        self.after_zero = nn.Conv2d(4, 4, 1)
        self.part = nn.Conv2d(3, 4, 1)  # one all-zero filter
        with torch.no_grad():
            self.zero.weight.zero_()
            self.zero.bias.copy_(torch.tensor([0.5, -0.25, 1.0, 2.0]))
            self.dead.weight.zero_()
            self.dead.bias.fill_(-1.0)
            self.part.weight[1].zero_()

    def forward(self, x):
        a = self.after_const(torch.relu(self.zero(x)))
        b = self.after_zero(torch.relu(self.dead(x)))
        return a + b + self.part(x)


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_degenerate_ranges_agree_in_every_runtime(origin, tmp_path):
    torch.manual_seed(0)
    model = fp32 = Degenerate().eval()
    items = _images(4, batch=2)
    if origin == "onnx":
        model = lowbit.codegen(lowbit.lower(model, (items[0],)), "onnx")
        items = [x.numpy() for x in items]
    graph = _quantized_graph(model, lowbit.Dataset(items))
    quantizers = [n for n in graph if n.op_type == "FakeQuantize"]
    assert len(quantizers) == 12
    for n in quantizers:  # every range is usable: no 1e-8 widths
        assert np.all(n.input(2).const - n.input(1).const >= 8e-5), n.name
    x = _images(1, batch=4, seed=7)[0]
    with torch.no_grad():
        simulation = lowbit.codegen(graph, "torch")(x).numpy()
        assert sqnr(fp32(x).numpy(), simulation) >= 30  # 39 dB measured
    onnx.save(lowbit.codegen(graph, "onnx"), str(tmp_path / "d.onnx"))
    ort_out = run_onnx(onnx.load(str(tmp_path / "d.onnx")), {"x": x.numpy()})[0]
    ov_out = run_openvino(to_openvino(graph), [x.numpy()])[0]
    assert sqnr(simulation, ort_out) >= 30  # 67 dB measured (3.5 dB with 1e-8 ranges)
    assert sqnr(simulation, ov_out) >= 30  # 47 dB measured


# --------------------------------------------------------------------------- float16


def test_float16_onnx_model_quantizes_with_float16_scales(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        reference = model(x).numpy()
    path = tmp_path / "half.onnx"
    torch.onnx.export(copy.deepcopy(model).half(), (x.half(),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    items = [t.half().numpy() for t in _images(4, batch=2)]
    q = lowbit.quantize(onnx.load(str(path)), lowbit.Dataset(items))
    inits = {i.name: i.data_type for i in q.graph.initializer}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert sum(inits.get(n.input[0]) == onnx.TensorProto.INT8 for n in dq) == 3  # the int8 weights
    assert len(dq) >= 6 and all(inits[n.input[1]] == onnx.TensorProto.FLOAT16 for n in dq)  # float16 scales
    out = run_onnx(q, {"x": x.half().numpy()})[0]
    assert out.dtype == np.float16
    fp32 = lowbit.codegen(lowbit.lower(model, (x,)), "onnx")
    q32 = lowbit.quantize(fp32, lowbit.Dataset([i.astype(np.float32) for i in items]))
    expected = sqnr(reference, run_onnx(q32, {q32.graph.input[0].name: x.numpy()})[0])
    assert sqnr(reference, out.astype(np.float32)) >= expected - 1.0  # as close as the float32 model's INT8


def test_float16_torch_model_quantizes_and_its_exports_agree(tmp_path):
    """A .half() module: statistics in float32, the simulation in float16, float16 scales in the .onnx."""
    torch.manual_seed(0)
    model = Small().eval()
    half = copy.deepcopy(model).half()
    q = lowbit.quantize(half, lowbit.Dataset([t.half() for t in _images(8)]))
    assert next(half.parameters()).dtype == torch.float16  # the user's model untouched
    x = _images(1, batch=4, seed=5)[0]
    with torch.no_grad():
        reference, simulation = model(x).numpy(), q(x.half())
    assert simulation.dtype == torch.float16
    q32 = lowbit.quantize(model, lowbit.Dataset(_images(8)))
    with torch.no_grad():
        expected = sqnr(reference, q32(x).numpy())
    assert sqnr(reference, simulation.float().numpy()) >= expected - 1.0  # as close as the float32 model's
    path = lowbit.export(q, tmp_path / "half.onnx")
    out = run_onnx(onnx.load(path), {"x": x.half().numpy()})[0]
    assert out.dtype == np.float16
    assert sqnr(simulation.float().numpy(), out.astype(np.float32)) >= 35


def test_float16_transformer_smooths_in_float16():
    """smooth_quant's scale Mul in a float16 graph is float16 (a float32 one broke the MatMul after it)."""
    from zoo_models import build

    model, make_input, model_type = build("bert", "small")
    items = [make_input(1) for _ in range(4)]
    q = lowbit.quantize(copy.deepcopy(model).half(), lowbit.Dataset(items), model_type=model_type)
    smooth = [n for n in graph_of(q) if n.meta.get("smooth_quant")]
    assert smooth and all(n.input(1).const.dtype == np.float16 for n in smooth)
    x = make_input(2)
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_bfloat16_torch_model_is_refused_before_any_work():
    model = Small().eval().to(torch.bfloat16)
    calls = []

    def transform(item):
        calls.append(item)
        return item

    with pytest.raises(lowbit.UnsupportedModelError, match=r"Small holds bfloat16 weights \('conv.weight'\)"):
        lowbit.quantize(model, lowbit.Dataset([t.to(torch.bfloat16) for t in _images(2)], transform))
    assert calls == [] and next(model.parameters()).dtype == torch.bfloat16


# --------------------------------------------------------------------------- messages


def test_quantize_without_a_dataset_asks_for_one(small):
    with pytest.raises(lowbit.DatasetError, match="lowbit.quantize needs a calibration dataset") as info:
        lowbit.quantize(small, None)
    assert "example" not in str(info.value).split(":")[0]
    with pytest.raises(lowbit.DatasetError, match=r"pass 'quantize' needs calibration data"):
        lowbit.compile(small, ["fuse", "quantize"])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_subset_size(small, bad):
    with pytest.raises(lowbit.OptionError, match=re.escape(f"subset_size must be a positive int") + ".*" +
                       re.escape(repr(bad))):
        lowbit.quantize(small, lowbit.Dataset(_images(2)), subset_size=bad)


def test_ignored_scope_as_a_list_of_names(small):
    full = lowbit.quantize(small, lowbit.Dataset(_images(2)))
    ignored = lowbit.quantize(small, lowbit.Dataset(_images(2)), ignored_scope=["conv2d_1"])
    assert _fq_count(full) == 4 and _fq_count(ignored) == 2  # head's weight and input quantizers are gone
    with pytest.raises(lowbit.IgnoredScopeError, match="'conv9' matches no node"):
        lowbit.quantize(small, lowbit.Dataset(_images(2)), ignored_scope=["conv9"])


def test_ignored_scope_duck_typed_like_nncf(small):
    scope = types.SimpleNamespace(names=[], patterns=["conv2d_1$"], types=[], subgraphs=[], validate=True)
    assert _fq_count(lowbit.quantize(small, lowbit.Dataset(_images(2)), ignored_scope=scope)) == 2
    sub = types.SimpleNamespace(inputs=["conv2d_1"], outputs=["conv2d_1"])
    scope = types.SimpleNamespace(names=None, patterns=None, types=None, subgraphs=[sub])
    assert _fq_count(lowbit.quantize(small, lowbit.Dataset(_images(2)), ignored_scope=scope)) == 2


@pytest.mark.parametrize("bad,message", [
    ("conv2d_1", r"not str 'conv2d_1': wrap a single name as \['conv2d_1'\]"),
    (42, "not int"),
    ({"names": ["conv2d_1"]}, "not dict"),
    ([3], r"ignored_scope.names must hold node names \(str\), got int 3"),
    (types.SimpleNamespace(names="conv2d_1"), "ignored_scope.names must be a list of node names, got str"),
    (types.SimpleNamespace(patterns=["("]), "pattern '\\(' is not a valid regular expression"),
])
def test_ignored_scope_of_a_wrong_type(small, bad, message):
    with pytest.raises(lowbit.IgnoredScopeError, match=message):
        lowbit.quantize(small, lowbit.Dataset(_images(2)), ignored_scope=bad)


def test_quantizing_twice_in_one_pipeline_is_a_named_error(small):
    with pytest.raises(lowbit.AlreadyQuantizedError,
                       match=r"pass 'quantize' already ran in this pipeline \(step 2 of fuse, quantize\): the graph "
                             r"is already quantized, and quantizing again would stack quantizers"):
        lowbit.compile(small, ["fuse", "quantize", "quantize"], dataset=lowbit.Dataset(_images(2)))
    q = lowbit.quantize(small, lowbit.Dataset(_images(2)))
    with pytest.raises(lowbit.AlreadyQuantizedError, match="already quantized: it holds 4 quantizer node"):
        lowbit.compile(q, ["quantize"], dataset=lowbit.Dataset(_images(2)))


# --------------------------------------------------------------------------- MobileNetV2 from the ONNX origin


def test_mobilenet_v2_onnx_with_runtime_pads(tmp_path):
    """transformers' MobileNetV2 computes its convs' pads at run time (Pad of a Cast of a Reshape ...): the Pad
    output's shape is symbolic after cleanup folds them, and fast_bias_correction took its channel dim for 8."""
    from zoo_models import build

    module, make_input, _ = build("mobilenet_v2", "small")
    path = tmp_path / "m.onnx"
    torch.onnx.export(module, (make_input(1),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    model = onnx.load(str(path))
    items = [make_input(1).numpy() for _ in range(8)]
    ctx = pass_context(dataset=lowbit.Dataset(items), progress=False)
    from lowbit.passes import PassManager

    pm = PassManager(ptq_passes(items))
    q = lowbit.codegen(pm.run(lowbit.lower(model), ctx), "onnx")
    fbc = next(r for r in pm.records if r.name == "fast_bias_correction")
    # every quantized conv is measured, the stem's behind its Pad included; NNCF's rule skips the shifts of
    # 2x a bias value or more, and biases with a zero
    assert fbc.fired["bias_corrected"] + fbc.fired["bias_shift_implausible"] == 52
    assert fbc.fired["bias_corrected"] >= 40
    x = make_input(2)
    with torch.no_grad():
        reference = module(x).numpy()
    # about as close to FP32 as the torch origin: 11.6 dB here, 12.4 dB from torch (random small model, 8 items)
    assert sqnr(reference, run_onnx(q, {"x": x.numpy()})[0]) >= 10.5


class ValueBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_control_flow_is_not_blamed_on_the_dataset():
    with pytest.raises(lowbit.CaptureError) as info:
        lowbit.quantize(ValueBranch(), lowbit.Dataset(_images(2)))
    assert not isinstance(info.value, lowbit.DatasetError) and "transform_fn" not in str(info.value)
    assert "could not capture ValueBranch" in str(info.value)
