"""Every error a user can cause is a `lowbit.LowbitError` subclass whose message says what is wrong and what to do.

Each test makes one mistake a user can make (a missing, corrupt, empty or
invalid model file; the wrong kind of object; a module without example inputs
or that torch.export cannot capture; an unknown codegen target) and checks
both the class raised and that the message names the thing at fault and the
remedy.
"""

import inspect
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import lowbit
import lowbit.errors

EXPECTED_ERRORS = {"LowbitError", "CaptureError", "GraphError", "MissingExampleInputsError", "ModelLoadError",
                   "TextParseError", "UnknownTargetError", "UnsupportedModelError", "UnsupportedOpError"}


def _small_graph():
    return lowbit.lower(torch.nn.Linear(3, 2).eval(), (torch.randn(2, 3),))


def _model_reading_undefined_input():
    """A model onnx.checker rejects: node `bad_relu` reads `nothing`, which no node or input defines."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nothing"], ["Y"], name="bad_relu")], "broken",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# -- ONNX files and protos ---------------------------------------------------------------

def test_missing_onnx_file(tmp_path):
    path = tmp_path / "no_such_model.onnx"
    with pytest.raises(lowbit.ModelLoadError, match=rf"{re.escape(str(path))}.*does not exist.*check the path"):
        lowbit.lower(path)
    with pytest.raises(lowbit.ModelLoadError, match=r"no_such_model\.onnx.*does not exist"):
        lowbit.lower(str(path))


def test_corrupt_onnx_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(lowbit.ModelLoadError, match=r"garbage\.onnx.*(corrupt|not ONNX).*re-export"):
        lowbit.lower(path)


def test_empty_onnx_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(lowbit.ModelLoadError, match=r"empty\.onnx.*(empty|corrupt)"):
        lowbit.lower(path)


def test_directory_named_like_an_onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.mkdir()
    with pytest.raises(lowbit.ModelLoadError, match=r"model\.onnx"):
        lowbit.lower(path)


def test_empty_model_proto():
    with pytest.raises(lowbit.ModelLoadError, match=r"no graph.*(empty|corrupt)"):
        lowbit.lower(onnx.ModelProto())


def test_model_proto_that_fails_the_checker():
    with pytest.raises(lowbit.ModelLoadError, match=r"not a valid ONNX model.*'nothing'.*fix or re-export") as info:
        lowbit.lower(_model_reading_undefined_input())
    # the node at fault is named, not only the input it reads
    assert "bad_relu" in str(info.value), str(info.value)


def test_onnx_file_that_fails_the_checker(tmp_path):
    path = tmp_path / "broken.onnx"
    onnx.save(_model_reading_undefined_input(), str(path))
    with pytest.raises(lowbit.ModelLoadError, match=r"broken\.onnx.*not a valid ONNX model.*'nothing'"):
        lowbit.lower(path)


@pytest.mark.parametrize("name", ["model.pt", "model.tflite", "weights.pb", "model"])
def test_path_without_onnx_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not a model")
    with pytest.raises(lowbit.UnsupportedModelError, match=rf"\.onnx.*{re.escape(name)}.*export the model to ONNX"):
        lowbit.lower(path)


# -- torch models --------------------------------------------------------------------------

def test_module_without_example_inputs():
    with pytest.raises(lowbit.MissingExampleInputsError, match=r"Linear.*example_inputs=\(") as info:
        lowbit.lower(torch.nn.Linear(3, 2))
    assert "shape" in str(info.value)


class DataDependentBranch(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot capture it
            return x * 2
        return x - 1


def test_module_torch_export_cannot_capture():
    with pytest.raises(lowbit.CaptureError) as info:
        lowbit.lower(DataDependentBranch(), (torch.randn(2, 3),))
    msg, cause = str(info.value), info.value.__cause__
    assert cause is not None, "the torch.export exception is chained as __cause__"
    assert "DataDependentBranch" in msg
    # torch's reason is quoted: its exception type and the first words of its message
    assert type(cause).__name__ in msg
    assert str(cause).strip().split("\n")[0][:40] in msg
    assert re.search(r"data-dependent", msg, re.IGNORECASE)
    # ... and what to do about it: no example input can fix a branch on values, so they are not blamed
    assert re.search(r"torch\.cond", msg) and re.search(r"\.onnx", msg) and "example_inputs" not in msg


def test_example_inputs_that_do_not_fit_the_module():
    with pytest.raises(lowbit.CaptureError, match=r"Linear.*example_inputs") as info:
        lowbit.lower(torch.nn.Linear(3, 2), (torch.randn(2, 5),))
    assert info.value.__cause__ is not None


# -- codegen and lower given the wrong things ------------------------------------------------

def test_unknown_codegen_target():
    with pytest.raises(lowbit.UnknownTargetError, match=r"'tflite'") as info:
        lowbit.codegen(_small_graph(), "tflite")
    for target in ("torch", "onnx", "openvino"):
        assert target in str(info.value)


@pytest.mark.parametrize("thing", [torch.nn.Linear(3, 2), onnx.ModelProto(), "graph.onnx", None],
                         ids=["module", "modelproto", "path", "none"])
def test_codegen_of_something_that_is_not_a_graph(thing):
    with pytest.raises(lowbit.UnsupportedModelError, match=rf"lowbit Graph.*lowbit\.lower.*{type(thing).__name__}"):
        lowbit.codegen(thing, "onnx")


@pytest.mark.parametrize("thing,type_name", [(object(), "object"), ({"a": 1}, "dict"), (42, "int"),
                                              (b"\x08\x07", "bytes")])
def test_lower_of_something_that_is_not_a_model(thing, type_name):
    with pytest.raises(lowbit.UnsupportedModelError, match=rf"\b{type_name}\b.*\.onnx.*ModelProto.*nn\.Module"):
        lowbit.lower(thing)


# -- the hierarchy -------------------------------------------------------------------------

def _error_classes(namespace):
    return {name: obj for name, obj in namespace.items() if inspect.isclass(obj) and issubclass(obj, BaseException)}


def test_every_exported_error_is_a_lowbit_error():
    errors = _error_classes({name: getattr(lowbit, name) for name in lowbit.__all__})
    assert EXPECTED_ERRORS <= set(errors), EXPECTED_ERRORS - set(errors)
    for name, cls in errors.items():
        assert issubclass(cls, lowbit.LowbitError), name
        assert getattr(lowbit, name) is getattr(lowbit.errors, name), name
        assert cls.__doc__, f"{name} has no docstring saying which mistake it names"


def test_every_error_lowbit_defines_is_a_lowbit_error_and_exported():
    defined = {name: cls for name, cls in _error_classes(vars(lowbit.errors)).items()
               if cls.__module__ == "lowbit.errors"}
    for name, cls in defined.items():
        assert issubclass(cls, lowbit.LowbitError), name
    missing = sorted(set(defined) - set(lowbit.__all__))
    assert not missing, f"defined in lowbit.errors but not exported from lowbit: {missing}"


def test_catching_lowbit_error_catches_user_mistakes(tmp_path):
    mistakes = [lambda: lowbit.lower(tmp_path / "missing.onnx"), lambda: lowbit.lower(object()),
                lambda: lowbit.lower(torch.nn.ReLU()), lambda: lowbit.codegen(_small_graph(), "tflite"),
                lambda: lowbit.codegen("not a graph", "onnx")]
    for mistake in mistakes:
        with pytest.raises(lowbit.LowbitError):
            mistake()
