"""lowbit.create_compressed_model: NNCF's config (dict or JSON file, validated, errors naming the JSON path) and
NNI's config_list, the controller's API (scheduler, loss, statistics, stage, strip, export, state), and exact
resumption from the compression state."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import REFERENCE_MODELS

import lowbit
from lowbit.backends.torch_fq import FakeQuantize, LSQFakeQuantize
from lowbit.train import CompressionStage


@pytest.fixture(scope="module")
def se():
    factory, shape = REFERENCE_MODELS["se"]
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(4))
    return factory(), x, lowbit.Dataset([x[i:i + 4] for i in range(0, 16, 4)])


CONFIG = {
    "input_info": {"sample_size": [2, 1, 8, 8]},
    "target_device": "CPU",
    "compression": {
        "algorithm": "quantization",
        "preset": "mixed",
        "initializer": {"range": {"num_init_samples": 4, "type": "min_max"}},
        "weights": {"mode": "symmetric", "bits": 4, "per_channel": True},
        "activations": {"mode": "asymmetric", "bits": 8},
        "ignored_scopes": ["{re}^linear$"],
        "scope_overrides": {"weights": {"conv2d": {"bits": 8}}},
        "range_learning": "lsq",
    },
}


def _layer_bits(controller):
    return {row[0]: row[2:] for row in controller.statistics().rows}


def test_a_config_quantizes_as_it_says(se, tmp_path):
    model, x, data = se
    controller, q = lowbit.create_compressed_model(model, CONFIG, dataset=data)
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    assert fqs and all(isinstance(m, LSQFakeQuantize) for m in fqs)
    assert {m.grid for m in fqs if m.zero_point.dim() == 0} == {"asymmetric"}  # activations: asymmetric
    bits = _layer_bits(controller)
    assert bits["conv2d"] == ("8", "8") and bits["conv2d_3"] == ("4", "8")
    assert bits["linear"] == ("fp32", "fp32")  # ignored by the {re} scope
    text = controller.statistics().to_str()
    assert "layers quantized 8/9" in text and "conv2d_3" in text
    assert controller.compression_stage() == CompressionStage.FULLY_COMPRESSED
    assert float(controller.loss()) == 0.0
    controller.scheduler.step()
    controller.scheduler.epoch_step()
    assert (controller.scheduler.current_step, controller.scheduler.current_epoch) == (0, 0)
    plain = controller.strip()
    assert not any(isinstance(m, FakeQuantize) for m in plain.modules())
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), q(x).numpy(), atol=1e-5)
    assert controller.export_model(tmp_path / "q.xml").is_file()


def test_a_json_file_and_the_same_dict_give_the_same_model(se, tmp_path):
    model, x, data = se
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    _, a = lowbit.create_compressed_model(model, str(path), dataset=data)
    _, b = lowbit.create_compressed_model(model, CONFIG, dataset=data)
    with torch.no_grad():
        np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def _with(path, value):
    config = json.loads(json.dumps(CONFIG))
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


@pytest.mark.parametrize("config, message", [
    (_with(["compression", "weights", "bits"], 9), "compression.weights.bits: 9 is greater than the maximum of 8"),
    (_with(["compression", "wieghts"], {}), r"compression: Additional properties .*'wieghts' was unexpected"),
    (_with(["compression", "initializer", "range", "type"], "threesigma"),
     "compression.initializer.range.type: 'threesigma' is not one of"),
    (_with(["target_device", ], "TPU"), "target_device: 'TPU' is not one of"),
    (_with(["compression"], [CONFIG["compression"], {"algorithm": "quantization", "preset": 3}]),
     r"compression\[1\].preset: 3 is not one of"),
    (_with(["input_info", "sample_size"], [2, 0]), r"input_info.sample_size\[1\]: 0 is less than the minimum"),
    (_with(["compression", "algorithm"], "sparsity"), "compression.algorithm: 'sparsity' is not one of"),
    (_with(["compression", "weights"], {"mode": "asymmetric", "per_channel": False}),
     r"config field compression.weights: device CPU has no weight quantizer for \w+ with .*'per_channel': False"),
    (_with(["input_info", "keyword"], "x"), "input_info.keyword: lowbit passes inputs by position"),
    (_with(["compression", "per_tensor_weights"], "stored"), "compression.per_tensor_weights: 'stored' is not one of"),
    (_with(["compression", "weight_range_estimator"], "max"),
     "compression.weight_range_estimator: 'max' is not one of"),
    (_with(["compression"], [{"algorithm": "quantization"}, {"algorithm": "quantization"}]),
     "each algorithm may appear once"),
    ({"compression": {"algorithm": "filter_pruning", "pruning_init": 0.6, "params": {"pruning_target": 0.5}}},
     "pruning_init: 0.6 is above params.pruning_target 0.5"),
])
def test_a_bad_config_names_the_json_path(se, config, message):
    model, _, data = se
    with pytest.raises(lowbit.ConfigError, match=message):
        lowbit.create_compressed_model(model, config, dataset=data)


def test_per_tensor_weights_unfolded_rounds_the_weight_before_its_merged_batchnorm(se):
    """NNCF's per-tensor weights through its config: with BN merge, each merged Conv's quantizer has one range and
    rounds W (not W * s); the strip folds the BN onto its grid, one range per filter."""
    from lowbit.frontends import graph_of
    from lowbit.ir.ops import weight_quantizer

    model, x, data = se
    config = _with(["compression", "weights", "per_channel"], False)
    config["compression"].update(fold_bn="train", per_tensor_weights="unfolded", range_learning="range")
    controller, q = lowbit.create_compressed_model(model, config, dataset=data)
    merged = [n for n in graph_of(q, fold_merged_bn=False) if n.op_type == "Conv" and n.meta.get("bn_merge")]
    assert merged and all(weight_quantizer(n).meta.get("before_bn") for n in merged)
    assert all(weight_quantizer(n).input(1).const.size == 1 for n in merged)
    assert "div.Tensor" not in q.code  # no simulated folding: the Conv reads q(W), its BN after it
    names = {n.name for n in merged}
    folded = {n.name: weight_quantizer(n).input(1).const.size for n in graph_of(q) if n.name in names}
    assert folded == {n.name: n.output.shape[1] for n in merged}
    plain = controller.strip()
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), q.eval()(x).numpy(), atol=1e-5)


def test_the_config_sets_how_weight_ranges_are_estimated(se):
    """CONFIG's 4-bit per-channel weights keep each filter's largest weight as its range end ("auto", as
    "min_max"); "mse" clips them for the least rounding error."""
    from lowbit.frontends import graph_of

    model, _, data = se

    def weight_ends(config):
        _, q = lowbit.create_compressed_model(model, config, dataset=data)
        return {n.name: (n.input(2).const.reshape(-1), np.abs(n.input(0).const).reshape(len(n.input(0).const), -1))
                for n in graph_of(q) if n.op_type == "FakeQuantize" and n.input(0).const is not None
                and int(n.attrs["levels"]) == 15}

    ends = weight_ends(CONFIG)
    clipped = weight_ends(_with(["compression", "weight_range_estimator"], "mse"))
    assert clipped.keys() == ends.keys() and len(ends) == 7  # the 4-bit layers: not conv2d (8), not linear
    for high, w in ends.values():
        np.testing.assert_allclose(high, w.max(axis=1), rtol=1e-6)
    assert all(np.all(clipped[k][0] <= ends[k][0] * (1 + 1e-6)) for k in ends)
    assert any(np.any(clipped[k][0] < 0.95 * ends[k][0]) for k in ends)


def test_quantization_needs_data_and_a_torch_module(se, tmp_path):
    with pytest.raises(lowbit.DatasetError, match="initializer.range"):
        lowbit.create_compressed_model(se[0], CONFIG)
    path = lowbit.export(se[0], tmp_path / "m.onnx", example_inputs=(se[1][:2],))
    with pytest.raises(lowbit.UnsupportedModelError, match="compresses a torch module for training, not a str"):
        lowbit.create_compressed_model(str(path), CONFIG, dataset=se[2])


def test_the_compression_state_resumes_exactly(se):
    model, x, data = se
    controller, q = lowbit.create_compressed_model(model, CONFIG, dataset=data)
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(q(x), torch.arange(16) % 10).backward()
        opt.step()
        controller.scheduler.step()
    buffer = io.BytesIO()
    torch.save({"state_dict": q.state_dict(), "compression_state": controller.get_compression_state()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_controller, resumed = lowbit.create_compressed_model(
        model, CONFIG, compression_state=checkpoint["compression_state"])
    resumed.load_state_dict(checkpoint["state_dict"])
    assert resumed_controller.scheduler.current_step == 2
    q.eval(), resumed.eval()
    with torch.no_grad():
        np.testing.assert_array_equal(resumed(x).numpy(), q(x).numpy())


def test_filter_pruning_moves_on_the_schedule(se, tmp_path):
    model, x, data = se
    config = {"input_info": {"sample_size": [2, 1, 8, 8]},
              "compression": {"algorithm": "filter_pruning", "pruning_init": 0.0,
                              "params": {"schedule": "exponential", "pruning_target": 0.5, "pruning_steps": 3}}}
    controller, masked = lowbit.create_compressed_model(model, config)
    assert controller.compression_stage() == CompressionStage.UNCOMPRESSED
    controller.scheduler.epoch_step()
    assert controller.compression_stage() == CompressionStage.PARTIALLY_COMPRESSED
    for _ in range(3):
        controller.scheduler.epoch_step()
    assert controller.compression_stage() == CompressionStage.FULLY_COMPRESSED
    stats = controller.statistics()
    assert stats.summary["ratio"] == 0.5
    before, after = (int(p) for p in stats.summary["params"].split(" -> "))
    assert after < before * 0.6
    pruned = controller.strip()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters()) * 0.6
    assert controller.export_model(tmp_path / "p.onnx").is_file()


def test_nni_config_list_sets_bits_per_layer_and_excludes(se):
    model, x, data = se
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 8},
                    "op_types": ["Conv2d"]},
                   {"quant_types": ["weight"], "quant_bits": 6, "op_names": ["conv2d"]},
                   {"exclude": True, "op_names": ["linear"]}]
    controller, q = lowbit.create_compressed_model(model, config_list, dataset=data)
    bits = _layer_bits(controller)
    assert bits["conv2d"] == ("6", "8") and bits["conv2d_5"] == ("4", "8") and bits["linear"] == ("fp32", "fp32")
    with pytest.raises(lowbit.ConfigError, match=r"config_list\[0\].quant_bits: 12"):
        lowbit.create_compressed_model(model, [{"quant_bits": 12, "op_types": ["Conv2d"]}], dataset=data)


def test_accuracy_aware_training_runs_until_the_pruning_schedule_is_done(se):
    model, x, _ = se
    config = {"input_info": {"sample_size": [2, 1, 8, 8]},
              "compression": {"algorithm": "filter_pruning",
                              "params": {"schedule": "baseline", "pruning_target": 0.5, "pruning_steps": 2}}}
    controller, masked = lowbit.create_compressed_model(model, config)
    epochs = []

    def train_epoch(ctrl, m, epoch, optimizer, lr_scheduler):
        epochs.append((epoch, ctrl.compression_stage()))

    result = lowbit.accuracy_aware_training(controller, masked, train_epoch, lambda m, epoch: 99.0,
                                            uncompressed_accuracy=99.0, maximal_absolute_accuracy_degradation=0.5,
                                            maximal_total_epochs=5)
    # within the target from the start, but only a fully compressed model may stop the run
    assert [stage for _, stage in epochs] == [CompressionStage.UNCOMPRESSED, CompressionStage.PARTIALLY_COMPRESSED]
    assert result is masked and controller.compression_stage() == CompressionStage.FULLY_COMPRESSED


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_qat_of_a_transformers_model_exports_what_it_trained(name, tmp_path):
    """A transformers architecture (from its config, random weights) through the NNCF-style config, two LSQ
    training steps, then its .onnx in ONNX Runtime and .xml in OpenVINO against the trained module."""
    from conftest import run_onnx, run_openvino
    from zoo_models import build

    import openvino as ov
    import onnx

    model, make_input, _ = build(name)
    x = make_input(8)
    config = {"input_info": {"sample_size": list(x.shape), "type": "long" if x.dtype == torch.int64 else "float"},
              "compression": {"algorithm": "quantization", "preset": "mixed", "range_learning": "lsq",
                              "weights": {"bits": 4}}}
    controller, q = lowbit.create_compressed_model(model, config, dataset=lowbit.Dataset([make_input(4)] * 2))
    assert controller.statistics().summary["layers quantized"] in ("13/13", "14/14")
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-4)
    for _ in range(2):
        opt.zero_grad()
        q(x).pow(2).mean().backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        simulated = q(x).numpy().astype(np.float64)
    proto = onnx.load(str(controller.export_model(tmp_path / "q.onnx")))
    outputs = [run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0],
               run_openvino(ov.Core().read_model(str(controller.export_model(tmp_path / "q.xml"))), [x.numpy()])[0]]
    for out in outputs:
        assert 10 * np.log10(np.sum(simulated ** 2) / np.sum((simulated - out) ** 2)) > 30


def test_a_bad_compression_state_is_a_state_error(se):
    model, x, data = se
    controller, _ = lowbit.create_compressed_model(model, CONFIG, dataset=data)
    with pytest.raises(lowbit.StateError, match="not what controller.get_compression_state\\(\\) returned"):
        lowbit.create_compressed_model(model, CONFIG, compression_state={"config": CONFIG})
    other = REFERENCE_MODELS["concat"][0]()  # another model, the same input size
    with pytest.raises(lowbit.StateError, match="saved from another model"):
        lowbit.create_compressed_model(other, CONFIG, compression_state=controller.get_compression_state())


def test_pruning_and_quantization_train_together_and_strip_to_a_smaller_quantized_model(se, tmp_path):
    """NNCF's combined config: masks move on their schedule in the quantized module (the weights the quantizers
    read are zeroed), and strip / export cut the masked channels, quantizer ranges included."""
    import onnx
    from conftest import run_onnx, train_epochs

    model, x, data = se
    config = {"input_info": {"sample_size": [2, 1, 8, 8]},
              "compression": [{"algorithm": "filter_pruning",
                               "params": {"schedule": "exponential", "pruning_target": 0.5, "pruning_steps": 2}},
                              {"algorithm": "quantization", "weights": {"bits": 4}}]}
    controller, q = lowbit.create_compressed_model(model, config, dataset=data)
    assert any(isinstance(m, FakeQuantize) for m in q.modules())
    assert controller.compression_stage() == CompressionStage.UNCOMPRESSED
    train_epochs(q, controller, x)
    assert controller.compression_stage() == CompressionStage.FULLY_COMPRESSED
    with torch.no_grad():
        out = q(x).numpy()  # the pre-hook zeroed the masked filters again after the last step
    summary = controller.statistics().summary
    assert summary["ratio"] == 0.5 and summary["layers quantized"] == "9/9"
    plain = controller.strip()
    assert not any(isinstance(m, FakeQuantize) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), out, atol=1e-5)
    proto = onnx.load(str(controller.export_model(tmp_path / "pq.onnx")))
    exported = run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]
    assert 10 * np.log10(np.sum(out.astype(np.float64) ** 2) / np.sum((out - exported) ** 2)) > 35
    state = controller.get_compression_state()
    resumed_controller, resumed = lowbit.create_compressed_model(model, config, compression_state=state)
    resumed.load_state_dict(q.state_dict())
    with torch.no_grad():
        np.testing.assert_array_equal(resumed.eval()(x).numpy(), out)
    assert resumed_controller.compression_stage() == CompressionStage.FULLY_COMPRESSED
