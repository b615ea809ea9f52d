"""Shared fixtures: quiet runtimes, the reference models, and runners for each backend."""

import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
ort.set_default_logger_severity(3)
torch.manual_seed(0)
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)  # one of two workers on two cores: torch's own threads would only contend

SLOWEST_FILES = ("test_zoo.py", "test_prune.py", "test_deploy.py", "test_robustness_torch.py")


def pytest_collection_modifyitems(items):
    """The slowest files first: the two workers take one file at a time (pyproject's addopts), and a slow file
    taken last would leave one of them running it alone."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def run_onnx(model, feeds):
    """Run an onnx.ModelProto in ONNX Runtime; feeds maps input name -> array."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_openvino(model, inputs):
    """Run an openvino.Model in f32 (this CPU would otherwise run it in bf16)."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(list(inputs))
    return [result[o] for o in compiled.outputs]


def train_epochs(module, controller, x, epochs: int = 3) -> None:
    """`epochs` SGD steps (lr 0.05, momentum 0.9, which would revive zeroed weights) of cross-entropy on `x`
    against the labels 0, 1, ... 9, 0, ..., each followed by the controller's epoch_step; `module` ends in eval
    mode."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        module.train()
        opt.zero_grad()
        F.cross_entropy(module(x), torch.arange(len(x)) % 10).backward()
        opt.step()
        controller.scheduler.epoch_step()
    module.eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
