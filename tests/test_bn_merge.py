"""BN merge for QAT (fold_bn="train"): the Conv keeps a training BatchNorm, its weight quantizer rounds the weight
scaled by the BN's running statistics, and export, strip and save/load fold or keep it exactly."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_onnx, run_openvino
from deploy_checks import sqnr
from models import randomize_batchnorm

import lowbit

QAT_PASSES = ["cleanup", "fold_bn", "fuse", "quantize"]


def _model():
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).eval()


@pytest.fixture(scope="module", params=["per_channel", "per_tensor", "per_tensor_unfolded"])
def merged(request):
    """A per-channel weight quantizer rounds W (folding scales its grid alike); a per-tensor one rounds W * s, or W
    with per_tensor_weights="unfolded" (NNCF's per-tensor weights)."""
    from lowbit.hw_configs import narrowed

    model = _model()
    with torch.no_grad():
        model[1].weight[0] *= -1  # a negative BN scale mirrors the folded grid
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    data = lowbit.Dataset([x[i:i + 8] for i in range(0, 32, 8)])
    hw = narrowed("CPU", weights={"per_channel": request.param == "per_channel"})
    grid = "unfolded" if request.param == "per_tensor_unfolded" else "folded"
    folded = lowbit.compile(model, QAT_PASSES, dataset=data, hw=hw, per_tensor_weights=grid)
    q = lowbit.compile(model, QAT_PASSES, dataset=data, fold_bn="train", hw=hw, per_tensor_weights=grid)
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
        assert sqnr(simulated, out) > 35
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


@pytest.mark.parametrize("per_channel, grid", [(True, "folded"), (False, "folded"), (False, "unfolded")])
def test_export_gives_back_the_integers_the_module_trained_with(per_channel, grid):
    """Folding W * s in floating point moved weights lying within rounding error of a midpoint between two levels
    to the other level (a few per wide layer): the export must round each weight where the module did."""
    from lowbit.backends.torch_bn_merge import rounded_merged_weights
    from lowbit.backends.torch_fq import fake_quantize
    from lowbit.frontends import graph_of
    from lowbit.ir.ops import weight_quantizer
    from lowbit.patterns.library.bn_folding import bn_scale, merged_pairs
    from lowbit.hw_configs import narrowed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                          nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU()).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (model[1], model[4]):  # BN statistics far from the identity, as trained ones are
            bn.weight.copy_(0.2 + 3 * torch.rand(bn.num_features, generator=g))
            bn.running_var.copy_(0.01 + 2 * torch.rand(bn.num_features, generator=g))
    hw = narrowed("CPU", weights={"per_channel": per_channel})
    x = torch.randn(4, 3, 6, 6, generator=g)
    q = lowbit.compile(model, QAT_PASSES, dataset=lowbit.Dataset([x]), fold_bn="train", hw=hw,
                       per_tensor_weights=grid)
    merged = graph_of(q, fold_merged_bn=False)
    trained = rounded_merged_weights(q, merged)
    scales = {conv.name: bn_scale(bn).reshape(-1, 1, 1, 1) for conv, bn in merged_pairs(merged)}
    folded = {n.name: n for n in graph_of(q) if n.op_type == "Conv"}
    assert set(trained) == set(folded) == set(scales) and len(folded) == 2
    for name, conv in folded.items():
        fq = weight_quantizer(conv)
        levels, low, high = int(fq.attrs["levels"]), fq.input(1).const, fq.input(2).const
        exported = fake_quantize(levels, torch.from_numpy(low), torch.from_numpy(high), grid=fq.meta.get("grid"))
        with torch.no_grad():
            deployed = exported(torch.from_numpy(fq.input(0).const.copy())).numpy().astype(np.float64)
        expected = trained[name] * scales[name] if per_channel or grid == "unfolded" else trained[name]
        step = (high.astype(np.float64) - low) / (levels - 1)
        assert (np.abs(deployed - expected) / step).max() < 1e-3, name  # no weight on another level


def test_fold_bn_takes_two_values():
    with pytest.raises(lowbit.OptionError, match="unknown fold_bn 'merge': use one of eval, train"):
        lowbit.compile(_model(), QAT_PASSES, dataset=lowbit.Dataset([torch.randn(2, 3, 8, 8)]), fold_bn="merge")


def _bn_scale(bn: nn.BatchNorm2d) -> np.ndarray:
    """gamma / sqrt(running_var + eps) of a torch BatchNorm: what folding it scales each filter by."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()


def _weight_ranges(q):
    """(low, high) of each Conv's weight FakeQuantize in a compiled torch module, in layer order."""
    from lowbit.frontends import graph_of
    from lowbit.ir.ops import weight_quantizer

    fqs = [weight_quantizer(n) for n in graph_of(q) if n.op_type == "Conv"]
    return [(fq.input(1).const.astype(np.float64).ravel(), fq.input(2).const.astype(np.float64).ravel())
            for fq in fqs]


