"""The compression-state file (lowbit.save / lowbit.load): JSON + .npz, rebuilt on the original model without
calibration, bit-equal to the saved model, from both origins; a state from another model or of another format
version is a StateError."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx
from models import REFERENCE_MODELS

import lowbit


def _model(name="se"):
    factory, shape = REFERENCE_MODELS[name]
    return factory(), torch.randn(*shape, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def quantized():
    model, x = _model()
    return model, x, lowbit.quantize(model, lowbit.Dataset([x[:1], x[1:]]))


def test_a_torch_model_comes_back_bit_equal_without_calibration(quantized, tmp_path):
    model, x, q = quantized
    path = lowbit.save(q, tmp_path / "se.state")
    assert path == tmp_path / "se.state.json" and (tmp_path / "se.state.npz").is_file()
    state = json.loads(path.read_text())
    assert (state["format"], state["version"], state["origin"]) == ("lowbit-compression-state", 1, "torch")
    assert state["passes"] == ["cleanup", "fold_bn", "fuse", "quantize", "fast_bias_correction", "snap_bias"]
    assert state["options"] == {"hw": "ANY", "preset": None, "model_type": None, "range_estimator": "mean_min_max",
                                "overflow_fix": "first_layer", "progress": True, "batch_size": 8,
                                "smooth_quant_alpha": None, "bits": None, "range_learning": "range",
                                "fold_bn": "eval", "per_tensor_weights": "folded", "weight_range_estimator": "auto"}
    raw = json.loads((Path(lowbit.hw_configs.__file__).parent / "any.json").read_text())
    assert state["hw_config"]["device"] == "ANY" and state["hw_config"]["ops"] == raw["ops"]  # the whole config
    assert state["graph"].count("::FakeQuantize\"(") == sum(1 for n in q.lowbit_graph if n.op_type == "FakeQuantize")
    fresh, _ = _model()  # the original model, built again: no calibration data is passed
    loaded = lowbit.load(fresh, path, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert list(loaded.state_dict()) == list(q.state_dict())
    assert lowbit.export(loaded, tmp_path / "loaded.onnx").is_file()  # it holds its graph, as q does


def test_trained_ranges_and_weights_are_what_is_saved(quantized, tmp_path):
    model, x, q = quantized
    trained = __import__("copy").deepcopy(q)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.mul_(1.01 if name.endswith(".high") else 0.99)  # as a few steps of QAT would move them
    lowbit.save(trained, tmp_path / "trained")
    loaded = lowbit.load(model, tmp_path / "trained.json", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x)) and not torch.equal(loaded(x), q(x))


def test_an_onnx_model_comes_back_bit_equal(tmp_path):
    model, x = _model()
    fp32 = lowbit.codegen(lowbit.lower(model, (x,)), "onnx")
    q = lowbit.quantize(fp32, lowbit.Dataset([x[:1].numpy(), x[1:].numpy()]))
    lowbit.save(q, tmp_path / "q")
    loaded = lowbit.load(fp32, tmp_path / "q")
    assert isinstance(loaded, onnx.ModelProto)
    name = fp32.graph.input[0].name
    np.testing.assert_array_equal(run_onnx(loaded, {name: x.numpy()})[0], run_onnx(q, {name: x.numpy()})[0])
    assert sum(n.op_type == "QuantizeLinear" for n in loaded.graph.node) == sum(
        n.op_type == "QuantizeLinear" for n in q.graph.node)


def test_a_users_own_hardware_config_is_recorded_whole_from_both_origins(tmp_path):
    """A config the user wrote (here: the CPU config without Conv) is what the state and the ONNX model record, and
    what load gives back: its contents, not a name that means nothing on another machine."""
    import lowbit.hw_configs

    config = json.loads((Path(lowbit.hw_configs.__file__).parent / "cpu.json").read_text())
    config["device"] = "my-cpu"
    del config["ops"]["Conv"]
    model, x = _model()
    q = lowbit.compile(model, hw=config, dataset=lowbit.Dataset([x[:1], x[1:]]), example_inputs=(x,))
    state = json.loads(lowbit.save(q, tmp_path / "mine").read_text())
    assert state["options"]["hw"] == "my-cpu"
    assert state["hw_config"]["device"] == "my-cpu" and "Conv" not in state["hw_config"]["ops"]
    assert lowbit.hw_configs.parse_hw_config(state["hw_config"]).ops == lowbit.hw_configs.parse_hw_config(config).ops
    assert lowbit.load(model, tmp_path / "mine", example_inputs=(x,)).lowbit_graph.meta["hw_config"] == \
        state["hw_config"]
    fp32 = lowbit.codegen(lowbit.lower(model, (x,)), "onnx")
    qo = lowbit.compile(fp32, hw=config, dataset=lowbit.Dataset([x[:1].numpy(), x[1:].numpy()]))
    recorded = {p.key: p.value for p in qo.metadata_props}
    assert json.loads(recorded["lowbit.hw_config"]) == state["hw_config"]


def test_a_state_from_another_model_is_refused(quantized, tmp_path):
    _, x, q = quantized
    lowbit.save(q, tmp_path / "se")
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU()).eval()
    with pytest.raises(lowbit.StateError, match=r"saved from another model: its inputs are \['input'\], the saved "
                                                r"model's \['x'\]"):
        lowbit.load(other, tmp_path / "se", example_inputs=(x,))
    wider, _ = _model()
    with torch.no_grad():
        first = next(m for m in wider.modules() if isinstance(m, torch.nn.Conv2d))
        first.weight = torch.nn.Parameter(torch.zeros(first.out_channels, first.in_channels, 5, 5))
        first.padding = (2, 2)
    with pytest.raises(lowbit.StateError, match=r"saved from another model: its weight '.*weight' is <f4\[.*5, 5\], "
                                                r"the saved model's <f4\[.*3, 3\]"):
        lowbit.load(wider, tmp_path / "se", example_inputs=(x,))
    onnx_model = lowbit.codegen(lowbit.lower(_model()[0], (x,)), "onnx")
    with pytest.raises(lowbit.StateError, match="saved from a torch model; ModelProto is a onnx model"):
        lowbit.load(onnx_model, tmp_path / "se")


def test_unreadable_states_are_named(quantized, tmp_path):
    model, x, q = quantized
    with pytest.raises(lowbit.StateError, match="no compression state at .*missing.json"):
        lowbit.load(model, tmp_path / "missing", example_inputs=(x,))
    path = lowbit.save(q, tmp_path / "se")
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "version": 2}))
    with pytest.raises(lowbit.StateError, match="format version 2; this lowbit reads version 1"):
        lowbit.load(model, tmp_path / "se", example_inputs=(x,))
    path.write_text("{not json")
    with pytest.raises(lowbit.StateError, match="is not a lowbit compression state"):
        lowbit.load(model, tmp_path / "se", example_inputs=(x,))
    with pytest.raises(lowbit.StateError, match="was not compressed by lowbit"):
        lowbit.save(lowbit.codegen(lowbit.lower(model, (x,)), "onnx"), tmp_path / "plain")
