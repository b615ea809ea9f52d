"""Every public entry point answers bad arguments with a named LowbitError, never a TypeError or AttributeError
from inside lowbit (issue 9: no crash that is not a LowbitError)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lowbit

sys.path.insert(0, str(Path(__file__).parent.parent))
from examples.digits import DigitsCNN  # noqa: E402

X = torch.randn(1, 1, 8, 8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DigitsCNN().eval()


BAD_MODELS = [None, 3, "model.txt", "missing.onnx", b"bytes", {"a": 1}, torch.randn(3), onnx.ModelProto(),
              np.zeros(3), len]


@pytest.mark.parametrize("bad", BAD_MODELS, ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("entry", ["lower", "quantize", "export"])
def test_bad_models_are_named_errors(entry, bad, tmp_path):
    calls = {"lower": lambda: lowbit.lower(bad, (X,)),
             "quantize": lambda: lowbit.quantize(bad, lowbit.Dataset([X])),
             "export": lambda: lowbit.export(bad, tmp_path / "m.onnx", example_inputs=(X,))}
    with pytest.raises(lowbit.LowbitError):
        calls[entry]()


@pytest.mark.parametrize("data, message", [
    (3, "the calibration dataset is a int"),
    ("items", "the calibration dataset is a str"),
    (lowbit.Dataset([]), "empty"),
    (lowbit.Dataset([None]), "dataset item 0"),
    (lowbit.Dataset([np.zeros(3)]), "dataset item 0"),
    (lowbit.Dataset([torch.zeros(1, 1, 8, 8, dtype=torch.int64)]), "dataset item 0"),
    (lowbit.Dataset([object()]), "dataset item 0"),
    (lowbit.Dataset(iter([])), "empty"),
])
def test_bad_calibration_data_is_a_dataset_error(model, data, message):
    with pytest.raises(lowbit.DatasetError, match=message):
        lowbit.quantize(model, data)


@pytest.mark.parametrize("options, error, message", [
    (dict(subset_size="x"), lowbit.OptionError, "subset_size"),
    (dict(preset=3), lowbit.OptionError, "preset"),
    (dict(model_type=5), lowbit.OptionError, "model_type"),
    (dict(overflow_fix=None), lowbit.OptionError, "overflow_fix"),
    (dict(ignored_scope=3), lowbit.IgnoredScopeError, "int"),
    (dict(target_device=None), lowbit.HardwareConfigError, "unknown device .None.: use one of CPU, GPU, NPU, ANY"),
    (dict(dump_dir=3), lowbit.OptionError, "dump_dir is a int"),
])
def test_bad_quantize_options_are_named_errors(model, options, error, message):
    with pytest.raises(error, match=message):
        lowbit.quantize(model, lowbit.Dataset([X]), **options)


@pytest.mark.parametrize("options, error, message", [
    (dict(passes=3), lowbit.OptionError, "passes is a int"),
    (dict(passes="cleanup"), lowbit.OptionError, "passes is a str"),
    (dict(passes=["nope"]), lowbit.UnknownPassError, "nope"),
    (dict(hw="nope.json"), lowbit.HardwareConfigError, "nope"),
])
def test_bad_compile_options_are_named_errors(model, options, error, message):
    with pytest.raises(error, match=message):
        lowbit.compile(model, dataset=lowbit.Dataset([X]), **options)


@pytest.mark.parametrize("path", [3, None, "model.txt"])
def test_bad_export_paths_are_output_path_errors(model, path):
    with pytest.raises(lowbit.OutputPathError):
        lowbit.export(model, path, example_inputs=(X,))


@pytest.mark.parametrize("path, runtime, message", [
    ("m.onnx", "tensorrt", "unknown runtime 'tensorrt': choose one of onnxruntime, openvino"),
    ("m.xml", "onnxruntime", r"runtime='onnxruntime' is an option of onnx, not of openvino \(.xml files\): write "
                             "m.onnx for it"),
])
def test_bad_export_runtimes_are_option_errors(model, tmp_path, path, runtime, message):
    with pytest.raises(lowbit.OptionError, match=message):
        lowbit.export(model, tmp_path / path, example_inputs=(X,), runtime=runtime)
    assert not (tmp_path / path).exists()


def test_bad_codegen_targets_and_graphs_are_named_errors(model):
    with pytest.raises(lowbit.UnknownTargetError):
        lowbit.codegen(lowbit.lower(model, (X,)), "tflite")
    with pytest.raises(lowbit.LowbitError):
        lowbit.codegen(3, "onnx")
