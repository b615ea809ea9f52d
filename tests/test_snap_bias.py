"""snap_bias: every quantized layer's bias lies on the int32 grid (input scale x weight scale) that integer
kernels add it on, so ONNX Runtime's QLinearConv computes what the torch simulation computes."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from deploy_checks import sqnr

import lowbit
from lowbit.passes import PTQ_PIPELINE

WITHOUT_SNAP = [p for p in PTQ_PIPELINE if p != "snap_bias"]


def _depthwise_stack():
    """MobileNet-like: depthwise convs (9 products per output) are where a bias's rounding is a large share."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.ReLU6(), nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


@pytest.fixture(scope="module")
def calibration():
    torch.manual_seed(1)
    return [torch.randn(4, 3, 16, 16) for _ in range(8)]


def _grid_steps(model: onnx.ModelProto) -> list[np.ndarray]:
    """bias / (input scale x weight scale) of every Conv that reads two DequantizeLinear outputs in a QDQ model."""
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    steps = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3):
        x_dq, w_dq = (producer.get(i) for i in conv.input[:2])
        if x_dq is None or w_dq is None or {x_dq.op_type, w_dq.op_type} != {"DequantizeLinear"}:
            continue
        scale = constants[x_dq.input[1]].astype(np.float32) * constants[w_dq.input[1]].astype(np.float32)
        steps.append(constants[conv.input[2]] / scale)
    return steps


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_every_quantized_bias_is_on_the_int32_grid(calibration, origin, tmp_path):
    model = _depthwise_stack()
    if origin == "onnx":
        model = lowbit.codegen(lowbit.lower(model, (calibration[0],)), "onnx")
        calibration = [c.numpy() for c in calibration]
    q = lowbit.quantize(model, lowbit.Dataset(calibration), overflow_fix="enable")
    written = onnx.load(lowbit.export(q, tmp_path / "q.onnx")) if origin == "torch" else q
    steps = _grid_steps(written)
    assert len(steps) == 5
    for s in steps:
        np.testing.assert_allclose(s, np.round(s), atol=1e-3)


def test_without_it_biases_are_off_the_grid(calibration, tmp_path):
    q = lowbit.compile(_depthwise_stack(), WITHOUT_SNAP, dataset=lowbit.Dataset(calibration), progress=False)
    steps = _grid_steps(onnx.load(lowbit.export(q, tmp_path / "q.onnx")))
    assert len(steps) == 5
    assert sum(np.abs(s - np.round(s)).max() > 0.01 for s in steps) >= 4


def test_onnx_runtime_computes_what_the_simulation_computes(calibration, tmp_path):
    """The weights use the 7-bit grid (overflow_fix="enable"), so no CPU's u8 x s8 kernel saturates and ONNX
    Runtime's integer results are the same on every host."""
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    off = {}
    for name, passes in (("snapped", PTQ_PIPELINE), ("float bias", WITHOUT_SNAP)):
        q = lowbit.compile(_depthwise_stack(), passes, hw="ANY", dataset=lowbit.Dataset(calibration),
                           overflow_fix="enable", progress=False)
        with torch.no_grad():
            simulation = q(x).numpy()
        path = lowbit.export(q, tmp_path / f"{name}.onnx")
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        off[name] = float((np.abs(simulation - got) > 1e-4).mean())
        if name == "snapped":
            assert sqnr(simulation, got) >= 85
    assert off["snapped"] < 0.002
    assert off["float bias"] > 0.01  # the rounding of the bias flips this many of ONNX Runtime's outputs


def test_the_pipeline_reports_what_it_snapped(calibration, tmp_path):
    lowbit.compile(_depthwise_stack(), PTQ_PIPELINE, dataset=lowbit.Dataset(calibration), progress=False,
                   dump_dir=tmp_path)
    last = json.loads((tmp_path / "passes.json").read_text())[-1]
    assert (last["name"], last["fired"]) == ("snap_bias", {"bias_snapped": 5})
