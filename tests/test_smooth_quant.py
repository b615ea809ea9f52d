"""smooth_quant: exact in FP32, flattens activation outliers into the weights, and pays off once quantized.

The model is TinyViT (tests/models.py) with outlier channels injected the way
they appear in trained transformers: a few LayerNorm gains multiplied by 30
and the next layer's weight columns divided by 30, which leaves the function
unchanged but gives the LayerNorm outputs a few channels 30x larger.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_onnx
from models import TinyViT

import lowbit
from lowbit.ir.ops import is_fake_quantize
from lowbit.passes.smooth_quant import SmoothQuant, smoothing_scale

sys.path.insert(0, str(Path(__file__).parent.parent))
from examples.digits import load_digits_split  # noqa: E402

OUTLIERS = [3, 17, 29]
SMOOTH = ["cleanup", "fold_bn", "fuse", "smooth_quant"]


def sqnr(reference, x) -> float:
    reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10((reference ** 2).sum() / max(((reference - x) ** 2).sum(), 1e-30)))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = TinyViT(num_classes=10).eval()
    with torch.no_grad():
        for block in model.blocks:
            for norm, nxt in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp[0])):
                norm.weight[OUTLIERS] *= 30
                norm.bias[OUTLIERS] *= 30
                nxt.weight[:, OUTLIERS] /= 30
    return model


@pytest.fixture(scope="module")
def digits():
    x_train, _, x_test, _ = load_digits_split(size=8, channels=1)
    return x_train[:128], x_test[:200]


@pytest.fixture(scope="module")
def dataset(digits):
    return lowbit.Dataset([digits[0][i:i + 1] for i in range(len(digits[0]))])


def _run(module, x):
    with torch.no_grad():
        return module(x).numpy()


def test_smoothing_alone_keeps_the_function(vit, digits, dataset):
    smoothed = lowbit.compile(vit, SMOOTH, dataset=dataset, progress=False)
    np.testing.assert_allclose(_run(smoothed, digits[1]), _run(vit, digits[1]), rtol=1e-4, atol=1e-4)


def test_smoothing_alone_keeps_the_function_on_onnx(vit, digits, dataset):
    onnx_model = lowbit.codegen(lowbit.lower(vit, (digits[1][:1],)), "onnx")
    arrays = lowbit.Dataset([digits[0][i:i + 1].numpy() for i in range(len(digits[0]))])
    smoothed = lowbit.compile(onnx_model, SMOOTH, dataset=arrays, progress=False)
    feeds = {onnx_model.graph.input[0].name: digits[1].numpy()}
    np.testing.assert_allclose(run_onnx(smoothed, feeds)[0], run_onnx(onnx_model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_where_the_scales_go(vit, dataset, tmp_path):
    """LayerNorm-fed layers take 1/s in the LayerNorm; the others get a Mul that stays FP32 before its quantizer."""
    lowbit.compile(vit, SMOOTH, dataset=dataset, dump_dir=tmp_path, progress=False)
    fired = next(p["fired"] for p in json.loads((tmp_path / "passes.json").read_text())
                 if p["name"] == "smooth_quant")
    # 2 blocks x (qkv, mlp.0) read a LayerNorm; 2 x (proj, mlp.2) and the head read something else
    assert fired == {"folded_into_layer_norm": 4, "mul_inserted": 5, "layers_smoothed": 9}

    quantized = lowbit.compile(vit, [*SMOOTH, "quantize"], dataset=dataset, progress=False)
    graph = quantized.lowbit_graph
    muls = [n for n in graph if n.meta.get("smooth_quant")]
    assert len(muls) == 5
    for mul in muls:
        assert not any(v.producer is not None and is_fake_quantize(v.producer) for v in mul.inputs)
        assert [is_fake_quantize(user) for user in mul.output.users] == [True]


def test_half_alpha_balances_activation_and_weight_maxima(vit, dataset):
    """With alpha 0.5, each input channel's activation maximum equals its weight row maximum after smoothing."""
    smoothed = lowbit.compile(vit, ["cleanup", SmoothQuant(alpha=0.5)], dataset=dataset, progress=False)
    graph = smoothed.lowbit_graph
    mul = next(n for n in graph if n.meta.get("smooth_quant") and n.output.users[0].op_type == "MatMul")
    layer = mul.output.users[0]
    from lowbit.runtime import GraphRunner
    from lowbit.quant.dataset import batches

    runner = GraphRunner(graph, [mul.output])
    peak = np.max([out[0].abs().reshape(-1, out[0].shape[-1]).amax(0).numpy()
                   for out in map(runner, batches(graph, dataset, 300))], axis=0)
    weight_peak = np.abs(layer.input(1).const).max(axis=1)
    np.testing.assert_allclose(peak, weight_peak, rtol=1e-4)


