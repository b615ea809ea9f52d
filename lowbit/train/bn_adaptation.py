"""BatchNorm adaptation (NNCF's `batchnorm_adaptation`): after pruning or quantization the activations a
BatchNorm sees have moved, and its running statistics no longer describe them. Re-estimating them on a few
batches of data, without training anything else, recovers much of the accuracy before any fine-tuning.

`batch_norm_adaptation(model, dataset, num_iterations)` replaces the running statistics of every BatchNorm of
the model by their average over `num_iterations` batches (an exact cumulative average, not a momentum), with
every other module in eval mode and no gradient. The average restarts from the first batch's statistics, not
from a reset (mean 0, variance 1): a BatchNorm merged into its Conv for QAT (fold_bn="train", per-tensor
weights) scales the weight its quantizer rounds by the running variance during these very batches, and a
variance of 1 there would round it against its clipping ends or to zero. It changes the model it is given (as
a training step does) and returns it.
"""

from __future__ import annotations

from typing import Any

from ..errors import DatasetError, OptionError


def batch_norm_adaptation(model: Any, dataset: Any, num_iterations: int = 10) -> Any:
    """Re-estimate `model`'s BatchNorm running statistics on the first `num_iterations` items of `dataset`."""
    import torch

    from ..quant.dataset import CalibrationData

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"batch_norm_adaptation takes a torch module, not a {type(model).__name__}: an ONNX "
                          "model has no running statistics to adapt")
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise OptionError(f"num_iterations={num_iterations!r} must be a positive int (batches to average over)")
    if dataset is None:
        raise DatasetError("batch_norm_adaptation needs data: pass dataset=lowbit.Dataset(...)")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        model.eval()
        for m in norms:
            m.num_batches_tracked.zero_()  # the first batch's statistics replace the running ones
            m.momentum = None  # the cumulative average of the batches' statistics
            m.train()
        with torch.no_grad():
            for item in CalibrationData(dataset, num_iterations).items():  # DatasetError when there is none
                inputs = item if isinstance(item, (tuple, list)) else (item,)
                model(*(torch.as_tensor(x) for x in inputs))
    finally:
        for m in norms:
            m.momentum = momenta[m]
        for m, training in modes.items():
            m.training = training
    return model
