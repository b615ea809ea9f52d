"""ONNX files from torch.onnx.export's default exporter (dynamo=True, torch.export-based; the default since torch
2.9) quantize as the same model does from torch, and deploy.

That exporter writes its own forms: opset 18+ with axes as inputs, AdaptiveAvgPool2d(1) as ReduceMean then
Reshape (not GlobalAveragePool, Flatten), the eval-mode BatchNorms unfolded, the attention scale as a constant.
For each family of tests/models.py, trained on the digits as tests/test_deploy.py trains it:

- lowbit places the same weight and activation quantizers as on the torch module;
- OpenVINO runs every quantized layer of the QDQ file and of its .xml in INT8, ONNX Runtime runs them as its
  integer kernels (structural, so the same on any CPU);
- OpenVINO (f32 hint) agrees with ONNX Runtime on the QDQ file: top-1 >= 99.5% and SQNR >= 35 dB.
"""

import collections

import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from deploy_checks import (FAMILIES, HOST_OVERFLOW_FIX, agreement, default_exported, family_options, int8_count,
                           layers_added_by_splits, openvino_layer_precisions, ort_optimized_ops, placed_quantizers,
                           quantized_layers, sqnr, trained_family)

import lowbit

pytest.importorskip("onnxscript")  # what torch.onnx.export(dynamo=True) writes its ONNX with

N_CALIBRATION = 64
TOP1, SQNR_DB = 0.995, 35


class Exported:
    """One family's FP32 model through the default exporter, and lowbit's QDQ model of it (.onnx and .xml)."""

    def __init__(self, name, folder):
        self.model, x_train, x_test = trained_family(name)
        self.model_type = family_options(name).get("model_type")
        self.example = x_train[:1]
        self.fp32 = default_exported(self.model, self.example, folder / "fp32.onnx")
        self.items = [x_train[i:i + 1].numpy() for i in range(N_CALIBRATION)]
        self.qdq = lowbit.quantize(self.fp32, lowbit.Dataset(self.items), overflow_fix=HOST_OVERFLOW_FIX,
                                   **family_options(name))
        self.paths = {"onnx": folder / "int8.onnx"}
        onnx.save(self.qdq, self.paths["onnx"])
        self.paths["xml"] = lowbit.export(self.qdq, folder / "int8.xml")
        self.x = x_test.numpy()


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def exported(request, tmp_path_factory):
    name = FAMILIES[request.param]
    return Exported(name, tmp_path_factory.mktemp(name))


def test_the_exporters_file_gets_the_quantizers_of_the_torch_module(exported):
    from_file = placed_quantizers(exported.fp32, None, exported.items, exported.model_type)
    from_torch = placed_quantizers(exported.model, (exported.example,), [torch.from_numpy(x) for x in exported.items],
                             exported.model_type)
    assert from_file == from_torch


@pytest.mark.parametrize("form", ["onnx", "xml"])
def test_openvino_runs_every_quantized_layer_in_int8(exported, form):
    weighted = sum(layer["weight"] for layer in quantized_layers(exported.qdq).values())
    precisions = openvino_layer_precisions(exported.paths[form])
    with_weights = collections.Counter({key: n for key, n in precisions.items() if key[0] != "MatMul"})
    added = layers_added_by_splits(exported.paths[form])  # as tests/test_deploy.py
    assert weighted > 0
    assert int8_count(with_weights) == weighted + added, precisions


def test_onnx_runtime_runs_every_quantized_layer_it_can_in_int8(exported):
    """As tests/test_deploy.py: every layer but a Conv whose output feeds a float op (ONNX Runtime has no integer
    convolution with a float output)."""
    layers = quantized_layers(exported.qdq)
    ops = ort_optimized_ops(exported.paths["onnx"])
    integer = sum(ops[op] for op in ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"))
    float_output_convs = [name for name, layer in layers.items() if layer["op"] == "Conv"
                          and not layer["quantized_output"]]
    assert integer == len(layers) - len(float_output_convs), (ops, layers)


def test_openvino_agrees_with_onnx_runtime(exported):
    session = ort.InferenceSession(str(exported.paths["onnx"]), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"x": exported.x})[0]
    compiled = ov.Core().compile_model(str(exported.paths["onnx"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(exported.x)[compiled.output(0)]
    assert agreement(reference, got) >= TOP1
    assert sqnr(reference, got) >= SQNR_DB