def test_smoothing_scale_is_one_where_a_channel_is_silent():
    s = smoothing_scale(np.array([4.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0])


def test_outliers_cost_less_after_smoothing(vit, digits, dataset):
    reference = _run(vit, digits[1])
    plain = lowbit.compile(vit, ["cleanup", "fold_bn", "fuse", "quantize"], dataset=dataset, hw="ANY",
                           model_type="transformer", progress=False)
    smoothed = lowbit.compile(vit, [*SMOOTH, "quantize"], dataset=dataset, hw="ANY", model_type="transformer",
                              progress=False)
    before, after = sqnr(reference, _run(plain, digits[1])), sqnr(reference, _run(smoothed, digits[1]))
    assert after > before + 6, (before, after)


def test_transformer_default_pipeline_smooths(vit, dataset, tmp_path):
    lowbit.quantize(vit, dataset, model_type="transformer", dump_dir=tmp_path / "t")
    lowbit.quantize(vit, dataset, dump_dir=tmp_path / "cnn")
    names = lambda d: [p["name"] for p in json.loads((d / "passes.json").read_text())]  # noqa: E731
    assert names(tmp_path / "t")[1:] == ["cleanup", "fold_bn", "fuse", "smooth_quant", "quantize",
                                         "fast_bias_correction", "snap_bias"]
    assert "smooth_quant" not in names(tmp_path / "cnn")


def test_ignored_layers_are_not_smoothed(vit, dataset):
    graph = lowbit.lower(vit, (torch.zeros(1, 1, 8, 8),))
    head = next(n for n in graph if n.op_type == "Gemm")
    smoothed = lowbit.compile(vit, ["cleanup", "smooth_quant"], dataset=dataset, progress=False,
                              ignored_scope=lowbit.IgnoredScope(names=[head.name]))
    graph = smoothed.lowbit_graph
    head = graph.find_node(head.name)
    assert not head.input(0).producer.meta.get("smooth_quant")
    np.testing.assert_array_equal(head.input(1).const, vit.head.weight.detach().numpy())


def test_tied_weight_is_copied_not_shared():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, a, b):
            return a @ self.w + (b * 3) @ self.w

    torch.manual_seed(1)
    model = Tied().eval()
    items = [(torch.randn(4, 8), torch.randn(4, 8) * torch.linspace(0.1, 10, 8)) for _ in range(8)]
    smoothed = lowbit.compile(model, ["smooth_quant"], dataset=lowbit.Dataset(items), example_inputs=items[0],
                              progress=False)
    for a, b in items:
        np.testing.assert_allclose(_run_pair(smoothed, a, b), _run_pair(model, a, b), rtol=1e-4, atol=1e-4)
    weights = [n.input(1) for n in smoothed.lowbit_graph if n.op_type == "MatMul"]
    assert len(weights) == 2 and weights[0] is not weights[1]


def _run_pair(module, a, b):
    with torch.no_grad():
        return module(a, b).numpy()


