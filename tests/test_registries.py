"""The frontend and backend registries: lower reads, and codegen, export and the command line write, through
one table each, so a new model kind or file format is one registration."""

import onnx
import pytest
import torch
from conftest import run_onnx

import lowbit
from lowbit import backends, frontends
from lowbit.backends import Backend, register_backend
from lowbit.cli import main


@pytest.fixture
def text_backend():
    """A backend that writes the graph's text form to .lbt files."""
    written = []

    def save(graph, path, upper=False):
        text = str(graph)
        path.write_text(text.upper() if upper else text)
        written.append(path)

    register_backend(Backend("text", build=str, suffixes=(".lbt",), save=save, options=("upper",),
                             description="lowbit's text form"))
    yield written
    del backends.BACKENDS["text"]


def test_a_registered_backend_serves_codegen_export_and_the_command_line(text_backend, tmp_path):
    model, x = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval(), torch.randn(1, 1, 8, 8)
    graph = lowbit.lower(model, (x,))
    assert lowbit.codegen(graph, "text") == str(graph)
    path = lowbit.export(model, tmp_path / "m.lbt", example_inputs=(x,))
    assert path.read_text() == str(graph) and text_backend == [path]
    onnx_file = lowbit.export(model, tmp_path / "m.onnx", example_inputs=(x,))
    assert main(["compile", str(onnx_file), "-o", str(tmp_path / "c.lbt"), "--passes", "cleanup"]) == 0
    assert "Conv" in (tmp_path / "c.lbt").read_text()


def test_the_registry_names_what_it_has(text_backend, tmp_path):
    with pytest.raises(lowbit.UnknownTargetError, match="unknown codegen target 'tflite': choose one of torch, onnx, "
                                                        "openvino, text"):
        lowbit.codegen(lowbit.ir.Graph("g"), "tflite")
    with pytest.raises(lowbit.OutputPathError, match=r"the path must end in \.onnx \(ONNX, QDQ\) or \.xml \(OpenVINO "
                                                     r"IR, FakeQuantize\) or \.lbt \(lowbit's text form\)"):
        backends.backend_for_path(tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="suffix '.onnx' is already written by backend 'onnx'"):
        register_backend(Backend("other", build=str, suffixes=(".onnx",), save=lambda g, p: None))
    assert "other" not in backends.BACKENDS


def test_a_registered_frontend_lowers_its_models_and_compile_gives_them_back(text_backend):
    """A frontend for graphs in a box: lower unpacks them, compile writes the result with the frontend's target
    backend (here the text form). Registered after the built-ins, it is asked before them."""

    class Boxed(str):  # a str subclass: the built-in ONNX-path frontend would also accept it
        graph = None

    frontends.register_frontend(frontends.Frontend(
        "boxed", accepts=lambda m: isinstance(m, Boxed), lower=lambda m, *a: m.graph.copy(), target="text",
        takes="a Boxed graph"))
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
        boxed = Boxed("box")
        boxed.graph = lowbit.lower(model, (torch.randn(1, 1, 8, 8),))
        assert str(lowbit.lower(boxed)) == str(boxed.graph)
        folded = lowbit.compile(boxed, ["fold_bn"])
        assert isinstance(folded, str) and "BatchNormalization" not in folded and "Conv" in folded
        with pytest.raises(lowbit.UnsupportedModelError, match="pass a Boxed graph, a path to an .onnx file, an "
                                                               "onnx.ModelProto, a torch.nn.Module"):
            lowbit.lower(3.5)
    finally:
        del frontends.FRONTENDS["boxed"]


def test_a_module_written_by_codegen_exports_with_its_quantizers(tmp_path):
    """codegen(graph, "torch") gives a module that holds its graph, as compile's does: export writes it."""
    model, x = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval(), torch.randn(4, 1, 8, 8)
    q = lowbit.quantize(model, lowbit.Dataset([x]))
    rebuilt = lowbit.codegen(lowbit.lower(q), "torch")
    path = lowbit.export(rebuilt, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), q(x))
    assert abs(run_onnx(onnx.load(path), {"input": x.numpy()})[0] - q(x).detach().numpy()).max() < 1e-4
