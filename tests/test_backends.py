"""The backend registry: codegen, export and the command line write through one table of backends, so a new
backend is one registration."""

import pytest
import torch

import lowbit
from lowbit import backends
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
