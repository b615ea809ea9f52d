"""lowbit.batch_norm_adaptation: every BatchNorm's running statistics become the exact average of the batches'
statistics, nothing else changes, and a pruned model recovers accuracy without training."""

import copy

import pytest
import torch

import lowbit


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=g) * 2 + 1 for _ in range(n)]


def test_running_statistics_become_the_average_of_the_batches():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5)).eval()
    weight = model[0].weight.detach().clone()
    batches = _data()
    adapted = lowbit.batch_norm_adaptation(model, lowbit.Dataset(batches), num_iterations=3)
    assert adapted is model and not model.training and not model[1].training and model[1].momentum == 0.1
    with torch.no_grad():
        pre = [model[0](b) for b in batches[:3]]  # exactly 3 batches were used
    mean = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre]).mean(0)
    var = torch.stack([p.var(dim=(0, 2, 3), unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert torch.equal(model[0].weight, weight)  # nothing trained


def test_a_pruned_generated_module_adapts_its_batchnorms():
    from models import REFERENCE_MODELS

    factory, shape = REFERENCE_MODELS["resnet18"]
    model = factory()
    x = torch.randn(*shape)
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    before = copy.deepcopy(pruned.get_submodule("bn1").running_mean)
    lowbit.batch_norm_adaptation(pruned, lowbit.Dataset([torch.randn(4, 3, 32, 32) for _ in range(2)]), 2)
    assert not torch.equal(before, pruned.get_submodule("bn1").running_mean)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_iterations": 0}, lowbit.OptionError, "num_iterations=0 must be a positive int"),
    ({"dataset": None}, lowbit.DatasetError, "needs data"),
    ({"dataset": []}, lowbit.DatasetError, "empty"),
])
def test_bad_requests_are_named(kwargs, error, message):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    args = {"dataset": lowbit.Dataset(_data(1)), "num_iterations": 1, **kwargs}
    if args["dataset"] is not None and not isinstance(args["dataset"], lowbit.Dataset):
        args["dataset"] = lowbit.Dataset(args["dataset"])
    with pytest.raises(error, match=message):
        lowbit.batch_norm_adaptation(model, **args)


def test_a_merged_batchnorm_adapts_from_its_trained_statistics():
    """With BN merge (fold_bn="train") and a per-tensor weight quantizer the Conv's weight is rounded as
    W * gamma / sqrt(running_var): adaptation must not restart from running_var = 1 (the variances here are
    100-155 and 0.1-0.15), which rounds that weight against its clipping ends or to zero; the statistics end
    as the FP32 model's."""
    from lowbit.hw_configs import narrowed
    from lowbit.train.controller import QAT_PASSES

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    batches = [b * 10 for b in _data(6)]
    reference = lowbit.batch_norm_adaptation(copy.deepcopy(model), lowbit.Dataset(batches), 6)
    lowbit.batch_norm_adaptation(model, lowbit.Dataset(batches), 6)  # trained statistics, as QAT starts from
    hw = narrowed("CPU", weights={"per_channel": False})
    q = lowbit.compile(model, QAT_PASSES, dataset=lowbit.Dataset(batches), fold_bn="train", hw=hw, progress=False)
    assert "div.Tensor" in q.code  # the simulated-folding form
    lowbit.batch_norm_adaptation(q, lowbit.Dataset(batches), 6)
    for name in ("1", "4"):
        torch.testing.assert_close(q.get_submodule(name).running_var, reference.get_submodule(name).running_var,
                                   rtol=0.05, atol=0)