def test_unfolded_per_tensor_weights_put_one_grid_on_the_stored_weight(tmp_path):
    """per_tensor_weights="unfolded", BN folded before quantizing: the folded weight W * s is rounded on one grid
    of W's units, scaled by each filter's s (the per-tensor weights NNCF gives a torch model, whose BN the runtime
    folds); "folded" puts one grid on W * s. Both run as written in ONNX Runtime and OpenVINO."""
    from lowbit.hw_configs import narrowed

    model = _model()
    with torch.no_grad():
        model[1].weight[0] *= -1
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    data = lowbit.Dataset([x[:8], x[8:]])
    hw = narrowed("CPU", weights={"per_channel": False})
    stored = [model[0].weight, model[3].weight]
    scales = [_bn_scale(bn) for bn in (model[1], model[4])]
    unfolded = lowbit.compile(model, QAT_PASSES, dataset=data, hw=hw, per_tensor_weights="unfolded",
                              overflow_fix="disable")  # every layer on the 8-bit grid
    for (low, high), w, s in zip(_weight_ranges(unfolded), stored, scales):
        assert low.shape == high.shape == s.shape  # one range per filter
        magnitude = w.detach().abs().max().item()  # symmetric, narrow range: [-m, m], m the stored weight's widest
        np.testing.assert_allclose(np.maximum(np.abs(low), np.abs(high)) / np.abs(s), np.full(s.shape, magnitude),
                                   rtol=1e-5)
    folded = lowbit.compile(model, QAT_PASSES, dataset=data, hw=hw, overflow_fix="disable")
    for (low, high), w, s in zip(_weight_ranges(folded), stored, scales):
        assert low.shape == high.shape == (1,)
        widest = np.abs(w.detach().double().numpy() * s.reshape(-1, 1, 1, 1)).max()
        np.testing.assert_allclose(high, widest, rtol=1e-5)
    with torch.no_grad():
        simulated = unfolded(x).numpy()
    proto = onnx.load(str(lowbit.export(unfolded, tmp_path / "m.onnx")))
    import openvino as ov

    outs = [run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0],
            run_openvino(ov.Core().read_model(str(lowbit.export(unfolded, tmp_path / "m.xml"))), [x.numpy()])[0]]
    for out in outs:
        assert sqnr(simulated, out) > 35


def test_per_tensor_weights_takes_two_values():
    with pytest.raises(lowbit.OptionError, match="unknown per_tensor_weights 'stored': use one of folded, unfolded"):
        lowbit.compile(_model(), QAT_PASSES, dataset=lowbit.Dataset([torch.randn(2, 3, 8, 8)]),
                       per_tensor_weights="stored")


def test_unfolded_per_tensor_weights_follow_the_filters_pruning_keeps():
    """fold_bn records each layer's BN scale; pruning filters after it cuts the record with the weight, so the one
    grid of the stored weight still fits every filter kept (the widest sits on a grid end, none beyond it)."""
    from lowbit.frontends import graph_of
    from lowbit.hw_configs import narrowed
    from lowbit.ir.ops import weight_quantizer
    from lowbit.pruning import PruneSpec

    model = _model()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    q = lowbit.compile(model, ["cleanup", "fold_bn", "prune_filters", "fuse", "quantize"], dataset=lowbit.Dataset([x]),
                       hw=narrowed("CPU", weights={"per_channel": False}), per_tensor_weights="unfolded",
                       overflow_fix="disable", pruning=PruneSpec(ratio=0.5))

    convs = [n for n in graph_of(q) if n.op_type == "Conv"]
    assert [n.input(1).producer.input(0).const.shape[0] for n in convs] == [4, 4]
    for conv in convs:
        fq = weight_quantizer(conv)
        w, high = fq.input(0).const.astype(np.float64), fq.input(2).const.astype(np.float64).ravel()
        assert high.shape == (4,)
        fill = np.abs(w).reshape(4, -1).max(axis=1) / high  # each filter's widest weight on its grid
        assert fill.max() == pytest.approx(1.0, rel=1e-5) and (fill <= 1 + 1e-6).all()


def test_unfolded_per_tensor_weights_of_an_onnx_model_with_batchnorms(tmp_path):
    """An ONNX model that keeps its BatchNormalizations (exported without constant folding) gets the same grid: each
    Conv's int8 weight scale is one scale of the stored weight times its BN's s (a folded export has no s left)."""
    from lowbit.hw_configs import narrowed

    model = _model()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "bn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False)
    proto = onnx.load(str(path))
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 2
    hw = narrowed("CPU", weights={"per_channel": False})
    q = lowbit.quantize(proto, lowbit.Dataset([x.numpy()]), target_device=hw, per_tensor_weights="unfolded",
                        overflow_fix="disable")
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in q.graph.node for o in n.output}
    for conv, (w, bn) in zip(convs, [(model[0].weight, model[1]), (model[3].weight, model[4])]):
        dq = producers[conv.input[1]]
        scale = consts[dq.input[1]].astype(np.float64)
        s = _bn_scale(bn)
        assert scale.shape == s.shape
        np.testing.assert_allclose(scale / np.abs(s), np.full(s.shape, w.detach().abs().max().item() / 127), rtol=1e-5)
    assert run_onnx(q, {q.graph.input[0].name: x.numpy()})[0].shape == (8, 4)
