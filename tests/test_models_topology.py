"""Checks that the reference models in tests/models.py match torchvision's
topologies, run with any batch size and export with a dynamic batch dim."""

import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import REFERENCE_MODELS, mobilenet_v2, resnet18  # noqa: E402

NAMES = sorted(REFERENCE_MODELS)


def _example(name, batch=None):
    factory, shape = REFERENCE_MODELS[name]
    if batch is not None:
        shape = (batch,) + tuple(shape[1:])
    return factory(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [None, 5])
def test_forward_shape(name, batch):
    model, x = _example(name, batch)
    assert not model.training
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_factory_deterministic_and_bn_nontrivial(name):
    factory, _ = REFERENCE_MODELS[name]
    a, b = factory(), factory()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))


def test_resnet18_topology():
    model = resnet18()
    assert _count(model, nn.Conv2d) == 20
    assert _count(model, nn.Linear) == 1
    assert _params(model) == 11_689_512
    keys = set(model.state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
              "layer1.1.bn2.num_batches_tracked", "layer2.0.downsample.0.weight",
              "layer4.0.downsample.1.running_var", "fc.weight", "fc.bias"]:
        assert k in keys, k
    assert "layer1.0.downsample.0.weight" not in keys
    assert len(keys) == 122  # torchvision resnet18 state_dict size


def test_mobilenet_v2_topology():
    model = mobilenet_v2()
    assert _count(model, nn.Conv2d) == 52
    assert _count(model, nn.Linear) == 1
    assert _params(model) == 3_504_872
    keys = set(model.state_dict())
    for k in ["features.0.0.weight", "features.0.1.running_mean",
              "features.1.conv.0.0.weight", "features.1.conv.1.weight",
              "features.1.conv.2.weight", "features.2.conv.0.0.weight",
              "features.2.conv.1.0.weight", "features.2.conv.2.weight",
              "features.2.conv.3.running_var", "features.18.0.weight",
              "classifier.1.weight", "classifier.1.bias"]:
        assert k in keys, k
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.2
    assert _count(model, nn.ReLU6) == 35


@pytest.mark.parametrize("name", NAMES)
def test_export_dynamic_batch(name):
    model, x = _example(name)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    _, x5 = _example(name, batch=5)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x5), model(x5), rtol=1e-4, atol=1e-5)
