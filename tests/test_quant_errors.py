"""Every mistake a user can make when quantizing is a LowbitError subclass that names the item, field or node at
fault, and the user's model survives it untouched."""

import copy
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_onnx

import lowbit
from lowbit.compiler import graph_of
from lowbit.hw_configs import HERE
from lowbit.backends.torch_fq import FakeQuantize

sys.path.insert(0, str(Path(__file__).parent.parent))
from examples.digits import DigitsCNN  # noqa: E402

PTQ = ["cleanup", "fold_bn", "fuse", "quantize"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DigitsCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a forward in train mode would change them
        for bn in (m.stem[1], m.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def onnx_model(model):
    return lowbit.codegen(lowbit.lower(model, (torch.randn(1, 1, 8, 8),)), "onnx")


def good(n=1, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _snapshot(module):
    return copy.deepcopy(module.state_dict()), [m.training for m in module.modules()]


def _assert_untouched(module, snapshot):
    state, modes = snapshot
    now = module.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [m.training for m in module.modules()] == modes
    assert not any(isinstance(m, FakeQuantize) for m in module.modules())


def _has_fq(module):
    return any(isinstance(m, FakeQuantize) for m in module.modules())


@pytest.mark.parametrize("cls", [lowbit.DatasetError, lowbit.HardwareConfigError, lowbit.IgnoredScopeError])
def test_quantization_errors_are_lowbit_errors(cls):
    assert issubclass(cls, lowbit.LowbitError)


# --------------------------------------------------------------------------- calibration data


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_empty_dataset(model, onnx_model, kind):
    target = model if kind == "torch" else onnx_model
    with pytest.raises(lowbit.DatasetError, match="empty"):
        lowbit.quantize(target, lowbit.Dataset([]))
    with pytest.raises(lowbit.DatasetError, match="empty"):
        lowbit.quantize(target, lowbit.Dataset(iter(())))


def test_no_dataset_for_the_quantize_pass(model):
    with pytest.raises(lowbit.DatasetError, match=r"dataset=lowbit\.Dataset"):
        lowbit.compile(model, PTQ, example_inputs=(good(),), progress=False)


def _shape_message(index, got="1, 1, 9, 9"):
    return re.escape(f"dataset item {index}: input 'x' expected float32[batch,1,8,8], got float32[{got}]")


def test_item_of_wrong_shape_midway(model):
    """Two channels where the model takes one. (A 9x9 image is not wrong: the model pools adaptively, and is
    captured with the image size dynamic when the items' sizes differ.)"""
    snapshot = _snapshot(model)
    ds = lowbit.Dataset([good(seed=0), good(seed=1), torch.zeros(1, 2, 8, 8), good(seed=3)])
    with pytest.raises(lowbit.DatasetError, match=_shape_message(2, "1, 2, 8, 8")):
        lowbit.quantize(model, ds)
    _assert_untouched(model, snapshot)


def test_first_item_of_wrong_shape_with_example_inputs(model):
    with pytest.raises(lowbit.DatasetError, match=_shape_message(0)):
        lowbit.quantize(model, lowbit.Dataset([torch.zeros(1, 1, 9, 9)]), example_inputs=(good(),))


def test_onnx_item_of_wrong_shape(onnx_model):
    ds = lowbit.Dataset([good().numpy(), np.zeros((1, 1, 9, 9), np.float32)])
    with pytest.raises(lowbit.DatasetError, match=_shape_message(1)):
        lowbit.quantize(onnx_model, ds)


def test_item_of_wrong_rank(model):
    ds = lowbit.Dataset([good(), torch.zeros(1, 8, 8)])
    with pytest.raises(lowbit.DatasetError, match=r"dataset item 1: .*expected float32\[batch,1,8,8\]"):
        lowbit.quantize(model, ds)


def test_item_of_wrong_dtype_midway(model):
    snapshot = _snapshot(model)
    ds = lowbit.Dataset([good(), good(seed=1).double()])
    with pytest.raises(lowbit.DatasetError) as info:
        lowbit.quantize(model, ds)
    message = str(info.value)
    assert "dataset item 1" in message and "float64" in message and "float32" in message
    _assert_untouched(model, snapshot)


def test_first_item_of_wrong_dtype(model):
    """The first item is also what the model is captured with: a float64 item is still the dataset's fault."""
    snapshot = _snapshot(model)
    with pytest.raises(lowbit.DatasetError) as info:
        lowbit.quantize(model, lowbit.Dataset([good().double(), good(seed=1)]))
    message = str(info.value)
    assert "dataset item 0" in message and "float64" in message
    _assert_untouched(model, snapshot)


def test_onnx_item_of_wrong_dtype(onnx_model):
    with pytest.raises(lowbit.DatasetError, match=r"dataset item 0: .*float64"):
        lowbit.quantize(onnx_model, lowbit.Dataset([good().numpy().astype(np.float64)]))


def test_item_with_too_many_inputs(model):
    with pytest.raises(lowbit.DatasetError,
                       match=r"dataset item 1: the model takes 1 input\(s\) \(x\), the item gives 2"):
        lowbit.quantize(model, lowbit.Dataset([good(), (good(), torch.tensor([3]))]), example_inputs=(good(),))


def test_onnx_dict_item_missing_an_input(onnx_model):
    with pytest.raises(lowbit.DatasetError, match=r"dataset item 0: no array for input 'x' \(got keys \['image'\]\)"):
        lowbit.quantize(onnx_model, lowbit.Dataset([{"image": good().numpy()}]))


@pytest.mark.parametrize("bad_index", [0, 3])
def test_transform_fn_raising(model, bad_index):
    snapshot = _snapshot(model)

    def transform(i):
        if i == bad_index:
            raise KeyError("label")
        return good(seed=i)

    with pytest.raises(lowbit.DatasetError) as info:
        lowbit.quantize(model, lowbit.Dataset(range(6), transform))
    message = str(info.value)
    assert f"dataset item {bad_index}" in message
    assert "KeyError" in message and "transform_fn" in message
    assert isinstance(info.value.__cause__, KeyError)  # the original error is chained
    _assert_untouched(model, snapshot)


def test_transform_fn_raising_on_onnx(onnx_model):
    def transform(item):
        return item["pixels"]

    with pytest.raises(lowbit.DatasetError, match="dataset item 0") as info:
        lowbit.quantize(onnx_model, lowbit.Dataset([good().numpy()], transform))
    assert isinstance(info.value.__cause__, (TypeError, IndexError))


# --------------------------------------------------------------------------- devices and configs


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_unknown_device(model, onnx_model, kind):
    target = model if kind == "torch" else onnx_model
    with pytest.raises(lowbit.HardwareConfigError) as info:
        lowbit.quantize(target, lowbit.Dataset([good()]), target_device="TPU")
    message = str(info.value)
    assert "'TPU'" in message
    assert all(d in message for d in ("CPU", "GPU", "NPU", "ANY"))


def test_schema_failure(model, tmp_path):
    data = json.loads((HERE / "cpu.json").read_text())
    data["quantizers"]["a8_asym"]["mode"] = "asym"
    path = tmp_path / "bad_device.json"
    path.write_text(json.dumps(data))
    snapshot = _snapshot(model)
    with pytest.raises(lowbit.HardwareConfigError) as info:
        lowbit.quantize(model, lowbit.Dataset([good()]), target_device=str(path))
    assert "quantizers/a8_asym/mode" in str(info.value) and str(path) in str(info.value)
    _assert_untouched(model, snapshot)


# --------------------------------------------------------------------------- ignored scopes


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_ignored_scope_matching_nothing(model, onnx_model, kind):
    target = model if kind == "torch" else onnx_model
    snapshot = _snapshot(model)
    before = onnx_model.SerializeToString()
    ds = lowbit.Dataset([good() if kind == "torch" else good().numpy()])
    with pytest.raises(lowbit.IgnoredScopeError) as info:
        lowbit.quantize(target, ds, ignored_scope=lowbit.IgnoredScope(names=["conv2d_5"]))
    message = str(info.value)
    assert "'conv2d_5'" in message and "closest:" in message and "conv2d_1" in message
    _assert_untouched(model, snapshot)
    assert onnx_model.SerializeToString() == before


def test_ignored_type_matching_nothing(model):
    with pytest.raises(lowbit.IgnoredScopeError, match="ignored scope type 'gemm' matches no node.*closest: Gemm"):
        lowbit.quantize(model, lowbit.Dataset([good()]), ignored_scope=lowbit.IgnoredScope(types=["gemm"]))


# --------------------------------------------------------------------------- nothing to quantize


class Activations(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(torch.relu(x) - 0.5)


def test_nothing_to_quantize_warns_and_returns_model_unchanged():
    user = Activations().eval()
    x = torch.randn(4, 3, 5)
    with pytest.warns(UserWarning, match="nothing to quantize"):
        q = lowbit.quantize(user, lowbit.Dataset([x[:2]]))
    assert isinstance(q, torch.nn.Module)
    assert not _has_fq(q)
    with torch.no_grad():
        torch.testing.assert_close(q(x), user(x), rtol=0, atol=0)


def test_nothing_to_quantize_onnx():
    proto = lowbit.codegen(lowbit.lower(Activations().eval(), (torch.randn(2, 3, 5),)), "onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    with pytest.warns(UserWarning, match="nothing to quantize"):
        q = lowbit.quantize(proto, lowbit.Dataset([x[:2]]))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in q.graph.node}
    np.testing.assert_array_equal(run_onnx(q, {"x": x})[0], run_onnx(proto, {"x": x})[0])


def test_nothing_to_quantize_does_not_need_calibration_to_succeed():
    """No quantizer means no statistics: the warning path does not run the data through the model, and reads
    each item at most once."""
    calls = []

    def transform(item):
        calls.append(item)
        return item

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(Activations().eval(), lowbit.Dataset([torch.randn(1, 3, 5)] * 5, transform))
    # each item is read once (the capture looks at which dims vary across them), none is run through the model
    assert len(calls) <= 5


# --------------------------------------------------------------------------- the model survives errors


def test_model_untouched_after_error_in_train_mode():
    torch.manual_seed(0)
    user = DigitsCNN().train()
    snapshot = _snapshot(user)
    ds = lowbit.Dataset([good(4), good(4, seed=1), torch.zeros(4, 2, 8, 8)])
    with pytest.raises(lowbit.DatasetError, match="dataset item 2"):
        lowbit.quantize(user, ds)
    _assert_untouched(user, snapshot)
    assert user.training


def test_onnx_model_untouched_after_error(onnx_model):
    before = onnx_model.SerializeToString()
    with pytest.raises(lowbit.DatasetError):
        lowbit.quantize(onnx_model, lowbit.Dataset([good().numpy(), np.zeros((1, 1, 9, 9), np.float32)]))
    assert onnx_model.SerializeToString() == before


class UnknownOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.cummax(self.conv(x), dim=1).values.flatten(1))


def test_unknown_op_stays_fp32_with_a_warning():
    torch.manual_seed(0)
    user = UnknownOp().eval()
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match="cummax"):
        q = lowbit.quantize(user, lowbit.Dataset([x[:2]]))
    graph = graph_of(q)
    cummax = [n for n in graph if n.domain == "torch" and "cummax" in n.op_type]
    assert len(cummax) == 1
    assert cummax[0].input(0).producer.op_type == "Conv"  # not quantized: its input is read as FP32
    assert sum(isinstance(m, FakeQuantize) for m in q.modules()) == 4  # conv + fc: weight and input each
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
