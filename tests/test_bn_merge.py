"""BN merge for QAT (fold_bn="train"): the Conv keeps a training BatchNorm, its weight quantizer rounds the weight
scaled by the BN's running statistics, and export, strip and save/load fold or keep it exactly."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_onnx, run_openvino
from models import randomize_batchnorm

import lowbit

QAT_PASSES = ["cleanup", "fold_bn", "fuse", "quantize"]


def _model():
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).eval()


@pytest.fixture(scope="module", params=["per_channel", "per_tensor"])
def merged(request):
    """A per-channel weight quantizer rounds W (folding scales its grid alike); a per-tensor one rounds W * s."""
    from lowbit.train.config import Quantization
    from lowbit.train.controller import _hw_for

    model = _model()
    with torch.no_grad():
        model[1].weight[0] *= -1  # a negative BN scale mirrors the folded grid
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    data = lowbit.Dataset([x[i:i + 8] for i in range(0, 32, 8)])
    hw = _hw_for("CPU", Quantization(weights={"per_channel": request.param == "per_channel"}))
    folded = lowbit.compile(model, QAT_PASSES, dataset=data, hw=hw)
    q = lowbit.compile(model, QAT_PASSES, dataset=data, fold_bn="train", hw=hw)
    simulated = "div.Tensor" in q.code
    assert simulated == (request.param == "per_tensor")  # the simulated-folding form only where it is needed
    return model, x, folded, q


def _bns(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_the_merged_module_keeps_the_users_batchnorms_and_starts_where_folding_does(merged):
    model, x, folded, q = merged
    assert set(_bns(q)) == {"1", "4"} and not _bns(folded)
    assert sum(n.meta.get("bn_merge") is not None for n in q.lowbit_graph) == 2
    with torch.no_grad():
        np.testing.assert_allclose(q(x).numpy(), folded(x).numpy(), atol=1e-5)


def _train_step(q, x, steps=3):
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(q(x), torch.arange(len(x)) % 4).backward()
        opt.step()
    return q.eval()


def test_training_updates_the_batchnorm_and_export_folds_it_exactly(merged, tmp_path):
    import copy

    model, x, _, q = merged
    q = copy.deepcopy(q)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.train()
    q.zero_grad()
    F.cross_entropy(q(x), torch.arange(len(x)) % 4).backward()
    assert q.get_submodule("1").weight.grad.abs().sum() > 0  # gamma learns through both of its paths
    _train_step(q, x)
    after = q.state_dict()
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])  # batch statistics in training
    assert not torch.equal(after["4.running_var"], before["4.running_var"])
    with torch.no_grad():
        simulated = q(x).numpy()
    path = lowbit.export(q, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    ort_out = run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]
    import openvino as ov

    ov_out = run_openvino(ov.Core().read_model(str(lowbit.export(q, tmp_path / "m.xml"))), [x.numpy()])[0]
    for out in (ort_out, ov_out):
        error = np.sum((simulated - out) ** 2) / np.sum(simulated ** 2)
        assert 10 * np.log10(1 / error) > 35
    plain = lowbit.strip(q)
    assert not _bns(plain)
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), simulated, atol=1e-5)


def test_save_and_load_keep_the_merge(merged, tmp_path):
    import copy

    model, x, _, q = merged
    q = _train_step(copy.deepcopy(q), x, steps=1)
    lowbit.save(q, tmp_path / "m.state")
    back = lowbit.load(model, tmp_path / "m.state", example_inputs=(x[:2],))
    assert set(_bns(back)) == {"1", "4"}
    with torch.no_grad():
        np.testing.assert_array_equal(back(x).numpy(), q(x).numpy())


def test_fold_bn_takes_two_values():
    with pytest.raises(lowbit.OptionError, match="unknown fold_bn 'merge': use one of eval, train"):
        lowbit.compile(_model(), QAT_PASSES, dataset=lowbit.Dataset([torch.randn(2, 3, 8, 8)]), fold_bn="merge")
