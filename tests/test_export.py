"""lowbit.export: FP32 and quantized models of every kind to .onnx and .xml; the same call gives the same bytes;
nothing lowbit writes depends on the CPU that wrote it; bad paths are named errors."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx, run_openvino
from models import REFERENCE_MODELS

import lowbit

LOWBIT = Path(lowbit.__file__).parent


@pytest.fixture(scope="module")
def model():
    factory, shape = REFERENCE_MODELS["se"]
    return factory(), torch.rand(*shape)


def _digest(*paths) -> str:
    return hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths)).hexdigest()


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_fp32_torch_module_exports_with_example_inputs(model, suffix, tmp_path):
    module, x = model
    path = lowbit.export(module, tmp_path / f"m{suffix}", example_inputs=(x,))
    batch = torch.rand(5, *x.shape[1:])  # the batch dim stays dynamic
    with torch.no_grad():
        want = module(batch).numpy()
    if suffix == ".onnx":
        got = run_onnx(onnx.load(path), {"x": batch.numpy()})[0]
    else:
        import openvino as ov

        got = run_openvino(ov.Core().read_model(path), [batch.numpy()])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fp32_onnx_model_exports_to_openvino(model, tmp_path):
    module, x = model
    proto = lowbit.codegen(lowbit.lower(module, (x,)), "onnx")
    import openvino as ov

    path = lowbit.export(proto, tmp_path / "m.xml")
    got = run_openvino(ov.Core().read_model(path), [x.numpy()])[0]
    np.testing.assert_allclose(got, run_onnx(proto, {"x": x.numpy()})[0], atol=1e-5)


def test_module_without_example_inputs_is_a_named_error(model, tmp_path):
    with pytest.raises(lowbit.MissingExampleInputsError, match="example_inputs"):
        lowbit.export(model[0], tmp_path / "m.onnx")


def test_bad_output_paths_are_named_errors(model, tmp_path):
    module, x = model
    with pytest.raises(lowbit.OutputPathError, match=r"'m\.pt'.*\.onnx.*\.xml"):
        lowbit.export(module, tmp_path / "m.pt", example_inputs=(x,))
    (tmp_path / "file").write_text("")
    with pytest.raises(lowbit.OutputPathError, match="folder cannot be created"):
        lowbit.export(module, tmp_path / "file" / "m.onnx", example_inputs=(x,))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(lowbit.OutputPathError, match="is a folder"):
        lowbit.export(module, tmp_path / "dir.onnx", example_inputs=(x,))


def test_the_same_call_writes_the_same_bytes(model, tmp_path):
    module, _ = model
    g = torch.Generator().manual_seed(0)
    items = [torch.rand(1, 1, 8, 8, generator=g) for _ in range(8)]
    digests = set()
    for run in range(2):
        q = lowbit.quantize(module, lowbit.Dataset(items))
        out = tmp_path / str(run)
        onnx_path, xml_path = lowbit.export(q, out / "q.onnx"), lowbit.export(q, out / "q.xml")
        digests.add((_digest(onnx_path), _digest(xml_path, xml_path.with_suffix(".bin"))))
    assert len(digests) == 1


def test_no_module_reads_the_host_cpu():
    """What lowbit writes is the same on every machine: no code path looks at this CPU's features."""
    readers = [p.relative_to(LOWBIT) for p in LOWBIT.rglob("*.py")
               if any(s in p.read_text() for s in ("/proc/cpuinfo", "cpu_has", "cpuinfo", "platform.processor"))]
    assert readers == []


class _SignedIntoTranspose(torch.nn.Module):
    """Two convs' signed outputs (no activation) added after a permute: the Add's input quantizers move above
    the permutes, so a signed activation grid's DequantizeLinear feeds a Transpose (as in ConvNeXt)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.other = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1) + self.other(x).permute(0, 2, 3, 1)


@pytest.mark.parametrize("opset", [None, 21])
def test_signed_activation_grids_load_in_onnx_runtime(tmp_path, opset):
    """ONNX Runtime 1.32 refuses to load an opset-21 model with an int8 activation QDQ before a Transpose: lowbit
    writes torch models at opset 20 and stores such grids as uint8 in a user's opset-21 model."""
    import onnxruntime as ort

    model = _SignedIntoTranspose().eval()
    items = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    if opset is None:
        path = lowbit.export(lowbit.quantize(model, lowbit.Dataset(items)), tmp_path / "q.onnx")
    else:
        fp32 = tmp_path / "fp32.onnx"
        torch.onnx.export(model, (items[0],), str(fp32), dynamo=False, opset_version=opset, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
        qdq = lowbit.quantize(onnx.load(fp32), lowbit.Dataset([i.numpy() for i in items]))
        path = tmp_path / "q.onnx"
        onnx.save(qdq, path)
    written = onnx.load(path)
    assert any(n.op_type == "Transpose" and n.input[0].endswith("_dq") for n in written.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: items[0].numpy()})[0]
    with torch.no_grad():
        want = model(items[0]).numpy()
    assert 10 * np.log10((want ** 2).sum() / ((want - got) ** 2).sum()) > 25  # quantization noise only


def test_an_op_openvino_cannot_convert_is_named_with_openvinos_reason(tmp_path):
    """OpenVINO's conversion error names the failing op only after its first line (which names a C++ check); the
    UnsupportedOpError carries that part."""

    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 3)

    graph = lowbit.lower(Pool(), (torch.randn(1, 2, 12, 12),))
    pool = next(n for n in graph if n.op_type == "AveragePool")
    pool.attrs["kernel_shape"] = [40, 40]  # wider than the 12x12 map, which OpenVINO refuses
    with pytest.raises(lowbit.UnsupportedOpError, match=r"could not convert graph .*AveragePool.*larger than the "
                                                        r"data shape"):
        lowbit.codegen(graph, "openvino")
