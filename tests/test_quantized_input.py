"""Already-quantized models: their quantization survives lower -> passes -> codegen, and quantizing them again
is refused with a named error."""

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx
from deploy_checks import int8_count, openvino_layer_precisions
from models import REFERENCE_MODELS

import lowbit
from lowbit.cli import main as cli
from lowbit.ir.ops import TORCH_DOMAIN
from lowbit.backends.torch_fq import FakeQuantize
from lowbit.passes.quantize import refuse_quantized


@pytest.fixture(scope="module")
def fp32_model():
    factory, shape = REFERENCE_MODELS["concat"]
    return factory(), shape


@pytest.fixture(scope="module")
def calibration(fp32_model):
    _, shape = fp32_model
    g = torch.Generator().manual_seed(0)
    return [torch.rand(1, *shape[1:], generator=g) for _ in range(8)]


@pytest.fixture(scope="module")
def quantized_torch(fp32_model, calibration):
    return lowbit.quantize(fp32_model[0], lowbit.Dataset(calibration))


@pytest.fixture(scope="module")
def qdq_model(fp32_model, calibration):
    model, shape = fp32_model
    fp32 = lowbit.codegen(lowbit.lower(model, (torch.rand(*shape),)), "onnx")
    return lowbit.quantize(fp32, lowbit.Dataset([c.numpy() for c in calibration]))


def _integer_weights(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes that read an integer initializer (a quantized weight)."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in integer for n in model.graph.node)


def test_qdq_weights_survive_cleanup_and_codegen(qdq_model):
    before = _integer_weights(qdq_model)
    assert before == 14  # 13 convs and the classifier of the Inception-style net
    compiled = lowbit.compile(qdq_model, ["cleanup", "fold_bn", "fuse"])
    assert _integer_weights(compiled) == before
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run_onnx(compiled, {"x": x})[0], run_onnx(qdq_model, {"x": x})[0], atol=1e-5)


def test_cli_compile_of_a_qdq_model_to_xml_stays_int8(qdq_model, tmp_path):
    onnx.save(qdq_model, tmp_path / "q.onnx")
    assert cli(["compile", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q.xml")]) == 0
    assert int8_count(openvino_layer_precisions(tmp_path / "q.xml")) == 14


def test_lowering_a_quantized_torch_module_keeps_its_fake_quantizers(quantized_torch, fp32_model):
    graph = lowbit.lower(quantized_torch)
    modules = [m for m in quantized_torch.modules() if isinstance(m, FakeQuantize)]
    fq = [n for n in graph if n.op_type == "FakeQuantize"]
    assert len(fq) == 29  # every quantizer in its place, each input of a Concat too
    # the quantizers of a Concat's inputs (a unified-scale group) are one module
    assert len({quantized_torch.lowbit_names[n.name] for n in fq}) == len(modules) == 23
    again = lowbit.codegen(graph, "torch")
    x = torch.rand(3, *fp32_model[1][1:])
    with torch.no_grad():
        torch.testing.assert_close(again(x), quantized_torch(x))


@pytest.mark.parametrize("origin", ["qdq", "torch"])
def test_quantizing_a_quantized_model_is_refused(origin, qdq_model, quantized_torch, calibration):
    model = qdq_model if origin == "qdq" else quantized_torch
    items = [c.numpy() for c in calibration] if origin == "qdq" else calibration
    kind = "QuantizeLinear" if origin == "qdq" else "FakeQuantize"
    with pytest.raises(lowbit.AlreadyQuantizedError, match=rf"already quantized: it holds \d+ quantizer.*{kind}.*"
                                                           r"Quantize the FP32 model instead"):
        lowbit.quantize(model, lowbit.Dataset(items))


def test_quantize_twice_in_one_pipeline_is_refused(fp32_model, calibration):
    with pytest.raises(lowbit.AlreadyQuantizedError, match="already quantized"):
        lowbit.compile(fp32_model[0], ["cleanup", "fold_bn", "fuse", "quantize", "quantize"],
                       dataset=lowbit.Dataset(calibration), progress=False)


def test_torch_quantize_ops_count_as_quantized():
    """A PT2E-quantized program lowers its quantize/dequantize ops as opaque torch ops: those count too."""
    graph = lowbit.lower(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    x = graph.inputs[0]
    q = graph.make_node("quantized_decomposed.quantize_per_tensor.default", [x], domain=TORCH_DOMAIN,
                        before=next(iter(graph))).output
    node = next(n for n in graph if n.op_type == "Gemm")
    node.set_input(0, q)
    with pytest.raises(lowbit.AlreadyQuantizedError, match="quantize_per_tensor"):
        refuse_quantized(graph)