def test_bad_alpha_and_misplaced_pass(vit, dataset):
    with pytest.raises(lowbit.OptionError, match=r"alpha must be in \[0, 1\], got 1.5"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(lowbit.PassError, match="smooth_quant must run before quantize"):
        lowbit.compile(vit, ["fuse", "quantize", "smooth_quant"], dataset=dataset, progress=False)
    with pytest.raises(lowbit.PassError, match="smooth_quant needs calibration data"):
        lowbit.compile(vit, ["smooth_quant"], example_inputs=(torch.zeros(1, 1, 8, 8),))


class _Conv1DBlock(torch.nn.Module):
    """GPT-2's MLP: a LayerNorm, transformers' Conv1D (which views its input [B, N, C] as [B * N, C] for its
    addmm), GELU, Conv1D; one LayerNorm channel 30x larger, as trained models have them."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.ln, self.fc, self.proj = torch.nn.LayerNorm(16), Conv1D(32, 16), Conv1D(16, 32)
        with torch.no_grad():
            self.ln.weight[3] *= 30

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.fc(self.ln(x)), approximate="tanh"))


def test_smoothing_goes_above_the_view_a_conv1d_reads_through(tmp_path):
    """The scales and quantizers go where the values are computed, not after Conv1D's view: the LayerNorm takes
    1/s, a Mul scales the GELU's output before the view, and OpenVINO fuses every activation quantizer into the
    op before it (after the view it ran alone: a fifth of GPT-2's time). The function is unchanged."""
    model = _Conv1DBlock().eval()
    items = [torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    smoothed = lowbit.compile(model, SMOOTH, dataset=lowbit.Dataset(items), dump_dir=tmp_path, progress=False)
    np.testing.assert_allclose(_run(smoothed, items[0]), _run(model, items[0]), rtol=1e-4, atol=1e-4)
    fired = next(p["fired"] for p in json.loads((tmp_path / "passes.json").read_text())
                 if p["name"] == "smooth_quant")
    assert fired == {"folded_into_layer_norm": 1, "mul_inserted": 1, "layers_smoothed": 2}

    quantized = lowbit.quantize(model, lowbit.Dataset(items), model_type="transformer")
    graph = quantized.lowbit_graph
    (mul,) = [n for n in graph if n.meta.get("smooth_quant")]
    assert mul.input(0).producer.op_type != "Reshape" and len(mul.input(0).shape) == 3
    readers = sorted(n.input(0).producer.op_type for n in graph if is_fake_quantize(n) and n.input(0).const is None)
    assert readers == ["LayerNormalization", "Mul"], readers

    import openvino as ov

    path = lowbit.export(quantized, tmp_path / "mlp.xml")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    layers = [(info["layerType"].astype(str), info["runtimePrecision"].astype(str))
              for info in (op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops())]
    assert not [kind for kind, _ in layers if kind == "FakeQuantize"], layers
    assert [precision for kind, precision in layers if kind == "FullyConnected"] == ["u8", "u8"], layers


def test_smoothing_after_a_relu_goes_into_the_layer_before(tmp_path):
    """T5's feed-forward: Linear -> ReLU -> Linear. relu(y) / s = relu(y / s), so the second layer's scale goes
    into the first one's output columns (and bias) instead of a Mul after the ReLU; the function is kept."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight[5] *= 30  # an outlier channel of the ReLU's output
        model[0].bias[5] *= 30
    items = [torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    smoothed = lowbit.compile(model, ["cleanup", "smooth_quant"], dataset=lowbit.Dataset(items), dump_dir=tmp_path,
                              progress=False)
    np.testing.assert_allclose(_run(smoothed, items[0]), _run(model, items[0]), rtol=1e-4, atol=1e-4)
    fired = next(p["fired"] for p in json.loads((tmp_path / "passes.json").read_text())
                 if p["name"] == "smooth_quant")
    assert fired == {"folded_into_layer_before": 1, "mul_inserted": 1, "layers_smoothed": 2}  # the first reads x
    assert not [n for n in smoothed.lowbit_graph if n.meta.get("smooth_quant") and n.input(0).producer is not None
                and n.input(0).producer.op_type == "Relu"]
