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
